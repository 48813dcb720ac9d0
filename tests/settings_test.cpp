// The settings table: every row parses what it prints, refuses bad values with a usage
// error naming its flag, and the resume merge follows each row's rule.
#include "shardprop/settings.hpp"

#include <gtest/gtest.h>

#include <fstream>
#include <iterator>
#include <set>

#include "shardprop/error.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

void expect_usage_error(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected a usage error containing '" << fragment << "'";
  } catch (const UsageError& e) {
    EXPECT_NE(e.message().find(fragment), std::string::npos) << e.message();
    EXPECT_EQ(e.exit_status(), kExitUsage);
  }
}

TEST(Settings, FlagsAndAttributesAreNamedOnce) {
  std::set<std::string> flags, attributes;
  for (const SettingSpec& s : settings_table()) {
    EXPECT_TRUE(flags.insert(s.flag).second) << s.flag;
    if (s.attribute) {
      EXPECT_TRUE(attributes.insert(s.attribute).second) << s.attribute;
    }
    // Stored exactly when the resume rule keeps it.
    EXPECT_EQ(s.attribute == nullptr, s.rule == ResumeRule::invocation) << s.flag;
    EXPECT_EQ(&setting(s.flag), &s);
  }
  EXPECT_THROW(setting("--no-such-flag"), Error);
}

// Each setting's default, printed and parsed back, is the default again; a value set by
// parsing prints as given.
TEST(Settings, DefaultsRoundTripThroughText) {
  const Settings defaults;
  for (const SettingSpec& s : settings_table()) {
    const std::string text = format_setting(s, defaults);
    if (text == "none") continue;  // an empty text, or -1: nothing to parse
    if (std::string_view(s.flag) == "--threads") continue;  // 0 means "not given"
    Settings parsed;
    parse_setting(s, parsed, text);
    EXPECT_TRUE(same_setting(s, parsed, defaults)) << s.flag << " " << text;
  }
  Settings s;
  parse_setting(setting("--lr"), s, "0.125");
  EXPECT_EQ(s.lr, 0.125);
  EXPECT_EQ(format_setting(setting("--lr"), s), "0.125");
  parse_setting(setting("--max-steps"), s, "7");
  EXPECT_EQ(s.max_steps, 7);
  parse_setting(setting("--deterministic"), s, "on");
  EXPECT_TRUE(s.deterministic);
  EXPECT_EQ(s.deterministic_chunk(), 64u);
}

TEST(Settings, BadValuesNameTheFlagAndTheValue) {
  Settings s;
  expect_usage_error([&] { parse_setting(setting("--lr"), s, "0"); }, "--lr: must be > 0, got '0'");
  expect_usage_error([&] { parse_setting(setting("--lr"), s, "abc"); }, "--lr: 'abc' is not a number");
  expect_usage_error([&] { parse_setting(setting("--epochs"), s, "-1"); },
                     "--epochs: must be > 0, got '-1'");
  expect_usage_error([&] { parse_setting(setting("--batch"), s, "2.5"); }, "--batch");
  expect_usage_error([&] { parse_setting(setting("--momentum"), s, "1"); },
                     "--momentum: must be >= 0 and < 1, got '1'");
  expect_usage_error([&] { parse_setting(setting("--optimizer"), s, "rmsprop"); },
                     "--optimizer: 'rmsprop' is not one of sgd,adam");
  expect_usage_error([&] { parse_setting(setting("--lr-schedule"), s, "exponential"); },
                     "--lr-schedule: 'exponential' is not one of "
                     "constant,cosine,step,multistep,linear");
  // The training recipe's values.
  expect_usage_error([&] { parse_setting(setting("--lr-decay"), s, "-0.5"); },
                     "--lr-decay: must be > 0 and <= 1, got '-0.5'");
  expect_usage_error([&] { parse_setting(setting("--lr-decay"), s, "1.5"); },
                     "--lr-decay: must be > 0 and <= 1, got '1.5'");
  expect_usage_error([&] { parse_setting(setting("--warmup-steps"), s, "-10"); },
                     "--warmup-steps: must be >= 0, got '-10'");
  expect_usage_error([&] { parse_setting(setting("--clip-norm"), s, "-1"); },
                     "--clip-norm: must be >= 0, got '-1'");
  expect_usage_error([&] { parse_setting(setting("--val-fraction"), s, "1"); },
                     "--val-fraction: must be >= 0 and < 1, got '1'");
  expect_usage_error([&] { parse_setting(setting("--val-fraction"), s, "-0.1"); },
                     "--val-fraction: must be >= 0 and < 1, got '-0.1'");
  expect_usage_error([&] { parse_setting(setting("--monitor"), s, "loss"); },
                     "--monitor: 'loss' is not one of val_loss,val_acc");
  expect_usage_error([&] { parse_setting(setting("--threads"), s, "0"); }, "--threads");
  expect_usage_error([&] { parse_setting(setting("--collective-timeout"), s, "-3"); },
                     "--collective-timeout: must be >= 0");
  EXPECT_EQ(s.lr, Settings().lr);  // nothing bad was stored
}

TEST(Settings, CombinationsThatNeedAnotherFlag) {
  Settings s;
  expect_usage_error([&] { check_combinations(s, {"--chunk"}); }, "--chunk needs --deterministic");
  s.deterministic = true;
  EXPECT_NO_THROW(check_combinations(s, {"--chunk", "--deterministic"}));
  expect_usage_error([&] { check_combinations(s, {"--checkpoint-every-steps"}); },
                     "need --checkpoint-dir");
  s.resume = "auto";
  expect_usage_error([&] { check_combinations(s, {"--resume"}); },
                     "--resume auto needs --checkpoint-dir");
  s.checkpoint_dir = "ck";
  EXPECT_NO_THROW(check_combinations(s, {"--resume", "--checkpoint-dir"}));
}

TEST(Settings, RecipeCombinationsAreCheckedBeforeTraining) {
  Settings s;
  s.lr_schedule = "multistep";
  expect_usage_error([&] { check_combinations(s, {"--lr-schedule"}); },
                     "--lr-schedule multistep needs --lr-milestones");
  s.lr_milestones = "30,20";
  expect_usage_error([&] { check_combinations(s, {"--lr-schedule", "--lr-milestones"}); },
                     "--lr-milestones '30,20': the epochs must increase (30 then 20)");
  s.lr_milestones = "10,x";
  expect_usage_error([&] { check_combinations(s, {"--lr-schedule", "--lr-milestones"}); },
                     "--lr-milestones '10,x': 'x' is not a positive whole number of epochs");
  s.lr_milestones = "0";
  expect_usage_error([&] { check_combinations(s, {"--lr-schedule", "--lr-milestones"}); },
                     "'0' is not a positive whole number");
  s.lr_milestones = "10,20";
  EXPECT_NO_THROW(check_combinations(s, {"--lr-schedule", "--lr-milestones"}));
  s.lr_schedule = "step";
  expect_usage_error([&] { check_combinations(s, {"--lr-schedule", "--lr-milestones"}); },
                     "--lr-schedule step needs --lr-milestones with one value");
  s = Settings();
  expect_usage_error([&] { check_combinations(s, {"--val-fraction"}); },
                     "--val-fraction: must be > 0 and < 1, got '0'");
  expect_usage_error([&] { check_combinations(s, {"--early-stop-patience"}); },
                     "--early-stop-patience and --monitor need a validation set");
  s.val = "val.h5";
  s.val_fraction = 0.1;
  expect_usage_error([&] { check_combinations(s, {"--val", "--val-fraction"}); },
                     "--val and --val-fraction each name a validation set: give one");
  s.val.clear();
  EXPECT_NO_THROW(check_combinations(s, {"--val-fraction", "--early-stop-patience"}));
  s.batch = 48;
  s.accumulate = 5;
  expect_usage_error([&] { check_combinations(s, {"--accumulate"}); },
                     "--accumulate 5 does not divide --batch 48 into equal micro-batches");
  s.accumulate = 4;
  EXPECT_NO_THROW(check_combinations(s, {"--accumulate"}));
}

// The merge of a resume: fixed settings must agree, restored ones come back unless given,
// invocation ones are this run's, and the checkpoint directory follows the resume.
TEST(Settings, ResumeMergeFollowsEachRule) {
  Settings stored;
  stored.layers = "784,256:relu,10:softmax";
  stored.batch = 128;
  stored.epochs = 4;
  stored.lr = 0.1;
  stored.checkpoint_dir = "/somewhere/ck";
  stored.checkpoint_every_steps = 100;
  stored.metrics = "run.jsonl";

  Settings cli;
  cli.epochs = 6;
  cli.threads = 3;
  cli.layers = "784,256,10";  // the same model, written shorter
  const MergedSettings m =
      merge_resumed(cli, {"--epochs", "--threads", "--layers"}, stored, "ck/ckpt-1.h5", "ck");
  EXPECT_EQ(m.settings.epochs, 6u);                     // changed
  EXPECT_EQ(m.settings.lr, 0.1);                        // restored
  EXPECT_EQ(m.settings.batch, 128u);                    // fixed, taken
  EXPECT_EQ(m.settings.checkpoint_every_steps, 100u);   // the cadence comes back
  EXPECT_EQ(m.settings.metrics, "run.jsonl");
  EXPECT_EQ(m.settings.checkpoint_dir, "ck");           // where the resume read from
  EXPECT_EQ(m.settings.threads, 3u);                    // this invocation's
  EXPECT_EQ(m.changed, (std::vector<std::string>{"--epochs 6 (checkpoint: 4)"}));
  const auto has = [&](const std::string& r) {
    return std::find(m.restored.begin(), m.restored.end(), r) != m.restored.end();
  };
  EXPECT_TRUE(has("--lr 0.1"));
  EXPECT_TRUE(has("--checkpoint-every-steps 100"));
  EXPECT_TRUE(has("--checkpoint-dir ck"));
  EXPECT_FALSE(has("--momentum 0.9"));  // at its default: not listed

  Settings contradicting;
  contradicting.batch = 64;
  expect_usage_error([&] { merge_resumed(contradicting, {"--batch"}, stored, "ck/ckpt-1.h5", "ck"); },
                     "--batch 64 contradicts the checkpoint's 128 (ck/ckpt-1.h5)");
  // Resumed from a single file, the run writes no checkpoints unless told where; nor does a
  // run that wrote none.
  EXPECT_EQ(merge_resumed(cli, {}, stored, "c.h5", "").settings.checkpoint_dir, "");
  stored.checkpoint_dir.clear();
  EXPECT_EQ(merge_resumed(cli, {}, stored, "ck/ckpt-1.h5", "ck").settings.checkpoint_dir, "");
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in) << path;
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The README's table and the checkpoint format describe every row of the table.
TEST(Settings, EveryRowIsDocumented) {
  const std::string readme = read_text(SHARDPROP_SOURCE_DIR "/README.md");
  const std::string format = read_text(SHARDPROP_SOURCE_DIR "/docs/checkpoint-format.md");
  for (const SettingSpec& s : settings_table()) {
    EXPECT_NE(readme.find(std::string("`") + s.flag), std::string::npos)
        << s.flag << " is not in README.md";
    if (s.attribute) {
      EXPECT_NE(format.find(std::string("`") + s.attribute + "`"), std::string::npos)
          << s.attribute << " is not in docs/checkpoint-format.md";
    }
  }
}

}  // namespace
}  // namespace shardprop
