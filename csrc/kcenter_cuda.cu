// TEMPORARY: placeholder until the CUDA kernel lands.
#include "kcenter.h"
namespace sp {
index_t kcenter_cuda_workspace_floats(index_t) { return 0; }
void kcenter_greedy_cuda(const void*, index_t, index_t, index_t, index_t, const index_t*, index_t, const float*, index_t*, DType, float*, stream_t) {
  throw CudaError("kcenter_greedy: CUDA kernel not implemented yet");
}
}  // namespace sp
