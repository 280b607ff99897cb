// Greedy k-center (farthest-point) coreset selection on the CPU, exact and pruned.
//
// Exactness. Every distance that can change the selection is computed by
// exact_sqdist (exact_dist.h: float64, numpy's summation order, never fused
// into FMAs). Priorities are w * sqrt(min sqdist) in float64 and the argmax
// takes the lowest index on ties. So the result is bit for bit the naive loop
// of _reference.py, whatever work the pruning below skips, on every ISA copy.
//
// Pruning. Every eligible point p (weight > 0) belongs to the group of an
// "owner" centre o(p) with u_p = exact ||p - x_o|| and mind_p <= u_p its
// current min-distance (equal in the exact variant). For a new centre c,
//   ||p - c|| >= ||c - x_o|| - u_p,
// so p cannot improve when ||c - x_o|| >= u_p + mind_p; a whole group is
// skipped when ||c - x_o|| >= max over members of (u_p + mind_p). Centre-to-
// centre distances and the per-point pre-check use fast float32 SIMD distances
// (FMA, any order; half-precision row copies where the ISA converts them in
// hardware) turned into lower bounds with a rigorous relative error bound; only
// points whose float32 lower bound falls below u_p get the exact float64
// distance. Points move to the group of a centre that is strictly closer than
// their owner.
//
// Compiled once per instruction set (simd.h); entry point: cpu/dispatch.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "exact_dist.h"
#include "kernels.h"
#include "simd.h"
#include "tiles.h"

namespace sp {
namespace SP_ISA_NS {

namespace {

// ------------------------------------------------------------------ float32 filters
// The scanned copy of the points: half rows of x * scale where the ISA converts
// half precision in hardware (half the bytes streamed per scanned point),
// float32 rows (scale 1) otherwise.
using Row = std::conditional_t<kHalfRows, uint16_t, float>;

inline vreg load_row(const float* p) { return vload(p); }
inline float row_value(float v) { return v; }
#if SP_CPU_ISA >= 1
inline vreg load_row(const uint16_t* p) { return vload_half(p); }
inline float row_value(uint16_t h) { return half_to_float(h); }
#endif

// Squared distances of 4 rows to one float32 centre, float32, any summation order.
template <class R>
void filter4(const float* c, const R* const p[4], index_t d, float out[4]) {
  vreg s0 = vzero(), s1 = vzero(), s2 = vzero(), s3 = vzero();
  index_t t = 0;
  for (; t + kW <= d; t += kW) {
    const vreg vc = vload(c + t);
    const vreg u0 = vsub(load_row(p[0] + t), vc), u1 = vsub(load_row(p[1] + t), vc);
    const vreg u2 = vsub(load_row(p[2] + t), vc), u3 = vsub(load_row(p[3] + t), vc);
    s0 = vfma(u0, u0, s0);
    s1 = vfma(u1, u1, s1);
    s2 = vfma(u2, u2, s2);
    s3 = vfma(u3, u3, s3);
  }
  out[0] = vsum(s0);
  out[1] = vsum(s1);
  out[2] = vsum(s2);
  out[3] = vsum(s3);
  for (; t < d; ++t)
    for (int q = 0; q < 4; ++q) {
      const float u = row_value(p[q][t]) - c[t];
      out[q] += u * u;
    }
}

#if SP_CPU_ISA >= 1
// Half row of `src * scale`; returns ||src - half/scale|| rounded up (the
// exact-arithmetic error of the stored row, in the original units).
double to_half_row(const float* src, double scale, uint16_t* dst, index_t d) {
  double e2 = 0.;
  for (index_t t = 0; t < d; ++t) {
    const double v = double(src[t]) * scale;  // exact: scale is a power of two
    dst[t] = float_to_half(float(v));
    const double r = v - double(half_to_float(dst[t]));
    e2 += r * r;
  }
  return e2 > 0. ? std::sqrt(e2) / scale * (1. + 1e-6) : 0.;
}
#endif

// ------------------------------------------------------------------ pivot bounds
// The first kPivots centres are pivots: per centre g, lo/hi[g * kPivots + k]
// bound ||centre g - pivot k|| (rounded outwards).
constexpr index_t kPivots = 16;

// Per live group g: max over the pivots k of max(my_lo[k] - hi_g[k],
// lo_g[k] - my_hi[k]), a lower bound of ||new centre - centre g||. Computed in
// float32: a positive difference is rounded by at most 2^-24 relative, which
// the (1 - 1e-6) factor absorbs.
void pivot_lb(const float* my_lo, const float* my_hi, const float* lo, const float* hi,
              const index_t* live, index_t nl, double* out) {
  static_assert(kPivots % kW == 0, "pivot rows are whole vectors");
  for (index_t q = 0; q < nl; ++q) {
    const float* gl = lo + live[q] * kPivots;
    const float* gh = hi + live[q] * kPivots;
    vreg lb = vzero();
    for (index_t k = 0; k < kPivots; k += kW)
      lb = vmax(lb, vmax(vsub(vload(my_lo + k), vload(gh + k)), vsub(vload(gl + k), vload(my_hi + k))));
    out[q] = double(vhmax(lb)) * (1. - 1e-6);
  }
}

// ------------------------------------------------------------------ groups
// Per-point state, one record per member so a group scan reads one stream.
struct PointState {
  double u;        // exact distance to the owner centre
  double mind;     // current min-distance (<= u)
  double wt;       // sample weight (1 without weights)
  double err;      // ||point - row / scale|| (0 for float32 rows)
  index_t idx;     // original point index
};

// A group: the eligible points owned by one centre, stored contiguously (rows
// and per-point state) so that scanning a group streams memory.
struct Members {
  Vec<Row> rows;           // size() * d, scaled copies of the points
  Vec<PointState> st;

  size_t size() const { return st.size(); }
  void clear() { rows.clear(); st.clear(); }
  void push_from(const Members& o, size_t q, index_t d, double new_u) {
    rows.insert(rows.end(), o.rows.begin() + q * d, o.rows.begin() + (q + 1) * d);
    st.push_back(o.st[q]);
    st.back().u = new_u;
  }
  void append(const Members& o) {
    rows.insert(rows.end(), o.rows.begin(), o.rows.end());
    st.insert(st.end(), o.st.begin(), o.st.end());
  }
  // Keeps the members whose `gone` flag is 0, in order.
  void compact(const Vec<char>& gone, index_t d) {
    size_t k = 0;
    for (size_t q = 0; q < size(); ++q) {
      if (gone[q]) continue;
      if (k != q) {
        std::memmove(rows.data() + k * d, rows.data() + q * d, sizeof(Row) * d);
        st[k] = st[q];
      }
      ++k;
    }
    rows.resize(k * d);
    st.resize(k);
  }
};

struct Group {
  Members mem;
  double bound = -1.;         // max over members of u + mind
  double best_prio = -1.;     // max over members of wt * mind
  index_t best_idx = -1;      // its lowest point index
};

inline bool better(double p, index_t i, double bp, index_t bi) {
  return p > bp || (p == bp && i < bi);
}

void refresh_stats(Group& g) {
  double bound = -1., bp = -1.;
  index_t bi = -1;
  const Members& M = g.mem;
  for (size_t q = 0; q < M.size(); ++q) {
    const PointState& P = M.st[q];
    bound = dmax(bound, P.u + P.mind);
    const double pr = P.wt * P.mind;
    if (better(pr, P.idx, bp, bi)) {
      bp = pr;
      bi = P.idx;
    }
  }
  g.bound = bound;
  g.best_prio = bp;
  g.best_idx = bi;
}

// ------------------------------------------------------------------ bounds
// Safety factor on top of the float32 error bound: covers the float64
// rounding of the exact distances and of the bounds themselves.
constexpr double kMargin = 1e-9;

// Lower bound of a true distance from its float32 squared distance `f`.
inline double lower_dist(float f, double rel_err) {
  if (!(f <= std::numeric_limits<float>::max())) return 0.;  // overflowed: no information
  double lo = double(f) * (1. - rel_err) - 1e-36;            // 1e-36 covers subnormal rounding
  return lo > 0. ? std::sqrt(lo) * (1. - kMargin) : 0.;
}

// Upper bound of a true distance from its float32 squared distance `f`.
inline double upper_dist(float f, double rel_err) {
  if (!(f <= std::numeric_limits<float>::max())) return std::numeric_limits<double>::infinity();
  return std::sqrt(double(f) * (1. + rel_err) + 1e-36) * (1. + kMargin);
}

// float32 copies of bounds, rounded outwards.
inline float round_down(double v) {
  float f = float(v);
  return double(f) > v ? std::nextafter(f, -kInf) : f;
}
inline float round_up(double v) {
  float f = float(v);
  return double(f) < v ? std::nextafter(f, kInf) : f;
}

// True when the float32 squared distance `f` proves the true distance >= `t`.
inline bool proves_at_least(float f, double t, double rel_err) {
  if (!(f <= std::numeric_limits<float>::max())) return false;
  return double(f) * (1. - rel_err) - 1e-36 >= t * t * (1. + kMargin);
}

// ------------------------------------------------------------------ group scan
struct Scratch {
  Members moved;
  Vec<index_t> cand, need;
  Vec<char> gone;
};

struct Centre {
  const float* x;      // original float32 row
  const float* xs;     // row * scale, float32
  double err;          // ||x - xs / scale||
};

// Scans group `g` against the new centre, given a lower bound `dlo` of
// ||centre - owner(g)||. Members strictly closer to the new centre than to
// their owner move to `sc.moved`; min-distances drop where it is closer.
void scan_group(Group& g, const float* x, const Centre& c, index_t d, double dlo, double scale,
                double rel_err, Scratch& sc) {
  auto& M = g.mem;
  const size_t cnt = M.size();
  sc.cand.clear();
  for (size_t q = 0; q < cnt; ++q)
    if (dlo < M.st[q].u + M.st[q].mind) sc.cand.push_back(index_t(q));
  if (sc.cand.empty()) return;
  const index_t nc = index_t(sc.cand.size());
  const Row* rows[4];
  float f[4];
  size_t n_moved = 0;
  sc.need.clear();
  for (index_t b = 0; b < nc; b += 4) {
    // Short batches repeat the last candidate; the extra results are ignored.
    for (int q = 0; q < 4; ++q) rows[q] = M.rows.data() + sc.cand[imin(b + q, nc - 1)] * d;
    filter4(c.xs, rows, d, f);
    for (int q = 0; q < 4 && b + q < nc; ++q) {
      const index_t slot = sc.cand[b + q];
      // ||p - c|| >= ||row/scale - xs/scale|| - err_p - err_c.
      const PointState& P = M.st[slot];
      if (proves_at_least(f[q], (P.u + P.err + c.err) * scale, rel_err)) continue;
      sc.need.push_back(slot);
      // The exact pass reads the original (cold) rows: start fetching them now.
      const char* row = reinterpret_cast<const char*>(x + P.idx * d);
      for (index_t off = 0; off < index_t(sizeof(float)) * d; off += 64) __builtin_prefetch(row + off, 0, 3);
    }
  }
  if (sc.need.empty()) return;  // no member can change: the group's stats stand
  for (index_t slot : sc.need) {
    PointState& P = M.st[slot];
    const double up = P.u;
    const double e = std::sqrt(exact_sqdist(x + P.idx * d, c.x, d));
    if (e < P.mind) P.mind = e;
    if (e < up) {
      if (!n_moved) sc.gone.assign(cnt, 0);
      sc.moved.push_from(M, slot, d, e);
      sc.gone[slot] = 1;
      ++n_moved;
    }
  }
  if (n_moved) M.compact(sc.gone, d);
  refresh_stats(g);
}

// ------------------------------------------------------------------ threads
// A greedy step may split its work over threads, but every parallel region
// ends in a barrier, and on a machine with more runnable threads than cores
// that barrier waits for a helper with no core: a time slice (milliseconds)
// against steps of tens of microseconds -- many times slower than one thread.
// So the choice is measured rather than guessed: the latency of a trivial
// parallel region is probed at the first big step and again every
// kReprobeSeconds (load changes; probes take at most 5 % of the time), the
// serial cost per element is measured on the steps that run serially, and a
// step uses the threads only when it is big (kParallelWork elements, as
// before) and the time the threads would save exceeds twice the measured
// latency. Idle, that latency is microseconds and nothing changes;
// oversubscribed, big steps stay serial. (Load averages react in minutes;
// this reacts within kReprobeSeconds.)
constexpr index_t kParallelWork = index_t(1) << 22;
constexpr double kReprobeSeconds = 0.05;

class ThreadPolicy {
 public:
  ThreadPolicy() : threads_(max_threads()) {}
  // Threads for a step of `elems` elements (1: run it serially).
  int threads_for(index_t elems) {
    if (threads_ < 2 || elems < kParallelWork) return 1;
    if (wtime() >= next_probe_) probe();
    const double saved = double(elems) * sec_per_elem_ * (1. - 1. / threads_);
    return saved > 2. * join_ ? threads_ : 1;
  }
  // A serial step of `elems` elements took `secs` seconds.
  void serial_took(index_t elems, double secs) {
    if (threads_ > 1 && elems >= kParallelWork / 16)
      sec_per_elem_ = 0.75 * sec_per_elem_ + 0.25 * secs / double(elems);
  }

 private:
  void probe() {
    const double t0 = wtime();
    int arrived = 0;  // every thread must run the region (an empty one is elided)
#pragma omp parallel num_threads(threads_)
    {
#pragma omp atomic
      ++arrived;
    }
    const double t1 = wtime();
    join_ = t1 - t0;
    // A probe waits for the same descheduled helper: keep probes <= 5 % of the time.
    next_probe_ = t1 + dmax(kReprobeSeconds, 20. * join_);
  }
  int threads_;
  double join_ = 0., next_probe_ = 0.;  // probed at the first big step
  double sec_per_elem_ = 0.25e-9;  // until measured: a float32 filter element
};

// ------------------------------------------------------------------ greedy loop

// The greedy loop from `first`; init_mind: initial min-distances (+inf for
// the exact variant). Returns the number of indices written: m, or fewer when
// every eligible point coincides with a selected centre (kcenter.h).
index_t greedy(const float* x, index_t n, index_t d, index_t m, index_t first, const float* w,
               const Vec<double>& init_mind, index_t* out, ThreadPolicy& policy) {
  // float32 sum of d squared rounded differences, any order, with or without
  // FMA: relative error <= (d + 2) * 2^-24; doubled for margin.
  const double rel_err = double(d + 8) * std::ldexp(1.0, -23);

  Vec<index_t> elig;
  for (index_t p = 0; p < n; ++p)
    if (!w || w[p] > 0.f) elig.push_back(p);
  const index_t cnt = index_t(elig.size());
  // Once every priority is 0, the only eligible points that may coincide with
  // no centre are those of initial distance 0 (approximate variant): they
  // coincide with every anchor, hence with each other. The lowest-index one,
  // `zero_init`, is selected then, unless a centre already equals it.
  index_t zero_init = -1;
  for (index_t p : elig)
    if (init_mind[p] == 0.) {
      zero_init = p;
      break;
    }
  bool zero_init_covered = false;
  // Half rows hold x * scale, a power of two keeping |x * scale| <= 2^15.
  double scale = 1.;
  if constexpr (kHalfRows) {
    float amax = 0.f;
    for (index_t p : elig)
      for (index_t t = 0; t < d; ++t) {
        const float a = std::fabs(x[p * d + t]);
        amax = a > amax ? a : amax;
      }
    if (amax > 0.f) scale = std::ldexp(1.0, int(std::floor(std::log2(32768.0 / double(amax)))));
    while (double(amax) * scale > 32768.) scale *= 0.5;
  }

  Vec<float> centres(m * d);  // scaled float32 centre rows
  Vec<double> centre_err(m, 0.);
  Vec<Group> groups(m);
  Vec<index_t> live;  // steps whose group has members
  Vec<double> dlo;
  Vec<index_t> active;
  Vec<Scratch> scratch(max_threads());
  const index_t n_piv = imin(m, kPivots);
  Vec<float> piv_lo(m * kPivots, 0.f), piv_hi(m * kPivots, 0.f);
  Vec<double> pivot_lbs;

  index_t c = first;
  for (index_t s = 0; s < m; ++s) {
    out[s] = c;
    float* xs = centres.data() + s * d;
    double ce2 = 0.;
    for (index_t t = 0; t < d; ++t) {
      const double v = double(x[c * d + t]) * scale;
      xs[t] = float(v);  // inexact only below float32's normal range
      ce2 += (v - double(xs[t])) * (v - double(xs[t]));
    }
    centre_err[s] = ce2 > 0. ? std::sqrt(ce2) / scale * (1. + 1e-6) : 0.;
    const Centre cen{x + c * d, xs, centre_err[s]};
    if (zero_init >= 0 && !zero_init_covered)
      zero_init_covered = exact_sqdist(cen.x, x + zero_init * d, d) == 0.;
    Group& ng = groups[s];
    if (s == 0) {
      // Every eligible point is owned by the first centre.
      Members& M = ng.mem;
      M.rows.resize(cnt * d);
      M.st.resize(cnt);
      // Dynamic chunks: a helper that starts late takes less.
#pragma omp parallel for schedule(dynamic, 1024) num_threads(policy.threads_for(cnt * d))
      for (index_t q = 0; q < cnt; ++q) {
        const index_t p = elig[q];
        PointState& P = M.st[q];
        P.idx = p;
        P.err = 0.;
#if SP_CPU_ISA >= 1
        P.err = to_half_row(x + p * d, scale, M.rows.data() + q * d, d);
#else
        std::memcpy(M.rows.data() + q * d, x + p * d, sizeof(float) * d);
#endif
        const double e = std::sqrt(exact_sqdist(x + p * d, cen.x, d));
        P.u = e;
        P.mind = dmin(init_mind[p], e);
        P.wt = w ? double(w[p]) : 1.;
      }
      refresh_stats(ng);
      live.push_back(0);
    } else {
      // Bounds of the distances from the new centre to every pivot.
      const index_t have_piv = imin(s, n_piv);
      float* my_lo = piv_lo.data() + s * kPivots;
      float* my_hi = piv_hi.data() + s * kPivots;
      for (index_t k = 0; k < have_piv; k += 4) {
        const float* rows[4];
        float f[4];
        for (int q = 0; q < 4; ++q) rows[q] = centres.data() + imin(k + q, have_piv - 1) * d;
        filter4(xs, rows, d, f);
        for (int q = 0; q < 4 && k + q < have_piv; ++q) {
          const double errs = cen.err + centre_err[k + q];
          my_lo[k + q] = round_down(dmax(0., lower_dist(f[q], rel_err) / scale - errs));
          my_hi[k + q] = round_up(upper_dist(f[q], rel_err) / scale + errs);
        }
      }
      // Lower bounds of the distances from the new centre to every live centre:
      // first from the pivots, then, where that cannot skip the group, from the rows.
      const index_t nl = index_t(live.size());
      dlo.resize(nl);
      pivot_lbs.resize(nl);
      // Pivots not chosen yet hold 0 on both sides and contribute nothing.
      pivot_lb(my_lo, my_hi, piv_lo.data(), piv_hi.data(), live.data(), nl, pivot_lbs.data());
      const bool new_pivot = s < n_piv;
      active.clear();
      for (index_t q = 0; q < nl; ++q)
        if (new_pivot || pivot_lbs[q] < groups[live[q]].bound) active.push_back(q);
      const index_t nr = index_t(active.size());
#pragma omp parallel for schedule(dynamic, 256) num_threads(policy.threads_for(nr * d))
      for (index_t b = 0; b < nr; b += 4) {
        const float* rows[4];
        float f[4];
        for (int q = 0; q < 4; ++q) rows[q] = centres.data() + live[active[imin(b + q, nr - 1)]] * d;
        filter4(xs, rows, d, f);
        for (int q = 0; q < 4 && b + q < nr; ++q) {
          const index_t slot = active[b + q], g = live[slot];
          const double errs = cen.err + centre_err[g];
          dlo[slot] = dmax(pivot_lbs[slot], lower_dist(f[q], rel_err) / scale - errs);
          if (new_pivot) {  // centre s is pivot s: record every live centre's distance to it
            piv_lo[g * kPivots + s] = round_down(dmax(0., lower_dist(f[q], rel_err) / scale - errs));
            piv_hi[g * kPivots + s] = round_up(upper_dist(f[q], rel_err) / scale + errs);
          }
        }
      }
      if (new_pivot) my_lo[s] = my_hi[s] = 0.f;
      index_t work = 0;
      index_t kept_active = 0;
      for (index_t a = 0; a < nr; ++a) {
        const index_t q = active[a];
        const Group& g = groups[live[q]];
        if (dlo[q] < g.bound) {
          active[kept_active++] = q;
          work += index_t(g.mem.size());
        }
      }
      active.resize(kept_active);
      const index_t na = index_t(active.size());
      for (auto& sc : scratch) sc.moved.clear();
      const int scan_threads = na > 1 ? policy.threads_for(work * d) : 1;
      const double scan_start = wtime();
#pragma omp parallel num_threads(scan_threads)
      {
        Scratch& sc = scratch[thread_id()];
        // Chunks of several groups: per-group dispatch costs more than a small group.
#pragma omp for schedule(dynamic, 8)
        for (index_t a = 0; a < na; ++a) {
          const index_t q = active[a];
          scan_group(groups[live[q]], x, cen, d, dlo[q], scale, rel_err, sc);
        }
      }
      if (scan_threads == 1) policy.serial_took(work * d, wtime() - scan_start);
      for (auto& sc : scratch) ng.mem.append(sc.moved);
      refresh_stats(ng);
      // Drop groups that lost all their members (and free their storage).
      index_t kept = 0;
      for (index_t q = 0; q < nl; ++q) {
        Group& g = groups[live[q]];
        if (g.mem.size()) live[kept++] = live[q];
        else g.mem = Members();
      }
      live.resize(kept);
      if (ng.mem.size()) live.push_back(s);
    }
    if (s + 1 == m) break;
    // Next centre: the largest priority, lowest index among ties.
    double bp = -1.;
    index_t bi = -1;
    for (index_t q : live) {
      const Group& g = groups[q];
      if (better(g.best_prio, g.best_idx, bp, bi)) {
        bp = g.best_prio;
        bi = g.best_idx;
      }
    }
    if (bp > 0.) {
      c = bi;
    } else if (zero_init >= 0 && !zero_init_covered) {
      c = zero_init;
    } else {  // every eligible point coincides with a centre: selecting more would repeat one
      return s + 1;
    }
  }
  return m;
}

// numpy: sqrt(pairwise_sqdist(x, x[anchors])).mean(axis=1) -- a pairwise sum
// of the na distances, then one division.
void approx_init(const float* x, index_t n, index_t d, const index_t* anchors, index_t na,
                 Vec<double>& init, ThreadPolicy& policy) {
  const int threads = policy.threads_for(n * na * d);
  Vec<double> dist(na * threads);  // allocated outside the region
#pragma omp parallel num_threads(threads)
  {
    double* dp = dist.data() + thread_id() * na;
#pragma omp for schedule(dynamic, 1024)
    for (index_t p = 0; p < n; ++p) {
      for (index_t a = 0; a < na; ++a) dp[a] = std::sqrt(exact_sqdist(x + p * d, x + anchors[a] * d, d));
      init[p] = numpy_sum(dp, na) / double(na);
    }
  }
}

}  // namespace

index_t kcenter_greedy(const float* x, index_t n, index_t d, index_t m, index_t start,
                       const index_t* anchors, index_t n_anchors, const float* w, index_t* out) {
  ThreadPolicy policy;
  Vec<double> init(n, std::numeric_limits<double>::infinity());
  if (start < 0) {  // approximate variant: first centre = largest weighted initial distance
    approx_init(x, n, d, anchors, n_anchors, init, policy);
    double bp = -1.;
    for (index_t p = 0; p < n; ++p) {
      if (w && !(w[p] > 0.f)) continue;
      const double pr = (w ? double(w[p]) : 1.) * init[p];
      if (pr > bp) {
        bp = pr;
        start = p;
      }
    }
    if (start < 0) return 0;
  }
  return greedy(x, n, d, m, start, w, init, out, policy);
}

}  // namespace SP_ISA_NS
}  // namespace sp
