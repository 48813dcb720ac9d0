// The training recipe: learning-rate schedules and warmup against their closed forms,
// dropout (masks independent of ranks and threads, a finite-difference check with the masks
// fixed), clipping against a norm computed by hand, and validation with early stopping and
// the best model.
#include <gtest/gtest.h>

#include <cmath>
#include <numbers>

#include "gemm.hpp"
#include "layers.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/schedule.hpp"
#include "shardprop/train.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

constexpr double kPi = std::numbers::pi;

class Counter final : public TrainObserver {
 public:
  void on_epoch(const EpochStats& s) override { epochs.push_back(s); }
  void on_best(const std::string& path) override {
    if (!path.empty()) best.push_back(path);
  }
  std::vector<EpochStats> epochs;
  std::vector<std::string> best;
};

Settings settings_for(const std::string& layers, std::size_t batch) {
  Settings s;
  s.layers = layers;
  s.batch = batch;
  return s;
}

// ---- schedules ------------------------------------------------------------------------------

// 10 batches per epoch, 100 steps in all, base 0.1.
Schedule schedule(const std::string& kind, const std::string& milestones = "",
                  std::uint64_t warmup = 0) {
  Settings s;
  s.lr = 0.1;
  s.lr_schedule = kind;
  s.lr_milestones = milestones;
  s.lr_decay = 0.5;
  s.warmup_steps = warmup;
  return Schedule(s, 100, 10);
}

TEST(Schedule, EachScheduleMatchesItsClosedForm) {
  EXPECT_DOUBLE_EQ(schedule("constant").lr(0), 0.1);
  EXPECT_DOUBLE_EQ(schedule("constant").lr(99), 0.1);

  const Schedule cosine = schedule("cosine");
  EXPECT_DOUBLE_EQ(cosine.lr(0), 0.1);
  EXPECT_NEAR(cosine.lr(25), 0.05 * (1 + std::cos(kPi / 4)), 1e-16);
  EXPECT_NEAR(cosine.lr(50), 0.05, 1e-16);
  EXPECT_NEAR(cosine.lr(100), 0.0, 1e-16);

  const Schedule linear = schedule("linear");
  EXPECT_DOUBLE_EQ(linear.lr(0), 0.1);
  EXPECT_NEAR(linear.lr(25), 0.075, 1e-16);
  EXPECT_NEAR(linear.lr(90), 0.01, 1e-16);
  EXPECT_EQ(linear.lr(100), 0.0);

  // Halved every 3 epochs: epochs 0-2 at 0.1, 3-5 at 0.05, 6-8 at 0.025.
  const Schedule step = schedule("step", "3");
  EXPECT_DOUBLE_EQ(step.lr(29), 0.1);
  EXPECT_DOUBLE_EQ(step.lr(30), 0.05);
  EXPECT_DOUBLE_EQ(step.lr(59), 0.05);
  EXPECT_DOUBLE_EQ(step.lr(65), 0.025);
  EXPECT_DOUBLE_EQ(step.lr(99), 0.0125);

  // Halved at epochs 2 and 5.
  const Schedule multistep = schedule("multistep", "2,5");
  EXPECT_DOUBLE_EQ(multistep.lr(19), 0.1);
  EXPECT_DOUBLE_EQ(multistep.lr(20), 0.05);
  EXPECT_DOUBLE_EQ(multistep.lr(49), 0.05);
  EXPECT_DOUBLE_EQ(multistep.lr(50), 0.025);
  EXPECT_DOUBLE_EQ(multistep.lr(99), 0.025);
}

TEST(Schedule, WarmupRisesLinearlyAndComposesWithEverySchedule) {
  for (const auto& [kind, milestones] :
       {std::pair("constant", ""), std::pair("cosine", ""), std::pair("linear", ""),
        std::pair("step", "3"), std::pair("multistep", "2,5")}) {
    const Schedule plain = schedule(kind, milestones);
    const Schedule warm = schedule(kind, milestones, 8);
    for (std::uint64_t step : {0, 3, 7}) {
      EXPECT_NEAR(warm.lr(step), plain.lr(step) * double(step + 1) / 8.0, 1e-17)
          << kind << " step " << step;
    }
    for (std::uint64_t step : {8, 9, 40, 99}) {
      EXPECT_EQ(warm.lr(step), plain.lr(step)) << kind << " step " << step;
    }
  }
  EXPECT_NEAR(schedule("constant", "", 8).lr(0), 0.1 / 8, 1e-17);  // from near 0
}

TEST(Schedule, LinearScalingRuleAndTheTrainersRates) {
  Settings s;
  s.lr = 0.1;
  s.batch = 256;
  s.lr_scale_batch = 128;
  EXPECT_DOUBLE_EQ(Schedule(s, 10, 1).lr(3), 0.2);
  s.lr_scale_batch = 1024;
  EXPECT_DOUBLE_EQ(Schedule(s, 10, 1).lr(3), 0.025);

  // The trainer's steps: 40 samples in batches of 10, 5 epochs: 20 steps, 4 per epoch.
  const Dataset data = testing::noisy_classes(40, 3, 2, 3.0);
  Settings config = settings_for("3,4,2", 10);
  config.epochs = 5;
  config.lr = 0.2;
  config.lr_schedule = "multistep";
  config.lr_milestones = "2,4";
  config.lr_decay = 0.1;
  config.warmup_steps = 4;
  testing::LocalGroup one(1);
  Trainer trainer(config, one.member(0), data);
  EXPECT_DOUBLE_EQ(trainer.learning_rate(0), 0.05);
  EXPECT_DOUBLE_EQ(trainer.learning_rate(3), 0.2);
  EXPECT_DOUBLE_EQ(trainer.learning_rate(7), 0.2);
  EXPECT_NEAR(trainer.learning_rate(8), 0.02, 1e-17);
  EXPECT_NEAR(trainer.learning_rate(16), 0.002, 1e-17);
  // Each epoch's metrics carry the rate of its last step.
  Counter seen;
  trainer.run(nullptr, seen);
  ASSERT_EQ(seen.epochs.size(), 5u);
  for (std::size_t e = 0; e < 5; ++e) {
    EXPECT_EQ(seen.epochs[e].lr, trainer.learning_rate(4 * e + 3)) << e;
  }
  EXPECT_NE(metrics_json(seen.epochs[2], 1, 1).find("\"lr\":0.02,"), std::string::npos)
      << metrics_json(seen.epochs[2], 1, 1);
}

// ---- dropout --------------------------------------------------------------------------------

TEST(Dropout, GrammarRoundTripsAndRejectsBadRates) {
  const ModelSpec spec = parse_model("784,512:relu:dropout=0.2,256:dropout=0.5,10:softmax", "xent");
  EXPECT_EQ(spec.layers[0].dropout, 0.2);
  EXPECT_EQ(spec.layers[1].dropout, 0.5);
  EXPECT_EQ(spec.layers[1].activation, Activation::relu);
  EXPECT_EQ(spec.layers[2].dropout, 0.0);
  EXPECT_EQ(spec.layers_string(), "784,512:relu:dropout=0.2,256:relu:dropout=0.5,10:softmax");
  EXPECT_EQ(parse_model(spec.layers_string(), "xent").layers_string(), spec.layers_string());
  EXPECT_FALSE(parse_model("4,3:relu,2:softmax", "xent").has_dropout());
  testing::expect_error([] { parse_layers("4,3:relu:dropout=1,2"); },
                              "--layers: dropout 1 in '3:relu:dropout=1' must be >= 0 and < 1");
  testing::expect_error([] { parse_layers("4,3:dropout=-0.1,2"); },
                              "dropout -0.1 in '3:dropout=-0.1' must be >= 0 and < 1");
  testing::expect_error([] { parse_layers("4,3:dropout=abc,2"); },
                              "'dropout=abc' in '3:dropout=abc' is not a number");
  testing::expect_error([] { parse_layers("4,3,2:softmax:dropout=0.5"); },
                              "the output layer '2:softmax:dropout=0.5' cannot drop units");
  testing::expect_error([] { parse_layers("4:dropout=0.5,3,2"); },
                              "the input entry '4:dropout=0.5' takes no activation or dropout");
  testing::expect_error([] { parse_layers("4,3:relu:tanh,2"); }, "names two activations");
}

TEST(Dropout, DropsAtTheRateAndDependsOnTheKeysAlone) {
  const std::uint64_t key = dropout_key(7, 3, 1);
  std::size_t dropped = 0;
  const std::size_t draws = 200000;
  for (std::uint32_t sample = 0; sample < 1000; ++sample) {
    for (std::size_t unit = 0; unit < draws / 1000; ++unit) {
      dropped += dropout_keeps(key, sample, unit, 0.3) ? 0 : 1;
    }
  }
  // Binomial(200000, 0.3): standard deviation 205; five of them is a loose bound.
  EXPECT_NEAR(double(dropped), 0.3 * double(draws), 5 * 205.0);
  // Another step, layer or seed draws other masks.
  std::size_t differ = 0;
  for (std::uint32_t sample = 0; sample < 1000; ++sample) {
    differ += dropout_keeps(key, sample, 0, 0.5) != dropout_keeps(dropout_key(7, 4, 1), sample, 0, 0.5);
    differ += dropout_keeps(key, sample, 0, 0.5) != dropout_keeps(dropout_key(7, 3, 2), sample, 0, 0.5);
    differ += dropout_keeps(key, sample, 0, 0.5) != dropout_keeps(dropout_key(8, 3, 1), sample, 0, 0.5);
  }
  EXPECT_GT(differ, 3 * 400u);
  EXPECT_LT(differ, 3 * 600u);
}

// Tolerance as in gradcheck_test: with h = 1e-6 in double, |analytic − numeric| is below
// 1e-7 + 1e-6·|numeric| for a correct gradient. The masks are fixed by the keys, so the loss
// is a smooth function of the parameters (ReLU kinks aside, which h does not cross here).
TEST(Dropout, AnalyticGradientMatchesFiniteDifferencesWithTheMasksFixed) {
  for (const char* hidden : {"tanh", "relu", "sigmoid"}) {
    const std::string act(hidden);
    const ModelSpec spec = parse_model(
        "6,7:" + act + ":dropout=0.4,5:" + act + ":dropout=0.25,3:softmax", "xent");
    Mlp<double> mlp(spec);
    const Layout& layout = mlp.layout();
    AlignedVector<double> params(layout.size());
    init_params<double>(spec, layout, 5, std::span<double>(params));
    const std::size_t batch = 9;
    const RowMatrix<double> x = testing::random_matrix<double>(batch, 6, 21) * 2.0;
    const RowMatrix<double> y = testing::random_targets<double>(Loss::xent, batch, 3, 22);
    std::vector<std::uint32_t> samples(batch);
    for (std::size_t i = 0; i < batch; ++i) samples[i] = std::uint32_t(100 + 7 * i);
    const DropoutKeys keys{3, 11, samples.data()};

    const AlignedVector<double> grad =
        testing::full_batch_gradient<double>(mlp, params, testing::view(x), testing::view(y), &keys)
            .mean;
    const auto mean_loss = [&] {
      return mlp.losses(params, testing::view(x), testing::view(y), &keys)[0].loss / double(batch);
    };
    // The masks are on: the training loss differs from the evaluation loss.
    const double eval = mlp.losses(params, testing::view(x), testing::view(y))[0].loss;
    EXPECT_NE(eval / double(batch), mean_loss()) << act;
    const double h = 1e-6;
    std::size_t zero = 0;
    for (std::size_t i = 0; i < layout.size(); ++i) {
      const double numeric = testing::central_difference(params, i, h, mean_loss);
      EXPECT_NEAR(grad[i], numeric, 1e-7 + 1e-6 * std::abs(numeric)) << act << " element " << i;
      zero += grad[i] == 0.0 ? 1 : 0;
    }
    // Dropped units leave their weights' gradient zero: some, not all.
    EXPECT_GT(zero, 0u) << act;
    EXPECT_LT(zero, layout.size() / 2) << act;
  }
}

// Deterministic training with dropout: the same bits on 1, 2 and 3 ranks (the masks follow
// the samples, not the ranks) and across a resume on another rank count.
TEST(Dropout, SameBitsForAnyRanksAndAcrossAResume) {
  const Dataset data = testing::noisy_classes(70, 6, 3, 1.0);
  Settings config = settings_for("6,24:relu:dropout=0.3,12:tanh:dropout=0.2,3:softmax", 20);
  config.deterministic = true;
  config.chunk = 4;
  config.epochs = 3;
  const auto train = [&](int ranks, std::int64_t stop, const Checkpoint* from) {
    Checkpoint c;
    testing::run_ranks(ranks, [&](Communicator& comm) {
      Settings s = config;
      s.stop_at_step = stop;
      Trainer trainer(s, comm, data);
      if (from) trainer.restore(*from);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      if (comm.rank() == 0) c = trainer.checkpoint();
    });
    return c;
  };
  const Checkpoint one = train(1, -1, nullptr);
  EXPECT_EQ(one.state.step, 12u);
  for (int ranks : {2, 3}) {
    EXPECT_EQ(train(ranks, -1, nullptr).params, one.params) << ranks << " ranks";
  }
  const Checkpoint half = train(3, 5, nullptr);
  EXPECT_EQ(half.state.step, 5u);
  EXPECT_EQ(train(2, -1, &half).params, one.params);
  // Without dropout the run differs, so the comparisons above could fail.
  config.layers = "6,24:relu,12:tanh,3:softmax";
  EXPECT_NE(train(1, -1, nullptr).params, one.params);
}

// ---- clipping -------------------------------------------------------------------------------

// One step of plain SGD (lr 1, no momentum) on the whole set as one batch: the update is
// the mean gradient, scaled to the clip norm when longer. The mean gradient's norm is
// computed here in double from the full-batch gradient; the trainer's float sums differ
// from it by rounding (relative 1e-5 on 16 rows).
TEST(Clipping, ScalesTheGradientToTheNormComputedByHand) {
  const Dataset data = testing::noisy_classes(16, 5, 3, 1.0);
  const ModelSpec spec = parse_model("5,8:tanh,3:softmax", "xent");
  Mlp<float> mlp(spec);
  AlignedVector<float> p0(mlp.layout().size());
  init_params<float>(spec, mlp.layout(), 1, std::span<float>(p0));
  RowMatrix<float> x(16, 5), y = RowMatrix<float>::Zero(16, 3);
  for (std::size_t r = 0; r < 16; ++r) {
    for (std::size_t c = 0; c < 5; ++c) x(Eigen::Index(r), Eigen::Index(c)) = data.features[r * 5 + c];
    y(Eigen::Index(r), data.labels[r]) = 1;
  }
  const AlignedVector<float> g =
      testing::full_batch_gradient<float>(mlp, p0, testing::view(x), testing::view(y)).mean;
  double norm = 0;
  for (float v : g) norm += double(v) * double(v);
  norm = std::sqrt(norm);
  ASSERT_GT(norm, 0.1);

  for (const char* reduction : {"mpi", "node"}) {
    for (const double clip : {norm / 4, 2 * norm}) {
      Settings config = settings_for("5,8:tanh,3:softmax", 16);
      config.lr = 1;
      config.momentum = 0;
      config.max_steps = 1;
      config.clip_norm = clip;
      config.reduction = reduction;
      std::vector<float> after;
      Counter seen;
      testing::run_ranks(2, [&](Communicator& comm) {
        Trainer trainer(config, comm, data);
        Counter quiet;
        trainer.run(nullptr, comm.rank() == 0 ? seen : quiet);
        if (comm.rank() == 0) after.assign(trainer.params().begin(), trainer.params().end());
      });
      const double scale = std::min(1.0, clip / norm);
      ASSERT_EQ(after.size(), g.size());
      for (std::size_t i = 0; i < g.size(); ++i) {
        EXPECT_NEAR(after[i], p0[i] - scale * g[i], 1e-5 * (1 + std::abs(g[i])))
            << reduction << " clip " << clip << " element " << i;
      }
      ASSERT_EQ(seen.epochs.size(), 1u);
      EXPECT_EQ(seen.epochs[0].clipped, clip < norm ? 1u : 0u) << reduction;
      EXPECT_NEAR(seen.epochs[0].max_grad_norm, norm, 1e-5 * norm) << reduction;
    }
  }
}

TEST(Clipping, DeterministicModeKeepsItsBitsForAnyRanks) {
  const Dataset data = testing::noisy_classes(50, 6, 3, 1.0);
  Settings config = settings_for("6,16:relu,3:softmax", 10);
  config.deterministic = true;
  config.chunk = 2;
  config.epochs = 2;
  config.clip_norm = 0.05;
  std::vector<std::vector<float>> params;
  std::uint64_t clipped = 0;
  for (int ranks : {1, 2, 3}) {
    testing::run_ranks(ranks, [&](Communicator& comm) {
      Trainer trainer(config, comm, data);
      Counter seen;
      trainer.run(nullptr, seen);
      if (comm.rank() == 0) {
        params.emplace_back(trainer.params().begin(), trainer.params().end());
        clipped = seen.epochs[0].clipped + seen.epochs[1].clipped;
      }
    });
  }
  EXPECT_EQ(clipped, 10u);  // every step of both epochs
  EXPECT_EQ(params[1], params[0]);
  EXPECT_EQ(params[2], params[0]);
}

// ---- gradient accumulation ------------------------------------------------------------------

// P ranks with K micro-batches give the bits of P·K ranks with one, in the deterministic
// mode: 70 samples in batches of 24 (the last of 22), chunks of 4, with dropout and
// clipping, through node memory and through MPI.
TEST(Accumulation, PRanksWithKMicroBatchesGiveTheBitsOfPKRanks) {
  const Dataset data = testing::noisy_classes(70, 6, 3, 1.0);
  Settings config = settings_for("6,20:relu:dropout=0.25,10:tanh,3:softmax", 24);
  config.deterministic = true;
  config.chunk = 4;
  config.epochs = 2;
  config.clip_norm = 0.2;
  const auto train = [&](int ranks, std::uint64_t micros, const char* reduction) {
    std::vector<float> params;
    Settings s = config;
    s.accumulate = micros;
    s.reduction = reduction;
    testing::run_ranks(ranks, [&](Communicator& comm) {
      Trainer trainer(s, comm, data);
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      if (comm.rank() == 0) params.assign(trainer.params().begin(), trainer.params().end());
    });
    return params;
  };
  for (const char* reduction : {"node", "mpi"}) {
    for (const auto& [ranks, micros] : {std::pair(1, 2), std::pair(1, 3), std::pair(2, 2),
                                        std::pair(1, 6), std::pair(2, 3)}) {
      EXPECT_EQ(train(ranks, std::uint64_t(micros), reduction),
                train(ranks * micros, 1, reduction))
          << ranks << " ranks x " << micros << " micro-batches, " << reduction;
    }
  }
  // The deterministic mode gives P·K ranks the bits of one, so these also equal one rank
  // without accumulation. Optimizer steps on each micro-batch of 12 instead give others.
  const std::vector<float> accumulated = train(1, 2, "mpi");
  config.batch = 12;
  EXPECT_NE(train(1, 1, "mpi"), accumulated);
}

// In the default mode the sums are float, added in another order: the mean gradient of a
// step with K micro-batches is within relative 1e-5 of P·K ranks' (float32 sums of 60 rows
// round at about 1e-7 relative; 1e-5 leaves room for the larger terms' cancellation).
TEST(Accumulation, DefaultModeGradientIsCloseToPKRanks) {
  const Dataset data = testing::noisy_classes(60, 6, 3, 1.0);
  Settings config = settings_for("6,24:relu,12:sigmoid,3:softmax", 60);
  config.lr = 1;
  config.momentum = 0;
  config.max_steps = 1;
  const auto gradient = [&](int ranks, std::uint64_t micros, const char* reduction) {
    std::vector<float> before, after;
    Settings s = config;
    s.accumulate = micros;
    s.reduction = reduction;
    testing::run_ranks(ranks, [&](Communicator& comm) {
      Trainer trainer(s, comm, data);
      if (comm.rank() == 0) before.assign(trainer.params().begin(), trainer.params().end());
      TrainObserver quiet;
      trainer.run(nullptr, quiet);
      if (comm.rank() == 0) after.assign(trainer.params().begin(), trainer.params().end());
    });
    AlignedVector<float> g(before.size());
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = before[i] - after[i];  // lr 1: −Δw = g
    return g;
  };
  const Layout layout(parse_model(config.layers, config.loss));
  // bf16 products (where the CPU has them) add up through oneDNN's sum post-op.
  if (gemm::bf16_supported()) {
    Settings s = config;
    config.precision = "bf16";
    EXPECT_LT(testing::max_relative_error<float>(layout, gradient(1, 4, "mpi"), gradient(4, 1, "mpi")),
              1e-5);
    config = s;
  }
  for (const char* reduction : {"node", "mpi"}) {
    const AlignedVector<float> reference = gradient(4, 1, reduction);
    EXPECT_LT(testing::max_relative_error<float>(layout, gradient(1, 4, reduction), reference), 1e-5)
        << reduction;
    EXPECT_LT(testing::max_relative_error<float>(layout, gradient(2, 2, reduction), reference), 1e-5)
        << reduction;
    // The accumulated gradient is not one micro-batch's: 15 rows alone give another.
    Settings s = config;
    config.batch = 15;
    EXPECT_GT(testing::max_relative_error<float>(layout, gradient(1, 1, reduction), reference),
              1e-2);
    config = s;
  }
}

// ---- validation, early stopping, the best model -------------------------------------------

class Validation : public testing::TempDirTest {};

// The held-out rows are the same for any number of ranks, never trained on (they hold NaN:
// one in a training batch would stop the run), and validated after every epoch.
TEST_F(Validation, HeldOutRowsAreFixedBySeedAndNeverTrainedOn) {
  Dataset data = testing::noisy_classes(80, 4, 2, 1.0);
  Settings config = settings_for("4,6,2", 8);
  config.val_fraction = 0.25;
  config.epochs = 3;
  std::vector<std::uint32_t> held;
  {
    testing::LocalGroup one(1);
    Trainer trainer(config, one.member(0), data);
    held.assign(trainer.held_out().begin(), trainer.held_out().end());
    EXPECT_EQ(trainer.training_samples(), 60u);
    EXPECT_EQ(trainer.batches_per_epoch(), 8u);
  }
  ASSERT_EQ(held.size(), 20u);
  EXPECT_TRUE(std::is_sorted(held.begin(), held.end()));
  for (std::uint32_t row : held) data.features[row * 4] = std::nanf("");
  for (int ranks : {2, 3}) {
    testing::run_ranks(ranks, [&](Communicator& comm) {
      Trainer trainer(config, comm, data);
      EXPECT_EQ(std::vector<std::uint32_t>(trainer.held_out().begin(), trainer.held_out().end()),
                held);
      Counter seen;
      trainer.run(nullptr, seen);  // would throw on a NaN loss
      ASSERT_EQ(seen.epochs.size(), 3u);
      EXPECT_TRUE(seen.epochs[2].has_val);
      EXPECT_TRUE(std::isnan(seen.epochs[2].val.loss));
      EXPECT_EQ(seen.epochs[2].val.samples, 20u);
    });
  }
  // Another seed holds out other rows.
  config.seed = 2;
  testing::LocalGroup one(1);
  Trainer other(config, one.member(0), data);
  EXPECT_NE(std::vector<std::uint32_t>(other.held_out().begin(), other.held_out().end()), held);
}

// A validation set whose labels are the training labels shifted by one class: the better
// the model learns, the worse it validates, so epoch 1 is the best and patience 2 ends the
// run after epoch 3. best.h5 holds epoch 1's model; a run resumed after epoch 2 stops at
// the same point with the same state.
TEST_F(Validation, EarlyStoppingKeepsTheBestModelAndResumesMidPatience) {
  const Dataset data = testing::noisy_classes(60, 6, 3, 0.5);
  Dataset shifted = data;
  for (auto& label : shifted.labels) label = (label + 1) % 3;
  Settings config = settings_for("6,12,3", 10);
  config.deterministic = true;
  config.chunk = 2;
  config.epochs = 10;
  config.lr = 0.1;
  config.early_stop_patience = 2;
  config.val = "shifted";
  const auto run = [&](const std::string& dir, std::int64_t stop, bool resume,
                       std::vector<EpochStats>* epochs) {
    Checkpoint last;
    testing::run_ranks(2, [&](Communicator& comm) {
      Settings s = config;
      s.checkpoint_dir = dir;
      s.stop_at_step = stop;
      GivenFlags given = {"--checkpoint-dir", "--val", "--early-stop-patience"};
      if (resume) {
        s.resume = dir;
        given.insert("--resume");
      }
      Checkpointer checkpointer(comm, s, given);
      Trainer trainer(checkpointer.settings(), comm, data);
      if (checkpointer.resumed()) trainer.restore(*checkpointer.resumed());
      Counter seen;
      trainer.run(nullptr, seen, &checkpointer, &shifted);
      // Rank 0 hears of best.h5 when epoch 1 writes it; the others get no path.
      const std::vector<std::string> written =
          comm.rank() == 0 && !resume ? std::vector<std::string>{checkpointer.best_path()}
                                      : std::vector<std::string>{};
      EXPECT_EQ(seen.best, written) << "rank " << comm.rank();
      if (comm.rank() == 0) {
        last = trainer.checkpoint();
        if (epochs) *epochs = seen.epochs;
        EXPECT_EQ(trainer.stopped_early(), stop < 0);
      }
    });
    return last;
  };
  std::vector<EpochStats> epochs;
  const Checkpoint through = run(path("through"), -1, false, &epochs);
  ASSERT_EQ(epochs.size(), 3u);  // stopped early: epochs 2 and 3 were no better
  EXPECT_LT(epochs[0].val.loss, epochs[1].val.loss);
  EXPECT_LT(epochs[1].val.loss, epochs[2].val.loss);
  EXPECT_TRUE(epochs[0].best);
  EXPECT_FALSE(epochs[1].best || epochs[2].best);
  EXPECT_EQ(through.state.epoch, 3u);
  EXPECT_EQ(through.state.best_epoch, 1u);
  EXPECT_EQ(through.state.best_metric, epochs[0].val.loss);
  EXPECT_EQ(through.state.epochs_without_improvement, 2u);

  // best.h5 is the model after epoch 1, with that epoch and metric.
  const Checkpoint best = load_checkpoint(path("through") + "/best.h5");
  EXPECT_EQ(best.state.epoch, 1u);
  EXPECT_EQ(best.state.best_epoch, 1u);
  EXPECT_EQ(best.state.best_metric, epochs[0].val.loss);
  const Checkpoint after_one = run(path("one"), 6, false, nullptr);
  EXPECT_EQ(best.params, after_one.params);
  EXPECT_NE(best.params, through.params);

  // Stopped after epoch 2 (step 12: patience 1 of 2 used), resumed: the same end.
  const Checkpoint part = run(path("part"), 12, false, nullptr);
  EXPECT_EQ(part.state.epochs_without_improvement, 1u);
  const Checkpoint resumed = run(path("part"), -1, true, nullptr);
  EXPECT_EQ(resumed.state.step, through.state.step);
  EXPECT_EQ(resumed.state.epochs_without_improvement, 2u);
  EXPECT_EQ(resumed.state.best_metric, through.state.best_metric);
  EXPECT_EQ(resumed.params, through.params);
  EXPECT_EQ(load_checkpoint(path("part") + "/best.h5").params, best.params);
}

TEST_F(Validation, MonitorValAccKeepsTheHighestAccuracy) {
  const Dataset data = testing::noisy_classes(60, 6, 3, 2.0);
  Settings config = settings_for("6,12,3", 10);
  config.epochs = 4;
  config.val_fraction = 0.5;
  config.monitor = "val_acc";
  testing::LocalGroup one(1);
  Trainer trainer(config, one.member(0), data);
  Counter seen;
  trainer.run(nullptr, seen);
  ASSERT_EQ(seen.epochs.size(), 4u);
  double best = -1;
  std::uint64_t best_epoch = 0;
  for (const EpochStats& e : seen.epochs) {
    if (e.val.accuracy > best) {
      best = e.val.accuracy;
      best_epoch = e.epoch;
    }
    EXPECT_NE(metrics_json(e, 1, 1).find("\"val_acc\":"), std::string::npos);
  }
  EXPECT_EQ(trainer.state().best_epoch, best_epoch);
  EXPECT_EQ(trainer.state().best_metric, -best);
}

}  // namespace
}  // namespace shardprop
