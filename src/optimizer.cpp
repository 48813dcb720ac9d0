#include "shardprop/optimizer.hpp"

#include <algorithm>
#include <cmath>
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

Optimizer::Optimizer(const OptimizerConfig& config, std::size_t size)
    : config_(config),
      size_(size),
      state_((config.kind == OptimizerKind::adam ? 2 : 1) * size, 0.0f) {}

void Optimizer::restore(std::span<const float> state, std::uint64_t steps) {
  SP_CHECK(state.size() == state_.size(), "optimizer state of ", state.size(),
           " values, expected ", state_.size());
  std::copy(state.begin(), state.end(), state_.begin());
  steps_ = steps;
}

void Optimizer::step(std::span<float> params, std::span<const float> grad) {
  SP_CHECK(params.size() == size_ && grad.size() >= size_, "optimizer sized for ", size_,
           " parameters got ", params.size());
  ++steps_;
  const auto lr = float(config_.lr), wd = float(config_.weight_decay);
  float* w = params.data();
  const float* g = grad.data();
  float* m = state_.data();
  // Elementwise updates: the split into blocks cannot change any result.
  constexpr std::size_t kBlock = 1 << 14;
  if (config_.kind == OptimizerKind::sgd) {
    const auto mu = float(config_.momentum);
    oneapi::tbb::parallel_for(
        oneapi::tbb::blocked_range<std::size_t>(0, size_, kBlock), [&](const auto& r) {
          for (std::size_t i = r.begin(); i != r.end(); ++i) {
            m[i] = mu * m[i] + (g[i] + wd * w[i]);
            w[i] -= lr * m[i];
          }
        });
  } else {
    float* v = m + size_;
    const auto b1 = float(config_.beta1), b2 = float(config_.beta2), eps = float(config_.eps);
    const auto t = double(steps_);
    const auto c1 = float(1.0 / (1.0 - std::pow(config_.beta1, t)));
    const auto c2 = float(1.0 / (1.0 - std::pow(config_.beta2, t)));
    oneapi::tbb::parallel_for(
        oneapi::tbb::blocked_range<std::size_t>(0, size_, kBlock), [&](const auto& r) {
          for (std::size_t i = r.begin(); i != r.end(); ++i) {
            const float gi = g[i] + wd * w[i];
            m[i] = b1 * m[i] + (1 - b1) * gi;
            v[i] = b2 * v[i] + (1 - b2) * gi * gi;
            w[i] -= lr * (m[i] * c1) / (std::sqrt(v[i] * c2) + eps);
          }
        });
  }
}

}  // namespace shardprop
