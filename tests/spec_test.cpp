#include "shardprop/spec.hpp"

#include <gtest/gtest.h>

#include "shardprop/error.hpp"
#include "shardprop/params.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

TEST(Spec, ParsesWidthsActivationsAndDefaults) {
  const ModelSpec spec = parse_model("784,256:relu,128:tanh,64,10:softmax", "xent");
  ASSERT_EQ(spec.layers.size(), 4u);
  EXPECT_EQ(spec.input_width(), 784u);
  EXPECT_EQ(spec.layers[0].in, 784u);
  EXPECT_EQ(spec.layers[0].out, 256u);
  EXPECT_EQ(spec.layers[1].activation, Activation::tanh);
  EXPECT_EQ(spec.layers[2].activation, Activation::relu);  // hidden default
  EXPECT_EQ(spec.layers[3].in, 64u);
  EXPECT_EQ(spec.output_width(), 10u);
  EXPECT_EQ(spec.parameter_count(), 785u * 256 + 257 * 128 + 129 * 64 + 65 * 10);
  EXPECT_EQ(spec.layers_string(), "784,256:relu,128:tanh,64:relu,10:softmax");
  EXPECT_EQ(parse_model(spec.layers_string(), "xent").layers_string(), spec.layers_string());
  EXPECT_EQ(parse_model("4,3", "xent").output_activation(), Activation::softmax);
  EXPECT_EQ(parse_model("4,1:sigmoid", "bce").output_width(), 1u);
  EXPECT_EQ(parse_model("4,8:sigmoid,2:identity", "mse").layers[0].activation, Activation::sigmoid);
}

void expect_error(const char* layers, const char* loss, const char* fragment) {
  testing::expect_error([&] { parse_model(layers, loss); }, fragment);
}

TEST(Spec, RejectsMalformedLayersNamingTheValue) {
  expect_error("", "xent", "--layers: empty");
  expect_error("784", "xent", "one entry");
  expect_error("784,0:relu,10", "xent", "width 0");
  expect_error("784,256:swish,10", "xent", "unknown activation 'swish'");
  expect_error("784,,10", "xent", "empty entry");
  expect_error("784,abc,10", "xent", "'abc' does not start with a width");
  expect_error("784:relu,10", "xent", "input entry");
  expect_error("784,32:softmax,10", "xent", "softmax is only allowed on the output");
  expect_error("784,10:softmax", "hinge", "unknown loss 'hinge'");
  expect_error("784,10:softmax", "mse", "--loss mse does not fit the output activation softmax");
  expect_error("784,1:identity", "bce", "needs :sigmoid");
  expect_error("784,1:softmax", "xent", "at least 2 classes");
}

TEST(Layout, BlocksAreAlignedDisjointAndTileTheBuffer) {
  const ModelSpec spec = parse_model("7,5:relu,3:sigmoid,2:softmax", "xent");
  const Layout layout(spec);
  std::size_t expected_offset = 0, covered = 0;
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const auto& b = layout.block(l);
    EXPECT_EQ(b.w_offset % Layout::kAlign, 0u);
    EXPECT_EQ(b.b_offset % Layout::kAlign, 0u);
    EXPECT_EQ(b.w_offset, expected_offset);
    EXPECT_GE(b.b_offset, b.w_offset + b.in * b.out);
    expected_offset = (b.b_offset + b.out + Layout::kAlign - 1) / Layout::kAlign * Layout::kAlign;
    covered += b.in * b.out + b.out;
  }
  EXPECT_EQ(layout.size(), expected_offset);
  EXPECT_EQ(covered, spec.parameter_count());
}

TEST(ParseModel, RejectsModelsTooLargeForOneReduction) {
  // (7505 + 1) · 750566 ≈ 5.6e9 parameters in one layer (found by fuzz_layers).
  testing::expect_error([] { parse_model("6,7505,750566", "xent"); },
                        "--layers: layer 2 (7505->750566) has 5633748396 parameters");
  // Layers of 1.07e9 each are fine alone, not together.
  testing::expect_error([] { parse_model("32767,32767,32767,2", "xent"); },
                        "has more than 2147483647 parameters");
  EXPECT_EQ(parse_model("32767,32767,2", "xent").parameter_count(), 32768u * 32767 + 32768 * 2);
}

TEST(Init, DeterministicFromSeedWithZeroBiasesAndPadding) {
  const ModelSpec spec = parse_model("20,30:relu,10:tanh,4:softmax", "xent");
  const Layout layout(spec);
  AlignedVector<float> a(layout.size(), 1.0f), b(layout.size()), c(layout.size());
  init_params<float>(spec, layout, 7, std::span<float>(a));
  init_params<float>(spec, layout, 7, std::span<float>(b));
  init_params<float>(spec, layout, 8, std::span<float>(c));
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::size_t nonzero = 0;
  for (float v : a) nonzero += v != 0.0f;
  EXPECT_EQ(nonzero, 20u * 30 + 30 * 10 + 10 * 4);  // weights only; biases and padding zero
  // He init before relu: the std of 600 draws is near sqrt(2/20).
  const auto w0 = layout.weights(std::span<const float>(a), 0);
  const double std_dev = std::sqrt(double(w0.squaredNorm()) / double(w0.size()));
  EXPECT_NEAR(std_dev, std::sqrt(2.0 / 20), 0.03);
  // Xavier-uniform elsewhere: every value within ±sqrt(6/(in+out)).
  const auto w1 = layout.weights(std::span<const float>(a), 1);
  EXPECT_LE(w1.cwiseAbs().maxCoeff(), std::sqrt(6.0 / 40));
}

}  // namespace
}  // namespace shardprop
