// shardprop: data-parallel MLP training over MPI. Parses the command line, dispatches to
// the command, and is the only place that catches errors: it prints one line and ends every
// rank with the status the error calls for (README, "Exit statuses").
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>

#include "commands.hpp"
#include "shardprop/error.hpp"

namespace sp = shardprop;

namespace {

// Prints the error line (rank 0, or the rank that failed alone) and ends the job: through a
// barrier and MPI_Finalize when every rank knows (one process, or a collective failure), by
// MPI_Abort when the other ranks may be waiting inside a collective.
[[noreturn]] void stop(const std::string& line, bool print, bool everyone_knows, int status) {
  std::fflush(stdout);
  if (print) {
    std::fprintf(stderr, "shardprop: error: %s\n", line.c_str());
    std::fflush(stderr);
  }
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (everyone_knows || size == 1) {
    if (size > 1 && MPI_Barrier(MPI_COMM_WORLD) != MPI_SUCCESS) MPI_Abort(MPI_COMM_WORLD, status);
    MPI_Finalize();
    std::exit(status);
  }
  MPI_Abort(MPI_COMM_WORLD, status);
  std::exit(status);
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
    return sp::kExitFailure;
  }
  int world_rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  if (world_size > 1) sp::set_error_rank(world_rank);
  const bool root = world_rank == 0;

  CLI::App app{"shardprop: data-parallel multilayer-perceptron training over MPI"};
  app.require_subcommand(1);
  // A flag given twice takes its last value, so scripts can append overrides.
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  app.set_version_flag("--version", "shardprop 0.2.0");
  app.footer("Exit statuses: 0 done, 1 failed, 2 usage error, 75 stopped by a signal (resumable).");

  sp::Settings settings;
  sp::GivenFlags given;
  CLI::App* train = app.add_subcommand("train", "Train a model, data-parallel over the MPI ranks");
  sp::app::add_settings_options(*train, settings, given);

  sp::app::ConvertArgs convert_args;
  std::string label_column = "0";
  CLI::App* convert = app.add_subcommand(
      "convert", "Convert IDX or CSV data to HDF5 (IDX and CSV are read whole, for small data)");
  convert->add_option("--images", convert_args.images, "IDX image file (gzip or plain)");
  convert->add_option("--labels", convert_args.labels, "IDX label file (gzip or plain)");
  convert->add_option("--csv", convert_args.csv, "CSV file of numbers");
  convert->add_option("--label-column", label_column,
                      "CSV column (0-based) holding integer labels, or 'none' (unlabeled)")
      ->capture_default_str();
  convert->add_option("--out", convert_args.out, "HDF5 file to write")->required();

  sp::app::ModelArgs eval_args, predict_args;
  std::string predict_label_column = "none";
  double collective_timeout = 300;
  CLI::App* eval = app.add_subcommand("eval", "Loss and accuracy of a saved model on a data set");
  CLI::App* predict = app.add_subcommand("predict", "Predicted class and outputs of every sample");
  for (auto [command, args] : {std::pair{eval, &eval_args}, std::pair{predict, &predict_args}}) {
    command->add_option("--checkpoint", args->checkpoint,
                        "Checkpoint or model file, or a checkpoint directory (its newest valid one)")
        ->required();
    command->add_option("--eval-batch", args->eval_batch, "Rows per forward pass")
        ->check(CLI::PositiveNumber)->capture_default_str();
    command->add_option("--collective-timeout", collective_timeout,
                        "Seconds a collective may wait for the other ranks (0: forever)")
        ->check(CLI::NonNegativeNumber)->capture_default_str();
    command->add_option("--precision", args->precision,
                        "fp32 or bf16 products; default: the model's training precision")
        ->check(CLI::IsMember({"fp32", "bf16"}));
    command->add_option("--gemm", args->gemm,
                        "Matrix-product library: auto, onednn, openblas or eigen")
        ->check(CLI::IsMember({"auto", "onednn", "openblas", "eigen"}))->capture_default_str();
  }
  eval->add_option("--data", eval_args.data, "HDF5 data set")->required();
  predict->add_option("--data", predict_args.data,
                      "HDF5 data set, or CSV (labels not needed; see --label-column)")
      ->required();
  predict->add_option("--label-column", predict_label_column,
                      "For CSV data: the column holding labels, or 'none'")
      ->capture_default_str();
  predict->add_option("--out", predict_args.out, "Output: .h5 (predictions, outputs) or .csv")
      ->required();

  std::string info_path;
  CLI::App* info = app.add_subcommand(
      "info", "Describe any file shardprop reads or writes: a data set, a checkpoint or its "
              "directory (and verify it), predictions, a metrics file");
  info->add_option("file", info_path, "The file or checkpoint directory")->required();

  // CLI11 would only say that a subcommand is required.
  if (argc > 1 && argv[1][0] != '-') {
    std::string names;
    bool known = false;
    for (const CLI::App* sub : app.get_subcommands([](const CLI::App*) { return true; })) {
      known |= sub->get_name() == argv[1];
      names += (names.empty() ? "" : ", ") + sub->get_name();
    }
    if (!known) {
      stop(std::string("unknown command '") + argv[1] + "' (expected one of " + names + ")",
           root, true, sp::kExitUsage);
    }
  }
  try {
    app.parse(argc, argv);
    convert_args.label_column = sp::app::parse_label_column(label_column);
    predict_args.label_column = sp::app::parse_label_column(predict_label_column);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments, so every rank stops; rank 0 says why.
    if (e.get_exit_code() == 0) {  // --help or --version
      if (root) app.exit(e);
      MPI_Finalize();
      return sp::kExitSuccess;
    }
    stop(std::string(e.what()) + " (see --help)", root, true, sp::kExitUsage);
  } catch (const sp::UsageError& e) {
    stop(e.message() + " (see --help)", root, true, sp::kExitUsage);
  }

  int status = sp::kExitSuccess;
  try {
    sp::MpiComm comm(MPI_COMM_WORLD);
    if (train->parsed()) {
      comm.set_timeout(settings.collective_timeout);
      status = sp::app::run_train(settings, given, comm);
    } else if (eval->parsed()) {
      comm.set_timeout(collective_timeout);
      status = sp::app::run_eval(eval_args, comm);
    } else if (predict->parsed()) {
      comm.set_timeout(collective_timeout);
      status = sp::app::run_predict(predict_args, comm);
    } else if (convert->parsed()) {
      status = sp::app::run_convert(convert_args, comm);
    } else if (info->parsed()) {
      status = sp::app::run_info(info_path, comm);
    }
  } catch (const sp::CollectiveFailure& failure) {
    // Every rank knows: the reporting rank prints, then all ranks end together.
    stop(failure.what(), failure.reports(), true, failure.exit_status());
  } catch (const sp::UsageError& e) {
    stop(e.message() + " (see --help)", true, false, sp::kExitUsage);
  } catch (const sp::Error& e) {
    stop(e.what(), true, false, e.exit_status());
  } catch (const std::exception& e) {
    stop(e.what(), true, false, sp::kExitFailure);
  }
  MPI_Finalize();
  return status;
}
