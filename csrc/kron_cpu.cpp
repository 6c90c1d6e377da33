// Kronecker family on the CPU (functions/kron.py, tinyrecon/cpu_ops.py): what reads or writes x.
//
// pass:   for x (N, M, K), L (RA, M) and R (RB, K), one read of x gives both
//           U[b] = L @ X[b]   (N, RA, K)   and   V[:, b, :] = R @ X[b]^T   (RB, N, M),
//         everything a Kronecker apply and its weight gradients need from x. BLAS makes two
//         reads of x for that, and its skinny-GEMM kernels (RA, RB ~ 5) run well below the
//         memory bound on some CPUs. Here x is read in tiles of 4 rows by one K block (in L1 or
//         L2); each row of the tile is used for all RB dot products (4 x 6 accumulators in
//         registers) and all RA axpys while it is there. U alone for many rows of L and few of x
//         keeps blocks of U in registers over all of x's rows instead (outer_u).
// chain:  V[:, b*RA + a] = R @ (L @ X[b])[a]: a Kronecker apply's core for a thin L (duplicated_padding's
//         ones(1, q) sums x's q column blocks), with R read once for all batches (a bfloat16 x and R
//         with M <= 2 RA, on AVX-512 BF16: R's dot products with x's rows, then combined, chain_by_dots).
// expand: dX[b] = L^T @ G[b] for G (N, RA, K): the backward's one write of dx.
// A bfloat16 x is read as is: a tile is widened to float32 in L1 by its first reader; V alone from a
// bfloat16 x and a bfloat16 R takes AVX-512 BF16's dot products where the CPU has them (no widening).
// K blocks keep the factor rows of a block in L2 however long K is. Batches are split over the
// library's threads (cpu_common.h: torch's OpenMP team where there is one). Plain C ABI, loaded
// with ctypes; each entry point returns 0, 1 for bad arguments, or 2 when memory runs out.
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TR_BF16_DOT 1
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace {

using i64 = int64_t;
constexpr int TILE = 4;                  // rows of x per tile
constexpr int GROUP = 6;                 // factor rows per register group (4 x 6 accumulators)
constexpr i64 L1_TILE = 16 * 1024;       // bytes of x per tile that later groups reread (widened bfloat16)
constexpr i64 STREAM_TILE = 64 * 1024;   // bytes of a float x per tile: longer rows stream better from memory
constexpr i64 L2_FACTORS = 256 * 1024;   // bytes of factor rows per K block

// 64-byte vectors: one AVX-512 register, two AVX2 or four SSE registers in the other clones.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
};
template <typename T>
using vec = typename Vec<T>::type;
template <typename T>
constexpr int W = 64 / sizeof(T);

template <typename T>
TR_INLINE vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <typename T>
TR_INLINE void store(T* p, vec<T> v) {
  std::memcpy(p, &v, sizeof v);
}
// Sum of the lanes, halving the vector each step (a few shuffles, not one add per lane).
template <typename T>
TR_INLINE T hsum(vec<T> v) {
  typedef T half __attribute__((vector_size(32)));
  typedef T quarter __attribute__((vector_size(16)));
  half h[2];
  std::memcpy(h, &v, sizeof v);
  const half a = h[0] + h[1];
  quarter q[2];
  std::memcpy(q, &a, sizeof a);
  const quarter b = q[0] + q[1];
  T s = 0;
  for (int l = 0; l < int(16 / sizeof(T)); ++l) s += b[l];
  return s;
}

// x as T: loaded as is, or bfloat16 (its bits, uint16_t) widened to float, so a bfloat16 x is read
// once at half the bytes, never copied whole to float32 (a tile is widened into L1 by its first reader).
typedef uint16_t bf16;
template <typename T>
TR_INLINE vec<T> load_x(const T* p) {
  return load(p);
}
TR_INLINE vec<float> load_x(const bf16* p) {
  typedef bf16 h16 __attribute__((vector_size(32)));
  typedef uint32_t u32 __attribute__((vector_size(64)));
  h16 h;
  std::memcpy(&h, p, sizeof h);
  const u32 w = __builtin_convertvector(h, u32) << 16;
  vec<float> v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
template <typename T>
TR_INLINE T x_at(const T* p, i64 k) {
  return p[k];
}
TR_INLINE float x_at(const bf16* p, i64 k) {
  const uint32_t w = uint32_t(p[k]) << 16;
  float v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// out[i][r] += <x_i, f_r> over n elements, for the TILE rows x_i and NR factor rows f_r.
// pf: the next tile's rows (or null), fetched a vector per row and step, so that x streams in
// from memory at the pace it is used instead of in bursts the hardware prefetcher drops.
// KEEP: the rows as T are also stored to keep[i] (a bfloat16 x widened by the tile's first
// group, for the others to read from L1).
template <typename T, int NR, typename X, bool KEEP>
TR_INLINE void dots(const X* const* x, const T* const* f, const X* const* pf, i64 n, T out[TILE][GROUP],
                    T* const* keep) {
  vec<T> acc[TILE][NR] = {};
  i64 k = 0;
  for (; k + W<T> <= n; k += W<T>) {
    if (pf)
      for (int i = 0; i < TILE; ++i) __builtin_prefetch(pf[i] + k, 0, 2);
    vec<T> fv[NR];
    for (int r = 0; r < NR; ++r) fv[r] = load(f[r] + k);
    for (int i = 0; i < TILE; ++i) {
      const vec<T> xv = load_x(x[i] + k);
      if constexpr (KEEP) store(keep[i] + k, xv);
      for (int r = 0; r < NR; ++r) acc[i][r] += xv * fv[r];
    }
  }
  for (int i = 0; i < TILE; ++i) {
    if constexpr (KEEP)
      for (i64 kk = k; kk < n; ++kk) keep[i][kk] = x_at(x[i], kk);
    for (int r = 0; r < NR; ++r) {
      T s = hsum<T>(acc[i][r]);
      for (i64 kk = k; kk < n; ++kk) s += x_at(x[i], kk) * f[r][kk];
      out[i][r] += s;
    }
  }
}

// f(std::integral_constant<int, N>()) with N = rows (1..GROUP): a register group's row count as a
// compile-time constant. The callers' lambdas are always_inline (TR_INLINE_LAMBDA), so their
// bodies compile inside the library's per-ISA clones, as every helper here does.
#define TR_INLINE_LAMBDA __attribute__((always_inline))
template <typename F>
TR_INLINE void with_rows(int rows, F&& f) {
  switch (rows) {
    case 1: return f(std::integral_constant<int, 1>());
    case 2: return f(std::integral_constant<int, 2>());
    case 3: return f(std::integral_constant<int, 3>());
    case 4: return f(std::integral_constant<int, 4>());
    case 5: return f(std::integral_constant<int, 5>());
    default: return f(std::integral_constant<int, GROUP>());
  }
}

template <typename T, typename X, bool KEEP>
TR_INLINE void dots_n(int nr, const X* const* x, const T* const* f, const X* const* pf, i64 n, T out[TILE][GROUP],
                      T* const* keep) {
  with_rows(nr, [&](auto NR) TR_INLINE_LAMBDA { dots<T, decltype(NR)::value, X, KEEP>(x, f, pf, n, out, keep); });
}

// u_a += sum_i c[a][i] x_i over n elements, for NA rows u_a. The coefficients and pointers are
// copied into locals first: a store through u could alias them, and they would be reloaded.
// KEEP: as for dots.
template <typename T, int NA, typename X, bool KEEP>
TR_INLINE void axpys(const X* const* xs, T* const* us, const T c[GROUP][TILE], const X* const* pf, i64 n,
                     T* const* keep) {
  const X* x[TILE];
  T* u[NA];
  vec<T> cv[NA][TILE];
  for (int i = 0; i < TILE; ++i) x[i] = xs[i];
  for (int a = 0; a < NA; ++a) {
    u[a] = us[a];
    for (int i = 0; i < TILE; ++i) cv[a][i] = vec<T>{} + c[a][i];   // broadcast
  }
  i64 k = 0;
  for (; k + W<T> <= n; k += W<T>) {
    if (pf)
      for (int i = 0; i < TILE; ++i) __builtin_prefetch(pf[i] + k, 0, 2);
    vec<T> xv[TILE];
    for (int i = 0; i < TILE; ++i) {
      xv[i] = load_x(x[i] + k);
      if constexpr (KEEP) store(keep[i] + k, xv[i]);
    }
    for (int a = 0; a < NA; ++a) {
      vec<T> uv = load(u[a] + k);
      for (int i = 0; i < TILE; ++i) uv += cv[a][i] * xv[i];
      store(u[a] + k, uv);
    }
  }
  for (; k < n; ++k) {
    T xk[TILE];
    for (int i = 0; i < TILE; ++i) {
      xk[i] = x_at(x[i], k);
      if constexpr (KEEP) keep[i][k] = xk[i];
    }
    for (int a = 0; a < NA; ++a)
      for (int i = 0; i < TILE; ++i) u[a][k] += c[a][i] * xk[i];
  }
}

template <typename T, typename X, bool KEEP>
TR_INLINE void axpys_n(int na, const X* const* x, T* const* u, const T c[GROUP][TILE], const X* const* pf, i64 n,
                       T* const* keep) {
  with_rows(na, [&](auto NA) TR_INLINE_LAMBDA { axpys<T, decltype(NA)::value, X, KEEP>(x, u, c, pf, n, keep); });
}

template <typename T, typename X = T>
struct Job {
  const X* x;           // expand: x is G, the input
  const T *L, *R;
  T *U, *V;             // expand: U is dx, the output
  i64 N, M, K, RA, RB, b0, b1, k_begin, k_end;   // this job's batches and columns
  bool expand, chain;   // chain: V from the rows of L @ X[b], not of x (R contiguous)
  i64 r_row, r_col;     // R's strides
  T* pack;              // R's rows of a K block, when not contiguous or bfloat16 (RB x the K block)
  const bf16* Rh;       // R as bfloat16 (then R is null), widened into pack a K block at a time
};

// R's rows of the K block [k0, k0 + n) into j.pack, read once in order: a transposed R (random_matrix_
// adaption's B^T) or a bfloat16 one (widened here once, not once per tile of x).
template <typename T, typename X>
TR_INLINE void pack_block(const Job<T, X>& j, i64 k0, i64 n) {
  if (j.Rh && j.r_col == 1) {
    for (i64 r = 0; r < j.RB; ++r) {
      const bf16* src = j.Rh + r * j.r_row + k0;
      T* o = j.pack + r * n;
      i64 k = 0;
      if constexpr (std::is_same_v<T, float>)
        for (; k + W<float> <= n; k += W<float>) store(o + k, load_x(src + k));
      for (; k < n; ++k) o[k] = x_at(src, k);
    }
    return;
  }
  for (i64 k = 0; k < n; ++k)
    for (i64 r = 0; r < j.RB; ++r) {
      const i64 e = r * j.r_row + (k0 + k) * j.r_col;
      j.pack[r * n + k] = j.Rh ? x_at(j.Rh, e) : j.R[e];
    }
}

// K block: the factor rows of one block stay in L2; a tile's 4 rows of x take tile_bytes.
template <typename T>
TR_INLINE i64 k_block(i64 factor_rows, i64 tile_bytes = L1_TILE) {
  const i64 kb = std::min(tile_bytes / i64(TILE * sizeof(T)), L2_FACTORS / i64(sizeof(T) * std::max<i64>(factor_rows, 1)));
  return std::max<i64>(kb - kb % W<T>, W<T>);
}
// A pass's K block. A float x's tile is read as is by every register group, from L2 at worst, so it
// need not fit L1: 64 KB tiles (rather than 16) measured 5-8% less time for folded x's long rows
// (lorr, duplicated_diagonal_padding at the MNIST shape). A widened bfloat16 tile stays in L1.
template <typename T, typename X>
TR_INLINE i64 pass_block(i64 factor_rows) {
  return k_block<T>(factor_rows, std::is_same_v<T, X> ? STREAM_TILE : L1_TILE);
}

// dX[b] = L^T @ G[b] for batches [b0, b1): each output row is written once, from RA rows of G in L1.
template <typename T>
TR_INLINE void expand(const Job<T>& j) {
  const i64 M = j.M, K = j.K, RA = j.RA, kb = k_block<T>(RA);
  for (i64 b = j.b0; b < j.b1; ++b) {
    const T* G = j.x + b * RA * K;
    for (i64 k0 = j.k_begin; k0 < j.k_end; k0 += kb) {
      const i64 n = std::min(kb, j.k_end - k0);
      for (i64 i0 = 0; i0 < M; i0 += TILE) {
        const int rows = int(std::min<i64>(TILE, M - i0));
        T* out[TILE];   // a short last tile writes its last row again, with the same values
        T c[TILE][64];
        const i64 ra = std::min<i64>(RA, 64);
        for (int i = 0; i < TILE; ++i) {
          const i64 row = i0 + std::min(i, rows - 1);
          out[i] = j.U + (b * M + row) * K + k0;
          for (i64 a = 0; a < ra; ++a) c[i][a] = j.L[a * M + row];
        }
        i64 k = 0;
        for (; k + W<T> <= n; k += W<T>) {
          vec<T> acc[TILE] = {};
          for (i64 a = 0; a < ra; ++a) {
            const vec<T> g = load(G + a * K + k0 + k);
            for (int i = 0; i < TILE; ++i) acc[i] += c[i][a] * g;
          }
          for (int i = 0; i < TILE; ++i) store(out[i] + k, acc[i]);
        }
        for (; k < n; ++k)
          for (int i = 0; i < TILE; ++i) {
            T s = 0;
            for (i64 a = 0; a < ra; ++a) s += c[i][a] * G[a * K + k0 + k];
            out[i][k] = s;
          }
      }
    }
  }
}

// The dot products of a tile's rows x (TILE rows, n columns from k0) with R's rows of the K block,
// added to V[r * v_stride + i] (V: the tile's first column). pf: the next tile's rows (or null),
// fetched meanwhile. A bfloat16 x (Y not T) is widened by the first group as it reads it, into keep
// (TILE rows of n in L1), which the other groups read: one pass over the tile, not a separate one
// to widen it.
template <typename T, typename X, typename Y>
TR_INLINE void dot_tile(const Job<T, X>& j, const Y* const* x, const Y* const* pf, T* const* keep, int rows, i64 n,
                        i64 k0, T* V, i64 v_stride) {
  for (i64 r0 = 0; r0 < j.RB; r0 += GROUP) {
    const T* f[GROUP];
    const int nr = int(std::min<i64>(GROUP, j.RB - r0));
    for (int r = 0; r < nr; ++r) f[r] = j.pack ? j.pack + (r0 + r) * n : j.R + (r0 + r) * j.r_row + k0;
    T out[TILE][GROUP] = {};
    if constexpr (std::is_same_v<Y, T>)
      dots_n<T, T, false>(nr, x, f, r0 ? nullptr : pf, n, out, nullptr);
    else if (r0 == 0)
      dots_n<T, Y, true>(nr, x, f, pf, n, out, keep);
    else
      dots_n<T, T, false>(nr, keep, f, nullptr, n, out, nullptr);
    for (int i = 0; i < rows; ++i)
      for (int r = 0; r < nr; ++r) V[(r0 + r) * v_stride + i] += out[i][r];
  }
}

// One tile of x (TILE rows x, n columns from k0, of batch b): its dot products with R's rows, added
// to V, and its axpys into U's rows. pf: the next tile's rows (or null), fetched meanwhile. keep:
// where a bfloat16 x is widened by the first group that reads it (dot_tile), for the others.
template <typename T, typename X, typename Y>
TR_INLINE void tile(const Job<T, X>& j, const Y* const* x, const Y* const* pf, T* const* keep, int rows, i64 n, i64 b,
                    i64 i0, i64 k0, T* Ub) {
  const i64 M = j.M, RA = j.U ? j.RA : 0, RB = j.V ? j.RB : 0;
  if (RB) dot_tile(j, x, pf, keep, rows, n, k0, j.V + b * M + i0, j.N * M);
  for (i64 a0 = 0; a0 < RA; a0 += GROUP) {
    T* u[GROUP];
    T c[GROUP][TILE] = {};
    const int na = int(std::min<i64>(GROUP, RA - a0));
    for (int a = 0; a < na; ++a) {
      u[a] = Ub + (a0 + a) * j.K + k0;
      for (int i = 0; i < rows; ++i) c[a][i] = j.L[(a0 + a) * M + i0 + i];
    }
    // A bfloat16 x with U alone in one or two groups (hm's rank 8) is widened in registers by each
    // group: measured 10-15% less time than storing the widened tile for the second group.
    if constexpr (std::is_same_v<Y, T>)
      axpys_n<T, T, false>(na, x, u, c, RB || a0 ? nullptr : pf, n, nullptr);
    else if (!RB && RA <= 2 * GROUP)
      axpys_n<T, Y, false>(na, x, u, c, a0 ? nullptr : pf, n, nullptr);
    else if (!RB && a0 == 0)
      axpys_n<T, Y, true>(na, x, u, c, pf, n, keep);
    else
      axpys_n<T, T, false>(na, keep, u, c, nullptr, n, nullptr);
  }
}

#ifdef TR_BF16_DOT
// V alone from a bfloat16 x and a bfloat16 R (contiguous rows), on CPUs with AVX-512 BF16: vdpbf16ps
// takes 32 bfloat16 pairs of x and R as they are and adds their exact products to 16 float32 sums,
// half the instructions of widening both and an FMA per element. float32 sums, as the pass's.
#define TR_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

bool has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}

// out[i][r] += <x_i, f_r> over n elements, as dots, for bfloat16 rows x_i and f_r.
template <int NR>
inline __attribute__((always_inline)) TR_DOT_TARGET void dots_bf16(const bf16* const* x, const bf16* const* f,
                                                                    const bf16* const* pf, i64 n,
                                                                    float out[TILE][GROUP]) {
  __m512 acc[TILE][NR];
  for (int i = 0; i < TILE; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();
  i64 k = 0;
  for (; k + 32 <= n; k += 32) {
    if (pf)
      for (int i = 0; i < TILE; ++i) __builtin_prefetch(pf[i] + k, 0, 2);
    __m512i xv[TILE];
    for (int i = 0; i < TILE; ++i) xv[i] = _mm512_loadu_si512(x[i] + k);
    for (int r = 0; r < NR; ++r) {
      const __m512bh fv = (__m512bh)_mm512_loadu_si512(f[r] + k);
      for (int i = 0; i < TILE; ++i) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv[i], fv);
    }
  }
  if (k < n) {   // the tail, zero-padded by masked loads
    const __mmask32 m = __mmask32((uint32_t(1) << (n - k)) - 1);
    __m512i xv[TILE];
    for (int i = 0; i < TILE; ++i) xv[i] = _mm512_maskz_loadu_epi16(m, x[i] + k);
    for (int r = 0; r < NR; ++r) {
      const __m512bh fv = (__m512bh)_mm512_maskz_loadu_epi16(m, f[r] + k);
      for (int i = 0; i < TILE; ++i) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], (__m512bh)xv[i], fv);
    }
  }
  for (int i = 0; i < TILE; ++i)
    for (int r = 0; r < NR; ++r) {
      vec<float> v;
      std::memcpy(&v, &acc[i][r], sizeof v);
      out[i][r] += hsum<float>(v);
    }
}

// dot_tile for a bfloat16 x and R (j.Rh, rows contiguous).
TR_DOT_TARGET void dot_tile_bf16(const Job<float, bf16>& j, const bf16* const* x, const bf16* const* pf, int rows,
                                 i64 n, i64 k0, float* V, i64 v_stride) {
  for (i64 r0 = 0; r0 < j.RB; r0 += GROUP) {
    const bf16* f[GROUP];
    const int nr = int(std::min<i64>(GROUP, j.RB - r0));
    for (int r = 0; r < nr; ++r) f[r] = j.Rh + (r0 + r) * j.r_row + k0;
    float out[TILE][GROUP] = {};
    const bf16* const* p = r0 ? nullptr : pf;
    switch (nr) {   // (not with_rows: a default-target function cannot inline this target's code)
      case 1: dots_bf16<1>(x, f, p, n, out); break;
      case 2: dots_bf16<2>(x, f, p, n, out); break;
      case 3: dots_bf16<3>(x, f, p, n, out); break;
      case 4: dots_bf16<4>(x, f, p, n, out); break;
      case 5: dots_bf16<5>(x, f, p, n, out); break;
      default: dots_bf16<6>(x, f, p, n, out); break;
    }
    for (int i = 0; i < rows; ++i)
      for (int r = 0; r < nr; ++r) V[(r0 + r) * v_stride + i] += out[i][r];
  }
}
#endif

// Whether a job's tiles take dot_tile_bf16: V alone, x and R bfloat16 (R's rows contiguous), the CPU able.
template <typename T, typename X>
TR_INLINE bool bf16_dot(const Job<T, X>& j) {
#ifdef TR_BF16_DOT
  if constexpr (!std::is_same_v<T, X>) return !j.U && j.V && j.Rh && j.r_col == 1 && has_bf16_dot();
#endif
  return false;
}

// U alone for many factor rows and few rows of x (the weight gradients of duplicated_padding and
// duplicated_diagonal_padding at the MNIST shape: 32 rows of L, x folded to 128 rows): blocks of NA
// rows of U by STRIP vectors of columns stay in registers over all M rows of x, so each output is
// written once, where the tiles' axpys read and write their U rows once per tile of 4 rows of x, from
// L2 when RA rows of a K block outgrow L1. One core, that pass: 50-53 ms against 59-61 (median of 7,
// thread clock); with x's strip (M rows) beyond L1 it lost (M = 784: 3x slower). L: the block's first
// row of L (rows of M). pf: the same strip OUTER_AHEAD columns on (or null), fetched into L2.
constexpr int STRIP = 4;           // vectors of columns per register block (GROUP x STRIP accumulators)
constexpr i64 OUTER_AHEAD = 1024;  // columns
constexpr i64 OUTER_STRIP_BYTES = 32 * 1024;   // most of x's strip (M rows x STRIP vectors): an L1
template <typename T, int NA, typename X>
TR_INLINE void outer_block(const X* x, i64 M, i64 K, const T* L, T* u, const X* pf) {
  vec<T> acc[NA][STRIP] = {};
  for (i64 m = 0; m < M; ++m) {
    const X* xr = x + m * K;
    if (pf)
      for (int v = 0; v < STRIP; ++v) __builtin_prefetch(pf + m * K + v * W<T>, 0, 2);
    vec<T> xv[STRIP];
    for (int v = 0; v < STRIP; ++v) xv[v] = load_x(xr + v * W<T>);
    for (int a = 0; a < NA; ++a) {
      const vec<T> c = vec<T>{} + L[a * M + m];
      for (int v = 0; v < STRIP; ++v) acc[a][v] += c * xv[v];
    }
  }
  for (int a = 0; a < NA; ++a)
    for (int v = 0; v < STRIP; ++v) store(u + a * K + v * W<T>, acc[a][v]);
}

template <typename T, typename X>
TR_INLINE void outer_u(const Job<T, X>& j) {
  const i64 M = j.M, K = j.K, RA = j.RA, strip = STRIP * W<T>;
  for (i64 b = j.b0; b < j.b1; ++b) {
    const X* xb = j.x + b * M * K;
    T* Ub = j.U + b * RA * K;
    i64 k = j.k_begin;
    for (; k + strip <= j.k_end; k += strip) {
      const X* pf = k + OUTER_AHEAD + strip <= j.k_end ? xb + k + OUTER_AHEAD : nullptr;
      for (i64 a0 = 0; a0 < RA; a0 += GROUP)
        with_rows(int(std::min<i64>(GROUP, RA - a0)), [&](auto NA) TR_INLINE_LAMBDA {
          outer_block<T, decltype(NA)::value, X>(xb + k, M, K, j.L + a0 * M, Ub + a0 * K + k, a0 ? nullptr : pf);
        });
    }
    for (i64 a = 0; a < RA; ++a)   // the last columns, fewer than a strip
      for (i64 kk = k; kk < j.k_end; ++kk) {
        T s = 0;
        for (i64 m = 0; m < M; ++m) s += j.L[a * M + m] * x_at(xb + m * K, kk);
        Ub[a * K + kk] = s;
      }
  }
}

// Batches [b0, b1) and columns [k_begin, k_end) of a job; adds to V (zeroed by split).
template <typename T, typename X>
TR_INLINE void pass(const Job<T, X>& j) {
  if (j.U && !j.V && j.RA > 2 * GROUP && j.M * STRIP * 64 <= OUTER_STRIP_BYTES) return outer_u(j);
  const bool dot16 = bf16_dot(j);
  const i64 M = j.M, K = j.K, RA = j.U ? j.RA : 0, RB = j.V ? j.RB : 0;
  const i64 kb_t = pass_block<T, X>(RA + RB), kb = dot16 ? 2 * kb_t : kb_t;   // (dot16: 2-byte x and R rows)
  alignas(64) T buf[std::is_same_v<T, X> ? 1 : L1_TILE / sizeof(T)];   // a widened tile (kb <= its row)
  T* keep[TILE];
  for (int i = 0; i < TILE; ++i) keep[i] = buf + (std::is_same_v<T, X> ? 0 : i * kb_t);
  for (i64 b = j.b0; b < j.b1; ++b) {
    T* Ub = RA ? j.U + b * RA * K : nullptr;
    for (i64 a = 0; a < RA; ++a) std::fill(Ub + a * K + j.k_begin, Ub + a * K + j.k_end, T(0));
    for (i64 k0 = j.k_begin; k0 < j.k_end; k0 += kb) {
      const i64 n = std::min(kb, j.k_end - k0);
      if (j.pack && RB && !dot16) pack_block(j, k0, n);
      for (i64 i0 = 0; i0 < M; i0 += TILE) {
        const int rows = int(std::min<i64>(TILE, M - i0));
        const X* x[TILE];   // a short last tile repeats its last row; the repeats add nothing
        for (int i = 0; i < TILE; ++i) x[i] = j.x + (b * M + i0 + std::min(i, rows - 1)) * K + k0;
        // The next tile (in this block, the next block or the next batch), fetched during this
        // one's arithmetic.
        const X* next[TILE];
        const X* const* pf = next;
        if (i0 + TILE < M)
          for (int i = 0; i < TILE; ++i) next[i] = x[0] + std::min<i64>(TILE + i, M - i0 - 1) * K;
        else if (k0 + kb < j.k_end || b + 1 < j.b1)
          for (int i = 0; i < TILE; ++i)
            next[i] = j.x + (k0 + kb < j.k_end ? b * M * K + k0 + kb : (b + 1) * M * K + j.k_begin) +
                      std::min<i64>(i, M - 1) * K;
        else
          pf = nullptr;
#ifdef TR_BF16_DOT
        if constexpr (!std::is_same_v<T, X>)
          if (dot16) {
            dot_tile_bf16(j, x, pf, rows, n, k0, j.V + b * M + i0, j.N * M);
            continue;
          }
#endif
        tile(j, x, pf, keep, rows, n, b, i0, k0, Ub);
      }
    }
  }
}

// chain: V[:, b*RA + a] = R @ (L @ X[b])[a], the core L X[b] R^T of a Kronecker apply whose left
// factor is thin (duplicated_padding's ones(1, q): x's q column blocks summed), from one read of x
// and one of R. Each tile of TILE rows of L @ X[b] (over batches and L's rows) is formed in L1 and
// dotted with R's rows of the K block, which stay in L2 for all batches: R is read once, not once
// per batch as in the pass. For columns [k_begin, k_end).
template <typename T, typename X>
TR_INLINE void chain(const Job<T, X>& j) {
  const i64 M = j.M, K = j.K, RA = j.RA, RB = j.RB, rows_all = j.N * RA, kb = k_block<T>(RB);
  alignas(64) T buf[L1_TILE / sizeof(T)];   // TILE rows of a K block (kb <= its row)
  for (i64 k0 = j.k_begin; k0 < j.k_end; k0 += kb) {
    const i64 n = std::min(kb, j.k_end - k0);
    if (j.pack) pack_block(j, k0, n);
    for (i64 c0 = 0; c0 < rows_all; c0 += TILE) {
      const int rows = int(std::min<i64>(TILE, rows_all - c0));
      const T* u[TILE];   // a short last tile repeats its last row; the repeats add nothing
      for (int i = 0; i < rows; ++i) {
        const i64 b = (c0 + i) / RA, a = (c0 + i) % RA;
        // x's rows of the next tile's row i (or of this block's first batch), fetched meanwhile:
        // its rows are short runs far apart, which the hardware prefetcher does not foresee.
        const i64 bn = (c0 + TILE + i < rows_all ? c0 + TILE + i : i % rows_all) / RA;
        const X* xb = j.x + b * M * K + k0;
        const X* pf = j.x + bn * M * K + (c0 + TILE + i < rows_all ? k0 : k0 + kb);
        const bool fetch = c0 + TILE + i < rows_all || k0 + kb < j.k_end;
        T* out = buf + i * n;
        const T* l = j.L + a * M;
        i64 k = 0;
        for (; k + W<T> <= n; k += W<T>) {
          vec<T> acc{};
          for (i64 m = 0; m < M; ++m) {
            if (fetch) __builtin_prefetch(pf + m * K + k, 0, 2);
            acc += l[m] * load_x(xb + m * K + k);
          }
          store(out + k, acc);
        }
        for (; k < n; ++k) {
          T acc = 0;
          for (i64 m = 0; m < M; ++m) acc += l[m] * x_at(xb + m * K, k);
          out[k] = acc;
        }
        u[i] = out;
      }
      for (int i = rows; i < TILE; ++i) u[i] = u[rows - 1];
      dot_tile(j, u, static_cast<const T* const*>(nullptr), static_cast<T* const*>(nullptr), rows, n, k0, j.V + c0,
               rows_all);
    }
  }
}

TR_CLONES void run_f32(const Job<float>& j) { j.expand ? expand(j) : j.chain ? chain(j) : pass(j); }
TR_CLONES void run_f64(const Job<double>& j) { j.expand ? expand(j) : j.chain ? chain(j) : pass(j); }
TR_CLONES void run_bf16(const Job<float, bf16>& j) { j.chain ? chain(j) : pass(j); }

// Task t of run_tasks, with its own buffers. By batches (disjoint outputs): chunks taken from a
// shared counter until none is left, so a thread the OS leaves waiting (2 cores shared with other
// processes) costs only the chunk it holds, not a fixed half of the work. By columns: chunk t alone,
// summed into task t's own V, so the partial sums are added in one order, the same on every run.
template <typename T, typename X>
struct Work {
  Job<T, X> job;   // this task's buffers; its range is set per chunk
  std::atomic<i64>* next;
  i64 chunks, size;
  bool by_batch;
};

template <typename T, typename X>
void run_chunk(const Work<T, X>& w, i64 c) {
  Job<T, X> j = w.job;
  if (w.by_batch)
    j.b0 = c * w.size, j.b1 = std::min(j.N, (c + 1) * w.size);
  else
    j.k_begin = std::min(j.K, c * w.size), j.k_end = std::min(j.K, (c + 1) * w.size);
  if constexpr (!std::is_same_v<T, X>)
    run_bf16(j);
  else if constexpr (sizeof(T) == 4)
    run_f32(j);
  else
    run_f64(j);
}

template <typename T, typename X>
void run(void* works, int t) {
  const Work<T, X>& w = static_cast<const Work<T, X>*>(works)[t];
  if (!w.by_batch) return run_chunk(w, t);
  for (i64 c; (c = w.next->fetch_add(1)) < w.chunks;) run_chunk(w, c);
}

// Splits a job over up to `threads` threads: by batches when there are enough of them, 8 chunks
// per thread; else by column blocks of K, one per task (each task but the first sums its V into a
// buffer of its own, added to V at the end in task order). A thread costs tens of microseconds to
// start: each gets ~1M elements of x.
template <typename T, typename X>
int split(int threads, const Job<T, X>& whole) {
  constexpr int MAX_THREADS = 256, CHUNKS_PER_THREAD = 8;
  const i64 N = whole.N, K = whole.K, cap = 1 + N * whole.M * K / (1 << 20);
  const int n = int(std::clamp<i64>(std::min<i64>(threads, cap), 1, MAX_THREADS));
  const bool by_batch = N >= n && !whole.chain;   // a chain reads R once per K block for all batches
  const i64 per = by_batch ? (N + n * CHUNKS_PER_THREAD - 1) / (n * CHUNKS_PER_THREAD) : (K + n - 1) / n;
  const i64 size = by_batch ? std::max<i64>(per, 1) : (per + W<T> - 1) / W<T> * W<T>;   // whole vectors
  const i64 chunks = by_batch ? (N + size - 1) / size : (K + size - 1) / size;
  const i64 v_size = whole.V ? whole.RB * N * (whole.chain ? whole.RA : whole.M) : 0;
  if (whole.V) std::fill_n(whole.V, v_size, T(0));   // passes add to V
  std::vector<T> partial(by_batch ? 0 : size_t(v_size) * (n - 1));
  const i64 pack_size =
      whole.V && (whole.r_col != 1 || whole.Rh)
          ? whole.RB * (whole.chain ? k_block<T>(whole.RB) : pass_block<T, X>(whole.RB + whole.RA))
          : 0;
  std::vector<T> packs(size_t(pack_size) * n);
  std::atomic<i64> next{0};
  Work<T, X> works[MAX_THREADS];
  for (int t = 0; t < n; ++t) {
    works[t] = {whole, &next, chunks, size, by_batch};
    works[t].job.pack = pack_size ? packs.data() + t * pack_size : nullptr;
    if (!by_batch && t > 0 && whole.V) works[t].job.V = partial.data() + (t - 1) * v_size;
  }
  tr_threads::run_tasks(n, run<T, X>, works);
  for (int t = 1; t < n && !by_batch; ++t)
    for (i64 e = 0; e < v_size; ++e) whole.V[e] += partial[(t - 1) * v_size + e];
  return 0;
}

#ifdef TR_BF16_DOT
// A chain of a bfloat16 x and R (M <= 2 RA) where the CPU has AVX-512 BF16: P = R @ (x folded to N*M rows)^T
// by the pass's bfloat16 dot products, then V[:, b*RA + a] = sum_m L[a, m] P[:, b*M + m]. M dot products
// per batch and row of R instead of RA, each at half the instructions, and no rows of L @ X[b] formed
// in float32 (duplicated_padding's ones(1, 2) at the MNIST shape: its bfloat16 apply went from about the
// float32 one's time to 0.75-0.83 of it).
int chain_by_dots(int threads, const bf16* x, const float* L, const bf16* R, float* V, i64 N, i64 M, i64 K, i64 RA,
                  i64 RB) {
  std::vector<float> P(size_t(RB * N * M));
  const int code = split<float, bf16>(threads, {x, L, nullptr, nullptr, P.data(), 1, N * M, K, 0, RB, 0, 1, 0, K, false,
                                                false, K, 1, nullptr, R});
  for (i64 r = 0; r < RB && !code; ++r)
    for (i64 b = 0; b < N; ++b)
      for (i64 a = 0; a < RA; ++a) {
        float s = 0;
        for (i64 m = 0; m < M; ++m) s += L[a * M + m] * P[size_t((r * N + b) * M + m)];
        V[(r * N + b) * RA + a] = s;
      }
  return code;
}
#endif

template <typename T, typename X = T>
int dispatch(int threads, const void* x, const void* L, const void* R, void* U, void* V, i64 N, i64 M, i64 K, i64 RA,
             i64 RB, bool expand, bool chain, i64 r_row, i64 r_col, bool r_bf16 = false) try {
#ifdef TR_BF16_DOT
  if constexpr (!std::is_same_v<T, X>)
    if (chain && r_bf16 && M <= 2 * RA && has_bf16_dot())
      return chain_by_dots(threads, static_cast<const X*>(x), static_cast<const T*>(L), static_cast<const bf16*>(R),
                           static_cast<T*>(V), N, M, K, RA, RB);
#endif
  return split<T, X>(threads, {static_cast<const X*>(x), static_cast<const T*>(L),
                               r_bf16 ? nullptr : static_cast<const T*>(R), static_cast<T*>(U), static_cast<T*>(V), N, M,
                               K, RA, RB, 0, N, 0, K, expand, chain, r_row, r_col, nullptr,
                               r_bf16 ? static_cast<const bf16*>(R) : nullptr});
} catch (const std::bad_alloc&) {   // the per-thread buffers of a K split
  return 2;
}

int pass_or_chain(bool chain, int dtype, int threads, const void* x, const void* L, const void* R, void* U, void* V,
                  i64 N, i64 M, i64 K, i64 RA, i64 RB, i64 r_row, i64 r_col) {
  if (N < 0 || M < 0 || K < 0 || RA < 0 || RB < 0 || (!U && !V) || dtype < 0 || dtype > 3) return 1;
  return dtype == 0   ? dispatch<float>(threads, x, L, R, U, V, N, M, K, RA, RB, false, chain, r_row, r_col)
         : dtype == 1 ? dispatch<double>(threads, x, L, R, U, V, N, M, K, RA, RB, false, chain, r_row, r_col)
                      : dispatch<float, bf16>(threads, x, L, R, U, V, N, M, K, RA, RB, false, chain, r_row, r_col,
                                              dtype == 3);
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 (pass and chain) a bfloat16 x with float32 factors and outputs, 3 the
// same with a bfloat16 R (read as is); buffers contiguous unless said otherwise. threads: how many to use
// at most (the caller passes torch's setting).

// U (N, RA, K) and V (RB, N*M) from x (N, M, K), L (RA, M), R (RB, K) with strides (r_row, r_col)
// (the others contiguous). U or V may be null (not wanted: L or R is then not read), not both.
TR_EXPORT int tinyrecon_cpu_kron_pass(int dtype, int threads, const void* x, const void* L, const void* R, void* U,
                                      void* V, i64 N, i64 M, i64 K, i64 RA, i64 RB, i64 r_row, i64 r_col) {
  return pass_or_chain(false, dtype, threads, x, L, R, U, V, N, M, K, RA, RB, r_row, r_col);
}
TR_ENTRY_POINT(tinyrecon_cpu_kron_pass)

// V (RB, N*RA) = R @ U^T: the rows of U[b] = L @ X[b] dotted with R's rows (R contiguous), U itself
// never stored.
TR_EXPORT int tinyrecon_cpu_kron_chain(int dtype, int threads, const void* x, const void* L, const void* R, void* V,
                                       i64 N, i64 M, i64 K, i64 RA, i64 RB) {
  return V ? pass_or_chain(true, dtype, threads, x, L, R, nullptr, V, N, M, K, RA, RB, K, 1) : 1;
}
TR_ENTRY_POINT(tinyrecon_cpu_kron_chain)

// dx (N, M, K) = L^T @ G[b] for G (N, RA, K), L (RA, M); RA at most 64.
TR_EXPORT int tinyrecon_cpu_kron_expand(int dtype, int threads, const void* G, const void* L, void* dx, i64 N, i64 M,
                                        i64 K, i64 RA) {
  if (N < 0 || M < 0 || K < 0 || RA < 0 || RA > 64 || (dtype != 0 && dtype != 1)) return 1;
  return dtype == 0 ? dispatch<float>(threads, G, L, nullptr, dx, nullptr, N, M, K, RA, 0, true, false, 0, 1)
                    : dispatch<double>(threads, G, L, nullptr, dx, nullptr, N, M, K, RA, 0, true, false, 0, 1);
}
TR_ENTRY_POINT(tinyrecon_cpu_kron_expand)
