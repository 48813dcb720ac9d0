// The one place that knows which library multiplies matrices. Every product of the
// training kernels goes through multiply(); the maths files never see the backend.
#pragma once

#include <Eigen/Core>

namespace shardprop::gemm {

enum class Op { none, transpose };

// A row-major matrix of rows × cols at `data` whose rows are `ld` elements apart.
template <class T>
struct View {
  T* data;
  Eigen::Index rows, cols, ld;
};

// c = alpha·op(a)·op(b) + beta·c, all row-major; a and b are given as stored (op applied
// here). Safe to call from several threads at once on distinct outputs; runs on the
// calling thread alone (no threads of its own).
template <class T>
void multiply(Op op_a, Op op_b, T alpha, const View<const T>& a, const View<const T>& b, T beta,
              const View<T>& c);

// The backend's name, as printed by train and bench ("Eigen 3.4.0", ...).
const char* backend_name();

}  // namespace shardprop::gemm
