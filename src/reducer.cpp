#include "shardprop/reducer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <vector>

#include "fixed_point.hpp"
#include "layers.hpp"
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
    grad_[n + kLossSum] = T(sums[0].loss);
    grad_[n + kCorrect] = T(sums[0].correct);
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
    dense_backward_params<T>(input, delta, layout_.weights(grad, l), layout_.bias(grad, l),
                             comm_.size() > 1 ? Callback(advance) : Callback(), bf16.input,
                             bf16.delta);
    if (overlap_) {
      const auto [begin, end] = layout_.layer_range(l);
      comm_.start_allreduce_sum(grad.subspan(begin, end - begin));
      comm_.progress();
    }
  }

  void progress() override { comm_.progress(); }

  MinibatchStats finish(Callback before_wait, StepTimes* times) override {
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
    // One pass per layer divides by the sample count and notices NaN or Inf: x·0 is 0 for
    // every finite x and NaN otherwise. Eigen's sum runs in vector lanes, where a plain loop
    // would add one element at a time (a float sum may not be reordered); the order of a sum
    // of zeros cannot matter. Blocks of 4096 are scaled and probed while in L1.
    using Array = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
    constexpr std::size_t kBlock = 4096;
    const T scale = T(1) / T(stats.samples);
    for (std::size_t l = 0; l < layout_.layer_count(); ++l) {
      const auto [begin, end] = layout_.layer_range(l);
      T probe = 0;
      for (std::size_t i = begin; i < end; i += kBlock) {
        Array block(grad_.data() + i, Eigen::Index(std::min(kBlock, end - i)));
        block *= scale;
        probe += (block * T(0)).sum();
      }
      if (probe != T(0) && stats.nonfinite_layer < 0) stats.nonfinite_layer = int(l);
    }
    return stats;
  }

  std::span<const T> gradient() const override {
    return std::span<const T>(grad_).first(layout_.size());
  }

  EvalStats reduce_losses(std::span<const LossSums> parts, std::size_t rows,
                          std::size_t) override {
    double sums[3] = {0, 0, double(rows)};
    for (const LossSums& s : parts) {
      sums[0] += s.loss;
      sums[1] += s.correct;
    }
    comm_.allreduce_sum(std::span<double>(sums));
    return {sums[0] / sums[2], sums[1] / sums[2], std::size_t(sums[2])};
  }

 private:
  Layout layout_;
  Communicator& comm_;
  bool overlap_;
  AlignedVector<T> grad_;
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
// 2^−s, with s per tensor from the largest bound over all chunks (one small MPI_MAX per
// layer), and added as int64, on the rank and in the allreduce. The mean gradient and the
// statistics are then the same bits for any number of ranks and threads.
class FixedPointReducer final : public GradReducer<float> {
 public:
  FixedPointReducer(const Layout& layout, Communicator& comm, std::size_t chunk)
      : layout_(layout),
        comm_(comm),
        chunk_(chunk),
        // The kernel sets each entry from the rank's first chunk, so the sums need no
        // clearing; the padding between tensors is zeroed once and never written.
        sums_(layout.size() + kStats, 0),
        exponents_(2 * layout.layer_count(), 0),
        grad_(layout.size() + kStats, 0.0f) {
    SP_CHECK(chunk > 0, "the fixed-point reducer needs a chunk size");
  }

  std::size_t chunk() const override { return chunk_; }

  void begin(std::size_t rows, std::size_t global_rows) override {
    SP_CHECK(global_rows > 0, "global minibatch is empty");
    start_ = Clock::now();
    rows_ = rows;
    terms_ = (global_rows + chunk_ - 1) / chunk_;
    std::fill(sums_.begin() + std::ptrdiff_t(layout_.size()), sums_.end(), 0);
    nonfinite_layer_ = -1;
    loss_bound_ = 0;
  }

  void loss(std::span<const LossSums> sums) override {
    chunk_sums_ = sums;
    const std::size_t n = layout_.size();
    for (const LossSums& s : sums) {
      loss_bound_ = std::max(loss_bound_, max_safe(std::abs(s.loss)));
      sums_[n + kCorrect] += std::int64_t(s.correct);
    }
    sums_[n + kSamples] = std::int64_t(rows_);
  }

  // From the last layer down: agree on each tensor's exponent, add the chunks' products as
  // integers and start reducing them.
  void layer(std::size_t l, ConstMatrixView<float> input, ConstMatrixView<float> delta,
             Bf16Operands bf16) override {
    SP_CHECK(!bf16.input, "the deterministic mode has no bf16 products");
    const std::size_t layers = layout_.layer_count();
    const bool last = l + 1 == layers;
    GradientBound bound;
    if (rows_ > 0) bound = chunk_gradient_bound<float>(input, delta, chunk_);
    double agreed[3] = {max_safe(bound.w), max_safe(bound.b), loss_bound_};
    comm_.allreduce_max(std::span<double>(agreed, last ? 3 : 2));
    if (last) {
      loss_finite_ = std::isfinite(agreed[2]);
      loss_exp_ = fixed_point_exponent(agreed[2], terms_);
    }
    if (!std::isfinite(agreed[0]) || !std::isfinite(agreed[1])) nonfinite_layer_ = int(l);
    if (nonfinite_layer_ >= 0) return;  // every rank knows; nothing more is reduced
    int& w_exp = exponents_[l];
    int& b_exp = exponents_[layers + l];
    w_exp = fixed_point_exponent(agreed[0], terms_);
    b_exp = fixed_point_exponent(agreed[1], terms_);
    const Layout::Block& block = layout_.block(l);
    const auto [begin, end] = layout_.layer_range(l);
    if (rows_ > 0) {
      const auto advance = [this] { comm_.progress(); };
      dense_backward_params_fixed<float>(input, delta, chunk_, w_exp, b_exp,
                                         sums_.data() + block.w_offset,
                                         sums_.data() + block.b_offset, scratch_,
                                         comm_.size() > 1 ? Callback(advance) : Callback());
    } else {
      std::fill(sums_.begin() + std::ptrdiff_t(begin), sums_.begin() + std::ptrdiff_t(end), 0);
    }
    comm_.start_allreduce_sum(std::span<std::int64_t>(sums_).subspan(begin, end - begin));
    comm_.progress();
  }

  void progress() override { comm_.progress(); }

  MinibatchStats finish(Callback before_wait, StepTimes* times) override {
    const std::size_t n = layout_.size(), layers = layout_.layer_count();
    if (rows_ > 0 && loss_finite_) {
      for (const LossSums& s : chunk_sums_) sums_[n + kLossSum] += to_fixed(s.loss, loss_exp_);
    }
    comm_.start_allreduce_sum(std::span<std::int64_t>(sums_).subspan(n, kStats));
    const auto computed = Clock::now();
    before_wait();
    const auto waiting = Clock::now();
    comm_.wait_all();
    if (times) {
      times->compute += seconds(start_, computed);
      times->allreduce += seconds(waiting, Clock::now());
    }
    MinibatchStats stats;
    stats.nonfinite_layer = nonfinite_layer_;
    stats.loss_sum = loss_finite_ ? from_fixed(sums_[n + kLossSum], loss_exp_)
                                  : std::numeric_limits<double>::infinity();
    stats.correct = double(sums_[n + kCorrect]);
    stats.samples = double(sums_[n + kSamples]);
    SP_CHECK(stats.samples > 0, "global minibatch is empty");
    if (stats.nonfinite_layer >= 0) return stats;
    // The mean: the exact sum times 2^−s/N in double, rounded once to float; zero padding.
    for (std::size_t l = 0; l < layers; ++l) {
      const Layout::Block& block = layout_.block(l);
      const double w_unit = std::ldexp(1.0, -exponents_[l]) / stats.samples;
      const double b_unit = std::ldexp(1.0, -exponents_[layers + l]) / stats.samples;
      const std::size_t w_end = block.w_offset + block.in * block.out;
      const std::size_t b_end = block.b_offset + block.out;
      const std::size_t next = l + 1 < layers ? layout_.block(l + 1).w_offset : n;
      for (std::size_t i = block.w_offset; i < w_end; ++i) grad_[i] = float(double(sums_[i]) * w_unit);
      std::fill(grad_.begin() + std::ptrdiff_t(w_end), grad_.begin() + std::ptrdiff_t(block.b_offset), 0.0f);
      for (std::size_t i = block.b_offset; i < b_end; ++i) grad_[i] = float(double(sums_[i]) * b_unit);
      std::fill(grad_.begin() + std::ptrdiff_t(b_end), grad_.begin() + std::ptrdiff_t(next), 0.0f);
    }
    return stats;
  }

  std::span<const float> gradient() const override {
    return std::span<const float>(grad_).first(layout_.size());
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
  Layout layout_;
  Communicator& comm_;
  std::size_t chunk_;
  std::vector<std::int64_t> sums_;  // fixed-point gradient and statistics
  FixedScratch scratch_;            // each thread's chunk products
  std::vector<int> exponents_;      // each layer's W exponent, then each layer's b exponent
  AlignedVector<float> grad_;
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
std::unique_ptr<GradReducer<T>> make_reducer(const Layout& layout, Communicator& comm,
                                             std::size_t chunk, bool overlap) {
  if (chunk == 0) return std::make_unique<FloatReducer<T>>(layout, comm, overlap);
  if constexpr (std::is_same_v<T, float>) {
    return std::make_unique<FixedPointReducer>(layout, comm, chunk);
  } else {
    SP_THROW("the deterministic mode trains in float only");
  }
}

template std::unique_ptr<GradReducer<float>> make_reducer<float>(const Layout&, Communicator&,
                                                                 std::size_t, bool);
template std::unique_ptr<GradReducer<double>> make_reducer<double>(const Layout&, Communicator&,
                                                                   std::size_t, bool);

}  // namespace shardprop
