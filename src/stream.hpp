// --data-placement streamed: the training set's features stay in the file. Each step reads
// the rows of this rank's shard, in one HDF5 read of their union (a chunk cache of
// --read-cache MB keeps chunks that are read again), and a background thread reads the next
// step's rows while this one computes. Labels and targets, a small part of a data set, are
// held in memory.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "h5.hpp"
#include "shardprop/data.hpp"

namespace shardprop {

class RowStream {
 public:
  // `data` is what read_dataset_streamed read: the shape, the labels or targets, and the
  // file (data.source) whose features are read here.
  RowStream(const Dataset& data, std::size_t cache_bytes);
  RowStream(const RowStream&) = delete;
  RowStream& operator=(const RowStream&) = delete;
  ~RowStream();

  // As gather(): the samples `indices` into x (n × D) and their targets into y (n × k).
  void gather(std::span<const std::uint32_t> indices, std::size_t k, float* x, float* y);

 private:
  // Into staging_, the rows rows_ (ascending): from the file directly when the dataset is
  // contiguous raw floats, chunk by chunk through the cache when its chunks are, else in
  // one HDF5 read of their union.
  void read_rows();

  const Dataset& data_;
  h5::Handle file_, features_;
  std::vector<hsize_t> dims_;
  // A contiguous dataset of raw floats: rows are read from the file at offset_ directly.
  int fd_ = -1;
  std::uint64_t offset_ = 0;
  // Whole chunks of chunk_rows_ rows, read as stored, cached by chunk index in slots of a
  // direct-mapped cache of --read-cache MB (at least one slot).
  bool direct_ = false;
  std::size_t chunk_rows_ = 0, slots_ = 0;
  AlignedVector<float> cache_;
  std::vector<std::int64_t> cached_;  // the chunk in each slot, or -1
  std::vector<std::pair<hsize_t, std::uint32_t>> order_;  // (row, position in the batch)
  std::vector<hsize_t> rows_;
  AlignedVector<float> staging_;
};

// One job at a time on a thread of its own: start() hands it over, wait() waits for it and
// rethrows what it threw. The destructor waits for a running job and ends the thread.
class BackgroundTask {
 public:
  BackgroundTask();
  BackgroundTask(const BackgroundTask&) = delete;
  BackgroundTask& operator=(const BackgroundTask&) = delete;
  ~BackgroundTask();

  void start(std::function<void()> job);
  void wait();

 private:
  void loop();

  std::mutex mutex_;
  std::condition_variable changed_;
  std::function<void()> job_;
  bool busy_ = false, quit_ = false;
  std::exception_ptr error_;
  std::thread thread_;
};

// Whether the HDF5 library may be called from two threads at once (built thread-safe).
bool hdf5_threadsafe();

}  // namespace shardprop
