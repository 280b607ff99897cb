// pairwise_sqdist: batched squared Euclidean distances.
//
//   out[b, i, j] = sum_k (a[b, i, k] - b[b, j, k])^2,  clamped at >= 0
//
// Shapes: a [B, n, d], b [B, m, d], out [B, n, m]; all C-contiguous.
// Accumulation in float32 (the ||a||^2 + ||b||^2 - 2 a.b expansion is allowed;
// results are clamped at 0 so duplicates give exactly-or-nearly 0, never < 0).
// B >= 1, n >= 1, m >= 1, d >= 1 are guaranteed by the Python wrapper.
//
// CPU: the expansion runs on data centred on b's column mean (per batch), and
// values below 2^-10 of the centred squared norms are recomputed from the
// differences (double accumulation), so duplicates give exactly 0 and small
// distances keep their relative accuracy. Instruction set picked at run time
// (AVX-512 / AVX2+FMA / portable; env SOFTPATCH_CPU_ISA pins one, see
// cpu/simd.h); throws std::invalid_argument for a bad or unsupported pin.
#pragma once
#include "common.h"

namespace sp {

void pairwise_sqdist_cpu(const float* a, const float* b, float* out,
                         index_t B, index_t n, index_t m, index_t d);

#ifdef SOFTPATCH_WITH_CUDA
// a, b: device pointers of `dtype` (F32 or F16); out: device float32.
// allow_tf32: let float32 inputs use TF32 tensor-core math (less precise).
void pairwise_sqdist_cuda(const void* a, const void* b, float* out,
                          index_t B, index_t n, index_t m, index_t d,
                          DType dtype, bool allow_tf32, stream_t stream);
#endif

}  // namespace sp
