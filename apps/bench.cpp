// shardprop-bench: the machine's single-core GEMM limit and training throughput against it.
// Runs under mpirun with 2 ranks (or 1: the 2-rank cases are then skipped); rank 0 prints
// the table and writes the JSON document (scripts/bench.sh, docs/PERFORMANCE.md).
#include <mpi.h>

#include <CLI/CLI.hpp>

#include "bench.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/info.h>
#include <sstream>
#include <thread>
#include <vector>

#include "gemm.hpp"
#include "layers.hpp"
#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/rng.hpp"
#include "shardprop/train.hpp"


namespace shardprop::bench {

namespace {

Dataset load_or_make(const std::string& path, bool& real) {
  std::error_code ec;
  real = !path.empty() && std::filesystem::exists(path, ec);
  if (real) return read_dataset(path);
  Dataset d;  // the shape of Fashion-MNIST's training set
  d.rows = 60000;
  d.cols = 784;
  d.features.resize(d.rows * d.cols);
  d.labels.resize(d.rows);
  Rng rng(2024);
  for (auto& v : d.features) v = float(rng.uniform());
  for (auto& l : d.labels) l = std::int32_t(rng.below(10));
  return d;
}

std::string cpu_model() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) return line.substr(line.find(':') + 2);
  }
  return "unknown";
}

std::string json_number(double v) {
  char text[32];
  std::snprintf(text, sizeof text, "%.6g", v);
  return text;
}

std::string gemm_json(const Gemm& g) {
  const std::vector<std::string> names = gemm_names();
  std::string j = "{";
  for (std::size_t i = 0; i < g.fp32.size(); ++i) {
    j += "\"" + names[i] + "\": " + json_number(g.fp32[i]) + ", ";
  }
  return j + "\"bf16\": " + (g.bf16 > 0 ? json_number(g.bf16) : std::string("null")) +
         ", \"limit\": " + json_number(g.limit()) + "}";
}

struct WorkloadGemm {
  std::string workload;
  Gemm at_start, at_end, both_start, both_end;
};

std::string to_json(const std::vector<WorkloadGemm>& gemms, const std::vector<Result>& results,
                    const std::string& data, int cores) {
  std::ostringstream j;
  j << "{\n  \"machine\": {\"cpu\": \"" << cpu_model() << "\", \"cores\": " << cores << "},\n";
  j << "  \"data\": \"" << data << "\",\n";
  j << "  \"training_gemm\": \"" << gemm_backend() << "\",\n";
  j << "  \"step_gemm_gflops_per_core\": {";
  for (std::size_t i = 0; i < gemms.size(); ++i) {
    const WorkloadGemm& g = gemms[i];
    j << (i ? ", " : "") << "\"" << g.workload << "\": {\"best\": "
      << gemm_json(Gemm::best(g.at_start, g.at_end)) << ", \"at_start\": " << gemm_json(g.at_start)
      << ", \"at_end\": " << gemm_json(g.at_end);
    if (!g.both_start.fp32.empty()) {
      j << ", \"both_cores_busy\": " << gemm_json(Gemm::best(g.both_start, g.both_end));
    }
    j << "}";
  }
  j << "},\n";
  j << "  \"cases\": [\n";
  for (std::size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    j << "    {\"workload\": \"" << r.workload << "\", \"mode\": \"" << r.mode
      << "\", \"layers\": \"" << r.layers
      << "\", \"batch\": " << r.batch << ", \"ranks\": " << r.ranks << ", \"threads\": " << r.threads
      << ", \"samples_per_s\": " << json_number(r.samples_per_s) << ", \"windows\": [";
    for (std::size_t k = 0; k < r.window_rates.size(); ++k) {
      j << (k ? ", " : "") << json_number(r.window_rates[k]);
    }
    j << "], \"gflops\": " << json_number(r.gflops) << ", \"efficiency\": " << json_number(r.efficiency)
      << ", \"step_ms\": " << json_number(r.step_ms) << ", \"compute_ms\": " << json_number(r.compute_ms)
      << ", \"allreduce_ms\": " << json_number(r.allreduce_ms) << ", \"rest_ms\": "
      << json_number(r.rest_ms) << ", \"peak_rss_mb\": " << json_number(r.peak_rss_mb) << "}"
      << (i + 1 < results.size() ? "," : "") << "\n";
  }
  j << "  ]\n}\n";
  return j.str();
}

}  // namespace

int run(const Args& args, MpiComm& world) {
  const bool root = world.rank() == 0;
  SP_CHECK(world.size() <= 2, "bench runs on 1 or 2 ranks, not ", world.size());
  bool real = false;
  Dataset data;
  collective_check(world, [&] { data = load_or_make(args.data_path, real); });
  const int cores = int(std::thread::hardware_concurrency());

  const Workload workloads[] = {{"small", "784,256:relu,128:relu,10:softmax", 128},
                                {"wide", "784,1024:relu,1024:relu,10:softmax", 256}};
  // Each workload's limit: every backend's GEMM at the step's own shapes on one core,
  // measured before and after the training cases; the better measurement of each backend
  // counts (this machine's speed drifts, and a limit taken at a slow moment alone would
  // overstate every efficiency), and the best backend is the limit.
  std::vector<WorkloadGemm> gemms;
  for (const Workload& w : workloads) gemms.push_back({w.name, {}, {}, {}, {}});
  const auto measure = [&](std::size_t i) {
    Gemm g;
    if (root) g = measure_gemm(workloads[i], workloads[i].batch);
    wait_for_rank0(world);  // rank 1 sleeps through the single-core measurement
    return g;
  };
  // The same products on both ranks at once, each on its own core, half the batch each (as
  // a 2-rank step runs them): the mean per core. What two busy cores give against one.
  const auto measure_both = [&](std::size_t i) {
    Gemm g;
    if (world.size() < 2) return g;
    world.allreduce_max(std::int64_t{0});
    g = measure_gemm(workloads[i], workloads[i].batch / 2);
    std::vector<double> sums = g.fp32;
    sums.push_back(g.bf16);
    world.allreduce_sum(std::span<double>(sums));
    for (std::size_t k = 0; k < g.fp32.size(); ++k) g.fp32[k] = sums[k] / 2;
    g.bf16 = sums.back() / 2;
    return g;
  };
  for (std::size_t i = 0; i < gemms.size(); ++i) {
    gemms[i].at_start = measure(i);
    gemms[i].both_start = measure_both(i);
  }

  std::vector<Result> results;
  for (const Workload& w : workloads) {
    // One rank: rank 0 alone (the other waits without using a core), 1 then 2 threads.
    for (int threads : {1, 2}) {
      if (root) {
        MpiComm self(MPI_COMM_SELF);
        for (Result& r : run_case(self, w, data, threads, args)) results.push_back(std::move(r));
      }
      wait_for_rank0(world);
    }
    if (world.size() == 2) {
      for (Result& r : run_case(world, w, data, 1, args)) {
        if (root) results.push_back(std::move(r));
      }
    }
  }
  for (std::size_t i = 0; i < gemms.size(); ++i) {
    gemms[i].at_end = measure(i);
    gemms[i].both_end = measure_both(i);
  }
  if (!root) return 0;
  const std::vector<std::string> names = gemm_names();
  const auto print_gemm = [&](const char* when, const Gemm& g) {
    std::printf("  %-28s", when);
    for (std::size_t k = 0; k < g.fp32.size(); ++k) std::printf(" %9.1f", g.fp32[k]);
    if (g.bf16 > 0) std::printf(" %9.1f", g.bf16);
    std::printf("\n");
  };
  std::printf("GEMM at each step's own shapes, GFLOP/s per core:\n  %-28s", "");
  for (const std::string& n : names) std::printf(" %9.9s", n.c_str());
  if (gemm::bf16_supported()) std::printf(" %9s", "bf16");
  std::printf("\n");
  for (std::size_t k = 0; k < names.size(); ++k) std::printf("  (%s)\n", names[k].c_str());
  for (std::size_t i = 0; i < gemms.size(); ++i) {
    const WorkloadGemm& g = gemms[i];
    std::printf("%s, %zu rows:\n", g.workload.c_str(), workloads[i].batch);
    print_gemm("one core, at the start", g.at_start);
    print_gemm("one core, at the end", g.at_end);
    if (world.size() == 2) {
      print_gemm("both cores busy, per core", Gemm::best(g.both_start, g.both_end));
    }
    const Gemm best = Gemm::best(g.at_start, g.at_end);
    const auto top = std::max_element(best.fp32.begin(), best.fp32.end()) - best.fp32.begin();
    std::printf("  limit %.1f GFLOP/s per core: %s, the best of these", best.limit(),
                names[std::size_t(top)].c_str());
    if (best.bf16 > 0) std::printf("; bf16 %.2fx of it", best.bf16 / best.limit());
    std::printf("\n");
  }
  std::printf("training uses %s\n", gemm_backend().c_str());
  std::printf("data: %s\n\n", real ? args.data_path.c_str() : "synthetic, 60000 x 784, 10 classes");
  std::printf("%-6s %-13s %-13s %10s %8s %6s %8s %8s %9s %7s %8s\n", "case", "mode",
              "ranks x thr", "samples/s", "GFLOP/s", "eff", "step ms", "compute", "allreduce",
              "rest", "peak MB");
  const auto limit_of = [&](const std::string& workload) {
    for (const WorkloadGemm& g : gemms) {
      if (g.workload == workload) return Gemm::best(g.at_start, g.at_end).limit();
    }
    return 0.0;
  };
  for (Result& r : results) {
    r.efficiency = r.gflops / (double(r.ranks * r.threads) * limit_of(r.workload));
    std::printf("%-6s %-13s %5d x %-5d %10.0f %8.1f %6.3f %8.3f %8.3f %9.3f %7.3f %8.1f\n",
                r.workload.c_str(), r.mode.c_str(), r.ranks, r.threads, r.samples_per_s, r.gflops,
                r.efficiency, r.step_ms, r.compute_ms, r.allreduce_ms, r.rest_ms, r.peak_rss_mb);
  }
  std::printf("\n");
  const auto find = [&](const char* workload, const char* mode, int ranks,
                        int threads) -> const Result* {
    for (const Result& r : results) {
      if (r.workload == workload && r.mode == mode && r.ranks == ranks && r.threads == threads) {
        return &r;
      }
    }
    return nullptr;
  };
  for (const Workload& w : workloads) {
    const Result* base = find(w.name, "default", 1, 1);
    const Result* base_products = find(w.name, "products", 1, 1);
    for (const auto& [ranks, threads] : {std::pair{1, 2}, std::pair{2, 1}}) {
      const Result* r = find(w.name, "default", ranks, threads);
      const Result* p = find(w.name, "products", ranks, threads);
      if (r && p) {
        std::printf("%s: %d x %d is %.2fx the samples/s of 1 x 1 (the products alone: %.2fx)\n",
                    w.name, ranks, threads, r->samples_per_s / base->samples_per_s,
                    p->samples_per_s / base_products->samples_per_s);
      }
    }
  }
  // Every case's samples/s in `mode` as a share of its samples/s in mode `of` (`whose`).
  const auto print_shares = [&](const char* mode, const char* of, const char* whose) {
    for (const Workload& w : workloads) {
      for (const auto& [ranks, threads] : {std::pair{1, 1}, std::pair{1, 2}, std::pair{2, 1}}) {
        const Result* r = find(w.name, mode, ranks, threads);
        const Result* base = find(w.name, of, ranks, threads);
        if (r && base) {
          std::printf("%s: %d x %d keeps %.2f of %s samples/s\n", w.name, ranks, threads,
                      r->samples_per_s / base->samples_per_s, whose);
        }
      }
    }
  };
  std::printf("\ntraining against the products alone (same case, alternating windows):\n");
  print_shares("default", "products", "the products'");
  if (args.deterministic_chunk > 0) {
    std::printf("\ndeterministic mode (chunks of %zu rows) against the default mode:\n",
                args.deterministic_chunk);
    print_shares("deterministic", "default", "the default's");
  }
  if (args.accumulate > 1) {
    std::printf("\n--accumulate %zu against no accumulation (the same global batch):\n",
                args.accumulate);
    print_shares("accumulate", "default", "no accumulation's");
    std::printf("the products alone, in micro-batches against whole shards:\n");
    print_shares("products-accumulate", "products", "whole shards'");
  }
  if (args.bf16) {
    std::printf("\n--precision bf16 against float32 (the default mode):\n");
    for (const Workload& w : workloads) {
      for (const auto& [ranks, threads] : {std::pair{1, 1}, std::pair{1, 2}, std::pair{2, 1}}) {
        const Result* r = find(w.name, "bf16", ranks, threads);
        const Result* base = find(w.name, "default", ranks, threads);
        if (r && base) {
          std::printf("%s: %d x %d bf16 is %.2fx the float32 samples/s\n", w.name, ranks, threads,
                      r->samples_per_s / base->samples_per_s);
        }
      }
    }
  }
  if (!args.json_path.empty()) {
    std::ofstream out(args.json_path, std::ios::trunc);
    out << to_json(gemms, results, real ? args.data_path : "synthetic", cores);
    out.close();
    SP_CHECK(out, "--json ", args.json_path, ": cannot write");
    std::printf("wrote %s\n", args.json_path.c_str());
  }
  return 0;
}

}  // namespace shardprop::bench

int main(int argc, char** argv) {
  namespace sp = shardprop;
  setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "3", 0);  // as shardprop does
  int provided = 0;
  if (MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
    std::fprintf(stderr, "shardprop-bench: error: MPI_Init_thread failed\n");
    return sp::kExitFailure;
  }
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (size > 1) sp::set_error_rank(rank);
  CLI::App app{"shardprop-bench: the single-core GEMM limit and training throughput against it "
               "(run on 2 ranks: scripts/bench.sh)"};
  sp::bench::Args args;
  bool deterministic = false;
  std::size_t chunk = 64;
  app.add_option("--data", args.data_path, "Training set; synthetic data of its shape if absent");
  app.add_option("--json", args.json_path, "Write the results as one JSON document");
  app.add_option("--windows", args.windows, "Timed windows per case (median reported)")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--window-seconds", args.window_s, "Length of a window")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--warmup", args.warmup, "Untimed steps before timing")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_flag("--deterministic", deterministic,
               "Also time every case in the deterministic mode, alternating with the default");
  bool no_bf16 = false;
  app.add_flag("--no-bf16", no_bf16, "Skip the --precision bf16 cases (run where the CPU can)");
  app.add_option("--chunk", chunk, "Rows per chunk of the deterministic mode")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--accumulate", args.accumulate,
                 "Also time every case with gradient accumulation in K micro-batches, "
                 "alternating with the default")
      ->check(CLI::Range(2, 1 << 20));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (rank == 0) {
      if (e.get_exit_code() == 0) {
        app.exit(e);
      } else {
        std::fprintf(stderr, "shardprop-bench: error: %s (see --help)\n", e.what());
      }
    }
    MPI_Finalize();
    return e.get_exit_code() == 0 ? sp::kExitSuccess : sp::kExitUsage;
  }
  args.deterministic_chunk = deterministic ? chunk : 0;
  args.bf16 = !no_bf16 && sp::gemm::bf16_supported();
  int status = 0;
  try {
    sp::MpiComm world(MPI_COMM_WORLD);
    status = sp::bench::run(args, world);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shardprop-bench: error: %s\n", e.what());
    MPI_Abort(MPI_COMM_WORLD, sp::kExitFailure);
  }
  MPI_Finalize();
  return status;
}
