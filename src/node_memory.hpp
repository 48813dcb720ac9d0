// Memory that every rank of a communicator maps, when all of them run on one node, and the
// barrier the ranks meet at inside it. The node reducer (src/reducer.cpp) keeps each rank's
// gradient sums, the mean gradient, the parameters and the optimizer's state there, so the
// ranks of a node reduce and update without copying anything through MPI.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "shardprop/comm.hpp"

namespace shardprop {

// A POSIX shared-memory object that rank 0 creates and names and every rank maps. It is
// unlinked as soon as every rank has mapped it, so nothing is left behind however the job
// ends. Move-only; the destructor unmaps (no collective).
class NodeMemory {
 public:
  // Collective. `bytes` zeroed bytes mapped on every rank, or null with `why` set when the
  // ranks do not all run on this node or some rank could not map them (every rank agrees).
  static std::unique_ptr<NodeMemory> create(Communicator& comm, std::size_t bytes,
                                            std::string& why);
  NodeMemory(const NodeMemory&) = delete;
  NodeMemory& operator=(const NodeMemory&) = delete;
  ~NodeMemory();

  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }

 private:
  NodeMemory(std::byte* data, std::size_t size) : data_(data), size_(size) {}
  std::byte* data_;
  std::size_t size_;
};

// Waits until `counter` (which only grows) reaches `value`, as a rank of a node waits for
// the others: a brief spin, then yielding the core (more ranks than cores must still
// progress). Throws CollectiveTimeout naming `comm`'s phase and `what` when
// comm.timeout_seconds() pass first.
void wait_at_least(const std::atomic<std::uint64_t>& counter, std::uint64_t value,
                   const Communicator& comm, const char* what);

// A barrier for the `ranks` ranks of a node, kept in shared memory (zeroed at the start).
// Waiters spin briefly, then yield the core: more ranks than cores must still progress.
class NodeBarrier {
 public:
  // Waits until every rank has arrived. `comm` names the phase in the error of a wait that
  // exceeds its timeout (CollectiveTimeout); `what` names the meeting point.
  void arrive_and_wait(int ranks, const Communicator& comm, const char* what);

 private:
  alignas(64) std::atomic<std::uint64_t> arrived_{0};
  alignas(64) std::atomic<std::uint64_t> released_{0};  // barriers completed
};

}  // namespace shardprop
