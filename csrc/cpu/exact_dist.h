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

// numpy's pairwise sums of N independent series, term(r, t) for r < N and t
// in [t0, t0 + n): `terms` provides one(r, t) (a double) and eight(r, t)
// (terms t .. t + 7 of series r as a dvec8). The N series share the loop, so
// their dependency chains overlap (one series alone waits on its adds).
template <int N>
struct Sums {
  double v[N];
};

template <int N, class Terms>
Sums<N> numpy_pairwise_sums(const Terms& terms, index_t t0, index_t n) {
  Sums<N> out;
  if (n > 128) {
    index_t n2 = n / 2;
    n2 -= n2 % 8;
    const Sums<N> lo = numpy_pairwise_sums<N>(terms, t0, n2);
    const Sums<N> hi = numpy_pairwise_sums<N>(terms, t0 + n2, n - n2);
    for (int r = 0; r < N; ++r) out.v[r] = lo.v[r] + hi.v[r];
    return out;
  }
  if (n < 8) {
    for (int r = 0; r < N; ++r) {
      double s = 0.;
      for (index_t t = t0; t < t0 + n; ++t) s += terms.one(r, t);
      out.v[r] = s;
    }
    return out;
  }
  // numpy starts the accumulators at the first 8 terms; 0 + x == x exactly.
  dvec8 acc[N];
  for (int r = 0; r < N; ++r) acc[r] = d8_zero();
  const index_t end8 = t0 + (n - n % 8);
  for (index_t t = t0; t < end8; t += 8)
    for (int r = 0; r < N; ++r) acc[r] = d8_add(acc[r], terms.eight(r, t));
  for (int r = 0; r < N; ++r) {
    double a[8];
    d8_store(a, acc[r]);
    double s = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
    for (index_t t = end8; t < t0 + n; ++t) s += terms.one(r, t);
    out.v[r] = s;
  }
  return out;
}

// Squared differences of row `a` with rows b[0 .. N) (float32 rows, or their
// exact float64 copies: the same terms).
template <int N, class T>
struct SquaredDiffs {
  const T* a;
  const T* const* b;
  double one(int r, index_t t) const {
    const double u = double(a[t]) - double(b[r][t]);
    return u * u;
  }
  dvec8 eight(int r, index_t t) const {
    const dvec8 u = d8_sub(d8_load(a + t), d8_load(b[r] + t));
    return d8_mul(u, u);
  }
};

struct Values {
  const double* a;
  double one(int, index_t t) const { return a[t]; }
  dvec8 eight(int, index_t t) const { return d8_load(a + t); }
};

// numpy's float64 ((a - b) ** 2).sum() of two float32 rows of length d.
template <class T>
double exact_sqdist(const T* a, const T* b, index_t d) {
  return numpy_pairwise_sums<1>(SquaredDiffs<1, T>{a, &b}, 0, d).v[0];
}

// The same for row a against rows b[0], b[1] at once (twice the throughput of
// two calls: the two dependency chains interleave).
template <class T>
Sums<2> exact_sqdist2(const T* a, const T* const b[2], index_t d) {
  return numpy_pairwise_sums<2>(SquaredDiffs<2, T>{a, b}, 0, d);
}

// numpy's float64 a.sum() of n values.
inline double numpy_sum(const double* a, index_t n) { return numpy_pairwise_sums<1>(Values{a}, 0, n).v[0]; }

}  // namespace SP_ISA_NS
}  // namespace sp
