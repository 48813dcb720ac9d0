#include "shardprop/mlp.hpp"

#include <algorithm>

#include "shardprop/error.hpp"
#include "shardprop/layers.hpp"

namespace shardprop {

template <class T>
Mlp<T>::Mlp(ModelSpec spec) : spec_(std::move(spec)), layout_(spec_) {
  max_width_ = spec_.input_width();
  for (const auto& layer : spec_.layers) max_width_ = std::max(max_width_, layer.out);
  acts_.resize(spec_.layers.size());
}

template <class T>
void Mlp<T>::reserve(std::size_t rows) {
  if (rows <= capacity_) return;
  for (std::size_t l = 0; l < acts_.size(); ++l) acts_[l].resize(rows * spec_.layers[l].out);
  for (auto& d : delta_) d.resize(rows * max_width_);
  capacity_ = rows;
}

template <class T>
MatrixView<T> Mlp<T>::activation(std::size_t layer, std::size_t rows) {
  return MatrixView<T>(acts_[layer].data(), Eigen::Index(rows),
                       Eigen::Index(spec_.layers[layer].out));
}

template <class T>
MatrixView<T> Mlp<T>::delta(std::size_t which, std::size_t rows, std::size_t cols) {
  return MatrixView<T>(delta_[which].data(), Eigen::Index(rows), Eigen::Index(cols));
}

template <class T>
void Mlp<T>::forward(std::span<const T> params, ConstMatrixView<T> x) {
  SP_CHECK(params.size() == layout_.size(), "parameter buffer has ", params.size(),
           " elements, the model needs ", layout_.size());
  SP_CHECK(std::size_t(x.cols()) == spec_.input_width(), "input has ", x.cols(),
           " features, the model expects ", spec_.input_width());
  const auto rows = static_cast<std::size_t>(x.rows());
  reserve(rows);
  for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
    ConstMatrixView<T> in = l == 0 ? x : ConstMatrixView<T>(activation(l - 1, rows).data(),
                                                            Eigen::Index(rows),
                                                            Eigen::Index(spec_.layers[l].in));
    // The output activation (softmax, sigmoid or identity) is fused with the loss, so the
    // last layer leaves Z untouched here.
    const bool output = l + 1 == spec_.layers.size();
    dense_forward<T>(in, layout_.weights(params, l), layout_.bias(params, l),
                     output ? Activation::identity : spec_.layers[l].activation,
                     activation(l, rows));
  }
}

template <class T>
ConstMatrixView<T> Mlp<T>::predict(std::span<const T> params, ConstMatrixView<T> x) {
  forward(params, x);
  const std::size_t last = spec_.layers.size() - 1;
  auto out = activation(last, std::size_t(x.rows()));
  if (spec_.loss == Loss::xent) {
    for (Eigen::Index r = 0; r < out.rows(); ++r) {
      auto row = out.row(r);
      row = (row.array() - row.maxCoeff()).exp();
      row /= row.sum();
    }
  } else if (spec_.loss == Loss::bce) {
    out.array() = (T(1) + (-out.array()).exp()).inverse();
  }
  return ConstMatrixView<T>(out.data(), out.rows(), out.cols());
}

template <class T>
LossSums Mlp<T>::evaluate(std::span<const T> params, ConstMatrixView<T> x,
                          ConstMatrixView<T> y) {
  forward(params, x);
  const std::size_t last = spec_.layers.size() - 1;
  return output_loss<T>(spec_.loss, activation(last, std::size_t(x.rows())), y, nullptr);
}

template <class T>
LossSums Mlp<T>::forward_backward(std::span<const T> params, ConstMatrixView<T> x,
                                  ConstMatrixView<T> y, std::span<T> grad_sum,
                                  LayerDone layer_done, LayerDone progress) {
  SP_CHECK(grad_sum.size() == layout_.size(), "gradient buffer has ", grad_sum.size(),
           " elements, the model needs ", layout_.size());
  forward(params, x);
  const auto rows = static_cast<std::size_t>(x.rows());
  const std::size_t last = spec_.layers.size() - 1;
  SP_CHECK(std::size_t(y.rows()) == rows && std::size_t(y.cols()) == spec_.output_width(),
           "targets are ", y.rows(), "x", y.cols(), ", expected ", rows, "x",
           spec_.output_width());

  // δ of the output layer: ∂(Σ per-sample loss)/∂Z, seed 000's ŷ − y.
  auto d = delta(0, rows, spec_.layers[last].out);
  const LossSums sums = output_loss<T>(spec_.loss, activation(last, rows), y, &d);

  std::size_t current = 0;
  for (std::size_t l = last + 1; l-- > 0;) {
    const LayerSpec& layer = spec_.layers[l];
    ConstMatrixView<T> d_l(delta_[current].data(), Eigen::Index(rows), Eigen::Index(layer.out));
    ConstMatrixView<T> in = l == 0 ? x : ConstMatrixView<T>(activation(l - 1, rows).data(),
                                                            Eigen::Index(rows),
                                                            Eigen::Index(layer.in));
    if (l > 0) {  // δ of the layer below, before this layer's gradient is handed off
      dense_backward_input<T>(d_l, layout_.weights(params, l), in,
                              spec_.layers[l - 1].activation, delta(1 - current, rows, layer.in));
      progress(l);
    }
    dense_backward_params<T>(in, d_l, layout_.weights(grad_sum, l), layout_.bias(grad_sum, l),
                             progress ? LayerDone([&](std::size_t) { progress(l); }) : LayerDone());
    layer_done(l);
    current = 1 - current;
  }
  return sums;
}

template class Mlp<float>;
template class Mlp<double>;

}  // namespace shardprop
