#include "shardprop/loss.hpp"

#include <cmath>

namespace shardprop {

namespace {

// log(1 + exp(x)) without overflow.
double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::abs(x))); }

template <class RowA, class RowB>
bool prediction_correct(const RowA& yhat, const RowB& y) {
  if (y.size() == 1) return (yhat(0) > 0.5) == (y(0) > 0.5);
  Eigen::Index predicted = 0, wanted = 0;
  yhat.maxCoeff(&predicted);
  y.maxCoeff(&wanted);
  return predicted == wanted;
}

}  // namespace

template <class T>
LossSums output_loss(Loss loss, MatrixView<T> z, ConstMatrixView<T> y, MatrixView<T>* delta) {
  LossSums sums;
  const Eigen::Index k = z.cols();
  for (Eigen::Index r = 0; r < z.rows(); ++r) {
    auto zr = z.row(r);
    const auto yr = y.row(r);
    switch (loss) {
      case Loss::xent: {
        const T max = zr.maxCoeff();
        const double log_sum = std::log(double((zr.array() - max).exp().sum())) + double(max);
        for (Eigen::Index j = 0; j < k; ++j) sums.loss -= double(yr(j)) * (double(zr(j)) - log_sum);
        zr = (zr.array() - T(log_sum)).exp();
        break;
      }
      case Loss::bce: {
        for (Eigen::Index j = 0; j < k; ++j) {
          const double zj = double(zr(j)), yj = double(yr(j));
          sums.loss += yj * softplus(-zj) + (1.0 - yj) * softplus(zj);
        }
        zr = (T(1) + (-zr.array()).exp()).inverse();
        break;
      }
      case Loss::mse:
        sums.loss += double((zr - yr).squaredNorm()) / double(k);
        break;
    }
    if (prediction_correct(zr, yr)) sums.correct += 1;
  }
  if (delta) {
    delta->noalias() = z - y;
    if (loss == Loss::mse) *delta *= T(2) / T(k);
  }
  return sums;
}

template LossSums output_loss<float>(Loss, MatrixView<float>, ConstMatrixView<float>,
                                     MatrixView<float>*);
template LossSums output_loss<double>(Loss, MatrixView<double>, ConstMatrixView<double>,
                                      MatrixView<double>*);

}  // namespace shardprop
