#include "shardprop/train.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numbers>
#include <numeric>

#include "shardprop/error.hpp"
#include "shardprop/rng.hpp"

namespace shardprop {

template <class T>
MinibatchStats reduce_minibatch_gradient(Mlp<T>& mlp, Communicator& comm,
                                         std::span<const T> params, ConstMatrixView<T> x,
                                         ConstMatrixView<T> y, std::span<T> grad,
                                         StepTimes* times, LayerDone before_wait,
                                         bool overlap) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const Layout& layout = mlp.layout();
  const std::size_t n = layout.size();
  SP_CHECK(grad.size() == n + kGradStats, "gradient buffer has ", grad.size(),
           " elements, expected ", n + kGradStats);
  // Backward writes every layer's gradient; only an empty shard leaves it to this fill.
  if (x.rows() == 0) std::fill(grad.begin(), grad.end(), T(0));
  // With overlap, each layer's gradient is reduced as soon as backward has finished it (last
  // layer first), while the layers below are still computing; then the loss and sample counts.
  const auto reduce_layer = [&](std::size_t l) {
    const auto [begin, end] = layout.layer_range(l);
    comm.start_allreduce_sum(grad.subspan(begin, end - begin));
    comm.progress();
  };
  if (x.rows() > 0) {
    // Progress calls split each dW into parts; alone there is nothing to make progress on.
    // The parts do not depend on `overlap`: Eigen's kernel may round a column differently
    // in another split, and both settings must give the same bits on 2 ranks. Without
    // overlap nothing is pending, so the calls return at once.
    const auto progress = [&](std::size_t) { comm.progress(); };
    const bool split = comm.size() > 1;
    const LossSums sums = mlp.forward_backward(params, x, y, grad.first(n),
                                               overlap ? LayerDone(reduce_layer) : LayerDone(),
                                               split ? LayerDone(progress) : LayerDone());
    grad[n + kLossSum] = T(sums.loss);
    grad[n + kCorrect] = T(sums.correct);
    grad[n + kSamples] = T(x.rows());
  }
  if (!overlap) {
    // One reduction of the whole buffer, the statistics included, after backward.
    comm.start_allreduce_sum(grad);
  } else {
    // An empty shard still takes part in every reduction, in backward's order.
    if (x.rows() == 0) {
      for (std::size_t l = layout.layer_count(); l-- > 0;) reduce_layer(l);
    }
    comm.start_allreduce_sum(grad.subspan(n, kGradStats));
  }
  const auto computed = clock::now();
  before_wait(0);  // not counted as compute or wait: the step's rest
  const auto waiting = clock::now();
  comm.wait_all();
  if (times) {
    times->compute += std::chrono::duration<double>(computed - start).count();
    times->allreduce += std::chrono::duration<double>(clock::now() - waiting).count();
  }
  MinibatchStats stats{double(grad[n + kLossSum]), double(grad[n + kCorrect]),
                       double(grad[n + kSamples])};
  SP_CHECK(stats.samples > 0, "global minibatch is empty");
  // One pass per layer divides by the sample count and notices NaN or Inf: x·0 is 0 for
  // every finite x and NaN otherwise. Eigen's sum runs in vector lanes, where a plain loop
  // would add one element at a time (a float sum may not be reordered); the order of a sum
  // of zeros cannot matter. Blocks of 4096 are scaled and probed while in L1.
  using Array = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  constexpr std::size_t kBlock = 4096;
  const T scale = T(1) / T(stats.samples);
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const auto [begin, end] = layout.layer_range(l);
    T probe = 0;
    for (std::size_t i = begin; i < end; i += kBlock) {
      Array block(grad.data() + i, Eigen::Index(std::min(kBlock, end - i)));
      block *= scale;
      probe += (block * T(0)).sum();
    }
    if (probe != T(0) && stats.nonfinite_layer < 0) stats.nonfinite_layer = int(l);
  }
  return stats;
}

template MinibatchStats reduce_minibatch_gradient<float>(Mlp<float>&, Communicator&,
                                                         std::span<const float>,
                                                         ConstMatrixView<float>,
                                                         ConstMatrixView<float>,
                                                         std::span<float>, StepTimes*, LayerDone,
                                                         bool);
template MinibatchStats reduce_minibatch_gradient<double>(Mlp<double>&, Communicator&,
                                                          std::span<const double>,
                                                          ConstMatrixView<double>,
                                                          ConstMatrixView<double>,
                                                          std::span<double>, StepTimes*, LayerDone,
                                                          bool);

Trainer::Trainer(ModelSpec spec, TrainConfig config, Communicator& comm, const Dataset& train)
    : config_(config),
      comm_(comm),
      train_(train),
      mlp_(std::move(spec)),
      optimizer_(config.optimizer, mlp_.layout().size()) {
  SP_CHECK(config_.batch >= std::size_t(comm_.size()), "--batch ", config_.batch,
           " is smaller than the number of ranks (", comm_.size(), ")");
  SP_CHECK(config_.batch <= train_.rows, "--batch ", config_.batch,
           " is larger than the training set (", train_.rows, " samples)");
  check_agreement();
  const std::size_t n = mlp_.layout().size();
  params_.assign(n, 0.0f);
  grad_.assign(n + kGradStats, 0.0f);
  std::size_t shard_rows = 0;  // the most rows any rank's shard can hold
  for (int r = 0; r < comm_.size(); ++r) {
    shard_rows = std::max(
        shard_rows, chunked_shard(config_.batch, config_.deterministic_chunk, r, comm_.size()).size());
  }
  for (int b = 0; b < 2; ++b) {
    x_[b].resize(shard_rows * train_.cols);
    y_[b].resize(shard_rows * spec_output());
  }
  mlp_.reserve(std::max(shard_rows, config_.eval_batch));
  if (comm_.rank() == 0) init_params<float>(mlp_.spec(), mlp_.layout(), config_.seed, params_);
  comm_.broadcast_values(std::span<float>(params_), 0);
}

std::size_t Trainer::spec_output() const { return mlp_.spec().output_width(); }

void Trainer::check_agreement() {
  // Every rank must build the same model and walk the same sample order; compare a hash.
  std::uint64_t h = std::hash<std::string>{}(mlp_.spec().layers_string());
  for (std::uint64_t v : {std::uint64_t(mlp_.spec().loss), std::uint64_t(mlp_.layout().size()),
                          std::uint64_t(config_.batch), config_.seed, std::uint64_t(train_.rows),
                          std::uint64_t(train_.cols)}) {
    h = mix64(h ^ v);
  }
  const auto mine = std::int64_t(h >> 2);
  const bool same = comm_.allreduce_max(mine) == mine && comm_.allreduce_max(-mine) == -mine;
  SP_CHECK(same, "ranks disagree on the model layout, configuration or training data");
}

std::size_t Trainer::batches_per_epoch() const {
  return (train_.rows + config_.batch - 1) / config_.batch;
}

double Trainer::learning_rate(std::uint64_t step) const {
  const double base = config_.optimizer.lr;
  if (!config_.cosine_schedule) return base;
  std::uint64_t total = config_.epochs * batches_per_epoch();
  if (config_.max_steps >= 0) total = std::min(total, std::uint64_t(config_.max_steps));
  if (total == 0) return base;
  const double progress = std::min(1.0, double(step) / double(total));
  return base * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}


void Trainer::diverged(std::uint64_t step, const MinibatchStats& stats) const {
  // The statistics are reduced, so every rank sees the same values and stops here
  // together; rank 0 reports. The parameters are still those of the previous step.
  std::string where;
  if (stats.nonfinite_layer >= 0) {
    const LayerSpec& layer = mlp_.spec().layers[std::size_t(stats.nonfinite_layer)];
    where = detail::concat("non-finite gradient in layer ", stats.nonfinite_layer + 1, " of ",
                           mlp_.spec().layers.size(), " (", layer.in, "->", layer.out, " ",
                           to_string(layer.activation), ")");
  } else {
    where = "every gradient is finite";
  }
  const double loss = stats.loss_sum / stats.samples;
  throw CollectiveFailure(detail::concat("training diverged at step ", step, ": loss is ",
                                         std::isnan(loss) ? std::string("NaN")
                                                          : detail::concat(loss),
                                         ", ", where,
                                         "; try a smaller --lr"),
                          comm_.rank() == 0);
}

MinibatchStats Trainer::step(std::span<const std::uint32_t> global_batch,
                             std::span<const std::uint32_t> next_batch) {
  const auto start = std::chrono::steady_clock::now();
  const std::size_t k = spec_output();
  const std::size_t chunk = config_.deterministic_chunk;
  const Range shard = chunked_shard(global_batch.size(), chunk, comm_.rank(), comm_.size());
  const auto rows = Eigen::Index(shard.size());
  const int now = current_;
  const bool ready = prefetched_.data() == global_batch.data() &&
                     prefetched_.size() == global_batch.size() && !global_batch.empty();
  if (!ready) {
    gather(train_, global_batch.subspan(shard.begin, shard.size()), k, x_[now].data(),
           y_[now].data());
  }
  const auto prefetch = [&](std::size_t) {
    const Range next = chunked_shard(next_batch.size(), chunk, comm_.rank(), comm_.size());
    gather(train_, next_batch.subspan(next.begin, next.size()), k, x_[1 - now].data(),
           y_[1 - now].data());
  };
  prefetched_ = {};
  // Every collective from here until the next step (the checkpoint of this step included)
  // names the step if it fails.
  comm_.set_phase("step", state_.step + 1);
  const MinibatchStats stats = [&] {
    const ConstMatrixView<float> x(x_[now].data(), rows, Eigen::Index(train_.cols));
    const ConstMatrixView<float> y(y_[now].data(), rows, Eigen::Index(k));
    const LayerDone before_wait = next_batch.empty() ? LayerDone() : LayerDone(prefetch);
    if (chunk > 0) {
      return reduce_minibatch_gradient_deterministic(mlp_, comm_, params_, x, y, chunk,
                                                     global_batch.size(), deterministic_, grad_,
                                                     &times_, before_wait);
    }
    return reduce_minibatch_gradient<float>(mlp_, comm_, params_, x, y, grad_, &times_,
                                            before_wait, config_.overlap);
  }();
  if (!next_batch.empty()) {
    prefetched_ = next_batch;
    current_ = 1 - now;
  }
  const std::uint64_t step = state_.step + 1;
  if (stats.nonfinite_layer >= 0 || !std::isfinite(stats.loss_sum)) diverged(step, stats);
  optimizer_.set_lr(learning_rate(state_.step));
  optimizer_.step(params_, std::span<const float>(grad_).first(params_.size()));
  state_.step = step;
  times_.total += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ++times_.steps;
  return stats;
}

EvalStats evaluate_dataset(Mlp<float>& mlp, Communicator& comm, std::span<const float> params,
                           const Dataset& data, std::size_t eval_batch, std::size_t chunk) {
  const std::size_t k = mlp.spec().output_width();
  const Range mine = chunked_shard(data.rows, chunk, comm.rank(), comm.size());
  // Deterministic passes hold whole chunks.
  std::size_t pass = std::max<std::size_t>(1, std::min(eval_batch, mine.size()));
  if (chunk > 0) pass = std::max(chunk, pass / chunk * chunk);
  AlignedVector<float> x(pass * data.cols), y(pass * k);
  std::vector<std::uint32_t> indices;
  std::vector<double> chunk_losses;
  double sums[3] = {0, 0, double(mine.size())};
  for (std::size_t begin = mine.begin; begin < mine.end; begin += pass) {
    const std::size_t end = std::min(mine.end, begin + pass);
    indices.resize(end - begin);
    std::iota(indices.begin(), indices.end(), std::uint32_t(begin));
    gather(data, indices, k, x.data(), y.data());
    const auto rows = Eigen::Index(indices.size());
    const ConstMatrixView<float> xs(x.data(), rows, Eigen::Index(data.cols));
    const ConstMatrixView<float> ys(y.data(), rows, Eigen::Index(k));
    if (chunk > 0) {
      for (const LossSums& s : mlp.forward_chunks(params, xs, ys, chunk)) {
        chunk_losses.push_back(s.loss);
        sums[1] += s.correct;
      }
    } else {
      const LossSums s = mlp.evaluate(params, xs, ys);
      sums[0] += s.loss;
      sums[1] += s.correct;
    }
  }
  if (chunk > 0) {  // counts are integers, exact in any order
    sums[0] = exact_sum(comm, chunk_losses, (data.rows + chunk - 1) / chunk);
    std::int64_t counts[2] = {std::int64_t(sums[1]), std::int64_t(sums[2])};
    comm.allreduce_sum(std::span<std::int64_t>(counts));
    sums[1] = double(counts[0]);
    sums[2] = double(counts[1]);
  } else {
    comm.allreduce_sum(std::span<double>(sums));
  }
  return {sums[0] / sums[2], sums[1] / sums[2], std::size_t(sums[2])};
}

EvalStats Trainer::evaluate(const Dataset& data) {
  comm_.set_phase("evaluation after step", state_.step);
  const EvalStats stats = evaluate_dataset(mlp_, comm_, params_, data, config_.eval_batch,
                                           config_.deterministic_chunk);
  comm_.set_phase("step", state_.step);
  return stats;
}

bool Trainer::steps_left() const {
  const auto below = [&](std::int64_t limit) {
    return limit < 0 || state_.step < std::uint64_t(limit);
  };
  return state_.epoch < config_.epochs && below(config_.max_steps) && below(config_.stop_at_step);
}

void Trainer::run(const Dataset* test, TrainObserver& observer) {
  using clock = std::chrono::steady_clock;
  const std::uint64_t batches = batches_per_epoch();
  while (steps_left()) {
    if (order_epoch_ != state_.epoch) {
      epoch_permutation(train_.rows, config_.seed, state_.epoch, order_);
      order_epoch_ = state_.epoch;
      prefetched_ = {};  // it pointed into the previous order
    }
    const auto start = clock::now();
    double loss = 0, correct = 0, samples = 0;
    bool ended = false;
    while (!ended && steps_left()) {
      const auto batch = [&](std::uint64_t b) {
        const std::size_t begin = b * config_.batch;
        return std::span<const std::uint32_t>(order_).subspan(
            begin, std::min(train_.rows, begin + config_.batch) - begin);
      };
      // The next batch of this epoch is gathered during this step's reductions.
      const std::uint64_t b = state_.batch_in_epoch;
      const MinibatchStats s =
          step(batch(b), b + 1 < batches ? batch(b + 1) : std::span<const std::uint32_t>());
      loss += s.loss_sum;
      correct += s.correct;
      samples += s.samples;
      observer.on_progress(state_.epoch + 1, state_.batch_in_epoch + 1, batches, loss / samples);
      ended = ++state_.batch_in_epoch == batches;
      if (ended) {
        ++state_.epoch;
        state_.batch_in_epoch = 0;
      } else {
        observer.on_state(*this, false);
      }
    }
    const double seconds = std::chrono::duration<double>(clock::now() - start).count();
    EpochStats stats;
    stats.epoch = ended ? state_.epoch : state_.epoch + 1;
    stats.step = state_.step;
    stats.train = {samples > 0 ? loss / samples : 0.0, samples > 0 ? correct / samples : 0.0,
                   std::size_t(samples)};
    stats.samples_per_s = seconds > 0 ? samples / seconds : 0.0;
    stats.seconds = seconds;
    if (test) {
      stats.has_test = true;
      stats.test = evaluate(*test);
    }
    if (samples > 0) observer.on_epoch(stats);
    if (ended) observer.on_state(*this, true);
  }
}

std::string metrics_json(const EpochStats& s, int ranks, int threads) {
  const auto number = [](double v) {
    if (!std::isfinite(v)) return std::string("null");
    char text[32];
    std::snprintf(text, sizeof text, "%.9g", v);
    return std::string(text);
  };
  std::string json = "{\"epoch\":" + std::to_string(s.epoch) + ",\"step\":" + std::to_string(s.step);
  json += ",\"train_loss\":" + number(s.train.loss) + ",\"train_acc\":" + number(s.train.accuracy);
  json += ",\"test_loss\":" + (s.has_test ? number(s.test.loss) : "null");
  json += ",\"test_acc\":" + (s.has_test ? number(s.test.accuracy) : "null");
  json += ",\"samples_per_s\":" + number(s.samples_per_s) + ",\"epoch_seconds\":" + number(s.seconds);
  json += ",\"ranks\":" + std::to_string(ranks) + ",\"threads\":" + std::to_string(threads) + "}";
  return json;
}

}  // namespace shardprop
