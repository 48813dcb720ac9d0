// shardprop-bench's parts: the GEMM limit, the training cases, and what they report.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "shardprop/comm.hpp"
#include "shardprop/data.hpp"

namespace shardprop::bench {

struct Args {
  std::string data_path;  // Fashion-MNIST training set in HDF5; synthetic data if empty/absent
  std::string json_path;
  int windows = 7;        // timed windows per case; the median is reported
  double window_s = 0.6;  // seconds per window (steps are fixed after a calibration)
  int warmup = 10;        // untimed steps before the windows
  // > 0: every case also runs in the deterministic mode with chunks of this many rows, its
  // windows alternating with the default mode's.
  std::size_t deterministic_chunk = 0;
};

struct Gemm {
  double eigen = 0, openblas = 0;  // 0: not built with OpenBLAS
  double limit() const { return std::max(eigen, openblas); }
  // The better of two measurements of each library.
  static Gemm best(const Gemm& a, const Gemm& b) {
    return {std::max(a.eigen, b.eigen), std::max(a.openblas, b.openblas)};
  }
};

// GFLOP/s of 1024x1024x1024 products on one core (max_allowed_parallelism 1), per library.
Gemm measure_gemm();

struct Workload {
  const char* name;
  const char* layers;
  std::size_t batch;
};

struct Result {
  std::string workload, mode, layers;
  std::size_t batch = 0;
  int ranks = 0, threads = 0;
  std::vector<double> window_rates;
  double samples_per_s = 0, gflops = 0, efficiency = 0;
  double step_ms = 0, compute_ms = 0, allreduce_ms = 0, rest_ms = 0, peak_rss_mb = 0;
};

// Everything but the efficiency, which needs the limit measured after all cases. One result
// per mode: the default mode, with --deterministic the deterministic one, and the step's
// products alone. Their timed windows alternate, so a drift in the machine's speed touches
// all alike.
std::vector<Result> run_case(Communicator& comm, const Workload& w, const Dataset& data,
                             int threads, const Args& args);

// A rank left out of a case waits here without spinning until rank 0 is done.
void wait_for_rank0(MpiComm& world);

}  // namespace shardprop::bench
