// Counter-based random numbers on the CPU (tinyrecon/_random.py is the spec): Philox-4x32-10 keyed
// by the 64-bit seed with counter (k_lo, k_hi, 0, 0), Triton's uint->uniform map and, for normals,
// its Box-Muller transform on the first two output words.
//
// 16 counters per step in 64-byte vectors (one AVX-512 register, two AVX2 or four SSE registers in
// the other clones). The uniform stage is integer arithmetic and one float32 multiply: bit-exact.
// The normal stage is defined in float64 and rounded once (float32 steps would inherit torch's
// own float32 log/sqrt/cos, which are not correctly rounded and differ between CPUs); log and cos
// are polynomials here with relative error ~1e-15, so the result rounds as _random.py's does
// except within ~1e-15 of a rounding boundary (then 1 ulp).
// Plain C ABI, loaded with ctypes; the entry point returns 0, or 1 for bad arguments.
#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_common.h"

namespace {

using i64 = int64_t;
constexpr int LANES = 16;   // counters per step; the float64 stage runs in two halves of 8
typedef uint32_t u32v __attribute__((vector_size(64)));
typedef int32_t i32v __attribute__((vector_size(64)));
typedef float f32v __attribute__((vector_size(64)));
typedef uint64_t u64h __attribute__((vector_size(64)));
typedef int64_t i64h __attribute__((vector_size(64)));
typedef double f64h __attribute__((vector_size(64)));
typedef float f32h __attribute__((vector_size(32)));
typedef int32_t i32h __attribute__((vector_size(32)));

constexpr uint32_t ROUND_A = 0xD2511F53u, ROUND_B = 0xCD9E8D57u, KEY_A = 0x9E3779B9u, KEY_B = 0xBB67AE85u;
constexpr uint64_t LO32 = 0xFFFFFFFFu;

template <typename To, typename From>
TR_INLINE To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}

// (hi, lo) words of a * c for 16 lanes: even and odd lanes as 32x32->64 multiplies of 64-bit lanes
// (what the compiler turns into one widening multiply each).
TR_INLINE void mulhilo(uint32_t a, u32v c, u32v& hi, u32v& lo) {
  const u64h v = bitcast<u64h>(c);
  const u64h even = (v & LO32) * uint64_t(a), odd = (v >> 32) * uint64_t(a);
  lo = bitcast<u32v>((even & LO32) | (odd << 32));
  hi = bitcast<u32v>((even >> 32) | (odd & ~LO32));
}

// First two Philox-4x32-10 words for the 16 counters base + 0..15.
TR_INLINE void philox(uint64_t seed, uint64_t base, u32v& r0, u32v& r1) {
  const u32v iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const uint32_t lo = uint32_t(base), hi = uint32_t(base >> 32);
  u32v c0 = lo + iota;
  u32v c1 = hi - (u32v)(c0 < lo);   // carry into the high word (a true comparison is all ones)
  u32v c2 = {}, c3 = {};
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    u32v hb, lb, ha, la;
    mulhilo(ROUND_B, c2, hb, lb);
    mulhilo(ROUND_A, c0, ha, la);
    c0 = hb ^ c1 ^ k0;
    c1 = lb;
    c2 = ha ^ c3 ^ k1;
    c3 = la;
    k0 += KEY_A, k1 += KEY_B;
  }
  r0 = c0, r1 = c1;
}

// Triton's uint_to_uniform_float: the word as int32, negatives mapped to ~s, times 2^-31 (rounded).
TR_INLINE f32v uniform(u32v u) {
  i32v s = (i32v)u;
  s = s < 0 ? ~s : s;
  return __builtin_convertvector(s, f32v) * 4.6566127342e-10f;
}

// log(u) in double for 8 float32 u > 0 (normal numbers): u = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172: nine odd terms reach 1e-16 relative.
TR_INLINE f64h log_f64(f32h u) {
  const i32h bits = bitcast<i32h>(u);
  i32h e = ((bits >> 23) & 0xff) - 127;
  f32h m = bitcast<f32h>((bits & 0x7fffff) | 0x3f800000);
  const i32h big = m > 1.41421356f;   // all ones where m is above sqrt(2)
  m = big ? m * 0.5f : m;
  e -= big;
  const f64h md = __builtin_convertvector(m, f64h);
  const f64h s = (md - 1.0) / (md + 1.0), s2 = s * s;
  f64h p = f64h{} + 1.0 / 17;
  p = p * s2 + 1.0 / 15;
  p = p * s2 + 1.0 / 13;
  p = p * s2 + 1.0 / 11;
  p = p * s2 + 1.0 / 9;
  p = p * s2 + 1.0 / 7;
  p = p * s2 + 1.0 / 5;
  p = p * s2 + 1.0 / 3;
  p = p * s2 + 1.0;
  return __builtin_convertvector(e, f64h) * 0.69314718055994530942 + 2.0 * s * p;
}

// cos(t) in double for t in [0, 8): t = k pi/2 + x, |x| <= pi/4, with pi/2 in two parts whose first
// has 33 bits (k pi/2 is exact to ~1e-26 for k <= 5), then the Taylor series of cos x or sin x
// (truncation below 1e-16).
TR_INLINE f64h cos_f64(f64h t) {
  const double shifter = 6755399441055744.0;   // 1.5 * 2^52: adding it rounds to an integer
  const f64h kr = t * 0.63661977236758134308 + shifter;
  const i64h q = bitcast<i64h>(kr) & 3;   // k mod 4, from the low mantissa bits
  const f64h k = kr - shifter;
  const f64h x = (t - k * 1.57079632673412561417) - k * 6.07710050650619224932e-11, x2 = x * x;
  f64h c = f64h{} + 1.0 / 20922789888000.0;   // 1/16!
  c = c * x2 - 1.0 / 87178291200.0;
  c = c * x2 + 1.0 / 479001600.0;
  c = c * x2 - 1.0 / 3628800.0;
  c = c * x2 + 1.0 / 40320.0;
  c = c * x2 - 1.0 / 720.0;
  c = c * x2 + 1.0 / 24.0;
  c = c * x2 - 0.5;
  c = c * x2 + 1.0;
  f64h s = f64h{} + 1.0 / 1307674368000.0;   // 1/15!
  s = s * x2 - 1.0 / 6227020800.0;
  s = s * x2 + 1.0 / 39916800.0;
  s = s * x2 - 1.0 / 362880.0;
  s = s * x2 + 1.0 / 5040.0;
  s = s * x2 - 1.0 / 120.0;
  s = s * x2 + 1.0 / 6.0;
  s = x - x * x2 * s;   // sin x
  // cos(x + k pi/2) = cos x, -sin x, -cos x, sin x for k = 0, 1, 2, 3 (mod 4)
  const f64h r = (q & 1) != 0 ? s : c;
  return (q == 1) | (q == 2) ? -r : r;
}

// Box-Muller for 8 pairs: sqrt(-2 log u1) cos(2 pi u2) in double, rounded once.
TR_INLINE f32h box_muller(f32h u1, f32h u2) {
  const f64h r2 = -2.0 * log_f64(u1 < 1.0e-7f ? 1.0e-7f : u1);
  f64h r;
  for (int l = 0; l < 8; ++l) r[l] = __builtin_sqrt(r2[l]);
  return __builtin_convertvector(r * cos_f64(__builtin_convertvector(u2, f64h) * 6.283185307179586), f32h);
}

// 16 numbers for counters base + 0..15: U[0, 1) (normal == false) or N(0, 1).
TR_INLINE f32v block(uint64_t seed, uint64_t base, bool normal) {
  u32v r0, r1;
  philox(seed, base, r0, r1);
  const f32v u1 = uniform(r0);
  if (!normal) return u1;
  const f32v u2 = uniform(r1);
  f32h a[2], b[2], z[2];
  std::memcpy(a, &u1, sizeof a);
  std::memcpy(b, &u2, sizeof b);
  for (int h = 0; h < 2; ++h) z[h] = box_muller(a[h], b[h]);
  f32v out;
  std::memcpy(&out, z, sizeof out);
  return out;
}

struct Fill {
  uint64_t seed, start;
  float* out;
  i64 cols, stride, begin, end;   // elements e in [begin, end): row e / cols, column e % cols
  bool normal;
  const float* src;               // masking: out = src * (uniform < p), else out = the numbers
  i64 src_stride, out_stride;     // row strides of src and out (out: cols when not masking)
  float p;
};

TR_INLINE void store(const Fill& f, float* out, const float* src, f32v v, i64 len) {
  if (src) {   // src * 1 or src * 0, as the reference's w * mask (so inf and nan propagate alike)
    f32v s;
    std::memcpy(&s, src, sizeof(float) * size_t(len));
    for (i64 l = 0; l < len; ++l) v[l] = s[l] * (v[l] < f.p ? 1.0f : 0.0f);
  }
  std::memcpy(out, &v, sizeof(float) * size_t(len));
}

TR_CLONES void fill(const Fill& f) {
  for (i64 e = f.begin; e < f.end;) {
    const i64 row = e / f.cols, col = e % f.cols, len = std::min(f.cols - col, f.end - e);
    const uint64_t counter = f.start + uint64_t(row) * uint64_t(f.stride) + uint64_t(col);
    float* out = f.out + row * f.out_stride + col;
    const float* src = f.src ? f.src + row * f.src_stride + col : nullptr;
    i64 i = 0;
    for (; i + LANES <= len; i += LANES)
      store(f, out + i, src ? src + i : nullptr, block(f.seed, counter + uint64_t(i), f.normal), LANES);
    if (i < len) store(f, out + i, src ? src + i : nullptr, block(f.seed, counter + uint64_t(i), f.normal), len - i);
    e += len;
  }
}

void* run(void* arg) {
  fill(*static_cast<Fill*>(arg));
  return nullptr;
}

constexpr int MAX_THREADS = 64;
constexpr i64 MIN_PER_THREAD = 1 << 15;   // below, starting a thread costs more than it saves

// Splits the elements of whole over at most threads pthreads.
int launch(int threads, Fill whole, i64 rows) {
  const i64 numel = rows * whole.cols;
  const int n = int(std::max<i64>(1, std::min<i64>({threads, MAX_THREADS, numel / MIN_PER_THREAD})));
  Fill jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  bool started[MAX_THREADS] = {};
  const i64 per = (numel / n + LANES - 1) / LANES * LANES;   // whole blocks per thread
  for (int t = 0; t < n; ++t) {
    jobs[t] = whole;
    jobs[t].begin = std::min(numel, t * per), jobs[t].end = t == n - 1 ? numel : std::min(numel, (t + 1) * per);
  }
  for (int t = 1; t < n; ++t) started[t] = pthread_create(&ids[t], nullptr, run, &jobs[t]) == 0;
  fill(jobs[0]);
  for (int t = 1; t < n; ++t) {
    if (started[t])
      pthread_join(ids[t], nullptr);
    else
      fill(jobs[t]);
  }
  return 0;
}

}  // namespace

// out[i * cols + j] = number (start + i * stride + j) of the stream of seed, for i < rows, j < cols
// (a block of a larger row-major matrix): kind 0 uniform, 1 normal. threads: how many to use at
// most (the caller passes torch's setting).
TR_EXPORT int tinyrecon_cpu_philox_fill(int kind, int threads, i64 seed, i64 start, i64 rows, i64 cols, i64 stride,
                                        void* out) {
  if ((kind != 0 && kind != 1) || start < 0 || rows < 0 || cols < 0 || stride < 0 || (rows && cols && !out)) return 1;
  return launch(threads, {uint64_t(seed), uint64_t(start), static_cast<float*>(out), cols, stride, 0, 0, kind == 1,
                          nullptr, 0, cols, 0.0f}, rows);
}

// Masking (float32): out[i * out_stride + j] = src[i * src_stride + j] * (u < p), u the uniform
// number (start + i * stride + j), for i < rows, j < cols: a column block of w * mask in one pass.
TR_EXPORT int tinyrecon_cpu_philox_mask(int threads, i64 seed, i64 start, i64 rows, i64 cols, i64 stride, float p,
                                        const void* src, i64 src_stride, void* out, i64 out_stride) {
  if (start < 0 || rows < 0 || cols < 0 || stride < 0 || src_stride < 0 || out_stride < 0 ||
      (rows && cols && (!out || !src)))
    return 1;
  return launch(threads, {uint64_t(seed), uint64_t(start), static_cast<float*>(out), cols, stride, 0, 0, false,
                          static_cast<const float*>(src), src_stride, out_stride, p}, rows);
}
