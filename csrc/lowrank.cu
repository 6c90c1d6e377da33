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

// W (C, n, D) = A (C, n, r) @ B (C, r, D).
TR_EXPORT int tinyrecon_lorr_build(int device, void* stream, int dtype, const void* A, const void* B, void* W,
                                      i64 C, i64 n, i64 r, i64 D) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return tr::matmul<T>(tr::tensor(A), tr::tensor(B), tr::View{.p = W}, C, n, r, D, static_cast<cudaStream_t>(stream));
  });
}
TR_ENTRY_POINT(tinyrecon_lorr_build)

// gA = gW @ B^T, gB = A^T @ gW.
TR_EXPORT int tinyrecon_lorr_build_bwd(int device, void* stream, int dtype, const void* A, const void* B,
                                          const void* gW, void* gA, void* gB, i64 C, i64 n, i64 r, i64 D) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return tr::matmul_grad<T>(tr::tensor(gW), tr::tensor(A), tr::tensor(B), tr::View{.p = gA}, tr::View{.p = gB}, C,
                              n, r, D, static_cast<cudaStream_t>(stream));
  });
}
TR_ENTRY_POINT(tinyrecon_lorr_build_bwd)

// y (C, N, n) = x (N, D) @ (A[c] @ B[c])^T (+ bias (n)).
TR_EXPORT int tinyrecon_lorr_apply(int device, void* stream, int dtype, const void* x, const void* A,
                                      const void* B, const void* bias, void* y, void* work, i64* work_bytes, i64 N,
                                      i64 C, i64 n, i64 r, i64 D) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using Acc = tr::acc_t<T>;
    const auto st = static_cast<cudaStream_t>(stream);
    tr::Arena arena(work);
    Acc* U = arena.take<Acc>(N * C * r);
    if (work_bytes) {  // size query only
      *work_bytes = arena.used;
      return cudaSuccess;
    }
    TR_TRY(tr::bottleneck<T>(x, B, U, N, C, r, D, st));
    // y[c, m, i] = sum_k U[m, c, k] A[c, i, k].
    tr::View u = tr::scratch(U), a = tr::tensor(A), out{.p = y}, bv = tr::tensor(bias);
    u.b0 = r, u.mi = C * r, u.ki = 1;
    a.b0 = n * r, a.ki = 1, a.n = r;
    out.b0 = N * n, out.mi = n, out.n = 1;
    bv.n = 1;
    return tr::gemm<T>({.batch0 = C, .M = N, .N = n, .K = r}, u, a, out, bv, st);
  });
}
TR_ENTRY_POINT(tinyrecon_lorr_apply)

// Gradients of lorr_apply with respect to x, A and B (the bias's is gy's sum).
TR_EXPORT int tinyrecon_lorr_apply_bwd(int device, void* stream, int dtype, const void* x, const void* A,
                                          const void* B, const void* gy, void* gx, void* gA, void* gB, void* work,
                                          i64* work_bytes, i64 N, i64 C, i64 n, i64 r, i64 D) {
  return tr::run(device, dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    using Acc = tr::acc_t<T>;
    const auto st = static_cast<cudaStream_t>(stream);
    tr::Arena arena(work);
    Acc* U = arena.take<Acc>(N * C * r);
    Acc* V = arena.take<Acc>(N * C * r);
    Acc* gAs = arena.take<Acc>(C * n * r);
    Acc* gBs = arena.take<Acc>(C * r * D);
    if (work_bytes) {  // size query only
      *work_bytes = arena.used;
      return cudaSuccess;
    }
    TR_TRY(tr::bottleneck<T>(x, B, U, N, C, r, D, st));
    // V[m, c, k] = sum_i gy[c, m, i] A[c, i, k].
    {
      tr::View g = tr::tensor(gy), a = tr::tensor(A), v = tr::scratch(V);
      g.b0 = N * n, g.mi = n, g.ki = 1;
      a.b0 = n * r, a.ki = r, a.n = 1;
      v.b0 = r, v.mi = C * r, v.n = 1;
      TR_TRY(tr::gemm<T>({.batch0 = C, .M = N, .N = r, .K = n}, g, a, v, tr::View{}, st));
    }
    // gx (N, D) = V (N, C*r) @ B (C*r, D).
    {
      tr::View v = tr::scratch(V), b = tr::tensor(B), out{.p = gx};
      v.mi = C * r, v.ki = 1;
      b.ki = D, b.n = 1;
      out.mi = D, out.n = 1;
      TR_TRY(tr::gemm<T>({.M = N, .N = D, .K = C * r}, v, b, out, tr::View{}, st));
    }
    // gA[c] (n, r) = gy[c]^T @ U[:, c].
    {
      tr::View g = tr::tensor(gy), u = tr::scratch(U), out{.p = gA};
      g.b0 = N * n, g.mi = 1, g.ki = n;
      u.b0 = r, u.ki = C * r, u.n = 1;
      out.b0 = n * r, out.mi = r, out.n = 1;
      TR_TRY(tr::gemm_long_k<T>({.batch0 = C, .M = n, .N = r, .K = N}, g, u, out, gAs, st));
    }
    // gB[c] (r, D) = V[:, c]^T @ x.
    tr::View v = tr::scratch(V), a = tr::tensor(x), out{.p = gB};
    v.b0 = r, v.mi = 1, v.ki = C * r;
    a.ki = D, a.n = 1;
    out.b0 = r * D, out.mi = D, out.n = 1;
    return tr::gemm_long_k<T>({.batch0 = C, .M = r, .N = D, .K = N}, v, a, out, gBs, st);
  });
}
TR_ENTRY_POINT(tinyrecon_lorr_apply_bwd)
