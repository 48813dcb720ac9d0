// Dense-layer and activation kernels, threaded with oneTBB. Batches are row-major: one
// sample per row. Shapes are given as (rows, columns).
#pragma once

#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// out = act(x·w + b). x (rows, in), w (in, out), b (out), out (rows, out).
// Split over row blocks. The model passes identity for its output layer, whose activation
// is fused with the loss.
template <class T>
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out);

// dw += xᵀ·delta and db += column sums of delta (the summed bias rows).
// x (rows, in), delta (rows, out), dw (in, out), db (out). Split over output columns, so
// no thread ever writes another's columns and no per-thread reduction is needed.
template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db);

// dx = (delta·wᵀ) ⊙ act'(a_prev), the δ of the previous layer, whose activation `act_prev`
// produced a_prev. delta (rows, out), w (in, out), a_prev and dx (rows, in). Split over row blocks.
template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx);

// Applies an elementwise activation in place (identity, sigmoid, tanh, relu).
template <class T>
void activate(Activation act, Eigen::Ref<RowMatrix<T>> z);

}  // namespace shardprop
