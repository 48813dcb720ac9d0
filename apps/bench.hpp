// `shardprop bench`: the machine's single-core GEMM limit and training throughput against it.
#pragma once

#include <string>

#include "shardprop/comm.hpp"

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

// Runs under mpirun with 2 ranks (or 1: the 2-rank cases are then skipped). Rank 0 prints
// the table and writes the JSON document.
int run(const Args& args, MpiComm& comm);

}  // namespace shardprop::bench
