#include "h5.hpp"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <type_traits>

#include "fileio.hpp"
#include "shardprop/error.hpp"

namespace shardprop::h5 {

void quiet_errors() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

void check(herr_t status, const std::string& what) {
  SP_CHECK(status >= 0, what, " failed (HDF5 error)");
}

Handle::Handle(hid_t id, Closer closer, const std::string& what) : id_(id), close_(closer) {
  SP_CHECK(id >= 0, what, " failed (HDF5 error)");
}

Handle& Handle::operator=(Handle&& other) noexcept {
  if (this != &other) {
    if (id_ >= 0) close_(id_);
    id_ = std::exchange(other.id_, H5I_INVALID_HID);
    close_ = other.close_;
  }
  return *this;
}

Handle::~Handle() {
  if (id_ >= 0) close_(id_);
}

void Handle::close(const std::string& what) {
  if (id_ < 0) return;
  const herr_t status = close_(std::exchange(id_, H5I_INVALID_HID));
  check(status, what);
}

Handle open_file(const std::string& path) {
  quiet_errors();
  std::error_code ec;
  SP_CHECK(std::filesystem::exists(path, ec), path, ": no such file");
  SP_CHECK(!std::filesystem::is_directory(path, ec), path, ": is a directory, not an HDF5 file");
  const htri_t is_h5 = H5Fis_hdf5(path.c_str());
  SP_CHECK(is_h5 > 0, path, ": not an HDF5 file (or not readable)");
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  SP_CHECK(file >= 0, path, ": HDF5 file cannot be opened (truncated or damaged)");
  return Handle(file, H5Fclose, "opening " + path);
}

Handle open_image(std::span<const std::byte> image, const std::string& name) {
  quiet_errors();
  // HDF5's signature, at offset 0 for the files shardprop writes.
  static constexpr unsigned char kSignature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
  SP_CHECK(image.size() >= 8 && std::equal(kSignature, kSignature + 8,
                                           reinterpret_cast<const unsigned char*>(image.data())),
           name, ": not an HDF5 file (or not readable)");
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "creating file access properties");
  check(H5Pset_fapl_core(fapl.get(), 1 << 20, /*backing_store=*/false),
        "selecting the in-memory driver for " + name);
  check(H5Pset_file_image(fapl.get(), const_cast<std::byte*>(image.data()), image.size()),
        "handing the bytes of " + name + " to HDF5");
  // The core driver refuses a name that exists on disk, so the image gets one that cannot.
  const hid_t file = H5Fopen("/nonexistent/shardprop-memory-image", H5F_ACC_RDONLY, fapl.get());
  SP_CHECK(file >= 0, name, ": HDF5 file cannot be opened (truncated or damaged)");
  return Handle(file, H5Fclose, "opening " + name);
}

Handle create_file(const std::string& path) {
  quiet_errors();
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "creating file access properties");
  check(H5Pset_fapl_core(fapl.get(), 1 << 20, /*backing_store=*/false),
        "selecting the in-memory driver for " + path);
  return Handle(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose,
                "creating " + path);
}

std::vector<std::byte> image(Handle& file, const std::string& path) {
  check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), "flushing " + path);
  const ssize_t size = H5Fget_file_image(file.get(), nullptr, 0);
  SP_CHECK(size > 0, path, ": HDF5 could not size the file image");
  std::vector<std::byte> bytes(static_cast<std::size_t>(size));
  SP_CHECK(H5Fget_file_image(file.get(), bytes.data(), bytes.size()) == size, path,
           ": HDF5 could not copy the file image");
  file.close("closing " + path);
  return bytes;
}

void store(Handle& file, const std::string& path) { fileio::write_bytes(path, image(file, path)); }

bool has_link(hid_t where, const std::string& name) {
  const htri_t exists = H5Lexists(where, name.c_str(), H5P_DEFAULT);
  check(exists, "looking up '" + name + "'");
  return exists > 0;
}

bool has_path(hid_t file, const std::string& name) {
  for (std::size_t slash = name.find('/'); slash != std::string::npos;
       slash = name.find('/', slash + 1)) {
    if (!has_link(file, name.substr(0, slash))) return false;
  }
  return has_link(file, name);
}

Handle open_dataset(hid_t file, const std::string& name, const std::string& file_name) {
  SP_CHECK(has_path(file, name), file_name, ": no dataset '", name, "'");
  return Handle(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose,
                file_name + ": opening dataset '" + name + "'");
}

Handle open_dataset(hid_t file, const std::string& name, const std::string& file_name,
                    std::size_t cache_bytes) {
  SP_CHECK(has_path(file, name), file_name, ": no dataset '", name, "'");
  const std::string what = file_name + ": opening dataset '" + name + "'";
  Handle access(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose, what);
  // A prime number of slots, many per cached chunk, as the HDF5 manual advises.
  check(H5Pset_chunk_cache(access.get(), 521, cache_bytes, 1.0), what + ": chunk cache");
  return Handle(H5Dopen2(file, name.c_str(), access.get()), H5Dclose, what);
}

namespace {

// A dataset's storage layout.
H5D_layout_t layout_of(hid_t dataset, const std::string& what) {
  Handle create(H5Dget_create_plist(dataset), H5Pclose, what + ": H5Dget_create_plist");
  const H5D_layout_t layout = H5Pget_layout(create.get());
  SP_CHECK(layout >= 0, what, ": reading the layout failed");
  return layout;
}

// Whether a dataset's values are stored as `mem_type` holds them.
bool stored_as(hid_t dataset, hid_t mem_type, const std::string& what) {
  Handle type(H5Dget_type(dataset), H5Tclose, what + ": reading the type");
  const htri_t same = H5Tequal(type.get(), mem_type);
  SP_CHECK(same >= 0, what, ": comparing types failed");
  return same > 0;
}

}  // namespace

std::vector<hsize_t> chunk_dims(hid_t dataset, const std::string& what) {
  if (layout_of(dataset, what) != H5D_CHUNKED) return {};
  Handle create(H5Dget_create_plist(dataset), H5Pclose, what + ": H5Dget_create_plist");
  hsize_t dims[8];
  const int rank = H5Pget_chunk(create.get(), 8, dims);
  SP_CHECK(rank > 0, what, ": reading the chunk shape failed");
  return std::vector<hsize_t>(dims, dims + rank);
}

bool raw_chunks_are(hid_t dataset, hid_t mem_type, const std::string& what) {
  if (layout_of(dataset, what) != H5D_CHUNKED) return false;
  Handle create(H5Dget_create_plist(dataset), H5Pclose, what + ": H5Dget_create_plist");
  const int filters = H5Pget_nfilters(create.get());
  SP_CHECK(filters >= 0, what, ": reading the filters failed");
  return filters == 0 && stored_as(dataset, mem_type, what);
}

std::optional<std::uint64_t> raw_offset(hid_t dataset, hid_t mem_type,
                                        const std::string& what) {
  if (layout_of(dataset, what) != H5D_CONTIGUOUS || !stored_as(dataset, mem_type, what)) {
    return std::nullopt;
  }
  const haddr_t offset = H5Dget_offset(dataset);
  if (offset == HADDR_UNDEF) return std::nullopt;
  return std::uint64_t(offset);
}

void read_chunk(hid_t dataset, const std::vector<hsize_t>& offset, void* out,
                const std::string& what) {
  std::uint32_t filters = 0;
  check(H5Dread_chunk(dataset, H5P_DEFAULT, offset.data(), &filters, out),
        detail::concat(what, ": reading the chunk at row ", offset[0]));
}

Handle create_group(hid_t where, const std::string& name) {
  return Handle(H5Gcreate2(where, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                H5Gclose, "creating group " + name);
}

Handle open_group(hid_t file, const std::string& name, const std::string& path) {
  SP_CHECK(has_link(file, name), path, ": missing group '/", name, "'");
  return Handle(H5Gopen2(file, name.c_str(), H5P_DEFAULT), H5Gclose,
                path + ": opening group '/" + name + "'");
}

DatasetInfo dataset_info(hid_t dataset, const std::string& what) {
  Handle type(H5Dget_type(dataset), H5Tclose, what + ": reading the type");
  DatasetInfo info;
  info.type_class = H5Tget_class(type.get());
  SP_CHECK(info.type_class != H5T_NO_CLASS, what, ": reading the type class failed");
  Handle space(H5Dget_space(dataset), H5Sclose, what + ": reading the shape");
  const int rank = H5Sget_simple_extent_ndims(space.get());
  SP_CHECK(rank >= 0, what, ": reading the shape failed");
  info.dims.resize(std::size_t(rank));
  SP_CHECK(H5Sget_simple_extent_dims(space.get(), info.dims.data(), nullptr) == rank, what,
           ": reading the shape failed");
  return info;
}

void read_all(hid_t dataset, hid_t mem_type, void* out, const std::string& what) {
  check(H5Dread(dataset, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, out), what);
}

void read_rows(hid_t dataset, hid_t mem_type, const std::vector<hsize_t>& dims, hsize_t first,
               hsize_t count, void* out, const std::string& what) {
  SP_CHECK(dims.size() == 1 || dims.size() == 2, what, ": not a 1-D or 2-D dataset");
  SP_CHECK(first <= dims[0] && count <= dims[0] - first, what, ": rows [", first, ", ",
           first + count, ") are outside its ", dims[0], " rows");
  const hsize_t width = dims.size() == 2 ? dims[1] : 1;
  const std::size_t element = H5Tget_size(mem_type);
  SP_CHECK(element > 0, what, ": H5Tget_size failed");
  const hsize_t piece = std::max<hsize_t>(1, (hsize_t(8) << 20) / (width * element));
  Handle file_space(H5Dget_space(dataset), H5Sclose, what + ": H5Dget_space");
  auto* bytes = static_cast<char*>(out);
  for (hsize_t done = 0; done < count;) {
    const hsize_t n = std::min(piece, count - done);
    const hsize_t start[2] = {first + done, 0}, size[2] = {n, width};
    check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, size, nullptr),
          what + ": selecting rows");
    Handle memory(H5Screate_simple(int(dims.size()), size, nullptr), H5Sclose,
                  what + ": H5Screate_simple");
    check(H5Dread(dataset, mem_type, memory.get(), file_space.get(), H5P_DEFAULT,
                  bytes + done * width * element),
          detail::concat(what, ": reading rows ", first + done, " to ", first + done + n - 1));
    done += n;
  }
}

void read_rows_at(hid_t dataset, hid_t mem_type, const std::vector<hsize_t>& dims,
                  std::span<const hsize_t> rows, void* out, const std::string& what) {
  SP_CHECK(dims.size() == 2, what, ": not a 2-D dataset");
  if (rows.empty()) return;
  Handle file_space(H5Dget_space(dataset), H5Sclose, what + ": H5Dget_space");
  check(H5Sselect_none(file_space.get()), what + ": selecting rows");
  // Runs of consecutive rows, each one hyperslab of the union.
  for (std::size_t i = 0; i < rows.size();) {
    std::size_t j = i + 1;
    while (j < rows.size() && rows[j] == rows[j - 1] + 1) ++j;
    SP_CHECK(rows[j - 1] < dims[0] && (i == 0 || rows[i] > rows[i - 1]), what, ": row ",
             rows[j - 1], " is outside its ", dims[0], " rows or out of order");
    const hsize_t start[2] = {rows[i], 0}, size[2] = {hsize_t(j - i), dims[1]};
    check(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_OR, start, nullptr, size, nullptr),
          what + ": selecting rows");
    i = j;
  }
  const hsize_t shape[2] = {hsize_t(rows.size()), dims[1]};
  Handle memory(H5Screate_simple(2, shape, nullptr), H5Sclose, what + ": H5Screate_simple");
  check(H5Dread(dataset, mem_type, memory.get(), file_space.get(), H5P_DEFAULT, out),
        detail::concat(what, ": reading ", rows.size(), " rows from row ", rows.front()));
}

void write_dataset(hid_t where, const std::string& name, hid_t file_type, hid_t mem_type,
                   const std::vector<hsize_t>& dims, const void* data, hsize_t chunk_rows) {
  Handle space(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose,
               "creating the dataspace of '" + name + "'");
  Handle create(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, "creating dataset '" + name + "'");
  if (chunk_rows > 0 && dims[0] > 0) {
    std::vector<hsize_t> chunk = dims;
    chunk[0] = std::min(chunk_rows, dims[0]);
    check(H5Pset_chunk(create.get(), int(chunk.size()), chunk.data()),
          "setting the chunks of dataset '" + name + "'");
  }
  Handle dataset(H5Dcreate2(where, name.c_str(), file_type, space.get(), H5P_DEFAULT,
                            create.get(), H5P_DEFAULT),
                 H5Dclose, "creating dataset '" + name + "'");
  check(H5Dwrite(dataset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
        "writing dataset '" + name + "'");
  dataset.close("closing dataset '" + name + "'");
}

void write_float_rows(hid_t where, const std::string& name, hid_t file_type,
                      const std::vector<hsize_t>& dims,
                      FunctionRef<hsize_t, hsize_t, float*> fill) {
  SP_CHECK(dims.size() == 2, "dataset '", name, "': not 2-D");
  Handle space(H5Screate_simple(2, dims.data(), nullptr), H5Sclose,
               "creating the dataspace of '" + name + "'");
  Handle dataset(H5Dcreate2(where, name.c_str(), file_type, space.get(), H5P_DEFAULT,
                            H5P_DEFAULT, H5P_DEFAULT),
                 H5Dclose, "creating dataset '" + name + "'");
  const hsize_t width = std::max<hsize_t>(dims[1], 1);
  const hsize_t piece = std::max<hsize_t>(1, (hsize_t(4) << 20) / (width * sizeof(float)));
  std::vector<float> buffer(std::min(piece, dims[0]) * dims[1]);
  for (hsize_t done = 0; done < dims[0];) {
    const hsize_t n = std::min(piece, dims[0] - done);
    fill(done, n, buffer.data());
    const hsize_t start[2] = {done, 0}, size[2] = {n, dims[1]};
    check(H5Sselect_hyperslab(space.get(), H5S_SELECT_SET, start, nullptr, size, nullptr),
          "selecting rows of dataset '" + name + "'");
    Handle memory(H5Screate_simple(2, size, nullptr), H5Sclose,
                  "creating the dataspace of rows of '" + name + "'");
    check(H5Dwrite(dataset.get(), H5T_NATIVE_FLOAT, memory.get(), space.get(), H5P_DEFAULT,
                   buffer.data()),
          detail::concat("writing rows ", done, " to ", done + n - 1, " of dataset '", name, "'"));
    done += n;
  }
  dataset.close("closing dataset '" + name + "'");
}

namespace {
void write_scalar(hid_t where, const char* name, hid_t file_type, hid_t mem_type,
                  const void* value) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  Handle attr(H5Acreate2(where, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
              H5Aclose, std::string("creating attribute ") + name);
  check(H5Awrite(attr.get(), mem_type, value), std::string("writing attribute ") + name);
  attr.close(std::string("closing attribute ") + name);
}
}  // namespace

void write_attr(hid_t where, const char* name, const std::string& value) {
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose, "creating a string type");
  check(H5Tset_size(type.get(), value.size() + 1), "sizing a string type");
  write_scalar(where, name, type.get(), type.get(), value.c_str());
}
void write_attr(hid_t where, const char* name, std::int64_t value) {
  write_scalar(where, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}
void write_attr(hid_t where, const char* name, std::uint64_t value) {
  write_scalar(where, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &value);
}
void write_attr(hid_t where, const char* name, double value) {
  write_scalar(where, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

std::string AttrReader::where(const char* name) const {
  return file_ + ": attribute '" + object_ + name + "'";
}

bool AttrReader::has(const char* name) const {
  const htri_t exists = H5Aexists(where_, name);
  check(exists, where(name) + ": looking it up");
  return exists > 0;
}

Handle AttrReader::open(const char* name) const {
  SP_CHECK(has(name), file_, ": missing attribute '", object_, name, "'");
  return Handle(H5Aopen(where_, name, H5P_DEFAULT), H5Aclose, where(name) + ": opening");
}

std::string AttrReader::text(const char* name) const {
  Handle attr = open(name);
  Handle type(H5Aget_type(attr.get()), H5Tclose, where(name) + ": reading its type");
  SP_CHECK(H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) == 0,
           where(name), " must be a fixed-length string");
  const std::size_t size = H5Tget_size(type.get());
  SP_CHECK(size > 0 && size < (1u << 20), where(name), " has a bad size");
  std::string value(size, '\0');
  check(H5Aread(attr.get(), type.get(), value.data()), where(name) + ": reading");
  value.resize(std::min(value.find('\0'), size));
  return value;
}

template <class T>
T AttrReader::number(const char* name, hid_t mem_type) const {
  Handle attr = open(name);
  Handle type(H5Aget_type(attr.get()), H5Tclose, where(name) + ": reading its type");
  const H5T_class_t cls = H5Tget_class(type.get());
  SP_CHECK(cls == H5T_INTEGER || cls == H5T_FLOAT, where(name), " must be a number");
  Handle space(H5Aget_space(attr.get()), H5Sclose, where(name) + ": reading its shape");
  SP_CHECK(H5Sget_simple_extent_npoints(space.get()) == 1, where(name), " must be a scalar");
  if (std::is_same_v<T, std::uint64_t>) {
    // Negative or fractional values would be converted without notice: read them as such.
    if (cls == H5T_FLOAT || H5Tget_sign(type.get()) == H5T_SGN_2) {
      const double v = number<double>(name, H5T_NATIVE_DOUBLE);
      SP_CHECK(v >= 0 && v == std::floor(v) && v < 0x1p63, where(name),
               " is not a whole number >= 0 (", v, ")");
    }
  }
  T value{};
  check(H5Aread(attr.get(), mem_type, &value), where(name) + ": reading");
  return value;
}

std::int64_t AttrReader::int64(const char* name) const {
  return number<std::int64_t>(name, H5T_NATIVE_INT64);
}
std::uint64_t AttrReader::count(const char* name) const {
  return number<std::uint64_t>(name, H5T_NATIVE_UINT64);
}
double AttrReader::real(const char* name) const { return number<double>(name, H5T_NATIVE_DOUBLE); }

}  // namespace shardprop::h5
