// The rows of each step's minibatch, when every rank holds only its block of the training
// set (--data-placement partitioned). Every rank knows the global batch and how it is
// sharded, so each knows without asking which of its rows every other rank needs and which
// rows it needs from whom: one all-to-all per step moves them. When every rank runs on one
// node, the rows go through memory the ranks share instead: each rank writes the rows the
// others need into its slot there, and each copies its rows straight from their owners'
// slots (no MPI message, one copy fewer). The rows a rank receives are byte for byte those
// it would have copied from a whole copy of the set.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "node_memory.hpp"
#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/params.hpp"

namespace shardprop {

class RowExchange {
 public:
  // `data` is this rank's block (data.first, data.rows) of a set of data.global_rows() rows,
  // the blocks of the ranks being shard_range(N, r, P) for r in [0, P). `k` is the model's
  // output width, `chunk` the rows per chunk of the trainer's sharding. Collective. Global
  // batches of up to `node_rows` rows go through node memory when the ranks share a node
  // (0: always through MPI); larger ones, and every batch across nodes, through MPI.
  RowExchange(Communicator& comm, const Dataset& data, std::size_t k, std::size_t chunk,
              std::size_t node_rows = 0);
  ~RowExchange();
  RowExchange(const RowExchange&) = delete;
  RowExchange& operator=(const RowExchange&) = delete;
  // Whether batches of up to node_rows rows go through node memory.
  bool through_node() const { return node_ != nullptr; }

  // Collective: every rank passes the same global batch (indices of the whole set). Writes
  // this rank's shard of it (shard_range(batch.size(), rank, P, chunk)) as gather() would:
  // x (rows × D) and y (rows × k). With `micros` micro-batches, the shard is this rank's
  // parts of them (micro_shard), one after the other.
  void gather(std::span<const std::uint32_t> batch, float* x, float* y, std::size_t micros = 1);
  // gather() in two halves, so that the rows travel while the caller computes: start()
  // sends this rank's rows (collective), finish() waits for the others' and writes the
  // shard. The batch must stay valid in between.
  void start(std::span<const std::uint32_t> batch, std::size_t micros = 1);
  void finish(std::span<const std::uint32_t> batch, float* x, float* y, std::size_t micros = 1);

 private:
  // The node memory holds a counter per rank, then two slots of node_rows_ rows per rank
  // (calls alternate between them): those it writes for the others.
  struct Counter {
    alignas(64) std::atomic<std::uint64_t> written;  // the last call whose rows it wrote
  };
  std::atomic<std::uint64_t>& written(std::size_t rank) const;
  float* slot(std::size_t rank, std::uint64_t call) const;
  // The rank whose block holds `row`.
  std::size_t owner(std::uint32_t row) const;
  // Calls fn(j) for each position j of rank q's shard of `batch`, in order.
  template <class Fn>
  void for_shard(std::size_t batch, int q, std::size_t micros, Fn&& fn) const;

  Communicator& comm_;
  const Dataset& data_;
  std::size_t k_, chunk_, width_;
  std::vector<std::size_t> starts_;  // rank r holds [starts_[r], starts_[r + 1])
  std::vector<std::size_t> send_counts_, send_offsets_, recv_counts_, recv_offsets_, cursor_;
  AlignedVector<float> send_, recv_;  // rows of width_ values: features, then the target
  std::unique_ptr<NodeMemory> node_;  // null: every batch through MPI
  std::size_t node_rows_ = 0;
  std::uint64_t calls_ = 0;  // calls through node memory so far, the same on every rank
  bool staged_ = false;      // whether the call under way goes through node memory
};

}  // namespace shardprop
