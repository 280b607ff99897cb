// pairwise_sqdist on CUDA.
//
// Work decomposition: one 128-thread block per (64 rows of a) x (64 rows of b)
// output tile of one batch entry; grid = (m tiles, n tiles, batch). The tile
// is computed by distance_tile() (dist_tile.cuh): exact FP32 differences for
// float32, WMMA TF32 for float32 with allow_tf32, WMMA FP16 for float16 (norms
// accumulated from the same staged values, so no workspace is needed), then
// written coalesced row by row. Grid dimensions beyond the hardware limits are
// covered by launching several chunks.
#include <algorithm>

#include "cuda_utils.cuh"
#include "dist_tile.cuh"
#include "pairwise.h"

namespace sp {
namespace {

constexpr const char* kOp = "pairwise_sqdist";

template <int MODE, class T>
__global__ void __launch_bounds__(cuda::kTileThreads)
pairwise_tile_kernel(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                     index_t n, index_t m, index_t d, index_t row_tile0, index_t batch0) {
  using namespace cuda;
  __shared__ TileSmem<MODE> sm;
  const index_t g = batch0 + blockIdx.z;
  const index_t r0 = (row_tile0 + blockIdx.y) * kTile;
  const index_t c0 = index_t(blockIdx.x) * kTile;
  const int rows_a = int(std::min<index_t>(kTile, n - r0));
  const int rows_b = int(std::min<index_t>(kTile, m - c0));
  const T* A = a + (g * n + r0) * d;
  const T* B = b + (g * m + c0) * d;
  distance_tile<MODE, true>(A, rows_a, B, rows_b, d, sm);
  float* O = out + (g * n + r0) * m + c0;
  for (int e = threadIdx.x; e < kTile * kTile; e += kTileThreads) {
    const int r = e / kTile, c = e % kTile;
    if (r < rows_a && c < rows_b) O[index_t(r) * m + c] = sm.c[r][c];
  }
}

template <int MODE, class T>
void launch(const T* a, const T* b, float* out, index_t B, index_t n, index_t m, index_t d,
            cudaStream_t stream) {
  using namespace cuda;
  const index_t col_tiles = (m + kTile - 1) / kTile;
  const index_t row_tiles = (n + kTile - 1) / kTile;
  if (col_tiles > 0x7fffffff)
    throw std::invalid_argument(std::string(kOp) + ": m is too large for one launch");
  constexpr index_t kMaxY = 65535, kMaxZ = 65535;
  for (index_t b0 = 0; b0 < B; b0 += kMaxZ) {
    const index_t nb = std::min(kMaxZ, B - b0);
    for (index_t t0 = 0; t0 < row_tiles; t0 += kMaxY) {
      const index_t nt = std::min(kMaxY, row_tiles - t0);
      const dim3 grid{unsigned(col_tiles), unsigned(nt), unsigned(nb)};
      pairwise_tile_kernel<MODE, T><<<grid, kTileThreads, 0, stream>>>(a, b, out, n, m, d, t0, b0);
      SP_CUDA_LAUNCH_CHECK(kOp, pairwise_tile_kernel);
    }
  }
}

}  // namespace

void pairwise_sqdist_cuda(const void* a, const void* b, float* out, index_t B, index_t n,
                          index_t m, index_t d, DType dtype, bool allow_tf32, stream_t stream) {
  SP_CHECK_ARG(B >= 1 && n >= 1 && m >= 1 && d >= 1, "pairwise_sqdist: empty input");
  const cudaStream_t s = cuda::to_stream(stream);
  if (dtype == DType::F16) {
    launch<cuda::kHalf>(static_cast<const __half*>(a), static_cast<const __half*>(b), out, B, n, m, d, s);
  } else if (dtype == DType::F32) {
    if (allow_tf32)
      launch<cuda::kTF32>(static_cast<const float*>(a), static_cast<const float*>(b), out, B, n, m, d, s);
    else
      launch<cuda::kExact>(static_cast<const float*>(a), static_cast<const float*>(b), out, B, n, m, d, s);
  } else {
    throw std::invalid_argument("pairwise_sqdist: unknown dtype code");
  }
}

}  // namespace sp
