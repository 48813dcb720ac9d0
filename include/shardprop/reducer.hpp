// How a gradient is reduced across the ranks. Backward hands each layer's input and δ to a
// GradReducer as soon as they are final, from the last layer down; the reducer computes the
// layer's gradient sums over this rank's rows and starts their reduction while the layers
// below still compute, as PyTorch DDP's reducer sits behind backward. Three reducers exist:
//   - the MPI one sums in float and reduces each layer with MPI_Iallreduce (or, without
//     overlap, the whole gradient at once after backward);
//   - the node one, for ranks that all run on one node: each rank writes its sums into
//     memory the ranks share, and after backward each rank averages its share of the
//     elements and updates its share of one shared copy of the parameters and optimizer
//     state (nothing is copied through MPI, and each rank updates 1/P of the parameters);
//   - the fixed-point one (--deterministic) sums each chunk's gradient as integers at a
//     fixed point every rank agrees on, so the result is the same bits for any number of
//     ranks and threads (docs/reproducibility.md); through MPI, or through node memory as
//     the node reducer does, each rank then updating its share in place.
// Either way the result is the mean gradient of the global minibatch on every rank.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/function_ref.hpp"
#include "shardprop/loss.hpp"
#include "shardprop/params.hpp"

namespace shardprop {

// The reduced statistics of a global minibatch.
struct MinibatchStats {
  double loss_sum = 0;
  double correct = 0;
  double samples = 0;
  int nonfinite_layer = -1;  // the first layer whose mean gradient holds NaN or Inf
  // With --clip-norm: the mean gradient's global norm (all layers), and whether the step
  // scaled it down to the limit.
  double grad_norm = 0;
  bool clipped = false;
};

// Loss and accuracy over a data set (or a minibatch).
struct EvalStats {
  double loss = 0, accuracy = 0;
  std::size_t samples = 0;
};

// Seconds spent in the parts of training steps, summed over steps.
struct StepTimes {
  double compute = 0;    // forward and backward of this rank's shard
  double allreduce = 0;  // waiting for the gradient's reduction
  double total = 0;      // whole steps (gather, compute, reduction, checks, optimizer)
  std::uint64_t steps = 0;
};

// The bf16 mode's roundings of a layer's input and δ to bfloat16 (same shapes, row-major):
// the operands of its weight-gradient product. Null in float32 mode.
struct Bf16Operands {
  const std::uint16_t* input = nullptr;
  const std::uint16_t* delta = nullptr;
};

// The optimizer's update of part of the parameters, which the node reducer runs inside
// finish() in place of writing the mean gradient: element i's gradient is
// (sums[0][i] + sums[1][i] + …)·scale. Returns false if one was NaN or Inf.
template <class T>
class ShareUpdate {
 public:
  virtual bool operator()(std::span<const T* const> sums, T scale, Range part) = 0;

 protected:
  ~ShareUpdate() = default;
};

template <class T>
class GradReducer {
 public:
  virtual ~GradReducer() = default;

  // The rows per chunk that forward and backward must use (0: split by threads).
  virtual std::size_t chunk() const = 0;
  // A new global minibatch of `global_rows` rows, of which this rank holds `rows`.
  virtual void begin(std::size_t rows, std::size_t global_rows) = 0;
  // The loss sums of this rank's rows, one entry per chunk (chunk_count(rows, chunk())).
  virtual void loss(std::span<const LossSums> sums) = 0;
  // Layer l's input (rows, in) and δ (rows, out) are final: computes the gradient sums of
  // its W and b and starts reducing them. Called for every layer, last to first.
  virtual void layer(std::size_t l, ConstMatrixView<T> input, ConstMatrixView<T> delta,
                     Bf16Operands bf16) = 0;
  // Lets started reductions advance; backward calls it between its kernels.
  virtual void progress() = 0;
  // Gradient accumulation (--accumulate): called before each of a step's `count`
  // micro-batches (0-based `index`) after begin(), which counted the rows of all of them.
  // Each micro-batch's rows then go through loss() and layer() as a minibatch's do; their
  // sums add up, and only the last one's layer() calls start reducing (nothing travels
  // before, like DDP's no_sync). A reducer that needs_bounds() first sees every micro-batch
  // once with `measure` set, when it only measures the largest gradient values. Without
  // calls the step is one micro-batch.
  void micro(std::size_t index, std::size_t count, bool measure = false) {
    micro_ = index;
    micros_ = count;
    measuring_ = measure;
    on_micro();
  }
  // Whether a step of several micro-batches needs the measuring pass (the fixed point's
  // exponents must hold for the sums of every micro-batch before any is summed).
  virtual bool needs_bounds() const { return false; }
  // Starts the statistics' reduction, runs before_wait() (work that overlaps the wait),
  // waits, and divides by the global sample count. gradient() then holds the mean gradient
  // of the global minibatch, the same on every rank; a NaN or Inf in it or in the loss is
  // reported in the returned stats. Adds its times to `times` if given. A reducer that
  // fuses the update (fuses_update()) runs `update` on this rank's share instead of
  // writing the mean gradient; the others ignore it.
  virtual MinibatchStats finish(Callback before_wait = {}, StepTimes* times = nullptr,
                                ShareUpdate<T>* update = nullptr) = 0;
  // The mean gradient after finish() without an update, in the parameters' layout (padding
  // zero). A reducer that shares it through node memory has only this rank's share()
  // written by then; whole_gradient() waits for the other ranks' shares.
  virtual std::span<const T> gradient() const = 0;
  virtual void whole_gradient() {}
  // Whether finish() runs the optimizer's update (the node reducer).
  virtual bool fuses_update() const { return false; }
  std::size_t gradient_size() const { return gradient().size(); }

  // Memory for the parameters and the optimizer's state that the ranks of a node share (the
  // node reducer's two copies, 0 and 1, sized by make_node_reducer: a step reads one and
  // writes the other), or empty: each rank keeps its own.
  virtual std::span<T> shared_storage(int /*copy*/) { return {}; }
  // The part of the parameters (and of each optimizer state vector) this rank writes: all of
  // it, or with shared storage this rank's share, the other ranks writing the rest.
  virtual Range share() const { return {0, gradient_size()}; }
  // Lays out an elementwise pass over share() for the threads: calls run(begin, end) on
  // disjoint ranges covering it, in parallel. A reducer that knows which thread computed
  // which values hands them back to it (the optimizer's update then reads them from the
  // cache they were written to).
  virtual void share_runs(FunctionRef<std::size_t, std::size_t> run) const;
  // After every rank has written its share of the shared storage (the first parameters, a
  // restore, or an update that is not fused): waits until all have, so that every rank
  // reads the whole copy.
  virtual void shared_written() {}

  // Evaluation: the sums over all ranks of per-chunk loss sums `parts` covering this rank's
  // `rows` rows, of `terms` chunks in all; summed as training sums them.
  virtual EvalStats reduce_losses(std::span<const LossSums> parts, std::size_t rows,
                                  std::size_t terms) = 0;

 protected:
  virtual void on_micro() {}
  bool first_micro() const { return micro_ == 0; }
  bool last_micro() const { return micro_ + 1 == micros_; }
  std::size_t micro_ = 0, micros_ = 1;
  bool measuring_ = false;
};

// The reducer of a training mode: with chunk > 0 the fixed-point one (float only), else the
// MPI one, reducing per layer while backward goes on (overlap) or once after it.
template <class T>
std::unique_ptr<GradReducer<T>> make_reducer(const Layout& layout, Communicator& comm,
                                             std::size_t chunk, bool overlap = true);

// The node reducer, with two copies of `storage` values of shared storage, or with chunk > 0
// the fixed-point one combining through node memory (one copy). Collective: null with `why`
// set on every rank when the ranks do not all run on one node or cannot share the memory.
template <class T>
std::unique_ptr<GradReducer<T>> make_node_reducer(const Layout& layout, Communicator& comm,
                                                  std::size_t storage, std::string& why,
                                                  std::size_t chunk = 0);

}  // namespace shardprop
