// The run settings: one table that the command line, the checkpoint writer and reader, the
// resume merge and `info` all read. A setting is named here once, with its flag, type,
// default (the member initializer below), help, resume rule and checkpoint attribute.
#pragma once

#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace shardprop {

// Every setting of a training run, with its default.
struct Settings {
  // data
  std::string train, test;
  // model
  std::string layers = "784,256:relu,128:relu,10:softmax";
  std::string loss = "xent";
  // schedule of the run
  std::uint64_t batch = 256, epochs = 10;
  std::int64_t max_steps = -1;  // -1: no limit
  std::uint64_t seed = 1;
  std::uint64_t eval_batch = 1024;
  // optimizer
  std::string optimizer = "sgd";
  double lr = 0.05;
  std::string lr_schedule = "constant";
  double lr_decay = 0.1;
  std::string lr_milestones;  // epochs, "30,60"
  std::uint64_t warmup_steps = 0, lr_scale_batch = 0;  // 0: none
  double clip_norm = 0;  // 0: no clipping
  std::uint64_t accumulate = 1;  // micro-batches per optimizer step
  double momentum = 0.9, weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  // validation and early stopping
  std::string val;
  double val_fraction = 0;  // 0: none
  std::uint64_t early_stop_patience = 0;  // 0: never stop early
  std::string monitor = "val_loss";
  // reproducibility
  bool deterministic = false;
  std::uint64_t chunk = 64;
  // how this invocation's ranks run
  std::string overlap = "on";
  std::string reduction = "auto";  // auto|node|mpi
  std::string data_placement = "partitioned";  // partitioned|replicated|streamed
  std::uint64_t read_cache = 64;  // MB of HDF5 chunk cache for streamed reads
  std::string precision = "fp32";  // fp32|bf16
  std::string gemm = "auto";       // auto|onednn|openblas|eigen
  std::uint64_t threads = 0;  // 0: the node's cores divided by the ranks on the node
  double collective_timeout = 300;
  // checkpoints and output
  std::string checkpoint_dir;
  std::uint64_t checkpoint_every_steps = 0, checkpoint_every_epochs = 0, keep_checkpoints = 3;
  std::string resume, save, metrics;
  std::int64_t stop_at_step = -1;  // -1: never
  std::string progress = "auto";

  // The rows per chunk of the deterministic mode, 0 in the default mode.
  std::size_t deterministic_chunk() const { return deterministic ? chunk : 0; }
};

// What a resume does with a setting that the checkpoint stores.
enum class ResumeRule {
  fixed,       // part of the run: the model, the sample order or the optimizer's state
               // depend on it; given again it must equal the checkpoint's
  restored,    // the checkpoint's value unless given again (then the change is logged)
  directory,   // the directory resumed from, when resuming from a directory of checkpoints
               // (none when resuming from a single file)
  invocation,  // this invocation's alone; never stored
};

// One row of the table.
struct SettingSpec {
  using Field = std::variant<std::string Settings::*, std::uint64_t Settings::*,
                             std::int64_t Settings::*, double Settings::*, bool Settings::*>;
  const char* flag;       // "--lr"
  Field field;
  const char* help;
  ResumeRule rule;
  const char* attribute;  // where a checkpoint keeps it ("/optimizer/lr"); null if nowhere
  int since_version;      // checkpoints of older format versions lack it: default then
  const char* choices;    // "sgd|adam", or null
  double min;             // numbers: the smallest value allowed (or above, see min_open)
  bool min_open;          //   true: the value must exceed min
  double max;             //   the largest value allowed (numbers), below it if max_open
  bool max_open;
};

// The table, in the order of `--help`.
std::span<const SettingSpec> settings_table();
// The row of `flag`; throws if there is none.
const SettingSpec& setting(std::string_view flag);

// The setting's value in `s` as text: numbers as printed by %g or in full, "" and -1 as
// "none", flags as "on"/"off".
std::string format_setting(const SettingSpec& spec, const Settings& s);
// Parses and checks `text` as the setting's value and stores it in `s`; a bad value throws
// UsageError naming the flag and the value.
void parse_setting(const SettingSpec& spec, Settings& s, std::string_view text);
// Checks the setting's value in `s` as parse_setting would (for values from a file).
void check_setting(const SettingSpec& spec, const Settings& s);
bool same_setting(const SettingSpec& spec, const Settings& a, const Settings& b);

// The flags named on a command line.
using GivenFlags = std::set<std::string, std::less<>>;

// Checks flags that only make sense together (UsageError): --chunk needs --deterministic,
// the checkpoint cadence needs --checkpoint-dir, --resume auto needs --checkpoint-dir.
void check_combinations(const Settings& s, const GivenFlags& given);

// The settings a resumed run continues with: `stored` (the checkpoint's) merged with this
// invocation's `given` flags from `cli`, rule by rule. A fixed setting given with another
// value throws UsageError naming both values and `checkpoint`. `changed` lists the flags
// given with a new value, `restored` the checkpoint's values taken that differ from the
// defaults, each as "--flag value". `resumed_dir` is the directory of checkpoints resumed
// from, or "" for a single file.
struct MergedSettings {
  Settings settings;
  std::vector<std::string> changed, restored;
};
MergedSettings merge_resumed(const Settings& cli, const GivenFlags& given, const Settings& stored,
                             const std::string& checkpoint, const std::string& resumed_dir);

}  // namespace shardprop
