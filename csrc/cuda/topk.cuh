// Device-side running top-k (smallest distances) owned by one thread.
//
// The list lives in memory (shared or global) with a stride between entries,
// so consecutive threads' lists interleave (no bank conflicts in shared
// memory). It is kept sorted ascending by (distance, index); `kth` caches the
// current worst kept distance in a register so the common "not better" case
// costs one comparison. k = 1 is a separate register-only struct (TopOne).
// Tie rule everywhere: equal distance -> lower index wins.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace sp {
namespace cuda {

constexpr int kMaxSharedTopK = 64;

struct TopOne {
  float best = INFINITY;
  int64_t idx = -1;
  __device__ __forceinline__ void push(float v, int64_t j) {
    if (v < best || (v == best && (idx < 0 || j < idx))) { best = v; idx = j; }
  }
};

// Running top-k over a strided list: entry t is at dist[t * stride] / idx[t * stride].
template <class Idx>
struct TopK {
  float* dist;
  Idx* idx;
  int stride;
  int k;
  int count = 0;
  float kth = INFINITY;   // worst kept distance once the list is full
  int64_t kth_idx = -1;   // and its index

  __device__ __forceinline__ TopK(float* d, Idx* i, int s, int kk) : dist(d), idx(i), stride(s), k(kk) {}

  // Candidate (v, j); any order of j is allowed (the index tie rule is explicit).
  __device__ __forceinline__ void push(float v, int64_t j) {
    if (count == k && !(v < kth || (v == kth && j < kth_idx))) return;
    int pos = count < k ? count : k - 1;  // slot freed for the new entry
    // Shift worse entries one slot to the right (the last falls off when full).
    while (pos > 0) {
      float pv = dist[(pos - 1) * stride];
      int64_t pj = int64_t(idx[(pos - 1) * stride]);
      if (pv < v || (pv == v && pj < j)) break;
      dist[pos * stride] = pv;
      idx[pos * stride] = Idx(pj);
      --pos;
    }
    dist[pos * stride] = v;
    idx[pos * stride] = Idx(j);
    if (count < k) ++count;
    if (count == k) {
      kth = dist[(k - 1) * stride];
      kth_idx = int64_t(idx[(k - 1) * stride]);
    }
  }
};

}  // namespace cuda
}  // namespace sp
