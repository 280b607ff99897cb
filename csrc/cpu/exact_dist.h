// Exact distances: float64 arithmetic in numpy's summation order.
//
// exact_sqdist(a, b, d) is bit for bit numpy's float64
// ((a.astype(float64) - b) ** 2).sum(): numpy's pairwise sum -- below 8 terms a
// plain loop; up to 128 terms 8 interleaved accumulators combined as
// ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7)), then the tail in order;
// above 128 the range is halved (first half a multiple of 8) recursively.
// Differences and squares are rounded separately (the library is compiled with
// -ffp-contract=off), as numpy rounds them. The 8 accumulators are the 8
// lanes of a dvec8 (simd.h), so every ISA copy computes the same bits
// (k-center's indices equal the naive loop's, lof is the same on every path).
//
// Used wherever a distance decides something: k-center's every distance, the
// candidates of lof and knn, and pairwise's near-zero values.
#pragma once
#include "simd.h"
#ifndef SP_ISA_NS
#error "exact_dist.h belongs to the per-ISA kernel sources (compiled with SP_CPU_ISA defined)"
#endif

namespace sp {
namespace SP_ISA_NS {

// numpy's pairwise sum of the n terms term(t), t in [t0, t0 + n); `terms`
// provides one(t) (a double) and eight(t) (terms t .. t + 7 as a dvec8).
template <class Terms>
double numpy_pairwise_sum(const Terms& terms, index_t t0, index_t n) {
  if (n > 128) {
    index_t n2 = n / 2;
    n2 -= n2 % 8;
    return numpy_pairwise_sum(terms, t0, n2) + numpy_pairwise_sum(terms, t0 + n2, n - n2);
  }
  if (n < 8) {
    double s = 0.;
    for (index_t t = t0; t < t0 + n; ++t) s += terms.one(t);
    return s;
  }
  // numpy starts the accumulators at the first 8 terms; 0 + x == x exactly.
  dvec8 acc = d8_zero();
  const index_t end8 = t0 + (n - n % 8);
  for (index_t t = t0; t < end8; t += 8) acc = d8_add(acc, terms.eight(t));
  double r[8];
  d8_store(r, acc);
  double s = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  for (index_t t = end8; t < t0 + n; ++t) s += terms.one(t);
  return s;
}

template <class T>
struct SquaredDiffs {
  const T* a;
  const T* b;
  double one(index_t t) const {
    const double u = double(a[t]) - double(b[t]);
    return u * u;
  }
  dvec8 eight(index_t t) const {
    const dvec8 u = d8_sub(d8_load(a + t), d8_load(b + t));
    return d8_mul(u, u);
  }
};

struct Values {
  const double* a;
  double one(index_t t) const { return a[t]; }
  dvec8 eight(index_t t) const { return d8_load(a + t); }
};

// numpy's float64 ((a - b) ** 2).sum() of two float32 rows of length d.
inline double exact_sqdist(const float* a, const float* b, index_t d) {
  return numpy_pairwise_sum(SquaredDiffs<float>{a, b}, 0, d);
}

// numpy's float64 a.sum() of n values.
inline double numpy_sum(const double* a, index_t n) { return numpy_pairwise_sum(Values{a}, 0, n); }

}  // namespace SP_ISA_NS
}  // namespace sp
