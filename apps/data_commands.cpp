// `shardprop convert` and `shardprop info`: data files in, descriptions out.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>

#include "commands.hpp"
#include "report.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"

namespace shardprop::app {

namespace fs = std::filesystem;

int run_convert(const ConvertArgs& args, MpiComm& comm) {
  collective_check(comm, [&] {
    if (comm.rank() != 0) return;
    const bool idx = !args.images.empty() || !args.labels.empty();
    SP_CHECK_USAGE(idx != !args.csv.empty(), "convert: give either --images and --labels, or --csv");
    SP_CHECK_USAGE(!idx || (!args.images.empty() && !args.labels.empty()),
                   "convert: --images and --labels go together");
    const Dataset data = idx ? read_idx(args.images, args.labels)
                             : read_csv(args.csv, args.label_column);
    write_dataset(args.out, data);
    std::printf("%s: %s samples x %zu features, %s\n", args.out.c_str(),
                thousands(data.rows).c_str(), data.cols,
                data.has_labels() ? count_of(data.label_classes(), "class", "classes").c_str()
                                  : "no labels");
  });
  return 0;
}

namespace {

void print_data(const std::string& path, const Dataset& data) {
  std::printf("%s: data set, %s samples x %zu features, ", path.c_str(),
              thousands(data.rows).c_str(), data.cols);
  if (data.has_labels()) {
    std::printf("labels 0..%zu (%s)\n", data.label_classes() - 1,
                count_of(data.label_classes(), "class", "classes").c_str());
  } else if (data.target_cols > 0) {
    std::printf("targets with %zu columns\n", data.target_cols);
  } else {
    std::printf("no labels or targets\n");
  }
}

void print_predictions(const std::string& path, const Predictions& p) {
  std::map<std::int32_t, std::size_t> counts;
  for (std::int32_t c : p.classes) ++counts[c];
  std::printf("%s: predictions of %s samples, %s each; predicted classes:", path.c_str(),
              thousands(p.classes.size()).c_str(), count_of(p.k, "output").c_str());
  for (const auto& [c, n] : counts) std::printf(" %d (%s)", c, thousands(n).c_str());
  std::printf("\n");
}

// A metrics file: its epochs, and the last one's line.
void print_metrics(const std::string& path) {
  std::ifstream in(path);
  SP_CHECK(in, path, ": cannot open");
  std::string line, last;
  std::size_t rows = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    SP_CHECK(line.front() == '{' && line.back() == '}', path, ":", rows + 1,
             ": not a JSON object, so not a shardprop metrics file");
    ++rows;
    last = line;
  }
  std::printf("%s: training metrics, %s\n", path.c_str(), count_of(rows, "row").c_str());
  if (!last.empty()) std::printf("  last       %s\n", last.c_str());
}

// The checkpoint's description, and whether its checksum verifies (status 1 if not).
int describe_checkpoint(const std::string& path) {
  const Checkpoint c = load_checkpoint(path, false);
  print_checkpoint(path, c);
  if (!c.has_training_state) return 0;
  const std::uint32_t computed = checkpoint_checksum(c);
  if (computed == c.checksum) {
    std::printf("  checksum   crc32 %08x, verified\n", computed);
    return 0;
  }
  std::printf("  checksum   crc32 MISMATCH: file says %08x, contents give %08x\n", c.checksum,
              computed);
  return kExitFailure;
}

int describe(const std::string& path) {
  std::error_code ec;
  SP_CHECK(fs::exists(path, ec), path, ": no such file or directory");
  if (fs::is_directory(path, ec)) {
    const std::vector<std::string> files = list_checkpoints(path);
    SP_CHECK(!files.empty(), path, ": a directory without checkpoints (ckpt-<step>.h5)");
    std::string latest = "none";
    std::ifstream(fs::path(path) / "latest") >> latest;
    std::printf("%s: checkpoint directory, %s, newest %s, latest names %s\n", path.c_str(),
                count_of(files.size(), "checkpoint").c_str(),
                fs::path(files.front()).filename().c_str(), latest.c_str());
    const CheckpointSource source = find_checkpoint(path, "info");
    for (const std::string& why : source.skipped) std::printf("  skipped    %s\n", why.c_str());
    return describe_checkpoint(source.path);
  }
  if (path.ends_with(".jsonl")) {
    print_metrics(path);
    return 0;
  }
  if (fs::path(path).filename() == "latest") {
    std::string name;
    std::ifstream(path) >> name;
    std::printf("%s: names the newest checkpoint of its directory, %s\n", path.c_str(), name.c_str());
    return 0;
  }
  if (path.ends_with(".csv")) {
    if (is_predictions_file(path)) {
      print_predictions(path, read_predictions(path));
    } else {
      print_data(path, read_csv(path, std::nullopt));
      std::printf("  (CSV: convert --csv F --label-column K|none --out F.h5 makes it a data set)\n");
    }
    return 0;
  }
  if (is_checkpoint_file(path)) return describe_checkpoint(path);
  if (is_predictions_file(path)) {
    print_predictions(path, read_predictions(path));
    return 0;
  }
  // The shape and labels without reading the features, and how they are stored.
  print_data(path, read_dataset_streamed(path, false));
  const DataLayout layout = data_layout(path);
  std::printf("  stored     features %s, file %.1f MB\n", layout.features.c_str(),
              double(layout.file_bytes) / 1e6);
  return 0;
}

}  // namespace

int run_info(const std::string& path, MpiComm& comm) {
  int status = 0;
  collective_check(comm, [&] {
    if (comm.rank() == 0) status = describe(path);
  });
  return status;
}

}  // namespace shardprop::app
