// The worked examples of the seeds: seed 001's forward pass and seed 000's batched identities.
#include "layers.hpp"

#include <atomic>
#include <gtest/gtest.h>
#include <oneapi/tbb/global_control.h>

#include "shardprop/loss.hpp"
#include "shardprop/mlp.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

using testing::random_matrix;
using testing::view;

// Seed 001: 3 → 3 (relu) → 3 (sigmoid) → 3 (softmax), all biases 1, input [0.1 0.2 0.7].
struct Seed001 {
  ModelSpec spec = parse_model("3,3:relu,3:sigmoid,3:softmax", "xent");
  Layout layout{spec};
  AlignedVector<double> params;
  RowMatrix<double> x{1, 3};
  RowMatrix<double> y{1, 3};

  Seed001() : params(layout.size(), 0.0) {
    std::span<double> p(params);
    layout.weights(p, 0) << 0.1, 0.2, 0.3, 0.3, 0.2, 0.7, 0.4, 0.3, 0.9;
    layout.weights(p, 1) << 0.2, 0.3, 0.5, 0.3, 0.5, 0.7, 0.6, 0.4, 0.8;
    layout.weights(p, 2) << 0.1, 0.4, 0.8, 0.3, 0.7, 0.2, 0.5, 0.2, 0.9;
    for (std::size_t l = 0; l < 3; ++l) layout.bias(p, l).setOnes();
    x << 0.1, 0.2, 0.7;
    y << 1.0, 0.0, 0.0;
  }
};

TEST(Seed001, ReluLayerMatchesTheWorkedExample) {
  Seed001 s;
  RowMatrix<double> h1(1, 3);
  MatrixView<double> out(h1.data(), 1, 3);
  ChunkScratch<double> scratch;
  dense_forward<double>(view(s.x), s.layout.weights(std::span<const double>(s.params), 0),
                        s.layout.bias(std::span<const double>(s.params), 0), Activation::relu,
                        out, 0, scratch);
  // The seed's stated values [1.35 1.27 1.8] are exact decimal results of its stated W_ij.
  EXPECT_NEAR(h1(0, 0), 1.35, 1e-12);
  EXPECT_NEAR(h1(0, 1), 1.27, 1e-12);
  EXPECT_NEAR(h1(0, 2), 1.8, 1e-12);
}

TEST(Seed001, SigmoidLayerMatchesTheWorkedExampleToItsRounding) {
  Seed001 s;
  Mlp<double> mlp(s.spec);
  RowMatrix<double> h1(1, 3), h2(1, 3);
  h1 << 1.35, 1.27, 1.8;
  MatrixView<double> out(h2.data(), 1, 3);
  ChunkScratch<double> scratch;
  dense_forward<double>(view(h1), s.layout.weights(std::span<const double>(s.params), 1),
                        s.layout.bias(std::span<const double>(s.params), 1), Activation::sigmoid,
                        out, 0, scratch);
  // The seed prints [0.938 0.94 0.98], rounded to two or three digits.
  EXPECT_NEAR(h2(0, 0), 0.938, 1e-3);
  EXPECT_NEAR(h2(0, 1), 0.94, 1e-3);
  EXPECT_NEAR(h2(0, 2), 0.98, 2.5e-3);
}

TEST(Seed001, SoftmaxGivesTheCorrectedValues) {
  // The seed's own correction: softmax([1.8658 2.2292 2.8204]) = [0.19858 0.28559 0.51583]
  // (its first version divided by the plain sum instead of the sum of exponentials).
  RowMatrix<double> z(1, 3), y(1, 3);
  z << 1.8658, 2.2292, 2.8204;
  y << 1.0, 0.0, 0.0;
  MatrixView<double> zv(z.data(), 1, 3);
  const LossSums sums = output_loss<double>(Loss::xent, zv, view(y), nullptr);
  EXPECT_NEAR(z(0, 0), 0.19858, 5e-6);
  EXPECT_NEAR(z(0, 1), 0.28559, 5e-6);
  EXPECT_NEAR(z(0, 2), 0.51583, 5e-6);
  EXPECT_NEAR(sums.loss, -std::log(0.19858), 3e-5);
  EXPECT_EQ(sums.correct, 0.0);  // the target class 0 has the smallest probability
}

TEST(Seed001, WholeNetworkAgreesWithTheCorrectedOutput) {
  Seed001 s;
  Mlp<double> mlp(s.spec);
  const auto yhat = mlp.predict(s.params, view(s.x));
  // The seed rounds its hidden values before the last layer, which moves the output by
  // about 1e-3; unrounded propagation must stay within that.
  EXPECT_NEAR(yhat(0, 0), 0.19858, 2e-3);
  EXPECT_NEAR(yhat(0, 1), 0.28559, 2e-3);
  EXPECT_NEAR(yhat(0, 2), 0.51583, 2e-3);
  EXPECT_NEAR(yhat.sum(), 1.0, 1e-15);
}

// A shard without rows contributes nothing: its gradient is written as zeros.
TEST(Seed000, NoRowsGiveZeroGradients) {
  const std::size_t in = 37, out = 21;
  const RowMatrix<double> x(0, in), delta(0, out);
  RowMatrix<double> dw = RowMatrix<double>::Constant(in, out, 0.5);
  Eigen::Matrix<double, 1, Eigen::Dynamic> db =
      Eigen::Matrix<double, 1, Eigen::Dynamic>::Constant(out, -0.25);
  dense_backward_params<double>(view(x), view(delta), MatrixView<double>(dw.data(), in, out),
                                RowVectorView<double>(db.data(), out));
  EXPECT_EQ(dw.cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(db.cwiseAbs().maxCoeff(), 0.0);
}

// Seed 000: for a batch, dW = inputᵀ·δ is the sum of the samples' outer products, the bias
// gradient is the column sum of δ (the summed bias rows), and δ of the layer below is
// (δ·Wᵀ) ⊙ f'(a).
TEST(Seed000, BatchedGradientsAreSumsOfPerSampleGradients) {
  const std::size_t rows = 9, in = 37, out = 21;
  const RowMatrix<double> x = random_matrix<double>(rows, in, 1);
  const RowMatrix<double> delta = random_matrix<double>(rows, out, 2);
  const RowMatrix<double> w = random_matrix<double>(in, out, 3);
  RowMatrix<double> a_prev = random_matrix<double>(rows, in, 4).array().abs();

  // Whatever the buffers held before is overwritten, not added to.
  RowMatrix<double> dw = RowMatrix<double>::Constant(in, out, 0.5);
  Eigen::Matrix<double, 1, Eigen::Dynamic> db =
      Eigen::Matrix<double, 1, Eigen::Dynamic>::Constant(out, -0.25);
  dense_backward_params<double>(view(x), view(delta), MatrixView<double>(dw.data(), in, out),
                                RowVectorView<double>(db.data(), out));
  RowMatrix<double> dw_ref = RowMatrix<double>::Zero(in, out);
  Eigen::Matrix<double, 1, Eigen::Dynamic> db_ref = Eigen::Matrix<double, 1, Eigen::Dynamic>::Zero(out);
  for (std::size_t r = 0; r < rows; ++r) {
    dw_ref += x.row(r).transpose() * delta.row(r);
    db_ref += delta.row(r);
  }
  EXPECT_LT((dw - dw_ref).cwiseAbs().maxCoeff(), 1e-13);
  EXPECT_LT((db - db_ref).cwiseAbs().maxCoeff(), 1e-13);

  for (Activation act : {Activation::identity, Activation::sigmoid, Activation::tanh,
                         Activation::relu}) {
    RowMatrix<double> a = a_prev;
    if (act == Activation::relu) a(0, 0) = 0.0;  // a dead unit passes no gradient
    RowMatrix<double> dx(rows, in);
    ChunkScratch<double> scratch;
    dense_backward_input<double>(view(delta), view(w), view(a), act,
                                 MatrixView<double>(dx.data(), rows, in), 0, scratch);
    RowMatrix<double> deriv = RowMatrix<double>::Ones(rows, in);
    if (act == Activation::sigmoid) deriv = a.array() * (1 - a.array());
    if (act == Activation::tanh) deriv = 1 - a.array().square();
    if (act == Activation::relu) deriv = (a.array() > 0).cast<double>();
    const RowMatrix<double> dx_ref = (delta * w.transpose()).cwiseProduct(deriv);
    EXPECT_LT((dx - dx_ref).cwiseAbs().maxCoeff(), 1e-13) << to_string(act);
  }
}

TEST(Seed000, OutputDeltaIsPredictionMinusTarget) {
  for (Loss loss : {Loss::xent, Loss::bce}) {
    RowMatrix<double> z = random_matrix<double>(6, 4, 5) * 3.0;
    const RowMatrix<double> y = testing::random_targets<double>(loss, 6, 4, 6);
    RowMatrix<double> delta(6, 4);
    MatrixView<double> zv(z.data(), 6, 4), dv(delta.data(), 6, 4);
    output_loss<double>(loss, zv, view(y), &dv);  // z now holds ŷ
    EXPECT_LT((delta - (z - y)).cwiseAbs().maxCoeff(), 1e-15);
    if (loss == Loss::xent) {
      EXPECT_LT((z.rowwise().sum().array() - 1).abs().maxCoeff(), 1e-14);
    }
  }
}

// Threading splits rows (forward, dX), the rows of dW and the columns of db; the result must not
// depend on the number of threads beyond GEMM rounding.
TEST(Threads, KernelsAgreeAcrossThreadCounts) {
  const ModelSpec spec = parse_model("50,300:relu,200:sigmoid,10:softmax", "xent");
  Mlp<float> mlp(spec);
  AlignedVector<float> params(mlp.layout().size());
  init_params<float>(spec, mlp.layout(), 3, std::span<float>(params));
  const RowMatrix<float> x = random_matrix<float>(256, 50, 7);
  const RowMatrix<float> y = testing::random_targets<float>(Loss::xent, 256, 10, 8);
  AlignedVector<float> g1, g2;
  {
    oneapi::tbb::global_control one(oneapi::tbb::global_control::max_allowed_parallelism, 1);
    g1 = testing::full_batch_gradient<float>(mlp, params, view(x), view(y)).mean;
  }
  {
    oneapi::tbb::global_control two(oneapi::tbb::global_control::max_allowed_parallelism, 2);
    g2 = testing::full_batch_gradient<float>(mlp, params, view(x), view(y)).mean;
  }
  EXPECT_LT(testing::max_relative_error<float>(mlp.layout(), std::span<const float>(g2),
                                               std::span<const float>(g1)), 1e-5);
}

// The single-rank optimizer and mean pass follow dense_backward_params' split of the
// gradient: for any thread count, their runs must cover every weight and bias exactly once
// and never the padding between blocks (which stays zero).
TEST(Threads, GradientBlocksCoverEveryParameterOnce) {
  const std::pair<const char*, const char*> models[] = {
      {"50,300:relu,200:sigmoid,10:softmax", "xent"},
      {"7,3:tanh,1:sigmoid", "bce"},
      {"784,1024:relu,1024:relu,10:softmax", "xent"},
      {"33,17:relu,5:identity", "mse"}};
  for (const auto& [layers, loss] : models) {
    const Layout layout(parse_model(layers, loss));
    std::vector<char> expected(layout.size(), 0);
    for (std::size_t l = 0; l < layout.layer_count(); ++l) {
      const Layout::Block& b = layout.block(l);
      std::fill_n(expected.begin() + std::ptrdiff_t(b.w_offset), b.in * b.out, 1);
      std::fill_n(expected.begin() + std::ptrdiff_t(b.b_offset), b.out, 1);
    }
    for (std::size_t threads : {1, 2, 3, 5}) {
      const oneapi::tbb::global_control limit(
          oneapi::tbb::global_control::max_allowed_parallelism, threads);
      std::vector<std::atomic<int>> seen(layout.size());
      std::atomic<bool> wrong_layer{false};
      for_gradient_blocks(layout, [&](std::size_t l, std::size_t begin, std::size_t end) {
        const auto [first, last] = layout.layer_range(l);
        if (begin < first || end > last || begin > end) wrong_layer = true;
        for (std::size_t i = begin; i < std::min(end, layout.size()); ++i) ++seen[i];
      });
      EXPECT_FALSE(wrong_layer) << layers << ", " << threads << " threads";
      std::size_t mismatches = 0;
      for (std::size_t i = 0; i < layout.size(); ++i) mismatches += seen[i] != expected[i];
      EXPECT_EQ(mismatches, 0u) << layers << ", " << threads << " threads";
    }
  }
}

}  // namespace
}  // namespace shardprop
