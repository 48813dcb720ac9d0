#include "shardprop/train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>

#include "exchange.hpp"
#include "stream.hpp"
#include "shardprop/error.hpp"
#include "shardprop/rng.hpp"
#include "shardprop/stop.hpp"

namespace shardprop {

namespace {
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// The flags whose values may differ between ranks: where each rank reads and writes, and
// how it prints and counts its threads. Every other setting must agree.
bool may_differ_between_ranks(std::string_view flag) {
  for (std::string_view f : {"--train", "--test", "--checkpoint-dir", "--save", "--metrics",
                             "--resume", "--threads", "--progress"}) {
    if (f == flag) return true;
  }
  return false;
}
}  // namespace

int compute_threads() {
  using oneapi::tbb::global_control;
  return int(std::max<std::size_t>(
      1, std::min<std::size_t>(std::size_t(oneapi::tbb::this_task_arena::max_concurrency()),
                               global_control::active_value(
                                   global_control::max_allowed_parallelism))));
}

namespace {

// The model of a run, its matrix products set up as the settings say (--gemm, --precision).
Mlp<float> training_model(const Settings& s) {
  select_gemm(s.gemm);
  return Mlp<float>(parse_model(s.layers, s.loss), s.deterministic_chunk(),
                    parse_precision(s.precision));
}

// The reducer of a run (--deterministic, --reduction, --overlap). The node reducer also
// holds the parameters and the optimizer's state, one copy for the node's ranks.
std::unique_ptr<GradReducer<float>> training_reducer(const Settings& s, const Layout& layout,
                                                     Communicator& comm) {
  const bool node = s.reduction == "node" || (s.reduction == "auto" && comm.size() > 1);
  const std::size_t chunk = s.deterministic_chunk();
  if (node) {
    const std::size_t n = layout.size();
    std::string why;
    auto reducer = make_node_reducer<float>(
        layout, comm, n + Optimizer::state_size(parse_optimizer(s.optimizer), n), why, chunk);
    if (reducer) return reducer;
    SP_CHECK_USAGE(s.reduction != "node", "--reduction node: ", why);
  }
  return make_reducer<float>(layout, comm, chunk, s.overlap != "off");
}

// The parts of a copy of the node reducer's shared storage: the parameters (the first
// `params` values) or the optimizer's state (the rest); empty without shared storage.
std::span<float> shared_params(GradReducer<float>& reducer, int copy, std::size_t params) {
  const std::span<float> storage = reducer.shared_storage(copy);
  return storage.empty() ? storage : storage.first(params);
}
std::span<float> shared_state(GradReducer<float>& reducer, int copy, std::size_t params) {
  const std::span<float> storage = reducer.shared_storage(copy);
  return storage.empty() ? storage : storage.subspan(params);
}

// The node reducer's update of a share: the step's optimizer update from the current copy
// of the parameters and state into the other one.
class IntoOtherCopy final : public ShareUpdate<float> {
 public:
  IntoOtherCopy(const Optimizer& optimizer, std::span<const float> params,
                std::span<float> params_out, std::span<float> state_out)
      : optimizer_(optimizer), params_(params), params_out_(params_out), state_out_(state_out) {}
  bool operator()(std::span<const float* const> sums, float scale, Range part) override {
    return optimizer_.update_share(sums, scale, params_, params_out_, state_out_, part.begin,
                                   part.end);
  }

 private:
  const Optimizer& optimizer_;
  std::span<const float> params_;
  std::span<float> params_out_, state_out_;
};

}  // namespace

Trainer::Trainer(const Settings& settings, Communicator& comm, const Dataset& train)
    : settings_(settings),
      comm_(comm),
      train_(train),
      mlp_(training_model(settings)),
      reducer_(training_reducer(settings, mlp_.layout(), comm)),
      params_(shared_params(*reducer_, 0, mlp_.layout().size())),
      optimizer_(optimizer_config(settings), mlp_.layout().size(),
                 shared_state(*reducer_, 0, mlp_.layout().size())) {
  SP_CHECK_USAGE(settings_.batch >= std::size_t(comm_.size()), "--batch ", settings_.batch,
                 " is smaller than the number of ranks (", comm_.size(), ")");
  check_agreement();
  if (settings_.val_fraction > 0) {
    // One permutation of every row, fixed by the seed alone (the epoch number no epoch
    // reaches): its first rows are held out, the rest trained on, each kept in file order.
    const std::size_t n = train_.global_rows();
    const auto held = std::size_t(std::llround(double(n) * settings_.val_fraction));
    SP_CHECK_USAGE(held >= 1 && held < n, "--val-fraction ", settings_.val_fraction,
                   " of the training set's ", n, " samples holds out ", held,
                   ": it must leave at least one to validate and one to train on");
    std::vector<std::uint32_t> split;
    epoch_permutation(n, settings_.seed, UINT64_MAX, split);
    held_out_.assign(split.begin(), split.begin() + std::ptrdiff_t(held));
    kept_.assign(split.begin() + std::ptrdiff_t(held), split.end());
    std::sort(held_out_.begin(), held_out_.end());
    std::sort(kept_.begin(), kept_.end());
  }
  SP_CHECK_USAGE(settings_.batch <= training_samples(), "--batch ", settings_.batch,
                 " is larger than the training set (", training_samples(), " samples",
                 kept_.empty() ? "" : " after --val-fraction", ")");
  schedule_ = Schedule(settings_, total_steps(), batches_per_epoch());
  if (train_.partitioned()) {
    SP_CHECK_USAGE(train_.rows > 0, "the training set's ", train_.global_rows(),
                   " samples are fewer than the ", comm_.size(),
                   " ranks: use --data-placement replicated");
    // A step's rows go through node memory when the ranks share a node; validation passes
    // (--eval-batch rows per rank) may be larger and go through MPI. A rank alone holds
    // every row and gathers them as a replicated set.
    if (comm_.size() > 1) {
      exchange_ = std::make_unique<RowExchange>(comm_, train_, spec().output_width(),
                                                mlp_.chunk(), settings_.batch);
    }
  }
  if (train_.streamed) {
    stream_ = std::make_unique<RowStream>(train_, settings_.read_cache << 20);
    // HDF5 built without thread safety reads in the step instead.
    if (hdf5_threadsafe()) reader_ = std::make_unique<BackgroundTask>();
  }
  if (settings_.clip_norm > 0) norm_parts_.resize(norm_parts(mlp_.layout().size()));
  if (params_.empty()) {
    own_params_.assign(mlp_.layout().size(), 0.0f);
    params_ = own_params_;
  }
  // Other cores read what an update writes: this rank's other threads, or the other ranks
  // of the node when they share one copy of the parameters.
  optimizer_.set_shared_readers(compute_threads() > 1 ||
                                (own_params_.empty() && comm_.size() > 1));
  // The most rows any rank's shard can hold (its parts of every micro-batch), and the most
  // any one pass of forward and backward takes (a micro-batch's part).
  std::size_t shard_rows = 0, pass_rows = 0;
  const std::size_t micros = settings_.accumulate;
  for (int r = 0; r < comm_.size(); ++r) {
    shard_rows = std::max(shard_rows, micro_shard_rows(settings_.batch, micros, r, comm_.size(),
                                                       mlp_.chunk()));
    for (std::size_t m = 0; m < micros; ++m) {
      pass_rows = std::max(pass_rows, micro_shard(settings_.batch, m, micros, r, comm_.size(),
                                                  mlp_.chunk()).size());
    }
  }
  for (int b = 0; b < 2; ++b) {
    x_[b].resize(shard_rows * train_.cols);
    y_[b].resize(shard_rows * spec().output_width());
  }
  // The training step's buffers; an evaluation sizes its forward buffers when it first runs.
  mlp_.reserve(pass_rows);
  if (comm_.rank() == 0) init_params<float>(spec(), layout(), settings_.seed, params_);
  if (own_params_.size() > 0) {
    comm_.broadcast(params_, 0);
  } else {
    reducer_->shared_written();  // rank 0 wrote the node's one copy
  }
}

Trainer::~Trainer() = default;

void Trainer::gather_shard(std::span<const std::uint32_t> batch, float* x, float* y,
                           std::size_t micros) {
  if (exchange_) return exchange_->gather(batch, x, y, micros);
  const std::size_t k = spec().output_width();
  for_own_parts(batch, micros, [&](std::span<const std::uint32_t> mine) {
    if (stream_) {
      stream_->gather(mine, k, x, y);
    } else {
      gather(train_, mine, k, x, y);
    }
    x += mine.size() * train_.cols;
    y += mine.size() * k;
  });
}

void Trainer::for_own_parts(std::span<const std::uint32_t> batch, std::size_t micros,
                            FunctionRef<std::span<const std::uint32_t>> each) const {
  for (std::size_t m = 0; m < micros; ++m) {
    const Range part =
        micro_shard(batch.size(), m, micros, comm_.rank(), comm_.size(), mlp_.chunk());
    each(batch.subspan(part.begin, part.size()));
  }
}

void Trainer::check_agreement() {
  // Every rank must build the same model and walk the same sample order; compare a hash.
  std::uint64_t h = 0;
  for (const SettingSpec& s : settings_table()) {
    if (may_differ_between_ranks(s.flag)) continue;
    h = mix64(h ^ std::hash<std::string>{}(format_setting(s, settings_)));
  }
  for (std::uint64_t v : {std::uint64_t(layout().size()), std::uint64_t(train_.global_rows()),
                          std::uint64_t(train_.cols), std::uint64_t(train_.partitioned())}) {
    h = mix64(h ^ v);
  }
  // Both reductions on every rank: a rank that already sees a difference must still take
  // part in the second.
  const auto mine = std::int64_t(h >> 2);
  const std::int64_t largest = comm_.allreduce_max(mine);
  const std::int64_t smallest = -comm_.allreduce_max(-mine);
  const bool same = largest == mine && smallest == mine;
  SP_CHECK(same, "ranks disagree on the model layout, settings or training data");
}

std::size_t Trainer::training_samples() const {
  return kept_.empty() ? train_.global_rows() : kept_.size();
}

std::size_t Trainer::batches_per_epoch() const {
  return (training_samples() + settings_.batch - 1) / settings_.batch;
}

std::uint64_t Trainer::total_steps() const {
  std::uint64_t total = settings_.epochs * batches_per_epoch();
  if (settings_.max_steps >= 0) total = std::min(total, std::uint64_t(settings_.max_steps));
  return total;
}

double Trainer::learning_rate(std::uint64_t step) const {
  return schedule_.lr(step);
}

void Trainer::diverged(std::uint64_t step, const MinibatchStats& stats) const {
  // The statistics are reduced, so every rank sees the same values and stops here
  // together; rank 0 reports. The parameters are still those of the previous step.
  std::string where;
  if (stats.nonfinite_layer >= 0) {
    const LayerSpec& layer = spec().layers[std::size_t(stats.nonfinite_layer)];
    where = detail::concat("non-finite gradient in layer ", stats.nonfinite_layer + 1, " of ",
                           spec().layers.size(), " (", layer.in, "->", layer.out, " ",
                           to_string(layer.activation), ")");
  } else {
    where = "every gradient is finite";
  }
  const double loss = stats.loss_sum / stats.samples;
  throw CollectiveFailure(detail::concat("training diverged at step ", step, ": loss is ",
                                         std::isnan(loss) ? std::string("NaN")
                                                          : detail::concat(loss),
                                         ", ", where, "; try a smaller --lr"),
                          comm_.rank() == 0);
}

MinibatchStats Trainer::step(std::span<const std::uint32_t> global_batch,
                             std::span<const std::uint32_t> next_batch) {
  const auto start = Clock::now();
  const std::size_t k = spec().output_width(), chunk = mlp_.chunk();
  const std::size_t micros = settings_.accumulate;
  const int now = current_;
  const bool ready = prefetched_.data() == global_batch.data() &&
                     prefetched_.size() == global_batch.size() && !global_batch.empty();
  if (!ready) gather_shard(global_batch, x_[now].data(), y_[now].data(), micros);
  // Partitioned: the next step's rows travel while this one computes (backward's progress
  // calls advance them), and arrive where the others are gathered.
  const bool exchanging = exchange_ && !next_batch.empty();
  if (exchanging) exchange_->start(next_batch, micros);
  const auto prefetch = [&] {
    if (exchanging) {
      return exchange_->finish(next_batch, x_[1 - now].data(), y_[1 - now].data(), micros);
    }
    gather_shard(next_batch, x_[1 - now].data(), y_[1 - now].data(), micros);
  };
  // Streamed: the next step's rows are read while this one computes, and waited for where
  // the others gather them.
  const bool in_background = reader_ && !next_batch.empty();
  if (in_background) {
    reader_->start([this, next_batch, next = 1 - now, micros] {
      gather_shard(next_batch, x_[next].data(), y_[next].data(), micros);
    });
  }
  if (!next_batch.empty() && !exchange_ && !stream_) {
    // The next step's rows start coming from memory now, to be in the cache when they are
    // copied after backward (small model, one thread: 170-174k samples/s against 163-168k
    // in four alternating pairs; two threads the same either way).
    for_own_parts(next_batch, micros,
                  [&](std::span<const std::uint32_t> mine) { prefetch_rows(train_, mine); });
  }
  const auto wait_for_reader = [&] { reader_->wait(); };
  prefetched_ = {};
  // Every collective from here until the next step (the checkpoint of this step included)
  // names the step if it fails.
  comm_.set_phase("step", state_.step + 1);
  reducer_->begin(
      micro_shard_rows(global_batch.size(), micros, comm_.rank(), comm_.size(), chunk),
      global_batch.size());
  // Forward and backward over each micro-batch's part (the whole shard without
  // accumulation); their sums add up in the reducer, which reduces after the last.
  const auto pass = [&](std::size_t m, std::size_t offset) {
    const Range part =
        micro_shard(global_batch.size(), m, micros, comm_.rank(), comm_.size(), chunk);
    const auto rows = Eigen::Index(part.size());
    // Dropout masks follow the step and each row's sample, whichever rank computes it.
    const DropoutKeys keys{settings_.seed, state_.step, global_batch.data() + part.begin};
    mlp_.forward_backward(
        params_,
        ConstMatrixView<float>(x_[now].data() + offset * train_.cols, rows, Eigen::Index(train_.cols)),
        ConstMatrixView<float>(y_[now].data() + offset * k, rows, Eigen::Index(k)), *reducer_,
        spec().has_dropout() ? &keys : nullptr);
    return part.size();
  };
  for (int measure = micros > 1 && reducer_->needs_bounds() ? 1 : 0; measure >= 0; --measure) {
    std::size_t offset = 0;
    for (std::size_t m = 0; m < micros; ++m) {
      reducer_->micro(m, micros, measure == 1);
      offset += pass(m, offset);
    }
  }
  optimizer_.set_lr(learning_rate(state_.step));
  const Callback before_wait = next_batch.empty() ? Callback()
                               : in_background    ? Callback(wait_for_reader)
                                                  : Callback(prefetch);
  const std::uint64_t step = state_.step + 1;
  const auto check = [&](const MinibatchStats& stats) {
    if (!next_batch.empty()) {
      prefetched_ = next_batch;
      current_ = 1 - now;
    }
    if (stats.nonfinite_layer >= 0 || !std::isfinite(stats.loss_sum)) diverged(step, stats);
  };
  MinibatchStats stats;
  // Clipping needs the whole gradient's norm before any update: the node reducer then
  // writes the mean gradient instead of updating its share in the same pass.
  const bool clipping = settings_.clip_norm > 0;
  if (reducer_->fuses_update() && !clipping) {
    // The node's ranks update their shares into the other copy, which becomes the current
    // one unless the step diverged.
    const std::size_t n = layout().size();
    const int next = 1 - copy_;
    IntoOtherCopy update(optimizer_, params_, shared_params(*reducer_, next, n),
                         shared_state(*reducer_, next, n));
    stats = reducer_->finish(before_wait, &times_, &update);
    check(stats);
    copy_ = next;
    params_ = shared_params(*reducer_, next, n);
    optimizer_.adopt(shared_state(*reducer_, next, n));
  } else {
    // Every parameter, or this rank's share of the node's one copy.
    stats = reducer_->finish(before_wait, &times_);
    check(stats);
    float scale = 1;
    if (clipping) {
      // Every rank has the same mean gradient and sums its norm in the same order.
      reducer_->whole_gradient();
      stats.grad_norm = global_norm(reducer_->gradient(), norm_parts_);
      stats.clipped = stats.grad_norm > settings_.clip_norm;
      if (stats.clipped) scale = float(settings_.clip_norm / stats.grad_norm);
    }
    optimizer_.set_grad_scale(scale);
    optimizer_.step(params_, reducer_->gradient(), [&](Optimizer::Update update) {
      reducer_->share_runs(update);
    });
    reducer_->shared_written();
  }
  state_.step = step;
  times_.total += seconds_since(start);
  ++times_.steps;
  return stats;
}

std::size_t pass_rows(std::size_t eval_batch, std::size_t rows, std::size_t chunk) {
  const std::size_t unit = std::max<std::size_t>(chunk, 1);
  return std::max(unit, std::min(eval_batch, rows) / unit * unit);
}

EvalStats evaluate_dataset(Mlp<float>& mlp, GradReducer<float>& reducer, Communicator& comm,
                           std::span<const float> params, const Dataset& data,
                           std::size_t eval_batch) {
  const std::size_t k = mlp.spec().output_width(), chunk = mlp.chunk();
  const Range mine = shard_range(data.global_rows(), comm.rank(), comm.size(), chunk);
  SP_CHECK(!data.partitioned() || (mine.begin == data.first && mine.size() == data.rows),
           "this rank holds rows [", data.first, ", ", data.first + data.rows,
           ") of the evaluation set, but evaluates [", mine.begin, ", ", mine.end, ")");
  const std::size_t pass = pass_rows(eval_batch, std::max<std::size_t>(mine.size(), 1), chunk);
  AlignedVector<float> x(pass * data.cols), y(pass * k);
  std::vector<std::uint32_t> indices;
  std::vector<LossSums> parts;
  for (std::size_t begin = mine.begin; begin < mine.end; begin += pass) {
    const std::size_t end = std::min(mine.end, begin + pass);
    indices.resize(end - begin);
    std::iota(indices.begin(), indices.end(), std::uint32_t(begin));
    gather(data, indices, k, x.data(), y.data());
    const auto rows = Eigen::Index(indices.size());
    const auto sums = mlp.losses(params, ConstMatrixView<float>(x.data(), rows, Eigen::Index(data.cols)),
                                 ConstMatrixView<float>(y.data(), rows, Eigen::Index(k)));
    parts.insert(parts.end(), sums.begin(), sums.end());
  }
  return reducer.reduce_losses(parts, mine.size(), chunk_count(data.global_rows(), chunk));
}

EvalStats Trainer::evaluate(const Dataset& data) {
  comm_.set_phase("evaluation after step", state_.step);
  const EvalStats stats =
      evaluate_dataset(mlp_, *reducer_, comm_, params_, data, settings_.eval_batch);
  comm_.set_phase("step", state_.step);
  return stats;
}

EvalStats Trainer::evaluate_rows(std::span<const std::uint32_t> rows) {
  comm_.set_phase("validation after step", state_.step);
  const std::size_t k = spec().output_width(), chunk = mlp_.chunk();
  const auto ranks = std::size_t(comm_.size());
  // Global passes of --eval-batch rows per rank, whole chunks, sharded as minibatches are:
  // the chunks are those of the row sequence for any number of ranks.
  const std::size_t pass = pass_rows(settings_.eval_batch * ranks, rows.size(), chunk);
  std::size_t most = 0;
  for (std::size_t r = 0; r < ranks; ++r) {
    most = std::max(most, shard_range(std::min(pass, rows.size()), int(r), int(ranks), chunk).size());
  }
  AlignedVector<float> x(std::max<std::size_t>(most, 1) * train_.cols),
      y(std::max<std::size_t>(most, 1) * k);
  std::vector<LossSums> parts;
  std::size_t mine = 0;
  for (std::size_t begin = 0; begin < rows.size(); begin += pass) {
    const auto batch = rows.subspan(begin, std::min(pass, rows.size() - begin));
    const Range shard = shard_range(batch.size(), comm_.rank(), comm_.size(), chunk);
    gather_shard(batch, x.data(), y.data());
    const auto n = Eigen::Index(shard.size());
    const auto sums = mlp_.losses(params_, ConstMatrixView<float>(x.data(), n, Eigen::Index(train_.cols)),
                                  ConstMatrixView<float>(y.data(), n, Eigen::Index(k)));
    parts.insert(parts.end(), sums.begin(), sums.end());
    mine += shard.size();
  }
  const EvalStats stats = reducer_->reduce_losses(parts, mine, chunk_count(rows.size(), chunk));
  comm_.set_phase("step", state_.step);
  return stats;
}

Checkpoint Trainer::checkpoint() const {
  Checkpoint c;
  c.spec = spec();
  c.settings = settings_;
  c.state = state_;
  c.params.assign(params_.begin(), params_.end());
  c.optimizer_steps = optimizer_.steps();
  c.optimizer_state.assign(optimizer_.state().begin(), optimizer_.state().end());
  c.train_rows = train_.global_rows();
  c.train_cols = train_.cols;
  c.world_size = comm_.size();
  c.threads = compute_threads();
  c.has_training_state = true;
  c.checksum = checkpoint_checksum(c);
  return c;
}

void Trainer::restore(const Checkpoint& c) {
  SP_CHECK(c.has_training_state, "the checkpoint holds a model without training state");
  SP_CHECK(c.spec.layers_string() == spec().layers_string() && c.spec.loss == spec().loss,
           "checkpoint model ", c.spec.layers_string(), " does not match the trainer's ",
           spec().layers_string());
  SP_CHECK(c.settings.optimizer == settings_.optimizer &&
               c.optimizer_state.size() == optimizer_.state().size(),
           "checkpoint optimizer ", c.settings.optimizer, " does not match the trainer's ",
           settings_.optimizer);
  SP_CHECK(c.train_rows == train_.global_rows() && c.train_cols == train_.cols, "the training set has ",
           train_.global_rows(), " samples of ", train_.cols, " features, but the checkpoint was trained "
           "on ", c.train_rows, " of ", c.train_cols, " (the sample order depends on it)");
  // Each rank writes its share of the current copy (all of it unless the node's ranks share
  // one).
  const Range share = reducer_->share();
  std::copy(c.params.begin() + std::ptrdiff_t(share.begin),
            c.params.begin() + std::ptrdiff_t(share.end), params_.begin() + std::ptrdiff_t(share.begin));
  optimizer_.restore(c.optimizer_state, c.optimizer_steps, share.begin, share.end);
  reducer_->shared_written();
  state_ = c.state;
}

bool Trainer::steps_left() const {
  const auto below = [&](std::int64_t limit) {
    return limit < 0 || state_.step < std::uint64_t(limit);
  };
  return stopped_by_ == 0 && !stopped_early() && state_.epoch < settings_.epochs &&
         below(settings_.max_steps) && below(settings_.stop_at_step);
}

bool Trainer::stopped_early() const {
  return settings_.early_stop_patience > 0 &&
         state_.epochs_without_improvement >= settings_.early_stop_patience;
}

void Trainer::validate(const Dataset* val, EpochStats& stats, TrainObserver& observer,
                       Checkpointer* checkpointer) {
  if (!val && held_out_.empty()) return;
  stats.has_val = true;
  stats.val = val ? evaluate(*val) : evaluate_rows(held_out_);
  const double metric = monitor_loss(settings_.monitor, stats.val);
  stats.best = state_.best_epoch == 0 || metric < state_.best_metric;
  if (!stats.best) {
    ++state_.epochs_without_improvement;
    return;
  }
  state_.best_metric = metric;
  state_.best_epoch = state_.epoch;
  state_.epochs_without_improvement = 0;
  if (checkpointer && checkpointer->writing()) {
    observer.on_best(checkpointer->write_best(checkpoint()));
  }
}

void Trainer::agree_on_stop() {
  const auto mine = std::int64_t(stop_signal());
  stopped_by_ = int(comm_.size() > 1 ? comm_.allreduce_max(mine) : mine);
}

void Trainer::after_step(bool epoch_ended, TrainObserver& observer, Checkpointer* checkpointer) {
  if (checkpointer && checkpointer->due(state_, epoch_ended)) {
    observer.on_checkpoint(checkpointer->write(checkpoint()));
  }
}

void Trainer::run(const Dataset* test, TrainObserver& observer, Checkpointer* checkpointer,
                  const Dataset* val) {
  const std::uint64_t batches = batches_per_epoch();
  const std::uint64_t total = total_steps();
  while (steps_left()) {
    if (order_epoch_ != state_.epoch) {
      epoch_permutation(training_samples(), settings_.seed, state_.epoch, order_);
      if (!kept_.empty()) {
        for (std::uint32_t& i : order_) i = kept_[i];
      }
      order_epoch_ = state_.epoch;
      prefetched_ = {};  // it pointed into the previous order
    }
    const auto start = Clock::now();
    const std::uint64_t first_step = state_.step + 1;
    double loss = 0, correct = 0, samples = 0, max_norm = 0;
    std::uint64_t clipped = 0;
    bool ended = false;
    while (!ended && steps_left()) {
      const auto batch = [&](std::uint64_t b) {
        const std::size_t begin = b * settings_.batch;
        return std::span<const std::uint32_t>(order_).subspan(
            begin, std::min(order_.size(), begin + settings_.batch) - begin);
      };
      // The next batch of this epoch is gathered during this step's reductions.
      const std::uint64_t b = state_.batch_in_epoch;
      const MinibatchStats s =
          step(batch(b), b + 1 < batches ? batch(b + 1) : std::span<const std::uint32_t>());
      loss += s.loss_sum;
      correct += s.correct;
      samples += s.samples;
      clipped += s.clipped ? 1 : 0;
      max_norm = std::max(max_norm, s.grad_norm);
      const double elapsed = seconds_since(start);
      observer.on_progress({state_.epoch + 1, settings_.epochs, b + 1, batches, state_.step, total,
                            loss / samples, optimizer_.config().lr, samples / elapsed,
                            elapsed / double(state_.step + 1 - first_step)});
      ended = ++state_.batch_in_epoch == batches;
      agree_on_stop();
      if (ended) {
        ++state_.epoch;
        state_.batch_in_epoch = 0;
      } else {
        after_step(false, observer, checkpointer);
      }
    }
    const double seconds = seconds_since(start);
    EpochStats stats;
    stats.epoch = ended ? state_.epoch : state_.epoch + 1;
    stats.epochs = settings_.epochs;
    stats.step = state_.step;
    stats.first_step = first_step;
    stats.train = {samples > 0 ? loss / samples : 0.0, samples > 0 ? correct / samples : 0.0,
                   std::size_t(samples)};
    stats.samples_per_s = seconds > 0 ? samples / seconds : 0.0;
    stats.seconds = seconds;
    stats.lr = optimizer_.config().lr;  // the rate step() set for the row's last step
    stats.clipped = clipped;
    stats.max_grad_norm = max_norm;
    if (test && stopped_by_ == 0) {  // a stopping job has no time to evaluate
      stats.has_test = true;
      stats.test = evaluate(*test);
    }
    // Patience counts whole epochs: a part of one (a stop, --max-steps) is not validated.
    if (ended && stopped_by_ == 0) validate(val, stats, observer, checkpointer);
    if (samples > 0) observer.on_epoch(stats);
    if (ended) after_step(true, observer, checkpointer);
  }
  if (!checkpointer) return;
  if (checkpointer->writing() && !checkpointer->saved(state_.step)) {
    observer.on_checkpoint(checkpointer->write(checkpoint()));
  }
  if (!settings_.save.empty() && stopped_by_ == 0) {
    const std::string saved = checkpointer->save_final(checkpoint());
    observer.on_save(comm_.rank() == 0 ? saved : std::string());
  }
}

double monitor_loss(const std::string& monitor, const EvalStats& val) {
  return monitor == "val_acc" ? -val.accuracy : val.loss;
}

double monitored(const std::string& monitor, double best_metric) {
  return monitor == "val_acc" ? -best_metric : best_metric;
}

std::string metrics_json(const EpochStats& s, int ranks, int threads) {
  const auto number = [](double v) {
    if (!std::isfinite(v)) return std::string("null");
    char text[32];
    std::snprintf(text, sizeof text, "%.9g", v);
    return std::string(text);
  };
  std::string json = "{\"epoch\":" + std::to_string(s.epoch) + ",\"step\":" + std::to_string(s.step);
  json += ",\"first_step\":" + std::to_string(s.first_step);
  json += ",\"train_loss\":" + number(s.train.loss) + ",\"train_acc\":" + number(s.train.accuracy);
  json += ",\"test_loss\":" + (s.has_test ? number(s.test.loss) : "null");
  json += ",\"test_acc\":" + (s.has_test ? number(s.test.accuracy) : "null");
  if (s.has_val) {
    json += ",\"val_loss\":" + number(s.val.loss) + ",\"val_acc\":" + number(s.val.accuracy);
    json += std::string(",\"best\":") + (s.best ? "true" : "false");
  }
  json += ",\"lr\":" + number(s.lr);
  if (s.max_grad_norm > 0) {
    json += ",\"clipped_steps\":" + std::to_string(s.clipped) +
            ",\"max_grad_norm\":" + number(s.max_grad_norm);
  }
  json += ",\"samples_per_s\":" + number(s.samples_per_s) + ",\"epoch_seconds\":" + number(s.seconds);
  json += ",\"ranks\":" + std::to_string(ranks) + ",\"threads\":" + std::to_string(threads) + "}";
  return json;
}

}  // namespace shardprop
