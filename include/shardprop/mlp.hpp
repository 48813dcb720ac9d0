// The multilayer perceptron: wires dense layers and the fused output loss over flat
// parameter buffers. It owns only workspace, never parameters.
#pragma once

#include <memory>
#include <span>

#include "shardprop/loss.hpp"
#include "shardprop/params.hpp"
#include "shardprop/reducer.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// The library that multiplies the model's matrices ("Eigen", ...), as train and bench print it.
const char* gemm_backend();

template <class T>
class Mlp {
 public:
  // `chunk` > 0: the deterministic mode's passes, the rows in chunks of that many, each
  // computed by the same single-threaded kernel calls whichever thread runs it.
  explicit Mlp(ModelSpec spec, std::size_t chunk = 0);
  ~Mlp();
  Mlp(Mlp&&) noexcept;
  Mlp& operator=(Mlp&&) noexcept;

  const ModelSpec& spec() const { return spec_; }
  const Layout& layout() const { return layout_; }
  std::size_t chunk() const { return chunk_; }

  // Sizes the workspace for batches of up to `rows` samples; later calls with at most that
  // many rows allocate nothing.
  void reserve(std::size_t rows);

  // Forward pass. x (rows, in). Returns the predictions ŷ (rows, out), valid until the next
  // call.
  ConstMatrixView<T> predict(std::span<const T> params, ConstMatrixView<T> x);

  // Forward pass and loss against targets y (rows, out), without gradients: the loss sums of
  // each chunk (one entry for all rows when chunk is 0), valid until the next call.
  std::span<const LossSums> losses(std::span<const T> params, ConstMatrixView<T> x,
                                   ConstMatrixView<T> y);

  // Forward, loss and backward over one shard (x, y may have no rows): hands the loss sums,
  // then each layer's input and δ = ∂(Σ per-sample loss)/∂Z (dW = inputᵀ·δ, db = column
  // sums of δ), from the last layer down, to `reducer`, which must use this model's chunk.
  void forward_backward(std::span<const T> params, ConstMatrixView<T> x, ConstMatrixView<T> y,
                        GradReducer<T>& reducer);

 private:
  struct Workspace;
  MatrixView<T> activation(std::size_t layer, std::size_t rows);
  ConstMatrixView<T> input_of(std::size_t layer, ConstMatrixView<T> x, std::size_t rows);
  void forward(std::span<const T> params, ConstMatrixView<T> x);

  ModelSpec spec_;
  Layout layout_;
  std::size_t chunk_;
  std::unique_ptr<Workspace> ws_;
};

}  // namespace shardprop
