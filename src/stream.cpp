#include "stream.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "shardprop/error.hpp"

namespace shardprop {

RowStream::RowStream(const Dataset& data, std::size_t cache_bytes, bool map)
    : data_(data), what_(data.source + ": dataset 'features'") {
  SP_CHECK(data.streamed, "RowStream needs a streamed data set");
  file_ = h5::open_file(data.source);
  features_ = h5::open_dataset(file_.get(), "features", data.source, cache_bytes);
  dims_ = h5::dataset_info(features_.get(), what_).dims;
  SP_CHECK(dims_.size() == 2 && dims_[0] == data.rows && dims_[1] == data.cols, data.source,
           ": dataset 'features' is no longer ", data.rows, " × ", data.cols);
  if (const auto offset = h5::raw_offset(features_.get(), H5T_NATIVE_FLOAT, what_)) {
    file_fd_.fd = ::open(data.source.c_str(), O_RDONLY | O_CLOEXEC);
    SP_CHECK(file_fd_.fd >= 0, data.source, ": cannot open: ", std::strerror(errno));
    offset_ = *offset;
    struct stat st {};
    SP_CHECK(::fstat(file_fd_.fd, &st) == 0, data.source, ": cannot stat: ",
             std::strerror(errno));
    SP_CHECK(std::uint64_t(st.st_size) >= offset_ + data.rows * data.cols * sizeof(float),
             data.source, ": the file ends before its features do");
    if (!map) return;
    void* mapped =
        ::mmap(nullptr, std::size_t(st.st_size), PROT_READ, MAP_SHARED, file_fd_.fd, 0);
    if (mapped == MAP_FAILED) return;  // e.g. a capped address space: pread it is
    map_.data = static_cast<const char*>(mapped);
    map_.bytes = std::size_t(st.st_size);
    // Rows are sampled at random: no read-ahead around them (advice: a failure changes
    // nothing but speed).
    static_cast<void>(::madvise(mapped, map_.bytes, MADV_RANDOM));
    return;
  }
  const std::vector<hsize_t> chunk = h5::chunk_dims(features_.get(), what_);
  direct_ = chunk.size() == 2 && chunk[1] == dims_[1] &&
            h5::raw_chunks_are(features_.get(), H5T_NATIVE_FLOAT, what_);
  if (direct_) {
    chunk_rows_ = chunk[0];
    const std::size_t chunk_bytes = chunk_rows_ * data.cols * sizeof(float);
    slots_ = std::max<std::size_t>(1, cache_bytes / chunk_bytes);
    cache_.resize(slots_ * chunk_rows_ * data.cols);
    cached_.assign(slots_, -1);
  }
}

RowStream::File::~File() {
  if (fd >= 0) ::close(fd);
}

RowStream::Mapping::~Mapping() {
  if (data) ::munmap(const_cast<char*>(data), bytes);
}

void RowStream::read_rows() {
  const std::size_t row_bytes = data_.cols * sizeof(float);
  if (map_.data) {
    for (std::size_t i = 0; i < rows_.size(); ++i) {
      std::memcpy(staging_.data() + i * data_.cols, map_.data + offset_ + rows_[i] * row_bytes,
                  row_bytes);
    }
    return;
  }
  if (file_fd_.fd >= 0) {
    // Runs of consecutive rows, one pread each.
    for (std::size_t i = 0; i < rows_.size();) {
      std::size_t j = i + 1;
      while (j < rows_.size() && rows_[j] == rows_[j - 1] + 1) ++j;
      auto* out = reinterpret_cast<char*>(staging_.data() + i * data_.cols);
      const std::size_t bytes = (j - i) * row_bytes;
      for (std::size_t done = 0; done < bytes;) {
        const ssize_t n = ::pread(file_fd_.fd, out + done, bytes - done,
                                  off_t(offset_ + rows_[i] * row_bytes + done));
        if (n < 0 && errno == EINTR) continue;
        SP_CHECK(n > 0, what_, ": reading row ", rows_[i] + done / row_bytes, ": ",
                 n < 0 ? std::strerror(errno) : "the file ends early");
        done += std::size_t(n);
      }
      i = j;
    }
    return;
  }
  if (!direct_) {
    h5::read_rows_at(features_.get(), H5T_NATIVE_FLOAT, dims_, rows_, staging_.data(), what_);
    return;
  }
  const std::size_t d = data_.cols;
  std::vector<hsize_t> offset{0, 0};
  for (std::size_t i = 0; i < rows_.size(); ++i) {
    const auto chunk = std::int64_t(rows_[i] / chunk_rows_);
    const std::size_t slot = std::size_t(chunk) % slots_;
    float* rows = cache_.data() + slot * chunk_rows_ * d;
    if (cached_[slot] != chunk) {
      cached_[slot] = -1;  // until the read succeeds
      offset[0] = hsize_t(chunk) * chunk_rows_;
      // The last chunk of a set whose rows are not a multiple of the chunk's comes whole
      // too (HDF5 stores every chunk full size).
      h5::read_chunk(features_.get(), offset, rows, what_);
      cached_[slot] = chunk;
    }
    std::copy_n(rows + (rows_[i] % chunk_rows_) * d, d, staging_.data() + i * d);
  }
}

void RowStream::gather(std::span<const std::uint32_t> indices, std::size_t k, float* x,
                       float* y) {
  const std::size_t n = indices.size(), d = data_.cols;
  // The rows in file order, read in one go, then put where the batch has them.
  order_.resize(n);
  for (std::size_t i = 0; i < n; ++i) order_[i] = {indices[i], std::uint32_t(i)};
  std::sort(order_.begin(), order_.end());
  rows_.resize(n);
  for (std::size_t i = 0; i < n; ++i) rows_[i] = order_[i].first;
  if (staging_.size() < n * d) staging_.resize(n * d);
  read_rows();
  for (std::size_t i = 0; i < n; ++i) {
    const float* row = staging_.data() + i * d;
    for (std::size_t c = 0; c < d; ++c) {
      SP_CHECK(std::isfinite(row[c]), what_, ": non-finite value ", row[c], " at row ",
               order_[i].first, ", column ", c);
    }
    std::copy_n(row, d, x + std::size_t(order_[i].second) * d);
  }
  gather_targets(data_, indices, k, y);  // from the labels or targets held in memory
}

BackgroundTask::BackgroundTask() : thread_([this] { loop(); }) {}

BackgroundTask::~BackgroundTask() {
  {
    std::unique_lock lock(mutex_);
    changed_.wait(lock, [&] { return !busy_; });
    quit_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void BackgroundTask::start(std::function<void()> job) {
  {
    std::lock_guard lock(mutex_);
    SP_CHECK(!busy_, "a background job is already running");
    job_ = std::move(job);
    busy_ = true;
    error_ = nullptr;
  }
  changed_.notify_all();
}

void BackgroundTask::wait() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return !busy_; });
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void BackgroundTask::loop() {
  for (;;) {
    std::function<void()> job;
    {
      std::unique_lock lock(mutex_);
      changed_.wait(lock, [&] { return quit_ || (busy_ && job_); });
      if (quit_) return;
      job = std::move(job_);
      job_ = nullptr;
    }
    std::exception_ptr error;
    try {
      job();
    } catch (...) {
      error = std::current_exception();
    }
    {
      std::lock_guard lock(mutex_);
      error_ = error;
      busy_ = false;
    }
    changed_.notify_all();
  }
}

bool hdf5_threadsafe() {
  hbool_t safe = false;
  return H5is_library_threadsafe(&safe) >= 0 && safe;
}

}  // namespace shardprop
