// Batched local outlier factor on the CPU. One OpenMP task per group:
//
//  1. Approximate squared distances of all pairs in float32 from the shared
//     Gram engine (gram.h) on the group-centred data. The matrix is symmetric,
//     so only the tiles on or right of the diagonal are computed; each row
//     block then mirrors its values into the rows below it.
//  2. The k-th smallest approximate value of every row. By symmetry,
//     dist[j][i .. i + kW) is column j of rows i .. i + kW, so kW rows are
//     handled at once, one per vector lane, by a branch-free insertion network
//     of k sorted vectors. Every entry within the engine's error bound (twice
//     gram_error, times the norms) of the k-th is a candidate.
//  3. The candidates get exact distances (exact_dist.h: float64 in numpy's
//     order, on a float64 copy of the group), two at a time. The k nearest
//     are chosen exactly (ties -> lower index).
//  4. The LOF arithmetic, float64, as scikit-learn.
// The branches that depend on the data (and would be mispredicted) are kept
// out of the per-entry work: that, not the arithmetic, is what a scalar
// running top-k costs here. A group whose distance matrix would not fit in
// kSymmetricBytes (thousands of samples) goes strip by strip instead: kMR rows
// against all columns, O(n) memory, twice the Gram work.
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

// Largest k handled by the insertion network; beyond it a selection per row.
constexpr index_t kMaxNetwork = 32;

// Candidate limit of one row: every j whose approximate squared distance is
// <= limit may be among the k nearest (kth: k-th smallest approximate value).
struct RowLimit {
  double c_err, nrm_max;
  float operator()(float kth, float ni) const {
    const double err = c_err * (double(ni) + nrm_max);
    // (1 + 2^-22) > 1 + two float32 half-ulps: rounding to the nearest float32
    // cannot go below the limit.
    return float(((double(kth) + 2. * err) + 1e-30) * (1. + 0x1p-22));
  }
};

// kth[l] := the k-th smallest of column l of dist[0, n) x [i0, i0 + kW), i.e.
// (symmetry) of row i0 + l. T[t] holds the (t + 1)-th smallest per lane.
template <int K>
void block_kth(const float* dist, index_t n_pad, index_t n, index_t i0, index_t k, float* kth) {
  vreg T[K];
  for (int t = 0; t < K; ++t) T[t] = vset1(kInf);
  for (index_t j = 0; j < n; ++j) {
    vreg v = vload(dist + j * n_pad + i0);
    for (int t = 0; t < K; ++t) {
      const vreg lo = vmin(T[t], v);
      v = vmax(T[t], v);
      T[t] = lo;
    }
  }
  vstore(kth, T[k - 1]);
}

void block_kth_any(const float* dist, index_t n_pad, index_t n, index_t i0, index_t k, float* kth) {
  if (k <= 4) return block_kth<4>(dist, n_pad, n, i0, k, kth);
  if (k <= 6) return block_kth<6>(dist, n_pad, n, i0, k, kth);
  if (k <= 8) return block_kth<8>(dist, n_pad, n, i0, k, kth);
  if (k <= 12) return block_kth<12>(dist, n_pad, n, i0, k, kth);
  if (k <= 16) return block_kth<16>(dist, n_pad, n, i0, k, kth);
  return block_kth<kMaxNetwork>(dist, n_pad, n, i0, k, kth);
}

// Sorts c[0, n) by (distance, index), partially: the k smallest first. n is
// a few candidates unless every sample is one (brute force).
void sort_first_k(Cand* c, index_t n, index_t k) {
  if (n > 32) {
    std::partial_sort(c, c + k, c + n);
    return;
  }
  for (index_t a = 1; a < n; ++a) {
    const Cand v = c[a];
    index_t b = a;
    for (; b > 0 && v < c[b - 1]; --b) c[b] = c[b - 1];
    c[b] = v;
  }
}

struct Workspace {
  Vec<float> mean, bpack, bn, qpack, qn;
  Vec<float> dist;            // rows_pad x n_pad approximate squared distances (or one strip)
  Vec<double> xd;             // the group's rows as float64 (exact, no per-load conversion)
  Vec<float> kth;             // per row: k-th smallest approximate value
  Vec<float> sel;             // a row copy for the selection beyond the network
  Vec<int32_t> idx;           // one row's candidates (room for n_pad + kW)
  Vec<Cand> cand;             // one row's candidates: {distance, index}
  Vec<index_t> nbr;           // n x k neighbour indices, ascending index
  Vec<double> ndist;          // n x k their exact distances
  Vec<double> kdist;          // per row: distance to its k-th neighbour
  Vec<double> lrd;
};

// idx := every j of row[0, n_pad) with row[j] <= limit (room for n_pad + kW);
// returns their number.
index_t collect(const float* row, index_t n_pad, float limit, int32_t* idx) {
  index_t count = 0;
  const vreg lim = vset1(limit);
  for (index_t j = 0; j < n_pad; j += kW)
    count += compress_lanes(vle_mask(vload(row + j), lim), int32_t(j), idx + count);
  return count;
}

// Rows [i0, i0 + kMR) of dist, columns [c1, n): copied into rows [c1, n),
// columns [i0, i0 + kMR), by kW x kW blocks transposed in registers. A block
// also writes columns up to i0 + kW: those belong to rows of later blocks,
// which write their own values there afterwards, or are padding, reset by the
// caller.
void mirror_block(float* dist, index_t n_pad, index_t i0, index_t c1, index_t n) {
  for (index_t j = c1; j < n; j += kW) {
    if (kHasTranspose && kMR <= kW && j + kW <= n_pad) {
      vreg r[kW];
      for (int l = 0; l < kW; ++l) r[l] = l < kMR ? vload(dist + (i0 + l) * n_pad + j) : vzero();
      transpose(r);
      for (int l = 0; l < kW && j + l < n; ++l) vstore(dist + (j + l) * n_pad + i0, r[l]);
    } else {
      for (index_t jj = j; jj < imin(j + kW, n); ++jj)
        for (int l = 0; l < kMR; ++l) dist[jj * n_pad + i0 + l] = dist[(i0 + l) * n_pad + jj];
    }
  }
}

// Centre (column means, accumulated as x / n so that nothing overflows) and
// finiteness of the group: false when it holds NaN or inf.
bool centre_group(const float* x, index_t n, index_t d, float* mean) {
  const vreg inv = vset1(1.f / float(n));
  vreg nonfinite = vzero();  // sums x - x: 0 while every x is finite, NaN after
  float nonfinite_tail = 0.f;
  for (index_t t = 0; t < d; ++t) mean[t] = 0.f;
  for (index_t i = 0; i < n; ++i) {
    const float* xr = x + i * d;
    index_t t = 0;
    for (; t + kW <= d; t += kW) {
      const vreg v = vload(xr + t);
      vstore(mean + t, vfma(v, inv, vload(mean + t)));
      nonfinite = vadd(nonfinite, vsub(v, v));
    }
    for (; t < d; ++t) {
      mean[t] += xr[t] / float(n);
      nonfinite_tail += xr[t] - xr[t];
    }
  }
  return vsum(nonfinite) == 0.f && nonfinite_tail == 0.f;
}

// Groups whose whole approximate-distance matrix fits in this many bytes use
// the symmetric scheme; larger ones (a single group of thousands of samples)
// go strip by strip, with O(n) memory per thread and twice the Gram work.
constexpr index_t kSymmetricBytes = index_t(16) << 20;

// Row i from its candidates ws.idx[0, nc): exact distances, the k nearest
// into ws.nbr / ws.ndist, the k-th into ws.kdist. (Reusing the distance of a
// pair seen from its other end was tried: 1 in 6 are, not worth the lookups.)
void finish_row(index_t i, index_t nc, index_t d, index_t k, Workspace& ws) {
  const int32_t* idx = ws.idx.data();
  const double* xd = ws.xd.data();
  const double* xi = xd + i * d;
  ws.cand.resize(nc);
  Cand* cand = ws.cand.data();
  index_t c = 0;
  for (; c + 2 <= nc; c += 2) {
    const double* rows[2] = {xd + idx[c] * d, xd + idx[c + 1] * d};
    const Sums<2> e = exact_sqdist2(xi, rows, d);
    cand[c] = Cand{e.v[0], idx[c]};
    cand[c + 1] = Cand{e.v[1], idx[c + 1]};
  }
  if (c < nc) cand[c] = Cand{exact_sqdist(xi, xd + idx[c] * d, d), idx[c]};
  // Distances (not squares) decide, as in the reference.
  for (c = 0; c < nc; ++c) cand[c].d2 = std::sqrt(cand[c].d2);
  // The k nearest by (distance, index); usually every candidate is one.
  if (nc > k) {
    sort_first_k(cand, nc, k);
    std::sort(cand, cand + k, [](const Cand& a, const Cand& b) { return a.j < b.j; });
  }
  double kd = 0.;
  for (index_t c = 0; c < k; ++c) {
    ws.nbr[i * k + c] = cand[c].j;
    ws.ndist[i * k + c] = cand[c].d2;
    kd = dmax(kd, cand[c].d2);
  }
  ws.kdist[i] = kd;
}

// k nearest other samples of every row: ws.nbr / ws.ndist / ws.kdist.
// Returns false (and does nothing else) when the group holds NaN or inf.
bool knn_group(const float* x, index_t n, index_t d, index_t k, Workspace& ws) {
  const Chunks ch(d);
  const index_t n_pad = round_up(n, kNR), rows_pad = round_up(n, kMR);
  ws.mean.resize(d);
  if (!centre_group(x, n, d, ws.mean.data())) return false;
  ws.bpack.resize(n_pad * d);
  ws.bn.resize(n_pad);
  ws.qpack.resize(rows_pad * d);
  ws.qn.resize(rows_pad);
  pack_queries(x, n, d, ws.mean.data(), ws.qpack.data(), ws.qn.data());
  pack_bank_centred(ws.qpack.data(), n, d, ch, ws.bpack.data());
  for (index_t j = 0; j < n_pad; ++j) ws.bn[j] = j < n ? ws.qn[j] : kInf;
  ws.xd.resize(n * d);
  double* xd = ws.xd.data();
  for (index_t t = 0; t < n * d; ++t) xd[t] = double(x[t]);
  float nrm_max = 0.f;
  for (index_t i = 0; i < n; ++i) nrm_max = ws.bn[i] > nrm_max ? ws.bn[i] : nrm_max;
  // Norms beyond float32 range (|x| ~ 1e19 after centring): no usable approximation.
  const bool brute = !(double(nrm_max) * 4. < double(std::numeric_limits<float>::max()));
  const RowLimit lim{2. * gram_error(d), double(nrm_max)};
  const bool symmetric = rows_pad * n_pad * index_t(sizeof(float)) <= kSymmetricBytes;
  ws.kth.resize(n_pad);
  ws.idx.resize(n_pad + kW);
  ws.nbr.resize(n * k);
  ws.ndist.resize(n * k);
  ws.kdist.resize(n);

  if (brute) {  // float32 Gram values overflow: every other sample is a candidate
    for (index_t i = 0; i < n; ++i) {
      index_t nc = 0;
      for (index_t j = 0; j < n; ++j)
        if (j != i) ws.idx[nc++] = int32_t(j);
      finish_row(i, nc, d, k, ws);
    }
    return true;
  }

  if (!symmetric) {  // strip by strip: kMR rows x all columns at a time
    ws.dist.resize(kMR * n_pad);
    ws.sel.resize(n_pad);
    float* strip = ws.dist.data();
    for (index_t i0 = 0; i0 < n; i0 += kMR) {
      tile_dists(ws.qpack.data() + i0 * d, kMR, ws.bpack.data(), n_pad, 0, n_pad / kNR, ch, d,
                 ws.qn.data() + i0, ws.bn.data(), strip, n_pad);
      for (index_t i = i0; i < imin(i0 + kMR, n); ++i) {
        float* row = strip + (i - i0) * n_pad;
        row[i] = kInf;  // self is never a neighbour; padding columns are +inf already
        std::copy(row, row + n_pad, ws.sel.begin());
        std::nth_element(ws.sel.begin(), ws.sel.begin() + (k - 1), ws.sel.end());
        finish_row(i, collect(row, n_pad, lim(ws.sel[k - 1], ws.qn[i]), ws.idx.data()), d, k, ws);
      }
    }
    return true;
  }

  // 1. Symmetric approximate distances: row block [i0, i0 + kMR) computes the
  // column groups from its diagonal on, then mirrors its values right of the
  // block into the rows below it (whose own blocks start further right).
  ws.dist.resize(rows_pad * n_pad);
  float* dist = ws.dist.data();
  for (index_t i0 = 0; i0 < n; i0 += kMR) {
    const index_t c0 = i0 / kNR * kNR;
    tile_dists(ws.qpack.data() + i0 * d, kMR, ws.bpack.data(), n_pad, c0 / kNR, n_pad / kNR, ch, d,
               ws.qn.data() + i0, ws.bn.data(), dist + i0 * n_pad + c0, n_pad);
    mirror_block(dist, n_pad, i0, i0 + kMR, n);
  }
  for (index_t i = 0; i < n; ++i) {  // self and padding: never neighbours
    float* row = dist + i * n_pad;
    row[i] = kInf;
    for (index_t j = n; j < n_pad; ++j) row[j] = kInf;
  }

  // 2. The k-th smallest of every row.
  if (k <= kMaxNetwork) {
    for (index_t i0 = 0; i0 < n; i0 += kW) block_kth_any(dist, n_pad, n, i0, k, ws.kth.data() + i0);
  } else {
    ws.sel.resize(n_pad);
    for (index_t i = 0; i < n; ++i) {
      std::copy(dist + i * n_pad, dist + (i + 1) * n_pad, ws.sel.begin());
      std::nth_element(ws.sel.begin(), ws.sel.begin() + (k - 1), ws.sel.end());
      ws.kth[i] = ws.sel[k - 1];
    }
  }

  // 3. Candidates, exact distances, the k nearest.
  for (index_t i = 0; i < n; ++i)
    finish_row(i, collect(dist + i * n_pad, n_pad, lim(ws.kth[i], ws.qn[i]), ws.idx.data()), d, k, ws);
  return true;
}

// 4. scikit-learn's arithmetic for one group: reach(a, b) = max(kdist(b), d(a, b)),
// lrd = 1 / (mean reach + 1e-10), lof(a) = mean over neighbours b of lrd(b) / lrd(a).
void lof_from_neighbours(index_t n, index_t k, Workspace& ws, float* out) {
  ws.lrd.resize(n);
  for (index_t i = 0; i < n; ++i) {
    double s = 0.;
    for (index_t t = 0; t < k; ++t) s += dmax(ws.kdist[ws.nbr[i * k + t]], ws.ndist[i * k + t]);
    ws.lrd[i] = 1. / (s / double(k) + 1e-10);
  }
  for (index_t i = 0; i < n; ++i) {
    double s = 0.;
    for (index_t t = 0; t < k; ++t) s += ws.lrd[ws.nbr[i * k + t]] / ws.lrd[i];
    // Finite by construction; clamp so float32 cannot overflow to inf for
    // extreme duplicate patterns (lrd ratios up to ~1e10 x distance scale).
    out[i] = float(dmin(s / double(k), double(std::numeric_limits<float>::max())));
  }
}

}  // namespace

// Gram multiply-adds below which a call runs on one thread: a parallel region
// ends in a barrier, which on a busy machine waits a time slice (milliseconds)
// for a helper thread -- far more than such a call's work. Larger calls keep
// the threads; groups are handed out dynamically, so a late helper takes less.
constexpr index_t kParallelWork = index_t(1) << 22;

bool lof(const float* x, index_t B, index_t n, index_t d, index_t k, float* out) {
  bool finite = true, allocated = true;
  const int threads = B > 1 && B * n * n * d / 2 >= kParallelWork ? max_threads() : 1;
#pragma omp parallel num_threads(threads) reduction(&& : finite, allocated)
  {
    Workspace ws;
#pragma omp for schedule(dynamic, 1)
    for (index_t g = 0; g < B; ++g) {
      if (!finite || !allocated) continue;  // this call fails anyway
      try {  // nothing may escape an OpenMP region
        if (knn_group(x + g * n * d, n, d, k, ws))
          lof_from_neighbours(n, k, ws, out + g * n);
        else
          finite = false;
      } catch (const std::bad_alloc&) {
        allocated = false;
      }
    }
  }
  if (!allocated) throw std::bad_alloc();
  return finite;
}

}  // namespace SP_ISA_NS
}  // namespace sp
