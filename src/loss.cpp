#include "shardprop/loss.hpp"

#include <algorithm>
#include <cmath>

#include "layers.hpp"

namespace shardprop {

namespace {

// log(1 + exp(x)) without overflow.
double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

// log Σ_k exp(z_k) of a row, in double, shifted by its maximum against overflow.
template <class Row>
double log_sum_exp(const Row& z) {
  const auto max = z.maxCoeff();
  return std::log(double((z.array() - max).exp().sum())) + double(max);
}

template <class T, class Row>
void softmax_from(Row&& z, double log_sum) {
  z = (z.array() - T(log_sum)).exp();
}

template <class T, class Rows>
void sigmoid(Rows&& z) {
  z = (T(1) + (-z.array()).exp()).inverse();
}

}  // namespace

template <class T>
void output_activation(Loss loss, MatrixView<T> z) {
  if (loss == Loss::xent) {
    for (Eigen::Index r = 0; r < z.rows(); ++r) softmax_from<T>(z.row(r), log_sum_exp(z.row(r)));
  } else if (loss == Loss::bce) {
    sigmoid<T>(z);
  }
}

template <class T>
int predicted_class(ConstRowVectorView<T> yhat) {
  if (yhat.size() == 1) return yhat(0) >= T(0.5) ? 1 : 0;
  Eigen::Index best = 0;
  yhat.maxCoeff(&best);
  return int(best);
}

template <class T>
LossSums output_loss(Loss loss, MatrixView<T> z, ConstMatrixView<T> y, MatrixView<T>* delta) {
  LossSums sums;
  const Eigen::Index k = z.cols();
  for (Eigen::Index r = 0; r < z.rows(); ++r) {
    auto zr = z.row(r);
    const auto yr = y.row(r);
    switch (loss) {
      case Loss::xent: {
        const double log_sum = log_sum_exp(zr);
        for (Eigen::Index j = 0; j < k; ++j) sums.loss -= double(yr(j)) * (double(zr(j)) - log_sum);
        softmax_from<T>(zr, log_sum);
        break;
      }
      case Loss::bce: {
        for (Eigen::Index j = 0; j < k; ++j) {
          const double zj = double(zr(j)), yj = double(yr(j));
          sums.loss += yj * softplus(-zj) + (1.0 - yj) * softplus(zj);
        }
        sigmoid<T>(zr);
        break;
      }
      case Loss::mse:
        sums.loss += double((zr - yr).squaredNorm()) / double(k);
        break;
    }
    // One output predicts 1 from 0.5 up; a target is 1 above 0.5.
    const int predicted = predicted_class<T>(ConstRowVectorView<T>(zr.data(), k));
    Eigen::Index wanted = 0;
    if (k == 1) {
      wanted = yr(0) > T(0.5) ? 1 : 0;
    } else {
      yr.maxCoeff(&wanted);
    }
    if (predicted == wanted) sums.correct += 1;
  }
  if (delta) {
    delta->noalias() = z - y;
    if (loss == Loss::mse) *delta *= T(2) / T(k);
  }
  return sums;
}

std::size_t chunk_count(std::size_t rows, std::size_t chunk) {
  return chunk == 0 ? 1 : (rows + chunk - 1) / chunk;
}

template <class T>
void output_loss_chunks(Loss loss, MatrixView<T> z, ConstMatrixView<T> y, MatrixView<T>* delta,
                        std::size_t chunk, std::span<LossSums> sums) {
  const auto rows = z.rows(), k = z.cols();
  const auto size = Eigen::Index(chunk == 0 ? std::size_t(rows) : chunk);
  for_each_chunk(chunk_count(std::size_t(rows), chunk), [&](std::size_t c) {
    const Eigen::Index r0 = Eigen::Index(c) * size, n = std::min(size, rows - r0);
    MatrixView<T> d(delta ? delta->data() + r0 * k : nullptr, delta ? n : 0, delta ? k : 0);
    sums[c] = output_loss<T>(loss, MatrixView<T>(z.data() + r0 * k, n, k),
                             ConstMatrixView<T>(y.data() + r0 * k, n, k), delta ? &d : nullptr);
  });
}

#define SP_INSTANTIATE(T)                                                                     \
  template void output_activation<T>(Loss, MatrixView<T>);                                    \
  template int predicted_class<T>(ConstRowVectorView<T>);                                     \
  template LossSums output_loss<T>(Loss, MatrixView<T>, ConstMatrixView<T>, MatrixView<T>*);  \
  template void output_loss_chunks<T>(Loss, MatrixView<T>, ConstMatrixView<T>,               \
                                      MatrixView<T>*, std::size_t, std::span<LossSums>);
SP_INSTANTIATE(float)
SP_INSTANTIATE(double)
#undef SP_INSTANTIATE

}  // namespace shardprop
