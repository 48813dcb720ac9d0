// What the commands print: the training run's header, its progress line and epoch lines,
// the metrics file, and the number formats they share.
#pragma once

#include <chrono>
#include <cstdint>
#include <fstream>
#include <string>

#include "shardprop/checkpoint.hpp"
#include "shardprop/train.hpp"

namespace shardprop::app {

// 60000 as "60,000".
std::string thousands(std::uint64_t n);
// "1 epoch", "2 epochs"; "1 class", "2 classes" with the plural given.
std::string count_of(std::uint64_t n, const std::string& noun, const std::string& plural = "");
// Seconds as "m:ss" or "h:mm:ss".
std::string clock_time(double seconds);

// Rank 0 prints the progress line within an epoch (when asked), one line per epoch and one
// per checkpoint, and appends the epoch's metrics to the JSON Lines file.
class Reporter final : public TrainObserver {
 public:
  // `append`: a resumed run adds to the metrics file; a new one starts it afresh.
  Reporter(bool speak, bool progress, int ranks, int threads, const std::string& metrics_path,
           bool append);

  void on_progress(const Progress& p) override;
  void on_epoch(const EpochStats& s) override;
  void on_checkpoint(const std::string& path) override;
  void on_save(const std::string& path) override;
  // The newest checkpoint written (rank 0), or "".
  const std::string& last_checkpoint() const { return last_checkpoint_; }
  // Clears the progress line before other output.
  void clear_line() const;

 private:
  bool speak_, progress_;
  int ranks_, threads_;
  std::ofstream metrics_;
  std::string metrics_path_;
  std::string last_checkpoint_;
  std::chrono::steady_clock::time_point last_{};
};

// The header of a training run (rank 0): ranks and threads, model, data, batch split,
// mode, optimizer, and with a resume where from and what changed or came back.
struct RunHeader {
  int ranks = 1, threads = 1, cores = 1;  // cores: what this rank may run on
  std::string gemm;                       // the matrix-product backend
  const Dataset* val = nullptr;           // --val's set
};
void print_run_header(const RunHeader& run, const Trainer& trainer, const Dataset* test,
                      const Checkpointer& checkpointer);

// The description `info` prints of a checkpoint.
void print_checkpoint(const std::string& path, const Checkpoint& c);

}  // namespace shardprop::app
