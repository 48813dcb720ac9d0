// The CSV reader on arbitrary text, with the label in column 0 or 1 or without labels: a
// data set of consistent shape with finite features, or shardprop::Error.
#include <cmath>
#include <optional>

#include "fuzz_util.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace sp = shardprop;
  static const std::string path = sp::fuzz::scratch("data.csv");
  if (size == 0) return 0;
  const std::optional<std::size_t> label_column =
      data[0] % 3 == 2 ? std::nullopt : std::optional<std::size_t>(data[0] % 3);
  sp::fuzz::write_file(path, data + 1, size - 1);
  try {
    const sp::Dataset d = sp::read_csv(path, label_column);
    if (d.rows == 0 || d.features.size() != d.rows * d.cols ||
        d.labels.size() != (label_column ? d.rows : 0)) {
      std::abort();
    }
    for (float x : d.features) {
      if (!std::isfinite(x)) std::abort();
    }
    for (std::int32_t label : d.labels) {
      if (label < 0) std::abort();
    }
  } catch (const sp::Error&) {
  }
  return 0;
}
