#include "shardprop/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>

#include "shardprop/error.hpp"
#include "shardprop/h5.hpp"

namespace shardprop {

namespace {

void write_string_attr(hid_t where, const char* name, const std::string& value) {
  h5::Handle type(H5Tcopy(H5T_C_S1), H5Tclose, "creating a string type");
  h5::check(H5Tset_size(type.get(), value.size() + 1), "sizing a string type");
  h5::Handle space(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  h5::Handle attr(H5Acreate2(where, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                  H5Aclose, std::string("creating attribute ") + name);
  h5::check(H5Awrite(attr.get(), type.get(), value.c_str()), std::string("writing attribute ") + name);
  attr.close(std::string("closing attribute ") + name);
}

void write_int_attr(hid_t where, const char* name, std::int64_t value) {
  h5::Handle space(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  h5::Handle attr(H5Acreate2(where, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                  H5Aclose, std::string("creating attribute ") + name);
  h5::check(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), std::string("writing attribute ") + name);
  attr.close(std::string("closing attribute ") + name);
}

bool has_attr(hid_t where, const char* name) {
  const htri_t exists = H5Aexists(where, name);
  h5::check(exists, std::string("looking up attribute ") + name);
  return exists > 0;
}

std::string read_string_attr(hid_t where, const char* name, const std::string& file) {
  SP_CHECK(has_attr(where, name), file, ": missing attribute '", name, "'");
  h5::Handle attr(H5Aopen(where, name, H5P_DEFAULT), H5Aclose, file + ": opening attribute " + name);
  h5::Handle type(H5Aget_type(attr.get()), H5Tclose, file + ": reading attribute type");
  SP_CHECK(H5Tget_class(type.get()) == H5T_STRING, file, ": attribute '", name,
           "' is not a string");
  SP_CHECK(H5Tis_variable_str(type.get()) == 0, file, ": attribute '", name,
           "' must be a fixed-length string");
  const std::size_t size = H5Tget_size(type.get());
  SP_CHECK(size > 0 && size < (1u << 20), file, ": attribute '", name, "' has a bad size");
  std::string value(size, '\0');
  h5::check(H5Aread(attr.get(), type.get(), value.data()), file + ": reading attribute " + name);
  value.resize(value.find('\0') == std::string::npos ? size : value.find('\0'));
  return value;
}

std::int64_t read_int_attr(hid_t where, const char* name, const std::string& file) {
  SP_CHECK(has_attr(where, name), file, ": missing attribute '", name, "'");
  h5::Handle attr(H5Aopen(where, name, H5P_DEFAULT), H5Aclose, file + ": opening attribute " + name);
  std::int64_t value = 0;
  h5::check(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), file + ": reading attribute " + name);
  return value;
}

void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  SP_CHECK(fd >= 0, path, ": cannot open to sync");
  const int rc = ::fsync(fd);
  ::close(fd);
  SP_CHECK(rc == 0, path, ": fsync failed");
}

}  // namespace

void save_model(const std::string& path, const ModelSpec& spec, std::span<const float> params,
                std::uint64_t step, std::uint64_t epoch) {
  const Layout layout(spec);
  SP_CHECK(params.size() == layout.size(), "model has ", params.size(), " parameters, expected ",
           layout.size());
  namespace fs = std::filesystem;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  fs::path tmp_name = target.filename();
  tmp_name += ".tmp";
  const std::string tmp = (dir / tmp_name).string();
  try {
    h5::Handle file = h5::create_file(tmp);
    write_string_attr(file.get(), "format", kCheckpointFormat);
    write_int_attr(file.get(), "format_version", kCheckpointVersion);
    write_string_attr(file.get(), "layers", spec.layers_string());
    write_string_attr(file.get(), "loss", std::string(to_string(spec.loss)));
    write_int_attr(file.get(), "step", std::int64_t(step));
    write_int_attr(file.get(), "epoch", std::int64_t(epoch));
    h5::Handle group(H5Gcreate2(file.get(), "params", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                     H5Gclose, "creating group /params");
    for (std::size_t l = 0; l < layout.layer_count(); ++l) {
      const std::string name = "layer_" + std::to_string(l);
      h5::Handle layer(H5Gcreate2(group.get(), name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                       H5Gclose, "creating group /params/" + name);
      const auto& b = layout.block(l);
      h5::write_dataset(layer.get(), "W", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {b.in, b.out},
                        params.data() + b.w_offset);
      h5::write_dataset(layer.get(), "b", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {b.out},
                        params.data() + b.b_offset);
      layer.close("closing /params/" + name);
    }
    group.close("closing /params");
    h5::check(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), "flushing " + tmp);
    file.close("writing " + tmp);
    fsync_path(tmp, O_RDONLY);
  } catch (const Error&) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  SP_CHECK(!ec, path, ": cannot rename ", tmp, " into place: ", ec.message());
  fsync_path(dir.string(), O_RDONLY | O_DIRECTORY);
}

bool is_model_file(const std::string& path) {
  h5::Handle file = h5::open_file(path);
  return has_attr(file.get(), "format");
}

ModelFile load_model(const std::string& path) {
  h5::Handle file = h5::open_file(path);
  const std::string format = read_string_attr(file.get(), "format", path);
  SP_CHECK(format == kCheckpointFormat, path, ": format '", format, "' is not ", kCheckpointFormat);
  const std::int64_t version = read_int_attr(file.get(), "format_version", path);
  SP_CHECK(version == kCheckpointVersion, path, ": format_version ", version,
           " is not supported (this build reads ", kCheckpointVersion, ")");
  ModelFile model;
  try {
    model.spec = parse_model(read_string_attr(file.get(), "layers", path),
                             read_string_attr(file.get(), "loss", path));
  } catch (const Error& e) {
    SP_THROW(path, ": bad model description: ", e.message());
  }
  const std::int64_t step = read_int_attr(file.get(), "step", path);
  const std::int64_t epoch = read_int_attr(file.get(), "epoch", path);
  SP_CHECK(step >= 0 && epoch >= 0, path, ": negative step or epoch");
  model.step = std::uint64_t(step);
  model.epoch = std::uint64_t(epoch);
  const Layout layout(model.spec);
  model.params.assign(layout.size(), 0.0f);
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const auto& b = layout.block(l);
    for (const char* part : {"W", "b"}) {
      const std::string name = "params/layer_" + std::to_string(l) + "/" + part;
      SP_CHECK(h5::has_link(file.get(), "params") &&
                   h5::has_link(file.get(), "params/layer_" + std::to_string(l)),
               path, ": no dataset '/", name, "'");
      h5::Handle dataset = h5::open_dataset(file.get(), name, path);
      const auto info = h5::dataset_info(dataset.get(), path + ": /" + name);
      const bool is_w = part[0] == 'W';
      const std::vector<hsize_t> want = is_w ? std::vector<hsize_t>{b.in, b.out}
                                             : std::vector<hsize_t>{b.out};
      SP_CHECK(info.type_class == H5T_FLOAT && info.dims == want, path, ": /", name,
               " has the wrong type or shape for --layers ", model.spec.layers_string());
      h5::read_all(dataset.get(), H5T_NATIVE_FLOAT,
                   model.params.data() + (is_w ? b.w_offset : b.b_offset), "reading /" + name);
    }
  }
  return model;
}

}  // namespace shardprop
