// Vectorizable float exp and log (no libm call in the loop), shared by the
// Sinkhorn and Wasserstein CPU kernels. Include AFTER
// `#pragma GCC optimize("no-trapping-math")`: the loops that call these
// vectorize only without trapping-math semantics (gcc 12), 4-8x faster (measured).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fastadv {

// exp(x), float, vectorizable: 2^n * p(r), |r| <= ln2/2, Cephes' degree-6
// polynomial, ~1 ulp; returns 0 below -87.3 (underflow).
static inline float fexp(float x) {
  x = x < 88.0f ? x : 88.0f;
  const bool under = x < -87.3f;
  x = x > -87.3f ? x : -87.3f;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float t = x * 1.44269504088896341f + magic;
  int32_t ti;
  std::memcpy(&ti, &t, 4);
  const int32_t n = ti - 0x4B400000;
  const float nf = t - magic;
  float r = x - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  const float out = p * scale;
  return under ? 0.0f : out;
}

// log(x) for normal x > 0, float, vectorizable (Cephes logf), ~1 ulp.
static inline float flog(float x) {
  int32_t i;
  std::memcpy(&i, &x, 4);
  const int32_t e = ((i >> 23) & 0xff) - 126;  // x = mant * 2^e, mant in [0.5, 1)
  const int32_t mi = (i & 0x007fffff) | 0x3f000000;
  float mant;
  std::memcpy(&mant, &mi, 4);
  const bool lt = mant < 0.707106781186547524f;
  const float xm = lt ? (mant + mant - 1.0f) : (mant - 1.0f);
  const float ef = (float)(lt ? e - 1 : e);
  const float z = xm * xm;
  float y = 7.0376836292E-2f;
  y = y * xm - 1.1514610310E-1f;
  y = y * xm + 1.1676998740E-1f;
  y = y * xm - 1.2420140846E-1f;
  y = y * xm + 1.4249322787E-1f;
  y = y * xm - 1.6668057665E-1f;
  y = y * xm + 2.0000714765E-1f;
  y = y * xm - 2.4999993993E-1f;
  y = y * xm + 3.3333331174E-1f;
  y = y * xm * z;
  y += -2.12194440e-4f * ef;
  y += -0.5f * z;
  float r = xm + y;
  r += 0.693359375f * ef;
  return r;
}
static inline double fexp(double x) { return std::exp(x); }
static inline double flog(double x) { return std::log(x); }

}  // namespace fastadv
