#include "shardprop/checkpoint.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>

#include <csignal>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <stdexcept>
#include <thread>

#include "shardprop/error.hpp"
#include "shardprop/stop.hpp"
#include "h5.hpp"
#include "shardprop/train.hpp"
#include "test_util.hpp"

extern char** environ;

namespace shardprop {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

// 101 samples in batches of 10: 11 steps per epoch, the last one short.
const Dataset& data() {
  static const Dataset d = testing::noisy_classes(101, 6, 3, 1.0);
  return d;
}

const ModelSpec& spec() {
  static const ModelSpec s = parse_model("6,16:relu,8:tanh,3:softmax", "xent");
  return s;
}

Settings config_for(OptimizerKind kind) {
  Settings config;
  config.layers = spec().layers_string();
  config.batch = 10;
  config.epochs = 3;  // 33 steps
  config.seed = 5;
  config.lr_schedule = "cosine";
  config.optimizer = std::string(to_string(kind));
  config.lr = kind == OptimizerKind::adam ? 0.01 : 0.1;
  config.weight_decay = 1e-4;
  return config;
}

// Trains on `ranks` in-process ranks (from `from` if given) until the config says stop and
// returns the checkpoint of rank 0, after checking that every rank holds the same bits.
Checkpoint train_on(int ranks, const Settings& config, const Checkpoint* from = nullptr) {
  std::vector<Checkpoint> out(std::size_t(ranks), Checkpoint{});
  testing::run_ranks(ranks, [&](Communicator& comm) {
    Trainer trainer(config, comm, data());
    if (from) trainer.restore(*from);
    TrainObserver quiet;
    trainer.run(nullptr, quiet);
    out[std::size_t(comm.rank())] = trainer.checkpoint();
  });
  for (int r = 1; r < ranks; ++r) {
    EXPECT_EQ(out[std::size_t(r)].checksum, out[0].checksum) << "rank " << r << " differs";
  }
  return std::move(out[0]);
}

using testing::same_bits;

class CheckpointTest : public testing::TempDirTest {
 protected:
  // A checkpoint of a short Adam run stopped mid-epoch.
  Checkpoint trained() const {
    Settings config = config_for(OptimizerKind::adam);
    config.stop_at_step = 7;
    return train_on(1, config);
  }
};

TEST_F(CheckpointTest, RoundTripIsBitwise) {
  const Checkpoint c = trained();
  save_checkpoint(path("c.h5"), c);
  EXPECT_FALSE(fs::exists(path("c.h5.tmp")));
  EXPECT_TRUE(is_checkpoint_file(path("c.h5")));
  const Checkpoint r = load_checkpoint(path("c.h5"));
  EXPECT_EQ(r.spec.layers_string(), spec().layers_string());
  EXPECT_EQ(r.spec.loss, Loss::xent);
  EXPECT_TRUE(r.has_training_state);
  EXPECT_TRUE(same_bits(r.params, c.params));
  EXPECT_TRUE(same_bits(r.optimizer_state, c.optimizer_state));
  EXPECT_EQ(r.optimizer_state.size(), 2 * Layout(spec()).size());  // Adam: m and v
  EXPECT_EQ(r.checksum, c.checksum);
  EXPECT_EQ(r.state.step, 7u);
  EXPECT_EQ(r.state.epoch, 0u);
  EXPECT_EQ(r.state.batch_in_epoch, 7u);
  EXPECT_EQ(r.optimizer_steps, 7u);
  EXPECT_EQ(r.settings.batch, 10u);
  EXPECT_EQ(r.settings.epochs, 3u);
  EXPECT_EQ(r.settings.seed, 5u);
  EXPECT_EQ(r.settings.max_steps, -1);
  EXPECT_EQ(r.settings.lr_schedule, "cosine");
  EXPECT_EQ(r.settings.optimizer, "adam");
  EXPECT_EQ(r.settings.lr, 0.01);
  EXPECT_EQ(r.settings.weight_decay, 1e-4);
  // Every stored setting of the table comes back as it was written.
  for (const SettingSpec& setting : settings_table()) {
    if (setting.attribute) {
      EXPECT_TRUE(same_setting(setting, r.settings, c.settings)) << setting.flag;
    }
  }
  EXPECT_EQ(r.train_rows, 101u);
  EXPECT_EQ(r.train_cols, 6u);
  EXPECT_EQ(r.world_size, 1);
}

// Format version 5: the training recipe's settings and the early-stopping state.
TEST_F(CheckpointTest, RecipeSettingsAndEarlyStoppingStateRoundTrip) {
  Checkpoint c = trained();
  c.settings.layers = "6,16:relu:dropout=0.5,8:tanh:dropout=0.125,3:softmax";
  c.spec = parse_model(c.settings.layers, c.settings.loss);
  c.settings.lr_schedule = "multistep";
  c.settings.lr_milestones = "2,5";
  c.settings.lr_decay = 0.25;
  c.settings.warmup_steps = 30;
  c.settings.lr_scale_batch = 64;
  c.settings.accumulate = 2;
  c.settings.clip_norm = 1.5;
  c.settings.val_fraction = 0.1;
  c.settings.early_stop_patience = 4;
  c.settings.monitor = "val_acc";
  c.state.epoch = 2;
  c.state.best_metric = -0.8125;
  c.state.best_epoch = 2;
  c.state.epochs_without_improvement = 0;
  save_checkpoint(path("r.h5"), c);
  const Checkpoint r = load_checkpoint(path("r.h5"));
  EXPECT_EQ(r.format_version, 5);
  EXPECT_EQ(r.spec.layers_string(), c.spec.layers_string());
  EXPECT_EQ(r.spec.layers[1].dropout, 0.125);
  for (const SettingSpec& setting : settings_table()) {
    if (setting.attribute) {
      EXPECT_TRUE(same_setting(setting, r.settings, c.settings)) << setting.flag;
    }
  }
  EXPECT_EQ(r.state.best_metric, -0.8125);
  EXPECT_EQ(r.state.best_epoch, 2u);
  EXPECT_EQ(r.state.epochs_without_improvement, 0u);
  // A best epoch after the epochs done is refused.
  c.state.best_epoch = 3;
  save_checkpoint(path("bad.h5"), c);
  testing::expect_error([&] { load_checkpoint(path("bad.h5")); },
                        "the best epoch 3 or the epochs without improvement 0 are past the "
                        "epochs done (2)");
}

// Version 4 files (before the recipe) load with the recipe's defaults and resume; in a
// version 5 file the same attributes missing are an error.
TEST_F(CheckpointTest, VersionFourFilesLoadWithoutTheRecipe) {
  Settings config = config_for(OptimizerKind::sgd);
  config.stop_at_step = 5;
  const Checkpoint c = train_on(1, config);
  save_checkpoint(path("v4.h5"), c);
  const auto rewrite = [&](std::int64_t version, bool strip) {
    h5::Handle f(H5Fopen(path("v4.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "opening");
    if (strip) {
      h5::Handle train(H5Gopen2(f.get(), "train", H5P_DEFAULT), H5Gclose, "opening /train");
      for (const char* name : {"lr_decay", "lr_milestones", "warmup_steps", "lr_scale_batch",
                               "accumulate", "clip_norm", "val_path", "val_fraction",
                               "early_stop_patience", "monitor"}) {
        h5::check(H5Adelete(train.get(), name), name);
      }
      for (const char* name : {"best_metric", "best_epoch", "epochs_without_improvement"}) {
        h5::check(H5Adelete(f.get(), name), name);
      }
    }
    h5::Handle attr(H5Aopen(f.get(), "format_version", H5P_DEFAULT), H5Aclose, "opening");
    h5::check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &version), "writing format_version");
  };
  rewrite(4, true);
  const Checkpoint v4 = load_checkpoint(path("v4.h5"));
  EXPECT_EQ(v4.format_version, 4);
  EXPECT_EQ(v4.settings.accumulate, 1u);
  EXPECT_EQ(v4.settings.monitor, "val_loss");
  EXPECT_EQ(v4.state.best_epoch, 0u);
  EXPECT_TRUE(same_bits(v4.params, c.params));
  // It resumes to the end of the run that was never stopped.
  config.stop_at_step = -1;
  EXPECT_TRUE(same_bits(train_on(1, config, &v4).params, train_on(1, config).params));
  rewrite(5, false);
  EXPECT_THROW(load_checkpoint(path("v4.h5")), Error);
}

// Training N steps straight equals training k steps, writing a checkpoint, reading it back
// and training the rest: bit for bit with the same ranks, also when k is mid-epoch.
TEST_F(CheckpointTest, ResumeContinuesBitwiseOnTheSameRanks) {
  for (OptimizerKind kind : {OptimizerKind::sgd, OptimizerKind::adam}) {
    for (int ranks : {1, 2}) {
      const Settings config = config_for(kind);
      const Checkpoint straight = train_on(ranks, config);
      ASSERT_EQ(straight.state.step, 33u);
      for (std::int64_t k : {1, 11, 16}) {  // start, an epoch boundary, mid-epoch
        Settings first = config;
        first.stop_at_step = k;
        save_checkpoint(path("k.h5"), train_on(ranks, first));
        const Checkpoint at_k = load_checkpoint(path("k.h5"));
        EXPECT_EQ(at_k.state.step, std::uint64_t(k));
        const Checkpoint resumed = train_on(ranks, config, &at_k);
        EXPECT_EQ(resumed.state.step, 33u);
        EXPECT_TRUE(same_bits(resumed.params, straight.params))
            << to_string(kind) << " on " << ranks << " ranks, stopped at step " << k;
        EXPECT_TRUE(same_bits(resumed.optimizer_state, straight.optimizer_state));
      }
    }
  }
}

// Written by 2 ranks, resumed by 3: the same global batches in the same order, so the
// parameters match the uninterrupted run up to the order of the gradient sums. 17 steps
// after the switch the measured difference is about 1e-7 of each tensor's largest entry;
// 1e-5 leaves room for other compilers and still fails on any skipped or repeated batch.
TEST_F(CheckpointTest, ResumeOnAnotherRankCountMatchesToRounding) {
  for (OptimizerKind kind : {OptimizerKind::sgd, OptimizerKind::adam}) {
    const Settings config = config_for(kind);
    const Checkpoint straight = train_on(2, config);
    Settings first = config;
    first.stop_at_step = 16;
    save_checkpoint(path("k.h5"), train_on(2, first));
    const Checkpoint at_k = load_checkpoint(path("k.h5"));
    const Checkpoint resumed = train_on(3, config, &at_k);
    EXPECT_EQ(resumed.world_size, 3);
    const Layout layout(spec());
    const double error = testing::max_relative_error<float>(layout, resumed.params, straight.params);
    EXPECT_LT(error, 1e-5) << to_string(kind);
    std::printf("%s: 2 -> 3 ranks differs by %.2g\n", std::string(to_string(kind)).c_str(), error);

    // A batch skipped at the switch would show far above that tolerance.
    Checkpoint skipped = at_k;
    ++skipped.state.batch_in_epoch;
    const Checkpoint wrong = train_on(3, config, &skipped);
    EXPECT_GT(testing::max_relative_error<float>(layout, wrong.params, straight.params), 1e-4);
  }
}

TEST_F(CheckpointTest, RestoreRefusesAnotherModelOrOptimizer) {
  const Checkpoint c = trained();
  testing::LocalGroup one(1);
  Settings other_model = config_for(OptimizerKind::adam);
  other_model.layers = "6,9:relu,3:softmax";
  Trainer other(other_model, one.member(0), data());
  expect_error([&] { other.restore(c); }, "does not match the trainer's 6,9:relu,3:softmax");
  Trainer sgd(config_for(OptimizerKind::sgd), one.member(0), data());
  expect_error([&] { sgd.restore(c); }, "checkpoint optimizer adam does not match");
}

// Rewrites an integer attribute of the root group in place.
void set_root_attr(const std::string& file, const char* name, std::int64_t value) {
  h5::Handle f(H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "opening " + file);
  h5::Handle attr(H5Aopen(f.get(), name, H5P_DEFAULT), H5Aclose, "opening attribute");
  h5::check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), "writing attribute");
  attr.close("closing attribute");
  f.close("closing " + file);
}

// The byte offset of a contiguous dataset's data in the file.
haddr_t data_offset(const std::string& file, const std::string& dataset) {
  h5::Handle f = h5::open_file(file);
  h5::Handle d = h5::open_dataset(f.get(), dataset, file);
  return H5Dget_offset(d.get());
}

TEST_F(CheckpointTest, DamagedFilesEachGiveTheirOwnError) {
  const Checkpoint c = trained();
  save_checkpoint(path("good.h5"), c);
  const auto copy = [&](const std::string& name) {
    fs::copy_file(path("good.h5"), path(name), fs::copy_options::overwrite_existing);
    return path(name);
  };

  expect_error([&] { load_checkpoint(path("none.h5")); }, "none.h5: no such file");
  std::ofstream(path("junk.h5")) << "junk";
  expect_error([&] { load_checkpoint(path("junk.h5")); }, "junk.h5: not an HDF5 file");
  {
    h5::Handle f = h5::create_file(path("data.h5"));
    h5::store(f, path("data.h5"));
  }
  EXPECT_FALSE(is_checkpoint_file(path("data.h5")));
  expect_error([&] { load_checkpoint(path("data.h5")); }, "missing attribute 'format'");

  const std::string truncated = copy("truncated.h5");
  fs::resize_file(truncated, fs::file_size(truncated) * 6 / 10);
  expect_error([&] { load_checkpoint(truncated); }, "truncated.h5: HDF5 file cannot be opened (truncated or damaged)");

  // One flipped bit in the weights: HDF5 reads it happily, the checksum does not match.
  const std::string flipped = copy("flipped.h5");
  const haddr_t offset = data_offset(flipped, "params/layer_1/W") + 37;
  {
    std::fstream f(flipped, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(std::streamoff(offset));
    char byte = 0;
    f.read(&byte, 1);
    byte = char(byte ^ 0x10);
    f.seekp(std::streamoff(offset));
    f.write(&byte, 1);
  }
  expect_error([&] { load_checkpoint(flipped); }, "flipped.h5: checksum mismatch");
  EXPECT_NO_THROW(load_checkpoint(flipped, false));

  // One root attribute rewritten: another version, or a training state that contradicts
  // itself.
  const struct {
    const char *file, *attribute;
    std::int64_t value;
    const char* error;
  } rewritten[] = {
      {"version.h5", "format_version", 99, "version.h5: format_version 99 is not supported"},
      {"position.h5", "batch_in_epoch", 11, "batch_in_epoch 11 is past the end of an epoch of 11"},
      {"steps.h5", "step", 8, "optimizer steps 7 differ from the global step 8"},
      {"rng.h5", "epoch", 2, "/rng/epoch_order does not match seed 5 and epoch 2"},
  };
  for (const auto& r : rewritten) {
    const std::string file = copy(r.file);
    set_root_attr(file, r.attribute, r.value);
    expect_error([&] { load_checkpoint(file); }, r.error);
  }
}

TEST_F(CheckpointTest, ArchitectureInTheFileMustMatchTheShapes) {
  save_checkpoint(path("c.h5"), trained());
  {
    h5::Handle f(H5Fopen(path("c.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "opening");
    h5::check(H5Adelete(f.get(), "layers"), "deleting");
    const std::string other = "6,16:relu,9:tanh,3:softmax";
    h5::Handle type(H5Tcopy(H5T_C_S1), H5Tclose, "type");
    h5::check(H5Tset_size(type.get(), other.size() + 1), "size");
    h5::Handle space(H5Screate(H5S_SCALAR), H5Sclose, "space");
    h5::Handle attr(H5Acreate2(f.get(), "layers", type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    H5Aclose, "attr");
    h5::check(H5Awrite(attr.get(), type.get(), other.c_str()), "write");
  }
  expect_error([&] { load_checkpoint(path("c.h5")); },
               "/params/layer_1/W has the wrong type or shape for --layers 6,16:relu,9:tanh,3:softmax");
}

// A model file of format_version 1 (parameters only) still evaluates, but cannot resume.
TEST_F(CheckpointTest, VersionOneModelFilesLoadButDoNotResume) {
  const Checkpoint c = trained();
  {
    h5::Handle f = h5::create_file(path("v1.h5"));
    const auto attr = [&](const char* name, hid_t type, hid_t mem, const void* value) {
      h5::Handle space(H5Screate(H5S_SCALAR), H5Sclose, "space");
      h5::Handle a(H5Acreate2(f.get(), name, type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                   H5Aclose, name);
      h5::check(H5Awrite(a.get(), mem, value), name);
    };
    for (const auto& [name, text] : {std::pair<const char*, std::string>{"format", kCheckpointFormat},
                                     {"layers", spec().layers_string()}, {"loss", "xent"}}) {
      h5::Handle type(H5Tcopy(H5T_C_S1), H5Tclose, "type");
      h5::check(H5Tset_size(type.get(), text.size() + 1), "size");
      attr(name, type.get(), type.get(), text.c_str());
    }
    const std::int64_t one = 1, step = 7, epoch = 0;
    attr("format_version", H5T_STD_I64LE, H5T_NATIVE_INT64, &one);
    attr("step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step);
    attr("epoch", H5T_STD_I64LE, H5T_NATIVE_INT64, &epoch);
    const Layout layout(spec());
    {
      h5::Handle params(H5Gcreate2(f.get(), "params", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "g");
      for (std::size_t l = 0; l < layout.layer_count(); ++l) {
        const auto& b = layout.block(l);
        h5::Handle g(H5Gcreate2(params.get(), ("layer_" + std::to_string(l)).c_str(), H5P_DEFAULT,
                                H5P_DEFAULT, H5P_DEFAULT), H5Gclose, "g");
        h5::write_dataset(g.get(), "W", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {b.in, b.out}, c.params.data() + b.w_offset);
        h5::write_dataset(g.get(), "b", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {b.out}, c.params.data() + b.b_offset);
      }
    }
    h5::store(f, path("v1.h5"));
  }
  const Checkpoint v1 = load_checkpoint(path("v1.h5"));
  EXPECT_FALSE(v1.has_training_state);
  EXPECT_EQ(v1.state.step, 7u);
  EXPECT_TRUE(same_bits(v1.params, c.params));
  testing::LocalGroup one(1);
  Settings resume = config_for(OptimizerKind::adam);
  resume.resume = path("v1.h5");
  expect_error([&] {
    try {
      Checkpointer(one.member(0), resume, {"--resume"});
    } catch (const CollectiveFailure& e) {
      SP_THROW(e.what());
    }
  }, "holds the model only and cannot be resumed");
}

// A file of format version 2 (before the settings table stored every setting) still loads
// and resumes: made here from a version 3 file by taking away what version 3 added, storing
// the deterministic mode as version 2 did (one chunk number) and a count as a signed integer.
TEST_F(CheckpointTest, VersionTwoFilesStillLoad) {
  Settings config = config_for(OptimizerKind::sgd);
  config.deterministic = true;
  config.chunk = 4;
  config.stop_at_step = 5;
  const Checkpoint c = train_on(1, config);
  save_checkpoint(path("v2.h5"), c);
  {
    h5::Handle f(H5Fopen(path("v2.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "opening");
    for (const SettingSpec& setting : settings_table()) {
      if (!setting.attribute || setting.since_version < 3) continue;
      const std::string attribute = setting.attribute;
      const std::size_t slash = attribute.rfind('/');
      const std::string object = slash == 0 ? "." : attribute.substr(1, slash - 1);
      h5::check(H5Adelete_by_name(f.get(), object.c_str(), attribute.substr(slash + 1).c_str(),
                                  H5P_DEFAULT),
                "deleting " + attribute);
    }
    h5::Handle train(H5Gopen2(f.get(), "train", H5P_DEFAULT), H5Gclose, "opening /train");
    h5::write_attr(train.get(), "deterministic_chunk", std::int64_t(4));
    h5::check(H5Adelete(train.get(), "batch"), "deleting /train/batch");
    h5::write_attr(train.get(), "batch", std::int64_t(10));
    const std::int64_t two = 2;
    h5::Handle version(H5Aopen(f.get(), "format_version", H5P_DEFAULT), H5Aclose, "opening");
    h5::check(H5Awrite(version.get(), H5T_NATIVE_INT64, &two), "writing format_version");
  }
  const Checkpoint v2 = load_checkpoint(path("v2.h5"));
  EXPECT_EQ(v2.format_version, 2);
  EXPECT_TRUE(v2.has_training_state);
  EXPECT_TRUE(v2.settings.deterministic);
  EXPECT_EQ(v2.settings.chunk, 4u);
  EXPECT_EQ(v2.settings.batch, 10u);
  EXPECT_EQ(v2.settings.checkpoint_dir, "");  // not in version 2: the default
  EXPECT_EQ(v2.checksum, c.checksum);
  EXPECT_TRUE(same_bits(v2.params, c.params));
  // It resumes exactly: the same bits as the uninterrupted run.
  config.stop_at_step = -1;
  EXPECT_TRUE(same_bits(train_on(1, config, &v2).params, train_on(1, config).params));
}

// A file of format version 3 (before the precision was stored) loads as a float32 run.
TEST_F(CheckpointTest, VersionThreeFilesLoadAsFloat32) {
  Settings config = config_for(OptimizerKind::sgd);
  config.stop_at_step = 5;
  const Checkpoint c = train_on(1, config);
  save_checkpoint(path("v3.h5"), c);
  {
    h5::Handle f(H5Fopen(path("v3.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "opening");
    h5::Handle train(H5Gopen2(f.get(), "train", H5P_DEFAULT), H5Gclose, "opening /train");
    h5::check(H5Adelete(train.get(), "precision"), "deleting /train/precision");
    const std::int64_t three = 3;
    h5::Handle version(H5Aopen(f.get(), "format_version", H5P_DEFAULT), H5Aclose, "opening");
    h5::check(H5Awrite(version.get(), H5T_NATIVE_INT64, &three), "writing format_version");
  }
  const Checkpoint v3 = load_checkpoint(path("v3.h5"));
  EXPECT_EQ(v3.format_version, 3);
  EXPECT_EQ(v3.settings.precision, "fp32");
  EXPECT_TRUE(same_bits(v3.params, c.params));
  // Without the version change the missing attribute is an error, not a silent default.
  {
    h5::Handle f(H5Fopen(path("v3.h5").c_str(), H5F_ACC_RDWR, H5P_DEFAULT), H5Fclose, "opening");
    const std::int64_t four = 4;
    h5::Handle version(H5Aopen(f.get(), "format_version", H5P_DEFAULT), H5Aclose, "opening");
    h5::check(H5Awrite(version.get(), H5T_NATIVE_INT64, &four), "writing format_version");
  }
  EXPECT_THROW(load_checkpoint(path("v3.h5")), Error);
}

TEST_F(CheckpointTest, DirectoryKeepsTheNewestAndPointsAtThem) {
  Checkpoint c = trained();
  fs::create_directories(path("run"));
  std::ofstream(path("run/ckpt-000000003.h5.tmp")) << "left by a killed writer";
  std::ofstream(path("run/notes.txt.tmp")) << "not ours";
  CheckpointDir dir(path("run"), 2);
  EXPECT_FALSE(fs::exists(path("run/ckpt-000000003.h5.tmp")));
  EXPECT_TRUE(fs::exists(path("run/notes.txt.tmp")));
  for (std::uint64_t step : {10u, 20u, 30u, 40u}) {
    c.state.step = c.optimizer_steps = step;  // the rest need not change for this test
    EXPECT_EQ(dir.write(c), path("run/" + CheckpointDir::file_name(step)));
  }
  EXPECT_EQ(list_checkpoints(path("run")),
            (std::vector<std::string>{path("run/ckpt-000000040.h5"), path("run/ckpt-000000030.h5")}));
  std::string latest;
  std::ifstream(path("run/latest")) >> latest;
  EXPECT_EQ(latest, "ckpt-000000040.h5");

  // A damaged newest checkpoint is reported and the previous one used.
  fs::resize_file(path("run/ckpt-000000040.h5"), 1000);
  const CheckpointSource point = find_checkpoint(path("run"), "--resume");
  EXPECT_EQ(point.path, path("run/ckpt-000000030.h5"));
  ASSERT_EQ(point.skipped.size(), 1u);
  EXPECT_NE(point.skipped[0].find("ckpt-000000040.h5"), std::string::npos) << point.skipped[0];

  fs::resize_file(path("run/ckpt-000000030.h5"), 1000);
  expect_error([&] { find_checkpoint(path("run"), "--resume"); }, "none of its 2 checkpoints verifies");
  fs::create_directories(path("empty"));
  expect_error([&] { find_checkpoint(path("empty"), "--resume"); }, "no checkpoints (ckpt-<step>.h5)");
  expect_error([&] { find_checkpoint(path("nowhere"), "--resume"); }, "--resume " + path("nowhere") + ": no such file or directory");
  std::ofstream(path("plain")) << "x";
  expect_error([&] { CheckpointDir(path("plain/sub"), 3); }, "--checkpoint-dir " + path("plain/sub") + ": cannot create");
}

// The library's Checkpointer, driven by Trainer::run on 2 in-process ranks: checkpoints on
// the cadence (every 4 steps and every epoch), keeps the newest 3, writes the end of the
// run; a later resume from the directory takes the run's settings back (cadence included),
// continues writing there, and ends with the bits of the uninterrupted run.
TEST_F(CheckpointTest, CheckpointerWritesOnItsCadenceAndResumesTheRun) {
  Settings config = config_for(OptimizerKind::sgd);
  config.checkpoint_dir = path("run");
  config.checkpoint_every_steps = 4;
  config.checkpoint_every_epochs = 1;
  config.keep_checkpoints = 3;
  config.stop_at_step = 14;
  const GivenFlags given = {"--checkpoint-dir", "--checkpoint-every-steps",
                            "--checkpoint-every-epochs", "--keep-checkpoints"};
  const auto run = [&](const Settings& cli, const GivenFlags& flags) {
    std::vector<Checkpoint> out(2);
    testing::run_ranks(2, [&](Communicator& comm) {
      Checkpointer checkpointer(comm, cli, flags);
      Trainer trainer(checkpointer.settings(), comm, data());
      if (checkpointer.resumed()) trainer.restore(*checkpointer.resumed());
      TrainObserver quiet;
      trainer.run(nullptr, quiet, &checkpointer);
      out[std::size_t(comm.rank())] = trainer.checkpoint();
    });
    return out[0];
  };
  run(config, given);
  // Steps 4 and 8, the epoch's end at 11, 12, then 14 where this invocation stops.
  EXPECT_EQ(list_checkpoints(path("run")),
            (std::vector<std::string>{path("run/ckpt-000000014.h5"), path("run/ckpt-000000012.h5"),
                                      path("run/ckpt-000000011.h5")}));
  Settings resume;  // nothing but where to resume from
  resume.resume = path("run");
  const Checkpoint resumed = run(resume, {"--resume"});
  EXPECT_EQ(resumed.state.step, 33u);
  // The cadence came back: 16, 20, 22 (an epoch), 24, 28, 32 and 33 (the end).
  EXPECT_EQ(list_checkpoints(path("run")),
            (std::vector<std::string>{path("run/ckpt-000000033.h5"), path("run/ckpt-000000032.h5"),
                                      path("run/ckpt-000000028.h5")}));
  Settings straight = config_for(OptimizerKind::sgd);
  EXPECT_TRUE(same_bits(resumed.params, train_on(2, straight).params));
}

// A stop request (a signal, stop.hpp) ends run() after the step it came in, on every rank:
// the checkpoint of that step is written, the --save file is not, and the run resumes to the
// bits of one never stopped.
TEST_F(CheckpointTest, StopRequestEndsTheRunWithACheckpointOfThatStep) {
  Settings config = config_for(OptimizerKind::sgd);
  config.checkpoint_dir = path("run");
  config.save = path("final.h5");
  const GivenFlags given = {"--checkpoint-dir", "--save"};
  std::vector<std::uint64_t> steps(2);
  std::vector<int> signals(2);
  clear_stop();
  testing::run_ranks(2, [&](Communicator& comm) {
    Checkpointer checkpointer(comm, config, given);
    Trainer trainer(checkpointer.settings(), comm, data());
    // Both ranks see the process-wide request: rank 0 makes it before its first step.
    if (comm.rank() == 0) request_stop(SIGUSR1);
    TrainObserver quiet;
    trainer.run(nullptr, quiet, &checkpointer);
    steps[std::size_t(comm.rank())] = trainer.state().step;
    signals[std::size_t(comm.rank())] = trainer.stopped_by_signal();
  });
  clear_stop();
  EXPECT_EQ(steps[0], 1u);
  EXPECT_EQ(steps[1], 1u);
  EXPECT_EQ(signals[0], SIGUSR1);
  EXPECT_EQ(signals[1], SIGUSR1);
  EXPECT_EQ(list_checkpoints(path("run")),
            (std::vector<std::string>{path("run/ckpt-000000001.h5")}));
  EXPECT_FALSE(fs::exists(path("final.h5")));
  Settings resume;
  resume.resume = path("run");
  Checkpoint resumed;
  testing::run_ranks(2, [&](Communicator& comm) {
    Checkpointer checkpointer(comm, resume, {"--resume"});
    Trainer trainer(checkpointer.settings(), comm, data());
    trainer.restore(*checkpointer.resumed());
    TrainObserver quiet;
    trainer.run(nullptr, quiet, &checkpointer);
    EXPECT_EQ(trainer.stopped_by_signal(), 0);
    if (comm.rank() == 0) resumed = trainer.checkpoint();
  });
  EXPECT_TRUE(same_bits(resumed.params, train_on(2, config_for(OptimizerKind::sgd)).params));
}

TEST_F(CheckpointTest, FailedWriteLeavesThePreviousCheckpoint) {
  Checkpoint c = trained();
  save_checkpoint(path("c.h5"), c);
  Checkpoint bad = c;
  bad.optimizer_state.pop_back();  // not what the optimizer needs: refused before writing
  EXPECT_THROW(save_checkpoint(path("c.h5"), bad), Error);
  EXPECT_EQ(load_checkpoint(path("c.h5")).checksum, c.checksum);
  expect_error([&] { save_checkpoint(path("no/such/dir/c.h5"), c); }, "no/such/dir");
  EXPECT_FALSE(fs::exists(path("c.h5.tmp")));
}

// Files are built in memory and written with POSIX calls, so a full disk is named as such
// (/dev/full fails every write with ENOSPC).
TEST_F(CheckpointTest, AFullDiskIsNamedInTheError) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full";
  h5::Handle f = h5::create_file("/dev/full");
  const std::vector<float> values(1000, 1.0f);
  h5::write_dataset(f.get(), "x", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {values.size()}, values.data());
  expect_error([&] { h5::store(f, "/dev/full"); }, "/dev/full: write failed: No space left on device");
}

// A checkpoint_writer child that reports each write's start ("S <step>") and end
// ("E <step>") on a pipe. Killed and reaped on destruction if still running.
class Writer {
 public:
  using Clock = std::chrono::steady_clock;
  struct Event {
    char kind = 0;  // 'S' or 'E'
    std::uint64_t step = 0;
    Clock::time_point at;
  };

  explicit Writer(const std::string& dir) {
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    read_fd_ = ends[0];
    // The child's end moves to a descriptor that is neither end, so dup2 clears its
    // close-on-exec flag.
    const int child_fd = std::max(ends[0], ends[1]) + 1;
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_adddup2(&actions, ends[1], child_fd);
    const std::string fd_arg = std::to_string(child_fd);
    char* argv[] = {const_cast<char*>(SHARDPROP_CHECKPOINT_WRITER), const_cast<char*>(dir.c_str()),
                    const_cast<char*>(fd_arg.c_str()), nullptr};
    const int rc = posix_spawn(&pid_, argv[0], &actions, nullptr, argv, environ);
    posix_spawn_file_actions_destroy(&actions);
    ::close(ends[1]);  // EOF on the read end once the child is gone
    if (rc != 0) throw std::runtime_error("posix_spawn of checkpoint_writer failed");
  }
  Writer(const Writer&) = delete;
  Writer& operator=(const Writer&) = delete;
  ~Writer() {
    if (pid_ > 0) kill_and_reap();
    ::close(read_fd_);
  }

  // The next report, or nothing at EOF (the writer is gone). Throws after a minute without
  // one: the writer is stuck.
  std::optional<Event> next() {
    for (;;) {
      const std::size_t newline = pending_.find('\n');
      if (newline != std::string::npos) {
        Event e;
        e.kind = pending_[0];
        e.step = std::stoull(pending_.substr(2, newline - 2));
        e.at = Clock::now();
        pending_.erase(0, newline + 1);
        return e;
      }
      pollfd p{read_fd_, POLLIN, 0};
      const int ready = ::poll(&p, 1, 60'000);
      if (ready == 0) throw std::runtime_error("checkpoint_writer reported nothing for 60 s");
      if (ready < 0 && errno == EINTR) continue;
      char buffer[256];
      const ssize_t n = ::read(read_fd_, buffer, sizeof buffer);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return std::nullopt;
      pending_.append(buffer, std::size_t(n));
    }
  }

  // SIGKILL, then waits for the process; returns whether the signal is what ended it.
  bool kill_and_reap() {
    ::kill(pid_, SIGKILL);
    int status = 0;
    const pid_t reaped = waitpid(std::exchange(pid_, 0), &status, 0);
    return reaped > 0 && WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  }

 private:
  pid_t pid_ = 0;
  int read_fd_ = -1;
  std::string pending_;
};

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// A process writing checkpoints is killed with SIGKILL at random moments inside its writes,
// until 12 kills have landed while a file of it was on disk half written (a .tmp left).
// Every time, the newest checkpoint left behind loads and verifies, "latest" names a
// checkpoint that does, and no complete-looking checkpoint file is damaged.
//
// The moments come from what the writer reports on this machine and build (a sanitizer
// build writes several times slower): a first writer's reports give the time a write takes,
// and each kill then lands a random fraction of that time after a write began. The seed is
// printed; SHARDPROP_FAULT_SEED=N replays its choices.
TEST_F(CheckpointTest, SigkillAtAnyMomentLeavesAVerifiedNewestCheckpoint) {
  const std::string run = path("run");
  const char* given = std::getenv("SHARDPROP_FAULT_SEED");
  const std::uint64_t seed = given ? std::stoull(given) : std::random_device{}();
  std::printf("fault seed %llu (SHARDPROP_FAULT_SEED=%llu replays it)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  std::mt19937_64 random(seed);

  // Calibration: the duration of each write, from "S" to "E", over the first writer's six.
  std::vector<double> durations;
  const auto observe = [&](Writer& w, int writes_started) {
    std::optional<Writer::Event> started;
    for (int n = 0; n < writes_started;) {
      const std::optional<Writer::Event> e = w.next();
      if (!e) throw std::runtime_error("checkpoint_writer ended by itself");
      if (e->kind == 'S') {
        started = e;
        ++n;
      } else if (started && e->step == started->step) {
        durations.push_back(std::chrono::duration<double>(e->at - started->at).count());
      }
    }
    return *started;
  };
  {
    Writer first(run);
    observe(first, 7);  // six whole writes, and the seventh begun
    ASSERT_TRUE(first.kill_and_reap());
  }
  const double calibrated = median_of(durations);
  std::printf("a write takes %.2f ms here (median of %zu)\n", 1e3 * calibrated, durations.size());

  constexpr int kMidWrite = 12, kMaxKills = 200;
  int kills = 0, inside_write = 0, tmp_left = 0;
  std::uint64_t last_step = 0;
  while (tmp_left < kMidWrite && kills < kMaxKills) {
    ++kills;
    Writer w(run);
    // The kill lands in this writer's 1st to 3rd write, a uniform fraction of a typical
    // write's duration after it began (the measured durations are updated as they come).
    const int nth = std::uniform_int_distribution<int>(1, 3)(random);
    const double fraction = std::uniform_real_distribution<double>(0, 1)(random);
    const Writer::Event began = observe(w, nth);
    std::this_thread::sleep_until(began.at + std::chrono::duration_cast<Writer::Clock::duration>(
                                                 std::chrono::duration<double>(
                                                     fraction * median_of(durations))));
    ASSERT_TRUE(w.kill_and_reap()) << "kill " << kills << ": the writer ended by itself";
    char last = 'S';
    while (const std::optional<Writer::Event> e = w.next()) last = e->kind;
    inside_write += last == 'S';

    bool tmp = false;
    for (const auto& entry : fs::directory_iterator(run)) tmp |= entry.path().extension() == ".tmp";
    tmp_left += tmp;

    const std::vector<std::string> files = list_checkpoints(run);
    ASSERT_FALSE(files.empty()) << "kill " << kills << ": no checkpoint left";
    const CheckpointSource point = find_checkpoint(run, "--resume");
    EXPECT_TRUE(point.skipped.empty()) << "kill " << kills << ": " << point.skipped.front();
    EXPECT_EQ(point.path, files.front());
    const Checkpoint newest = parse_checkpoint(point.bytes, point.path);
    EXPECT_GE(newest.state.step, last_step);
    last_step = newest.state.step;
    EXPECT_EQ(newest.params[0], float(newest.state.step));
    for (const std::string& file : files) EXPECT_NO_THROW(load_checkpoint(file)) << file;
    if (fs::exists(run + "/latest")) {
      std::string latest;
      std::ifstream(run + "/latest") >> latest;
      EXPECT_NO_THROW(load_checkpoint(run + "/" + latest)) << "latest names " << latest;
    }
  }
  std::printf("%d kills: %d inside a write, %d with a file half written; newest step %llu\n",
              kills, inside_write, tmp_left, static_cast<unsigned long long>(last_step));
  // The kills must hit writes in progress, or the test proves nothing. Between two writes
  // the writer only fills its buffers, a small share of its time.
  EXPECT_GE(tmp_left, kMidWrite) << "only " << tmp_left << " of " << kills
                                 << " kills left a file half written";
  EXPECT_GE(4 * inside_write, 3 * kills) << "only " << inside_write << " of " << kills
                                         << " kills landed inside a write";
}

}  // namespace
}  // namespace shardprop
