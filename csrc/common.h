// Shared definitions for every kernel: index type, dtype tag, argument checks.
// Kernels never see Python: they take raw pointers + sizes and throw C++
// exceptions, which the binding module turns into Python exceptions
// (std::invalid_argument -> ValueError, CudaError -> softpatch_cuda.CudaError).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

namespace sp {

using index_t = int64_t;

// Element type of a floating-point input array. CPU kernels accept F32 only
// (the Python layer upcasts float16 explicitly); CUDA kernels accept both.
enum class DType : int { F32 = 0, F16 = 1 };

// A CUDA stream passed from Python as an integer (cudaStream_t is a pointer).
using stream_t = uintptr_t;

// A failure reported by the CUDA runtime; carries the op name and the CUDA
// message. Bound to Python as softpatch_cuda.CudaError (a RuntimeError).
struct CudaError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define SP_CHECK_ARG(cond, msg)                                         \
  do {                                                                  \
    if (!(cond)) throw std::invalid_argument(std::string(msg));         \
  } while (0)

}  // namespace sp
