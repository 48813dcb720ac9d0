// Flat parameter buffers: one contiguous aligned allocation per role (parameters, gradients,
// optimizer state), with per-layer Eigen views into it.
#pragma once

#include <Eigen/Core>
#include <cstddef>
#include <span>
#include <vector>

#include "shardprop/spec.hpp"

namespace shardprop {

template <class T>
using RowMatrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
using MatrixView = Eigen::Map<RowMatrix<T>>;
template <class T>
using ConstMatrixView = Eigen::Map<const RowMatrix<T>>;
template <class T>
using RowVectorView = Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>>;
template <class T>
using ConstRowVectorView = Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>;

// A contiguous buffer aligned for Eigen's widest vectors.
template <class T>
using AlignedVector = std::vector<T, Eigen::aligned_allocator<T>>;

// Where each layer's W (in×out, row-major) and b (out) live in a flat buffer. Every block
// starts on a 16-element boundary; the padding between blocks stays zero.
class Layout {
 public:
  static constexpr std::size_t kAlign = 16;

  struct Block {
    std::size_t w_offset, b_offset, in, out;
  };

  explicit Layout(const ModelSpec& spec);

  std::size_t size() const { return size_; }  // elements including padding
  std::size_t layer_count() const { return blocks_.size(); }
  const Block& block(std::size_t layer) const { return blocks_[layer]; }
  // The half-open element range [begin, end) covering layer `layer`'s W and b.
  std::pair<std::size_t, std::size_t> layer_range(std::size_t layer) const;

  template <class T>
  MatrixView<T> weights(std::span<T> buf, std::size_t layer) const {
    const Block& b = blocks_[layer];
    return MatrixView<T>(buf.data() + b.w_offset, Eigen::Index(b.in), Eigen::Index(b.out));
  }
  template <class T>
  ConstMatrixView<T> weights(std::span<const T> buf, std::size_t layer) const {
    const Block& b = blocks_[layer];
    return ConstMatrixView<T>(buf.data() + b.w_offset, Eigen::Index(b.in), Eigen::Index(b.out));
  }
  template <class T>
  RowVectorView<T> bias(std::span<T> buf, std::size_t layer) const {
    const Block& b = blocks_[layer];
    return RowVectorView<T>(buf.data() + b.b_offset, Eigen::Index(b.out));
  }
  template <class T>
  ConstRowVectorView<T> bias(std::span<const T> buf, std::size_t layer) const {
    const Block& b = blocks_[layer];
    return ConstRowVectorView<T>(buf.data() + b.b_offset, Eigen::Index(b.out));
  }

 private:
  std::vector<Block> blocks_;
  std::size_t size_ = 0;
};

// Fills `params` with the initial weights for `spec` drawn from `seed`: He-normal
// (std sqrt(2/in)) before relu, Xavier-uniform (±sqrt(6/(in+out))) otherwise; zero biases.
template <class T>
void init_params(const ModelSpec& spec, const Layout& layout, std::uint64_t seed,
                 std::span<T> params);

}  // namespace shardprop
