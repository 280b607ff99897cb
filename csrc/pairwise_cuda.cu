// TEMPORARY: placeholder until the CUDA kernel lands.
#include "pairwise.h"
namespace sp {
void pairwise_sqdist_cuda(const void*, const void*, float*, index_t, index_t, index_t, index_t, DType, bool, stream_t) {
  throw CudaError("pairwise_sqdist: CUDA kernel not implemented yet");
}
}  // namespace sp
