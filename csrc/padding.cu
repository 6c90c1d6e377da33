// Block-diagonal padding (functions/padding.py): duplicated_diagonal_padding_build and duplicated_diagonal_padding_apply,
// forward and backward. W = eye(p, q) kron B: only the k = min(p, q) diagonal blocks are
// nonzero, so apply is one GEMM over the (sample, block) rows x[n, j1*t:(j1+1)*t], j1 < k,
// and the output rows past them hold just the bias.
#include "common.cuh"

using tr::i64;

// W (C, p*s, q*t) = eye(p, q) kron B (C, s, t).
TR_EXPORT int tinyrecon_duplicated_diagonal_padding_build(int device, void* stream, int dtype, const void* B, void* W, i64 C, i64 p,
                                         i64 q, i64 s, i64 t) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return tr::kron_build<T>(tr::View{}, tr::tensor(B), tr::View{.p = W}, tr::kKron, C, p, q, s, t,
                             static_cast<cudaStream_t>(stream));
  });
}
TR_ENTRY_POINT(tinyrecon_duplicated_diagonal_padding_build)

// gB (C, s, t): the sum of gW's diagonal blocks.
TR_EXPORT int tinyrecon_duplicated_diagonal_padding_build_bwd(int device, void* stream, int dtype, const void* gW, void* gB, i64 C,
                                             i64 p, i64 q, i64 s, i64 t) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return tr::kron_build_grad<T>(tr::tensor(gW), tr::View{}, tr::View{.p = gB}, false, tr::kKron, C, p, q, s, t,
                                  static_cast<cudaStream_t>(stream));
  });
}
TR_ENTRY_POINT(tinyrecon_duplicated_diagonal_padding_build_bwd)

// y (C, N, p*s) = x (N, q*t) @ (eye(p, q) kron B)^T (+ bias (p*s)).
TR_EXPORT int tinyrecon_duplicated_diagonal_padding_apply(int device, void* stream, int dtype, const void* x, const void* B,
                                         const void* bias, void* y, i64 N, i64 C, i64 p, i64 q, i64 s, i64 t) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const auto st = static_cast<cudaStream_t>(stream);
    const i64 k = p < q ? p : q;
    TR_TRY(tr::fill<T>(static_cast<T*>(y) + k * s, bias ? static_cast<const T*>(bias) + k * s : nullptr, C * N,
                       (p - k) * s, p * s, st));
    // y[c, n, j1*s + i2] = sum_j2 x[n, j1*t + j2] B[c, i2, j2]: rows (n, j1), columns i2.
    tr::View a = tr::tensor(x), b = tr::tensor(B), out{.p = y}, bv = tr::tensor(bias);
    a.mo = q * t, a.mi = t, a.ki = 1;
    b.b0 = s * t, b.ki = 1, b.n = t;
    out.b0 = N * p * s, out.mo = p * s, out.mi = s, out.n = 1;
    bv.mi = s, bv.n = 1;
    return tr::gemm<T>({.batch0 = C, .M = N * k, .Mi = k, .N = s, .K = t}, a, b, out, bv, st);
  });
}
TR_ENTRY_POINT(tinyrecon_duplicated_diagonal_padding_apply)

// Gradients of duplicated_diagonal_padding_apply with respect to x and B (the bias's is gy's sum).
TR_EXPORT int tinyrecon_duplicated_diagonal_padding_apply_bwd(int device, void* stream, int dtype, const void* x, const void* B,
                                             const void* gy, void* gx, void* gB, void* work, i64* work_bytes, i64 N,
                                             i64 C, i64 p, i64 q, i64 s, i64 t) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const auto st = static_cast<cudaStream_t>(stream);
    tr::Arena arena(work);
    tr::acc_t<T>* gBs = arena.take<tr::acc_t<T>>(C * s * t);
    if (work_bytes) {  // size query only
      *work_bytes = arena.used;
      return cudaSuccess;
    }
    const i64 k = p < q ? p : q;
    TR_TRY(tr::fill<T>(static_cast<T*>(gx) + k * t, nullptr, N, (q - k) * t, q * t, st));
    // gx[n, j1*t + j2] = sum_(c, i2) gy[c, n, j1*s + i2] B[c, i2, j2]: rows (n, j1).
    {
      tr::View g = tr::tensor(gy), b = tr::tensor(B), out{.p = gx};
      g.mo = p * s, g.mi = s, g.ko = N * p * s, g.ki = 1;
      b.ko = s * t, b.ki = t, b.n = 1;
      out.mo = q * t, out.mi = t, out.n = 1;
      TR_TRY(tr::gemm<T>({.M = N * k, .Mi = k, .N = t, .K = C * s, .Ki = s}, g, b, out, tr::View{}, st));
    }
    // gB[c, i2, j2] = sum_(n, j1) gy[c, n, j1*s + i2] x[n, j1*t + j2].
    tr::View g = tr::tensor(gy), a = tr::tensor(x), out{.p = gB};
    g.b0 = N * p * s, g.mi = 1, g.ko = p * s, g.ki = s;
    a.ko = q * t, a.ki = t, a.n = 1;
    out.b0 = s * t, out.mi = t, out.n = 1;
    return tr::gemm_long_k<T>({.batch0 = C, .M = s, .N = t, .K = N * k, .Ki = k}, g, a, out, gBs, st);
  });
}
TR_ENTRY_POINT(tinyrecon_duplicated_diagonal_padding_apply_bwd)
