// TEMPORARY naive implementation (to be replaced by the tiled kernel).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "knn.h"

namespace sp {

void knn_cpu(const float* queries, index_t q, const float* bank, index_t m,
             index_t d, index_t k, const float* weights, float* out_dist,
             index_t* out_idx, float* out_score, index_t, index_t) {
#pragma omp parallel
  {
    std::vector<float> dist(m);
    std::vector<index_t> order(m);
#pragma omp for schedule(static)
    for (index_t i = 0; i < q; ++i) {
      const float* qi = queries + i * d;
      for (index_t j = 0; j < m; ++j) {
        const float* bj = bank + j * d;
        float s = 0.f;
        for (index_t t = 0; t < d; ++t) {
          float u = qi[t] - bj[t];
          s += u * u;
        }
        dist[j] = s;
      }
      std::iota(order.begin(), order.end(), index_t(0));
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](index_t x, index_t y) {
                          return dist[x] < dist[y] || (dist[x] == dist[y] && x < y);
                        });
      for (index_t t = 0; t < k; ++t) {
        out_idx[i * k + t] = order[t];
        out_dist[i * k + t] = std::sqrt(std::max(dist[order[t]], 0.f));
      }
      if (weights && out_score) out_score[i] = out_dist[i * k] * weights[order[0]];
    }
  }
}

}  // namespace sp
