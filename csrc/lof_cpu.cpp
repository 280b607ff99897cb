// TEMPORARY naive implementation (to be replaced by the optimised kernel).
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "lof.h"

namespace sp {

void lof_cpu(const float* x, index_t B, index_t n, index_t d, index_t k,
             float* out) {
#pragma omp parallel
  {
    std::vector<double> dist(n * n);
    std::vector<index_t> nbr(n * k);
    std::vector<double> ndist(n * k), kdist(n), lrd(n);
    std::vector<index_t> order(n);
#pragma omp for schedule(dynamic)
    for (index_t g = 0; g < B; ++g) {
      const float* xg = x + g * n * d;
      for (index_t i = 0; i < n; ++i)
        for (index_t j = 0; j < n; ++j) {
          double s = 0;
          for (index_t t = 0; t < d; ++t) {
            double u = double(xg[i * d + t]) - xg[j * d + t];
            s += u * u;
          }
          dist[i * n + j] = std::sqrt(s);
        }
      for (index_t i = 0; i < n; ++i) {
        std::iota(order.begin(), order.end(), index_t(0));
        std::swap(order[i], order[n - 1]);  // drop self
        std::partial_sort(order.begin(), order.begin() + k, order.begin() + (n - 1),
                          [&](index_t a, index_t b) {
                            double da = dist[i * n + a], db = dist[i * n + b];
                            return da < db || (da == db && a < b);
                          });
        for (index_t t = 0; t < k; ++t) {
          nbr[i * k + t] = order[t];
          ndist[i * k + t] = dist[i * n + order[t]];
        }
        kdist[i] = ndist[i * k + k - 1];
      }
      for (index_t i = 0; i < n; ++i) {
        double s = 0;
        for (index_t t = 0; t < k; ++t)
          s += std::max(kdist[nbr[i * k + t]], ndist[i * k + t]);
        lrd[i] = 1.0 / (s / k + 1e-10);
      }
      for (index_t i = 0; i < n; ++i) {
        double s = 0;
        for (index_t t = 0; t < k; ++t) s += lrd[nbr[i * k + t]] / lrd[i];
        out[g * n + i] = float(s / k);
      }
    }
  }
}

}  // namespace sp
