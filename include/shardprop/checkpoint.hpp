// Checkpoints in HDF5: everything needed to continue a training run exactly, readable
// without shardprop. The layout is documented in docs/checkpoint-format.md:
//   root attributes  format = "shardprop-checkpoint", format_version, layers, loss, step,
//                    epoch, batch_in_epoch, world_size, threads, checksum_crc32
//   /params/layer_<i>/W, b                 float32 (in, out) and (out)
//   /optimizer/<slot>/layer_<i>/W, b       float32 state (slot: velocity, or m and v)
//   /train (attributes), /rng/epoch_order  the configuration and the sample order's state
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "shardprop/comm.hpp"
#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"
#include "shardprop/train.hpp"

namespace shardprop {

inline constexpr const char* kCheckpointFormat = "shardprop-checkpoint";
// Version 2 holds the training state; version 1 files (model only) can still be evaluated.
inline constexpr std::int64_t kCheckpointVersion = 2;

struct Checkpoint {
  ModelSpec spec;
  AlignedVector<float> params;  // in Layout(spec) order, padding zero
  std::int64_t format_version = kCheckpointVersion;
  // Present from format_version 2 on; a version 1 file holds the model alone.
  bool has_training_state = false;
  TrainConfig config;  // the run's configuration, optimizer settings included
  TrainState state;
  std::uint64_t optimizer_steps = 0;
  AlignedVector<float> optimizer_state;  // optimizer_slots(kind) × Layout size
  std::uint64_t train_rows = 0, train_cols = 0;  // the training set it was trained on
  std::int64_t world_size = 0, threads = 0;      // how the writing job ran
  std::uint32_t checksum = 0;  // as stored (version 2) or computed (version 1)
};

// The names of the optimizer's state slots in the file: {"velocity"} or {"m", "v"}.
std::vector<std::string> optimizer_slots(OptimizerKind kind);

// The CRC-32 (zlib's) of the parameter bytes, then the optimizer state bytes, each layer's
// W then b in the order of the file's datasets (float32, little-endian, no padding).
std::uint32_t checkpoint_checksum(const Checkpoint& c);

// A snapshot of a trainer on this rank; world_size and threads describe the job.
Checkpoint make_checkpoint(const Trainer& trainer, int world_size, int threads);
// Puts a checkpoint's parameters, optimizer state and position into `trainer`, whose model
// and optimizer must match (no communication: every rank restores the same checkpoint).
void restore_checkpoint(Trainer& trainer, const Checkpoint& c);

// Writes `c` to `path` through a temporary file in the same directory that is flushed,
// fsynced and renamed into place (and the directory fsynced), so `path` is never left half
// written and a file already there stays intact until the new one replaces it.
void save_checkpoint(const std::string& path, const Checkpoint& c);

// Reads and verifies a checkpoint or model file: format, version, architecture, every
// shape, the training state's consistency and (unless verify_checksum is false) the
// checksum. Each failure has its own error.
Checkpoint load_checkpoint(const std::string& path, bool verify_checksum = true);

// Whether `path` is an HDF5 file carrying the checkpoint format attribute.
bool is_checkpoint_file(const std::string& path);

// Root's checkpoint on every rank (collective).
void broadcast_checkpoint(Communicator& comm, Checkpoint& c, int root);

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

struct ResumePoint {
  std::string path;
  Checkpoint checkpoint;
  std::vector<std::string> skipped;  // "file: why" for newer files that failed to verify
};

// The checkpoint to resume from: `path` itself if it is a file, or the newest checkpoint of
// the directory `path` that verifies (newer ones that do not are listed in `skipped`).
// Throws if there is none, or if the file holds no training state.
ResumePoint find_resume_point(const std::string& path);

}  // namespace shardprop
