#include "layers.hpp"

#include <algorithm>
#include <cmath>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>
#include <oneapi/tbb/task_arena.h>

#include "fixed_point.hpp"
#include "gemm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/rng.hpp"

namespace shardprop {

namespace {

using gemm::Op;

// Rows [r0, r0 + n) of a contiguous row-major view, or columns [c0, c0 + n).
template <class View>
auto rows_of(View&& v, std::size_t r0, std::size_t n) {
  using T = std::remove_pointer_t<decltype(v.data())>;
  return gemm::View<T>{v.data() + r0 * std::size_t(v.cols()), Eigen::Index(n), v.cols(), v.cols()};
}
template <class View>
auto cols_of(View&& v, std::size_t c0, std::size_t n) {
  using T = std::remove_pointer_t<decltype(v.data())>;
  return gemm::View<T>{v.data() + c0, v.rows(), Eigen::Index(n), v.cols()};
}
template <class View>
auto whole(View&& v) {
  return rows_of(v, 0, std::size_t(v.rows()));
}

// One block per worker thread, but no block smaller than `min_block` (rounded to `align`).
// The workers are the threads allowed (--threads), not the cores this process may run on:
// the blocks decide how products are split, and so their rounding, which must not change
// with how mpirun binds a rank.
std::size_t block_size(std::size_t n, std::size_t min_block, std::size_t align) {
  using oneapi::tbb::global_control;
  const auto workers = std::max<std::size_t>(
      1, std::min<std::size_t>(
             std::size_t(oneapi::tbb::this_task_arena::max_concurrency()),
             global_control::active_value(global_control::max_allowed_parallelism)));
  std::size_t block = std::max<std::size_t>((n + workers - 1) / workers, min_block);
  block = (block + align - 1) / align * align;
  return std::max<std::size_t>(block, 1);
}

// Runs body(begin, end) over [0, n) in contiguous blocks of `block` elements, one task each:
// block k is [k·block, (k + 1)·block), the last one shorter.
template <class Body>
void for_blocks(std::size_t n, std::size_t block, const Body& body) {
  if (n == 0) return;
  if (block >= n) {
    body(std::size_t{0}, n);
    return;
  }
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<std::size_t>(0, (n + block - 1) / block, 1),
      [&](const oneapi::tbb::blocked_range<std::size_t>& r) {
        for (std::size_t k = r.begin(); k != r.end(); ++k) {
          body(k * block, std::min(n, (k + 1) * block));
        }
      },
      oneapi::tbb::simple_partitioner());
}

// Columns [c0, c0 + n) of the bfloat16 copy of a row-major matrix shaped like `like`.
template <class View>
gemm::View<const std::uint16_t> bf16_view(const std::uint16_t* data, const View& like,
                                          Eigen::Index c0, Eigen::Index n) {
  return {data + c0, like.rows(), n, like.cols()};
}

constexpr std::size_t kMinRows = 16;  // a row block below this costs more in tasks than it saves
// A product call takes at most this many rows: the library's packed copies of its operands
// stay the size of a training shard's (oneDNN packs far more for an evaluation pass of 1024
// rows: 27 MB more peak memory on the wide model), at no cost in speed.
constexpr std::size_t kMaxRows = 256;

// The row blocks of a product over `rows` rows: one per thread, within both bounds.
std::size_t row_block(std::size_t rows) {
  return std::min(block_size(rows, kMinRows, 1), kMaxRows);
}
constexpr std::size_t kMinCols = 16;

}  // namespace

template <class T>
void ChunkScratch<T>::reserve(std::size_t rows, std::size_t chunk, std::size_t weights,
                              std::size_t width) {
  if (chunk == 0) return;
  if (packed_w.size() < weights) packed_w.resize(weights);
  const std::size_t n = chunk_scratch_size(rows, chunk, width);
  if (packed_rows.size() < n) packed_rows.resize(n);
}

template <class T>
void activate(Activation act, Eigen::Ref<RowMatrix<T>> z) {
  switch (act) {
    case Activation::identity:
    case Activation::softmax:  // fused with the loss
      break;
    case Activation::sigmoid:
      z.array() = (T(1) + (-z.array()).exp()).inverse();
      break;
    case Activation::tanh:
      z.array() = z.array().tanh();
      break;
    case Activation::relu:
      z.array() = z.array().max(T(0));
      break;
  }
}

template <class T>
void activation_derivative_mul(Activation act, Eigen::Ref<const RowMatrix<T>> a,
                               Eigen::Ref<RowMatrix<T>> dx) {
  switch (act) {
    case Activation::identity:
    case Activation::softmax:  // fused with the loss; never a hidden activation
      break;
    case Activation::sigmoid:
      dx.array() *= a.array() * (T(1) - a.array());
      break;
    case Activation::tanh:
      dx.array() *= T(1) - a.array().square();
      break;
    case Activation::relu:
      dx.array() = (a.array() > T(0)).select(dx.array(), T(0));
      break;
  }
}

namespace {

// out = in·op(w) row by row, split as `chunk` says (row blocks, one per thread, or fixed
// chunks), then finish(r0, n) on the rows [r0, r0 + n) just computed, on the same thread.
// w is (k, m) for Op::none and (m, k) for Op::transpose; in (rows, k), out (rows, m).
template <class T>
void row_products(ConstMatrixView<T> in, ConstMatrixView<T> w, Op op_w, MatrixView<T> out,
                  std::size_t chunk, ChunkScratch<T>& scratch,
                  FunctionRef<std::size_t, std::size_t> finish) {
  const auto rows = static_cast<std::size_t>(in.rows());
  if (chunk > 0) {
    chunked_product<T>(w.data(), op_w == Op::transpose, std::size_t(out.cols()),
                       std::size_t(in.cols()), in.data(), out.data(), rows, chunk, scratch,
                       finish);
    return;
  }
  for_blocks(rows, row_block(rows), [&](std::size_t r0, std::size_t r1) {
    gemm::multiply<T>(Op::none, op_w, T(1), rows_of(in, r0, r1 - r0), whole(w), T(0),
                      rows_of(out, r0, r1 - r0));
    finish(r0, r1 - r0);
  });
}

}  // namespace

template <class T>
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out, std::size_t chunk, ChunkScratch<T>& scratch) {
  // z = x·w, then z += b and the activation.
  row_products<T>(x, w, Op::none, out, chunk, scratch, [&](std::size_t r0, std::size_t n) {
    auto z = out.middleRows(Eigen::Index(r0), Eigen::Index(n));
    z.rowwise() += b;
    activate<T>(act, z);
  });
}

template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx,
                          std::size_t chunk, ChunkScratch<T>& scratch) {
  // dx = δ·wᵀ, then ⊙ act'(a_prev).
  row_products<T>(delta, w, Op::transpose, dx, chunk, scratch, [&](std::size_t r0, std::size_t n) {
    const auto r = Eigen::Index(r0), k = Eigen::Index(n);
    activation_derivative_mul<T>(act_prev, a_prev.middleRows(r, k), dx.middleRows(r, k));
  });
}

namespace {

// dense_backward_params' split of dw's rows over the tasks of a part of `rows` rows.
std::size_t dw_row_block(std::size_t rows) { return block_size(rows, kMinRows, kMinRows); }

// The columns of db that task `k` of `tasks` sums: contiguous blocks, multiples of 16 wide.
Range bias_columns(std::size_t cols, std::size_t k, std::size_t tasks) {
  const std::size_t width = ((cols + tasks - 1) / tasks + kMinCols - 1) / kMinCols * kMinCols;
  const std::size_t c0 = std::min(cols, k * width);
  return {c0, std::min(cols, c0 + width)};
}

}  // namespace

template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db, Callback progress, const std::uint16_t* x_bf16,
                           const std::uint16_t* delta_bf16, bool add) {
  if (add && x.rows() == 0) {  // nothing to add
    if (progress) progress();
    return;
  }
  const auto in = static_cast<std::size_t>(x.cols());
  const auto cols = static_cast<std::size_t>(delta.cols());
  // Rows [p0, p1) of dw, in row blocks (one per thread); the first part's tasks also sum
  // db, each a block of its columns.
  const auto part_rows = [&](std::size_t p0, std::size_t p1) {
    const std::size_t n = p1 - p0, block = dw_row_block(n);
    const std::size_t tasks = (n + block - 1) / block;
    for_blocks(n, block, [&](std::size_t r0, std::size_t r1) {
      const std::size_t k = r0 / block;
      r0 += p0;
      r1 += p0;
      // dw[r0:r1, :] = x[:, r0:r1]ᵀ·δ; 0 rows of x: a product of depth 0, which gives zeros.
      const auto product = [&] {
        if constexpr (std::is_same_v<T, float>) {
          if (x_bf16) {
            return gemm::multiply_bf16(
                Op::transpose, Op::none,
                bf16_view(x_bf16, x, Eigen::Index(r0), Eigen::Index(r1 - r0)),
                bf16_view(delta_bf16, delta, 0, delta.cols()), rows_of(dw, r0, r1 - r0), add);
          }
        }
        gemm::multiply<T>(Op::transpose, Op::none, T(1), cols_of(x, r0, r1 - r0), whole(delta),
                          T(add ? 1 : 0), rows_of(dw, r0, r1 - r0));
      };
      product();
      if (p0 != 0) return;
      // The summed bias rows, row by row: contiguous reads (a column sum of a row-major
      // matrix would stride through memory).
      const Range c = bias_columns(cols, k, tasks);
      auto sum = db.segment(Eigen::Index(c.begin), Eigen::Index(c.size()));
      if (!add) sum.setZero();
      for (Eigen::Index r = 0; r < delta.rows(); ++r) {
        sum += delta.row(r).segment(Eigen::Index(c.begin), Eigen::Index(c.size()));
      }
    });
  };
  if (!progress) {
    part_rows(0, in);
    return;
  }
  constexpr std::size_t kParts = 4, kMinPart = 128;
  const std::size_t part = std::max(kMinPart, (in + kParts - 1) / kParts / kMinRows * kMinRows);
  for (std::size_t p0 = 0; p0 < in; p0 += part) {
    part_rows(p0, std::min(in, p0 + part));
    progress();
  }
}

namespace {

// The bf16 mode's row_products: out = in·op(w) on bfloat16 operands (in_bf16 (rows, k),
// w_bf16 (k, m) for Op::none and (m, k) for Op::transpose), split into row blocks, each then
// finished by finish(z) on the rows just computed, whose rounding goes to out_bf16 if given.
void row_products_bf16(const std::uint16_t* in_bf16, Eigen::Index k, const std::uint16_t* w_bf16,
                       Op op_w, MatrixView<float> out, std::uint16_t* out_bf16,
                       FunctionRef<std::size_t, std::size_t> finish) {
  const auto rows = static_cast<std::size_t>(out.rows());
  const Eigen::Index m = out.cols();
  const gemm::View<const std::uint16_t> w =
      op_w == Op::none ? gemm::View<const std::uint16_t>{w_bf16, k, m, m}
                       : gemm::View<const std::uint16_t>{w_bf16, m, k, k};
  for_blocks(rows, row_block(rows), [&](std::size_t r0, std::size_t r1) {
    const auto r = Eigen::Index(r0), n = Eigen::Index(r1 - r0);
    gemm::multiply_bf16(Op::none, op_w, {in_bf16 + r * k, n, k, k}, w, rows_of(out, r0, r1 - r0));
    finish(r0, r1 - r0);
    if (out_bf16) gemm::to_bf16(out.data() + r * m, out_bf16 + r * m, std::size_t(n * m));
  });
}

}  // namespace

void dense_forward_bf16(ConstMatrixView<float> x, const std::uint16_t* x_bf16,
                        const std::uint16_t* w_bf16, ConstRowVectorView<float> b, Activation act,
                        MatrixView<float> out, std::uint16_t* out_bf16) {
  row_products_bf16(x_bf16, x.cols(), w_bf16, Op::none, out, out_bf16,
                    [&](std::size_t r0, std::size_t n) {
                      auto z = out.middleRows(Eigen::Index(r0), Eigen::Index(n));
                      z.rowwise() += b;
                      activate<float>(act, z);
                    });
}

void dense_backward_input_bf16(ConstMatrixView<float> delta, const std::uint16_t* delta_bf16,
                               const std::uint16_t* w_bf16, ConstMatrixView<float> a_prev,
                               Activation act_prev, MatrixView<float> dx, std::uint16_t* dx_bf16) {
  // dx = δ·wᵀ with w (in, out), then ⊙ act'(a_prev).
  row_products_bf16(delta_bf16, delta.cols(), w_bf16, Op::transpose, dx, dx_bf16,
                    [&](std::size_t r0, std::size_t n) {
                      const auto r = Eigen::Index(r0), k = Eigen::Index(n);
                      activation_derivative_mul<float>(act_prev, a_prev.middleRows(r, k),
                                                       dx.middleRows(r, k));
                    });
}

void round_bf16(ConstMatrixView<float> m, std::uint16_t* out) {
  const auto n = static_cast<std::size_t>(m.size());
  for_blocks(n, block_size(n, 1 << 14, 64), [&](std::size_t i0, std::size_t i1) {
    gemm::to_bf16(m.data() + i0, out + i0, i1 - i0);
  });
}

void for_gradient_blocks(const Layout& layout,
                         FunctionRef<std::size_t, std::size_t, std::size_t> run) {
  std::size_t blocks = 1;
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const std::size_t in = layout.block(l).in;
    blocks = std::max(blocks, (in + dw_row_block(in) - 1) / dw_row_block(in));
  }
  for_blocks(blocks, 1, [&](std::size_t b0, std::size_t b1) {
    for (std::size_t k = b0; k < b1; ++k) {
      for (std::size_t l = 0; l < layout.layer_count(); ++l) {
        const Layout::Block& block = layout.block(l);
        const std::size_t rows = dw_row_block(block.in);
        const std::size_t tasks = (block.in + rows - 1) / rows;
        if (k >= tasks) continue;
        const std::size_t r0 = k * rows, r1 = std::min(block.in, r0 + rows);
        run(l, block.w_offset + r0 * block.out, block.w_offset + r1 * block.out);
        const Range c = bias_columns(block.out, k, tasks);
        if (c.size() > 0) run(l, block.b_offset + c.begin, block.b_offset + c.end);
      }
    }
  });
}

std::uint64_t dropout_key(std::uint64_t seed, std::uint64_t step, std::size_t layer) {
  return mix64(mix64(mix64(seed ^ 0x64726f706f7574ULL) + step) + layer);
}

bool dropout_keeps(std::uint64_t key, std::uint32_t sample, std::size_t unit, double rate) {
  // The top 32 bits of the draw against rate·2^32: dropped with probability rate (to 2^−32).
  const auto threshold = std::uint64_t(std::ldexp(rate, 32));
  return (mix64(mix64(key + sample) + unit) >> 32) >= threshold;
}

template <class T>
void dropout_forward(ConstMatrixView<T> a, double rate, std::uint64_t key,
                     const std::uint32_t* samples, MatrixView<T> mask, MatrixView<T> out) {
  const T scale = T(1) / T(1 - rate);
  const auto units = std::size_t(a.cols());
  for_blocks(std::size_t(a.rows()), block_size(std::size_t(a.rows()), 1, 1),
             [&](std::size_t r0, std::size_t r1) {
               for (std::size_t r = r0; r < r1; ++r) {
                 const auto i = Eigen::Index(r);
                 for (std::size_t u = 0; u < units; ++u) {
                   const auto j = Eigen::Index(u);
                   const T m = dropout_keeps(key, samples[r], u, rate) ? scale : T(0);
                   mask(i, j) = m;
                   out(i, j) = a(i, j) * m;
                 }
               }
             });
}

template <class T>
void multiply_mask(MatrixView<T> x, ConstMatrixView<T> mask) {
  for_blocks(std::size_t(x.rows()), block_size(std::size_t(x.rows()), 1, 1),
             [&](std::size_t r0, std::size_t r1) {
               const auto rows = Eigen::Index(r1 - r0);
               x.middleRows(Eigen::Index(r0), rows).array() *=
                   mask.middleRows(Eigen::Index(r0), rows).array();
             });
}

void for_each_chunk(std::size_t chunks, FunctionRef<std::size_t> body) {
  for_blocks(chunks, 1, [&](std::size_t c0, std::size_t c1) {
    for (std::size_t c = c0; c < c1; ++c) body(c);
  });
}

#define SP_INSTANTIATE(T)                                                                      \
  template struct ChunkScratch<T>;                                                             \
  template void activate<T>(Activation, Eigen::Ref<RowMatrix<T>>);                             \
  template void activation_derivative_mul<T>(Activation, Eigen::Ref<const RowMatrix<T>>,       \
                                             Eigen::Ref<RowMatrix<T>>);                        \
  template void dense_forward<T>(ConstMatrixView<T>, ConstMatrixView<T>, ConstRowVectorView<T>, \
                                 Activation, MatrixView<T>, std::size_t, ChunkScratch<T>&);    \
  template void dense_backward_params<T>(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>, \
                                         RowVectorView<T>, Callback, const std::uint16_t*,   \
                                         const std::uint16_t*, bool);                        \
  template void dense_backward_input<T>(ConstMatrixView<T>, ConstMatrixView<T>,                \
                                        ConstMatrixView<T>, Activation, MatrixView<T>,         \
                                        std::size_t, ChunkScratch<T>&);        \
  template void dropout_forward<T>(ConstMatrixView<T>, double, std::uint64_t,                  \
                                   const std::uint32_t*, MatrixView<T>, MatrixView<T>);        \
  template void multiply_mask<T>(MatrixView<T>, ConstMatrixView<T>);
SP_INSTANTIATE(float)
SP_INSTANTIATE(double)
#undef SP_INSTANTIATE

}  // namespace shardprop
