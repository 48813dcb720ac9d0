// Dense-layer and activation kernels, threaded with oneTBB. Batches are row-major: one
// sample per row. Shapes are given as (rows, columns).
#pragma once

#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// A non-owning callable reference `void(std::size_t layer)`; empty means do nothing.

class LayerDone {
 public:
  LayerDone() = default;
  template <class F>
  LayerDone(const F& f)  // NOLINT(google-explicit-constructor): used like a function argument
      : object_(&f), call_([](const void* o, std::size_t l) { (*static_cast<const F*>(o))(l); }) {}
  explicit operator bool() const { return call_ != nullptr; }
  void operator()(std::size_t layer) const {
    if (call_) call_(object_, layer);
  }

 private:
  const void* object_ = nullptr;
  void (*call_)(const void*, std::size_t) = nullptr;
};



// out = act(x·w + b). x (rows, in), w (in, out), b (out), out (rows, out).
// Split over row blocks. The model passes identity for its output layer, whose activation
// is fused with the loss.
template <class T>
void dense_forward(ConstMatrixView<T> x, ConstMatrixView<T> w, ConstRowVectorView<T> b,
                   Activation act, MatrixView<T> out);

// dw += xᵀ·delta and db += column sums of delta (the summed bias rows).
// x (rows, in), delta (rows, out), dw (in, out), db (out). Split over output columns, so
// no thread ever writes another's columns and no per-thread reduction is needed.
// With `progress`, the columns go in a few consecutive parts and progress(0) runs on the
// calling thread after each (to let communication advance); the sums are the same.
template <class T>
void dense_backward_params(ConstMatrixView<T> x, ConstMatrixView<T> delta, MatrixView<T> dw,
                           RowVectorView<T> db, LayerDone progress = {});

// dx = (delta·wᵀ) ⊙ act'(a_prev), the δ of the previous layer, whose activation `act_prev`
// produced a_prev. delta (rows, out), w (in, out), a_prev and dx (rows, in). Split over row blocks.
template <class T>
void dense_backward_input(ConstMatrixView<T> delta, ConstMatrixView<T> w,
                          ConstMatrixView<T> a_prev, Activation act_prev, MatrixView<T> dx);

// Applies an elementwise activation in place (identity, sigmoid, tanh, relu).
template <class T>
void activate(Activation act, Eigen::Ref<RowMatrix<T>> z);

}  // namespace shardprop
