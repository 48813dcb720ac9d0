// Central finite differences in double precision against the analytic backward pass, for
// every hidden activation × output loss, three dense layers, a batch of 7.
//
// Tolerance: with step h = 1e-6 the truncation error is O(h²·L''') ≈ 1e-12 and the rounding
// error about ε·|L|/h ≈ 1e-10, so |analytic − numeric| ≤ 1e-7 + 1e-6·|numeric| holds with a
// wide margin for a correct gradient, while any wrong term in the backward pass is off by
// far more.
#include <gtest/gtest.h>

#include "shardprop/mlp.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

struct Case {
  Activation hidden;
  Loss loss;
};

class GradCheck : public ::testing::TestWithParam<Case> {};

TEST_P(GradCheck, AnalyticGradientMatchesFiniteDifferences) {
  const auto [hidden, loss] = GetParam();
  const std::string act(to_string(hidden));
  const std::string out = loss == Loss::xent ? "softmax" : loss == Loss::bce ? "sigmoid" : "identity";
  const ModelSpec spec = parse_model("6,5:" + act + ",4:" + act + ",3:" + out, to_string(loss));
  Mlp<double> mlp(spec);
  const Layout& layout = mlp.layout();
  AlignedVector<double> params(layout.size());
  init_params<double>(spec, layout, 11, std::span<double>(params));
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {  // non-zero biases exercise db
    auto b = layout.bias(std::span<double>(params), l);
    for (Eigen::Index j = 0; j < b.size(); ++j) b(j) = 0.1 * double(j + 1) - 0.2;
  }
  const std::size_t batch = 7;
  const RowMatrix<double> x = testing::random_matrix<double>(batch, 6, 12) * 2.0;
  const RowMatrix<double> y = testing::random_targets<double>(loss, batch, 3, 13);

  const AlignedVector<double> grad =
      testing::full_batch_gradient<double>(mlp, params, testing::view(x), testing::view(y)).mean;
  const auto mean_loss = [&] {
    return mlp.losses(params, testing::view(x), testing::view(y))[0].loss / double(batch);
  };
  const double h = 1e-6;
  std::size_t checked = 0;
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const auto [begin, end] = layout.layer_range(l);
    const auto& block = layout.block(l);
    for (std::size_t i = begin; i < end; ++i) {
      const bool in_w = i < block.w_offset + block.in * block.out;
      if (!in_w && i < block.b_offset) continue;  // padding between W and b
      const double numeric = testing::central_difference(params, i, h, mean_loss);
      const double analytic = grad[i];
      EXPECT_NEAR(analytic, numeric, 1e-7 + 1e-6 * std::abs(numeric))
          << "layer " << l << (in_w ? " W" : " b") << " element " << i;
      ++checked;
    }
  }
  EXPECT_EQ(checked, spec.parameter_count());
}

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (Activation a : {Activation::identity, Activation::sigmoid, Activation::tanh,
                       Activation::relu}) {
    for (Loss l : {Loss::xent, Loss::bce, Loss::mse}) cases.push_back({a, l});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllActivationsAndLosses, GradCheck, ::testing::ValuesIn(all_cases()),
                         [](const auto& param_info) {
                           return std::string(to_string(param_info.param.hidden)) + "_" +
                                  std::string(to_string(param_info.param.loss));
                         });

}  // namespace
}  // namespace shardprop
