// The CPU kernels of one instruction-set copy, as a table of entry points.
//
// Each ISA copy (simd.h) defines its functions in its own namespace and one
// table, `kernels` (cpu/kernels.cpp); cpu/dispatch.cpp checks the arguments,
// picks a table with cpu::active_isa() and calls through it. Arguments are as
// in the contract headers (pairwise.h, knn.h, lof.h, kcenter.h), already
// checked. Adding an op: a field here, its function in every copy.
#pragma once
#include "common.h"
#include "simd.h"  // SP_ISA_NS, when compiling an ISA copy

namespace sp {
namespace cpu {

struct Kernels {
  void (*pairwise_sqdist)(const float* a, const float* b, float* out, index_t B, index_t n,
                          index_t m, index_t d);
  void (*knn)(const float* queries, index_t q, const float* bank, index_t m, index_t d, index_t k,
              const float* weights, float* out_dist, index_t* out_idx, float* out_score,
              index_t tile_q, index_t tile_m);
  // Returns false when x holds NaN or inf (found while centring; out is then
  // unspecified): the check costs nothing there, unlike a separate pass.
  bool (*lof)(const float* x, index_t B, index_t n, index_t d, index_t k, float* out);
  // start >= 0: exact variant from `start`; start < 0: approximate variant
  // seeded by `anchors`. Returns the number of indices written to out_idx
  // (0: no point has a positive weight).
  index_t (*kcenter_greedy)(const float* x, index_t n, index_t d, index_t m, index_t start,
                         const index_t* anchors, index_t n_anchors, const float* sample_weight,
                         index_t* out_idx);
};

}  // namespace cpu

// One table per compiled copy (the x86 ones only where CMake built them).
namespace cpu_scalar { extern const cpu::Kernels kernels; }
namespace cpu_avx2 { extern const cpu::Kernels kernels; }
namespace cpu_avx512 { extern const cpu::Kernels kernels; }

#ifdef SP_ISA_NS
// The functions behind the table of the copy being compiled.
namespace SP_ISA_NS {
void pairwise_sqdist(const float* a, const float* b, float* out, index_t B, index_t n, index_t m,
                     index_t d);
void knn(const float* queries, index_t q, const float* bank, index_t m, index_t d, index_t k,
         const float* weights, float* out_dist, index_t* out_idx, float* out_score,
         index_t tile_q, index_t tile_m);
bool lof(const float* x, index_t B, index_t n, index_t d, index_t k, float* out);
index_t kcenter_greedy(const float* x, index_t n, index_t d, index_t m, index_t start,
                       const index_t* anchors, index_t n_anchors, const float* sample_weight,
                       index_t* out_idx);
}  // namespace SP_ISA_NS
#endif

}  // namespace sp
