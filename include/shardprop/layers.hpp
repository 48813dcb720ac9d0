// Dense-layer and activation kernels, threaded with oneTBB. Batches are row-major: one
// sample per row. Shapes are given as (rows, columns).
#pragma once

#include <cstdint>
#include <memory>

#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// A non-owning callable reference `void(std::size_t layer)`; empty means do nothing.

class LayerDone {
 public:
  LayerDone() = default;
  template <class F>
  LayerDone(const F& f)  // NOLINT(google-explicit-constructor): used like a function argument
      : object_(&f), call_([](const void* o, std::size_t l) { (*static_cast<const F*>(o))(l); }) {}
  explicit operator bool() const { return call_ != nullptr; }
  void operator()(std::size_t layer) const {
    if (call_) call_(object_, layer);
  }

 private:
  const void* object_ = nullptr;
  void (*call_)(const void*, std::size_t) = nullptr;
};



// out = act(x·w + b). x (rows, in), w (in, out), b (out), out (rows, out).
// Split over row blocks. The model passes identity for its output layer, whose activation
// is fused with the loss.
template <class T>
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out);

// dw = xᵀ·delta and db = column sums of delta (the summed bias rows); both are written, not
// added to, so the caller need not clear them first (0 rows give zeros).
// x (rows, in), delta (rows, out), dw (in, out), db (out). Split over output columns, so
// no thread ever writes another's columns and no per-thread reduction is needed.
// With `progress`, the columns go in a few consecutive parts and progress(0) runs on the
// calling thread after each (to let communication advance); the sums are the same.
template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db, LayerDone progress = {});

// dx = (delta·wᵀ) ⊙ act'(a_prev), the δ of the previous layer, whose activation `act_prev`
// produced a_prev. delta (rows, out), w (in, out), a_prev and dx (rows, in). Split over row blocks.
template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx);

// Runs body(c) for c in [0, chunks), in parallel, each on one thread.
void for_each_chunk(std::size_t chunks, LayerDone body);

// The deterministic mode's dense_forward and dense_backward_input: the rows go in chunks of
// `chunk` (the last may be shorter), each computed by one single-threaded kernel call that
// depends on the chunk's rows and the shapes alone, whichever thread runs it; the chunks run
// in parallel. w is packed once into packed_w (w.size() values); packed_rows holds
// chunk_scratch_size(rows, chunk, widest of in and out) values.
std::size_t chunk_scratch_size(std::size_t rows, std::size_t chunk, std::size_t width);
template <class T>
void dense_forward_chunks(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                          Activation act, MatrixView<T> out, std::size_t chunk, T* packed_w,
                          T* packed_rows);
template <class T>
void dense_backward_input_chunks(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                                 ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx,
                                 std::size_t chunk, T* packed_w, T* packed_rows);

// Workspace of dense_backward_params_fixed: a few blocks of products for each thread that
// computes, all made on first use (so later steps allocate nothing, whichever threads run).
class FixedScratch {
 public:
  FixedScratch();
  ~FixedScratch();
  FixedScratch(const FixedScratch&) = delete;
  FixedScratch& operator=(const FixedScratch&) = delete;
  // Runs body(0) on the calling thread, inside a oneTBB arena of its own.
  void execute(LayerDone body);
  // The calling thread's blocks, within execute().
  template <class T>
  T* local();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The deterministic mode's parameter gradient: for every chunk of `chunk` consecutive rows
// (the last may be shorter) computes dW = xᵀ·delta and db = column sums of delta over the
// chunk in T, and sums round(dW·2^w_exp) into dw and round(db·2^b_exp) into db as integers.
// Each chunk's products come from calls that depend on the chunk and the shapes alone (fixed
// blocks, never the thread count), and integer sums are exact, so the result is the same
// whichever rank or thread holds which chunks. x (rows ≥ 1, in), delta (rows, out); dw (in × out,
// row-major) and db (out), whose old values are replaced. With `progress`, the blocks go a
// row of blocks at a time and progress(0) runs on the calling thread after each. The caller
// chooses the exponents so that no sum can overflow (see fixed_point_exponent).
template <class T>
void dense_backward_params_fixed(ConstMatrixView<T> x, ConstMatrixView<T> delta,
                                 std::size_t chunk, int w_exp, int b_exp, std::int64_t* dw,
                                 std::int64_t* db, FixedScratch& scratch,
                                 LayerDone progress = {});

// The largest |value| that the chunk gradients of dense_backward_params_fixed can reach,
// over the chunks of x and delta: for W, max|x| · Σ_rows max_j |delta_rj| of a chunk, and for
// b, Σ_rows max_j |delta_rj|. Computed in double, in an order fixed by the chunk. Non-finite
// input gives +inf.
struct GradientBound {
  double w = 0, b = 0;
};
template <class T>
GradientBound chunk_gradient_bound(ConstMatrixView<T> x, ConstMatrixView<T> delta,
                                   std::size_t chunk);

// Applies an elementwise activation in place (identity, sigmoid, tanh, relu).
template <class T>
void activate(Activation act, Eigen::Ref<RowMatrix<T>> z);

}  // namespace shardprop
