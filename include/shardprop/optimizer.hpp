// Optimizers over the flat parameter buffer: one loop over every weight and bias.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "shardprop/params.hpp"
#include "shardprop/settings.hpp"

namespace shardprop {

enum class OptimizerKind { sgd, adam };
OptimizerKind parse_optimizer(std::string_view name);
std::string_view to_string(OptimizerKind kind);

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::sgd;
  double lr = 0.05;
  double momentum = 0.9;      // sgd
  double weight_decay = 0.0;  // L2 term added to the gradient: g + wd·w
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // adam
};

// The optimizer a run's settings describe (the base learning rate as lr).
OptimizerConfig optimizer_config(const Settings& settings);

// SGD with momentum (v ← μv + g; w ← w − lr·v) or Adam (bias-corrected moments).
// Its state (velocity, or first and second moments) is one flat buffer plus a step count.
class Optimizer {
 public:
  Optimizer(const OptimizerConfig& config, std::size_t size);

  // Applies one update with the mean gradient `grad` (same layout as params).
  void step(std::span<float> params, std::span<const float> grad);

  const OptimizerConfig& config() const { return config_; }
  void set_lr(double lr) { config_.lr = lr; }
  std::span<const float> state() const { return state_; }
  std::uint64_t steps() const { return steps_; }
  // Takes a saved state (same size) and step count.
  void restore(std::span<const float> state, std::uint64_t steps);

 private:
  OptimizerConfig config_;
  std::size_t size_;
  AlignedVector<float> state_;
  std::uint64_t steps_ = 0;
};

}  // namespace shardprop
