#include "shardprop/optimizer.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
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

// The in-place updates of a run. Each pointer is its own array (the parameters, the
// gradient and each state vector), which lets the loops run in vector lanes.
// `gs` scales the gradient (clipping); x·1 is x, so 1 changes nothing.
void sgd_in_place(const float* __restrict g, float* __restrict w, float* __restrict m,
                  std::size_t count, float lr, float wd, float mu, float gs) {
  for (std::size_t i = 0; i < count; ++i) {
    m[i] = mu * m[i] + (g[i] * gs + wd * w[i]);
    w[i] -= lr * m[i];
  }
}

void adam_in_place(const float* __restrict g, float* __restrict w, float* __restrict m,
                   float* __restrict v, std::size_t count, float lr, float wd, float b1, float b2,
                   float eps, float c1, float c2, float gs) {
  for (std::size_t i = 0; i < count; ++i) {
    const float gi = g[i] * gs + wd * w[i];
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    w[i] -= lr * (m[i] * c1) / (std::sqrt(v[i] * c2) + eps);
  }
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
      sgd_in_place(g + begin, w + begin, m + begin, end - begin, lr, wd, mu, gs);
    });
  } else {
    float* v = m + size_;
    const auto b1 = float(config_.beta1), b2 = float(config_.beta2), eps = float(config_.eps);
    const auto t = double(steps_);
    const auto c1 = float(1.0 / (1.0 - std::pow(config_.beta1, t)));
    const auto c2 = float(1.0 / (1.0 - std::pow(config_.beta2, t)));
    for_runs([&](std::size_t begin, std::size_t end) {
      SP_CHECK(begin <= end && end <= size, "optimizer run out of range");
      adam_in_place(g + begin, w + begin, m + begin, v + begin, end - begin, lr, wd, b1, b2, eps,
                    c1, c2, gs);
    });
  }
}

namespace {

// One block of the fused update, out of place: every pointer is its own memory.
void sgd_block(const float* __restrict g, const float* __restrict w, const float* __restrict m,
               float* __restrict w_out, float* __restrict m_out, std::size_t count, float lr,
               float wd, float mu) {
  for (std::size_t i = 0; i < count; ++i) {
    const float v = mu * m[i] + (g[i] + wd * w[i]);
    m_out[i] = v;
    w_out[i] = w[i] - lr * v;
  }
}

void adam_block(const float* __restrict g, const float* __restrict w, const float* __restrict m,
                const float* __restrict v, float* __restrict w_out, float* __restrict m_out,
                float* __restrict v_out, std::size_t count, float lr, float wd, float b1,
                float b2, float eps, float c1, float c2) {
  for (std::size_t i = 0; i < count; ++i) {
    const float gi = g[i] + wd * w[i];
    const float mi = b1 * m[i] + (1 - b1) * gi;
    const float vi = b2 * v[i] + (1 - b2) * gi * gi;
    m_out[i] = mi;
    v_out[i] = vi;
    w_out[i] = w[i] - lr * (mi * c1) / (std::sqrt(vi * c2) + eps);
  }
}

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
  const bool adam = config_.kind == OptimizerKind::adam;
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
            adam_block(buffer, w + b, m + b, m + size + b, w_out + b, m_out + b,
                       m_out + size + b, count, lr, wd, b1, b2, eps, c1, c2);
          } else {
            sgd_block(buffer, w + b, m + b, w_out + b, m_out + b, count, lr, wd, mu);
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
