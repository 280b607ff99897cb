// kcenter_greedy: greedy k-center (farthest-point) coreset selection.
//
// x [n, d] float32 C-contiguous; out_idx [m] int64, in selection order; the
// CPU functions return how many indices they wrote (see "Distinct centres").
// sample_weight [n] float32 (>= 0) or nullptr (all ones). A point's priority
// is sample_weight[i] * mindist[i], where mindist[i] is its Euclidean distance
// to the nearest selected centre; each step selects the point of largest
// priority (ties -> lowest index), then lowers every mindist by the distance
// to the new centre. Points of weight 0 are never selected.
//
// Exact variant: the first centre is `start`; identical indices to the naive
// O(n*m*d) loop. Pruning may skip only work that provably cannot change a
// mindist (triangle inequality / partial-distance early exit), so results are
// the same as the naive loop's. On the CPU "identical" is bit-exact against
// _reference.kcenter_greedy: every deciding distance is float64, summed in
// numpy's order; float32 / float16 copies only feed rigorous lower bounds.
// CPU instruction set as for every CPU kernel (cpu/simd.h, SOFTPATCH_CPU_ISA).
//
// Approximate variant (PatchCore's ApproximateGreedyCoresetSampler): the
// initial mindist of every point is its mean distance to the `n_anchors`
// points `anchors` (chosen at random by the caller); the first centre is the
// argmax of weight * that value, and the loop continues as above.
//
// Distinct centres: no index, and no row, is ever selected twice. When the
// largest priority is 0, the next centre is the lowest-index eligible point
// that coincides with no selected centre (exact variant: there is none, since
// priority 0 means distance 0 to a centre; approximate variant: a point
// identical to every anchor may be one); when there is none, selection stops
// early. So exactly min(m, D) indices are returned, D = the number of distinct
// rows among the points of weight > 0, and the first of them equal the naive
// loop's (which would select already-covered points again).
//
// Contract (checked by the Python wrapper): 1 <= m <= number of points with
// weight > 0; 0 <= start < n with sample_weight[start] > 0.
#pragma once
#include "common.h"

namespace sp {

// Both return the number of indices written to out_idx[0, count).
index_t kcenter_greedy_cpu(const float* x, index_t n, index_t d, index_t m,
                           index_t start, const float* sample_weight,
                           index_t* out_idx);

index_t kcenter_greedy_approx_cpu(const float* x, index_t n, index_t d, index_t m,
                                  const index_t* anchors, index_t n_anchors,
                                  const float* sample_weight, index_t* out_idx);

#ifdef SOFTPATCH_WITH_CUDA
// x: device pointer of `dtype` (F16 keeps the features half-size, e.g. so that
// 300k x 128 fits in L2). start < 0 means "approximate variant": `anchors`
// (device int64 [n_anchors]) seed the initial distances. workspace: float32
// device buffer of kcenter_cuda_workspace_floats(n) elements. Selection stops
// as on the CPU; the slots after the last centre hold -1 (the caller counts
// them once the stream has run: no host synchronisation here).
index_t kcenter_cuda_workspace_floats(index_t n);
void kcenter_greedy_cuda(const void* x, index_t n, index_t d, index_t m,
                         index_t start, const index_t* anchors,
                         index_t n_anchors, const float* sample_weight,
                         index_t* out_idx, DType dtype, float* workspace,
                         stream_t stream);
#endif

}  // namespace sp
