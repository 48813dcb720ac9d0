// The multilayer perceptron: wires dense layers and the fused output loss over flat
// parameter and gradient buffers. It owns only workspace, never parameters.
#pragma once

#include <span>
#include <vector>

#include "shardprop/layers.hpp"
#include "shardprop/loss.hpp"
#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

template <class T>
class Mlp {
 public:
  explicit Mlp(ModelSpec spec);

  const ModelSpec& spec() const { return spec_; }
  const Layout& layout() const { return layout_; }

  // Sizes the workspace for batches of up to `rows` samples; later calls with at most that
  // many rows allocate nothing.
  void reserve(std::size_t rows);

  // Forward pass. x (rows, in). Returns the predictions ŷ (rows, out), valid until the next
  // call. With chunk > 0, computed in chunks as forward_chunks does.
  ConstMatrixView<T> predict(std::span<const T> params, ConstMatrixView<T> x,
                             std::size_t chunk = 0);

  // Forward pass and loss against targets y (rows, out), without gradients.
  LossSums evaluate(std::span<const T> params, ConstMatrixView<T> x, ConstMatrixView<T> y);

  // Forward, loss and backward over one shard: writes the gradient of the *sum* of the
  // shard's per-sample losses to `grad_sum` (dW = inputᵀ·δ, db = column sums of δ) and
  // returns the loss sums. Dividing the reduced sums by the global sample count gives the
  // mean gradient of the global minibatch. `layer_done(l)` runs as soon as layer l's
  // gradient is final (layers finish from last to first); `progress(l)` runs on the calling
  // thread between the kernels of layer l's backward, and between parts of its dW.
  LossSums forward_backward(std::span<const T> params, ConstMatrixView<T> x,
                            ConstMatrixView<T> y, std::span<T> grad_sum,
                            LayerDone layer_done = {}, LayerDone progress = {});

  // The deterministic mode's passes. The rows of x go in chunks of `chunk` consecutive rows
  // (the last may be shorter); each chunk is computed by the same single-threaded kernel
  // calls whichever thread runs it, and the chunks run in parallel, so a row's results depend
  // on its chunk alone. forward_chunks runs the forward pass and, given targets y, the output
  // δ; it returns each chunk's loss sums. Then backward_input_chunks(l) computes the δ of
  // layer l − 1 from that of layer l, for l from the last layer down to 1.
  std::span<const LossSums> forward_chunks(std::span<const T> params, ConstMatrixView<T> x,
                                           ConstMatrixView<T> y, std::size_t chunk);
  void backward_input_chunks(std::span<const T> params, std::size_t layer, std::size_t chunk);
  // After forward_chunks on x: layer l's input, and its δ once backward has reached it.
  ConstMatrixView<T> input_of(std::size_t layer, ConstMatrixView<T> x);
  ConstMatrixView<T> delta_of(std::size_t layer);

 private:
  MatrixView<T> activation(std::size_t layer, std::size_t rows);
  MatrixView<T> delta(std::size_t which, std::size_t rows, std::size_t cols);
  void forward(std::span<const T> params, ConstMatrixView<T> x, std::size_t chunk = 0);
  void reserve_chunk_scratch(std::size_t chunk);

  ModelSpec spec_;
  Layout layout_;
  std::size_t capacity_ = 0;
  std::size_t max_width_ = 0;
  std::vector<AlignedVector<T>> acts_;  // per layer: (rows, out) activations
  AlignedVector<T> delta_[2];           // ping-pong δ buffers: (rows, widest layer)
  std::size_t rows_ = 0;                // rows of the last forward pass
  std::vector<LossSums> chunk_sums_;
  AlignedVector<T> packed_w_, packed_rows_;  // the chunked kernels' packed operands
};

}  // namespace shardprop
