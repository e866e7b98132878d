// CPU kernels for the fused PGD steps: fastadv::linf_step, l2_step, l1_step.
// Semantics: fastadv/reference/lp.py (linf_step, l2_step, l1_step); the
// contract (2-D contiguous rows, float32 (B,) alpha/eps, `out` may alias x)
// is in csrc/fastadv.cpp. Every kernel reads element i of its inputs before
// it writes element i of out, and writes out only in its last pass.
//
// Measured on the 2-core Xeon dev machine (AVX-512 capable, built for
// baseline x86-64 plus target_clones), float32, one thread, round-robin
// medians on a loaded shared machine (docs/backends-cpp-cuda.md has the
// tables, the method and the caveats):
//   256x3x32x32:  linf_step 0.73 ms (117% of copy bandwidth, 33x eager,
//                 8.7x torch.compile), l2_step 0.97 ms (88%, 23x, 7.3x)
//   32x3x224x224: linf_step 14.4 ms (100%, 6.3x, 1.75x),
//                 l2_step 18.8 ms (77%, 7.3x, 2.95x)
#include "lp_common.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <atomic>

namespace fastadv {
namespace cpu {
namespace {

void check_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  check_first(x, "x");
  check_rows(x0, "x0", x);
  check_rows(grad, "grad", x);
  check_rows(out, "out", x);
  check_per_sample(alpha, "alpha", x.size(0));
  check_per_sample(eps, "eps", x.size(0));
  check_box(lo, hi);
}

// The body of the linf / l2 step ops: the argument checks, then impl(dtype tag) under the dtype
// dispatch (nothing for an empty batch). impl returns the `_checked` ops' count of x0 entries outside
// the box; the plain ops ignore it.
template <class Impl>
int64_t run_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                 const at::Tensor& eps, double lo, double hi, const at::Tensor& out, const Impl& impl) {
  check_step(x, x0, grad, alpha, eps, lo, hi, out);
  int64_t outside = 0;
  if (x.numel() == 0) return outside;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastadv_step_cpu",
                                  [&] { outside = impl(scalar_t{}); });
  return outside;
}

inline at::Tensor count_tensor(int64_t n) { return at::scalar_tensor(n, at::TensorOptions().dtype(at::kLong)); }

// ------------------------------------------------------------ linf_step
// y = clamp(x0 + clamp((x + alpha * sign(g)) - x0, -eps, eps), lo, hi), in
// exactly the reference's order of float operations (the build uses
// -ffp-contract=off), so float32 results equal the eager reference bit for
// bit. One pass, 3 reads + 1 write per element.
//
// kCheck (the `_checked` ops): the same pass also counts the entries of x0
// outside [lo, hi] (NaN fails both compares, so it counts too), which is the
// public op's value check folded into the pass that reads x0 anyway. The
// count is a float sum per row chunk (at most kChunk = 16384 ones: exact in
// float32), so it vectorizes beside the arithmetic. Measured at 256x3x32x32
// float32 on the 2-core EPYC (public op, checks on, medians): 0.226 ms with a
// separate aminmax pass over x0 (0.065 ms of it), 0.107 ms folded, against
// 0.130 ms for torch.compile of the plain formula (docs/benchmarks.md).
template <class T, bool kCheck>
FASTADV_CLONES int64_t linf_row(const T* x, const T* x0, const T* g, T* out, int64_t n, acc_type<T> a,
                                acc_type<T> ep, acc_type<T> lo, acc_type<T> hi) {
  using A = acc_type<T>;
  const A nep = -ep;
  A outside = A(0);
#pragma omp simd reduction(+ : outside)
  for (int64_t i = 0; i < n; ++i) {
    const A xi = static_cast<A>(x[i]), x0i = static_cast<A>(x0[i]);
    if (kCheck) outside += (x0i >= lo) & (x0i <= hi) ? A(0) : A(1);
    const A adv = xi + a * sign_of(nan0(static_cast<A>(g[i])));
    const A d = clamp_to(adv - x0i, nep, ep);
    out[i] = static_cast<T>(clamp_to(x0i + d, lo, hi));
  }
  return static_cast<int64_t>(outside);
}

template <class T, bool kCheck>
int64_t linf_step_impl(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                       const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  using A = acc_type<T>;
  const int64_t B = x.size(0), N = x.size(1);
  const T* px = x.const_data_ptr<T>();
  const T* px0 = x0.const_data_ptr<T>();
  const T* pg = grad.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  const float* pa = alpha.const_data_ptr<float>();
  const float* pe = eps.const_data_ptr<float>();
  const A loA = static_cast<A>(lo), hiA = static_cast<A>(hi);
  std::atomic<int64_t> outside{0};
  for_each_chunk(B, N, [&](int64_t b, int64_t s, int64_t e) {
    const int64_t off = b * N + s;
    const int64_t k = linf_row<T, kCheck>(px + off, px0 + off, pg + off, po + off, e - s, static_cast<A>(pa[b]),
                                          static_cast<A>(pe[b]), loA, hiA);
    if (kCheck && k) outside.fetch_add(k, std::memory_order_relaxed);
  });
  return outside.load();
}

void linf_step_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                   const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  run_step(x, x0, grad, alpha, eps, lo, hi, out,
           [&](auto t) { return linf_step_impl<decltype(t), false>(x, x0, grad, alpha, eps, lo, hi, out); });
}

// linf_step, and the number of x0 entries outside [lo, hi] or NaN (0-d int64).
at::Tensor linf_step_checked_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                                 const at::Tensor& alpha, const at::Tensor& eps, double lo, double hi,
                                 const at::Tensor& out) {
  return count_tensor(run_step(x, x0, grad, alpha, eps, lo, hi, out, [&](auto t) {
    return linf_step_impl<decltype(t), true>(x, x0, grad, alpha, eps, lo, hi, out);
  }));
}

// -------------------------------------------------------------- l2_step
// Two passes instead of the reference's four. Pass 1 accumulates (float
// sums per 128-element block, blocks in double, see kSumBlock)
//   sgg = ||g||^2, sdd = ||d0||^2, sdg = <d0, g>   with d0 = x - x0;
// then with s = alpha / (||g|| + 1e-10) (gn rounded to the compute type, as
// the reference does) the step's delta = d0 + s g has
//   ||delta||^2 = sdd + 2 s sdg + s^2 sgg,
// so the radial factor where(||delta|| > eps, eps / ||delta||, 1) is known
// before the write pass. Pass 2 recomputes delta per element in the
// reference's order (x + alpha * (g / gn) - x0) and writes
// clamp(x0 + delta * factor, lo, hi).
//
// Tolerance vs the reference: the two differ only in how ||g|| and ||delta||
// are rounded (both sum float32 products in float32 blocks, in a
// different order, and our ||delta|| comes from the identity above rather
// than from the rounded delta). Both norms agree to a relative ~1e-7 (a few
// float32 ulps), which moves y by at most ~|delta_i| * 1e-7: about one ulp
// of x for images in [0, 1] (measured max |diff| vs a float64 reference:
// 5.8e-8 on random inputs). The identity can cancel (delta much shorter
// than d0 and s g), but the factor only differs from 1 when
// ||delta|| > eps, where the relative error is at most
// ~1e-7 (sdd + s^2 sgg) / eps^2: small unless alpha >> eps.
struct L2Acc {
  double gg = 0.0, dd = 0.0, dg = 0.0;
  int64_t outside = 0;  // x0 entries outside [lo, hi] or NaN (counted only with kCheck)
  L2Acc& operator+=(const L2Acc& o) {
    gg += o.gg;
    dd += o.dd;
    dg += o.dg;
    outside += o.outside;
    return *this;
  }
};
template <class A>
struct L2Param {
  A gn = A(1), factor = A(1);
};

// Pass 1 over a chunk: (||g||^2, ||d0||^2, <d0, g>), float sums per
// kSumBlock block, blocks summed in double. kCheck: also count the x0 entries
// outside [lo, hi] (as in linf_row; a float count per block is exact).
template <class T, bool kCheck>
FASTADV_CLONES void l2_reduce_row(const T* x, const T* x0, const T* g, int64_t n, acc_type<T> lo, acc_type<T> hi,
                                  L2Acc* out) {
  using A = acc_type<T>;
  double gg = 0.0, dd = 0.0, dg = 0.0;
  int64_t outside = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    A bgg = A(0), bdd = A(0), bdg = A(0), bout = A(0);
#pragma omp simd reduction(+ : bgg, bdd, bdg, bout)
    for (int64_t i = b0; i < b1; ++i) {
      const A gi = nan0(static_cast<A>(g[i]));
      const A x0i = static_cast<A>(x0[i]);
      const A d0 = static_cast<A>(x[i]) - x0i;
      bgg += gi * gi;
      bdd += d0 * d0;
      bdg += d0 * gi;
      if (kCheck) bout += (x0i >= lo) & (x0i <= hi) ? A(0) : A(1);
    }
    gg += bgg;
    dd += bdd;
    dg += bdg;
    if (kCheck) outside += static_cast<int64_t>(bout);
  }
  out->gg = gg;
  out->dd = dd;
  out->dg = dg;
  out->outside = outside;
}

// Pass 2: delta in the reference's order, then the radial factor and the box.
template <class T>
FASTADV_CLONES void l2_write_row(const T* x, const T* x0, const T* g, T* out, int64_t n, acc_type<T> a,
                                 acc_type<T> gn, acc_type<T> f, acc_type<T> lo, acc_type<T> hi) {
  using A = acc_type<T>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A xi = static_cast<A>(x[i]), x0i = static_cast<A>(x0[i]);
    const A delta = (xi + a * (nan0(static_cast<A>(g[i])) / gn)) - x0i;
    out[i] = static_cast<T>(clamp_to(x0i + delta * f, lo, hi));
  }
}

template <class T, bool kCheck>
int64_t l2_step_impl(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                  const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  using A = acc_type<T>;
  const int64_t B = x.size(0), N = x.size(1);
  const T* px = x.const_data_ptr<T>();
  const T* px0 = x0.const_data_ptr<T>();
  const T* pg = grad.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  const float* pa = alpha.const_data_ptr<float>();
  const float* pe = eps.const_data_ptr<float>();
  const A loA = static_cast<A>(lo), hiA = static_cast<A>(hi);

  auto reduce = [&](int64_t b, int64_t s, int64_t e) {
    const int64_t off = b * N + s;
    L2Acc r;
    l2_reduce_row<T, kCheck>(px + off, px0 + off, pg + off, e - s, loA, hiA, &r);
    return r;
  };
  std::atomic<int64_t> outside{0};
  auto finalize = [&](int64_t b, const L2Acc& acc) {
    if (kCheck && acc.outside) outside.fetch_add(acc.outside, std::memory_order_relaxed);
    L2Param<A> p;
    const A a = static_cast<A>(pa[b]), ep = static_cast<A>(pe[b]);
    p.gn = static_cast<A>(std::sqrt(acc.gg)) + static_cast<A>(1e-10);
    const double s = static_cast<double>(a) / static_cast<double>(p.gn);
    const double dn2 = std::max(0.0, acc.dd + 2.0 * s * acc.dg + s * s * acc.gg);
    const A dn = static_cast<A>(std::sqrt(dn2));
    p.factor = dn > ep ? (A(1) / dn) * ep : A(1);  // reciprocal * eps, as eager PyTorch evaluates eps / t
    return p;
  };
  auto write = [&](int64_t b, const L2Param<A>& p, int64_t s, int64_t e) {
    const int64_t off = b * N + s;
    l2_write_row<T>(px + off, px0 + off, pg + off, po + off, e - s, static_cast<A>(pa[b]), p.gn, p.factor, loA, hiA);
  };
  two_pass_rows<L2Acc, L2Param<A>>(B, N, reduce, finalize, write);
  return outside.load();
}

void l2_step_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                 const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  run_step(x, x0, grad, alpha, eps, lo, hi, out,
           [&](auto t) { return l2_step_impl<decltype(t), false>(x, x0, grad, alpha, eps, lo, hi, out); });
}

// l2_step, and the number of x0 entries outside [lo, hi] or NaN (0-d int64).
at::Tensor l2_step_checked_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad,
                               const at::Tensor& alpha, const at::Tensor& eps, double lo, double hi,
                               const at::Tensor& out) {
  return count_tensor(run_step(x, x0, grad, alpha, eps, lo, hi, out, [&](auto t) {
    return l2_step_impl<decltype(t), true>(x, x0, grad, alpha, eps, lo, hi, out);
  }));
}

// -------------------------------------------------------------- l1_step
// Per sample (OpenMP over the batch; one sample is sequential):
//  1. q = order statistic of |g| at rank k = round(sparsity (N - 1)), on a
//     per-thread scratch copy: select_kth (lp_common.h), a sampled bracket
//     then std::nth_element on the ~12% of the row inside it (0.39 ms per
//     3x224x224 row against 1.06 ms for nth_element on the whole row, one
//     thread); exact, with a whole-row fallback;
//  2. e_i = sign(g_i) / nnz where |g_i| >= q (nnz = kept coordinates with
//     g_i != 0), v = x + alpha e - x0;
//  3. tau from the sort-free L1-ball-with-box solver (lp_common.h);
//  4. out = clamp(x0 + clamp(soft(v, tau), lo - x0, hi - x0), lo, hi): the
//     outer clamp only removes rounding, as in the reference.
template <class T>
FASTADV_CLONES void abs_row(const T* g, acc_type<T>* out, int64_t n) {
  using A = acc_type<T>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = std::abs(nan0(static_cast<A>(g[i])));
}

// v = (x + alpha * e) - x0 with e_i = sign(g_i) / nnz where |g_i| >= q, else 0
// (nnz: kept coordinates with g_i != 0; e = 0 if there are none).
template <class T>
FASTADV_CLONES void l1_step_v(const T* x, const T* x0, const T* g, acc_type<T> q, acc_type<T> a, acc_type<T>* v,
                              int64_t n) {
  using A = acc_type<T>;
  double nnz = 0.0;
  for (int64_t b0 = 0; b0 < n; b0 += kSumBlock) {
    const int64_t b1 = std::min(n, b0 + kSumBlock);
    A k = A(0);
#pragma omp simd reduction(+ : k)
    for (int64_t i = b0; i < b1; ++i) {
      const A gi = nan0(static_cast<A>(g[i]));
      k += (std::abs(gi) >= q) & (gi != A(0)) ? A(1) : A(0);
    }
    nnz += k;
  }
  const A norm = nnz > 0.0 ? static_cast<A>(nnz) : A(1);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const A gi = nan0(static_cast<A>(g[i]));
    const A e = std::abs(gi) >= q ? sign_of(gi) / norm : A(0);
    v[i] = (static_cast<A>(x[i]) + a * e) - static_cast<A>(x0[i]);
  }
}

template <class T>
void l1_step_impl(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                  const at::Tensor& eps, double sparsity, double lo, double hi, const at::Tensor& out) {
  using A = acc_type<T>;
  const int64_t B = x.size(0), N = x.size(1);
  const T* px = x.const_data_ptr<T>();
  const T* px0 = x0.const_data_ptr<T>();
  const T* pg = grad.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  const float* pa = alpha.const_data_ptr<float>();
  const float* pe = eps.const_data_ptr<float>();
  const A loA = static_cast<A>(lo), hiA = static_cast<A>(hi);
  const int64_t k = static_cast<int64_t>(std::floor(sparsity * static_cast<double>(N - 1) + 0.5));
  TORCH_CHECK(k >= 0 && k < N, "fastadv (cpp): l1_step sparsity must be in [0, 1), got ", sparsity);

  at::parallel_for(0, B, std::max<int64_t>(1, 32768 / N), [&](int64_t b0, int64_t b1) {
    std::vector<A> absg(N), vbuf(N), av(N), cap(N);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t off = b * N;
      abs_row<T>(pg + off, absg.data(), N);
      const A q = select_kth<A>(absg.data(), N, k, av.data(), cap.data());  // av, cap: free until l1_fill
      l1_step_v<T>(px + off, px0 + off, pg + off, q, static_cast<A>(pa[b]), vbuf.data(), N);
      l1_fill<A, T>(vbuf.data(), px0 + off, loA, hiA, av.data(), cap.data(), N);
      const double tau = l1_row_tau<A>(av.data(), cap.data(), N, static_cast<double>(pe[b]));
      l1_write<true, A, T>(vbuf.data(), px0 + off, loA, hiA, static_cast<A>(tau), po + off, N);
    }
  });
}

void l1_step_cpu(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                 const at::Tensor& eps, double sparsity, double lo, double hi, const at::Tensor& out) {
  check_step(x, x0, grad, alpha, eps, lo, hi, out);
  TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "fastadv (cpp): sparsity must be in [0, 1), got ", sparsity);
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastadv_l1_step_cpu", [&] {
    l1_step_impl<scalar_t>(x, x0, grad, alpha, eps, sparsity, lo, hi, out);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadv, CPU, m) {
  m.impl("linf_step", &linf_step_cpu);
  m.impl("l2_step", &l2_step_cpu);
  m.impl("linf_step_checked", &linf_step_checked_cpu);
  m.impl("l2_step_checked", &l2_step_checked_cpu);
  m.impl("l1_step", &l1_step_cpu);
}

}  // namespace cpu
}  // namespace fastadv
