// Shared by the libFuzzer targets: a scratch file of this process's own.
#pragma once

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

namespace shardprop::fuzz {

// A path in the temporary directory, distinct per process and per `name`.
inline std::string scratch(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("shardprop_fuzz_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// Replaces `path` with the given bytes.
inline void write_file(const std::string& path, const std::uint8_t* data, std::size_t size) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size > 0 && std::fwrite(data, 1, size, f) != size) std::abort();
  if (std::fclose(f) != 0) std::abort();
}

}  // namespace shardprop::fuzz
