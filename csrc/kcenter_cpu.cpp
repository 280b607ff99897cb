// TEMPORARY naive implementation (to be replaced by the pruned kernel).
#include <cmath>
#include <limits>
#include <vector>

#include "kcenter.h"

namespace sp {
namespace {

float dist(const float* a, const float* b, index_t d) {
  float s = 0.f;
  for (index_t t = 0; t < d; ++t) {
    float u = a[t] - b[t];
    s += u * u;
  }
  return std::sqrt(s);
}

void greedy_loop(const float* x, index_t n, index_t d, index_t m, index_t first,
                 const float* w, std::vector<float>& mind, index_t* out) {
  index_t c = first;
  for (index_t s = 0; s < m; ++s) {
    out[s] = c;
    const float* xc = x + c * d;
    for (index_t i = 0; i < n; ++i) {
      float v = dist(x + i * d, xc, d);
      if (v < mind[i]) mind[i] = v;
    }
    float best = -1.f;
    index_t bi = -1;
    for (index_t i = 0; i < n; ++i) {
      float wi = w ? w[i] : 1.f;
      if (wi <= 0.f) continue;
      float p = wi * mind[i];
      if (p > best) { best = p; bi = i; }
    }
    c = bi;
  }
}

}  // namespace

void kcenter_greedy_cpu(const float* x, index_t n, index_t d, index_t m,
                        index_t start, const float* w, index_t* out) {
  std::vector<float> mind(n, std::numeric_limits<float>::infinity());
  greedy_loop(x, n, d, m, start, w, mind, out);
}

void kcenter_greedy_approx_cpu(const float* x, index_t n, index_t d, index_t m,
                               const index_t* anchors, index_t na,
                               const float* w, index_t* out) {
  std::vector<float> mind(n);
  for (index_t i = 0; i < n; ++i) {
    double s = 0;
    for (index_t a = 0; a < na; ++a) s += dist(x + i * d, x + anchors[a] * d, d);
    mind[i] = float(s / na);
  }
  float best = -1.f;
  index_t bi = 0;
  for (index_t i = 0; i < n; ++i) {
    float wi = w ? w[i] : 1.f;
    if (wi > 0.f && wi * mind[i] > best) { best = wi * mind[i]; bi = i; }
  }
  greedy_loop(x, n, d, m, bi, w, mind, out);
}

}  // namespace sp
