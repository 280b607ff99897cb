// runtime.h for a CUDA build. The CUDA runtime is linked statically and loads
// the driver only on first use, so a machine without a driver still imports
// the module; the probe then reports why no device is usable.
#include <cuda_runtime.h>

#include "runtime.h"

namespace sp {

bool cuda_compiled() { return true; }

CudaProbe cuda_probe() {
  CudaProbe p;
  cudaRuntimeGetVersion(&p.runtime_version);
  if (cudaDriverGetVersion(&p.driver_version) != cudaSuccess) p.driver_version = 0;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky error so later calls start clean
    p.device_count = 0;
    if (p.driver_version == 0) {
      p.reason = std::string("no CUDA driver found (") + cudaGetErrorString(err) + ")";
    } else if (p.driver_version < p.runtime_version) {
      p.reason = "the CUDA driver supports CUDA " + std::to_string(p.driver_version / 1000) +
                 "." + std::to_string((p.driver_version % 1000) / 10) +
                 " but softpatch_cuda was built with CUDA " +
                 std::to_string(p.runtime_version / 1000) + "." +
                 std::to_string((p.runtime_version % 1000) / 10);
    } else {
      p.reason = std::string("cudaGetDeviceCount failed: ") + cudaGetErrorString(err);
    }
    return p;
  }
  p.device_count = count;
  if (count == 0) p.reason = "no CUDA device is visible";
  return p;
}

std::string cuda_device_name(int ordinal) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, ordinal) != cudaSuccess) {
    cudaGetLastError();
    return "";
  }
  return prop.name;
}

}  // namespace sp
