// Output layers fused with their losses. Each sample's loss is
//   xent: -Σ_k y_k log softmax(z)_k          δ = ŷ − y
//   bce:  -Σ_k y_k log σ(z_k) + (1−y_k) log(1−σ(z_k))   δ = ŷ − y
//   mse:  (1/K) Σ_k (z_k − y_k)²              δ = 2(ŷ − y)/K
// where δ = ∂loss/∂z for that sample. Sums over samples are returned; the trainer divides
// by the global sample count.
#pragma once

#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

struct LossSums {
  double loss = 0;     // sum of per-sample losses
  double correct = 0;  // samples predicted right (argmax, or threshold 0.5 for one output)
};

// Turns z (rows, K) in place into predictions ŷ and returns the loss sums against y.
// If delta is non-null it receives δ (rows, K).
template <class T>
LossSums output_loss(Loss loss, MatrixView<T> z, ConstMatrixView<T> y, MatrixView<T>* delta);

}  // namespace shardprop
