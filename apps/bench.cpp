#include "bench.hpp"

#include <mpi.h>

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

#include "shardprop/data.hpp"
#include "shardprop/error.hpp"
#include "shardprop/layers.hpp"
#include "shardprop/rng.hpp"
#include "shardprop/train.hpp"

#ifdef SHARDPROP_HAVE_OPENBLAS
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);
#endif

namespace shardprop::bench {

namespace {

using clock = std::chrono::steady_clock;

double seconds_since(clock::time_point start) {
  return std::chrono::duration<double>(clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// GFLOP/s of C = A·B at n×n×n on one core, median of `reps` runs after a warm-up.
template <class Gemm>
double gemm_gflops(int n, int reps, const Gemm& gemm) {
  gemm();
  std::vector<double> rates;
  for (int r = 0; r < reps; ++r) {
    const auto start = clock::now();
    gemm();
    rates.push_back(2.0 * n * n * n / seconds_since(start) / 1e9);
  }
  return median(rates);
}

struct Gemm {
  double eigen = 0, openblas = 0;  // 0: not built with OpenBLAS
  double limit() const { return std::max(eigen, openblas); }
  // The better of two measurements of each library.
  static Gemm best(const Gemm& a, const Gemm& b) {
    return {std::max(a.eigen, b.eigen), std::max(a.openblas, b.openblas)};
  }
};

Gemm measure_gemm() {
  constexpr int n = 1024, reps = 9;
  const oneapi::tbb::global_control one(oneapi::tbb::global_control::max_allowed_parallelism, 1);
  RowMatrix<float> a = RowMatrix<float>::Random(n, n), b = RowMatrix<float>::Random(n, n);
  RowMatrix<float> c(n, n);
  Gemm g;
  g.eigen = gemm_gflops(n, reps, [&] { c.noalias() = a * b; });
#ifdef SHARDPROP_HAVE_OPENBLAS
  // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ.
  const float one_f = 1, zero = 0;
  g.openblas = gemm_gflops(n, reps, [&] {
    sgemm_("N", "N", &n, &n, &n, &one_f, b.data(), &n, a.data(), &n, &zero, c.data(), &n);
  });
#endif
  return g;
}

// Multiply-adds per sample of one training step: forward X·W for every layer, dW = Xᵀ·δ for
// every layer, and dX = δ·Wᵀ for every layer but the first.
double flops_per_sample(const ModelSpec& spec) {
  double macs = 0;
  for (std::size_t l = 0; l < spec.layers.size(); ++l) {
    const double inout = double(spec.layers[l].in) * double(spec.layers[l].out);
    macs += (l == 0 ? 2 : 3) * inout;
  }
  return 2 * macs;
}

// Peak resident memory of this process since the last reset, in MB.
double peak_rss_mb() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

// A rank left out of a case waits here without spinning until rank 0 is done.
void wait_for_rank0(MpiComm& world) {
  MPI_Request request;
  check_mpi(MPI_Ibarrier(world.get(), &request), "MPI_Ibarrier");
  int done = 0;
  while (true) {
    check_mpi(MPI_Test(&request, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

struct Workload {
  const char* name;
  const char* layers;
  std::size_t batch;
};

// The matrix products of one training step alone, through the training kernels at a case's
// shard shape and thread count: X·W for every layer, then δ·Wᵀ (all but the first) and Xᵀ·δ,
// from the last layer down. Activations are the identity, and there is no loss, no gradient
// check, no communication and no optimizer, so this is what the products of a step cost on
// their own: the most any step of these shapes could reach on this machine.
class Products {
 public:
  Products(const ModelSpec& spec, std::size_t rows, const Dataset& data)
      : spec_(spec), rows_(rows), x_(data.features.begin(), data.features.begin() + std::ptrdiff_t(rows * data.cols)) {
    Rng rng(7);
    const auto fill = [&](AlignedVector<float>& v, std::size_t n, double scale) {
      v.resize(n);
      for (float& e : v) e = float(scale * (2 * rng.uniform() - 1));
    };
    for (const LayerSpec& l : spec_.layers) {
      Layer& layer = layers_.emplace_back();
      fill(layer.w, l.in * l.out, 1 / std::sqrt(double(l.in)));
      fill(layer.b, l.out, 0.1);
      fill(layer.a, rows * l.out, 0);
      fill(layer.delta, rows * l.out, 0.1);  // the last layer's stands for the loss's δ
      fill(layer.dw, l.in * l.out, 0);
      fill(layer.db, l.out, 0);
    }
  }

  void step() {
    const auto rows = Eigen::Index(rows_);
    const std::size_t n = layers_.size();
    const auto view = [&](AlignedVector<float>& v, std::size_t cols) {
      return MatrixView<float>(v.data(), rows, Eigen::Index(cols));
    };
    const auto input = [&](std::size_t l) {
      return ConstMatrixView<float>(l == 0 ? x_.data() : layers_[l - 1].a.data(), rows,
                                    Eigen::Index(spec_.layers[l].in));
    };
    for (std::size_t l = 0; l < n; ++l) {
      const LayerSpec& s = spec_.layers[l];
      dense_forward<float>(input(l), weights(l), ConstRowVectorView<float>(layers_[l].b.data(), Eigen::Index(s.out)),
                           Activation::identity, view(layers_[l].a, s.out));
    }
    for (std::size_t l = n; l-- > 0;) {
      const LayerSpec& s = spec_.layers[l];
      const ConstMatrixView<float> delta(layers_[l].delta.data(), rows, Eigen::Index(s.out));
      if (l > 0) {
        dense_backward_input<float>(delta, weights(l), input(l), Activation::identity,
                                    view(layers_[l - 1].delta, s.in));
      }
      dense_backward_params<float>(input(l), delta,
                                   MatrixView<float>(layers_[l].dw.data(), Eigen::Index(s.in), Eigen::Index(s.out)),
                                   RowVectorView<float>(layers_[l].db.data(), Eigen::Index(s.out)));
    }
  }

 private:
  struct Layer {
    AlignedVector<float> w, b, a, delta, dw, db;
  };
  ConstMatrixView<float> weights(std::size_t l) const {
    return ConstMatrixView<float>(layers_[l].w.data(), Eigen::Index(spec_.layers[l].in),
                                  Eigen::Index(spec_.layers[l].out));
  }
  ModelSpec spec_;
  std::size_t rows_;
  AlignedVector<float> x_;
  std::vector<Layer> layers_;
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
                             int threads, const Args& args) {
  const oneapi::tbb::global_control parallelism(
      oneapi::tbb::global_control::max_allowed_parallelism, std::size_t(threads));
  const ModelSpec spec = parse_model(w.layers, "xent");
  std::vector<std::uint32_t> order;
  epoch_permutation(data.rows, 1, 0, order);
  const std::size_t batches = data.rows / w.batch;
  const auto batch = [&](std::size_t k) {
    return std::span<const std::uint32_t>(order).subspan((k % batches) * w.batch, w.batch);
  };
  struct Mode {
    std::string name;
    std::unique_ptr<Trainer> trainer;    // a training mode
    std::unique_ptr<Products> products;  // or the products alone
    std::size_t next = 0;
    std::int64_t per_window = 0;
    void step(const decltype(batch)& batch) {
      if (products) {
        products->step();
      } else {  // as in training: the next batch is gathered during this step
        trainer->step(batch(next), batch(next + 1));
        ++next;
      }
    }
  };
  std::vector<Mode> modes(args.deterministic_chunk > 0 ? 3 : 2);
  modes.front().name = "default";
  if (args.deterministic_chunk > 0) modes[1].name = "deterministic";
  modes.back().name = "products";
  // The default mode's peak memory is read once it has run its warm-up and calibration steps
  // (a steady-state step allocates nothing), before the other modes exist.
  reset_peak_rss();
  double default_peak = 0;
  for (Mode& mode : modes) {
    if (mode.name == "products") {
      const std::size_t rows = chunked_shard(w.batch, 0, comm.rank(), comm.size()).size();
      mode.products = std::make_unique<Products>(spec, rows, data);
    } else {
      TrainConfig config;
      config.batch = w.batch;
      config.epochs = 1u << 20;
      config.optimizer.lr = 0.01;
      config.deterministic_chunk = mode.name == "deterministic" ? args.deterministic_chunk : 0;
      mode.trainer = std::make_unique<Trainer>(spec, config, comm, data);
    }
    for (int i = 0; i < args.warmup; ++i) mode.step(batch);
    // Steps per window from a short calibration, agreed on by all ranks (rank 0's).
    const auto start = clock::now();
    for (int i = 0; i < 5; ++i) mode.step(batch);
    mode.per_window = std::max<std::int64_t>(3, std::int64_t(args.window_s / (seconds_since(start) / 5)));
    comm.broadcast_values(std::span<std::int64_t>(&mode.per_window, 1), 0);
    if (mode.name == "default") default_peak = peak_rss_mb();
  }

  std::vector<Result> results(modes.size());
  std::vector<std::vector<double>> seconds(modes.size());
  for (std::size_t m = 0; m < modes.size(); ++m) {
    if (modes[m].trainer) modes[m].trainer->reset_step_times();
    Result& r = results[m];
    r.workload = w.name;
    r.mode = modes[m].name;
    r.layers = spec.layers_string();
    r.batch = w.batch;
    r.ranks = comm.size();
    r.threads = threads;
  }
  for (int window = 0; window < args.windows; ++window) {
    for (std::size_t m = 0; m < modes.size(); ++m) {
      // The ranks start each window together: the products alone never communicate, so
      // one rank may end its window well after the other, and the next window would
      // otherwise open by waiting for it.
      comm.allreduce_max(std::int64_t{0});
      const auto start = clock::now();
      for (std::int64_t i = 0; i < modes[m].per_window; ++i) modes[m].step(batch);
      seconds[m].push_back(seconds_since(start));
    }
  }
  // A window ends when its slowest rank is done. The split of a step is averaged over the
  // ranks; the memory is the largest rank's.
  const double peaks[2] = {default_peak, peak_rss_mb()};
  std::int64_t peak_kb[2] = {};
  for (int i = 0; i < 2; ++i) peak_kb[i] = comm.allreduce_max(std::int64_t(peaks[i] * 1024));
  for (std::size_t m = 0; m < modes.size(); ++m) {
    Result& r = results[m];
    comm.allreduce_max(std::span<double>(seconds[m]));
    for (double t : seconds[m]) {
      r.window_rates.push_back(double(modes[m].per_window) * double(w.batch) / t);
    }
    r.samples_per_s = median(r.window_rates);
    r.gflops = r.samples_per_s * flops_per_sample(spec) / 1e9;
    r.peak_rss_mb = double(peak_kb[r.mode == "default" ? 0 : 1]) / 1024;
    if (!modes[m].trainer) {  // all compute
      r.step_ms = r.compute_ms = 1e3 * double(w.batch) / r.samples_per_s;
      continue;
    }
    const StepTimes& t = modes[m].trainer->step_times();
    double split[3] = {t.compute, t.allreduce, t.total};
    comm.allreduce_sum(std::span<double>(split));
    const double per_step_ms = 1e3 / double(t.steps) / comm.size();
    r.compute_ms = split[0] * per_step_ms;
    r.allreduce_ms = split[1] * per_step_ms;
    r.step_ms = split[2] * per_step_ms;
    r.rest_ms = r.step_ms - r.compute_ms - r.allreduce_ms;
  }
  return results;
}

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
  return "{\"eigen\": " + json_number(g.eigen) + ", \"openblas\": " +
         (g.openblas > 0 ? json_number(g.openblas) : std::string("null")) + "}";
}

std::string to_json(const Gemm& start, const Gemm& end, const Gemm& both_start,
                    const Gemm& both_end, const std::vector<Result>& results,
                    const std::string& data, int cores) {
  const Gemm g = Gemm::best(start, end);
  std::ostringstream j;
  j << "{\n  \"machine\": {\"cpu\": \"" << cpu_model() << "\", \"cores\": " << cores << "},\n";
  j << "  \"data\": \"" << data << "\",\n";
  j << "  \"training_gemm\": \"" << (SHARDPROP_TRAINING_GEMM) << "\",\n";
  j << "  \"gemm_1024_gflops_per_core\": {\"eigen\": " << json_number(g.eigen)
    << ", \"openblas\": " << (g.openblas > 0 ? json_number(g.openblas) : "null")
    << ", \"limit\": " << json_number(g.limit()) << ", \"at_start\": " << gemm_json(start)
    << ", \"at_end\": " << gemm_json(end) << "},\n";
  if (both_start.eigen > 0) {
    j << "  \"gemm_1024_gflops_per_core_both_cores_busy\": {\"at_start\": " << gemm_json(both_start)
      << ", \"at_end\": " << gemm_json(both_end) << "},\n";
  }
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

  // The single-core limit is measured before and after the training cases, and the better
  // measurement of each library counts: this machine's speed drifts, and a limit taken at a
  // slow moment alone would overstate every efficiency.
  const auto measure = [&] {
    Gemm g;
    if (root) g = measure_gemm();
    wait_for_rank0(world);  // rank 1 sleeps through the single-core measurement
    return g;
  };
  // The same GEMM on both ranks at once, each on its own core: the mean per core. What two
  // busy cores of this machine give against one.
  const auto measure_both = [&] {
    Gemm g;
    if (world.size() < 2) return g;
    world.allreduce_max(std::int64_t{0});
    g = measure_gemm();
    double sums[2] = {g.eigen, g.openblas};
    world.allreduce_sum(std::span<double>(sums));
    return Gemm{sums[0] / 2, sums[1] / 2};
  };
  const Gemm at_start = measure();
  const Gemm both_at_start = measure_both();

  const Workload workloads[] = {{"small", "784,256:relu,128:relu,10:softmax", 128},
                                {"wide", "784,1024:relu,1024:relu,10:softmax", 256}};
  std::vector<Result> results;
  for (const Workload& w : workloads) {
    // One rank: rank 0 alone (the other waits without using a core), 1 then 2 threads.
    for (int threads : {1, 2}) {
      if (root) {
        MpiComm self(MPI_COMM_SELF);
        for (Result& r : run_case(self, w, data, threads, args)) results.push_back(std::move(r));
        self.free();
      }
      wait_for_rank0(world);
    }
    if (world.size() == 2) {
      for (Result& r : run_case(world, w, data, 1, args)) {
        if (root) results.push_back(std::move(r));
      }
    }
  }
  const Gemm at_end = measure();
  const Gemm both_at_end = measure_both();
  if (!root) return 0;
  const Gemm gemm = Gemm::best(at_start, at_end);
  const auto print_gemm = [](const char* where, const char* when, const Gemm& g) {
    std::printf("GEMM 1024x1024x1024 float32 %s, %s: Eigen %.1f GFLOP/s", where, when, g.eigen);
    if (g.openblas > 0) std::printf(", OpenBLAS %.1f GFLOP/s", g.openblas);
    std::printf("\n");
  };
  print_gemm("on one core", "at the start", at_start);
  print_gemm("on one core", "at the end", at_end);
  std::printf("limit: %.1f GFLOP/s per core, the best of these (training uses %s)\n",
              gemm.limit(), SHARDPROP_TRAINING_GEMM);
  const Gemm both = Gemm::best(both_at_start, both_at_end);
  if (world.size() == 2) {
    print_gemm("on both cores at once, per core", "at the start", both_at_start);
    print_gemm("on both cores at once, per core", "at the end", both_at_end);
    std::printf("both cores at once: %.2f of the limit per core, the best of these\n",
                both.limit() / gemm.limit());
  }
  std::printf("data: %s\n\n", real ? args.data_path.c_str() : "synthetic, 60000 x 784, 10 classes");
  std::printf("%-6s %-13s %-13s %10s %8s %6s %8s %8s %9s %7s %8s\n", "case", "mode",
              "ranks x thr", "samples/s", "GFLOP/s", "eff", "step ms", "compute", "allreduce",
              "rest", "peak MB");
  for (Result& r : results) {
    r.efficiency = r.gflops / (double(r.ranks * r.threads) * gemm.limit());
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
  if (!args.json_path.empty()) {
    std::ofstream out(args.json_path, std::ios::trunc);
    out << to_json(at_start, at_end, both_at_start, both_at_end, results, real ? args.data_path : "synthetic", cores);
    out.close();
    SP_CHECK(out, "--json ", args.json_path, ": cannot write");
    std::printf("wrote %s\n", args.json_path.c_str());
  }
  return 0;
}

}  // namespace shardprop::bench
