// Scratch memory for the per-ISA CPU kernels.
//
//  * Vec<T>: std::vector with a per-ISA allocator, so every instantiation is a
//    distinct type per ISA copy (see simd.h on shared weak symbols).
//  * Buffer<T> / Carve: 64-byte aligned scratch, allocated before a parallel
//    region (an exception inside one would abort) and sliced per thread.
#pragma once
#include "simd.h"
#ifndef SP_ISA_NS
#error "tiles.h belongs to the per-ISA kernel sources (compiled with SP_CPU_ISA defined)"
#endif
#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

namespace sp {
namespace SP_ISA_NS {

// 64-byte aligned allocations (whole cache lines, aligned vector loads).
template <class T>
struct IsaAllocator {
  using value_type = T;
  IsaAllocator() = default;
  template <class U>
  IsaAllocator(const IsaAllocator<U>&) {}
  T* allocate(size_t n) {
    const size_t bytes = (n * sizeof(T) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, bytes ? bytes : 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const IsaAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const IsaAllocator<U>&) const { return false; }
};

template <class T>
using Vec = std::vector<T, IsaAllocator<T>>;

// 64-byte aligned scratch buffer (per thread, reused across tiles).
template <class T>
struct Buffer {
  T* ptr = nullptr;
  size_t size = 0;
  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(ptr); }
  T* get(size_t n) {
    if (n > size) {
      std::free(ptr);
      ptr = IsaAllocator<T>().allocate(n);
      size = n;
    }
    return ptr;
  }
};

// Hands out 64-byte aligned slices of one buffer.
struct Carve {
  float* next;
  float* take(index_t n) {
    float* p = next;
    next += (n + 15) / 16 * 16;
    return p;
  }
  static index_t size(index_t n) { return (n + 15) / 16 * 16; }
};

}  // namespace SP_ISA_NS
}  // namespace sp
