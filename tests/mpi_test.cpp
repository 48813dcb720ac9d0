// Run by ctest under `mpirun -np 2` and `-np 3` (the deterministic test also under 1 and 4): every rank's reduced gradient equals the
// full-batch gradient that rank computes alone, and parameters stay identical on all ranks.
// Tolerances as in reduce_test.cpp (2e-6 float, 1e-13 double, relative to each tensor's
// largest entry): the shards only change the order of the sums.
#include <gtest/gtest.h>
#include <mpi.h>

#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>
#include <oneapi/tbb/global_control.h>

#include "shardprop/comm.hpp"
#include "shardprop/train.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

MpiComm* world = nullptr;

template <class T>
void expect_same_on_all_ranks(std::span<const T> values) {
  std::vector<T> root(values.begin(), values.end());
  world->broadcast(std::span<T>(root), 0);
  EXPECT_TRUE(std::equal(values.begin(), values.end(), root.begin()))
      << "rank " << world->rank() << " differs from rank 0";
}

template <class T>
void check_reduction(const char* layers, double tolerance) {
  const ModelSpec spec = parse_model(layers, "xent");
  const Layout layout(spec);
  AlignedVector<T> params(layout.size());
  init_params<T>(spec, layout, 3, std::span<T>(params));
  for (std::size_t batch : {23u, 5u, 64u}) {
    const RowMatrix<T> x = testing::random_matrix<T>(batch, 12, batch);
    const RowMatrix<T> y = testing::random_targets<T>(Loss::xent, batch, 4, batch + 1);
    Mlp<T> mlp(spec);
    const testing::Gradient<T> full =
        testing::full_batch_gradient<T>(mlp, params, testing::view(x), testing::view(y));

    const Range shard = shard_range(batch, world->rank(), world->size());
    const auto xs = testing::rows_of(x, shard.begin, shard.end);
    const auto ys = testing::rows_of(y, shard.begin, shard.end);
    const testing::Gradient<T> g =
        testing::reduced_gradient<T>(mlp, *world, std::span<const T>(params), xs, ys, batch);
    EXPECT_EQ(g.stats.samples, double(batch));
    EXPECT_LT(testing::max_relative_error<T>(layout, std::span<const T>(g.mean),
                                             std::span<const T>(full.mean)),
              tolerance)
        << "batch " << batch << " over " << world->size() << " ranks";
    expect_same_on_all_ranks<T>(g.mean);
    // One reduction of the whole gradient after backward, and the node reducer (through
    // memory the ranks share: every rank of these tests runs on one node), give the same
    // mean gradient, equal on every rank.
    const auto same_mean = [&](testing::Via via, const char* how) {
      const testing::Gradient<T> other = testing::reduced_gradient<T>(
          mlp, *world, std::span<const T>(params), xs, ys, batch, via);
      EXPECT_EQ(other.stats.samples, double(batch)) << how;
      EXPECT_NEAR(other.stats.loss_sum, g.stats.loss_sum, tolerance * std::abs(g.stats.loss_sum))
          << how;
      EXPECT_LT(testing::max_relative_error<T>(layout, std::span<const T>(other.mean),
                                               std::span<const T>(full.mean)),
                tolerance)
          << "batch " << batch << " over " << world->size() << " ranks, " << how;
      expect_same_on_all_ranks<T>(other.mean);
      return other;
    };
    const testing::Gradient<T> once = same_mean(testing::Via::once, "once after backward");
    same_mean(testing::Via::node, "node reducer");
    // On 1 or 2 ranks one reduction has the overlap's bits (a + b = b + a); on more, MPI may
    // add the ranks' parts in another order.
    if (world->size() <= 2) {
      EXPECT_TRUE(std::equal(g.mean.begin(), g.mean.end(), once.mean.begin())) << "batch " << batch;
    }
  }
}

// The second model's 300-wide layer has its dW computed in parts between progress calls.
TEST(Mpi, ReducedGradientEqualsFullBatchFloat) {
  check_reduction<float>("12,20:tanh,9:relu,4:softmax", 2e-6);
  check_reduction<float>("12,300:relu,4:softmax", 2e-6);
}
TEST(Mpi, ReducedGradientEqualsFullBatchDouble) {
  check_reduction<double>("12,20:tanh,9:relu,4:softmax", 1e-13);
  check_reduction<double>("12,300:relu,4:softmax", 1e-13);
}

TEST(Mpi, ParametersStayIdenticalOnAllRanksAndMatchOneRank) {
  const Dataset data = testing::noisy_classes(101, 6, 3, 1.0);
  const ModelSpec spec = parse_model("6,16:relu,8:sigmoid,3:softmax", "xent");
  Settings config;
  config.layers = spec.layers_string();
  config.batch = 10;  // uneven over 3 ranks; the 11th batch of each epoch is short
  config.epochs = 2;
  config.lr = 0.1;
  Trainer trainer(config, *world, data);
  TrainObserver quiet;
  trainer.run(nullptr, quiet);
  EXPECT_EQ(trainer.state().step, 22u);
  expect_same_on_all_ranks<float>(trainer.params());

  // The same training on one rank alone gives the same parameters up to float rounding
  // (22 steps of sums in another order: 1e-4 relative).
  testing::LocalGroup alone(1);
  Trainer single(config, alone.member(0), data);
  single.run(nullptr, quiet);
  EXPECT_LT(testing::max_relative_error<float>(trainer.layout(), trainer.params(), single.params()),
            1e-4);
  const EvalStats e = trainer.evaluate(data);
  const EvalStats e1 = single.evaluate(data);
  EXPECT_EQ(e.samples, 101u);
  EXPECT_NEAR(e.loss, e1.loss, 1e-4);
}

// The deterministic mode: training on these ranks, with 1 and then 2 oneTBB threads per
// rank, ends with the bits of the same training on one rank alone with one thread, and so
// does the evaluation. ctest runs this under 1 to 4 ranks, and with Open MPI's allreduce
// algorithms forced one by one (blocking: coll_tuned; nonblocking: coll_libnbc).
TEST(Mpi, DeterministicTrainingHasOneRanksBits) {
  const Dataset data = testing::noisy_classes(203, 6, 3, 1.0);
  const ModelSpec spec = parse_model("6,24:relu,12:tanh,3:softmax", "xent");
  Settings config;
  config.layers = spec.layers_string();
  config.batch = 40;  // 5 chunks of 8: uneven over 2, 3 and 4 ranks; each epoch ends short
  config.epochs = 3;
  config.lr = 0.1;
  config.deterministic = true;
  config.chunk = 8;
  TrainObserver quiet;
  testing::LocalGroup alone(1);
  std::vector<float> reference;
  EvalStats reference_eval;
  {
    const oneapi::tbb::global_control one(oneapi::tbb::global_control::max_allowed_parallelism, 1);
    Trainer single(config, alone.member(0), data);
    single.run(nullptr, quiet);
    reference.assign(single.params().begin(), single.params().end());
    reference_eval = single.evaluate(data);
  }
  for (std::size_t threads : {1u, 2u}) {
    const oneapi::tbb::global_control limit(oneapi::tbb::global_control::max_allowed_parallelism,
                                            threads);
    Trainer trainer(config, *world, data);
    trainer.run(nullptr, quiet);
    EXPECT_EQ(trainer.state().step, 18u);
    EXPECT_EQ(std::memcmp(trainer.params().data(), reference.data(), reference.size() * sizeof(float)), 0)
        << world->size() << " ranks x " << threads << " threads, rank " << world->rank();
    const EvalStats e = trainer.evaluate(data);
    EXPECT_EQ(e.loss, reference_eval.loss);
    EXPECT_EQ(e.accuracy, reference_eval.accuracy);
  }
}

// A rank that does not join a collective in time makes the waiting ranks throw
// CollectiveTimeout after the timeout, not hang. The late rank joins only once every other
// rank has given up and told it so, whatever the machine's speed (a rank that joined the
// collective late itself would otherwise still see it complete); it then completes the
// abandoned collective alone (the others' requests still progress inside the barrier), so
// the test can end cleanly. The buffers are static because the abandoned requests still
// write them.
TEST(Mpi, CollectiveTimeoutGivesUpOnALateRank) {
  MpiComm comm(MPI_COMM_WORLD);
  const int late_rank = comm.size() - 1;
  const bool late = comm.rank() == late_rank;
  // Blocking and nonblocking collectives do not match each other, so the late rank also
  // uses a timeout (a long one).
  comm.set_timeout(late ? 60.0 : 0.3);
  comm.set_phase("step", 42);
  static std::array<float, 1000> data;
  data.fill(1.0f);
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  if (late) {
    for (int r = 0; r < late_rank; ++r) {
      int gave_up = 0;
      ASSERT_EQ(MPI_Recv(&gave_up, 1, MPI_INT, r, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE),
                MPI_SUCCESS);
    }
    comm.allreduce_sum(std::span<float>(data));
  } else {
    try {
      comm.allreduce_sum(std::span<float>(data));
      ADD_FAILURE() << "rank " << comm.rank() << ": no timeout";
    } catch (const CollectiveTimeout& e) {
      const double waited = std::chrono::duration<double>(clock::now() - start).count();
      EXPECT_GE(waited, 0.3);
      EXPECT_LT(waited, 30.0) << "gave up, but only after a long wait";
      EXPECT_NE(e.message().find("step 42: MPI_Allreduce did not complete on every rank within 0.3 s"),
                std::string::npos)
          << e.message();
    }
    int gave_up = 1;
    ASSERT_EQ(MPI_Send(&gave_up, 1, MPI_INT, late_rank, 7, MPI_COMM_WORLD), MPI_SUCCESS);
  }
  ASSERT_EQ(MPI_Barrier(MPI_COMM_WORLD), MPI_SUCCESS);
  if (late) {
    EXPECT_EQ(data[0], float(comm.size()));
  }
}

}  // namespace
}  // namespace shardprop

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {  // one report; failures on any rank still fail the run
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int status = 0;
  {
    shardprop::MpiComm comm(MPI_COMM_WORLD);
    shardprop::world = &comm;
    status = RUN_ALL_TESTS();
  }
  MPI_Finalize();
  return status;
}
