// shardprop: data-parallel MLP training over MPI. The only place that catches errors,
// prints them and aborts the job.
#include <mpi.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/info.h>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "bench.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/h5.hpp"
#include "shardprop/train.hpp"

namespace sp = shardprop;

namespace {

struct TrainArgs {
  std::string train_path, test_path, layers = "784,256:relu,128:relu,10:softmax", loss = "xent";
  std::string optimizer = "sgd", lr_schedule = "constant", metrics_path, progress = "auto";
  std::string overlap = "on";
  std::string save_path, checkpoint_dir, resume;
  std::size_t batch = 256, epochs = 10, eval_batch = 1024, chunk = 64;
  bool deterministic = false;
  std::size_t checkpoint_every_steps = 0, checkpoint_every_epochs = 0, keep_checkpoints = 3;
  double lr = 0.05, momentum = 0.9, weight_decay = 0.0;
  int threads = 0;  // 0: cores on the node / ranks on the node
  std::int64_t max_steps = -1, stop_at_step = -1;
  std::uint64_t seed = 1;
  std::set<std::string> given;  // the flags named on the command line

  bool has(const std::string& flag) const { return given.count(flag) > 0; }
};

struct ConvertArgs {
  std::string images, labels, csv, out;
  std::size_t label_column = 0;
};

// Rank 0 prints progress within an epoch (on a terminal) and one line per epoch, and
// appends the epoch's metrics to the JSON Lines file.
class Reporter final : public sp::TrainObserver {
 public:
  Reporter(bool speak, bool progress, std::size_t epochs, int ranks, int threads,
           const std::string& metrics_path)
      : speak_(speak), progress_(speak && progress), epochs_(epochs), ranks_(ranks),
        threads_(threads) {
    if (speak_ && !metrics_path.empty()) {
      metrics_.open(metrics_path, std::ios::trunc);
      SP_CHECK(metrics_, "--metrics: cannot write '", metrics_path, "'");
      metrics_path_ = metrics_path;
    }
  }

  void on_progress(std::uint64_t epoch, std::uint64_t batch, std::uint64_t batches,
                   double running_loss) override {
    if (!progress_) return;
    const auto now = std::chrono::steady_clock::now();
    if (batch != batches && now - last_ < std::chrono::milliseconds(200)) return;
    last_ = now;
    constexpr int kWidth = 30;
    const int filled = int(kWidth * batch / batches);
    std::printf("\repoch %llu/%zu [%-*s] %llu/%llu loss %.4f ", (unsigned long long)epoch, epochs_,
                kWidth, std::string(std::size_t(filled), '#').c_str(), (unsigned long long)batch,
                (unsigned long long)batches, running_loss);
    std::fflush(stdout);
  }

  // Called after every step on every rank; `hook` decides whether to write a checkpoint.
  void set_state_hook(std::function<void(const sp::Trainer&, bool)> hook) { hook_ = std::move(hook); }
  void on_state(const sp::Trainer& trainer, bool epoch_ended) override {
    if (hook_) hook_(trainer, epoch_ended);
  }
  // Clears the progress bar's line before other output.
  void clear_line() const {
    if (progress_) std::printf("\r\033[K");
  }

  void on_epoch(const sp::EpochStats& s) override {
    if (!speak_) return;
    clear_line();
    std::printf("epoch %3llu/%zu  step %7llu  train_loss %.4f  train_acc %.4f", (unsigned long long)s.epoch,
                epochs_, (unsigned long long)s.step, s.train.loss, s.train.accuracy);
    if (s.has_test) std::printf("  test_loss %.4f  test_acc %.4f", s.test.loss, s.test.accuracy);
    std::printf("  samples/s %8.0f  %.2fs\n", s.samples_per_s, s.seconds);
    std::fflush(stdout);
    if (metrics_.is_open()) {
      metrics_ << sp::metrics_json(s, ranks_, threads_) << '\n';
      metrics_.flush();
      SP_CHECK(metrics_, "--metrics: writing '", metrics_path_, "' failed");
    }
  }

 private:
  bool speak_, progress_;
  std::size_t epochs_;
  int ranks_, threads_;
  std::ofstream metrics_;
  std::string metrics_path_;
  std::chrono::steady_clock::time_point last_{};
  std::function<void(const sp::Trainer&, bool)> hook_;
};

// A flag value that must be > 0 (or >= 0); the message names the value given.
CLI::Validator number_above(double floor, bool inclusive) {
  const std::string rule = std::string(inclusive ? ">= " : "> ") + (floor == 0 ? "0" : std::to_string(floor));
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        char* end = nullptr;
        const double v = std::strtod(text.c_str(), &end);
        const bool ok = end != text.c_str() && *end == '\0' && (inclusive ? v >= floor : v > floor);
        return ok ? std::string() : "must be " + rule + ", got '" + text + "'";
      },
      "NUMBER " + rule);
}

std::string thousands(std::size_t n) {
  const std::string digits = std::to_string(n);
  std::string s;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) s.push_back(',');
    s.push_back(digits[i]);
  }
  return s;
}

// An output file may replace only what this program wrote there before: `ours` tells
// whether an existing file is such a file. Also checks that the directory exists, so a long
// run does not fail at its end.
void check_output(const std::string& flag, const std::string& path,
                  const std::function<bool()>& ours) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  SP_CHECK(fs::is_directory(dir, ec), flag, " ", path, ": directory ", dir.string(),
           " does not exist");
  if (!fs::exists(target, ec)) return;
  bool replaceable = false;
  try {
    replaceable = fs::is_regular_file(target, ec) && ours();
  } catch (const sp::Error&) {
  }
  SP_CHECK(replaceable, flag, " ", path, ": exists and is not a file this command writes; "
           "not overwriting it");
}

// The start of the "optimizer" line of train's header and of info: kind, base rate,
// schedule and (for SGD) momentum; callers finish the line.
void print_optimizer(const sp::TrainConfig& t) {
  const sp::OptimizerConfig& o = t.optimizer;
  std::printf("  optimizer  %s lr %g%s", std::string(sp::to_string(o.kind)).c_str(), o.lr,
              t.cosine_schedule ? " (cosine decay)" : "");
  if (o.kind == sp::OptimizerKind::sgd) std::printf(" momentum %g", o.momentum);
}

std::string format_value(double v) {
  std::ostringstream out;
  out << v;
  return out.str();
}

std::string mode_name(std::size_t chunk) {
  return chunk > 0 ? "with chunks of " + std::to_string(chunk) + " rows" : "off";
}

// Merges a checkpoint into the flags: the run continues with the checkpoint's model and
// configuration, a flag that would change the sample order, the model or the optimizer's
// state is an error naming both values, and the flags that may change are applied and
// listed in `changes`.
void apply_checkpoint(const TrainArgs& args, const std::string& path, const sp::Checkpoint& c,
                      sp::ModelSpec& spec, sp::TrainConfig& config,
                      std::vector<std::string>& changes) {
  const auto fixed = [&](const char* flag, const std::string& mine, const std::string& theirs) {
    SP_CHECK(!args.has(flag) || mine == theirs, flag, " ", mine, " contradicts the checkpoint's ",
             theirs, " (", path, "); it cannot change when resuming");
  };
  const std::string loss(sp::to_string(c.spec.loss));
  std::string layers = args.layers;
  try {  // compare normalized specs, so 784,256,10 equals 784,256:relu,10:softmax
    layers = sp::parse_model(args.layers, loss).layers_string();
  } catch (const sp::Error&) {
  }
  fixed("--layers", layers, c.spec.layers_string());
  fixed("--loss", args.loss, loss);
  fixed("--batch", std::to_string(args.batch), std::to_string(c.config.batch));
  fixed("--seed", std::to_string(args.seed), std::to_string(c.config.seed));
  fixed("--optimizer", args.optimizer, std::string(sp::to_string(c.config.optimizer.kind)));
  spec = c.spec;
  const sp::TrainConfig requested = config;
  config = c.config;
  config.stop_at_step = requested.stop_at_step;
  config.overlap = requested.overlap;  // how this invocation's ranks communicate
  const auto allow = [&](const char* flag, auto& field, auto value, auto theirs) {
    if (!args.has(flag) || value == theirs) return;
    field = value;
    changes.push_back(std::string(flag) + " " + format_value(double(value)) +
                      " (checkpoint: " + format_value(double(theirs)) + ")");
  };
  allow("--epochs", config.epochs, requested.epochs, c.config.epochs);
  allow("--max-steps", config.max_steps, requested.max_steps, c.config.max_steps);
  allow("--eval-batch", config.eval_batch, requested.eval_batch, c.config.eval_batch);
  allow("--lr", config.optimizer.lr, requested.optimizer.lr, c.config.optimizer.lr);
  allow("--momentum", config.optimizer.momentum, requested.optimizer.momentum,
        c.config.optimizer.momentum);
  allow("--weight-decay", config.optimizer.weight_decay, requested.optimizer.weight_decay,
        c.config.optimizer.weight_decay);
  if ((args.has("--deterministic") || args.has("--chunk")) &&
      requested.deterministic_chunk != c.config.deterministic_chunk) {
    config.deterministic_chunk = requested.deterministic_chunk;
    changes.push_back("--deterministic " + mode_name(requested.deterministic_chunk) +
                      " (checkpoint: " + mode_name(c.config.deterministic_chunk) + ")");
  }
  if (args.has("--lr-schedule") && requested.cosine_schedule != c.config.cosine_schedule) {
    config.cosine_schedule = requested.cosine_schedule;
    changes.push_back("--lr-schedule " + args.lr_schedule + " (checkpoint: " +
                      (c.config.cosine_schedule ? "cosine" : "constant") + ")");
  }
}

int run_train(const TrainArgs& args, sp::MpiComm& comm) {
  const bool speak = comm.rank() == 0;
  // Start-up is checked collectively: a bad flag, file or value stops every rank, and only
  // the lowest failing rank says why.
  sp::ModelSpec spec;
  sp::TrainConfig config;
  sp::collective_check(comm, [&] {
    SP_CHECK(!args.checkpoint_dir.empty() ||
                 !(args.has("--checkpoint-every-steps") || args.has("--checkpoint-every-epochs") ||
                   args.has("--keep-checkpoints")),
             "--checkpoint-every-steps, --checkpoint-every-epochs and --keep-checkpoints need "
             "--checkpoint-dir");
    SP_CHECK(args.resume != "auto" || !args.checkpoint_dir.empty(),
             "--resume auto needs --checkpoint-dir");
    if (!args.save_path.empty() && comm.rank() == 0) {
      check_output("--save", args.save_path, [&] { return sp::is_checkpoint_file(args.save_path); });
    }
    spec = sp::parse_model(args.layers, args.loss);
    config.batch = args.batch;
    config.epochs = args.epochs;
    config.max_steps = args.max_steps;
    config.stop_at_step = args.stop_at_step;
    config.seed = args.seed;
    config.eval_batch = args.eval_batch;
    config.optimizer.kind = sp::parse_optimizer(args.optimizer);
    config.optimizer.lr = args.lr;
    config.optimizer.momentum = args.momentum;
    config.optimizer.weight_decay = args.weight_decay;
    config.cosine_schedule = args.lr_schedule == "cosine";
    config.overlap = args.overlap == "on";
    SP_CHECK(args.deterministic || !args.has("--chunk"), "--chunk needs --deterministic");
    config.deterministic_chunk = args.deterministic ? args.chunk : 0;
  });

  // Rank 0 finds, reads and verifies the checkpoint and sends it to every rank.
  std::string resume_path;
  std::optional<sp::CheckpointDir> checkpoints;
  sp::Checkpoint resumed;
  bool resuming = !args.resume.empty();
  sp::collective_check(comm, [&] {
    if (!speak) return;
    if (!args.checkpoint_dir.empty()) {
      checkpoints.emplace(args.checkpoint_dir, args.keep_checkpoints);
      // A new run would mix its files with another run's and prune them.
      const std::vector<std::string> existing = sp::list_checkpoints(args.checkpoint_dir);
      SP_CHECK(resuming || existing.empty(), "--checkpoint-dir ", args.checkpoint_dir,
               " already holds checkpoints (newest ",
               std::filesystem::path(existing.empty() ? "" : existing.front()).filename().string(),
               "): pass --resume ", args.checkpoint_dir, " (or auto) to continue that run, or "
               "choose an empty directory");
    }
    if (args.resume == "auto") {
      resuming = !sp::list_checkpoints(args.checkpoint_dir).empty();
      if (!resuming) std::printf("no checkpoint in %s yet: starting a new run\n", args.checkpoint_dir.c_str());
    }
    if (!resuming) return;
    sp::ResumePoint point = sp::find_resume_point(args.resume == "auto" ? args.checkpoint_dir : args.resume);
    for (const std::string& why : point.skipped) {
      std::fprintf(stderr, "shardprop: warning: skipping a checkpoint that does not verify: %s\n",
                   why.c_str());
    }
    resume_path = point.path;
    resumed = std::move(point.checkpoint);
  });
  std::int64_t flag = resuming ? 1 : 0;
  comm.broadcast_values(std::span<std::int64_t>(&flag, 1), 0);
  resuming = flag != 0;
  std::vector<std::string> changes;
  if (resuming) {
    sp::broadcast_checkpoint(comm, resumed, 0);
    sp::collective_check(comm, [&] {
      apply_checkpoint(args, resume_path.empty() ? args.resume : resume_path, resumed, spec,
                       config, changes);
    });
  }

  sp::Dataset train, test;
  sp::collective_check(comm, [&] {
    train = sp::read_dataset(args.train_path);
    sp::check_fits(train, spec, args.train_path);
    if (resuming) {
      SP_CHECK(train.rows == resumed.train_rows && train.cols == resumed.train_cols,
               args.train_path, ": ", train.rows, " samples of ", train.cols,
               " features, but the checkpoint was trained on ", resumed.train_rows, " of ",
               resumed.train_cols, " (the sample order depends on the training set)");
    }
    if (!args.test_path.empty()) {
      test = sp::read_dataset(args.test_path);
      sp::check_fits(test, spec, args.test_path);
    }
  });

  const int cores = std::max(1, int(std::thread::hardware_concurrency()));
  const int threads = args.threads > 0 ? args.threads : std::max(1, cores / comm.ranks_on_node());
  oneapi::tbb::global_control limit(oneapi::tbb::global_control::max_allowed_parallelism,
                                    std::size_t(threads));
  const int effective_threads = std::min(threads, oneapi::tbb::info::default_concurrency());

  std::optional<sp::Trainer> trainer;
  sp::collective_check(comm, [&] {
    trainer.emplace(spec, config, comm, train);
    if (resuming) sp::restore_checkpoint(*trainer, resumed);
  });

  if (speak) {
    const sp::OptimizerConfig& opt = config.optimizer;
    std::printf("shardprop train: %d rank%s x %d thread%s per rank\n", comm.size(),
                comm.size() == 1 ? "" : "s", effective_threads, effective_threads == 1 ? "" : "s");
    std::printf("  model      %s, loss %s, %s parameters\n", spec.layers_string().c_str(),
                std::string(sp::to_string(spec.loss)).c_str(), thousands(spec.parameter_count()).c_str());
    std::printf("  train      %s: %s samples x %zu features\n", args.train_path.c_str(),
                thousands(train.rows).c_str(), train.cols);
    if (!args.test_path.empty()) {
      std::printf("  test       %s: %s samples x %zu features\n", args.test_path.c_str(),
                  thousands(test.rows).c_str(), test.cols);
    }
    std::size_t fewest = config.batch, most = 0;
    for (int r = 0; r < comm.size(); ++r) {
      const std::size_t rows = sp::chunked_shard(config.batch, config.deterministic_chunk, r, comm.size()).size();
      fewest = std::min(fewest, rows);
      most = std::max(most, rows);
    }
    std::printf("  batch      %zu global (%zu-%zu per rank), %zu steps per epoch, %zu epochs\n",
                config.batch, fewest, most, trainer->batches_per_epoch(), config.epochs);
    if (config.deterministic_chunk > 0) {
      std::printf("  mode       deterministic, chunks of %zu rows: the same bits for any ranks and threads\n",
                  config.deterministic_chunk);
    }
    print_optimizer(config);
    if (opt.weight_decay > 0) std::printf(" weight_decay %g", opt.weight_decay);
    std::printf(", seed %llu\n", (unsigned long long)config.seed);
    if (resuming) {
      const sp::TrainState& st = resumed.state;
      std::printf("  resume     %s: step %llu, epoch %llu, batch %llu of %zu; written by %lld rank%s x %lld thread%s\n",
                  resume_path.c_str(), (unsigned long long)st.step, (unsigned long long)st.epoch + 1,
                  (unsigned long long)st.batch_in_epoch, trainer->batches_per_epoch(),
                  (long long)resumed.world_size, resumed.world_size == 1 ? "" : "s",
                  (long long)resumed.threads, resumed.threads == 1 ? "" : "s");
      for (const std::string& change : changes) std::printf("  changed    %s\n", change.c_str());
    }
    if (checkpoints) {
      std::printf("  checkpoint %s", checkpoints->path().c_str());
      if (args.checkpoint_every_steps > 0) std::printf(", every %zu steps", args.checkpoint_every_steps);
      if (args.checkpoint_every_epochs > 0) std::printf(", every %zu epochs", args.checkpoint_every_epochs);
      std::printf(", at the end; keeping %zu\n", args.keep_checkpoints);
    }
    std::fflush(stdout);
  }
  // Open MPI hands its ranks a pseudo-terminal even when mpirun's own output is a file, so
  // under mpirun "auto" cannot see the real terminal; launch scripts pass always/never.
  const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr;
  const bool progress = args.progress == "always" ||
                        (args.progress == "auto" && !under_mpirun && isatty(STDOUT_FILENO));
  std::optional<Reporter> reporter;
  sp::collective_check(comm, [&] {
    reporter.emplace(speak, progress, config.epochs, comm.size(), effective_threads,
                     args.metrics_path);
  });

  // Rank 0 writes; every rank learns whether it worked before anyone goes on.
  const bool checkpointing = !args.checkpoint_dir.empty();
  std::int64_t saved_step = -1;
  if (resuming && checkpointing) {
    std::error_code ec;
    if (std::filesystem::equivalent(std::filesystem::path(resume_path).parent_path(),
                                    args.checkpoint_dir, ec)) {
      saved_step = std::int64_t(resumed.state.step);
    }
    std::int64_t shared = saved_step;
    comm.broadcast_values(std::span<std::int64_t>(&shared, 1), 0);
    saved_step = shared;
  }
  const auto save_checkpoint = [&](const sp::Trainer& tr) {
    std::string written;
    sp::collective_check(comm, [&] {
      if (speak) written = checkpoints->write(sp::make_checkpoint(tr, comm.size(), effective_threads));
    });
    saved_step = std::int64_t(tr.state().step);
    if (speak) {
      reporter->clear_line();
      std::printf("checkpoint %s\n", written.c_str());
      std::fflush(stdout);
    }
  };
  if (checkpointing) {
    reporter->set_state_hook([&](const sp::Trainer& tr, bool epoch_ended) {
      const sp::TrainState& st = tr.state();
      const bool due =
          (args.checkpoint_every_steps > 0 && st.step % args.checkpoint_every_steps == 0) ||
          (epoch_ended && args.checkpoint_every_epochs > 0 &&
           st.epoch % args.checkpoint_every_epochs == 0);
      if (due) save_checkpoint(tr);
    });
  }

  if (speak && !trainer->steps_left()) {
    std::printf("nothing to train: step %llu, epoch %llu of %zu\n",
                (unsigned long long)trainer->state().step,
                (unsigned long long)trainer->state().epoch, config.epochs);
  }
  trainer->run(args.test_path.empty() ? nullptr : &test, *reporter);
  if (checkpointing && saved_step != std::int64_t(trainer->state().step)) save_checkpoint(*trainer);
  if (!args.save_path.empty()) {
    sp::collective_check(comm, [&] {
      if (speak) {
        sp::save_checkpoint(args.save_path,
                            sp::make_checkpoint(*trainer, comm.size(), effective_threads));
      }
    });
    if (speak) std::printf("saved %s\n", args.save_path.c_str());
  }
  return 0;
}

struct EvalArgs {
  std::string model_path, data_path, out_path;
  std::size_t eval_batch = 1024;
};

// Rank 0 reads and verifies the checkpoint; every rank gets it.
sp::Checkpoint load_shared(sp::MpiComm& comm, const std::string& path) {
  sp::Checkpoint c;
  sp::collective_check(comm, [&] {
    if (comm.rank() == 0) c = sp::load_checkpoint(path);
  });
  sp::broadcast_checkpoint(comm, c, 0);
  return c;
}

int run_eval(const EvalArgs& args, sp::MpiComm& comm) {
  const sp::Checkpoint model = load_shared(comm, args.model_path);
  sp::Dataset data;
  sp::collective_check(comm, [&] {
    data = sp::read_dataset(args.data_path);
    sp::check_fits(data, model.spec, args.data_path);
  });
  sp::Mlp<float> mlp(model.spec);
  // A model trained with --deterministic is evaluated in chunks too: the same bits on any ranks.
  const sp::EvalStats e = sp::evaluate_dataset(mlp, comm, model.params, data, args.eval_batch,
                                               model.config.deterministic_chunk);
  if (comm.rank() == 0) {
    std::printf("{\"loss\":%.9g,\"accuracy\":%.9g,\"samples\":%zu}\n", e.loss, e.accuracy,
                e.samples);
  }
  return 0;
}

// Predicted classes and outputs for every sample; rank 0 does the work.
int run_predict(const EvalArgs& args, sp::MpiComm& comm) {
  sp::collective_check(comm, [&] {
    if (comm.rank() != 0) return;
    SP_CHECK(args.out_path.ends_with(".h5") || args.out_path.ends_with(".hdf5") ||
                 args.out_path.ends_with(".csv"),
             "--out ", args.out_path, ": name a .h5 or .csv file");
    check_output("--out", args.out_path, [&] {
      if (args.out_path.ends_with(".csv")) {
        std::ifstream in(args.out_path);
        std::string header;
        return std::getline(in, header) && header.rfind("prediction", 0) == 0;
      }
      sp::h5::Handle file = sp::h5::open_file(args.out_path);
      return sp::h5::has_link(file.get(), "predictions");
    });
    const sp::Checkpoint model = sp::load_checkpoint(args.model_path);
    const sp::Dataset data = sp::read_dataset(args.data_path, false);
    sp::check_fits(data, model.spec, args.data_path);
    const std::size_t k = model.spec.output_width();
    sp::Mlp<float> mlp(model.spec);
    // A model trained with --deterministic predicts in its chunks: the same bits on any
    // number of threads. Passes then hold whole chunks.
    const std::size_t chunk = model.config.deterministic_chunk;
    std::size_t pass = std::min(args.eval_batch, data.rows);
    if (chunk > 0) pass = std::max(chunk, pass / chunk * chunk);
    mlp.reserve(pass);
    std::vector<std::int32_t> predictions(data.rows);
    sp::AlignedVector<float> outputs(data.rows * k);
    for (std::size_t begin = 0; begin < data.rows; begin += pass) {
      const auto rows = Eigen::Index(std::min(pass, data.rows - begin));
      const auto y = mlp.predict(model.params,
                                 sp::ConstMatrixView<float>(data.features.data() + begin * data.cols,
                                                            rows, Eigen::Index(data.cols)),
                                 chunk);
      for (Eigen::Index r = 0; r < rows; ++r) {
        const std::size_t i = begin + std::size_t(r);
        Eigen::Index best = 0;
        if (k == 1) {
          best = y(r, 0) >= 0.5f ? 1 : 0;
        } else {
          y.row(r).maxCoeff(&best);
        }
        predictions[i] = std::int32_t(best);
        std::copy_n(y.data() + r * y.cols(), k, outputs.data() + i * k);
      }
    }
    sp::write_predictions(args.out_path, predictions, outputs, k);
    std::printf("%s: %zu predictions from %s (step %llu)\n", args.out_path.c_str(), data.rows,
                args.model_path.c_str(), (unsigned long long)model.state.step);
  });
  return 0;
}

int run_convert(const ConvertArgs& args, const sp::MpiComm& comm) {
  if (comm.rank() != 0) return 0;
  const bool idx = !args.images.empty() || !args.labels.empty();
  SP_CHECK(idx != !args.csv.empty(), "convert: give either --images and --labels, or --csv");
  SP_CHECK(!idx || (!args.images.empty() && !args.labels.empty()),
           "convert: --images and --labels go together");
  const sp::Dataset data = idx ? sp::read_idx(args.images, args.labels)
                               : sp::read_csv(args.csv, args.label_column);
  sp::write_dataset(args.out, data);
  std::printf("%s: %zu samples x %zu features, %zu classes\n", args.out.c_str(), data.rows,
              data.cols, data.label_classes());
  return 0;
}

int run_info(const std::string& path, const sp::MpiComm& comm) {
  if (comm.rank() != 0) return 0;
  if (!sp::is_checkpoint_file(path)) {
    const sp::Dataset data = sp::read_dataset(path, false);
    std::printf("%s: data set, %zu samples x %zu features, ", path.c_str(), data.rows, data.cols);
    if (data.has_labels()) {
      std::printf("labels 0..%zu (%zu classes)\n", data.label_classes() - 1, data.label_classes());
    } else if (data.target_cols > 0) {
      std::printf("targets with %zu columns\n", data.target_cols);
    } else {
      std::printf("no labels or targets\n");
    }
    return 0;
  }
  const sp::Checkpoint c = sp::load_checkpoint(path, false);
  std::error_code ec;
  const auto bytes = std::filesystem::file_size(path, ec);
  const double kb = ec ? 0.0 : double(bytes) / 1e3;
  std::printf("%s: shardprop checkpoint, format_version %lld, %.1f %s\n", path.c_str(),
              (long long)c.format_version, kb < 1e3 ? kb : kb / 1e3, kb < 1e3 ? "kB" : "MB");
  std::printf("  model      %s, loss %s, %s parameters\n", c.spec.layers_string().c_str(),
              std::string(sp::to_string(c.spec.loss)).c_str(),
              thousands(c.spec.parameter_count()).c_str());
  if (!c.has_training_state) {
    std::printf("  step       %llu, epoch %llu (model only: no training state)\n",
                (unsigned long long)c.state.step, (unsigned long long)c.state.epoch);
    return 0;
  }
  const sp::TrainConfig& t = c.config;
  const sp::OptimizerConfig& o = t.optimizer;
  const std::size_t batches = (c.train_rows + t.batch - 1) / t.batch;
  if (c.state.epoch >= t.epochs) {
    std::printf("  position   step %llu: all %zu epochs done\n", (unsigned long long)c.state.step,
                t.epochs);
  } else {
    std::printf("  position   step %llu: epoch %llu of %zu, next batch %llu of %zu\n",
                (unsigned long long)c.state.step, (unsigned long long)c.state.epoch + 1, t.epochs,
                (unsigned long long)c.state.batch_in_epoch, batches);
  }
  print_optimizer(t);
  if (o.kind == sp::OptimizerKind::adam) std::printf(" beta1 %g beta2 %g eps %g", o.beta1, o.beta2, o.eps);
  std::printf(" weight_decay %g, %llu steps of state\n", o.weight_decay,
              (unsigned long long)c.optimizer_steps);
  std::printf("  training   batch %zu, seed %llu, max steps %s, on %s x %llu samples\n", t.batch,
              (unsigned long long)t.seed,
              t.max_steps < 0 ? "none" : std::to_string(t.max_steps).c_str(),
              thousands(c.train_rows).c_str(), (unsigned long long)c.train_cols);
  if (t.deterministic_chunk > 0) {
    std::printf("  mode       deterministic, chunks of %zu rows\n", t.deterministic_chunk);
  } else {
    std::printf("  mode       default (sums follow the ranks)\n");
  }
  std::printf("  written by %lld rank%s x %lld thread%s\n", (long long)c.world_size,
              c.world_size == 1 ? "" : "s", (long long)c.threads, c.threads == 1 ? "" : "s");
  const std::uint32_t computed = sp::checkpoint_checksum(c);
  if (computed == c.checksum) {
    std::printf("  checksum   crc32 %08x, verified\n", computed);
    return 0;
  }
  std::printf("  checksum   crc32 MISMATCH: file says %08x, contents give %08x\n", c.checksum, computed);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  // Gradients are reduced with MPI_Iallreduce layer by layer. Open MPI's default schedule
  // for it measured 3x slower than MPI_Allreduce on 7 MB; the Rabenseifner schedule (3)
  // matches MPI_Allreduce (docs/PERFORMANCE.md). An explicit setting wins.
  setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3", 0);
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    std::fprintf(stderr, "shardprop: error: MPI_Init_thread failed\n");
    return 1;
  }
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);

  CLI::App app{"shardprop: data-parallel multilayer-perceptron training over MPI"};
  app.require_subcommand(1);
  // A flag given twice takes its last value, so scripts can append overrides.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.set_version_flag("--version", "shardprop 0.1.0");

  TrainArgs t;
  CLI::App* train = app.add_subcommand("train", "Train a model, data-parallel over the MPI ranks");
  train->add_option("--train", t.train_path, "Training set (HDF5: features, labels|targets)")
      ->required();
  train->add_option("--test", t.test_path, "Test set, evaluated after every epoch");
  train->add_option("--layers", t.layers, "Input width, then width[:activation] per layer")
      ->capture_default_str();
  train->add_option("--loss", t.loss, "xent (softmax output), bce (sigmoid), mse (identity)")
      ->capture_default_str();
  train->add_option("--batch", t.batch, "Global minibatch size, split over the ranks")
      ->check(number_above(0, false))->capture_default_str();
  train->add_option("--epochs", t.epochs, "Passes over the training set")
      ->check(number_above(0, false))->capture_default_str();
  train->add_option("--max-steps", t.max_steps, "Stop after this many optimizer steps")
      ->check(number_above(0, true));
  train->add_option("--optimizer", t.optimizer, "sgd or adam")->capture_default_str();
  train->add_option("--lr", t.lr, "Learning rate")->check(number_above(0, false))->capture_default_str();
  train->add_option("--lr-schedule", t.lr_schedule, "constant, or cosine decay to 0 over the run")
      ->check(CLI::IsMember({"constant", "cosine"}))->capture_default_str();
  train->add_option("--momentum", t.momentum, "SGD momentum")
      ->check(CLI::Range(0.0, 0.999999))->capture_default_str();
  train->add_option("--weight-decay", t.weight_decay, "L2 weight decay")
      ->check(number_above(0, true))->capture_default_str();
  train->add_option("--threads", t.threads, "oneTBB threads per rank (default: cores / ranks on the node)")
      ->check(number_above(0, false));
  train->add_option("--seed", t.seed, "Seed of the initial weights and the sample order")
      ->capture_default_str();
  train->add_option("--eval-batch", t.eval_batch, "Rows per forward pass when evaluating")
      ->check(number_above(0, false))->capture_default_str();
  train->add_option("--save", t.save_path, "Write the final checkpoint to this HDF5 file (rank 0)");
  train->add_option("--checkpoint-dir", t.checkpoint_dir,
                    "Rank 0 writes checkpoints here (ckpt-<step>.h5 and 'latest'), always at the end");
  train->add_option("--checkpoint-every-steps", t.checkpoint_every_steps,
                    "Also write a checkpoint every N optimizer steps")
      ->check(number_above(0, false));
  train->add_option("--checkpoint-every-epochs", t.checkpoint_every_epochs,
                    "Also write a checkpoint every N epochs")
      ->check(number_above(0, false));
  train->add_option("--keep-checkpoints", t.keep_checkpoints,
                    "Keep the newest K checkpoints in --checkpoint-dir")
      ->check(number_above(0, false))->capture_default_str();
  train->add_option("--resume", t.resume,
                    "Continue from a checkpoint file, the newest valid one of a directory, or "
                    "'auto' (--checkpoint-dir's, if it has one)");
  train->add_option("--stop-at-step", t.stop_at_step,
                    "End this invocation at this global step (with a checkpoint); the run's "
                    "schedule is unchanged, so --resume continues it exactly")
      ->check(number_above(0, true));
  train->add_option("--overlap", t.overlap,
                    "on: reduce each layer's gradient while backward goes on; off: the whole "
                    "gradient at once after it (for measuring)")
      ->check(CLI::IsMember({"on", "off"}))->capture_default_str();
  train->add_flag("--deterministic", t.deterministic,
                  "Bitwise-identical results for any number of ranks and threads "
                  "(docs/reproducibility.md)");
  train->add_option("--chunk", t.chunk,
                    "Rows per chunk in --deterministic mode: the unit of work that ranks and "
                    "threads share")
      ->check(number_above(0, false))->capture_default_str();
  train->add_option("--metrics", t.metrics_path, "Write one JSON object per epoch to this file");
  train->add_option("--progress", t.progress, "Progress bar within an epoch")
      ->check(CLI::IsMember({"auto", "always", "never"}))->capture_default_str();

  ConvertArgs c;
  CLI::App* convert = app.add_subcommand("convert", "Convert IDX or CSV data to HDF5");
  convert->add_option("--images", c.images, "IDX image file (gzip or plain)");
  convert->add_option("--labels", c.labels, "IDX label file (gzip or plain)");
  convert->add_option("--csv", c.csv, "CSV file of numbers");
  convert->add_option("--label-column", c.label_column, "CSV column (0-based) holding labels")
      ->capture_default_str();
  convert->add_option("--out", c.out, "HDF5 file to write")->required();

  EvalArgs ev;
  CLI::App* eval = app.add_subcommand("eval", "Loss and accuracy of a saved model on a data set");
  eval->add_option("--checkpoint", ev.model_path, "Checkpoint or model file")->required();
  eval->add_option("--data", ev.data_path, "HDF5 data set")->required();
  eval->add_option("--eval-batch", ev.eval_batch, "Rows per forward pass")
      ->check(number_above(0, false))->capture_default_str();

  EvalArgs pr;
  CLI::App* predict = app.add_subcommand("predict", "Predicted class and outputs of every sample");
  predict->add_option("--checkpoint", pr.model_path, "Checkpoint or model file")->required();
  predict->add_option("--data", pr.data_path, "HDF5 data set (labels not needed)")->required();
  predict->add_option("--out", pr.out_path, "Output: .h5 (predictions, outputs) or .csv")->required();
  predict->add_option("--eval-batch", pr.eval_batch, "Rows per forward pass")
      ->check(number_above(0, false))->capture_default_str();

  sp::bench::Args bn;
  CLI::App* bench = app.add_subcommand(
      "bench", "GEMM limit of one core and training throughput against it (run on 2 ranks)");
  bench->add_option("--data", bn.data_path, "Training set; synthetic data of its shape if absent");
  bench->add_option("--json", bn.json_path, "Write the results as one JSON document");
  bench->add_option("--windows", bn.windows, "Timed windows per case (median reported)")
      ->check(number_above(0, false))->capture_default_str();
  bench->add_option("--window-seconds", bn.window_s, "Length of a window")
      ->check(number_above(0, false))->capture_default_str();
  bench->add_option("--warmup", bn.warmup, "Untimed steps before timing")
      ->check(number_above(0, true))->capture_default_str();
  bool bench_deterministic = false;
  std::size_t bench_chunk = 64;
  bench->add_flag("--deterministic", bench_deterministic,
                  "Also time every case in the deterministic mode, alternating with the default");
  bench->add_option("--chunk", bench_chunk, "Rows per chunk of the deterministic mode")
      ->check(number_above(0, false))->capture_default_str();

  // Every subcommand that runs collectives gives up on a rank that stops answering.
  double collective_timeout = 300;
  for (CLI::App* sub : {train, eval, predict}) {
    sub->add_option("--collective-timeout", collective_timeout,
                    "Seconds a collective may wait for the other ranks before the job is "
                    "aborted (a rank stopped or hung); 0 waits forever")
        ->check(number_above(0, true))->capture_default_str();
  }

  std::string info_path;
  CLI::App* info = app.add_subcommand("info", "Describe a data set or a checkpoint (and verify it)");
  info->add_option("file", info_path, "HDF5 data set, checkpoint or model file")->required();

  // CLI11 would only say that a subcommand is required.
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
      known |= sub->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      if (world_rank == 0) {
        std::fprintf(stderr, "shardprop: error: unknown command '%s' (expected one of %s)\n",
                     argv[1], names.c_str());
      }
      MPI_Finalize();
      return 2;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments, so every rank stops; rank 0 says why.
    const bool usage_error = e.get_exit_code() != 0;
    if (world_rank == 0) {
      if (usage_error) {
        std::fprintf(stderr, "shardprop: error: %s (see --help)\n", e.what());
      } else {
        app.exit(e);  // --help or --version
      }
    }
    MPI_Finalize();
    return usage_error ? 2 : 0;
  }

  for (const CLI::Option* option : train->get_options()) {
    if (option->count() > 0) t.given.insert(option->get_name());
  }

  int status = 0;
  try {
    sp::MpiComm comm(MPI_COMM_WORLD);
    comm.set_timeout(collective_timeout);
    if (train->parsed()) {
      status = run_train(t, comm);
    } else if (eval->parsed()) {
      status = run_eval(ev, comm);
    } else if (bench->parsed()) {
      bn.deterministic_chunk = bench_deterministic ? bench_chunk : 0;
      status = sp::bench::run(bn, comm);
    } else if (predict->parsed()) {
      status = run_predict(pr, comm);
    } else if (convert->parsed()) {
      status = run_convert(c, comm);
    } else if (info->parsed()) {
      status = run_info(info_path, comm);
    }
    comm.free();
  } catch (const sp::CollectiveFailure& failure) {
    // Every rank knows: the reporting rank prints first, then all ranks end together, so
    // no abort can cut the message off.
    if (failure.reports()) {
      std::fflush(stdout);
      std::fprintf(stderr, "shardprop: error: %s\n", failure.what());
      std::fflush(stderr);
    }
    if (MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS) MPI_Abort(MPI_COMM_WORLD, 1);
    MPI_Finalize();
    return 1;
  } catch (const std::exception& e) {
    std::fflush(stdout);
    std::fprintf(stderr, "shardprop: error: %s\n", e.what());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return status;
}
