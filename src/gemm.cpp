#include "gemm.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "shardprop/error.hpp"
#include "shardprop/params.hpp"

#ifdef SHARDPROP_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.h>
// oneDNN runs its products on OpenMP threads, as many as omp_get_max_threads() says for the
// calling thread; each thread that calls it is set to one (see onednn_thread()).
extern "C" void omp_set_num_threads(int);
#endif

#ifdef SHARDPROP_HAVE_OPENBLAS
// The Fortran BLAS interface of Debian's serial OpenBLAS (column-major), and its build.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
char* openblas_get_corename(void);
char* openblas_get_config(void);
}
#endif

namespace shardprop::gemm {

namespace {

template <class T>
using StridedMap = Eigen::Map<Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>,
                              0, Eigen::OuterStride<>>;
template <class T>
using ConstStridedMap =
    Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
               Eigen::OuterStride<>>;

template <class T>
void eigen_multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b,
                    T beta, const View<T>& c) {
  StridedMap<T> out(c.data, c.rows, c.cols, Eigen::OuterStride<>(c.ld));
  const ConstStridedMap<T> x(a.data, a.rows, a.cols, Eigen::OuterStride<>(a.ld));
  const ConstStridedMap<T> y(b.data, b.rows, b.cols, Eigen::OuterStride<>(b.ld));
  const auto apply = [&](const auto& product) {
    if (beta == T(0)) {
      out.noalias() = alpha * product;
    } else {
      if (beta != T(1)) out *= beta;
      out.noalias() += alpha * product;
    }
  };
  if (op_a == Op::none && op_b == Op::none) {
    apply(x * y);
  } else if (op_a == Op::transpose && op_b == Op::none) {
    apply(x.transpose() * y);
  } else if (op_a == Op::none && op_b == Op::transpose) {
    apply(x * y.transpose());
  } else {
    apply(x.transpose() * y.transpose());
  }
}

template <class T>
Eigen::Index depth(Op op_a, const View<const T>& a) {
  return op_a == Op::none ? a.cols : a.rows;
}

// c = beta·c (0 for beta 0, whatever c held): a product of depth 0.
template <class T>
void scale(T beta, const View<T>& c) {
  for (Eigen::Index r = 0; r < c.rows; ++r) {
    T* row = c.data + r * c.ld;
    for (Eigen::Index j = 0; j < c.cols; ++j) row[j] = beta == T(0) ? T(0) : beta * row[j];
  }
}

#ifdef SHARDPROP_HAVE_ONEDNN
void check_dnnl(dnnl_status_t status, const char* call) {
  SP_CHECK(status == dnnl_success, "oneDNN: ", call, " failed with status ", int(status));
}

// The calling thread's OpenMP thread count, set to one the first time it calls oneDNN, so
// a product runs on the thread that asked for it and nowhere else.
void onednn_thread() {
  thread_local const bool set = [] {
    omp_set_num_threads(1);
    return true;
  }();
  (void)set;
}

char trans(Op op) { return op == Op::none ? 'N' : 'T'; }

template <class H, dnnl_status_t (*destroy)(H)>
struct DnnlDeleter {
  void operator()(H h) const { destroy(h); }
};
using Engine = std::unique_ptr<std::remove_pointer_t<dnnl_engine_t>,
                               DnnlDeleter<dnnl_engine_t, dnnl_engine_destroy>>;
using Stream = std::unique_ptr<std::remove_pointer_t<dnnl_stream_t>,
                               DnnlDeleter<dnnl_stream_t, dnnl_stream_destroy>>;
using Primitive = std::unique_ptr<std::remove_pointer_t<dnnl_primitive_t>,
                                  DnnlDeleter<dnnl_primitive_t, dnnl_primitive_destroy>>;
using PrimitiveDesc =
    std::unique_ptr<std::remove_pointer_t<dnnl_primitive_desc_t>,
                    DnnlDeleter<dnnl_primitive_desc_t, dnnl_primitive_desc_destroy>>;
using Attr = std::unique_ptr<std::remove_pointer_t<dnnl_primitive_attr_t>,
                             DnnlDeleter<dnnl_primitive_attr_t, dnnl_primitive_attr_destroy>>;
using PostOps = std::unique_ptr<std::remove_pointer_t<dnnl_post_ops_t>,
                                DnnlDeleter<dnnl_post_ops_t, dnnl_post_ops_destroy>>;
using Memory = std::unique_ptr<std::remove_pointer_t<dnnl_memory_t>,
                               DnnlDeleter<dnnl_memory_t, dnnl_memory_destroy>>;

dnnl_engine_t engine() {
  static const Engine e = [] {
    dnnl_engine_t h = nullptr;
    check_dnnl(dnnl_engine_create(&h, dnnl_cpu, 0), "dnnl_engine_create");
    return Engine(h);
  }();
  return e.get();
}

// The matmul of one shape, layout and operand type (bf16 or float32), with its operands'
// memory objects (their data set per call) and its own scratchpad: each thread keeps its
// own, so nothing is shared between threads running products at once.
struct Matmul {
  Primitive primitive;
  Memory src, weights, dst, scratch;
  AlignedVector<unsigned char> scratch_bytes;
};

// Shapes, ops, strides, whether c is added to, and the operands' type.
using Key = std::array<std::int64_t, 10>;
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    std::size_t h = 0;
    for (std::int64_t v : k) h = h * 1000003u ^ std::hash<std::int64_t>()(v);
    return h;
  }
};

void strided_md(dnnl_memory_desc_t& md, dnnl_dim_t rows, dnnl_dim_t cols, Op op, dnnl_dim_t ld,
                dnnl_data_type_t type) {
  // op(x) is rows × cols; x is stored row-major with rows `ld` apart.
  const dnnl_dims_t dims = {rows, cols};
  const dnnl_dims_t strides = {op == Op::none ? ld : 1, op == Op::none ? 1 : ld};
  check_dnnl(dnnl_memory_desc_init_by_strides(&md, 2, dims, type, strides),
             "dnnl_memory_desc_init_by_strides");
}

Memory make_memory(const dnnl_memory_desc_t& md) {
  dnnl_memory_t h = nullptr;
  check_dnnl(dnnl_memory_create(&h, &md, engine(), DNNL_MEMORY_NONE), "dnnl_memory_create");
  return Memory(h);
}

std::unique_ptr<Matmul> make_matmul(const Key& k) {
  const dnnl_dim_t m = k[0], n = k[1], depth_k = k[2];
  dnnl_memory_desc_t src, weights, dst;
  const auto type = dnnl_data_type_t(k[9]);
  strided_md(src, m, depth_k, Op(k[3]), k[5], type);
  strided_md(weights, depth_k, n, Op(k[4]), k[6], type);
  strided_md(dst, m, n, Op::none, k[7], dnnl_f32);
  dnnl_matmul_desc_t desc;
  check_dnnl(dnnl_matmul_desc_init(&desc, &src, &weights, nullptr, &dst), "dnnl_matmul_desc_init");
  dnnl_primitive_attr_t attr_h = nullptr;
  check_dnnl(dnnl_primitive_attr_create(&attr_h), "dnnl_primitive_attr_create");
  const Attr attr(attr_h);
  check_dnnl(dnnl_primitive_attr_set_scratchpad_mode(attr.get(), dnnl_scratchpad_mode_user),
             "dnnl_primitive_attr_set_scratchpad_mode");
  if (k[8] != 0) {  // c += a·b: a sum post-op
    dnnl_post_ops_t ops = nullptr;
    check_dnnl(dnnl_post_ops_create(&ops), "dnnl_post_ops_create");
    const PostOps owned(ops);
    check_dnnl(dnnl_post_ops_append_sum(ops, 1.0f), "dnnl_post_ops_append_sum");
    check_dnnl(dnnl_primitive_attr_set_post_ops(attr.get(), ops), "dnnl_primitive_attr_set_post_ops");
  }
  dnnl_primitive_desc_t pd_h = nullptr;
  check_dnnl(dnnl_primitive_desc_create(&pd_h, &desc, attr.get(), engine(), nullptr),
             "dnnl_primitive_desc_create (matmul)");
  const PrimitiveDesc pd(pd_h);
  auto mm = std::make_unique<Matmul>();
  dnnl_primitive_t p = nullptr;
  check_dnnl(dnnl_primitive_create(&p, pd.get()), "dnnl_primitive_create");
  mm->primitive.reset(p);
  mm->src = make_memory(src);
  mm->weights = make_memory(weights);
  mm->dst = make_memory(dst);
  const dnnl_memory_desc_t* scratch = dnnl_primitive_desc_query_md(pd.get(),
                                                                   dnnl_query_scratchpad_md, 0);
  const std::size_t bytes = scratch ? dnnl_memory_desc_get_size(scratch) : 0;
  if (bytes > 0) {
    mm->scratch = make_memory(*scratch);
    mm->scratch_bytes.resize(bytes);
    check_dnnl(dnnl_memory_set_data_handle(mm->scratch.get(), mm->scratch_bytes.data()),
               "dnnl_memory_set_data_handle");
  }
  return mm;
}

struct ThreadMatmuls {
  Stream stream;
  std::unordered_map<Key, std::unique_ptr<Matmul>, KeyHash> cache;
};

// c = op(a)·op(b), or c += with `add`, through the calling thread's matmul of this shape;
// a and b hold values of `type`.
template <class In>
void onednn_matmul(dnnl_data_type_t type, Op op_a, Op op_b, const View<const In>& a,
                   const View<const In>& b, const View<float>& c, bool add) {
  onednn_thread();
  thread_local ThreadMatmuls mine;
  if (!mine.stream) {
    dnnl_stream_t s = nullptr;
    check_dnnl(dnnl_stream_create(&s, engine(), dnnl_stream_default_flags), "dnnl_stream_create");
    mine.stream.reset(s);
  }
  const Key key = {c.rows, c.cols, depth(op_a, a), std::int64_t(op_a), std::int64_t(op_b),
                   a.ld, b.ld, c.ld, add ? 1 : 0, std::int64_t(type)};
  auto found = mine.cache.find(key);
  if (found == mine.cache.end()) {
    // Shapes repeat every step; a run that keeps making new ones (odd batch sizes in eval)
    // starts the cache afresh instead of growing it without bound.
    if (mine.cache.size() >= 512) mine.cache.clear();
    found = mine.cache.emplace(key, make_matmul(key)).first;
  }
  Matmul& mm = *found->second;
  check_dnnl(dnnl_memory_set_data_handle(mm.src.get(), const_cast<In*>(a.data)),
             "dnnl_memory_set_data_handle");
  check_dnnl(dnnl_memory_set_data_handle(mm.weights.get(), const_cast<In*>(b.data)),
             "dnnl_memory_set_data_handle");
  check_dnnl(dnnl_memory_set_data_handle(mm.dst.get(), c.data), "dnnl_memory_set_data_handle");
  const dnnl_exec_arg_t args[] = {{DNNL_ARG_SRC, mm.src.get()},
                                  {DNNL_ARG_WEIGHTS, mm.weights.get()},
                                  {DNNL_ARG_DST, mm.dst.get()},
                                  {DNNL_ARG_SCRATCHPAD, mm.scratch.get()}};
  const int nargs = mm.scratch ? 4 : 3;
  check_dnnl(dnnl_primitive_execute(mm.primitive.get(), mine.stream.get(), nargs, args),
             "dnnl_primitive_execute (matmul)");
  check_dnnl(dnnl_stream_wait(mine.stream.get()), "dnnl_stream_wait");
}

void onednn_multiply_bf16(Op op_a, Op op_b, const View<const Bf16>& a, const View<const Bf16>& b,
                          const View<float>& c, bool add) {
  onednn_matmul(dnnl_bf16, op_a, op_b, a, b, c, add);
}

template <class T>
void onednn_multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b,
                     T beta, const View<T>& c) {
  if constexpr (std::is_same_v<T, float>) {
    // a·bᵀ (δ·Wᵀ): the matmul primitive reads b as stored, where sgemm packs it transposed
    // on every call. One core, 1024 × 1024 b: 140 against 88 GFLOP/s at 32 rows of a, 172
    // against 124 at 64, 198 against 176 at 256 (docs/PERFORMANCE.md). The other products
    // ran even or faster through sgemm.
    if (op_a == Op::none && op_b == Op::transpose && alpha == 1.0f &&
        (beta == 0.0f || beta == 1.0f)) {
      return onednn_matmul(dnnl_f32, op_a, op_b, a, b, c, beta == 1.0f);
    }
    onednn_thread();
    check_dnnl(dnnl_sgemm(trans(op_a), trans(op_b), c.rows, c.cols, depth(op_a, a), alpha,
                          a.data, a.ld, b.data, b.ld, beta, c.data, c.ld),
               "dnnl_sgemm");
  } else {
    eigen_multiply(op_a, op_b, alpha, a, b, beta, c);  // oneDNN has no double GEMM
  }
}
#endif

#ifdef SHARDPROP_HAVE_OPENBLAS
template <class T>
void openblas_multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b,
                       T beta, const View<T>& c) {
  // Debian's serial OpenBLAS gave wrong products when two threads called it at once (seen
  // in checkpoint_test's in-process ranks), so calls are serialized.
  static std::mutex serial;
  const std::lock_guard<std::mutex> lock(serial);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ over the same memory.
  const int m = int(c.rows), n = int(c.cols);
  const int k = int(depth(op_a, a));
  const int lda = int(a.ld), ldb = int(b.ld), ldc = int(c.ld);
  const char* ta = op_b == Op::none ? "N" : "T";
  const char* tb = op_a == Op::none ? "N" : "T";
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(ta, tb, &n, &m, &k, &alpha, b.data, &ldb, a.data, &lda, &beta, c.data, &ldc);
  } else {
    dgemm_(ta, tb, &n, &m, &k, &alpha, b.data, &ldb, a.data, &lda, &beta, c.data, &ldc);
  }
}
#endif

constexpr Backend kBuiltIn[] = {
#ifdef SHARDPROP_HAVE_ONEDNN
    Backend::onednn,
#endif
    Backend::eigen,
#ifdef SHARDPROP_HAVE_OPENBLAS
    Backend::openblas,
#endif
};

bool built_in(Backend b) {
  for (Backend x : kBuiltIn) {
    if (x == b) return true;
  }
  return false;
}

std::optional<Backend> by_name(std::string_view name) {
  for (Backend b : {Backend::eigen, Backend::onednn, Backend::openblas}) {
    if (name == short_name(b)) return b;
  }
  return std::nullopt;
}

std::string built_in_names() {
  std::string s;
  for (Backend b : kBuiltIn) s += std::string(s.empty() ? "" : ", ") + short_name(b);
  return s;
}

std::atomic<Backend>& current() {
  static std::atomic<Backend> b{default_backend()};
  return b;
}

}  // namespace

std::span<const Backend> backends() { return kBuiltIn; }

Backend default_backend() {
  static const Backend b = [] {
    const char* env = std::getenv("SHARDPROP_GEMM");
    if (env && *env) return parse_backend(env, "SHARDPROP_GEMM");
    return kBuiltIn[0];
  }();
  return b;
}

Backend parse_backend(std::string_view name, std::string_view what) {
  if (name == "auto") return default_backend();
  const auto b = by_name(name);
  SP_CHECK_USAGE(b.has_value(), what, " '", name, "': not a GEMM backend (auto, ",
                 built_in_names(), ")");
  SP_CHECK_USAGE(built_in(*b), what, " '", name, "': this build has no ", name,
                 " (it has ", built_in_names(), ")");
  return *b;
}

void use_backend(Backend backend) {
  SP_CHECK(built_in(backend), "GEMM backend ", short_name(backend), " is not built in");
  current().store(backend, std::memory_order_relaxed);
}

Backend current_backend() { return current().load(std::memory_order_relaxed); }

const char* short_name(Backend backend) {
  switch (backend) {
    case Backend::eigen: return "eigen";
    case Backend::onednn: return "onednn";
    case Backend::openblas: return "openblas";
  }
  return "?";
}

std::string describe(Backend backend) {
  switch (backend) {
    case Backend::eigen:
      return "Eigen " + std::to_string(EIGEN_WORLD_VERSION) + "." +
             std::to_string(EIGEN_MAJOR_VERSION) + "." + std::to_string(EIGEN_MINOR_VERSION);
    case Backend::onednn: {
#ifdef SHARDPROP_HAVE_ONEDNN
      const dnnl_version_t* v = dnnl_version();
      return "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." +
             std::to_string(v->patch);
#else
      break;
#endif
    }
    case Backend::openblas: {
#ifdef SHARDPROP_HAVE_OPENBLAS
      // "OpenBLAS 0.3.21 NO_AFFINITY Haswell MAX_THREADS=64": the first two words.
      std::string config = openblas_get_config();
      const auto second = config.find(' ', config.find(' ') + 1);
      return config.substr(0, second) + " serial (" + openblas_get_corename() + " kernels)";
#else
      break;
#endif
    }
  }
  return short_name(backend);
}

template <class T>
void multiply(Backend backend, Op op_a, Op op_b, T alpha, const View<const T>& a,
              const View<const T>& b, T beta, const View<T>& c) {
  if (c.rows == 0 || c.cols == 0) return;
  if (depth(op_a, a) == 0) {  // oneDNN would leave c as it is for beta 0
    scale(beta, c);
    return;
  }
  switch (backend) {
#ifdef SHARDPROP_HAVE_ONEDNN
    case Backend::onednn:
      onednn_multiply(op_a, op_b, alpha, a, b, beta, c);
      return;
#endif
#ifdef SHARDPROP_HAVE_OPENBLAS
    case Backend::openblas:
      openblas_multiply(op_a, op_b, alpha, a, b, beta, c);
      return;
#endif
    default:
      eigen_multiply(op_a, op_b, alpha, a, b, beta, c);
  }
}

template <class T>
void multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b, T beta,
              const View<T>& c) {
  multiply<T>(current_backend(), op_a, op_b, alpha, a, b, beta, c);
}

void multiply_bf16(Op op_a, Op op_b, const View<const Bf16>& a, const View<const Bf16>& b,
                   const View<float>& c, bool add) {
  if (c.rows == 0 || c.cols == 0) return;
#ifdef SHARDPROP_HAVE_ONEDNN
  if (depth(op_a, a) == 0) {  // oneDNN refuses a product of depth 0: it is zeros
    if (!add) scale(0.0f, c);
    return;
  }
  onednn_multiply_bf16(op_a, op_b, a, b, c, add);
#else
  (void)add;
  (void)op_a;
  (void)op_b;
  (void)a;
  (void)b;
  SP_THROW("bf16 products need oneDNN, which this build lacks");
#endif
}

void to_bf16(const float* in, Bf16* out, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const auto u = std::bit_cast<std::uint32_t>(in[i]);
    const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    const std::uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    out[i] = std::uint16_t(nan ? (u >> 16) | 0x40u : rounded);
  }
}

std::string bf16_unsupported_reason() {
#ifndef SHARDPROP_HAVE_ONEDNN
  return "this build has no oneDNN (libdnnl-dev)";
#else
  if (!__builtin_cpu_supports("avx512bf16")) return "this CPU has no AVX512_BF16 instructions";
  return "";
#endif
}

bool bf16_supported() { return bf16_unsupported_reason().empty(); }

template void multiply<float>(Op, Op, float, const View<const float>&, const View<const float>&,
                              float, const View<float>&);
template void multiply<double>(Op, Op, double, const View<const double>&,
                               const View<const double>&, double, const View<double>&);
template void multiply<float>(Backend, Op, Op, float, const View<const float>&,
                              const View<const float>&, float, const View<float>&);
template void multiply<double>(Backend, Op, Op, double, const View<const double>&,
                               const View<const double>&, double, const View<double>&);

}  // namespace shardprop::gemm
