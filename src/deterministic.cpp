// The deterministic mode: chunked gradients added in fixed point (docs/reproducibility.md).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "shardprop/error.hpp"
#include "shardprop/train.hpp"

namespace shardprop {

int fixed_point_exponent(double bound, std::size_t terms) {
  if (!(bound > 0)) return 0;
  int e = 0;
  std::frexp(bound, &e);  // bound < 2^e
  int t = 0;
  while (t < 62 && (std::size_t(1) << t) < terms) ++t;  // terms ≤ 2^t
  // Each rounded value is below 2^(61 − t) + 1 ≤ 2^(62 − t), so 2^t of them stay below 2^62.
  // Bounds under 2^−900 (never met in practice) lose precision instead of making 2^s overflow.
  return std::min(61 - e - t, 960);
}

Range chunked_shard(std::size_t rows, std::size_t chunk, int rank, int size) {
  if (chunk == 0) return shard_range(rows, rank, size);
  const Range chunks = shard_range((rows + chunk - 1) / chunk, rank, size);
  return {std::min(rows, chunks.begin * chunk), std::min(rows, chunks.end * chunk)};
}

namespace {

std::int64_t to_fixed(double v, int exp) {
  return static_cast<std::int64_t>(std::nearbyint(std::ldexp(v, exp)));
}

double from_fixed(std::int64_t q, int exp) { return std::ldexp(double(q), -exp); }

// NaN compares false with everything, so MPI_MAX would lose it: make it +inf.
double max_safe(double v) { return std::isnan(v) ? std::numeric_limits<double>::infinity() : v; }

}  // namespace

double exact_sum(Communicator& comm, std::span<const double> values, std::size_t terms) {
  double bound = 0;
  for (double v : values) bound = std::max(bound, max_safe(std::abs(v)));
  comm.allreduce_max(std::span<double>(&bound, 1));
  const bool finite = std::isfinite(bound);
  const int exp = fixed_point_exponent(bound, terms);
  std::int64_t sum = 0;
  for (double v : values) sum += finite ? to_fixed(v, exp) : 0;
  comm.allreduce_sum(std::span<std::int64_t>(&sum, 1));
  return finite ? from_fixed(sum, exp) : bound;
}

MinibatchStats reduce_minibatch_gradient_deterministic(
    Mlp<float>& mlp, Communicator& comm, std::span<const float> params, ConstMatrixView<float> x,
    ConstMatrixView<float> y, std::size_t chunk, std::size_t global_rows,
    DeterministicBuffers& buffers, std::span<float> grad, StepTimes* times,
    LayerDone before_wait) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  const Layout& layout = mlp.layout();
  const std::size_t n = layout.size(), layers = layout.layer_count();
  SP_CHECK(grad.size() == n + kGradStats, "gradient buffer has ", grad.size(),
           " elements, expected ", n + kGradStats);
  SP_CHECK(chunk > 0 && global_rows > 0, "deterministic reduction needs a chunk size and rows");
  // The kernel sets each entry from the rank's first chunk, so the sums need no clearing;
  // the padding between tensors is zeroed once and never written.
  std::vector<std::int64_t>& sums = buffers.sums;
  if (sums.size() != n + kGradStats) sums.assign(n + kGradStats, 0);
  std::fill(sums.begin() + std::ptrdiff_t(n), sums.end(), 0);
  const std::size_t terms = (global_rows + chunk - 1) / chunk;
  const bool mine = x.rows() > 0;
  // Lets the reductions already started advance between parts of a layer's products.
  const auto advance = [&](std::size_t) { comm.progress(); };
  const LayerDone progress = comm.size() > 1 ? LayerDone(advance) : LayerDone();

  double loss_bound = 0;
  std::span<const LossSums> chunk_sums;
  if (mine) {
    chunk_sums = mlp.forward_chunks(params, x, y, chunk);
    for (const LossSums& s : chunk_sums) {
      loss_bound = std::max(loss_bound, max_safe(std::abs(s.loss)));
      sums[n + kCorrect] += std::int64_t(s.correct);
    }
    sums[n + kSamples] = x.rows();
  }

  // From the last layer down: agree on each tensor's exponent, add the chunks' products as
  // integers and start reducing them, then compute the δ of the layer below.
  MinibatchStats stats;
  std::vector<int>& exps = buffers.exponents;
  exps.assign(2 * layers, 0);
  int* w_exp = exps.data();
  int* b_exp = exps.data() + layers;
  int loss_exp = 0;
  bool loss_finite = true;
  for (std::size_t l = layers; l-- > 0;) {
    GradientBound bound;
    if (mine) bound = chunk_gradient_bound<float>(mlp.input_of(l, x), mlp.delta_of(l), chunk);
    double agreed[3] = {max_safe(bound.w), max_safe(bound.b), loss_bound};
    comm.allreduce_max(std::span<double>(agreed, l + 1 == layers ? 3 : 2));
    if (l + 1 == layers) {
      loss_finite = std::isfinite(agreed[2]);
      loss_exp = fixed_point_exponent(agreed[2], terms);
    }
    if (!std::isfinite(agreed[0]) || !std::isfinite(agreed[1])) stats.nonfinite_layer = int(l);
    if (stats.nonfinite_layer < 0) {
      w_exp[l] = fixed_point_exponent(agreed[0], terms);
      b_exp[l] = fixed_point_exponent(agreed[1], terms);
      const Layout::Block& block = layout.block(l);
      const auto [begin, end] = layout.layer_range(l);
      if (mine) {
        dense_backward_params_fixed<float>(mlp.input_of(l, x), mlp.delta_of(l), chunk, w_exp[l],
                                           b_exp[l], sums.data() + block.w_offset,
                                           sums.data() + block.b_offset, buffers.scratch,
                                           progress);
      } else {
        std::fill(sums.begin() + std::ptrdiff_t(begin), sums.begin() + std::ptrdiff_t(end), 0);
      }
      comm.start_allreduce_sum(std::span<std::int64_t>(sums).subspan(begin, end - begin));
      comm.progress();
    }
    if (l > 0 && mine) mlp.backward_input_chunks(params, l, chunk);
  }
  if (mine && loss_finite) {
    for (const LossSums& s : chunk_sums) sums[n + kLossSum] += to_fixed(s.loss, loss_exp);
  }
  comm.start_allreduce_sum(std::span<std::int64_t>(sums).subspan(n, kGradStats));
  const auto computed = clock::now();
  before_wait(0);
  const auto waiting = clock::now();
  comm.wait_all();
  if (times) {
    times->compute += std::chrono::duration<double>(computed - start).count();
    times->allreduce += std::chrono::duration<double>(clock::now() - waiting).count();
  }

  stats.loss_sum = loss_finite ? from_fixed(sums[n + kLossSum], loss_exp)
                               : std::numeric_limits<double>::infinity();
  stats.correct = double(sums[n + kCorrect]);
  stats.samples = double(sums[n + kSamples]);
  SP_CHECK(stats.samples > 0, "global minibatch is empty");
  grad[n + kLossSum] = float(stats.loss_sum);
  grad[n + kCorrect] = float(stats.correct);
  grad[n + kSamples] = float(stats.samples);
  if (stats.nonfinite_layer >= 0) return stats;
  // The mean: the exact sum times 2^−s/N in double, rounded once to float; zero padding.
  for (std::size_t l = 0; l < layers; ++l) {
    const Layout::Block& block = layout.block(l);
    const double w_unit = std::ldexp(1.0, -w_exp[l]) / stats.samples;
    const double b_unit = std::ldexp(1.0, -b_exp[l]) / stats.samples;
    const std::size_t w_end = block.w_offset + block.in * block.out, b_end = block.b_offset + block.out;
    const std::size_t next = l + 1 < layers ? layout.block(l + 1).w_offset : n;
    for (std::size_t i = block.w_offset; i < w_end; ++i) grad[i] = float(double(sums[i]) * w_unit);
    std::fill(grad.begin() + std::ptrdiff_t(w_end), grad.begin() + std::ptrdiff_t(block.b_offset), 0.0f);
    for (std::size_t i = block.b_offset; i < b_end; ++i) grad[i] = float(double(sums[i]) * b_unit);
    std::fill(grad.begin() + std::ptrdiff_t(b_end), grad.begin() + std::ptrdiff_t(next), 0.0f);
  }
  return stats;
}

}  // namespace shardprop
