// Batched local outlier factor on the CPU.
//
// Per group (one OpenMP task each): the n x n squared distances are first
// approximated in float32 as ||a||^2 + ||b||^2 - 2 a.b on the group-centred
// data, with a register-blocked SIMD Gram kernel (AVX-512 8x32, AVX2 6x16 or
// scalar tiles). The float32 error of every approximate distance is bounded
// by c * (||a||^2 + ||b||^2), so every sample whose approximate distance is
// within twice that bound of the k-th smallest one is a candidate; candidates
// get the exact distance (float64, summed in numpy's order, from the original
// data), and the k nearest are chosen exactly (ties -> lower index). The LOF
// arithmetic is float64 and follows scikit-learn.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_simd.h"

// GCC 12 reports false "uninitialized" warnings inside its AVX-512 headers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include "lof.h"

// The exact distances must not contract a*b+c into an FMA (numpy rounds each
// product); the float32 Gram kernels use explicit FMA intrinsics instead.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#define SP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define SP_TARGET_AVX2 __attribute__((target("avx2,fma")))

namespace sp {
namespace {

// ------------------------------------------------------------------ ISA choice
using cpu::Isa;  // shared with knn/pairwise (cpu_simd.h)

Isa best_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return best;
}

// SOFTPATCH_CPU_ISA=avx512|avx2|scalar caps the instruction set (read on every
// call so tests can exercise each path); a level the CPU lacks falls back to
// the best one it has (parsing shared with knn/pairwise: cpu_simd.h).
Isa select_isa() { return cpu::isa_capped_by_env(best_isa()); }

// ------------------------------------------------------------------ exact distance
// numpy's float64 ((a - b) ** 2).sum(): pairwise sum with 8 interleaved
// accumulators in blocks of <= 128 elements.
inline double sq_diff(const float* a, const float* b, index_t t) {
  double u = double(a[t]) - double(b[t]);
  return u * u;
}

double exact_sqdist(const float* a, const float* b, index_t n) {
  if (n > 128) {
    index_t n2 = n / 2;
    n2 -= n2 % 8;
    return exact_sqdist(a, b, n2) + exact_sqdist(a + n2, b + n2, n - n2);
  }
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

// ------------------------------------------------------------------ Gram kernels
// B is packed in panels of NR columns: bp[(panel * d + t) * NR + c] = x[panel*NR + c][t].
// A micro-kernel computes MR rows x NR columns of dot products over all d.
template <Isa I> struct Tile;
template <> struct Tile<Isa::Avx512> { static constexpr int MR = 8, NR = 32; };
template <> struct Tile<Isa::Avx2> { static constexpr int MR = 6, NR = 16; };
template <> struct Tile<Isa::Scalar> { static constexpr int MR = 4, NR = 8; };

SP_TARGET_AVX512 void micro_avx512(const float* const a[8], const float* bp, index_t d,
                                   float* out, index_t ldo) {
  __m512 c[8][2];
  for (int r = 0; r < 8; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  for (index_t t = 0; t < d; ++t) {
    __m512 b0 = _mm512_loadu_ps(bp + t * 32), b1 = _mm512_loadu_ps(bp + t * 32 + 16);
    for (int r = 0; r < 8; ++r) {
      __m512 av = _mm512_set1_ps(a[r][t]);
      c[r][0] = _mm512_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm512_fmadd_ps(av, b1, c[r][1]);
    }
  }
  for (int r = 0; r < 8; ++r) {
    _mm512_storeu_ps(out + r * ldo, c[r][0]);
    _mm512_storeu_ps(out + r * ldo + 16, c[r][1]);
  }
}

SP_TARGET_AVX2 void micro_avx2(const float* const a[6], const float* bp, index_t d,
                               float* out, index_t ldo) {
  __m256 c[6][2];
  for (int r = 0; r < 6; ++r) c[r][0] = c[r][1] = _mm256_setzero_ps();
  for (index_t t = 0; t < d; ++t) {
    __m256 b0 = _mm256_loadu_ps(bp + t * 16), b1 = _mm256_loadu_ps(bp + t * 16 + 8);
    for (int r = 0; r < 6; ++r) {
      __m256 av = _mm256_broadcast_ss(a[r] + t);
      c[r][0] = _mm256_fmadd_ps(av, b0, c[r][0]);
      c[r][1] = _mm256_fmadd_ps(av, b1, c[r][1]);
    }
  }
  for (int r = 0; r < 6; ++r) {
    _mm256_storeu_ps(out + r * ldo, c[r][0]);
    _mm256_storeu_ps(out + r * ldo + 8, c[r][1]);
  }
}

void micro_scalar(const float* const a[4], const float* bp, index_t d, float* out, index_t ldo) {
  float c[4][8] = {};
  for (index_t t = 0; t < d; ++t)
    for (int r = 0; r < 4; ++r) {
      const float av = a[r][t];
      for (int j = 0; j < 8; ++j) c[r][j] += av * bp[t * 8 + j];
    }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 8; ++j) out[r * ldo + j] = c[r][j];
}

template <Isa I>
inline void micro(const float* const* a, const float* bp, index_t d, float* out, index_t ldo) {
  if constexpr (I == Isa::Avx512) micro_avx512(a, bp, d, out, ldo);
  else if constexpr (I == Isa::Avx2) micro_avx2(a, bp, d, out, ldo);
  else micro_scalar(a, bp, d, out, ldo);
}

// ------------------------------------------------------------------ row selection
// For row i: approx[j] = ||a_i||^2 + ||a_j||^2 - 2 a_i.a_j (self = +inf), the
// k-th smallest of them (k <= 32, kept sorted in `top`), then every j != i with
// approx[j] <= limit(kth) appended to `cand`. SIMD compares skip the (many)
// values that cannot enter the running top-k.
inline void top_insert(float v, float* top, index_t k, index_t& filled) {
  index_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && top[pos - 1] > v) { top[pos] = top[pos - 1]; --pos; }
  top[pos] = v;
}

struct RowLimit {
  double c_err, nrm_max;
  // float32 limit, rounded up, for the k-th smallest approximate distance `kth`.
  float operator()(float kth, float ni) const {
    const double err = c_err * (double(ni) + nrm_max);
    const double lim = (double(kth) + 2. * err) * (1. + 1e-9) + 1e-30;
    float f = float(lim);
    return double(f) < lim ? std::nextafter(f, std::numeric_limits<float>::infinity()) : f;
  }
};

void row_select_scalar(const float* dot, const float* nrm, float ni, index_t n, index_t i, index_t k,
                       const RowLimit& lim, float* approx, float* top, std::vector<index_t>& cand) {
  for (index_t j = 0; j < n; ++j) approx[j] = ni + nrm[j] - 2.f * dot[j];
  approx[i] = std::numeric_limits<float>::infinity();
  index_t filled = 0;
  for (index_t j = 0; j < n; ++j) {
    const float v = approx[j];
    if (j == i || (filled == k && !(v < top[k - 1]))) continue;
    top_insert(v, top, k, filled);
  }
  const float limit = lim(top[k - 1], ni);
  for (index_t j = 0; j < n; ++j)
    if (j != i && approx[j] <= limit) cand.push_back(j);
}

SP_TARGET_AVX2 void row_select_avx2(const float* dot, const float* nrm, float ni, index_t n, index_t i,
                                    index_t k, const RowLimit& lim, float* approx, float* top,
                                    std::vector<index_t>& cand) {
  const __m256 vni = _mm256_set1_ps(ni), two = _mm256_set1_ps(2.f);
  const index_t n8 = n - n % 8;
  for (index_t j = 0; j < n8; j += 8)
    _mm256_storeu_ps(approx + j, _mm256_sub_ps(_mm256_add_ps(vni, _mm256_loadu_ps(nrm + j)),
                                               _mm256_mul_ps(two, _mm256_loadu_ps(dot + j))));
  for (index_t j = n8; j < n; ++j) approx[j] = ni + nrm[j] - 2.f * dot[j];
  approx[i] = std::numeric_limits<float>::infinity();
  index_t filled = 0;
  float thr = std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < n8; j += 8) {
    const __m256 v = _mm256_loadu_ps(approx + j);
    unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_set1_ps(thr), _CMP_LT_OQ)));
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      const float val = approx[j + b];
      if (!(val < thr)) continue;
      top_insert(val, top, k, filled);
      if (filled == k) thr = top[k - 1];
    }
  }
  for (index_t j = n8; j < n; ++j)
    if (approx[j] < thr) {
      top_insert(approx[j], top, k, filled);
      if (filled == k) thr = top[k - 1];
    }
  // The self entry is +inf, never below a finite threshold, so it never entered `top`.
  const float limit = lim(top[k - 1], ni);
  const __m256 vl = _mm256_set1_ps(limit);
  for (index_t j = 0; j < n8; j += 8) {
    unsigned m = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(approx + j), vl, _CMP_LE_OQ)));
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      cand.push_back(j + b);
    }
  }
  for (index_t j = n8; j < n; ++j)
    if (approx[j] <= limit) cand.push_back(j);
}

SP_TARGET_AVX512 void row_select_avx512(const float* dot, const float* nrm, float ni, index_t n, index_t i,
                                        index_t k, const RowLimit& lim, float* approx, float* top,
                                        std::vector<index_t>& cand) {
  const __m512 vni = _mm512_set1_ps(ni), two = _mm512_set1_ps(2.f);
  const index_t n16 = n - n % 16;
  for (index_t j = 0; j < n16; j += 16)
    _mm512_storeu_ps(approx + j, _mm512_sub_ps(_mm512_add_ps(vni, _mm512_loadu_ps(nrm + j)),
                                               _mm512_mul_ps(two, _mm512_loadu_ps(dot + j))));
  for (index_t j = n16; j < n; ++j) approx[j] = ni + nrm[j] - 2.f * dot[j];
  approx[i] = std::numeric_limits<float>::infinity();
  index_t filled = 0;
  float thr = std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < n16; j += 16) {
    const __m512 v = _mm512_loadu_ps(approx + j);
    unsigned m = _mm512_cmp_ps_mask(v, _mm512_set1_ps(thr), _CMP_LT_OQ);
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      const float val = approx[j + b];
      if (!(val < thr)) continue;
      top_insert(val, top, k, filled);
      if (filled == k) thr = top[k - 1];
    }
  }
  for (index_t j = n16; j < n; ++j)
    if (approx[j] < thr) {
      top_insert(approx[j], top, k, filled);
      if (filled == k) thr = top[k - 1];
    }
  const float limit = lim(top[k - 1], ni);
  const __m512 vl = _mm512_set1_ps(limit);
  for (index_t j = 0; j < n16; j += 16) {
    unsigned m = _mm512_cmp_ps_mask(_mm512_loadu_ps(approx + j), vl, _CMP_LE_OQ);
    while (m) {
      const int b = __builtin_ctz(m);
      m &= m - 1;
      cand.push_back(j + b);
    }
  }
  for (index_t j = n16; j < n; ++j)
    if (approx[j] <= limit) cand.push_back(j);
}

// ------------------------------------------------------------------ per group
struct Workspace {
  std::vector<float> xc;       // centred group, n x d
  std::vector<float> bp;       // packed panels
  std::vector<float> nrm;      // squared norms of the centred rows
  std::vector<float> dots;     // MR x n_pad dot products of one row panel
  std::vector<float> approx;   // one row of approximate squared distances
  std::vector<float> top;      // k smallest approximate distances
  std::vector<index_t> cand_idx;
  std::vector<std::pair<double, index_t>> cand;
  std::vector<index_t> nbr;    // n x k neighbour indices
  std::vector<double> ndist;   // n x k exact neighbour distances
  std::vector<double> lrd;
  std::vector<double> mean;
};

// k nearest other samples of every row: nbr / ndist, nearest first.
template <Isa I>
void knn_group(const float* x, index_t n, index_t d, index_t k, Workspace& ws) {
  constexpr int MR = Tile<I>::MR, NR = Tile<I>::NR;
  const index_t n_pad = (n + NR - 1) / NR * NR, panels = n_pad / NR;

  // Centre the group (distances are unchanged, the Gram cancellation shrinks).
  ws.mean.assign(d, 0.);
  for (index_t i = 0; i < n; ++i)
    for (index_t t = 0; t < d; ++t) ws.mean[t] += x[i * d + t];
  for (index_t t = 0; t < d; ++t) ws.mean[t] /= double(n);
  ws.xc.resize(size_t(n) * d);
  ws.nrm.resize(n);
  float nrm_max = 0.f;
  for (index_t i = 0; i < n; ++i) {
    float s = 0.f;
    for (index_t t = 0; t < d; ++t) {
      float v = float(double(x[i * d + t]) - ws.mean[t]);
      ws.xc[i * d + t] = v;
      s += v * v;
    }
    ws.nrm[i] = s;
    nrm_max = std::max(nrm_max, s);
  }
  ws.bp.assign(size_t(n_pad) * d, 0.f);
  for (index_t p = 0; p < panels; ++p)
    for (index_t c = 0; c < NR && p * NR + c < n; ++c) {
      const float* row = ws.xc.data() + (p * NR + c) * d;
      float* dst = ws.bp.data() + p * d * NR + c;
      for (index_t t = 0; t < d; ++t) dst[t * NR] = row[t];
    }
  // Bound of |float32 approx - exact| per pair: c_err * (nrm_i + nrm_j), covering
  // the centring rounding, the norms, the dot product (any order, FMA or not)
  // and the final additions, with a factor ~2 to spare.
  const double c_err = double(d + 16) * std::ldexp(1.0, -22);

  ws.dots.resize(size_t(MR) * n_pad);
  ws.approx.resize(n);
  ws.top.resize(k);
  ws.nbr.resize(size_t(n) * k);
  ws.ndist.resize(size_t(n) * k);
  const RowLimit lim{c_err, double(nrm_max)};
  // Norms beyond float32 range (|x| ~ 1e19 after centring): no usable approximation.
  const bool brute = !(double(nrm_max) * 4. < double(std::numeric_limits<float>::max()));
  const float* rows[MR];
  for (index_t i0 = 0; i0 < n; i0 += MR) {
    for (int r = 0; r < MR; ++r) rows[r] = ws.xc.data() + std::min(i0 + r, n - 1) * d;
    for (index_t p = 0; p < panels; ++p)
      micro<I>(rows, ws.bp.data() + p * d * NR, d, ws.dots.data() + p * NR, n_pad);
    for (index_t r = 0; r < MR && i0 + r < n; ++r) {
      const index_t i = i0 + r;
      const float* dot = ws.dots.data() + r * n_pad;
      const float ni = ws.nrm[i];
      ws.cand_idx.clear();
      if (brute) {  // float32 Gram values overflow: every other sample is a candidate
        for (index_t j = 0; j < n; ++j) ws.cand_idx.push_back(j);
      } else if (k <= 32) {
        if constexpr (I == Isa::Avx512)
          row_select_avx512(dot, ws.nrm.data(), ni, n, i, k, lim, ws.approx.data(), ws.top.data(), ws.cand_idx);
        else if constexpr (I == Isa::Avx2)
          row_select_avx2(dot, ws.nrm.data(), ni, n, i, k, lim, ws.approx.data(), ws.top.data(), ws.cand_idx);
        else
          row_select_scalar(dot, ws.nrm.data(), ni, n, i, k, lim, ws.approx.data(), ws.top.data(), ws.cand_idx);
      } else {
        for (index_t j = 0; j < n; ++j) ws.approx[j] = ni + ws.nrm[j] - 2.f * dot[j];
        ws.approx[i] = std::numeric_limits<float>::infinity();  // self is never a neighbour
        // The k-th smallest of all n equals that of the others: self is +inf and k <= n - 1.
        std::vector<float> tmp(ws.approx.begin(), ws.approx.end());
        std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end());
        const float limit = lim(tmp[k - 1], ni);
        for (index_t j = 0; j < n; ++j)
          if (j != i && ws.approx[j] <= limit) ws.cand_idx.push_back(j);
      }
      ws.cand.clear();
      for (index_t j : ws.cand_idx) {
        if (j == i) continue;
        ws.cand.emplace_back(std::sqrt(exact_sqdist(x + i * d, x + j * d, d)), j);
      }
      // Pairs sort by (distance, index): ties go to the lower index.
      std::partial_sort(ws.cand.begin(), ws.cand.begin() + k, ws.cand.end());
      for (index_t t = 0; t < k; ++t) {
        ws.nbr[i * k + t] = ws.cand[t].second;
        ws.ndist[i * k + t] = ws.cand[t].first;
      }
    }
  }
}

template <Isa I>
void lof_run(const float* x, index_t B, index_t n, index_t d, index_t k, float* out) {
#pragma omp parallel
  {
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (index_t g = 0; g < B; ++g) {
      knn_group<I>(x + g * n * d, n, d, k, ws);
      // scikit-learn: reach(a, b) = max(kdist(b), d(a, b)), lrd = 1 / (mean reach + 1e-10),
      // lof(a) = mean over neighbours b of lrd(b) / lrd(a).
      ws.lrd.resize(n);
      for (index_t i = 0; i < n; ++i) {
        double s = 0.;
        for (index_t t = 0; t < k; ++t) {
          const index_t b = ws.nbr[i * k + t];
          s += std::max(ws.ndist[b * k + k - 1], ws.ndist[i * k + t]);
        }
        ws.lrd[i] = 1. / (s / double(k) + 1e-10);
      }
      for (index_t i = 0; i < n; ++i) {
        double s = 0.;
        for (index_t t = 0; t < k; ++t) s += ws.lrd[ws.nbr[i * k + t]] / ws.lrd[i];
        // Finite by construction; clamp so float32 cannot overflow to inf for
        // extreme duplicate patterns (lrd ratios up to ~1e10 x distance scale).
        out[g * n + i] = float(std::min(s / double(k), double(std::numeric_limits<float>::max())));
      }
    }
  }
}

}  // namespace

void lof_cpu(const float* x, index_t B, index_t n, index_t d, index_t k, float* out) {
  SP_CHECK_ARG(n >= 2 && k >= 1 && k <= n - 1, "lof: need n >= 2 and 1 <= k <= n - 1");
  SP_CHECK_ARG(B >= 1 && d >= 1, "lof: need B >= 1 and d >= 1");
  switch (select_isa()) {
    case Isa::Avx512: lof_run<Isa::Avx512>(x, B, n, d, k, out); break;
    case Isa::Avx2: lof_run<Isa::Avx2>(x, B, n, d, k, out); break;
    default: lof_run<Isa::Scalar>(x, B, n, d, k, out); break;
  }
}

}  // namespace sp
