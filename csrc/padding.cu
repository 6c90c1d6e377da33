// Block-diagonal padding (functions/padding.py): duplicated_diagonal_padding_build and duplicated_diagonal_padding_apply,
// forward and backward. W = eye(p, q) kron B: only the k = min(p, q) diagonal blocks are
// nonzero, so apply is one GEMM over the (sample, block) rows x[n, j1*t:(j1+1)*t], j1 < k,
// and the output rows past them hold just the bias.
#include "common.cuh"

using tr::i64;

// (B (C, s, t), p, q) -> W (C, p*s, q*t) = eye(p, q) kron B.
TR_OP(duplicated_diagonal_padding_build) {
  if (arena.sizing()) return cudaSuccess;
  return tr::kron_build<T>(tr::View{}, tr::tensor(a.ptr(0)), tr::View{.p = a.ptr(3)}, tr::kKron, a.size(0, 0),
                           a.value(1), a.value(2), a.size(0, 1), a.size(0, 2), st);
}

// (B, p, q, gW) -> gB (C, s, t): the sum of gW's diagonal blocks.
TR_OP(duplicated_diagonal_padding_build_bwd) {
  if (arena.sizing()) return cudaSuccess;
  return tr::kron_build_grad<T>(tr::tensor(a.ptr(3)), tr::View{}, tr::View{.p = a.ptr(4)}, false, tr::kKron,
                                a.size(0, 0), a.value(1), a.value(2), a.size(0, 1), a.size(0, 2), st);
}

// (x (N, q*t), B (C, s, t), p, q, bias (p*s) or absent) -> y (C, N, p*s) = x @ (eye(p, q) kron B)^T (+ bias).
TR_OP(duplicated_diagonal_padding_apply) {
  if (arena.sizing()) return cudaSuccess;
  const i64 N = a.size(0, 0), C = a.size(1, 0), s = a.size(1, 1), t = a.size(1, 2), p = a.value(2), q = a.value(3);
  const i64 k = p < q ? p : q;
  T* y = static_cast<T*>(a.ptr(5));
  const T* bias = static_cast<const T*>(a.ptr(4));
  TR_TRY(tr::fill<T>(y + k * s, bias ? bias + k * s : nullptr, C * N, (p - k) * s, p * s, st));
  // y[c, n, j1*s + i2] = sum_j2 x[n, j1*t + j2] B[c, i2, j2]: rows (n, j1), columns i2.
  tr::View xv = tr::tensor(a.ptr(0)), b = tr::tensor(a.ptr(1)), out{.p = y}, bv = tr::tensor(bias);
  xv.mo = q * t, xv.mi = t, xv.ki = 1;
  b.b0 = s * t, b.ki = 1, b.n = t;
  out.b0 = N * p * s, out.mo = p * s, out.mi = s, out.n = 1;
  bv.mi = s, bv.n = 1;
  return tr::gemm<T>({.batch0 = C, .M = N * k, .Mi = k, .N = s, .K = t}, xv, b, out, bv, st);
}

// (the arguments of duplicated_diagonal_padding_apply, gy) -> gx, gB (the bias's gradient is gy's sum, in Python).
TR_OP(duplicated_diagonal_padding_apply_bwd) {
  const i64 N = a.size(0, 0), C = a.size(1, 0), s = a.size(1, 1), t = a.size(1, 2), p = a.value(2), q = a.value(3);
  tr::acc_t<T>* gBs = arena.take<tr::acc_t<T>>(C * s * t);
  if (arena.sizing()) return cudaSuccess;
  const i64 k = p < q ? p : q;
  void *gx = a.ptr(6), *gy = a.ptr(5);
  TR_TRY(tr::fill<T>(static_cast<T*>(gx) + k * t, nullptr, N, (q - k) * t, q * t, st));
  // gx[n, j1*t + j2] = sum_(c, i2) gy[c, n, j1*s + i2] B[c, i2, j2]: rows (n, j1).
  {
    tr::View g = tr::tensor(gy), b = tr::tensor(a.ptr(1)), out{.p = gx};
    g.mo = p * s, g.mi = s, g.ko = N * p * s, g.ki = 1;
    b.ko = s * t, b.ki = t, b.n = 1;
    out.mo = q * t, out.mi = t, out.n = 1;
    TR_TRY(tr::gemm<T>({.M = N * k, .Mi = k, .N = t, .K = C * s, .Ki = s}, g, b, out, tr::View{}, st));
  }
  // gB[c, i2, j2] = sum_(n, j1) gy[c, n, j1*s + i2] x[n, j1*t + j2].
  tr::View g = tr::tensor(gy), xv = tr::tensor(a.ptr(0)), out{.p = a.ptr(7)};
  g.b0 = N * p * s, g.mi = 1, g.ko = p * s, g.ki = s;
  xv.ko = q * t, xv.ki = t, xv.n = 1;
  out.b0 = s * t, out.mi = t, out.n = 1;
  return tr::gemm_long_k<T>({.batch0 = C, .M = s, .N = t, .K = N * k, .Ki = k}, g, xv, out, gBs, st);
}
