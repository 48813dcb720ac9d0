#include "shardprop/optimizer.hpp"

#include <gtest/gtest.h>

#include <cmath>

namespace shardprop {
namespace {

TEST(Optimizer, SgdMomentumAndWeightDecayByHand) {
  OptimizerConfig c;
  c.lr = 0.1;
  c.momentum = 0.5;
  c.weight_decay = 0.01;
  Optimizer opt(c, 2);
  std::vector<float> w{1.0f, -2.0f};
  const std::vector<float> g{0.2f, 0.4f};
  opt.step(w, g);
  // v1 = g + wd·w = (0.21, 0.38); w1 = w − 0.1·v1
  EXPECT_FLOAT_EQ(w[0], 1.0f - 0.1f * 0.21f);
  EXPECT_FLOAT_EQ(w[1], -2.0f - 0.1f * 0.38f);
  const float w0 = w[0];
  opt.step(w, g);
  // v2 = 0.5·v1 + g + wd·w1
  EXPECT_FLOAT_EQ(w[0], w0 - 0.1f * (0.5f * 0.21f + 0.2f + 0.01f * w0));
  EXPECT_EQ(opt.steps(), 2u);
  EXPECT_EQ(opt.state().size(), 2u);
}

TEST(Optimizer, AdamFirstStepMovesByLrTimesSign) {
  OptimizerConfig c;
  c.kind = OptimizerKind::adam;
  c.lr = 0.01;
  Optimizer opt(c, 3);
  std::vector<float> w{0.0f, 1.0f, -1.0f};
  opt.step(w, std::vector<float>{0.5f, -3.0f, 1e-3f});
  // After one step the bias-corrected m/sqrt(v) is g/|g|, up to eps.
  EXPECT_NEAR(w[0], -0.01f, 1e-6);
  EXPECT_NEAR(w[1], 1.01f, 1e-6);
  EXPECT_NEAR(w[2], -1.01f, 1e-6);
  EXPECT_EQ(opt.state().size(), 6u);
  // m = (1−β1)·g and v = (1−β2)·g² are the saved moments.
  EXPECT_NEAR(opt.state()[1], 0.1f * -3.0f, 1e-6);
  EXPECT_NEAR(opt.state()[3 + 1], 0.001f * 9.0f, 1e-6);
}

}  // namespace
}  // namespace shardprop
