#include "shardprop/optimizer.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <Eigen/Core>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include "shardprop/error.hpp"

namespace shardprop {

OptimizerKind parse_optimizer(std::string_view name) {
  if (name == "sgd") return OptimizerKind::sgd;
  if (name == "adam") return OptimizerKind::adam;
  SP_USAGE("--optimizer: unknown optimizer '", name, "' (expected sgd or adam)");
}

std::string_view to_string(OptimizerKind kind) {
  return kind == OptimizerKind::sgd ? "sgd" : "adam";
}

OptimizerConfig optimizer_config(const Settings& s) {
  OptimizerConfig c;
  c.kind = parse_optimizer(s.optimizer);
  c.lr = s.lr;
  c.momentum = s.momentum;
  c.weight_decay = s.weight_decay;
  c.beta1 = s.beta1;
  c.beta2 = s.beta2;
  c.eps = s.eps;
  return c;
}

std::size_t Optimizer::state_size(OptimizerKind kind, std::size_t size) {
  return (kind == OptimizerKind::adam ? 2 : 1) * size;
}

Optimizer::Optimizer(const OptimizerConfig& config, std::size_t size, std::span<float> storage)
    : config_(config), size_(size) {
  const std::size_t n = state_size(config.kind, size);
  if (storage.empty()) {
    own_.assign(n, 0.0f);
    state_ = own_;
  } else {
    SP_CHECK(storage.size() == n, "optimizer storage of ", storage.size(), " values, expected ",
             n);
    state_ = storage;
  }
}

void Optimizer::restore(std::span<const float> state, std::uint64_t steps) {
  restore(state, steps, 0, size_);
}

void Optimizer::restore(std::span<const float> state, std::uint64_t steps, std::size_t begin,
                        std::size_t end) {
  SP_CHECK(state.size() == state_.size(), "optimizer state of ", state.size(),
           " values, expected ", state_.size());
  SP_CHECK(begin <= end && end <= size_, "optimizer share out of range");
  for (std::size_t v = 0; v < state_.size(); v += size_) {
    std::copy(state.begin() + std::ptrdiff_t(v + begin), state.begin() + std::ptrdiff_t(v + end),
              state_.begin() + std::ptrdiff_t(v + begin));
  }
  steps_ = steps;
}


namespace {

// Where updated parameters go. Plain stores, or streaming (non-temporal) stores when other
// cores read the parameters next (several threads, or a node's ranks): a plain store to a
// line that another core holds must first take the line from it, one line at a time: on a
// 2-core EPYC the small model's update took 113 µs on two threads against 30 µs on one
// (docs/PERFORMANCE.md). A streaming store writes a whole line without reading it; a reader
// then fetches it from memory. Either way the same values are written: the arithmetic is
// the same code.
constexpr std::size_t kLineFloats = 64 / sizeof(float);

// dst[0, n) = src[0, n); streamed, the whole 64-byte lines of dst.
template <bool Stream>
void store_params(float* dst, const float* src, std::size_t n) {
  std::size_t i = 0;
  if constexpr (Stream) {
#if defined(__SSE2__)
    const std::size_t misaligned = reinterpret_cast<std::uintptr_t>(dst) % 64 / sizeof(float);
    const std::size_t head = std::min(n, (kLineFloats - misaligned) % kLineFloats);
    std::copy_n(src, head, dst);
    for (i = head; i + kLineFloats <= n; i += kLineFloats) {
#if defined(__AVX512F__)
      _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#elif defined(__AVX__)
      _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
      _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
#else
      for (std::size_t k = 0; k < kLineFloats; k += 4) {
        _mm_stream_ps(dst + i + k, _mm_loadu_ps(src + i + k));
      }
#endif
    }
#endif
  }
  std::copy(src + i, src + n, dst + i);
}

// Streaming stores are weakly ordered: the fence makes them visible before whatever the
// thread writes next (the end of its task, a barrier's counter).
template <bool Stream>
void end_stores() {
#if defined(__SSE2__)
  if constexpr (Stream) _mm_sfence();
#endif
}

// The updates, elementwise over n values, from (w, m[, v]) into (w_new, m_new[, v_new]).
// Each pointer is its own array, which lets the loops run in vector lanes. `gs` scales the
// gradient (clipping); x·1 is x, so 1 changes nothing.
void sgd_values(const float* __restrict g, const float* __restrict w, const float* __restrict m,
                float* __restrict w_new, float* __restrict m_new, std::size_t n, float lr,
                float wd, float mu, float gs) {
  for (std::size_t i = 0; i < n; ++i) {
    const float v = mu * m[i] + (g[i] * gs + wd * w[i]);
    m_new[i] = v;
    w_new[i] = w[i] - lr * v;
  }
}

void adam_values(const float* __restrict g, const float* __restrict w, const float* __restrict m,
                 const float* __restrict v, float* __restrict w_new, float* __restrict m_new,
                 float* __restrict v_new, std::size_t n, float lr, float wd, float b1, float b2,
                 float eps, float c1, float c2, float gs) {
  for (std::size_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs + wd * w[i];
    const float mi = b1 * m[i] + (1 - b1) * gi;
    const float vi = b2 * v[i] + (1 - b2) * gi * gi;
    m_new[i] = mi;
    v_new[i] = vi;
    w_new[i] = w[i] - lr * (mi * c1) / (std::sqrt(vi * c2) + eps);
  }
}

// One run of an update, in chunks whose new values wait in L1 buffers before they are
// written out: in place (the outputs the same arrays as the inputs) or into another copy,
// with the same arithmetic either way. The parameters go out through store_params.
constexpr std::size_t kChunk = 1024;

template <bool Stream>
void sgd_run(const float* g, const float* w, const float* m, float* w_out, float* m_out,
             std::size_t count, float lr, float wd, float mu, float gs) {
  alignas(64) float w_new[kChunk], m_new[kChunk];
  for (std::size_t b = 0; b < count; b += kChunk) {
    const std::size_t n = std::min(kChunk, count - b);
    sgd_values(g + b, w + b, m + b, w_new, m_new, n, lr, wd, mu, gs);
    std::copy_n(m_new, n, m_out + b);
    store_params<Stream>(w_out + b, w_new, n);
  }
  end_stores<Stream>();
}

template <bool Stream>
void adam_run(const float* g, const float* w, const float* m, const float* v, float* w_out,
              float* m_out, float* v_out, std::size_t count, float lr, float wd, float b1,
              float b2, float eps, float c1, float c2, float gs) {
  alignas(64) float w_new[kChunk], m_new[kChunk], v_new[kChunk];
  for (std::size_t b = 0; b < count; b += kChunk) {
    const std::size_t n = std::min(kChunk, count - b);
    adam_values(g + b, w + b, m + b, v + b, w_new, m_new, v_new, n, lr, wd, b1, b2, eps, c1, c2,
                gs);
    std::copy_n(m_new, n, m_out + b);
    std::copy_n(v_new, n, v_out + b);
    store_params<Stream>(w_out + b, w_new, n);
  }
  end_stores<Stream>();
}

}  // namespace

void Optimizer::step(std::span<float> params, std::span<const float> grad) {
  // Elementwise updates: the split into blocks cannot change any result.
  constexpr std::size_t kBlock = 1 << 14;
  step(params, grad, [&](Update update) {
    oneapi::tbb::parallel_for(oneapi::tbb::blocked_range<std::size_t>(0, size_, kBlock),
                              [&](const auto& r) { update(r.begin(), r.end()); });
  });
}

void Optimizer::step(std::span<float> params, std::span<const float> grad,
                     FunctionRef<Update> for_runs) {
  SP_CHECK(params.size() == size_ && grad.size() >= size_, "optimizer sized for ", size_,
           " parameters got ", params.size());
  ++steps_;
  const auto lr = float(config_.lr), wd = float(config_.weight_decay), gs = grad_scale_;
  float* w = params.data();
  const float* g = grad.data();
  float* m = state_.data();
  const std::size_t size = size_;
  if (config_.kind == OptimizerKind::sgd) {
    const auto mu = float(config_.momentum);
    for_runs([&](std::size_t begin, std::size_t end) {
      SP_CHECK(begin <= end && end <= size, "optimizer run out of range");
      (stream_params_ ? sgd_run<true> : sgd_run<false>)(g + begin, w + begin, m + begin,
                                                         w + begin, m + begin, end - begin, lr,
                                                         wd, mu, gs);
    });
  } else {
    float* v = m + size_;
    const auto b1 = float(config_.beta1), b2 = float(config_.beta2), eps = float(config_.eps);
    const auto t = double(steps_);
    const auto c1 = float(1.0 / (1.0 - std::pow(config_.beta1, t)));
    const auto c2 = float(1.0 / (1.0 - std::pow(config_.beta2, t)));
    for_runs([&](std::size_t begin, std::size_t end) {
      SP_CHECK(begin <= end && end <= size, "optimizer run out of range");
      (stream_params_ ? adam_run<true> : adam_run<false>)(
          g + begin, w + begin, m + begin, v + begin, w + begin, m + begin, v + begin,
          end - begin, lr, wd, b1, b2, eps, c1, c2, gs);
    });
  }
}

namespace {

// g = (a + b)·scale, the mean of two ranks' sums.
void mean2_block(const float* __restrict a, const float* __restrict b, float* __restrict g,
                 std::size_t count, float scale) {
  for (std::size_t i = 0; i < count; ++i) g[i] = (a[i] + b[i]) * scale;
}

}  // namespace

bool Optimizer::update_share(std::span<const float* const> sums, float scale,
                             std::span<const float> params, std::span<float> params_out,
                             std::span<float> state_out, std::size_t begin,
                             std::size_t end) const {
  SP_CHECK(params.size() == size_ && params_out.size() == size_ &&
               state_out.size() == state_.size() && begin <= end && end <= size_ &&
               !sums.empty(),
           "optimizer share out of range");
  const auto lr = float(config_.lr), wd = float(config_.weight_decay);
  const float* w = params.data();
  const float* m = state_.data();
  float* w_out = params_out.data();
  float* m_out = state_out.data();
  const std::size_t size = size_;
  const bool adam = config_.kind == OptimizerKind::adam, stream = stream_params_;
  const auto mu = float(config_.momentum);
  const auto b1 = float(config_.beta1), b2 = float(config_.beta2), eps = float(config_.eps);
  const auto t = double(steps_ + 1);
  const auto c1 = float(1.0 / (1.0 - std::pow(config_.beta1, t)));
  const auto c2 = float(1.0 / (1.0 - std::pow(config_.beta2, t)));
  // Each block's mean gradient is summed into a buffer that stays in L1 and probed there
  // (x·0 is 0 for finite x and NaN otherwise; Eigen's sum runs in vector lanes, and the
  // order of a sum of zeros cannot matter), then the update reads it: the sums, the
  // parameters and the state each cross memory once.
  using Array = Eigen::Map<Eigen::Array<float, Eigen::Dynamic, 1>, Eigen::Aligned64>;
  using Source = Eigen::Map<const Eigen::Array<float, Eigen::Dynamic, 1>>;
  constexpr std::size_t kBlock = 2048;
  std::atomic<bool> nonfinite{false};
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<std::size_t>(begin, end, 8 * kBlock), [&](const auto& r) {
        alignas(64) float buffer[kBlock];
        for (std::size_t b = r.begin(); b < r.end(); b += kBlock) {
          const std::size_t count = std::min(kBlock, r.end() - b);
          Array g(buffer, Eigen::Index(count));
          if (sums.size() == 2) {
            mean2_block(sums[0] + b, sums[1] + b, buffer, count, scale);
          } else {
            g = Source(sums[0] + b, Eigen::Index(count));
            for (std::size_t s = 1; s < sums.size(); ++s) {
              g += Source(sums[s] + b, Eigen::Index(count));
            }
            g *= scale;
          }
          if ((g * 0.0f).sum() != 0.0f) nonfinite = true;
          if (adam) {
            (stream ? adam_run<true> : adam_run<false>)(buffer, w + b, m + b, m + size + b,
                                                        w_out + b, m_out + b, m_out + size + b,
                                                        count, lr, wd, b1, b2, eps, c1, c2, 1);
          } else {
            (stream ? sgd_run<true> : sgd_run<false>)(buffer, w + b, m + b, w_out + b,
                                                      m_out + b, count, lr, wd, mu, 1);
          }
        }
      });
  return !nonfinite;
}

std::size_t norm_parts(std::size_t size) { return (size + 4095) / 4096; }

double global_norm(std::span<const float> grad, std::span<double> parts) {
  constexpr std::size_t kBlock = 4096;
  const std::size_t blocks = norm_parts(grad.size());
  SP_CHECK(parts.size() >= blocks, "global_norm needs ", blocks, " partial sums");
  oneapi::tbb::parallel_for(oneapi::tbb::blocked_range<std::size_t>(0, blocks, 4),
                            [&](const auto& r) {
                              for (std::size_t k = r.begin(); k < r.end(); ++k) {
                                const std::size_t end = std::min(grad.size(), (k + 1) * kBlock);
                                double sum = 0;
                                for (std::size_t i = k * kBlock; i < end; ++i) {
                                  sum += double(grad[i]) * double(grad[i]);
                                }
                                parts[k] = sum;
                              }
                            });
  double total = 0;
  for (std::size_t k = 0; k < blocks; ++k) total += parts[k];
  return std::sqrt(total);
}

void Optimizer::adopt(std::span<float> state) {
  SP_CHECK(state.size() == state_.size(), "optimizer state of ", state.size(),
           " values, expected ", state_.size());
  state_ = state;
  ++steps_;
}

}  // namespace shardprop
