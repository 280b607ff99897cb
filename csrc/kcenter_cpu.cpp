// Greedy k-center (farthest-point) coreset selection on the CPU, exact and pruned.
//
// Exactness. Every distance that can change the selection is computed by
// `exact_sqdist`: float64 differences and squares summed in the order numpy's
// float64 `((x - c) ** 2).sum(-1)` uses (8 interleaved accumulators, pairwise
// split above 128 elements; never fused into FMAs). Priorities are
// w * sqrt(min sqdist) in float64 and the argmax takes the lowest index on
// ties. So the result is bit-for-bit the naive loop of _reference.py, whatever
// work the pruning below skips.
//
// Pruning. Every eligible point p (weight > 0) belongs to the group of an
// "owner" centre o(p) with u_p = exact ||p - x_o|| and mind_p <= u_p its
// current min-distance (equal in the exact variant). For a new centre c,
//   ||p - c|| >= ||c - x_o|| - u_p,
// so p cannot improve when ||c - x_o|| >= u_p + mind_p; a whole group is
// skipped when ||c - x_o|| >= max over members of (u_p + mind_p). Centre-to-
// centre distances and the per-point pre-check use fast float32 SIMD distances
// (FMA, any order) turned into lower bounds with a rigorous relative error
// bound; only points whose float32 lower bound falls below u_p get the exact
// float64 distance. Points move to the group of a centre that is strictly
// closer than their owner.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"

// GCC 12 reports false "uninitialized" warnings inside its AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kcenter.h"

// The exact kernels must not contract a*b+c into an FMA (a different rounding
// from numpy's); the float32 filters use explicit FMA intrinsics instead.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define SP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define SP_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sp {
namespace {

// ------------------------------------------------------------------ ISA choice
using cpu::Isa;  // shared with knn/pairwise (cpu_simd.h)

Isa best_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
      return Isa::Avx2;
    return Isa::Scalar;
  }();
  return best;
}

// SOFTPATCH_CPU_ISA=avx512|avx2|scalar caps the instruction set (read on every
// call so tests can exercise each path); a level the CPU lacks falls back to
// the best one it has (parsing shared with knn/pairwise: cpu_simd.h).
Isa select_isa() { return cpu::isa_capped_by_env(best_isa()); }

// ------------------------------------------------------------------ exact distance
// numpy's pairwise_sum block (n <= 128): 8 interleaved accumulators, combined
// as ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), then the tail added in order.
inline double sq_diff(const float* a, const float* b, index_t t) {
  double u = double(a[t]) - double(b[t]);
  return u * u;
}

double exact_block_scalar(const float* a, const float* b, index_t n) {
  if (n < 8) {
    double s = 0.;
    for (index_t t = 0; t < n; ++t) s += sq_diff(a, b, t);
    return s;
  }
  double r[8];
  for (int j = 0; j < 8; ++j) r[j] = sq_diff(a, b, j);
  index_t n8 = n - n % 8, t = 8;
  for (; t < n8; t += 8)
    for (int j = 0; j < 8; ++j) r[j] += sq_diff(a, b, t + j);
  double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  for (; t < n; ++t) s += sq_diff(a, b, t);
  return s;
}

// AVX2 without FMA in the target, so the compiler cannot fuse mul+add.
__attribute__((target("avx2"))) double exact_block_avx2(const float* a, const float* b, index_t n) {
  if (n < 8) return exact_block_scalar(a, b, n);
  __m256d r0 = _mm256_setzero_pd(), r1 = _mm256_setzero_pd();
  index_t n8 = n - n % 8, t = 0;
  for (; t < n8; t += 8) {
    __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + t)), _mm256_cvtps_pd(_mm_loadu_ps(b + t)));
    __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + t + 4)), _mm256_cvtps_pd(_mm_loadu_ps(b + t + 4)));
    r0 = _mm256_add_pd(r0, _mm256_mul_pd(d0, d0));
    r1 = _mm256_add_pd(r1, _mm256_mul_pd(d1, d1));
  }
  alignas(32) double r[8];
  _mm256_store_pd(r, r0);
  _mm256_store_pd(r + 4, r1);
  double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  for (; t < n; ++t) s += sq_diff(a, b, t);
  return s;
}

// Explicit-rounding intrinsics are never contracted into FMAs.
SP_TARGET_AVX512 double exact_block_avx512(const float* a, const float* b, index_t n) {
  if (n < 8) return exact_block_scalar(a, b, n);
  constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m512d r = _mm512_setzero_pd();
  index_t n8 = n - n % 8, t = 0;
  for (; t < n8; t += 8) {
    __m512d df = _mm512_sub_round_pd(_mm512_cvtps_pd(_mm256_loadu_ps(a + t)),
                                     _mm512_cvtps_pd(_mm256_loadu_ps(b + t)), R);
    r = _mm512_add_round_pd(r, _mm512_mul_round_pd(df, df, R), R);
  }
  alignas(64) double q[8];
  _mm512_store_pd(q, r);
  double s = ((q[0] + q[1]) + (q[2] + q[3])) + ((q[4] + q[5]) + (q[6] + q[7]));
  for (; t < n; ++t) s += sq_diff(a, b, t);
  return s;
}

template <Isa I>
double exact_sqdist(const float* a, const float* b, index_t n) {
  if (n > 128) {  // numpy: halve, keeping the first half a multiple of 8
    index_t n2 = n / 2;
    n2 -= n2 % 8;
    return exact_sqdist<I>(a, b, n2) + exact_sqdist<I>(a + n2, b + n2, n - n2);
  }
  if constexpr (I == Isa::Avx512) return exact_block_avx512(a, b, n);
  else if constexpr (I == Isa::Avx2) return exact_block_avx2(a, b, n);
  else return exact_block_scalar(a, b, n);
}

// ------------------------------------------------------------------ float32 filters
// Squared distances of 4 points to one centre, float32, any summation order.
void filter4_scalar(const float* c, const float* const p[4], index_t d, float out[4]) {
  for (int q = 0; q < 4; ++q) {
    float s = 0.f;
    for (index_t t = 0; t < d; ++t) {
      float u = p[q][t] - c[t];
      s += u * u;
    }
    out[q] = s;
  }
}

SP_TARGET_AVX2 void filter4_avx2(const float* c, const float* const p[4], index_t d, float out[4]) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  index_t t = 0;
  for (; t + 8 <= d; t += 8) {
    __m256 vc = _mm256_loadu_ps(c + t);
    __m256 u0 = _mm256_sub_ps(_mm256_loadu_ps(p[0] + t), vc);
    __m256 u1 = _mm256_sub_ps(_mm256_loadu_ps(p[1] + t), vc);
    __m256 u2 = _mm256_sub_ps(_mm256_loadu_ps(p[2] + t), vc);
    __m256 u3 = _mm256_sub_ps(_mm256_loadu_ps(p[3] + t), vc);
    s0 = _mm256_fmadd_ps(u0, u0, s0);
    s1 = _mm256_fmadd_ps(u1, u1, s1);
    s2 = _mm256_fmadd_ps(u2, u2, s2);
    s3 = _mm256_fmadd_ps(u3, u3, s3);
  }
  // Horizontal sums of the 4 accumulators at once.
  __m256 h01 = _mm256_hadd_ps(s0, s1), h23 = _mm256_hadd_ps(s2, s3);
  __m256 h = _mm256_hadd_ps(h01, h23);
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, r);
  for (; t < d; ++t)
    for (int q = 0; q < 4; ++q) {
      float u = p[q][t] - c[t];
      out[q] += u * u;
    }
}

SP_TARGET_AVX512 void filter4_avx512(const float* c, const float* const p[4], index_t d, float out[4]) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  index_t t = 0;
  for (; t + 16 <= d; t += 16) {
    __m512 vc = _mm512_loadu_ps(c + t);
    __m512 u0 = _mm512_sub_ps(_mm512_loadu_ps(p[0] + t), vc);
    __m512 u1 = _mm512_sub_ps(_mm512_loadu_ps(p[1] + t), vc);
    __m512 u2 = _mm512_sub_ps(_mm512_loadu_ps(p[2] + t), vc);
    __m512 u3 = _mm512_sub_ps(_mm512_loadu_ps(p[3] + t), vc);
    s0 = _mm512_fmadd_ps(u0, u0, s0);
    s1 = _mm512_fmadd_ps(u1, u1, s1);
    s2 = _mm512_fmadd_ps(u2, u2, s2);
    s3 = _mm512_fmadd_ps(u3, u3, s3);
  }
  if (t < d) {
    __mmask16 k = __mmask16((1u << (d - t)) - 1u);
    __m512 vc = _mm512_maskz_loadu_ps(k, c + t);
    __m512 u0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p[0] + t), vc);
    __m512 u1 = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p[1] + t), vc);
    __m512 u2 = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p[2] + t), vc);
    __m512 u3 = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, p[3] + t), vc);
    s0 = _mm512_fmadd_ps(u0, u0, s0);
    s1 = _mm512_fmadd_ps(u1, u1, s1);
    s2 = _mm512_fmadd_ps(u2, u2, s2);
    s3 = _mm512_fmadd_ps(u3, u3, s3);
  }
  out[0] = _mm512_reduce_add_ps(s0);
  out[1] = _mm512_reduce_add_ps(s1);
  out[2] = _mm512_reduce_add_ps(s2);
  out[3] = _mm512_reduce_add_ps(s3);
}

template <Isa I>
inline void filter4(const float* c, const float* const p[4], index_t d, float out[4]) {
  if constexpr (I == Isa::Avx512) filter4_avx512(c, p, d, out);
  else if constexpr (I == Isa::Avx2) filter4_avx2(c, p, d, out);
  else filter4_scalar(c, p, d, out);
}

// Same filters on half-precision rows (F16C / AVX-512 conversions): half the
// bytes streamed per scanned point. The centre `c` stays float32.
SP_TARGET_AVX2 void filter4h_avx2(const float* c, const uint16_t* const p[4],
                                                                   index_t d, float out[4]) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  index_t t = 0;
  for (; t + 8 <= d; t += 8) {
    __m256 vc = _mm256_loadu_ps(c + t);
    for (int q = 0; q < 4; ++q) {
      __m256 u = _mm256_sub_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[q] + t))), vc);
      s[q] = _mm256_fmadd_ps(u, u, s[q]);
    }
  }
  __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  for (; t < d; ++t)
    for (int q = 0; q < 4; ++q) {
      float u = _cvtsh_ss(p[q][t]) - c[t];
      out[q] += u * u;
    }
}

SP_TARGET_AVX512 inline __m512 load_half16(const uint16_t* a) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
}
SP_TARGET_AVX512 inline __m512 load_half16(const uint16_t* a, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, a));
}

SP_TARGET_AVX512 void filter4h_avx512(const float* c, const uint16_t* const p[4], index_t d, float out[4]) {
  __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  index_t t = 0;
  for (; t + 16 <= d; t += 16) {
    __m512 vc = _mm512_loadu_ps(c + t);
    __m512 u0 = _mm512_sub_ps(load_half16(p[0] + t), vc), u1 = _mm512_sub_ps(load_half16(p[1] + t), vc);
    __m512 u2 = _mm512_sub_ps(load_half16(p[2] + t), vc), u3 = _mm512_sub_ps(load_half16(p[3] + t), vc);
    s0 = _mm512_fmadd_ps(u0, u0, s0);
    s1 = _mm512_fmadd_ps(u1, u1, s1);
    s2 = _mm512_fmadd_ps(u2, u2, s2);
    s3 = _mm512_fmadd_ps(u3, u3, s3);
  }
  if (t < d) {
    __mmask16 k = __mmask16((1u << (d - t)) - 1u);
    __m512 vc = _mm512_maskz_loadu_ps(k, c + t);
    __m512 u0 = _mm512_sub_ps(load_half16(p[0] + t, k), vc), u1 = _mm512_sub_ps(load_half16(p[1] + t, k), vc);
    __m512 u2 = _mm512_sub_ps(load_half16(p[2] + t, k), vc), u3 = _mm512_sub_ps(load_half16(p[3] + t, k), vc);
    s0 = _mm512_fmadd_ps(u0, u0, s0);
    s1 = _mm512_fmadd_ps(u1, u1, s1);
    s2 = _mm512_fmadd_ps(u2, u2, s2);
    s3 = _mm512_fmadd_ps(u3, u3, s3);
  }
  out[0] = _mm512_reduce_add_ps(s0);
  out[1] = _mm512_reduce_add_ps(s1);
  out[2] = _mm512_reduce_add_ps(s2);
  out[3] = _mm512_reduce_add_ps(s3);
}

// Half rows of `src * scale`; returns ||src - half/scale|| rounded up (the
// exact-arithmetic error of the stored row, in the original units).
SP_TARGET_AVX2 double to_half_row(const float* src, double scale,
                                                                  uint16_t* dst, index_t d) {
  double e2 = 0.;
  for (index_t t = 0; t < d; ++t) {
    const double v = double(src[t]) * scale;  // exact: scale is a power of two
    dst[t] = _cvtss_sh(float(v), _MM_FROUND_TO_NEAREST_INT);
    const double r = v - double(_cvtsh_ss(dst[t]));
    e2 += r * r;
  }
  return e2 > 0. ? std::sqrt(e2) / scale * (1. + 1e-6) : 0.;
}

// ------------------------------------------------------------------ pivot bounds
// Per live group g: max over the 16 pivots k of max(my_lo[k] - hi_g[k],
// lo_g[k] - my_hi[k]), a lower bound of ||new centre - centre g||. Computed in
// float32: a positive difference is rounded by at most 2^-24 relative, which
// the caller's (1 - 1e-6) factor absorbs.
void pivot_lb_scalar(const float* my_lo, const float* my_hi, const float* lo, const float* hi,
                     const index_t* live, index_t nl, double* out) {
  for (index_t q = 0; q < nl; ++q) {
    const float* gl = lo + live[q] * 16;
    const float* gh = hi + live[q] * 16;
    float lb = 0.f;
    for (int k = 0; k < 16; ++k) lb = std::max(lb, std::max(my_lo[k] - gh[k], gl[k] - my_hi[k]));
    out[q] = double(lb) * (1. - 1e-6);
  }
}

SP_TARGET_AVX2 void pivot_lb_avx2(const float* my_lo, const float* my_hi, const float* lo, const float* hi,
                                  const index_t* live, index_t nl, double* out) {
  const __m256 ml0 = _mm256_loadu_ps(my_lo), ml1 = _mm256_loadu_ps(my_lo + 8);
  const __m256 mh0 = _mm256_loadu_ps(my_hi), mh1 = _mm256_loadu_ps(my_hi + 8);
  for (index_t q = 0; q < nl; ++q) {
    const float* gl = lo + live[q] * 16;
    const float* gh = hi + live[q] * 16;
    __m256 a = _mm256_max_ps(_mm256_sub_ps(ml0, _mm256_loadu_ps(gh)), _mm256_sub_ps(_mm256_loadu_ps(gl), mh0));
    __m256 b = _mm256_max_ps(_mm256_sub_ps(ml1, _mm256_loadu_ps(gh + 8)), _mm256_sub_ps(_mm256_loadu_ps(gl + 8), mh1));
    a = _mm256_max_ps(a, b);
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
    out[q] = double(std::max(0.f, _mm_cvtss_f32(r))) * (1. - 1e-6);
  }
}

SP_TARGET_AVX512 void pivot_lb_avx512(const float* my_lo, const float* my_hi, const float* lo, const float* hi,
                                      const index_t* live, index_t nl, double* out) {
  const __m512 ml = _mm512_loadu_ps(my_lo), mh = _mm512_loadu_ps(my_hi);
  for (index_t q = 0; q < nl; ++q) {
    const __m512 v = _mm512_max_ps(_mm512_sub_ps(ml, _mm512_loadu_ps(hi + live[q] * 16)),
                                   _mm512_sub_ps(_mm512_loadu_ps(lo + live[q] * 16), mh));
    out[q] = double(std::max(0.f, _mm512_reduce_max_ps(v))) * (1. - 1e-6);
  }
}

template <Isa I>
inline void pivot_lb(const float* my_lo, const float* my_hi, const float* lo, const float* hi,
                     const index_t* live, index_t nl, double* out) {
  if constexpr (I == Isa::Avx512) pivot_lb_avx512(my_lo, my_hi, lo, hi, live, nl, out);
  else if constexpr (I == Isa::Avx2) pivot_lb_avx2(my_lo, my_hi, lo, hi, live, nl, out);
  else pivot_lb_scalar(my_lo, my_hi, lo, hi, live, nl, out);
}

// ------------------------------------------------------------------ greedy loop
// Scalar code scans float32 rows; AVX2 / AVX-512 scan half rows.
template <Isa I>
using RowT = std::conditional_t<I == Isa::Scalar, float, uint16_t>;

template <Isa I>
inline void filter_rows(const float* c, const RowT<I>* const p[4], index_t d, float out[4]) {
  if constexpr (I == Isa::Avx512) filter4h_avx512(c, p, d, out);
  else if constexpr (I == Isa::Avx2) filter4h_avx2(c, p, d, out);
  else filter4_scalar(c, p, d, out);
}

// Per-point state, one record per member so a group scan reads one stream.
struct PointState {
  double u;        // exact distance to the owner centre
  double mind;     // current min-distance (<= u)
  double wt;       // sample weight (1 without weights)
  double err;      // ||point - row / scale|| (0 for float32 rows)
  index_t idx;     // original point index
};

// A group: the eligible points owned by one centre, stored contiguously (rows
// and per-point state) so that scanning a group streams memory.
template <class T>
struct Members {
  std::vector<T> rows;           // size() * d, scaled copies of the points
  std::vector<PointState> st;

  size_t size() const { return st.size(); }
  void clear() { rows.clear(); st.clear(); }
  void push_from(const Members& o, size_t q, index_t d, double new_u) {
    rows.insert(rows.end(), o.rows.begin() + q * d, o.rows.begin() + (q + 1) * d);
    st.push_back(o.st[q]);
    st.back().u = new_u;
  }
  void append(const Members& o) {
    rows.insert(rows.end(), o.rows.begin(), o.rows.end());
    st.insert(st.end(), o.st.begin(), o.st.end());
  }
  // Keeps the members whose `gone` flag is 0, in order.
  void compact(const std::vector<char>& gone, index_t d) {
    size_t k = 0;
    for (size_t q = 0; q < size(); ++q) {
      if (gone[q]) continue;
      if (k != q) {
        std::copy(rows.begin() + q * d, rows.begin() + (q + 1) * d, rows.begin() + k * d);
        st[k] = st[q];
      }
      ++k;
    }
    rows.resize(k * d);
    st.resize(k);
  }
};

template <class T>
struct Group {
  Members<T> mem;
  double bound = -1.;         // max over members of u + mind
  double best_prio = -1.;     // max over members of wt * mind
  index_t best_idx = -1;      // its lowest point index
};

inline bool better(double p, index_t i, double bp, index_t bi) {
  return p > bp || (p == bp && i < bi);
}

template <class T>
void refresh_stats(Group<T>& g) {
  double bound = -1., bp = -1.;
  index_t bi = -1;
  const Members<T>& M = g.mem;
  for (size_t q = 0; q < M.size(); ++q) {
    const PointState& P = M.st[q];
    bound = std::max(bound, P.u + P.mind);
    const double pr = P.wt * P.mind;
    if (better(pr, P.idx, bp, bi)) { bp = pr; bi = P.idx; }
  }
  g.bound = bound;
  g.best_prio = bp;
  g.best_idx = bi;
}

// Safety factor on top of the float32 error bound: covers the float64
// rounding of the exact distances and of the bounds themselves.
constexpr double kMargin = 1e-9;

// Lower bound of a true distance from its float32 squared distance `f`.
inline double lower_dist(float f, double rel_err) {
  if (!(f <= std::numeric_limits<float>::max())) return 0.;  // overflowed: no information
  double lo = double(f) * (1. - rel_err) - 1e-36;            // 1e-36 covers subnormal rounding
  return lo > 0. ? std::sqrt(lo) * (1. - kMargin) : 0.;
}

// Upper bound of a true distance from its float32 squared distance `f`.
inline double upper_dist(float f, double rel_err) {
  if (!(f <= std::numeric_limits<float>::max())) return std::numeric_limits<double>::infinity();
  return std::sqrt(double(f) * (1. + rel_err) + 1e-36) * (1. + kMargin);
}

// float32 copies of bounds, rounded outwards.
inline float round_down(double v) {
  float f = float(v);
  return double(f) > v ? std::nextafter(f, -std::numeric_limits<float>::infinity()) : f;
}
inline float round_up(double v) {
  float f = float(v);
  return double(f) < v ? std::nextafter(f, std::numeric_limits<float>::infinity()) : f;
}

// True when the float32 squared distance `f` proves the true distance >= `t`.
inline bool proves_at_least(float f, double t, double rel_err) {
  if (!(f <= std::numeric_limits<float>::max())) return false;
  return double(f) * (1. - rel_err) - 1e-36 >= t * t * (1. + kMargin);
}

template <class T>
struct Scratch {
  Members<T> moved;
  std::vector<index_t> cand, need;
  std::vector<char> gone;
};

struct Centre {
  const float* x;      // original float32 row
  const float* xs;     // row * scale, float32
  double err;          // ||x - xs / scale||
};

// Scans group `g` against the new centre, given a lower bound `dlo` of
// ||centre - owner(g)||. Members strictly closer to the new centre than to
// their owner move to `sc.moved`; min-distances drop where it is closer.
template <Isa I>
void scan_group(Group<RowT<I>>& g, const float* x, const Centre& c, index_t d, double dlo,
                double scale, double rel_err, Scratch<RowT<I>>& sc) {
  auto& M = g.mem;
  const size_t cnt = M.size();
  sc.cand.clear();
  for (size_t q = 0; q < cnt; ++q)
    if (dlo < M.st[q].u + M.st[q].mind) sc.cand.push_back(index_t(q));
  if (sc.cand.empty()) return;
  const size_t nc = sc.cand.size();
  const RowT<I>* rows[4];
  float f[4];
  size_t n_moved = 0;
  sc.need.clear();
  for (size_t b = 0; b < nc; b += 4) {
    // Short batches repeat the last candidate; the extra results are ignored.
    for (int q = 0; q < 4; ++q) rows[q] = M.rows.data() + sc.cand[std::min(b + q, nc - 1)] * d;
    filter_rows<I>(c.xs, rows, d, f);
    for (int q = 0; q < 4 && b + q < nc; ++q) {
      const index_t slot = sc.cand[b + q];
      // ||p - c|| >= ||row/scale - xs/scale|| - err_p - err_c.
      const PointState& P = M.st[slot];
      if (proves_at_least(f[q], (P.u + P.err + c.err) * scale, rel_err)) continue;
      sc.need.push_back(slot);
      // The exact pass reads the original (cold) rows: start fetching them now.
      const char* row = reinterpret_cast<const char*>(x + P.idx * d);
      for (index_t off = 0; off < index_t(sizeof(float)) * d; off += 64) _mm_prefetch(row + off, _MM_HINT_T0);
    }
  }
  if (sc.need.empty()) return;  // no member can change: the group's stats stand
  for (index_t slot : sc.need) {
    PointState& P = M.st[slot];
    const double up = P.u;
    const double e = std::sqrt(exact_sqdist<I>(x + P.idx * d, c.x, d));
    if (e < P.mind) P.mind = e;
    if (e < up) {
      if (!n_moved) sc.gone.assign(cnt, 0);
      sc.moved.push_from(M, slot, d, e);
      sc.gone[slot] = 1;
      ++n_moved;
    }
  }
  if (n_moved) M.compact(sc.gone, d);
  refresh_stats(g);
}

// Per-step work (elements) below which a step runs on one thread: a parallel
// region per step costs a barrier, and on an oversubscribed machine a barrier
// can wait milliseconds for a descheduled thread (measured: 8x slower overall
// with 2 threads on 2 busy cores when every step was parallel).
constexpr index_t kParallelWork = index_t(1) << 22;

template <Isa I>
void greedy(const float* x, index_t n, index_t d, index_t m, index_t first,
            const float* w, const std::vector<double>& init_mind, index_t* out) {
  using T = RowT<I>;
  // float32 sum of d squared rounded differences, any order, with or without
  // FMA: relative error <= (d + 2) * 2^-24; doubled for margin.
  const double rel_err = double(d + 8) * std::ldexp(1.0, -23);

  std::vector<index_t> elig;
  for (index_t p = 0; p < n; ++p)
    if (!w || w[p] > 0.f) elig.push_back(p);
  const index_t cnt = index_t(elig.size());
  // Half rows hold x * scale, a power of two keeping |x * scale| <= 2^15.
  double scale = 1.;
  if constexpr (!std::is_same_v<T, float>) {
    float amax = 0.f;
    for (index_t p : elig)
      for (index_t t = 0; t < d; ++t) amax = std::max(amax, std::fabs(x[p * d + t]));
    if (amax > 0.f) scale = std::ldexp(1.0, int(std::floor(std::log2(32768.0 / double(amax)))));
    while (double(amax) * scale > 32768.) scale *= 0.5;
  }

  std::vector<float> centres(size_t(m) * d);  // scaled float32 centre rows
  std::vector<double> centre_err(m, 0.);
  std::vector<Group<T>> groups(m);
  std::vector<index_t> live;  // steps whose group has members
  std::vector<double> dlo;
  std::vector<index_t> active;
#ifdef _OPENMP
  const int max_threads = omp_get_max_threads();
#else
  const int max_threads = 1;
#endif
  std::vector<Scratch<T>> scratch(max_threads);
  // The first kPivots centres are pivots: piv_lo/hi[g * kPivots + k] bound
  // ||centre g - pivot k||, so |.| differences bound centre-centre distances
  // without reading centre rows (most groups are skipped this way on
  // clustered data).
  constexpr index_t kPivots = 16;  // pivot_lb_* assume 16
  const index_t n_piv = std::min(m, kPivots);
  std::vector<float> piv_lo(size_t(m) * kPivots, 0.f), piv_hi(size_t(m) * kPivots, 0.f);
  std::vector<double> pivot_lbs;

  index_t c = first;
  for (index_t s = 0; s < m; ++s) {
    out[s] = c;
    float* xs = centres.data() + s * d;
    double ce2 = 0.;
    for (index_t t = 0; t < d; ++t) {
      const double v = double(x[c * d + t]) * scale;
      xs[t] = float(v);  // inexact only below float32's normal range
      ce2 += (v - double(xs[t])) * (v - double(xs[t]));
    }
    centre_err[s] = ce2 > 0. ? std::sqrt(ce2) / scale * (1. + 1e-6) : 0.;
    const Centre cen{x + c * d, xs, centre_err[s]};
    Group<T>& ng = groups[s];
    if (s == 0) {
      // Every eligible point is owned by the first centre.
      auto& M = ng.mem;
      M.rows.resize(size_t(cnt) * d);
      M.st.resize(cnt);
#pragma omp parallel for schedule(static) if (cnt * d > (1 << 16))
      for (index_t q = 0; q < cnt; ++q) {
        const index_t p = elig[q];
        PointState& P = M.st[q];
        P.idx = p;
        P.err = 0.;
        if constexpr (std::is_same_v<T, float>)
          std::memcpy(M.rows.data() + q * d, x + p * d, sizeof(float) * d);
        else
          P.err = to_half_row(x + p * d, scale, M.rows.data() + q * d, d);
        const double e = std::sqrt(exact_sqdist<I>(x + p * d, cen.x, d));
        P.u = e;
        P.mind = std::min(init_mind[p], e);
        P.wt = w ? double(w[p]) : 1.;
      }
      refresh_stats(ng);
      live.push_back(0);
    } else {
      // Bounds of the distances from the new centre to every pivot.
      const index_t have_piv = std::min(s, n_piv);
      float* my_lo = piv_lo.data() + s * kPivots;
      float* my_hi = piv_hi.data() + s * kPivots;
      for (index_t k = 0; k < have_piv; k += 4) {
        const float* rows[4];
        float f[4];
        for (int q = 0; q < 4; ++q) rows[q] = centres.data() + std::min(k + q, have_piv - 1) * d;
        filter4<I>(xs, rows, d, f);
        for (int q = 0; q < 4 && k + q < have_piv; ++q) {
          const double errs = cen.err + centre_err[k + q];
          my_lo[k + q] = round_down(std::max(0., lower_dist(f[q], rel_err) / scale - errs));
          my_hi[k + q] = round_up(upper_dist(f[q], rel_err) / scale + errs);
        }
      }
      // Lower bounds of the distances from the new centre to every live centre:
      // first from the pivots, then, where that cannot skip the group, from the rows.
      const index_t nl = index_t(live.size());
      dlo.resize(nl);
      pivot_lbs.resize(nl);
      // Pivots not chosen yet hold 0 on both sides and contribute nothing.
      pivot_lb<I>(my_lo, my_hi, piv_lo.data(), piv_hi.data(), live.data(), nl, pivot_lbs.data());
      const bool new_pivot = s < n_piv;
      active.clear();
      for (index_t q = 0; q < nl; ++q)
        if (new_pivot || pivot_lbs[q] < groups[live[q]].bound) active.push_back(q);
      const index_t nr = index_t(active.size());
#pragma omp parallel for schedule(static) if (nr * d > kParallelWork)
      for (index_t b = 0; b < nr; b += 4) {
        const float* rows[4];
        float f[4];
        for (int q = 0; q < 4; ++q) rows[q] = centres.data() + live[active[std::min(b + q, nr - 1)]] * d;
        filter4<I>(xs, rows, d, f);
        for (int q = 0; q < 4 && b + q < nr; ++q) {
          const index_t slot = active[b + q], g = live[slot];
          const double errs = cen.err + centre_err[g];
          dlo[slot] = std::max(pivot_lbs[slot], lower_dist(f[q], rel_err) / scale - errs);
          if (new_pivot) {  // centre s is pivot s: record every live centre's distance to it
            piv_lo[g * kPivots + s] = round_down(std::max(0., lower_dist(f[q], rel_err) / scale - errs));
            piv_hi[g * kPivots + s] = round_up(upper_dist(f[q], rel_err) / scale + errs);
          }
        }
      }
      if (new_pivot) my_lo[s] = my_hi[s] = 0.f;
      index_t work = 0;
      index_t kept_active = 0;
      for (index_t a = 0; a < nr; ++a) {
        const index_t q = active[a];
        const Group<T>& g = groups[live[q]];
        if (dlo[q] < g.bound) {
          active[kept_active++] = q;
          work += index_t(g.mem.size());
        }
      }
      active.resize(kept_active);
      const index_t na = index_t(active.size());
      for (auto& sc : scratch) sc.moved.clear();
#pragma omp parallel if (work * d > kParallelWork && na > 1)
      {
#ifdef _OPENMP
        Scratch<T>& sc = scratch[omp_get_thread_num()];
#else
        Scratch<T>& sc = scratch[0];
#endif
        // Chunks of several groups: per-group dispatch costs more than a small group.
#pragma omp for schedule(dynamic, 8)
        for (index_t a = 0; a < na; ++a) {
          const index_t q = active[a];
          scan_group<I>(groups[live[q]], x, cen, d, dlo[q], scale, rel_err, sc);
        }
      }
      for (auto& sc : scratch) ng.mem.append(sc.moved);
      refresh_stats(ng);
      // Drop groups that lost all their members (and free their storage).
      index_t kept = 0;
      for (index_t q = 0; q < nl; ++q) {
        Group<T>& g = groups[live[q]];
        if (g.mem.size()) live[kept++] = live[q];
        else g.mem = Members<T>();
      }
      live.resize(kept);
      if (ng.mem.size()) live.push_back(s);
    }
    if (s + 1 == m) break;
    // Next centre: the largest priority, lowest index among ties.
    double bp = -1.;
    index_t bi = -1;
    for (index_t q : live) {
      const Group<T>& g = groups[q];
      if (better(g.best_prio, g.best_idx, bp, bi)) { bp = g.best_prio; bi = g.best_idx; }
    }
    c = bi;
  }
}

// numpy's pairwise summation of a float64 array.
double pairwise_sum(const double* a, index_t n) {
  if (n < 8) {
    double s = 0.;
    for (index_t t = 0; t < n; ++t) s += a[t];
    return s;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    index_t n8 = n - n % 8, t = 8;
    for (; t < n8; t += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[t + j];
    double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; t < n; ++t) s += a[t];
    return s;
  }
  index_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

template <Isa I>
void approx_init(const float* x, index_t n, index_t d, const index_t* anchors, index_t na,
                 std::vector<double>& init) {
  // numpy: sqrt(pairwise_sqdist(x, x[anchors])).mean(axis=1) -- a pairwise sum
  // of the na distances, then one division.
#pragma omp parallel if (n * na * d > (1 << 16))
  {
    std::vector<double> dist(na);
#pragma omp for schedule(static)
    for (index_t p = 0; p < n; ++p) {
      for (index_t a = 0; a < na; ++a)
        dist[a] = std::sqrt(exact_sqdist<I>(x + p * d, x + anchors[a] * d, d));
      init[p] = pairwise_sum(dist.data(), na) / double(na);
    }
  }
}

}  // namespace

void kcenter_greedy_cpu(const float* x, index_t n, index_t d, index_t m,
                        index_t start, const float* w, index_t* out) {
  SP_CHECK_ARG(n >= 1 && d >= 1 && m >= 1, "kcenter_greedy: need n, d, m >= 1");
  SP_CHECK_ARG(start >= 0 && start < n, "kcenter_greedy: start must be in [0, n)");
  const std::vector<double> mind(n, std::numeric_limits<double>::infinity());
  switch (select_isa()) {
    case Isa::Avx512: greedy<Isa::Avx512>(x, n, d, m, start, w, mind, out); break;
    case Isa::Avx2: greedy<Isa::Avx2>(x, n, d, m, start, w, mind, out); break;
    default: greedy<Isa::Scalar>(x, n, d, m, start, w, mind, out); break;
  }
}

template <Isa I>
static void approx_run(const float* x, index_t n, index_t d, index_t m,
                       const index_t* anchors, index_t na, const float* w, index_t* out) {
  std::vector<double> init(n);
  approx_init<I>(x, n, d, anchors, na, init);
  double bp = -1.;
  index_t first = -1;
  for (index_t p = 0; p < n; ++p) {
    if (w && !(w[p] > 0.f)) continue;
    double pr = (w ? double(w[p]) : 1.) * init[p];
    if (pr > bp) { bp = pr; first = p; }
  }
  SP_CHECK_ARG(first >= 0, "kcenter_greedy_approx: no point has a positive sample_weight");
  greedy<I>(x, n, d, m, first, w, init, out);
}

void kcenter_greedy_approx_cpu(const float* x, index_t n, index_t d, index_t m,
                               const index_t* anchors, index_t na,
                               const float* w, index_t* out) {
  SP_CHECK_ARG(n >= 1 && d >= 1 && m >= 1 && na >= 1, "kcenter_greedy_approx: need n, d, m, n_anchors >= 1");
  switch (select_isa()) {
    case Isa::Avx512: approx_run<Isa::Avx512>(x, n, d, m, anchors, na, w, out); break;
    case Isa::Avx2: approx_run<Isa::Avx2>(x, n, d, m, anchors, na, w, out); break;
    default: approx_run<Isa::Scalar>(x, n, d, m, anchors, na, w, out); break;
  }
}

}  // namespace sp
