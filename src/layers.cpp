#include "shardprop/layers.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <type_traits>
#include <Eigen/Core>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>
#include <oneapi/tbb/task_arena.h>

#include "shardprop/error.hpp"

#ifdef SHARDPROP_USE_OPENBLAS
// The Fortran BLAS interface of Debian's serial OpenBLAS (column-major).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
}
#endif

namespace shardprop {

namespace {

// A row-major matrix of `rows` × `cols` at `data` whose rows are `ld` elements apart.
template <class T>
struct Strided {
  T* data;
  Eigen::Index rows, cols, ld;
};

template <class T>
using StridedMap = Eigen::Map<RowMatrix<T>, 0, Eigen::OuterStride<>>;
template <class T>
using ConstStridedMap = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

template <class T>
ConstStridedMap<T> map(const Strided<const T>& m) {
  return ConstStridedMap<T>(m.data, m.rows, m.cols, Eigen::OuterStride<>(m.ld));
}

enum class Op { none, transpose };

// c = beta·c + op(a)·op(b), all row-major; a and b are given as stored (op applied here).
// beta is 0 or 1. The one matrix-multiply of every kernel, so the backend is chosen here.
template <class T>
void gemm(Op op_a, Op op_b, const Strided<const T>& a, const Strided<const T>& b, T beta,
          const Strided<T>& c) {
#ifdef SHARDPROP_USE_OPENBLAS
  // Debian's serial OpenBLAS gave wrong products when two threads called it at once (seen
  // in checkpoint_test's in-process ranks), so calls are serialized: the backend suits one
  // thread per process. An uncontended lock costs nothing next to a product.
  static std::mutex serial;
  const std::lock_guard<std::mutex> lock(serial);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ over the same memory.
  const int m = int(c.rows), n = int(c.cols);
  const int k = int(op_a == Op::none ? a.cols : a.rows);
  const int lda = int(a.ld), ldb = int(b.ld), ldc = int(c.ld);
  const T one = 1;
  const char* ta = op_b == Op::none ? "N" : "T";
  const char* tb = op_a == Op::none ? "N" : "T";
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(ta, tb, &n, &m, &k, &one, b.data, &ldb, a.data, &lda, &beta, c.data, &ldc);
  } else {
    dgemm_(ta, tb, &n, &m, &k, &one, b.data, &ldb, a.data, &lda, &beta, c.data, &ldc);
  }
#else
  StridedMap<T> out(c.data, c.rows, c.cols, Eigen::OuterStride<>(c.ld));
  const auto x = map(a);
  const auto y = map(b);
  const auto apply = [&](const auto& product) {
    if (beta == T(0)) {
      out.noalias() = product;
    } else {
      out.noalias() += product;
    }
  };
  if (op_a == Op::none && op_b == Op::none) {
    apply(x * y);
  } else if (op_a == Op::transpose && op_b == Op::none) {
    apply(x.transpose() * y);
  } else if (op_a == Op::none && op_b == Op::transpose) {
    apply(x * y.transpose());
  } else {
    apply(x.transpose() * y.transpose());
  }
#endif
}

// Rows [r0, r0 + n) of a contiguous row-major view, or columns [c0, c0 + n).
template <class View>
auto rows_of(View&& v, std::size_t r0, std::size_t n) {
  using T = std::remove_pointer_t<decltype(v.data())>;
  return Strided<T>{v.data() + r0 * std::size_t(v.cols()), Eigen::Index(n), v.cols(), v.cols()};
}
template <class View>
auto cols_of(View&& v, std::size_t c0, std::size_t n) {
  using T = std::remove_pointer_t<decltype(v.data())>;
  return Strided<T>{v.data() + c0, v.rows(), Eigen::Index(n), v.cols()};
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

// Runs body(begin, end) over [0, n) in contiguous blocks of `block` elements, one task each.
template <class Body>
void for_blocks(std::size_t n, std::size_t block, const Body& body) {
  if (n == 0) return;
  if (block >= n) {
    body(std::size_t{0}, n);
    return;
  }
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<std::size_t>(0, n, block),
      [&](const oneapi::tbb::blocked_range<std::size_t>& r) { body(r.begin(), r.end()); },
      oneapi::tbb::simple_partitioner());
}

constexpr std::size_t kMinRows = 16;  // a row block below this costs more in tasks than it saves
constexpr std::size_t kMinCols = 16;

template <class T, class Block>
void activation_derivative_mul(Activation act, const Block& a, Eigen::Ref<RowMatrix<T>> dx) {
  switch (act) {
    case Activation::identity:
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
    case Activation::softmax:
      break;  // fused with the loss; never a hidden activation
  }
}

}  // namespace

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
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out) {
  const auto rows = static_cast<std::size_t>(x.rows());
  for_blocks(rows, block_size(rows, kMinRows, 1), [&](std::size_t r0, std::size_t r1) {
    const auto n = Eigen::Index(r1 - r0);
    gemm<T>(Op::none, Op::none, rows_of(x, r0, r1 - r0), whole(w), T(0), rows_of(out, r0, r1 - r0));
    auto z = out.middleRows(Eigen::Index(r0), n);
    z.rowwise() += b;
    activate<T>(act, z);
  });
}

template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db, LayerDone progress) {
  const auto cols = static_cast<std::size_t>(delta.cols());
  const auto columns = [&](std::size_t p0, std::size_t p1) {
    const std::size_t n = p1 - p0;
    for_blocks(n, block_size(n, kMinCols, kMinCols), [&](std::size_t c0, std::size_t c1) {
      c0 += p0;
      c1 += p0;
      auto sum = db.segment(Eigen::Index(c0), Eigen::Index(c1 - c0));
      if (x.rows() == 0) {
        StridedMap<T>(dw.data() + c0, dw.rows(), Eigen::Index(c1 - c0),
                      Eigen::OuterStride<>(dw.cols()))
            .setZero();
        sum.setZero();
        return;
      }
      gemm<T>(Op::transpose, Op::none, whole(x), cols_of(delta, c0, c1 - c0), T(0),
              cols_of(dw, c0, c1 - c0));
      // The summed bias rows, row by row: contiguous reads (a column sum of a row-major
      // matrix would stride through memory).
      sum = delta.row(0).segment(Eigen::Index(c0), Eigen::Index(c1 - c0));
      for (Eigen::Index r = 1; r < delta.rows(); ++r) {
        sum += delta.row(r).segment(Eigen::Index(c0), Eigen::Index(c1 - c0));
      }
    });
  };
  if (!progress) {
    columns(0, cols);
    return;
  }
  constexpr std::size_t kParts = 4, kMinPart = 128;
  const std::size_t part = std::max(kMinPart, (cols + kParts - 1) / kParts / kMinCols * kMinCols);
  for (std::size_t p0 = 0; p0 < cols; p0 += part) {
    columns(p0, std::min(cols, p0 + part));
    progress(0);
  }
}

template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx) {
  const auto rows = static_cast<std::size_t>(delta.rows());
  for_blocks(rows, block_size(rows, kMinRows, 1), [&](std::size_t r0, std::size_t r1) {
    const auto n = Eigen::Index(r1 - r0);
    gemm<T>(Op::none, Op::transpose, rows_of(delta, r0, r1 - r0), whole(w), T(0),
            rows_of(dx, r0, r1 - r0));
    auto d = dx.middleRows(Eigen::Index(r0), n);
    activation_derivative_mul<T>(act_prev, a_prev.middleRows(Eigen::Index(r0), n), d);
  });
}

void for_each_chunk(std::size_t chunks, LayerDone body) {
  for_blocks(chunks, 1, [&](std::size_t c0, std::size_t c1) {
    for (std::size_t c = c0; c < c1; ++c) body(c);
  });
}

namespace {

// A product applied chunk by chunk: for each chunk of `chunk` consecutive rows of `in`
// (row-major, rows × depth), out_c = in_c · op(w), with op(w) depth × m. With Eigen's GEMM
// the weights are packed once for its micro-kernel and each chunk is one call of that kernel
// on its own packed rows: no chunk repacks the weights, and every chunk's call depends on its
// rows alone. `transposed` w is stored m × depth (row-major), else depth × m. Then
// epilogue(r0, n) runs on the same thread for the chunk's rows [r0, r0 + n).
template <class T, class Epilogue>
void chunked_product(const T* w, bool transposed, std::size_t m, std::size_t depth, const T* in,
                     T* out, std::size_t rows, std::size_t chunk, T* packed_w, T* packed_rows,
                     const Epilogue& epilogue) {
  const std::size_t chunks = (rows + chunk - 1) / chunk;
#ifdef SHARDPROP_USE_OPENBLAS
  (void)packed_w;
  (void)packed_rows;
  for_each_chunk(chunks, [&](std::size_t c) {
    const std::size_t r0 = c * chunk, n = std::min(chunk, rows - r0);
    const auto d = Eigen::Index(depth), mm = Eigen::Index(m);
    gemm<T>(Op::none, transposed ? Op::transpose : Op::none,
            Strided<const T>{in + r0 * depth, Eigen::Index(n), d, d},
            transposed ? Strided<const T>{w, mm, d, d} : Strided<const T>{w, d, mm, mm}, T(0),
            Strided<T>{out + r0 * m, Eigen::Index(n), mm, mm});
    epilogue(r0, n);
  });
#else
  // Row-major out_c (n × m) is column-major out_cᵀ (m × n) = op(w)ᵀ (m × depth) · in_cᵀ.
  namespace ei = Eigen::internal;
  using Index = Eigen::Index;
  using Traits = ei::gebp_traits<T, T>;
  using RhsMapper = ei::const_blas_data_mapper<T, Index, Eigen::ColMajor>;
  using ResMapper = ei::blas_data_mapper<T, Index, Eigen::ColMajor, Eigen::Unaligned, 1>;
  const auto pack = [&](auto order) {
    constexpr int kOrder = decltype(order)::value;
    using LhsMapper = ei::const_blas_data_mapper<T, Index, kOrder>;
    ei::gemm_pack_lhs<T, Index, LhsMapper, Traits::mr, Traits::LhsProgress,
                      typename Traits::LhsPacket4Packing, kOrder>
        pack_lhs;
    pack_lhs(packed_w, LhsMapper(w, Index(transposed ? depth : m)), Index(depth), Index(m));
  };
  if (transposed) {
    pack(std::integral_constant<int, Eigen::RowMajor>());
  } else {
    pack(std::integral_constant<int, Eigen::ColMajor>());
  }
  const std::size_t stride = (depth * chunk + 15) / 16 * 16;  // each chunk's packed rows aligned
  for_each_chunk(chunks, [&](std::size_t c) {
    const std::size_t r0 = c * chunk, n = std::min(chunk, rows - r0);
    T* block = packed_rows + c * stride;
    ei::gemm_pack_rhs<T, Index, RhsMapper, Traits::nr, Eigen::ColMajor> pack_rhs;
    pack_rhs(block, RhsMapper(in + r0 * depth, Index(depth)), Index(depth), Index(n));
    std::fill_n(out + r0 * m, n * m, T(0));
    ei::gebp_kernel<T, T, Index, ResMapper, Traits::mr, Traits::nr, false, false> gebp;
    gebp(ResMapper(out + r0 * m, Index(m)), packed_w, block, Index(m), Index(depth), Index(n), T(1));
    epilogue(r0, n);
  });
#endif
}

}  // namespace

std::size_t chunk_scratch_size(std::size_t rows, std::size_t chunk, std::size_t width) {
  const std::size_t chunks = (rows + chunk - 1) / chunk;
  return chunks * ((width * chunk + 15) / 16 * 16);
}

template <class T>
void dense_forward_chunks(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                          Activation act, MatrixView<T> out, std::size_t chunk, T* packed_w,
                          T* packed_rows) {
  const auto in = std::size_t(w.rows()), width = std::size_t(w.cols());
  chunked_product(w.data(), false, width, in, x.data(), out.data(), std::size_t(x.rows()), chunk,
                  packed_w, packed_rows, [&](std::size_t r0, std::size_t n) {
                    auto z = out.middleRows(Eigen::Index(r0), Eigen::Index(n));
                    z.rowwise() += b;
                    activate<T>(act, z);
                  });
}

template <class T>
void dense_backward_input_chunks(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                                 ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx,
                                 std::size_t chunk, T* packed_w, T* packed_rows) {
  const auto in = std::size_t(w.rows()), width = std::size_t(w.cols());
  chunked_product(w.data(), true, in, width, delta.data(), dx.data(), std::size_t(delta.rows()),
                  chunk, packed_w, packed_rows, [&](std::size_t r0, std::size_t n) {
                    const auto r = Eigen::Index(r0), k = Eigen::Index(n);
                    auto d = dx.middleRows(r, k);
                    activation_derivative_mul<T>(act_prev, a_prev.middleRows(r, k), d);
                  });
}

namespace {

// The fixed blocks of dW that dense_backward_params_fixed computes one at a time: a block's
// float products and its integers (256 × 256 of each) stay in a core's L2 cache while the
// chunks are added.
constexpr std::size_t kFixedBlock = 256;

// Chunks whose products one pass adds: each entry's integer is read and written once per
// group, not once per chunk.
constexpr std::size_t kFixedGroup = 4;

// acc[i] (+)= Σ_q round(v[q][i] · scale) for a power of two `scale` (= for the first group):
// each product is exact in S, then rounded to nearest (ties to even).
template <std::size_t N, class S, class T>
void add_fixed(const T* const* v, std::size_t n, S scale, std::int64_t* __restrict acc,
               bool first) {
  for (std::size_t i = 0; i < n; ++i) {
    std::int64_t sum = first ? 0 : acc[i];
    for (std::size_t q = 0; q < N; ++q) {
      sum += static_cast<std::int64_t>(std::nearbyint(S(v[q][i]) * scale));
    }
    acc[i] = sum;
  }
}

template <class S, class T>
void add_fixed(const T* const* v, std::size_t count, std::size_t n, S scale, std::int64_t* acc,
               bool first) {
  static_assert(kFixedGroup == 4);
  switch (count) {
    case 1: return add_fixed<1>(v, n, scale, acc, first);
    case 2: return add_fixed<2>(v, n, scale, acc, first);
    case 3: return add_fixed<3>(v, n, scale, acc, first);
    default: return add_fixed<4>(v, n, scale, acc, first);
  }
}

// add_fixed with scale 2^exp. A float product is exact when 2^exp is a normal float: the
// products stay below 2^62, and one below 2^−126 rounds to 0 either way. So float values take
// the float path (twice the values per vector instruction) whenever it gives the same bits.
template <class T>
void add_fixed_exp(const T* const* v, std::size_t count, std::size_t n, int exp,
                   std::int64_t* acc, bool first) {
  if (std::is_same_v<T, float> && exp >= -126 && exp <= 127) {
    add_fixed(v, count, n, std::ldexp(T(1), exp), acc, first);
  } else {
    add_fixed(v, count, n, std::ldexp(1.0, exp), acc, first);
  }
}

}  // namespace

template <class T>
void dense_backward_params_fixed(ConstMatrixView<T> x, ConstMatrixView<T> delta,
                                 std::size_t chunk, int w_exp, int b_exp, std::int64_t* dw,
                                 std::int64_t* db, FixedScratch& scratch, LayerDone progress) {
  const auto rows = static_cast<std::size_t>(x.rows());
  const auto in = static_cast<std::size_t>(x.cols()), out = static_cast<std::size_t>(delta.cols());
  const std::size_t row_blocks = (in + kFixedBlock - 1) / kFixedBlock;
  const std::size_t col_blocks = (out + kFixedBlock - 1) / kFixedBlock;
  const std::size_t chunks = (rows + chunk - 1) / chunk;
  const auto compute = [&](std::size_t block) {
    const std::size_t i0 = block / col_blocks * kFixedBlock, j0 = block % col_blocks * kFixedBlock;
    const std::size_t ni = std::min(kFixedBlock, in - i0), nj = std::min(kFixedBlock, out - j0);
    // This thread's products, compact, so they stay in its cache from block to block.
    T* mine = scratch.local<T>();
    T column_sums[kFixedGroup][kFixedBlock];
    for (std::size_t g0 = 0; g0 < chunks; g0 += kFixedGroup) {
      const std::size_t count = std::min(kFixedGroup, chunks - g0);
      const T* products[kFixedGroup];
      const T* sums[kFixedGroup];
      for (std::size_t q = 0; q < count; ++q) {
        const std::size_t r0 = (g0 + q) * chunk, n = std::min(chunk, rows - r0);
        T* product = mine + q * kFixedBlock * kFixedBlock;
        gemm<T>(Op::transpose, Op::none,
                Strided<const T>{x.data() + r0 * in + i0, Eigen::Index(n), Eigen::Index(ni),
                                 Eigen::Index(in)},
                Strided<const T>{delta.data() + r0 * out + j0, Eigen::Index(n), Eigen::Index(nj),
                                 Eigen::Index(out)},
                T(0), Strided<T>{product, Eigen::Index(ni), Eigen::Index(nj), Eigen::Index(nj)});
        products[q] = product;
        // The summed bias rows, row by row (contiguous reads), once per column block.
        std::fill_n(column_sums[q], nj, T(0));
        for (std::size_t r = r0; i0 == 0 && r < r0 + n; ++r) {
          const T* row = delta.data() + r * out + j0;
          for (std::size_t j = 0; j < nj; ++j) column_sums[q][j] += row[j];
        }
        sums[q] = column_sums[q];
      }
      for (std::size_t i = 0; i < ni; ++i) {
        const T* row[kFixedGroup];
        for (std::size_t q = 0; q < count; ++q) row[q] = products[q] + i * nj;
        add_fixed_exp(row, count, nj, w_exp, dw + (i0 + i) * out + j0, g0 == 0);
      }
      if (i0 == 0) add_fixed_exp(sums, count, nj, b_exp, db + j0, g0 == 0);
    }
  };
  scratch.execute([&](std::size_t) {
    if (!progress) {
      for_each_chunk(row_blocks * col_blocks, compute);
      return;
    }
    for (std::size_t ib = 0; ib < row_blocks; ++ib) {  // a row of blocks at a time
      for_each_chunk(col_blocks, [&](std::size_t jb) { compute(ib * col_blocks + jb); });
      progress(0);
    }
  });
}

// The blocks run in an arena of their own, so each thread has a slot number there, unique
// among the threads in it, and the buffer of that slot; all are made on first use.
struct FixedScratch::Impl {
  oneapi::tbb::task_arena arena;
  std::vector<AlignedVector<double>> slots;
};

FixedScratch::FixedScratch() : impl_(std::make_unique<Impl>()) {}
FixedScratch::~FixedScratch() = default;

void FixedScratch::execute(LayerDone body) {
  if (impl_->slots.empty()) {
    impl_->arena.initialize();
    const std::size_t doubles = kFixedGroup * kFixedBlock * kFixedBlock;  // fits T = double
    impl_->slots.assign(std::size_t(impl_->arena.max_concurrency()), AlignedVector<double>(doubles));
  }
  impl_->arena.execute([&] { body(0); });
}

template <class T>
T* FixedScratch::local() {
  const int slot = oneapi::tbb::this_task_arena::current_thread_index();
  SP_CHECK(slot >= 0 && std::size_t(slot) < impl_->slots.size(),
           "FixedScratch::local outside FixedScratch::execute");
  return reinterpret_cast<T*>(impl_->slots[std::size_t(slot)].data());
}

template <class T>
GradientBound chunk_gradient_bound(ConstMatrixView<T> x, ConstMatrixView<T> delta,
                                   std::size_t chunk) {
  GradientBound bound;
  const auto rows = static_cast<std::size_t>(x.rows());
  for (std::size_t r0 = 0; r0 < rows; r0 += chunk) {
    const auto n = Eigen::Index(std::min(chunk, rows - r0));
    const double x_max = double(x.middleRows(Eigen::Index(r0), n).cwiseAbs().maxCoeff());
    double delta_sum = 0;
    for (Eigen::Index r = Eigen::Index(r0); r < Eigen::Index(r0) + n; ++r) {
      delta_sum += double(delta.row(r).cwiseAbs().maxCoeff());
    }
    // maxCoeff skips NaN, so check what the products will see
    const bool finite = x.middleRows(Eigen::Index(r0), n).allFinite() &&
                        delta.middleRows(Eigen::Index(r0), n).allFinite();
    const double inf = std::numeric_limits<double>::infinity();
    bound.w = std::max(bound.w, finite ? x_max * delta_sum : inf);
    bound.b = std::max(bound.b, finite ? delta_sum : inf);
  }
  return bound;
}

#define SP_INSTANTIATE(T)                                                                     \
  template void activate<T>(Activation, Eigen::Ref<RowMatrix<T>>);                            \
  template void dense_forward<T>(ConstMatrixView<T>, ConstMatrixView<T>, ConstRowVectorView<T>, \
                                 Activation, MatrixView<T>);                                  \
  template void dense_backward_params<T>(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>, \
                                         RowVectorView<T>, LayerDone);                        \
  template void dense_backward_input<T>(ConstMatrixView<T>, ConstMatrixView<T>,               \
                                        ConstMatrixView<T>, Activation, MatrixView<T>);        \
  template void dense_backward_params_fixed<T>(ConstMatrixView<T>, ConstMatrixView<T>,        \
                                               std::size_t, int, int, std::int64_t*,          \
                                               std::int64_t*, FixedScratch&, LayerDone);      \
  template T* FixedScratch::local<T>();                                                       \
  template GradientBound chunk_gradient_bound<T>(ConstMatrixView<T>, ConstMatrixView<T>,      \
                                                 std::size_t);                                \
  template void dense_forward_chunks<T>(ConstMatrixView<T>, ConstMatrixView<T>,               \
                                        ConstRowVectorView<T>, Activation, MatrixView<T>,     \
                                        std::size_t, T*, T*);                                 \
  template void dense_backward_input_chunks<T>(ConstMatrixView<T>, ConstMatrixView<T>,        \
                                               ConstMatrixView<T>, Activation, MatrixView<T>, \
                                               std::size_t, T*, T*);
SP_INSTANTIATE(float)
SP_INSTANTIATE(double)
#undef SP_INSTANTIATE

}  // namespace shardprop
