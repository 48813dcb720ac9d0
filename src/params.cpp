#include "shardprop/params.hpp"

#include <algorithm>
#include <cmath>

#include "shardprop/rng.hpp"

namespace shardprop {

namespace {
std::size_t round_up(std::size_t n) { return (n + Layout::kAlign - 1) / Layout::kAlign * Layout::kAlign; }
}  // namespace

Layout::Layout(const ModelSpec& spec) {
  std::size_t offset = 0;
  for (const auto& layer : spec.layers) {
    Block b{};
    b.in = layer.in;
    b.out = layer.out;
    b.w_offset = offset;
    offset = round_up(offset + layer.in * layer.out);
    b.b_offset = offset;
    offset = round_up(offset + layer.out);
    blocks_.push_back(b);
  }
  size_ = offset;
}

std::pair<std::size_t, std::size_t> Layout::layer_range(std::size_t layer) const {
  const Block& b = blocks_[layer];
  return {b.w_offset, b.b_offset + b.out};
}

template <class T>
void init_params(const ModelSpec& spec, const Layout& layout, std::uint64_t seed,
                 std::span<T> params) {
  std::fill(params.begin(), params.end(), T(0));
  Rng rng(seed);
  for (std::size_t l = 0; l < spec.layers.size(); ++l) {
    const LayerSpec& layer = spec.layers[l];
    auto w = layout.weights(params, l);
    const double fan_in = double(layer.in), fan_out = double(layer.out);
    if (layer.activation == Activation::relu) {
      const double std_dev = std::sqrt(2.0 / fan_in);
      for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = T(std_dev * rng.normal());
    } else {
      const double limit = std::sqrt(6.0 / (fan_in + fan_out));
      for (Eigen::Index i = 0; i < w.size(); ++i) {
        w.data()[i] = T(limit * (2.0 * rng.uniform() - 1.0));
      }
    }
  }
}

template void init_params<float>(const ModelSpec&, const Layout&, std::uint64_t, std::span<float>);
template void init_params<double>(const ModelSpec&, const Layout&, std::uint64_t,
                                  std::span<double>);

}  // namespace shardprop
