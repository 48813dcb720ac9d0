// Output layers fused with their losses. Each sample's loss is
//   xent: -Σ_k y_k log softmax(z)_k          δ = ŷ − y
//   bce:  -Σ_k y_k log σ(z_k) + (1−y_k) log(1−σ(z_k))   δ = ŷ − y
//   mse:  (1/K) Σ_k (z_k − y_k)²              δ = 2(ŷ − y)/K
// where δ = ∂loss/∂z for that sample. Sums over samples are returned; the trainer divides
// by the global sample count.
#pragma once

#include <span>

#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

struct LossSums {
  double loss = 0;     // sum of per-sample losses
  double correct = 0;  // samples predicted right (argmax, or threshold 0.5 for one output)
};

// Turns z (rows, K) in place into predictions ŷ: softmax (xent), sigmoid (bce) or identity
// (mse), as output_loss does.
template <class T>
void output_activation(Loss loss, MatrixView<T> z);

// The class a row of predictions ŷ stands for: its largest entry, or for a single output
// 1 if it is at least 0.5.
template <class T>
int predicted_class(ConstRowVectorView<T> yhat);

// Turns z (rows, K) in place into predictions ŷ and returns the loss sums against y.
// If delta is non-null it receives δ (rows, K).
template <class T>
LossSums output_loss(Loss loss, MatrixView<T> z, ConstMatrixView<T> y, MatrixView<T>* delta);

// output_loss over the rows in chunks of `chunk` (the last may be shorter), in parallel,
// with each chunk's sums in sums[c]; chunk 0 is one chunk of all rows. sums holds
// chunk_count(rows, chunk) entries.
std::size_t chunk_count(std::size_t rows, std::size_t chunk);
template <class T>
void output_loss_chunks(Loss loss, MatrixView<T> z, ConstMatrixView<T> y, MatrixView<T>* delta,
                        std::size_t chunk, std::span<LossSums> sums);

}  // namespace shardprop
