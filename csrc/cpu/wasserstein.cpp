// Projection onto a local Wasserstein ball (fastadv::wasserstein_project), CPU,
// optionally intersected with the box 0 <= z <= upper.
//
// Wong, Schmidt & Kolter 2019, "Wasserstein Adversarial Examples via Projected
// Sinkhorn Iterations". Math and notation: fastadv/reference/ot.py. One image
// per OpenMP task; the image and its potentials stay in L1/L2 across its
// iterations and each image stops on its own test (no batch-wide sync).
//
// Per iteration and pixel, two passes over the k x k window:
//   pass A: alpha_i = log x0_i - LSE_d(beta_{i+d} - psi C_d - 1), and the row
//           marginal of the previous plan from the same LSE (no extra exp);
//   pass B: s_j = LSE_d(alpha_{j+d} - psi C_d - 1), W = W(lam s_j e^{lam w_j})
//           in the log domain, beta_j = lam w_j - W, z_j = W / lam; with the
//           box, z_j > u (u = upper / mass) is replaced by z_j = u and
//           beta_j = log u - log s_j (the column then matches u exactly); the
//           plan's cost moments sum_d C_d Pi_dj = z_j * (sum_d C_d e_d) / (sum_d e_d)
//           come from the same exps, so the Newton step on psi costs nothing.
// The window is shifted loads over a halo-padded copy (halo = NEG, so border
// pixels need no branch); each window offset is one contiguous vectorized
// stream over the plane, with a polynomial exp and log (no libm call in the
// loop), cloned for AVX-512 / AVX2 / baseline.
//
// p = 2 (the paper's cost, the default): C_d = dy^2 + dx^2, so the window
// kernel exp(-psi C_d) = exp(-psi dy^2) exp(-psi dx^2) is separable and each
// window LSE is a row LSE over dx followed by a column LSE over dy (exact in
// the log domain: the column pass combines the row sums linearly, with the
// row maxima as shifts). 2k exps per pixel instead of k^2; the moments follow
// from the row sums weighted by dx^2 and dx^4. Other p: the k^2 form.
#include <torch/library.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The exp/log/select loops below vectorize only without trapping-math
// semantics (gcc 12: "control flow in loop" otherwise); they never rely on
// FP exceptions. Measured: the window LSE runs 4-8x faster vectorized.
// fp-contract=fast (this file only; setup.py passes -ffp-contract=off for the
// bit-exact Lp steps): the exp/log polynomials and the window sums are
// multiply-add chains, and with FMA the projection ran 120 -> 93 ms (min of 15,
// 64x1x28x28, k 5, lam 1000, 1 thread, this 2-core EPYC); z moved by 3.5e-7.
#pragma GCC optimize("no-trapping-math", "fp-contract=fast")
#include "vec_math.h"

namespace fastadv {
namespace {

constexpr float NEGF = -1e30f;  // finite log(0): NEG - NEG = 0, exp(NEG - finite) = 0


template <typename T>
static inline T tiny();
template <>
inline float tiny<float>() {
  return 1.17549435e-38f;
}
template <>
inline double tiny<double>() {
  return 2.2250738585072014e-308;
}

// W(exp(L)), principal branch (see reference.lambertw_exp): Fritsch's
// iteration on w + log w = L (third order); e^L itself (relative error e^L)
// below L = -20 in float, -40 in double. Steps: 4 in double (round-off, as the
// reference); 2 in float: from this start the relative error after 1, 2, 3, 4
// steps is at most 1.3e-4, 6.1e-7, 6.4e-7, 8.0e-7 over L in [-20, 1e5]
// (measured in float32 against scipy), so steps 3 and 4 only add rounding.
template <typename T>
static inline T lambertw_exp(T L) {
  constexpr int steps = sizeof(T) == 4 ? 2 : 4;
  const bool big = L > T(1);
  const T Lc = L < T(1) ? L : T(1);
  const T ex = fexp(Lc);
  T w = big ? L - flog(big ? L : T(1)) : ex / (T(1) + ex);
  w = w > tiny<T>() ? w : tiny<T>();
  for (int k = 0; k < steps; ++k) {
    // w <- w (1 + z / (1 + w) * (q - z) / (q - 2 z)), as one division (they dominated: 2 per step)
    const T z = L - flog(w) - w;
    const T w1 = T(1) + w;
    const T q = T(2) * w1 * (w1 + z * T(2.0 / 3.0));
    w = w + w * (z * (q - z)) / (w1 * (q - T(2) * z));
    w = w > tiny<T>() ? w : tiny<T>();
  }
  return L < (sizeof(T) == 4 ? T(-20) : T(-40)) ? fexp(L) : w;
}

struct Params {
  int C, H, W, k;
  bool sep;  // p == 2: separable window sums
  double lam, eps, tol, upper;  // upper: +inf for no box
  int64_t max_iter;
  const double* cost;  // (k*k)
};

template <typename T>
struct Work {
  std::vector<T> AP, BP;  // halo-padded alpha, beta: C x (H + 2r) x (W + 2r)
  std::vector<T> la, a, wl, z;  // log x0n, x0n, lam * w, z (normalized): C x H x Wp, the window outputs' layout
  std::vector<T> mx, s, s1, s2, pc, c, c2;  // window LSE outputs (H x Wp), per-offset constants (k*k)
  std::vector<T> rm, r0, r2, r4, qx, qy, dx2, dx4;  // separable row pass (Hp x Wp), per-offset constants (k)
};

// LSE over the k x k window of the padded plane P, for every output pixel at
// once: out index i = y * Wp + x (x < W are the pixels; x in [W, Wp) is
// finite garbage, never read), so each window offset d is one contiguous
// stream P[i + dy * Wp + dx] over i < H * Wp. always_inline puts it inside
// project_one's AVX-512/AVX2 clones: as a separate function it was compiled
// for the baseline ISA only (perf: 44% of the time in it). Measured at
// 64x1x28x28, k 5, lam 1000 on this 2-core Xeon (load ~1.2): 0.33 s per
// projection with per-row loops -> 0.18 s with this form inlined (inlining
// alone: 0.30 s; the plane form alone: 0.32 s), bit-identical results (same
// summation order). lse[i] = mx[i] + log s[i]; with MOMENTS also
// s1 = sum_d c_d e_d and s2 = sum_d c2_d e_d (the plan's cost moments, as
// ratios to s). P must have k elements of slack after its last plane.
template <bool MOMENTS, typename T>
__attribute__((always_inline)) static inline void plane_lse(const T* P, int Wp, int H, int k, const T* pc, const T* c, const T* c2, T* mx, T* s,
                             T* s1, T* s2) {
  const int n = H * Wp;
  for (int i = 0; i < n; ++i) mx[i] = T(-3e38), s[i] = 0;
  if constexpr (MOMENTS)
    for (int i = 0; i < n; ++i) s1[i] = 0, s2[i] = 0;
  for (int dy = 0; dy < k; ++dy)
    for (int dx = 0; dx < k; ++dx) {
      const T* src = P + (int64_t)dy * Wp + dx;
      const T pcd = pc[dy * k + dx];
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        const T t = src[i] - pcd;
        mx[i] = mx[i] > t ? mx[i] : t;
      }
    }
  for (int dy = 0; dy < k; ++dy)
    for (int dx = 0; dx < k; ++dx) {
      const T* src = P + (int64_t)dy * Wp + dx;
      const int d = dy * k + dx;
      const T pcd = pc[d], cd = c[d], c2d = c2[d];
      if constexpr (MOMENTS) {
#pragma omp simd
        for (int i = 0; i < n; ++i) {
          const T e = fexp(src[i] - pcd - mx[i]);
          s[i] += e;
          s1[i] += cd * e;
          s2[i] += c2d * e;
        }
      } else {  // pass A needs only the LSE
#pragma omp simd
        for (int i = 0; i < n; ++i) s[i] += fexp(src[i] - pcd - mx[i]);
      }
    }
}

// The same outputs for p = 2, in two separable passes (see the file comment).
// Row pass over every padded row (i < Hp * Wp, reading P[i + dx]):
//   rm_i = max_dx (P[i + dx] - qx_dx), r0_i = sum_dx e, r2_i = sum_dx dx^2 e,
//   r4_i = sum_dx dx^4 e, with e = exp(P[i + dx] - qx_dx - rm_i), qx_dx = psi dx^2;
// column pass over the outputs (i < H * Wp, reading the row pass at i + dy Wp):
//   mx_i = max_dy (rm - qy_dy), E = exp(rm - qy_dy - mx_i), qy_dy = psi dy^2 + 1,
//   s = sum_dy E r0, s1 = sum_dy E (dy^2 r0 + r2), s2 = sum_dy E (dy^4 r0 + 2 dy^2 r2 + r4),
// since C_d = dy^2 + dx^2 and C_d^2 = dy^4 + 2 dy^2 dx^2 + dx^4. Rows that are all
// NEG give rm = NEG and drop out of the column sums exactly as in plane_lse.
// Measured (64x1x28x28, k 5, lam 1000, tol 1e-4, 1 thread, this 2-core EPYC, min of 7): 258 ms with
// plane_lse -> 133 ms with this and the 2-step float Lambert W; the per-pixel streams below
// (no scalar remainders) -> 120 ms; FMA -> 93 ms. z within 6e-6 of the k^2 form (max rel).
template <bool MOMENTS, typename T>
__attribute__((always_inline)) static inline void plane_lse_sep(const T* P, int Wp, int H, int k, const T* qx, const T* qy,
                                                              const T* d2, const T* d4, T* rm, T* r0, T* r2, T* r4,
                                                              T* mx, T* s, T* s1, T* s2) {
  const int nr = (H + k - 1) * Wp;
  for (int i = 0; i < nr; ++i) rm[i] = T(-3e38), r0[i] = 0;
  if constexpr (MOMENTS)
    for (int i = 0; i < nr; ++i) r2[i] = 0, r4[i] = 0;
  for (int dx = 0; dx < k; ++dx) {
    const T* src = P + dx;
    const T q = qx[dx];
#pragma omp simd
    for (int i = 0; i < nr; ++i) {
      const T t = src[i] - q;
      rm[i] = rm[i] > t ? rm[i] : t;
    }
  }
  for (int dx = 0; dx < k; ++dx) {
    const T* src = P + dx;
    const T q = qx[dx];
    if constexpr (MOMENTS) {
      const T w2 = d2[dx], w4 = d4[dx];
#pragma omp simd
      for (int i = 0; i < nr; ++i) {
        const T e = fexp(src[i] - q - rm[i]);
        r0[i] += e;
        r2[i] += w2 * e;
        r4[i] += w4 * e;
      }
    } else {
#pragma omp simd
      for (int i = 0; i < nr; ++i) r0[i] += fexp(src[i] - q - rm[i]);
    }
  }
  const int n = H * Wp;
  for (int i = 0; i < n; ++i) mx[i] = T(-3e38), s[i] = 0;
  if constexpr (MOMENTS)
    for (int i = 0; i < n; ++i) s1[i] = 0, s2[i] = 0;
  for (int dy = 0; dy < k; ++dy) {
    const T* m = rm + (int64_t)dy * Wp;
    const T q = qy[dy];
#pragma omp simd
    for (int i = 0; i < n; ++i) {
      const T t = m[i] - q;
      mx[i] = mx[i] > t ? mx[i] : t;
    }
  }
  for (int dy = 0; dy < k; ++dy) {
    const int64_t o = (int64_t)dy * Wp;
    const T* m = rm + o;
    const T* v0 = r0 + o;
    const T q = qy[dy];
    if constexpr (MOMENTS) {
      const T* v2 = r2 + o;
      const T* v4 = r4 + o;
      const T w2 = d2[dy], w4 = d4[dy], w22 = T(2) * d2[dy];
#pragma omp simd
      for (int i = 0; i < n; ++i) {
        const T e = fexp(m[i] - q - mx[i]);
        s[i] += e * v0[i];
        s1[i] += e * (w2 * v0[i] + v2[i]);
        s2[i] += e * (w4 * v0[i] + w22 * v2[i] + v4[i]);
      }
    } else {
#pragma omp simd
      for (int i = 0; i < n; ++i) s[i] += fexp(m[i] - q - mx[i]) * v0[i];
    }
  }
}

template <typename T>
__attribute__((always_inline)) static inline void project_body(const T* x, const T* x0, const Params& prm, T* zout,
                                                               int32_t* it_out, T* res_out, T* psi_out) {
  const int C = prm.C, H = prm.H, W = prm.W, k = prm.k, r = k / 2;
  const int Hp = H + 2 * r, Wp = W + 2 * r, kk = k * k;
  const int64_t N = (int64_t)C * H * W, plane = (int64_t)Hp * Wp;
  // Per-pixel arrays use the window passes' output layout, i = y * Wp + x per
  // channel (n = H * Wp values, x >= W padding), so every per-pixel loop is one
  // contiguous stream and its vectors are full: with one loop per image row (W = 28
  // on AVX2: 3 vectors + 4 scalar Lambert W's) the scalar remainders were hot in perf.
  // The padding columns hold log x0 = NEG, x0 = 0, lam w = NEG: their alpha, beta and
  // z come out NEG, NEG and 0 by the ordinary updates, so the halo stays NEG and they
  // add exactly 0 to the row marginal and to the cost moments.
  const int n = H * Wp;
  double mass = 0;
  for (int64_t i = 0; i < N; ++i) mass += (double)x0[i];
  const double inv_mass = 1.0 / mass;
  if (!(prm.eps > 0)) {  // eps = 0: the ball is {x0}
    for (int64_t i = 0; i < N; ++i) zout[i] = x0[i];
    *it_out = 0;
    *res_out = 0;
    *psi_out = 1;
    return;
  }
  Work<T> wk;
  wk.AP.assign((size_t)C * plane + k, (T)NEGF);  // + k: the window passes read past the last plane
  wk.BP.assign((size_t)C * plane + k, (T)NEGF);
  wk.la.assign((size_t)C * n, (T)NEGF);
  wk.a.assign((size_t)C * n, T(0));
  wk.wl.assign((size_t)C * n, (T)NEGF);
  wk.z.assign((size_t)C * n, T(0));
  wk.mx.resize((size_t)n);
  wk.s.resize((size_t)n);
  wk.s1.resize((size_t)n);
  wk.s2.resize((size_t)n);
  wk.pc.resize(kk);
  wk.c.resize(kk);
  wk.c2.resize(kk);
  if (prm.sep) {
    wk.rm.resize((size_t)plane);
    wk.r0.resize((size_t)plane);
    wk.r2.resize((size_t)plane);
    wk.r4.resize((size_t)plane);
    wk.qx.resize(k);
    wk.qy.resize(k);
    wk.dx2.resize(k);
    wk.dx4.resize(k);
    for (int d = 0; d < k; ++d) {
      const double d2 = (double)(d - r) * (d - r);
      wk.dx2[d] = (T)d2;
      wk.dx4[d] = (T)(d2 * d2);
    }
  }
  const T inv_lam = (T)(1.0 / prm.lam);
  for (int ch = 0; ch < C; ++ch)
    for (int y = 0; y < H; ++y)
      for (int xx = 0; xx < W; ++xx) {
        const int64_t src = ((int64_t)ch * H + y) * W + xx, dst = (int64_t)ch * n + (int64_t)y * Wp + xx;
        const double a = (double)x0[src] * inv_mass;
        wk.la[dst] = a > 0 ? (T)std::log(a) : (T)NEGF;
        wk.a[dst] = wk.la[dst] > T(-1e29) ? fexp(wk.la[dst]) : T(0);  // the row marginal's target, as exp(log a)
        wk.wl[dst] = (T)(prm.lam * (double)x[src] * inv_mass);
        wk.z[dst] = (T)a;
        // alpha = beta = 0 to start (as the reference), halo stays NEG
        const int64_t pi = ch * plane + (int64_t)(y + r) * Wp + xx + r;
        wk.AP[pi] = 0;
        wk.BP[pi] = 0;
      }
  for (int d = 0; d < kk; ++d) {
    wk.c[d] = (T)prm.cost[d];
    wk.c2[d] = (T)(prm.cost[d] * prm.cost[d]);
  }
  // the box in normalized units (+inf: no box, and then the selects below never fire)
  const T u = (T)(prm.upper * inv_mass);
  const T log_u = (T)std::log(prm.upper * inv_mass);
  const T log_lam = (T)std::log(prm.lam);
  // reductions: float partial sums over chunks of CH values, added in double
  constexpr int CH = 64;
  double psi = 1.0, res = INFINITY;
  int64_t it = 0;
  while (it < prm.max_iter) {
    if (prm.sep) {
      for (int d = 0; d < k; ++d) {
        const double d2 = (double)(d - r) * (d - r);
        wk.qx[d] = (T)(psi * d2);
        wk.qy[d] = (T)(psi * d2 + 1.0);
      }
    } else {
      for (int d = 0; d < kk; ++d) wk.pc[d] = (T)(psi * prm.cost[d] + 1.0);
    }
    // pass A: alpha update + row marginal of the plan at the start of this iteration
    double marg = 0;
    for (int ch = 0; ch < C; ++ch) {
      const T* Bp = wk.BP.data() + ch * plane;
      T* ap = wk.AP.data() + ch * plane + (int64_t)r * Wp + r;  // pixel i of the stream in the padded plane
      if (prm.sep)
        plane_lse_sep<false>(Bp, Wp, H, k, wk.qx.data(), wk.qy.data(), wk.dx2.data(), wk.dx4.data(), wk.rm.data(),
                             wk.r0.data(), wk.r2.data(), wk.r4.data(), wk.mx.data(), wk.s.data(), wk.s1.data(), wk.s2.data());
      else
        plane_lse<false>(Bp, Wp, H, k, wk.pc.data(), wk.c.data(), wk.c2.data(), wk.mx.data(), wk.s.data(), wk.s1.data(),
                         wk.s2.data());
      const T* mx = wk.mx.data();
      const T* s = wk.s.data();
      const T* la = wk.la.data() + (int64_t)ch * n;
      const T* av = wk.a.data() + (int64_t)ch * n;
      for (int i0 = 0; i0 < n; i0 += CH) {
        const int i1 = std::min(n, i0 + CH);
        T m = 0;
#pragma omp simd reduction(+ : m)
        for (int i = i0; i < i1; ++i) {
          const T lse = mx[i] + flog(s[i]);
          const T row = fexp(ap[i] + lse);
          const T dlt = row - av[i];
          m += dlt < 0 ? -dlt : dlt;
          ap[i] = la[i] > T(-1e29) ? la[i] - lse : (T)NEGF;
        }
        marg += (double)m;
      }
    }
    // pass B: beta update by Lambert W (or the box), z, and the plan's cost moments
    double c1 = 0, c2 = 0;
    for (int ch = 0; ch < C; ++ch) {
      const T* Ap = wk.AP.data() + ch * plane;
      T* bp = wk.BP.data() + ch * plane + (int64_t)r * Wp + r;
      if (prm.sep)
        plane_lse_sep<true>(Ap, Wp, H, k, wk.qx.data(), wk.qy.data(), wk.dx2.data(), wk.dx4.data(), wk.rm.data(),
                            wk.r0.data(), wk.r2.data(), wk.r4.data(), wk.mx.data(), wk.s.data(), wk.s1.data(), wk.s2.data());
      else
        plane_lse<true>(Ap, Wp, H, k, wk.pc.data(), wk.c.data(), wk.c2.data(), wk.mx.data(), wk.s.data(), wk.s1.data(),
                        wk.s2.data());
      const T* mx = wk.mx.data();
      const T* s = wk.s.data();
      const T* s1 = wk.s1.data();
      const T* s2 = wk.s2.data();
      const T* wl = wk.wl.data() + (int64_t)ch * n;
      T* z = wk.z.data() + (int64_t)ch * n;
      for (int i0 = 0; i0 < n; i0 += CH) {
        const int i1 = std::min(n, i0 + CH);
        T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
        for (int i = i0; i < i1; ++i) {
          const T lse = mx[i] + flog(s[i]);
          const T L = log_lam + lse + wl[i];
          const T wz = lambertw_exp(L);
          const T zfree = wz * inv_lam;
          // column j's root of z = s e^beta = clip(w - beta / lam, 0, u): the free root
          // if it is <= u, else z = u with beta = log u - log s (docs/sinkhorn.md)
          const bool cap = zfree > u;
          const T zz = cap ? u : zfree;
          bp[i] = cap ? log_u - lse : wl[i] - wz;
          z[i] = zz;
          const T zs = zz / s[i];
          m1 += zs * s1[i];
          m2 += zs * s2[i];
        }
        c1 += (double)m1;
        c2 += (double)m2;
      }
    }
    // safeguarded Newton step on psi (maximizing the concave dual in psi)
    const double g1 = c1 - prm.eps;
    double step = c2 > 0 ? g1 / c2 : (g1 < 0 ? -psi / 2 : 0.0);
    for (int h = 0; h < 7; ++h)
      if (psi + step < 0) step /= 2;
    const double cres = (psi > 0 ? std::abs(g1) : std::max(g1, 0.0)) / prm.eps;
    psi = std::max(psi + step, 0.0);
    res = std::max(marg, cres);
    ++it;
    if (!(res > prm.tol)) break;
  }
  // z <= u in normalized units; the min puts the rounding of u * mass back inside the box
  for (int ch = 0; ch < C; ++ch)
    for (int y = 0; y < H; ++y)
      for (int xx = 0; xx < W; ++xx)
        zout[((int64_t)ch * H + y) * W + xx] =
            (T)std::min((double)wk.z[(int64_t)ch * n + (int64_t)y * Wp + xx] * mass, prm.upper);
  *it_out = (int32_t)it;
  *res_out = (T)res;
  *psi_out = (T)psi;
}

// One copy of the body per ISA, chosen at run time. Not target_clones: its
// "avx2" clone has no FMA (a separate ISA flag), and the exp/log polynomials
// and the window sums are chains of multiply-adds (see fp-contract above).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <typename T>
__attribute__((target("avx512f,avx512dq,avx512vl,fma"))) void project_avx512(const T* x, const T* x0, const Params& prm,
                                                                            T* zout, int32_t* it, T* res, T* psi) {
  project_body<T>(x, x0, prm, zout, it, res, psi);
}
template <typename T>
__attribute__((target("avx2,fma"))) void project_avx2(const T* x, const T* x0, const Params& prm, T* zout, int32_t* it,
                                                     T* res, T* psi) {
  project_body<T>(x, x0, prm, zout, it, res, psi);
}
#endif
template <typename T>
void project_base(const T* x, const T* x0, const Params& prm, T* zout, int32_t* it, T* res, T* psi) {
  project_body<T>(x, x0, prm, zout, it, res, psi);
}

static int isa_level() {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const int level = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")
                               ? 2
                               : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0);
  return level;
#else
  return 0;
#endif
}

template <typename T>
void project_one(const T* x, const T* x0, const Params& prm, T* zout, int32_t* it, T* res, T* psi) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const int level = isa_level();
  if (level == 2) return project_avx512<T>(x, x0, prm, zout, it, res, psi);
  if (level == 1) return project_avx2<T>(x, x0, prm, zout, it, res, psi);
#endif
  project_base<T>(x, x0, prm, zout, it, res, psi);
}

template <typename T>
void run_batch(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& eps, int64_t k, double p, double reg,
               int64_t max_iter, double tol, double upper, at::Tensor& z, at::Tensor& it, at::Tensor& res,
               at::Tensor& psi) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), N = C * H * W;
  std::vector<double> cost(k * k);
  const int r = (int)k / 2;
  for (int dy = 0; dy < k; ++dy)
    for (int dx = 0; dx < k; ++dx) {
      const double dist = std::sqrt((double)((dy - r) * (dy - r) + (dx - r) * (dx - r)));
      cost[dy * k + dx] = std::pow(dist, p);
    }
  const T* X = x.data_ptr<T>();
  const T* X0 = x0.data_ptr<T>();
  const T* E = eps.data_ptr<T>();
  T* Z = z.data_ptr<T>();
  int32_t* I = it.data_ptr<int32_t>();
  T* R = res.data_ptr<T>();
  T* S = psi.data_ptr<T>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t b = 0; b < B; ++b) {
    Params prm{(int)C, (int)H, (int)W, (int)k, p == 2.0, reg, (double)E[b], tol, upper, max_iter, cost.data()};
    project_one<T>(X + b * N, X0 + b * N, prm, Z + b * N, I + b, R + b, S + b);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wasserstein_project_cpu(const at::Tensor& x, const at::Tensor& x0,
                                                                                   const at::Tensor& eps, int64_t kernel_size,
                                                                                   double p, double reg, int64_t max_iter,
                                                                                   double tol, double upper) {
  TORCH_CHECK(x.dim() == 4 && x0.sizes() == x.sizes(), "wasserstein_project: x and x0 must be (B, C, H, W) of one shape");
  TORCH_CHECK(x.is_contiguous() && x0.is_contiguous() && eps.is_contiguous(), "wasserstein_project: inputs must be contiguous");
  TORCH_CHECK(x.scalar_type() == x0.scalar_type() && x.scalar_type() == eps.scalar_type(),
              "wasserstein_project: x, x0 and eps must share a dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "wasserstein_project: float32 or float64 only");
  TORCH_CHECK(eps.dim() == 1 && eps.size(0) == x.size(0), "wasserstein_project: eps must be (B,)");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "wasserstein_project: kernel_size must be odd");
  TORCH_CHECK(reg > 0 && p > 0 && max_iter >= 1, "wasserstein_project: reg, p > 0 and max_iter >= 1");
  TORCH_CHECK(upper > 0, "wasserstein_project: upper must be > 0 (+inf for no box)");
  const int64_t B = x.size(0);
  auto z = at::empty(x.sizes(), x.options());
  auto it = at::zeros({B}, x.options().dtype(at::kInt));
  auto res = at::empty({B}, x.options());
  auto psi = at::empty({B}, x.options());
  if (x.scalar_type() == at::kFloat)
    run_batch<float>(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper, z, it, res, psi);
  else
    run_batch<double>(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper, z, it, res, psi);
  return {z, it, res, psi};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadv, CPU, m) { m.impl("wasserstein_project", &wasserstein_project_cpu); }

}  // namespace fastadv
