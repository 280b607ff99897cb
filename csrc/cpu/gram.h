// The float32 Gram engine shared by every CPU kernel that needs many
// distances at once (pairwise, knn, lof): squared distances through
// ||a||^2 + ||b||^2 - 2 a.b on data centred on a mean (translation leaves
// distances unchanged but shrinks the norms, hence the cancellation error).
//
// Layouts: a "bank" tile is packed as [d-chunk][NR-group][p][kNR] (kNR rows
// side by side, so one micro-kernel step loads kNRV vectors), a "query" tile as
// centred rows of stride d, padded to a multiple of kMR. The micro-kernel keeps
// kMR x kNR dot products in registers (outer products over p).
//
// Error: see gram_error() below. Callers that must decide exactly (knn, lof)
// turn it into candidate windows and recheck those with exact_dist.h.
#pragma once
#include "simd.h"
#ifndef SP_ISA_NS
#error "gram.h belongs to the per-ISA kernel sources (compiled with SP_CPU_ISA defined)"
#endif
#include "tiles.h"

namespace sp {
namespace SP_ISA_NS {

// ---------------------------------------------------------------- tuning
#if SP_CPU_ISA == 2
constexpr int kMR = 8, kNRV = 3;  // 8 x 48 micro-tile: 24 accumulators of 32 registers
constexpr int kKC = 128;          // d-chunk: packed micro-panel 128 x 48 x 4 B = 24 KiB (L1)
constexpr int kTMGroups = 5;      // bank tile 240 rows
#elif SP_CPU_ISA == 1
constexpr int kMR = 6, kNRV = 2;  // 6 x 16: 12 accumulators of 16 registers
constexpr int kKC = 256;          // 256 x 16 x 4 B = 16 KiB
constexpr int kTMGroups = 16;     // bank tile 256 rows
#else
constexpr int kMR = 6, kNRV = 2;  // 12 of 16 SSE / 32 NEON registers hold accumulators
constexpr int kKC = 256;
constexpr int kTMGroups = 32;     // bank tile 256 rows
#endif

constexpr int kNR = kNRV * kW;            // bank rows per micro-tile
constexpr int kTM = kTMGroups * kNR;      // default bank rows per tile
constexpr int kTQ = 8 * kMR * (SP_CPU_ISA == 2 ? 1 : 2);  // default query rows per tile

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

// ---------------------------------------------------------------- centring
// Column means of at most ~2048 evenly spaced rows of x [n, d] (the centre only
// has to be near the data; a full pass would double the memory traffic of a
// small-query knn). Rows split across `threads` threads; partial holds
// d * threads doubles.
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

// ---------------------------------------------------------------- packing
// Packs bank rows [0, rows) of `b` (row stride d) centred on `mean` into
// [chunk][group][p][kNR]; rows past `rows` up to a multiple of kNR are zero and
// get norm +inf so they can never be a nearest neighbour. Writes the centred
// squared norms to bn[0, round_up(rows, kNR)).
// kCentre = false: the rows are centred already (mean and bn unused).
template <bool kCentre>
inline void pack_bank_rows(const float* b, index_t rows, index_t d, const float* mean,
                           const Chunks& ch, float* packed, float* bn) {
  const index_t rows_pad = round_up(rows, kNR);
  // Group by group (kNR rows, a few hundred KiB at most), so the rows read
  // for the norms are still in cache when they are packed.
  for (index_t g = 0; g < rows_pad / kNR; ++g) {
    if (kCentre)
      for (index_t j = g * kNR; j < (g + 1) * kNR; ++j)
        bn[j] = j < rows ? centred_sqnorm(b + j * d, mean, d) : kInf;
    for (index_t c = 0; c < ch.count; ++c) {
      const index_t p0 = ch.start(c), kc = ch.len(c);
      float* panel = packed + rows_pad * p0 + g * kc * kNR;
      const float* mu = kCentre ? mean + p0 : nullptr;
      for (index_t jb = 0; jb < kNR; jb += kW) {
        const index_t j = g * kNR + jb;
        const float* src = b + j * d + p0;
        if (kHasTranspose && j + kW <= rows) {
          index_t p = 0;
          for (; p + kW <= kc; p += kW) {  // kW x kW blocks through registers
            vreg r[kW];
            const vreg m = kCentre ? vload(mu + p) : vzero();
            for (int l = 0; l < kW; ++l) r[l] = kCentre ? vsub(vload(src + l * d + p), m) : vload(src + l * d + p);
            transpose(r);
            for (int l = 0; l < kW; ++l) vstore(panel + (p + l) * kNR + jb, r[l]);
          }
          for (; p < kc; ++p)
            for (int l = 0; l < kW; ++l) panel[p * kNR + jb + l] = kCentre ? src[l * d + p] - mu[p] : src[l * d + p];
        } else {
          for (index_t l = 0; l < kW; ++l) {
            if (j + l < rows)
              for (index_t p = 0; p < kc; ++p)
                panel[p * kNR + jb + l] = kCentre ? src[l * d + p] - mu[p] : src[l * d + p];
            else
              for (index_t p = 0; p < kc; ++p) panel[p * kNR + jb + l] = 0.f;
          }
        }
      }
    }
  }
}

inline void pack_bank(const float* b, index_t rows, index_t d, const float* mean,
                      const Chunks& ch, float* packed, float* bn) {
  pack_bank_rows<true>(b, rows, d, mean, ch, packed, bn);
}

// The same layout from rows that are centred already (e.g. by pack_queries).
inline void pack_bank_centred(const float* b, index_t rows, index_t d, const Chunks& ch,
                              float* packed) {
  pack_bank_rows<false>(b, rows, d, nullptr, ch, packed, nullptr);
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

// Per-thread tile scratch, carved from one buffer: a packed query tile (TQ
// rows of d), its norms, the TQ x TM dot products and, with a bank, a packed
// bank tile (TM rows) and its norms.
struct TileScratch {
  float *qpack, *qn, *cbuf, *bpack = nullptr, *bn = nullptr;
  static index_t floats(index_t TQ, index_t TM, index_t d, bool with_bank) {
    return Carve::size(TQ * d) + Carve::size(TQ) + Carve::size(TQ * TM) +
           (with_bank ? Carve::size(TM * d) + Carve::size(TM) : 0);
  }
  TileScratch(float* base, index_t TQ, index_t TM, index_t d, bool with_bank) {
    Carve carve{base};
    qpack = carve.take(TQ * d);
    qn = carve.take(TQ);
    cbuf = carve.take(TQ * TM);
    if (with_bank) {
      bpack = carve.take(TM * d);
      bn = carve.take(TM);
    }
  }
};

// ---------------------------------------------------------------- dot products
// C[MR x kNR] (+)= A[MR rows, stride lda][kc] . panel[kc][kNR]^T. With norms
// (qn: the MR rows', bn: the panel's kNR), C gets the squared distances
// max(qn + bn - 2 (C + A.panel), 0) instead (the last d-chunk), as dist_row.
template <int MR>
inline void micro_kernel(const float* a, index_t lda, const float* panel, index_t kc,
                         float* c, index_t ldc, bool accumulate, const float* qn = nullptr,
                         const float* bn = nullptr) {
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
  const vreg two = vset1(2.f), zero = vzero();
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kNRV; ++v) {
      float* dst = c + i * ldc + v * kW;
      vreg out = accumulate ? vadd(acc[i][v], vload(dst)) : acc[i][v];
      if (qn) out = vmax(vfnma(two, out, vadd(vset1(qn[i]), vload(bn + v * kW))), zero);
      vstore(dst, out);
    }
}

// Dot products of a packed query tile (rows_pad = multiple of kMR, stride d)
// with the NR-groups [g0, g1) of a packed bank tile holding cols_pad rows:
// C[rows_pad x (g1 - g0) kNR], row stride ldc, column 0 = first row of group g0.
inline void tile_dots(const float* qpack, index_t rows_pad, const float* bpack, index_t cols_pad,
                      index_t g0, index_t g1, const Chunks& ch, index_t d, float* c, index_t ldc) {
  for (index_t k = 0; k < ch.count; ++k) {
    const index_t p0 = ch.start(k), kc = ch.len(k);
    const float* chunk = bpack + cols_pad * p0;
    for (index_t g = g0; g < g1; ++g) {
      const float* panel = chunk + g * kc * kNR;
      for (index_t i = 0; i < rows_pad; i += kMR)
        micro_kernel<kMR>(qpack + i * d + p0, d, panel, kc, c + i * ldc + (g - g0) * kNR, ldc, k > 0);
    }
  }
}

// As tile_dots, but C gets the squared distances max(qn + bn - 2 a.b, 0)
// (qn: the norms of the query tile's rows, bn: of the whole packed bank tile),
// bit for bit what tile_dots followed by dist_row gives.
inline void tile_dists(const float* qpack, index_t rows_pad, const float* bpack, index_t cols_pad,
                       index_t g0, index_t g1, const Chunks& ch, index_t d, const float* qn,
                       const float* bn, float* c, index_t ldc) {
  for (index_t k = 0; k < ch.count; ++k) {
    const index_t p0 = ch.start(k), kc = ch.len(k);
    const bool last = k + 1 == ch.count;
    const float* chunk = bpack + cols_pad * p0;
    for (index_t g = g0; g < g1; ++g) {
      const float* panel = chunk + g * kc * kNR;
      for (index_t i = 0; i < rows_pad; i += kMR)
        micro_kernel<kMR>(qpack + i * d + p0, d, panel, kc, c + i * ldc + (g - g0) * kNR, ldc, k > 0,
                          last ? qn + i : nullptr, bn + g * kNR);
    }
  }
}

inline void tile_dots(const float* qpack, index_t rows_pad, const float* bpack, index_t cols_pad,
                      const Chunks& ch, index_t d, float* c, index_t ldc) {
  tile_dots(qpack, rows_pad, bpack, cols_pad, 0, cols_pad / kNR, ch, d, c, ldc);
}

// c such that a squared distance from this engine (dist_row, the epilogues)
// is within c (||a'||^2 + ||b'||^2) of the exact one of the original rows
// (a', b' the centred rows), to first order in 2^-24: the centring (4 ulps),
// the norms (a term passes <= d / kW + log2 kW + d % kW roundings), the
// dot product (an FMA chain per d-chunk, then the chunks added: <= kc + chunks
// roundings of |a'||b'| <= (||a'||^2 + ||b'||^2) / 2, counted twice for 2 a.b)
// and the two final roundings. Callers multiply it by 2 for the second-order
// terms and the rounding of their own bounds.
inline double gram_error(index_t d) {
  const Chunks ch(d);
  const index_t kc_max = ch.base + (ch.extra ? 1 : 0);
  return double(d / kW + 4 + d % kW + kc_max + ch.count + 4 + 2) * 0x1p-24;
}

// Squared distance row: out[j] = max(qn + bn[j] - 2 c[j], 0) for j < cols_pad.
inline void dist_row(float qn, const float* bn, const float* c, index_t cols_pad, float* out) {
  const vreg vq = vset1(qn), two = vset1(2.f), zero = vzero();
  for (index_t j = 0; j < cols_pad; j += kW)
    vstore(out + j, vmax(vfnma(two, vload(c + j), vadd(vq, vload(bn + j))), zero));
}

}  // namespace SP_ISA_NS
}  // namespace sp
