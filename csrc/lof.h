// lof: local outlier factor of every sample within each of B independent groups
// (SoftPatch: one group per patch position, the samples are the N images).
//
// Shapes: x [B, n, d] float32 C-contiguous, out [B, n] float32.
// Per group, with neighbours N_k(a) = the k nearest *other* samples (self
// excluded by index, so a duplicate of `a` is a neighbour at distance 0; ties
// broken by the lower index), Euclidean distances:
//   kdist(b)     = distance from b to its k-th neighbour
//   reach(a, b)  = max(kdist(b), ||a - b||)
//   lrd(a)       = 1 / (mean_{b in N_k(a)} reach(a, b) + 1e-10)
//   out[a]       = mean_{b in N_k(a)} lrd(b) / lrd(a)
// This equals -LocalOutlierFactor(n_neighbors=k).negative_outlier_factor_ of
// scikit-learn (same 1e-10 guard). Duplicates give finite values: a sample
// with >= k exact copies has lrd 1e10, so its neighbours' ratios are large but
// finite (e.g. all-identical groups give exactly 1); the float32 result is
// clamped to FLT_MAX so it can never be inf. scikit-learn may order tied
// neighbours differently, so with duplicates only the lower-index rule above
// is the contract (_reference.lof follows it).
//
// CPU kernel: float32 SIMD Gram distances select candidates with a rigorous
// error margin, the k nearest are then chosen on exact float64 distances
// (summed in numpy's order), so the result equals the float64 reference up to
// the final float32 rounding, on every instruction-set path (cpu/simd.h,
// SOFTPATCH_CPU_ISA). Memory: an n x n float32 matrix per thread up to n ~ 2000
// samples per group, O(n) beyond.
// Contract: n >= 2 and 1 <= k <= n - 1 (the Python wrapper clamps k like
// scikit-learn and handles n == 1). lof_cpu checks that x is finite while it
// reads it (std::invalid_argument otherwise), so the Python layer does not
// scan it first.
#pragma once
#include "common.h"

namespace sp {

void lof_cpu(const float* x, index_t B, index_t n, index_t d, index_t k,
             float* out);

#ifdef SOFTPATCH_WITH_CUDA
// workspace: float32 device buffer of lof_cuda_workspace_floats(B, n, k) elements.
index_t lof_cuda_workspace_floats(index_t B, index_t n, index_t k);
void lof_cuda(const float* x, index_t B, index_t n, index_t d, index_t k,
              float* out, float* workspace, stream_t stream);
#endif

}  // namespace sp
