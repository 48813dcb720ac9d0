// The data-parallel training loop:
//   shard → forward → backward → reducer → optimizer → checkpointer.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "shardprop/checkpoint.hpp"
#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/mlp.hpp"
#include "shardprop/optimizer.hpp"
#include "shardprop/reducer.hpp"
#include "shardprop/schedule.hpp"
#include "shardprop/settings.hpp"

namespace shardprop {

class RowExchange;
class RowStream;
class BackgroundTask;

struct EpochStats {
  std::uint64_t epoch = 0;  // 1-based, as printed
  std::uint64_t epochs = 0;  // of the run
  std::uint64_t step = 0;   // the step the epoch (or this invocation's part of it) ended at
  std::uint64_t first_step = 0;  // the first step this row covers
  EvalStats train;          // running mean over the minibatches this row covers
  bool has_test = false;
  EvalStats test;
  bool has_val = false;  // validated (after a whole epoch, with a validation set)
  EvalStats val;
  bool best = false;     // the best --monitor value so far
  double lr = 0;         // the learning rate of the row's last step
  std::uint64_t clipped = 0;  // steps whose gradient --clip-norm scaled down
  double max_grad_norm = 0;   // the largest gradient norm of the row's steps (--clip-norm)
  double samples_per_s = 0, seconds = 0;
};

// Where a running epoch stands, for a progress line.
struct Progress {
  std::uint64_t epoch = 0, epochs = 0;     // 1-based
  std::uint64_t batch = 0, batches = 0;    // minibatches done in this epoch, of all
  std::uint64_t step = 0, total_steps = 0;  // optimizer steps done, of the run's
  double running_loss = 0;                  // mean loss of this epoch's batches so far
  double lr = 0;                            // the learning rate of the last step
  double samples_per_s = 0;                 // this invocation's rate in this epoch
  double step_seconds = 0;                  //   and its mean time per step
};

// Receives what the trainer does; every rank calls it, printing is up to the observer.
class TrainObserver {
 public:
  virtual ~TrainObserver() = default;
  virtual void on_progress(const Progress& /*progress*/) {}
  virtual void on_epoch(const EpochStats& /*stats*/) {}
  // A checkpoint was written into the checkpoint directory, or the final one to the --save
  // file (the path on rank 0, empty elsewhere).
  virtual void on_checkpoint(const std::string& /*path*/) {}
  virtual void on_save(const std::string& /*path*/) {}
  // The model of the best validation so far was written to best.h5 (the path on rank 0).
  virtual void on_best(const std::string& /*path*/) {}
};

class Trainer {
 public:
  // Every rank passes the same settings and training data: the whole set, each rank its
  // block of it (read_dataset with RowBlock{rank, size, 0}), whose rows then travel to the
  // ranks whose shards need them every step, or a streamed set (read_dataset_streamed),
  // whose rows each rank reads from the file as its shards need them. Checks that all ranks agree on the model
  // layout and settings, then takes rank 0's initial parameters.
  Trainer(const Settings& settings, Communicator& comm, const Dataset& train);
  ~Trainer();

  // Trains from the current state until the settings' epochs, max_steps or stop_at_step,
  // or until early stopping says so, evaluating `test` (if any) after every epoch, and
  // after every whole epoch validating on `val` (--val) or on the rows --val-fraction holds
  // out: the best --monitor value is kept in the state, its model written as best.h5 by a
  // checkpointer that writes. With a checkpointer, writes checkpoints as
  // its cadence says, and at the end the final one (unless the newest is of this step
  // already) and the --save file.
  // A stop requested on any rank (request_stop, stop.hpp) is agreed on by every rank after
  // the step it arrives in: run() then ends there, without evaluating, writes the checkpoint
  // of that step (with a checkpointer that writes) but no --save file, and
  // stopped_by_signal() names the signal.
  void run(const Dataset* test, TrainObserver& observer, Checkpointer* checkpointer = nullptr,
           const Dataset* val = nullptr);
  // One optimizer step on the global minibatch `global_batch` (sample indices). Given the
  // next step's batch, this rank's rows of it are gathered into the other half of a double
  // buffer while the gradient reductions run; it must be passed unchanged to the next call.
  // If the loss or a layer's mean gradient is NaN or Inf, every rank throws
  // CollectiveFailure naming the step and layer, and the parameters are left unchanged.
  MinibatchStats step(std::span<const std::uint32_t> global_batch,
                      std::span<const std::uint32_t> next_batch = {});
  // Loss and accuracy over a whole data set, each rank evaluating its slice.
  EvalStats evaluate(const Dataset& data);
  // Loss and accuracy over rows of the training set (sample indices), in passes of
  // --eval-batch rows sharded as minibatches are (collective when the set is partitioned).
  EvalStats evaluate_rows(std::span<const std::uint32_t> rows);

  // A snapshot of the run on this rank, and its inverse (no communication: every rank
  // restores the same checkpoint, whose model and optimizer must match).
  Checkpoint checkpoint() const;
  void restore(const Checkpoint& c);

  std::size_t batches_per_epoch() const;
  // The samples an epoch trains on: the training set's, less those --val-fraction holds out.
  std::size_t training_samples() const;
  // The training set's rows --val-fraction holds out for validation (increasing), or none.
  std::span<const std::uint32_t> held_out() const { return held_out_; }
  // Whether early stopping ended the run: --early-stop-patience epochs without a better
  // validation.
  bool stopped_early() const;
  // The optimizer steps of the whole run (epochs and max_steps).
  std::uint64_t total_steps() const;
  // The learning rate of optimizer step `step` (0-based) under the configured schedule.
  double learning_rate(std::uint64_t step) const;
  const ModelSpec& spec() const { return mlp_.spec(); }
  const Layout& layout() const { return mlp_.layout(); }
  std::span<float> params() { return params_; }
  std::span<const float> params() const { return params_; }
  const Optimizer& optimizer() const { return optimizer_; }
  const TrainState& state() const { return state_; }
  const Settings& settings() const { return settings_; }
  const Dataset& train_data() const { return train_; }
  // Time spent in step(), summed since construction or the last reset.
  const StepTimes& step_times() const { return times_; }
  void reset_step_times() { times_ = {}; }
  // Whether run() has steps left to take.
  bool steps_left() const;
  // Whether the ranks reduce through the node's shared memory (the node reducers), each
  // updating its share of one shared copy of the parameters, rather than through MPI.
  bool reduces_in_node_memory() const { return own_params_.empty(); }
  // The signal that stopped run() early (agreed by every rank), or 0.
  int stopped_by_signal() const { return stopped_by_; }

 private:
  [[noreturn]] void diverged(std::uint64_t step, const MinibatchStats& stats) const;
  // This rank's rows of the global batch `batch` into x and y (collective when the
  // training set is partitioned): its shard, or with `micros` micro-batches its part of
  // each (micro_shard), one after the other.
  void gather_shard(std::span<const std::uint32_t> batch, float* x, float* y,
                    std::size_t micros = 1);
  // Calls each(part) for this rank's part of each of `micros` micro-batches of `batch`
  // (micro_shard), in order: the rows gather_shard copies.
  void for_own_parts(std::span<const std::uint32_t> batch, std::size_t micros,
                     FunctionRef<std::span<const std::uint32_t>> each) const;
  void check_agreement();
  void after_step(bool epoch_ended, TrainObserver& observer, Checkpointer* checkpointer);
  // After a whole epoch: validates, and keeps the best --monitor value (and its model).
  void validate(const Dataset* val, EpochStats& stats, TrainObserver& observer,
                Checkpointer* checkpointer);
  // Whether any rank was asked to stop (collective with several ranks).
  void agree_on_stop();

  Settings settings_;
  Communicator& comm_;
  const Dataset& train_;
  std::unique_ptr<RowExchange> exchange_;  // when each rank holds a block of the set
  Mlp<float> mlp_;
  std::unique_ptr<GradReducer<float>> reducer_;
  AlignedVector<float> own_params_;  // unless the reducer's shared storage holds them
  std::span<float> params_;
  int copy_ = 0;  // the shared storage's current copy
  AlignedVector<float> x_[2], y_[2];  // this step's rows and the next one's
  int current_ = 0;
  std::span<const std::uint32_t> prefetched_;  // the batch gathered into x_[current_]
  Optimizer optimizer_;
  TrainState state_;
  std::vector<double> norm_parts_;  // global_norm's partial sums (--clip-norm)
  std::vector<std::uint32_t> kept_, held_out_;  // --val-fraction's split (else empty)
  Schedule schedule_;  // the learning rate of every step, made once (after the split)
  std::vector<std::uint32_t> order_;
  std::uint64_t order_epoch_ = UINT64_MAX;
  StepTimes times_;
  int stopped_by_ = 0;
  // A streamed training set's reader, and the thread that reads the next step's rows (last:
  // destroyed first, while the buffers it writes still exist).
  std::unique_ptr<RowStream> stream_;
  std::unique_ptr<BackgroundTask> reader_;
};

// Loss and accuracy of `params` over a whole data set, each rank evaluating its contiguous
// slice in passes of up to `eval_batch` rows (whole chunks of the model's chunk size), the
// sums reduced by `reducer` as training reduces them: in the deterministic mode the same
// bits for any ranks and threads.
EvalStats evaluate_dataset(Mlp<float>& mlp, GradReducer<float>& reducer, Communicator& comm,
                           std::span<const float> params, const Dataset& data,
                           std::size_t eval_batch);

// The rows of one pass over `rows` rows: at most `eval_batch`, a whole number of chunks
// (at least one) when `chunk` > 0.
std::size_t pass_rows(std::size_t eval_batch, std::size_t rows, std::size_t chunk);

// The oneTBB threads this process computes with: the arena's and --threads' limit.
int compute_threads();

// The --monitor value of a validation as a loss (lower is better: the validation loss, or
// the accuracy negated), as TrainState::best_metric keeps it; and a kept value as the user
// reads it.
double monitor_loss(const std::string& monitor, const EvalStats& val);
double monitored(const std::string& monitor, double best_metric);

// One JSON object (no newline) with the epoch's metrics.
std::string metrics_json(const EpochStats& stats, int ranks, int threads);

}  // namespace shardprop
