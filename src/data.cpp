#include "shardprop/data.hpp"

#include <zlib.h>

#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <new>
#include <numeric>
#include <oneapi/tbb/blocked_range.h>
#include <oneapi/tbb/parallel_for.h>

#include "shardprop/error.hpp"
#include "fileio.hpp"
#include "h5.hpp"
#include "shardprop/rng.hpp"

namespace shardprop {

RowCopier::RowCopier(const Dataset& data) : data_(data) {
  if (!data.coded) return;
  for (std::size_t c = 0; c < 256; ++c) {
    const auto bits = std::bit_cast<std::uint32_t>(data.palette[c]);
    for (std::size_t p = 0; p < 4; ++p) planes_[256 * p + c] = std::uint8_t(bits >> (8 * p));
  }
}

void RowCopier::operator()(std::size_t row, float* out) const {
  const std::size_t cols = data_.cols;
  if (!data_.coded) {
    std::copy_n(data_.features.data() + row * cols, cols, out);
    return;
  }
  const std::uint8_t* in = data_.codes.data() + row * cols;
  std::size_t j = 0;
#if defined(__AVX512VBMI__) && defined(__AVX512BW__)
  // 64 values at a time: each of a float's four bytes looked up in its plane of the
  // palette (two byte permutes of 128 entries, bit 7 choosing), then interleaved. 128 rows
  // of 784 in cache: 6.0 µs, against 31 for the scalar loop below (and 5.5 for copying
  // floats); gather instructions were no faster than the scalar loop.
  if (cols >= 64) {
    __m512i plane[4][4];
    for (std::size_t p = 0; p < 4; ++p) {
      for (std::size_t q = 0; q < 4; ++q) {
        plane[p][q] = _mm512_load_si512(planes_.data() + 256 * p + 64 * q);
      }
    }
    for (; j + 64 <= cols; j += 64) {
      const __m512i code = _mm512_loadu_si512(in + j);
      const __mmask64 high = _mm512_movepi8_mask(code);
      __m512i byte[4];
      for (std::size_t p = 0; p < 4; ++p) {
        byte[p] = _mm512_mask_blend_epi8(high, _mm512_permutex2var_epi8(plane[p][0], code, plane[p][1]),
                                         _mm512_permutex2var_epi8(plane[p][2], code, plane[p][3]));
      }
      // Within each 128-bit lane k: d0 holds values 16k to 16k + 3, d1 the next four, ...
      const __m512i lo01 = _mm512_unpacklo_epi8(byte[0], byte[1]);
      const __m512i hi01 = _mm512_unpackhi_epi8(byte[0], byte[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(byte[2], byte[3]);
      const __m512i hi23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
      const __m512i d0 = _mm512_unpacklo_epi16(lo01, lo23), d1 = _mm512_unpackhi_epi16(lo01, lo23);
      const __m512i d2 = _mm512_unpacklo_epi16(hi01, hi23), d3 = _mm512_unpackhi_epi16(hi01, hi23);
      // ... so lane k of d0-d3 is values 16k to 16k + 15: a 4 x 4 transpose of lanes.
      const __m512i t0 = _mm512_shuffle_i32x4(d0, d1, 0x44), t1 = _mm512_shuffle_i32x4(d2, d3, 0x44);
      const __m512i t2 = _mm512_shuffle_i32x4(d0, d1, 0xEE), t3 = _mm512_shuffle_i32x4(d2, d3, 0xEE);
      _mm512_storeu_si512(out + j, _mm512_shuffle_i32x4(t0, t1, 0x88));
      _mm512_storeu_si512(out + j + 16, _mm512_shuffle_i32x4(t0, t1, 0xDD));
      _mm512_storeu_si512(out + j + 32, _mm512_shuffle_i32x4(t2, t3, 0x88));
      _mm512_storeu_si512(out + j + 48, _mm512_shuffle_i32x4(t2, t3, 0xDD));
    }
  }
#endif
  for (; j < cols; ++j) out[j] = data_.palette[in[j]];
}

void Dataset::copy_row(std::size_t row, float* out) const { RowCopier(*this)(row, out); }

AlignedVector<float> Dataset::feature_values() const {
  if (!coded) return features;
  AlignedVector<float> values(rows * cols);
  const RowCopier copy(*this);
  for (std::size_t r = 0; r < rows; ++r) copy(r, values.data() + r * cols);
  return values;
}

std::size_t Dataset::label_classes() const {
  if (labels.empty()) return 0;
  return std::size_t(*std::max_element(labels.begin(), labels.end())) + 1;
}

namespace {

// Rows are numbered from `first` (a partition's first row in the file).
void check_finite(std::span<const float> values, std::size_t cols, std::size_t first,
                  const std::string& what) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    SP_CHECK(std::isfinite(values[i]), what, ": non-finite value ", values[i], " at row ",
             first + i / cols, ", column ", i % cols);
  }
}

// Gives feature values one-byte codes, first come first coded, while they number 256 or
// fewer; values are told apart by their bits (0 and -0 are two).
class Coder {
 public:
  Coder() { slots_.fill(kEmpty); }
  // Codes in[0, n) into out; false once a 257th value appears (out is then partly written).
  bool code(const float* in, std::size_t n, std::uint8_t* out) {
    for (std::size_t i = 0; i < n; ++i) {
      const auto bits = std::bit_cast<std::uint32_t>(in[i]);
      std::size_t s = (bits * 2654435761u) >> (32 - kLogSlots);
      while (slots_[s] != kEmpty && keys_[s] != bits) s = (s + 1) & (kSlots - 1);
      if (slots_[s] == kEmpty) {
        if (count_ == 256) return false;
        keys_[s] = bits;
        slots_[s] = std::uint16_t(count_);
        palette_[count_++] = in[i];
      }
      out[i] = std::uint8_t(slots_[s]);
    }
    return true;
  }
  const std::array<float, 256>& palette() const { return palette_; }

 private:
  static constexpr int kLogSlots = 10;  // 1024 slots for at most 256 values
  static constexpr std::size_t kSlots = std::size_t(1) << kLogSlots;
  static constexpr std::uint16_t kEmpty = 0xffff;
  std::array<std::uint32_t, kSlots> keys_{};
  std::array<std::uint16_t, kSlots> slots_{};
  std::array<float, 256> palette_{};
  std::size_t count_ = 0;
};

// Reads the features of `data`'s rows from `features` (a 2-D float dataset of `dims`), a
// few MB at a time, checked finite as they come: coded while their values number 256 or
// fewer, else as floats (the rows coded so far widened). Peak memory is the held features
// and one piece.
void read_features(hid_t features, const std::vector<hsize_t>& dims, Dataset& data,
                   const std::string& what) {
  const std::size_t cols = data.cols;
  const auto hold = [&](auto& values) {
    try {
      values.resize(data.rows * cols);
    } catch (const std::bad_alloc&) {
      SP_THROW(what, ": not enough memory for its ", data.rows, " × ", cols, " features (",
               data.rows * cols * sizeof(values[0]) >> 20,
               " MB); --data-placement streamed reads them as needed");
    }
  };
  const std::size_t piece = std::max<std::size_t>(1, (std::size_t(4) << 20) / (cols * sizeof(float)));
  Coder coder;
  data.coded = true;
  hold(data.codes);
  AlignedVector<float> buffer(std::min(piece, data.rows) * cols);
  for (std::size_t done = 0; done < data.rows;) {
    const std::size_t n = std::min(piece, data.rows - done);
    float* into = data.coded ? buffer.data() : data.features.data() + done * cols;
    h5::read_rows(features, H5T_NATIVE_FLOAT, dims, data.first + done, n, into,
                  "reading " + what);
    check_finite(std::span<const float>(into, n * cols), cols, data.first + done, what);
    if (data.coded && !coder.code(into, n * cols, data.codes.data() + done * cols)) {
      // A 257th value: the rows so far become floats, and the rest are read as floats.
      data.palette = coder.palette();
      hold(data.features);
      const RowCopier widen(data);
      for (std::size_t r = 0; r < done; ++r) widen(r, data.features.data() + r * cols);
      std::copy_n(into, n * cols, data.features.data() + done * cols);
      data.coded = false;
      data.codes = {};
      data.palette = {};
    }
    done += n;
  }
  if (data.coded) data.palette = coder.palette();
}

}  // namespace

namespace {

Dataset read_data(const std::string& path, bool need_targets, std::optional<RowBlock> block,
                  bool features_too) {
  h5::Handle file = h5::open_file(path);
  Dataset data;
  data.source = path;
  data.streamed = !features_too;
  {
    h5::Handle features = h5::open_dataset(file.get(), "features", path);
    const std::string what = path + ": dataset 'features'";
    const auto info = h5::dataset_info(features.get(), what);
    SP_CHECK(info.type_class == H5T_FLOAT, what, " must hold floats");
    SP_CHECK(info.dims.size() == 2, what, " must be 2-D (samples × features), it is ",
             info.dims.size(), "-D");
    SP_CHECK(info.dims[0] > 0, what, " has no samples (N = 0)");
    SP_CHECK(info.dims[1] > 0, what, " has no feature columns");
    const std::size_t n = info.dims[0];
    if (block) {
      const Range mine = shard_range(n, block->rank, block->size, block->chunk);
      data.first = mine.begin;
      data.rows = mine.size();
      data.total = n;
    } else {
      data.rows = n;
    }
    data.cols = info.dims[1];
    if (features_too) read_features(features.get(), info.dims, data, what);
  }
  const std::size_t n = data.global_rows();
  const bool has_labels = h5::has_link(file.get(), "labels");
  const bool has_targets = h5::has_link(file.get(), "targets");
  SP_CHECK(has_labels || has_targets || !need_targets, path,
           ": no dataset 'labels' (or 'targets')");
  if (!has_labels && !has_targets) return data;
  if (has_labels) {
    h5::Handle labels = h5::open_dataset(file.get(), "labels", path);
    const std::string what = path + ": dataset 'labels'";
    const auto info = h5::dataset_info(labels.get(), what);
    SP_CHECK(info.type_class == H5T_INTEGER, what, " must hold integers");
    SP_CHECK(info.dims.size() == 1, what, " must be 1-D, it is ", info.dims.size(), "-D");
    SP_CHECK(info.dims[0] == n, what, " has ", info.dims[0], " entries, 'features' has ", n,
             " rows");
    data.labels.resize(data.rows);
    h5::read_rows(labels.get(), H5T_NATIVE_INT32, info.dims, data.first, data.rows,
                  data.labels.data(), "reading " + what);
    const auto bad = std::find_if(data.labels.begin(), data.labels.end(),
                                  [](std::int32_t l) { return l < 0; });
    SP_CHECK(bad == data.labels.end(), what, ": negative label ", bad == data.labels.end() ? 0 : *bad,
             " at row ", std::size_t(bad - data.labels.begin()) + data.first);
  } else {
    h5::Handle targets = h5::open_dataset(file.get(), "targets", path);
    const std::string what = path + ": dataset 'targets'";
    const auto info = h5::dataset_info(targets.get(), what);
    SP_CHECK(info.type_class == H5T_FLOAT, what, " must hold floats");
    SP_CHECK(info.dims.size() == 2 && info.dims[0] == n && info.dims[1] > 0, what, " must be ",
             n, " × K");
    data.target_cols = info.dims[1];
    data.targets.resize(data.rows * data.target_cols);
    h5::read_rows(targets.get(), H5T_NATIVE_FLOAT, info.dims, data.first, data.rows,
                  data.targets.data(), "reading " + what);
    check_finite(data.targets, data.target_cols, data.first, what);
  }
  return data;
}

}  // namespace

Dataset read_dataset(const std::string& path, bool need_targets, std::optional<RowBlock> block) {
  return read_data(path, need_targets, block, true);
}

Dataset read_dataset_streamed(const std::string& path, bool need_targets) {
  return read_data(path, need_targets, std::nullopt, false);
}

DataLayout data_layout(const std::string& path) {
  h5::Handle file = h5::open_file(path);
  h5::Handle features = h5::open_dataset(file.get(), "features", path);
  const std::vector<hsize_t> chunk = h5::chunk_dims(features.get(), path + ": dataset 'features'");
  DataLayout layout;
  if (chunk.empty()) {
    layout.features = "contiguous (row after row)";
  } else if (chunk.size() == 2 && chunk[1] ==
             h5::dataset_info(features.get(), path + ": dataset 'features'").dims[1]) {
    layout.features = detail::concat("in chunks of ", chunk[0], chunk[0] == 1 ? " row" : " rows");
  } else {
    layout.features = "in chunks of " + std::to_string(chunk[0]) + " x " +
                      std::to_string(chunk.size() > 1 ? chunk[1] : 1);
  }
  std::error_code error;
  layout.file_bytes = std::filesystem::file_size(path, error);
  SP_CHECK(!error, path, ": ", error.message());
  return layout;
}

void write_dataset(const std::string& path, const Dataset& data) {
  h5::Handle file = h5::create_file(path);
  if (data.coded) {
    // Widened a piece at a time: never the whole set as floats.
    const RowCopier copy(data);
    h5::write_float_rows(file.get(), "features", H5T_IEEE_F32LE, {data.rows, data.cols},
                         [&](hsize_t first, hsize_t count, float* out) {
                           for (hsize_t r = 0; r < count; ++r) copy(first + r, out + r * data.cols);
                         });
  } else {
    h5::write_dataset(file.get(), "features", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT,
                      {data.rows, data.cols}, data.features.data());
  }
  if (data.has_labels()) {
    h5::write_dataset(file.get(), "labels", H5T_STD_I32LE, H5T_NATIVE_INT32, {data.rows},
                      data.labels.data());
  } else if (data.target_cols > 0) {
    h5::write_dataset(file.get(), "targets", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT,
                      {data.rows, data.target_cols}, data.targets.data());
  }
  h5::store(file, path);
}

void write_predictions(const std::string& path, std::span<const std::int32_t> predictions,
                       const AlignedVector<float>& outputs, std::size_t k) {
  const std::size_t n = predictions.size();
  SP_CHECK(outputs.size() == n * k, "predictions: ", outputs.size(), " outputs for ", n,
           " samples of ", k);
  if (path.ends_with(".h5") || path.ends_with(".hdf5")) {
    h5::Handle file = h5::create_file(path);
    h5::write_dataset(file.get(), "predictions", H5T_STD_I32LE, H5T_NATIVE_INT32, {n},
                      predictions.data());
    h5::write_dataset(file.get(), "outputs", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {n, k},
                      outputs.data());
    h5::store(file, path);
    return;
  }
  SP_CHECK(path.ends_with(".csv"), "--out ", path, ": name a .h5 or .csv file");
  std::ofstream out(path, std::ios::trunc);
  SP_CHECK(out, "--out ", path, ": cannot write");
  out << "prediction";
  for (std::size_t j = 0; j < k; ++j) out << ",output_" << j;
  out << '\n';
  char text[32];
  for (std::size_t i = 0; i < n; ++i) {
    out << predictions[i];
    for (std::size_t j = 0; j < k; ++j) {
      std::snprintf(text, sizeof text, ",%.9g", double(outputs[i * k + j]));
      out << text;
    }
    out << '\n';
  }
  out.close();
  SP_CHECK(out, "--out ", path, ": writing failed");
}

bool is_predictions_file(const std::string& path) {
  if (path.ends_with(".csv")) {
    std::ifstream in(path);
    std::string header;
    return std::getline(in, header) && header.rfind("prediction", 0) == 0;
  }
  h5::Handle file = h5::open_file(path);
  return h5::has_link(file.get(), "predictions");
}

void check_predictions_path(const std::string& flag, const std::string& path) {
  SP_CHECK_USAGE(path.ends_with(".h5") || path.ends_with(".hdf5") || path.ends_with(".csv"), flag,
                 " ", path, ": name a .h5 or .csv file");
  fileio::check_replaceable(flag, path, [&] { return is_predictions_file(path); });
}

Predictions read_predictions(const std::string& path) {
  Predictions p;
  if (path.ends_with(".csv")) {
    SP_CHECK(is_predictions_file(path), path, ": not a predictions file (its header does not "
             "start with 'prediction')");
    const Dataset table = read_csv(path, 0);
    p.k = table.cols;
    p.classes = table.labels;
    p.outputs = table.features;
    return p;
  }
  h5::Handle file = h5::open_file(path);
  h5::Handle classes = h5::open_dataset(file.get(), "predictions", path);
  h5::Handle outputs = h5::open_dataset(file.get(), "outputs", path);
  const auto ci = h5::dataset_info(classes.get(), path + ": dataset 'predictions'");
  const auto oi = h5::dataset_info(outputs.get(), path + ": dataset 'outputs'");
  SP_CHECK(ci.type_class == H5T_INTEGER && ci.dims.size() == 1 && oi.type_class == H5T_FLOAT &&
               oi.dims.size() == 2 && oi.dims[0] == ci.dims[0],
           path, ": 'predictions' (N) and 'outputs' (N x K) do not fit together");
  p.k = oi.dims[1];
  p.classes.resize(ci.dims[0]);
  p.outputs.resize(ci.dims[0] * p.k);
  h5::read_all(classes.get(), H5T_NATIVE_INT32, p.classes.data(), path + ": reading 'predictions'");
  h5::read_all(outputs.get(), H5T_NATIVE_FLOAT, p.outputs.data(), path + ": reading 'outputs'");
  return p;
}

namespace {

struct GzCloser {
  void operator()(gzFile f) const { gzclose(f); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

// Reads an IDX file (gzip or plain): its dimensions and unsigned-byte payload.
std::vector<std::uint8_t> read_idx_file(const std::string& path, int want_dims,
                                        std::vector<std::uint32_t>& dims) {
  GzFile file(gzopen(path.c_str(), "rb"));
  SP_CHECK(file, path, ": cannot open");
  unsigned char header[4];
  SP_CHECK(gzread(file.get(), header, 4) == 4, path, ": too short for an IDX header");
  SP_CHECK(header[0] == 0 && header[1] == 0 && header[2] == 0x08, path,
           ": not an unsigned-byte IDX file (bad magic number)");
  SP_CHECK(header[3] == want_dims, path, ": IDX file has ", int(header[3]), " dimensions, expected ",
           want_dims);
  dims.assign(std::size_t(want_dims), 0);
  std::size_t total = 1;
  for (auto& d : dims) {
    unsigned char b[4];
    SP_CHECK(gzread(file.get(), b, 4) == 4, path, ": truncated IDX header");
    d = (std::uint32_t(b[0]) << 24) | (std::uint32_t(b[1]) << 16) | (std::uint32_t(b[2]) << 8) | b[3];
    SP_CHECK(d > 0 && total <= (std::size_t{1} << 34) / d, path, ": implausible IDX dimension ", d);
    total *= d;
  }
  // The buffer grows with the data actually read, so a short file that claims a huge
  // size fails as truncated instead of allocating what its header claims.
  std::vector<std::uint8_t> payload;
  std::size_t done = 0;
  while (done < total) {
    const std::size_t chunk = std::min<std::size_t>(total - done, std::size_t{1} << 24);
    payload.resize(done + chunk);
    const int got = gzread(file.get(), payload.data() + done, unsigned(chunk));
    SP_CHECK(got > 0, path, ": truncated IDX data (", done, " of ", total, " bytes)");
    done += std::size_t(got);
    payload.resize(done);
  }
  return payload;
}

}  // namespace

Dataset read_idx(const std::string& images_path, const std::string& labels_path) {
  std::vector<std::uint32_t> image_dims, label_dims;
  auto pixels = read_idx_file(images_path, 3, image_dims);
  const auto labels = read_idx_file(labels_path, 1, label_dims);
  SP_CHECK(image_dims[0] == label_dims[0], images_path, " has ", image_dims[0], " images but ",
           labels_path, " has ", label_dims[0], " labels");
  Dataset data;
  data.rows = image_dims[0];
  data.cols = std::size_t(image_dims[1]) * image_dims[2];
  // Each pixel p stands for p / 255.
  data.coded = true;
  data.codes = std::move(pixels);
  for (std::size_t p = 0; p < data.palette.size(); ++p) data.palette[p] = float(p) / 255.0f;
  data.labels.assign(labels.begin(), labels.end());
  return data;
}

namespace {

bool parse_number(std::string_view field, float& value) {
  while (!field.empty() && (field.front() == ' ' || field.front() == '\t')) field.remove_prefix(1);
  while (!field.empty() && (field.back() == ' ' || field.back() == '\t' || field.back() == '\r')) {
    field.remove_suffix(1);
  }
  if (!field.empty() && field.front() == '+') field.remove_prefix(1);
  const auto [end, ec] = std::from_chars(field.data(), field.data() + field.size(), value);
  return ec == std::errc() && end == field.data() + field.size() && !field.empty();
}

}  // namespace

Dataset read_csv(const std::string& path, std::optional<std::size_t> label_column) {
  std::ifstream in(path);
  SP_CHECK(in, path, ": cannot open");
  Dataset data;
  std::string line;
  std::vector<float> row;
  std::size_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line == "\r") continue;
    row.clear();
    bool numeric = true;
    std::size_t start = 0;
    while (true) {
      const std::size_t comma = line.find(',', start);
      float value = 0;
      numeric = numeric && parse_number(std::string_view(line).substr(start, comma - start), value);
      row.push_back(value);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
    if (!numeric) {
      SP_CHECK(line_no == 1 && data.rows == 0, path, ":", line_no, ": not a number in '", line,
               "'");
      continue;  // header
    }
    const std::size_t labelled = label_column ? 1 : 0;
    if (data.rows == 0) {
      SP_CHECK_USAGE(!label_column || *label_column < row.size(), "--label-column ",
                     *label_column, " is out of range: ", path, " has ", row.size(), " columns");
      SP_CHECK(row.size() >= 1 + labelled, path, ": needs ",
               label_column ? "a label column and " : "", "at least one feature");
      data.cols = row.size() - labelled;
    }
    SP_CHECK(row.size() == data.cols + labelled, path, ":", line_no, ": ", row.size(),
             " columns, expected ", data.cols + labelled);
    if (label_column) {
      const float label = row[*label_column];
      SP_CHECK(label >= 0 && label == std::floor(label) && label < 2147483648.0f, path, ":",
               line_no, ": label ", label, " is not a non-negative integer");
      data.labels.push_back(std::int32_t(label));
    }
    for (std::size_t c = 0; c < row.size(); ++c) {
      if (!label_column || c != *label_column) data.features.push_back(row[c]);
    }
    ++data.rows;
  }
  SP_CHECK(data.rows > 0, path, ": no data rows");
  check_finite(data.features, data.cols, 0, path);
  return data;
}

void check_fits(const Dataset& data, const ModelSpec& spec, const std::string& name) {
  SP_CHECK(data.cols == spec.input_width(), name, ": ", data.cols,
           " features per sample, but the model (--layers ", spec.layers_string(), ") takes ",
           spec.input_width());
  const std::size_t k = spec.output_width();
  if (data.has_labels()) {
    const std::size_t classes = k == 1 ? 2 : k;
    const auto bad = std::find_if(data.labels.begin(), data.labels.end(), [&](std::int32_t l) {
      return std::size_t(l) >= classes;
    });
    SP_CHECK(bad == data.labels.end(), name, ": label ", *bad, " at row ",
             std::size_t(bad - data.labels.begin()) + data.first, " is outside [0, ", classes,
             ") for ", k,
             " output", k == 1 ? "" : "s");
  } else if (data.target_cols > 0) {
    SP_CHECK(data.target_cols == k, name, ": targets have ", data.target_cols,
             " columns, the output layer has ", k);
  }
}

namespace {

// Where the file's row `index` is in a data set that holds rows [first, first + rows).
std::size_t held_row(const Dataset& data, std::uint32_t index) {
  const std::size_t row = index - data.first;
  SP_CHECK(index >= data.first && row < data.rows, "row ", index,
           " is not among the rows this rank holds [", data.first, ", ",
           data.first + data.rows, ")");
  return row;
}

}  // namespace

void label_target(std::int32_t label, std::size_t k, float* target) {
  if (k == 1) {
    target[0] = float(label);
    return;
  }
  std::fill_n(target, k, 0.0f);
  target[label] = 1.0f;
}

void gather_targets(const Dataset& data, std::span<const std::uint32_t> indices, std::size_t k,
                    float* y) {
  for (std::size_t i = 0; i < indices.size(); ++i) {
    const std::size_t row = held_row(data, indices[i]);
    if (data.has_labels()) {
      label_target(data.labels[row], k, y + i * k);
    } else {
      std::copy_n(data.targets.data() + row * k, k, y + i * k);
    }
  }
}

void prefetch_rows(const Dataset& data, std::span<const std::uint32_t> indices) {
  if (data.streamed) return;
  const std::size_t bytes = data.cols * (data.coded ? 1 : sizeof(float));
  for (const std::uint32_t index : indices) {
    const std::size_t row = held_row(data, index);
    const char* begin = data.coded ? reinterpret_cast<const char*>(data.codes.data() + row * data.cols)
                                   : reinterpret_cast<const char*>(data.features.data() + row * data.cols);
    for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(begin + b);
  }
}

void gather(const Dataset& data, std::span<const std::uint32_t> indices, std::size_t k,
            float* x, float* y) {
  SP_CHECK(!data.streamed, data.source, ": a streamed data set holds no rows to copy");
  const RowCopier copy_row(data);
  const auto copy = [&](std::size_t begin, std::size_t end) {
    for (std::size_t i = begin; i < end; ++i) {
      copy_row(held_row(data, indices[i]), x + i * data.cols);
    }
    gather_targets(data, indices.subspan(begin, end - begin), k, y + begin * k);
  };
  // The rows lie far apart in memory: copying parts of them on every thread keeps more in
  // flight (a step's 128 rows took 67 µs on one thread of two, 52-55 µs on both).
  constexpr std::size_t kRows = 32;
  if (indices.size() <= kRows) return copy(0, indices.size());
  oneapi::tbb::parallel_for(oneapi::tbb::blocked_range<std::size_t>(0, indices.size(), kRows),
                            [&](const oneapi::tbb::blocked_range<std::size_t>& r) {
                              copy(r.begin(), r.end());
                            });
}

void epoch_permutation(std::size_t n, std::uint64_t seed, std::uint64_t epoch,
                       std::vector<std::uint32_t>& order) {
  SP_CHECK(n <= std::size_t(UINT32_MAX), "data set of ", n, " samples is too large");
  order.resize(n);
  std::iota(order.begin(), order.end(), 0u);
  Rng rng = epoch_rng(seed, epoch);
  for (std::size_t i = n; i > 1; --i) std::swap(order[i - 1], order[rng.below(i)]);
}

Rng epoch_rng(std::uint64_t seed, std::uint64_t epoch) {
  return Rng(mix64(seed) ^ mix64(epoch + 0x5eed));
}

Range shard_range(std::size_t rows, int rank, int size, std::size_t chunk) {
  const auto r = std::size_t(rank), p = std::size_t(size);
  if (chunk == 0) return {rows * r / p, rows * (r + 1) / p};
  const Range chunks = shard_range((rows + chunk - 1) / chunk, rank, size);
  return {std::min(rows, chunks.begin * chunk), std::min(rows, chunks.end * chunk)};
}

Range micro_shard(std::size_t rows, std::size_t m, std::size_t micros, int rank, int size,
                  std::size_t chunk) {
  const Range micro = shard_range(rows, int(m), int(micros), chunk);
  const Range part = shard_range(micro.size(), rank, size, chunk);
  return {micro.begin + part.begin, micro.begin + part.end};
}

std::size_t micro_shard_rows(std::size_t rows, std::size_t micros, int rank, int size,
                             std::size_t chunk) {
  std::size_t total = 0;
  for (std::size_t m = 0; m < micros; ++m) {
    total += micro_shard(rows, m, micros, rank, size, chunk).size();
  }
  return total;
}

}  // namespace shardprop
