// Shared CUDA helpers: error checks that become sp::CudaError, stream
// conversion, element loads for float / half, and warp/block arg-reductions
// with the project's tie rule (equal values -> lower index).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace sp {
namespace cuda {

inline cudaStream_t to_stream(stream_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Throws CudaError("<op>: <what> failed: <CUDA message>"). The sticky-free
// error is cleared first so the next op does not inherit it.
[[noreturn]] inline void throw_cuda(const char* op, const char* what, cudaError_t err) {
  cudaGetLastError();
  throw CudaError(std::string(op) + ": " + what + " failed: " + cudaGetErrorName(err) + " (" +
                  cudaGetErrorString(err) + ")");
}

inline void check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) throw_cuda(op, what, err);
}

// After every <<<...>>>: catches bad configurations and earlier async faults.
inline void check_launch(const char* op, const char* kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw_cuda(op, (std::string("launch of ") + kernel).c_str(), err);
}

#define SP_CUDA_CHECK(op, call) ::sp::cuda::check((call), (op), #call)
#define SP_CUDA_LAUNCH_CHECK(op, kernel) ::sp::cuda::check_launch((op), #kernel)

inline int device_sm_count(const char* op) {
  int dev = 0, sms = 0;
  SP_CUDA_CHECK(op, cudaGetDevice(&dev));
  SP_CUDA_CHECK(op, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// Raises the dynamic shared-memory limit of `kernel` when it needs > 48 KiB,
// with a clear error when the device cannot provide it.
template <class Kernel>
inline void set_dynamic_smem(const char* op, Kernel kernel, size_t bytes) {
  int dev = 0, optin = 0;
  SP_CUDA_CHECK(op, cudaGetDevice(&dev));
  SP_CUDA_CHECK(op, cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes > size_t(optin))
    throw CudaError(std::string(op) + ": kernel needs " + std::to_string(bytes) +
                    " bytes of shared memory per block, the device allows " + std::to_string(optin));
  if (bytes > 48 * 1024)
    SP_CUDA_CHECK(op, cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           int(bytes)));
}

// ---------------------------------------------------------------- device side
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

// Strict "a beats b" for an argmax with ties -> lower index.
__device__ __forceinline__ bool argmax_better(float va, int64_t ia, float vb, int64_t ib) {
  return va > vb || (va == vb && ia < ib);
}
// Strict "a beats b" for an argmin with ties -> lower index.
__device__ __forceinline__ bool argmin_better(float va, int64_t ia, float vb, int64_t ib) {
  return va < vb || (va == vb && ia < ib);
}

// Whole-warp argmax; every lane ends with the winner. Index -1 = no candidate
// (value must then be -inf or lower than any real candidate).
__device__ __forceinline__ void warp_argmax(float& v, int64_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, off);
    int64_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (oi >= 0 && (i < 0 || argmax_better(ov, oi, v, i))) { v = ov; i = oi; }
  }
}

__device__ __forceinline__ void warp_argmin(float& v, int64_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float ov = __shfl_xor_sync(0xffffffffu, v, off);
    int64_t oi = __shfl_xor_sync(0xffffffffu, i, off);
    if (oi >= 0 && (i < 0 || argmin_better(ov, oi, v, i))) { v = ov; i = oi; }
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide argmax (blockDim.x a multiple of 32, <= 1024); all threads must
// call it; every thread gets the result. Uses 32 + 32 slots of shared memory.
__device__ __forceinline__ void block_argmax(float& v, int64_t& i) {
  __shared__ float s_v[32];
  __shared__ int64_t s_i[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  warp_argmax(v, i);
  __syncthreads();  // s_v/s_i may still be read by a previous call
  if (lane == 0) { s_v[warp] = v; s_i[warp] = i; }
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? s_v[lane] : -INFINITY;
    i = lane < nwarps ? s_i[lane] : int64_t(-1);
    warp_argmax(v, i);
    if (lane == 0) { s_v[0] = v; s_i[0] = i; }
  }
  __syncthreads();
  v = s_v[0];
  i = s_i[0];
}

}  // namespace cuda
}  // namespace sp
