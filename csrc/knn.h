// knn: the k nearest bank rows of every query, by Euclidean distance, without
// ever materialising the q x m distance matrix (query x bank tiles + a running
// top-k per query).
//
// Shapes: queries [q, d], bank [m, d] (C-contiguous float32),
//         out_dist [q, k] float32  -- Euclidean distance (sqrt of the clamped
//                                     squared distance), ascending,
//         out_idx  [q, k] int64    -- bank row indices, nearest first,
//         weights  [m] float32 or nullptr,
//         out_score [q] float32 or nullptr -- when weights != nullptr:
//                     out_score[i] = out_dist[i, 0] * weights[out_idx[i, 0]]
//                     (SoftPatch's soft-weighted test-time patch score).
// Contract: 1 <= k <= m (the Python wrapper clamps k to m). Ties in distance
// are broken by the lower bank index, so results are deterministic.
// tile_q / tile_m: tile sizes (0 = kernel default); exposed so tests can force
// partial tiles.
//
// CPU: candidates are selected with the norm expansion on data centred on the
// bank mean, keeping k + 8 per query; those are rechecked from the differences
// (double accumulation) and re-sorted, so the returned distances are exact to
// float32 rounding and near-ties mis-ordered by the expansion are restored.
// Inputs must be finite (the Python wrapper checks); with NaN rows a query may
// get fewer than k candidates: the missing slots are NaN / index -1 (and the
// score NaN). Instruction set as for every CPU kernel (cpu/simd.h).
#pragma once
#include "common.h"

namespace sp {

void knn_cpu(const float* queries, index_t q, const float* bank, index_t m,
             index_t d, index_t k, const float* weights, float* out_dist,
             index_t* out_idx, float* out_score, index_t tile_q, index_t tile_m);

#ifdef SOFTPATCH_WITH_CUDA
// Device pointers; queries/bank of `dtype`; weights float32 or nullptr.
// workspace: float32 device buffer of knn_cuda_workspace_floats(q, m, k)
// elements (bank squared norms, plus partial top-k lists when the bank is split
// across blocks because there are few queries). k <= 64 on CUDA.
index_t knn_cuda_workspace_floats(index_t q, index_t m, index_t k);
void knn_cuda(const void* queries, index_t q, const void* bank, index_t m,
              index_t d, index_t k, const float* weights, float* out_dist,
              index_t* out_idx, float* out_score, DType dtype, bool allow_tf32,
              float* workspace, stream_t stream);
#endif

}  // namespace sp
