// The reduced gradient equals the full-batch gradient, in one process: a global minibatch is
// split into P = 1…7 shards (even and uneven, some empty), each shard's gradient sums are
// computed by the trainer's own reduce_minibatch_gradient and reduced through the in-process
// communicator, and every rank's result is compared with the full-batch mean gradient.
//
// Tolerances (largest error relative to the largest entry of each W and b): the shards add
// the same per-sample terms in another order, so the error is a few units of rounding of the
// sums: 2e-6 for float (ε = 6e-8, ≤ 23 terms per entry), 1e-13 for double (ε = 1.1e-16).
#include <gtest/gtest.h>

#include <thread>

#include "shardprop/comm.hpp"
#include "shardprop/train.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

template <class T>
struct Tolerance;
template <>
struct Tolerance<float> {
  static constexpr double value = 2e-6;
};
template <>
struct Tolerance<double> {
  static constexpr double value = 1e-13;
};

template <class T>
class ReduceTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ReduceTest, Scalars);

TYPED_TEST(ReduceTest, ShardedReductionEqualsFullBatchForOneToSevenRanks) {
  using T = TypeParam;
  const ModelSpec spec = parse_model("10,16:relu,8:tanh,5:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<T> params(layout.size());
  init_params<T>(spec, layout, 5, std::span<T>(params));
  const std::size_t batch = 23;
  const RowMatrix<T> x = testing::random_matrix<T>(batch, 10, 21);
  const RowMatrix<T> y = testing::random_targets<T>(Loss::xent, batch, 5, 22);

  // Full batch: all rows through one forward/backward, divided by the batch size.
  Mlp<T> full_mlp(spec);
  AlignedVector<T> full(layout.size(), T(0));
  const LossSums full_sums =
      full_mlp.forward_backward(params, testing::view(x), testing::view(y), std::span<T>(full));
  for (auto& g : full) g /= T(batch);

  for (int p = 1; p <= 7; ++p) {
    LocalGroup group(p);
    std::vector<AlignedVector<T>> grads(std::size_t(p), AlignedVector<T>(layout.size() + kGradStats));
    std::vector<MinibatchStats> stats{std::size_t(p)};
    std::vector<std::thread> ranks;
    for (int r = 0; r < p; ++r) {
      ranks.emplace_back([&, r] {
        Mlp<T> mlp(spec);
        const Range shard = shard_range(batch, r, p);
        stats[std::size_t(r)] = reduce_minibatch_gradient<T>(
            mlp, group.member(r), std::span<const T>(params),
            testing::rows_of(x, shard.begin, shard.end), testing::rows_of(y, shard.begin, shard.end),
            std::span<T>(grads[std::size_t(r)]));
      });
    }
    for (auto& t : ranks) t.join();
    for (int r = 0; r < p; ++r) {
      const auto g = std::span<const T>(grads[std::size_t(r)]).first(layout.size());
      EXPECT_LT(testing::max_relative_error<T>(layout, g, full), Tolerance<T>::value)
          << "P = " << p << ", rank " << r;
      EXPECT_TRUE(std::equal(g.begin(), g.end(), grads[0].begin())) << "ranks differ, P = " << p;
      EXPECT_EQ(stats[std::size_t(r)].samples, double(batch));
      EXPECT_EQ(stats[std::size_t(r)].correct, full_sums.correct);
      EXPECT_NEAR(stats[std::size_t(r)].loss_sum, full_sums.loss, 1e-5 * full_sums.loss);
    }
  }
}

TEST(ReduceTest, ShortFinalBatchWithEmptyShardsStillDividesByGlobalCount) {
  // 3 samples over 5 ranks: two ranks hold nothing, yet the mean is over exactly 3.
  const ModelSpec spec = parse_model("4,3:sigmoid,2:sigmoid", "bce");
  const Layout layout(spec);
  AlignedVector<double> params(layout.size());
  init_params<double>(spec, layout, 9, std::span<double>(params));
  const RowMatrix<double> x = testing::random_matrix<double>(3, 4, 1);
  const RowMatrix<double> y = testing::random_targets<double>(Loss::bce, 3, 2, 2);
  Mlp<double> full_mlp(spec);
  AlignedVector<double> full(layout.size(), 0.0);
  full_mlp.forward_backward(params, testing::view(x), testing::view(y), std::span<double>(full));
  for (auto& g : full) g /= 3.0;

  LocalGroup group(5);
  std::vector<AlignedVector<double>> grads(5, AlignedVector<double>(layout.size() + kGradStats));
  std::vector<std::thread> ranks;
  for (int r = 0; r < 5; ++r) {
    ranks.emplace_back([&, r] {
      Mlp<double> mlp(spec);
      const Range shard = shard_range(3, r, 5);
      reduce_minibatch_gradient<double>(mlp, group.member(r), std::span<const double>(params),
                                        testing::rows_of(x, shard.begin, shard.end),
                                        testing::rows_of(y, shard.begin, shard.end),
                                        std::span<double>(grads[std::size_t(r)]));
    });
  }
  for (auto& t : ranks) t.join();
  EXPECT_EQ(grads[4][layout.size() + kSamples], 3.0);
  EXPECT_LT(testing::max_relative_error<double>(
                layout, std::span<const double>(grads[4]).first(layout.size()), full),
            1e-13);
}

TEST(LocalGroup, CollectivesBehaveLikeMpi) {
  LocalGroup group(3);
  std::vector<std::int64_t> maxima(3);
  std::vector<std::array<int, 2>> received(3);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 3; ++r) {
    ranks.emplace_back([&, r] {
      Communicator& c = group.member(r);
      maxima[std::size_t(r)] = c.allreduce_max(10 * r - 5);
      std::array<int, 2> values{r, r * r};
      c.broadcast_values(std::span<int>(values), 2);
      received[std::size_t(r)] = values;
    });
  }
  for (auto& t : ranks) t.join();
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(maxima[std::size_t(r)], 15);
    EXPECT_EQ(received[std::size_t(r)], (std::array<int, 2>{2, 4}));
  }
}

TEST(CollectiveCheck, OnlyTheLowestFailingRankReportsTheCause) {
  LocalGroup group(4);
  std::vector<std::string> outcome(4);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 4; ++r) {
    ranks.emplace_back([&, r] {
      try {
        collective_check(group.member(r), [&] {
          if (r == 1 || r == 3) SP_THROW("bad input on ", r);
        });
        outcome[std::size_t(r)] = "ok";
      } catch (const CollectiveFailure& e) {
        outcome[std::size_t(r)] = e.reports() ? std::string(e.what()) : "peer";
      }
    });
  }
  for (auto& t : ranks) t.join();
  ASSERT_EQ(outcome.size(), 4u);
  EXPECT_EQ(outcome[0], "peer");
  EXPECT_NE(outcome[1].find("bad input on 1"), std::string::npos) << outcome[1];
  EXPECT_EQ(outcome[2], "peer");
  EXPECT_EQ(outcome[3], "peer");
}

// A gradient that overflows while the loss stays finite is reported with its layer: inputs
// of 1e19 through weights of 1e19 give hidden activations of 2e38; the output logits are 0,
// so δ = ±0.5, and layer 1's dW sums four products of 1e38, which exceeds float's 3.4e38
// in any order of summation. Layer 0's dW stays near 1e-11 and the loss is log 2.
TEST(ReduceNonFinite, NamesTheFirstLayerWithNaNOrInf) {
  const ModelSpec spec = parse_model("2,2:identity,2:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<float> params(layout.size(), 0.0f);
  layout.weights(std::span<float>(params), 0).setConstant(1e19f);
  layout.weights(std::span<float>(params), 1) << 1e-30f, -1e-30f, -1e-30f, 1e-30f;
  RowMatrix<float> x(4, 2), y(4, 2);
  x.setConstant(1e19f);
  y << 0, 1, 0, 1, 0, 1, 0, 1;
  Mlp<float> mlp(spec);
  LocalGroup one(1);
  AlignedVector<float> grad(layout.size() + kGradStats);
  const MinibatchStats stats = reduce_minibatch_gradient<float>(
      mlp, one.member(0), std::span<const float>(params), testing::view(x), testing::view(y),
      std::span<float>(grad));
  EXPECT_TRUE(std::isfinite(stats.loss_sum)) << stats.loss_sum;
  EXPECT_EQ(stats.nonfinite_layer, 1);

  layout.weights(std::span<float>(params), 0).setConstant(1e-3f);  // everything finite again
  const MinibatchStats fine = reduce_minibatch_gradient<float>(
      mlp, one.member(0), std::span<const float>(params), testing::view(x), testing::view(y),
      std::span<float>(grad));
  EXPECT_EQ(fine.nonfinite_layer, -1);
}

}  // namespace
}  // namespace shardprop
