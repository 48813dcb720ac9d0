// The deterministic mode in one process: a global minibatch reduced by P = 1…5 and 16
// in-process ranks, with 1 and 2 oneTBB threads, gives the same bits everywhere, and those
// bits are the full-batch mean gradient up to float rounding.
//
// Tolerances, relative to the largest entry of each W and b:
// - against the full-batch gradient in float: 2e-6, as in reduce_test.cpp (the same per-sample
//   products, summed in another order; ε = 6e-8, ≤ 103 terms per entry);
// - against the full-batch gradient in double: 1e-6, about 16 ε. The float passes round every
//   activation and δ, and each chunk's products are float sums of 8 terms; the fixed-point
//   sum of the chunks adds under 2^-40 of the largest entry. (Measured: 1.3e-7 to 1.5e-7,
//   where the default mode's float full-batch gradient is 1.9e-7 to 3.5e-7 from this one.)
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <thread>
#include <oneapi/tbb/global_control.h>

#include "fixed_point.hpp"
#include "shardprop/comm.hpp"
#include "shardprop/train.hpp"
#include "gemm.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

TEST(FixedPointExponent, NoOverflowAndNoBitsWasted) {
  for (double bound : {1e-30, 3e-7, 0.5, 1.0, 1.5, 7.0, 1e6, 3e20}) {
    for (std::size_t terms : {1u, 2u, 3u, 13u, 64u, 1000u}) {
      const int s = fixed_point_exponent(bound, terms);
      int t = 0;
      while ((std::size_t(1) << t) < terms) ++t;
      // Each term rounds to at most bound·2^s + 1; all of them together stay below 2^62.
      const double largest = std::ldexp(bound, s);
      EXPECT_LE(double(terms) * (largest + 1), std::ldexp(1.0, 62)) << bound << " " << terms;
      // One more bit would break the guarantee: the exponent keeps every bit it can.
      EXPECT_GE(2 * largest, std::ldexp(1.0, 61 - t)) << bound << " " << terms;
    }
  }
  EXPECT_EQ(fixed_point_exponent(0.0, 5), 0);
  EXPECT_EQ(fixed_point_exponent(1e-300, 5), 960);  // 2^960 and 2^−960 are finite doubles
}

TEST(ChunkedShard, ShardsTileTheRowsAndEndOnChunkEdges) {
  for (std::size_t rows : {1u, 7u, 64u, 103u}) {
    for (std::size_t chunk : {1u, 8u, 32u}) {
      for (int p = 1; p <= 6; ++p) {
        std::size_t next = 0;
        for (int r = 0; r < p; ++r) {
          const Range s = shard_range(rows, r, p, chunk);
          EXPECT_EQ(s.begin, next);
          EXPECT_TRUE(s.begin % chunk == 0 || s.begin == rows);
          next = s.end;
        }
        EXPECT_EQ(next, rows);
      }
    }
  }
}

// A model, its initial parameters and a batch of inputs and targets suited to its loss.
struct Problem {
  ModelSpec spec;
  AlignedVector<float> params;
  RowMatrix<float> x, y;
};

Problem make_problem(const std::string& layers, const std::string& loss, std::size_t rows,
                     std::uint64_t params_seed, std::uint64_t data_seed) {
  Problem p{parse_model(layers, loss), {}, {}, {}};
  const Layout layout(p.spec);
  p.params.resize(layout.size());
  init_params<float>(p.spec, layout, params_seed, std::span<float>(p.params));
  p.x = testing::random_matrix<float>(rows, p.spec.input_width(), data_seed);
  p.y = testing::random_targets<float>(p.spec.loss, rows, p.spec.output_width(), data_seed + 1);
  return p;
}

using Outcome = testing::Gradient<float>;

// The problem's batch reduced over p in-process ranks with `threads` oneTBB threads: in the
// deterministic mode with chunks of `chunk` rows, or with chunk 0 in the default mode;
// through MPI or through node memory.
std::vector<Outcome> reduce(const Problem& problem, std::size_t chunk, int p, int threads,
                            testing::Via via = testing::Via::overlap) {
  const oneapi::tbb::global_control limit(oneapi::tbb::global_control::max_allowed_parallelism,
                                          std::size_t(threads));
  const std::size_t batch = std::size_t(problem.x.rows());
  std::vector<Outcome> out(static_cast<std::size_t>(p));
  testing::run_ranks(p, [&](Communicator& comm) {
    Mlp<float> mlp(problem.spec, chunk);
    const Range shard = shard_range(batch, comm.rank(), p, chunk);
    out[std::size_t(comm.rank())] = testing::reduced_gradient<float>(
        mlp, comm, std::span<const float>(problem.params),
        testing::rows_of(problem.x, shard.begin, shard.end),
        testing::rows_of(problem.y, shard.begin, shard.end), batch, via);
  });
  return out;
}

using testing::same_bits;

class DeterministicReduce : public ::testing::TestWithParam<const char*> {};

TEST_P(DeterministicReduce, SameBitsForAnyRanksAndThreadsAndEqualToFullBatch) {
  const std::string loss = GetParam();
  const std::string layers = loss == "xent"  ? "20,48:relu,24:tanh,6:softmax"
                             : loss == "bce" ? "20,48:relu,24:sigmoid,6:sigmoid"
                                             : "20,48:tanh,24:relu,6:identity";
  const std::size_t batch = 103, chunk = 8;  // 13 chunks, the last of 7 rows
  const Problem problem = make_problem(layers, loss, batch, 11, 31);
  const auto& [spec, params, x, y] = problem;
  const Layout layout(spec);

  const std::vector<Outcome> reference = reduce(problem, chunk, 1, 1);
  const auto g = std::span<const float>(reference[0].mean);
  for (int threads : {1, 2}) {
    for (int p : {1, 2, 3, 4, 5, 16}) {  // 16 ranks: three of them hold no chunk
      for (testing::Via via : {testing::Via::overlap, testing::Via::node}) {
        const std::vector<Outcome> run = reduce(problem, chunk, p, threads, via);
        for (int r = 0; r < p; ++r) {
          const Outcome& o = run[std::size_t(r)];
          EXPECT_TRUE(same_bits(std::span<const float>(o.mean), g))
              << p << " ranks x " << threads << " threads, rank " << r << ", via " << int(via);
          EXPECT_EQ(o.stats.loss_sum, reference[0].stats.loss_sum) << p << " ranks, rank " << r;
          EXPECT_EQ(o.stats.correct, reference[0].stats.correct);
          EXPECT_EQ(o.stats.samples, double(batch));
          EXPECT_EQ(o.stats.nonfinite_layer, -1);
        }
      }
    }
  }

  // The full-batch mean gradient, in float (same rounding of each term) and in double.
  Mlp<float> full_mlp(spec);
  const testing::Gradient<float> full =
      testing::full_batch_gradient<float>(full_mlp, params, testing::view(x), testing::view(y));
  EXPECT_LT(testing::max_relative_error<float>(layout, g, std::span<const float>(full.mean)), 2e-6);

  Mlp<double> exact_mlp(spec);
  const AlignedVector<double> params64(params.begin(), params.end());
  const RowMatrix<double> x64 = x.cast<double>(), y64 = y.cast<double>();
  const testing::Gradient<double> full64 = testing::full_batch_gradient<double>(
      exact_mlp, params64, testing::view(x64), testing::view(y64));
  const AlignedVector<double> g64(g.begin(), g.end());
  EXPECT_LT(testing::max_relative_error<double>(layout, std::span<const double>(g64),
                                                std::span<const double>(full64.mean)),
            1e-6);
  EXPECT_NEAR(reference[0].stats.loss_sum, full.stats.loss_sum, 1e-6 * full.stats.loss_sum);
  EXPECT_NEAR(reference[0].stats.loss_sum, full64.stats.loss_sum, 1e-5 * full64.stats.loss_sum);
  EXPECT_EQ(reference[0].stats.correct, full.stats.correct);
}

INSTANTIATE_TEST_SUITE_P(Losses, DeterministicReduce, ::testing::Values("xent", "bce", "mse"));

// The deterministic mode runs its own kernels whatever --gemm says: every backend built in
// gives the same bits on 1 and 3 ranks (the default mode's float results differ between
// backends by rounding; checked below so the comparison can fail).
TEST(DeterministicReduce, SameBitsWithEveryGemmBackend) {
  const Problem problem = make_problem("20,48:relu,24:tanh,6:softmax", "xent", 103, 11, 31);
  const gemm::Backend before = gemm::current_backend();
  gemm::use_backend(gemm::Backend::eigen);
  const std::vector<Outcome> reference = reduce(problem, 8, 1, 1);
  const std::vector<Outcome> eigen_default = reduce(problem, 0, 1, 1);
  bool some_default_differs = false;
  for (gemm::Backend b : gemm::backends()) {
    gemm::use_backend(b);
    for (int p : {1, 3}) {
      const std::vector<Outcome> run = reduce(problem, 8, p, 2);
      EXPECT_TRUE(same_bits(std::span<const float>(run[0].mean),
                            std::span<const float>(reference[0].mean)))
          << gemm::short_name(b) << ", " << p << " ranks";
    }
    some_default_differs |= !same_bits(std::span<const float>(reduce(problem, 0, 1, 1)[0].mean),
                                       std::span<const float>(eigen_default[0].mean));
  }
  gemm::use_backend(before);
  if (gemm::backends().size() > 1) EXPECT_TRUE(some_default_differs);
}

// The comparisons above can see a changed bit: the default mode, whose sums follow the shard
// boundaries, does not give 1 rank's bits on 3 ranks for this batch.
TEST(DeterministicReduce, TheDefaultModeDiffersSoTheComparisonCanFail) {
  const Problem problem = make_problem("20,48:relu,24:tanh,6:softmax", "xent", 103, 11, 31);
  const std::vector<Outcome> one = reduce(problem, 0, 1, 1), three = reduce(problem, 0, 3, 1);
  EXPECT_FALSE(same_bits(std::span<const float>(one[0].mean), std::span<const float>(three[0].mean)));
}

TEST(DeterministicReduce, NonFiniteInputIsReportedOnEveryRank) {
  Problem problem = make_problem("20,16:relu,6:softmax", "xent", 40, 3, 5);
  problem.x(37, 4) = std::numeric_limits<float>::quiet_NaN();  // in the last rank's chunks
  for (const Outcome& o : reduce(problem, 8, 3, 1)) {
    EXPECT_EQ(o.stats.nonfinite_layer, 0);
    EXPECT_FALSE(std::isfinite(o.stats.loss_sum));
  }
}

}  // namespace
}  // namespace shardprop
