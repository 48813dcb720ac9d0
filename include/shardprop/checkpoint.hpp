// Model files in HDF5, readable without shardprop (see README.md, "Model files"):
//   root attributes  format = "shardprop-checkpoint", format_version, layers, loss, step, epoch
//   /params/layer_<i>/W  float32 (in, out)
//   /params/layer_<i>/b  float32 (out)
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "shardprop/params.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

inline constexpr const char* kCheckpointFormat = "shardprop-checkpoint";
inline constexpr std::int64_t kCheckpointVersion = 1;

struct ModelFile {
  ModelSpec spec;
  AlignedVector<float> params;  // in Layout(spec) order
  std::uint64_t step = 0, epoch = 0;
};

// Writes the model to `path` through a temporary file in the same directory that is
// flushed, fsynced and renamed into place, so `path` is never left half written.
void save_model(const std::string& path, const ModelSpec& spec, std::span<const float> params,
                std::uint64_t step, std::uint64_t epoch);

// Reads and checks a model file: format, version, architecture and every shape.
ModelFile load_model(const std::string& path);

// Whether `path` is an HDF5 file carrying the checkpoint format attribute.
bool is_model_file(const std::string& path);

}  // namespace shardprop
