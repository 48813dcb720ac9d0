#include "shardprop/reducer.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <limits>
#include <new>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <vector>

#include "fixed_point.hpp"
#include "layers.hpp"
#include "node_memory.hpp"
#include "shardprop/error.hpp"

namespace shardprop {

namespace {

using Clock = std::chrono::steady_clock;

double seconds(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

// The reduced buffers hold the flat gradient followed by these statistics, so that one
// reduction covers all of them.
enum Stat : std::size_t { kLossSum = 0, kCorrect = 1, kSamples = 2, kStats = 3 };

// Layer l's gradient sums over this rank's rows, into `grad` (the parameters' layout).
// With `add`, added to what `grad` holds (a later micro-batch of the step).
template <class T>
void layer_sums(const Layout& layout, std::span<T> grad, std::size_t l, ConstMatrixView<T> input,
                ConstMatrixView<T> delta, Bf16Operands bf16, Callback progress, bool add) {
  dense_backward_params<T>(input, delta, layout.weights(grad, l), layout.bias(grad, l), progress,
                           bf16.input, bf16.delta, add);
}

// mean[i] = (sums[0][i] + sums[1][i] + …) · scale for i in `range`, adding the sources in
// their order; returns the first layer whose part of the range holds NaN or Inf, or −1.
// x·0 is 0 for every finite x and NaN otherwise: Eigen's sum runs in vector lanes, where a
// plain loop would add one element at a time (a float sum may not be reordered); the order
// of a sum of zeros cannot matter. Blocks of 4096 are summed, scaled and probed in L1.
template <class T>
int mean_and_probe(const Layout& layout, std::span<const T* const> sums, T* mean, Range range,
                   T scale) {
  using Array = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  using ConstArray = Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>>;
  constexpr std::size_t kBlock = 4096;
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const auto [layer_begin, layer_end] = layout.layer_range(l);
    const std::size_t begin = std::max(layer_begin, range.begin);
    const std::size_t end = std::min(layer_end, range.end);
    T probe = 0;
    for (std::size_t i = begin; i < end; i += kBlock) {
      const auto count = Eigen::Index(std::min(kBlock, end - i));
      Array block(mean + i, count);
      if (sums[0] != mean) block = ConstArray(sums[0] + i, count);
      for (std::size_t r = 1; r < sums.size(); ++r) block += ConstArray(sums[r] + i, count);
      block *= scale;
      probe += (block * T(0)).sum();
    }
    if (probe != T(0)) return int(l);
  }
  return -1;
}

// The first layer that any of the threads found non-finite, or −1.
class FirstLayer {
 public:
  void offer(int layer) {
    for (int seen = first_.load(); layer >= 0 && layer < seen;) {
      if (first_.compare_exchange_weak(seen, layer)) break;
    }
  }
  int get() const {
    const int first = first_.load();
    return first == std::numeric_limits<int>::max() ? -1 : first;
  }

 private:
  std::atomic<int> first_{std::numeric_limits<int>::max()};
};

// mean_and_probe over `range` in parts for the threads; the first non-finite layer of any.
template <class T>
int mean_and_probe_parallel(const Layout& layout, std::span<const T* const> sums, T* mean,
                            Range range, T scale) {
  FirstLayer first;
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<std::size_t>(range.begin, range.end, std::size_t(1) << 15),
      [&](const auto& part) {
        first.offer(mean_and_probe<T>(layout, sums, mean, {part.begin(), part.end()}, scale));
      });
  return first.get();
}

// mean_and_probe over the blocks of for_gradient_blocks: each thread scales and probes the
// sums it computed.
template <class T>
int mean_and_probe_blocks(const Layout& layout, T* grad, T scale) {
  FirstLayer first;
  using Array = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
  for_gradient_blocks(layout, [&](std::size_t l, std::size_t begin, std::size_t end) {
    Array block(grad + begin, Eigen::Index(end - begin));
    block *= scale;
    if ((block * T(0)).sum() != T(0)) first.offer(int(l));
  });
  return first.get();
}

// `bytes` rounded up to a whole number of 64-byte cache lines: where the next part of a
// node reducer's shared memory starts.
std::size_t cache_lines(std::size_t bytes) { return (bytes + 63) / 64 * 64; }

// This rank's share of n parameters under a node reducer: contiguous, split at multiples of
// the layout's alignment (64 bytes of float).
Range node_share(std::size_t n, const Communicator& comm) {
  const std::size_t units = n / Layout::kAlign, r = std::size_t(comm.rank());
  const auto p = std::size_t(comm.size());
  return {units * r / p * Layout::kAlign, units * (r + 1) / p * Layout::kAlign};
}

// Evaluation sums in double over all ranks through MPI.
EvalStats float_losses(Communicator& comm, std::span<const LossSums> parts, std::size_t rows) {
  double sums[3] = {0, 0, double(rows)};
  for (const LossSums& s : parts) {
    sums[0] += s.loss;
    sums[1] += s.correct;
  }
  comm.allreduce_sum(std::span<double>(sums));
  return {sums[0] / sums[2], sums[1] / sums[2], std::size_t(sums[2])};
}

// The default reducer: float sums of this rank's rows, reduced per layer as soon as backward
// has finished it (overlap), or the whole buffer once after backward.
template <class T>
class FloatReducer final : public GradReducer<T> {
 public:
  FloatReducer(const Layout& layout, Communicator& comm, bool overlap)
      : layout_(layout), comm_(comm), overlap_(overlap), grad_(layout.size() + kStats, T(0)) {}

  std::size_t chunk() const override { return 0; }

  void begin(std::size_t rows, std::size_t) override {
    rows_ = rows;
    start_ = Clock::now();
  }

  void loss(std::span<const LossSums> sums) override {
    const std::size_t n = layout_.size();
    const bool add = !this->first_micro();
    grad_[n + kLossSum] = (add ? grad_[n + kLossSum] : T(0)) + T(sums[0].loss);
    grad_[n + kCorrect] = (add ? grad_[n + kCorrect] : T(0)) + T(sums[0].correct);
    grad_[n + kSamples] = T(rows_);
  }

  void layer(std::size_t l, ConstMatrixView<T> input, ConstMatrixView<T> delta,
             Bf16Operands bf16) override {
    // Progress calls split each dW into parts; alone there is nothing to make progress on.
    // The parts do not depend on the overlap: Eigen's kernel may round a column differently
    // in another split, and both settings must give the same bits on 2 ranks. Without
    // overlap nothing is pending, so the calls return at once.
    const auto advance = [this] { comm_.progress(); };
    const std::span<T> grad(grad_);
    layer_sums(layout_, grad, l, input, delta, bf16,
               comm_.size() > 1 ? Callback(advance) : Callback(), !this->first_micro());
    if (overlap_ && this->last_micro()) {
      const auto [begin, end] = layout_.layer_range(l);
      comm_.start_allreduce_sum(grad.subspan(begin, end - begin));
      comm_.progress();
    }
  }

  void progress() override { comm_.progress(); }

  MinibatchStats finish(Callback before_wait, StepTimes* times, ShareUpdate<T>*) override {
    const std::size_t n = layout_.size();
    const std::span<T> grad(grad_);
    // Without overlap, one reduction of the whole buffer, the statistics included.
    comm_.start_allreduce_sum(overlap_ ? grad.subspan(n, kStats) : grad);
    const auto computed = Clock::now();
    before_wait();  // not counted as compute or wait: the step's rest
    const auto waiting = Clock::now();
    comm_.wait_all();
    if (times) {
      times->compute += seconds(start_, computed);
      times->allreduce += seconds(waiting, Clock::now());
    }
    MinibatchStats stats{double(grad_[n + kLossSum]), double(grad_[n + kCorrect]),
                         double(grad_[n + kSamples])};
    SP_CHECK(stats.samples > 0, "global minibatch is empty");
    const T scale = T(1) / T(stats.samples);
    if (comm_.size() == 1) {
      stats.nonfinite_layer = mean_and_probe_blocks<T>(layout_, grad_.data(), scale);
    } else {
      const T* sums = grad_.data();
      stats.nonfinite_layer = mean_and_probe_parallel<T>(
          layout_, std::span<const T* const>(&sums, 1), grad_.data(), {0, n}, scale);
    }
    return stats;
  }

  void share_runs(FunctionRef<std::size_t, std::size_t> run) const override {
    if (comm_.size() > 1) return GradReducer<T>::share_runs(run);
    // Alone, backward computed the gradient in column blocks without progress parts.
    for_gradient_blocks(layout_, [&](std::size_t, std::size_t begin, std::size_t end) {
      run(begin, end);
    });
  }

  std::span<const T> gradient() const override {
    return std::span<const T>(grad_).first(layout_.size());
  }

  EvalStats reduce_losses(std::span<const LossSums> parts, std::size_t rows,
                          std::size_t) override {
    return float_losses(comm_, parts, rows);
  }

 private:
  Layout layout_;
  Communicator& comm_;
  bool overlap_;
  AlignedVector<T> grad_;
  std::size_t rows_ = 0;
  Clock::time_point start_;
};

// The node reducer. Every rank writes its gradient sums into its own segment of memory the
// node's ranks share. After backward the ranks meet; each takes its share of the elements
// and either runs the optimizer's update on it, reading the sums of every segment (the
// trainer's case: one pass, from one copy of the parameters and optimizer state into the
// other), or writes the mean gradient; then they meet again to agree on its finiteness.
template <class T>
class NodeReducer final : public GradReducer<T> {
 public:
  // One rank's statistics and finding, in its own cache line.
  struct alignas(64) Slot {
    double loss = 0, correct = 0, samples = 0;
    int nonfinite_layer = -1;
  };

  // The shared memory: the barrier, one slot per rank, each rank's sums, the mean gradient,
  // then two copies of `storage` values for the trainer, each part 64-byte aligned.
  struct Parts {
    std::size_t slots, segments, mean, storage[2], bytes;
    Parts(std::size_t n, int ranks, std::size_t storage_values) {
      slots = cache_lines(sizeof(NodeBarrier));
      segments = cache_lines(slots + std::size_t(ranks) * sizeof(Slot));
      mean = cache_lines(segments + std::size_t(ranks) * n * sizeof(T));
      storage[0] = cache_lines(mean + n * sizeof(T));
      storage[1] = cache_lines(storage[0] + storage_values * sizeof(T));
      bytes = storage[1] + storage_values * sizeof(T);
    }
  };

  NodeReducer(const Layout& layout, Communicator& comm, std::unique_ptr<NodeMemory> memory,
              std::size_t storage)
      : layout_(layout), comm_(comm), memory_(std::move(memory)), storage_size_(storage) {
    const std::size_t n = layout.size();
    const Parts parts(n, comm.size(), storage);
    SP_CHECK(memory_->size() >= parts.bytes, "node memory too small");
    std::byte* base = memory_->data();
    // Zeroed memory is the barrier's initial state.
    barrier_ = std::launder(reinterpret_cast<NodeBarrier*>(base));
    slots_ = std::launder(reinterpret_cast<Slot*>(base + parts.slots));
    T* segments = reinterpret_cast<T*>(base + parts.segments);
    for (int r = 0; r < comm.size(); ++r) segments_.push_back(segments + std::size_t(r) * n);
    own_ = segments + std::size_t(comm.rank()) * n;
    mean_ = reinterpret_cast<T*>(base + parts.mean);
    for (int c = 0; c < 2; ++c) storage_[c] = reinterpret_cast<T*>(base + parts.storage[c]);
    share_ = node_share(n, comm);
    if (comm.rank() == 0) {
      for (int q = 0; q < comm.size(); ++q) new (&slots_[q]) Slot;
    }
    meet("the node reducer's start");
  }

  std::size_t chunk() const override { return 0; }

  void begin(std::size_t rows, std::size_t) override {
    rows_ = rows;
    start_ = Clock::now();
  }

  void loss(std::span<const LossSums> sums) override {
    Slot& mine = slots_[comm_.rank()];
    const bool add = !this->first_micro();
    mine.loss = (add ? mine.loss : 0.0) + sums[0].loss;
    mine.correct = (add ? mine.correct : 0.0) + sums[0].correct;
    mine.samples = double(rows_);
  }

  void layer(std::size_t l, ConstMatrixView<T> input, ConstMatrixView<T> delta,
             Bf16Operands bf16) override {
    // In the MPI reducer's parts (it makes progress calls between them): a library may round
    // a column differently in another split, and a job must give the same bits on one node
    // as across nodes.
    const auto nothing = [] {};
    layer_sums(layout_, std::span<T>(own_, layout_.size()), l, input, delta, bf16,
               comm_.size() > 1 ? Callback(nothing) : Callback(), !this->first_micro());
  }

  // Nothing of the gradient's to advance, but the rows of the next step may be travelling.
  void progress() override { comm_.progress(); }

  MinibatchStats finish(Callback before_wait, StepTimes* times, ShareUpdate<T>* update) override {
    const auto computed = Clock::now();
    before_wait();
    const auto waiting = Clock::now();
    meet("the gradient's reduction");
    double wait = seconds(waiting, Clock::now());
    MinibatchStats stats;
    for (int r = 0; r < comm_.size(); ++r) {
      stats.loss_sum += slots_[r].loss;
      stats.correct += slots_[r].correct;
      stats.samples += slots_[r].samples;
    }
    SP_CHECK(stats.samples > 0, "global minibatch is empty");
    const T scale = T(1) / T(stats.samples);
    int first = -1;  // this share's first layer with a NaN or Inf
    if (update) {
      for (std::size_t l = 0; l < layout_.layer_count() && first < 0; ++l) {
        const auto [begin, end] = layout_.layer_range(l);
        const Range part{std::max(begin, share_.begin), std::min(end, share_.end)};
        if (part.begin < part.end && !(*update)(segments_, scale, part)) first = int(l);
      }
    } else {
      first = mean_and_probe_parallel<T>(layout_, segments_, mean_, share_, scale);
    }
    slots_[comm_.rank()].nonfinite_layer = first;
    const auto checked = Clock::now();
    meet("the mean gradient's check");
    wait += seconds(checked, Clock::now());
    for (int r = 0; r < comm_.size(); ++r) {
      const int l = slots_[r].nonfinite_layer;
      if (l >= 0 && (stats.nonfinite_layer < 0 || l < stats.nonfinite_layer)) {
        stats.nonfinite_layer = l;
      }
    }
    if (times) {
      times->compute += seconds(start_, computed);
      times->allreduce += wait;
    }
    return stats;
  }

  std::span<const T> gradient() const override {
    return std::span<const T>(mean_, layout_.size());
  }
  bool fuses_update() const override { return true; }

  std::span<T> shared_storage(int copy) override {
    return std::span<T>(storage_[copy & 1], storage_size_);
  }
  Range share() const override { return share_; }
  void shared_written() override { meet("the parameters' update"); }

  EvalStats reduce_losses(std::span<const LossSums> parts, std::size_t rows,
                          std::size_t) override {
    return float_losses(comm_, parts, rows);
  }

 private:
  void meet(const char* what) { barrier_->arrive_and_wait(comm_.size(), comm_, what); }

  Layout layout_;
  Communicator& comm_;
  std::unique_ptr<NodeMemory> memory_;
  std::size_t storage_size_;
  NodeBarrier* barrier_ = nullptr;
  Slot* slots_ = nullptr;
  std::vector<const T*> segments_;  // each rank's sums
  T* own_ = nullptr;                // this rank's
  T* mean_ = nullptr;
  T* storage_[2] = {nullptr, nullptr};
  Range share_;
  std::size_t rows_ = 0;
  Clock::time_point start_;
};

std::int64_t to_fixed(double v, int exp) {
  return static_cast<std::int64_t>(std::nearbyint(std::ldexp(v, exp)));
}

double from_fixed(std::int64_t q, int exp) { return std::ldexp(double(q), -exp); }

// NaN compares false with everything, so MPI_MAX would lose it: make it +inf.
double max_safe(double v) { return std::isnan(v) ? std::numeric_limits<double>::infinity() : v; }

// The deterministic mode's reducer: each chunk's gradient sums are rounded to multiples of
// 2^−s, with s per tensor from the largest bound over all chunks (one small maximum over the
// ranks per layer), and added as int64, on the rank and across the ranks. The mean gradient
// and the statistics are then the same bits for any number of ranks and threads. The ranks
// combine through MPI (MPI_MAX, MPI_Iallreduce of int64), or, given node memory, through
// memory the ranks of one node share: each rank writes its bounds and sums there, and after
// backward turns its share of the summed integers into the mean, which the trainer applies
// to its share of one shared copy of the parameters and optimizer state. Integer sums are
// exact in any order, so both give the same bits.
class FixedPointReducer final : public GradReducer<float> {
 public:
  // The node memory's parts: the barrier, each rank's bounds (3 per layer), each rank's
  // sums and statistics, the mean gradient, then `storage` floats for the trainer.
  struct Parts {
    std::size_t bounds, segments, mean, storage, bytes;
    Parts(std::size_t n, std::size_t layers, int ranks, std::size_t storage_values) {
      bounds = cache_lines(sizeof(NodeBarrier));
      segments = cache_lines(bounds + std::size_t(ranks) * layers * 3 * sizeof(double));
      mean = cache_lines(segments + std::size_t(ranks) * (n + kStats) * sizeof(std::int64_t));
      storage = cache_lines(mean + n * sizeof(float));
      bytes = storage + storage_values * sizeof(float);
    }
  };

  FixedPointReducer(const Layout& layout, Communicator& comm, std::size_t chunk,
                    std::unique_ptr<NodeMemory> memory = nullptr, std::size_t storage = 0)
      : layout_(layout),
        comm_(comm),
        chunk_(chunk),
        memory_(std::move(memory)),
        storage_size_(storage),
        exponents_(2 * layout.layer_count(), 0),
        measured_(2 * layout.layer_count() + 1, 0.0),
        share_{0, layout.size()} {
    SP_CHECK(chunk > 0, "the fixed-point reducer needs a chunk size");
    const std::size_t n = layout.size();
    if (!memory_) {
      // The kernel sets each entry from the rank's first chunk, so the sums need no
      // clearing; the padding between tensors is zeroed once and never written.
      own_sums_.assign(n + kStats, 0);
      own_grad_.assign(n + kStats, 0.0f);
      sums_ = own_sums_.data();
      grad_ = own_grad_.data();
      return;
    }
    const Parts parts(n, layout.layer_count(), comm.size(), storage);
    SP_CHECK(memory_->size() >= parts.bytes, "node memory too small");
    std::byte* base = memory_->data();
    barrier_ = std::launder(reinterpret_cast<NodeBarrier*>(base));  // zeroed: initial state
    bounds_ = reinterpret_cast<double*>(base + parts.bounds);
    auto* segments = reinterpret_cast<std::int64_t*>(base + parts.segments);
    for (int r = 0; r < comm.size(); ++r) segments_.push_back(segments + std::size_t(r) * (n + kStats));
    sums_ = segments + std::size_t(comm.rank()) * (n + kStats);
    grad_ = reinterpret_cast<float*>(base + parts.mean);
    storage_ = reinterpret_cast<float*>(base + parts.storage);
    share_ = node_share(n, comm);
    meet("the node reducer's start");
  }

  std::size_t chunk() const override { return chunk_; }

  void begin(std::size_t rows, std::size_t global_rows) override {
    SP_CHECK(global_rows > 0, "global minibatch is empty");
    start_ = Clock::now();
    rows_ = rows;
    terms_ = (global_rows + chunk_ - 1) / chunk_;
    std::fill(sums_ + layout_.size(), sums_ + layout_.size() + kStats, 0);
    nonfinite_layer_ = -1;
    loss_bound_ = 0;
    std::fill(measured_.begin(), measured_.end(), 0.0);
  }

  bool needs_bounds() const override { return true; }

  void loss(std::span<const LossSums> sums) override {
    const std::size_t n = layout_.size();
    if (measuring_) {
      for (const LossSums& s : sums) {
        measured_.back() = std::max(measured_.back(), max_safe(std::abs(s.loss)));
      }
      return;
    }
    chunk_sums_ = sums;
    for (const LossSums& s : sums) {
      loss_bound_ = std::max(loss_bound_, max_safe(std::abs(s.loss)));
      sums_[n + kCorrect] += std::int64_t(s.correct);
      // A micro-batch's chunks, at the exponent its measuring pass agreed on.
      if (micros_ > 1 && loss_finite_) sums_[n + kLossSum] += to_fixed(s.loss, loss_exp_);
    }
    sums_[n + kSamples] = std::int64_t(rows_);
  }

  // From the last layer down: agree on each tensor's exponent, add the chunks' products as
  // integers and start reducing them.
  void layer(std::size_t l, ConstMatrixView<float> input, ConstMatrixView<float> delta,
             Bf16Operands bf16) override {
    SP_CHECK(!bf16.input, "the deterministic mode has no bf16 products");
    const std::size_t layers = layout_.layer_count();
    if (micros_ > 1) return accumulate(l, input, delta);
    const bool last = l + 1 == layers;
    GradientBound bound;
    if (rows_ > 0) bound = chunk_gradient_bound<float>(input, delta, chunk_);
    double agreed[3] = {max_safe(bound.w), max_safe(bound.b), loss_bound_};
    agree_max(l, std::span<double>(agreed, last ? 3 : 2));
    adopt_agreed(l, agreed);
    sum_layer(l, input, delta);
  }

  void progress() override { comm_.progress(); }

  MinibatchStats finish(Callback before_wait, StepTimes* times, ShareUpdate<float>*) override {
    const std::size_t n = layout_.size();
    if (micros_ == 1 && rows_ > 0 && loss_finite_) {
      for (const LossSums& s : chunk_sums_) sums_[n + kLossSum] += to_fixed(s.loss, loss_exp_);
    }
    if (!memory_) comm_.start_allreduce_sum(std::span<std::int64_t>(sums_ + n, kStats));
    const auto computed = Clock::now();
    before_wait();
    const auto waiting = Clock::now();
    if (memory_) {
      meet("the gradient's reduction");
    } else {
      comm_.wait_all();
    }
    if (times) {
      times->compute += seconds(start_, computed);
      times->allreduce += seconds(waiting, Clock::now());
    }
    MinibatchStats stats;
    stats.nonfinite_layer = nonfinite_layer_;
    stats.loss_sum = loss_finite_ ? from_fixed(total(n + kLossSum), loss_exp_)
                                  : std::numeric_limits<double>::infinity();
    stats.correct = double(total(n + kCorrect));
    stats.samples = double(total(n + kSamples));
    SP_CHECK(stats.samples > 0, "global minibatch is empty");
    if (stats.nonfinite_layer >= 0) return stats;
    // The mean of this rank's share (all of it through MPI): the exact sum times 2^−s/N in
    // double, rounded once to float; zero padding.
    const std::size_t layers = layout_.layer_count();
    for (std::size_t l = 0; l < layers; ++l) {
      const Layout::Block& block = layout_.block(l);
      const double w_unit = std::ldexp(1.0, -exponents_[l]) / stats.samples;
      const double b_unit = std::ldexp(1.0, -exponents_[layers + l]) / stats.samples;
      const std::size_t w_end = block.w_offset + block.in * block.out;
      const std::size_t b_end = block.b_offset + block.out;
      const std::size_t next = l + 1 < layers ? layout_.block(l + 1).w_offset : n;
      set_mean(block.w_offset, w_end, w_unit);
      set_mean(w_end, block.b_offset, 0.0);
      set_mean(block.b_offset, b_end, b_unit);
      set_mean(b_end, next, 0.0);
    }
    return stats;
  }

  std::span<const float> gradient() const override {
    return std::span<const float>(grad_, layout_.size());
  }

  std::span<float> shared_storage(int) override {
    return memory_ ? std::span<float>(storage_, storage_size_) : std::span<float>();
  }
  Range share() const override { return share_; }
  void shared_written() override {
    if (memory_) meet("the parameters' update");
  }
  void whole_gradient() override {
    if (memory_) meet("the mean gradient's shares");
  }

  // The chunks' losses added in fixed point and the counts as integers: the same bits for
  // any ranks and threads.
  EvalStats reduce_losses(std::span<const LossSums> parts, std::size_t rows,
                          std::size_t terms) override {
    double bound = 0;
    std::int64_t counts[2] = {0, std::int64_t(rows)};
    for (const LossSums& s : parts) {
      bound = std::max(bound, max_safe(std::abs(s.loss)));
      counts[0] += std::int64_t(s.correct);
    }
    comm_.allreduce_max(std::span<double>(&bound, 1));
    const bool finite = std::isfinite(bound);
    const int exp = fixed_point_exponent(bound, terms);
    std::int64_t sum = 0;
    for (const LossSums& s : parts) sum += finite ? to_fixed(s.loss, exp) : 0;
    comm_.allreduce_sum(std::span<std::int64_t>(&sum, 1));
    comm_.allreduce_sum(std::span<std::int64_t>(counts));
    const double samples = double(counts[1]);
    const double loss = finite ? from_fixed(sum, exp) : bound;
    return {loss / samples, double(counts[0]) / samples, std::size_t(counts[1])};
  }

 private:
  void meet(const char* what) { barrier_->arrive_and_wait(comm_.size(), comm_, what); }

  // The largest of every rank's `values` for layer l, in place.
  // Accumulation: the measuring pass keeps the largest bounds of every micro-batch; the
  // ranks agree on them before the first micro-batch is summed, so every chunk of the step
  // is summed at the exponents P·K ranks would agree on for one micro-batch each.
  void on_micro() override {
    if (micros_ > 1 && micro_ == 0 && !measuring_) agree_measured();
  }

  void agree_measured() {
    const std::size_t layers = layout_.layer_count();
    for (std::size_t l = layers; l-- > 0;) {
      double agreed[3] = {measured_[l], measured_[layers + l], measured_.back()};
      agree_max(l, std::span<double>(agreed, 3));
      adopt_agreed(l, agreed);
    }
  }

  // Takes the ranks' largest bounds of layer l's W and b (and with the last layer, of the
  // loss): the exponents they give, or the layer as the first non-finite one.
  void adopt_agreed(std::size_t l, const double* agreed) {
    const std::size_t layers = layout_.layer_count();
    if (l + 1 == layers) {
      loss_finite_ = std::isfinite(agreed[2]);
      if (loss_finite_) loss_exp_ = fixed_point_exponent(agreed[2], terms_);
    }
    if (!std::isfinite(agreed[0]) || !std::isfinite(agreed[1])) {
      nonfinite_layer_ = int(l);
      return;
    }
    exponents_[l] = fixed_point_exponent(agreed[0], terms_);
    exponents_[layers + l] = fixed_point_exponent(agreed[1], terms_);
  }

  // A micro-batch's layer: measured, or summed at the agreed exponents.
  void accumulate(std::size_t l, ConstMatrixView<float> input, ConstMatrixView<float> delta) {
    if (!measuring_) return sum_layer(l, input, delta);
    if (input.rows() == 0) return;
    const std::size_t layers = layout_.layer_count();
    const GradientBound bound = chunk_gradient_bound<float>(input, delta, chunk_);
    measured_[l] = std::max(measured_[l], max_safe(bound.w));
    measured_[layers + l] = std::max(measured_[layers + l], max_safe(bound.b));
  }

  // Adds layer l's chunks as integers at the agreed exponents (the first micro-batch sets
  // them) and, after the last micro-batch, starts reducing them.
  void sum_layer(std::size_t l, ConstMatrixView<float> input, ConstMatrixView<float> delta) {
    if (nonfinite_layer_ >= 0) return;  // every rank knows; nothing more is reduced
    const std::size_t layers = layout_.layer_count();
    const Layout::Block& block = layout_.block(l);
    const auto [begin, end] = layout_.layer_range(l);
    if (input.rows() > 0) {
      const auto advance = [this] { comm_.progress(); };
      dense_backward_params_fixed<float>(
          input, delta, chunk_, exponents_[l], exponents_[layers + l], sums_ + block.w_offset,
          sums_ + block.b_offset, scratch_,
          comm_.size() > 1 && !memory_ ? Callback(advance) : Callback(), !first_micro());
    } else if (first_micro()) {
      std::fill(sums_ + begin, sums_ + end, 0);
    }
    if (!memory_ && last_micro()) {
      comm_.start_allreduce_sum(std::span<std::int64_t>(sums_ + begin, end - begin));
      comm_.progress();
    }
  }

  void agree_max(std::size_t l, std::span<double> values) {
    if (!memory_) {
      comm_.allreduce_max(values);
      return;
    }
    const std::size_t layers = layout_.layer_count();
    const auto slot = [&](int r) { return bounds_ + (std::size_t(r) * layers + l) * 3; };
    std::copy(values.begin(), values.end(), slot(comm_.rank()));
    meet("the fixed point's agreement");
    for (int r = 0; r < comm_.size(); ++r) {
      for (std::size_t i = 0; i < values.size(); ++i) values[i] = std::max(values[i], slot(r)[i]);
    }
  }

  // Element i's sum over all ranks (after finish's wait).
  std::int64_t total(std::size_t i) const {
    if (!memory_) return sums_[i];
    std::int64_t sum = 0;
    for (const std::int64_t* segment : segments_) sum += segment[i];
    return sum;
  }

  // grad_[i] = total(i)·unit for i in [begin, end) ∩ this rank's share.
  void set_mean(std::size_t begin, std::size_t end, double unit) {
    begin = std::max(begin, share_.begin);
    end = std::min(end, share_.end);
    if (!memory_) {
      for (std::size_t i = begin; i < end; ++i) grad_[i] = float(double(sums_[i]) * unit);
      return;
    }
    for (std::size_t i = begin; i < end; ++i) grad_[i] = float(double(total(i)) * unit);
  }

  Layout layout_;
  Communicator& comm_;
  std::size_t chunk_;
  std::unique_ptr<NodeMemory> memory_;  // null: through MPI
  std::size_t storage_size_;
  std::vector<std::int64_t> own_sums_;  // fixed-point gradient and statistics (MPI)
  AlignedVector<float> own_grad_;
  std::int64_t* sums_ = nullptr;        // this rank's sums: own_sums_ or its segment
  float* grad_ = nullptr;               // the mean: own_grad_ or the shared one
  NodeBarrier* barrier_ = nullptr;
  double* bounds_ = nullptr;
  std::vector<const std::int64_t*> segments_;
  float* storage_ = nullptr;
  FixedScratch scratch_;            // each thread's chunk products
  std::vector<int> exponents_;      // each layer's W exponent, then each layer's b exponent
  std::vector<double> measured_;    // accumulation: each W's and b's bound, then the loss's
  Range share_;
  std::span<const LossSums> chunk_sums_;
  std::size_t rows_ = 0, terms_ = 0;
  double loss_bound_ = 0;
  int loss_exp_ = 0;
  bool loss_finite_ = true;
  int nonfinite_layer_ = -1;
  Clock::time_point start_;
};

}  // namespace

template <class T>
void GradReducer<T>::share_runs(FunctionRef<std::size_t, std::size_t> run) const {
  const Range range = share();
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<std::size_t>(range.begin, range.end, std::size_t(1) << 14),
      [&](const auto& r) { run(r.begin(), r.end()); });
}

template <class T>
std::unique_ptr<GradReducer<T>> make_reducer(const Layout& layout, Communicator& comm,
                                             std::size_t chunk, bool overlap) {
  if (chunk == 0) return std::make_unique<FloatReducer<T>>(layout, comm, overlap);
  if constexpr (std::is_same_v<T, float>) {
    return std::make_unique<FixedPointReducer>(layout, comm, chunk);
  } else {
    SP_THROW("the deterministic mode trains in float only");
  }
}

template <class T>
std::unique_ptr<GradReducer<T>> make_node_reducer(const Layout& layout, Communicator& comm,
                                                  std::size_t storage, std::string& why,
                                                  std::size_t chunk) {
  if (chunk > 0) {
    if constexpr (std::is_same_v<T, float>) {
      const FixedPointReducer::Parts parts(layout.size(), layout.layer_count(), comm.size(),
                                           storage);
      auto memory = NodeMemory::create(comm, parts.bytes, why);
      if (!memory) return nullptr;
      return std::make_unique<FixedPointReducer>(layout, comm, chunk, std::move(memory),
                                                 storage);
    } else {
      SP_THROW("the deterministic mode trains in float only");
    }
  }
  const typename NodeReducer<T>::Parts parts(layout.size(), comm.size(), storage);
  auto memory = NodeMemory::create(comm, parts.bytes, why);
  if (!memory) return nullptr;
  return std::make_unique<NodeReducer<T>>(layout, comm, std::move(memory), storage);
}

template std::unique_ptr<GradReducer<float>> make_node_reducer<float>(const Layout&,
                                                                      Communicator&, std::size_t,
                                                                      std::string&, std::size_t);
template std::unique_ptr<GradReducer<double>> make_node_reducer<double>(const Layout&,
                                                                        Communicator&,
                                                                        std::size_t, std::string&,
                                                                        std::size_t);
template class GradReducer<float>;
template class GradReducer<double>;
template std::unique_ptr<GradReducer<float>> make_reducer<float>(const Layout&, Communicator&,
                                                                 std::size_t, bool);
template std::unique_ptr<GradReducer<double>> make_reducer<double>(const Layout&, Communicator&,
                                                                   std::size_t, bool);

}  // namespace shardprop
