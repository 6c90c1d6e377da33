// The batched, strided GEMM every op is built from (see GemmShape and View in common.cuh).
//
// A 64 x 64 output tile per block of 256 threads, each thread owning a 4 x 4 sub-tile strided
// by 16 (so a warp reads consecutive shared-memory words and writes consecutive columns);
// K is walked in slices of 16 staged through shared memory in the accumulation type.
#include "common.cuh"

namespace tr {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, TM = 4, TN = 4;
constexpr int kGemmThreads = (BM / TM) * (BN / TN);
static_assert(kGemmThreads == 256, "one thread per 4 x 4 sub-tile");

__device__ __forceinline__ i64 row_off(const View& v, i64 m, i64 Mi) { return (m / Mi) * v.mo + (m % Mi) * v.mi; }
__device__ __forceinline__ i64 red_off(const View& v, i64 k, i64 Ki) { return (k / Ki) * v.ko + (k % Ki) * v.ki; }

template <typename T>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(GemmShape sh, View a, View b, View c, View bias) {
  using Acc = acc_t<T>;
  __shared__ Acc As[BK][BM + 1];
  __shared__ Acc Bs[BK][BN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % (BN / TN), ty = tid / (BN / TN);
  const i64 m0 = static_cast<i64>(blockIdx.x) * BM;
  // Threads walk the operand's contiguous dimension when it has one, for coalesced loads.
  const bool a_k_fast = a.ki == 1, b_k_fast = b.n != 1;
  const i64 batch = sh.batch0 * sh.batch1;
  for (i64 z = blockIdx.z; z < batch; z += gridDim.z) {
    const i64 z0 = z / sh.batch1, z1 = z % sh.batch1;
    const i64 a_base = z0 * a.b0 + z1 * a.b1, b_base = z0 * b.b0 + z1 * b.b1;
    for (i64 n0 = static_cast<i64>(blockIdx.y) * BN; n0 < sh.N; n0 += static_cast<i64>(gridDim.y) * BN) {
      Acc acc[TM][TN] = {};
      for (i64 k0 = 0; k0 < sh.K; k0 += BK) {
#pragma unroll
        for (int e = 0; e < BM * BK / kGemmThreads; ++e) {
          const int idx = tid + e * kGemmThreads;
          const int i = a_k_fast ? idx / BK : idx % BM, kk = a_k_fast ? idx % BK : idx / BM;
          const i64 m = m0 + i, k = k0 + kk;
          As[kk][i] = (m < sh.M && k < sh.K) ? load<T>(a, a_base + row_off(a, m, sh.Mi) + red_off(a, k, sh.Ki)) : Acc(0);
        }
#pragma unroll
        for (int e = 0; e < BN * BK / kGemmThreads; ++e) {
          const int idx = tid + e * kGemmThreads;
          const int j = b_k_fast ? idx / BK : idx % BN, kk = b_k_fast ? idx % BK : idx / BN;
          const i64 n = n0 + j, k = k0 + kk;
          Bs[kk][j] = (n < sh.N && k < sh.K) ? load<T>(b, b_base + red_off(b, k, sh.Ki) + n * b.n) : Acc(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          Acc ar[TM], br[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) ar[i] = As[kk][ty + i * (BM / TM)];
#pragma unroll
          for (int j = 0; j < TN; ++j) br[j] = Bs[kk][tx + j * (BN / TN)];
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] += ar[i] * br[j];
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const i64 m = m0 + ty + i * (BM / TM);
        if (m >= sh.M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const i64 n = n0 + tx + j * (BN / TN);
          if (n >= sh.N) continue;
          Acc v = acc[i][j];
          if (bias.p) v += load<T>(bias, z0 * bias.b0 + z1 * bias.b1 + row_off(bias, m, sh.Mi) + n * bias.n);
          store<T>(c, z0 * c.b0 + z1 * c.b1 + row_off(c, m, sh.Mi) + n * c.n, v);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t gemm(GemmShape sh, View a, View b, View c, View bias, cudaStream_t stream) {
  if (sh.batch0 * sh.batch1 == 0 || sh.M == 0 || sh.N == 0) return cudaSuccess;
  if (sh.Mi <= 0) sh.Mi = sh.M;
  if (sh.Ki <= 0) sh.Ki = sh.K > 0 ? sh.K : 1;
  const i64 mt = (sh.M + BM - 1) / BM, nt = (sh.N + BN - 1) / BN, batch = sh.batch0 * sh.batch1;
  if (mt > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // grid.y and grid.z are capped at 65535; the kernel loops over what they do not cover.
  const dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt < 65535 ? nt : 65535),
                  static_cast<unsigned>(batch < 65535 ? batch : 65535));
  gemm_kernel<T><<<grid, kGemmThreads, 0, stream>>>(sh, a, b, c, bias);
  return cudaGetLastError();
}

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

#define TR_INSTANTIATE(T)                                                                                  \
  template cudaError_t gemm<T>(GemmShape, View, View, View, View, cudaStream_t);                           \
  template cudaError_t matmul<T>(View, View, View, i64, i64, i64, i64, cudaStream_t);                      \
  template cudaError_t matmul_grad<T>(View, View, View, View, View, i64, i64, i64, i64, cudaStream_t);
TR_INSTANTIATE(float)
TR_INSTANTIATE(__half)
TR_INSTANTIATE(__nv_bfloat16)
TR_INSTANTIATE(double)

}  // namespace tr
