// The learning rate of every optimizer step: a schedule over the run, linear warmup, and
// the linear scaling rule, all closed forms of the step (so a resume needs no state).
#pragma once

#include <cstdint>
#include <vector>

#include "shardprop/settings.hpp"

namespace shardprop {

// The epochs of --lr-milestones ("30,60,90"), strictly increasing and positive; "" is none.
// Throws UsageError naming the flag and the value.
std::vector<std::uint64_t> parse_milestones(const std::string& text);

struct Schedule {
  double base = 0.05;          // --lr, times the global batch / --lr-scale-batch if given
  std::string kind = "constant";
  double decay = 0.1;          // step and multistep: the factor per milestone
  std::vector<std::uint64_t> milestones;  // epochs
  std::uint64_t warmup = 0;    // steps
  std::uint64_t total = 0;     // the run's optimizer steps (cosine and linear end there)
  std::uint64_t batches_per_epoch = 1;

  Schedule() = default;
  Schedule(const Settings& s, std::uint64_t total_steps, std::uint64_t batches_per_epoch);

  // The learning rate of optimizer step `step` (0-based):
  //   constant   base
  //   cosine     base · ½(1 + cos(π·step/total))
  //   linear     base · (1 − step/total)
  //   step       base · decay^⌊epoch/m⌋, m the one milestone (a period in epochs)
  //   multistep  base · decay^(milestones ≤ epoch)
  // with epoch = ⌊step / batches per epoch⌋, each times min(1, (step + 1)/warmup) while the
  // warmup lasts.
  double lr(std::uint64_t step) const;
};

}  // namespace shardprop
