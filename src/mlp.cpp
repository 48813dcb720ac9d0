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
void Mlp<T>::forward(std::span<const T> params, ConstMatrixView<T> x, std::size_t chunk) {
  SP_CHECK(params.size() == layout_.size(), "parameter buffer has ", params.size(),
           " elements, the model needs ", layout_.size());
  SP_CHECK(std::size_t(x.cols()) == spec_.input_width(), "input has ", x.cols(),
           " features, the model expects ", spec_.input_width());
  const auto rows = static_cast<std::size_t>(x.rows());
  reserve(rows);
  rows_ = rows;
  if (chunk > 0) reserve_chunk_scratch(chunk);
  for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
    // The output activation (softmax, sigmoid or identity) is fused with the loss, so the
    // last layer leaves Z untouched here.
    const bool output = l + 1 == spec_.layers.size();
    const Activation act = output ? Activation::identity : spec_.layers[l].activation;
    if (chunk > 0) {
      dense_forward_chunks<T>(input_of(l, x), layout_.weights(params, l), layout_.bias(params, l),
                              act, activation(l, rows), chunk, packed_w_.data(),
                              packed_rows_.data());
    } else {
      dense_forward<T>(input_of(l, x), layout_.weights(params, l), layout_.bias(params, l), act,
                       activation(l, rows));
    }
  }
}

template <class T>
ConstMatrixView<T> Mlp<T>::predict(std::span<const T> params, ConstMatrixView<T> x,
                                   std::size_t chunk) {
  forward(params, x, chunk);
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

template <class T>
std::span<const LossSums> Mlp<T>::forward_chunks(std::span<const T> params, ConstMatrixView<T> x,
                                                 ConstMatrixView<T> y, std::size_t chunk) {
  SP_CHECK(chunk > 0, "chunk size must be positive");
  SP_CHECK(y.rows() == x.rows() && std::size_t(y.cols()) == spec_.output_width(),
           "targets are ", y.rows(), "x", y.cols(), ", expected ", x.rows(), "x",
           spec_.output_width());
  forward(params, x, chunk);
  const std::size_t chunks = (rows_ + chunk - 1) / chunk;
  chunk_sums_.resize(chunks);  // allocates only when a batch holds more chunks than before
  const std::size_t last = spec_.layers.size() - 1;
  const auto rows = Eigen::Index(rows_);
  const auto k = Eigen::Index(spec_.layers[last].out);
  for_each_chunk(chunks, [&](std::size_t c) {
    const auto r0 = Eigen::Index(c * chunk), n = std::min(Eigen::Index(chunk), rows - r0);
    MatrixView<T> d(delta_[0].data() + r0 * k, n, k);
    chunk_sums_[c] = output_loss<T>(spec_.loss, MatrixView<T>(acts_[last].data() + r0 * k, n, k),
                                    ConstMatrixView<T>(y.data() + r0 * k, n, k), &d);
  });
  return chunk_sums_;
}

template <class T>
void Mlp<T>::backward_input_chunks(std::span<const T> params, std::size_t layer,
                                   std::size_t chunk) {
  SP_CHECK(layer > 0 && layer < spec_.layers.size(), "no layer below layer ", layer);
  const std::size_t last = spec_.layers.size() - 1;
  const std::size_t in = spec_.layers[layer].in, out = spec_.layers[layer].out;
  const auto rows = Eigen::Index(rows_);
  reserve_chunk_scratch(chunk);
  dense_backward_input_chunks<T>(
      ConstMatrixView<T>(delta_[(last - layer) % 2].data(), rows, Eigen::Index(out)),
      layout_.weights(params, layer),
      ConstMatrixView<T>(acts_[layer - 1].data(), rows, Eigen::Index(in)),
      spec_.layers[layer - 1].activation,
      MatrixView<T>(delta_[(last - layer + 1) % 2].data(), rows, Eigen::Index(in)), chunk,
      packed_w_.data(), packed_rows_.data());
}

template <class T>
void Mlp<T>::reserve_chunk_scratch(std::size_t chunk) {
  std::size_t weights = 0;
  for (const auto& layer : spec_.layers) weights = std::max(weights, layer.in * layer.out);
  if (packed_w_.size() < weights) packed_w_.resize(weights);
  const std::size_t rows = chunk_scratch_size(rows_, chunk, max_width_);
  if (packed_rows_.size() < rows) packed_rows_.resize(rows);
}

template <class T>
ConstMatrixView<T> Mlp<T>::input_of(std::size_t layer, ConstMatrixView<T> x) {
  if (layer == 0) return x;
  return ConstMatrixView<T>(acts_[layer - 1].data(), Eigen::Index(rows_),
                            Eigen::Index(spec_.layers[layer].in));
}

template <class T>
ConstMatrixView<T> Mlp<T>::delta_of(std::size_t layer) {
  const std::size_t last = spec_.layers.size() - 1;
  return ConstMatrixView<T>(delta_[(last - layer) % 2].data(), Eigen::Index(rows_),
                            Eigen::Index(spec_.layers[layer].out));
}

template class Mlp<float>;
template class Mlp<double>;

}  // namespace shardprop
