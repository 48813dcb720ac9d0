#include "exchange.hpp"

#include <algorithm>
#include <cstring>
#include <string>

#include "shardprop/error.hpp"

namespace shardprop {

RowExchange::RowExchange(Communicator& comm, const Dataset& data, std::size_t k, std::size_t chunk,
                         std::size_t node_rows)
    : comm_(comm),
      data_(data),
      k_(k),
      chunk_(chunk),
      width_(data.cols + (data.has_labels() ? 1 : data.target_cols)) {
  const auto p = std::size_t(comm.size());
  const std::size_t n = data.global_rows();
  for (int r = 0; r <= comm.size(); ++r) {
    starts_.push_back(r < comm.size() ? shard_range(n, r, comm.size()).begin : n);
  }
  const Range mine = shard_range(n, comm.rank(), comm.size());
  SP_CHECK(mine.begin == data.first && mine.size() == data.rows, "this rank holds rows [",
           data.first, ", ", data.first + data.rows, ") of ", n, ", but its block is [", mine.begin,
           ", ", mine.end, ")");
  for (auto* v : {&send_counts_, &send_offsets_, &recv_counts_, &recv_offsets_, &cursor_}) {
    v->assign(p, 0);
  }
  if (node_rows > 0 && p > 1) {
    // Every rank asks for the same size (the trainer's agreement check covers the batch).
    const std::size_t bytes = p * (sizeof(Counter) + 2 * node_rows * width_ * sizeof(float));
    std::string why;  // without node memory the rows travel through MPI, only slower
    node_ = NodeMemory::create(comm, bytes, why);
    if (node_) node_rows_ = node_rows;
  }
}

RowExchange::~RowExchange() = default;

std::atomic<std::uint64_t>& RowExchange::written(std::size_t rank) const {
  return reinterpret_cast<Counter*>(node_->data())[rank].written;
}

float* RowExchange::slot(std::size_t rank, std::uint64_t call) const {
  const std::size_t p = starts_.size() - 1, rows = node_rows_ * width_;
  float* slots = reinterpret_cast<float*>(node_->data() + p * sizeof(Counter));
  return slots + (2 * rank + call % 2) * rows;
}

std::size_t RowExchange::owner(std::uint32_t row) const {
  const std::size_t n = starts_.back(), p = starts_.size() - 1;
  SP_CHECK(row < n, "row ", row, " is outside the data set's ", n, " rows");
  // Block r is [⌊n·r/p⌋, ⌊n·(r+1)/p⌋), so ⌊row·p/n⌋ is the owner or before it (by one
  // unless blocks are empty).
  std::size_t r = std::size_t(row) * p / n;
  while (row >= starts_[r + 1]) ++r;
  return r;
}

template <class Fn>
void RowExchange::for_shard(std::size_t batch, int q, std::size_t micros, Fn&& fn) const {
  for (std::size_t m = 0; m < micros; ++m) {
    const Range part = micro_shard(batch, m, micros, q, comm_.size(), chunk_);
    for (std::size_t j = part.begin; j < part.end; ++j) fn(j);
  }
}

void RowExchange::gather(std::span<const std::uint32_t> batch, float* x, float* y,
                         std::size_t micros) {
  start(batch, micros);
  finish(batch, x, y, micros);
}

void RowExchange::start(std::span<const std::uint32_t> batch, std::size_t micros) {
  const int p = comm_.size();
  const auto me = std::size_t(comm_.rank());
  // Every rank decides alike: the batch size and node_rows_ are the same on all.
  staged_ = node_ && batch.size() <= node_rows_;
  if (staged_) ++calls_;
  std::size_t sent = 0;  // values for MPI to send
  float* out = nullptr;
  if (staged_) {
    // This slot last held the rows of two calls ago, which every rank has copied: finish()
    // of the last call waited until every rank had written its rows, which each does only
    // after its finish() of the call before. It holds node_rows_ rows, at least the batch.
    out = slot(me, calls_);
  } else {
    // How much every other rank needs from this one, for MPI.
    for (int q = 0; q < p; ++q) {
      send_offsets_[std::size_t(q)] = sent;
      if (std::size_t(q) != me) {
        for_shard(batch.size(), q, micros, [&](std::size_t j) {
          if (owner(batch[j]) == me) sent += width_;
        });
      }
      send_counts_[std::size_t(q)] = sent - send_offsets_[std::size_t(q)];
    }
    if (send_.size() < sent) send_.resize(sent);
    out = send_.data();
  }
  // What every other rank needs from this one, in the order of its shard (this rank's own
  // rows it copies itself, in finish()).
  const RowCopier copy_row(data_);
  for (int q = 0; q < p; ++q) {
    if (std::size_t(q) == me) continue;
    for_shard(batch.size(), q, micros, [&](std::size_t j) {
      if (owner(batch[j]) != me) return;
      const std::size_t row = batch[j] - data_.first;
      copy_row(row, out);
      if (data_.has_labels()) {
        std::memcpy(out + data_.cols, &data_.labels[row], sizeof(float));
      } else {
        std::copy_n(data_.targets.data() + row * data_.target_cols, data_.target_cols,
                    out + data_.cols);
      }
      out += width_;
    });
  }
  if (staged_) {
    written(me).store(calls_, std::memory_order_release);
    // Where this rank's rows start in each owner's slot: after those of the ranks before
    // it (each owner writes for the others in rank order).
    std::fill(cursor_.begin(), cursor_.end(), 0);
    for (int r = 0; r < int(me); ++r) {
      for_shard(batch.size(), r, micros, [&](std::size_t j) {
        if (const std::size_t q = owner(batch[j]); q != std::size_t(r)) cursor_[q] += width_;
      });
    }
    return;
  }
  // What this rank needs from every other, by owner.
  std::fill(recv_counts_.begin(), recv_counts_.end(), 0);
  for_shard(batch.size(), int(me), micros, [&](std::size_t j) {
    if (const std::size_t q = owner(batch[j]); q != me) recv_counts_[q] += width_;
  });
  std::size_t received = 0;
  for (std::size_t q = 0; q < std::size_t(p); ++q) {
    recv_offsets_[q] = received;
    cursor_[q] = received;
    received += recv_counts_[q];
  }
  if (recv_.size() < received) recv_.resize(received);
  comm_.start_alltoallv(std::span<const float>(send_.data(), sent), std::span(send_counts_),
                        std::span(send_offsets_), std::span<float>(recv_.data(), received),
                        std::span(recv_counts_), std::span(recv_offsets_));
}

void RowExchange::finish(std::span<const std::uint32_t> batch, float* x, float* y,
                         std::size_t micros) {
  const auto me = std::size_t(comm_.rank());
  if (staged_) {
    for (std::size_t q = 0; q + 1 < starts_.size(); ++q) {
      if (q != me) wait_at_least(written(q), calls_, comm_, "the exchange of the rows");
    }
  } else {
    comm_.wait_alltoallv();
  }
  // Each owner's rows arrive in the order of this shard: take them in turn.
  std::size_t i = 0;  // the row of x and y
  const RowCopier copy_row(data_);
  for_shard(batch.size(), comm_.rank(), micros, [&](std::size_t j) {
    const std::size_t q = owner(batch[j]);
    if (q == me) {
      copy_row(batch[j] - data_.first, x + i * data_.cols);
      gather_targets(data_, batch.subspan(j, 1), k_, y + i * k_);
      ++i;
      return;
    }
    const float* row = (staged_ ? slot(q, calls_) : recv_.data()) + cursor_[q];
    cursor_[q] += width_;
    std::copy_n(row, data_.cols, x + i * data_.cols);
    if (data_.has_labels()) {
      std::int32_t label = 0;
      std::memcpy(&label, row + data_.cols, sizeof label);
      label_target(label, k_, y + i * k_);
    } else {
      std::copy_n(row + data_.cols, k_, y + i * k_);
    }
    ++i;
  });
}

}  // namespace shardprop
