// P in-process ranks for single-process tests of the reduction: threads standing in for
// MPI ranks, each with a Communicator of its own. Sums add the ranks' values in rank order,
// so every rank gets identical results.
#pragma once

#include <algorithm>
#include <barrier>
#include <cstring>
#include <exception>
#include <memory>
#include <thread>
#include <vector>

#include "shardprop/comm.hpp"

namespace shardprop::testing {

class LocalGroup {
 public:
  explicit LocalGroup(int size) : size_(size), barrier_(size), slots_(std::size_t(size)) {
    SP_CHECK(size > 0, "LocalGroup size must be positive, got ", size);
    for (int r = 0; r < size; ++r) members_.push_back(std::make_unique<Member>(*this, r));
  }

  // Rank r's endpoint; each must be used from its own thread, and all members must take
  // part in every collective.
  Communicator& member(int rank) { return *members_.at(std::size_t(rank)); }

 private:
  class Member final : public Communicator {
   public:
    Member(LocalGroup& group, int rank) : group_(group), rank_(rank) {}
    int rank() const override { return rank_; }
    int size() const override { return group_.size_; }
    bool single_node() const override { return true; }

   protected:
    void allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) override {
      if (type == MPI_FLOAT) return group_.reduce<float>(rank_, data, count, op, scratch_);
      if (type == MPI_DOUBLE) return group_.reduce<double>(rank_, data, count, op, scratch_);
      if (type == MPI_INT64_T) return group_.reduce<std::int64_t>(rank_, data, count, op, scratch_);
      if (type == MPI_UINT64_T) {
        return group_.reduce<std::uint64_t>(rank_, data, count, op, scratch_);
      }
      if (type == MPI_INT32_T) return group_.reduce<std::int32_t>(rank_, data, count, op, scratch_);
      SP_THROW("LocalGroup: unsupported datatype");
    }
    void broadcast_bytes(void* data, std::size_t bytes, int root) override {
      group_.slots_[std::size_t(rank_)] = data;
      group_.barrier_.arrive_and_wait();
      if (rank_ != root) std::memcpy(data, group_.slots_[std::size_t(root)], bytes);
      group_.barrier_.arrive_and_wait();
    }
    // Done at once: wait_alltoallv() has nothing left to wait for.
    void start_alltoallv_bytes(const void* send, std::span<const std::size_t> send_counts,
                               std::span<const std::size_t> send_offsets, void* recv,
                               std::span<const std::size_t> recv_counts,
                               std::span<const std::size_t> recv_offsets,
                               std::size_t element) override {
      const Parts mine{static_cast<const std::byte*>(send), send_counts, send_offsets};
      group_.slots_[std::size_t(rank_)] = const_cast<Parts*>(&mine);
      group_.barrier_.arrive_and_wait();
      for (std::size_t q = 0; q < recv_counts.size(); ++q) {
        const auto& theirs = *static_cast<const Parts*>(group_.slots_[q]);
        const auto me = std::size_t(rank_);
        SP_CHECK(theirs.counts[me] == recv_counts[q], "LocalGroup alltoallv: rank ", q,
                 " sends ", theirs.counts[me], " elements, rank ", rank_, " expects ",
                 recv_counts[q]);
        if (recv_counts[q] == 0) continue;  // the buffers may be empty (null)
        std::memcpy(static_cast<std::byte*>(recv) + recv_offsets[q] * element,
                    theirs.data + theirs.offsets[me] * element, recv_counts[q] * element);
      }
      group_.barrier_.arrive_and_wait();  // everyone has copied from every sender
    }

   private:
    struct Parts {
      const std::byte* data;
      std::span<const std::size_t> counts, offsets;
    };
    LocalGroup& group_;
    int rank_;
    std::vector<std::byte> scratch_;  // grows, never shrinks
  };

  template <class T>
  void reduce(int rank, void* data, std::size_t count, MPI_Op op, std::vector<std::byte>& scratch) {
    SP_CHECK(op == MPI_SUM || op == MPI_MAX, "LocalGroup: unsupported operation");
    slots_[std::size_t(rank)] = data;
    if (scratch.size() < count * sizeof(T)) scratch.resize(count * sizeof(T));
    T* result = reinterpret_cast<T*>(scratch.data());
    barrier_.arrive_and_wait();
    std::copy_n(static_cast<const T*>(slots_[0]), count, result);
    for (std::size_t r = 1; r < slots_.size(); ++r) {
      const T* contribution = static_cast<const T*>(slots_[r]);
      for (std::size_t i = 0; i < count; ++i) {
        result[i] = op == MPI_SUM ? result[i] + contribution[i] : std::max(result[i], contribution[i]);
      }
    }
    barrier_.arrive_and_wait();  // everyone has read every contribution
    std::copy_n(result, count, static_cast<T*>(data));
  }

  int size_;
  std::barrier<> barrier_;
  std::vector<void*> slots_;
  std::vector<std::unique_ptr<Member>> members_;
};

// Runs fn(comm) on `ranks` in-process ranks, one thread each, and waits for all of them;
// rethrows the lowest rank's exception, if any.
template <class Fn>
void run_ranks(int ranks, Fn&& fn) {
  LocalGroup group(ranks);
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      try {
        fn(group.member(r));
      } catch (...) {
        errors[std::size_t(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace shardprop::testing
