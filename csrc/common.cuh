// What every CUDA source shares: dtypes, strided operands, the batched GEMM, workspace, errors.
//
// The library has a plain C ABI (no torch headers): every exported entry point takes the
// device index, the caller's stream and a dtype code, returns 0 or an error code, and leaves
// the message for tinyrecon_last_error(); an op's entry points are written with TR_OP (below).
// Arithmetic accumulates in fp32 (fp64 for double); intermediates between launches are kept in
// that accumulation type, so half inputs are rounded once, at the output, like the torch reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "entry_points.h"

namespace tr {

using i64 = int64_t;

// dtype codes shared with src/tinyrecon/cuda_lib.py
enum Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };
// layout codes of the Kronecker family: the index in src/tinyrecon/base.py's LAYOUTS ("kron", "tinybig")
enum Layout : int { kKron = 0, kTinybig = 1 };

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

__host__ __device__ inline float to_acc(float v) { return v; }
__host__ __device__ inline double to_acc(double v) { return v; }
__host__ __device__ inline float to_acc(__half v) { return __half2float(v); }
__host__ __device__ inline float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __host__ __device__ inline T from_acc(acc_t<T> v) { return v; }
template <> __host__ __device__ inline __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __host__ __device__ inline __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// A strided operand: element (b0, b1, mo, mi, ko, ki, n) lives at p + the dot product of those
// indices with the strides below (in elements; unused strides stay 0). A GEMM row index m is
// split as m = mo * Mi + mi and a reduction index k as k = ko * Ki + ki, which lets one launch
// walk e.g. the (sample, block) rows of x or reduce over (channel, row) pairs. `acc`: stored in
// the accumulation type (a workspace intermediate) rather than in T.
struct View {
  void* p = nullptr;
  bool acc = false;
  i64 b0 = 0, b1 = 0, mo = 0, mi = 0, ko = 0, ki = 0, n = 0;
};

// A caller's tensor (in T) and a workspace buffer (in the accumulation type), strides to be set.
inline View tensor(const void* p) { return View{.p = const_cast<void*>(p)}; }
inline View scratch(void* p) { return View{.p = p, .acc = true}; }

// (fa, fb): the entries of vec(A) and vec(B) whose product is W's within-channel entry e.
__host__ __device__ inline void split(int layout, i64 e, i64 q, i64 s, i64 t, i64& fa, i64& fb) {
  if (layout == kTinybig) {  // W = reshape(outer(vec(A), vec(B)), n, D)
    fa = e / (s * t), fb = e % (s * t);
    return;
  }
  const i64 i = e / (q * t), j = e % (q * t);  // W[i1*s + i2, j1*t + j2] = A[i1, j1] * B[i2, j2]
  fa = (i / s) * q + j / t, fb = (i % s) * t + j % t;
}

// The inverse of split: W's within-channel entry holding A[fa] * B[fb].
__host__ __device__ inline i64 w_index(int layout, i64 fa, i64 fb, i64 q, i64 s, i64 t) {
  if (layout == kTinybig) return fa * (s * t) + fb;
  return ((fa / q) * s + fb / t) * (q * t) + (fa % q) * t + fb % t;
}

template <typename T> __host__ __device__ inline acc_t<T> load(const View& v, i64 off) {
  return v.acc ? static_cast<const acc_t<T>*>(v.p)[off] : to_acc(static_cast<const T*>(v.p)[off]);
}

template <typename T> __host__ __device__ inline void store(const View& v, i64 off, acc_t<T> x) {
  if (v.acc) static_cast<acc_t<T>*>(v.p)[off] = x;
  else static_cast<T*>(v.p)[off] = from_acc<T>(x);
}

// Offsets of the two-level row (m = mo * Mi + mi) and reduction (k = ko * Ki + ki) indices.
__host__ __device__ inline i64 row_off(const View& v, i64 m, i64 Mi) { return (m / Mi) * v.mo + (m % Mi) * v.mi; }
__host__ __device__ inline i64 red_off(const View& v, i64 k, i64 Ki) { return (k / Ki) * v.ko + (k % Ki) * v.ki; }

// C[b, m, n] = sum_k A[b, m, k] * B[b, k, n] (+ bias[b, m, n]) for b in batch0 x batch1.
// Mi / Ki: inner extents of the two-level row and reduction indices (0: single level).
// splits > 1: K is cut into that many chunks whose partial sums are added into C, which must
// then be zeroed accumulation-type scratch, without bias (see gemm_long_k).
struct GemmShape {
  i64 batch0 = 1, batch1 = 1, M = 0, Mi = 0, N = 0, K = 0, Ki = 0, splits = 1;
};

inline GemmShape normalized(GemmShape sh) {
  if (sh.Mi <= 0) sh.Mi = sh.M > 0 ? sh.M : 1;
  if (sh.Ki <= 0) sh.Ki = sh.K > 0 ? sh.K : 1;
  if (sh.splits < 1) sh.splits = 1;
  return sh;
}

// The kernels (kernels.cu, for float, __half, __nv_bfloat16, double) ------------------------------

// gemm: bias.p may be null.
template <typename T>
cudaError_t gemm(GemmShape shape, View a, View b, View c, View bias, cudaStream_t stream);

// W (C, p*s, q*t) with W's entries A[c, fa] * B[c, fb] placed by `layout`;
// A.p == nullptr means A = eye(p, q) (the block-diagonal padding).
template <typename T>
cudaError_t kron_build(View A, View B, View W, int layout, i64 C, i64 p, i64 q, i64 s, i64 t, cudaStream_t stream);

// Gradient of kron_build for one factor: gX[c, f] = sum_g gW[c, W index of (f, g)] * Y[c, g].
// of_a: X = A (Y = B) or X = B (Y = A); Y.p == nullptr means eye(p, q) as above.
template <typename T>
cudaError_t kron_build_grad(View gW, View Y, View gX, bool of_a, int layout, i64 C, i64 p, i64 q, i64 s, i64 t,
                            cudaStream_t stream);

// out[row * stride + j] = bias ? bias[j] : 0 for row < rows, j < cols (rows a GEMM does not write).
template <typename T> cudaError_t fill(T* out, const T* bias, i64 rows, i64 cols, i64 stride, cudaStream_t stream);

// out[i] = src[i] for i < count, rounded to out's type (out contiguous).
template <typename T> cudaError_t cast(const acc_t<T>* src, View out, i64 count, cudaStream_t stream);

// Compositions of the kernels shared by the families (compose.cu) ------------------------------------

// gemm for a K that dwarfs the output (weight gradients, K running over the batch): K is split
// across blocks summing into `scratch` (batch0 * M * N accumulation-type entries), rounded into
// c once. c must be contiguous (batch0, M, N) with single-level rows; shape.batch1 must be 1.
template <typename T>
cudaError_t gemm_long_k(GemmShape shape, View a, View b, View c, acc_t<T>* scratch, cudaStream_t stream);

// out[c] = F1[c] @ F2[c] for F1 (C, rows, r), F2 (C, r, cols), all contiguous.
template <typename T>
cudaError_t matmul(View F1, View F2, View out, i64 C, i64 rows, i64 r, i64 cols, cudaStream_t stream);

// Gradients of out = F1 @ F2 (shapes as in matmul): gF1 = g @ F2^T, gF2 = F1^T @ g.
template <typename T>
cudaError_t matmul_grad(View g, View F1, View F2, View gF1, View gF2, i64 C, i64 rows, i64 r, i64 cols,
                        cudaStream_t stream);

// Bump allocator over the caller's workspace. Entry points carve every buffer first, then ask
// sizing(): true for a call with a non-null work_bytes, which only reports the size needed.
struct Arena {
  char* base;
  i64* bytes;
  i64 used = 0;
  template <typename U> U* take(i64 count) {
    const i64 off = (used + 255) / 256 * 256;
    used = off + count * static_cast<i64>(sizeof(U));
    return base ? reinterpret_cast<U*>(base + off) : nullptr;
  }
  bool sizing() const {
    if (bytes) *bytes = used;
    return bytes != nullptr;
  }
};

// An op's arguments as src/tinyrecon/cuda_ops.py packs them: four int64 slots per argument of the
// op's declaration (src/tinyrecon/ops.py), in order, then the tensors the call writes. A tensor is
// its address and sizes (left-aligned, 1 past its last dimension; contiguous), an absent one a null
// address, an int its value, a layout its code.
struct Args {
  const i64* slot;
  void* ptr(int i) const { return reinterpret_cast<void*>(slot[4 * i]); }
  i64 value(int i) const { return slot[4 * i]; }
  i64 size(int i, int d) const { return slot[4 * i + 1 + d]; }
};

// Records the message of a failed call for tinyrecon_last_error(); returns the code.
int fail(cudaError_t err);
int fail_msg(const char* msg);

template <typename T> struct Tag { using type = T; };

// Runs f(Tag<T>{}, arena) (returning cudaError_t) for the dtype code on `device`; also reports launch
// errors. The calling thread's current device is restored afterwards (the caller's CUDA state is its own).
template <typename F> int run(int device, int dtype, void* work, i64* work_bytes, F f) {
  if (dtype < kFloat32 || dtype > kFloat64)
    return fail_msg("unsupported dtype code (expected 0 float32, 1 float16, 2 bfloat16, 3 float64)");
  int previous = device;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess && previous != device) err = cudaSetDevice(device);
  if (err != cudaSuccess) return fail(err);
  Arena arena{static_cast<char*>(work), work_bytes};
  switch (dtype) {
    case kFloat32: err = f(Tag<float>{}, arena); break;
    case kFloat16: err = f(Tag<__half>{}, arena); break;
    case kBFloat16: err = f(Tag<__nv_bfloat16>{}, arena); break;
    default: err = f(Tag<double>{}, arena); break;
  }
  if (err == cudaSuccess) err = cudaGetLastError();
  const cudaError_t restored = previous != device ? cudaSetDevice(previous) : cudaSuccess;
  if (err == cudaSuccess) err = restored;
  return err == cudaSuccess ? 0 : fail(err);
}

// Launch configuration of the elementwise and reduction kernels: a grid-stride loop.
constexpr int kThreads = 256;
inline unsigned blocks_for(i64 work) {
  const i64 b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > (1 << 20) ? (1 << 20) : b));
}

}  // namespace tr

#define TR_TRY(expr)                              \
  do {                                            \
    const cudaError_t tr_err_ = (expr);           \
    if (tr_err_ != cudaSuccess) return tr_err_;   \
  } while (0)

// The entry point of op `name` of src/tinyrecon/ops.py (its backward: `name`_bwd), which cuda_ops.py
// finds by that name: tinyrecon_<name>(device, stream, dtype, args, work, work_bytes). The body that
// follows is run per dtype with T, the op's arguments `a` (Args), `arena` and the stream `st` in scope;
// it carves its workspace, returns if arena.sizing(), then launches.
#define TR_OP(name)                                                                                        \
  template <typename T> static cudaError_t name##_body(const tr::Args& a, tr::Arena& arena, cudaStream_t st); \
  TR_EXPORT int tinyrecon_##name(int device, void* stream, int dtype, const tr::i64* args, void* work,          \
                                 tr::i64* work_bytes) {                                                      \
    return tr::run(device, dtype, work, work_bytes, [&](auto tag, tr::Arena& arena) {                         \
      return name##_body<typename decltype(tag)::type>(tr::Args{args}, arena, static_cast<cudaStream_t>(stream)); \
    });                                                                                                      \
  }                                                                                                          \
  TR_ENTRY_POINT(tinyrecon_##name)                                                                           \
  template <typename T> static cudaError_t name##_body(const tr::Args& a, tr::Arena& arena, cudaStream_t st)
