// Dense-layer and activation kernels, threaded with oneTBB (private). Batches are row-major:
// one sample per row. Shapes are given as (rows, columns).
//
// `chunk` selects how the rows of a batch are shared between threads: 0 splits them into
// one block per thread; > 0 (the deterministic mode) cuts them into fixed chunks of that
// many rows, each computed by one single-threaded call that depends on its rows and the
// shapes alone, whichever thread runs it (fixed_point.hpp).
#pragma once

#include <cstdint>

#include "shardprop/function_ref.hpp"
#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// Workspace of the chunked kernels: the weights packed once per product, and each chunk's
// packed rows. Sized by reserve(); later calls within those sizes allocate nothing.
template <class T>
struct ChunkScratch {
  AlignedVector<T> packed_w, packed_rows;
  // For batches of up to `rows` rows in chunks of `chunk` (0: nothing to do), weights of up
  // to `weights` values and layers up to `width` wide.
  void reserve(std::size_t rows, std::size_t chunk, std::size_t weights, std::size_t width);
};

// out = act(x·w + b). x (rows, in), w (in, out), b (out), out (rows, out). The model passes
// identity for its output layer, whose activation is fused with the loss.
template <class T>
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out, std::size_t chunk, ChunkScratch<T>& scratch);

// dx = (delta·wᵀ) ⊙ act'(a_prev), the δ of the previous layer, whose activation `act_prev`
// produced a_prev. delta (rows, out), w (in, out), a_prev and dx (rows, in).
template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx,
                          std::size_t chunk, ChunkScratch<T>& scratch);

// dw = xᵀ·delta and db = column sums of delta (the summed bias rows); both are written, not
// added to, so the caller need not clear them first (0 rows give zeros); with `add`, both
// are added to instead (gradient accumulation).
// x (rows, in), delta (rows, out), dw (in, out), db (out). Split over the rows of dw (the
// inputs), so each thread writes one contiguous block and no per-thread reduction is
// needed; db is split over its columns among the same tasks.
// With `progress`, the rows go in a few consecutive parts and progress() runs on the
// calling thread after each (to let communication advance); the sums are the same.
// With `x_bf16` and `delta_bf16` (the bfloat16 roundings of x and delta, same shapes), the
// product xᵀ·delta takes them as operands (bf16 mode); db still sums the float δ.
template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db, Callback progress = {},
                           const std::uint16_t* x_bf16 = nullptr,
                           const std::uint16_t* delta_bf16 = nullptr, bool add = false);

// The bf16 mode's forward and input-gradient kernels: as dense_forward and
// dense_backward_input, with the products on bfloat16 operands summed in float32 and the
// rest in float32. `x_bf16`, `w_bf16`, `delta_bf16` are the bfloat16 roundings of the
// matrices of those shapes (row-major); `out_bf16` / `dx_bf16`, if not null, receive the
// rounding of what the kernel writes (the next product's operand).
void dense_forward_bf16(ConstMatrixView<float> x, const std::uint16_t* x_bf16,
                        const std::uint16_t* w_bf16, ConstRowVectorView<float> b, Activation act,
                        MatrixView<float> out, std::uint16_t* out_bf16);
void dense_backward_input_bf16(ConstMatrixView<float> delta, const std::uint16_t* delta_bf16,
                               const std::uint16_t* w_bf16, ConstMatrixView<float> a_prev,
                               Activation act_prev, MatrixView<float> dx, std::uint16_t* dx_bf16);
// The key of a layer's dropout masks in one optimizer step of a run.
std::uint64_t dropout_key(std::uint64_t seed, std::uint64_t step, std::size_t layer);
// Whether unit `unit` of sample `sample` is kept, at `rate` (the drop probability), under
// `key`: a counter-based draw, so it depends on these numbers alone, not on the rank or the
// thread that asks.
bool dropout_keeps(std::uint64_t key, std::uint32_t sample, std::size_t unit, double rate);
// Inverted dropout of a hidden layer's activations a (rows, units), row i being sample
// samples[i]: writes mask (each unit's factor: 0, or 1/(1 − rate) if dropout_keeps) and
// out = a ⊙ mask. Elementwise, so the same bits for any threads.
template <class T>
void dropout_forward(ConstMatrixView<T> a, double rate, std::uint64_t key,
                     const std::uint32_t* samples, MatrixView<T> mask, MatrixView<T> out);
// x ⊙= mask (the backward pass through dropout).
template <class T>
void multiply_mask(MatrixView<T> x, ConstMatrixView<T> mask);

// Rounds a row-major matrix to bfloat16 (in parallel): out has m.size() elements.
void round_bf16(ConstMatrixView<float> m, std::uint16_t* out);

// Runs run(layer, begin, end) over the flat ranges [begin, end) of a gradient laid out by
// `layout` in the blocks dense_backward_params writes when called without progress: each
// task's rows of every W and its columns of every b, the tasks split over the threads the
// way its products are. So a thread tends to revisit the values it
// wrote while they are in its cache. Covers every W and b; not the padding between them.
void for_gradient_blocks(const Layout& layout,
                         FunctionRef<std::size_t, std::size_t, std::size_t> run);

// Runs body(c) for c in [0, chunks), in parallel, each on one thread.
void for_each_chunk(std::size_t chunks, FunctionRef<std::size_t> body);

// Applies an elementwise activation in place (identity, sigmoid, tanh, relu).
template <class T>
void activate(Activation act, Eigen::Ref<RowMatrix<T>> z);

// dx ⊙= act'(a), the derivative written in terms of the activation's output a.
template <class T>
void activation_derivative_mul(Activation act, Eigen::Ref<const RowMatrix<T>> a,
                               Eigen::Ref<RowMatrix<T>> dx);

}  // namespace shardprop
