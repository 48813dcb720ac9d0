// Optimizers over the flat parameter buffer: one loop over every weight and bias.
#pragma once

#include <cstdint>
#include <span>
#include <string_view>

#include "shardprop/function_ref.hpp"
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
// Its state (velocity, or first and second moments) is one flat buffer plus a step count:
// its own, or `storage` given by the caller (memory the ranks of a node share).
class Optimizer {
 public:
  // The values of state an optimizer of `kind` keeps for `size` parameters.
  static std::size_t state_size(OptimizerKind kind, std::size_t size);

  Optimizer(const OptimizerConfig& config, std::size_t size, std::span<float> storage = {});
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // Applies one update with the mean gradient `grad` (same layout as params), in place, to
  // every parameter.
  void step(std::span<float> params, std::span<const float> grad);
  // The same over ranges the caller lays out: for_runs(update) calls update(begin, end) on
  // disjoint ranges that cover the parameters to update (all, or this rank's share, the
  // rest being other ranks'), from any of its threads (so the caller decides which thread
  // updates which values).
  using Update = FunctionRef<std::size_t, std::size_t>;
  void step(std::span<float> params, std::span<const float> grad, FunctionRef<Update> for_runs);

  // The node reducer's update of the parameters [begin, end), one rank's share, fused with
  // the mean gradient's computation: element i's gradient is (sums[0][i] + sums[1][i] + …)
  // · scale, added in the sums' order. Reads `params` and this optimizer's state and writes
  // the next step's values into `params_out` and `state_out` (the other copy of each, the
  // same layout), so a step that turns out to diverge leaves the current ones untouched.
  // Returns false if a gradient value was NaN or Inf. Counts no step: adopt() does.
  bool update_share(std::span<const float* const> sums, float scale,
                    std::span<const float> params, std::span<float> params_out,
                    std::span<float> state_out, std::size_t begin, std::size_t end) const;
  // Takes `state`, written by update_share on every share, as the state after one more step.
  void adopt(std::span<float> state);

  const OptimizerConfig& config() const { return config_; }
  void set_lr(double lr) { config_.lr = lr; }
  // The factor step() multiplies the gradient by before its update (clipping; 1 by default,
  // which changes no bit). update_share() takes none.
  void set_grad_scale(float scale) { grad_scale_ = scale; }
  // Whether cores other than the updating one read the parameters next (several threads,
  // or a node's ranks sharing one copy): the updates then write them with streaming stores,
  // which do not first fetch the lines those cores hold. The values are the same either way.
  void set_shared_readers(bool shared) { stream_params_ = shared; }
  std::span<const float> state() const { return state_; }
  std::uint64_t steps() const { return steps_; }
  // Takes a saved state (same size) and step count; with [begin, end), only that share of
  // each state vector is written.
  void restore(std::span<const float> state, std::uint64_t steps);
  void restore(std::span<const float> state, std::uint64_t steps, std::size_t begin,
               std::size_t end);

 private:
  OptimizerConfig config_;
  std::size_t size_;
  AlignedVector<float> own_;  // the state, unless storage was given
  std::span<float> state_;
  std::uint64_t steps_ = 0;
  float grad_scale_ = 1;
  bool stream_params_ = false;
};

// The Euclidean norm of `grad`, summed in double over blocks of 4096 values whose partial
// sums are added in order: the same bits for the same gradient whatever the threads.
// `parts` holds the partial sums: at least norm_parts(grad.size()) values.
std::size_t norm_parts(std::size_t size);
double global_norm(std::span<const float> grad, std::span<double> parts);

}  // namespace shardprop
