// The reduced gradient equals the full-batch gradient, in one process: a global minibatch is
// split into P = 1…7 shards (even and uneven, some empty), each shard goes through
// Mlp::forward_backward and the MPI reducer (per layer, or once) or the node reducer (shared
// memory) over in-process ranks, and every rank's result is compared with the full-batch
// mean gradient.
//
// Tolerances (largest error relative to the largest entry of each W and b): the shards add
// the same per-sample terms in another order, so the error is a few units of rounding of the
// sums: 2e-6 for float (ε = 6e-8, ≤ 23 terms per entry), 1e-13 for double (ε = 1.1e-16).
#include <gtest/gtest.h>

#include <cmath>

#include "shardprop/mlp.hpp"
#include "shardprop/reducer.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

using testing::run_ranks;

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
class ReducerTest : public ::testing::Test {};
using Scalars = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ReducerTest, Scalars);

TYPED_TEST(ReducerTest, ShardedReductionEqualsFullBatchForOneToSevenRanks) {
  using T = TypeParam;
  const ModelSpec spec = parse_model("10,16:relu,8:tanh,5:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<T> params(layout.size());
  init_params<T>(spec, layout, 5, std::span<T>(params));
  const std::size_t batch = 23;
  const RowMatrix<T> x = testing::random_matrix<T>(batch, 10, 21);
  const RowMatrix<T> y = testing::random_targets<T>(Loss::xent, batch, 5, 22);

  Mlp<T> full_mlp(spec);
  const testing::Gradient<T> full =
      testing::full_batch_gradient<T>(full_mlp, params, testing::view(x), testing::view(y));
  EXPECT_EQ(full.stats.samples, double(batch));

  for (int p = 1; p <= 7; ++p) {
    for (testing::Via via : {testing::Via::overlap, testing::Via::once, testing::Via::node}) {
      std::vector<testing::Gradient<T>> out(static_cast<std::size_t>(p));
      run_ranks(p, [&](Communicator& comm) {
        Mlp<T> mlp(spec);
        const Range shard = shard_range(batch, comm.rank(), p);
        out[std::size_t(comm.rank())] = testing::reduced_gradient<T>(
            mlp, comm, std::span<const T>(params), testing::rows_of(x, shard.begin, shard.end),
            testing::rows_of(y, shard.begin, shard.end), batch, via);
      });
      for (int r = 0; r < p; ++r) {
        const testing::Gradient<T>& g = out[std::size_t(r)];
        EXPECT_LT(testing::max_relative_error<T>(layout, std::span<const T>(g.mean),
                                                 std::span<const T>(full.mean)),
                  Tolerance<T>::value)
            << "P = " << p << ", rank " << r << ", via " << int(via);
        EXPECT_TRUE(std::equal(g.mean.begin(), g.mean.end(), out[0].mean.begin()))
            << "ranks differ, P = " << p;
        EXPECT_EQ(g.stats.samples, double(batch));
        EXPECT_EQ(g.stats.correct, full.stats.correct);
        EXPECT_NEAR(g.stats.loss_sum, full.stats.loss_sum, 1e-5 * full.stats.loss_sum);
      }
    }
  }
}

TEST(ReducerTest, ShortFinalBatchWithEmptyShardsStillDividesByGlobalCount) {
  // 3 samples over 5 ranks: two ranks hold nothing, yet the mean is over exactly 3, through
  // either reducer.
  const ModelSpec spec = parse_model("4,3:sigmoid,2:sigmoid", "bce");
  const Layout layout(spec);
  AlignedVector<double> params(layout.size());
  init_params<double>(spec, layout, 9, std::span<double>(params));
  const RowMatrix<double> x = testing::random_matrix<double>(3, 4, 1);
  const RowMatrix<double> y = testing::random_targets<double>(Loss::bce, 3, 2, 2);
  Mlp<double> full_mlp(spec);
  const auto full = testing::full_batch_gradient<double>(full_mlp, params, testing::view(x),
                                                         testing::view(y));
  for (testing::Via via : {testing::Via::overlap, testing::Via::node}) {
    std::vector<testing::Gradient<double>> out(5);
    run_ranks(5, [&](Communicator& comm) {
      Mlp<double> mlp(spec);
      const Range shard = shard_range(3, comm.rank(), 5);
      out[std::size_t(comm.rank())] = testing::reduced_gradient<double>(
          mlp, comm, std::span<const double>(params),
          testing::rows_of(x, shard.begin, shard.end), testing::rows_of(y, shard.begin, shard.end),
          3, via);
    });
    EXPECT_EQ(out[4].stats.samples, 3.0);
    EXPECT_LT(testing::max_relative_error<double>(layout, std::span<const double>(out[4].mean),
                                                  std::span<const double>(full.mean)),
              1e-13)
        << "via " << int(via);
  }
}

// A gradient that overflows while the loss stays finite is reported with its layer: inputs
// of 1e19 through weights of 1e19 give hidden activations of 2e38; the output logits are 0,
// so δ = ±0.5, and layer 1's dW sums four products of 1e38, which exceeds float's 3.4e38
// in any order of summation. Layer 0's dW stays near 1e-11 and the loss is log 2.
TEST(ReducerNonFinite, NamesTheFirstLayerWithNaNOrInf) {
  const ModelSpec spec = parse_model("2,2:identity,2:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<float> params(layout.size(), 0.0f);
  layout.weights(std::span<float>(params), 0).setConstant(1e19f);
  layout.weights(std::span<float>(params), 1) << 1e-30f, -1e-30f, -1e-30f, 1e-30f;
  RowMatrix<float> x(4, 2), y(4, 2);
  x.setConstant(1e19f);
  y << 0, 1, 0, 1, 0, 1, 0, 1;
  Mlp<float> mlp(spec);
  const MinibatchStats stats =
      testing::full_batch_gradient<float>(mlp, params, testing::view(x), testing::view(y)).stats;
  EXPECT_TRUE(std::isfinite(stats.loss_sum)) << stats.loss_sum;
  EXPECT_EQ(stats.nonfinite_layer, 1);

  layout.weights(std::span<float>(params), 0).setConstant(1e-3f);  // everything finite again
  const MinibatchStats fine =
      testing::full_batch_gradient<float>(mlp, params, testing::view(x), testing::view(y)).stats;
  EXPECT_EQ(fine.nonfinite_layer, -1);
}

}  // namespace
}  // namespace shardprop
