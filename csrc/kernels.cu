// Every device kernel of the library; the family files (kron.cu, padding.cu, lowrank.cu) and
// compose.cu only compose them. (tests/host_kernels.cpp implements the same functions on the
// host, so the compositions are checked on machines without a GPU.)
//
// gemm: the batched, strided GEMM every op is built from (GemmShape and View in common.cuh).
// 256 threads per block, each owning a 4 x 4 sub-tile of the output strided by the thread grid
// (so a warp reads consecutive shared-memory words and writes consecutive columns); K is walked
// in slices of 16 staged through shared memory in the accumulation type. The tile is picked per
// launch from the GEMM's N: the applies often have N = s, p or r well under 64, which get tall
// 256 x 16 or 128 x 32 tiles instead of a mostly idle 64 x 64 one.
#include "common.cuh"

namespace tr {
namespace {

constexpr int kGemmThreads = 256, BK = 16, TM = 4, TN = 4;

template <typename T, int BM, int BN>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(GemmShape sh, View a, View b, View c, View bias) {
  using Acc = acc_t<T>;
  constexpr int TX = BN / TN, TY = BM / TM, A_LOADS = BM * BK / kGemmThreads, B_LOADS = BN * BK / kGemmThreads;
  static_assert(TX * TY == kGemmThreads && A_LOADS >= 1 && B_LOADS >= 1, "tile does not fit 256 threads");
  __shared__ Acc As[BK][BM + 1];
  __shared__ Acc Bs[BK][BN + 1];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  const i64 m0 = static_cast<i64>(blockIdx.x) * BM;
  // Threads walk the operand's contiguous dimension when it has one, for coalesced loads.
  const bool a_k_fast = a.ki == 1, b_k_fast = b.n != 1;
  // Offsets along K: one multiply unless K is two-level (then a division per load).
  const bool k_single = sh.Ki >= sh.K;
  auto k_off = [&](const View& v, i64 k) { return k_single ? k * v.ki : red_off(v, k, sh.Ki); };
  // Split K (sh.splits > 1): block z handles chunk z % splits and adds its partial sums into c.
  const i64 chunk = (sh.K + sh.splits * BK - 1) / (sh.splits * BK) * BK;
  const i64 jobs = sh.batch0 * sh.batch1 * sh.splits;
  for (i64 z = blockIdx.z; z < jobs; z += gridDim.z) {
    const i64 zb = z / sh.splits, k_begin = (z % sh.splits) * chunk;
    const i64 k_end = k_begin + chunk < sh.K ? k_begin + chunk : sh.K;
    const i64 z0 = zb / sh.batch1, z1 = zb % sh.batch1;
    // This thread's A rows do not change along K or N: their offsets (-1: past M) are computed once.
    i64 a_row[A_LOADS];
#pragma unroll
    for (int e = 0; e < A_LOADS; ++e) {
      const int idx = tid + e * kGemmThreads;
      const i64 m = m0 + (a_k_fast ? idx / BK : idx % BM);
      a_row[e] = m < sh.M ? z0 * a.b0 + z1 * a.b1 + row_off(a, m, sh.Mi) : -1;
    }
    for (i64 n0 = static_cast<i64>(blockIdx.y) * BN; n0 < sh.N; n0 += static_cast<i64>(gridDim.y) * BN) {
      i64 b_col[B_LOADS];
#pragma unroll
      for (int e = 0; e < B_LOADS; ++e) {
        const int idx = tid + e * kGemmThreads;
        const i64 n = n0 + (b_k_fast ? idx / BK : idx % BN);
        b_col[e] = n < sh.N ? z0 * b.b0 + z1 * b.b1 + n * b.n : -1;
      }
      Acc acc[TM][TN] = {};
      for (i64 k0 = k_begin; k0 < k_end; k0 += BK) {
#pragma unroll
        for (int e = 0; e < A_LOADS; ++e) {
          const int idx = tid + e * kGemmThreads;
          const int i = a_k_fast ? idx / BK : idx % BM, kk = a_k_fast ? idx % BK : idx / BM;
          const i64 k = k0 + kk;
          As[kk][i] = (a_row[e] >= 0 && k < k_end) ? load<T>(a, a_row[e] + k_off(a, k)) : Acc(0);
        }
#pragma unroll
        for (int e = 0; e < B_LOADS; ++e) {
          const int idx = tid + e * kGemmThreads;
          const int j = b_k_fast ? idx / BK : idx % BN, kk = b_k_fast ? idx % BK : idx / BN;
          const i64 k = k0 + kk;
          Bs[kk][j] = (b_col[e] >= 0 && k < k_end) ? load<T>(b, b_col[e] + k_off(b, k)) : Acc(0);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
          Acc ar[TM], br[TN];
#pragma unroll
          for (int i = 0; i < TM; ++i) ar[i] = As[kk][ty + i * TY];
#pragma unroll
          for (int j = 0; j < TN; ++j) br[j] = Bs[kk][tx + j * TX];
#pragma unroll
          for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] += ar[i] * br[j];
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const i64 m = m0 + ty + i * TY;
        if (m >= sh.M) continue;
        const i64 c_row = z0 * c.b0 + z1 * c.b1 + row_off(c, m, sh.Mi);
        const i64 bias_row = bias.p ? z0 * bias.b0 + z1 * bias.b1 + row_off(bias, m, sh.Mi) : 0;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const i64 n = n0 + tx + j * TX;
          if (n >= sh.N) continue;
          Acc v = acc[i][j];
          if (sh.splits > 1) {  // c is fp32 (fp64) scratch, zeroed by the caller; no bias
            atomicAdd(static_cast<Acc*>(c.p) + c_row + n * c.n, v);
            continue;
          }
          if (bias.p) v += load<T>(bias, bias_row + n * bias.n);
          store<T>(c, c_row + n * c.n, v);
        }
      }
    }
  }
}

template <typename T>
__global__ void kron_build_kernel(View A, View B, View W, int layout, i64 C, i64 p, i64 q, i64 s, i64 t) {
  const i64 per = p * s * q * t, total = C * per;
  for (i64 o = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 c = o / per;
    i64 fa, fb;
    split(layout, o % per, q, s, t, fa, fb);
    const acc_t<T> a = A.p ? load<T>(A, c * p * q + fa) : acc_t<T>(fa / q == fa % q);
    store<T>(W, o, a * load<T>(B, c * s * t + fb));
  }
}

// One warp per entry of gX, its lanes striding over the other factor's entries.
template <typename T>
__global__ void kron_grad_kernel(View gW, View Y, View gX, bool of_a, int layout, i64 C, i64 p, i64 q, i64 s,
                                 i64 t) {
  using Acc = acc_t<T>;
  const i64 nX = of_a ? p * q : s * t, nY = of_a ? s * t : p * q;
  const i64 terms = Y.p ? nY : (p < q ? p : q);  // eye(p, q): its ones sit at fa = i * (q + 1)
  const i64 warps = C * nX, stride = static_cast<i64>(gridDim.x) * blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  for (i64 w = (blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x) / 32; w < warps; w += stride) {
    const i64 c = w / nX, f = w % nX;
    Acc sum = 0;
    for (i64 g = lane; g < terms; g += 32) {
      const i64 fy = Y.p ? g : g * (q + 1);
      const Acc y = Y.p ? load<T>(Y, c * nY + fy) : Acc(1);
      const i64 e = of_a ? w_index(layout, f, fy, q, s, t) : w_index(layout, fy, f, q, s, t);
      sum += load<T>(gW, c * p * s * q * t + e) * y;
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) sum += __shfl_down_sync(0xffffffffu, sum, o);
    if (lane == 0) store<T>(gX, w, sum);
  }
}

// out[row * stride + j] = bias ? bias[j] : 0 for row < rows, j < cols.
template <typename T>
__global__ void fill_kernel(T* out, const T* bias, i64 rows, i64 cols, i64 stride) {
  for (i64 o = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; o < rows * cols;
       o += static_cast<i64>(gridDim.x) * blockDim.x) {
    const i64 j = o % cols;
    out[(o / cols) * stride + j] = bias ? bias[j] : from_acc<T>(acc_t<T>(0));
  }
}

template <typename T> __global__ void cast_kernel(const acc_t<T>* src, View out, i64 count) {
  for (i64 i = blockIdx.x * static_cast<i64>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<i64>(gridDim.x) * blockDim.x)
    store<T>(out, i, src[i]);
}

}  // namespace

template <typename T, int BM, int BN>
cudaError_t launch_gemm(const GemmShape& sh, View a, View b, View c, View bias, cudaStream_t stream) {
  const i64 mt = (sh.M + BM - 1) / BM, nt = (sh.N + BN - 1) / BN, jobs = sh.batch0 * sh.batch1 * sh.splits;
  if (mt > 0x7fffffff) return cudaErrorInvalidConfiguration;
  // grid.y and grid.z are capped at 65535; the kernel loops over what they do not cover.
  const dim3 grid(static_cast<unsigned>(mt), static_cast<unsigned>(nt < 65535 ? nt : 65535),
                  static_cast<unsigned>(jobs < 65535 ? jobs : 65535));
  gemm_kernel<T, BM, BN><<<grid, kGemmThreads, 0, stream>>>(sh, a, b, c, bias);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gemm(GemmShape shape, View a, View b, View c, View bias, cudaStream_t stream) {
  const GemmShape sh = normalized(shape);
  if (sh.batch0 * sh.batch1 == 0 || sh.M == 0 || sh.N == 0) return cudaSuccess;
  if (sh.splits > 1 && (bias.p || !c.acc)) return cudaErrorInvalidValue;
  if (sh.N <= 16) return launch_gemm<T, 256, 16>(sh, a, b, c, bias, stream);
  if (sh.N <= 32) return launch_gemm<T, 128, 32>(sh, a, b, c, bias, stream);
  return launch_gemm<T, 64, 64>(sh, a, b, c, bias, stream);
}

template <typename T>
cudaError_t kron_build(View A, View B, View W, int layout, i64 C, i64 p, i64 q, i64 s, i64 t, cudaStream_t stream) {
  kron_build_kernel<T><<<blocks_for(C * p * s * q * t), kThreads, 0, stream>>>(A, B, W, layout, C, p, q, s, t);
  return cudaGetLastError();
}

template <typename T>
cudaError_t kron_build_grad(View gW, View Y, View gX, bool of_a, int layout, i64 C, i64 p, i64 q, i64 s, i64 t,
                            cudaStream_t stream) {
  const i64 warps = C * (of_a ? p * q : s * t);
  kron_grad_kernel<T><<<blocks_for(warps * 32), kThreads, 0, stream>>>(gW, Y, gX, of_a, layout, C, p, q, s, t);
  return cudaGetLastError();
}

template <typename T> cudaError_t fill(T* out, const T* bias, i64 rows, i64 cols, i64 stride, cudaStream_t stream) {
  if (rows * cols == 0) return cudaSuccess;
  fill_kernel<T><<<blocks_for(rows * cols), kThreads, 0, stream>>>(out, bias, rows, cols, stride);
  return cudaGetLastError();
}

template <typename T> cudaError_t cast(const acc_t<T>* src, View out, i64 count, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  cast_kernel<T><<<blocks_for(count), kThreads, 0, stream>>>(src, out, count);
  return cudaGetLastError();
}

#define TR_INSTANTIATE(T)                                                                                \
  template cudaError_t gemm<T>(GemmShape, View, View, View, View, cudaStream_t);                         \
  template cudaError_t kron_build<T>(View, View, View, int, i64, i64, i64, i64, i64, cudaStream_t);      \
  template cudaError_t kron_build_grad<T>(View, View, View, bool, int, i64, i64, i64, i64, i64, cudaStream_t); \
  template cudaError_t fill<T>(T*, const T*, i64, i64, i64, cudaStream_t);                                 \
  template cudaError_t cast<T>(const acc_t<T>*, View, i64, cudaStream_t);
TR_INSTANTIATE(float)
TR_INSTANTIATE(__half)
TR_INSTANTIATE(__nv_bfloat16)
TR_INSTANTIATE(double)

}  // namespace tr
