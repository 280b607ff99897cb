// kcenter_greedy on CUDA: the whole greedy loop stays on the device.
//
// Work decomposition: one launch of kcenter_step_kernel per selected centre,
// all queued on the caller's stream with no host synchronisation. Step s reads
// its centre from out_idx[s] (device memory), stages that row in shared
// memory, and a grid-stride loop gives one warp per point: the warp computes
// the point's Euclidean distance to the centre (16-byte vector loads when
// rows are 16-byte aligned), lowers mindist and tracks the best priority
// w * mindist (ties -> lower index, weight 0 never eligible). Each block
// reduces to one (priority, index) partial; the last block to finish (atomic
// ticket after a __threadfence) reduces the partials and writes the argmax to
// out_idx[s + 1], which the next launch reads. The approximate variant runs
// one extra "seed" step that sets mindist to the mean anchor distance and
// writes out_idx[0]; the exact variant's init kernel writes out_idx[0] = start.
// Workspace (float32 units): mindist [n] | partial priorities [kMaxBlocks] |
// partial indices (int64) [2 * kMaxBlocks] | ticket counter.
#include <algorithm>

#include "cuda_utils.cuh"
#include "kcenter.h"

namespace sp {
namespace {

constexpr const char* kOp = "kcenter_greedy";
constexpr int kThreads = 256;
constexpr index_t kMaxBlocks = 4096;

struct Workspace {
  float* mind;
  float* part_v;
  int64_t* part_i;
  unsigned int* ticket;
};

Workspace carve(float* ws, index_t n) {
  Workspace w;
  w.mind = ws;
  // Keep the int64 partials 8-byte aligned whatever n is.
  const index_t off_v = n + (n & 1);
  w.part_v = ws + off_v;
  w.part_i = reinterpret_cast<int64_t*>(ws + off_v + kMaxBlocks);
  w.ticket = reinterpret_cast<unsigned int*>(ws + off_v + 3 * kMaxBlocks);
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

__global__ void kcenter_init_kernel(float* __restrict__ mind, index_t n, index_t start,
                                    index_t* __restrict__ out_idx, unsigned int* __restrict__ ticket) {
  const index_t stride = index_t(gridDim.x) * blockDim.x;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) mind[i] = INFINITY;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    if (start >= 0) out_idx[0] = start;
    *ticket = 0u;
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
    const T* src = x + c * d;
    for (index_t t = threadIdx.x; t < d; t += blockDim.x) centre[t] = src[t];
    __syncthreads();
  }
  float best_v = -INFINITY;
  int64_t best_i = -1;
  const index_t warps_total = index_t(gridDim.x) * (kThreads / 32);
  for (index_t i = index_t(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5); i < n; i += warps_total) {
    const T* xi = x + i * d;
    float v;
    if constexpr (SEED) {
      double sum = 0.0;
      for (int a = 0; a < n_anchors; ++a)
        sum += sqrtf(warp_sqdist<T, VEC>(xi, x + anchors[a] * d, d, lane));
      v = float(sum / n_anchors);
    } else {
      v = sqrtf(warp_sqdist<T, VEC>(xi, centre, d, lane));
    }
    if (lane == 0) {
      float md = v;
      if constexpr (!SEED) md = fminf(ws.mind[i], v);  // v < mind ? v : mind
      ws.mind[i] = md;
      const float wi = weight ? weight[i] : 1.f;
      if (wi > 0.f) {
        const float p = wi * md;
        if (best_i < 0 || cuda::argmax_better(p, i, best_v, best_i)) { best_v = p; best_i = i; }
      }
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
  if (threadIdx.x == 0) {
    // idx < 0 only if no point has weight > 0, which the Python layer rules out.
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
  auto seed_kernel = vec ? kcenter_step_kernel<T, true, true> : kcenter_step_kernel<T, false, true>;
  cuda::set_dynamic_smem(kOp, step_kernel, smem);

  int dev = 0, sms = 0, per_sm = 0;
  SP_CUDA_CHECK(kOp, cudaGetDevice(&dev));
  SP_CUDA_CHECK(kOp, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  SP_CUDA_CHECK(kOp, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, step_kernel, kThreads, smem));
  index_t blocks = index_t(std::max(1, per_sm)) * sms;
  blocks = std::min({blocks, kMaxBlocks, (n + kThreads / 32 - 1) / (kThreads / 32)});
  blocks = std::max<index_t>(1, blocks);

  const index_t init_blocks = std::min<index_t>((n + kThreads - 1) / kThreads, 65535);
  kcenter_init_kernel<<<unsigned(init_blocks), kThreads, 0, s>>>(ws.mind, n, start, out_idx, ws.ticket);
  SP_CUDA_LAUNCH_CHECK(kOp, kcenter_init_kernel);
  if (start < 0) {
    seed_kernel<<<unsigned(blocks), kThreads, 0, s>>>(x, n, d, weight, anchors, int(n_anchors), out_idx,
                                                       0, ws);
    SP_CUDA_LAUNCH_CHECK(kOp, kcenter_step_kernel<seed>);
  }
  for (index_t step = 0; step + 1 < m; ++step) {
    step_kernel<<<unsigned(blocks), kThreads, smem, s>>>(x, n, d, weight, anchors, int(n_anchors), out_idx,
                                                         step, ws);
    // Only a launch-configuration failure can show up here (no host sync).
    SP_CUDA_LAUNCH_CHECK(kOp, kcenter_step_kernel);
  }
}

}  // namespace

index_t kcenter_cuda_workspace_floats(index_t n) { return n + 1 + 3 * kMaxBlocks + 2; }

void kcenter_greedy_cuda(const void* x, index_t n, index_t d, index_t m, index_t start,
                         const index_t* anchors, index_t n_anchors, const float* sample_weight,
                         index_t* out_idx, DType dtype, float* workspace, stream_t stream) {
  SP_CHECK_ARG(n >= 1 && d >= 1, "kcenter_greedy: empty input");
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
