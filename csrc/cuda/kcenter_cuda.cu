// kcenter_greedy on CUDA: the whole greedy loop stays on the device.
//
// Work decomposition: per selected centre c_s (s = 0 .. m-2) two launches are
// queued on the caller's stream, with no host synchronisation:
//  1. kcenter_centre_dist_kernel (s >= 1): one warp per earlier centre j < s
//     writes cc[j] = |c_j - c_s|.
//  2. kcenter_step_kernel: reads c_s from out_idx[s] (device memory) and
//     stages that row in shared memory; a grid-stride loop gives each warp 32
//     points, one per lane for the cheap checks. A point whose nearest centre
//     so far is c_a (assign[i] = a) cannot get closer to c_s when
//     cc[a] >= 2 * mindist[i] (triangle inequality), so its row is not read at
//     all (a 0.1% margin covers float rounding). The remaining points get the
//     exact distance, computed by the whole warp for up to 4 points at once
//     (their loads in flight together; 16-byte vector loads when rows are
//     16-byte aligned), and update mindist / assign.
//     Points of weight 0 are never updated (they can never be selected). Each
//     lane tracks the best priority w * mindist (ties -> lower index), each
//     block reduces to one partial, and the last block to finish (atomic
//     ticket after a __threadfence) reduces the partials and writes the argmax
//     to out_idx[s + 1], which the next step's launches read.
// The approximate variant runs one extra "seed" step that sets mindist to the
// mean anchor distance (assign = -1: no centre yet, never pruned) and writes
// out_idx[0]; the exact variant's init kernel writes out_idx[0] = start.
// Distinct centres (kcenter.h): when the best priority is 0, the last block
// looks for the lowest-index eligible point that coincides with no centre --
// only a point of initial distance 0 can (mindist 0 with no assigned centre),
// and only while no centre equals the anchors (zero_covered, set by block 0 of
// each step) -- and otherwise writes -1: every later launch sees the -1 in
// out_idx[step] and only passes it on.
// Workspace (float32 units): mindist [n] | assign (int32) [n] | cc [n] |
// pad | partial priorities [kMaxBlocks] | partial indices (int64)
// [2 * kMaxBlocks] | ticket counter | zero_covered flag.
#include <algorithm>

#include "cuda_utils.cuh"
#include "kcenter.h"

namespace sp {
namespace {

constexpr const char* kOp = "kcenter_greedy";
constexpr int kThreads = 256;
constexpr index_t kMaxBlocks = 4096;
constexpr int kBatch = 4;  // surviving points whose rows one warp loads together

struct Workspace {
  float* mind;
  int* assign;
  float* cc;
  float* part_v;
  int64_t* part_i;
  unsigned int* ticket;
  int* zero_covered;  // a selected centre equals the anchors (approximate variant)
};

Workspace carve(float* ws, index_t n) {
  Workspace w;
  w.mind = ws;
  w.assign = reinterpret_cast<int*>(ws + n);
  w.cc = ws + 2 * n;
  // Keep the int64 partials 8-byte aligned whatever n is.
  const index_t off_v = 3 * n + (n & 1);
  w.part_v = ws + off_v;
  w.part_i = reinterpret_cast<int64_t*>(ws + off_v + kMaxBlocks);
  w.ticket = reinterpret_cast<unsigned int*>(ws + off_v + 3 * kMaxBlocks);
  w.zero_covered = reinterpret_cast<int*>(ws + off_v + 3 * kMaxBlocks + 1);
  return w;
}

// Squared distance between row `xi` (global) and `c` (shared or global), by one
// warp; every lane gets the total.
template <class T, bool VEC>
__device__ __forceinline__ float warp_sqdist(const T* __restrict__ xi, const T* c, index_t d, int lane) {
  float s = 0.f;
  if constexpr (VEC) {
    constexpr int per = 16 / sizeof(T);
    const index_t nvec = d / per;
    const uint4* xv = reinterpret_cast<const uint4*>(xi);
    const uint4* cv = reinterpret_cast<const uint4*>(c);
    for (index_t v = lane; v < nvec; v += 32) {
      const uint4 a = __ldg(xv + v);
      const uint4 b = cv[v];
      const T* pa = reinterpret_cast<const T*>(&a);
      const T* pb = reinterpret_cast<const T*>(&b);
#pragma unroll
      for (int e = 0; e < per; ++e) {
        const float u = cuda::to_float(pa[e]) - cuda::to_float(pb[e]);
        s = fmaf(u, u, s);
      }
    }
  } else {
    for (index_t t = lane; t < d; t += 32) {
      const float u = cuda::to_float(xi[t]) - cuda::to_float(c[t]);
      s = fmaf(u, u, s);
    }
  }
  return cuda::warp_sum(s);
}

// Squared distances of up to N rows (rows[0 .. cnt), cnt warp-uniform) to `c`,
// by one warp: the rows' loads are issued together so N memory requests are in
// flight per lane instead of one. out[u] is valid on every lane for u < cnt.
template <class T, bool VEC, int N>
__device__ __forceinline__ void warp_sqdist_multi(const T* const (&rows)[N], int cnt, const T* c, index_t d,
                                                  int lane, float (&out)[N]) {
#pragma unroll
  for (int u = 0; u < N; ++u) out[u] = 0.f;
  if constexpr (VEC) {
    constexpr int per = 16 / sizeof(T);
    const index_t nvec = d / per;
    const uint4* cv = reinterpret_cast<const uint4*>(c);
    for (index_t v = lane; v < nvec; v += 32) {
      uint4 a[N];
#pragma unroll
      for (int u = 0; u < N; ++u)
        if (u < cnt) a[u] = __ldg(reinterpret_cast<const uint4*>(rows[u]) + v);
      const uint4 b = cv[v];
      const T* pb = reinterpret_cast<const T*>(&b);
#pragma unroll
      for (int u = 0; u < N; ++u) {
        if (u >= cnt) continue;
        const T* pa = reinterpret_cast<const T*>(&a[u]);
#pragma unroll
        for (int e = 0; e < per; ++e) {
          const float t = cuda::to_float(pa[e]) - cuda::to_float(pb[e]);
          out[u] = fmaf(t, t, out[u]);
        }
      }
    }
  } else {
    for (index_t t = lane; t < d; t += 32) {
      const float cf = cuda::to_float(c[t]);
#pragma unroll
      for (int u = 0; u < N; ++u) {
        if (u >= cnt) continue;
        const float diff = cuda::to_float(rows[u][t]) - cf;
        out[u] = fmaf(diff, diff, out[u]);
      }
    }
  }
#pragma unroll
  for (int u = 0; u < N; ++u)
    if (u < cnt) out[u] = cuda::warp_sum(out[u]);
}

__global__ void kcenter_init_kernel(Workspace ws, index_t n, index_t start, index_t* __restrict__ out_idx) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    ws.mind[i] = INFINITY;
    ws.assign[i] = -1;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (start >= 0) out_idx[0] = start;
    *ws.ticket = 0u;
    *ws.zero_covered = 0;
  }
}

// cc[j] = |x[out_idx[j]] - x[out_idx[step]]| for j < step; one warp per j.
template <class T, bool VEC>
__global__ void __launch_bounds__(kThreads)
kcenter_centre_dist_kernel(const T* __restrict__ x, index_t d, const index_t* __restrict__ out_idx,
                           index_t step, float* __restrict__ cc) {
  const int lane = threadIdx.x & 31;
  if (out_idx[step] < 0) return;  // selection has stopped
  const T* c = x + out_idx[step] * d;
  const index_t warps_total = index_t(gridDim.x) * (kThreads / 32);
  for (index_t j = index_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); j < step; j += warps_total) {
    const float v = sqrtf(warp_sqdist<T, VEC>(x + out_idx[j] * d, c, d, lane));
    if (lane == 0) cc[j] = v;
  }
}

// SEED = true: approximate variant's seed step (mean anchor distance, writes out_idx[0]).
// SEED = false: greedy step `step` (centre out_idx[step], writes out_idx[step + 1]).
template <class T, bool VEC, bool SEED>
__global__ void __launch_bounds__(kThreads)
kcenter_step_kernel(const T* __restrict__ x, index_t n, index_t d, const float* __restrict__ weight,
                    const index_t* __restrict__ anchors, int n_anchors, index_t* __restrict__ out_idx,
                    index_t step, Workspace ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* centre = reinterpret_cast<T*>(smem_raw);
  const int lane = threadIdx.x & 31;
  if constexpr (!SEED) {
    const index_t c = out_idx[step];
    if (c < 0) {  // selection has stopped: pass the marker on
      if (blockIdx.x == 0 && threadIdx.x == 0) out_idx[step + 1] = -1;
      return;
    }
    const T* src = x + c * d;
    for (index_t t = threadIdx.x; t < d; t += blockDim.x) centre[t] = src[t];
    __syncthreads();
    if (anchors != nullptr && blockIdx.x == 0 && threadIdx.x < 32) {
      // Does this centre equal the first anchor (so every point that equals all anchors)?
      const T* a0 = x + anchors[0] * d;
      bool differs = false;
      for (index_t t = lane; t < d; t += 32) differs |= cuda::to_float(centre[t]) != cuda::to_float(a0[t]);
      if (!__any_sync(0xffffffffu, differs) && lane == 0) *ws.zero_covered = 1;
    }
  }
  float best_v = -INFINITY;  // per lane: best priority among the lane's points
  int64_t best_i = -1;
  const index_t warps_total = index_t(gridDim.x) * (kThreads / 32);
  const index_t warp_id = index_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  // Each lane checks one point cheaply (coalesced loads); the warp then computes
  // the distances of the points that survive, one at a time, with all lanes.
  for (index_t base = warp_id * 32; base < n; base += warps_total * 32) {
    const index_t i = base + lane;
    const float wi = i < n ? (weight ? weight[i] : 1.f) : 0.f;
    const bool eligible = wi > 0.f;  // weight 0: never selectable, mindist irrelevant
    float md = INFINITY;
    bool need = eligible;
    if constexpr (!SEED) {
      if (eligible) {
        md = ws.mind[i];
        const int a = ws.assign[i];
        // Triangle inequality: |x_i - c_s| >= cc[a] - md >= md, so no update
        // (the 0.1% margin covers the rounding of the three distances).
        need = !(a >= 0 && ws.cc[a] >= 2.002f * md);
      }
    }
    unsigned int pending = __ballot_sync(0xffffffffu, need);
    while (pending) {
      const int src = __ffs(int(pending)) - 1;
      pending &= pending - 1;
      const T* xj = x + (base + src) * d;
      if constexpr (SEED) {
        double sum = 0.0;
        for (int a = 0; a < n_anchors; ++a) sum += sqrtf(warp_sqdist<T, VEC>(xj, x + anchors[a] * d, d, lane));
        if (lane == src) {
          md = float(sum / n_anchors);
          ws.mind[i] = md;
        }
      } else {
        // Up to kBatch surviving points at once (more loads in flight).
        int srcs[kBatch];
        const T* rows[kBatch];
        srcs[0] = src;
        rows[0] = xj;
        int cnt = 1;
#pragma unroll
        for (int u = 1; u < kBatch; ++u) {
          srcs[u] = -1;
          rows[u] = xj;
          if (pending) {
            srcs[u] = __ffs(int(pending)) - 1;
            pending &= pending - 1;
            rows[u] = x + (base + srcs[u]) * d;
            cnt = u + 1;
          }
        }
        float sq[kBatch];
        warp_sqdist_multi<T, VEC, kBatch>(rows, cnt, centre, d, lane, sq);
#pragma unroll
        for (int u = 0; u < kBatch; ++u) {
          const float v = sqrtf(sq[u]);
          if (u < cnt && lane == srcs[u] && v < md) {
            md = v;
            ws.mind[i] = v;
            ws.assign[i] = int(step);
          }
        }
      }
    }
    if (eligible) {
      const float p = wi * md;
      if (best_i < 0 || cuda::argmax_better(p, i, best_v, best_i)) { best_v = p; best_i = i; }
    }
  }
  cuda::block_argmax(best_v, best_i);

  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    ws.part_v[blockIdx.x] = best_v;
    ws.part_i[blockIdx.x] = best_i;
    __threadfence();  // partial visible device-wide before the ticket is taken
    const unsigned int ticket = atomicAdd(ws.ticket, 1u);
    is_last = ticket == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  float v = -INFINITY;
  int64_t idx = -1;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += blockDim.x) {
    const float pv = __ldcg(ws.part_v + b);
    const int64_t pi = __ldcg(reinterpret_cast<const long long*>(ws.part_i) + b);
    if (pi >= 0 && (idx < 0 || cuda::argmax_better(pv, pi, v, idx))) { v = pv; idx = pi; }
  }
  cuda::block_argmax(v, idx);
  if (!SEED && !(v > 0.f)) {
    // Every priority is 0: the lowest-index eligible point that coincides with
    // no centre (see the top of the file), or -1: stop.
    float zv = -INFINITY;
    int64_t zi = -1;
    if (anchors != nullptr && __ldcg(ws.zero_covered) == 0) {
      for (index_t i = threadIdx.x; i < n && zi < 0; i += blockDim.x)
        if ((weight ? weight[i] : 1.f) > 0.f && __ldcg(ws.mind + i) == 0.f && __ldcg(ws.assign + i) < 0) {
          zv = 0.f;
          zi = i;
        }
    }
    cuda::block_argmax(zv, zi);
    idx = zi;
  }
  if (threadIdx.x == 0) {
    // The seed step finds no point only if none has weight > 0, which the
    // Python layer rules out.
    out_idx[SEED ? 0 : step + 1] = idx;
    *ws.ticket = 0u;
  }
}

template <class T>
void run(const T* x, index_t n, index_t d, index_t m, index_t start, const index_t* anchors,
         index_t n_anchors, const float* weight, index_t* out_idx, float* workspace, cudaStream_t s) {
  const Workspace ws = carve(workspace, n);
  const bool vec = (d * index_t(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const size_t smem = size_t(d) * sizeof(T);

  auto step_kernel = vec ? kcenter_step_kernel<T, true, false> : kcenter_step_kernel<T, false, false>;
  auto cc_kernel = vec ? kcenter_centre_dist_kernel<T, true> : kcenter_centre_dist_kernel<T, false>;
  auto seed_kernel = vec ? kcenter_step_kernel<T, true, true> : kcenter_step_kernel<T, false, true>;
  cuda::set_dynamic_smem(kOp, step_kernel, smem);

  int dev = 0, sms = 0, per_sm = 0;
  SP_CUDA_CHECK(kOp, cudaGetDevice(&dev));
  SP_CUDA_CHECK(kOp, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  SP_CUDA_CHECK(kOp, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel, kThreads, smem));
  index_t blocks = index_t(std::max(1, per_sm)) * sms;
  blocks = std::min({blocks, kMaxBlocks, (n + kThreads - 1) / kThreads});  // 32 points per warp
  blocks = std::max<index_t>(1, blocks);

  const index_t init_blocks = std::min<index_t>((n + kThreads - 1) / kThreads, 65535);
  kcenter_init_kernel<<<unsigned(init_blocks), kThreads, 0, s>>>(ws, n, start, out_idx);
  SP_CUDA_LAUNCH_CHECK(kOp, kcenter_init_kernel);
  if (start < 0) {
    seed_kernel<<<unsigned(blocks), kThreads, 0, s>>>(x, n, d, weight, anchors, int(n_anchors), out_idx,
                                                       0, ws);
    SP_CUDA_LAUNCH_CHECK(kOp, kcenter_step_kernel<seed>);
  }
  for (index_t step = 0; step + 1 < m; ++step) {
    if (step > 0) {
      const index_t cc_blocks = std::min<index_t>((step + kThreads / 32 - 1) / (kThreads / 32), blocks);
      cc_kernel<<<unsigned(cc_blocks), kThreads, 0, s>>>(x, d, out_idx, step, ws.cc);
      SP_CUDA_LAUNCH_CHECK(kOp, kcenter_centre_dist_kernel);
    }
    step_kernel<<<unsigned(blocks), kThreads, smem, s>>>(x, n, d, weight, anchors, int(n_anchors), out_idx,
                                                         step, ws);
    // Only a launch-configuration failure can show up here (no host sync).
    SP_CUDA_LAUNCH_CHECK(kOp, kcenter_step_kernel);
  }
}

}  // namespace

index_t kcenter_cuda_workspace_floats(index_t n) { return 3 * n + 1 + 3 * kMaxBlocks + 3; }

void kcenter_greedy_cuda(const void* x, index_t n, index_t d, index_t m, index_t start,
                         const index_t* anchors, index_t n_anchors, const float* sample_weight,
                         index_t* out_idx, DType dtype, float* workspace, stream_t stream) {
  SP_CHECK_ARG(n >= 1 && d >= 1, "kcenter_greedy: empty input");
  SP_CHECK_ARG(m < 0x7fffffff, "kcenter_greedy: m too large for CUDA");
  SP_CHECK_ARG(m >= 1 && m <= n, "kcenter_greedy: need 1 <= m <= n");
  SP_CHECK_ARG(start < n, "kcenter_greedy: start must be < n");
  SP_CHECK_ARG(start >= 0 || (anchors != nullptr && n_anchors >= 1 && n_anchors <= 0x7fffffff),
               "kcenter_greedy_approx: anchors must be given");
  const cudaStream_t s = cuda::to_stream(stream);
  if (dtype == DType::F16)
    run(static_cast<const __half*>(x), n, d, m, start, anchors, n_anchors, sample_weight, out_idx, workspace, s);
  else if (dtype == DType::F32)
    run(static_cast<const float*>(x), n, d, m, start, anchors, n_anchors, sample_weight, out_idx, workspace, s);
  else
    throw std::invalid_argument("kcenter_greedy: unknown dtype code");
}

}  // namespace sp
