#include "shardprop/train.hpp"

#include <gtest/gtest.h>

#include <numbers>

#include "test_util.hpp"

namespace shardprop {
namespace {

class Counter final : public TrainObserver {
 public:
  void on_epoch(const EpochStats& s) override { epochs.push_back(s); }
  std::vector<EpochStats> epochs;
};

Settings settings_for(const std::string& layers, std::size_t batch) {
  Settings s;
  s.layers = layers;
  s.batch = batch;
  return s;
}

TEST(Trainer, CosineScheduleFallsFromBaseToZero) {
  const Dataset data = testing::noisy_classes(40, 3, 2, 3.0);
  Settings config = settings_for("3,4,2", 10);
  config.epochs = 5;  // 20 steps
  config.lr = 0.2;
  config.lr_schedule = "cosine";
  testing::LocalGroup one(1);
  Trainer trainer(config, one.member(0), data);
  EXPECT_DOUBLE_EQ(trainer.learning_rate(0), 0.2);
  EXPECT_NEAR(trainer.learning_rate(10), 0.1, 1e-15);
  EXPECT_NEAR(trainer.learning_rate(5), 0.1 * (1 + std::cos(std::numbers::pi / 4)), 1e-15);
  EXPECT_NEAR(trainer.learning_rate(20), 0.0, 1e-15);
  config.lr_schedule = "constant";
  Trainer constant(config, one.member(0), data);
  EXPECT_DOUBLE_EQ(constant.learning_rate(13), 0.2);
}

TEST(Trainer, EpochsShortLastBatchAndMaxSteps) {
  const Dataset data = testing::noisy_classes(23, 3, 2, 3.0);  // batches of 10, 10, 3
  Settings config = settings_for("3,4,2", 10);
  config.epochs = 2;
  testing::LocalGroup one(1);
  Trainer trainer(config, one.member(0), data);
  Counter seen;
  trainer.run(&data, seen);
  ASSERT_EQ(seen.epochs.size(), 2u);
  EXPECT_EQ(seen.epochs[0].step, 3u);
  EXPECT_EQ(seen.epochs[0].train.samples, 23u);  // no sample dropped or repeated
  EXPECT_EQ(seen.epochs[1].step, 6u);
  EXPECT_EQ(seen.epochs[1].test.samples, 23u);
  EXPECT_EQ(trainer.state().epoch, 2u);
  EXPECT_EQ(trainer.state().batch_in_epoch, 0u);

  config.max_steps = 4;  // stops inside the second epoch
  Trainer limited(config, one.member(0), data);
  Counter partial;
  limited.run(nullptr, partial);
  EXPECT_EQ(limited.state().step, 4u);
  EXPECT_EQ(limited.state().epoch, 1u);
  EXPECT_EQ(limited.state().batch_in_epoch, 1u);
  ASSERT_EQ(partial.epochs.size(), 2u);
  EXPECT_EQ(partial.epochs[1].train.samples, 10u);
}

TEST(Trainer, RejectsBatchesThatCannotBeSharded) {
  const Dataset data = testing::noisy_classes(8, 3, 2, 3.0);
  Settings config = settings_for("3,2", 9);  // more than the 8 samples
  testing::LocalGroup one(1);
  EXPECT_THROW(Trainer(config, one.member(0), data), UsageError);
}

// run() gathers each next batch during the current step's reductions; the result is the
// same, bit for bit, as stepping through the same batches one gather at a time.
TEST(Trainer, PrefetchingTheNextBatchChangesNothing) {
  const Dataset data = testing::noisy_classes(57, 5, 3, 1.0);  // batches of 8: 7 full, 1 short
  Settings config = settings_for("5,9:relu,3:softmax", 8);
  config.epochs = 2;
  testing::LocalGroup one(1);
  Trainer prefetching(config, one.member(0), data);
  TrainObserver quiet;
  prefetching.run(nullptr, quiet);
  Trainer plain(config, one.member(0), data);
  std::vector<std::uint32_t> order;
  for (std::uint64_t epoch = 0; epoch < 2; ++epoch) {
    epoch_permutation(data.rows, config.seed, epoch, order);
    for (std::size_t begin = 0; begin < data.rows; begin += config.batch) {
      plain.step(std::span<const std::uint32_t>(order).subspan(
          begin, std::min(data.rows, begin + config.batch) - begin));
    }
  }
  ASSERT_EQ(plain.state().step, prefetching.state().step);
  EXPECT_TRUE(std::equal(plain.params().begin(), plain.params().end(),
                         prefetching.params().begin()));
  EXPECT_EQ(testing::max_relative_error<float>(plain.layout(), plain.params(),
                                               prefetching.params()), 0.0);
}

// A step whose loss or gradient is NaN or Inf stops every rank with one report (rank 0's)
// that names the step and the layer, and leaves the parameters of the last good step: with
// the node reducer's shared parameters as with each rank's own.
class Divergence : public ::testing::TestWithParam<const char*> {};
INSTANTIATE_TEST_SUITE_P(Reduction, Divergence, ::testing::Values("node", "mpi"));

TEST_P(Divergence, StopsEveryRankAndNamesStepAndLayer) {
  const Dataset data = testing::noisy_classes(40, 3, 2, 1.0);
  Settings config = settings_for("3,4:relu,2:softmax", 10);
  config.reduction = GetParam();
  config.lr = 1e30;  // the first step is finite; its update overflows the next one
  std::string reports[2];
  std::uint64_t steps[2] = {0, 0};
  bool unchanged[2] = {false, false};
  testing::run_ranks(2, [&](Communicator& comm) {
    const int r = comm.rank();
    Trainer trainer(config, comm, data);
    std::vector<std::uint32_t> order;
    epoch_permutation(data.rows, config.seed, 0, order);
    std::vector<float> good;
    try {
      for (std::size_t begin = 0; begin < data.rows; begin += config.batch) {
        good.assign(trainer.params().begin(), trainer.params().end());
        trainer.step(std::span<const std::uint32_t>(order).subspan(begin, config.batch));
      }
    } catch (const CollectiveFailure& failure) {
      if (failure.reports()) reports[r] = failure.what();
      steps[r] = trainer.state().step;
      unchanged[r] = std::equal(good.begin(), good.end(), trainer.params().begin());
    }
  });
  EXPECT_EQ(steps[0], 1u);  // step 2 diverged, step 1 stands
  EXPECT_EQ(steps[1], 1u);
  EXPECT_TRUE(unchanged[0]);
  EXPECT_TRUE(unchanged[1]);
  EXPECT_TRUE(reports[1].empty()) << reports[1];
  EXPECT_NE(reports[0].find("training diverged at step 2: loss is "), std::string::npos)
      << reports[0];
  EXPECT_NE(reports[0].find("non-finite gradient in layer "), std::string::npos) << reports[0];
}

// Ranks given different models stop together with one reason, whichever reduction they
// would use (the node reducer's memory would differ in size between them).
TEST(Trainer, RanksWithDifferentModelsStopTogether) {
  const Dataset data = testing::noisy_classes(40, 3, 2, 1.0);
  for (const char* reduction : {"auto", "mpi"}) {
    std::string errors[2];
    testing::run_ranks(2, [&](Communicator& comm) {
      Settings config = settings_for(comm.rank() == 0 ? "3,4,2" : "3,40,2", 10);
      config.reduction = reduction;
      try {
        Trainer trainer(config, comm, data);
      } catch (const Error& e) {
        errors[comm.rank()] = e.what();
      }
    });
    for (const std::string& e : errors) {
      EXPECT_NE(e.find("ranks disagree on the model layout, settings or training data"),
                std::string::npos)
          << reduction << ": " << e;
    }
  }
}

// The node reducer (one shared copy of the parameters and the optimizer's state, each rank
// updating its share) trains as the MPI reducer does, and its checkpoints resume on either.
// Tolerance: the two add the ranks' sums in another grouping (rank order against MPI's), so
// the parameters differ by float rounding, amplified over 12 Adam steps: 1e-4 relative.
// Each rank holding only its block of the training and test sets, or streaming the
// training set from its file, trains to the same bits as every rank holding all of it: the
// minibatches are byte for byte the same, in the default mode as in the deterministic one,
// through either reducer.
class Placement : public testing::TempDirTest {};

TEST_F(Placement, PartitionedAndStreamedDataTrainToTheBitsOfReplicated) {
  const Dataset data = testing::noisy_classes(70, 5, 3, 1.0);  // batches of 16: 4 full, 1 short
  write_dataset(path("train.h5"), data);
  const Dataset test = testing::noisy_classes(23, 5, 3, 2.0);
  for (const bool deterministic : {false, true}) {
    for (const char* reduction : {"node", "mpi"}) {
      Settings config = settings_for("5,33:relu,3:softmax", 16);
      config.epochs = 2;
      config.deterministic = deterministic;
      config.chunk = 4;
      config.reduction = reduction;
      std::vector<AlignedVector<float>> params(3);
      std::vector<EvalStats> evaluated(3);
      for (const int placement : {0, 1, 2}) {  // replicated, partitioned, streamed
        const bool partitioned = placement > 0;
        testing::run_ranks(3, [&](Communicator& comm) {
          const Dataset block = testing::block_of(data, comm.rank(), 3);
          const Dataset test_block =
              testing::block_of(test, comm.rank(), 3, config.deterministic_chunk());
          const Dataset streamed = read_dataset_streamed(path("train.h5"));
          Trainer trainer(config, comm, placement == 0 ? data : placement == 1 ? block : streamed);
          ASSERT_EQ(trainer.train_data().partitioned(), placement == 1);
          TrainObserver quiet;
          trainer.run(nullptr, quiet);
          const EvalStats e = trainer.evaluate(partitioned ? test_block : test);
          if (comm.rank() == 0) {
            params[std::size_t(placement)] = trainer.checkpoint().params;
            evaluated[std::size_t(placement)] = e;
          }
        });
      }
      const std::string what =
          std::string(deterministic ? "deterministic" : "default") + ", " + reduction;
      ASSERT_FALSE(params[0].empty()) << what;
      for (std::size_t p : {1, 2}) {
        EXPECT_EQ(params[0], params[p]) << what << ", placement " << p;
        EXPECT_EQ(evaluated[0].loss, evaluated[p].loss) << what;
        EXPECT_EQ(evaluated[0].accuracy, evaluated[p].accuracy) << what;
        EXPECT_EQ(evaluated[p].samples, test.rows) << what;
      }
    }
  }
}

// A set held as bytes (256 values or fewer, as read_dataset holds it) trains and evaluates
// to the bits of the same values held as floats: whole on every rank, and by blocks whose
// rows travel between ranks.
TEST_F(Placement, FeaturesHeldAsBytesTrainToTheBitsOfFloats) {
  const auto quantized = [](Dataset d) {  // steps of 1/16 in [-4, 4): at most 128 values
    for (float& v : d.features) v = std::clamp(std::round(v * 16), -64.0f, 63.0f) / 16;
    return d;
  };
  const Dataset dense = quantized(testing::noisy_classes(70, 5, 3, 1.0));
  const Dataset test_dense = quantized(testing::noisy_classes(23, 5, 3, 2.0));
  write_dataset(path("train.h5"), dense);
  write_dataset(path("test.h5"), test_dense);
  const Dataset coded = read_dataset(path("train.h5"));
  const Dataset test_coded = read_dataset(path("test.h5"));
  ASSERT_TRUE(coded.coded);
  ASSERT_TRUE(test_coded.coded);
  Settings config = settings_for("5,33:relu,3:softmax", 16);
  config.epochs = 2;
  std::vector<AlignedVector<float>> params(4);
  std::vector<EvalStats> evaluated(4);
  for (const int held : {0, 1, 2, 3}) {  // floats or bytes, whole or by blocks
    const bool bytes = held % 2 == 1, blocks = held >= 2;
    const Dataset& train = bytes ? coded : dense;
    const Dataset& test = bytes ? test_coded : test_dense;
    testing::run_ranks(2, [&](Communicator& comm) {
      const Dataset block = testing::block_of(train, comm.rank(), 2);
      const Dataset test_block = testing::block_of(test, comm.rank(), 2);
      Trainer trainer(config, comm, blocks ? block : train);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      const EvalStats e = trainer.evaluate(blocks ? test_block : test);
      if (comm.rank() == 0) {
        params[std::size_t(held)] = trainer.checkpoint().params;
        evaluated[std::size_t(held)] = e;
      }
    });
  }
  for (std::size_t h : {1, 3}) {
    ASSERT_FALSE(params[h].empty());
    EXPECT_TRUE(testing::same_bits(params[h - 1], params[h])) << "held " << h;
    EXPECT_EQ(evaluated[h - 1].loss, evaluated[h].loss) << "held " << h;
    EXPECT_EQ(evaluated[h].samples, test_dense.rows);
  }
}

TEST(Trainer, NodeReductionTrainsAsMpiAndResumesOnEither) {
  const Dataset data = testing::noisy_classes(60, 5, 3, 1.0);  // batches of 16: 3 full, 1 short
  Settings config = settings_for("5,33:relu,3:softmax", 16);
  config.optimizer = "adam";
  config.lr = 0.01;
  config.epochs = 3;
  std::vector<Checkpoint> final_state(2);
  for (const char* reduction : {"node", "mpi"}) {
    config.reduction = reduction;
    testing::run_ranks(3, [&](Communicator& comm) {
      Trainer trainer(config, comm, data);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      if (comm.rank() == 0) final_state[config.reduction == "node" ? 0 : 1] = trainer.checkpoint();
    });
  }
  const Checkpoint& node = final_state[0];
  const Checkpoint& mpi = final_state[1];
  ASSERT_EQ(node.state.step, 12u);
  const Layout layout(node.spec);
  EXPECT_LT(testing::max_relative_error<float>(layout, node.params, mpi.params), 1e-4);
  ASSERT_EQ(node.optimizer_state.size(), 2 * layout.size());
  for (std::size_t v = 0; v < 2; ++v) {
    const auto part = [&](const Checkpoint& c) {
      return std::span<const float>(c.optimizer_state).subspan(v * layout.size(), layout.size());
    };
    EXPECT_LT(testing::max_relative_error<float>(layout, part(node), part(mpi)), 1e-4) << v;
  }

  // Stopped at step 5 under one reducer and resumed on another rank count under the other:
  // the same as running through under the second (the resume restores every value of every
  // share).
  config.epochs = 2;
  for (const auto& [first, second] : {std::pair("node", "mpi"), std::pair("mpi", "node")}) {
    Checkpoint half;
    config.reduction = first;
    config.max_steps = 5;
    testing::run_ranks(3, [&](Communicator& comm) {
      Trainer trainer(config, comm, data);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      if (comm.rank() == 0) half = trainer.checkpoint();
    });
    config.reduction = second;
    config.max_steps = -1;
    std::vector<float> resumed, through;
    testing::run_ranks(2, [&](Communicator& comm) {
      Trainer trainer(config, comm, data);
      trainer.restore(half);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      EXPECT_EQ(trainer.state().step, 8u);
      if (comm.rank() == 0) resumed.assign(trainer.params().begin(), trainer.params().end());
    });
    testing::run_ranks(3, [&](Communicator& comm) {
      Trainer trainer(config, comm, data);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      if (comm.rank() == 0) through.assign(trainer.params().begin(), trainer.params().end());
    });
    EXPECT_LT(testing::max_relative_error<float>(layout, resumed, through), 1e-4)
        << first << " then " << second;
  }
}

}  // namespace
}  // namespace shardprop
