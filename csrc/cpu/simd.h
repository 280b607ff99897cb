// CPU instruction sets: one enum, one run-time choice, one vector layer.
//
// Every CPU kernel source (cpu/*_cpu.cpp and cpu/kernels.cpp) is compiled once
// per instruction set -- CMake defines SP_CPU_ISA = 0 (portable), 1 (AVX2 + FMA
// + F16C) or 2 (AVX-512F), with per-file -m flags, never -march=native -- and
// each copy lives in its own namespace (sp::cpu_scalar / cpu_avx2 / cpu_avx512).
// The x86 copies exist only on x86-64; on other machines (AArch64 servers,
// Apple silicon) the portable copy is the only one. It is written with GCC /
// Clang vector extensions, so it compiles to SSE2 on x86-64 and NEON on AArch64
// and needs no intrinsics header. cpu/dispatch.cpp (compiled once, portable)
// picks the copy at every call, from CPUID, or the one named by
//
//   SOFTPATCH_CPU_ISA=avx512|avx2|scalar   (unset, empty or "auto": the best)
//
// which pins all four ops to that path; an unknown name, or a path this CPU or
// build lacks, is an error (std::invalid_argument), never a silent substitute:
// a pin is for tests and benchmarks, which must know what ran.
//
// Per-ISA code must not instantiate std:: templates over builtin types only
// (std::vector<float>, std::min<long>, std::nth_element<float*>): those are
// weak symbols shared by all copies, and the linker keeps one of them, perhaps
// the AVX-512 one. Use Vec<T> (tiles.h: std::vector with a per-ISA allocator),
// imin/imax/dmax below, and templates over our own (namespaced) types.
// The CPU library is compiled with -ffp-contract=off: a product is fused into
// an FMA only where the code says vfma (exact_dist.h depends on it).
#pragma once
#include <cstdint>

#include "common.h"

namespace sp {
namespace cpu {

enum class Isa : int { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// Names as accepted by SOFTPATCH_CPU_ISA and reported by build_info().
const char* isa_name(Isa isa);
// Compiled into this module and supported by this CPU (CPUID + OS state).
bool isa_supported(Isa isa);
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
#if !(defined(__x86_64__) || defined(_M_X64) || defined(__i386__))
#error "SP_CPU_ISA >= 1 is an x86 instruction set; CMake builds only the portable copy elsewhere"
#endif
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include <limits>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace sp {
namespace SP_ISA_NS {

// ---------------------------------------------------------------- vectors
// vreg: kW float32 lanes. Loads and stores are unaligned.
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
inline vreg vmin(vreg a, vreg b) { return _mm512_min_ps(a, b); }
inline unsigned vlt_mask(vreg a, vreg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline unsigned vle_mask(vreg a, vreg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
inline float vsum(vreg a) { return _mm512_reduce_add_ps(a); }
inline float vhmax(vreg a) { return _mm512_reduce_max_ps(a); }
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
// Half-precision rows (k-center keeps a half-size copy of the points).
constexpr bool kHalfRows = true;
inline vreg vload_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// Writes base + l for every lane l set in `mask`, in order, to out (which has
// room for kW values); returns how many. No data-dependent branch.
inline int compress_lanes(unsigned mask, int32_t base, int32_t* out) {
  const __m512i lanes = _mm512_add_epi32(_mm512_set1_epi32(base),
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  _mm512_mask_compressstoreu_epi32(out, __mmask16(mask), lanes);
  return __builtin_popcount(mask);
}
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
inline vreg vmin(vreg a, vreg b) { return _mm256_min_ps(a, b); }
inline unsigned vlt_mask(vreg a, vreg b) {
  return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)));
}
inline unsigned vle_mask(vreg a, vreg b) {
  return unsigned(_mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)));
}
inline float vsum(vreg a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
inline float vhmax(vreg a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
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
constexpr bool kHalfRows = true;
inline vreg vload_half(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// Writes base + l for every lane l set in `mask`, in order, to out (which has
// room for kW values); returns how many. No data-dependent branch: the lane
// order comes from a table of 3-bit indices, one 32-bit entry per mask.
struct CompressTable {
  uint32_t packed[256];
  constexpr CompressTable() : packed() {
    for (unsigned m = 0; m < 256; ++m) {
      uint32_t v = 0;
      int n = 0;
      for (unsigned l = 0; l < 8; ++l)
        if (m >> l & 1u) v |= l << (3 * n++);
      packed[m] = v;
    }
  }
};
inline constexpr CompressTable kCompressTable{};
inline int compress_lanes(unsigned mask, int32_t base, int32_t* out) {
  const __m256i order = _mm256_and_si256(
      _mm256_srlv_epi32(_mm256_set1_epi32(int(kCompressTable.packed[mask])),
                        _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21)),
      _mm256_set1_epi32(7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm256_add_epi32(order, _mm256_set1_epi32(base)));
  return __builtin_popcount(mask);
}
#else
// Portable: GCC/Clang vector extensions, 4 floats: one register of the
// baseline vector unit (SSE2 on x86-64, NEON on AArch64).
constexpr int kW = 4;
typedef float vreg __attribute__((vector_size(16)));
inline vreg vzero() { return vreg{}; }
inline vreg vload(const float* p) { vreg r; __builtin_memcpy(&r, p, sizeof r); return r; }
inline void vstore(float* p, vreg a) { __builtin_memcpy(p, &a, sizeof a); }
inline vreg vset1(float v) { return vreg{} + v; }
#if defined(__aarch64__)
// -ffp-contract=off keeps a*b+c unfused; NEON's fused multiply-add is asked for explicitly.
inline vreg vfma(vreg a, vreg b, vreg c) {
  return (vreg)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
}
inline vreg vfnma(vreg a, vreg b, vreg c) {
  return (vreg)vfmsq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
}
#else
inline vreg vfma(vreg a, vreg b, vreg c) { return a * b + c; }
inline vreg vfnma(vreg a, vreg b, vreg c) { return c - a * b; }
#endif
inline vreg vadd(vreg a, vreg b) { return a + b; }
inline vreg vsub(vreg a, vreg b) { return a - b; }
inline vreg vmul(vreg a, vreg b) { return a * b; }
inline vreg vmax(vreg a, vreg b) { return a > b ? a : b; }
inline vreg vmin(vreg a, vreg b) { return a < b ? a : b; }
inline unsigned vlt_mask(vreg a, vreg b) {
  const auto lt = a < b;
  unsigned m = 0;
  for (int l = 0; l < kW; ++l) m |= unsigned(lt[l] != 0) << l;
  return m;
}
inline unsigned vle_mask(vreg a, vreg b) {
  const auto le = a <= b;
  unsigned m = 0;
  for (int l = 0; l < kW; ++l) m |= unsigned(le[l] != 0) << l;
  return m;
}
inline float vsum(vreg a) { float s = 0.f; for (int l = 0; l < kW; ++l) s += a[l]; return s; }
inline float vhmax(vreg a) {
  float s = a[0];
  for (int l = 1; l < kW; ++l) s = a[l] > s ? a[l] : s;
  return s;
}
constexpr bool kHasTranspose = false;  // packing uses the scalar loop
inline void transpose(vreg*) {}
constexpr bool kHalfRows = false;      // k-center keeps float32 rows
// Writes base + l for every lane l set in `mask`, in order, to out (which has
// room for kW values); returns how many. Branch-free stores.
inline int compress_lanes(unsigned mask, int32_t base, int32_t* out) {
  int n = 0;
  for (int l = 0; l < kW; ++l) {
    out[n] = base + l;
    n += int(mask >> l & 1u);
  }
  return n;
}
#endif

// Scalar half <-> float (F16C), for the x86 copies that keep half rows.
#if SP_CPU_ISA >= 1
inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
inline uint16_t float_to_half(float f) { return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }
#endif

// ---------------------------------------------------------------- 8 double lanes
// numpy's 8 interleaved float64 accumulators (exact_dist.h), as one AVX-512
// register, two AVX2 registers or four 2-lane vectors (SSE2 / NEON).
#if SP_CPU_ISA == 2
struct dvec8 { __m512d v; };
inline dvec8 d8_zero() { return {_mm512_setzero_pd()}; }
inline dvec8 d8_load(const float* p) { return {_mm512_cvtps_pd(_mm256_loadu_ps(p))}; }
inline dvec8 d8_load(const double* p) { return {_mm512_loadu_pd(p)}; }
inline dvec8 d8_add(dvec8 a, dvec8 b) { return {_mm512_add_pd(a.v, b.v)}; }
inline dvec8 d8_sub(dvec8 a, dvec8 b) { return {_mm512_sub_pd(a.v, b.v)}; }
inline dvec8 d8_mul(dvec8 a, dvec8 b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline void d8_store(double* p, dvec8 a) { _mm512_storeu_pd(p, a.v); }
#elif SP_CPU_ISA == 1
struct dvec8 { __m256d lo, hi; };
inline dvec8 d8_zero() { return {_mm256_setzero_pd(), _mm256_setzero_pd()}; }
inline dvec8 d8_load(const float* p) {
  return {_mm256_cvtps_pd(_mm_loadu_ps(p)), _mm256_cvtps_pd(_mm_loadu_ps(p + 4))};
}
inline dvec8 d8_load(const double* p) { return {_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4)}; }
inline dvec8 d8_add(dvec8 a, dvec8 b) { return {_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
inline dvec8 d8_sub(dvec8 a, dvec8 b) { return {_mm256_sub_pd(a.lo, b.lo), _mm256_sub_pd(a.hi, b.hi)}; }
inline dvec8 d8_mul(dvec8 a, dvec8 b) { return {_mm256_mul_pd(a.lo, b.lo), _mm256_mul_pd(a.hi, b.hi)}; }
inline void d8_store(double* p, dvec8 a) {
  _mm256_storeu_pd(p, a.lo);
  _mm256_storeu_pd(p + 4, a.hi);
}
#else
typedef double dvec2 __attribute__((vector_size(16)));
struct dvec8 { dvec2 v[4]; };
inline dvec8 d8_zero() { return {}; }
inline dvec8 d8_load(const float* p) {
  dvec8 r;
  for (int i = 0; i < 4; ++i) r.v[i] = dvec2{double(p[2 * i]), double(p[2 * i + 1])};
  return r;
}
inline dvec8 d8_load(const double* p) {
  dvec8 r;
  __builtin_memcpy(&r, p, sizeof r);
  return r;
}
inline dvec8 d8_add(dvec8 a, dvec8 b) {
  for (int i = 0; i < 4; ++i) a.v[i] += b.v[i];
  return a;
}
inline dvec8 d8_sub(dvec8 a, dvec8 b) {
  for (int i = 0; i < 4; ++i) a.v[i] -= b.v[i];
  return a;
}
inline dvec8 d8_mul(dvec8 a, dvec8 b) {
  for (int i = 0; i < 4; ++i) a.v[i] *= b.v[i];
  return a;
}
inline void d8_store(double* p, dvec8 a) { __builtin_memcpy(p, &a, sizeof a); }
#endif

// ---------------------------------------------------------------- scalars
constexpr float kInf = std::numeric_limits<float>::infinity();

inline index_t imin(index_t a, index_t b) { return a < b ? a : b; }
inline index_t imax(index_t a, index_t b) { return a > b ? a : b; }
inline double dmin(double a, double b) { return a < b ? a : b; }
inline double dmax(double a, double b) { return a > b ? a : b; }
inline index_t round_up(index_t x, index_t to) { return (x + to - 1) / to * to; }
inline float fmaxf0(float x) { return x > 0.f ? x : 0.f; }

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

// Wall-clock seconds, for scheduling decisions (a build without OpenMP runs
// one thread and times nothing).
inline double wtime() {
#ifdef _OPENMP
  return omp_get_wtime();
#else
  return 0.;
#endif
}

}  // namespace SP_ISA_NS
}  // namespace sp

#endif  // SP_CPU_ISA
