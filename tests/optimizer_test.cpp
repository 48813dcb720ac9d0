#include "shardprop/optimizer.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "shardprop/params.hpp"
#include "test_util.hpp"

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

// Values of every sign and size from a fixed recurrence.
std::vector<float> values(std::size_t n, std::uint32_t seed) {
  std::vector<float> v(n);
  for (float& x : v) {
    seed = seed * 1664525u + 1013904223u;
    x = float(std::int32_t(seed)) * 0x1p-31f * (seed % 7 == 0 ? 100.0f : 1.0f);
  }
  return v;
}

// Three steps of an optimizer, plain or writing with streaming stores, over runs that start
// and end inside 64-byte lines and cross the update's 1024-value chunks: the parameters and
// the state. Through step(), or through update_share() from (params, state) into another
// copy, alternating copies as the node reducer does.
struct Steps {
  AlignedVector<float> params, state;
};

Steps three_steps(const OptimizerConfig& c, bool shared_readers, bool shares) {
  constexpr std::size_t n = 2 * 1024 + 45;
  const std::size_t cuts[] = {0, 35, 1029, 1030, n};
  Optimizer opt(c, n);
  opt.set_shared_readers(shared_readers);
  const std::vector<float> start = values(n, 1);
  AlignedVector<float> w(start.begin(), start.end()), w_out(n);
  // The state copies update_share() writes in turn; the optimizer adopts each.
  AlignedVector<float> copies[2] = {AlignedVector<float>(Optimizer::state_size(c.kind, n)),
                                    AlignedVector<float>(Optimizer::state_size(c.kind, n))};
  for (std::uint32_t s = 0; s < 3; ++s) {
    const std::vector<float> g = values(n, 10 + s);
    if (!shares) {
      opt.step(w, g, [&](Optimizer::Update update) {
        for (std::size_t k = 0; k + 1 < std::size(cuts); ++k) update(cuts[k], cuts[k + 1]);
      });
      continue;
    }
    const float* sums[] = {g.data()};
    AlignedVector<float>& state_out = copies[s % 2];
    for (std::size_t k = 0; k + 1 < std::size(cuts); ++k) {
      EXPECT_TRUE(opt.update_share(sums, 1.0f, w, w_out, state_out, cuts[k], cuts[k + 1]));
    }
    std::swap(w, w_out);
    opt.adopt(state_out);
  }
  return {w, AlignedVector<float>(opt.state().begin(), opt.state().end())};
}

TEST(Optimizer, StreamingStoresWriteTheSameBits) {
  OptimizerConfig sgd;
  sgd.lr = 0.1;
  sgd.momentum = 0.9;
  sgd.weight_decay = 0.01;
  OptimizerConfig adam = sgd;
  adam.kind = OptimizerKind::adam;
  for (const OptimizerConfig& c : {sgd, adam}) {
    const std::string name(to_string(c.kind));
    const Steps plain = three_steps(c, false, false);
    const Steps streamed = three_steps(c, true, false);
    EXPECT_TRUE(testing::same_bits(plain.params, streamed.params)) << name;
    EXPECT_TRUE(testing::same_bits(plain.state, streamed.state)) << name;
    // The fused update of the node reducer, into the other copy, plain or streamed: the
    // same arithmetic as the update in place.
    for (bool shared : {false, true}) {
      const Steps share = three_steps(c, shared, true);
      EXPECT_TRUE(testing::same_bits(plain.params, share.params)) << name << " shared " << shared;
      EXPECT_TRUE(testing::same_bits(plain.state, share.state)) << name << " shared " << shared;
    }
    // The steps moved every parameter: the comparison has something to compare.
    const std::vector<float> start = values(plain.params.size(), 1);
    for (std::size_t i = 0; i < start.size(); ++i) ASSERT_NE(plain.params[i], start[i]) << i;
  }
}

}  // namespace
}  // namespace shardprop
