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
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

// ---- threads ------------------------------------------------------------------------------------
constexpr int MAX_THREADS = 64;

// fn(ctx, thread, begin, end) over [0, total) split in at most `threads` ranges of whole `align`s,
// each at least min_per_thread long (below that, starting a thread costs more than it saves).
typedef void (*Task)(const void* ctx, int thread, i64 begin, i64 end);

struct Job {
  Task fn;
  const void* ctx;
  int thread;
  i64 begin, end;
};

void* run_job(void* arg) {
  const Job& j = *static_cast<Job*>(arg);
  j.fn(j.ctx, j.thread, j.begin, j.end);
  return nullptr;
}

int split_count(int threads, i64 total, i64 min_per_thread) {
  return int(std::max<i64>(1, std::min<i64>({threads, MAX_THREADS, total / std::max<i64>(1, min_per_thread)})));
}

void parallel(int n, i64 total, i64 align, Task fn, const void* ctx) {
  Job jobs[MAX_THREADS];
  pthread_t ids[MAX_THREADS];
  bool started[MAX_THREADS] = {};
  const i64 per = (total / n + align - 1) / align * align;
  for (int t = 0; t < n; ++t)
    jobs[t] = {fn, ctx, t, std::min(total, t * per), t == n - 1 ? total : std::min(total, (t + 1) * per)};
  for (int t = 1; t < n; ++t) started[t] = pthread_create(&ids[t], nullptr, run_job, &jobs[t]) == 0;
  run_job(&jobs[0]);
  for (int t = 1; t < n; ++t) {
    if (started[t])
      pthread_join(ids[t], nullptr);
    else
      run_job(&jobs[t]);
  }
}

// ---- fill and masking pass ----------------------------------------------------------------------
struct Fill {
  uint64_t seed, start;
  float* out;
  i64 cols, stride;
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

// Elements e in [begin, end) of the rows x cols block: row e / cols, column e % cols.
TR_CLONES void fill(const void* ctx, int, i64 begin, i64 end) {
  const Fill& f = *static_cast<const Fill*>(ctx);
  for (i64 e = begin; e < end;) {
    const i64 row = e / f.cols, col = e % f.cols, len = std::min(f.cols - col, end - e);
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

constexpr i64 MIN_NUMBERS_PER_THREAD = 1 << 15;

int launch(int threads, const Fill& f, i64 rows) {
  const i64 numel = rows * f.cols;
  parallel(split_count(threads, numel, MIN_NUMBERS_PER_THREAD), numel, LANES, fill, &f);
  return 0;
}

// ---- bit-packed masks ---------------------------------------------------------------------------
// Row i of a rows x cols mask is `words` uint64 words; bit b of word q is (u < p) for the uniform
// number i * cols + 64 q + b (bits past cols are 0). 1/32 of the float32 mask: what a cache keeps.
struct Bits {
  uint64_t seed;
  i64 cols, words;
  float p;
  uint64_t* out;
};

TR_CLONES void mask_bits(const void* ctx, int, i64 begin, i64 end) {
  const Bits& b = *static_cast<const Bits*>(ctx);
  const u32v weight = {1u << 0, 1u << 1, 1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
                       1u << 8, 1u << 9, 1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15};
  for (i64 q = begin; q < end; ++q) {
    const i64 row = q / b.words, col = q % b.words * 64, valid = std::min<i64>(64, b.cols - col);
    const uint64_t counter = uint64_t(row) * uint64_t(b.cols) + uint64_t(col);
    uint64_t word = 0;
    for (int s = 0; s * LANES < valid; ++s) {
      const u32v set = (u32v)(block(b.seed, counter + uint64_t(s * LANES), false) < b.p) & weight;
      uint32_t m = 0;
      for (int l = 0; l < LANES; ++l) m |= set[l];
      word |= uint64_t(m) << (s * LANES);
    }
    b.out[q] = valid == 64 ? word : word & ((uint64_t(1) << valid) - 1);
  }
}

// out = src * bit for a column block [j0, j0 + cols) of the mask, as the reference's w * mask.
template <typename T>
struct Apply {
  const uint64_t* bits;
  i64 words, j0, cols;
  const T* src;
  i64 src_stride;
  T* out;
  i64 out_stride;
};

template <typename T>
TR_INLINE void apply_bits(const Apply<T>& a, int, i64 begin, i64 end) {
  constexpr int L = 64 / sizeof(T);   // lanes of one 64-byte vector
  typedef T tv __attribute__((vector_size(64)));
  typedef std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t> U;
  typedef U uv __attribute__((vector_size(64)));
  uv weight;
  for (int l = 0; l < L; ++l) weight[l] = U(1) << l;
  for (i64 e = begin; e < end;) {
    const i64 row = e / a.cols, col = e % a.cols, len = std::min(a.cols - col, end - e);
    const uint64_t* bits = a.bits + row * a.words;
    const T* src = a.src + row * a.src_stride + col;
    T* out = a.out + row * a.out_stride + col;
    for (i64 i = 0; i < len; i += L) {
      const i64 b = a.j0 + col + i, q = b >> 6, r = b & 63, n = std::min<i64>(L, len - i);
      uint64_t w = bits[q] >> r;
      if (r + L > 64 && q + 1 < a.words) w |= bits[q + 1] << (64 - r);
      const tv one = ((uv{} + U(w)) & weight) != 0 ? tv{} + T(1) : tv{};
      tv s = {};
      std::memcpy(&s, src + i, sizeof(T) * size_t(n));
      s *= one;
      std::memcpy(out + i, &s, sizeof(T) * size_t(n));
    }
    e += len;
  }
}

TR_CLONES void apply_bits_f32(const void* ctx, int t, i64 begin, i64 end) {
  apply_bits(*static_cast<const Apply<float>*>(ctx), t, begin, end);
}
TR_CLONES void apply_bits_f64(const void* ctx, int t, i64 begin, i64 end) {
  apply_bits(*static_cast<const Apply<double>*>(ctx), t, begin, end);
}

// ---- random linear blocks (hypernets) ----------------------------------------------------------
// Columns [j0, j0 + cols) of W[c] = reshape(M @ v[c] (+ b), n, D), M (n*D x k) and b (n*D) N(0, 1)
// of seeds seed_m and seed_c; and/or dv[c] += sum_ij dW[c, i, j] M[i*D + j0 + j, :] for a given
// block dW. M's numbers are drawn in short runs into a buffer next to the arithmetic using them.
template <typename T>
struct Linear {
  uint64_t seed_m, seed_c;
  bool has_c;
  i64 n, D, j0, cols, k, C;
  const T* v;      // (C, k)
  T* W;            // (C, n, cols) or null
  const T* dW;     // (C, n, cols) or null
  float* scratch;  // per thread: `stride` floats, M's run then b's
  double* parts;   // per thread (C, k) partial sums of dv, when dW is given
  i64 run, stride;
};

constexpr i64 RUN = 4096;   // numbers of M drawn at a time (16 KiB): a run of elements next to their use

template <typename T>
TR_INLINE void linear_block(const Linear<T>& f, int thread, i64 begin, i64 end) {
  float* m = f.scratch + thread * f.stride;
  float* c = m + f.run * f.k + LANES;
  const i64 k = f.k, C = f.C;
  double* acc = f.dW ? f.parts + thread * C * k : nullptr;
  for (i64 e = begin; e < end;) {
    const i64 row = e / f.cols, col = e % f.cols, len = std::min({f.cols - col, end - e, f.run});
    const uint64_t element = uint64_t(row) * uint64_t(f.D) + uint64_t(f.j0 + col);
    for (i64 t = 0; t < len * k; t += LANES) {
      const f32v z = block(f.seed_m, element * uint64_t(k) + uint64_t(t), true);
      std::memcpy(m + t, &z, sizeof z);
    }
    if (f.W && f.has_c)
      for (i64 t = 0; t < len; t += LANES) {
        const f32v z = block(f.seed_c, element + uint64_t(t), true);
        std::memcpy(c + t, &z, sizeof z);
      }
    for (i64 ch = 0; ch < C; ++ch) {
      const T* v = f.v + ch * k;
      const i64 at = (ch * f.n + row) * f.cols + col;
      if (f.W) {
        T* out = f.W + at;
        for (i64 j = 0; j < len; ++j) {
          T s = 0;
          for (i64 q = 0; q < k; ++q) s += T(m[j * k + q]) * v[q];
          out[j] = f.has_c ? s + T(c[j]) : s;
        }
      }
      if (acc) {
        const T* g = f.dW + at;
        double* a = acc + ch * k;
        for (i64 j = 0; j < len; ++j)
          for (i64 q = 0; q < k; ++q) a[q] += double(g[j]) * double(m[j * k + q]);
      }
    }
    e += len;
  }
}

TR_CLONES void linear_f32(const void* ctx, int t, i64 begin, i64 end) {
  linear_block(*static_cast<const Linear<float>*>(ctx), t, begin, end);
}
TR_CLONES void linear_f64(const void* ctx, int t, i64 begin, i64 end) {
  linear_block(*static_cast<const Linear<double>*>(ctx), t, begin, end);
}

template <typename T>
int linear(int threads, Linear<T> f, T* dv, Task task) {
  const i64 numel = f.n * f.cols;
  const int n = split_count(threads, numel * f.k, MIN_NUMBERS_PER_THREAD);
  f.run = std::max<i64>(1, RUN / f.k);
  f.stride = (f.run * f.k + LANES) + (f.run + LANES);
  f.scratch = static_cast<float*>(std::malloc(size_t(n * f.stride) * sizeof(float)));
  f.parts = dv ? static_cast<double*>(std::calloc(size_t(n * f.C * f.k), sizeof(double))) : nullptr;
  if (!f.scratch || (dv && !f.parts)) {
    std::free(f.scratch);
    std::free(f.parts);
    return 2;
  }
  parallel(n, numel, 1, task, &f);
  if (dv)
    for (i64 i = 0; i < f.C * f.k; ++i) {
      double s = 0;
      for (int t = 0; t < n; ++t) s += f.parts[t * f.C * f.k + i];
      dv[i] += T(s);
    }
  std::free(f.scratch);
  std::free(f.parts);
  return 0;
}

}  // namespace

// out[i * cols + j] = number (start + i * stride + j) of the stream of seed, for i < rows, j < cols
// (a block of a larger row-major matrix): kind 0 uniform, 1 normal. threads: how many to use at
// most (the caller passes torch's setting).
TR_EXPORT int tinyrecon_cpu_philox_fill(int kind, int threads, i64 seed, i64 start, i64 rows, i64 cols, i64 stride,
                                        void* out) {
  if ((kind != 0 && kind != 1) || start < 0 || rows < 0 || cols < 0 || stride < 0 || (rows && cols && !out)) return 1;
  return launch(threads, {uint64_t(seed), uint64_t(start), static_cast<float*>(out), cols, stride, kind == 1,
                          nullptr, 0, cols, 0.0f}, rows);
}

// Masking (float32): out[i * out_stride + j] = src[i * src_stride + j] * (u < p), u the uniform
// number (start + i * stride + j), for i < rows, j < cols: a column block of w * mask in one pass.
TR_EXPORT int tinyrecon_cpu_philox_mask(int threads, i64 seed, i64 start, i64 rows, i64 cols, i64 stride, float p,
                                        const void* src, i64 src_stride, void* out, i64 out_stride) {
  if (start < 0 || rows < 0 || cols < 0 || stride < 0 || src_stride < 0 || out_stride < 0 ||
      (rows && cols && (!out || !src)))
    return 1;
  return launch(threads, {uint64_t(seed), uint64_t(start), static_cast<float*>(out), cols, stride, false,
                          static_cast<const float*>(src), src_stride, out_stride, p}, rows);
}

// The rows x cols mask (u < p) of seed, bit-packed: out is rows x ceil(cols / 64) uint64 words.
TR_EXPORT int tinyrecon_cpu_mask_bits(int threads, i64 seed, i64 rows, i64 cols, float p, void* out) {
  if (rows < 0 || cols < 0 || (rows && cols && !out)) return 1;
  const i64 words = (cols + 63) / 64, total = rows * words;
  const Bits b = {uint64_t(seed), cols, words, p, static_cast<uint64_t*>(out)};
  if (total) parallel(split_count(threads, total * 64, MIN_NUMBERS_PER_THREAD), total, 1, mask_bits, &b);
  return 0;
}

// out[i * out_stride + j] = src[i * src_stride + j] * bit(i, j0 + j) for i < rows, j < cols, bits
// as tinyrecon_cpu_mask_bits writes them (words per row); dtype 0 float32, 1 float64.
TR_EXPORT int tinyrecon_cpu_mask_apply(int dtype, int threads, const void* bits, i64 words, i64 j0, i64 rows,
                                       i64 cols, const void* src, i64 src_stride, void* out, i64 out_stride) {
  if ((dtype != 0 && dtype != 1) || words < 0 || j0 < 0 || rows < 0 || cols < 0 || j0 + cols > words * 64 ||
      src_stride < 0 || out_stride < 0 || (rows && cols && (!bits || !src || !out)))
    return 1;
  const i64 numel = rows * cols;
  if (!numel) return 0;
  const int n = split_count(threads, numel, MIN_NUMBERS_PER_THREAD * 4);
  const uint64_t* b = static_cast<const uint64_t*>(bits);
  if (dtype == 0) {
    const Apply<float> a = {b, words, j0, cols, static_cast<const float*>(src), src_stride, static_cast<float*>(out),
                            out_stride};
    parallel(n, numel, 16, apply_bits_f32, &a);
  } else {
    const Apply<double> a = {b, words, j0, cols, static_cast<const double*>(src), src_stride,
                             static_cast<double*>(out), out_stride};
    parallel(n, numel, 8, apply_bits_f64, &a);
  }
  return 0;
}

// Hypernets: columns [j0, j0 + cols) of W[c] = reshape(M @ v[c] (+ b), n, D) (M = N(0, 1) n*D x k of
// seed_m, b = N(0, 1) n*D of seed_c when has_c) into W (C, n, cols) when W is given, and
// dv[c, q] += sum_ij dW[c, i, j] M[i*D + j0 + j, q] when dW and dv are given; all contiguous, dtype
// 0 float32, 1 float64. Returns 2 when the per-thread sums find no memory.
TR_EXPORT int tinyrecon_cpu_random_linear(int dtype, int threads, i64 seed_m, int has_c, i64 seed_c, i64 n, i64 D,
                                          i64 j0, i64 cols, i64 k, i64 C, const void* v, void* W, const void* dW,
                                          void* dv) {
  if ((dtype != 0 && dtype != 1) || n < 0 || D < 0 || j0 < 0 || cols < 0 || j0 + cols > D || k < 1 || C < 0 ||
      (dW == nullptr) != (dv == nullptr) || (n && cols && C && (!v || (!W && !dW))))
    return 1;
  if (!n || !cols || !C) return 0;
  if (dtype == 0) {
    const Linear<float> f = {uint64_t(seed_m), uint64_t(seed_c), has_c != 0, n, D, j0, cols, k, C,
                             static_cast<const float*>(v), static_cast<float*>(W), static_cast<const float*>(dW),
                             nullptr, nullptr, 0, 0};
    return linear(threads, f, static_cast<float*>(dv), linear_f32);
  }
  const Linear<double> f = {uint64_t(seed_m), uint64_t(seed_c), has_c != 0, n, D, j0, cols, k, C,
                            static_cast<const double*>(v), static_cast<double*>(W), static_cast<const double*>(dW),
                            nullptr, nullptr, 0, 0};
  return linear(threads, f, static_cast<double*>(dv), linear_f64);
}
