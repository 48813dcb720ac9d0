// Checkpoints in HDF5: everything needed to continue a training run exactly, readable
// without shardprop. The layout is documented in docs/checkpoint-format.md:
//   root attributes  format = "shardprop-checkpoint", format_version, layers, loss, step,
//                    epoch, batch_in_epoch, world_size, threads, checksum_crc32
//   /params/layer_<i>/W, b                 float32 (in, out) and (out)
//   /optimizer/<slot>/layer_<i>/W, b       float32 state (slot: velocity, or m and v)
//   /train (attributes), /rng/epoch_order  the run's settings and the sample order's state
// Every stored setting's attribute comes from the settings table (settings.hpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "shardprop/comm.hpp"
#include "shardprop/optimizer.hpp"
#include "shardprop/params.hpp"
#include "shardprop/settings.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

inline constexpr const char* kCheckpointFormat = "shardprop-checkpoint";
// Version 4 stores every run setting of the table (3 lacked the precision); version 2 files (the training state and
// the settings of that time) still resume, version 1 files (model only) can be evaluated.
inline constexpr std::int64_t kCheckpointVersion = 5;

// Where training stands: enough, with the parameters and optimizer state, to continue.
struct TrainState {
  std::uint64_t step = 0;            // optimizer steps taken
  std::uint64_t epoch = 0;           // epochs completed (the current one, counted from 0)
  std::uint64_t batch_in_epoch = 0;  // next global minibatch within that epoch
  // Validation (format version 5): the best --monitor value so far and the epoch (1-based)
  // it was measured after (0: none yet), and the epochs since then without a better one.
  double best_metric = 0;
  std::uint64_t best_epoch = 0, epochs_without_improvement = 0;
};

struct Checkpoint {
  ModelSpec spec;
  Settings settings;  // the run's settings (those the file stores; the others default)
  TrainState state;
  AlignedVector<float> params;           // in Layout(spec) order, padding zero
  std::uint64_t optimizer_steps = 0;
  AlignedVector<float> optimizer_state;  // optimizer_slots(kind) × Layout size
  std::uint64_t train_rows = 0, train_cols = 0;  // the training set it was trained on
  std::int64_t world_size = 0, threads = 0;      // how the writing job ran
  std::int64_t format_version = kCheckpointVersion;
  bool has_training_state = false;  // false for a version 1 file: the model alone
  std::uint32_t checksum = 0;       // as stored (version ≥ 2) or computed (version 1)
};

// The names of the optimizer's state slots in the file: {"velocity"} or {"m", "v"}.
std::vector<std::string> optimizer_slots(OptimizerKind kind);

// The CRC-32 (zlib's) of the parameter bytes, then the optimizer state bytes, each layer's
// W then b in the order of the file's datasets (float32, little-endian, no padding).
std::uint32_t checkpoint_checksum(const Checkpoint& c);

// The checkpoint as the bytes of an HDF5 file.
std::vector<std::byte> checkpoint_bytes(const Checkpoint& c);
// Writes `c` to `path` through a temporary file in the same directory that is flushed,
// fsynced and renamed into place (and the directory fsynced), so `path` is never left half
// written and a file already there stays intact until the new one replaces it.
void save_checkpoint(const std::string& path, const Checkpoint& c);

// Reads and verifies a checkpoint or model file from its bytes (`name` in messages): format,
// version, architecture, every shape, every setting's value, the training state's
// consistency and (unless verify_checksum is false) the checksum. Each failure has its own
// error naming the file.
Checkpoint parse_checkpoint(std::span<const std::byte> image, const std::string& name,
                            bool verify_checksum = true);
// parse_checkpoint of the file's bytes.
Checkpoint load_checkpoint(const std::string& path, bool verify_checksum = true);
// Whether `path` is an HDF5 file carrying the checkpoint format attribute.
bool is_checkpoint_file(const std::string& path);

// A directory of checkpoints ckpt-<step>.h5 with a "latest" file naming the newest one.
class CheckpointDir {
 public:
  // Creates the directory if needed and checks that it is writable; removes temporary files
  // that an interrupted writer left behind. `keep` >= 1 checkpoints are kept.
  CheckpointDir(std::string dir, std::size_t keep);

  // Writes the checkpoint, then the latest pointer (both atomically), then deletes all but
  // the newest `keep` checkpoints. Returns the new file's path.
  std::string write(const Checkpoint& c);

  static std::string file_name(std::uint64_t step);
  const std::string& path() const { return dir_; }

 private:
  std::string dir_;
  std::size_t keep_;
};

// The checkpoint files of a directory, newest (highest step) first.
std::vector<std::string> list_checkpoints(const std::string& dir);

// A checkpoint chosen to read: the file, its bytes (verified), and the newer files of its
// directory that failed to verify ("file: why").
struct CheckpointSource {
  std::string path;
  std::vector<std::byte> bytes;
  std::vector<std::string> skipped;
};

// `path` itself if it is a file, or the newest checkpoint of the directory `path` that
// verifies. `flag` names the argument in errors ("--resume"). Throws if there is none.
CheckpointSource find_checkpoint(const std::string& path, const std::string& flag);

// Collective: rank `root` finds the checkpoint named by `path` (a file or a directory),
// reads and verifies it, and sends its bytes to every rank, which parses them with
// parse_checkpoint; a failure on the root stops every rank with its message.
Checkpoint load_shared(Communicator& comm, const std::string& path, const std::string& flag,
                       CheckpointSource* source = nullptr, int root = 0);

// Owns a run's checkpoints: finds the one to resume from and merges its settings, prepares
// the checkpoint directory, and writes checkpoints when the cadence says so (rank 0 writes,
// every rank learns whether it worked). Trainer::run calls it after every step.
class Checkpointer {
 public:
  // Collective. `cli` and `given` are this invocation's settings and the flags it named.
  // With --resume, finds the checkpoint (a file, the newest valid one of a directory, or
  // with `auto` the checkpoint directory's if it has one), sends it to every rank and merges
  // its settings with the invocation's (merge_resumed). Then rank 0 prepares the checkpoint
  // directory: created if needed, writable, and for a new run empty of checkpoints; and
  // checks that --save would replace no file that is not a checkpoint.
  Checkpointer(Communicator& comm, const Settings& cli, const GivenFlags& given);

  // The settings the run continues with: the invocation's, merged with the checkpoint's.
  const Settings& settings() const { return merged_.settings; }
  // With --resume: the checkpoint, where it came from, and what the merge changed and
  // restored; newer checkpoints of its directory that failed to verify.
  const std::optional<Checkpoint>& resumed() const { return resumed_; }
  const std::string& resumed_path() const { return source_.path; }
  const std::vector<std::string>& skipped() const { return source_.skipped; }
  const std::vector<std::string>& changed() const { return merged_.changed; }
  const std::vector<std::string>& restored() const { return merged_.restored; }
  // Whether a checkpoint directory is set.
  bool writing() const { return !merged_.settings.checkpoint_dir.empty(); }

  // Whether the cadence asks for a checkpoint of `state` (the same answer on every rank).
  bool due(const TrainState& state, bool epoch_ended) const;
  // Collective: rank 0 writes `c` into the checkpoint directory; returns its path (on rank
  // 0; empty on the others).
  std::string write(const Checkpoint& c);
  // Whether the newest checkpoint in the directory is of `step` already.
  bool saved(std::uint64_t step) const { return saved_step_ == std::int64_t(step); }
  // Collective: rank 0 writes `c` to the --save file, if one is set; returns its path.
  std::string save_final(const Checkpoint& c);
  // Collective: rank 0 replaces best.h5 in the checkpoint directory with `c` (atomically),
  // if a directory is set; returns its path (on rank 0; empty on the others).
  std::string write_best(const Checkpoint& c);
  // Where write_best writes: best.h5 in the checkpoint directory, or "" without one.
  std::string best_path() const;

 private:
  Communicator& comm_;
  MergedSettings merged_;
  CheckpointSource source_;
  std::optional<Checkpoint> resumed_;
  std::optional<CheckpointDir> dir_;
  std::int64_t saved_step_ = -1;
};

}  // namespace shardprop
