// Writes a small classification problem for the end-to-end tests: K Gaussian blobs in D
// dimensions, as train and test HDF5 files.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "shardprop/data.hpp"
#include "shardprop/rng.hpp"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: make_blobs TRAIN.h5 TEST.h5\n");
    return 2;
  }
  constexpr std::size_t kClasses = 4, kDims = 10;
  shardprop::Rng rng(2024);
  std::vector<float> centers(kClasses * kDims);
  for (auto& c : centers) c = float(2.0 * rng.normal());
  const auto make = [&](std::size_t rows) {
    shardprop::Dataset d;
    d.rows = rows;
    d.cols = kDims;
    for (std::size_t r = 0; r < rows; ++r) {
      const auto label = std::int32_t(rng.below(kClasses));
      d.labels.push_back(label);
      for (std::size_t c = 0; c < kDims; ++c) {
        d.features.push_back(centers[std::size_t(label) * kDims + c] + float(rng.normal()));
      }
    }
    return d;
  };
  try {
    shardprop::write_dataset(argv[1], make(2000));
    shardprop::write_dataset(argv[2], make(500));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_blobs: %s\n", e.what());
    return 1;
  }
  return 0;
}
