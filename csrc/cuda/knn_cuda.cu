// knn on CUDA: fused distance tiles + per-query running top-k; the q x m
// distance matrix never reaches global memory.
//
// Work decomposition:
//  1. bank_sqnorm_kernel (tensor-core modes only): one warp per bank row writes
//     ||bank_j||^2 into the caller's workspace (computed from the values the
//     tensor cores will see: TF32-rounded or half).
//  2. knn_tile_kernel: grid = (query tiles of 64, bank splits). A 128-thread
//     block keeps its 64 queries fixed and walks the 64-row bank tiles of its
//     split; each tile of squared distances is computed into shared memory by
//     distance_tile() (exact FP32 / TF32 / FP16 WMMA) and then pushed into
//     per-query running top-k: for k = 1 a register (value, index) pair in
//     two threads per query (each takes half the columns; merged at the
//     end), for 1 < k <= 64 a sorted list in shared memory owned by one of
//     threads 0..63. The bank is split over several blocks only when there
//     are too few query tiles to fill the GPU; then every block writes its
//     partial top-k to the workspace and
//  3. knn_merge_kernel (one thread per query) merges the partial lists into
//     the output. Without splits step 2 writes the output directly.
// Ties -> lower bank index everywhere; outputs are sqrt of the clamped squared
// distances; scores = dist[:, 0] * weights[idx[:, 0]].
#include <algorithm>
#include <limits>

#include "cuda_utils.cuh"
#include "dist_tile.cuh"
#include "knn.h"
#include "topk.cuh"

namespace sp {
namespace {

constexpr const char* kOp = "knn";
// Blocks wanted in flight (about two per SM on an H100) before the bank is split.
constexpr index_t kTargetBlocks = 264;
// A split walks at least this many bank tiles, so partial lists stay cheap to merge.
constexpr index_t kMinTilesPerSplit = 4;

struct SplitPlan {
  index_t query_tiles, bank_tiles, tiles_per_split, splits;
};

SplitPlan plan_splits(index_t q, index_t m) {
  SplitPlan p;
  p.query_tiles = (q + cuda::kTile - 1) / cuda::kTile;
  p.bank_tiles = (m + cuda::kTile - 1) / cuda::kTile;
  index_t s = (kTargetBlocks + p.query_tiles - 1) / p.query_tiles;
  s = std::min(s, std::max<index_t>(1, p.bank_tiles / kMinTilesPerSplit));
  s = std::max<index_t>(1, s);
  p.tiles_per_split = (p.bank_tiles + s - 1) / s;
  p.splits = (p.bank_tiles + p.tiles_per_split - 1) / p.tiles_per_split;
  return p;
}

template <int MODE>
__device__ __forceinline__ float staged_float(float v) {
  if constexpr (MODE == cuda::kTF32) return nvcuda::wmma::__float_to_tf32(v);
  return v;
}
template <int MODE>
__device__ __forceinline__ float staged_float(__half v) { return __half2float(v); }

template <int MODE, class T>
__global__ void bank_sqnorm_kernel(const T* __restrict__ bank, index_t m, index_t d,
                                   float* __restrict__ sqnorm) {
  const int lane = threadIdx.x & 31;
  const index_t warps_total = index_t(gridDim.x) * (blockDim.x >> 5);
  for (index_t row = index_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); row < m;
       row += warps_total) {
    const T* r = bank + row * d;
    float s = 0.f;
    for (index_t t = lane; t < d; t += 32) {
      const float v = staged_float<MODE>(r[t]);
      s = fmaf(v, v, s);
    }
    s = cuda::warp_sum(s);
    if (lane == 0) sqnorm[row] = s;
  }
}

// Final output for one query from its squared-distance list.
__device__ __forceinline__ void write_result(index_t qi, int t, int k, float d2, int64_t j,
                                             float* out_dist, index_t* out_idx,
                                             const float* weights, float* out_score) {
  const float dist = sqrtf(fmaxf(d2, 0.f));
  out_dist[qi * k + t] = dist;
  out_idx[qi * k + t] = j;
  if (t == 0 && out_score) out_score[qi] = dist * weights[j];
}

template <int MODE, bool K1, class T>
__global__ void __launch_bounds__(cuda::kTileThreads)
knn_tile_kernel(const T* __restrict__ queries, index_t q, const T* __restrict__ bank, index_t m,
                index_t d, int k, const float* __restrict__ bank_sqnorm,
                index_t tiles_per_split, int splits, float* __restrict__ part_d,
                int* __restrict__ part_i, float* __restrict__ out_dist, index_t* __restrict__ out_idx,
                const float* __restrict__ weights, float* __restrict__ out_score) {
  using namespace cuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  TileSmem<MODE>& sm = *reinterpret_cast<TileSmem<MODE>*>(smem_raw);
  float* list_d = reinterpret_cast<float*>(smem_raw + sizeof(TileSmem<MODE>));
  int* list_i = reinterpret_cast<int*>(list_d + kTile * (K1 ? 1 : k));

  const int tid = threadIdx.x;
  const index_t q0 = index_t(blockIdx.x) * kTile;
  const int rows_a = int(std::min<index_t>(kTile, q - q0));
  const T* Q = queries + q0 * d;
  const int split = blockIdx.y;
  const index_t tile_begin = index_t(split) * tiles_per_split;
  const index_t bank_tiles = (m + kTile - 1) / kTile;
  const index_t tile_end = std::min(bank_tiles, tile_begin + tiles_per_split);

  if constexpr (MODE != kExact) {
    if (tid < kTile) {  // ||query||^2 from the values the tensor cores will see
      float s = 0.f;
      if (tid < rows_a)
        for (index_t t = 0; t < d; ++t) {
          const float v = staged_float<MODE>(Q[index_t(tid) * d + t]);
          s = fmaf(v, v, s);
        }
      sm.na[tid] = s;
    }
  }

  // k > 1: threads 0..63 own one query each (list in shared memory).
  // k = 1: threads t and t + 64 share query t, each scanning half of every
  // tile, and are merged at the end.
  const int sel_q = K1 ? (tid & (kTile - 1)) : tid;
  const int sel_half = K1 ? (tid >> 6) : 0;
  const bool selector = K1 ? sel_q < rows_a : tid < rows_a;
  TopOne top1;
  TopK<int> topk(list_d + tid, list_i + tid, kTile, k);

  for (index_t t = tile_begin; t < tile_end; ++t) {
    const index_t c0 = t * kTile;
    const int rows_b = int(std::min<index_t>(kTile, m - c0));
    if constexpr (MODE != kExact) {
      if (tid < kTile) sm.nb[tid] = tid < rows_b ? bank_sqnorm[c0 + tid] : 0.f;
    }
    distance_tile<MODE, false>(Q, rows_a, bank + c0 * d, rows_b, d, sm);
    if (selector) {
      // Rotated column order: conflict-free shared-memory reads; the top-k
      // applies the index tie rule explicitly, so the order does not matter.
      if constexpr (K1) {
        for (int c = 0; c < kTile / 2; ++c) {
          const int cc = sel_half * (kTile / 2) + ((c + sel_q) & (kTile / 2 - 1));
          if (cc < rows_b) top1.push(sm.c[sel_q][cc], c0 + cc);
        }
      } else {
        for (int c = 0; c < kTile; ++c) {
          const int cc = (c + tid) & (kTile - 1);
          if (cc < rows_b) topk.push(sm.c[tid][cc], c0 + cc);
        }
      }
    }
  }

  if constexpr (K1) {
    // Merge the two halves: thread t + 64 hands its candidate to thread t.
    __syncthreads();  // everyone is done reading sm.c
    float* other_v = &sm.c[0][0];
    int64_t* other_i = reinterpret_cast<int64_t*>(&sm.c[8][0]);  // 64 x 8 bytes, 32-byte aligned
    if (sel_half == 1) {
      other_v[sel_q] = top1.best;
      other_i[sel_q] = top1.idx;
    }
    __syncthreads();
    if (sel_half == 1) return;
    if (selector && other_i[sel_q] >= 0) top1.push(other_v[sel_q], other_i[sel_q]);
  }
  if (!selector) return;
  const index_t qi = q0 + tid;
  if (splits == 1) {
    if constexpr (K1) {
      write_result(qi, 0, 1, top1.best, top1.idx, out_dist, out_idx, weights, out_score);
    } else {
      for (int s = 0; s < k; ++s)
        write_result(qi, s, k, list_d[s * kTile + tid], list_i[s * kTile + tid], out_dist, out_idx,
                     weights, out_score);
    }
    return;
  }
  const index_t base = (qi * splits + split) * index_t(k);
  if constexpr (K1) {
    part_d[base] = top1.best;
    part_i[base] = int(top1.idx);
  } else {
    for (int s = 0; s < k; ++s) {
      const bool valid = s < topk.count;
      part_d[base + s] = valid ? list_d[s * kTile + tid] : INFINITY;
      part_i[base + s] = valid ? list_i[s * kTile + tid] : -1;
    }
  }
}

// One thread per query: merges the `splits` partial lists (squared distances)
// into out_dist / out_idx (used as the running list), then takes the sqrt.
__global__ void knn_merge_kernel(index_t q, int k, int splits, const float* __restrict__ part_d,
                                 const int* __restrict__ part_i, float* __restrict__ out_dist,
                                 index_t* __restrict__ out_idx, const float* __restrict__ weights,
                                 float* __restrict__ out_score) {
  const index_t qi = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (qi >= q) return;
  cuda::TopK<index_t> top(out_dist + qi * k, out_idx + qi * k, 1, k);
  const index_t base = qi * splits * index_t(k);
  for (index_t e = 0; e < index_t(splits) * k; ++e) {
    const int j = part_i[base + e];
    if (j >= 0) top.push(part_d[base + e], j);
  }
  for (int s = 0; s < k; ++s) {
    const bool valid = s < top.count;  // always true when m >= k
    const float d2 = valid ? out_dist[qi * k + s] : INFINITY;
    const index_t j = valid ? out_idx[qi * k + s] : index_t(-1);
    out_dist[qi * k + s] = sqrtf(fmaxf(d2, 0.f));
    out_idx[qi * k + s] = j;
    if (s == 0 && out_score && j >= 0) out_score[qi] = out_dist[qi * k] * weights[j];
  }
}

template <int MODE, class T>
void run(const T* queries, index_t q, const T* bank, index_t m, index_t d, index_t k,
         const float* weights, float* out_dist, index_t* out_idx, float* out_score,
         float* workspace, cudaStream_t stream) {
  using namespace cuda;
  const SplitPlan p = plan_splits(q, m);
  if (p.query_tiles > 0x7fffffff)
    throw std::invalid_argument(std::string(kOp) + ": too many queries for one launch");

  if constexpr (MODE != kExact) {
    const int threads = 256;
    const index_t blocks = std::min<index_t>((m + 7) / 8, 65535);
    bank_sqnorm_kernel<MODE, T><<<unsigned(blocks), threads, 0, stream>>>(bank, m, d, workspace);
    SP_CUDA_LAUNCH_CHECK(kOp, bank_sqnorm_kernel);
  }
  float* part_d = workspace + m;
  int* part_i = reinterpret_cast<int*>(part_d + q * p.splits * k);
  if (p.splits == 1) part_d = nullptr, part_i = nullptr;

  const dim3 grid{unsigned(p.query_tiles), unsigned(p.splits), 1u};
  const bool k1 = k == 1;
  const size_t smem = sizeof(TileSmem<MODE>) + (k1 ? 0 : size_t(kTile) * k * (sizeof(float) + sizeof(int)));
  if (k1) {
    auto kern = knn_tile_kernel<MODE, true, T>;
    set_dynamic_smem(kOp, kern, smem);
    kern<<<grid, kTileThreads, smem, stream>>>(queries, q, bank, m, d, int(k), workspace,
                                               p.tiles_per_split, int(p.splits), part_d, part_i,
                                               out_dist, out_idx, weights, out_score);
  } else {
    auto kern = knn_tile_kernel<MODE, false, T>;
    set_dynamic_smem(kOp, kern, smem);
    kern<<<grid, kTileThreads, smem, stream>>>(queries, q, bank, m, d, int(k), workspace,
                                               p.tiles_per_split, int(p.splits), part_d, part_i,
                                               out_dist, out_idx, weights, out_score);
  }
  SP_CUDA_LAUNCH_CHECK(kOp, knn_tile_kernel);
  if (p.splits > 1) {
    const int threads = 128;
    const index_t blocks = (q + threads - 1) / threads;
    knn_merge_kernel<<<unsigned(blocks), threads, 0, stream>>>(q, int(k), int(p.splits), part_d, part_i,
                                                               out_dist, out_idx, weights, out_score);
    SP_CUDA_LAUNCH_CHECK(kOp, knn_merge_kernel);
  }
}

}  // namespace

index_t knn_cuda_workspace_floats(index_t q, index_t m, index_t k) {
  const SplitPlan p = plan_splits(q, m);
  return m + (p.splits > 1 ? 2 * q * p.splits * k : 0);
}

void knn_cuda(const void* queries, index_t q, const void* bank, index_t m, index_t d, index_t k,
              const float* weights, float* out_dist, index_t* out_idx, float* out_score,
              DType dtype, bool allow_tf32, float* workspace, stream_t stream) {
  SP_CHECK_ARG(q >= 1 && m >= 1 && d >= 1, "knn: empty input");
  SP_CHECK_ARG(k >= 1 && k <= m, "knn: k must be in [1, m]");
  SP_CHECK_ARG(k <= cuda::kMaxSharedTopK,
               "knn: k > " + std::to_string(cuda::kMaxSharedTopK) + " is not supported on CUDA");
  SP_CHECK_ARG(m < std::numeric_limits<int>::max(), "knn: bank too large for CUDA (m >= 2^31)");
  SP_CHECK_ARG(out_score == nullptr || weights != nullptr, "knn: out_score needs weights");
  const cudaStream_t s = cuda::to_stream(stream);
  if (dtype == DType::F16) {
    run<cuda::kHalf>(static_cast<const __half*>(queries), q, static_cast<const __half*>(bank), m, d, k,
                     weights, out_dist, out_idx, out_score, workspace, s);
  } else if (dtype == DType::F32) {
    if (allow_tf32)
      run<cuda::kTF32>(static_cast<const float*>(queries), q, static_cast<const float*>(bank), m, d, k,
                       weights, out_dist, out_idx, out_score, workspace, s);
    else
      run<cuda::kExact>(static_cast<const float*>(queries), q, static_cast<const float*>(bank), m, d, k,
                        weights, out_dist, out_idx, out_score, workspace, s);
  } else {
    throw std::invalid_argument("knn: unknown dtype code");
  }
}

}  // namespace sp
