#include "gemm.hpp"

#include <mutex>
#include <type_traits>

#ifdef SHARDPROP_USE_OPENBLAS
// The Fortran BLAS interface of Debian's serial OpenBLAS (column-major).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b,
            const int* ldb, const double* beta, double* c, const int* ldc);
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

#ifdef SHARDPROP_USE_OPENBLAS
template <class T>
void openblas_multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b,
                       T beta, const View<T>& c) {
  // Debian's serial OpenBLAS gave wrong products when two threads called it at once (seen
  // in checkpoint_test's in-process ranks), so calls are serialized.
  static std::mutex serial;
  const std::lock_guard<std::mutex> lock(serial);
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ over the same memory.
  const int m = int(c.rows), n = int(c.cols);
  const int k = int(op_a == Op::none ? a.cols : a.rows);
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

}  // namespace

template <class T>
void multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b, T beta,
              const View<T>& c) {
  if (c.rows == 0 || c.cols == 0) return;
#ifdef SHARDPROP_USE_OPENBLAS
  openblas_multiply(op_a, op_b, alpha, a, b, beta, c);
#else
  eigen_multiply(op_a, op_b, alpha, a, b, beta, c);
#endif
}

const char* backend_name() {
#ifdef SHARDPROP_USE_OPENBLAS
  return "OpenBLAS (serial)";
#else
  return "Eigen";
#endif
}

template void multiply<float>(Op, Op, float, const View<const float>&, const View<const float>&,
                              float, const View<float>&);
template void multiply<double>(Op, Op, double, const View<const double>&,
                               const View<const double>&, double, const View<double>&);

}  // namespace shardprop::gemm
