// shardprop: data-parallel MLP training over MPI. The only place that catches errors,
// prints them and aborts the job.
#include <mpi.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/info.h>
#include <optional>
#include <thread>

#include "shardprop/checkpoint.hpp"
#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/train.hpp"

namespace sp = shardprop;

namespace {

struct TrainArgs {
  std::string train_path, test_path, layers = "784,256:relu,128:relu,10:softmax", loss = "xent";
  std::string optimizer = "sgd", lr_schedule = "constant", metrics_path, progress = "auto";
  std::string save_path;
  std::size_t batch = 256, epochs = 10, eval_batch = 1024;
  double lr = 0.05, momentum = 0.9, weight_decay = 0.0;
  int threads = 0;  // 0: cores on the node / ranks on the node
  std::int64_t max_steps = -1;
  std::uint64_t seed = 1;
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

  void on_epoch(const sp::EpochStats& s) override {
    if (!speak_) return;
    if (progress_) std::printf("\r\033[K");
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

int run_train(const TrainArgs& args, sp::MpiComm& comm) {
  // Start-up is checked collectively: a bad flag, file or value stops every rank, and only
  // the lowest failing rank says why.
  sp::ModelSpec spec;
  sp::TrainConfig config;
  sp::Dataset train, test;
  sp::collective_check(comm, [&] {
    spec = sp::parse_model(args.layers, args.loss);
    config.batch = args.batch;
    config.epochs = args.epochs;
    config.max_steps = args.max_steps;
    config.seed = args.seed;
    config.eval_batch = args.eval_batch;
    config.optimizer.kind = sp::parse_optimizer(args.optimizer);
    config.optimizer.lr = args.lr;
    config.optimizer.momentum = args.momentum;
    config.optimizer.weight_decay = args.weight_decay;
    config.cosine_schedule = args.lr_schedule == "cosine";
    train = sp::read_dataset(args.train_path);
    sp::check_fits(train, spec, args.train_path);
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
  sp::collective_check(comm, [&] { trainer.emplace(spec, config, comm, train); });

  const bool speak = comm.rank() == 0;
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
    std::printf("  batch      %zu global (%zu-%zu per rank), %zu steps per epoch, %zu epochs\n",
                config.batch, config.batch / std::size_t(comm.size()),
                (config.batch + std::size_t(comm.size()) - 1) / std::size_t(comm.size()),
                trainer->batches_per_epoch(), config.epochs);
    std::printf("  optimizer  %s lr %g%s", std::string(sp::to_string(opt.kind)).c_str(), opt.lr,
                config.cosine_schedule ? " (cosine decay)" : "");
    if (opt.kind == sp::OptimizerKind::sgd) std::printf(" momentum %g", opt.momentum);
    if (opt.weight_decay > 0) std::printf(" weight_decay %g", opt.weight_decay);
    std::printf(", seed %llu\n", (unsigned long long)config.seed);
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
  trainer->run(args.test_path.empty() ? nullptr : &test, *reporter);
  if (!args.save_path.empty()) {
    // Rank 0 writes; the others learn whether it worked before anyone reports success.
    sp::collective_check(comm, [&] {
      if (comm.rank() == 0) {
        sp::save_model(args.save_path, spec, trainer->params(), trainer->state().step,
                       trainer->state().epoch);
      }
    });
    if (speak) std::printf("saved %s\n", args.save_path.c_str());
  }
  return 0;
}

struct EvalArgs {
  std::string model_path, data_path;
  std::size_t eval_batch = 1024;
};

int run_eval(const EvalArgs& args, sp::MpiComm& comm) {
  sp::ModelFile model;
  sp::Dataset data;
  sp::collective_check(comm, [&] {
    model = sp::load_model(args.model_path);
    data = sp::read_dataset(args.data_path);
    sp::check_fits(data, model.spec, args.data_path);
  });
  sp::Mlp<float> mlp(model.spec);
  const sp::EvalStats e = sp::evaluate_dataset(mlp, comm, model.params, data, args.eval_batch);
  if (comm.rank() == 0) {
    std::printf("{\"loss\":%.9g,\"accuracy\":%.9g,\"samples\":%zu}\n", e.loss, e.accuracy,
                e.samples);
  }
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
  if (sp::is_model_file(path)) {
    const sp::ModelFile m = sp::load_model(path);
    std::printf("%s: model %s, loss %s, %s parameters, step %llu, epoch %llu\n", path.c_str(),
                m.spec.layers_string().c_str(), std::string(sp::to_string(m.spec.loss)).c_str(),
                thousands(m.spec.parameter_count()).c_str(), (unsigned long long)m.step,
                (unsigned long long)m.epoch);
    return 0;
  }
  const sp::Dataset data = sp::read_dataset(path);
  std::printf("%s: data set, %zu samples x %zu features, ", path.c_str(), data.rows, data.cols);
  if (data.has_labels()) {
    std::printf("labels 0..%zu (%zu classes)\n", data.label_classes() - 1, data.label_classes());
  } else {
    std::printf("targets with %zu columns\n", data.target_cols);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    std::fprintf(stderr, "shardprop: error: MPI_Init_thread failed\n");
    return 1;
  }
  int world_rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);

  CLI::App app{"shardprop: data-parallel multilayer-perceptron training over MPI"};
  app.require_subcommand(1);
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
  train->add_option("--save", t.save_path, "Write the trained model to this HDF5 file (rank 0)");
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
  eval->add_option("--checkpoint", ev.model_path, "Model file written by train --save")->required();
  eval->add_option("--data", ev.data_path, "HDF5 data set")->required();
  eval->add_option("--eval-batch", ev.eval_batch, "Rows per forward pass")
      ->check(number_above(0, false))->capture_default_str();

  std::string info_path;
  CLI::App* info = app.add_subcommand("info", "Describe a data set or a model file");
  info->add_option("file", info_path, "HDF5 file")->required();

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

  int status = 0;
  try {
    sp::MpiComm comm(MPI_COMM_WORLD);
    if (train->parsed()) {
      status = run_train(t, comm);
    } else if (eval->parsed()) {
      status = run_eval(ev, comm);
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
