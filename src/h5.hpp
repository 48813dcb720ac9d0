// RAII handles and checked helpers for the HDF5 C API (private: library users never see
// <hdf5.h>).
#pragma once

#include <hdf5.h>

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "shardprop/function_ref.hpp"

namespace shardprop::h5 {

// Silences HDF5's own error-stack printing; our errors say what failed in one line.
void quiet_errors();

// Throws shardprop::Error naming `what` if an HDF5 call returned a negative status.
void check(herr_t status, const std::string& what);

// An owned HDF5 identifier, closed with the matching H5?close. Move-only.
class Handle {
 public:
  using Closer = herr_t (*)(hid_t);
  Handle() = default;
  // Takes ownership of `id`; throws naming `what` if id is invalid (negative).
  Handle(hid_t id, Closer closer, const std::string& what);
  Handle(Handle&& other) noexcept
      : id_(std::exchange(other.id_, H5I_INVALID_HID)), close_(other.close_) {}
  Handle& operator=(Handle&& other) noexcept;
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  ~Handle();  // a failure to close here is ignored; call close() where it matters

  hid_t get() const { return id_; }
  // Closes now and throws naming `what` on failure (for files being written).
  void close(const std::string& what);

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer close_ = nullptr;
};

// Opens an existing file read-only; distinct errors for a missing file and a non-HDF5 file.
Handle open_file(const std::string& path);
// Opens the HDF5 file whose bytes are `image` (copied), read-only; `name` in messages.
Handle open_image(std::span<const std::byte> image, const std::string& name);
// Creates a file in memory, named `path` in messages; nothing reaches the disk until
// store() or image().
Handle create_file(const std::string& path);
// Closes an in-memory file and returns its bytes.
std::vector<std::byte> image(Handle& file, const std::string& path);
// Flushes and closes `file` and writes its bytes to `path` with POSIX calls, so a failure
// names its cause (a full disk says "No space left on device"). Replaces `path`.
void store(Handle& file, const std::string& path);
bool has_link(hid_t where, const std::string& name);
// Whether every link on the way to `name` ("a/b/c") exists.
bool has_path(hid_t file, const std::string& name);
Handle open_dataset(hid_t file, const std::string& name, const std::string& file_name);
// The same with a chunk cache of `cache_bytes` (for row reads that come back to a chunk).
Handle open_dataset(hid_t file, const std::string& name, const std::string& file_name,
                    std::size_t cache_bytes);
// The chunk dimensions of a chunked dataset; empty for another layout.
std::vector<hsize_t> chunk_dims(hid_t dataset, const std::string& what);
// Whether a dataset's chunks hold its values as `mem_type` does, unfiltered (uncompressed):
// then read_chunk returns them as they are.
bool raw_chunks_are(hid_t dataset, hid_t mem_type, const std::string& what);
// The file offset of a contiguous dataset's values, if they are stored as `mem_type` holds
// them (then a row can be read from the file directly); nullopt otherwise.
std::optional<std::uint64_t> raw_offset(hid_t dataset, hid_t mem_type, const std::string& what);
// Reads the chunk whose first element is at `offset` as stored (H5Dread_chunk) into `out`.
void read_chunk(hid_t dataset, const std::vector<hsize_t>& offset, void* out,
                const std::string& what);
Handle create_group(hid_t where, const std::string& name);
Handle open_group(hid_t file, const std::string& name, const std::string& path);

// A dataset's type class (H5T_INTEGER, H5T_FLOAT, ...) and dimensions.
struct DatasetInfo {
  H5T_class_t type_class;
  std::vector<hsize_t> dims;
};
DatasetInfo dataset_info(hid_t dataset, const std::string& what);

// Reads a whole dataset converted to `mem_type` into `out` (sized by the caller).
void read_all(hid_t dataset, hid_t mem_type, void* out, const std::string& what);
// Reads rows [first, first + count) of a 1-D or 2-D dataset of `dims`, converted to
// `mem_type`, into `out` (count × row elements), a hyperslab of at most about 8 MB at a
// time: never the whole dataset at once.
void read_rows(hid_t dataset, hid_t mem_type, const std::vector<hsize_t>& dims, hsize_t first,
               hsize_t count, void* out, const std::string& what);
// Reads the rows `rows` (ascending, distinct) of a 2-D dataset of `dims` into `out`, one
// after another, in one read of their union.
void read_rows_at(hid_t dataset, hid_t mem_type, const std::vector<hsize_t>& dims,
                  std::span<const hsize_t> rows, void* out, const std::string& what);
// Writes a new 2-D dataset of float rows of file type `file_type` and dimensions `dims`
// (contiguous), a piece of about 4 MB at a time: fill(first, count, out) writes rows
// [first, first + count) into out. The rows are never all in memory at once.
void write_float_rows(hid_t where, const std::string& name, hid_t file_type,
                      const std::vector<hsize_t>& dims,
                      FunctionRef<hsize_t, hsize_t, float*> fill);
// Writes a new dataset of file type `file_type` with the given dimensions from `data`;
// with chunk_rows > 0, in chunks of that many whole rows.
void write_dataset(hid_t where, const std::string& name, hid_t file_type, hid_t mem_type,
                   const std::vector<hsize_t>& dims, const void* data, hsize_t chunk_rows = 0);

// Scalar attributes.
void write_attr(hid_t where, const char* name, const std::string& value);
void write_attr(hid_t where, const char* name, std::int64_t value);
void write_attr(hid_t where, const char* name, std::uint64_t value);
void write_attr(hid_t where, const char* name, double value);

// Reads the scalar attributes of one object, naming the file and object in every error.
class AttrReader {
 public:
  AttrReader(hid_t where, std::string file, std::string object)
      : where_(where), file_(std::move(file)), object_(std::move(object)) {}
  std::string text(const char* name) const;
  std::int64_t int64(const char* name) const;
  // A non-negative integer, stored signed or unsigned.
  std::uint64_t count(const char* name) const;
  double real(const char* name) const;
  bool has(const char* name) const;

 private:
  std::string where(const char* name) const;
  Handle open(const char* name) const;
  template <class T>
  T number(const char* name, hid_t mem_type) const;

  hid_t where_;
  std::string file_, object_;
};

}  // namespace shardprop::h5
