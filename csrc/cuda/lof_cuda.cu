// lof on CUDA: all B groups in three launches.
//
// Work decomposition:
//  1. lof_knn_kernel: grid = (64-sample tiles, B groups), 128 threads. Each
//     block fixes 64 samples of one group and walks the group's samples in
//     64-row tiles; distance_tile() (exact FP32 differences) puts the squared
//     distances in shared memory and threads 0..63 push them into their
//     sample's running top-k (self skipped by index, ties -> lower index),
//     kept sorted in the workspace (any k), then replaced by Euclidean
//     distances. kdist(b) is the last entry of b's list.
//  2. lof_lrd_kernel: one thread per sample, lrd from its k neighbours
//     (double accumulation, 1e-10 guard as scikit-learn / the CPU kernel).
//  3. lof_score_kernel: one thread per sample, mean lrd ratio.
// (Step 1 is launched once per 65535 groups, the gridDim.y limit.)
// Workspace (float32 units): lrd as double [B*n] | neighbour distances
// [B*n*k] | neighbour indices (int32) [B*n*k].
#include <algorithm>
#include <limits>

#include "cuda_utils.cuh"
#include "dist_tile.cuh"
#include "lof.h"
#include "topk.cuh"

namespace sp {
namespace {

constexpr const char* kOp = "lof";

__global__ void __launch_bounds__(cuda::kTileThreads)
lof_knn_kernel(const float* __restrict__ x, index_t n, index_t d, int k, index_t group0,
               float* __restrict__ nbr_d, int* __restrict__ nbr_i) {
  using namespace cuda;
  __shared__ TileSmem<kExact> sm;
  const int tid = threadIdx.x;
  const index_t g = group0 + blockIdx.y;
  const index_t r0 = index_t(blockIdx.x) * kTile;
  const int rows_a = int(std::min<index_t>(kTile, n - r0));
  const float* X = x + g * n * d;
  const index_t self = r0 + tid;
  const bool selector = tid < rows_a;
  const index_t list = (g * n + self) * k;
  TopK<int> top(nbr_d + (selector ? list : 0), nbr_i + (selector ? list : 0), 1, k);
  for (index_t c0 = 0; c0 < n; c0 += kTile) {
    const int rows_b = int(std::min<index_t>(kTile, n - c0));
    distance_tile<kExact, false>(X + r0 * d, rows_a, X + c0 * d, rows_b, d, sm);
    if (selector) {
      for (int c = 0; c < kTile; ++c) {
        const int cc = (c + tid) & (kTile - 1);  // rotated: conflict-free reads
        if (cc >= rows_b || c0 + cc == self) continue;
        top.push(sm.c[tid][cc], c0 + cc);
      }
    }
  }
  if (selector)
    for (int t = 0; t < k; ++t) nbr_d[list + t] = sqrtf(fmaxf(nbr_d[list + t], 0.f));
}

__global__ void lof_lrd_kernel(index_t total, index_t n, int k, const float* __restrict__ nbr_d,
                               const int* __restrict__ nbr_i, double* __restrict__ lrd) {
  const index_t s = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= total) return;
  const index_t group0 = (s / n) * n;
  double sum = 0.0;
  for (int t = 0; t < k; ++t) {
    const index_t b = group0 + nbr_i[s * k + t];
    const double kdist_b = nbr_d[b * k + (k - 1)];
    sum += fmax(kdist_b, double(nbr_d[s * k + t]));
  }
  lrd[s] = 1.0 / (sum / k + 1e-10);
}

__global__ void lof_score_kernel(index_t total, index_t n, int k, const int* __restrict__ nbr_i,
                                 const double* __restrict__ lrd, float* __restrict__ out) {
  const index_t s = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= total) return;
  const index_t group0 = (s / n) * n;
  const double own = lrd[s];
  double sum = 0.0;
  for (int t = 0; t < k; ++t) sum += lrd[group0 + nbr_i[s * k + t]] / own;
  out[s] = float(sum / k);
}

}  // namespace

index_t lof_cuda_workspace_floats(index_t B, index_t n, index_t k) {
  return 2 * B * n + 2 * B * n * k;
}

void lof_cuda(const float* x, index_t B, index_t n, index_t d, index_t k, float* out, float* workspace,
              stream_t stream) {
  SP_CHECK_ARG(B >= 1 && d >= 1, "lof: empty input");
  SP_CHECK_ARG(n >= 2 && k >= 1 && k <= n - 1, "lof: need n >= 2 and 1 <= k <= n - 1");
  SP_CHECK_ARG(n < std::numeric_limits<int>::max(), "lof: too many samples per group for CUDA");
  using namespace cuda;
  const cudaStream_t s = to_stream(stream);
  const index_t total = B * n;
  double* lrd = reinterpret_cast<double*>(workspace);  // 256-byte aligned from the allocator
  float* nbr_d = workspace + 2 * total;
  int* nbr_i = reinterpret_cast<int*>(nbr_d + total * k);

  const index_t tiles = (n + kTile - 1) / kTile;
  SP_CHECK_ARG(tiles <= 0x7fffffff, "lof: too many samples per group for CUDA");
  for (index_t g0 = 0; g0 < B; g0 += 65535) {  // gridDim.y limit
    const dim3 grid{unsigned(tiles), unsigned(std::min<index_t>(65535, B - g0)), 1u};
    lof_knn_kernel<<<grid, kTileThreads, 0, s>>>(x, n, d, int(k), g0, nbr_d, nbr_i);
    SP_CUDA_LAUNCH_CHECK(kOp, lof_knn_kernel);
  }

  const int threads = 256;
  const index_t blocks = (total + threads - 1) / threads;
  SP_CHECK_ARG(blocks <= 0x7fffffff, "lof: input too large for CUDA");
  lof_lrd_kernel<<<unsigned(blocks), threads, 0, s>>>(total, n, int(k), nbr_d, nbr_i, lrd);
  SP_CUDA_LAUNCH_CHECK(kOp, lof_lrd_kernel);
  lof_score_kernel<<<unsigned(blocks), threads, 0, s>>>(total, n, int(k), nbr_i, lrd, out);
  SP_CUDA_LAUNCH_CHECK(kOp, lof_score_kernel);
}

}  // namespace sp
