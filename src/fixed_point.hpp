// The deterministic mode's kernels (private; docs/reproducibility.md): products computed
// chunk by chunk by calls that depend on a chunk's rows and the shapes alone, and gradient
// sums added as integers at a fixed point every rank agrees on.
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "layers.hpp"

namespace shardprop {

// The exponent s such that `terms` values of magnitude at most `bound` (give or take float
// rounding), each added as round(v·2^s), cannot overflow an int64 in any order:
// bound·2^s < 2^(61 − ⌈log2 terms⌉). 0 when bound is 0; at most 960, so 2^±s stays finite.
int fixed_point_exponent(double bound, std::size_t terms);

// The products of dense_forward and dense_backward_input with chunk > 0: for each chunk of
// `chunk` consecutive rows of `in` (row-major, rows × depth), out_c = in_c · op(w), with op(w)
// depth × m; `transposed` w is stored m × depth (row-major), else depth × m. The weights are
// packed once into scratch.packed_w, and each chunk's rows into its own part of
// scratch.packed_rows (chunk_scratch_size values). Then done(r0, n) runs on the thread that
// computed the chunk's rows [r0, r0 + n).
std::size_t chunk_scratch_size(std::size_t rows, std::size_t chunk, std::size_t width);
template <class T>
void chunked_product(const T* w, bool transposed, std::size_t m, std::size_t depth, const T* in,
                     T* out, std::size_t rows, std::size_t chunk, ChunkScratch<T>& scratch,
                     FunctionRef<std::size_t, std::size_t> done);

// Workspace of dense_backward_params_fixed: a few blocks of products for each thread that
// computes, all made on first use (so later steps allocate nothing, whichever threads run).
class FixedScratch {
 public:
  FixedScratch();
  ~FixedScratch();
  FixedScratch(const FixedScratch&) = delete;
  FixedScratch& operator=(const FixedScratch&) = delete;
  // Runs body() on the calling thread, inside a oneTBB arena of its own.
  void execute(Callback body);
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
// whichever rank or thread holds which chunks. x (rows ≥ 1, in), delta (rows, out); dw (in ×
// out, row-major) and db (out), whose old values are replaced (with `add`, added to). With
// `progress`, the blocks go
// a row of blocks at a time and progress() runs on the calling thread after each. The caller
// chooses the exponents so that no sum can overflow (see fixed_point_exponent).
template <class T>
void dense_backward_params_fixed(ConstMatrixView<T> x, ConstMatrixView<T> delta,
                                 std::size_t chunk, int w_exp, int b_exp, std::int64_t* dw,
                                 std::int64_t* db, FixedScratch& scratch,
                                 Callback progress = {}, bool add = false);

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

}  // namespace shardprop
