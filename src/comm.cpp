#include "shardprop/comm.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <utility>

namespace shardprop {

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(rc, text, &length) != MPI_SUCCESS) length = 0;
  SP_THROW(what, " failed: ", std::string(text, std::size_t(length)));
}

std::string Communicator::phase() const {
  if (!phase_what_) return {};
  return std::string(phase_what_) + " " + std::to_string(phase_step_) + ": ";
}

namespace {
int checked_count(std::size_t n, const char* what) {
  SP_CHECK(n <= std::size_t(INT_MAX), what, ": ", n, " elements exceed MPI's int count");
  return static_cast<int>(n);
}
}  // namespace

MpiComm::MpiComm(MPI_Comm parent) {
  check_mpi(MPI_Comm_dup(parent, &comm_), "MPI_Comm_dup");
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
  error_rank() = size_ > 1 ? rank_ : -1;
}

MpiComm::MpiComm(MpiComm&& other) noexcept
    : comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
      pending_(std::move(other.pending_)),
      timeout_s_(other.timeout_s_),
      rank_(other.rank_),
      size_(other.size_),
      ranks_on_node_(other.ranks_on_node_) {}

MpiComm& MpiComm::operator=(MpiComm&& other) noexcept {
  comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
  pending_ = std::move(other.pending_);
  timeout_s_ = other.timeout_s_;
  rank_ = other.rank_;
  size_ = other.size_;
  ranks_on_node_ = other.ranks_on_node_;
  return *this;
}

void MpiComm::free() {
  if (comm_ != MPI_COMM_NULL) check_mpi(MPI_Comm_free(&comm_), "MPI_Comm_free");
}

void MpiComm::set_timeout(double seconds) {
  SP_CHECK(seconds >= 0 && std::isfinite(seconds), "collective timeout must be 0 or positive, got ",
           seconds);
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

void MpiComm::allreduce_sum(std::span<float> data) {
  allreduce(data.data(), data.size(), MPI_FLOAT, MPI_SUM);
}

void MpiComm::allreduce_sum(std::span<double> data) {
  allreduce(data.data(), data.size(), MPI_DOUBLE, MPI_SUM);
}

void MpiComm::allreduce_sum(std::span<std::int64_t> data) {
  allreduce(data.data(), data.size(), MPI_INT64_T, MPI_SUM);
}

void MpiComm::allreduce_max(std::span<double> data) {
  allreduce(data.data(), data.size(), MPI_DOUBLE, MPI_MAX);
}

void MpiComm::start(void* data, std::size_t count, MPI_Datatype type) {
  MPI_Request request = MPI_REQUEST_NULL;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, checked_count(count, "MPI_Iallreduce"), type,
                           MPI_SUM, comm_, &request),
            "MPI_Iallreduce");
  pending_.push_back(request);
}

void MpiComm::start_allreduce_sum(std::span<float> data) {
  start(data.data(), data.size(), MPI_FLOAT);
}

void MpiComm::start_allreduce_sum(std::span<double> data) {
  start(data.data(), data.size(), MPI_DOUBLE);
}

void MpiComm::start_allreduce_sum(std::span<std::int64_t> data) {
  start(data.data(), data.size(), MPI_INT64_T);
}

void MpiComm::progress() {
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

std::int64_t MpiComm::allreduce_max(std::int64_t value) {
  allreduce(&value, 1, MPI_INT64_T, MPI_MAX);
  return value;
}

void MpiComm::broadcast(std::span<std::byte> data, int root) {
  const int n = checked_count(data.size(), "MPI_Bcast");
  run("MPI_Bcast", [&](MPI_Request* r) {
    return r ? MPI_Ibcast(data.data(), n, MPI_BYTE, root, comm_, r)
             : MPI_Bcast(data.data(), n, MPI_BYTE, root, comm_);
  });
}

namespace {
struct Sum {
  template <class T>
  T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <class T>
  T operator()(T a, T b) const { return std::max(a, b); }
};
}  // namespace

class LocalGroup::Member final : public Communicator {
 public:
  Member(LocalGroup& group, int rank) : group_(group), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_.size_; }
  void allreduce_sum(std::span<float> data) override { group_.allreduce(rank_, data, Sum{}); }
  void allreduce_sum(std::span<double> data) override { group_.allreduce(rank_, data, Sum{}); }
  void allreduce_sum(std::span<std::int64_t> data) override {
    group_.allreduce(rank_, data, Sum{});
  }
  std::int64_t allreduce_max(std::int64_t value) override {
    group_.allreduce(rank_, std::span<std::int64_t>(&value, 1), Max{});
    return value;
  }
  void allreduce_max(std::span<double> data) override { group_.allreduce(rank_, data, Max{}); }
  void broadcast(std::span<std::byte> data, int root) override {
    group_.slots_[std::size_t(rank_)] = data.data();
    group_.barrier_.arrive_and_wait();
    if (rank_ != root) {
      std::memcpy(data.data(), group_.slots_[std::size_t(root)], data.size());
    }
    group_.barrier_.arrive_and_wait();
  }

 private:
  LocalGroup& group_;
  int rank_;
};

LocalGroup::LocalGroup(int size)
    : size_(size), barrier_(size), slots_(std::size_t(size)), scratch_(std::size_t(size)) {
  SP_CHECK(size > 0, "LocalGroup size must be positive, got ", size);
  for (int r = 0; r < size; ++r) members_.push_back(std::make_unique<Member>(*this, r));
}

LocalGroup::~LocalGroup() = default;

Communicator& LocalGroup::member(int rank) { return *members_.at(std::size_t(rank)); }

template <class T, class Op>
void LocalGroup::allreduce(int rank, std::span<T> data, Op op) {
  slots_[std::size_t(rank)] = data.data();
  auto& scratch = scratch_[std::size_t(rank)];
  if (scratch.size() < data.size_bytes()) scratch.resize(data.size_bytes());
  T* result = reinterpret_cast<T*>(scratch.data());
  barrier_.arrive_and_wait();
  std::copy_n(static_cast<const T*>(slots_[0]), data.size(), result);
  for (std::size_t r = 1; r < slots_.size(); ++r) {
    const T* contribution = static_cast<const T*>(slots_[r]);
    for (std::size_t i = 0; i < data.size(); ++i) result[i] = op(result[i], contribution[i]);
  }
  barrier_.arrive_and_wait();  // everyone has read every contribution
  std::copy_n(result, data.size(), data.begin());
}

}  // namespace shardprop
