// Host implementations of the library's kernels (csrc/kernels.cu), for tests on machines
// without a GPU: linked with csrc/{api,kron,padding,lowrank}.cu instead of kernels.cu, they let
// every entry point run on host memory, so the compositions (strides, workspaces, chain rules)
// are checked against the torch reference anywhere nvcc is. Each is the plain loop that
// specifies its kernel; the CUDA runtime calls the library makes are stubbed below.
#include <cstring>

#include "../csrc/common.cuh"

namespace tr {

// splits > 1 only promises that the sums are added into c: here in one go.
template <typename T>
cudaError_t gemm(GemmShape shape, View a, View b, View c, View bias, cudaStream_t) {
  const GemmShape sh = normalized(shape);
  if (sh.splits > 1 && (bias.p || !c.acc)) return cudaErrorInvalidValue;
  for (i64 z0 = 0; z0 < sh.batch0; ++z0)
    for (i64 z1 = 0; z1 < sh.batch1; ++z1)
      for (i64 m = 0; m < sh.M; ++m)
        for (i64 n = 0; n < sh.N; ++n) {
          acc_t<T> acc = 0;
          for (i64 k = 0; k < sh.K; ++k)
            acc += load<T>(a, z0 * a.b0 + z1 * a.b1 + row_off(a, m, sh.Mi) + red_off(a, k, sh.Ki)) *
                   load<T>(b, z0 * b.b0 + z1 * b.b1 + red_off(b, k, sh.Ki) + n * b.n);
          const i64 off = z0 * c.b0 + z1 * c.b1 + row_off(c, m, sh.Mi) + n * c.n;
          if (sh.splits > 1) acc += load<T>(c, off);
          if (bias.p) acc += load<T>(bias, z0 * bias.b0 + z1 * bias.b1 + row_off(bias, m, sh.Mi) + n * bias.n);
          store<T>(c, off, acc);
        }
  return cudaSuccess;
}

template <typename T>
cudaError_t kron_build(View A, View B, View W, int layout, i64 C, i64 p, i64 q, i64 s, i64 t, cudaStream_t) {
  const i64 per = p * s * q * t;
  for (i64 o = 0; o < C * per; ++o) {
    i64 fa, fb;
    split(layout, o % per, q, s, t, fa, fb);
    const acc_t<T> av = A.p ? load<T>(A, o / per * p * q + fa) : acc_t<T>(fa / q == fa % q);
    store<T>(W, o, av * load<T>(B, o / per * s * t + fb));
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t kron_build_grad(View gW, View Y, View gX, bool of_a, int layout, i64 C, i64 p, i64 q, i64 s, i64 t,
                            cudaStream_t) {
  const i64 nX = of_a ? p * q : s * t, nY = of_a ? s * t : p * q;
  for (i64 c = 0; c < C; ++c)
    for (i64 f = 0; f < nX; ++f) {
      acc_t<T> sum = 0;
      for (i64 g = 0; g < nY; ++g) {
        const acc_t<T> y = Y.p ? load<T>(Y, c * nY + g) : acc_t<T>(g / q == g % q);
        const i64 e = of_a ? w_index(layout, f, g, q, s, t) : w_index(layout, g, f, q, s, t);
        sum += load<T>(gW, c * p * s * q * t + e) * y;
      }
      store<T>(gX, c * nX + f, sum);
    }
  return cudaSuccess;
}

template <typename T> cudaError_t fill(T* out, const T* bias, i64 rows, i64 cols, i64 stride, cudaStream_t) {
  for (i64 r = 0; r < rows; ++r)
    for (i64 j = 0; j < cols; ++j) out[r * stride + j] = bias ? bias[j] : from_acc<T>(acc_t<T>(0));
  return cudaSuccess;
}

template <typename T> cudaError_t cast(const acc_t<T>* src, View out, i64 count, cudaStream_t) {
  for (i64 i = 0; i < count; ++i) store<T>(out, i, src[i]);
  return cudaSuccess;
}

#define TR_INSTANTIATE(T)                                                                                    \
  template cudaError_t gemm<T>(GemmShape, View, View, View, View, cudaStream_t);                             \
  template cudaError_t kron_build<T>(View, View, View, int, i64, i64, i64, i64, i64, cudaStream_t);          \
  template cudaError_t kron_build_grad<T>(View, View, View, bool, int, i64, i64, i64, i64, i64, cudaStream_t); \
  template cudaError_t fill<T>(T*, const T*, i64, i64, i64, cudaStream_t);                                   \
  template cudaError_t cast<T>(const acc_t<T>*, View, i64, cudaStream_t);
TR_INSTANTIATE(float)
TR_INSTANTIATE(__half)
TR_INSTANTIATE(__nv_bfloat16)
TR_INSTANTIATE(double)

}  // namespace tr

// The CUDA runtime calls of the library, as on a machine with one device and nothing failing.
cudaError_t CUDARTAPI cudaSetDevice(int) { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaGetLastError() { return cudaSuccess; }
cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t CUDARTAPI cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
const char* CUDARTAPI cudaGetErrorName(cudaError_t) { return "cudaErrorUnknown"; }
const char* CUDARTAPI cudaGetErrorString(cudaError_t) { return "(host emulation)"; }
