// CPU instruction-set dispatch and the shared distance-tile engine.
//
// Run-time dispatch: pairwise_cpu.cpp and knn_cpu.cpp are compiled once per
// instruction set (CMake: SP_CPU_ISA=0 portable, 1 AVX2+FMA, 2 AVX-512 with
// per-file -m flags; never -march=native), each copy inside its own namespace
// (sp::cpu_scalar / sp::cpu_avx2 / sp::cpu_avx512) so no inline function or
// template compiled with AVX-512 can be picked by the linker for another copy.
// The portable copy (SP_CPU_DISPATCH) also holds the entry points, which pick
// the copy to run from CPUID at every call, overridable with the environment
// variable SOFTPATCH_CPU_ISA=avx512|avx2|scalar (tests run every path).
//
// Code in the per-ISA section must therefore not instantiate std:: templates
// over builtin types (std::vector<float>, std::min<long>, ...): those are weak
// symbols shared by all copies. Templates over our namespaced types are safe.
//
// Distance tile: squared distances through ||a||^2 + ||b||^2 - 2 a.b on data
// centred on the bank mean (translation leaves distances unchanged but shrinks
// the norms, hence the cancellation error). The a.b products come from a
// register-blocked outer-product micro-kernel (MR query rows x NR bank rows in
// registers) over a bank tile packed as [d-chunk][NR-group][p][NR] and a
// query tile packed as centred rows.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>

#include "common.h"

namespace sp {
namespace cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Names as accepted by SOFTPATCH_CPU_ISA and reported by build_info().
const char* isa_name(Isa isa);
// Compiled into this module and supported by this CPU (CPUID + OS state).
bool isa_supported(Isa isa);
// The ISA that SOFTPATCH_CPU_ISA names (case and spaces ignored); false when it
// is unset, empty or "auto". Throws std::invalid_argument for an unknown name.
bool isa_requested_by_env(Isa* requested);
// `best` capped at the level SOFTPATCH_CPU_ISA names (lof/kcenter: a level the
// CPU lacks falls back to the best one it has).
inline Isa isa_capped_by_env(Isa best) {
  Isa want;
  if (!isa_requested_by_env(&want)) return best;
  return want < best ? want : best;
}
// The best supported ISA, or the one SOFTPATCH_CPU_ISA names; throws
// std::invalid_argument for an unknown name or an unsupported ISA.
Isa active_isa();

}  // namespace cpu
}  // namespace sp

// ----------------------------------------------------------------------------
// Per-ISA section: only when compiling one of the ISA copies.
#ifdef SP_CPU_ISA

#if SP_CPU_ISA == 2
#define SP_ISA_NS cpu_avx512
#elif SP_CPU_ISA == 1
#define SP_ISA_NS cpu_avx2
#else
#define SP_ISA_NS cpu_scalar
#endif

#if SP_CPU_ISA >= 1
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace sp {
namespace SP_ISA_NS {

// ---------------------------------------------------------------- vectors
#if SP_CPU_ISA == 2
using vreg = __m512;
constexpr int kW = 16;
inline vreg vzero() { return _mm512_setzero_ps(); }
inline vreg vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vreg x) { _mm512_storeu_ps(p, x); }
inline vreg vset1(float x) { return _mm512_set1_ps(x); }
inline vreg vfma(vreg a, vreg b, vreg c) { return _mm512_fmadd_ps(a, b, c); }
inline vreg vfnma(vreg a, vreg b, vreg c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
inline vreg vadd(vreg a, vreg b) { return _mm512_add_ps(a, b); }
inline vreg vsub(vreg a, vreg b) { return _mm512_sub_ps(a, b); }
inline vreg vmul(vreg a, vreg b) { return _mm512_mul_ps(a, b); }
inline vreg vmax(vreg a, vreg b) { return _mm512_max_ps(a, b); }
inline unsigned vlt_mask(vreg a, vreg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline float vsum(vreg a) { return _mm512_reduce_add_ps(a); }
// In-register transpose of a 16 x 16 block (r[i] = row i -> r[k] = column k).
constexpr bool kHasTranspose = true;
inline void transpose(vreg r[kW]) {
  vreg t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[i + c], 128-bit lane L: rows i..i+3 of column 4L + c
    r[i + 0] = _mm512_shuffle_ps(t[i + 0], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i + 0], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  vreg out[16];
  for (int c = 0; c < 4; ++c) {
    const vreg a0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    const vreg a1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    const vreg b0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    const vreg b1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
    out[c] = _mm512_shuffle_f32x4(a0, b0, 0x88);
    out[8 + c] = _mm512_shuffle_f32x4(a0, b0, 0xdd);
    out[4 + c] = _mm512_shuffle_f32x4(a1, b1, 0x88);
    out[12 + c] = _mm512_shuffle_f32x4(a1, b1, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = out[i];
}
// Micro-tile: 8 query rows x 48 bank rows = 24 accumulators of 32 registers.
constexpr int kMR = 8, kNRV = 3;
constexpr int kKC = 128;        // d-chunk: packed bank micro-panel 128 x 48 x 4 B = 24 KiB (L1)
constexpr int kTMGroups = 5;    // bank tile 240 rows
#elif SP_CPU_ISA == 1
using vreg = __m256;
constexpr int kW = 8;
inline vreg vzero() { return _mm256_setzero_ps(); }
inline vreg vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vreg x) { _mm256_storeu_ps(p, x); }
inline vreg vset1(float x) { return _mm256_set1_ps(x); }
inline vreg vfma(vreg a, vreg b, vreg c) { return _mm256_fmadd_ps(a, b, c); }
inline vreg vfnma(vreg a, vreg b, vreg c) { return _mm256_fnmadd_ps(a, b, c); }
inline vreg vadd(vreg a, vreg b) { return _mm256_add_ps(a, b); }
inline vreg vsub(vreg a, vreg b) { return _mm256_sub_ps(a, b); }
inline vreg vmul(vreg a, vreg b) { return _mm256_mul_ps(a, b); }
inline vreg vmax(vreg a, vreg b) { return _mm256_max_ps(a, b); }
inline unsigned vlt_mask(vreg a, vreg b) {
  return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}
inline float vsum(vreg a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
// In-register transpose of an 8 x 8 block (r[i] = row i -> r[k] = column k).
constexpr bool kHasTranspose = true;
inline void transpose(vreg r[kW]) {
  vreg t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // r[i + c], 128-bit lane L: rows i..i+3 of column 4L + c
    r[i + 0] = _mm256_shuffle_ps(t[i + 0], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i + 0], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  vreg out[8];
  for (int c = 0; c < 4; ++c) {
    out[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
    out[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = out[i];
}
// Micro-tile: 6 query rows x 16 bank rows = 12 accumulators of 16 registers.
constexpr int kMR = 6, kNRV = 2;
constexpr int kKC = 256;        // 256 x 16 x 4 B = 16 KiB
constexpr int kTMGroups = 16;   // bank tile 256 rows
#else
// Portable: GCC/Clang vector extensions, 4 floats: one register of the
// baseline vector unit (SSE2 on x86-64, NEON on AArch64).
constexpr int kW = 4;
typedef float vreg __attribute__((vector_size(16)));
inline vreg vzero() { return vreg{}; }
inline vreg vload(const float* p) { vreg r; __builtin_memcpy(&r, p, sizeof r); return r; }
inline void vstore(float* p, vreg a) { __builtin_memcpy(p, &a, sizeof a); }
inline vreg vset1(float v) { return vreg{} + v; }
inline vreg vfma(vreg a, vreg b, vreg c) { return a * b + c; }
inline vreg vfnma(vreg a, vreg b, vreg c) { return c - a * b; }
inline vreg vadd(vreg a, vreg b) { return a + b; }
inline vreg vsub(vreg a, vreg b) { return a - b; }
inline vreg vmul(vreg a, vreg b) { return a * b; }
inline vreg vmax(vreg a, vreg b) { return a > b ? a : b; }
inline unsigned vlt_mask(vreg a, vreg b) {
  const auto lt = a < b;
  unsigned m = 0;
  for (int l = 0; l < kW; ++l) m |= unsigned(lt[l] != 0) << l;
  return m;
}
inline float vsum(vreg a) { float s = 0.f; for (int l = 0; l < kW; ++l) s += a[l]; return s; }
constexpr bool kHasTranspose = false;  // packing uses the scalar loop
inline void transpose(vreg*) {}
constexpr int kMR = 6, kNRV = 2;  // 12 of 16 SSE registers hold accumulators
constexpr int kKC = 256;
constexpr int kTMGroups = 32;   // bank tile 256 rows
#endif

constexpr int kNR = kNRV * kW;            // bank rows per micro-tile
constexpr int kTM = kTMGroups * kNR;      // default bank rows per tile
constexpr int kTQ = 8 * kMR * (SP_CPU_ISA == 2 ? 1 : 2);  // default query rows per tile
constexpr float kInf = std::numeric_limits<float>::infinity();

inline index_t imin(index_t a, index_t b) { return a < b ? a : b; }
inline index_t imax(index_t a, index_t b) { return a > b ? a : b; }
inline index_t round_up(index_t x, index_t to) { return (x + to - 1) / to * to; }
inline float fmaxf0(float x) { return x > 0.f ? x : 0.f; }

// 64-byte aligned scratch buffer (per thread, reused across tiles).
template <class T>
struct Buffer {
  T* ptr = nullptr;
  size_t size = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(ptr); }
  T* get(size_t n) {
    if (n > size) {
      std::free(ptr);
      size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
      ptr = static_cast<T*>(std::aligned_alloc(64, bytes));
      if (!ptr) throw std::bad_alloc();
      size = n;
    }
    return ptr;
  }
};

// Hands out 64-byte aligned slices of one buffer: all scratch memory is
// allocated before a parallel region (an exception inside one would abort).
struct Carve {
  float* next;
  float* take(index_t n) {
    float* p = next;
    next += (n + 15) / 16 * 16;
    return p;
  }
  static index_t size(index_t n) { return (n + 15) / 16 * 16; }
};

// Splits d into chunks of at most kKC, as equal as possible (d = 129 -> 65 + 64,
// not 128 + 1), so the last chunk does not run a nearly empty micro-kernel.
struct Chunks {
  index_t count, base, extra;  // first `extra` chunks have base + 1 elements
  explicit Chunks(index_t d) {
    count = (d + kKC - 1) / kKC;
    base = d / count;
    extra = d % count;
  }
  index_t start(index_t c) const { return c * base + imin(c, extra); }
  index_t len(index_t c) const { return base + (c < extra ? 1 : 0); }
};

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Centre for the expansion: column means of at most ~2048 evenly spaced rows
// of x [n, d] (the centre only has to be near the data; a full pass would
// double the memory traffic of a small-query knn). Rows split across
// `threads` threads; partial holds d * threads doubles.
inline void sample_mean(const float* x, index_t n, index_t d, int threads, float* mean,
                        double* partial) {
  const index_t step = imax(1, n / 2048), count = (n + step - 1) / step;
  for (index_t p = 0; p < d * threads; ++p) partial[p] = 0.0;
#pragma omp parallel num_threads(threads) if (count * d > (1 << 20))
  {
    double* acc = partial + index_t(thread_id()) * d;
#pragma omp for schedule(static)
    for (index_t i = 0; i < count; ++i) {
      const float* row = x + i * step * d;
      for (index_t p = 0; p < d; ++p) acc[p] += row[p];
    }
  }
  for (index_t p = 0; p < d; ++p) {
    double s = 0.0;
    for (int t = 0; t < threads; ++t) s += partial[index_t(t) * d + p];
    mean[p] = float(s / double(count));
  }
}

// Squared norm of (x - mean) over d elements, vector partial sums.
inline float centred_sqnorm(const float* x, const float* mean, index_t d) {
  vreg acc = vzero();
  index_t p = 0;
  for (; p + kW <= d; p += kW) {
    const vreg v = vsub(vload(x + p), vload(mean + p));
    acc = vfma(v, v, acc);
  }
  float s = vsum(acc);
  for (; p < d; ++p) {
    const float v = x[p] - mean[p];
    s += v * v;
  }
  return s;
}

// Packs bank rows [0, rows) of `b` (row stride d) centred on `mean` into
// [chunk][group][p][kNR]; rows past `rows` up to a multiple of kNR are zero and
// get norm +inf so they can never be a nearest neighbour. Writes the centred
// squared norms to bn[0, round_up(rows, kNR)).
inline void pack_bank(const float* b, index_t rows, index_t d, const float* mean,
                      const Chunks& ch, float* packed, float* bn) {
  const index_t rows_pad = round_up(rows, kNR);
  // Group by group (kNR rows, a few hundred KiB at most), so the rows read
  // for the norms are still in cache when they are packed.
  for (index_t g = 0; g < rows_pad / kNR; ++g) {
    for (index_t j = g * kNR; j < (g + 1) * kNR; ++j)
      bn[j] = j < rows ? centred_sqnorm(b + j * d, mean, d) : kInf;
    for (index_t c = 0; c < ch.count; ++c) {
      const index_t p0 = ch.start(c), kc = ch.len(c);
      float* panel = packed + rows_pad * p0 + g * kc * kNR;
      const float* mu = mean + p0;
      for (index_t jb = 0; jb < kNR; jb += kW) {
        const index_t j = g * kNR + jb;
        const float* src = b + j * d + p0;
        if (kHasTranspose && j + kW <= rows) {
          index_t p = 0;
          for (; p + kW <= kc; p += kW) {  // kW x kW blocks through registers
            vreg r[kW];
            const vreg m = vload(mu + p);
            for (int l = 0; l < kW; ++l) r[l] = vsub(vload(src + l * d + p), m);
            transpose(r);
            for (int l = 0; l < kW; ++l) vstore(panel + (p + l) * kNR + jb, r[l]);
          }
          for (; p < kc; ++p)
            for (int l = 0; l < kW; ++l) panel[p * kNR + jb + l] = src[l * d + p] - mu[p];
        } else {
          for (index_t l = 0; l < kW; ++l) {
            if (j + l < rows)
              for (index_t p = 0; p < kc; ++p) panel[p * kNR + jb + l] = src[l * d + p] - mu[p];
            else
              for (index_t p = 0; p < kc; ++p) panel[p * kNR + jb + l] = 0.f;
          }
        }
      }
    }
  }
}

// Packs query rows [0, rows) centred on `mean` as rows of stride d, zero rows up
// to a multiple of kMR; qn gets the centred squared norms.
inline void pack_queries(const float* a, index_t rows, index_t d, const float* mean,
                         float* packed, float* qn) {
  const index_t rows_pad = round_up(rows, kMR);
  for (index_t i = 0; i < rows_pad; ++i) {
    float* dst = packed + i * d;
    if (i < rows) {
      const float* src = a + i * d;
      vreg acc = vzero();
      index_t p = 0;
      for (; p + kW <= d; p += kW) {
        const vreg v = vsub(vload(src + p), vload(mean + p));
        vstore(dst + p, v);
        acc = vfma(v, v, acc);
      }
      float s = vsum(acc);
      for (; p < d; ++p) {
        const float v = src[p] - mean[p];
        dst[p] = v;
        s += v * v;
      }
      qn[i] = s;
    } else {
      for (index_t p = 0; p < d; ++p) dst[p] = 0.f;
      qn[i] = 0.f;
    }
  }
}

// C[MR x kNR] (+)= A[MR rows, stride lda][kc] . panel[kc][kNR]^T.
template <int MR>
inline void micro_kernel(const float* a, index_t lda, const float* panel, index_t kc,
                         float* c, index_t ldc, bool accumulate) {
  vreg acc[MR][kNRV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNRV; ++v) acc[i][v] = vzero();
  for (index_t p = 0; p < kc; ++p) {
    vreg bv[kNRV];
#pragma GCC unroll 4
    for (int v = 0; v < kNRV; ++v) bv[v] = vload(panel + p * kNR + v * kW);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const vreg ai = vset1(a[i * lda + p]);
#pragma GCC unroll 4
      for (int v = 0; v < kNRV; ++v) acc[i][v] = vfma(ai, bv[v], acc[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNRV; ++v) {
      float* dst = c + i * ldc + v * kW;
      vstore(dst, accumulate ? vadd(acc[i][v], vload(dst)) : acc[i][v]);
    }
}

// Dot products of a packed query tile (rows_pad = multiple of kMR, stride d)
// with a packed bank tile (cols_pad = multiple of kNR): C[rows_pad x cols_pad],
// row stride ldc.
inline void tile_dots(const float* qpack, index_t rows_pad, const float* bpack, index_t cols_pad,
                      const Chunks& ch, index_t d, float* c, index_t ldc) {
  for (index_t k = 0; k < ch.count; ++k) {
    const index_t p0 = ch.start(k), kc = ch.len(k);
    const float* chunk = bpack + cols_pad * p0;
    for (index_t g = 0; g < cols_pad / kNR; ++g) {
      const float* panel = chunk + g * kc * kNR;
      for (index_t i = 0; i < rows_pad; i += kMR)
        micro_kernel<kMR>(qpack + i * d + p0, d, panel, kc, c + i * ldc + g * kNR, ldc, k > 0);
    }
  }
}

// Squared distance row: out[j] = max(qn + bn[j] - 2 c[j], 0) for j < cols_pad.
inline void dist_row(float qn, const float* bn, const float* c, index_t cols_pad, float* out) {
  const vreg vq = vset1(qn), two = vset1(2.f), zero = vzero();
  for (index_t j = 0; j < cols_pad; j += kW)
    vstore(out + j, vmax(vfnma(two, vload(c + j), vadd(vq, vload(bn + j))), zero));
}

// Exact squared distance (differences first, accumulated in double) -- used to
// recheck near-ties and near-zero distances where the expansion cancels.
inline double exact_sqdist(const float* x, const float* y, index_t d) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (index_t p = 0; p < d; ++p) {
    const double t = double(x[p]) - double(y[p]);
    s += t * t;
  }
  return s;
}

}  // namespace SP_ISA_NS
}  // namespace sp

#endif  // SP_CPU_ISA
