// The deterministic mode's kernels: chunked products and fixed-point gradient sums
// (docs/reproducibility.md). The only code that reaches into Eigen's internals: its GEMM
// micro-kernel, called on weights packed once per product.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>
#include <oneapi/tbb/task_arena.h>
#include <type_traits>
#include <vector>

#include "fixed_point.hpp"
#include "gemm.hpp"
#include "shardprop/error.hpp"

namespace shardprop {

int fixed_point_exponent(double bound, std::size_t terms) {
  if (!(bound > 0)) return 0;
  int e = 0;
  std::frexp(bound, &e);  // bound < 2^e
  int t = 0;
  while (t < 62 && (std::size_t(1) << t) < terms) ++t;  // terms ≤ 2^t
  // Each rounded value is below 2^(61 − t) + 1 ≤ 2^(62 − t), so 2^t of them stay below 2^62.
  // Bounds under 2^−900 (never met in practice) lose precision instead of making 2^s overflow.
  return std::min(61 - e - t, 960);
}

// Each chunk is one call of Eigen's GEMM micro-kernel on its own packed rows: no chunk
// repacks the weights, and every chunk's call depends on its rows alone, whichever GEMM
// backend the other kernels use.
template <class T>
void chunked_product(const T* w, bool transposed, std::size_t m, std::size_t depth, const T* in,
                     T* out, std::size_t rows, std::size_t chunk, ChunkScratch<T>& scratch,
                     FunctionRef<std::size_t, std::size_t> done) {
  if (rows == 0) return;
  const std::size_t chunks = (rows + chunk - 1) / chunk;
  T* packed_w = scratch.packed_w.data();
  T* packed_rows = scratch.packed_rows.data();
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
    done(r0, n);
  });
}

std::size_t chunk_scratch_size(std::size_t rows, std::size_t chunk, std::size_t width) {
  const std::size_t chunks = (rows + chunk - 1) / chunk;
  return chunks * ((width * chunk + 15) / 16 * 16);
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
                                 std::int64_t* db, FixedScratch& scratch, Callback progress,
                                 bool add) {
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
        // Always Eigen: the deterministic mode's bits do not depend on --gemm.
        gemm::multiply<T>(gemm::Backend::eigen, gemm::Op::transpose, gemm::Op::none, T(1),
                          {x.data() + r0 * in + i0, Eigen::Index(n), Eigen::Index(ni),
                           Eigen::Index(in)},
                          {delta.data() + r0 * out + j0, Eigen::Index(n), Eigen::Index(nj),
                           Eigen::Index(out)},
                          T(0), {product, Eigen::Index(ni), Eigen::Index(nj), Eigen::Index(nj)});
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
        add_fixed_exp(row, count, nj, w_exp, dw + (i0 + i) * out + j0, g0 == 0 && !add);
      }
      if (i0 == 0) add_fixed_exp(sums, count, nj, b_exp, db + j0, g0 == 0 && !add);
    }
  };
  scratch.execute([&] {
    if (!progress) {
      for_each_chunk(row_blocks * col_blocks, compute);
      return;
    }
    for (std::size_t ib = 0; ib < row_blocks; ++ib) {  // a row of blocks at a time
      for_each_chunk(col_blocks, [&](std::size_t jb) { compute(ib * col_blocks + jb); });
      progress();
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

void FixedScratch::execute(Callback body) {
  if (impl_->slots.empty()) {
    // As many slots as the arena it is called from: --threads may exceed the cores.
    impl_->arena.initialize(oneapi::tbb::this_task_arena::max_concurrency());
    const std::size_t doubles = kFixedGroup * kFixedBlock * kFixedBlock;  // fits T = double
    impl_->slots.assign(std::size_t(impl_->arena.max_concurrency()), AlignedVector<double>(doubles));
  }
  impl_->arena.execute([&] { body(); });
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
  template void dense_backward_params_fixed<T>(ConstMatrixView<T>, ConstMatrixView<T>,        \
                                               std::size_t, int, int, std::int64_t*,          \
                                               std::int64_t*, FixedScratch&, Callback, bool); \
  template T* FixedScratch::local<T>();                                                       \
  template GradientBound chunk_gradient_bound<T>(ConstMatrixView<T>, ConstMatrixView<T>,      \
                                                 std::size_t);                                \
  template void chunked_product<T>(const T*, bool, std::size_t, std::size_t, const T*, T*,    \
                                   std::size_t, std::size_t, ChunkScratch<T>&,               \
                                   FunctionRef<std::size_t, std::size_t>);
SP_INSTANTIATE(float)
SP_INSTANTIATE(double)
#undef SP_INSTANTIATE

}  // namespace shardprop
