// Low-rank family (functions/lowrank.py): lorr_build and lorr_apply (lorr), forward and
// backward. apply never builds W = A @ B: x meets the rank-r factor B once,
//   U (N, C, r) = x (N, D) @ B (C*r, D)^T       one GEMM over all of x and all channels
//   y[c] = U[:, c] @ A[c]^T (+ bias)            one GEMM per channel, K = r
// with U kept in fp32 workspace.
#include "common.cuh"

namespace tr {
namespace {

// U (N, C*r) = x (N, D) @ B (C*r, D)^T.
template <typename T>
cudaError_t bottleneck(const void* x, const void* B, acc_t<T>* U, i64 N, i64 C, i64 r, i64 D, cudaStream_t stream) {
  View a = tensor(x), b = tensor(B), u = scratch(U);
  a.mi = D, a.ki = 1;
  b.ki = 1, b.n = D;
  u.mi = C * r, u.n = 1;
  return gemm<T>({.M = N, .N = C * r, .K = D}, a, b, u, View{}, stream);
}

}  // namespace
}  // namespace tr

using tr::i64;

// (A (C, n, r), B (C, r, D)) -> W (C, n, D) = A @ B.
TR_OP(lorr_build) {
  if (arena.sizing()) return cudaSuccess;
  return tr::matmul<T>(tr::tensor(a.ptr(0)), tr::tensor(a.ptr(1)), tr::View{.p = a.ptr(2)}, a.size(0, 0),
                       a.size(0, 1), a.size(0, 2), a.size(1, 2), st);
}

// (A, B, gW) -> gA = gW @ B^T, gB = A^T @ gW.
TR_OP(lorr_build_bwd) {
  if (arena.sizing()) return cudaSuccess;
  return tr::matmul_grad<T>(tr::tensor(a.ptr(2)), tr::tensor(a.ptr(0)), tr::tensor(a.ptr(1)), tr::View{.p = a.ptr(3)},
                            tr::View{.p = a.ptr(4)}, a.size(0, 0), a.size(0, 1), a.size(0, 2), a.size(1, 2), st);
}

// (x (N, D), A (C, n, r), B (C, r, D), bias (n) or absent) -> y (C, N, n) = x @ (A[c] @ B[c])^T (+ bias).
TR_OP(lorr_apply) {
  using Acc = tr::acc_t<T>;
  const i64 N = a.size(0, 0), D = a.size(0, 1), C = a.size(1, 0), n = a.size(1, 1), r = a.size(1, 2);
  Acc* U = arena.take<Acc>(N * C * r);
  if (arena.sizing()) return cudaSuccess;
  TR_TRY(tr::bottleneck<T>(a.ptr(0), a.ptr(2), U, N, C, r, D, st));
  // y[c, m, i] = sum_k U[m, c, k] A[c, i, k].
  tr::View u = tr::scratch(U), fa = tr::tensor(a.ptr(1)), out{.p = a.ptr(4)}, bv = tr::tensor(a.ptr(3));
  u.b0 = r, u.mi = C * r, u.ki = 1;
  fa.b0 = n * r, fa.ki = 1, fa.n = r;
  out.b0 = N * n, out.mi = n, out.n = 1;
  bv.n = 1;
  return tr::gemm<T>({.batch0 = C, .M = N, .N = n, .K = r}, u, fa, out, bv, st);
}

// (the arguments of lorr_apply, gy) -> gx, gA, gB (the bias's gradient is gy's sum, in Python).
TR_OP(lorr_apply_bwd) {
  using Acc = tr::acc_t<T>;
  const i64 N = a.size(0, 0), D = a.size(0, 1), C = a.size(1, 0), n = a.size(1, 1), r = a.size(1, 2);
  const void *x = a.ptr(0), *A = a.ptr(1), *B = a.ptr(2), *gy = a.ptr(4);
  Acc* U = arena.take<Acc>(N * C * r);
  Acc* V = arena.take<Acc>(N * C * r);
  Acc* gAs = arena.take<Acc>(C * n * r);
  Acc* gBs = arena.take<Acc>(C * r * D);
  if (arena.sizing()) return cudaSuccess;
  TR_TRY(tr::bottleneck<T>(x, B, U, N, C, r, D, st));
  // V[m, c, k] = sum_i gy[c, m, i] A[c, i, k].
  {
    tr::View g = tr::tensor(gy), fa = tr::tensor(A), v = tr::scratch(V);
    g.b0 = N * n, g.mi = n, g.ki = 1;
    fa.b0 = n * r, fa.ki = r, fa.n = 1;
    v.b0 = r, v.mi = C * r, v.n = 1;
    TR_TRY(tr::gemm<T>({.batch0 = C, .M = N, .N = r, .K = n}, g, fa, v, tr::View{}, st));
  }
  // gx (N, D) = V (N, C*r) @ B (C*r, D).
  {
    tr::View v = tr::scratch(V), b = tr::tensor(B), out{.p = a.ptr(5)};
    v.mi = C * r, v.ki = 1;
    b.ki = D, b.n = 1;
    out.mi = D, out.n = 1;
    TR_TRY(tr::gemm<T>({.M = N, .N = D, .K = C * r}, v, b, out, tr::View{}, st));
  }
  // gA[c] (n, r) = gy[c]^T @ U[:, c].
  {
    tr::View g = tr::tensor(gy), u = tr::scratch(U), out{.p = a.ptr(6)};
    g.b0 = N * n, g.mi = 1, g.ki = n;
    u.b0 = r, u.ki = C * r, u.n = 1;
    out.b0 = n * r, out.mi = r, out.n = 1;
    TR_TRY(tr::gemm_long_k<T>({.batch0 = C, .M = n, .N = r, .K = N}, g, u, out, gAs, st));
  }
  // gB[c] (r, D) = V[:, c]^T @ x.
  tr::View v = tr::scratch(V), xv = tr::tensor(x), out{.p = a.ptr(7)};
  v.b0 = r, v.mi = 1, v.ki = C * r;
  xv.ki = D, xv.n = 1;
  out.b0 = r * D, out.mi = D, out.n = 1;
  return tr::gemm_long_k<T>({.batch0 = C, .M = r, .N = D, .K = N}, v, xv, out, gBs, st);
}
