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

  // Forward pass. x (rows, in). Returns the predictions ŷ (rows, out), valid until the next call.
  ConstMatrixView<T> predict(std::span<const T> params, ConstMatrixView<T> x);

  // Forward pass and loss against targets y (rows, out), without gradients.
  LossSums evaluate(std::span<const T> params, ConstMatrixView<T> x, ConstMatrixView<T> y);

  // Forward, loss and backward over one shard: adds the gradient of the *sum* of the
  // shard's per-sample losses to `grad_sum` (dW = inputᵀ·δ, db = column sums of δ) and
  // returns the loss sums. Dividing the reduced sums by the global sample count gives the
  // mean gradient of the global minibatch. `layer_done(l)` runs as soon as layer l's
  // gradient is final (layers finish from last to first); `progress(l)` runs on the calling
  // thread between the kernels of layer l's backward, and between parts of its dW.
  LossSums forward_backward(std::span<const T> params, ConstMatrixView<T> x,
                            ConstMatrixView<T> y, std::span<T> grad_sum,
                            LayerDone layer_done = {}, LayerDone progress = {});

 private:
  MatrixView<T> activation(std::size_t layer, std::size_t rows);
  MatrixView<T> delta(std::size_t which, std::size_t rows, std::size_t cols);
  void forward(std::span<const T> params, ConstMatrixView<T> x);

  ModelSpec spec_;
  Layout layout_;
  std::size_t capacity_ = 0;
  std::size_t max_width_ = 0;
  std::vector<AlignedVector<T>> acts_;  // per layer: (rows, out) activations
  AlignedVector<T> delta_[2];           // ping-pong δ buffers: (rows, widest layer)
};

}  // namespace shardprop
