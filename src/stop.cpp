#include "shardprop/stop.hpp"

#include <atomic>

namespace shardprop {

namespace {

// Lock-free, so a signal handler may store to it.
std::atomic<int> requested{0};
static_assert(std::atomic<int>::is_always_lock_free);

}  // namespace

void request_stop(int signal) noexcept {
  int none = 0;
  requested.compare_exchange_strong(none, signal, std::memory_order_relaxed);
}

int stop_signal() noexcept { return requested.load(std::memory_order_relaxed); }

void clear_stop() noexcept { requested.store(0, std::memory_order_relaxed); }

}  // namespace shardprop
