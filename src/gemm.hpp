// The one place that knows which library multiplies matrices. Every product of the
// training kernels goes through multiply(); the maths files never see the backend.
//
// Backends: Eigen (always built, the reference), oneDNN and OpenBLAS (when their Debian
// packages were found at build time). One is current for the whole process; it is chosen at
// start-up (`--gemm`, or the SHARDPROP_GEMM environment variable) before any product runs.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include <Eigen/Core>

namespace shardprop::gemm {

enum class Op { none, transpose };

enum class Backend { eigen, onednn, openblas };

// A row-major matrix of rows × cols at `data` whose rows are `ld` elements apart.
template <class T>
struct View {
  T* data;
  Eigen::Index rows, cols, ld;
};

// A bfloat16 number's bits: the upper 16 bits of a float32.
using Bf16 = std::uint16_t;

// c = alpha·op(a)·op(b) + beta·c, all row-major; a and b are given as stored (op applied
// here), by the current backend. Safe to call from several threads at once on distinct
// outputs (OpenBLAS: one product at a time); runs on the calling thread alone, with no
// threads of its own.
template <class T>
void multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b, T beta,
              const View<T>& c);
// The same by the given backend, which must be built in (for the benchmark).
template <class T>
void multiply(Backend backend, Op op_a, Op op_b, T alpha, const View<const T>& a,
              const View<const T>& b, T beta, const View<T>& c);

// c = op(a)·op(b) (or with `add`, c += op(a)·op(b)) with bfloat16 operands, accumulated and
// stored in float32, by oneDNN whatever the current backend (bf16_supported() must hold).
void multiply_bf16(Op op_a, Op op_b, const View<const Bf16>& a, const View<const Bf16>& b,
                   const View<float>& c, bool add = false);

// Rounds n floats to bfloat16, to nearest with ties to even (NaN stays NaN).
void to_bf16(const float* in, Bf16* out, std::size_t n);
// Whether multiply_bf16 can run here: built with oneDNN, on a CPU with AVX512_BF16.
bool bf16_supported();
// Why it cannot, as a clause ("this CPU has no AVX512_BF16 instructions"), or "".
std::string bf16_unsupported_reason();

// The backends built in, the default first.
std::span<const Backend> backends();
// The default: SHARDPROP_GEMM if set, else the fastest backend that is safe to call from
// several threads at once (oneDNN if built in, else Eigen).
Backend default_backend();
// "auto" (the default), "onednn", "openblas" or "eigen"; throws UsageError naming `what`
// for another name or one not built in.
Backend parse_backend(std::string_view name, std::string_view what = "--gemm");
// Makes `backend` current for the process (call before products run).
void use_backend(Backend backend);
Backend current_backend();
// The short name ("onednn") and the full one as train and bench print it ("oneDNN 2.6.3",
// "OpenBLAS 0.3.21 (Haswell kernels)", "Eigen 3.4.0").
const char* short_name(Backend backend);
std::string describe(Backend backend);

}  // namespace shardprop::gemm
