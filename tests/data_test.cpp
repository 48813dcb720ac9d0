#include "shardprop/data.hpp"

#include <gtest/gtest.h>
#include <zlib.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "shardprop/error.hpp"
#include "test_util.hpp"

namespace shardprop {
namespace {

namespace fs = std::filesystem;
using testing::expect_error;

class DataTest : public testing::TempDirTest {
 protected:
  // Writes an unsigned-byte IDX file with the given dimensions, gzip'd or plain.
  void write_idx(const std::string& file, const std::vector<std::uint32_t>& dims,
                 const std::vector<std::uint8_t>& payload, bool gz) {
    std::vector<std::uint8_t> bytes{0, 0, 0x08, std::uint8_t(dims.size())};
    for (std::uint32_t d : dims) {
      for (int shift = 24; shift >= 0; shift -= 8) bytes.push_back(std::uint8_t(d >> shift));
    }
    bytes.insert(bytes.end(), payload.begin(), payload.end());
    if (gz) {
      gzFile f = gzopen(file.c_str(), "wb");
      ASSERT_NE(f, nullptr);
      ASSERT_EQ(gzwrite(f, bytes.data(), unsigned(bytes.size())), int(bytes.size()));
      ASSERT_EQ(gzclose(f), Z_OK);
    } else {
      std::ofstream(file, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                                  std::streamsize(bytes.size()));
    }
  }

};

TEST_F(DataTest, IdxGzipAndPlainReadAlikeWithPixelsScaled) {
  std::vector<std::uint8_t> pixels(3 * 2 * 2);
  for (std::size_t i = 0; i < pixels.size(); ++i) pixels[i] = std::uint8_t(i * 20);
  pixels[5] = 255;
  for (bool gz : {true, false}) {
    const std::string images = path(gz ? "i.gz" : "i"), labels = path(gz ? "l.gz" : "l");
    write_idx(images, {3, 2, 2}, pixels, gz);
    write_idx(labels, {3}, {7, 0, 9}, gz);
    const Dataset d = read_idx(images, labels);
    EXPECT_EQ(d.rows, 3u);
    EXPECT_EQ(d.cols, 4u);
    EXPECT_TRUE(d.coded);  // a byte per pixel, as the file has them
    const AlignedVector<float> values = d.feature_values();
    EXPECT_FLOAT_EQ(values[1], 20.0f / 255.0f);
    EXPECT_EQ(values[5], 1.0f);
    // As `convert` writes it: floats in the file, held as bytes again with the same bits.
    write_dataset(path("c.h5"), d);
    const Dataset r = read_dataset(path("c.h5"));
    EXPECT_TRUE(r.coded);
    EXPECT_TRUE(testing::same_bits(r.feature_values(), values));
    EXPECT_EQ(d.labels, (std::vector<std::int32_t>{7, 0, 9}));
  }
}

TEST_F(DataTest, IdxErrorsNameTheFile) {
  write_idx(path("i"), {3, 2, 2}, std::vector<std::uint8_t>(12), false);
  write_idx(path("l"), {2}, {1, 2}, false);
  write_idx(path("short"), {3, 2, 2}, std::vector<std::uint8_t>(5), false);
  expect_error([&] { read_idx(path("i"), path("l")); }, "has 3 images but");
  expect_error([&] { read_idx(path("short"), path("l")); }, "truncated IDX data");
  expect_error([&] { read_idx(path("l"), path("l")); }, "has 1 dimensions, expected 3");
  expect_error([&] { read_idx(path("missing"), path("l")); }, "missing: cannot open");
}

TEST_F(DataTest, CsvWithHeaderAndLabelColumn) {
  std::ofstream(path("d.csv")) << "a,label,b\n0.5,1,2\n-1e-3,0,4.25\n\n3,2,1\r\n";
  const Dataset d = read_csv(path("d.csv"), 1);
  EXPECT_EQ(d.rows, 3u);
  EXPECT_EQ(d.cols, 2u);
  EXPECT_EQ(d.labels, (std::vector<std::int32_t>{1, 0, 2}));
  EXPECT_EQ(std::vector<float>(d.features.begin(), d.features.end()),
            (std::vector<float>{0.5f, 2.f, -1e-3f, 4.25f, 3.f, 1.f}));
  std::ofstream(path("bad.csv")) << "1,2\n3,x\n";
  expect_error([&] { read_csv(path("bad.csv"), 0); }, "bad.csv:2: not a number");
  std::ofstream(path("ragged.csv")) << "1,2,3\n3,4\n";
  expect_error([&] { read_csv(path("ragged.csv"), 0); }, "ragged.csv:2: 2 columns, expected 3");
  std::ofstream(path("frac.csv")) << "1.5,2\n";
  expect_error([&] { read_csv(path("frac.csv"), 0); }, "label 1.5 is not a non-negative integer");
  expect_error([&] { read_csv(path("d.csv"), 3); }, "--label-column 3 is out of range");
  std::ofstream(path("nan.csv")) << "1,nan\n";
  expect_error([&] { read_csv(path("nan.csv"), 0); }, "non-finite value");
}

TEST_F(DataTest, Hdf5RoundTripAndValidation) {
  Dataset d;
  d.rows = 4;
  d.cols = 3;
  for (int i = 0; i < 12; ++i) d.features.push_back(float(i) / 7);
  d.labels = {0, 2, 1, 2};
  write_dataset(path("d.h5"), d);
  const Dataset r = read_dataset(path("d.h5"));
  EXPECT_EQ(r.rows, 4u);
  EXPECT_EQ(r.cols, 3u);
  EXPECT_EQ(r.feature_values(), d.features);
  EXPECT_EQ(r.labels, d.labels);
  EXPECT_EQ(r.label_classes(), 3u);
  check_fits(r, parse_model("3,3", "xent"), "d.h5");
  expect_error([&] { check_fits(r, parse_model("3,2", "xent"), "d.h5"); },
               "d.h5: label 2 at row 1 is outside [0, 2)");
  expect_error([&] { check_fits(r, parse_model("4,3", "xent"), "d.h5"); },
               "3 features per sample, but the model (--layers 4,3:softmax) takes 4");

  expect_error([&] { read_dataset(path("nope.h5")); }, "nope.h5: no such file");
  std::ofstream(path("text.h5")) << "not hdf5";
  expect_error([&] { read_dataset(path("text.h5")); }, "text.h5: not an HDF5 file");
  d.features[4] = std::numeric_limits<float>::quiet_NaN();
  write_dataset(path("nan.h5"), d);
  expect_error([&] { read_dataset(path("nan.h5")); }, "non-finite value nan at row 1, column 1");
}

// Each rank's block of a file is exactly those rows of the whole set (hyperslab reads of a
// few MB: the 70,000-row features below take several), and errors name the file's row.
TEST_F(DataTest, BlocksAreTheRowsOfTheWholeSetAndErrorsNameTheFilesRow) {
  Dataset d = testing::noisy_classes(70001, 31, 7, 1.0);
  write_dataset(path("d.h5"), d);
  const Dataset whole = read_dataset(path("d.h5"));
  EXPECT_FALSE(whole.partitioned());
  for (const auto& [size, chunk] : {std::pair{1, 0}, {2, 0}, {3, 0}, {5, 64}, {4, 50000}}) {
    std::size_t held = 0;
    for (int rank = 0; rank < size; ++rank) {
      const Dataset part = read_dataset(path("d.h5"), true, RowBlock{rank, size, std::size_t(chunk)});
      const Range mine = shard_range(whole.rows, rank, size, std::size_t(chunk));
      EXPECT_EQ(part.first, mine.begin);
      ASSERT_EQ(part.rows, mine.size());
      EXPECT_EQ(part.global_rows(), whole.rows);
      EXPECT_EQ(part.partitioned(), size > 1 && mine.size() != whole.rows);
      EXPECT_TRUE(std::equal(part.features.begin(), part.features.end(),
                             whole.features.begin() + std::ptrdiff_t(mine.begin * whole.cols)));
      EXPECT_TRUE(std::equal(part.labels.begin(), part.labels.end(),
                             whole.labels.begin() + std::ptrdiff_t(mine.begin)));
      held += part.rows;
    }
    EXPECT_EQ(held, whole.rows) << size << " ranks";
  }
  // A bad value in the second rank's block is reported by its row in the file.
  d.features[60000 * 31 + 4] = std::numeric_limits<float>::infinity();
  d.labels[50000] = 9;
  write_dataset(path("bad.h5"), d);
  expect_error([&] { read_dataset(path("bad.h5"), true, RowBlock{1, 2, 0}); },
               "non-finite value inf at row 60000, column 4");
  d.features[60000 * 31 + 4] = 0;
  write_dataset(path("bad.h5"), d);
  EXPECT_NO_THROW(check_fits(read_dataset(path("bad.h5"), true, RowBlock{0, 2, 0}),
                             parse_model("31,7", "xent"), "bad.h5"));
  expect_error([&] {
    check_fits(read_dataset(path("bad.h5"), true, RowBlock{1, 2, 0}), parse_model("31,7", "xent"),
               "bad.h5");
  }, "bad.h5: label 9 at row 50000 is outside [0, 7)");
  // gather takes the file's row numbers and refuses rows the rank does not hold.
  const Dataset second = read_dataset(path("d.h5"), true, RowBlock{1, 2, 0});
  std::vector<float> x(31), y(7);
  const std::uint32_t held_row = 35001, other_row = 5;
  gather(second, std::span(&held_row, 1), 7, x.data(), y.data());
  EXPECT_TRUE(std::equal(x.begin(), x.end(), whole.features.begin() + 35001 * 31));
  expect_error([&] { gather(second, std::span(&other_row, 1), 7, x.data(), y.data()); },
               "row 5 is not among the rows this rank holds [35000, 70001)");
}

// Features of 256 values or fewer are held as a byte each, whether the file is read whole
// or by blocks, and come back as the very bits written (0 and -0 apart), in whole vectors
// of 64 and in the rest of a row of 500. A 257th value, in the first piece read or a later
// one (pieces of 4 MB: 2,097 rows of 500 here), makes them floats with the same bits.
TEST_F(DataTest, FeaturesOf256ValuesAreHeldAsBytesWithTheirBits) {
  Dataset d;
  d.rows = 3000;
  d.cols = 500;
  Rng rng(5);
  for (std::size_t i = 0; i < d.rows * d.cols; ++i) {
    const std::uint64_t k = rng.below(256);
    d.features.push_back(k == 255 ? -0.0f : float(k) / 255.0f);
  }
  d.labels.assign(d.rows, 0);
  d.features[7] = -0.0f;  // both zeros are among the values for certain
  d.features[8] = 0.0f;
  write_dataset(path("d.h5"), d);
  const Dataset whole = read_dataset(path("d.h5"));
  EXPECT_TRUE(whole.coded);
  EXPECT_TRUE(whole.features.empty());
  EXPECT_EQ(whole.codes.size(), d.rows * d.cols);
  EXPECT_TRUE(testing::same_bits(whole.feature_values(), d.features));
  // Written from bytes (widened in pieces of 4 MB, as for the reads), the same file again.
  write_dataset(path("again.h5"), whole);
  EXPECT_TRUE(testing::same_bits(read_dataset(path("again.h5")).feature_values(), d.features));
  const Dataset part = read_dataset(path("d.h5"), true, RowBlock{1, 3, 0});
  EXPECT_TRUE(part.coded);
  ASSERT_EQ(part.first, 1000u);
  EXPECT_TRUE(testing::same_bits(
      part.feature_values(), std::span<const float>(d.features).subspan(1000 * 500, 1000 * 500)));
  // gather widens the rows it copies, by the file's row numbers.
  const std::vector<std::uint32_t> rows = {1999, 1000, 1500};
  std::vector<float> x(3 * 500), y(3);
  gather(part, rows, 1, x.data(), y.data());
  for (std::size_t i = 0; i < rows.size(); ++i) {
    EXPECT_TRUE(testing::same_bits(std::span<const float>(x).subspan(i * 500, 500),
                                   std::span<const float>(d.features).subspan(rows[i] * 500, 500)))
        << "row " << rows[i];
  }
  for (const std::size_t at : {std::size_t(3), std::size_t(2500 * 500 + 9)}) {
    Dataset more = d;
    more.features[at] = 0.5f;  // not k / 255 for any k
    write_dataset(path("more.h5"), more);
    const Dataset r = read_dataset(path("more.h5"));
    EXPECT_FALSE(r.coded) << at;
    EXPECT_TRUE(r.codes.empty()) << at;
    EXPECT_TRUE(testing::same_bits(r.features, more.features)) << at;
    EXPECT_TRUE(testing::same_bits(r.feature_values(), more.features)) << at;
  }
}

TEST(Sampler, EpochPermutationIsAPermutationFixedBySeedAndEpoch) {
  std::vector<std::uint32_t> a, b, c, d;
  epoch_permutation(1000, 42, 3, a);
  epoch_permutation(1000, 42, 3, b);
  epoch_permutation(1000, 42, 4, c);
  epoch_permutation(1000, 43, 3, d);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  EXPECT_NE(a, d);
  EXPECT_EQ(std::set<std::uint32_t>(a.begin(), a.end()).size(), 1000u);
  EXPECT_EQ(*std::max_element(a.begin(), a.end()), 999u);
}

TEST(Sampler, ShardsTileEveryBatchContiguouslyAndEvenly) {
  for (std::size_t rows = 0; rows <= 20; ++rows) {
    for (int p = 1; p <= 7; ++p) {
      std::size_t next = 0, smallest = rows, largest = 0;
      for (int r = 0; r < p; ++r) {
        const Range s = shard_range(rows, r, p);
        EXPECT_EQ(s.begin, next);
        next = s.end;
        smallest = std::min(smallest, s.size());
        largest = std::max(largest, s.size());
      }
      EXPECT_EQ(next, rows);
      EXPECT_LE(largest - smallest, 1u);
    }
  }
}

TEST(Gather, OneHotForClassesLabelForOneOutputTargetsCopied) {
  Dataset d;
  d.rows = 3;
  d.cols = 2;
  d.features = {1, 2, 3, 4, 5, 6};
  d.labels = {2, 0, 1};
  std::vector<std::uint32_t> idx{2, 0};
  float x[4], y[6];
  gather(d, idx, 3, x, y);
  EXPECT_EQ(std::vector<float>(x, x + 4), (std::vector<float>{5, 6, 1, 2}));
  EXPECT_EQ(std::vector<float>(y, y + 6), (std::vector<float>{0, 1, 0, 0, 0, 1}));
  gather(d, idx, 1, x, y);
  EXPECT_EQ(std::vector<float>(y, y + 2), (std::vector<float>{1, 2}));
  d.labels.clear();
  d.target_cols = 2;
  d.targets = {0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f};
  gather(d, idx, 2, x, y);
  EXPECT_EQ(std::vector<float>(y, y + 4), (std::vector<float>{0.5f, 0.6f, 0.1f, 0.2f}));
}

}  // namespace
}  // namespace shardprop
