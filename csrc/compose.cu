// Compositions of the kernels shared by the families: factor products and their gradients, and
// the split-K GEMM of weight gradients.
#include "common.cuh"

namespace tr {

template <typename T>
cudaError_t matmul(View F1, View F2, View out, i64 C, i64 rows, i64 r, i64 cols, cudaStream_t stream) {
  F1.b0 = rows * r, F1.mi = r, F1.ki = 1;
  F2.b0 = r * cols, F2.ki = cols, F2.n = 1;
  out.b0 = rows * cols, out.mi = cols, out.n = 1;
  return gemm<T>({.batch0 = C, .M = rows, .N = cols, .K = r}, F1, F2, out, View{}, stream);
}

template <typename T>
cudaError_t matmul_grad(View g, View F1, View F2, View gF1, View gF2, i64 C, i64 rows, i64 r, i64 cols,
                        cudaStream_t stream) {
  // gF1[c] = g[c] @ F2[c]^T: (rows x cols) @ (cols x r)
  View ga = g, fb = F2, out = gF1;
  ga.b0 = rows * cols, ga.mi = cols, ga.ki = 1;
  fb.b0 = r * cols, fb.ki = 1, fb.n = cols;
  out.b0 = rows * r, out.mi = r, out.n = 1;
  TR_TRY(gemm<T>({.batch0 = C, .M = rows, .N = r, .K = cols}, ga, fb, out, View{}, stream));
  // gF2[c] = F1[c]^T @ g[c]: (r x rows) @ (rows x cols)
  View fa = F1, gb = g;
  out = gF2;
  fa.b0 = rows * r, fa.mi = 1, fa.ki = r;
  gb.b0 = rows * cols, gb.ki = cols, gb.n = 1;
  out.b0 = r * cols, out.mi = cols, out.n = 1;
  return gemm<T>({.batch0 = C, .M = r, .N = cols, .K = rows}, fa, gb, out, View{}, stream);
}

// Blocks a GEMM should keep busy (several per SM on current GPUs), and the least K per split.
constexpr i64 kTargetBlocks = 512, kMinSplitK = 128;

template <typename T>
cudaError_t gemm_long_k(GemmShape sh, View a, View b, View c, acc_t<T>* scratch, cudaStream_t stream) {
  const i64 tiles = sh.batch0 * ((sh.M + 63) / 64) * ((sh.N + 63) / 64);
  const i64 by_k = sh.K / kMinSplitK, by_grid = tiles > 0 ? kTargetBlocks / tiles : 1;
  sh.splits = by_k < by_grid ? by_k : by_grid;
  if (sh.splits <= 1) {
    sh.splits = 1;
    return gemm<T>(sh, a, b, c, View{}, stream);
  }
  const i64 count = sh.batch0 * sh.M * sh.N;
  TR_TRY(cudaMemsetAsync(scratch, 0, count * sizeof(acc_t<T>), stream));
  View partial = c;
  partial.p = scratch, partial.acc = true;
  TR_TRY(gemm<T>(sh, a, b, partial, View{}, stream));
  return cast<T>(scratch, c, count, stream);
}

#define TR_INSTANTIATE(T)                                                                         \
  template cudaError_t matmul<T>(View, View, View, i64, i64, i64, i64, cudaStream_t);              \
  template cudaError_t matmul_grad<T>(View, View, View, View, View, i64, i64, i64, i64, cudaStream_t); \
  template cudaError_t gemm_long_k<T>(GemmShape, View, View, View, acc_t<T>*, cudaStream_t);
TR_INSTANTIATE(float)
TR_INSTANTIATE(__half)
TR_INSTANTIATE(__nv_bfloat16)
TR_INSTANTIATE(double)

}  // namespace tr
