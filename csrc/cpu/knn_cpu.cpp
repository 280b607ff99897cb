// knn on the CPU: query x bank tiles through the shared Gram engine (gram.h),
// a running top-k per query, never the q x m matrix.
//
// Compiled once per instruction set (simd.h); entry point: cpu/dispatch.cpp.
//
// Work split (OpenMP):
//  * many bank tiles: threads take bank tiles dynamically and keep private
//    top-k lists for every query (each bank tile is packed exactly once);
//    the lists are merged at the end.
//  * few bank tiles (small bank): the whole bank is packed once, shared, and
//    threads take query tiles.
// Exactness: each list keeps K = k + kExtra candidates by the expanded
// distance; the final candidates (the k best and those within the expansion's
// error bound of the k-th) are rechecked with exact differences in double,
// re-sorted by (distance, index) and the first k returned. If even the K-th
// candidate is inside that bound (rows far from the bank mean, distances far
// below their norms), the query falls back to an exact scan of the bank. So
// returned distances never suffer from the expansion's cancellation, and
// near-ties it mis-ordered are put back in order.
#include <algorithm>
#include <cmath>

#include "exact_dist.h"
#include "gram.h"
#include "kernels.h"
#include "simd.h"
#include "tiles.h"
#include "topk.h"

namespace sp {
namespace SP_ISA_NS {

namespace {
// Candidates kept per list beyond k, for the exact recheck.
constexpr index_t kExtra = 8;
// Relative error bound assumed for the expansion, times (|a| + |b|)^2 >=
// ||a||^2 + ||b||^2 of the centred rows: twice gram_error(d), and at least
// ~1000 float32 epsilons.
double expansion_tolerance(index_t d) { return dmax(1.0 / 16384.0, 2.0 * gram_error(d)); }

// The k nearest rows of the whole bank by exact distance, ascending, ties to
// the lower index, into cand[0, k) (fallback when the expansion cannot rank).
void exact_scan(const float* qi, const float* bank, index_t m, index_t d, index_t k, Cand* cand) {
  index_t n = 0;
  for (index_t j = 0; j < m; ++j) {
    const Cand c{exact_sqdist(qi, bank + j * d, d), j};
    if (n == k && !(c.d2 < cand[k - 1].d2)) continue;
    index_t pos = n < k ? n++ : k - 1;
    while (pos > 0 && c.d2 < cand[pos - 1].d2) {
      cand[pos] = cand[pos - 1];
      --pos;
    }
    cand[pos] = c;
  }
}
}  // namespace

void knn(const float* queries, index_t q, const float* bank, index_t m, index_t d, index_t k,
         const float* weights, float* out_dist, index_t* out_idx, float* out_score,
         index_t tile_q, index_t tile_m) {
  const index_t TQ = tile_q > 0 ? round_up(tile_q, kMR) : kTQ;
  const index_t TM = tile_m > 0 ? round_up(tile_m, kNR) : kTM;
  const index_t K = imin(m, k + kExtra);
  const Chunks ch(d);
  const index_t n_btiles = (m + TM - 1) / TM, n_qtiles = (q + TQ - 1) / TQ;
  const double tol = expansion_tolerance(d);
  const int threads = int(imax(1, imin(max_threads(), imax(n_btiles, n_qtiles))));
  const bool bank_major = n_btiles >= 2 * index_t(threads) || n_qtiles < 2 * index_t(threads);
  const int n_lists = bank_major ? threads : 1;

  Buffer<float> mean_buf, list_dist, shared_pack, shared_bn;
  Buffer<double> mean_acc;
  Buffer<index_t> list_idx;
  float* mean = mean_buf.get(size_t(d));
  sample_mean(bank, m, d, threads, mean, mean_acc.get(size_t(d) * threads));
  float* ld = list_dist.get(size_t(n_lists) * q * K);
  index_t* li = list_idx.get(size_t(n_lists) * q * K);
  // Every list starts empty (also those of threads the runtime may not start).
#pragma omp parallel for num_threads(threads) schedule(static) if (n_lists * q * K > (1 << 16))
  for (index_t i = 0; i < n_lists * q; ++i) TopK{ld + i * K, li + i * K, K}.reset();

  // Few bank tiles: pack the whole bank once, shared by all threads.
  float* spack = nullptr;
  float* sbn = nullptr;
  if (!bank_major) {
    spack = shared_pack.get(size_t(n_btiles) * TM * d);
    sbn = shared_bn.get(size_t(n_btiles) * TM);
  }

  // Per-thread scratch: packed query tile, its norms, the dot-product tile and
  // (bank-major) the packed bank tile and its norms.
  const index_t per_thread = TileScratch::floats(TQ, TM, d, bank_major);
  Buffer<float> scratch;
  float* scratch0 = scratch.get(size_t(per_thread) * threads);
  Buffer<Cand> cand_buf;
  Cand* cand0 = cand_buf.get(size_t(threads) * n_lists * K);

#pragma omp parallel num_threads(threads)
  {
    const TileScratch ts(scratch0 + index_t(thread_id()) * per_thread, TQ, TM, d, bank_major);
    float *qpack = ts.qpack, *qn = ts.qn, *cbuf = ts.cbuf;

    if (bank_major) {
      float *bpack = ts.bpack, *bn = ts.bn;
      const index_t list0 = index_t(thread_id()) * q * K;
      // Tiles are handed out in increasing order, so each thread sees its bank
      // rows in increasing index order (what TopK's tie rule needs).
#pragma omp for schedule(dynamic, 1)
      for (index_t bt = 0; bt < n_btiles; ++bt) {
        const index_t j0 = bt * TM, cols = imin(TM, m - j0), cols_pad = round_up(cols, kNR);
        pack_bank(bank + j0 * d, cols, d, mean, ch, bpack, bn);
        for (index_t i0 = 0; i0 < q; i0 += TQ) {
          const index_t rows = imin(TQ, q - i0), rows_pad = round_up(rows, kMR);
          pack_queries(queries + i0 * d, rows, d, mean, qpack, qn);
          tile_dots(qpack, rows_pad, bpack, cols_pad, ch, d, cbuf, TM);
          for (index_t r = 0; r < rows; ++r) {
            float* row = cbuf + r * TM;
            dist_row(qn[r], bn, row, cols_pad, row);
            TopK t{ld + list0 + (i0 + r) * K, li + list0 + (i0 + r) * K, K};
            push_row(t, row, cols_pad, j0);
          }
        }
      }
    } else {
#pragma omp for schedule(dynamic, 1)
      for (index_t bt = 0; bt < n_btiles; ++bt) {
        const index_t j0 = bt * TM, cols = imin(TM, m - j0);
        pack_bank(bank + j0 * d, cols, d, mean, ch, spack + bt * TM * d, sbn + bt * TM);
      }  // implicit barrier: the packed bank is complete
#pragma omp for schedule(dynamic, 1)
      for (index_t qt = 0; qt < n_qtiles; ++qt) {
        const index_t i0 = qt * TQ, rows = imin(TQ, q - i0), rows_pad = round_up(rows, kMR);
        pack_queries(queries + i0 * d, rows, d, mean, qpack, qn);
        for (index_t bt = 0; bt < n_btiles; ++bt) {
          const index_t j0 = bt * TM, cols_pad = round_up(imin(TM, m - j0), kNR);
          const float* bn = sbn + bt * TM;
          tile_dots(qpack, rows_pad, spack + bt * TM * d, cols_pad, ch, d, cbuf, TM);
          for (index_t r = 0; r < rows; ++r) {
            float* row = cbuf + r * TM;
            dist_row(qn[r], bn, row, cols_pad, row);
            TopK t{ld + (i0 + r) * K, li + (i0 + r) * K, K};
            push_row(t, row, cols_pad, j0);
          }
        }
      }
    }
  }

  // Merge the lists, recheck the K best exactly, keep k.
#pragma omp parallel num_threads(threads)
  {
    Cand* cand = cand0 + index_t(thread_id()) * n_lists * K;
#pragma omp for schedule(static)
    for (index_t i = 0; i < q; ++i) {
      index_t n = 0;
      for (int l = 0; l < n_lists; ++l) {
        const float* dl = ld + (index_t(l) * q + i) * K;
        const index_t* il = li + (index_t(l) * q + i) * K;
        for (index_t t = 0; t < K && il[t] >= 0; ++t) cand[n++] = Cand{double(dl[t]), il[t]};
      }
      const index_t keep = imin(K, n);
      if (n_lists > 1) std::partial_sort(cand, cand + keep, cand + n);
      const float* qi = queries + i * d;
      // Only candidates within twice the expansion's error of the k-th can
      // trade places with it. The error is below tol (|a| + |b|)^2 (centred
      // rows), and |a| + |b| <= 2 |a| + dist by the triangle inequality.
      index_t check = keep;
      bool complete = true;  // the candidates surely hold the true k nearest
      if (keep > k) {
        const double kth = cand[k - 1].d2;
        const double scale = 2.0 * std::sqrt(double(centred_sqnorm(qi, mean, d))) + std::sqrt(kth);
        const double limit = kth + 2.0 * tol * scale * scale;
        check = k;
        while (check < keep && cand[check].d2 <= limit) ++check;
        // Every kept candidate is inside the error window, so rows that were
        // not kept might belong to the k nearest (rows far from the bank mean
        // whose distances are far below their norms): scan exactly.
        complete = check < keep || keep == m;
      }
      if (complete) {
        for (index_t t = 0; t < check; ++t) cand[t].d2 = exact_sqdist(qi, bank + cand[t].j * d, d);
        std::sort(cand, cand + check);
      } else {
        exact_scan(qi, bank, m, d, k, cand);
      }
      // Fewer than k candidates only happens with NaN inputs (which never
      // compare below a threshold) when the caller skipped the finiteness
      // check: fill with NaN / -1 rather than reading past the list.
      const float nan = std::numeric_limits<float>::quiet_NaN();
      for (index_t t = 0; t < k; ++t) {
        out_dist[i * k + t] = t < keep ? float(std::sqrt(cand[t].d2)) : nan;
        out_idx[i * k + t] = t < keep ? cand[t].j : -1;
      }
      if (weights && out_score) out_score[i] = keep > 0 ? out_dist[i * k] * weights[cand[0].j] : nan;
    }
  }
}

}  // namespace SP_ISA_NS
}  // namespace sp
