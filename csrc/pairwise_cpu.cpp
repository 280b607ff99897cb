// TEMPORARY naive implementation (to be replaced by the blocked kernel).
#include <algorithm>

#include "pairwise.h"

namespace sp {

void pairwise_sqdist_cpu(const float* a, const float* b, float* out, index_t B,
                         index_t n, index_t m, index_t d) {
#pragma omp parallel for collapse(2) schedule(static)
  for (index_t bb = 0; bb < B; ++bb)
    for (index_t i = 0; i < n; ++i) {
      const float* ai = a + (bb * n + i) * d;
      for (index_t j = 0; j < m; ++j) {
        const float* bj = b + (bb * m + j) * d;
        float s = 0.f;
        for (index_t k = 0; k < d; ++k) {
          float t = ai[k] - bj[k];
          s += t * t;
        }
        out[(bb * n + i) * m + j] = s;
      }
    }
}

}  // namespace sp
