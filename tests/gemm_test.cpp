// The GEMM module: every backend built in against a double-precision reference, on every
// transposition, strided views, alpha and beta, and from several threads at once; the
// bfloat16 rounding and products; and the bf16 mode's gradients.
//
// Tolerances. A float32 product of depth k has a forward error of at most γ_k·Σ|a||b| with
// γ_k ≈ k·ε (ε = 2⁻²⁴ ≈ 6e-8) however the backend orders its sums; the tests allow 2·k·ε
// per element, relative to Σ|a||b| (plus the beta term), which any correct backend meets and
// a wrong element (a missed transposition, a stride mix-up) misses by orders of magnitude.
// bfloat16 products multiply numbers that are exact in bfloat16, so each product is exact
// in float32 and only the float32 sums round: the same bound holds against a double
// reference of the rounded operands.
#include <gtest/gtest.h>

#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/parallel_for.h>

#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.hpp"
#include "shardprop/mlp.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

using gemm::Op;

// A row-major matrix of rows × cols stored with rows `ld` apart (the gaps hold garbage).
struct Strided {
  Eigen::Index rows, cols, ld;
  std::vector<float> data;
  Strided(Eigen::Index r, Eigen::Index c, Eigen::Index extra, std::uint64_t seed)
      : rows(r), cols(c), ld(c + extra), data(std::size_t(std::max<Eigen::Index>(1, r * (c + extra)))) {
    Rng rng(seed);
    for (float& v : data) v = float(2 * rng.uniform() - 1);
  }
  float at(Eigen::Index i, Eigen::Index j) const { return data[std::size_t(i * ld + j)]; }
  gemm::View<const float> view() const { return {data.data(), rows, cols, ld}; }
  gemm::View<float> out() { return {data.data(), rows, cols, ld}; }
};

struct Shape {
  Eigen::Index m, n, k;
};

// op(x)(i, j) of a stored matrix.
float element(const Strided& x, Op op, Eigen::Index i, Eigen::Index j) {
  return op == Op::none ? x.at(i, j) : x.at(j, i);
}

// Checks c = alpha·op(a)·op(b) + beta·c0 against a double reference, element by element.
// `round` maps each operand value to the one the product used (bf16: its rounding).
template <class Round>
void expect_product(const Strided& a, Op op_a, const Strided& b, Op op_b, float alpha,
                    float beta, const Strided& c0, const Strided& c, const Round& round,
                    const std::string& what) {
  const Eigen::Index k = op_a == Op::none ? a.cols : a.rows;
  const double eps = std::numeric_limits<float>::epsilon() / 2;
  int bad = 0;
  for (Eigen::Index i = 0; i < c.rows; ++i) {
    for (Eigen::Index j = 0; j < c.cols; ++j) {
      double sum = 0, magnitude = 0;
      for (Eigen::Index p = 0; p < k; ++p) {
        const double t = double(round(element(a, op_a, i, p))) * double(round(element(b, op_b, p, j)));
        sum += t;
        magnitude += std::abs(t);
      }
      const double want = double(alpha) * sum + double(beta) * double(c0.at(i, j));
      const double bound = 2 * double(k + 2) * eps *
                           (std::abs(alpha) * magnitude + std::abs(beta * c0.at(i, j))) + 1e-30;
      if (std::abs(double(c.at(i, j)) - want) > bound && ++bad <= 3) {
        ADD_FAILURE() << what << ": c(" << i << "," << j << ") = " << c.at(i, j) << ", want "
                      << want << " ± " << bound;
      }
    }
  }
  EXPECT_EQ(bad, 0) << what;
}

const Shape kShapes[] = {{1, 1, 1}, {37, 53, 29}, {64, 16, 300}, {5, 130, 0}, {128, 96, 64}};

std::string case_name(gemm::Backend b, Op op_a, Op op_b, const Shape& s) {
  return std::string(gemm::short_name(b)) + (op_a == Op::none ? " N" : " T") +
         (op_b == Op::none ? "N " : "T ") + std::to_string(s.m) + "x" + std::to_string(s.n) +
         "x" + std::to_string(s.k);
}

TEST(Gemm, EveryBackendMatchesADoubleReference) {
  const auto same = [](float v) { return v; };
  for (gemm::Backend backend : gemm::backends()) {
    for (Op op_a : {Op::none, Op::transpose}) {
      for (Op op_b : {Op::none, Op::transpose}) {
        for (const Shape& s : kShapes) {
          for (const auto& [alpha, beta] :
               {std::pair{1.0f, 0.0f}, std::pair{1.0f, 1.0f}, std::pair{0.5f, 0.25f},
                std::pair{-2.0f, 1.0f}}) {
            const Strided a = op_a == Op::none ? Strided(s.m, s.k, 3, 1) : Strided(s.k, s.m, 0, 1);
            const Strided b = op_b == Op::none ? Strided(s.k, s.n, 0, 2) : Strided(s.n, s.k, 5, 2);
            const Strided c0(s.m, s.n, 7, 3);
            Strided c = c0;
            gemm::multiply<float>(backend, op_a, op_b, alpha, a.view(), b.view(), beta, c.out());
            expect_product(a, op_a, b, op_b, alpha, beta, c0, c, same,
                           case_name(backend, op_a, op_b, s) + " alpha " + std::to_string(alpha) +
                               " beta " + std::to_string(beta));
            // The gaps between rows are left alone.
            for (Eigen::Index i = 0; i < c.rows; ++i) {
              for (Eigen::Index j = c.cols; j < c.ld; ++j) EXPECT_EQ(c.at(i, j), c0.at(i, j));
            }
          }
        }
      }
    }
  }
}

// Products run from several oneTBB threads at once, each on its own output, as the training
// kernels run them: each is right (no backend shares state between calls), and the process
// gains no threads of the backend's own. Every other product takes b transposed (oneDNN
// runs those through its matmul primitive, the others through sgemm).
TEST(Gemm, ProductsFromSeveralThreadsAtOnceAreEachRight) {
  const oneapi::tbb::global_control four(oneapi::tbb::global_control::max_allowed_parallelism, 4);
  const auto same = [](float v) { return v; };
  const auto op_b = [](std::size_t i) { return i % 2 == 0 ? Op::none : Op::transpose; };
  for (gemm::Backend backend : gemm::backends()) {
    constexpr int kProducts = 48;
    std::vector<Strided> as, bs, cs;
    for (int i = 0; i < kProducts; ++i) {
      as.emplace_back(40 + i, 70, 0, 100 + std::uint64_t(i));
      if (op_b(std::size_t(i)) == Op::none) {
        bs.emplace_back(70, 33, 0, 200 + std::uint64_t(i));
      } else {
        bs.emplace_back(33, 70, 0, 200 + std::uint64_t(i));
      }
      cs.emplace_back(40 + i, 33, 0, 300 + std::uint64_t(i));
    }
    const std::vector<Strided> c0 = cs;
    oneapi::tbb::parallel_for(0, kProducts, [&](int i) {
      const auto u = std::size_t(i);
      gemm::multiply<float>(backend, Op::none, op_b(u), 1.0f, as[u].view(), bs[u].view(), 0.0f,
                            cs[u].out());
    });
    for (std::size_t i = 0; i < cs.size(); ++i) {
      expect_product(as[i], Op::none, bs[i], op_b(i), 1.0f, 0.0f, c0[i], cs[i], same,
                     std::string(gemm::short_name(backend)) + " product " + std::to_string(i));
    }
  }
}

std::uint16_t bf16_of(std::uint32_t float_bits) {
  const float f = std::bit_cast<float>(float_bits);
  std::uint16_t out = 0;
  gemm::to_bf16(&f, &out, 1);
  return out;
}

float from_bf16(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t(bits) << 16); }

TEST(Bf16, RoundsToNearestWithTiesToEven) {
  EXPECT_EQ(bf16_of(0x3f800000u), 0x3f80);  // 1 is exact
  EXPECT_EQ(bf16_of(0x3f808000u), 0x3f80);  // halfway, down to the even 1.0
  EXPECT_EQ(bf16_of(0x3f818000u), 0x3f82);  // halfway, up to the even neighbour
  EXPECT_EQ(bf16_of(0x3f808001u), 0x3f81);  // above halfway
  EXPECT_EQ(bf16_of(0x3f807fffu), 0x3f80);  // below halfway
  EXPECT_EQ(bf16_of(0xbf818000u), 0xbf82);  // the sign is kept
  EXPECT_EQ(bf16_of(0x7f800000u), 0x7f80);  // +inf
  EXPECT_EQ(bf16_of(0x7f7fffffu), 0x7f80);  // the largest float rounds to inf
  EXPECT_EQ(bf16_of(0x00000001u), 0x0000);  // the smallest subnormal rounds to 0
  const std::uint16_t nan = bf16_of(0x7f800001u);  // a NaN whose payload is in the low bits
  EXPECT_TRUE(std::isnan(from_bf16(nan)));
  // Every rounding is within half a unit in the last place of 8 significant bits: 2⁻⁸ of
  // the value at most.
  Rng rng(5);
  for (int i = 0; i < 10000; ++i) {
    const float f = float((2 * rng.uniform() - 1) * std::exp(40 * (rng.uniform() - 0.5)));
    const float r = from_bf16(bf16_of(std::bit_cast<std::uint32_t>(f)));
    EXPECT_LE(std::abs(double(r) - double(f)), std::ldexp(std::abs(double(f)), -8)) << f;
  }
}

// bf16 copy of a Strided, element for element (its gaps rounded too).
std::vector<std::uint16_t> to_bf16(const Strided& x) {
  std::vector<std::uint16_t> out(x.data.size());
  gemm::to_bf16(x.data.data(), out.data(), out.size());
  return out;
}

TEST(Bf16, ProductsOfRoundedOperandsSumInFloat32) {
  if (!gemm::bf16_supported()) GTEST_SKIP() << gemm::bf16_unsupported_reason();
  const auto round = [](float v) {
    return from_bf16(bf16_of(std::bit_cast<std::uint32_t>(v)));
  };
  for (Op op_a : {Op::none, Op::transpose}) {
    for (Op op_b : {Op::none, Op::transpose}) {
      for (const Shape& s : kShapes) {
        const Strided a = op_a == Op::none ? Strided(s.m, s.k, 3, 1) : Strided(s.k, s.m, 0, 1);
        const Strided b = op_b == Op::none ? Strided(s.k, s.n, 0, 2) : Strided(s.n, s.k, 5, 2);
        const Strided c0(s.m, s.n, 7, 3);
        const std::vector<std::uint16_t> a16 = to_bf16(a), b16 = to_bf16(b);
        for (const bool add : {false, true}) {  // c = a·b, or c += a·b (accumulation)
          Strided c = c0;
          gemm::multiply_bf16(op_a, op_b, {a16.data(), a.rows, a.cols, a.ld},
                              {b16.data(), b.rows, b.cols, b.ld}, c.out(), add);
          expect_product(a, op_a, b, op_b, 1.0f, add ? 1.0f : 0.0f, c0, c, round,
                         case_name(gemm::Backend::onednn, op_a, op_b, s) + " bf16" +
                             (add ? " adding" : ""));
        }
      }
    }
  }
}

TEST(GemmBackend, NamesAreCheckedAndAutoIsTheDefault) {
  EXPECT_EQ(gemm::parse_backend("auto"), gemm::default_backend());
  EXPECT_EQ(gemm::parse_backend("eigen"), gemm::Backend::eigen);
  testing::expect_error([] { gemm::parse_backend("mkl"); }, "--gemm 'mkl': not a GEMM backend");
  // The default is SHARDPROP_GEMM's backend when it is set (the OpenBLAS stage of the suite
  // sets it), else the first built in; every one built in has a description.
  const char* env = std::getenv("SHARDPROP_GEMM");
  EXPECT_EQ(gemm::default_backend(),
            env && *env ? gemm::parse_backend(env) : gemm::backends().front());
  for (gemm::Backend b : gemm::backends()) EXPECT_FALSE(gemm::describe(b).empty());
}

// A model of 40 inputs and 6 classes, its parameters and a batch of 45 rows.
template <class T>
struct Problem {
  ModelSpec spec;
  Layout layout;
  AlignedVector<T> params;
  RowMatrix<T> x, y;
  explicit Problem(const char* layers)
      : spec(parse_model(layers, "xent")),
        layout(spec),
        params(layout.size()),
        x(testing::random_matrix<T>(45, 40, 31)),
        y(testing::random_targets<T>(Loss::xent, 45, 6, 32)) {
    init_params<T>(spec, layout, 3, std::span<T>(params));
  }
};

// bf16 mode: the gradient of a small model with every operand of its products rounded to
// bfloat16 stays close to the exact (double) gradient. bfloat16 keeps 8 significant bits, a
// relative rounding of at most u = 2⁻⁸ per operand; through three smooth layers forward and
// back the gradient's entries move by about u of the largest entry of their layer (measured:
// 5.2e-3 at worst here), so 2e-2 holds with margin, while a wrong operand or transposition
// gives errors of order 1. The activations are smooth on purpose: a ReLU unit whose input is
// within rounding of 0 switches on or off, which changes its δ entirely (measured with ReLU:
// up to 0.12 of the layer's largest entry), a property of bf16 training, not of the kernels.
TEST(Bf16, GradientIsTheFloat32GradientToBfloat16Rounding) {
  if (!gemm::bf16_supported()) GTEST_SKIP() << gemm::bf16_unsupported_reason();
  const Problem<double> problem("40,32:tanh,24:sigmoid,6:softmax");
  const auto& [spec, layout, params, x, y] = problem;
  Mlp<double> exact_mlp(spec);
  const testing::Gradient<double> exact =
      testing::full_batch_gradient<double>(exact_mlp, params, testing::view(x), testing::view(y));

  const AlignedVector<float> params32(params.begin(), params.end());
  const RowMatrix<float> x32 = x.cast<float>(), y32 = y.cast<float>();
  Mlp<float> bf16_mlp(spec, 0, Precision::bf16);
  const testing::Gradient<float> low =
      testing::full_batch_gradient<float>(bf16_mlp, params32, testing::view(x32), testing::view(y32));
  const AlignedVector<double> low64(low.mean.begin(), low.mean.end());
  const double error = testing::max_relative_error<double>(layout, low64, exact.mean);
  EXPECT_LT(error, 2e-2);
  // It is a bf16 gradient, not the float32 one: the rounding shows.
  Mlp<float> fp32_mlp(spec);
  const testing::Gradient<float> full =
      testing::full_batch_gradient<float>(fp32_mlp, params32, testing::view(x32), testing::view(y32));
  const AlignedVector<double> full64(full.mean.begin(), full.mean.end());
  EXPECT_GT(testing::max_relative_error<double>(layout, low64, full64), 1e-5);
  EXPECT_LT(testing::max_relative_error<double>(layout, full64, exact.mean), 1e-5);
}

// bf16 mode, sharded: the reduced gradient over 1…5 in-process ranks (uneven shards) equals
// the full-batch bf16 gradient. Each row's products see the same rounded operands on any
// rank; what differs is the order of the float32 sums over rows, and, where a backend rounds
// a row's sum differently in another block, an activation that lands on the other side of a
// bfloat16 rounding boundary (one operand of one row off by 2⁻⁸). The first gives float
// rounding (2e-6, as reducer_test), the second at most 2⁻⁸ of one row's term in 45: 2e-3.
TEST(Bf16, ShardedGradientEqualsTheFullBatchGradient) {
  if (!gemm::bf16_supported()) GTEST_SKIP() << gemm::bf16_unsupported_reason();
  const Problem<float> problem("40,32:relu,24:tanh,6:softmax");
  const auto& [spec, layout, params, x, y] = problem;
  const std::size_t batch = std::size_t(x.rows());
  Mlp<float> full_mlp(spec, 0, Precision::bf16);
  const testing::Gradient<float> full =
      testing::full_batch_gradient<float>(full_mlp, params, testing::view(x), testing::view(y));
  for (int p = 1; p <= 5; ++p) {
    std::vector<testing::Gradient<float>> out(static_cast<std::size_t>(p));
    testing::run_ranks(p, [&](Communicator& comm) {
      Mlp<float> mlp(spec, 0, Precision::bf16);
      const Range shard = shard_range(batch, comm.rank(), p);
      out[std::size_t(comm.rank())] = testing::reduced_gradient<float>(
          mlp, comm, std::span<const float>(params), testing::rows_of(x, shard.begin, shard.end),
          testing::rows_of(y, shard.begin, shard.end), batch);
    });
    for (int r = 0; r < p; ++r) {
      const testing::Gradient<float>& g = out[std::size_t(r)];
      EXPECT_LT(testing::max_relative_error<float>(layout, std::span<const float>(g.mean),
                                                   std::span<const float>(full.mean)),
                2e-3)
          << "P = " << p << ", rank " << r;
      EXPECT_TRUE(std::equal(g.mean.begin(), g.mean.end(), out[0].mean.begin()))
          << "ranks differ, P = " << p;
    }
  }
}

TEST(Bf16, IsRefusedWithTheDeterministicMode) {
  const ModelSpec spec = parse_model("8,4:relu,3:softmax", "xent");
  testing::expect_error([&] { Mlp<float>(spec, 16, Precision::bf16); },
                        "--precision bf16 cannot be combined with --deterministic");
  testing::expect_error([] { parse_precision("fp16"); }, "--precision 'fp16': not a precision");
}

}  // namespace
}  // namespace shardprop
