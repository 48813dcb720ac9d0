#include "shardprop/checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>
#include <type_traits>

#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/h5.hpp"
#include "shardprop/rng.hpp"

namespace shardprop {

namespace fs = std::filesystem;

namespace {

// ---- attributes -------------------------------------------------------------------------

void write_attr(hid_t where, const char* name, hid_t file_type, hid_t mem_type, const void* value) {
  h5::Handle space(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  h5::Handle attr(H5Acreate2(where, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                  H5Aclose, std::string("creating attribute ") + name);
  h5::check(H5Awrite(attr.get(), mem_type, value), std::string("writing attribute ") + name);
  attr.close(std::string("closing attribute ") + name);
}

void write_attr(hid_t where, const char* name, const std::string& value) {
  h5::Handle type(H5Tcopy(H5T_C_S1), H5Tclose, "creating a string type");
  h5::check(H5Tset_size(type.get(), value.size() + 1), "sizing a string type");
  write_attr(where, name, type.get(), type.get(), value.c_str());
}
void write_attr(hid_t where, const char* name, std::int64_t value) {
  write_attr(where, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &value);
}
void write_attr(hid_t where, const char* name, std::uint64_t value) {
  write_attr(where, name, H5T_STD_U64LE, H5T_NATIVE_UINT64, &value);
}
void write_attr(hid_t where, const char* name, double value) {
  write_attr(where, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &value);
}

// Reads the attributes of one object, naming the file and object in every error.
class AttrReader {
 public:
  AttrReader(hid_t where, std::string file, std::string object)
      : where_(where), file_(std::move(file)), object_(std::move(object)) {}

  std::string text(const char* name) const {
    h5::Handle attr = open(name);
    h5::Handle type(H5Aget_type(attr.get()), H5Tclose, where(name) + ": reading its type");
    SP_CHECK(H5Tget_class(type.get()) == H5T_STRING && H5Tis_variable_str(type.get()) == 0,
             where(name), " must be a fixed-length string");
    const std::size_t size = H5Tget_size(type.get());
    SP_CHECK(size > 0 && size < (1u << 20), where(name), " has a bad size");
    std::string value(size, '\0');
    h5::check(H5Aread(attr.get(), type.get(), value.data()), where(name) + ": reading");
    value.resize(std::min(value.find('\0'), size));
    return value;
  }
  std::int64_t int64(const char* name) const { return number<std::int64_t>(name, H5T_NATIVE_INT64); }
  std::uint64_t uint64(const char* name) const {
    return number<std::uint64_t>(name, H5T_NATIVE_UINT64);
  }
  double real(const char* name) const { return number<double>(name, H5T_NATIVE_DOUBLE); }
  // A count that must be >= 0.
  std::uint64_t count(const char* name) const {
    const std::int64_t v = int64(name);
    SP_CHECK(v >= 0, where(name), " is negative (", v, ")");
    return std::uint64_t(v);
  }
  bool has(const char* name) const {
    const htri_t exists = H5Aexists(where_, name);
    h5::check(exists, where(name) + ": looking it up");
    return exists > 0;
  }

 private:
  std::string where(const char* name) const {
    return file_ + ": attribute '" + object_ + name + "'";
  }
  h5::Handle open(const char* name) const {
    SP_CHECK(has(name), file_, ": missing attribute '", object_, name, "'");
    return h5::Handle(H5Aopen(where_, name, H5P_DEFAULT), H5Aclose, where(name) + ": opening");
  }
  template <class T>
  T number(const char* name, hid_t mem_type) const {
    h5::Handle attr = open(name);
    h5::Handle type(H5Aget_type(attr.get()), H5Tclose, where(name) + ": reading its type");
    const H5T_class_t cls = H5Tget_class(type.get());
    SP_CHECK(cls == H5T_INTEGER || cls == H5T_FLOAT, where(name), " must be a number");
    h5::Handle space(H5Aget_space(attr.get()), H5Sclose, where(name) + ": reading its shape");
    SP_CHECK(H5Sget_simple_extent_npoints(space.get()) == 1, where(name), " must be a scalar");
    T value{};
    h5::check(H5Aread(attr.get(), mem_type, &value), where(name) + ": reading");
    return value;
  }

  hid_t where_;
  std::string file_, object_;
};

h5::Handle create_group(hid_t where, const std::string& name) {
  return h5::Handle(H5Gcreate2(where, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                    H5Gclose, "creating group " + name);
}

h5::Handle open_group(hid_t file, const std::string& name, const std::string& path) {
  SP_CHECK(h5::has_link(file, name), path, ": missing group '/", name, "'");
  return h5::Handle(H5Gopen2(file, name.c_str(), H5P_DEFAULT), H5Gclose,
                    path + ": opening group '/" + name + "'");
}

// Checks that every link on the way to `name` exists (H5Lexists needs the parents).
bool has_path(hid_t file, const std::string& name) {
  for (std::size_t slash = name.find('/'); slash != std::string::npos;
       slash = name.find('/', slash + 1)) {
    if (!h5::has_link(file, name.substr(0, slash))) return false;
  }
  return h5::has_link(file, name);
}

// ---- per-layer float blocks -----------------------------------------------------------------

// Writes buffer (in Layout order) as <group>/layer_<i>/W and b.
void write_layers(hid_t file, const std::string& group, const Layout& layout, const float* buffer) {
  h5::Handle g = create_group(file, group);
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const std::string name = "layer_" + std::to_string(l);
    h5::Handle layer = create_group(g.get(), name);
    const Layout::Block& b = layout.block(l);
    h5::write_dataset(layer.get(), "W", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {b.in, b.out},
                      buffer + b.w_offset);
    h5::write_dataset(layer.get(), "b", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, {b.out},
                      buffer + b.b_offset);
    layer.close("closing " + group + "/" + name);
  }
  g.close("closing " + group);
}

void read_layers(hid_t file, const std::string& group, const Layout& layout,
                 const std::string& layers, const std::string& path, float* buffer) {
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const Layout::Block& b = layout.block(l);
    for (const char* part : {"W", "b"}) {
      const std::string name = group + "/layer_" + std::to_string(l) + "/" + part;
      SP_CHECK(has_path(file, name), path, ": no dataset '/", name, "'");
      h5::Handle dataset = h5::open_dataset(file, name, path);
      const auto info = h5::dataset_info(dataset.get(), path + ": /" + name);
      const bool is_w = part[0] == 'W';
      const std::vector<hsize_t> want = is_w ? std::vector<hsize_t>{b.in, b.out}
                                             : std::vector<hsize_t>{b.out};
      SP_CHECK(info.type_class == H5T_FLOAT && info.dims == want, path, ": /", name,
               " has the wrong type or shape for --layers ", layers);
      h5::read_all(dataset.get(), H5T_NATIVE_FLOAT, buffer + (is_w ? b.w_offset : b.b_offset),
                   path + ": reading /" + name);
    }
  }
}

void fsync_path(const std::string& path, int flags) {
  const int fd = ::open(path.c_str(), flags);
  SP_CHECK(fd >= 0, path, ": cannot open to sync: ", std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  SP_CHECK(rc == 0, path, ": fsync failed: ", std::strerror(err));
}

fs::path parent_dir(const fs::path& target) {
  return target.has_parent_path() ? target.parent_path() : fs::path(".");
}

// Writes `path` through path.tmp: `write` fills the temporary file, which is then fsynced
// and renamed over `path`; the directory is fsynced so the rename itself is durable.
template <class Write>
void write_atomically(const std::string& path, Write&& write) {
  const fs::path target(path);
  fs::path tmp = target;
  tmp += ".tmp";
  try {
    write(tmp.string());
    fsync_path(tmp.string(), O_RDONLY);
  } catch (...) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  fs::rename(tmp, target, ec);
  if (ec) {
    std::error_code ignored;
    fs::remove(tmp, ignored);
    SP_THROW(path, ": cannot rename ", tmp.string(), " into place: ", ec.message());
  }
  fsync_path(parent_dir(target).string(), O_RDONLY | O_DIRECTORY);
}

void write_file(const std::string& path, const Checkpoint& c) {
  const Layout layout(c.spec);
  h5::Handle file = h5::create_file(path);
  const hid_t root = file.get();
  write_attr(root, "format", std::string(kCheckpointFormat));
  write_attr(root, "format_version", kCheckpointVersion);
  write_attr(root, "layers", c.spec.layers_string());
  write_attr(root, "loss", std::string(to_string(c.spec.loss)));
  write_attr(root, "step", std::int64_t(c.state.step));
  write_attr(root, "epoch", std::int64_t(c.state.epoch));
  write_attr(root, "batch_in_epoch", std::int64_t(c.state.batch_in_epoch));
  write_attr(root, "world_size", c.world_size);
  write_attr(root, "threads", c.threads);
  write_attr(root, "checksum_crc32", std::int64_t(checkpoint_checksum(c)));
  write_layers(root, "params", layout, c.params.data());

  const OptimizerConfig& o = c.config.optimizer;
  {
    h5::Handle opt = create_group(root, "optimizer");
    write_attr(opt.get(), "kind", std::string(to_string(o.kind)));
    write_attr(opt.get(), "lr", o.lr);
    write_attr(opt.get(), "momentum", o.momentum);
    write_attr(opt.get(), "weight_decay", o.weight_decay);
    write_attr(opt.get(), "beta1", o.beta1);
    write_attr(opt.get(), "beta2", o.beta2);
    write_attr(opt.get(), "eps", o.eps);
    write_attr(opt.get(), "steps", std::int64_t(c.optimizer_steps));
    const auto slots = optimizer_slots(o.kind);
    for (std::size_t s = 0; s < slots.size(); ++s) {
      write_layers(opt.get(), slots[s], layout, c.optimizer_state.data() + s * layout.size());
    }
    opt.close("closing /optimizer");
  }
  {
    h5::Handle train = create_group(root, "train");
    write_attr(train.get(), "batch", std::int64_t(c.config.batch));
    write_attr(train.get(), "epochs", std::int64_t(c.config.epochs));
    write_attr(train.get(), "max_steps", c.config.max_steps);
    write_attr(train.get(), "seed", c.config.seed);
    write_attr(train.get(), "eval_batch", std::int64_t(c.config.eval_batch));
    write_attr(train.get(), "deterministic_chunk", std::int64_t(c.config.deterministic_chunk));
    write_attr(train.get(), "lr_schedule", std::string(c.config.cosine_schedule ? "cosine" : "constant"));
    write_attr(train.get(), "train_rows", std::int64_t(c.train_rows));
    write_attr(train.get(), "train_cols", std::int64_t(c.train_cols));
    train.close("closing /train");
  }
  {
    h5::Handle rng = create_group(root, "rng");
    const Rng order = epoch_rng(c.config.seed, c.state.epoch);
    h5::write_dataset(rng.get(), "epoch_order", H5T_STD_U64LE, H5T_NATIVE_UINT64, {4},
                      order.state().data());
    rng.close("closing /rng");
  }
  h5::store(file, path);
}

void read_training_state(hid_t file, const std::string& path, const Layout& layout,
                         Checkpoint& c) {
  const AttrReader root(file, path, "");
  c.state.step = root.count("step");
  c.state.epoch = root.count("epoch");
  c.state.batch_in_epoch = root.count("batch_in_epoch");
  c.world_size = root.int64("world_size");
  c.threads = root.int64("threads");

  h5::Handle train = open_group(file, "train", path);
  const AttrReader t(train.get(), path, "/train/");
  c.config.batch = t.count("batch");
  c.config.epochs = t.count("epochs");
  c.config.max_steps = t.int64("max_steps");
  c.config.seed = t.uint64("seed");
  c.config.eval_batch = t.count("eval_batch");
  // Absent in checkpoints written before the deterministic mode existed: the default mode.
  c.config.deterministic_chunk = t.has("deterministic_chunk") ? t.count("deterministic_chunk") : 0;
  const std::string schedule = t.text("lr_schedule");
  SP_CHECK(schedule == "constant" || schedule == "cosine", path,
           ": unknown /train/lr_schedule '", schedule, "'");
  c.config.cosine_schedule = schedule == "cosine";
  c.train_rows = t.count("train_rows");
  c.train_cols = t.count("train_cols");
  SP_CHECK(c.config.batch > 0 && c.train_rows > 0, path, ": /train has a zero batch or data size");
  const std::uint64_t batches = (c.train_rows + c.config.batch - 1) / c.config.batch;
  SP_CHECK(c.state.batch_in_epoch < batches, path, ": batch_in_epoch ", c.state.batch_in_epoch,
           " is past the end of an epoch of ", batches, " batches");

  h5::Handle opt = open_group(file, "optimizer", path);
  const AttrReader o(opt.get(), path, "/optimizer/");
  OptimizerConfig& oc = c.config.optimizer;
  try {
    oc.kind = parse_optimizer(o.text("kind"));
  } catch (const Error& e) {
    SP_THROW(path, ": /optimizer: ", e.message());
  }
  oc.lr = o.real("lr");
  oc.momentum = o.real("momentum");
  oc.weight_decay = o.real("weight_decay");
  oc.beta1 = o.real("beta1");
  oc.beta2 = o.real("beta2");
  oc.eps = o.real("eps");
  c.optimizer_steps = o.count("steps");
  SP_CHECK(c.optimizer_steps == c.state.step, path, ": optimizer steps ", c.optimizer_steps,
           " differ from the global step ", c.state.step);
  const auto slots = optimizer_slots(oc.kind);
  c.optimizer_state.assign(slots.size() * layout.size(), 0.0f);
  for (std::size_t s = 0; s < slots.size(); ++s) {
    read_layers(file, "optimizer/" + slots[s], layout, c.spec.layers_string(), path,
                c.optimizer_state.data() + s * layout.size());
  }

  // The sample order of an epoch is drawn from (seed, epoch); the stored generator state
  // must be the one those give.
  SP_CHECK(has_path(file, "rng/epoch_order"), path, ": no dataset '/rng/epoch_order'");
  h5::Handle order = h5::open_dataset(file, "rng/epoch_order", path);
  const auto info = h5::dataset_info(order.get(), path + ": /rng/epoch_order");
  SP_CHECK(info.type_class == H5T_INTEGER && info.dims == std::vector<hsize_t>{4}, path,
           ": /rng/epoch_order must hold 4 integers");
  std::uint64_t stored[4];
  h5::read_all(order.get(), H5T_NATIVE_UINT64, stored, path + ": reading /rng/epoch_order");
  const Rng expected = epoch_rng(c.config.seed, c.state.epoch);
  SP_CHECK(std::equal(expected.state().begin(), expected.state().end(), stored), path,
           ": /rng/epoch_order does not match seed ", c.config.seed, " and epoch ", c.state.epoch);
  c.has_training_state = true;
}

// ---- broadcasting -----------------------------------------------------------------------------

// Packs or unpacks the same fields in the same order.
class Wire {
 public:
  explicit Wire(std::vector<std::byte>* out) : out_(out) {}
  explicit Wire(std::span<const std::byte> in) : in_(in) {}

  template <class T>
  void operator()(T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes(&value, sizeof value);
  }
  void operator()(std::string& s) {
    std::uint64_t n = s.size();
    (*this)(n);
    if (!out_) s.resize(n);
    bytes(s.data(), n);
  }
  void operator()(AlignedVector<float>& v) {
    std::uint64_t n = v.size();
    (*this)(n);
    if (!out_) v.resize(n);
    bytes(v.data(), n * sizeof(float));
  }

 private:
  void bytes(void* p, std::size_t n) {
    if (out_) {
      const auto* b = static_cast<const std::byte*>(p);
      out_->insert(out_->end(), b, b + n);
    } else {
      SP_CHECK(pos_ + n <= in_.size(), "checkpoint broadcast is truncated");
      std::memcpy(p, in_.data() + pos_, n);
      pos_ += n;
    }
  }
  std::vector<std::byte>* out_ = nullptr;
  std::span<const std::byte> in_;
  std::size_t pos_ = 0;
};

template <class Io>
void wire_fields(Io& io, Checkpoint& c, std::string& layers, std::string& loss) {
  io(layers), io(loss), io(c.params), io(c.format_version), io(c.has_training_state);
  TrainConfig& t = c.config;
  io(t.batch), io(t.epochs), io(t.max_steps), io(t.seed), io(t.eval_batch), io(t.cosine_schedule);
  io(t.deterministic_chunk);
  OptimizerConfig& o = t.optimizer;
  io(o.kind), io(o.lr), io(o.momentum), io(o.weight_decay), io(o.beta1), io(o.beta2), io(o.eps);
  io(c.state.step), io(c.state.epoch), io(c.state.batch_in_epoch);
  io(c.optimizer_steps), io(c.optimizer_state), io(c.train_rows), io(c.train_cols);
  io(c.world_size), io(c.threads), io(c.checksum);
}

std::uint64_t step_of(const fs::path& file) {
  const std::string name = file.filename().string();
  constexpr std::string_view prefix = "ckpt-", suffix = ".h5";
  if (name.size() <= prefix.size() + suffix.size() || !name.starts_with(prefix) ||
      !name.ends_with(suffix)) {
    return UINT64_MAX;
  }
  const char* begin = name.data() + prefix.size();
  const char* end = name.data() + name.size() - suffix.size();
  std::uint64_t step = 0;
  const auto [ptr, ec] = std::from_chars(begin, end, step);
  return ec == std::errc() && ptr == end ? step : UINT64_MAX;
}

}  // namespace

std::vector<std::string> optimizer_slots(OptimizerKind kind) {
  if (kind == OptimizerKind::adam) return {"m", "v"};
  return {"velocity"};
}

std::uint32_t checkpoint_checksum(const Checkpoint& c) {
  const Layout layout(c.spec);
  uLong crc = crc32_z(0, nullptr, 0);
  const auto add = [&](const float* buffer) {
    for (std::size_t l = 0; l < layout.layer_count(); ++l) {
      const Layout::Block& b = layout.block(l);
      crc = crc32_z(crc, reinterpret_cast<const Bytef*>(buffer + b.w_offset),
                    b.in * b.out * sizeof(float));
      crc = crc32_z(crc, reinterpret_cast<const Bytef*>(buffer + b.b_offset), b.out * sizeof(float));
    }
  };
  add(c.params.data());
  for (std::size_t s = 0; s * layout.size() < c.optimizer_state.size(); ++s) {
    add(c.optimizer_state.data() + s * layout.size());
  }
  return std::uint32_t(crc);
}

Checkpoint make_checkpoint(const Trainer& trainer, int world_size, int threads) {
  Checkpoint c;
  c.spec = trainer.spec();
  c.params.assign(trainer.params().begin(), trainer.params().end());
  c.has_training_state = true;
  c.config = trainer.config();
  c.config.stop_at_step = -1;  // belongs to one invocation, not to the run
  c.state = trainer.state();
  c.optimizer_steps = trainer.optimizer().steps();
  c.optimizer_state.assign(trainer.optimizer().state().begin(), trainer.optimizer().state().end());
  c.train_rows = trainer.train_data().rows;
  c.train_cols = trainer.train_data().cols;
  c.world_size = world_size;
  c.threads = threads;
  c.checksum = checkpoint_checksum(c);
  return c;
}

void restore_checkpoint(Trainer& trainer, const Checkpoint& c) {
  SP_CHECK(c.has_training_state, "the checkpoint holds a model without training state");
  SP_CHECK(c.spec.layers_string() == trainer.spec().layers_string() &&
               c.spec.loss == trainer.spec().loss,
           "checkpoint model ", c.spec.layers_string(), " does not match the trainer's ",
           trainer.spec().layers_string());
  SP_CHECK(c.config.optimizer.kind == trainer.config().optimizer.kind &&
               c.optimizer_state.size() == trainer.optimizer().state().size(),
           "checkpoint optimizer ", to_string(c.config.optimizer.kind),
           " does not match the trainer's ", to_string(trainer.config().optimizer.kind));
  std::copy(c.params.begin(), c.params.end(), trainer.params().begin());
  std::copy(c.optimizer_state.begin(), c.optimizer_state.end(),
            trainer.optimizer().state().begin());
  trainer.optimizer().set_steps(c.optimizer_steps);
  trainer.state() = c.state;
}

void save_checkpoint(const std::string& path, const Checkpoint& c) {
  const Layout layout(c.spec);
  SP_CHECK(c.params.size() == layout.size(), "model has ", c.params.size(),
           " parameters, expected ", layout.size());
  SP_CHECK(c.has_training_state, path, ": a checkpoint needs the training state");
  SP_CHECK(c.optimizer_state.size() == optimizer_slots(c.config.optimizer.kind).size() * layout.size(),
           "optimizer state has ", c.optimizer_state.size(), " values, expected ",
           optimizer_slots(c.config.optimizer.kind).size() * layout.size());
  write_atomically(path, [&](const std::string& tmp) { write_file(tmp, c); });
}

bool is_checkpoint_file(const std::string& path) {
  h5::Handle file = h5::open_file(path);
  return AttrReader(file.get(), path, "").has("format");
}

Checkpoint load_checkpoint(const std::string& path, bool verify_checksum) {
  h5::Handle file = h5::open_file(path);
  const AttrReader root(file.get(), path, "");
  const std::string format = root.text("format");
  SP_CHECK(format == kCheckpointFormat, path, ": format '", format, "' is not ", kCheckpointFormat);
  Checkpoint c;
  c.format_version = root.int64("format_version");
  SP_CHECK(c.format_version == 1 || c.format_version == kCheckpointVersion, path,
           ": format_version ", c.format_version, " is not supported (this build reads 1 and ",
           kCheckpointVersion, ")");
  try {
    c.spec = parse_model(root.text("layers"), root.text("loss"));
  } catch (const Error& e) {
    SP_THROW(path, ": bad model description: ", e.message());
  }
  const Layout layout(c.spec);
  c.params.assign(layout.size(), 0.0f);
  read_layers(file.get(), "params", layout, c.spec.layers_string(), path, c.params.data());
  if (c.format_version == 1) {
    c.state.step = root.count("step");
    c.state.epoch = root.count("epoch");
    c.checksum = checkpoint_checksum(c);
    return c;
  }
  read_training_state(file.get(), path, layout, c);
  const std::int64_t stored = root.int64("checksum_crc32");
  SP_CHECK(stored >= 0 && stored <= std::int64_t(UINT32_MAX), path,
           ": attribute 'checksum_crc32' is out of range");
  c.checksum = std::uint32_t(stored);
  if (verify_checksum) {
    const std::uint32_t computed = checkpoint_checksum(c);
    SP_CHECK(c.checksum == computed, path, ": checksum mismatch (file says ", c.checksum,
             ", contents give ", computed, "): the checkpoint is corrupt");
  }
  return c;
}

void broadcast_checkpoint(Communicator& comm, Checkpoint& c, int root) {
  std::vector<std::byte> bytes;
  std::string layers, loss;
  if (comm.rank() == root) {
    layers = c.spec.layers_string();
    loss = std::string(to_string(c.spec.loss));
    Wire out(&bytes);
    wire_fields(out, c, layers, loss);
  }
  std::uint64_t size = bytes.size();
  comm.broadcast_values(std::span<std::uint64_t>(&size, 1), root);
  bytes.resize(size);
  comm.broadcast(bytes, root);
  if (comm.rank() == root) return;
  Wire in{std::span<const std::byte>(bytes)};
  wire_fields(in, c, layers, loss);
  c.spec = parse_model(layers, loss);
}

// ---- directories ------------------------------------------------------------------------------

CheckpointDir::CheckpointDir(std::string dir, std::size_t keep) : dir_(std::move(dir)), keep_(keep) {
  SP_CHECK(keep_ >= 1, "--keep-checkpoints must be at least 1");
  std::error_code ec;
  fs::create_directories(dir_, ec);
  SP_CHECK(!ec, "--checkpoint-dir ", dir_, ": cannot create: ", ec.message());
  SP_CHECK(fs::is_directory(dir_, ec), "--checkpoint-dir ", dir_, ": not a directory");
  SP_CHECK(::access(dir_.c_str(), W_OK | X_OK) == 0, "--checkpoint-dir ", dir_,
           ": not writable: ", std::strerror(errno));
  // Temporary files are only ever left by a writer that was killed; they are never read.
  for (const auto& entry : fs::directory_iterator(dir_, ec)) {
    const fs::path& p = entry.path();
    if (p.extension() != ".tmp") continue;
    const fs::path stem = p.stem();
    std::error_code ignored;
    if (step_of(stem) != UINT64_MAX || stem.filename() == "latest") fs::remove(p, ignored);
  }
  SP_CHECK(!ec, "--checkpoint-dir ", dir_, ": cannot list: ", ec.message());
}

std::string CheckpointDir::file_name(std::uint64_t step) {
  char name[40];
  std::snprintf(name, sizeof name, "ckpt-%09llu.h5", static_cast<unsigned long long>(step));
  return name;
}

std::string CheckpointDir::write(const Checkpoint& c) {
  const fs::path file = fs::path(dir_) / file_name(c.state.step);
  save_checkpoint(file.string(), c);
  const fs::path latest = fs::path(dir_) / "latest";
  const std::string text = file.filename().string() + "\n";
  write_atomically(latest.string(), [&](const std::string& tmp) {
    h5::write_bytes(tmp, std::as_bytes(std::span(text)));
  });
  // Only now that the new checkpoint and the pointer are in place do older ones go.
  const std::vector<std::string> all = list_checkpoints(dir_);
  for (std::size_t i = keep_; i < all.size(); ++i) {
    std::error_code ec;
    fs::remove(all[i], ec);
    SP_CHECK(!ec, all[i], ": cannot delete an old checkpoint: ", ec.message());
  }
  return file.string();
}

std::vector<std::string> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<std::uint64_t, std::string>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::uint64_t step = step_of(entry.path());
    if (step != UINT64_MAX && entry.is_regular_file(ec)) found.emplace_back(step, entry.path().string());
  }
  SP_CHECK(!ec, dir, ": cannot list: ", ec.message());
  std::sort(found.begin(), found.end(), std::greater<>());
  std::vector<std::string> paths;
  for (auto& [step, path] : found) paths.push_back(std::move(path));
  return paths;
}

ResumePoint find_resume_point(const std::string& path) {
  std::error_code ec;
  SP_CHECK(fs::exists(path, ec), "--resume ", path, ": no such file or directory");
  ResumePoint point;
  if (!fs::is_directory(path, ec)) {
    point.path = path;
    point.checkpoint = load_checkpoint(path);
  } else {
    const std::vector<std::string> files = list_checkpoints(path);
    SP_CHECK(!files.empty(), "--resume ", path, ": no checkpoints (ckpt-<step>.h5) in the directory");
    for (const std::string& file : files) {
      try {
        point.checkpoint = load_checkpoint(file);
        point.path = file;
        break;
      } catch (const Error& e) {
        point.skipped.push_back(e.message());
      }
    }
    SP_CHECK(!point.path.empty(), "--resume ", path, ": none of its ", files.size(),
             " checkpoints verifies; the newest: ", point.skipped.front());
  }
  SP_CHECK(point.checkpoint.has_training_state, point.path,
           ": format_version 1 holds the model only and cannot be resumed");
  return point;
}

}  // namespace shardprop
