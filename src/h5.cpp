#include "shardprop/h5.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <vector>

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

Handle create_file(const std::string& path) {
  quiet_errors();
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "creating file access properties");
  check(H5Pset_fapl_core(fapl.get(), 1 << 20, /*backing_store=*/false),
        "selecting the in-memory driver for " + path);
  return Handle(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), H5Fclose,
                "creating " + path);
}

void store(Handle& file, const std::string& path) {
  check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), "flushing " + path);
  const ssize_t size = H5Fget_file_image(file.get(), nullptr, 0);
  SP_CHECK(size > 0, path, ": HDF5 could not size the file image");
  std::vector<std::byte> image(static_cast<std::size_t>(size));
  SP_CHECK(H5Fget_file_image(file.get(), image.data(), image.size()) == size, path,
           ": HDF5 could not copy the file image");
  file.close("closing " + path);
  write_bytes(path, image);
}

void write_bytes(const std::string& path, std::span<const std::byte> bytes) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  SP_CHECK(fd >= 0, path, ": cannot create: ", std::strerror(errno));
  std::size_t done = 0;
  int err = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      err = n < 0 ? errno : EIO;
      break;
    }
    done += std::size_t(n);
  }
  if (::close(fd) != 0 && err == 0) err = errno;  // NFS may report write errors here
  SP_CHECK(err == 0, path, ": write failed: ", std::strerror(err));
}

bool has_link(hid_t where, const std::string& name) {
  const htri_t exists = H5Lexists(where, name.c_str(), H5P_DEFAULT);
  check(exists, "looking up '" + name + "'");
  return exists > 0;
}

Handle open_dataset(hid_t file, const std::string& name, const std::string& file_name) {
  SP_CHECK(has_link(file, name), file_name, ": no dataset '", name, "'");
  return Handle(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose,
                file_name + ": opening dataset '" + name + "'");
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

void write_dataset(hid_t where, const std::string& name, hid_t file_type, hid_t mem_type,
                   const std::vector<hsize_t>& dims, const void* data) {
  Handle space(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose,
               "creating the dataspace of '" + name + "'");
  Handle dataset(H5Dcreate2(where, name.c_str(), file_type, space.get(), H5P_DEFAULT,
                            H5P_DEFAULT, H5P_DEFAULT),
                 H5Dclose, "creating dataset '" + name + "'");
  check(H5Dwrite(dataset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data),
        "writing dataset '" + name + "'");
  dataset.close("closing dataset '" + name + "'");
}

}  // namespace shardprop::h5
