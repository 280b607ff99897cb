// Run-time facts about CUDA, probed lazily (importing never touches CUDA).
#pragma once
#include <string>

namespace sp {

struct CudaProbe {
  int device_count = 0;         // usable devices (0 when none or on error)
  int runtime_version = 0;      // e.g. 13000, 0 in a CPU-only build
  int driver_version = 0;       // 0 when no driver
  std::string reason;           // why device_count == 0, empty otherwise
};

bool cuda_compiled();
CudaProbe cuda_probe();
// Name of device `ordinal` ("" when unavailable) and its peak figures.
std::string cuda_device_name(int ordinal);

}  // namespace sp
