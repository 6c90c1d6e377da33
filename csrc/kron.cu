// Kronecker family (functions/kron.py): kron_build and kron_apply, forward and backward.
//
// A = A1 @ A2 when A2 is given, else A1 (likewise B); a product factor is formed once per call
// in fp32 workspace (it is tiny: C x p x q). kron_apply never builds W:
//   Z[n, j1, c, i2] = sum_j2 X[n, j1, j2] B[c, i2, j2]     one GEMM over all of x and all channels
//   y[c, n, i1, i2] = sum_j1 A[c, i1, j1] Z[n, j1, c, i2]  one GEMM batched over channels, rows (n, i2)
// with Z (N x q x C x s, usually far smaller than x) in fp32 workspace; the backward is four
// GEMMs of the same kind, the weight gradients split along their long (batch) reduction.
// kron_apply supports layout "kron"; ops.py routes "tinybig" to the build and one GEMM.
#include "common.cuh"

namespace tr {
namespace {

// F = F1 @ F2 into `work` when F2 is given, else F1 itself; contiguous (C, rows, cols).
template <typename T>
cudaError_t factor(const void* F1, const void* F2, acc_t<T>* work, i64 C, i64 rows, i64 r, i64 cols, View* F,
                   cudaStream_t stream) {
  *F = F2 ? scratch(work) : tensor(F1);
  return F2 ? matmul<T>(tensor(F1), tensor(F2), *F, C, rows, r, cols, stream) : cudaSuccess;
}

// Where the gradient of a factor goes: straight into gF1 (F2 absent), else into fp32 work.
inline View factor_grad_view(void* gF1, const void* F2, void* work) { return F2 ? scratch(work) : View{.p = gF1}; }

// The chain rule through F = F1 @ F2 (nothing to do when F = F1: its gradient is already in place).
template <typename T>
cudaError_t factor_grad(View gF, const void* F1, const void* F2, void* gF1, void* gF2, i64 C, i64 rows, i64 r,
                        i64 cols, cudaStream_t stream) {
  if (!F2) return cudaSuccess;
  return matmul_grad<T>(gF, tensor(F1), tensor(F2), View{.p = gF1}, View{.p = gF2}, C, rows, r, cols, stream);
}

// Z (N, q, C, s) = X (N*q, t) @ B (C*s, t)^T.
template <typename T>
cudaError_t contract_x(const void* x, View B, acc_t<T>* Z, i64 N, i64 C, i64 q, i64 s, i64 t, cudaStream_t stream) {
  View a = tensor(x), z = scratch(Z);
  a.mi = t, a.ki = 1;
  B.ki = 1, B.n = t;
  z.mi = C * s, z.n = 1;
  return gemm<T>({.M = N * q, .N = C * s, .K = t}, a, B, z, View{}, stream);
}

// C, p, q, rA, s, t, rB of A = A1 [@ A2] and B = B1 [@ B2], the factors in slots f..f+3 (r = 0: unfactored).
struct KronDims {
  i64 C, p, q, rA, s, t, rB;
};
KronDims kron_dims(const Args& a, int f) {
  const bool fa = a.ptr(f + 1) != nullptr, fb = a.ptr(f + 3) != nullptr;
  return {a.size(f, 0), a.size(f, 1), a.size(f + fa, 2), fa ? a.size(f, 2) : 0,
          a.size(f + 2, 1), a.size(f + 2 + fb, 2), fb ? a.size(f + 2, 2) : 0};
}

// The factors in slots f..f+3 and their sizes; the workspace of a product factor is carved at
// construction, first of an entry point's buffers, and form() launches the products.
template <typename T>
struct Factors {
  KronDims d;
  const void *A1, *A2, *B1, *B2;
  acc_t<T> *Aw, *Bw;
  Factors(const Args& a, int f, Arena& arena)
      : d(kron_dims(a, f)), A1(a.ptr(f)), A2(a.ptr(f + 1)), B1(a.ptr(f + 2)), B2(a.ptr(f + 3)),
        Aw(A2 ? arena.take<acc_t<T>>(d.C * d.p * d.q) : nullptr),
        Bw(B2 ? arena.take<acc_t<T>>(d.C * d.s * d.t) : nullptr) {}
  cudaError_t form(View* A, View* B, cudaStream_t st) const {
    TR_TRY(factor<T>(A1, A2, Aw, d.C, d.p, d.rA, d.q, A, st));
    return factor<T>(B1, B2, Bw, d.C, d.s, d.rB, d.t, B, st);
  }
};

}  // namespace

}  // namespace tr

using tr::i64;

// (A1 (C, p, rA) [, A2 (C, rA, q)], B1 (C, s, rB) [, B2 (C, rB, t)], layout) -> W (C, p*s, q*t).
TR_OP(kron_build) {
  const tr::Factors<T> f(a, 0, arena);
  const auto [C, p, q, rA, s, t, rB] = f.d;
  if (arena.sizing()) return cudaSuccess;
  tr::View A, B;
  TR_TRY(f.form(&A, &B, st));
  return tr::kron_build<T>(A, B, tr::View{.p = a.ptr(5)}, a.value(4), C, p, q, s, t, st);
}

// (the arguments of kron_build, gW) -> gA1, gA2, gB1, gB2 (gA2 / gB2 absent when A2 / B2 are).
TR_OP(kron_build_bwd) {
  using Acc = tr::acc_t<T>;
  const tr::Factors<T> f(a, 0, arena);
  const auto [C, p, q, rA, s, t, rB] = f.d;
  const void* gW = a.ptr(5);
  const int layout = a.value(4);
  Acc* gAw = f.A2 ? arena.take<Acc>(C * p * q) : nullptr;
  Acc* gBw = f.B2 ? arena.take<Acc>(C * s * t) : nullptr;
  if (arena.sizing()) return cudaSuccess;
  tr::View A, B;
  TR_TRY(f.form(&A, &B, st));
  const tr::View gA = tr::factor_grad_view(a.ptr(6), f.A2, gAw), gB = tr::factor_grad_view(a.ptr(8), f.B2, gBw);
  TR_TRY(tr::kron_build_grad<T>(tr::tensor(gW), B, gA, true, layout, C, p, q, s, t, st));
  TR_TRY(tr::kron_build_grad<T>(tr::tensor(gW), A, gB, false, layout, C, p, q, s, t, st));
  TR_TRY(tr::factor_grad<T>(gA, f.A1, f.A2, a.ptr(6), a.ptr(7), C, p, rA, q, st));
  return tr::factor_grad<T>(gB, f.B1, f.B2, a.ptr(8), a.ptr(9), C, s, rB, t, st);
}

// (x (N, q*t), A1, A2, B1, B2 as kron_build's, bias (p*s) or absent, layout "kron") -> y (C, N, p*s).
TR_OP(kron_apply) {
  const tr::Factors<T> f(a, 1, arena);
  const auto [C, p, q, rA, s, t, rB] = f.d;
  const i64 N = a.size(0, 0);
  tr::acc_t<T>* Z = arena.take<tr::acc_t<T>>(N * q * C * s);
  if (arena.sizing()) return cudaSuccess;
  tr::View A, B;
  TR_TRY(f.form(&A, &B, st));
  TR_TRY(tr::contract_x<T>(a.ptr(0), B, Z, N, C, q, s, t, st));
  // y[c, n, i1*s + i2] = sum_j1 Z[n, j1, c, i2] A[c, i1, j1]: rows (n, i2), columns i1.
  tr::View z = tr::scratch(Z), out{.p = a.ptr(7)}, b = tr::tensor(a.ptr(5));
  z.b0 = s, z.mo = q * C * s, z.mi = 1, z.ki = C * s;
  A.b0 = p * q, A.ki = 1, A.n = q;
  out.b0 = N * p * s, out.mo = p * s, out.mi = 1, out.n = s;
  b.mi = 1, b.n = s;
  return tr::gemm<T>({.batch0 = C, .M = N * s, .Mi = s, .N = p, .K = q}, z, A, out, b, st);
}

// (the arguments of kron_apply, gy) -> gx, gA1, gA2, gB1, gB2 (the bias's gradient is gy's sum, in Python).
TR_OP(kron_apply_bwd) {
  using Acc = tr::acc_t<T>;
  const tr::Factors<T> f(a, 1, arena);
  const auto [C, p, q, rA, s, t, rB] = f.d;
  const i64 N = a.size(0, 0);
  const void *x = a.ptr(0), *gy = a.ptr(7);
  Acc* gAw = f.A2 ? arena.take<Acc>(C * p * q) : nullptr;
  Acc* gBw = f.B2 ? arena.take<Acc>(C * s * t) : nullptr;
  Acc* Z = arena.take<Acc>(N * q * C * s);
  Acc* V = arena.take<Acc>(N * q * C * s);
  Acc* gAs = arena.take<Acc>(C * p * q);
  Acc* gBs = arena.take<Acc>(C * s * t);
  if (arena.sizing()) return cudaSuccess;
  tr::View A, B;
  TR_TRY(f.form(&A, &B, st));
  TR_TRY(tr::contract_x<T>(x, B, Z, N, C, q, s, t, st));
  // V[n, j1, c, i2] = sum_i1 gy[c, n, i1*s + i2] A[c, i1, j1]: rows (n, i2), columns j1.
  {
    tr::View g = tr::tensor(gy), fa = A, v = tr::scratch(V);
    g.b0 = N * p * s, g.mo = p * s, g.mi = 1, g.ki = s;
    fa.b0 = p * q, fa.ki = q, fa.n = 1;
    v.b0 = s, v.mo = q * C * s, v.mi = 1, v.n = C * s;
    TR_TRY(tr::gemm<T>({.batch0 = C, .M = N * s, .Mi = s, .N = q, .K = p}, g, fa, v, tr::View{}, st));
  }
  // gx (N*q, t) = V (N*q, C*s) @ B (C*s, t).
  {
    tr::View v = tr::scratch(V), b = B, out{.p = a.ptr(8)};
    v.mi = C * s, v.ki = 1;
    b.ki = t, b.n = 1;
    out.mi = t, out.n = 1;
    TR_TRY(tr::gemm<T>({.M = N * q, .N = t, .K = C * s}, v, b, out, tr::View{}, st));
  }
  const tr::View gA = tr::factor_grad_view(a.ptr(9), f.A2, gAw), gB = tr::factor_grad_view(a.ptr(11), f.B2, gBw);
  // gA[c, i1, j1] = sum_(n, i2) gy[c, n, i1*s + i2] Z[n, j1, c, i2].
  {
    tr::View g = tr::tensor(gy), z = tr::scratch(Z), out = gA;
    g.b0 = N * p * s, g.mi = s, g.ko = p * s, g.ki = 1;
    z.b0 = s, z.ko = q * C * s, z.ki = 1, z.n = C * s;
    out.b0 = p * q, out.mi = q, out.n = 1;
    TR_TRY(tr::gemm_long_k<T>({.batch0 = C, .M = p, .N = q, .K = N * s, .Ki = s}, g, z, out, gAs, st));
  }
  // gB[c, i2, j2] = sum_(n, j1) V[n, j1, c, i2] X[n, j1, j2].
  {
    tr::View v = tr::scratch(V), xv = tr::tensor(x), out = gB;
    v.b0 = s, v.mi = 1, v.ki = C * s;
    xv.ki = t, xv.n = 1;
    out.b0 = s * t, out.mi = t, out.n = 1;
    TR_TRY(tr::gemm_long_k<T>({.batch0 = C, .M = s, .N = t, .K = N * q}, v, xv, out, gBs, st));
  }
  TR_TRY(tr::factor_grad<T>(gA, f.A1, f.A2, a.ptr(9), a.ptr(10), C, p, rA, q, st));
  return tr::factor_grad<T>(gB, f.B1, f.B2, a.ptr(11), a.ptr(12), C, s, rB, t, st);
}
