// The IDX reader on arbitrary label and image files (plain or gzip): it returns a data set
// that matches its own header, or throws shardprop::Error; anything else is a bug.
#include <fuzzer/FuzzedDataProvider.h>

#include "fuzz_util.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  namespace sp = shardprop;
  static const std::string images = sp::fuzz::scratch("images.idx");
  static const std::string labels = sp::fuzz::scratch("labels.idx");
  FuzzedDataProvider in(data, size);
  const std::vector<std::uint8_t> label_bytes =
      in.ConsumeBytes<std::uint8_t>(in.ConsumeIntegralInRange<std::size_t>(0, 64));
  const std::vector<std::uint8_t> image_bytes = in.ConsumeRemainingBytes<std::uint8_t>();
  sp::fuzz::write_file(labels, label_bytes.data(), label_bytes.size());
  sp::fuzz::write_file(images, image_bytes.data(), image_bytes.size());
  try {
    const sp::Dataset d = sp::read_idx(images, labels);
    if (d.rows == 0 || d.cols == 0 || !d.coded || d.codes.size() != d.rows * d.cols ||
        d.feature_values().size() != d.rows * d.cols ||
        d.labels.size() != d.rows) {
      std::abort();
    }
  } catch (const sp::Error&) {
  }
  return 0;
}
