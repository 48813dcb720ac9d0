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
  // Every case also runs with --precision bf16 (where the CPU can).
  bool bf16 = false;
  // > 1: every case also runs with gradient accumulation in this many micro-batches.
  std::size_t accumulate = 0;
};

// GFLOP/s of one training step's matrix products at its own shapes (every layer's X·W, δ·Wᵀ
// and Xᵀ·δ at the batch's rows), on one core, by every GEMM backend built in.
struct Gemm {
  std::vector<double> fp32;  // per backend, in gemm::backends() order
  double bf16 = 0;           // bf16 operands, float32 sums (0: not supported here)
  double limit() const { return fp32.empty() ? 0 : *std::max_element(fp32.begin(), fp32.end()); }
  // The better of two measurements of each backend.
  static Gemm best(const Gemm& a, const Gemm& b) {
    Gemm g = a;
    for (std::size_t i = 0; i < g.fp32.size() && i < b.fp32.size(); ++i) {
      g.fp32[i] = std::max(a.fp32[i], b.fp32[i]);
    }
    g.bf16 = std::max(a.bf16, b.bf16);
    return g;
  }
};

struct Workload {
  const char* name;
  const char* layers;
  std::size_t batch;
};

// The step's products of `w` at `rows` rows on one core (max_allowed_parallelism 1).
Gemm measure_gemm(const Workload& w, std::size_t rows);
// The names of gemm::backends(), in order, as printed.
std::vector<std::string> gemm_names();

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
