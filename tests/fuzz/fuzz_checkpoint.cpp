// The checkpoint reader's validation: a valid checkpoint of a small model is written, then
// changed as the input says (attributes rewritten with other types and values, objects
// deleted, datasets replaced by others of any shape and type, tensor values overwritten),
// and loaded with and without checksum verification. It must load or throw
// shardprop::Error; a loaded checkpoint must be consistent with its own model.
#include <fuzzer/FuzzedDataProvider.h>
#include <hdf5.h>

#include <array>
#include <string>
#include <vector>

#include "fuzz_util.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/error.hpp"
#include "shardprop/settings.hpp"

namespace sp = shardprop;

namespace {

// {object, attribute}: the training state's, then every stored setting's from the table.
std::vector<std::pair<std::string, std::string>> attributes() {
  std::vector<std::pair<std::string, std::string>> all = {
      {".", "format"},     {".", "format_version"}, {".", "step"},
      {".", "epoch"},      {".", "batch_in_epoch"}, {".", "world_size"},
      {".", "threads"},    {".", "checksum_crc32"}, {"optimizer", "steps"},
      {"train", "train_rows"}, {"train", "train_cols"}, {"train", "deterministic_chunk"},
  };
  for (const sp::SettingSpec& s : sp::settings_table()) {
    if (!s.attribute) continue;
    const std::string a = s.attribute;
    const std::size_t slash = a.rfind('/');
    all.emplace_back(slash == 0 ? "." : a.substr(1, slash - 1), a.substr(slash + 1));
  }
  return all;
}
constexpr std::array kObjects = {
    "params",          "params/layer_0",          "params/layer_0/W", "params/layer_0/b",
    "params/layer_1/W", "optimizer",              "optimizer/velocity", "optimizer/m",
    "optimizer/v/layer_1/b", "optimizer/velocity/layer_0/W", "train", "rng",
    "rng/epoch_order",
};

sp::Checkpoint valid(FuzzedDataProvider& in) {
  sp::Checkpoint c;
  const bool adam = in.ConsumeBool();
  c.spec = in.ConsumeBool() ? sp::parse_model("3,4:tanh,2:softmax", "xent")
                             : sp::parse_model("2,3:relu,1:sigmoid", "bce");
  const sp::Layout layout(c.spec);
  c.has_training_state = true;
  c.settings.layers = c.spec.layers_string();
  c.settings.loss = std::string(sp::to_string(c.spec.loss));
  c.settings.optimizer = adam ? "adam" : "sgd";
  c.params.assign(layout.size(), 0.25f);
  c.optimizer_state.assign(
      sp::optimizer_slots(sp::parse_optimizer(c.settings.optimizer)).size() * layout.size(), 0.5f);
  c.train_rows = 10;
  c.train_cols = c.spec.input_width();
  c.settings.batch = 4;
  c.state.step = c.optimizer_steps = 7;
  c.state.epoch = 2;
  c.state.batch_in_epoch = 1;
  c.world_size = c.threads = 1;
  return c;
}

void set_attribute(hid_t file, FuzzedDataProvider& in) {
  static const auto all = attributes();
  const auto& picked = all[in.ConsumeIntegralInRange<std::size_t>(0, all.size() - 1)];
  const char* object = picked.first.c_str();
  const char* name = picked.second.c_str();
  const hid_t where = H5Oopen(file, object, H5P_DEFAULT);
  if (where < 0) return;
  if (H5Aexists(where, name) > 0) H5Adelete(where, name);
  const auto attribute = [&](hid_t file_type, hid_t mem_type, hid_t space, const void* value) {
    const hid_t a = H5Acreate2(where, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    if (a < 0) return;
    if (value) H5Awrite(a, mem_type, value);
    H5Aclose(a);
  };
  const hid_t space = H5Screate(H5S_SCALAR);
  switch (in.ConsumeIntegralInRange(0, 3)) {
    case 0: {
      const std::int64_t v = in.ConsumeIntegral<std::int64_t>();
      attribute(H5T_STD_I64LE, H5T_NATIVE_INT64, space, &v);
      break;
    }
    case 1: {
      const double v = in.ConsumeFloatingPoint<double>();
      attribute(H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, space, &v);
      break;
    }
    case 2: {
      const std::string v = in.ConsumeRandomLengthString(40);
      const hid_t type = H5Tcopy(H5T_C_S1);
      H5Tset_size(type, v.size() + 1);
      attribute(type, type, space, v.c_str());
      H5Tclose(type);
      break;
    }
    default: {  // an array where a scalar belongs
      const hsize_t n = in.ConsumeIntegralInRange<hsize_t>(0, 4);
      const hid_t s = H5Screate_simple(1, &n, nullptr);
      const std::vector<std::int64_t> v(n, in.ConsumeIntegral<std::int64_t>());
      attribute(H5T_STD_I64LE, H5T_NATIVE_INT64, s, n > 0 ? v.data() : nullptr);
      H5Sclose(s);
    }
  }
  H5Sclose(space);
  H5Oclose(where);
}

void replace_dataset(hid_t file, FuzzedDataProvider& in) {
  const char* name = in.PickValueInArray(kObjects);
  if (H5Lexists(file, name, H5P_DEFAULT) > 0) H5Ldelete(file, name, H5P_DEFAULT);
  const int rank = in.ConsumeIntegralInRange(0, 3);
  std::array<hsize_t, 3> dims{};
  hsize_t count = 1;
  for (int i = 0; i < rank; ++i) count *= (dims[std::size_t(i)] = in.ConsumeIntegralInRange<hsize_t>(0, 5));
  const hid_t space = rank == 0 ? H5Screate(H5S_SCALAR) : H5Screate_simple(rank, dims.data(), nullptr);
  const bool is_float = in.ConsumeBool();
  const hid_t type = is_float ? H5T_IEEE_F32LE : H5T_STD_I32LE;
  const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  const hid_t d = H5Dcreate2(file, name, type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
  if (d >= 0 && count > 0) {
    std::vector<float> values(count, in.ConsumeFloatingPoint<float>());
    std::vector<std::int32_t> ints(count, in.ConsumeIntegral<std::int32_t>());
    H5Dwrite(d, is_float ? H5T_NATIVE_FLOAT : H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT,
             is_float ? static_cast<const void*>(values.data()) : ints.data());
  }
  if (d >= 0) H5Dclose(d);
  H5Pclose(lcpl);
  H5Sclose(space);
}

void overwrite_values(hid_t file, FuzzedDataProvider& in) {
  const hid_t d = H5Dopen2(file, in.PickValueInArray(kObjects), H5P_DEFAULT);
  if (d < 0) return;
  const hid_t space = H5Dget_space(d);
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  const hid_t type = H5Dget_type(d);
  if (n > 0 && n < 4096 && H5Tget_class(type) == H5T_FLOAT) {
    std::vector<float> values(std::size_t(n), in.ConsumeFloatingPoint<float>());
    H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data());
  }
  H5Tclose(type);
  H5Sclose(space);
  H5Dclose(d);
}

void check_consistent(const sp::Checkpoint& c) {
  const sp::Layout layout(c.spec);
  if (c.params.size() != layout.size()) std::abort();
  if (c.has_training_state &&
      c.optimizer_state.size() !=
          sp::optimizer_slots(sp::parse_optimizer(c.settings.optimizer)).size() * layout.size()) {
    std::abort();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const std::string path = sp::fuzz::scratch("checkpoint.h5");
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  FuzzedDataProvider in(data, size);
  const sp::Checkpoint c = valid(in);
  sp::save_checkpoint(path, c);
  {
    const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    if (file < 0) std::abort();
    const int edits = in.ConsumeIntegralInRange(1, 6);
    for (int e = 0; e < edits && in.remaining_bytes() > 0; ++e) {
      switch (in.ConsumeIntegralInRange(0, 3)) {
        case 0: set_attribute(file, in); break;
        case 1: H5Ldelete(file, in.PickValueInArray(kObjects), H5P_DEFAULT); break;
        case 2: replace_dataset(file, in); break;
        default: overwrite_values(file, in);
      }
    }
    H5Fclose(file);
  }
  for (const bool verify : {true, false}) {
    try {
      check_consistent(sp::load_checkpoint(path, verify));
    } catch (const sp::Error&) {
    }
  }
  return 0;
}
