// The communicator the trainer reduces through. MpiComm is MPI's; tests substitute an
// in-process group of threads standing in for ranks (tests/local_group.hpp).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "shardprop/error.hpp"

namespace shardprop {

// The MPI datatype of a C++ element type.
template <class T>
MPI_Datatype mpi_type();
template <> inline MPI_Datatype mpi_type<float>() { return MPI_FLOAT; }
template <> inline MPI_Datatype mpi_type<double>() { return MPI_DOUBLE; }
template <> inline MPI_Datatype mpi_type<std::int32_t>() { return MPI_INT32_T; }
template <> inline MPI_Datatype mpi_type<std::int64_t>() { return MPI_INT64_T; }
template <> inline MPI_Datatype mpi_type<std::uint64_t>() { return MPI_UINT64_T; }
template <> inline MPI_Datatype mpi_type<std::byte>() { return MPI_BYTE; }

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // In-place elementwise sum over all ranks; every rank receives the same values.
  template <class T>
  void allreduce_sum(std::span<T> data) {
    allreduce(data.data(), data.size(), mpi_type<T>(), MPI_SUM);
  }
  // In-place elementwise maximum over all ranks (floating-point values must not be NaN).
  template <class T>
  void allreduce_max(std::span<T> data) {
    allreduce(data.data(), data.size(), mpi_type<T>(), MPI_MAX);
  }
  // The largest of the ranks' values.
  template <class T>
  T allreduce_max(T value) {
    allreduce(&value, 1, mpi_type<T>(), MPI_MAX);
    return value;
  }
  // Starts an in-place sum of `data` over all ranks, finished by wait_all(). Every rank
  // starts the same reductions in the same order, and leaves `data` alone until wait_all()
  // returns.
  template <class T>
  void start_allreduce_sum(std::span<T> data) {
    start_allreduce(data.data(), data.size(), mpi_type<T>(), MPI_SUM);
  }
  // Copies root's values to every rank.
  template <class T>
  void broadcast(std::span<T> data, int root) {
    broadcast_bytes(data.data(), data.size_bytes(), root);
  }
  // Starts an exchange in which every rank sends send[send_offsets[q], + send_counts[q]) to
  // rank q and receives rank q's part for it into recv[recv_offsets[q], + recv_counts[q])
  // (counts and offsets in elements, one entry per rank; each pair of ranks agrees on the
  // count). wait_alltoallv() finishes it; progress() advances it meanwhile. The buffers and
  // counts must stay untouched until then. One at a time.
  template <class T>
  void start_alltoallv(std::span<const T> send, std::span<const std::size_t> send_counts,
                       std::span<const std::size_t> send_offsets, std::span<T> recv,
                       std::span<const std::size_t> recv_counts,
                       std::span<const std::size_t> recv_offsets) {
    SP_CHECK(send_counts.size() == std::size_t(size()) && recv_counts.size() == send_counts.size() &&
                 send_offsets.size() == send_counts.size() &&
                 recv_offsets.size() == send_counts.size(),
             "alltoallv: one count and offset per rank");
    for (std::size_t q = 0; q < send_counts.size(); ++q) {
      SP_CHECK(send_offsets[q] + send_counts[q] <= send.size() &&
                   recv_offsets[q] + recv_counts[q] <= recv.size(),
               "alltoallv: a part lies outside its buffer");
    }
    start_alltoallv_bytes(send.data(), send_counts, send_offsets, recv.data(), recv_counts,
                          recv_offsets, sizeof(T));
  }
  // Completes the started alltoallv (none: returns at once).
  virtual void wait_alltoallv() {}
  // Whether every rank runs on this rank's node (and can share its memory).
  virtual bool single_node() const { return false; }
  // Seconds a collective may wait for the other ranks (0: forever).
  virtual double timeout_seconds() const { return 0; }
  // Lets started reductions advance while the caller computes.
  virtual void progress() {}
  // Completes every started reduction.
  virtual void wait_all() {}

  // What the ranks are doing, named in the error of a collective that times out:
  // "step 42: MPI_Allreduce did not complete ...". `what` must outlive its use (a literal);
  // setting it allocates nothing, so the trainer sets it every step.
  void set_phase(const char* what, std::uint64_t step) {
    phase_what_ = what;
    phase_step_ = step;
  }
  void clear_phase() { phase_what_ = nullptr; }
  // "step 42: ", or "" when no phase is set.
  std::string phase() const;

 protected:
  virtual void allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) = 0;
  // By default a blocking reduction, done at once.
  virtual void start_allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) {
    allreduce(data, count, type, op);
  }
  virtual void broadcast_bytes(void* data, std::size_t bytes, int root) = 0;
  // start_alltoallv of elements of `element` bytes. By default (one rank alone) a copy,
  // done at once.
  virtual void start_alltoallv_bytes(const void* send, std::span<const std::size_t> send_counts,
                                     std::span<const std::size_t> send_offsets, void* recv,
                                     std::span<const std::size_t> recv_counts,
                                     std::span<const std::size_t> recv_offsets,
                                     std::size_t element);

 private:
  const char* phase_what_ = nullptr;
  std::uint64_t phase_step_ = 0;
};

// Runs `fn` on every rank. If it throws on any rank, every rank throws CollectiveFailure:
// the lowest failing rank with its own error text, the others without, so exactly one rank
// reports the cause; all carry the reporting rank's exit status.
template <class Fn>
void collective_check(Communicator& comm, Fn&& fn) {
  std::string error;
  int status = 0;
  try {
    fn();
  } catch (const Error& e) {
    status = e.exit_status();
    error = status == kExitUsage ? e.message() + " (see --help)" : e.what();
  } catch (const std::exception& e) {
    error = e.what();
    status = kExitFailure;
  }
  // The lowest failing rank has the largest size - rank; its status rides in the low byte.
  const std::int64_t mine = status ? std::int64_t(comm.size() - comm.rank()) << 8 | status : 0;
  const std::int64_t worst = comm.allreduce_max(mine);
  if (worst == 0) return;
  const bool reports = mine == worst;
  const int failed_rank = comm.size() - int(worst >> 8);
  throw CollectiveFailure(reports ? error : "rank " + std::to_string(failed_rank) + " failed",
                          reports, int(worst & 0xff));
}

// Throws shardprop::Error naming `what` unless an MPI call returned MPI_SUCCESS.
void check_mpi(int rc, const char* what);

// A duplicate of an MPI communicator, with errors returned instead of fatal. Move-only; the
// destructor frees the duplicate (MPI_Comm_free only marks it for deallocation and waits for
// no other rank, so this is safe while an exception unwinds).
class MpiComm final : public Communicator {
 public:
  explicit MpiComm(MPI_Comm parent = MPI_COMM_WORLD);
  MpiComm(MpiComm&& other) noexcept;
  MpiComm& operator=(MpiComm&& other) noexcept;
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;
  ~MpiComm() override;

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
  bool single_node() const override { return ranks_on_node_ == size_; }
  double timeout_seconds() const override { return timeout_s_; }
  void progress() override;
  // A failed or abandoned step leaves requests that MPI_Finalize or MPI_Abort reclaim
  // (never a wait in the destructor).
  void wait_all() override;
  void wait_alltoallv() override;

 protected:
  void allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) override;
  void start_allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) override;
  void broadcast_bytes(void* data, std::size_t bytes, int root) override;
  void start_alltoallv_bytes(const void* send, std::span<const std::size_t> send_counts,
                             std::span<const std::size_t> send_offsets, void* recv,
                             std::span<const std::size_t> recv_counts,
                             std::span<const std::size_t> recv_offsets,
                             std::size_t element) override;

 private:
  void release() noexcept;
  // Waits for `requests`, or throws CollectiveTimeout once the timeout has passed.
  void complete(std::span<MPI_Request> requests, const char* what);
  // A blocking collective: started by `start` (an MPI_I... call) and completed.
  template <class Start>
  void run(const char* what, Start&& start);

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::vector<MPI_Request> pending_;
  std::vector<int> exchange_;  // alltoallv's counts and displacements, in bytes
  MPI_Request exchanging_ = MPI_REQUEST_NULL;  // the started alltoallv
  double timeout_s_ = 0;
  int rank_ = 0, size_ = 1, ranks_on_node_ = 1;
};

}  // namespace shardprop
