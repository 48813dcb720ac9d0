// --data-placement streamed: the training set's features stay in the file. Each step reads
// the rows of this rank's shard, and a background thread reads the next step's rows while
// this one computes. Labels and targets, a small part of a data set, are held in memory.
// A contiguous file of floats (as convert writes) is mapped read-only: its pages are the
// kernel's page cache, which it reclaims under memory pressure, and a row costs a copy
// (where the address space is capped, rows are read with pread: a system call each, 2.6 µs
// a row here). Chunks of floats are read whole through a cache of --read-cache MB; anything
// else in one HDF5 read of the rows' union.
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
  // file (data.source) whose features are read here. With `map`, a contiguous file is
  // mapped into memory where it can be (else read with pread).
  RowStream(const Dataset& data, std::size_t cache_bytes, bool map = true);
  RowStream(const RowStream&) = delete;
  RowStream& operator=(const RowStream&) = delete;

  // As gather(): the samples `indices` into x (n × D) and their targets into y (n × k).
  void gather(std::span<const std::uint32_t> indices, std::size_t k, float* x, float* y);

 private:
  // Into staging_, the rows rows_ (ascending): from the file directly when the dataset is
  // contiguous raw floats, chunk by chunk through the cache when its chunks are, else in
  // one HDF5 read of their union.
  void read_rows();

  const Dataset& data_;
  std::string what_;  // "FILE: dataset 'features'", for errors
  h5::Handle file_, features_;
  std::vector<hsize_t> dims_;
  // A contiguous dataset of raw floats: rows are copied from the file mapped read-only, or
  // read at offset_ with pread where it cannot be mapped.
  struct File {
    int fd = -1;
    File() = default;
    File(const File&) = delete;
    File& operator=(const File&) = delete;
    ~File();
  };
  struct Mapping {
    const char* data = nullptr;
    std::size_t bytes = 0;
    Mapping() = default;
    Mapping(const Mapping&) = delete;
    Mapping& operator=(const Mapping&) = delete;
    ~Mapping();
  };
  File file_fd_;
  Mapping map_;
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
