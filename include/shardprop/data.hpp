// Data sets, their readers and writers, the epoch sampler and the per-rank shards.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "shardprop/params.hpp"
#include "shardprop/rng.hpp"
#include "shardprop/spec.hpp"

namespace shardprop {

// N samples of D features (row-major), with either integer class labels or float targets.
struct Dataset {
  std::size_t rows = 0;
  std::size_t cols = 0;
  // The features (rows × cols), held one of two ways: as floats in `features`, or (`coded`)
  // as one byte each in `codes`, a byte c standing for palette[c]. The readers code a set
  // whose values number 256 or fewer (8-bit pixels scaled to [0, 1]): the same bits in a
  // quarter of the memory. Read them through copy_row() or feature_values().
  AlignedVector<float> features;
  bool coded = false;
  std::vector<std::uint8_t> codes;
  std::array<float, 256> palette{};
  std::vector<std::int32_t> labels;   // rows, or empty when targets are given
  std::size_t target_cols = 0;
  AlignedVector<float> targets;       // rows × target_cols, or empty when labels are given
  // A partitioned set holds rows [first, first + rows) of a file of `total` rows (row i of
  // the vectors above is the file's row first + i); total is 0 when every row is held.
  std::size_t first = 0;
  std::size_t total = 0;
  // A streamed set holds no features: they stay in the file `source`, read as needed.
  bool streamed = false;
  std::string source;

  // Held row `row` (counted from `first`) as cols floats into out (RowCopier, for many).
  void copy_row(std::size_t row, float* out) const;
  // Every held feature as floats, whichever way they are held.
  AlignedVector<float> feature_values() const;
  bool has_labels() const { return !labels.empty(); }
  // The rows of the whole data set, held here or not.
  std::size_t global_rows() const { return total ? total : rows; }
  bool partitioned() const { return total != 0 && (first != 0 || rows != total); }
  // 1 + the largest label (0 without labels).
  std::size_t label_classes() const;
};

// Copies a data set's held rows as floats, widening coded ones; made once for many rows.
class RowCopier {
 public:
  explicit RowCopier(const Dataset& data);
  // Held row `row` (counted from data.first) as data.cols floats into out.
  void operator()(std::size_t row, float* out) const;

 private:
  const Dataset& data_;
  alignas(64) std::array<std::uint8_t, 1024> planes_{};  // byte p of palette[c] at 256·p + c
};

// Which rows of a file a rank reads: every row, or (partitioned) its block of them,
// shard_range(N, rank, size, chunk) of the file's N rows.
struct RowBlock {
  int rank = 0, size = 1;
  std::size_t chunk = 0;
};

// Reads an HDF5 data set: `features` (float, N×D) and `labels` (integer, N) or `targets`
// (float, N×K), all rows or, given `block`, one rank's block of them (in hyperslabs of a
// few MB). Throws naming the file, the dataset and the row on anything missing or
// malformed, including NaN or Inf features. With need_targets false, a file of features
// alone is accepted too (for prediction).
Dataset read_dataset(const std::string& path, bool need_targets = true,
                     std::optional<RowBlock> block = {});
// The same checks and shape, the labels or targets of every row, but no features: a data
// set to stream from its file (--data-placement streamed). Features are checked as they
// are read.
Dataset read_dataset_streamed(const std::string& path, bool need_targets = true);
// How a data file stores its features ("contiguous (row after row)", "in chunks of N
// rows" or "in chunks of R x C"), and the file's size in bytes.
struct DataLayout {
  std::string features;
  std::uintmax_t file_bytes = 0;
};
DataLayout data_layout(const std::string& path);
// Writes `features` (float32) and `labels` (int32) or `targets` (float32), each stored
// contiguously, row after row: a rank's block is one range of the file, and a sampled row
// (--data-placement streamed) is read from the file with no more than its own bytes.
void write_dataset(const std::string& path, const Dataset& data);

// Writes the predicted class of every sample and the model's outputs (N × K): HDF5
// (`predictions` int32, `outputs` float32) for a .h5 path, CSV for a .csv path.
void write_predictions(const std::string& path, std::span<const std::int32_t> predictions,
                       const AlignedVector<float>& outputs, std::size_t k);

// A predict run's output: the predicted class of each sample and the model's outputs.
struct Predictions {
  std::vector<std::int32_t> classes;
  AlignedVector<float> outputs;  // rows × k
  std::size_t k = 0;
};
// Reads what write_predictions wrote (HDF5 or CSV, by the name).
Predictions read_predictions(const std::string& path);
// Whether `path` holds predictions (an HDF5 file with `predictions`, or a CSV file whose
// header starts with "prediction").
bool is_predictions_file(const std::string& path);
// Checks that predictions may be written to `path` (flag `flag`): a .h5 or .csv name, an
// existing directory, and no file there but an earlier prediction. Throws UsageError.
void check_predictions_path(const std::string& flag, const std::string& path);

// Reads IDX image and label files (gzip or plain), as MNIST and Fashion-MNIST ship them;
// pixels are scaled to [0, 1].
Dataset read_idx(const std::string& images_path, const std::string& labels_path);
// Reads a CSV file of numbers; column `label_column` (0-based) holds integer class labels,
// every other column is a feature; without a label column every column is a feature. A first
// line that is not numeric is taken as a header.
Dataset read_csv(const std::string& path, std::optional<std::size_t> label_column);

// Checks that `data` fits `spec`: feature width, label range or target width (if any).
void check_fits(const Dataset& data, const ModelSpec& spec, const std::string& name);

// Copies the samples `indices` (rows of the whole data set, which a partitioned one must
// hold) into x (n × D) and their targets into y (n × K): one-hot rows for K ≥ 2 classes,
// the label itself for K = 1, or the stored target rows.
void gather(const Dataset& data, std::span<const std::uint32_t> indices, std::size_t k,
            float* x, float* y);
// Starts reading the held rows `indices` (as for gather) from memory into the cache, for a
// gather of them a little later.
void prefetch_rows(const Dataset& data, std::span<const std::uint32_t> indices);
// The targets alone, as gather() writes them into y (also of a streamed set, which holds
// every row's labels or targets).
void gather_targets(const Dataset& data, std::span<const std::uint32_t> indices, std::size_t k,
                    float* y);
// The target row of class `label` for k outputs: the label itself for k = 1, else one-hot.
void label_target(std::int32_t label, std::size_t k, float* target);

// The order of the training samples in epoch `epoch`: a permutation of [0, n) drawn from
// (seed, epoch) alone, so it is the same on every rank and for every rank count.
void epoch_permutation(std::size_t n, std::uint64_t seed, std::uint64_t epoch,
                       std::vector<std::uint32_t>& order);
// The generator that draws epoch `epoch`'s permutation, before its first draw.
Rng epoch_rng(std::uint64_t seed, std::uint64_t epoch);

// Rank `rank`'s contiguous slice [begin, end) of a global batch of `rows` samples split
// over `size` ranks; slices differ in length by at most one, and may be empty. With
// `chunk` > 0 (the deterministic mode) the batch's chunks of that many rows are dealt out
// in contiguous runs instead, so that slice edges fall on chunk edges.
struct Range {
  std::size_t begin = 0, end = 0;
  std::size_t size() const { return end - begin; }
};
Range shard_range(std::size_t rows, int rank, int size, std::size_t chunk = 0);
// With gradient accumulation a global batch of `rows` rows is cut into `micros`
// micro-batches, micro-batch m being shard_range(rows, m, micros, chunk) (on chunk edges),
// and each is sharded over the ranks as a minibatch is: rank `rank`'s part of micro-batch
// m, as positions in the global batch. One micro-batch is shard_range itself.
Range micro_shard(std::size_t rows, std::size_t m, std::size_t micros, int rank, int size,
                  std::size_t chunk = 0);
// The rows of all of rank `rank`'s micro-batch parts.
std::size_t micro_shard_rows(std::size_t rows, std::size_t micros, int rank, int size,
                             std::size_t chunk = 0);

}  // namespace shardprop
