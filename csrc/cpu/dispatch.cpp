// The public CPU entry points (pairwise.h, knn.h, lof.h, kcenter.h): check the
// arguments, pick the instruction-set copy (simd.h), call its kernel table.
// Compiled once, without ISA flags.
#include <cctype>
#include <cstdlib>
#include <string>

#include "kcenter.h"
#include "kernels.h"
#include "knn.h"
#include "lof.h"
#include "pairwise.h"
#include "simd.h"

namespace sp {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::Scalar:
      return true;
#if SP_CPU_HAVE_AVX2
    case Isa::Avx2:
      // libgcc's CPUID check also requires the OS to save the YMM state.
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
#endif
#if SP_CPU_HAVE_AVX512
    case Isa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    default:
      return false;
  }
}

Isa active_isa() {
  const char* env = std::getenv("SOFTPATCH_CPU_ISA");  // read at every call: tests switch it
  std::string want;
  for (const char* c = env ? env : ""; *c; ++c)
    if (!std::isspace(static_cast<unsigned char>(*c)))
      want += char(std::tolower(static_cast<unsigned char>(*c)));
  if (want.empty() || want == "auto") {
    for (Isa isa : {Isa::Avx512, Isa::Avx2})
      if (isa_supported(isa)) return isa;
    return Isa::Scalar;
  }
  for (Isa isa : {Isa::Avx512, Isa::Avx2, Isa::Scalar}) {
    if (want != isa_name(isa)) continue;
    if (!isa_supported(isa))
      throw std::invalid_argument(std::string("SOFTPATCH_CPU_ISA=") + isa_name(isa) +
                                  ": not supported by this CPU or not compiled into this build");
    return isa;
  }
  throw std::invalid_argument("SOFTPATCH_CPU_ISA=" + std::string(env) +
                              ": expected one of avx512, avx2, scalar, auto");
}

namespace {
const Kernels& active_kernels() {
  switch (active_isa()) {
#if SP_CPU_HAVE_AVX512
    case Isa::Avx512: return cpu_avx512::kernels;
#endif
#if SP_CPU_HAVE_AVX2
    case Isa::Avx2: return cpu_avx2::kernels;
#endif
    default: return cpu_scalar::kernels;
  }
}
}  // namespace

}  // namespace cpu

void pairwise_sqdist_cpu(const float* a, const float* b, float* out, index_t B, index_t n,
                         index_t m, index_t d) {
  SP_CHECK_ARG(B >= 1 && n >= 1 && m >= 1 && d >= 1, "pairwise_sqdist: empty input");
  cpu::active_kernels().pairwise_sqdist(a, b, out, B, n, m, d);
}

void knn_cpu(const float* queries, index_t q, const float* bank, index_t m, index_t d, index_t k,
             const float* weights, float* out_dist, index_t* out_idx, float* out_score,
             index_t tile_q, index_t tile_m) {
  SP_CHECK_ARG(q >= 1 && m >= 1 && d >= 1, "knn: empty input");
  SP_CHECK_ARG(k >= 1 && k <= m, "knn: k must be in [1, m]");
  cpu::active_kernels().knn(queries, q, bank, m, d, k, weights, out_dist, out_idx, out_score,
                            tile_q, tile_m);
}

void lof_cpu(const float* x, index_t B, index_t n, index_t d, index_t k, float* out) {
  SP_CHECK_ARG(n >= 2 && k >= 1 && k <= n - 1, "lof: need n >= 2 and 1 <= k <= n - 1");
  SP_CHECK_ARG(B >= 1 && d >= 1, "lof: need B >= 1 and d >= 1");
  SP_CHECK_ARG(cpu::active_kernels().lof(x, B, n, d, k, out),
               "lof: argument 'x' contains NaN or infinite values");
}

index_t kcenter_greedy_cpu(const float* x, index_t n, index_t d, index_t m, index_t start,
                           const float* sample_weight, index_t* out_idx) {
  SP_CHECK_ARG(n >= 1 && d >= 1 && m >= 1, "kcenter_greedy: need n, d, m >= 1");
  SP_CHECK_ARG(start >= 0 && start < n, "kcenter_greedy: start must be in [0, n)");
  const index_t got =
      cpu::active_kernels().kcenter_greedy(x, n, d, m, start, nullptr, 0, sample_weight, out_idx);
  SP_CHECK_ARG(got > 0, "kcenter_greedy: no point has a positive sample_weight");
  return got;
}

index_t kcenter_greedy_approx_cpu(const float* x, index_t n, index_t d, index_t m,
                                  const index_t* anchors, index_t n_anchors,
                                  const float* sample_weight, index_t* out_idx) {
  SP_CHECK_ARG(n >= 1 && d >= 1 && m >= 1 && n_anchors >= 1,
               "kcenter_greedy_approx: need n, d, m, n_anchors >= 1");
  const index_t got =
      cpu::active_kernels().kcenter_greedy(x, n, d, m, -1, anchors, n_anchors, sample_weight, out_idx);
  SP_CHECK_ARG(got > 0, "kcenter_greedy_approx: no point has a positive sample_weight");
  return got;
}

}  // namespace sp
