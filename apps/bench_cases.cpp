// shardprop-bench's measurements: the GEMM limit and the training cases.
#include <mpi.h>

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

using clock = std::chrono::steady_clock;

double seconds_since(clock::time_point start) {
  return std::chrono::duration<double>(clock::now() - start).count();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}


}  // namespace

namespace {

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

}  // namespace

std::vector<std::string> gemm_names() {
  std::vector<std::string> names;
  for (gemm::Backend b : gemm::backends()) names.push_back(gemm::describe(b));
  return names;
}

Gemm measure_gemm(const Workload& w, std::size_t rows) {
  constexpr int reps = 7;
  const oneapi::tbb::global_control one(oneapi::tbb::global_control::max_allowed_parallelism, 1);
  const ModelSpec spec = parse_model(w.layers, "xent");
  Rng rng(11);
  struct Layer {
    std::size_t in, out;
    AlignedVector<float> x, w, z, d, dx, dw;
    AlignedVector<std::uint16_t> x16, w16, d16;
  };
  std::vector<Layer> layers;
  for (const LayerSpec& l : spec.layers) {
    Layer& m = layers.emplace_back();
    m.in = l.in;
    m.out = l.out;
    const auto fill = [&](AlignedVector<float>& v, std::size_t n, AlignedVector<std::uint16_t>* half) {
      v.resize(n);
      for (float& e : v) e = float(2 * rng.uniform() - 1);
      if (half) {
        half->resize(n);
        gemm::to_bf16(v.data(), half->data(), n);
      }
    };
    fill(m.x, rows * l.in, &m.x16);
    fill(m.w, l.in * l.out, &m.w16);
    fill(m.z, rows * l.out, nullptr);
    fill(m.d, rows * l.out, &m.d16);
    fill(m.dx, rows * l.in, nullptr);
    fill(m.dw, l.in * l.out, nullptr);
  }
  using gemm::Op;
  const auto r = Eigen::Index(rows);
  const auto products = [&](auto&& multiply) {
    for (std::size_t i = layers.size(); i-- > 0;) {
      Layer& m = layers[i];
      const auto in = Eigen::Index(m.in), out = Eigen::Index(m.out);
      multiply(Op::none, Op::none, m.x, m.x16, r, in, m.w, m.w16, in, out, m.z, out);
      if (i > 0) multiply(Op::none, Op::transpose, m.d, m.d16, r, out, m.w, m.w16, in, out, m.dx, in);
      multiply(Op::transpose, Op::none, m.x, m.x16, r, in, m.d, m.d16, r, out, m.dw, out);
    }
  };
  const double flops = flops_per_sample(spec) * double(rows);
  const auto rate = [&](auto&& multiply) {
    products(multiply);  // warm-up
    std::vector<double> rates;
    for (int k = 0; k < reps; ++k) {
      const auto start = clock::now();
      products(multiply);
      rates.push_back(flops / seconds_since(start) / 1e9);
    }
    return median(rates);
  };
  Gemm g;
  for (gemm::Backend b : gemm::backends()) {
    g.fp32.push_back(rate([&](Op op_a, Op op_b, const AlignedVector<float>& a,
                              const AlignedVector<std::uint16_t>&, Eigen::Index ar,
                              Eigen::Index ac, const AlignedVector<float>& bm,
                              const AlignedVector<std::uint16_t>&, Eigen::Index br,
                              Eigen::Index bc, AlignedVector<float>& c, Eigen::Index cc) {
      const Eigen::Index cr = op_a == Op::none ? ar : ac;
      gemm::multiply<float>(b, op_a, op_b, 1.0f, {a.data(), ar, ac, ac}, {bm.data(), br, bc, bc},
                            0.0f, {c.data(), cr, cc, cc});
    }));
  }
  if (gemm::bf16_supported()) {
    g.bf16 = rate([&](Op op_a, Op op_b, const AlignedVector<float>&,
                      const AlignedVector<std::uint16_t>& a, Eigen::Index ar, Eigen::Index ac,
                      const AlignedVector<float>&, const AlignedVector<std::uint16_t>& bm,
                      Eigen::Index br, Eigen::Index bc, AlignedVector<float>& c, Eigen::Index cc) {
      const Eigen::Index cr = op_a == Op::none ? ar : ac;
      gemm::multiply_bf16(op_a, op_b, {a.data(), ar, ac, ac}, {bm.data(), br, bc, bc},
                          {c.data(), cr, cc, cc});
    });
  }
  return g;
}

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


namespace {

// The matrix products of one training step alone, through the training kernels at a case's
// shard shape and thread count: X·W for every layer, then δ·Wᵀ (all but the first) and Xᵀ·δ,
// from the last layer down. Activations are the identity, and there is no loss, no gradient
// check, no communication and no optimizer, so this is what the products of a step cost on
// their own: the most any step of these shapes could reach on this machine.
class Products {
 public:
  // `micros` > 1: the products of gradient accumulation, `rows` rows per micro-batch, the
  // weight gradients added up over `micros` of them.
  Products(const ModelSpec& spec, std::size_t rows, const Dataset& data, std::size_t micros = 1)
      : spec_(spec), rows_(rows), micros_(micros), x_(rows * data.cols) {
    for (std::size_t r = 0; r < rows; ++r) data.copy_row(r, x_.data() + r * data.cols);
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
    for (std::size_t m = 0; m < micros_; ++m) pass(m > 0);
  }

 private:
  void pass(bool add) {
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
                           Activation::identity, view(layers_[l].a, s.out), 0, scratch_);
    }
    for (std::size_t l = n; l-- > 0;) {
      const LayerSpec& s = spec_.layers[l];
      const ConstMatrixView<float> delta(layers_[l].delta.data(), rows, Eigen::Index(s.out));
      if (l > 0) {
        dense_backward_input<float>(delta, weights(l), input(l), Activation::identity,
                                    view(layers_[l - 1].delta, s.in), 0, scratch_);
      }
      dense_backward_params<float>(input(l), delta,
                                   MatrixView<float>(layers_[l].dw.data(), Eigen::Index(s.in), Eigen::Index(s.out)),
                                   RowVectorView<float>(layers_[l].db.data(), Eigen::Index(s.out)),
                                   {}, nullptr, nullptr, add);
    }
  }

  struct Layer {
    AlignedVector<float> w, b, a, delta, dw, db;
  };
  ConstMatrixView<float> weights(std::size_t l) const {
    return ConstMatrixView<float>(layers_[l].w.data(), Eigen::Index(spec_.layers[l].in),
                                  Eigen::Index(spec_.layers[l].out));
  }
  ModelSpec spec_;
  std::size_t rows_, micros_;
  AlignedVector<float> x_;
  std::vector<Layer> layers_;
  ChunkScratch<float> scratch_;  // unused: the products run by threads, not chunks
};


}  // namespace

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
  std::vector<Mode> modes(1);
  modes.front().name = "default";
  if (args.deterministic_chunk > 0) modes.emplace_back().name = "deterministic";
  if (args.bf16) modes.emplace_back().name = "bf16";
  if (args.accumulate > 1) modes.emplace_back().name = "accumulate";
  modes.emplace_back().name = "products";
  if (args.accumulate > 1) modes.emplace_back().name = "products-accumulate";
  // The default mode's peak memory is read once it has run its warm-up and calibration steps
  // (a steady-state step allocates nothing), before the other modes exist.
  reset_peak_rss();
  double default_peak = 0;
  for (Mode& mode : modes) {
    if (mode.name == "products") {
      const std::size_t rows = shard_range(w.batch, comm.rank(), comm.size()).size();
      mode.products = std::make_unique<Products>(spec, rows, data);
    } else if (mode.name == "products-accumulate") {
      const std::size_t rows =
          micro_shard(w.batch, 0, args.accumulate, comm.rank(), comm.size()).size();
      mode.products = std::make_unique<Products>(spec, rows, data, args.accumulate);
    } else {
      Settings settings;
      settings.layers = w.layers;
      settings.batch = w.batch;
      settings.epochs = 1u << 20;
      settings.lr = 0.01;
      settings.deterministic = mode.name == "deterministic";
      if (settings.deterministic) settings.chunk = args.deterministic_chunk;
      if (mode.name == "bf16") settings.precision = "bf16";
      if (mode.name == "accumulate") settings.accumulate = args.accumulate;
      mode.trainer = std::make_unique<Trainer>(settings, comm, data);
    }
    for (int i = 0; i < args.warmup; ++i) mode.step(batch);
    // Steps per window from a short calibration, agreed on by all ranks (rank 0's).
    const auto start = clock::now();
    for (int i = 0; i < 5; ++i) mode.step(batch);
    mode.per_window = std::max<std::int64_t>(3, std::int64_t(args.window_s / (seconds_since(start) / 5)));
    comm.broadcast(std::span<std::int64_t>(&mode.per_window, 1), 0);
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

}  // namespace shardprop::bench
