// The communicator's collectives and collective_check, on in-process ranks (tests/
// local_group.hpp); mpi_test checks the same against MPI.
#include <gtest/gtest.h>

#include <array>

#include "local_group.hpp"
#include "shardprop/comm.hpp"

namespace shardprop {
namespace {

using testing::run_ranks;

TEST(LocalGroup, CollectivesBehaveLikeMpi) {
  std::vector<std::int64_t> maxima(3);
  std::vector<std::array<std::int32_t, 2>> received(3);
  std::vector<std::array<double, 2>> sums(3);
  run_ranks(3, [&](Communicator& c) {
    const auto r = std::size_t(c.rank());
    maxima[r] = c.allreduce_max(std::int64_t(10 * c.rank() - 5));
    std::array<std::int32_t, 2> values{c.rank(), c.rank() * c.rank()};
    c.broadcast(std::span<std::int32_t>(values), 2);
    received[r] = values;
    std::array<double, 2> mine{double(c.rank()), 0.5};
    c.start_allreduce_sum(std::span<double>(mine));
    c.wait_all();
    sums[r] = mine;
  });
  for (std::size_t r = 0; r < 3; ++r) {
    EXPECT_EQ(maxima[r], 15);
    EXPECT_EQ(received[r], (std::array<std::int32_t, 2>{2, 4}));
    EXPECT_EQ(sums[r], (std::array<double, 2>{3.0, 1.5}));
  }
}

TEST(CollectiveCheck, OnlyTheLowestFailingRankReportsTheCause) {
  std::vector<std::string> outcome(4);
  std::vector<int> status(4);
  run_ranks(4, [&](Communicator& c) {
    const int r = c.rank();
    try {
      collective_check(c, [&] {
        if (r == 1) SP_USAGE("bad flag on ", r);
        if (r == 3) SP_THROW("bad input on ", r);
      });
      outcome[std::size_t(r)] = "ok";
    } catch (const CollectiveFailure& e) {
      outcome[std::size_t(r)] = e.reports() ? std::string(e.what()) : "peer";
      status[std::size_t(r)] = e.exit_status();
    }
  });
  EXPECT_EQ(outcome[0], "peer");
  EXPECT_NE(outcome[1].find("bad flag on 1"), std::string::npos) << outcome[1];
  EXPECT_EQ(outcome[2], "peer");
  EXPECT_EQ(outcome[3], "peer");
  // Every rank leaves with the reporting rank's status: a usage error's.
  EXPECT_EQ(status, (std::vector<int>{kExitUsage, kExitUsage, kExitUsage, kExitUsage}));
}

TEST(CollectiveCheck, NoFailureIsSilent) {
  std::vector<int> passed(3);
  run_ranks(3, [&](Communicator& c) {
    collective_check(c, [] {});
    passed[std::size_t(c.rank())] = 1;
  });
  EXPECT_EQ(passed, (std::vector<int>{1, 1, 1}));
}

TEST(Communicator, ThePhaseNamesTheStep) {
  run_ranks(1, [](Communicator& c) {
    EXPECT_EQ(c.phase(), "");
    c.set_phase("step", 42);
    EXPECT_EQ(c.phase(), "step 42: ");
    c.clear_phase();
    EXPECT_EQ(c.phase(), "");
  });
}

}  // namespace
}  // namespace shardprop
