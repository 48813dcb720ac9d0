// Shared helpers for the tests: random batches and targets, and tolerance checks.
#pragma once

#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <span>
#include <string>

#include "local_group.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/mlp.hpp"
#include "shardprop/params.hpp"
#include "shardprop/reducer.hpp"
#include "shardprop/rng.hpp"
#include "shardprop/spec.hpp"

namespace shardprop::testing {

// A fixture with a fresh directory of its own for each test (named after the process and
// the test), removed afterwards; path(name) is a file in it.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("shardprop_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->test_suite_name() + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  std::filesystem::path dir_;
};

// Whether a and b hold the same floats bit for bit (NaNs and the sign of zero included).
inline bool same_bits(std::span<const float> a, std::span<const float> b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size_bytes()) == 0;
}

// A (rows × cols) batch of values uniform in [-1, 1).
template <class T>
RowMatrix<T> random_matrix(std::size_t rows, std::size_t cols, std::uint64_t seed) {
  Rng rng(seed);
  RowMatrix<T> m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = T(2 * rng.uniform() - 1);
  return m;
}

// Targets that suit `loss`: one-hot rows (xent), 0/1 entries (bce), reals (mse).
template <class T>
RowMatrix<T> random_targets(Loss loss, std::size_t rows, std::size_t k, std::uint64_t seed) {
  Rng rng(seed);
  RowMatrix<T> y = RowMatrix<T>::Zero(rows, k);
  for (std::size_t r = 0; r < rows; ++r) {
    if (loss == Loss::xent) {
      y(r, rng.below(k)) = 1;
    } else {
      for (std::size_t j = 0; j < k; ++j) {
        y(r, j) = loss == Loss::bce ? T(rng.below(2)) : T(2 * rng.uniform() - 1);
      }
    }
  }
  return y;
}

template <class T>
ConstMatrixView<T> view(const RowMatrix<T>& m) {
  return ConstMatrixView<T>(m.data(), m.rows(), m.cols());
}

template <class T>
ConstMatrixView<T> rows_of(const RowMatrix<T>& m, std::size_t begin, std::size_t end) {
  return ConstMatrixView<T>(m.data() + begin * std::size_t(m.cols()), Eigen::Index(end - begin),
                            m.cols());
}

// Largest |a_i − b_i| relative to the largest |b_i| of each layer's W and b separately.
template <class T>
double max_relative_error(const Layout& layout, std::span<const T> a, std::span<const T> b) {
  double worst = 0;
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const auto wa = layout.weights(a, l), wb = layout.weights(b, l);
    const auto ba = layout.bias(a, l), bb = layout.bias(b, l);
    const double w_scale = std::max(double(wb.cwiseAbs().maxCoeff()), 1e-30);
    const double b_scale = std::max(double(bb.cwiseAbs().maxCoeff()), 1e-30);
    worst = std::max(worst, double((wa - wb).cwiseAbs().maxCoeff()) / w_scale);
    worst = std::max(worst, double((ba - bb).cwiseAbs().maxCoeff()) / b_scale);
  }
  return worst;
}

// (loss(params[i] + h) − loss(params[i] − h)) / 2h, params[i] restored after.
inline double central_difference(std::span<double> params, std::size_t i, double h,
                                 const std::function<double()>& loss) {
  const double saved = params[i];
  params[i] = saved + h;
  const double up = loss();
  params[i] = saved - h;
  const double down = loss();
  params[i] = saved;
  return (up - down) / (2 * h);
}

// Expects fn to throw shardprop::Error whose message contains `fragment`.
inline void expect_error(const std::function<void()>& fn, const std::string& fragment) {
  try {
    fn();
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find(fragment), std::string::npos)
        << "'" << e.message() << "' lacks '" << fragment << "'";
  }
}

// A labelled data set of `rows` samples: class r % classes, whose features are 1 where
// column % classes equals the class and 0 elsewhere, plus Gaussian noise of std 0.3·`noise`.
inline Dataset noisy_classes(std::size_t rows, std::size_t cols, std::size_t classes,
                             double noise) {
  Dataset d;
  d.rows = rows;
  d.cols = cols;
  Rng rng(99);
  for (std::size_t r = 0; r < rows; ++r) {
    const std::size_t label = r % classes;
    d.labels.push_back(std::int32_t(label));
    for (std::size_t c = 0; c < cols; ++c) {
      d.features.push_back(float((c % classes == label ? 1.0 : 0.0) + 0.3 * noise * rng.normal()));
    }
  }
  return d;
}

// Rows of a block of `whole`, as read_dataset reads a rank's block of a file.
inline Dataset block_of(const Dataset& whole, int rank, int size, std::size_t chunk = 0) {
  const Range mine = shard_range(whole.rows, rank, size, chunk);
  Dataset d;
  d.cols = whole.cols;
  d.rows = mine.size();
  d.first = mine.begin;
  d.total = whole.rows;
  d.target_cols = whole.target_cols;
  d.coded = whole.coded;
  d.palette = whole.palette;
  if (whole.coded) {
    d.codes.assign(whole.codes.begin() + std::ptrdiff_t(mine.begin * whole.cols),
                   whole.codes.begin() + std::ptrdiff_t(mine.end * whole.cols));
  } else {
    d.features.assign(whole.features.begin() + std::ptrdiff_t(mine.begin * whole.cols),
                      whole.features.begin() + std::ptrdiff_t(mine.end * whole.cols));
  }
  if (whole.has_labels()) {
    d.labels.assign(whole.labels.begin() + std::ptrdiff_t(mine.begin),
                    whole.labels.begin() + std::ptrdiff_t(mine.end));
  } else {
    d.targets.assign(whole.targets.begin() + std::ptrdiff_t(mine.begin * whole.target_cols),
                     whole.targets.begin() + std::ptrdiff_t(mine.end * whole.target_cols));
  }
  return d;
}

// A mean gradient and the statistics it came with.
template <class T>
struct Gradient {
  AlignedVector<T> mean;
  MinibatchStats stats;
};

// How reduced_gradient reduces: through MPI per layer (overlap) or once after backward, or
// through node memory (the node reducer, or the fixed-point one for a chunked model).
enum class Via { overlap, once, node };

// This rank's rows (x, y) of a global minibatch of `global_rows` rows, through
// Mlp::forward_backward and the reducer of the model's mode over `comm` (make_reducer, or
// make_node_reducer for Via::node): the mean gradient of the global minibatch.
template <class T>
Gradient<T> reduced_gradient(Mlp<T>& mlp, Communicator& comm, std::span<const T> params,
                             ConstMatrixView<T> x, ConstMatrixView<T> y, std::size_t global_rows,
                             Via via = Via::overlap, const DropoutKeys* dropout = nullptr) {
  std::unique_ptr<GradReducer<T>> reducer;
  if (via == Via::node) {
    std::string why;
    reducer = make_node_reducer<T>(mlp.layout(), comm, 0, why, mlp.chunk());
    SP_CHECK(reducer, "no node reducer: ", why);
  } else {
    reducer = make_reducer<T>(mlp.layout(), comm, mlp.chunk(), via == Via::overlap);
  }
  reducer->begin(std::size_t(x.rows()), global_rows);
  mlp.forward_backward(params, x, y, *reducer, dropout);
  Gradient<T> g;
  g.stats = reducer->finish();
  reducer->shared_written();  // the node reducers: every rank's share of the mean is written
  g.mean.assign(reducer->gradient().begin(), reducer->gradient().end());
  return g;
}

// The full-batch mean gradient of (x, y): the whole batch on one in-process rank.
template <class T>
Gradient<T> full_batch_gradient(Mlp<T>& mlp, std::span<const T> params, ConstMatrixView<T> x,
                                ConstMatrixView<T> y, const DropoutKeys* dropout = nullptr) {
  LocalGroup one(1);
  return reduced_gradient<T>(mlp, one.member(0), params, x, y, std::size_t(x.rows()),
                             Via::overlap, dropout);
}

}  // namespace shardprop::testing
