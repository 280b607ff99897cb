// Running top-k for the CPU kernels: the K smallest (distance, index) pairs of
// a stream, ascending, for one query.
//
// Usage (one list per query, indices fed in increasing order):
//     TopK t{dist_row, idx_row, K};  t.reset();
//     for j in stream: if (v < t.threshold()) t.push(v, j);
// Ties: push() places a new value after equal ones, and a value equal to the
// threshold is never pushed, so with increasing indices the lowest index wins.
// Lists from several streams are merged by (distance, index).
//
// Per-ISA code (see simd.h): lives in the ISA namespace.
#pragma once
#include "simd.h"
#ifndef SP_ISA_NS
#error "topk.h belongs to the per-ISA kernel sources (compiled with SP_CPU_ISA defined)"
#endif

namespace sp {
namespace SP_ISA_NS {

struct TopK {
  float* dist;    // [K], ascending; +inf marks an empty slot
  index_t* idx;   // [K], -1 marks an empty slot
  index_t K;

  void reset() {
    for (index_t t = 0; t < K; ++t) {
      dist[t] = kInf;
      idx[t] = -1;
    }
  }
  float threshold() const { return dist[K - 1]; }
  // Requires v < threshold().
  void push(float v, index_t j) {
    index_t pos = K - 1;
    while (pos > 0 && dist[pos - 1] > v) {
      dist[pos] = dist[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    dist[pos] = v;
    idx[pos] = j;
  }
};

// Feeds a row of squared distances (cols_pad entries, padding +inf) for bank
// rows j0, j0+1, ... into `t`: a vector compare against the threshold skips
// the (usual) blocks with no candidate.
inline void push_row(TopK& t, const float* d2, index_t cols_pad, index_t j0) {
  float thr = t.threshold();
  for (index_t j = 0; j < cols_pad; j += kW) {
    unsigned mask = vlt_mask(vload(d2 + j), vset1(thr));
    while (mask) {
      const int lane = __builtin_ctz(mask);
      mask &= mask - 1;
      const float v = d2[j + lane];
      if (v < thr) {  // the threshold may have dropped since the compare
        t.push(v, j0 + j + lane);
        thr = t.threshold();
      }
    }
  }
}

// A candidate for the final exact recheck; ordered by (distance, index).
struct Cand {
  double d2;
  index_t j;
  bool operator<(const Cand& o) const { return d2 < o.d2 || (d2 == o.d2 && j < o.j); }
};

}  // namespace SP_ISA_NS
}  // namespace sp
