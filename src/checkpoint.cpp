#include "shardprop/checkpoint.hpp"

#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <charconv>
#include <cstring>
#include <filesystem>

#include "fileio.hpp"
#include "h5.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/rng.hpp"

namespace shardprop {

namespace fs = std::filesystem;

namespace {

// ---- per-layer float blocks -----------------------------------------------------------------

// Writes buffer (in Layout order) as <group>/layer_<i>/W and b.
void write_layers(hid_t file, const std::string& group, const Layout& layout, const float* buffer) {
  h5::Handle g = h5::create_group(file, group);
  for (std::size_t l = 0; l < layout.layer_count(); ++l) {
    const std::string name = "layer_" + std::to_string(l);
    h5::Handle layer = h5::create_group(g.get(), name);
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
      SP_CHECK(h5::has_path(file, name), path, ": no dataset '/", name, "'");
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

// ---- the settings table's attributes ------------------------------------------------------

// "/train/lr" is attribute "lr" of group "train"; "/layers" is "layers" of the root.
std::pair<std::string, std::string> split_attribute(const char* attribute) {
  const std::string_view a(attribute);
  const std::size_t slash = a.rfind('/');
  return {std::string(a.substr(1, slash == 0 ? 0 : slash - 1)), std::string(a.substr(slash + 1))};
}

// The group of `file` an attribute lives in: the root, or a group opened on demand.
class Groups {
 public:
  Groups(hid_t file, std::string path) : file_(file), path_(std::move(path)) {}
  hid_t get(const std::string& group) {
    if (group.empty()) return file_;
    for (auto& [name, handle] : open_) {
      if (name == group) return handle.get();
    }
    open_.emplace_back(group, h5::open_group(file_, group, path_));
    return open_.back().second.get();
  }

 private:
  hid_t file_;
  std::string path_;
  std::vector<std::pair<std::string, h5::Handle>> open_;
};

void write_settings(Groups& groups, const Settings& s) {
  for (const SettingSpec& spec : settings_table()) {
    if (!spec.attribute) continue;
    // Named, not bound: clang 14 cannot capture structured bindings in the lambda below.
    const auto parts = split_attribute(spec.attribute);
    const std::string& name = parts.second;
    const hid_t where = groups.get(parts.first);
    std::visit(
        [&](auto member) {
          const auto& v = s.*member;
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, bool>) {
            h5::write_attr(where, name.c_str(), std::int64_t(v ? 1 : 0));
          } else {
            h5::write_attr(where, name.c_str(), v);
          }
        },
        spec.field);
  }
}

void read_settings(Groups& groups, const std::string& path, std::int64_t version, Settings& s) {
  for (const SettingSpec& spec : settings_table()) {
    if (!spec.attribute || version < spec.since_version) continue;
    const auto parts = split_attribute(spec.attribute);
    const std::string &group = parts.first, &name = parts.second;
    const h5::AttrReader r(groups.get(group), path, group.empty() ? "" : "/" + group + "/");
    std::visit(
        [&](auto member) {
          auto& v = s.*member;
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, std::string>) {
            v = r.text(name.c_str());
          } else if constexpr (std::is_same_v<T, bool>) {
            v = r.int64(name.c_str()) != 0;
          } else if constexpr (std::is_same_v<T, double>) {
            v = r.real(name.c_str());
          } else if constexpr (std::is_same_v<T, std::int64_t>) {
            v = r.int64(name.c_str());
          } else {
            v = r.count(name.c_str());
          }
        },
        spec.field);
    try {
      check_setting(spec, s);
    } catch (const Error& e) {
      SP_THROW(path, ": attribute '", spec.attribute, "' (", e.message(), ")");
    }
  }
  if (version == 2) {
    // Version 2 kept the deterministic mode as one number: the chunk, or 0 for off.
    const h5::AttrReader t(groups.get("train"), path, "/train/");
    if (t.has("deterministic_chunk")) {
      const std::uint64_t chunk = t.count("deterministic_chunk");
      s.deterministic = chunk > 0;
      if (chunk > 0) s.chunk = chunk;
    }
  }
}

// ---- files ------------------------------------------------------------------------------------

std::vector<std::byte> encode(const Checkpoint& c) {
  const Layout layout(c.spec);
  const std::string name = "checkpoint";
  h5::Handle file = h5::create_file(name);
  const hid_t root = file.get();
  h5::write_attr(root, "format", std::string(kCheckpointFormat));
  h5::write_attr(root, "format_version", kCheckpointVersion);
  h5::write_attr(root, "step", std::int64_t(c.state.step));
  h5::write_attr(root, "epoch", std::int64_t(c.state.epoch));
  h5::write_attr(root, "batch_in_epoch", std::int64_t(c.state.batch_in_epoch));
  h5::write_attr(root, "best_metric", c.state.best_metric);
  h5::write_attr(root, "best_epoch", std::int64_t(c.state.best_epoch));
  h5::write_attr(root, "epochs_without_improvement",
                 std::int64_t(c.state.epochs_without_improvement));
  h5::write_attr(root, "world_size", c.world_size);
  h5::write_attr(root, "threads", c.threads);
  h5::write_attr(root, "checksum_crc32", std::int64_t(checkpoint_checksum(c)));
  write_layers(root, "params", layout, c.params.data());
  {
    h5::Handle opt = h5::create_group(root, "optimizer");
    h5::write_attr(opt.get(), "steps", std::int64_t(c.optimizer_steps));
    const auto slots = optimizer_slots(parse_optimizer(c.settings.optimizer));
    for (std::size_t s = 0; s < slots.size(); ++s) {
      write_layers(opt.get(), slots[s], layout, c.optimizer_state.data() + s * layout.size());
    }
    opt.close("closing /optimizer");
  }
  {
    h5::Handle train = h5::create_group(root, "train");
    h5::write_attr(train.get(), "train_rows", std::int64_t(c.train_rows));
    h5::write_attr(train.get(), "train_cols", std::int64_t(c.train_cols));
    train.close("closing /train");
  }
  Groups groups(root, name);
  write_settings(groups, c.settings);
  {
    h5::Handle rng = h5::create_group(root, "rng");
    const Rng r = epoch_rng(c.settings.seed, c.state.epoch);
    h5::write_dataset(rng.get(), "epoch_order", H5T_STD_U64LE, H5T_NATIVE_UINT64, {4},
                      r.state().data());
    rng.close("closing /rng");
  }
  return h5::image(file, name);
}

void read_training_state(hid_t file, const std::string& path, const Layout& layout,
                         Checkpoint& c) {
  const h5::AttrReader root(file, path, "");
  c.state.step = root.count("step");
  c.state.epoch = root.count("epoch");
  c.state.batch_in_epoch = root.count("batch_in_epoch");
  if (c.format_version >= 5) {
    c.state.best_metric = root.real("best_metric");
    c.state.best_epoch = root.count("best_epoch");
    c.state.epochs_without_improvement = root.count("epochs_without_improvement");
    SP_CHECK(c.state.best_epoch <= c.state.epoch &&
                 c.state.epochs_without_improvement <= c.state.epoch,
             path, ": the best epoch ", c.state.best_epoch, " or the epochs without improvement ",
             c.state.epochs_without_improvement, " are past the epochs done (", c.state.epoch, ")");
  }
  c.world_size = root.int64("world_size");
  c.threads = root.int64("threads");

  h5::Handle train = h5::open_group(file, "train", path);
  const h5::AttrReader t(train.get(), path, "/train/");
  c.train_rows = t.count("train_rows");
  c.train_cols = t.count("train_cols");
  SP_CHECK(c.train_rows > 0, path, ": /train has a zero data size");
  const std::uint64_t batches = (c.train_rows + c.settings.batch - 1) / c.settings.batch;
  SP_CHECK(c.state.batch_in_epoch < batches, path, ": batch_in_epoch ", c.state.batch_in_epoch,
           " is past the end of an epoch of ", batches, " batches");

  h5::Handle opt = h5::open_group(file, "optimizer", path);
  const h5::AttrReader o(opt.get(), path, "/optimizer/");
  c.optimizer_steps = o.count("steps");
  SP_CHECK(c.optimizer_steps == c.state.step, path, ": optimizer steps ", c.optimizer_steps,
           " differ from the global step ", c.state.step);
  const auto slots = optimizer_slots(parse_optimizer(c.settings.optimizer));
  c.optimizer_state.assign(slots.size() * layout.size(), 0.0f);
  for (std::size_t s = 0; s < slots.size(); ++s) {
    read_layers(file, "optimizer/" + slots[s], layout, c.spec.layers_string(), path,
                c.optimizer_state.data() + s * layout.size());
  }

  // The sample order of an epoch is drawn from (seed, epoch); the stored generator state
  // must be the one those give.
  SP_CHECK(h5::has_path(file, "rng/epoch_order"), path, ": no dataset '/rng/epoch_order'");
  h5::Handle order = h5::open_dataset(file, "rng/epoch_order", path);
  const auto info = h5::dataset_info(order.get(), path + ": /rng/epoch_order");
  SP_CHECK(info.type_class == H5T_INTEGER && info.dims == std::vector<hsize_t>{4}, path,
           ": /rng/epoch_order must hold 4 integers");
  std::uint64_t stored[4];
  h5::read_all(order.get(), H5T_NATIVE_UINT64, stored, path + ": reading /rng/epoch_order");
  const Rng expected = epoch_rng(c.settings.seed, c.state.epoch);
  SP_CHECK(std::equal(expected.state().begin(), expected.state().end(), stored), path,
           ": /rng/epoch_order does not match seed ", c.settings.seed, " and epoch ",
           c.state.epoch);
  c.has_training_state = true;
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

std::vector<std::byte> checkpoint_bytes(const Checkpoint& c) {
  const Layout layout(c.spec);
  SP_CHECK(c.params.size() == layout.size(), "model has ", c.params.size(),
           " parameters, expected ", layout.size());
  SP_CHECK(c.has_training_state, "a checkpoint needs the training state");
  const std::size_t slots = optimizer_slots(parse_optimizer(c.settings.optimizer)).size();
  SP_CHECK(c.optimizer_state.size() == slots * layout.size(), "optimizer state has ",
           c.optimizer_state.size(), " values, expected ", slots * layout.size());
  return encode(c);
}

void save_checkpoint(const std::string& path, const Checkpoint& c) {
  const std::vector<std::byte> bytes = checkpoint_bytes(c);
  fileio::write_atomically(path, [&](const std::string& tmp) { fileio::write_bytes(tmp, bytes); });
}

bool is_checkpoint_file(const std::string& path) {
  h5::Handle file = h5::open_file(path);
  return h5::AttrReader(file.get(), path, "").has("format");
}

Checkpoint parse_checkpoint(std::span<const std::byte> image, const std::string& path,
                            bool verify_checksum) {
  h5::Handle file = h5::open_image(image, path);
  const h5::AttrReader root(file.get(), path, "");
  const std::string format = root.text("format");
  SP_CHECK(format == kCheckpointFormat, path, ": format '", format, "' is not ", kCheckpointFormat);
  Checkpoint c;
  c.format_version = root.int64("format_version");
  SP_CHECK(c.format_version >= 1 && c.format_version <= kCheckpointVersion, path,
           ": format_version ", c.format_version, " is not supported (this build reads 1 to ",
           kCheckpointVersion, ")");
  Groups groups(file.get(), path);
  if (c.format_version == 1) {  // the model alone
    c.settings.layers = root.text("layers");
    c.settings.loss = root.text("loss");
  } else {
    read_settings(groups, path, c.format_version, c.settings);
  }
  try {
    c.spec = parse_model(c.settings.layers, c.settings.loss);
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

Checkpoint load_checkpoint(const std::string& path, bool verify_checksum) {
  h5::open_file(path);  // the distinct errors of a missing, non-HDF5 or damaged file
  return parse_checkpoint(fileio::read_bytes(path), path, verify_checksum);
}

// ---- directories ------------------------------------------------------------------------------

CheckpointDir::CheckpointDir(std::string dir, std::size_t keep) : dir_(std::move(dir)), keep_(keep) {
  SP_CHECK_USAGE(keep_ >= 1, "--keep-checkpoints must be at least 1");
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
    if (step_of(stem) != UINT64_MAX || stem.filename() == "latest" ||
        stem.filename() == "best.h5") fs::remove(p, ignored);
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
  fileio::write_atomically(latest.string(), [&](const std::string& tmp) {
    fileio::write_bytes(tmp, std::as_bytes(std::span(text)));
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

CheckpointSource find_checkpoint(const std::string& path, const std::string& flag) {
  std::error_code ec;
  SP_CHECK(fs::exists(path, ec), flag, " ", path, ": no such file or directory");
  CheckpointSource source;
  if (!fs::is_directory(path, ec)) {
    h5::open_file(path);  // the distinct errors of a non-HDF5 or damaged file
    source.bytes = fileio::read_bytes(path);
    parse_checkpoint(source.bytes, path);
    source.path = path;
    return source;
  }
  const std::vector<std::string> files = list_checkpoints(path);
  SP_CHECK(!files.empty(), flag, " ", path, ": no checkpoints (ckpt-<step>.h5) in the directory");
  for (const std::string& file : files) {
    try {
      h5::open_file(file);
      std::vector<std::byte> bytes = fileio::read_bytes(file);
      parse_checkpoint(bytes, file);
      source.path = file;
      source.bytes = std::move(bytes);
      return source;
    } catch (const Error& e) {
      source.skipped.push_back(e.message());
    }
  }
  SP_THROW(flag, " ", path, ": none of its ", files.size(), " checkpoints verifies; the newest: ",
           source.skipped.front());
}

Checkpoint load_shared(Communicator& comm, const std::string& path, const std::string& flag,
                       CheckpointSource* source, int root) {
  CheckpointSource found;
  collective_check(comm, [&] {
    if (comm.rank() == root) found = find_checkpoint(path, flag);
  });
  std::uint64_t size = found.bytes.size();
  comm.broadcast(std::span<std::uint64_t>(&size, 1), root);
  found.bytes.resize(size);
  comm.broadcast(std::span<std::byte>(found.bytes), root);
  // Every rank parses the same bytes; only the root knows the file's name.
  std::uint64_t name_size = found.path.size();
  comm.broadcast(std::span<std::uint64_t>(&name_size, 1), root);
  found.path.resize(name_size);
  comm.broadcast(std::as_writable_bytes(std::span<char>(found.path.data(), name_size)), root);
  Checkpoint c;
  collective_check(comm, [&] { c = parse_checkpoint(found.bytes, found.path); });
  if (source) *source = std::move(found);
  return c;
}

}  // namespace shardprop
