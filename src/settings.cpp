#include "shardprop/settings.hpp"

#include <charconv>
#include <cmath>
#include <cstdio>
#include <limits>

#include "shardprop/error.hpp"
#include "shardprop/schedule.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

namespace {

using R = ResumeRule;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNone = -kInf;  // no lower bound

// Checkpoint format version 3 added the settings that version 2 did not store, 4 the
// precision, 5 the training recipe (schedules, accumulation, clipping, validation
// and early stopping).
constexpr int v2 = 2, v3 = 3, v4 = 4, v5 = 5;

// clang-format off
const SettingSpec kTable[] = {
  {"--train", &Settings::train, "Training set (HDF5: features, labels|targets; IDX and CSV "
   "go through `convert` first)", R::restored, "/train/train_path", v3, nullptr, kNone, false, kInf, false},
  {"--test", &Settings::test, "Test set, evaluated after every epoch",
   R::restored, "/train/test_path", v3, nullptr, kNone, false, kInf, false},
  {"--layers", &Settings::layers, "Input width, then width[:activation] per dense layer",
   R::fixed, "/layers", v2, nullptr, kNone, false, kInf, false},
  {"--loss", &Settings::loss, "xent (softmax output), bce (sigmoid) or mse (identity)",
   R::fixed, "/loss", v2, "xent|bce|mse", kNone, false, kInf, false},
  {"--batch", &Settings::batch, "Global minibatch, split over the ranks",
   R::fixed, "/train/batch", v2, nullptr, 0, true, kInf, false},
  {"--epochs", &Settings::epochs, "Passes over the training set",
   R::restored, "/train/epochs", v2, nullptr, 0, true, kInf, false},
  {"--max-steps", &Settings::max_steps, "Stop after this many optimizer steps in all",
   R::restored, "/train/max_steps", v2, nullptr, 0, false, kInf, false},
  {"--seed", &Settings::seed, "Seed of the initial weights and of every epoch's sample order",
   R::fixed, "/train/seed", v2, nullptr, 0, false, kInf, false},
  {"--eval-batch", &Settings::eval_batch, "Rows per forward pass when evaluating",
   R::restored, "/train/eval_batch", v2, nullptr, 0, true, kInf, false},
  {"--optimizer", &Settings::optimizer, "sgd (with momentum) or adam",
   R::fixed, "/optimizer/kind", v2, "sgd|adam", kNone, false, kInf, false},
  {"--lr", &Settings::lr, "Learning rate",
   R::restored, "/optimizer/lr", v2, nullptr, 0, true, kInf, false},
  {"--lr-schedule", &Settings::lr_schedule, "constant; cosine or linear decay to 0 over the "
   "run; step (times --lr-decay every --lr-milestones epochs) or multistep (times "
   "--lr-decay at each of the --lr-milestones epochs)",
   R::restored, "/train/lr_schedule", v2, "constant|cosine|step|multistep|linear", kNone, false,
   kInf, false},
  {"--lr-decay", &Settings::lr_decay, "The factor of the step and multistep schedules",
   R::restored, "/train/lr_decay", v5, nullptr, 0, true, 1, false},
  {"--lr-milestones", &Settings::lr_milestones, "Epochs, increasing: the period of the step "
   "schedule (one value) or the multistep schedule's milestones (\"30,60\")",
   R::restored, "/train/lr_milestones", v5, nullptr, kNone, false, kInf, false},
  {"--warmup-steps", &Settings::warmup_steps, "Raise the learning rate linearly from 0 over "
   "the first N steps (with any schedule)", R::restored, "/train/warmup_steps", v5, nullptr, 0,
   false, kInf, false},
  {"--lr-scale-batch", &Settings::lr_scale_batch, "The linear scaling rule: --lr is for this "
   "global batch, and runs with lr × --batch / B0 (0: --lr as given)", R::restored,
   "/train/lr_scale_batch", v5, nullptr, 0, false, kInf, false},
  {"--accumulate", &Settings::accumulate, "Micro-batches per optimizer step: each rank "
   "computes the global batch in K passes of --batch / K rows and the ranks reduce once, "
   "after the last (for a batch that does not fit in memory at once)", R::restored,
   "/train/accumulate", v5, nullptr, 0, true, kInf, false},
  {"--clip-norm", &Settings::clip_norm, "Scale the reduced gradient down to this global norm "
   "(all layers together) when it is larger; 0: never", R::restored, "/train/clip_norm", v5,
   nullptr, 0, false, kInf, false},
  {"--momentum", &Settings::momentum, "SGD momentum",
   R::restored, "/optimizer/momentum", v2, nullptr, 0, false, 1, true},
  {"--weight-decay", &Settings::weight_decay, "L2 term wd*w added to every gradient",
   R::restored, "/optimizer/weight_decay", v2, nullptr, 0, false, kInf, false},
  {"--beta1", &Settings::beta1, "Adam's first-moment decay",
   R::restored, "/optimizer/beta1", v2, nullptr, 0, false, 1, true},
  {"--beta2", &Settings::beta2, "Adam's second-moment decay",
   R::restored, "/optimizer/beta2", v2, nullptr, 0, false, 1, true},
  {"--eps", &Settings::eps, "Adam's epsilon",
   R::restored, "/optimizer/eps", v2, nullptr, 0, true, kInf, false},
  {"--val", &Settings::val, "Validation set (HDF5), evaluated after every epoch",
   R::restored, "/train/val_path", v5, nullptr, kNone, false, kInf, false},
  {"--val-fraction", &Settings::val_fraction, "Hold out this fraction of the training set "
   "for validation, the same rows for any number of ranks (chosen by --seed)",
   R::fixed, "/train/val_fraction", v5, nullptr, 0, false, 1, true},
  {"--early-stop-patience", &Settings::early_stop_patience, "Stop after N epochs without a "
   "better --monitor value (0: never)", R::restored, "/train/early_stop_patience", v5, nullptr,
   0, false, kInf, false},
  {"--monitor", &Settings::monitor, "The validation metric that picks the best model "
   "(best.h5 in --checkpoint-dir) and early stopping: val_loss or val_acc",
   R::fixed, "/train/monitor", v5, "val_loss|val_acc", kNone, false, kInf, false},
  {"--deterministic", &Settings::deterministic, "The same bits for any number of ranks and "
   "threads (docs/reproducibility.md)", R::restored, "/train/deterministic", v3, nullptr, kNone,
   false, kInf, false},
  {"--chunk", &Settings::chunk, "Rows per chunk in --deterministic mode: the unit of work "
   "that ranks and threads share", R::restored, "/train/chunk", v3, nullptr, 0, true, kInf, false},
  {"--overlap", &Settings::overlap, "With the MPI reduction, on: reduce each layer's gradient "
   "while backward goes on; "
   "off: the whole gradient at once after it (for measuring)", R::invocation, nullptr, 0,
   "on|off", kNone, false, kInf, false},
  {"--reduction", &Settings::reduction, "How the ranks reduce the gradient: node (through "
   "memory the ranks of one node share, each updating 1/P of the parameters), mpi "
   "(MPI_Iallreduce), or auto (node when every rank runs on one node, else mpi)",
   R::invocation, nullptr, 0, "auto|node|mpi", kNone, false, kInf, false},
  {"--data-placement", &Settings::data_placement, "partitioned: each rank reads only its "
   "block of the training and test sets (HDF5), and each step's rows travel to the ranks "
   "that need them; replicated: every rank holds every row; streamed: the training set "
   "stays in its file, each step's rows read as needed (for data larger than memory). The "
   "same sample order and bits either way",
   R::invocation, nullptr, 0, "partitioned|replicated|streamed", kNone, false, kInf, false},
  {"--read-cache", &Settings::read_cache, "MB of HDF5 chunk cache for --data-placement "
   "streamed", R::invocation, nullptr, 0, nullptr, 0, false, kInf, false},
  {"--precision", &Settings::precision, "fp32, or bf16: products on bfloat16 operands with "
   "float32 sums (needs AVX512_BF16; weights, gradients and checkpoints stay float32)",
   R::restored, "/train/precision", v4, "fp32|bf16", kNone, false, kInf, false},
  {"--gemm", &Settings::gemm, "Matrix-product library: auto (oneDNN when built in, else Eigen; "
   "or the SHARDPROP_GEMM variable), onednn, openblas or eigen", R::invocation, nullptr, 0,
   "auto|onednn|openblas|eigen", kNone, false, kInf, false},
  {"--threads", &Settings::threads, "oneTBB threads per rank (default: the node's cores "
   "divided by the ranks on the node)", R::invocation, nullptr, 0, nullptr, 0, true, kInf, false},
  {"--collective-timeout", &Settings::collective_timeout, "Seconds a collective may wait for "
   "the other ranks before the job is aborted (a rank stopped or hung); 0 waits forever",
   R::restored, "/train/collective_timeout", v3, nullptr, 0, false, kInf, false},
  {"--checkpoint-dir", &Settings::checkpoint_dir, "Rank 0 writes checkpoints here "
   "(ckpt-<step>.h5 and 'latest'), always at the end", R::directory, "/train/checkpoint_dir",
   v3, nullptr, kNone, false, kInf, false},
  {"--checkpoint-every-steps", &Settings::checkpoint_every_steps, "Also write a checkpoint "
   "every N optimizer steps (0: no)", R::restored, "/train/checkpoint_every_steps", v3, nullptr,
   0, false, kInf, false},
  {"--checkpoint-every-epochs", &Settings::checkpoint_every_epochs, "Also write a checkpoint "
   "after every N-th epoch (0: no)", R::restored, "/train/checkpoint_every_epochs", v3, nullptr,
   0, false, kInf, false},
  {"--keep-checkpoints", &Settings::keep_checkpoints, "Keep the newest K checkpoints in "
   "--checkpoint-dir", R::restored, "/train/keep_checkpoints", v3, nullptr, 0, true, kInf, false},
  {"--resume", &Settings::resume, "Continue from a checkpoint file, the newest valid one of a "
   "directory, or 'auto' (--checkpoint-dir's, if it has one)", R::invocation, nullptr, 0,
   nullptr, kNone, false, kInf, false},
  {"--stop-at-step", &Settings::stop_at_step, "End this invocation at this global step (with "
   "a checkpoint); the run's schedule is unchanged, so --resume continues it exactly",
   R::invocation, nullptr, 0, nullptr, 0, false, kInf, false},
  {"--save", &Settings::save, "Rank 0 writes the final checkpoint to this HDF5 file",
   R::restored, "/train/save", v3, nullptr, kNone, false, kInf, false},
  {"--metrics", &Settings::metrics, "Append one JSON object per epoch to this file",
   R::restored, "/train/metrics", v3, nullptr, kNone, false, kInf, false},
  {"--progress", &Settings::progress, "Progress line within an epoch: auto (on a terminal), "
   "always or never", R::restored, "/train/progress", v3, "auto|always|never", kNone, false,
   kInf, false},
};
// clang-format on

// The shortest text that reads back as the same double ("300", "0.05", "1e-08").
std::string number_text(double v) {
  char text[64];
  const auto [end, ec] = std::to_chars(text, text + sizeof text, v);
  return ec == std::errc() ? std::string(text, end) : std::to_string(v);
}

// The canonical form of a --layers text (784,256,10 is 784,256:relu,10:softmax); the text
// itself if it does not parse.
std::string canonical_layers(const std::string& text) {
  try {
    return layers_string(parse_layers(text));
  } catch (const Error&) {
    return text;
  }
}

void check_number(const SettingSpec& spec, double v, std::string_view text) {
  const bool low = spec.min_open ? v > spec.min : v >= spec.min;
  const bool high = spec.max_open ? v < spec.max : v <= spec.max;
  if (low && high && !std::isnan(v)) return;
  std::string rule;
  if (spec.min > kNone) rule += std::string(spec.min_open ? "> " : ">= ") + number_text(spec.min);
  if (spec.max < kInf) {
    rule += (rule.empty() ? "" : " and ") + std::string(spec.max_open ? "< " : "<= ") +
            number_text(spec.max);
  }
  SP_USAGE(spec.flag, ": must be ", rule, ", got '", text, "'");
}

void check_choice(const SettingSpec& spec, std::string_view value) {
  if (!spec.choices) return;
  const std::string_view choices = spec.choices;
  for (std::size_t start = 0;;) {
    const std::size_t bar = choices.find('|', start);
    if (choices.substr(start, bar - start) == value) return;
    if (bar == std::string_view::npos) break;
    start = bar + 1;
  }
  std::string expected(choices);
  for (char& c : expected) c = c == '|' ? ',' : c;
  SP_USAGE(spec.flag, ": '", value, "' is not one of ", expected);
}

template <class T>
T parse_integer(const SettingSpec& spec, std::string_view text) {
  T value{};
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || end != text.data() + text.size() || text.empty()) {
    // A negative number for a count, or a fraction: say what is wrong with the value.
    double v = 0;
    const auto [dend, dec] = std::from_chars(text.data(), text.data() + text.size(), v);
    if (dec == std::errc() && dend == text.data() + text.size()) check_number(spec, v, text);
    SP_USAGE(spec.flag, ": '", text, "' is not a whole number");
  }
  return value;
}

}  // namespace

std::span<const SettingSpec> settings_table() { return kTable; }

const SettingSpec& setting(std::string_view flag) {
  for (const SettingSpec& s : kTable) {
    if (s.flag == flag) return s;
  }
  SP_THROW("no setting ", flag);
}

std::string format_setting(const SettingSpec& spec, const Settings& s) {
  return std::visit(
      [&](auto member) -> std::string {
        const auto& v = s.*member;
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          if (member == &Settings::layers) return canonical_layers(v);
          return v.empty() ? "none" : v;
        } else if constexpr (std::is_same_v<T, bool>) {
          return v ? "on" : "off";
        } else if constexpr (std::is_same_v<T, double>) {
          return number_text(v);
        } else if constexpr (std::is_same_v<T, std::int64_t>) {
          return v < 0 ? "none" : std::to_string(v);
        } else {
          return std::to_string(v);
        }
      },
      spec.field);
}

void check_setting(const SettingSpec& spec, const Settings& s) {
  std::visit(
      [&](auto member) {
        const auto& v = s.*member;
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          check_choice(spec, v);
        } else if constexpr (std::is_same_v<T, std::int64_t>) {
          if (v != -1) check_number(spec, double(v), std::to_string(v));
        } else if constexpr (!std::is_same_v<T, bool>) {
          check_number(spec, double(v), format_setting(spec, s));
        }
      },
      spec.field);
}

void parse_setting(const SettingSpec& spec, Settings& s, std::string_view text) {
  std::visit(
      [&](auto member) {
        auto& v = s.*member;
        using T = std::decay_t<decltype(v)>;
        if constexpr (std::is_same_v<T, std::string>) {
          v = std::string(text);
        } else if constexpr (std::is_same_v<T, bool>) {
          SP_CHECK_USAGE(text == "true" || text == "false" || text == "on" || text == "off",
                         spec.flag, ": '", text, "' is not on or off");
          v = text == "true" || text == "on";
        } else if constexpr (std::is_same_v<T, double>) {
          double value = 0;
          const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
          SP_CHECK_USAGE(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
                         spec.flag, ": '", text, "' is not a number");
          check_number(spec, value, text);
          v = value;
        } else {
          v = parse_integer<T>(spec, text);
          check_number(spec, double(v), text);
        }
      },
      spec.field);
  check_setting(spec, s);
}

bool same_setting(const SettingSpec& spec, const Settings& a, const Settings& b) {
  if (std::string_view(spec.flag) == "--layers") {
    return canonical_layers(a.layers) == canonical_layers(b.layers);
  }
  return std::visit([&](auto member) { return a.*member == b.*member; }, spec.field);
}

void check_combinations(const Settings& s, const GivenFlags& given) {
  const auto has = [&](const char* flag) { return given.count(flag) > 0; };
  SP_CHECK_USAGE(s.deterministic || !has("--chunk"), "--chunk needs --deterministic");
  SP_CHECK_USAGE(!s.checkpoint_dir.empty() ||
                     !(has("--checkpoint-every-steps") || has("--checkpoint-every-epochs") ||
                       has("--keep-checkpoints")),
                 "--checkpoint-every-steps, --checkpoint-every-epochs and --keep-checkpoints "
                 "need --checkpoint-dir");
  SP_CHECK_USAGE(s.resume != "auto" || !s.checkpoint_dir.empty(),
                 "--resume auto needs --checkpoint-dir");
  SP_CHECK_USAGE(!has("--val-fraction") || s.val_fraction > 0,
                 "--val-fraction: must be > 0 and < 1, got '0'");
  SP_CHECK_USAGE(s.val.empty() || s.val_fraction == 0,
                 "--val and --val-fraction each name a validation set: give one");
  const bool validating = !s.val.empty() || s.val_fraction > 0;
  SP_CHECK_USAGE(validating || !(has("--early-stop-patience") || has("--monitor")),
                 "--early-stop-patience and --monitor need a validation set (--val or "
                 "--val-fraction)");
  const std::vector<std::uint64_t> milestones = parse_milestones(s.lr_milestones);
  SP_CHECK_USAGE(s.lr_schedule != "step" || milestones.size() == 1,
                 "--lr-schedule step needs --lr-milestones with one value (the period in "
                 "epochs), got '", s.lr_milestones, "'");
  SP_CHECK_USAGE(s.lr_schedule != "multistep" || !milestones.empty(),
                 "--lr-schedule multistep needs --lr-milestones (epochs, increasing)");
  SP_CHECK_USAGE(s.batch % s.accumulate == 0, "--accumulate ", s.accumulate,
                 " does not divide --batch ", s.batch, " into equal micro-batches");
}

MergedSettings merge_resumed(const Settings& cli, const GivenFlags& given, const Settings& stored,
                             const std::string& checkpoint, const std::string& resumed_dir) {
  MergedSettings merged{stored, {}, {}};
  const Settings defaults;
  for (const SettingSpec& spec : kTable) {
    const bool is_given = given.count(spec.flag) > 0;
    const auto take_cli = [&] {
      std::visit([&](auto member) { merged.settings.*member = cli.*member; }, spec.field);
    };
    switch (spec.rule) {
      case ResumeRule::invocation:
        take_cli();
        break;
      case ResumeRule::fixed:
        SP_CHECK_USAGE(!is_given || same_setting(spec, cli, stored), spec.flag, " ",
                       format_setting(spec, cli), " contradicts the checkpoint's ",
                       format_setting(spec, stored), " (", checkpoint,
                       "); it cannot change when resuming");
        break;
      case ResumeRule::directory:
        if (is_given) {
          take_cli();
        } else {
          // A run that wrote checkpoints goes on writing them in the directory it is resumed
          // from; one resumed from a single file (resumed_dir "") writes none unless told.
          merged.settings.checkpoint_dir = stored.checkpoint_dir.empty() ? "" : resumed_dir;
          if (!merged.settings.checkpoint_dir.empty()) {
            merged.restored.push_back(std::string(spec.flag) + " " + resumed_dir);
          }
        }
        break;
      case ResumeRule::restored:
        if (is_given) {
          take_cli();
          if (!same_setting(spec, cli, stored)) {
            merged.changed.push_back(std::string(spec.flag) + " " + format_setting(spec, cli) +
                                     " (checkpoint: " + format_setting(spec, stored) + ")");
          }
        } else if (!same_setting(spec, stored, defaults)) {
          merged.restored.push_back(std::string(spec.flag) + " " + format_setting(spec, stored));
        }
        break;
    }
  }
  return merged;
}

}  // namespace shardprop
