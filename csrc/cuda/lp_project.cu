// CUDA kernels for the six Lp ops: fastadv::linf_step, l2_step, l1_step,
// project_linf, project_l2, project_l1 (semantics: fastadv/reference/lp.py,
// contract: csrc/fastadv.cpp; same algorithms as csrc/cpu/, see
// docs/backends-cpp-cuda.md).
//
// Layout of the work:
//  * linf_step, project_linf: one elementwise grid-stride kernel.
//  * l2_step, project_l2 without a box: per-sample partial sums over
//    fixed chunks (grid = chunks x B, one double per quantity per block, no
//    atomics, so results do not depend on scheduling), a one-thread-per-sample
//    finalize kernel, then an elementwise write kernel.
//  * project_l1, l1_step, project_l2 with a box: one block per sample; the
//    per-sample root-find (safeguarded Newton on tau for L1, the monotone
//    fixed point on t for L2) runs in lockstep in every thread of the block,
//    each iteration one block-wide reduction over the sample (which stays in
//    L2 cache between iterations: 32 x 3x224x224 float32 delta + x0 = 38 MB).
//  * l1_step's threshold: radix select on the bits of |g| (non-negative
//    floats order like their unsigned bit patterns), 8 bits per pass, a
//    256-bin shared histogram per pass: 4 passes for float32, 8 for float64.
//
// Built only where a CUDA toolkit and a CUDA torch are present (setup.py);
// scripts/check_nvcc.sh compiles it elsewhere as a syntax/type check.
// Headers are kept to the minimum: torch/extension.h took 73 s per arch here.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <optional>

namespace fastadv {
namespace cuda {
namespace {

constexpr int kThreads = 256;       // elementwise / partial-sum blocks
constexpr int kRowThreads = 512;    // one block per sample
constexpr int64_t kChunk = 16384;   // elements per partial-sum block

template <class T>
using acc_t = at::opmath_type<T>;

// ---------------------------------------------------------------- checks
void check_first(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fastadv (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 2, "fastadv (cuda): ", name, " must be 2-D (B, N) rows, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), "fastadv (cuda): ", name, " must be contiguous (B, N) rows");
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, "fastadv (cuda): ",
              name, " must be float32, float16, bfloat16 or float64, got ", st);
}
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "fastadv (cuda): ", name, " is on ", t.device(), " but expected ",
              like.device());
  TORCH_CHECK(t.sizes() == like.sizes(), "fastadv (cuda): ", name, " has shape ", t.sizes(), " but expected ",
              like.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastadv (cuda): ", name, " has dtype ", t.scalar_type(),
              " but expected ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastadv (cuda): ", name, " must be contiguous (B, N) rows");
}
void check_per_sample(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "fastadv (cuda): ", name, " is on ", t.device(), " but expected ",
              like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastadv (cuda): ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == like.size(0), "fastadv (cuda): ", name, " must have shape (B,) = (",
              like.size(0), ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastadv (cuda): ", name, " must be contiguous");
}

// -------------------------------------------------------------- elements
template <class A>
__device__ __forceinline__ A nan0(A g) { return g == g ? g : A(0); }
template <class A>
__device__ __forceinline__ A sign_of(A g) { return (g > A(0) ? A(1) : A(0)) - (g < A(0) ? A(1) : A(0)); }
template <class A>
__device__ __forceinline__ A clamp_to(A v, A lo, A hi) {
  v = v < lo ? lo : v;  // torch.clamp order
  return v > hi ? hi : v;
}
template <class A>
__device__ __forceinline__ A inf_of() { return static_cast<A>(INFINITY); }

// ----------------------------------------------------- block reductions
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <class A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <class A>
__device__ __forceinline__ A warp_min(A v) {
  for (int o = 16; o > 0; o >>= 1) v = fmin(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Three sums (double) and a max and a min (A), reduced over the block and
// returned to every thread. Fixed reduction tree: deterministic.
template <class A>
struct Red {
  double s0, s1, s2;
  A mx, mn;
};

template <class A>
__device__ Red<A> block_reduce(Red<A> r) {
  __shared__ double sh_s[3][32];
  __shared__ A sh_m[2][32];
  __shared__ Red<A> result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  r.s0 = warp_sum(r.s0);
  r.s1 = warp_sum(r.s1);
  r.s2 = warp_sum(r.s2);
  r.mx = warp_max(r.mx);
  r.mn = warp_min(r.mn);
  if (lane == 0) {
    sh_s[0][warp] = r.s0;
    sh_s[1][warp] = r.s1;
    sh_s[2][warp] = r.s2;
    sh_m[0][warp] = r.mx;
    sh_m[1][warp] = r.mn;
  }
  __syncthreads();
  if (warp == 0) {
    const bool ok = lane < nwarps;
    double a = ok ? sh_s[0][lane] : 0.0, b = ok ? sh_s[1][lane] : 0.0, c = ok ? sh_s[2][lane] : 0.0;
    A mx = ok ? sh_m[0][lane] : -inf_of<A>(), mn = ok ? sh_m[1][lane] : inf_of<A>();
    a = warp_sum(a);
    b = warp_sum(b);
    c = warp_sum(c);
    mx = warp_max(mx);
    mn = warp_min(mn);
    if (lane == 0) result = Red<A>{a, b, c, mx, mn};
  }
  __syncthreads();
  Red<A> out = result;
  __syncthreads();  // result may be overwritten by the next call
  return out;
}

// ------------------------------------------------------------ linf_step
template <class T>
__global__ void linf_step_kernel(const T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
                                 const float* __restrict__ alpha, const float* __restrict__ eps, acc_t<T> lo,
                                 acc_t<T> hi, T* out, int64_t N, int64_t total) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / N;
    const A a = static_cast<A>(alpha[b]), ep = static_cast<A>(eps[b]);
    const A xi = static_cast<A>(x[i]), x0i = static_cast<A>(x0[i]);
    const A adv = xi + a * sign_of(nan0(static_cast<A>(g[i])));
    const A d = clamp_to(adv - x0i, -ep, ep);
    out[i] = static_cast<T>(clamp_to(x0i + d, lo, hi));
  }
}

template <class T>
__global__ void project_linf_kernel(const T* __restrict__ delta, const float* __restrict__ eps,
                                    const T* __restrict__ x0, acc_t<T> lo, acc_t<T> hi, T* out, int64_t N,
                                    int64_t total) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const A ep = static_cast<A>(eps[i / N]);
    A lower = -ep, upper = ep;
    if (x0 != nullptr) {
      const A x0i = static_cast<A>(x0[i]);
      const A l = lo - x0i, u = hi - x0i;
      lower = lower < l ? l : lower;
      upper = upper < u ? upper : u;
    }
    A d = static_cast<A>(delta[i]);
    d = d < lower ? lower : d;
    out[i] = static_cast<T>(d > upper ? upper : d);
  }
}

int elementwise_blocks(int64_t total) {
  // Grid-stride: enough blocks to fill the GPU several times over; more only adds launch cost.
  return static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 132 * 32));
}

// ------------------------------------------ l2_step / project_l2 (no box)
// Partial sums per (sample, chunk) block. For l2_step: (||g||^2, ||d0||^2,
// <d0, g>) with d0 = x - x0; for project_l2: ||v||^2 in s0.
template <class T, bool STEP>
__global__ void l2_partial_kernel(const T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
                                  double* __restrict__ part, int64_t N, int64_t nchunk) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.y, c = blockIdx.x;
  const int64_t s = c * kChunk, e = min(N, s + kChunk);
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t i = s + threadIdx.x; i < e; i += blockDim.x) {
    const int64_t k = b * N + i;
    if (STEP) {
      const double gi = static_cast<double>(nan0(static_cast<A>(g[k])));
      const double d0 = static_cast<double>(static_cast<A>(x[k]) - static_cast<A>(x0[k]));
      s0 += gi * gi;
      s1 += d0 * d0;
      s2 += d0 * gi;
    } else {
      const double v = static_cast<double>(static_cast<A>(x[k]));
      s0 += v * v;
    }
  }
  Red<A> r = block_reduce<A>(Red<A>{s0, s1, s2, A(0), A(0)});
  if (threadIdx.x == 0) {
    double* p = part + (b * nchunk + c) * 3;
    p[0] = r.s0;
    p[1] = r.s1;
    p[2] = r.s2;
  }
}

// One thread per sample: combine chunk partials in order, then
// param[b] = (gn, factor) for l2_step, (factor, -) for project_l2.
template <class A, bool STEP>
__global__ void l2_finalize_kernel(const double* __restrict__ part, const float* __restrict__ alpha,
                                   const float* __restrict__ eps, A* __restrict__ param, int64_t B, int64_t nchunk) {
  const int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (b >= B) return;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t c = 0; c < nchunk; ++c) {
    const double* p = part + (b * nchunk + c) * 3;
    s0 += p[0];
    s1 += p[1];
    s2 += p[2];
  }
  const A ep = static_cast<A>(eps[b]);
  if (STEP) {
    const A gn = static_cast<A>(sqrt(s0)) + static_cast<A>(1e-10);
    const double s = static_cast<double>(alpha[b]) / static_cast<double>(gn);
    const A dn = static_cast<A>(sqrt(fmax(0.0, s1 + 2.0 * s * s2 + s * s * s0)));
    param[2 * b] = gn;
    param[2 * b + 1] = dn > ep ? (A(1) / dn) * ep : A(1);  // reciprocal * eps, as eager PyTorch
  } else {
    const A n = static_cast<A>(sqrt(s0));
    param[2 * b] = n > ep ? ep / n : A(1);
    param[2 * b + 1] = A(1);
  }
}

template <class T>
__global__ void l2_step_write_kernel(const T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
                                     const float* __restrict__ alpha, const acc_t<T>* __restrict__ param,
                                     acc_t<T> lo, acc_t<T> hi, T* out, int64_t N, int64_t total) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t b = i / N;
    const A a = static_cast<A>(alpha[b]), gn = param[2 * b], f = param[2 * b + 1];
    const A xi = static_cast<A>(x[i]), x0i = static_cast<A>(x0[i]);
    const A delta = (xi + a * (nan0(static_cast<A>(g[i])) / gn)) - x0i;
    out[i] = static_cast<T>(clamp_to(x0i + delta * f, lo, hi));
  }
}

template <class T>
__global__ void scale_rows_kernel(const T* __restrict__ v, const acc_t<T>* __restrict__ param, T* out, int64_t N,
                                  int64_t total) {
  using A = acc_t<T>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = static_cast<T>(static_cast<A>(v[i]) * param[2 * (i / N)]);
}

// ---------------------------------------------- project_l2 with a box
// One block per sample; the monotone fixed point from below of
// csrc/cpu/lp_project.cpp (every iterate feasible, exact once the
// saturated set stops changing, capped at 64 iterations).
template <class T>
__global__ void project_l2_box_kernel(const T* __restrict__ delta, const float* __restrict__ eps,
                                      const T* __restrict__ x0, acc_t<T> lo, acc_t<T> hi, T* out, int64_t N) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const T* d = delta + b * N;
  const T* z = x0 + b * N;
  T* o = out + b * N;
  const double ep = static_cast<double>(eps[b]), ep2 = ep * ep;
  double f1 = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A v = static_cast<A>(d[i]), zi = static_cast<A>(z[i]);
    const double c = static_cast<double>(clamp_to(v, lo - zi, hi - zi));
    f1 += c * c;
  }
  f1 = block_reduce<A>(Red<A>{f1, 0.0, 0.0, A(0), A(0)}).s0;
  A t = A(1);
  if (f1 > ep2) {
    double tk = 0.0, prev_sat = -1.0;
    for (int it = 0; it < 64; ++it) {
      const A tA = static_cast<A>(tk);
      double S = 0.0, C = 0.0, nsat = 0.0;
      for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
        const A v = static_cast<A>(d[i]), zi = static_cast<A>(z[i]);
        const A av = fabs(v);
        const A bd = fabs(v > A(0) ? hi - zi : lo - zi);
        const bool sat = tA * av >= bd;
        S += sat ? 0.0 : static_cast<double>(av) * static_cast<double>(av);
        C += sat ? static_cast<double>(bd) * static_cast<double>(bd) : 0.0;
        nsat += sat ? 1.0 : 0.0;
      }
      const Red<A> r = block_reduce<A>(Red<A>{S, C, nsat, A(0), A(0)});
      if (r.s2 == prev_sat || !(r.s0 > 0.0)) break;
      prev_sat = r.s2;
      const double tn = fmin(1.0, sqrt(fmax(0.0, ep2 - r.s1) / r.s0));
      if (!(tn > tk)) break;
      tk = tn;
    }
    t = static_cast<A>(tk);
  }
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A zi = static_cast<A>(z[i]);
    o[i] = static_cast<T>(clamp_to(t * static_cast<A>(d[i]), lo - zi, hi - zi));
  }
}

// ------------------------------------------------------------ L1 solver
// Coordinate sources: v_i and its bounds (a_i, b_i).
template <class T>
struct ProjectSource {
  using A = acc_t<T>;
  const T* d;
  const T* z;  // x0 row or nullptr
  A lo, hi;
  __device__ A v(int64_t i) const { return static_cast<A>(d[i]); }
  __device__ A lower(int64_t i) const { return z ? lo - static_cast<A>(z[i]) : -inf_of<A>(); }
  __device__ A upper(int64_t i) const { return z ? hi - static_cast<A>(z[i]) : inf_of<A>(); }
};

template <class T>
struct StepSource {
  using A = acc_t<T>;
  const T* x;
  const T* z;
  const T* g;
  A lo, hi, alpha, q, norm;
  __device__ A v(int64_t i) const {
    const A gi = nan0(static_cast<A>(g[i]));
    const A e = fabs(gi) >= q ? sign_of(gi) / norm : A(0);
    return (static_cast<A>(x[i]) + alpha * e) - static_cast<A>(z[i]);
  }
  __device__ A lower(int64_t i) const { return lo - static_cast<A>(z[i]); }
  __device__ A upper(int64_t i) const { return hi - static_cast<A>(z[i]); }
};

// The cap u_i = b_i if v_i > 0 else -a_i (>= 0; 0 when v_i = 0).
template <class A, class Src>
__device__ __forceinline__ A cap_of(const Src& src, int64_t i, A v) {
  A u = v > A(0) ? src.upper(i) : -src.lower(i);
  u = u > A(0) ? u : A(0);
  return v != A(0) ? u : A(0);
}

// tau for the projection onto {||d||_1 <= eps} n box; the same safeguarded
// Newton-in-a-bracket as csrc/cpu/lp_common.h (l1_tau), without compaction:
// every iteration is one block-wide pass over the sample.
template <class A, class Src>
__device__ double l1_tau_block(const Src& src, int64_t N, double eps) {
  const A kInf = inf_of<A>();
  if (!(eps > 0.0)) return INFINITY;  // eps = 0: d = 0 exactly
  double g0 = 0.0;
  A vmax = A(0);
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A v = src.v(i);
    const A av = fabs(v), u = cap_of<A>(src, i, v);
    g0 += static_cast<double>(av < u ? av : u);
    vmax = fmax(vmax, u > A(0) ? av : A(0));
  }
  const Red<A> r0 = block_reduce<A>(Red<A>{g0, 0.0, 0.0, vmax, A(0)});
  if (r0.s0 <= eps) return 0.0;
  double tl = 0.0, th = static_cast<double>(r0.mx), tau = 0.0;
  for (int it = 0; it < 200; ++it) {
    const A t = static_cast<A>(tau);
    double s_lin = 0.0, c_sat = 0.0, cnt = 0.0;
    A bp_lo = -kInf, bp_hi = kInf;
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const A v = src.v(i);
      const A a = fabs(v), c = cap_of<A>(src, i, v);
      if (!(a > A(0) && c > A(0))) continue;
      const A rr = a - t;
      const bool lin = (rr > A(0)) && (rr < c);
      s_lin += lin ? static_cast<double>(a) : 0.0;
      cnt += lin ? 1.0 : 0.0;
      c_sat += rr >= c ? static_cast<double>(c) : 0.0;
      const A p2 = a - c;
      bp_lo = fmax(bp_lo, fmax(a <= t ? a : -kInf, p2 <= t ? p2 : -kInf));
      bp_hi = fmin(bp_hi, fmin(a > t ? a : kInf, p2 > t ? p2 : kInf));
    }
    const Red<A> r = block_reduce<A>(Red<A>{s_lin, c_sat, cnt, bp_lo, bp_hi});
    const double total = r.s0 + r.s1;
    const double g = total - r.s2 * static_cast<double>(t);
    if (g == eps) return static_cast<double>(t);
    if (g > eps) tl = fmax(tl, static_cast<double>(t));
    else th = fmin(th, static_cast<double>(t));
    double next = 0.5 * (tl + th);
    if (r.s2 > 0.0) {
      const double root = (total - eps) / r.s2;
      if (root >= fmax(static_cast<double>(r.mx), tl) && root <= fmin(static_cast<double>(r.mn), th)) return root;
      if (root > tl && root < th) next = root;
    }
    const A tlA = static_cast<A>(tl), thA = static_cast<A>(th);
    A nt = static_cast<A>(next);
    if (!(nt > tlA)) nt = nextafter(tlA, kInf);
    if (!(nt < thA)) nt = nextafter(thA, -kInf);
    if (!(nt > tlA && nt < thA)) return th;  // adjacent floats: th is feasible
    tau = static_cast<double>(nt);
  }
  return th;
}

template <class T>
__global__ void project_l1_kernel(const T* __restrict__ delta, const float* __restrict__ eps,
                                  const T* __restrict__ x0, acc_t<T> lo, acc_t<T> hi, T* out, int64_t N) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const ProjectSource<T> src{delta + b * N, x0 ? x0 + b * N : nullptr, lo, hi};
  const A tau = static_cast<A>(l1_tau_block<A>(src, N, static_cast<double>(eps[b])));
  T* o = out + b * N;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A v = src.v(i);
    const A r = fabs(v) - tau;
    o[i] = static_cast<T>(clamp_to(sign_of(v) * (r > A(0) ? r : A(0)), src.lower(i), src.upper(i)));
  }
}

// Radix select: the k-th smallest (0-based) of |nan0(g_i)| over the row.
template <class A>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  __device__ static type bits(float v) { return __float_as_uint(v); }
  __device__ static float value(type k) { return __uint_as_float(k); }
};
template <>
struct KeyOf<double> {
  using type = unsigned long long;
  __device__ static type bits(double v) { return static_cast<type>(__double_as_longlong(v)); }
  __device__ static double value(type k) { return __longlong_as_double(static_cast<long long>(k)); }
};

template <class T>
__device__ acc_t<T> radix_select_abs(const T* g, int64_t N, int64_t k) {
  using A = acc_t<T>;
  using K = typename KeyOf<A>::type;
  constexpr int kBits = 8 * sizeof(K);
  __shared__ unsigned int hist[256];
  __shared__ K sh_prefix;
  __shared__ long long sh_k;
  K prefix = 0, mask = 0;
  long long krem = k;
  for (int shift = kBits - 8; shift >= 0; shift -= 8) {
    for (int j = threadIdx.x; j < 256; j += blockDim.x) hist[j] = 0u;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
      const K key = KeyOf<A>::bits(fabs(nan0(static_cast<A>(g[i]))));
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      long long cum = 0;
      int sel = 255;
      for (int d = 0; d < 256; ++d) {
        if (cum + static_cast<long long>(hist[d]) > krem) {
          sel = d;
          break;
        }
        cum += hist[d];
      }
      sh_prefix = prefix | (static_cast<K>(sel) << shift);
      sh_k = krem - cum;
    }
    __syncthreads();
    prefix = sh_prefix;
    krem = sh_k;
    mask |= static_cast<K>(255u) << shift;
    __syncthreads();
  }
  return KeyOf<A>::value(prefix);
}

template <class T>
__global__ void l1_step_kernel(const T* __restrict__ x, const T* __restrict__ x0, const T* __restrict__ g,
                               const float* __restrict__ alpha, const float* __restrict__ eps, acc_t<T> lo,
                               acc_t<T> hi, T* out, int64_t N, int64_t k) {
  using A = acc_t<T>;
  const int64_t b = blockIdx.x;
  const T* gr = g + b * N;
  const A q = radix_select_abs<T>(gr, N, k);
  double nnz = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A gi = nan0(static_cast<A>(gr[i]));
    nnz += (fabs(gi) >= q && gi != A(0)) ? 1.0 : 0.0;
  }
  nnz = block_reduce<A>(Red<A>{nnz, 0.0, 0.0, A(0), A(0)}).s0;
  const StepSource<T> src{x + b * N, x0 + b * N, gr, lo, hi, static_cast<A>(alpha[b]), q,
                          nnz > 0.0 ? static_cast<A>(nnz) : A(1)};
  const A tau = static_cast<A>(l1_tau_block<A>(src, N, static_cast<double>(eps[b])));
  T* o = out + b * N;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const A v = src.v(i);
    const A zi = static_cast<A>(src.z[i]);
    const A r = fabs(v) - tau;
    const A d = clamp_to(sign_of(v) * (r > A(0) ? r : A(0)), lo - zi, hi - zi);
    o[i] = static_cast<T>(clamp_to(zi + d, lo, hi));
  }
}

// ------------------------------------------------------------ host side
void check_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  check_first(x, "x");
  check_rows(x0, "x0", x);
  check_rows(grad, "grad", x);
  check_rows(out, "out", x);
  check_per_sample(alpha, "alpha", x);
  check_per_sample(eps, "eps", x);
  TORCH_CHECK(!(lo > hi), "fastadv (cuda): the box needs lo <= hi, got lo=", lo, " hi=", hi);
}
void check_project(const at::Tensor& delta, const at::Tensor& eps, const std::optional<at::Tensor>& x0, double lo,
                   double hi, const at::Tensor& out) {
  check_first(delta, "delta");
  check_per_sample(eps, "eps", delta);
  if (x0.has_value()) check_rows(*x0, "x0", delta);
  check_rows(out, "out", delta);
  TORCH_CHECK(!(lo > hi), "fastadv (cuda): the box needs lo <= hi, got lo=", lo, " hi=", hi);
}

void linf_step_cuda(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                    const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  check_step(x, x0, grad, alpha, eps, lo, hi, out);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = x.numel(), N = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastadv_linf_step_cuda", [&] {
    using A = acc_t<scalar_t>;
    linf_step_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        alpha.const_data_ptr<float>(), eps.const_data_ptr<float>(), static_cast<A>(lo), static_cast<A>(hi),
        out.mutable_data_ptr<scalar_t>(), N, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void l2_step_cuda(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                  const at::Tensor& eps, double lo, double hi, const at::Tensor& out) {
  check_step(x, x0, grad, alpha, eps, lo, hi, out);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), N = x.size(1), total = x.numel();
  const int64_t nchunk = (N + kChunk - 1) / kChunk;
  TORCH_CHECK(B <= 65535, "fastadv (cuda): l2_step supports B <= 65535 samples per call, got ", B);
  at::Tensor part = at::empty({B * nchunk * 3}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastadv_l2_step_cuda", [&] {
    using A = acc_t<scalar_t>;
    at::Tensor param = at::empty({B * 2}, x.options().dtype(c10::CppTypeToScalarType<A>::value));
    l2_partial_kernel<scalar_t, true><<<dim3(nchunk, B), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        part.mutable_data_ptr<double>(), N, nchunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_finalize_kernel<A, true><<<(B + 127) / 128, 128, 0, stream>>>(
        part.const_data_ptr<double>(), alpha.const_data_ptr<float>(), eps.const_data_ptr<float>(),
        param.mutable_data_ptr<A>(), B, nchunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_step_write_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        alpha.const_data_ptr<float>(), param.const_data_ptr<A>(), static_cast<A>(lo), static_cast<A>(hi),
        out.mutable_data_ptr<scalar_t>(), N, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void l1_step_cuda(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grad, const at::Tensor& alpha,
                  const at::Tensor& eps, double sparsity, double lo, double hi, const at::Tensor& out) {
  check_step(x, x0, grad, alpha, eps, lo, hi, out);
  TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "fastadv (cuda): sparsity must be in [0, 1), got ", sparsity);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = x.size(0), N = x.size(1);
  TORCH_CHECK(B <= 2147483647LL, "fastadv (cuda): too many samples");
  const int64_t k = static_cast<int64_t>(std::floor(sparsity * static_cast<double>(N - 1) + 0.5));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastadv_l1_step_cuda", [&] {
    using A = acc_t<scalar_t>;
    l1_step_kernel<scalar_t><<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), x0.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        alpha.const_data_ptr<float>(), eps.const_data_ptr<float>(), static_cast<A>(lo), static_cast<A>(hi),
        out.mutable_data_ptr<scalar_t>(), N, k);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void project_linf_cuda(const at::Tensor& delta, const at::Tensor& eps, const std::optional<at::Tensor>& x0,
                       double lo, double hi, const at::Tensor& out) {
  check_project(delta, eps, x0, lo, hi, out);
  if (delta.numel() == 0) return;
  c10::cuda::CUDAGuard guard(delta.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = delta.numel(), N = delta.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "fastadv_project_linf_cuda", [&] {
    using A = acc_t<scalar_t>;
    project_linf_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        delta.const_data_ptr<scalar_t>(), eps.const_data_ptr<float>(),
        x0.has_value() ? x0->const_data_ptr<scalar_t>() : nullptr, static_cast<A>(lo), static_cast<A>(hi),
        out.mutable_data_ptr<scalar_t>(), N, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void project_l2_cuda(const at::Tensor& delta, const at::Tensor& eps, const std::optional<at::Tensor>& x0,
                     double lo, double hi, const at::Tensor& out) {
  check_project(delta, eps, x0, lo, hi, out);
  if (delta.numel() == 0) return;
  c10::cuda::CUDAGuard guard(delta.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = delta.size(0), N = delta.size(1), total = delta.numel();
  const bool box = x0.has_value() && (std::isfinite(lo) || std::isfinite(hi));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "fastadv_project_l2_cuda", [&] {
    using A = acc_t<scalar_t>;
    if (box) {
      project_l2_box_kernel<scalar_t><<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
          delta.const_data_ptr<scalar_t>(), eps.const_data_ptr<float>(), x0->const_data_ptr<scalar_t>(),
          static_cast<A>(lo), static_cast<A>(hi), out.mutable_data_ptr<scalar_t>(), N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    TORCH_CHECK(B <= 65535, "fastadv (cuda): project_l2 supports B <= 65535 samples per call, got ", B);
    const int64_t nchunk = (N + kChunk - 1) / kChunk;
    at::Tensor part = at::empty({B * nchunk * 3}, delta.options().dtype(at::kDouble));
    at::Tensor param = at::empty({B * 2}, delta.options().dtype(c10::CppTypeToScalarType<A>::value));
    l2_partial_kernel<scalar_t, false><<<dim3(nchunk, B), kThreads, 0, stream>>>(
        delta.const_data_ptr<scalar_t>(), nullptr, nullptr, part.mutable_data_ptr<double>(), N, nchunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    l2_finalize_kernel<A, false><<<(B + 127) / 128, 128, 0, stream>>>(
        part.const_data_ptr<double>(), eps.const_data_ptr<float>(), eps.const_data_ptr<float>(),
        param.mutable_data_ptr<A>(), B, nchunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    scale_rows_kernel<scalar_t><<<elementwise_blocks(total), kThreads, 0, stream>>>(
        delta.const_data_ptr<scalar_t>(), param.const_data_ptr<A>(), out.mutable_data_ptr<scalar_t>(), N, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void project_l1_cuda(const at::Tensor& delta, const at::Tensor& eps, const std::optional<at::Tensor>& x0,
                     double lo, double hi, const at::Tensor& out) {
  check_project(delta, eps, x0, lo, hi, out);
  if (delta.numel() == 0) return;
  c10::cuda::CUDAGuard guard(delta.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = delta.size(0), N = delta.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), "fastadv_project_l1_cuda", [&] {
    using A = acc_t<scalar_t>;
    project_l1_kernel<scalar_t><<<static_cast<unsigned>(B), kRowThreads, 0, stream>>>(
        delta.const_data_ptr<scalar_t>(), eps.const_data_ptr<float>(),
        x0.has_value() ? x0->const_data_ptr<scalar_t>() : nullptr, static_cast<A>(lo), static_cast<A>(hi),
        out.mutable_data_ptr<scalar_t>(), N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastadv, CUDA, m) {
  m.impl("linf_step", &linf_step_cuda);
  m.impl("l2_step", &l2_step_cuda);
  m.impl("l1_step", &l1_step_cuda);
  m.impl("project_linf", &project_linf_cuda);
  m.impl("project_l2", &project_l2_cuda);
  m.impl("project_l1", &project_l1_cuda);
}

}  // namespace cuda
}  // namespace fastadv
