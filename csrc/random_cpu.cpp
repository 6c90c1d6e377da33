// Counter-based random numbers on the CPU (tinyrecon/_random.py is the spec): Philox-4x32-10 keyed
// by the 64-bit seed with counter (k_lo, k_hi, 0, 0), Triton's uint->uniform map and, for normals,
// its Box-Muller transform on the first two output words.
//
// Philox runs on 8 counters per 64-byte vector, each 32-bit word in the low half of a 64-bit lane:
// a round is then one 32x32->64 multiply per word pair (the high halves carry don't-care bits that
// the multiply never reads). GCC does not emit that multiply from vector code (it multiplies all 64
// bits: three multiplies plus shifts and adds without AVX-512DQ), so it is an intrinsic, and the
// generator is compiled once per ISA level and picked through a pointer when the library loads (the
// TR_CLONES of the rest of the library cannot hold per-level intrinsics). Several vectors (32
// counters with AVX-512) go through each step side by side: their long dependency chains (ten
// multiplies, then log, sqrt and the polynomials) would otherwise leave the out-of-order core idle.
// Callers hand the generator whole runs of counters (a row of a fill, a mask word's 64).
// The uniform stage is integer arithmetic and one float32 multiply: bit-exact.
// The normal stage is defined in float64 and rounded once (float32 steps would inherit torch's
// own float32 log/sqrt/cos, which are not correctly rounded and differ between CPUs); log, cos and
// sin are polynomials fitted on their reduced ranges (approximation error ~1e-17, below float64
// rounding), so the result rounds as _random.py's does except within a few 1e-16 of a rounding
// boundary (then 1 ulp).
// Plain C ABI, loaded with ctypes; the entry point returns 0, or 1 for bad arguments.
#include <sys/mman.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cpu_common.h"

namespace {

using i64 = int64_t;
constexpr int LANES = 16;   // floats per 64-byte vector (the applies' tiles); Philox runs 8 counters per vector
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
constexpr int ROUNDS = 10;

template <typename To, typename From>
TR_INLINE To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To t;
  std::memcpy(&t, &v, sizeof t);
  return t;
}

// Per ISA level: mul, the 64-bit products of each lane's low 32 bits and b, and WIDE, the vectors
// of 8 counters that go side by side through the generator's main loop (as many as the registers
// hold: 4 in AVX-512's 32, fewer where a vector takes two or four registers).
struct Generic {
  static constexpr int WIDE = 1;
  static TR_INLINE u64h mul(u64h a, uint32_t b) { return (a & LO32) * uint64_t(b); }
};
#if defined(__x86_64__)
struct Avx2 {
  static constexpr int WIDE = 2;
  __attribute__((target("avx2"))) static inline u64h mul(u64h a, uint32_t b) {
    const __m256i c = _mm256_set1_epi64x(b);
    __m256i h[2];   // the vector's two registers (shuffles of the 64-byte vector cost 8x in GCC 12)
    std::memcpy(h, &a, sizeof a);
    h[0] = _mm256_mul_epu32(h[0], c), h[1] = _mm256_mul_epu32(h[1], c);
    std::memcpy(&a, h, sizeof a);
    return a;
  }
};
struct Avx512 {
  static constexpr int WIDE = 4;
  __attribute__((target("avx512f"))) static inline u64h mul(u64h a, uint32_t b) {
    // the all-lanes mask spelling: GCC 12's _mm512_mul_epu32 trips -Wmaybe-uninitialized
    return (u64h)_mm512_maskz_mul_epu32(0xFF, (__m512i)a, _mm512_set1_epi64(b));
  }
};
#endif

// The round keys of a seed: (k0, k1) + r (KEY_A, KEY_B) for round r.
struct Keys {
  uint32_t k0[ROUNDS], k1[ROUNDS];
  explicit Keys(uint64_t seed) {
    for (int r = 0; r < ROUNDS; ++r)
      k0[r] = uint32_t(seed) + uint32_t(r) * KEY_A, k1[r] = uint32_t(seed >> 32) + uint32_t(r) * KEY_B;
  }
};

// First two Philox-4x32-10 words (r0, r1: low halves of the lanes) for the 8 H counters base + 0..8H-1.
// The first round's c2 and c3 are zero (its B product is 0) and the last round's A product feeds
// only words not returned: two of the twenty multiplies are left out.
template <class Isa, int H>
TR_INLINE void philox(const Keys& k, uint64_t base, u64h (&r0)[H], u64h (&r1)[H]) {
  u64h c0[H], c1[H], c2[H], c3[H];
  for (int h = 0; h < H; ++h) {
    const u64h counter = base + uint64_t(8 * h) + u64h{0, 1, 2, 3, 4, 5, 6, 7};
    const u64h pa = Isa::mul(counter, ROUND_A);
    c0[h] = (counter >> 32) ^ k.k0[0];
    c1[h] = u64h{};
    c2[h] = (pa >> 32) ^ k.k1[0];
    c3[h] = pa;
  }
  for (int r = 1; r < ROUNDS - 1; ++r)
    for (int h = 0; h < H; ++h) {
      const u64h pb = Isa::mul(c2[h], ROUND_B), pa = Isa::mul(c0[h], ROUND_A);
      c0[h] = (pb >> 32) ^ c1[h] ^ k.k0[r];
      c1[h] = pb;
      c2[h] = (pa >> 32) ^ c3[h] ^ k.k1[r];
      c3[h] = pa;
    }
  for (int h = 0; h < H; ++h) {
    const u64h pb = Isa::mul(c2[h], ROUND_B);
    r0[h] = (pb >> 32) ^ c1[h] ^ k.k0[ROUNDS - 1];
    r1[h] = pb;
  }
}

// Triton's uint_to_uniform_float: the word as int32, negatives mapped to ~s, times 2^-31 (rounded).
TR_INLINE f32h uniform(u64h u) {
  i32h s = __builtin_convertvector(u, i32h);   // the low 32 bits
  s ^= s >> 31;                                // ~s for negative s
  return __builtin_convertvector(s, f32h) * 4.6566127342e-10f;
}

// -2 log(u) in double for 8 H float32 u > 0 (normal numbers): u = m * 2^e with m in [sqrt(1/2),
// sqrt(2)), log(m) = 2 atanh(s) = 2 s P(s^2), s = (m - 1) / (m + 1), |s| < 0.172. P = 1 + y Q(y) on
// y = s^2 in [0, 0.0295], Q interpolated in Chebyshev nodes (mpmath.chebyfit, 7 nodes): relative
// error 4e-18 in atanh (the Taylor series needs two terms more for 1e-15). The -2 and the 2 are
// folded into the coefficients (exact).
template <int H>
TR_INLINE void minus_two_log(const f32h (&u)[H], f64h (&out)[H]) {
  static constexpr double P[] = {0.07309671726756307, 0.07665743617932867, 0.09091448091741543, 0.11111105518908294,
                                 0.14285714313285103, 0.19999999999949095, 0.3333333333333335,  1.0};
  f64h s[H], s2[H], p[H];
  for (int h = 0; h < H; ++h) {
    const i32h bits = bitcast<i32h>(u[h]);
    i32h e = ((bits >> 23) & 0xff) - 127;
    f32h m = bitcast<f32h>((bits & 0x7fffff) | 0x3f800000);
    const i32h big = m > 1.41421356f;   // all ones where m is above sqrt(2)
    m = big ? m * 0.5f : m;
    e -= big;
    const f64h md = __builtin_convertvector(m, f64h);
    s[h] = (md - 1.0) / (md + 1.0), s2[h] = s[h] * s[h], p[h] = f64h{} + -4.0 * P[0];
    out[h] = __builtin_convertvector(e, f64h) * (-2.0 * 0.69314718055994530942);
  }
  for (int j = 1; j < 8; ++j)
    for (int h = 0; h < H; ++h) p[h] = p[h] * s2[h] + -4.0 * P[j];
  for (int h = 0; h < H; ++h) out[h] += s[h] * p[h];
}

// cos(t) in double for 8 H t in [0, 8): t = k pi/2 + x, |x| <= pi/4, with pi/2 in two parts whose
// first has 33 bits (k pi/2 is exact to ~1e-26 for k <= 5), then cos x = 1 - y/2 + y^2 C(y) or
// sin x = x (1 + y S(y)), y = x^2 in [0, 0.62], C and S interpolated in Chebyshev nodes
// (mpmath.chebyfit, 6 nodes each): relative error 1e-18 and 2e-17 (the Taylor series needs a term
// more each).
template <int H>
TR_INLINE void cos_f64(f64h (&t)[H]) {
  static constexpr double C[] = {-1.138218421447753e-11,  2.0876140031390975e-09, -2.755731724172776e-07,
                                 2.48015872987077e-05,    -0.0013888888888887359, 0.041666666666666664,
                                 -0.5,                    1.0};
  static constexpr double S[] = {1.5917412836707387e-10, -2.5051121875169608e-08, 2.755731605459391e-06,
                                 -0.0001984126983666588, 0.008333333333330887,    -0.16666666666666666};
  const double shifter = 6755399441055744.0;   // 1.5 * 2^52: adding it rounds to an integer
  f64h x[H], x2[H], c[H], s[H];
  i64h q[H];
  for (int h = 0; h < H; ++h) {
    const f64h kr = t[h] * 0.63661977236758134308 + shifter;
    q[h] = bitcast<i64h>(kr) & 3;   // k mod 4, from the low mantissa bits
    const f64h k = kr - shifter;
    x[h] = (t[h] - k * 1.57079632673412561417) - k * 6.07710050650619224932e-11, x2[h] = x[h] * x[h];
    c[h] = f64h{} + C[0], s[h] = f64h{} + S[0];
  }
  for (int j = 1; j < 8; ++j)
    for (int h = 0; h < H; ++h) {
      c[h] = c[h] * x2[h] + C[j];
      if (j < 6) s[h] = s[h] * x2[h] + S[j];
    }
  for (int h = 0; h < H; ++h) {
    s[h] = x[h] + x[h] * x2[h] * s[h];   // sin x
    // cos(x + k pi/2) = cos x, -sin x, -cos x, sin x for k = 0, 1, 2, 3 (mod 4): selected and
    // negated with bit operations (compilers turn vector compares of 64-bit lanes into scalar code)
    const i64h odd = -(q[h] & 1), sign = ((q[h] + 1) & 2) << 62;
    t[h] = bitcast<f64h>(((bitcast<i64h>(s[h]) & odd) | (bitcast<i64h>(c[h]) & ~odd)) ^ sign);
  }
}

// 8 H numbers for counters base + 0..8H-1 into out: U[0, 1), or N(0, 1) by Box-Muller,
// sqrt(-2 log u1) cos(2 pi u2) in double, rounded once.
template <class Isa, bool NORMAL, int H>
TR_INLINE void numbers(const Keys& k, uint64_t base, float* out) {
  u64h r0[H], r1[H];
  philox<Isa, H>(k, base, r0, r1);
  f32h z[H];
  if (!NORMAL) {
    for (int h = 0; h < H; ++h) z[h] = uniform(r0[h]);
  } else {
    f32h u1[H];
    f64h r2[H], t[H];
    for (int h = 0; h < H; ++h) {
      u1[h] = uniform(r0[h]);
      u1[h] = u1[h] < 1.0e-7f ? 1.0e-7f : u1[h];
      t[h] = __builtin_convertvector(uniform(r1[h]), f64h) * 6.283185307179586;
    }
    minus_two_log(u1, r2);
    cos_f64(t);
    for (int h = 0; h < H; ++h) {
      f64h r;
      for (int l = 0; l < 8; ++l) r[l] = __builtin_sqrt(r2[h][l]);   // one vector square root
      z[h] = __builtin_convertvector(r * t[h], f32h);
    }
  }
  std::memcpy(out, z, sizeof z);
}

// out[i] = number start + i of seed's stream for i < n: uniform, or normal.
template <class Isa, bool NORMAL>
TR_INLINE void generate_run(uint64_t seed, uint64_t start, float* out, i64 n) {
  const Keys k(seed);
  i64 i = 0;
  constexpr int W = Isa::WIDE;
  for (; i + 8 * W <= n; i += 8 * W) numbers<Isa, NORMAL, W>(k, start + uint64_t(i), out + i);
  for (; W > 2 && i + 16 <= n; i += 16) numbers<Isa, NORMAL, 2>(k, start + uint64_t(i), out + i);
  for (; i + 8 <= n; i += 8) numbers<Isa, NORMAL, 1>(k, start + uint64_t(i), out + i);
  if (i < n) {
    float last[8];
    numbers<Isa, NORMAL, 1>(k, start + uint64_t(i), last);
    std::memcpy(out + i, last, sizeof(float) * size_t(n - i));
  }
}

template <class Isa>
TR_INLINE void generate_isa(uint64_t seed, uint64_t start, bool normal, float* out, i64 n) {
  if (normal)
    generate_run<Isa, true>(seed, start, out, n);
  else
    generate_run<Isa, false>(seed, start, out, n);
}

typedef void (*Generate)(uint64_t seed, uint64_t start, bool normal, float* out, i64 n);

// One generator per ISA level where the library has clones (TR_HAS_CLONES), picked by the CPU;
// else the build's own level (the tests build each).
// flatten inlines the level's multiply here, where the target allows it (always_inline would try
// it inside philox's own body first, compiled for the baseline, and fail).
#ifdef TR_HAS_CLONES
__attribute__((target("avx512f"), flatten)) void generate_avx512(uint64_t seed, uint64_t start, bool normal,
                                                                 float* out, i64 n) {
  generate_isa<Avx512>(seed, start, normal, out, n);
}
__attribute__((target("avx2"), flatten)) void generate_avx2(uint64_t seed, uint64_t start, bool normal, float* out,
                                                            i64 n) {
  generate_isa<Avx2>(seed, start, normal, out, n);
}
void generate_default(uint64_t seed, uint64_t start, bool normal, float* out, i64 n) {
  generate_isa<Generic>(seed, start, normal, out, n);
}
Generate pick_generate() {
  __builtin_cpu_init();   // this runs while the library loads, maybe before libgcc's own constructor
  return __builtin_cpu_supports("avx512f") ? generate_avx512
         : __builtin_cpu_supports("avx2")  ? generate_avx2
                                           : generate_default;
}
const Generate generate = pick_generate();
#else
void generate(uint64_t seed, uint64_t start, bool normal, float* out, i64 n) {
#if defined(__x86_64__) && defined(__AVX512F__)
  generate_isa<Avx512>(seed, start, normal, out, n);
#elif defined(__x86_64__) && defined(__AVX2__)
  generate_isa<Avx2>(seed, start, normal, out, n);
#else
  generate_isa<Generic>(seed, start, normal, out, n);
#endif
}
#endif

// ---- threads ------------------------------------------------------------------------------------
constexpr int MAX_THREADS = 64;

// fn(ctx, thread, begin, end) over [0, total) split in at most `threads` ranges of whole `align`s,
// each at least min_per_thread long (below that, starting a thread costs more than it saves).
typedef void (*Task)(const void* ctx, int thread, i64 begin, i64 end);

struct Range {
  Task fn;
  const void* ctx;
  i64 total, per;
};

void run_range(void* range, int t) {
  const Range& r = *static_cast<Range*>(range);
  r.fn(r.ctx, t, std::min(r.total, t * r.per), std::min(r.total, (t + 1) * r.per));
}

int split_count(int threads, i64 total, i64 min_per_thread) {
  return int(std::max<i64>(1, std::min<i64>({threads, MAX_THREADS, total / std::max<i64>(1, min_per_thread)})));
}

void parallel(int n, i64 total, i64 align, Task fn, const void* ctx) {
  Range r{fn, ctx, total, (total / n + align - 1) / align * align};
  tr_threads::run_tasks(n, run_range, &r);
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

// Elements e in [begin, end) of the rows x cols block: row e / cols, column e % cols.
TR_CLONES void fill(const void* ctx, int, i64 begin, i64 end) {
  const Fill& f = *static_cast<const Fill*>(ctx);
  constexpr i64 CHUNK = 256;   // masking: numbers drawn per pass over src
  for (i64 e = begin; e < end;) {
    const i64 row = e / f.cols, col = e % f.cols, len = std::min(f.cols - col, end - e);
    const uint64_t counter = f.start + uint64_t(row) * uint64_t(f.stride) + uint64_t(col);
    float* out = f.out + row * f.out_stride + col;
    if (!f.src) {
      generate(f.seed, counter, f.normal, out, len);
    } else {
      const float* src = f.src + row * f.src_stride + col;
      for (i64 i = 0; i < len; i += CHUNK) {
        float u[CHUNK];
        const i64 m = std::min(CHUNK, len - i);
        generate(f.seed, counter + uint64_t(i), f.normal, u, m);
        // src * 1 or src * 0, as the reference's w * mask (so inf and nan propagate alike)
        for (i64 l = 0; l < m; ++l) out[i + l] = src[i + l] * (u[l] < f.p ? 1.0f : 0.0f);
      }
    }
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
    float u[64];
    generate(b.seed, counter, false, u, valid);
    std::fill(u + valid, u + 64, 0.0f);   // bits past valid are masked off below
    uint64_t word = 0;
    for (int s = 0; s * LANES < valid; ++s) {
      f32v v;
      std::memcpy(&v, u + s * LANES, sizeof v);
      const u32v set = (u32v)(v < b.p) & weight;
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

// ---- masked GEMMs (masking, float32) -------------------------------------------------------------
// y = x @ (w * M)^T, dx = g @ (w * M) and dw = (g^T @ x) * M with M read from the bit-packed mask
// right where the GEMM consumes or produces a tile: w, x and dw each cross memory once, and no
// masked copy of w is written. Tiles are 4 x 4 (or 4 x 64 columns) of 16-lane accumulators.
const u32v WEIGHT16 = {1u << 0, 1u << 1, 1u << 2,  1u << 3,  1u << 4,  1u << 5,  1u << 6,  1u << 7,
                       1u << 8, 1u << 9, 1u << 10, 1u << 11, 1u << 12, 1u << 13, 1u << 14, 1u << 15};

// 1.0f or 0.0f for the 16 mask bits of row `bits` from column b on.
TR_INLINE f32v mask16(const uint64_t* bits, i64 words, i64 b) {
  if (!words) return f32v{} + 1.0f;   // no mask: the plain GEMMs (the hypernets' blocks)
  const i64 q = b >> 6, r = b & 63;
  uint64_t w = bits[q] >> r;
  if (r > 48 && q + 1 < words) w |= bits[q + 1] << (64 - r);
  return ((u32v{} + uint32_t(w)) & WEIGHT16) != 0 ? f32v{} + 1.0f : f32v{};
}

TR_INLINE f32v load16(const float* p, i64 len) {
  f32v v = {};
  if (len >= LANES)
    std::memcpy(&v, p, sizeof v);
  else
    for (i64 l = 0; l < len; ++l) v[l] = p[l];
  return v;
}

TR_INLINE void store16(float* p, f32v v, i64 len) {
  if (len >= LANES)
    std::memcpy(p, &v, sizeof v);
  else
    for (i64 l = 0; l < len; ++l) p[l] = v[l];
}

// Stores of outputs written once and not read again soon (dx, dw: 157 MB each at the MNIST layer)
// bypass the cache: a plain store first reads the line it writes, doubling the memory traffic of
// the pass. SSE's streaming store (VEX-encoded in the AVX clones), where the address allows.
TR_INLINE void store16_stream(float* p, f32v v, i64 len) {
#if defined(__x86_64__)
  if (len >= LANES && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
    for (int q = 0; q < 4; ++q) _mm_stream_ps(p + 4 * q, _mm_loadu_ps(reinterpret_cast<const float*>(&v) + 4 * q));
    return;
  }
#endif
  store16(p, v, len);
}

TR_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();   // streaming stores are weakly ordered: make them visible before the thread ends
#endif
}

// Asks Linux for transparent huge pages behind an output about to be written whole (dx, dw): a
// fresh 157 MB gradient otherwise takes ~40,000 page faults, which cost about as much as the GEMM
// filling it (measured at the MNIST layer: masking's backward 385 ms -> 262 ms). Only the 2 MiB-
// aligned interior; the kernel falls back to small pages when it has no huge ones.
void hint_huge_pages(void* p, i64 bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t HUGE = uintptr_t(1) << 21;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + HUGE - 1) & ~(HUGE - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(HUGE - 1);
  if (bytes >= i64(4 * HUGE) && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

constexpr i64 KC = 512;   // forward: columns per chunk; x's and w's chunks (64 rows each) stay in L2
constexpr i64 TILE = 64;  // backward: columns per tile (4 vectors)

struct Masked {
  const uint64_t* bits;
  i64 words, j0, N, n, N4, n4;   // the block's column c is the mask's column j0 + c
  const float* x;
  i64 x_stride;
  const float* w;   // forward and dx
  i64 w_stride;
  const float* gp;  // dx: g (N4 x n4, zero padded); dw: g^T (n4 x N4, zero padded)
  float* out;       // dx (N x D) or dw (n x D) rows of out_stride; forward: per-thread partials
  i64 out_stride;
  bool accumulate;  // dx: add to out
  float* scratch;   // per thread: scratch_stride floats
  i64 scratch_stride;
};

// The micro-kernels the masked GEMMs and the random linear GEMMs share.
// Forward: acc (N4 x n4 vectors) += xs (N4 rows) * ws (n4 rows, those of [it0, it1) read) lane by
// lane over `steps` vectors of each row (rows KC apart); 4 x 4 tiles of 16-lane accumulators, reduced
// across lanes at the end. prefetch(tile, tiles) runs before each of the tiles of a row block: a
// caller's reads for what comes next, spread over this arithmetic.
template <typename Prefetch>
TR_INLINE void chunk_product(f32v* acc, const float* xs, const float* ws, i64 N4, i64 n4, i64 steps, i64 it0,
                             i64 it1, Prefetch prefetch) {
  for (i64 it = it0; it < it1; it += 4)
    for (i64 bt = 0; bt < N4; bt += 4) {
      prefetch(bt / 4, N4 / 4);
      f32v s[4][4];
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) s[r][c] = acc[(bt + r) * n4 + it + c];
      for (i64 t = 0; t < steps * LANES; t += LANES) {
        f32v xv[4], wv[4];
        for (int r = 0; r < 4; ++r) std::memcpy(&xv[r], xs + (bt + r) * KC + t, sizeof(f32v));
        for (int c = 0; c < 4; ++c) std::memcpy(&wv[c], ws + (it + c) * KC + t, sizeof(f32v));
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) s[r][c] += xv[r] * wv[c];
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) acc[(bt + r) * n4 + it + c] = s[r][c];
    }
}

// y (N x n) = the lane sums of acc (N4 x n4 vectors).
TR_INLINE void lane_sums(const f32v* acc, i64 N, i64 n, i64 n4, float* y) {
  for (i64 b = 0; b < N; ++b)
    for (i64 i = 0; i < n; ++i) {
      const f32v v = acc[b * n4 + i];
      float t = 0;
      for (int l = 0; l < LANES; ++l) t += v[l];
      y[b * n + i] = t;
    }
}

// `vectors` vectors of each of x's rows (the first len numbers, zeros after) into xs (rows xs_stride apart).
TR_INLINE void pack_rows(float* xs, i64 xs_stride, const float* x, i64 x_stride, i64 rows, i64 len, i64 vectors) {
  for (i64 b = 0; b < rows; ++b)
    for (i64 t = 0; t < vectors; ++t) {
      const f32v v = load16(x + b * x_stride + t * LANES, len - t * LANES);
      std::memcpy(xs + b * xs_stride + t * LANES, &v, sizeof v);
    }
}

// Backward: s[r][v] = sum_{d < depth} a[r * lda + d] * src[d * TILE + 16 v] for r, v < 4: four rows of
// a, broadcast, against a TILE-wide panel of src (dx = g @ W: a = g, src = W's tile; dW = g^T @ x:
// a = g^T, src = x's tile).
struct Tile {
  f32v s[4][4];
};

TR_INLINE Tile tile_product(const float* a, i64 lda, const float* src, i64 depth) {
  Tile o = {};
  for (i64 d = 0; d < depth; ++d) {
    f32v sv[4];
    for (int v = 0; v < 4; ++v) std::memcpy(&sv[v], src + d * TILE + v * LANES, sizeof(f32v));
    for (int r = 0; r < 4; ++r) {
      const f32v ab = f32v{} + a[r * lda + d];
      for (int v = 0; v < 4; ++v) o.s[r][v] += ab * sv[v];
    }
  }
  return o;
}

// Forward over columns [begin, end): per-thread y partial (N x n) summed by the caller.
TR_CLONES void masked_forward(const void* ctx, int thread, i64 begin, i64 end) {
  const Masked& a = *static_cast<const Masked*>(ctx);
  float* base = a.scratch + thread * a.scratch_stride;
  f32v* acc = reinterpret_cast<f32v*>(base);   // N4 x n4 vectors
  float* xs = base + a.N4 * a.n4 * LANES;      // N4 x KC
  float* ws = xs + a.N4 * KC;                  // n4 x KC
  std::memset(base, 0, sizeof(float) * size_t(a.scratch_stride));
  for (i64 c0 = begin; c0 < end; c0 += KC) {
    const i64 len = std::min(KC, end - c0), steps = (len + LANES - 1) / LANES;
    pack_rows(xs, KC, a.x + c0, a.x_stride, a.N, len, steps);
    for (i64 i = 0; i < a.n; ++i)
      for (i64 t = 0; t < steps; ++t) {
        const f32v v = load16(a.w + i * a.w_stride + c0 + t * LANES, len - t * LANES) *
                       mask16(a.bits + i * a.words, a.words, a.j0 + c0 + t * LANES);
        std::memcpy(ws + i * KC + t * LANES, &v, sizeof v);
      }
    chunk_product(acc, xs, ws, a.N4, a.n4, steps, 0, a.n4, [](i64, i64) {});
  }
  lane_sums(acc, a.N, a.n, a.n4, a.out + thread * a.N * a.n);
}

// dx[:, cols] (+)= g @ (w * M)[:, cols] over column tiles [begin, end).
TR_CLONES void masked_dx(const void* ctx, int thread, i64 begin, i64 end) {
  const Masked& a = *static_cast<const Masked*>(ctx);
  float* ws = a.scratch + thread * a.scratch_stride;   // n x TILE
  for (i64 j = begin; j < end; j += TILE) {
    const i64 len = std::min(TILE, end - j);
    for (i64 i = 0; i < a.n; ++i)
      for (int v = 0; v < 4; ++v) {
        const f32v m = v * LANES < len ? load16(a.w + i * a.w_stride + j + v * LANES, len - v * LANES) *
                                             mask16(a.bits + i * a.words, a.words, a.j0 + j + v * LANES)
                                       : f32v{};
        std::memcpy(ws + i * TILE + v * LANES, &m, sizeof m);
      }
    for (i64 bt = 0; bt < a.N; bt += 4) {
      const Tile t = tile_product(a.gp + bt * a.n4, a.n4, ws, a.n);
      for (int r = 0; r < 4 && bt + r < a.N; ++r) {
        float* o = a.out + (bt + r) * a.out_stride + j;
        for (int v = 0; v < 4 && v * LANES < len; ++v) {
          if (a.accumulate)
            store16(o + v * LANES, load16(o + v * LANES, len - v * LANES) + t.s[r][v], len - v * LANES);
          else
            store16_stream(o + v * LANES, t.s[r][v], len - v * LANES);
        }
      }
    }
  }
  stream_fence();
}

// dw[:, cols] = (g^T @ x)[:, cols] * M over column tiles [begin, end).
TR_CLONES void masked_dw(const void* ctx, int thread, i64 begin, i64 end) {
  const Masked& a = *static_cast<const Masked*>(ctx);
  float* xs = a.scratch + thread * a.scratch_stride;   // N x TILE
  for (i64 j = begin; j < end; j += TILE) {
    const i64 len = std::min(TILE, end - j);
    pack_rows(xs, TILE, a.x + j, a.x_stride, a.N, len, TILE / LANES);
    for (i64 it = 0; it < a.n; it += 4) {
      const Tile t = tile_product(a.gp + it * a.N4, a.N4, xs, a.N);
      for (int r = 0; r < 4 && it + r < a.n; ++r) {
        float* o = a.out + (it + r) * a.out_stride + j;
        for (int v = 0; v < 4 && v * LANES < len; ++v)
          store16_stream(o + v * LANES,
                         t.s[r][v] * mask16(a.bits + (it + r) * a.words, a.words, a.j0 + j + v * LANES),
                         len - v * LANES);
      }
    }
  }
  stream_fence();
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
  const float* const* m_rows;   // M's rows i*D .. i*D + D - 1 (each D x k) where a cache keeps them, else null
  const float* const* c_rows;   // b's likewise (each D)
  float* scratch;  // per thread: `stride` floats, M's run then b's
  double* parts;   // per thread (C, k) partial sums of dv, when dW is given
  i64 run, stride;
};

constexpr i64 RUN = 4096;   // numbers of M drawn at a time (16 KiB): a run of elements next to their use

// out[j] = sum_q m[j k + q] v[q] (+ c[j]): K > 0 the rank known at compile time (the compiler then
// vectorizes the interleaved reads), 0 any rank k.
template <typename T, int K>
TR_INLINE void contract(T* out, const float* m, i64 k, const T* v, const float* c, i64 len) {
  const i64 kk = K ? K : k;
  for (i64 j = 0; j < len; ++j) {
    T s = 0;
    for (i64 q = 0; q < kk; ++q) s += T(m[j * kk + q]) * v[q];
    out[j] = c ? s + T(c[j]) : s;
  }
}

// a[q] += sum_j g[j] m[j k + q], in double.
template <typename T, int K>
TR_INLINE void accumulate(double* a, const float* m, i64 k, const T* g, i64 len) {
  const i64 kk = K ? K : k;
  if (K == 0) {
    for (i64 j = 0; j < len; ++j)
      for (i64 q = 0; q < kk; ++q) a[q] += double(g[j]) * double(m[j * kk + q]);
    return;
  }
  double s[4][K ? K : 1] = {};   // four interleaved partial sums per q, so the loop runs four chains wide
  i64 j = 0;
  for (; j + 4 <= len; j += 4)
    for (int u = 0; u < 4; ++u)
      for (i64 q = 0; q < kk; ++q) s[u][q] += double(g[j + u]) * double(m[(j + u) * kk + q]);
  for (; j < len; ++j)
    for (i64 q = 0; q < kk; ++q) s[0][q] += double(g[j]) * double(m[j * kk + q]);
  for (i64 q = 0; q < kk; ++q) a[q] += (s[0][q] + s[1][q]) + (s[2][q] + s[3][q]);
}

template <typename T, int K>
TR_INLINE void linear_block(const Linear<T>& f, int thread, i64 begin, i64 end) {
  float* m = f.scratch + thread * f.stride;
  float* c = m + f.run * f.k + LANES;
  const i64 k = f.k, C = f.C;
  double* acc = f.dW ? f.parts + thread * C * k : nullptr;
  for (i64 e = begin; e < end;) {
    const i64 row = e / f.cols, col = e % f.cols, len = std::min({f.cols - col, end - e, f.run});
    const uint64_t element = uint64_t(row) * uint64_t(f.D) + uint64_t(f.j0 + col);
    const float* mr = f.m_rows ? f.m_rows[row] + (f.j0 + col) * k : m;
    const float* cr = f.c_rows ? f.c_rows[row] + f.j0 + col : c;
    if (!f.m_rows) generate(f.seed_m, element * uint64_t(k), true, m, len * k);
    if (f.W && f.has_c && !f.c_rows) generate(f.seed_c, element, true, c, len);
    for (i64 ch = 0; ch < C; ++ch) {
      const T* v = f.v + ch * k;
      const i64 at = (ch * f.n + row) * f.cols + col;
      if (f.W) contract<T, K>(f.W + at, mr, k, v, f.has_c ? cr : nullptr, len);
      if (acc) accumulate<T, K>(acc + ch * k, mr, k, f.dW + at, len);
    }
    e += len;
  }
}

template <typename T>
TR_INLINE void linear_any(const Linear<T>& f, int t, i64 begin, i64 end) {
  switch (f.k) {   // the ranks used most (tinyBIG's r=2, the benchmark's r=5), unrolled
    case 1: return linear_block<T, 1>(f, t, begin, end);
    case 2: return linear_block<T, 2>(f, t, begin, end);
    case 3: return linear_block<T, 3>(f, t, begin, end);
    case 4: return linear_block<T, 4>(f, t, begin, end);
    case 5: return linear_block<T, 5>(f, t, begin, end);
    case 8: return linear_block<T, 8>(f, t, begin, end);
    default: return linear_block<T, 0>(f, t, begin, end);
  }
}

TR_CLONES void linear_f32(const void* ctx, int t, i64 begin, i64 end) {
  linear_any(*static_cast<const Linear<float>*>(ctx), t, begin, end);
}
TR_CLONES void linear_f64(const void* ctx, int t, i64 begin, i64 end) {
  linear_any(*static_cast<const Linear<double>*>(ctx), t, begin, end);
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

// ---- random linear GEMMs (hypernets, float32, rank k <= MAX_K) ----------------------------------
// y = x @ W[c]^T, dx = sum_c g[c] @ W[c] and dv[c] = sum_ij (g[c]^T x)_ij M[i*D + j, :] with the tiles
// of W[c] = reshape(M @ v[c] (+ b), n, D) formed from M's rows inside the GEMM's loop, into the
// scratch its micro-kernel reads: W never goes to memory, and x, M and dx cross it once per pass.
// Each run of a row of M (k numbers a column, interleaved, as the cache keeps it for every backend)
// is first split by rank in L1 (column j's q-th number at q * cap + j), so 16 columns of W are k
// FMAs on plain loads (sum_q v[q] G_q), and dv's terms dW * G_q the same loads.
constexpr int MAX_K = 8;

// For splitting 16 columns (k vectors of 16 numbers): the q-th numbers come from the vector pair
// (2p, 2p + 1) at index idx[q][p][l] (of 32) into the lanes l of pick[q][p].
struct SplitTables {
  int32_t idx[MAX_K][MAX_K / 2][LANES];
  uint32_t pick[MAX_K][MAX_K / 2];
};

SplitTables split_tables(i64 k) {
  SplitTables s = {};
  for (i64 q = 0; q < k; ++q)
    for (int l = 0; l < LANES; ++l) {
      const i64 e = k * l + q, p = e / (2 * LANES);
      s.idx[q][p][l] = int32_t(e % (2 * LANES));
      s.pick[q][p] |= 1u << l;
    }
  return s;
}

// out[q * cap + j] = m[j * k + q] for j < len, q < k.
void split_scalar(const float* m, i64 len, i64 k, float* out, i64 cap, const SplitTables&) {
  for (i64 j = 0; j < len; ++j)
    for (i64 q = 0; q < k; ++q) out[q * cap + j] = m[j * k + q];
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same with AVX-512's two-register permutes, merged by lane masks.
__attribute__((target("avx512f"))) void split_avx512(const float* m, i64 len, i64 k, float* out, i64 cap,
                                                     const SplitTables& s) {
  const i64 pairs = (k + 1) / 2;
  i64 j = 0;
  for (; j + LANES <= len; j += LANES) {
    __m512 a[MAX_K + 1];
    for (i64 t = 0; t < k; ++t) a[t] = _mm512_loadu_ps(m + j * k + t * LANES);
    a[k] = _mm512_setzero_ps();
    for (i64 q = 0; q < k; ++q) {
      __m512 g = _mm512_permutex2var_ps(a[0], _mm512_loadu_si512(s.idx[q][0]), a[1]);
      for (i64 p = 1; p < pairs; ++p)
        g = _mm512_mask_blend_ps(__mmask16(s.pick[q][p]), g,
                                 _mm512_permutex2var_ps(a[2 * p], _mm512_loadu_si512(s.idx[q][p]), a[2 * p + 1]));
      _mm512_storeu_ps(out + q * cap + j, g);
    }
  }
  split_scalar(m + j * k, len - j, k, out + j, cap, s);
}
#endif

typedef void (*SplitFn)(const float*, i64, i64, float*, i64, const SplitTables&);

SplitFn pick_split() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx512f")) return split_avx512;
#endif
  return split_scalar;
}

struct Fused {
  uint64_t seed_m, seed_c;
  bool has_c;
  i64 N, n, D, j0, k, C, N4, n4;
  const float* v;                       // (C, k)
  const float* x;                       // N x D, row stride x_stride
  i64 x_stride;
  const float* gt;                      // dv: g[c]^T, (C, n4, N4) zero padded
  const float* gx;                      // dx: (N4, C*n) with gx[b, c*n + i] = g[c, b, i], zero padded
  float* out;                           // forward: per-thread y partials (C, N, n); backward: dx or null
  i64 out_stride;
  double* parts;                        // per thread (C, k) partial sums of dv, or null
  const float* const* m_rows;           // as in Linear
  const float* const* c_rows;
  SplitFn split;
  SplitTables tables;
  float* scratch;
  i64 scratch_stride;
};

// M's rows i*D + col .. + len - 1 split by rank: G_q's numbers at m + q * ld (ld = cap). Read from
// the cache's rows, else drawn into buf.
struct Run {
  const float* m;
  i64 ld;
};

TR_INLINE Run m_run(const Fused& f, float* buf, float* split, i64 cap, i64 i, i64 col, i64 len) {
  const float* m = f.m_rows ? f.m_rows[i] + col * f.k : buf;
  const uint64_t start = (uint64_t(i) * uint64_t(f.D) + uint64_t(col)) * uint64_t(f.k);
  if (!f.m_rows) generate(f.seed_m, start, true, buf, len * f.k);
  f.split(m, len, f.k, split, cap, f.tables);
  return {split, cap};
}

// b's numbers i*D + col .. + len - 1 likewise; null without b.
TR_INLINE const float* c_run(const Fused& f, float* buf, i64 i, i64 col, i64 len) {
  if (!f.has_c) return nullptr;
  if (f.c_rows) return f.c_rows[i] + col;
  const uint64_t start = uint64_t(i) * uint64_t(f.D) + uint64_t(col);
  generate(f.seed_c, start, true, buf, len);
  return buf;
}

// W[ch]'s vector from G (+ b's vector cv).
template <int K>
TR_INLINE f32v w_vector(const f32v G[K], const float* v, f32v cv) {
  for (int q = 0; q < K; ++q) cv += v[q] * G[q];
  return cv;
}

// Forward over columns [begin, end): per chunk of KC columns, x's chunk and W's (all n rows, every
// channel) are packed, then the chunk GEMM; per-thread y partials (C, N, n) summed by the caller.
template <int K>
TR_INLINE void fused_forward(const Fused& f, int thread, i64 begin, i64 end) {
  const i64 C = f.C, N4 = f.N4, n4 = f.n4;
  float* base = f.scratch + thread * f.scratch_stride;
  f32v* acc = reinterpret_cast<f32v*>(base);   // C x N4 x n4 vectors
  float* xs = base + C * N4 * n4 * LANES;      // N4 x KC
  float* ws = xs + N4 * KC;                    // C x n4 x KC
  float* mb = ws + C * n4 * KC;                // KC * K (+ LANES) drawn numbers of M
  float* ms = mb + KC * K + LANES;             // K x KC: them split
  float* cb = ms + KC * K;                     // KC (+ LANES) of b
  std::memset(base, 0, sizeof(float) * size_t(f.scratch_stride));
  for (i64 c0 = begin; c0 < end; c0 += KC) {
    const i64 len = std::min(KC, end - c0), steps = (len + LANES - 1) / LANES;
    pack_rows(xs, KC, f.x + c0, f.x_stride, f.N, len, steps);
    for (i64 it = 0; it < n4; it += 4) {   // W's rows four at a time, each block's GEMM right after
      for (i64 i = it; i < std::min(it + 4, f.n); ++i) {
        const Run m = m_run(f, mb, ms, KC, i, f.j0 + c0, len);
        const float* c = c_run(f, cb, i, f.j0 + c0, len);
        for (i64 t = 0; t < steps; ++t) {
          f32v G[K];
          for (int q = 0; q < K; ++q) G[q] = load16(m.m + q * m.ld + t * LANES, len - t * LANES);
          const f32v cv = c ? load16(c + t * LANES, len - t * LANES) : f32v{};
          for (i64 ch = 0; ch < C; ++ch) {
            const f32v w = w_vector<K>(G, f.v + ch * K, cv);
            std::memcpy(ws + (ch * n4 + i) * KC + t * LANES, &w, sizeof w);
          }
        }
      }
      // the next block's runs of M (the next chunk's first after the last block) come into L2 while
      // this block's GEMM runs: the hardware's prefetcher alone leaves the reads and the arithmetic
      // in turns
      const bool last = it + 4 >= f.n;
      const i64 i0 = last ? 0 : it + 4, i1 = std::min(i0 + 4, f.n), col = last ? c0 + KC : c0;
      const i64 lines = f.m_rows && col < end ? (std::min(KC, end - col) * K + LANES - 1) / LANES : 0;
      const auto prefetch = [&](i64 tile, i64 tiles) {
        for (i64 e = tile * (i1 - i0) * lines / tiles; e < (tile + 1) * (i1 - i0) * lines / tiles; ++e)
          __builtin_prefetch(f.m_rows[i0 + e / lines] + (f.j0 + col) * K + e % lines * LANES, 0, 2);
      };
      for (i64 ch = 0; ch < C; ++ch)
        chunk_product(acc + ch * N4 * n4, xs, ws + ch * n4 * KC, N4, n4, steps, it, it + 4, prefetch);
    }
  }
  for (i64 ch = 0; ch < C; ++ch) lane_sums(acc + ch * N4 * n4, f.N, f.n, n4, f.out + (thread * C + ch) * f.N * f.n);
}

// Backward over column tiles [begin, end): per tile, dW's rows (g^T @ x, four at a time) meet M's
// split rows for dv, which also give W's tile for dx = sum_c g[c] @ W[c], streamed out once.
template <int K>
TR_INLINE void fused_backward(const Fused& f, int thread, i64 begin, i64 end) {
  const i64 C = f.C, n = f.n, Cn = C * n;
  const bool want_dv = f.parts != nullptr, want_dx = f.out != nullptr;
  float* xs = f.scratch + thread * f.scratch_stride;   // N x TILE
  float* ws = xs + f.N * TILE;                          // C*n x TILE
  float* dws = ws + Cn * TILE;                          // C x 4 x TILE: four rows of dW
  float* mb = dws + C * 4 * TILE;                       // TILE * K (+ LANES) drawn numbers of M
  float* ms = mb + TILE * K + LANES;                    // K x TILE: them split
  float* cb = ms + TILE * K;                            // TILE (+ LANES) of b
  f32v* dva = reinterpret_cast<f32v*>(cb + TILE + LANES);   // C x K vectors: the tile's dv sums
  double* parts = want_dv ? f.parts + thread * C * K : nullptr;
  for (i64 j = begin; j < end; j += TILE) {
    const i64 len = std::min(TILE, end - j);
    if (want_dv) {
      pack_rows(xs, TILE, f.x + j, f.x_stride, f.N, len, TILE / LANES);
      std::memset(static_cast<void*>(dva), 0, sizeof(f32v) * size_t(C * K));
    }
    const i64 next = std::min(TILE, end - j - TILE), blocks = (n + 3) / 4;
    for (i64 it = 0; it < n; it += 4) {
      // the next tile's runs of M and rows of x come into L2 a row block at a time, a tile ahead
      for (i64 i = it; i < std::min(it + 4, n) && f.m_rows && next > 0; ++i)
        for (i64 e = 0; e < next * K; e += LANES) __builtin_prefetch(f.m_rows[i] + (f.j0 + j + TILE) * K + e, 0, 2);
      for (i64 b = it / 4 * f.N / blocks; b < (it / 4 + 1) * f.N / blocks && want_dv && next > 0; ++b)
        for (i64 e = 0; e < next; e += LANES) __builtin_prefetch(f.x + b * f.x_stride + j + TILE + e, 0, 2);
      for (i64 ch = 0; ch < C && want_dv; ++ch) {
        const Tile t = tile_product(f.gt + (ch * f.n4 + it) * f.N4, f.N4, xs, f.N);
        std::memcpy(dws + ch * 4 * TILE, &t, sizeof t);   // row r, vector v at r * TILE + v * LANES
      }
      for (i64 r = 0; r < 4 && it + r < n; ++r) {
        const i64 i = it + r;
        const Run m = m_run(f, mb, ms, TILE, i, f.j0 + j, len);
        const float* c = want_dx ? c_run(f, cb, i, f.j0 + j, len) : nullptr;
        for (int vi = 0; vi < TILE / LANES; ++vi) {
          const i64 left = len - vi * LANES;
          f32v G[K];
          for (int q = 0; q < K; ++q) G[q] = load16(m.m + q * m.ld + vi * LANES, left);
          const f32v cv = c ? load16(c + vi * LANES, left) : f32v{};
          for (i64 ch = 0; ch < C; ++ch) {
            if (want_dv) {
              f32v dW;
              std::memcpy(&dW, dws + ch * 4 * TILE + r * TILE + vi * LANES, sizeof dW);
              for (int q = 0; q < K; ++q) dva[ch * K + q] += dW * G[q];
            }
            if (want_dx) {
              const f32v w = w_vector<K>(G, f.v + ch * K, cv);
              std::memcpy(ws + (ch * n + i) * TILE + vi * LANES, &w, sizeof w);
            }
          }
        }
      }
    }
    for (i64 e = 0; e < C * K && want_dv; ++e) {   // float sums over one tile, then double across tiles
      float t = 0;
      for (int l = 0; l < LANES; ++l) t += dva[e][l];
      parts[e] += double(t);
    }
    for (i64 bt = 0; bt < f.N && want_dx; bt += 4) {
      const Tile t = tile_product(f.gx + bt * Cn, Cn, ws, Cn);
      for (int r = 0; r < 4 && bt + r < f.N; ++r)
        for (int vi = 0; vi < TILE / LANES && vi * LANES < len; ++vi)
          store16_stream(f.out + (bt + r) * f.out_stride + j + vi * LANES, t.s[r][vi], len - vi * LANES);
    }
  }
  stream_fence();
}

template <bool Forward>
TR_INLINE void fused_any(const Fused& f, int t, i64 begin, i64 end) {
  switch (f.k) {
#define TR_RANK(K) \
  case K:          \
    return Forward ? fused_forward<K>(f, t, begin, end) : fused_backward<K>(f, t, begin, end);
    TR_RANK(1) TR_RANK(2) TR_RANK(3) TR_RANK(4) TR_RANK(5) TR_RANK(6) TR_RANK(7) TR_RANK(8)
#undef TR_RANK
  }
}

TR_CLONES void fused_forward_task(const void* ctx, int t, i64 begin, i64 end) {
  fused_any<true>(*static_cast<const Fused*>(ctx), t, begin, end);
}
TR_CLONES void fused_backward_task(const void* ctx, int t, i64 begin, i64 end) {
  fused_any<false>(*static_cast<const Fused*>(ctx), t, begin, end);
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
TR_ENTRY_POINT(tinyrecon_cpu_philox_fill)

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
TR_ENTRY_POINT(tinyrecon_cpu_philox_mask)

// The rows x cols mask (u < p) of seed, bit-packed: out is rows x ceil(cols / 64) uint64 words.
TR_EXPORT int tinyrecon_cpu_mask_bits(int threads, i64 seed, i64 rows, i64 cols, float p, void* out) {
  if (rows < 0 || cols < 0 || (rows && cols && !out)) return 1;
  const i64 words = (cols + 63) / 64, total = rows * words;
  const Bits b = {uint64_t(seed), cols, words, p, static_cast<uint64_t*>(out)};
  if (total) parallel(split_count(threads, total * 64, MIN_NUMBERS_PER_THREAD), total, 1, mask_bits, &b);
  return 0;
}
TR_ENTRY_POINT(tinyrecon_cpu_mask_bits)

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
TR_ENTRY_POINT(tinyrecon_cpu_mask_apply)

// Hypernets: columns [j0, j0 + cols) of W[c] = reshape(M @ v[c] (+ b), n, D) (M = N(0, 1) n*D x k of
// seed_m, b = N(0, 1) n*D of seed_c when has_c) into W (C, n, cols) when W is given, and
// dv[c, q] += sum_ij dW[c, i, j] M[i*D + j0 + j, q] when dW and dv are given; all contiguous, dtype
// 0 float32, 1 float64. m_rows / c_rows: n addresses of M's / b's rows (float32, as
// tinyrecon_cpu_philox_fill draws them) where a cache keeps them, read instead of drawn; may be null.
// Returns 2 when the per-thread sums find no memory.
TR_EXPORT int tinyrecon_cpu_random_linear(int dtype, int threads, i64 seed_m, int has_c, i64 seed_c, i64 n, i64 D,
                                          i64 j0, i64 cols, i64 k, i64 C, const void* v, void* W, const void* dW,
                                          void* dv, const void* m_rows, const void* c_rows) {
  if ((dtype != 0 && dtype != 1) || n < 0 || D < 0 || j0 < 0 || cols < 0 || j0 + cols > D || k < 1 || C < 0 ||
      (dW == nullptr) != (dv == nullptr) || (n && cols && C && (!v || (!W && !dW))))
    return 1;
  if (!n || !cols || !C) return 0;
  if (dtype == 0) {
    const Linear<float> f = {uint64_t(seed_m), uint64_t(seed_c), has_c != 0, n, D, j0, cols, k, C,
                             static_cast<const float*>(v), static_cast<float*>(W), static_cast<const float*>(dW),
                             static_cast<const float* const*>(m_rows), static_cast<const float* const*>(c_rows), nullptr, nullptr, 0, 0};
    return linear(threads, f, static_cast<float*>(dv), linear_f32);
  }
  const Linear<double> f = {uint64_t(seed_m), uint64_t(seed_c), has_c != 0, n, D, j0, cols, k, C,
                            static_cast<const double*>(v), static_cast<double*>(W), static_cast<const double*>(dW),
                            static_cast<const float* const*>(m_rows), static_cast<const float* const*>(c_rows), nullptr, nullptr, 0, 0};
  return linear(threads, f, static_cast<double*>(dv), linear_f64);
}
TR_ENTRY_POINT(tinyrecon_cpu_random_linear)

// Hypernets' GEMMs (float32, rank 1 <= k <= 8) with W[c] = reshape(M @ v[c] (+ b), n, D) (M, b,
// m_rows and c_rows as in tinyrecon_cpu_random_linear) formed tile by tile inside the GEMM, never
// stored: op 0 out (C, N, n), contiguous, = x @ W[c]^T; op 1 out (N x D, row stride out_stride) =
// sum_c g[c] @ W[c] when out is given, and dv (C, k) += sum_ij (g[c]^T @ x)_ij M[i*D + j, :] when
// dv is given. x (N x D) has row stride x_stride, v (C, k) and g (C, N, n) are contiguous.
// Returns 2 when the per-thread buffers find no memory.
TR_EXPORT int tinyrecon_cpu_random_gemm(int op, int threads, i64 seed_m, int has_c, i64 seed_c, i64 N, i64 n, i64 D,
                                        i64 k, i64 C, const void* v, const void* x, i64 x_stride, const void* g,
                                        void* out, i64 out_stride, void* dv, const void* m_rows, const void* c_rows) {
  const bool work = N && n && D && C;
  if ((op != 0 && op != 1) || N < 0 || n < 0 || D < 0 || k < 1 || k > MAX_K || C < 0 || x_stride < 0 ||
      out_stride < 0 || (op == 0 && N && n && C && !out) || (op == 1 && N && D && !out && !dv) ||
      (work && (!v || (op == 1 && !g) || ((op == 0 || dv) && !x))))
    return 1;
  float* o = static_cast<float*>(out);
  if (!work) {   // an empty sum: y or dx is zero, dv unchanged
    if (op == 0 && o) std::memset(o, 0, sizeof(float) * size_t(C * N * n));
    for (i64 b = 0; b < N && op == 1 && o; ++b) std::memset(o + b * out_stride, 0, sizeof(float) * size_t(D));
    return 0;
  }
  const i64 N4 = (N + 3) / 4 * 4, n4 = (n + 3) / 4 * 4, Cn = C * n;
  const int nt = split_count(threads, N * n * D * C, i64(1) << 20);
  const i64 stride = op == 0 ? C * N4 * n4 * LANES + N4 * KC + C * n4 * KC + (KC * k + LANES) + KC * k + (KC + LANES)
                             : N * TILE + Cn * TILE + C * 4 * TILE + (TILE * k + LANES) + TILE * k + (TILE + LANES) +
                                   C * k * LANES;
  const size_t padded = size_t(nt * ((stride + LANES - 1) / LANES * LANES)) * sizeof(float);
  float* scratch = static_cast<float*>(std::aligned_alloc(64, padded));
  float* gt = op == 1 && dv ? static_cast<float*>(std::calloc(size_t(C * n4 * N4), sizeof(float))) : nullptr;
  float* gx = op == 1 && out ? static_cast<float*>(std::calloc(size_t(N4 * Cn), sizeof(float))) : nullptr;
  float* partial = op == 0 ? static_cast<float*>(std::malloc(size_t(nt * C * N * n) * sizeof(float))) : nullptr;
  double* parts = dv ? static_cast<double*>(std::calloc(size_t(nt * C * k), sizeof(double))) : nullptr;
  if (!scratch || (op == 1 && dv && (!gt || !parts)) || (op == 1 && out && !gx) || (op == 0 && !partial)) {
    std::free(scratch), std::free(gt), std::free(gx), std::free(partial), std::free(parts);
    return 2;
  }
  const float* gs = static_cast<const float*>(g);
  for (i64 c = 0; c < C && op == 1; ++c)
    for (i64 b = 0; b < N; ++b)
      for (i64 i = 0; i < n; ++i) {
        const float t = gs[(c * N + b) * n + i];
        if (gt) gt[(c * n4 + i) * N4 + b] = t;
        if (gx) gx[b * Cn + c * n + i] = t;
      }
  const Fused f = {uint64_t(seed_m), uint64_t(seed_c), has_c != 0, N, n, D, 0, k, C, N4, n4,
                   static_cast<const float*>(v), static_cast<const float*>(x), x_stride, gt, gx,
                   op == 0 ? partial : o, out_stride, op == 1 ? parts : nullptr,
                   static_cast<const float* const*>(m_rows), static_cast<const float* const*>(c_rows), pick_split(),
                   split_tables(k), scratch, (stride + LANES - 1) / LANES * LANES};
  if (op == 1 && o) hint_huge_pages(o, (N - 1) * out_stride * 4 + D * 4);
  parallel(nt, D, TILE, op == 0 ? fused_forward_task : fused_backward_task, &f);
  for (i64 e = 0; e < C * N * n && op == 0; ++e) {   // the threads' partial sums, in a fixed order
    float t = 0;
    for (int th = 0; th < nt; ++th) t += partial[th * C * N * n + e];
    o[e] = t;
  }
  float* dvs = static_cast<float*>(dv);
  for (i64 e = 0; e < C * k && dv; ++e) {
    double s = 0;
    for (int th = 0; th < nt; ++th) s += parts[th * C * k + e];
    dvs[e] += float(s);
  }
  std::free(scratch), std::free(gt), std::free(gx), std::free(partial), std::free(parts);
  return 0;
}
TR_ENTRY_POINT(tinyrecon_cpu_random_gemm)

// Masking's GEMMs (float32) with the mask read from bits (tinyrecon_cpu_mask_bits' layout, words per
// row; columns [j0, j0 + D) of it; null bits: no mask, for the hypernets' blocks): op 0 out (N x n)
// = x @ (w * M)^T; op 1 out (N x D) = g @ (w * M); op 2 out (n x D) = (g^T @ x) * M; ops 0 and 1
// add to out when accumulate. x (N x D), w (n x D) and out
// have row strides; g (N x n) is contiguous. Returns 2 when the per-thread buffers find no memory.
TR_EXPORT int tinyrecon_cpu_masked_gemm(int op, int threads, const void* bits, i64 words, i64 j0, i64 N, i64 n,
                                        i64 D, const void* x, i64 x_stride, const void* w, i64 w_stride,
                                        const void* g, void* out, i64 out_stride, int accumulate) {
  if (op < 0 || op > 2 || words < 0 || j0 < 0 || N < 0 || n < 0 || D < 0 || (bits && j0 + D > words * 64) ||
      x_stride < 0 || w_stride < 0 || out_stride < 0 ||
      (N && n && D && (!out || (op != 1 && !x) || (op != 2 && !w) || (op != 0 && !g))))
    return 1;
  if (!bits) words = 0;
  float* y = static_cast<float*>(out);
  if (op == 0 && (!N || !n)) return 0;
  if (op == 0 && !D) {
    for (i64 b = 0; b < N && !accumulate; ++b) std::memset(y + b * out_stride, 0, sizeof(float) * size_t(n));
    return 0;
  }
  if (op != 0 && (!N || !n || !D)) {   // an empty sum: dx or dw is zero (or unchanged when accumulating)
    const i64 rows = op == 1 ? N : n;
    if (!accumulate || op == 2)
      for (i64 r = 0; r < rows && D; ++r) std::memset(y + r * out_stride, 0, sizeof(float) * size_t(D));
    return 0;
  }
  const i64 N4 = (N + 3) / 4 * 4, n4 = (n + 3) / 4 * 4;
  const int nt = split_count(threads, N * n * D, i64(1) << 20);
  const i64 stride = op == 0 ? N4 * n4 * LANES + (N4 + n4) * KC : (op == 1 ? n : N) * TILE;
  float* scratch = static_cast<float*>(std::aligned_alloc(64, size_t(nt * stride + 16) * sizeof(float)));
  float* gp = static_cast<float*>(std::calloc(size_t(N4 * n4), sizeof(float)));
  float* partial = op == 0 ? static_cast<float*>(std::malloc(size_t(nt * N * n) * sizeof(float))) : nullptr;
  if (!scratch || !gp || (op == 0 && !partial)) {
    std::free(scratch), std::free(gp), std::free(partial);
    return 2;
  }
  const float* gs = static_cast<const float*>(g);
  for (i64 b = 0; b < N && op != 0; ++b)
    for (i64 i = 0; i < n; ++i) (op == 1 ? gp[b * n4 + i] : gp[i * N4 + b]) = gs[b * n + i];
  const uint64_t* bb = static_cast<const uint64_t*>(bits);
  const Masked a = {bb, words, j0, N, n, N4, n4, static_cast<const float*>(x), x_stride, static_cast<const float*>(w),
                    w_stride, gp, op == 0 ? partial : y, out_stride, accumulate != 0, scratch, stride};
  if (op == 2 || (op == 1 && !accumulate)) hint_huge_pages(y, ((op == 1 ? N : n) - 1) * out_stride * 4 + D * 4);
  parallel(nt, D, TILE, op == 0 ? masked_forward : op == 1 ? masked_dx : masked_dw, &a);
  for (i64 b = 0; b < N && op == 0; ++b)   // the threads' partial sums, in a fixed order
    for (i64 i = 0; i < n; ++i) {
      float t = 0;
      for (int th = 0; th < nt; ++th) t += partial[(th * N + b) * n + i];
      y[b * out_stride + i] = accumulate ? y[b * out_stride + i] + t : t;
    }
  std::free(scratch), std::free(gp), std::free(partial);
  return 0;
}
TR_ENTRY_POINT(tinyrecon_cpu_masked_gemm)
