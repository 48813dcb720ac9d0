#include "shardprop/mlp.hpp"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "gemm.hpp"
#include "layers.hpp"
#include "shardprop/error.hpp"

namespace shardprop {

std::string gemm_backend() { return gemm::describe(gemm::current_backend()); }

void select_gemm(std::string_view name, std::string_view what) {
  gemm::use_backend(gemm::parse_backend(name, what));
}

Precision parse_precision(std::string_view text, std::string_view what) {
  if (text == "fp32") return Precision::fp32;
  if (text == "bf16") return Precision::bf16;
  SP_USAGE(what, " '", text, "': not a precision (fp32 or bf16)");
}

template <class T>
struct Mlp<T>::Workspace {
  std::size_t capacity = 0;              // rows the forward buffers hold
  std::size_t backward_capacity = 0;     // rows the δ buffers hold
  std::vector<AlignedVector<T>> acts;    // per layer: (rows, out) activations
  AlignedVector<T> delta[2];             // ping-pong δ buffers: (rows, widest layer)
  std::vector<LossSums> chunk_sums;
  ChunkScratch<T> scratch;               // the chunked kernels' packed operands
  // bf16 mode: the products' operands rounded to bfloat16
  AlignedVector<std::uint16_t> x16;                  // (rows, in)
  std::vector<AlignedVector<std::uint16_t>> acts16;  // per hidden layer: (rows, out)
  AlignedVector<std::uint16_t> delta16[2];           // like delta
  std::vector<AlignedVector<std::uint16_t>> w16;     // per layer: (in, out)
  // Dropout, per hidden layer that drops: each unit's factor (0 or 1/(1 − rate)) and the
  // activations times it, the next layer's input while a training pass runs.
  std::vector<AlignedVector<T>> mask, dropped;
  bool dropping = false;  // the current pass applies dropout
};

template <class T>
Mlp<T>::Mlp(ModelSpec spec, std::size_t chunk, Precision precision)
    : spec_(std::move(spec)),
      layout_(spec_),
      chunk_(chunk),
      precision_(precision),
      ws_(std::make_unique<Workspace>()) {
  if (precision_ == Precision::bf16) {
    constexpr bool is_float = std::is_same_v<T, float>;
    SP_CHECK_USAGE(is_float, "--precision bf16 needs a float32 model");
    SP_CHECK_USAGE(chunk_ == 0, "--precision bf16 cannot be combined with --deterministic "
                   "(the deterministic mode's products are its own float32 kernels)");
    SP_CHECK_USAGE(gemm::bf16_supported(), "--precision bf16: ",
                   gemm::bf16_unsupported_reason());
    ws_->acts16.resize(spec_.layers.size());
    for (const LayerSpec& layer : spec_.layers) ws_->w16.emplace_back(layer.in * layer.out);
  }
  ws_->acts.resize(spec_.layers.size());
  ws_->mask.resize(spec_.layers.size());
  ws_->dropped.resize(spec_.layers.size());
  ws_->chunk_sums.resize(1);  // an empty batch still has its one (empty) chunk
}

template <class T>
Mlp<T>::~Mlp() = default;
template <class T>
Mlp<T>::Mlp(Mlp&&) noexcept = default;
template <class T>
Mlp<T>& Mlp<T>::operator=(Mlp&&) noexcept = default;

template <class T>
void Mlp<T>::reserve(std::size_t rows, bool backward) {
  std::size_t widest = spec_.input_width(), weights = 0;
  for (const LayerSpec& layer : spec_.layers) {
    widest = std::max(widest, layer.out);
    weights = std::max(weights, layer.in * layer.out);
  }
  if (backward && rows > ws_->backward_capacity) {
    for (auto& d : ws_->delta) d.resize(rows * widest);
    for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
      if (spec_.layers[l].dropout == 0) continue;
      ws_->mask[l].resize(rows * spec_.layers[l].out);
      ws_->dropped[l].resize(rows * spec_.layers[l].out);
    }
    if (precision_ == Precision::bf16) {
      for (auto& d : ws_->delta16) d.resize(rows * widest);
    }
    ws_->backward_capacity = rows;
  }
  if (rows <= ws_->capacity) return;
  for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
    ws_->acts[l].resize(rows * spec_.layers[l].out);
  }
  if (precision_ == Precision::bf16) {
    ws_->x16.resize(rows * spec_.input_width());
    for (std::size_t l = 0; l + 1 < spec_.layers.size(); ++l) {
      ws_->acts16[l].resize(rows * spec_.layers[l].out);
    }
  }
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
  const bool dropped = ws_->dropping && spec_.layers[layer - 1].dropout > 0;
  return ConstMatrixView<T>((dropped ? ws_->dropped : ws_->acts)[layer - 1].data(),
                            Eigen::Index(rows), Eigen::Index(spec_.layers[layer].in));
}

template <class T>
const std::uint16_t* Mlp<T>::input_bf16_of(std::size_t layer) const {
  return layer == 0 ? ws_->x16.data() : ws_->acts16[layer - 1].data();
}

template <class T>
void Mlp<T>::forward(std::span<const T> params, ConstMatrixView<T> x, const DropoutKeys* dropout) {
  SP_CHECK(params.size() == layout_.size(), "parameter buffer has ", params.size(),
           " elements, the model needs ", layout_.size());
  SP_CHECK(std::size_t(x.cols()) == spec_.input_width(), "input has ", x.cols(),
           " features, the model expects ", spec_.input_width());
  const auto rows = static_cast<std::size_t>(x.rows());
  ws_->dropping = dropout && spec_.has_dropout();
  reserve(rows, ws_->dropping);
  // A hidden layer that drops units: its masked activations become the next layer's input.
  const auto drop = [&](std::size_t l) {
    const double rate = spec_.layers[l].dropout;
    if (!ws_->dropping || rate == 0) return false;
    const auto units = Eigen::Index(spec_.layers[l].out);
    const MatrixView<T> a = activation(l, rows);
    dropout_forward<T>(ConstMatrixView<T>(a.data(), a.rows(), a.cols()), rate, dropout_key(dropout->seed, dropout->step, l),
                       dropout->samples, MatrixView<T>(ws_->mask[l].data(), Eigen::Index(rows), units),
                       MatrixView<T>(ws_->dropped[l].data(), Eigen::Index(rows), units));
    return true;
  };
  if constexpr (std::is_same_v<T, float>) {
    if (precision_ == Precision::bf16) {
      round_bf16(x, ws_->x16.data());
      for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
        const bool output = l + 1 == spec_.layers.size();
        const auto w = layout_.weights(params, l);
        round_bf16(w, ws_->w16[l].data());
        dense_forward_bf16(input_of(l, x, rows), input_bf16_of(l), ws_->w16[l].data(),
                           layout_.bias(params, l),
                           output ? Activation::identity : spec_.layers[l].activation,
                           activation(l, rows), output ? nullptr : ws_->acts16[l].data());
        // The next product's operand is the rounding of the masked activations.
        if (!output && drop(l)) round_bf16(input_of(l + 1, x, rows), ws_->acts16[l].data());
      }
      return;
    }
  }
  for (std::size_t l = 0; l < spec_.layers.size(); ++l) {
    // The output activation (softmax, sigmoid or identity) is fused with the loss, so the
    // last layer leaves Z untouched here.
    const bool output = l + 1 == spec_.layers.size();
    const Activation act = output ? Activation::identity : spec_.layers[l].activation;
    dense_forward<T>(input_of(l, x, rows), layout_.weights(params, l), layout_.bias(params, l),
                     act, activation(l, rows), chunk_, ws_->scratch);
    if (!output) drop(l);
  }
}

template <class T>
ConstMatrixView<T> Mlp<T>::predict(std::span<const T> params, ConstMatrixView<T> x) {
  forward(params, x, nullptr);
  auto out = activation(spec_.layers.size() - 1, std::size_t(x.rows()));
  output_activation<T>(spec_.loss, out);
  return ConstMatrixView<T>(out.data(), out.rows(), out.cols());
}

template <class T>
std::span<const LossSums> Mlp<T>::losses(std::span<const T> params, ConstMatrixView<T> x,
                                         ConstMatrixView<T> y, const DropoutKeys* dropout) {
  SP_CHECK(y.rows() == x.rows() && std::size_t(y.cols()) == spec_.output_width(), "targets are ",
           y.rows(), "x", y.cols(), ", expected ", x.rows(), "x", spec_.output_width());
  forward(params, x, dropout);
  const auto rows = std::size_t(x.rows());
  const std::span<LossSums> sums(ws_->chunk_sums.data(), chunk_count(rows, chunk_));
  output_loss_chunks<T>(spec_.loss, activation(spec_.layers.size() - 1, rows), y, nullptr,
                        chunk_, sums);
  return sums;
}

template <class T>
void Mlp<T>::forward_backward(std::span<const T> params, ConstMatrixView<T> x,
                              ConstMatrixView<T> y, GradReducer<T>& reducer,
                              const DropoutKeys* dropout) {
  SP_CHECK(reducer.chunk() == chunk_, "the reducer's chunk (", reducer.chunk(),
           ") is not the model's (", chunk_, ")");
  SP_CHECK(y.rows() == x.rows() && std::size_t(y.cols()) == spec_.output_width(), "targets are ",
           y.rows(), "x", y.cols(), ", expected ", x.rows(), "x", spec_.output_width());
  SP_CHECK(dropout || !spec_.has_dropout(), "a model with dropout trains with dropout keys");
  reserve(std::size_t(x.rows()), true);
  forward(params, x, dropout);
  const auto rows = static_cast<std::size_t>(x.rows());
  const std::size_t last = spec_.layers.size() - 1;

  // δ of the output layer: ∂(Σ per-sample loss)/∂Z, seed 000's ŷ − y.
  MatrixView<T> d(ws_->delta[0].data(), Eigen::Index(rows), Eigen::Index(spec_.layers[last].out));
  const std::span<LossSums> sums(ws_->chunk_sums.data(), chunk_count(rows, chunk_));
  output_loss_chunks<T>(spec_.loss, activation(last, rows), y, &d, chunk_, sums);
  reducer.loss(sums);
  const bool bf16 = precision_ == Precision::bf16;
  if constexpr (std::is_same_v<T, float>) {
    if (bf16) round_bf16(ConstMatrixView<T>(d.data(), d.rows(), d.cols()), ws_->delta16[0].data());
  }

  std::size_t current = 0;
  for (std::size_t l = last + 1; l-- > 0;) {
    const LayerSpec& layer = spec_.layers[l];
    const ConstMatrixView<T> delta(ws_->delta[current].data(), Eigen::Index(rows),
                                   Eigen::Index(layer.out));
    const ConstMatrixView<T> input = input_of(l, x, rows);
    reducer.layer(l, input, delta,
                  bf16 ? Bf16Operands{input_bf16_of(l), ws_->delta16[current].data()}
                       : Bf16Operands{});
    if (l > 0) {  // δ of the layer below
      const MatrixView<T> dx(ws_->delta[1 - current].data(), Eigen::Index(rows),
                             Eigen::Index(layer.in));
      // The activation's derivative is taken at the unmasked activations; then the mask
      // (d(A ⊙ m)/dA = m, elementwise, so the order does not matter).
      const double rate = spec_.layers[l - 1].dropout;
      const ConstMatrixView<T> below(ws_->acts[l - 1].data(), Eigen::Index(rows),
                                     Eigen::Index(layer.in));
      const auto backward_input = [&] {
        if constexpr (std::is_same_v<T, float>) {
          if (bf16) {
            return dense_backward_input_bf16(delta, ws_->delta16[current].data(),
                                             ws_->w16[l].data(), below,
                                             spec_.layers[l - 1].activation, dx,
                                             rate > 0 ? nullptr : ws_->delta16[1 - current].data());
          }
        }
        dense_backward_input<T>(delta, layout_.weights(params, l), below,
                                spec_.layers[l - 1].activation, dx, chunk_, ws_->scratch);
      };
      backward_input();
      if (rate > 0) {
        multiply_mask<T>(dx, ConstMatrixView<T>(ws_->mask[l - 1].data(), Eigen::Index(rows),
                                                Eigen::Index(layer.in)));
        if constexpr (std::is_same_v<T, float>) {
          if (bf16) {
            round_bf16(ConstMatrixView<T>(dx.data(), dx.rows(), dx.cols()),
                       ws_->delta16[1 - current].data());
          }
        }
      }
      reducer.progress();
    }
    current = 1 - current;
  }
}

template class Mlp<float>;
template class Mlp<double>;

}  // namespace shardprop
