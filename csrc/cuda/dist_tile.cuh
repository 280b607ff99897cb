// One 64 x 64 tile of squared Euclidean distances, computed by a 128-thread
// block into shared memory; shared by pairwise_sqdist, knn and lof.
//
// The feature dimension is walked in slices of 32: both 64-row operand slices
// are staged in shared memory (zero-padded past the valid rows / d), then
//   kExact: each thread accumulates 8 x 4 outputs of sum (a - b)^2 with FP32
//           FMAs (no cancellation: duplicates give exactly 0);
//   kTF32 : WMMA m16n16k8 TF32 tensor cores compute a.b, then
//           ||a||^2 + ||b||^2 - 2 a.b, clamped at 0;
//   kHalf : WMMA m16n16k16 FP16 tensor cores (FP32 accumulation), same epilogue.
// Each of the 4 warps owns a 32 x 32 quarter (2 x 2 WMMA fragments). Slices
// are staged with 16-byte loads when rows are 16-byte aligned.
// The norms either come precomputed in sm.na / sm.nb (knn) or are accumulated
// from the staged slices (pairwise, accumulate_norms = true), so they are
// computed from exactly the values the tensor cores saw.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common.h"

namespace sp {
namespace cuda {

constexpr int kTile = 64;       // rows of A and of B per tile
constexpr int kSlice = 32;      // feature slice staged per step
constexpr int kTileThreads = 128;
constexpr int kCLd = kTile + 4; // leading dim of the output tile (floats)

enum TileMode : int { kExact = 0, kTF32 = 1, kHalf = 2 };

template <int MODE> struct TileTraits;
template <> struct TileTraits<kExact> { using S = float;  static constexpr int ld = kSlice + 1; };
template <> struct TileTraits<kTF32>  { using S = float;  static constexpr int ld = kSlice + 4; };
template <> struct TileTraits<kHalf>  { using S = __half; static constexpr int ld = kSlice + 8; };

// Shared-memory layout of one tile. WMMA needs 32-byte aligned fragment
// pointers: every array size below is a multiple of 32 bytes.
template <int MODE>
struct alignas(128) TileSmem {
  using S = typename TileTraits<MODE>::S;
  static constexpr int ld = TileTraits<MODE>::ld;
  alignas(32) S a[kTile][ld];
  alignas(32) S b[kTile][ld];
  alignas(32) float c[kTile][kCLd];  // squared distances after distance_tile()
  float na[kTile];                   // ||a_r||^2 (tensor-core modes)
  float nb[kTile];                   // ||b_c||^2
};

template <int MODE, class T>
__device__ __forceinline__ typename TileTraits<MODE>::S stage_value(T v) {
  if constexpr (MODE == kHalf) {
    static_assert(std::is_same<T, __half>::value, "kHalf needs half inputs");
    return v;
  } else if constexpr (MODE == kTF32) {
    return nvcuda::wmma::__float_to_tf32(float(v));
  } else {
    return float(v);
  }
}

// Stages rows [0, rows) x features [k0, k0 + kSlice) of `src` (row stride d) into dst.
// vec: every row of src is 16-byte aligned and d * sizeof(T) % 16 == 0, so
// 16-byte loads never straddle the end of a row.
template <int MODE, class T>
__device__ __forceinline__ void stage_slice(typename TileTraits<MODE>::S (*dst)[TileTraits<MODE>::ld],
                                            const T* __restrict__ src, int rows, index_t d, index_t k0,
                                            bool vec) {
  using S = typename TileTraits<MODE>::S;
  if (vec) {
    constexpr int per = 16 / sizeof(T);         // elements per 16-byte load
    constexpr int vecs_per_row = kSlice / per;  // 4 (half) or 8 (float)
    for (int e = threadIdx.x; e < kTile * vecs_per_row; e += kTileThreads) {
      const int r = e / vecs_per_row, c = (e % vecs_per_row) * per;
      const index_t k = k0 + c;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows && k < d) raw = __ldg(reinterpret_cast<const uint4*>(src + index_t(r) * d + k));
      const T* vals = reinterpret_cast<const T*>(&raw);
      if constexpr (MODE == kHalf) {
        *reinterpret_cast<uint4*>(&dst[r][c]) = raw;  // ld * 2 bytes and c * 2 are multiples of 16
      } else {
#pragma unroll
        for (int t = 0; t < per; ++t) dst[r][c + t] = stage_value<MODE>(vals[t]);
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < kTile * kSlice; e += kTileThreads) {
    const int r = e / kSlice, c = e % kSlice;
    const index_t k = k0 + c;
    S v = stage_value<MODE>(T(0.f));
    if (r < rows && k < d) v = stage_value<MODE>(src[index_t(r) * d + k]);
    dst[r][c] = v;
  }
}

// Squared distances between rows [0, rows_a) of A and [0, rows_b) of B
// (A, B point at the first row; row stride d) into sm.c[r][c]. Entries outside
// the valid rows/columns hold garbage and must be ignored by the caller.
// All kTileThreads threads must call it. Ends with __syncthreads().
template <int MODE, bool ACC_NORMS, class T>
__device__ void distance_tile(const T* __restrict__ A, int rows_a, const T* __restrict__ B, int rows_b,
                              index_t d, TileSmem<MODE>& sm) {
  const int tid = threadIdx.x;
  const bool vec = (d * index_t(sizeof(T))) % 16 == 0 && reinterpret_cast<uintptr_t>(A) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(B) % 16 == 0;
  if constexpr (MODE == kExact) {
    const int ty = tid >> 4, tx = tid & 15;  // rows ty + 8 r, columns tx + 16 c
    float acc[8][4];
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
    for (index_t k0 = 0; k0 < d; k0 += kSlice) {
      stage_slice<MODE>(sm.a, A, rows_a, d, k0, vec);
      stage_slice<MODE>(sm.b, B, rows_b, d, k0, vec);
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kSlice; ++kk) {
        float av[8], bv[4];
#pragma unroll
        for (int r = 0; r < 8; ++r) av[r] = sm.a[ty + 8 * r][kk];
#pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = sm.b[tx + 16 * c][kk];
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float u = av[r] - bv[c];
            acc[r][c] = fmaf(u, u, acc[r][c]);
          }
      }
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) sm.c[ty + 8 * r][tx + 16 * c] = acc[r][c];
    __syncthreads();
  } else {
    using namespace nvcuda;
    using S = typename TileTraits<MODE>::S;
    constexpr int ld = TileTraits<MODE>::ld;
    constexpr int WK = MODE == kHalf ? 16 : 8;
    using InA = typename std::conditional<MODE == kHalf, __half, wmma::precision::tf32>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, WK, InA, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, WK, InA, wmma::col_major> fb[2];
    wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    const int warp = tid >> 5;
    const int wr = (warp >> 1) * 32, wc = (warp & 1) * 32;
    float norm = 0.f;  // ACC_NORMS: thread t < 64 sums row t of A, t >= 64 row t-64 of B
    for (index_t k0 = 0; k0 < d; k0 += kSlice) {
      stage_slice<MODE>(sm.a, A, rows_a, d, k0, vec);
      stage_slice<MODE>(sm.b, B, rows_b, d, k0, vec);
      __syncthreads();
      if constexpr (ACC_NORMS) {
        const S* row = tid < kTile ? sm.a[tid] : sm.b[tid - kTile];
#pragma unroll 8
        for (int kk = 0; kk < kSlice; ++kk) {
          const float v = float(row[kk]);
          norm = fmaf(v, v, norm);
        }
      }
#pragma unroll
      for (int kk = 0; kk < kSlice; kk += WK) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], &sm.a[wr + 16 * i][kk], ld);
          if constexpr (MODE == kTF32) {
#pragma unroll
            for (int t = 0; t < fa[i].num_elements; ++t) fa[i].x[t] = wmma::__float_to_tf32(fa[i].x[t]);
          }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          wmma::load_matrix_sync(fb[j], &sm.b[wc + 16 * j][kk], ld);
          if constexpr (MODE == kTF32) {
#pragma unroll
            for (int t = 0; t < fb[j].num_elements; ++t) fb[j].x[t] = wmma::__float_to_tf32(fb[j].x[t]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&sm.c[wr + 16 * i][wc + 16 * j], acc[i][j], kCLd, wmma::mem_row_major);
    if constexpr (ACC_NORMS) {
      if (tid < kTile) sm.na[tid] = norm;
      else sm.nb[tid - kTile] = norm;
    }
    __syncthreads();
    for (int e = tid; e < kTile * kTile; e += kTileThreads) {
      const int r = e / kTile, c = e % kTile;
      sm.c[r][c] = fmaxf(sm.na[r] + sm.nb[c] - 2.f * sm.c[r][c], 0.f);
    }
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace sp
