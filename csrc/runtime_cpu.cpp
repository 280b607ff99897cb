// runtime.h for a build without CUDA.
#include "runtime.h"

namespace sp {

bool cuda_compiled() { return false; }

CudaProbe cuda_probe() {
  CudaProbe p;
  p.reason = "softpatch_cuda was built without CUDA (nvcc was not found at build time)";
  return p;
}

std::string cuda_device_name(int) { return ""; }

}  // namespace sp
