#include "shardprop/comm.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <utility>

namespace shardprop {

std::string Communicator::phase() const {
  if (!phase_what_) return {};
  return std::string(phase_what_) + " " + std::to_string(phase_step_) + ": ";
}

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  SP_THROW(what, " failed: ", std::string(text, std::size_t(length)));
}

namespace {
int checked_count(std::size_t n, const char* what) {
  SP_CHECK(n <= std::size_t(INT_MAX), what, ": ", n, " elements exceed MPI's int count");
  return static_cast<int>(n);
}
}  // namespace

MpiComm::MpiComm(MPI_Comm parent) {
  check_mpi(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
  try {
    check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
    check_mpi(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check_mpi(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
    pending_.reserve(64);  // one request per layer: no allocation in steady state
    MPI_Comm node = MPI_COMM_NULL;
    check_mpi(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node),
              "MPI_Comm_split_type");
    const int rc = MPI_Comm_size(node, &ranks_on_node_);
    check_mpi(MPI_Comm_free(&node), "MPI_Comm_free");
    check_mpi(rc, "MPI_Comm_size");
  } catch (...) {
    release();
    throw;
  }
}

MpiComm::MpiComm(MpiComm&& other) noexcept
    : comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
      pending_(std::move(other.pending_)),
      exchange_(std::move(other.exchange_)),
      exchanging_(std::exchange(other.exchanging_, MPI_REQUEST_NULL)),
      timeout_s_(other.timeout_s_),
      rank_(other.rank_),
      size_(other.size_),
      ranks_on_node_(other.ranks_on_node_) {}

MpiComm& MpiComm::operator=(MpiComm&& other) noexcept {
  if (this != &other) {
    release();
    comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
    pending_ = std::move(other.pending_);
    exchange_ = std::move(other.exchange_);
    exchanging_ = std::exchange(other.exchanging_, MPI_REQUEST_NULL);
    timeout_s_ = other.timeout_s_;
    rank_ = other.rank_;
    size_ = other.size_;
    ranks_on_node_ = other.ranks_on_node_;
  }
  return *this;
}

MpiComm::~MpiComm() { release(); }

void MpiComm::release() noexcept {
  if (comm_ == MPI_COMM_NULL) return;
  int finalized = 1;
  // After MPI_Finalize the communicator is gone with the rest of MPI.
  if (MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Comm_free(&comm_);
  comm_ = MPI_COMM_NULL;
}

void MpiComm::set_timeout(double seconds) {
  SP_CHECK_USAGE(seconds >= 0 && std::isfinite(seconds),
                 "--collective-timeout must be 0 or positive, got ", seconds);
  timeout_s_ = seconds;
}

void MpiComm::complete(std::span<MPI_Request> requests, const char* what) {
  if (timeout_s_ <= 0) {
    check_mpi(MPI_Waitall(int(requests.size()), requests.data(), MPI_STATUSES_IGNORE), what);
    return;
  }
  // MPI_Waitall cannot give up, so poll; MPI_Testall drives progress as MPI_Waitall would
  // (and yields when Open MPI is told to).
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration<double>(timeout_s_);
  for (;;) {
    int done = 0;
    check_mpi(MPI_Testall(int(requests.size()), requests.data(), &done, MPI_STATUSES_IGNORE),
              what);
    if (done) return;
    if (clock::now() > deadline) {
      throw CollectiveTimeout(
          detail::concat(phase(), what, " did not complete on every rank within ", timeout_s_,
                         " s (--collective-timeout): a rank is stopped, hung or lost"),
          __FILE__, __LINE__);
    }
  }
}

template <class Start>
void MpiComm::run(const char* what, Start&& start) {
  if (timeout_s_ <= 0) {  // the blocking call, as MPI implements it
    check_mpi(start(nullptr), what);
    return;
  }
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(start(&request), what);
  complete(std::span<MPI_Request>(&request, 1), what);
}

void MpiComm::allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) {
  const int n = checked_count(count, "MPI_Allreduce");
  run("MPI_Allreduce", [&](MPI_Request* r) {
    return r ? MPI_Iallreduce(MPI_IN_PLACE, data, n, type, op, comm_, r)
             : MPI_Allreduce(MPI_IN_PLACE, data, n, type, op, comm_);
  });
}

void MpiComm::start_allreduce(void* data, std::size_t count, MPI_Datatype type, MPI_Op op) {
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, checked_count(count, "MPI_Iallreduce"), type, op,
                           comm_, &request),
            "MPI_Iallreduce");
  pending_.push_back(request);
}

void MpiComm::broadcast_bytes(void* data, std::size_t bytes, int root) {
  // In pieces of at most 1 GiB: a count is an int.
  constexpr std::size_t kPiece = std::size_t(1) << 30;
  auto* p = static_cast<std::byte*>(data);
  std::size_t done = 0;
  do {
    const int n = int(std::min(kPiece, bytes - done));
    run("MPI_Bcast", [&](MPI_Request* r) {
      return r ? MPI_Ibcast(p + done, n, MPI_BYTE, root, comm_, r)
               : MPI_Bcast(p + done, n, MPI_BYTE, root, comm_);
    });
    done += std::size_t(n);
  } while (done < bytes);
}

void Communicator::start_alltoallv_bytes(const void* send,
                                         std::span<const std::size_t> send_counts,
                                         std::span<const std::size_t> send_offsets, void* recv,
                                         std::span<const std::size_t> recv_counts,
                                         std::span<const std::size_t> recv_offsets,
                                         std::size_t element) {
  SP_CHECK(size() == 1 && send_counts[0] == recv_counts[0],
           "alltoallv: this communicator exchanges nothing between ranks");
  if (send_counts[0] == 0) return;  // the buffers may be empty (null)
  std::memcpy(static_cast<std::byte*>(recv) + recv_offsets[0] * element,
              static_cast<const std::byte*>(send) + send_offsets[0] * element,
              send_counts[0] * element);
}

void MpiComm::start_alltoallv_bytes(const void* send, std::span<const std::size_t> send_counts,
                                    std::span<const std::size_t> send_offsets, void* recv,
                                    std::span<const std::size_t> recv_counts,
                                    std::span<const std::size_t> recv_offsets,
                                    std::size_t element) {
  SP_CHECK(exchanging_ == MPI_REQUEST_NULL, "an alltoallv is already under way");
  // Counts and displacements in bytes, each an int.
  const auto p = std::size_t(size_);
  exchange_.resize(4 * p);
  const std::span<const std::size_t> parts[] = {send_counts, send_offsets, recv_counts,
                                                recv_offsets};
  for (std::size_t k = 0; k < 4; ++k) {
    for (std::size_t q = 0; q < p; ++q) {
      exchange_[k * p + q] = checked_count(parts[k][q] * element, "MPI_Ialltoallv");
    }
  }
  const int* counts = exchange_.data();
  check_mpi(MPI_Ialltoallv(send, counts, counts + p, MPI_BYTE, recv, counts + 2 * p,
                           counts + 3 * p, MPI_BYTE, comm_, &exchanging_),
            "MPI_Ialltoallv");
}

void MpiComm::wait_alltoallv() {
  if (exchanging_ == MPI_REQUEST_NULL) return;
  try {
    complete(std::span<MPI_Request>(&exchanging_, 1), "MPI_Ialltoallv of the next rows");
  } catch (...) {  // abandoned to MPI_Abort or MPI_Finalize
    exchanging_ = MPI_REQUEST_NULL;
    throw;
  }
  exchanging_ = MPI_REQUEST_NULL;
}

void MpiComm::progress() {
  if (exchanging_ != MPI_REQUEST_NULL) {
    int done = 0;  // a completed request becomes MPI_REQUEST_NULL
    check_mpi(MPI_Test(&exchanging_, &done, MPI_STATUS_IGNORE), "MPI_Test");
  }
  if (pending_.empty()) return;
  int done = 0;
  check_mpi(MPI_Testall(int(pending_.size()), pending_.data(), &done, MPI_STATUSES_IGNORE),
            "MPI_Testall");
}

void MpiComm::wait_all() {
  if (pending_.empty()) return;
  try {
    complete(pending_, "MPI_Iallreduce of the gradient");
  } catch (...) {  // the requests are abandoned to MPI_Abort or MPI_Finalize
    pending_.clear();
    throw;
  }
  pending_.clear();
}

}  // namespace shardprop
