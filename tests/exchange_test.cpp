#include "exchange.hpp"

#include <gtest/gtest.h>

#include <chrono>
#include <thread>
#include <vector>

#include "local_group.hpp"
#include "stream.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

// Every step of two epochs, on 1, 2, 3 and 5 in-process ranks, with batches that do not
// divide the set or the ranks, split by rows and by chunks, through MPI (node_rows 0), through
// node memory (the ranks share it), and with batches too large for the node memory's slots
// (through MPI again): each rank's minibatch input and targets from the exchange are byte
// for byte what gather() copies from the whole set.
void expect_exchange_matches_gather(const Dataset& whole, std::size_t k) {
  const std::size_t batch = 37;
  for (int size : {1, 2, 3, 5}) {
    for (std::size_t chunk : {std::size_t(0), std::size_t(4)}) {
      for (std::size_t node_rows : {std::size_t(0), batch, batch - 1}) {
        std::size_t steps = 0, mismatches = 0;
        testing::run_ranks(size, [&](Communicator& comm) {
          const Dataset mine = testing::block_of(whole, comm.rank(), size);
          RowExchange exchange(comm, mine, k, chunk, node_rows);
          EXPECT_EQ(exchange.through_node(), node_rows > 0 && size > 1);
          std::vector<std::uint32_t> order;
          for (std::uint64_t epoch = 0; epoch < 2; ++epoch) {
            epoch_permutation(whole.rows, 3, epoch, order);
            for (std::size_t begin = 0; begin < whole.rows; begin += batch) {
              const auto global = std::span<const std::uint32_t>(order).subspan(
                  begin, std::min(whole.rows, begin + batch) - begin);
              const Range shard = shard_range(global.size(), comm.rank(), size, chunk);
              std::vector<float> x(shard.size() * whole.cols + 1, -1.0f),
                  y(shard.size() * k + 1, -1.0f);
              std::vector<float> x_ref(x.size(), -1.0f), y_ref(y.size(), -1.0f);
              exchange.gather(global, x.data(), y.data());
              gather(whole, global.subspan(shard.begin, shard.size()), k, x_ref.data(),
                     y_ref.data());
              if (comm.rank() == 0) ++steps;
              if (!testing::same_bits(x, x_ref) || !testing::same_bits(y, y_ref)) {
                ADD_FAILURE() << size << " ranks, chunk " << chunk << ", node rows " << node_rows
                              << ", epoch " << epoch << ", batch at " << begin << ", rank "
                              << comm.rank();
                if (comm.rank() == 0) ++mismatches;
              }
            }
          }
        });
        EXPECT_EQ(steps, 2 * ((whole.rows + batch - 1) / batch));
        EXPECT_EQ(mismatches, 0u);
      }
    }
  }
}

TEST(RowExchange, MinibatchesAreByteIdenticalToTheWholeSetsForLabels) {
  expect_exchange_matches_gather(testing::noisy_classes(203, 9, 6, 1.0), 6);
}

TEST(RowExchange, MinibatchesAreByteIdenticalForOneOutputAndForTargets) {
  Dataset binary = testing::noisy_classes(150, 5, 2, 1.0);
  expect_exchange_matches_gather(binary, 1);
  Dataset regression = testing::noisy_classes(150, 5, 3, 1.0);
  regression.target_cols = 3;
  for (std::size_t r = 0; r < regression.rows; ++r) {
    for (std::size_t c = 0; c < 3; ++c) regression.targets.push_back(float(r) * 0.5f - float(c));
  }
  regression.labels.clear();
  expect_exchange_matches_gather(regression, 3);
}

TEST(RowExchange, RefusesABlockThatIsNotTheRanks) {
  const Dataset whole = testing::noisy_classes(40, 3, 2, 1.0);
  testing::run_ranks(2, [&](Communicator& comm) {
    const Dataset wrong = testing::block_of(whole, 1 - comm.rank(), 2);
    testing::expect_error([&] { RowExchange(comm, wrong, 2, 0); }, "but its block is");
  });
}

// A streamed set gives the rows gather() copies from the whole set, whichever way the file
// stores them: contiguous raw floats (mapped, or read with pread), chunks of raw floats
// (read chunk by chunk through the cache, here smaller than the set and than one chunk),
// and anything else (doubles: one HDF5 read of the rows' union, converted).
class RowStreamTest : public testing::TempDirTest {};

TEST_F(RowStreamTest, RowsAreTheWholeSetsForEveryLayout) {
  const Dataset whole = testing::noisy_classes(301, 7, 5, 1.0);
  write_dataset(path("contiguous.h5"), whole);
  const auto write_with = [&](const std::string& name, hid_t file_type, hsize_t chunk_rows) {
    h5::Handle file(H5Fcreate(path(name).c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT),
                    H5Fclose, name);
    h5::write_dataset(file.get(), "features", file_type, H5T_NATIVE_FLOAT, {whole.rows, whole.cols},
                      whole.features.data(), chunk_rows);
    h5::write_dataset(file.get(), "labels", H5T_STD_I32LE, H5T_NATIVE_INT32, {whole.rows},
                      whole.labels.data());
    file.close(name);
  };
  write_with("chunked.h5", H5T_NATIVE_FLOAT, 4);
  write_with("doubles.h5", H5T_IEEE_F64LE, 0);
  std::vector<std::uint32_t> order;
  for (const char* name : {"contiguous.h5", "chunked.h5", "doubles.h5"}) {
    const Dataset streamed = read_dataset_streamed(path(name));
    EXPECT_TRUE(streamed.streamed);
    EXPECT_TRUE(streamed.features.empty());
    EXPECT_EQ(streamed.labels, whole.labels);
    for (std::size_t cache : {std::size_t(0), std::size_t(1) << 20}) {
      // The contiguous file mapped (cache 0) and read with pread (the other).
      RowStream stream(streamed, cache, cache == 0);
      for (std::uint64_t epoch = 0; epoch < 2; ++epoch) {
        epoch_permutation(whole.rows, 9, epoch, order);
        for (std::size_t begin = 0; begin < whole.rows; begin += 40) {
          const auto rows = std::span<const std::uint32_t>(order).subspan(
              begin, std::min<std::size_t>(40, whole.rows - begin));
          std::vector<float> x(rows.size() * whole.cols), y(rows.size() * 5);
          std::vector<float> x_ref(x.size()), y_ref(y.size());
          stream.gather(rows, 5, x.data(), y.data());
          gather(whole, rows, 5, x_ref.data(), y_ref.data());
          ASSERT_EQ(x, x_ref) << name << ", cache " << cache << ", batch at " << begin;
          ASSERT_EQ(y, y_ref) << name;
        }
      }
    }
  }
  testing::expect_error(
      [&] { gather(read_dataset_streamed(path("chunked.h5")), order, 5, nullptr, nullptr); },
      "a streamed data set holds no rows to copy");
}

TEST(BackgroundTask, RunsJobsInTurnAndHandsBackTheirErrors) {
  BackgroundTask task;
  int runs = 0;
  for (int i = 0; i < 100; ++i) {
    task.start([&] { ++runs; });
    task.wait();
  }
  EXPECT_EQ(runs, 100);
  task.start([] { SP_THROW("the job failed"); });
  testing::expect_error([&] { task.wait(); }, "the job failed");
  task.start([&] { ++runs; });  // the thread goes on after an error
  task.wait();
  EXPECT_EQ(runs, 101);
  task.start([] { std::this_thread::sleep_for(std::chrono::milliseconds(20)); });
  // destroyed while the job runs: the destructor waits for it
}

}  // namespace
}  // namespace shardprop
