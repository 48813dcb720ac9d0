// The communicator abstraction the trainer reduces through: real MPI, or an in-process group
// of threads standing in for ranks (for single-process tests of the reduction).
#pragma once

#include <mpi.h>

#include <barrier>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "shardprop/error.hpp"

namespace shardprop {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // In-place elementwise sum over all ranks; every rank receives the same values.
  virtual void allreduce_sum(std::span<float> data) = 0;
  virtual void allreduce_sum(std::span<double> data) = 0;
  virtual void allreduce_sum(std::span<std::int64_t> data) = 0;
  // Starts an in-place sum of `data` over all ranks, finished by wait_all(). Every rank
  // starts the same reductions in the same order, and leaves `data` alone until wait_all()
  // returns. This default reduces at once.
  virtual void start_allreduce_sum(std::span<float> data) { allreduce_sum(data); }
  virtual void start_allreduce_sum(std::span<double> data) { allreduce_sum(data); }
  virtual void start_allreduce_sum(std::span<std::int64_t> data) { allreduce_sum(data); }
  // Lets started reductions advance while the caller computes.
  virtual void progress() {}
  // Completes every started reduction.
  virtual void wait_all() {}
  // The largest of the ranks' values.
  virtual std::int64_t allreduce_max(std::int64_t value) = 0;
  // In-place elementwise maximum over all ranks (values must not be NaN).
  virtual void allreduce_max(std::span<double> data) = 0;
  // Copies root's bytes to every rank.
  virtual void broadcast(std::span<std::byte> data, int root) = 0;

  template <class T>
  void broadcast_values(std::span<T> values, int root) {
    broadcast(std::as_writable_bytes(values), root);
  }

  // What the ranks are doing, named in the error of a collective that fails or times out:
  // "step 42: MPI_Allreduce did not complete ...". `what` must outlive its use (a literal);
  // setting it allocates nothing, so the trainer sets it every step.
  void set_phase(const char* what, std::uint64_t step) {
    phase_what_ = what;
    phase_step_ = step;
  }
  void clear_phase() { phase_what_ = nullptr; }
  // "step 42: ", or "" when no phase is set.
  std::string phase() const;

 private:
  const char* phase_what_ = nullptr;
  std::uint64_t phase_step_ = 0;
};

// Runs `fn` on every rank. If it throws on any rank, every rank throws CollectiveFailure:
// the lowest failing rank with its own error text, the others without, so exactly one rank
// reports the cause.
template <class Fn>
void collective_check(Communicator& comm, Fn&& fn) {
  std::string error;
  bool failed_here = false;
  try {
    fn();
  } catch (const std::exception& e) {
    failed_here = true;
    error = e.what();
  }
  const std::int64_t failed = comm.allreduce_max(failed_here ? comm.size() - comm.rank() : 0);
  if (failed == 0) return;
  const bool reports = failed_here && comm.size() - comm.rank() == failed;
  throw CollectiveFailure(reports ? error : "rank " + std::to_string(comm.size() - failed) +
                                                " failed", reports);
}

// Throws shardprop::Error naming `what` unless an MPI call returned MPI_SUCCESS.
void check_mpi(int rc, const char* what);

// A duplicate of an MPI communicator (errors returned, not fatal). Move-only. Freeing a
// communicator is collective, so it happens in free(), never in the destructor; one that
// was not freed is reclaimed by MPI_Finalize.
class MpiComm final : public Communicator {
 public:
  explicit MpiComm(MPI_Comm parent = MPI_COMM_WORLD);
  MpiComm(MpiComm&& other) noexcept;
  MpiComm& operator=(MpiComm&& other) noexcept;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  ~MpiComm() override = default;

  // Collective: releases the duplicate.
  void free();
  // From now on every collective that has not completed `seconds` after it started throws
  // CollectiveTimeout on this rank (a rank may be stopped or hung); 0 waits forever. With
  // a timeout, collectives are the nonblocking kind, which never match blocking ones, so
  // every rank must either set one or not.
  void set_timeout(double seconds);
  MPI_Comm get() const { return comm_; }
  // How many ranks of this communicator share this rank's node.
  int ranks_on_node() const { return ranks_on_node_; }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void allreduce_sum(std::span<float> data) override;
  void allreduce_sum(std::span<double> data) override;
  // MPI_Iallreduce; a failed or abandoned step leaves requests that MPI_Finalize or
  // MPI_Abort reclaim (never a wait in the destructor).
  void start_allreduce_sum(std::span<float> data) override;
  void allreduce_sum(std::span<std::int64_t> data) override;
  void start_allreduce_sum(std::span<double> data) override;
  void start_allreduce_sum(std::span<std::int64_t> data) override;
  void progress() override;
  void wait_all() override;
  std::int64_t allreduce_max(std::int64_t value) override;
  void allreduce_max(std::span<double> data) override;
  void broadcast(std::span<std::byte> data, int root) override;

 private:
  // A blocking in-place MPI_Allreduce (or its nonblocking form under a timeout).
  void allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op);
  void start(void* data, std::size_t count, MPI_Datatype type);
  // Waits for `requests`, or throws CollectiveTimeout once the timeout has passed.
  void complete(std::span<MPI_Request> requests, const char* what);
  // A blocking collective: started by `start` (an MPI_I... call) and completed.
  template <class Start>
  void run(const char* what, Start&& start);

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::vector<MPI_Request> pending_;
  double timeout_s_ = 0;
  int rank_ = 0, size_ = 1, ranks_on_node_ = 1;
};

// P in-process ranks for tests: member(r) is rank r's endpoint; each must be used from its own
// thread, and all members must take part in every collective. Sums add the ranks' values in
// rank order, so every member gets identical results.
class LocalGroup {
 public:
  explicit LocalGroup(int size);
  ~LocalGroup();
  Communicator& member(int rank);

 private:
  class Member;
  friend class Member;
  template <class T, class Op>
  void allreduce(int rank, std::span<T> data, Op op);

  int size_;
  std::barrier<> barrier_;
  std::vector<const void*> slots_;
  std::vector<std::vector<std::byte>> scratch_;  // per member; grows, never shrinks
  std::vector<std::unique_ptr<Member>> members_;
};

}  // namespace shardprop
