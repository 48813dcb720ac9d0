#include "shardprop/mlp.hpp"

#include <algorithm>
#include <vector>

#include "gemm.hpp"
#include "layers.hpp"
#include "shardprop/error.hpp"

namespace shardprop {

const char* gemm_backend() { return gemm::backend_name(); }

template <class T>
struct Mlp<T>::Workspace {
  std::size_t capacity = 0;              // rows the buffers hold
  std::vector<AlignedVector<T>> acts;    // per layer: (rows, out) activations
  AlignedVector<T> delta[2];             // ping-pong δ buffers: (rows, widest layer)
  std::vector<LossSums> chunk_sums;
  ChunkScratch<T> scratch;               // the chunked kernels' packed operands
};

template <class T>
Mlp<T>::Mlp(ModelSpec spec, std::size_t chunk)
    : spec_(std::move(spec)), layout_(spec_), chunk_(chunk), ws_(std::make_unique<Workspace>()) {
  ws_->acts.resize(spec_.layers.size());
  ws_->chunk_sums.resize(1);  // an empty batch still has its one (empty) chunk
}

template <class T>
Mlp<T>::~Mlp() = default;
template <class T>
Mlp<T>::Mlp(Mlp&&) noexcept = default;
template <class T>
Mlp<T>& Mlp<T>::operator=(Mlp&&) noexcept = default;

template <class T>
void Mlp<T>::reserve(std::size_t rows) {
  if (rows <= ws_->capacity) return;
  std::size_t widest = spec_.input_width(), weights = 0;
  for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
    const LayerSpec& layer = spec_.layers[l];
    ws_->acts[l].resize(rows * layer.out);
    widest = std::max(widest, layer.out);
    weights = std::max(weights, layer.in * layer.out);
  }
  for (auto& d : ws_->delta) d.resize(rows * widest);
  ws_->chunk_sums.resize(chunk_count(rows, chunk_));
  ws_->scratch.reserve(rows, chunk_, weights, widest);
  ws_->capacity = rows;
}

template <class T>
MatrixView<T> Mlp<T>::activation(std::size_t layer, std::size_t rows) {
  return MatrixView<T>(ws_->acts[layer].data(), Eigen::Index(rows),
                       Eigen::Index(spec_.layers[layer].out));
}

template <class T>
ConstMatrixView<T> Mlp<T>::input_of(std::size_t layer, ConstMatrixView<T> x, std::size_t rows) {
  if (layer == 0) return x;
  return ConstMatrixView<T>(ws_->acts[layer - 1].data(), Eigen::Index(rows),
                            Eigen::Index(spec_.layers[layer].in));
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
    // The output activation (softmax, sigmoid or identity) is fused with the loss, so the
    // last layer leaves Z untouched here.
    const bool output = l + 1 == spec_.layers.size();
    const Activation act = output ? Activation::identity : spec_.layers[l].activation;
    dense_forward<T>(input_of(l, x, rows), layout_.weights(params, l), layout_.bias(params, l),
                     act, activation(l, rows), chunk_, ws_->scratch);
  }
}

template <class T>
ConstMatrixView<T> Mlp<T>::predict(std::span<const T> params, ConstMatrixView<T> x) {
  forward(params, x);
  auto out = activation(spec_.layers.size() - 1, std::size_t(x.rows()));
  output_activation<T>(spec_.loss, out);
  return ConstMatrixView<T>(out.data(), out.rows(), out.cols());
}

template <class T>
std::span<const LossSums> Mlp<T>::losses(std::span<const T> params, ConstMatrixView<T> x,
                                         ConstMatrixView<T> y) {
  SP_CHECK(y.rows() == x.rows() && std::size_t(y.cols()) == spec_.output_width(), "targets are ",
           y.rows(), "x", y.cols(), ", expected ", x.rows(), "x", spec_.output_width());
  forward(params, x);
  const auto rows = std::size_t(x.rows());
  const std::span<LossSums> sums(ws_->chunk_sums.data(), chunk_count(rows, chunk_));
  output_loss_chunks<T>(spec_.loss, activation(spec_.layers.size() - 1, rows), y, nullptr,
                        chunk_, sums);
  return sums;
}

template <class T>
void Mlp<T>::forward_backward(std::span<const T> params, ConstMatrixView<T> x,
                              ConstMatrixView<T> y, GradReducer<T>& reducer) {
  SP_CHECK(reducer.chunk() == chunk_, "the reducer's chunk (", reducer.chunk(),
           ") is not the model's (", chunk_, ")");
  SP_CHECK(y.rows() == x.rows() && std::size_t(y.cols()) == spec_.output_width(), "targets are ",
           y.rows(), "x", y.cols(), ", expected ", x.rows(), "x", spec_.output_width());
  forward(params, x);
  const auto rows = static_cast<std::size_t>(x.rows());
  const std::size_t last = spec_.layers.size() - 1;

  // δ of the output layer: ∂(Σ per-sample loss)/∂Z, seed 000's ŷ − y.
  MatrixView<T> d(ws_->delta[0].data(), Eigen::Index(rows), Eigen::Index(spec_.layers[last].out));
  const std::span<LossSums> sums(ws_->chunk_sums.data(), chunk_count(rows, chunk_));
  output_loss_chunks<T>(spec_.loss, activation(last, rows), y, &d, chunk_, sums);
  reducer.loss(sums);

  std::size_t current = 0;
  for (std::size_t l = last + 1; l-- > 0;) {
    const LayerSpec& layer = spec_.layers[l];
    const ConstMatrixView<T> delta(ws_->delta[current].data(), Eigen::Index(rows),
                                   Eigen::Index(layer.out));
    const ConstMatrixView<T> input = input_of(l, x, rows);
    reducer.layer(l, input, delta);
    if (l > 0) {  // δ of the layer below
      dense_backward_input<T>(delta, layout_.weights(params, l), input,
                              spec_.layers[l - 1].activation,
                              MatrixView<T>(ws_->delta[1 - current].data(), Eigen::Index(rows),
                                            Eigen::Index(layer.in)),
                              chunk_, ws_->scratch);
      reducer.progress();
    }
    current = 1 - current;
  }
}

template class Mlp<float>;
template class Mlp<double>;

}  // namespace shardprop
