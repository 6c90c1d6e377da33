// A small-W training step on the CPU (tinyrecon/cpu_ops.py, small_linear): W = psi(w) and, when the
// GEMM is small, y = x @ W^T + b in one call; every gradient (w's through dW = dy^T @ x, x's, the
// bias's) in one more. For apply where W has fewer than base.BUILD_BELOW entries: there a step pays
// for torch's per-op cost, not arithmetic, and these two calls replace the build's dozen autograd ops.
//
// Every build of the kron, padding and low-rank families is one form (cpu_ops._SMALL_FORMS maps them):
//   W (p*s x q*t) = A (x) B,  A = diag(row) A1 diag(col) [@ A2] (p x q),  B = B1 [@ B2] (s x t),
// laid out as A kron B (layout 0) or as tinyBIG's reshape(outer(vec A, vec B)) (layout 1). A null
// A2/B2 is no second factor, a null row/col no scaling. The sizes are a few thousand entries: plain
// loops, one thread; the build and its gradient sum in double, the GEMMs in the dtype.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_common.h"

namespace {

using i64 = int64_t;

struct Dims {
  i64 p, q, rA, s, t, rB;   // rA, rB: the inner size of A1 @ A2, B1 @ B2 (0: no second factor)
};

template <typename T>
struct Side {   // A's or B's factors; rows x cols = the product, k = A1's columns
  const T *f1, *f2, *row, *col;
  i64 rows, cols, k;
  double s1(i64 i, i64 j) const {   // diag(row) F1 diag(col) at (i, j)
    return double(f1[i * k + j]) * (row ? double(row[i]) : 1.0) * (col ? double(col[j]) : 1.0);
  }
  std::vector<double> product() const {
    std::vector<double> out(rows * cols, 0.0);
    for (i64 i = 0; i < rows; ++i)
      for (i64 j = 0; j < cols; ++j) {
        if (!f2) {
          out[i * cols + j] = s1(i, j);
          continue;
        }
        double acc = 0;
        for (i64 r = 0; r < k; ++r) acc += s1(i, r) * double(f2[r * cols + j]);
        out[i * cols + j] = acc;
      }
    return out;
  }
};

template <typename T>
struct Grads {
  T *f1, *f2, *row, *col;
};

// Index of W's entry for A's (i1, j1) and B's (i2, j2) in the layout.
inline i64 at(int layout, const Dims& d, i64 i1, i64 j1, i64 i2, i64 j2) {
  return layout == 0 ? (i1 * d.s + i2) * (d.q * d.t) + j1 * d.t + j2 : (i1 * d.q + j1) * (d.s * d.t) + i2 * d.t + j2;
}

// The factors' gradients from the product's, added to the outputs that are given (not null).
template <typename T>
void factor_grads(const Side<T>& f, const std::vector<double>& g, const Grads<T>& out) {
  const i64 k = f.f2 ? f.k : f.cols;
  std::vector<double> g1(f.rows * k, 0.0);   // gradient of diag(row) F1 diag(col)
  for (i64 i = 0; i < f.rows; ++i)
    for (i64 r = 0; r < k; ++r) {
      if (!f.f2) {
        g1[i * k + r] = g[i * k + r];
        continue;
      }
      double acc = 0;
      for (i64 j = 0; j < f.cols; ++j) acc += g[i * f.cols + j] * double(f.f2[r * f.cols + j]);
      g1[i * k + r] = acc;
    }
  if (out.f2)
    for (i64 r = 0; r < k; ++r)
      for (i64 j = 0; j < f.cols; ++j) {
        double acc = 0;
        for (i64 i = 0; i < f.rows; ++i) acc += f.s1(i, r) * g[i * f.cols + j];
        out.f2[r * f.cols + j] += T(acc);
      }
  for (i64 i = 0; i < f.rows; ++i)
    for (i64 r = 0; r < k; ++r) {
      const double gi = g1[i * k + r], a = f.f1[i * k + r];
      const double row = f.row ? double(f.row[i]) : 1.0, col = f.col ? double(f.col[r]) : 1.0;
      if (out.f1) out.f1[i * k + r] += T(gi * row * col);
      if (out.row) out.row[i] += T(gi * a * col);
      if (out.col) out.col[r] += T(gi * a * row);
    }
}

template <typename T>
void build(int layout, const Dims& d, const Side<T>& a, const Side<T>& b, T* W) {
  const std::vector<double> A = a.product(), B = b.product();
  for (i64 i1 = 0; i1 < d.p; ++i1)
    for (i64 j1 = 0; j1 < d.q; ++j1)
      for (i64 i2 = 0; i2 < d.s; ++i2)
        for (i64 j2 = 0; j2 < d.t; ++j2) W[at(layout, d, i1, j1, i2, j2)] = T(A[i1 * d.q + j1] * B[i2 * d.t + j2]);
}

template <typename T>
void build_vjp(int layout, const Dims& d, const Side<T>& a, const Side<T>& b, const T* gW, const Grads<T>& ga,
               const Grads<T>& gb) {
  const std::vector<double> A = a.product(), B = b.product();
  std::vector<double> gA(d.p * d.q, 0.0), gB(d.s * d.t, 0.0);
  for (i64 i1 = 0; i1 < d.p; ++i1)
    for (i64 j1 = 0; j1 < d.q; ++j1)
      for (i64 i2 = 0; i2 < d.s; ++i2)
        for (i64 j2 = 0; j2 < d.t; ++j2) {
          const double g = gW[at(layout, d, i1, j1, i2, j2)];
          gA[i1 * d.q + j1] += g * B[i2 * d.t + j2];
          gB[i2 * d.t + j2] += g * A[i1 * d.q + j1];
        }
  factor_grads(a, gA, ga);
  factor_grads(b, gB, gb);
}

// y (N, n) = x (N, D) @ W^T (+ bias) for a contiguous x. The GEMMs here sum in T, each output in
// order (as a BLAS would, without its blocking): the inner loops run over independent outputs.
template <typename T>
void linear(const T* x, const T* W, const T* bias, T* y, i64 N, i64 n, i64 D) {
  std::vector<T> Wt(D * n);
  for (i64 i = 0; i < n; ++i)
    for (i64 j = 0; j < D; ++j) Wt[j * n + i] = W[i * D + j];
  for (i64 b = 0; b < N; ++b) {
    T* yb = y + b * n;
    for (i64 i = 0; i < n; ++i) yb[i] = bias ? bias[i] : T(0);
    for (i64 j = 0; j < D; ++j) {
      const T xv = x[b * D + j];
      for (i64 i = 0; i < n; ++i) yb[i] += xv * Wt[j * n + i];
    }
  }
}

template <typename T>
struct Args {
  const T *A1, *A2, *row, *col, *B1, *B2;
  Side<T> a(const Dims& d) const { return {A1, A2, row, col, d.p, d.q, d.rA ? d.rA : d.q}; }
  Side<T> b(const Dims& d) const { return {B1, B2, nullptr, nullptr, d.s, d.t, d.rB ? d.rB : d.t}; }
};

template <typename T>
Args<T> args(const void* A1, const void* A2, const void* row, const void* col, const void* B1, const void* B2) {
  return {static_cast<const T*>(A1), static_cast<const T*>(A2), static_cast<const T*>(row),
          static_cast<const T*>(col), static_cast<const T*>(B1), static_cast<const T*>(B2)};
}

template <typename T>
void forward(int layout, const Dims& d, const Args<T>& f, const T* x, const T* bias, T* W, T* y, i64 N) {
  build(layout, d, f.a(d), f.b(d), W);
  if (y) linear(x, W, bias, y, N, d.p * d.s, d.q * d.t);
}

// dW = dy^T @ x unless given; dx = dy @ W and db = the column sums of dy where wanted.
template <typename T>
void backward(int layout, const Dims& d, const Args<T>& f, const T* x, const T* dy, const T* W, const T* gW, T* dx,
              T* db, const Grads<T>& ga, const Grads<T>& gb, i64 N) {
  const i64 n = d.p * d.s, D = d.q * d.t;
  if (ga.f1 || ga.f2 || ga.row || ga.col || gb.f1 || gb.f2) {
    std::vector<T> own;
    if (!gW) {
      own.assign(n * D, T(0));
      for (i64 b = 0; b < N; ++b)
        for (i64 i = 0; i < n; ++i) {
          const T g = dy[b * n + i];
          for (i64 j = 0; j < D; ++j) own[i * D + j] += g * x[b * D + j];
        }
      gW = own.data();
    }
    build_vjp(layout, d, f.a(d), f.b(d), gW, ga, gb);
  }
  if (dx)
    for (i64 b = 0; b < N; ++b) {
      T* row = dx + b * D;
      std::fill(row, row + D, T(0));
      for (i64 i = 0; i < n; ++i) {
        const T g = dy[b * n + i];
        for (i64 j = 0; j < D; ++j) row[j] += g * W[i * D + j];
      }
    }
  if (db) {
    std::fill(db, db + n, T(0));
    for (i64 b = 0; b < N; ++b)
      for (i64 i = 0; i < n; ++i) db[i] += dy[b * n + i];
  }
}

template <typename T>
Grads<T> grads(void* f1, void* f2, void* row, void* col) {
  return {static_cast<T*>(f1), static_cast<T*>(f2), static_cast<T*>(row), static_cast<T*>(col)};
}

bool bad(int dtype, int layout, const void* A1, const void* A2, const void* B1, const void* B2, const Dims& d) {
  return (dtype != 0 && dtype != 1) || (layout != 0 && layout != 1) || !A1 || !B1 || d.p < 0 || d.q < 0 ||
         d.s < 0 || d.t < 0 || d.rA < 0 || d.rB < 0 || (!A2 != !d.rA) || (!B2 != !d.rB);
}

}  // namespace

// dtype: 0 float32, 1 float64; layout: 0 kron, 1 tinyBIG's; every buffer contiguous; x, dx (N, D), y,
// dy (N, n), null when N is 0. Returns 0, or 1 for bad arguments.

// W (p*s, q*t) from the factors above; with y, also y = x @ W^T (+ bias).
TR_EXPORT int tinyrecon_cpu_small_linear(int dtype, int layout, const void* A1, const void* A2, const void* row,
                                         const void* col, const void* B1, const void* B2, const void* x,
                                         const void* bias, void* W, void* y, i64 N, i64 p, i64 q, i64 rA, i64 s,
                                         i64 t, i64 rB) {
  const Dims d{p, q, rA, s, t, rB};
  if (bad(dtype, layout, A1, A2, B1, B2, d) || !W || N < 0 || (y && N && !x)) return 1;
  if (dtype == 0)
    forward(layout, d, args<float>(A1, A2, row, col, B1, B2), static_cast<const float*>(x),
            static_cast<const float*>(bias), static_cast<float*>(W), static_cast<float*>(y), N);
  else
    forward(layout, d, args<double>(A1, A2, row, col, B1, B2), static_cast<const double*>(x),
            static_cast<const double*>(bias), static_cast<double*>(W), static_cast<double*>(y), N);
  return 0;
}
TR_ENTRY_POINT(tinyrecon_cpu_small_linear)

// The gradients of the factors from gW (p*s, q*t), or from dW = dy^T @ x when gW is null, each added
// to its buffer where that is not null (the caller zeroes them: views of one gradient of w); dx (N, D)
// = dy @ W and db = dy's column sums where not null.
TR_EXPORT int tinyrecon_cpu_small_linear_vjp(int dtype, int layout, const void* A1, const void* A2, const void* row,
                                             const void* col, const void* B1, const void* B2, const void* x,
                                             const void* dy, const void* W, const void* gW, void* dx, void* db,
                                             void* gA1, void* gA2, void* grow, void* gcol, void* gB1, void* gB2, i64 N,
                                             i64 p, i64 q, i64 rA, i64 s, i64 t, i64 rB) {
  const Dims d{p, q, rA, s, t, rB};
  if (bad(dtype, layout, A1, A2, B1, B2, d) || N < 0 || (N && !gW && (!x || !dy)) || (N && (dx || db) && !dy) ||
      (dx && !W))
    return 1;
  if (dtype == 0)
    backward(layout, d, args<float>(A1, A2, row, col, B1, B2), static_cast<const float*>(x),
             static_cast<const float*>(dy), static_cast<const float*>(W), static_cast<const float*>(gW),
             static_cast<float*>(dx), static_cast<float*>(db), grads<float>(gA1, gA2, grow, gcol),
             grads<float>(gB1, gB2, nullptr, nullptr), N);
  else
    backward(layout, d, args<double>(A1, A2, row, col, B1, B2), static_cast<const double*>(x),
             static_cast<const double*>(dy), static_cast<const double*>(W), static_cast<const double*>(gW),
             static_cast<double*>(dx), static_cast<double*>(db), grads<double>(gA1, gA2, grow, gcol),
             grads<double>(gB1, gB2, nullptr, nullptr), N);
  return 0;
}
TR_ENTRY_POINT(tinyrecon_cpu_small_linear_vjp)
