#include "node_memory.hpp"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "shardprop/error.hpp"

namespace shardprop {

namespace {

// An open file descriptor, closed on scope exit (a mapping outlives it).
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::string errno_text(const char* call) {
  return detail::concat(call, ": ", std::strerror(errno));
}

// Maps the object `name` (created by rank 0 with its size reserved) read-write.
std::byte* map(const char* name, std::size_t bytes, bool create, std::string& why) {
  Fd f;
  f.fd = ::shm_open(name, create ? O_CREAT | O_EXCL | O_RDWR : O_RDWR, 0600);
  if (f.fd < 0) {
    why = errno_text("shm_open");
    return nullptr;
  }
  if (create) {
    // Reserve every page now: a full /dev/shm then fails here, not with SIGBUS on first use.
    if (::ftruncate(f.fd, off_t(bytes)) != 0) {
      why = errno_text("ftruncate");
      return nullptr;
    }
    if (const int rc = ::posix_fallocate(f.fd, 0, off_t(bytes)); rc != 0) {
      why = detail::concat("posix_fallocate of ", bytes, " bytes: ", std::strerror(rc));
      return nullptr;
    }
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, f.fd, 0);
  if (p == MAP_FAILED) {
    why = errno_text("mmap");
    return nullptr;
  }
  return static_cast<std::byte*>(p);
}

}  // namespace

std::unique_ptr<NodeMemory> NodeMemory::create(Communicator& comm, std::size_t bytes,
                                               std::string& why) {
  if (!comm.single_node()) {
    why = "the ranks run on more than one node";
    return nullptr;
  }
  SP_CHECK(bytes > 0, "node memory of 0 bytes");
  // Ranks that disagree on the size (another model: the trainer's agreement check names
  // it) would map past the object's end.
  // Both reductions on every rank, whatever the first shows.
  const auto size = std::int64_t(bytes);
  const std::int64_t largest = comm.allreduce_max(size);
  const std::int64_t smallest = -comm.allreduce_max(-size);
  if (largest != size || smallest != size) {
    why = "the ranks disagree on the size of the shared memory (their models differ)";
    return nullptr;
  }
  // Rank 0 names and creates the object; the name travels with the outcome.
  static std::atomic<std::uint64_t> serial{0};
  std::array<char, 64> name{};
  std::byte* data = nullptr;
  if (comm.rank() == 0) {
    std::snprintf(name.data(), name.size(), "/shardprop-%ld-%llu", long(::getpid()),
                  static_cast<unsigned long long>(serial++));
    data = map(name.data(), bytes, true, why);
    if (!data) {
      ::shm_unlink(name.data());
      name[0] = '\0';
    }
  }
  comm.broadcast(std::span<char>(name), 0);
  if (comm.rank() != 0 && name[0] != '\0') data = map(name.data(), bytes, false, why);
  // Every rank has opened it (or failed): the name can go.
  const bool everywhere = comm.allreduce_max(std::int64_t(data == nullptr)) == 0;
  if (comm.rank() == 0 && name[0] != '\0') ::shm_unlink(name.data());
  if (!everywhere) {
    if (data) ::munmap(data, bytes);
    if (why.empty()) why = "another rank could not map the node's shared memory";
    return nullptr;
  }
  return std::unique_ptr<NodeMemory>(new NodeMemory(data, bytes));
}

NodeMemory::~NodeMemory() { ::munmap(data_, size_); }

void wait_at_least(const std::atomic<std::uint64_t>& counter, std::uint64_t value,
                   const Communicator& comm, const char* what) {
  using Clock = std::chrono::steady_clock;
  const double timeout = comm.timeout_seconds();
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout);
  for (std::uint64_t spins = 0; counter.load(std::memory_order_acquire) < value; ++spins) {
    if (spins < 1024) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
      continue;
    }
    ::sched_yield();
    if (timeout > 0 && (spins & 255) == 0 && Clock::now() > deadline) {
      throw CollectiveTimeout(
          detail::concat(comm.phase(), what, " did not complete on every rank within ", timeout,
                         " s (--collective-timeout): a rank is stopped, hung or lost"),
          __FILE__, __LINE__);
    }
  }
}

void NodeBarrier::arrive_and_wait(int ranks, const Communicator& comm, const char* what) {
  // The generation this barrier completes: no rank can complete it before this one arrives.
  const std::uint64_t generation = released_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == std::uint64_t(ranks)) {
    arrived_.store(0, std::memory_order_relaxed);
    released_.store(generation + 1, std::memory_order_release);
    return;
  }
  wait_at_least(released_, generation + 1, comm, what);
}

}  // namespace shardprop
