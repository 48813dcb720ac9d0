// The steady-state training step allocates nothing: every heap allocation of the process
// (malloc, so operator new, Eigen's and oneTBB's allocations too) is counted while the
// trainer takes steps after a warm-up.
#include <gtest/gtest.h>
#include <malloc.h>

#include <algorithm>

#include <atomic>
#include <oneapi/tbb/global_control.h>

#include "gemm.hpp"
#include "shardprop/train.hpp"
#include "test_util.hpp"

extern "C" void* __libc_malloc(std::size_t);
extern "C" void* __libc_calloc(std::size_t, std::size_t);
extern "C" void* __libc_realloc(void*, std::size_t);
extern "C" void* __libc_memalign(std::size_t, std::size_t);

namespace {
std::atomic<long> allocations{0};
std::atomic<bool> counting{false};
void count() {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
}
}  // namespace

extern "C" {
void* malloc(std::size_t n) {
  count();
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t size) {
  count();
  return __libc_calloc(n, size);
}
void* realloc(void* p, std::size_t n) {
  count();
  return __libc_realloc(p, n);
}
void* memalign(std::size_t align, std::size_t n) {
  count();
  return __libc_memalign(align, n);
}
void* aligned_alloc(std::size_t align, std::size_t n) {
  count();
  return __libc_memalign(align, n);
}
int posix_memalign(void** out, std::size_t align, std::size_t n) {
  count();
  *out = __libc_memalign(align, n);
  return *out ? 0 : 12;
}
}

namespace shardprop {
namespace {

void expect_no_allocation(const char* gemm, const char* layers, std::size_t batch, int threads,
                          std::size_t deterministic_chunk = 0, const char* precision = "fp32") {
  const oneapi::tbb::global_control limit(oneapi::tbb::global_control::max_allowed_parallelism,
                                          std::size_t(threads));
  const Dataset data = testing::noisy_classes(600, 64, 10, 1.0);
  Settings config;
  config.layers = layers;
  config.batch = batch;
  config.gemm = gemm;
  config.precision = precision;
  config.deterministic = deterministic_chunk > 0;
  if (config.deterministic) config.chunk = deterministic_chunk;
  testing::LocalGroup one(1);
  Trainer trainer(config, one.member(0), data);
  std::vector<std::uint32_t> order;
  epoch_permutation(data.rows, 1, 0, order);
  const auto rows = [&](std::size_t k) {
    return std::span<const std::uint32_t>(order).subspan(k * batch % (data.rows - batch), batch);
  };
  const auto step = [&](std::size_t k) { trainer.step(rows(k), rows(k + 1)); };
  for (std::size_t k = 0; k < 5; ++k) step(k);  // warm-up: workspaces, thread pools
  allocations = 0;
  counting = true;
  for (std::size_t k = 5; k < 25; ++k) step(k);
  counting = false;
  EXPECT_EQ(allocations.load(), 0) << gemm << " " << precision << ": " << layers << " batch "
                                    << batch << ", " << threads << " threads, chunk "
                                    << deterministic_chunk;
}

bool built_in(gemm::Backend backend) {
  const auto all = gemm::backends();
  return std::find(all.begin(), all.end(), backend) != all.end();
}

void expect_no_allocation_by(const char* gemm) {
  expect_no_allocation(gemm, "64,32:relu,10:softmax", 16, 1);
  expect_no_allocation(gemm, "64,256:relu,256:tanh,10:softmax", 128, 1);
  expect_no_allocation(gemm, "64,256:relu,256:tanh,10:softmax", 128, 2);
  expect_no_allocation(gemm, "64,256:relu,256:tanh,10:softmax", 128, 1, 32);
  expect_no_allocation(gemm, "64,300:relu,10:softmax", 100, 2, 16);
}

// With OpenBLAS, the one backend that allocates nothing per product. Eigen allocates its
// blocking buffers per product, and oneDNN its packing buffers (about one allocation per
// product in float32, 87 per step of the 3-layer model below in bf16).
TEST(Allocation, SteadyStateStepAllocatesNothingWithOpenBlas) {
  if (!built_in(gemm::Backend::openblas)) GTEST_SKIP() << "built without OpenBLAS";
  expect_no_allocation_by("openblas");
}

// The counter works: it sees an allocation that happens.
TEST(Allocation, CounterSeesAllocations) {
  allocations = 0;
  counting = true;
  auto* p = new std::vector<int>(1000);
  counting = false;
  delete p;
  EXPECT_GE(allocations.load(), 1);
}

}  // namespace
}  // namespace shardprop
