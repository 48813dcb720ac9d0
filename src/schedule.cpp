#include "shardprop/schedule.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <numbers>

#include "shardprop/error.hpp"

namespace shardprop {

std::vector<std::uint64_t> parse_milestones(const std::string& text) {
  std::vector<std::uint64_t> epochs;
  if (text.empty()) return epochs;
  for (std::size_t start = 0; start <= text.size();) {
    const std::size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item(text.data() + start, comma - start);
    std::uint64_t epoch = 0;
    const auto [end, ec] = std::from_chars(item.data(), item.data() + item.size(), epoch);
    SP_CHECK_USAGE(ec == std::errc() && end == item.data() + item.size() && !item.empty() &&
                       epoch > 0,
                   "--lr-milestones '", text, "': '", item, "' is not a positive whole number "
                   "of epochs");
    SP_CHECK_USAGE(epochs.empty() || epoch > epochs.back(), "--lr-milestones '", text,
                   "': the epochs must increase (", epochs.empty() ? 0 : epochs.back(),
                   " then ", epoch, ")");
    epochs.push_back(epoch);
    start = comma + 1;
  }
  return epochs;
}

Schedule::Schedule(const Settings& s, std::uint64_t total_steps, std::uint64_t batches)
    : base(s.lr_scale_batch > 0 ? s.lr * double(s.batch) / double(s.lr_scale_batch) : s.lr),
      kind(s.lr_schedule),
      decay(s.lr_decay),
      milestones(parse_milestones(s.lr_milestones)),
      warmup(s.warmup_steps),
      total(total_steps),
      batches_per_epoch(std::max<std::uint64_t>(batches, 1)) {}

double Schedule::lr(std::uint64_t step) const {
  const double progress = total == 0 ? 0.0 : std::min(1.0, double(step) / double(total));
  const std::uint64_t epoch = step / batches_per_epoch;
  double rate = base;
  if (kind == "cosine") {
    rate = base * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
  } else if (kind == "linear") {
    rate = base * (1.0 - progress);
  } else if (kind == "step") {
    rate = base * std::pow(decay, double(milestones.empty() ? 0 : epoch / milestones.front()));
  } else if (kind == "multistep") {
    const auto passed = std::upper_bound(milestones.begin(), milestones.end(), epoch) -
                        milestones.begin();
    rate = base * std::pow(decay, double(passed));
  }
  if (step < warmup) rate *= double(step + 1) / double(warmup);
  return rate;
}

}  // namespace shardprop
