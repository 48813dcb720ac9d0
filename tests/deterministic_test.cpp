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
#include <cstring>
#include <limits>
#include <thread>
#include <oneapi/tbb/global_control.h>

#include "shardprop/comm.hpp"
#include "shardprop/train.hpp"
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
          const Range s = chunked_shard(rows, chunk, r, p);
          EXPECT_EQ(s.begin, next);
          EXPECT_TRUE(s.begin % chunk == 0 || s.begin == rows);
          next = s.end;
        }
        EXPECT_EQ(next, rows);
      }
    }
  }
}

struct Outcome {
  AlignedVector<float> grad;
  MinibatchStats stats;
};

// The deterministic reduction over p in-process ranks, with `threads` oneTBB threads.
std::vector<Outcome> reduce(const ModelSpec& spec, std::span<const float> params,
                            const RowMatrix<float>& x, const RowMatrix<float>& y,
                            std::size_t chunk, int p, int threads) {
  const oneapi::tbb::global_control limit(oneapi::tbb::global_control::max_allowed_parallelism,
                                          std::size_t(threads));
  const std::size_t batch = std::size_t(x.rows());
  LocalGroup group(p);
  std::vector<Outcome> out(static_cast<std::size_t>(p));
  std::vector<std::thread> ranks;
  for (int r = 0; r < p; ++r) {
    ranks.emplace_back([&, r] {
      Mlp<float> mlp(spec);
      DeterministicBuffers buffers;
      Outcome& o = out[std::size_t(r)];
      o.grad.assign(mlp.layout().size() + kGradStats, 0.0f);
      const Range shard = chunked_shard(batch, chunk, r, p);
      o.stats = reduce_minibatch_gradient_deterministic(
          mlp, group.member(r), params, testing::rows_of(x, shard.begin, shard.end),
          testing::rows_of(y, shard.begin, shard.end), chunk, batch, buffers,
          std::span<float>(o.grad));
    });
  }
  for (auto& t : ranks) t.join();
  return out;
}

bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

class DeterministicReduce : public ::testing::TestWithParam<const char*> {};

TEST_P(DeterministicReduce, SameBitsForAnyRanksAndThreadsAndEqualToFullBatch) {
  const std::string loss = GetParam();
  const std::string layers = loss == "xent"  ? "20,48:relu,24:tanh,6:softmax"
                             : loss == "bce" ? "20,48:relu,24:sigmoid,6:sigmoid"
                                             : "20,48:tanh,24:relu,6:identity";
  const ModelSpec spec = parse_model(layers, loss);
  const Layout layout(spec);
  AlignedVector<float> params(layout.size());
  init_params<float>(spec, layout, 11, std::span<float>(params));
  const std::size_t batch = 103, chunk = 8;  // 13 chunks, the last of 7 rows
  const RowMatrix<float> x = testing::random_matrix<float>(batch, 20, 31);
  const RowMatrix<float> y = testing::random_targets<float>(spec.loss, batch, 6, 32);

  const std::vector<Outcome> reference = reduce(spec, params, x, y, chunk, 1, 1);
  const auto g = std::span<const float>(reference[0].grad).first(layout.size());
  for (int threads : {1, 2}) {
    for (int p : {1, 2, 3, 4, 5, 16}) {  // 16 ranks: three of them hold no chunk
      const std::vector<Outcome> run = reduce(spec, params, x, y, chunk, p, threads);
      for (int r = 0; r < p; ++r) {
        const Outcome& o = run[std::size_t(r)];
        EXPECT_TRUE(same_bits(std::span<const float>(o.grad).first(layout.size()), g))
            << p << " ranks x " << threads << " threads, rank " << r;
        EXPECT_EQ(o.stats.loss_sum, reference[0].stats.loss_sum) << p << " ranks, rank " << r;
        EXPECT_EQ(o.stats.correct, reference[0].stats.correct);
        EXPECT_EQ(o.stats.samples, double(batch));
        EXPECT_EQ(o.stats.nonfinite_layer, -1);
      }
    }
  }

  // The full-batch mean gradient, in float (same rounding of each term) and in double.
  Mlp<float> full_mlp(spec);
  AlignedVector<float> full(layout.size(), 0.0f);
  const LossSums sums =
      full_mlp.forward_backward(params, testing::view(x), testing::view(y), std::span<float>(full));
  for (auto& v : full) v /= float(batch);
  EXPECT_LT(testing::max_relative_error<float>(layout, g, full), 2e-6);

  Mlp<double> exact_mlp(spec);
  const AlignedVector<double> params64(params.begin(), params.end());
  const RowMatrix<double> x64 = x.cast<double>(), y64 = y.cast<double>();
  AlignedVector<double> full64(layout.size(), 0.0);
  const LossSums sums64 = exact_mlp.forward_backward(params64, testing::view(x64),
                                                     testing::view(y64), std::span<double>(full64));
  for (auto& v : full64) v /= double(batch);
  const AlignedVector<double> g64(g.begin(), g.end());
  EXPECT_LT(testing::max_relative_error<double>(layout, g64, full64), 1e-6);
  EXPECT_NEAR(reference[0].stats.loss_sum, sums.loss, 1e-6 * sums.loss);
  EXPECT_NEAR(reference[0].stats.loss_sum, sums64.loss, 1e-5 * sums64.loss);
  EXPECT_EQ(reference[0].stats.correct, sums.correct);
}

INSTANTIATE_TEST_SUITE_P(Losses, DeterministicReduce, ::testing::Values("xent", "bce", "mse"));

// The comparisons above can see a changed bit: the default mode, whose sums follow the shard
// boundaries, does not give 1 rank's bits on 3 ranks for this batch.
TEST(DeterministicReduce, TheDefaultModeDiffersSoTheComparisonCanFail) {
  const ModelSpec spec = parse_model("20,48:relu,24:tanh,6:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<float> params(layout.size());
  init_params<float>(spec, layout, 11, std::span<float>(params));
  const std::size_t batch = 103;
  const RowMatrix<float> x = testing::random_matrix<float>(batch, 20, 31);
  const RowMatrix<float> y = testing::random_targets<float>(Loss::xent, batch, 6, 32);
  std::vector<AlignedVector<float>> grads;
  for (int p : {1, 3}) {
    LocalGroup group(p);
    std::vector<AlignedVector<float>> out(std::size_t(p),
                                          AlignedVector<float>(layout.size() + kGradStats));
    std::vector<std::thread> ranks;
    for (int r = 0; r < p; ++r) {
      ranks.emplace_back([&, r] {
        Mlp<float> mlp(spec);
        const Range shard = shard_range(batch, r, p);
        reduce_minibatch_gradient<float>(mlp, group.member(r), std::span<const float>(params),
                                         testing::rows_of(x, shard.begin, shard.end),
                                         testing::rows_of(y, shard.begin, shard.end),
                                         std::span<float>(out[std::size_t(r)]));
      });
    }
    for (auto& t : ranks) t.join();
    grads.push_back(out[0]);
  }
  EXPECT_FALSE(same_bits(std::span<const float>(grads[0]).first(layout.size()),
                         std::span<const float>(grads[1]).first(layout.size())));
}

TEST(DeterministicReduce, NonFiniteInputIsReportedOnEveryRank) {
  const ModelSpec spec = parse_model("20,16:relu,6:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<float> params(layout.size());
  init_params<float>(spec, layout, 3, std::span<float>(params));
  RowMatrix<float> x = testing::random_matrix<float>(40, 20, 5);
  const RowMatrix<float> y = testing::random_targets<float>(Loss::xent, 40, 6, 6);
  x(37, 4) = std::numeric_limits<float>::quiet_NaN();  // in the last rank's chunks
  for (const Outcome& o : reduce(spec, params, x, y, 8, 3, 1)) {
    EXPECT_EQ(o.stats.nonfinite_layer, 0);
    EXPECT_FALSE(std::isfinite(o.stats.loss_sum));
  }
}

}  // namespace
}  // namespace shardprop
