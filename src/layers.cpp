#include "shardprop/layers.hpp"

#include <algorithm>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>
#include <oneapi/tbb/partitioner.h>
#include <oneapi/tbb/task_arena.h>

namespace shardprop {

namespace {

// One block per worker thread, but no block smaller than `min_block` (rounded to `align`).
std::size_t block_size(std::size_t n, std::size_t min_block, std::size_t align) {
  const auto workers = static_cast<std::size_t>(oneapi::tbb::this_task_arena::max_concurrency());
  std::size_t block = std::max<std::size_t>((n + workers - 1) / workers, min_block);
  block = (block + align - 1) / align * align;
  return std::max<std::size_t>(block, 1);
}

// Runs body(begin, end) over [0, n) in contiguous blocks of `block` elements, one task each.
template <class Body>
void for_blocks(std::size_t n, std::size_t block, const Body& body) {
  if (n == 0) return;
  if (block >= n) {
    body(std::size_t{0}, n);
    return;
  }
  oneapi::tbb::parallel_for(
      oneapi::tbb::blocked_range<std::size_t>(0, n, block),
      [&](const oneapi::tbb::blocked_range<std::size_t>& r) { body(r.begin(), r.end()); },
      oneapi::tbb::simple_partitioner());
}

constexpr std::size_t kMinRows = 16;  // a row block below this costs more in tasks than it saves
constexpr std::size_t kMinCols = 16;

template <class T, class Block>
void activation_derivative_mul(Activation act, const Block& a, Eigen::Ref<RowMatrix<T>> dx) {
  switch (act) {
    case Activation::identity:
      break;
    case Activation::sigmoid:
      dx.array() *= a.array() * (T(1) - a.array());
      break;
    case Activation::tanh:
      dx.array() *= T(1) - a.array().square();
      break;
    case Activation::relu:
      dx.array() = (a.array() > T(0)).select(dx.array(), T(0));
      break;
    case Activation::softmax:
      break;  // fused with the loss; never a hidden activation
  }
}

}  // namespace

template <class T>
void activate(Activation act, Eigen::Ref<RowMatrix<T>> z) {
  switch (act) {
    case Activation::identity:
    case Activation::softmax:  // fused with the loss
      break;
    case Activation::sigmoid:
      z.array() = (T(1) + (-z.array()).exp()).inverse();
      break;
    case Activation::tanh:
      z.array() = z.array().tanh();
      break;
    case Activation::relu:
      z.array() = z.array().max(T(0));
      break;
  }
}

template <class T>
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out) {
  const auto rows = static_cast<std::size_t>(x.rows());
  for_blocks(rows, block_size(rows, kMinRows, 1), [&](std::size_t r0, std::size_t r1) {
    const auto n = Eigen::Index(r1 - r0);
    auto z = out.middleRows(Eigen::Index(r0), n);
    z.noalias() = x.middleRows(Eigen::Index(r0), n) * w;
    z.rowwise() += b;
    activate<T>(act, z);
  });
}

template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db) {
  const auto cols = static_cast<std::size_t>(delta.cols());
  for_blocks(cols, block_size(cols, kMinCols, kMinCols), [&](std::size_t c0, std::size_t c1) {
    const auto n = Eigen::Index(c1 - c0);
    const auto d = delta.middleCols(Eigen::Index(c0), n);
    dw.middleCols(Eigen::Index(c0), n).noalias() += x.transpose() * d;
    db.segment(Eigen::Index(c0), n) += d.colwise().sum();
  });
}

template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx) {
  const auto rows = static_cast<std::size_t>(delta.rows());
  for_blocks(rows, block_size(rows, kMinRows, 1), [&](std::size_t r0, std::size_t r1) {
    const auto n = Eigen::Index(r1 - r0);
    auto d = dx.middleRows(Eigen::Index(r0), n);
    d.noalias() = delta.middleRows(Eigen::Index(r0), n) * w.transpose();
    activation_derivative_mul<T>(act_prev, a_prev.middleRows(Eigen::Index(r0), n), d);
  });
}

#define SP_INSTANTIATE(T)                                                                     \
  template void activate<T>(Activation, Eigen::Ref<RowMatrix<T>>);                            \
  template void dense_forward<T>(ConstMatrixView<T>, ConstMatrixView<T>, ConstRowVectorView<T>, \
                                 Activation, MatrixView<T>);                                  \
  template void dense_backward_params<T>(ConstMatrixView<T>, ConstMatrixView<T>, MatrixView<T>, \
                                         RowVectorView<T>);                                   \
  template void dense_backward_input<T>(ConstMatrixView<T>, ConstMatrixView<T>,               \
                                        ConstMatrixView<T>, Activation, MatrixView<T>);
SP_INSTANTIATE(float)
SP_INSTANTIATE(double)
#undef SP_INSTANTIATE

}  // namespace shardprop
