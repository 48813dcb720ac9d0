// The multilayer perceptron: wires dense layers and the fused output loss over flat
// parameter buffers. It owns only workspace, never parameters.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

#include "shardprop/loss.hpp"
#include "shardprop/params.hpp"
#include "shardprop/reducer.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// The library that multiplies the model's matrices ("oneDNN 2.6.3", ...), as train and bench
// print it.
std::string gemm_backend();
// Makes the library named (auto, onednn, openblas, eigen) the one for every product of the
// process; a name not built in throws UsageError naming `what`.
void select_gemm(std::string_view name, std::string_view what = "--gemm");

// The operands of the model's matrix products: float32, or bfloat16 with float32 sums (the
// parameters, gradients and everything else stay float32).
enum class Precision { fp32, bf16 };
// "fp32" or "bf16"; anything else throws UsageError naming `what`.
Precision parse_precision(std::string_view text, std::string_view what = "--precision");

// What draws a training pass's dropout masks: the run's seed, the optimizer step, and the
// sample (index in the training set) of each row. A unit's mask depends on these and on
// its layer and position alone.
struct DropoutKeys {
  std::uint64_t seed = 0, step = 0;
  const std::uint32_t* samples = nullptr;  // one per row of the pass
};

template <class T>
class Mlp {
 public:
  // `chunk` > 0: the deterministic mode's passes, the rows in chunks of that many, each
  // computed by the same single-threaded kernel calls whichever thread runs it.
  // Precision::bf16 (float only, chunk 0) throws UsageError where it cannot run.
  explicit Mlp(ModelSpec spec, std::size_t chunk = 0, Precision precision = Precision::fp32);
  ~Mlp();
  Mlp(Mlp&&) noexcept;
  Mlp& operator=(Mlp&&) noexcept;

  const ModelSpec& spec() const { return spec_; }
  const Layout& layout() const { return layout_; }
  std::size_t chunk() const { return chunk_; }
  Precision precision() const { return precision_; }

  // Sizes the workspace for batches of up to `rows` samples, for forward passes and, with
  // `backward`, for forward_backward (the δ buffers); later calls with at most that many rows
  // allocate nothing. Evaluation and prediction need no δ buffers.
  void reserve(std::size_t rows, bool backward = true);

  // Forward pass. x (rows, in). Returns the predictions ŷ (rows, out), valid until the next
  // call.
  ConstMatrixView<T> predict(std::span<const T> params, ConstMatrixView<T> x);

  // Forward pass and loss against targets y (rows, out), without gradients: the loss sums of
  // each chunk (one entry for all rows when chunk is 0), valid until the next call.
  // With `dropout` (and a model with dropout), the training pass's masks apply.
  std::span<const LossSums> losses(std::span<const T> params, ConstMatrixView<T> x,
                                   ConstMatrixView<T> y, const DropoutKeys* dropout = nullptr);

  // Forward, loss and backward over one shard (x, y may have no rows): hands the loss sums,
  // then each layer's input and δ = ∂(Σ per-sample loss)/∂Z (dW = inputᵀ·δ, db = column
  // sums of δ), from the last layer down, to `reducer`, which must use this model's chunk.
  // A model with dropout needs `dropout` (the keys of its masks).
  void forward_backward(std::span<const T> params, ConstMatrixView<T> x, ConstMatrixView<T> y,
                        GradReducer<T>& reducer, const DropoutKeys* dropout = nullptr);

 private:
  struct Workspace;
  MatrixView<T> activation(std::size_t layer, std::size_t rows);
  ConstMatrixView<T> input_of(std::size_t layer, ConstMatrixView<T> x, std::size_t rows);
  const std::uint16_t* input_bf16_of(std::size_t layer) const;
  void forward(std::span<const T> params, ConstMatrixView<T> x, const DropoutKeys* dropout);

  ModelSpec spec_;
  Layout layout_;
  std::size_t chunk_;
  Precision precision_;
  std::unique_ptr<Workspace> ws_;
};

}  // namespace shardprop
