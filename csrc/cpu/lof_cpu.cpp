// Batched local outlier factor on the CPU.
//
// Per group (one OpenMP task each): the n x n squared distances are first
// approximated in float32 by the shared Gram engine (gram.h) on the
// group-centred data. Their error is bounded by c (||a||^2 + ||b||^2), so every
// sample whose approximate distance is within twice that bound of the k-th
// smallest one is a candidate; candidates get the exact distance (exact_dist.h:
// float64, numpy's order), and the k nearest are chosen exactly (ties -> lower
// index). The LOF arithmetic is float64 and follows scikit-learn.
//
// Compiled once per instruction set (simd.h); entry point: cpu/dispatch.cpp.
#include <algorithm>
#include <cmath>
#include <limits>

#include "exact_dist.h"
#include "gram.h"
#include "kernels.h"
#include "simd.h"
#include "tiles.h"
#include "topk.h"

namespace sp {
namespace SP_ISA_NS {

namespace {

// The k smallest values seen so far, ascending (k <= kMaxSmallK).
constexpr index_t kMaxSmallK = 32;
inline void top_insert(float v, float* top, index_t k, index_t& filled) {
  index_t pos = filled < k ? filled++ : k - 1;
  while (pos > 0 && top[pos - 1] > v) {
    top[pos] = top[pos - 1];
    --pos;
  }
  top[pos] = v;
}

// Candidate limit of one row: every j whose approximate squared distance is
// <= limit may be among the k nearest (kth: k-th smallest approximate value).
struct RowLimit {
  double c_err, nrm_max;
  float operator()(float kth, float ni) const {
    const double err = c_err * (double(ni) + nrm_max);
    const double lim = (double(kth) + 2. * err) * (1. + 1e-9) + 1e-30;
    float f = float(lim);
    return double(f) < lim ? std::nextafter(f, kInf) : f;  // rounded up
  }
};

// approx: one row of approximate squared distances, n_pad entries (+inf past n
// and at the row itself). Appends to `cand` every j with approx[j] <= the
// limit of the k-th smallest.
void row_candidates(const float* approx, index_t n_pad, index_t k, float ni, const RowLimit& lim,
                    float* top, Vec<index_t>& cand) {
  float kth;
  if (k <= kMaxSmallK) {
    index_t filled = 0;
    float thr = kInf;
    for (index_t j = 0; j < n_pad; j += kW) {
      for (unsigned mask = vlt_mask(vload(approx + j), vset1(thr)); mask; mask &= mask - 1) {
        const float v = approx[j + __builtin_ctz(mask)];
        if (!(v < thr)) continue;  // the threshold may have dropped since the compare
        top_insert(v, top, k, filled);
        if (filled == k) thr = top[k - 1];
      }
    }
    kth = top[k - 1];
  } else {
    Vec<float> tmp(approx, approx + n_pad);
    std::nth_element(tmp.begin(), tmp.begin() + (k - 1), tmp.end());
    kth = tmp[k - 1];
  }
  const vreg limit = vset1(lim(kth, ni));
  for (index_t j = 0; j < n_pad; j += kW)
    for (unsigned mask = vle_mask(vload(approx + j), limit); mask; mask &= mask - 1)
      cand.push_back(j + __builtin_ctz(mask));
}

struct Workspace {
  Vec<float> mean, bpack, bn, qpack, qn, dots, top;
  Vec<double> mean_acc;
  Vec<index_t> cand_idx;
  Vec<Cand> cand;
  Vec<index_t> nbr;     // n x k neighbour indices
  Vec<double> ndist;    // n x k exact neighbour distances
  Vec<double> lrd;
};

// k nearest other samples of every row: ws.nbr / ws.ndist, nearest first.
void knn_group(const float* x, index_t n, index_t d, index_t k, Workspace& ws) {
  const Chunks ch(d);
  const index_t n_pad = round_up(n, kNR), rows_pad = round_up(n, kMR);
  ws.mean.resize(d);
  ws.mean_acc.assign(d, 0.);
  for (index_t i = 0; i < n; ++i)
    for (index_t t = 0; t < d; ++t) ws.mean_acc[t] += x[i * d + t];
  for (index_t t = 0; t < d; ++t) ws.mean[t] = float(ws.mean_acc[t] / double(n));
  ws.bpack.resize(n_pad * d);
  ws.bn.resize(n_pad);
  ws.qpack.resize(rows_pad * d);
  ws.qn.resize(rows_pad);
  pack_bank(x, n, d, ws.mean.data(), ch, ws.bpack.data(), ws.bn.data());
  pack_queries(x, n, d, ws.mean.data(), ws.qpack.data(), ws.qn.data());
  float nrm_max = 0.f;
  for (index_t i = 0; i < n; ++i) nrm_max = ws.bn[i] > nrm_max ? ws.bn[i] : nrm_max;
  // Norms beyond float32 range (|x| ~ 1e19 after centring): no usable approximation.
  const bool brute = !(double(nrm_max) * 4. < double(std::numeric_limits<float>::max()));
  const RowLimit lim{2. * gram_error(d), double(nrm_max)};

  ws.dots.resize(kMR * n_pad);
  ws.top.resize(k < kMaxSmallK ? k : kMaxSmallK);
  ws.nbr.resize(n * k);
  ws.ndist.resize(n * k);
  for (index_t i0 = 0; i0 < n; i0 += kMR) {
    if (!brute)
      tile_dots(ws.qpack.data() + i0 * d, kMR, ws.bpack.data(), n_pad, ch, d, ws.dots.data(), n_pad);
    for (index_t i = i0; i < imin(i0 + kMR, n); ++i) {
      ws.cand_idx.clear();
      if (brute) {  // float32 Gram values overflow: every other sample is a candidate
        for (index_t j = 0; j < n; ++j)
          if (j != i) ws.cand_idx.push_back(j);
      } else {
        float* row = ws.dots.data() + (i - i0) * n_pad;
        dist_row(ws.qn[i], ws.bn.data(), row, n_pad, row);
        row[i] = kInf;  // self is never a neighbour
        row_candidates(row, n_pad, k, ws.qn[i], lim, ws.top.data(), ws.cand_idx);
      }
      ws.cand.clear();
      for (index_t j : ws.cand_idx) ws.cand.push_back(Cand{std::sqrt(exact_sqdist(x + i * d, x + j * d, d)), j});
      // (distance, index) order: ties go to the lower index.
      std::partial_sort(ws.cand.begin(), ws.cand.begin() + k, ws.cand.end());
      for (index_t t = 0; t < k; ++t) {
        ws.nbr[i * k + t] = ws.cand[t].j;
        ws.ndist[i * k + t] = ws.cand[t].d2;
      }
    }
  }
}

}  // namespace

void lof(const float* x, index_t B, index_t n, index_t d, index_t k, float* out) {
#pragma omp parallel
  {
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (index_t g = 0; g < B; ++g) {
      knn_group(x + g * n * d, n, d, k, ws);
      // scikit-learn: reach(a, b) = max(kdist(b), d(a, b)), lrd = 1 / (mean reach + 1e-10),
      // lof(a) = mean over neighbours b of lrd(b) / lrd(a).
      ws.lrd.resize(n);
      for (index_t i = 0; i < n; ++i) {
        double s = 0.;
        for (index_t t = 0; t < k; ++t) {
          const index_t b = ws.nbr[i * k + t];
          s += dmax(ws.ndist[b * k + k - 1], ws.ndist[i * k + t]);
        }
        ws.lrd[i] = 1. / (s / double(k) + 1e-10);
      }
      for (index_t i = 0; i < n; ++i) {
        double s = 0.;
        for (index_t t = 0; t < k; ++t) s += ws.lrd[ws.nbr[i * k + t]] / ws.lrd[i];
        // Finite by construction; clamp so float32 cannot overflow to inf for
        // extreme duplicate patterns (lrd ratios up to ~1e10 x distance scale).
        out[g * n + i] = float(dmin(s / double(k), double(std::numeric_limits<float>::max())));
      }
    }
  }
}

}  // namespace SP_ISA_NS
}  // namespace sp
