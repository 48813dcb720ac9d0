// `shardprop train`: settings → checkpointer (resume and merge) → data → trainer → report.
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>
#include <optional>
#include <thread>

#include "commands.hpp"
#include "report.hpp"
#include "shardprop/checkpoint.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/stop.hpp"
#include "shardprop/train.hpp"

namespace shardprop::app {

namespace {

// The cores this process may run on (mpirun may have bound it to fewer than the node has).
int cores_here() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) != 0) return int(std::thread::hardware_concurrency());
  return std::max(1, CPU_COUNT(&set));
}

const int kStopSignals[] = {SIGTERM, SIGINT, SIGUSR1};

void on_stop_signal(int signal) { request_stop(signal); }

// From the start of `train` to the end of the process: SIGTERM, SIGINT and SIGUSR1 (what
// mpirun forwards, and what a batch scheduler sends before its time limit) ask to stop at the
// next step boundary instead of ending the process. They stay caught after training, so a
// second signal while the job winds down cannot turn its "stopped" status into a kill.
void catch_stop_signals() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  for (int signal : kStopSignals) {
    SP_CHECK(sigaction(signal, &action, nullptr) == 0, "installing the handler of signal ",
             signal, " failed");
  }
}

}  // namespace

int run_train(const Settings& cli, const GivenFlags& given, MpiComm& comm) {
  const bool speak = comm.rank() == 0;
  clear_stop();
  catch_stop_signals();
  int status = kExitSuccess;
  // Start-up is checked collectively: a bad flag, file or value stops every rank, and only
  // the lowest failing rank says why.
  Checkpointer checkpointer(comm, cli, given);
  const Settings& s = checkpointer.settings();
  comm.set_timeout(s.collective_timeout);  // a resume may bring another
  if (speak) {
    if (s.resume == "auto" && !checkpointer.resumed()) {
      std::printf("no checkpoint in %s yet: starting a new run\n", s.checkpoint_dir.c_str());
    }
    for (const std::string& why : checkpointer.skipped()) {
      std::fprintf(stderr, "shardprop: warning: skipping a checkpoint that does not verify: %s\n",
                   why.c_str());
    }
  }
  Dataset train, test, val;
  collective_check(comm, [&] {
    SP_CHECK_USAGE(!s.train.empty(), "--train is required");
    const ModelSpec spec = parse_model(s.layers, s.loss);
    // Partitioned: each rank reads its block of the training set (any split serves: the
    // rows travel) and of the test set (the rows it evaluates). Streamed: the training
    // set's features stay in the file; the test set is read as partitioned.
    const bool replicated = s.data_placement == "replicated" || comm.size() == 1;
    const auto block = [&](std::size_t chunk) {
      return replicated ? std::nullopt
                        : std::optional<RowBlock>(RowBlock{comm.rank(), comm.size(), chunk});
    };
    train = s.data_placement == "streamed" ? read_dataset_streamed(s.train)
                                           : read_dataset(s.train, true, block(0));
    check_fits(train, spec, s.train);
    if (const auto& c = checkpointer.resumed()) {
      SP_CHECK(train.global_rows() == c->train_rows && train.cols == c->train_cols, s.train,
               ": ", train.global_rows(), " samples of ", train.cols,
               " features, but the checkpoint was "
               "trained on ", c->train_rows, " of ", c->train_cols,
               " (the sample order depends on the training set)");
    }
    if (!s.test.empty()) {
      test = read_dataset(s.test, true, block(s.deterministic_chunk()));
      check_fits(test, spec, s.test);
    }
    if (!s.val.empty()) {
      val = read_dataset(s.val, true, block(s.deterministic_chunk()));
      check_fits(val, spec, s.val);
    }
  });

  // --threads is honoured as given: the arena has that many slots even where mpirun bound
  // the rank to fewer cores (the header says so).
  const int node_cores = std::max(1, int(std::thread::hardware_concurrency()));
  const int threads = s.threads > 0 ? int(s.threads)
                                    : std::max(1, node_cores / comm.ranks_on_node());
  const oneapi::tbb::global_control limit(
      oneapi::tbb::global_control::max_allowed_parallelism, std::size_t(threads));
  oneapi::tbb::task_arena arena(threads);
  arena.execute([&] {
    std::optional<Trainer> trainer;
    collective_check(comm, [&] {
      trainer.emplace(s, comm, train);
      if (const auto& c = checkpointer.resumed()) trainer->restore(*c);
    });
    const Dataset* test_set = s.test.empty() ? nullptr : &test;
    const Dataset* val_set = s.val.empty() ? nullptr : &val;
    if (speak) {
      print_run_header({comm.size(), threads, cores_here(), gemm_backend(), val_set}, *trainer,
                       test_set, checkpointer);
    }
    // Open MPI hands its ranks a pseudo-terminal even when mpirun's own output is a file, so
    // under mpirun "auto" cannot see the real terminal; launch scripts pass always/never.
    const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr;
    const bool progress = s.progress == "always" ||
                          (s.progress == "auto" && !under_mpirun && isatty(STDOUT_FILENO));
    std::optional<Reporter> reporter;
    collective_check(comm, [&] {
      reporter.emplace(speak, progress, comm.size(), threads, s.metrics,
                       checkpointer.resumed().has_value());
    });
    if (speak && !trainer->steps_left()) {
      std::printf("nothing to train: step %llu, %s of %s done\n",
                  (unsigned long long)trainer->state().step,
                  count_of(trainer->state().epoch, "epoch").c_str(),
                  std::to_string(s.epochs).c_str());
    }
    trainer->run(test_set, *reporter, &checkpointer, val_set);
    const TrainState& state = trainer->state();
    if (speak && state.best_epoch > 0) {
      std::printf("best: epoch %llu, %s %.4f%s%s\n", (unsigned long long)state.best_epoch,
                  s.monitor.c_str(), monitored(s.monitor, state.best_metric),
                  checkpointer.writing() ? ", model in " : "", checkpointer.best_path().c_str());
      if (trainer->stopped_early()) {
        std::printf("stopped early after epoch %llu: %s without a better %s\n",
                    (unsigned long long)state.epoch,
                    count_of(state.epochs_without_improvement, "epoch").c_str(),
                    s.monitor.c_str());
      }
    }
    if (const int signal = trainer->stopped_by_signal()) {
      status = kExitStopped;
      if (speak) {
        const auto step = (unsigned long long)trainer->state().step;
        const char* name = sigabbrev_np(signal);
        if (checkpointer.writing()) {
          std::printf("stopped by SIG%s at step %llu: checkpoint %s; continue with --resume %s\n",
                      name ? name : "?", step, reporter->last_checkpoint().c_str(),
                      s.checkpoint_dir.c_str());
        } else {
          std::printf("stopped by SIG%s at step %llu: nothing saved (no --checkpoint-dir)\n",
                      name ? name : "?", step);
        }
        std::fflush(stdout);
      }
    }
  });
  return status;
}

}  // namespace shardprop::app
