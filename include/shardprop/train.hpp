// The data-parallel training loop: shard → forward → backward → allreduce → step.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/mlp.hpp"
#include "shardprop/optimizer.hpp"

namespace shardprop {

// The gradient buffer holds the flat gradient followed by these reduced statistics, so a
// single allreduce covers all of them.
enum GradStat : std::size_t { kLossSum = 0, kCorrect = 1, kSamples = 2, kGradStats = 3 };

// Seconds spent in the parts of training steps, summed over steps.
struct StepTimes {
  double compute = 0;    // forward and backward of this rank's shard
  double allreduce = 0;  // waiting for the gradient allreduce
  double total = 0;      // whole steps (gather, compute, allreduce, checks, optimizer)
  std::uint64_t steps = 0;
};

struct MinibatchStats {
  double loss_sum = 0;
  double correct = 0;
  double samples = 0;
  int nonfinite_layer = -1;  // the first layer whose mean gradient holds NaN or Inf
};

// One rank's part of a global minibatch gradient: computes the gradient sums of this rank's
// shard (x, y; it may be empty), allreduces them with the loss sum, correct count and sample
// count, and divides by the global sample count. On return grad[0, n) is the mean gradient
// of the global minibatch on every rank. `grad` has layout.size() + kGradStats elements.
// With `overlap`, each layer's reduction starts as soon as backward has finished it, while
// the layers below still compute; without, one reduction of the whole buffer starts after
// backward. The sums are the same; on more than 2 ranks the order in which MPI adds the
// ranks' parts may differ, and so may the last bits. Adds the time of its parts to `times`
// if given, and runs before_wait(0) once every reduction has started, before waiting.
template <class T>
MinibatchStats reduce_minibatch_gradient(Mlp<T>& mlp, Communicator& comm,
                                         std::span<const T> params, ConstMatrixView<T> x,
                                         ConstMatrixView<T> y, std::span<T> grad,
                                         StepTimes* times = nullptr, LayerDone before_wait = {},
                                         bool overlap = true);

// Deterministic mode (docs/reproducibility.md): gradients and statistics that do not depend
// on the number of ranks or threads or on the reduction order. Every global minibatch is cut
// into chunks of a fixed number of rows, each computed by the same kernel calls wherever it
// runs, and the chunks' sums are added as integers, rounded to a fixed point that every rank
// agrees on.

// The exponent s such that `terms` values of magnitude at most `bound` (give or take float
// rounding), each added as round(v·2^s), cannot overflow an int64 in any order:
// bound·2^s < 2^(61 − ⌈log2 terms⌉). 0 when bound is 0; at most 960, so 2^±s stays finite.
int fixed_point_exponent(double bound, std::size_t terms);

// The sum over all ranks of `values`, this rank's share of `terms` values in all, added in
// fixed point: the same bits in any order. +inf if a value is not finite.
double exact_sum(Communicator& comm, std::span<const double> values, std::size_t terms);

// A rank's part of the global rows [0, rows) when chunks of `chunk` rows (0: none, plain
// shards) are dealt out in contiguous runs, so that shard edges fall on chunk edges.
Range chunked_shard(std::size_t rows, std::size_t chunk, int rank, int size);

// Workspace of reduce_minibatch_gradient_deterministic; sized on first use.
struct DeterministicBuffers {
  std::vector<std::int64_t> sums;  // fixed-point gradient and statistics
  FixedScratch scratch;            // each thread's chunk products
  std::vector<int> exponents;      // each layer's W and b exponents
};

// reduce_minibatch_gradient's deterministic form. x and y are this rank's rows of a global
// minibatch of `global_rows` rows, starting on a chunk edge (chunked_shard). Each chunk's
// gradient sums are rounded to multiples of 2^−s, with s per tensor from the largest bound
// over all chunks (one small MPI_MAX per layer), and added as int64, on the rank and in the
// allreduce. The mean gradient in grad[0, n), and the returned loss and counts, are then the
// same bits for any number of ranks and threads.
MinibatchStats reduce_minibatch_gradient_deterministic(
    Mlp<float>& mlp, Communicator& comm, std::span<const float> params, ConstMatrixView<float> x,
    ConstMatrixView<float> y, std::size_t chunk, std::size_t global_rows,
    DeterministicBuffers& buffers, std::span<float> grad, StepTimes* times = nullptr,
    LayerDone before_wait = {});

struct TrainConfig {
  std::size_t batch = 256;         // global minibatch
  std::size_t epochs = 10;
  std::int64_t max_steps = -1;     // stop after this many steps in all (-1: no limit)
  // Ends this invocation once the global step reaches it (-1: never), without changing the
  // run: epochs, max_steps and the schedule stay as they are, so a resume continues exactly.
  std::int64_t stop_at_step = -1;
  std::uint64_t seed = 1;
  std::size_t eval_batch = 1024;   // rows per forward pass when evaluating
  OptimizerConfig optimizer;       // optimizer.lr is the base learning rate
  bool cosine_schedule = false;    // lr·½(1 + cos(π·step/total steps)) instead of constant lr
  // Reduce each layer's gradient while backward goes on (true), or the whole gradient at
  // once after it (false, for measuring what the overlap saves).
  bool overlap = true;
  // Rows per chunk of the deterministic mode; 0 is the default mode.
  std::size_t deterministic_chunk = 0;
};

// Where training stands: enough, with the parameters and optimizer state, to continue.
struct TrainState {
  std::uint64_t step = 0;            // optimizer steps taken
  std::uint64_t epoch = 0;           // current epoch, from 0
  std::uint64_t batch_in_epoch = 0;  // next global minibatch within that epoch
};

struct EvalStats {
  double loss = 0, accuracy = 0;
  std::size_t samples = 0;
};

struct EpochStats {
  std::uint64_t epoch = 0;  // 1-based, as printed
  std::uint64_t step = 0;
  EvalStats train;          // running mean over the epoch's minibatches
  bool has_test = false;
  EvalStats test;
  double samples_per_s = 0, seconds = 0;
};

class Trainer;

// Receives what the trainer does; every rank calls it, printing is up to the observer.
class TrainObserver {
 public:
  virtual ~TrainObserver() = default;
  virtual void on_progress(std::uint64_t /*epoch*/, std::uint64_t /*batch*/,
                           std::uint64_t /*batches*/, double /*running_loss*/) {}
  virtual void on_epoch(const EpochStats& /*stats*/) {}
  // After every optimizer step, with the trainer's state already advanced (after on_epoch
  // when the step ended an epoch). Every rank calls it at the same point, so it may run
  // collectives, such as writing a checkpoint.
  virtual void on_state(const Trainer& /*trainer*/, bool /*epoch_ended*/) {}
};

class Trainer {
 public:
  // Every rank passes the same spec, config and training data. Checks that all ranks agree
  // on the model layout and configuration, then takes rank 0's initial parameters.
  Trainer(ModelSpec spec, TrainConfig config, Communicator& comm, const Dataset& train);

  // Trains from the current state until config.epochs, config.max_steps or
  // config.stop_at_step.
  void run(const Dataset* test, TrainObserver& observer);
  // One optimizer step on the global minibatch `global_batch` (sample indices). Given the
  // next step's batch, this rank's rows of it are gathered into the other half of a double
  // buffer while the gradient reductions run; it must be passed unchanged to the next call.
  // If the loss or a layer's mean gradient is NaN or Inf, every rank throws
  // CollectiveFailure naming the step and layer, and the parameters are left unchanged.
  MinibatchStats step(std::span<const std::uint32_t> global_batch,
                      std::span<const std::uint32_t> next_batch = {});
  // Loss and accuracy over a whole data set, each rank evaluating its slice.
  EvalStats evaluate(const Dataset& data);

  std::size_t batches_per_epoch() const;
  // The learning rate of optimizer step `step` (0-based) under the configured schedule.
  double learning_rate(std::uint64_t step) const;
  const ModelSpec& spec() const { return mlp_.spec(); }
  const Layout& layout() const { return mlp_.layout(); }
  std::span<float> params() { return params_; }
  std::span<const float> params() const { return params_; }
  Optimizer& optimizer() { return optimizer_; }
  TrainState& state() { return state_; }
  const Optimizer& optimizer() const { return optimizer_; }
  const TrainState& state() const { return state_; }
  const TrainConfig& config() const { return config_; }
  TrainConfig& config() { return config_; }
  const Dataset& train_data() const { return train_; }
  // Time spent in step(), summed since construction or the last reset.
  const StepTimes& step_times() const { return times_; }
  void reset_step_times() { times_ = {}; }
  // Whether run() has steps left to take.
  bool steps_left() const;

 private:
  [[noreturn]] void diverged(std::uint64_t step, const MinibatchStats& stats) const;
  void check_agreement();
  std::size_t spec_output() const;

  TrainConfig config_;
  Communicator& comm_;
  const Dataset& train_;
  Mlp<float> mlp_;
  AlignedVector<float> params_, grad_;
  DeterministicBuffers deterministic_;
  AlignedVector<float> x_[2], y_[2];  // this step's rows and the next one's
  int current_ = 0;
  std::span<const std::uint32_t> prefetched_;  // the batch gathered into x_[current_]
  Optimizer optimizer_;
  TrainState state_;
  std::vector<std::uint32_t> order_;
  std::uint64_t order_epoch_ = UINT64_MAX;
  StepTimes times_;
};

// Loss and accuracy of `params` over a whole data set, each rank evaluating its contiguous
// slice in passes of `eval_batch` rows; every rank gets the totals. With `chunk` > 0 the
// deterministic mode's: the data set's chunks are dealt out as in training and the chunks'
// losses added in fixed point, so the totals are the same bits for any ranks and threads.
EvalStats evaluate_dataset(Mlp<float>& mlp, Communicator& comm, std::span<const float> params,
                           const Dataset& data, std::size_t eval_batch, std::size_t chunk = 0);

// One JSON object (no newline) with the epoch's metrics.
std::string metrics_json(const EpochStats& stats, int ranks, int threads);

}  // namespace shardprop
