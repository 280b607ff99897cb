// pairwise_sqdist on the CPU through the shared Gram engine (gram.h): per
// batch, bank ("b") tiles packed once, query ("a") tiles
// packed centred, register-blocked dot products, then
// out = max(||a||^2 + ||b||^2 - 2 a.b, 0) with an exact recheck where that
// value is small next to the norms (the expansion cancels there; duplicates
// come out exactly 0).
//
// Compiled once per instruction set (simd.h); entry point: cpu/dispatch.cpp.
#include "exact_dist.h"
#include "gram.h"
#include "kernels.h"
#include "simd.h"
#include "tiles.h"

namespace sp {
namespace SP_ISA_NS {

namespace {

// Values below kRecheck * (||a||^2 + ||b||^2) (centred norms) are recomputed
// from differences: the expansion's rounding error is ~1e-7 of the norms.
constexpr float kRecheck = 1.f / 1024.f;

// Writes rows [i0, i0 + rows) x columns [j0, j0 + cols) of one batch's output
// from the dot products in cbuf (row stride ldc).
void epilogue(const float* a, const float* b, index_t d, index_t m, const float* qn,
              const float* bn, const float* cbuf, index_t ldc, index_t i0, index_t rows,
              index_t j0, index_t cols, float* out) {
  const vreg two = vset1(2.f), zero = vzero(), recheck = vset1(kRecheck);
  for (index_t r = 0; r < rows; ++r) {
    const float* row = cbuf + r * ldc;
    float* dst = out + (i0 + r) * m + j0;
    const float* ai = a + (i0 + r) * d;
    const vreg vq = vset1(qn[r]);
    index_t c = 0;
    for (; c + kW <= cols; c += kW) {
      const vreg norms = vadd(vq, vload(bn + c));
      const vreg v = vmax(vfnma(two, vload(row + c), norms), zero);
      vstore(dst + c, v);
      for (unsigned mask = vlt_mask(v, vmul(recheck, norms)); mask; mask &= mask - 1) {
        const index_t cc = c + __builtin_ctz(mask);
        dst[cc] = float(exact_sqdist(ai, b + (j0 + cc) * d, d));
      }
    }
    for (; c < cols; ++c) {
      const float norms = qn[r] + bn[c];
      const float v = fmaxf0(norms - 2.f * row[c]);
      dst[c] = v < kRecheck * norms ? float(exact_sqdist(ai, b + (j0 + c) * d, d)) : v;
    }
  }
}

// One batch: a [n, d], b [m, d] -> out [n, m], on the calling thread.
struct Batch {
  const float* a;
  const float* b;
  float* out;
  index_t n, m, d;
};

void one_batch_serial(const Batch& p, float* mean, double* mean_acc, float* bpack, float* bn,
                      float* qpack, float* qn, float* cbuf) {
  const Chunks ch(p.d);
  sample_mean(p.b, p.m, p.d, 1, mean, mean_acc);
  for (index_t j0 = 0; j0 < p.m; j0 += kTM) {
    const index_t cols = imin(kTM, p.m - j0), cols_pad = round_up(cols, kNR);
    pack_bank(p.b + j0 * p.d, cols, p.d, mean, ch, bpack, bn);
    for (index_t i0 = 0; i0 < p.n; i0 += kTQ) {
      const index_t rows = imin(kTQ, p.n - i0);
      pack_queries(p.a + i0 * p.d, rows, p.d, mean, qpack, qn);
      tile_dots(qpack, round_up(rows, kMR), bpack, cols_pad, ch, p.d, cbuf, kTM);
      epilogue(p.a, p.b, p.d, p.m, qn, bn, cbuf, kTM, i0, rows, j0, cols, p.out);
    }
  }
}

}  // namespace

void pairwise_sqdist(const float* a, const float* b, float* out, index_t B, index_t n, index_t m,
                     index_t d) {
  const int threads = max_threads();
  const index_t n_btiles = (m + kTM - 1) / kTM, n_qtiles = (n + kTQ - 1) / kTQ;

  if (B >= 2 * index_t(threads) || threads == 1 || B * n_btiles * n_qtiles == 1) {
    // Many small problems: one batch per thread at a time.
    const index_t per_thread = Carve::size(d) + TileScratch::floats(kTQ, kTM, d, true);
    Buffer<float> scratch;
    Buffer<double> mean_acc;
    float* scratch0 = scratch.get(size_t(per_thread) * threads);
    double* acc0 = mean_acc.get(size_t(d) * threads);
#pragma omp parallel num_threads(threads) if (B > 1)
    {
      float* mean = scratch0 + index_t(thread_id()) * per_thread;
      const TileScratch ts(mean + Carve::size(d), kTQ, kTM, d, true);
      double* acc = acc0 + index_t(thread_id()) * d;
#pragma omp for schedule(dynamic, 1)
      for (index_t bb = 0; bb < B; ++bb)
        one_batch_serial(Batch{a + bb * n * d, b + bb * m * d, out + bb * n * m, n, m, d}, mean,
                         acc, ts.bpack, ts.bn, ts.qpack, ts.qn, ts.cbuf);
    }
    return;
  }

  // Few large problems: split each over the threads.
  const Chunks ch(d);
  const bool bank_major = n_btiles >= 2 * index_t(threads) || n_qtiles < 2 * index_t(threads);
  Buffer<float> mean_buf, shared_pack, shared_bn;
  Buffer<double> mean_acc;
  float* mean = mean_buf.get(size_t(d));
  double* mean_partial = mean_acc.get(size_t(d) * threads);
  if (!bank_major) {
    shared_pack.get(size_t(n_btiles) * kTM * d);
    shared_bn.get(size_t(n_btiles) * kTM);
  }
  const index_t per_thread = TileScratch::floats(kTQ, kTM, d, bank_major);
  Buffer<float> scratch;
  float* scratch0 = scratch.get(size_t(per_thread) * threads);
  for (index_t bb = 0; bb < B; ++bb) {
    const float* ab = a + bb * n * d;
    const float* bb_rows = b + bb * m * d;
    float* ob = out + bb * n * m;
    sample_mean(bb_rows, m, d, threads, mean, mean_partial);
#pragma omp parallel num_threads(threads)
    {
      const TileScratch ts(scratch0 + index_t(thread_id()) * per_thread, kTQ, kTM, d, bank_major);
      float *qpack = ts.qpack, *qn = ts.qn, *cbuf = ts.cbuf;
      if (bank_major) {
        float *bpack = ts.bpack, *bn = ts.bn;
#pragma omp for schedule(dynamic, 1)
        for (index_t bt = 0; bt < n_btiles; ++bt) {
          const index_t j0 = bt * kTM, cols = imin(kTM, m - j0), cols_pad = round_up(cols, kNR);
          pack_bank(bb_rows + j0 * d, cols, d, mean, ch, bpack, bn);
          for (index_t i0 = 0; i0 < n; i0 += kTQ) {
            const index_t rows = imin(kTQ, n - i0);
            pack_queries(ab + i0 * d, rows, d, mean, qpack, qn);
            tile_dots(qpack, round_up(rows, kMR), bpack, cols_pad, ch, d, cbuf, kTM);
            epilogue(ab, bb_rows, d, m, qn, bn, cbuf, kTM, i0, rows, j0, cols, ob);
          }
        }
      } else {
        float* spack = shared_pack.ptr;
        float* sbn = shared_bn.ptr;
#pragma omp for schedule(dynamic, 1)
        for (index_t bt = 0; bt < n_btiles; ++bt) {
          const index_t j0 = bt * kTM;
          pack_bank(bb_rows + j0 * d, imin(kTM, m - j0), d, mean, ch, spack + bt * kTM * d,
                    sbn + bt * kTM);
        }  // implicit barrier: the packed bank is complete
#pragma omp for schedule(dynamic, 1)
        for (index_t qt = 0; qt < n_qtiles; ++qt) {
          const index_t i0 = qt * kTQ, rows = imin(kTQ, n - i0);
          pack_queries(ab + i0 * d, rows, d, mean, qpack, qn);
          for (index_t bt = 0; bt < n_btiles; ++bt) {
            const index_t j0 = bt * kTM, cols = imin(kTM, m - j0);
            tile_dots(qpack, round_up(rows, kMR), spack + bt * kTM * d, round_up(cols, kNR), ch, d,
                      cbuf, kTM);
            epilogue(ab, bb_rows, d, m, qn, sbn + bt * kTM, cbuf, kTM, i0, rows, j0, cols, ob);
          }
        }
      }
    }
  }
}

}  // namespace SP_ISA_NS
}  // namespace sp
