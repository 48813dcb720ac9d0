// The Checkpointer: resume discovery and merge, the checkpoint directory, the cadence.
#include <filesystem>

#include "fileio.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/error.hpp"

namespace shardprop {

namespace fs = std::filesystem;

namespace {

// The directory of checkpoints a resume reads from, or "" when it names a single file (a
// run branched from one file must not write among another run's checkpoints).
std::string directory_of(const std::string& resume) {
  std::error_code ec;
  return fs::is_directory(resume, ec) ? resume : std::string();
}

}  // namespace

Checkpointer::Checkpointer(Communicator& comm, const Settings& cli, const GivenFlags& given)
    : comm_(comm), merged_{cli, {}, {}} {
  // Rank 0 decides whether this is a resume: --resume auto resumes when the checkpoint
  // directory holds a checkpoint.
  std::int64_t resuming = 0;
  collective_check(comm_, [&] {
    check_combinations(cli, given);
    if (comm_.rank() != 0) return;
    std::error_code ec;
    if (cli.resume == "auto") {
      resuming = fs::is_directory(cli.checkpoint_dir, ec) &&
                 !list_checkpoints(cli.checkpoint_dir).empty();
    } else {
      resuming = !cli.resume.empty();
    }
  });
  comm_.broadcast(std::span<std::int64_t>(&resuming, 1), 0);

  std::string resumed_dir;
  if (resuming) {
    const std::string from = cli.resume == "auto" ? cli.checkpoint_dir : cli.resume;
    resumed_.emplace(load_shared(comm_, from, "--resume", &source_));
    collective_check(comm_, [&] {
      SP_CHECK(resumed_->has_training_state, source_.path,
               ": format_version 1 holds the model only and cannot be resumed");
      resumed_dir = directory_of(from);
      merged_ = merge_resumed(cli, given, resumed_->settings, source_.path, resumed_dir);
    });
  }

  const Settings& s = merged_.settings;
  collective_check(comm_, [&] {
    if (comm_.rank() != 0) return;
    if (!s.checkpoint_dir.empty()) {
      dir_.emplace(s.checkpoint_dir, s.keep_checkpoints);
      // A new run would mix its files with another run's and prune them.
      const std::vector<std::string> existing = list_checkpoints(s.checkpoint_dir);
      SP_CHECK_USAGE(resuming || existing.empty(), "--checkpoint-dir ", s.checkpoint_dir,
                     " already holds checkpoints (newest ",
                     fs::path(existing.empty() ? "" : existing.front()).filename().string(),
                     "): pass --resume ", s.checkpoint_dir, " (or auto) to continue that run, "
                     "or choose an empty directory");
      // Resumed from this directory: its newest checkpoint is the resumed step's.
      std::error_code ec;
      if (resumed_ && fs::equivalent(fs::path(source_.path).parent_path().empty()
                                         ? fs::path(".")
                                         : fs::path(source_.path).parent_path(),
                                     s.checkpoint_dir, ec)) {
        saved_step_ = std::int64_t(resumed_->state.step);
      }
    }
    if (!s.save.empty()) {
      fileio::check_replaceable("--save", s.save, [&] { return is_checkpoint_file(s.save); });
    }
  });
  comm_.broadcast(std::span<std::int64_t>(&saved_step_, 1), 0);
}

bool Checkpointer::due(const TrainState& state, bool epoch_ended) const {
  const Settings& s = merged_.settings;
  if (s.checkpoint_dir.empty()) return false;
  return (s.checkpoint_every_steps > 0 && state.step % s.checkpoint_every_steps == 0) ||
         (epoch_ended && s.checkpoint_every_epochs > 0 &&
          state.epoch % s.checkpoint_every_epochs == 0);
}

std::string Checkpointer::write(const Checkpoint& c) {
  std::string written;
  collective_check(comm_, [&] {
    if (comm_.rank() == 0) written = dir_->write(c);
  });
  saved_step_ = std::int64_t(c.state.step);
  return written;
}

std::string Checkpointer::save_final(const Checkpoint& c) {
  const std::string& path = merged_.settings.save;
  if (path.empty()) return {};
  collective_check(comm_, [&] {
    if (comm_.rank() == 0) save_checkpoint(path, c);
  });
  return path;
}

std::string Checkpointer::best_path() const {
  return writing() ? (fs::path(merged_.settings.checkpoint_dir) / "best.h5").string() : "";
}

std::string Checkpointer::write_best(const Checkpoint& c) {
  if (!writing()) return {};
  const std::string path = best_path();
  collective_check(comm_, [&] {
    if (comm_.rank() == 0) save_checkpoint(path, c);
  });
  return comm_.rank() == 0 ? path : std::string();
}

}  // namespace shardprop
