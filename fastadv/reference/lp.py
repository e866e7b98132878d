"""Pure-PyTorch references for the Lp PGD steps and exact Lp-ball projections.

These are the ground truth for the fused kernels (tests) and the eager
baseline (benchmarks). They are written for clarity, are differentiable where
the math is, and take any batch shape (B, ...): dimension 0 is the sample.

Notation: x is the current iterate, x0 the clean input, g the loss gradient,
alpha the step size, eps the radius (floats or (B,) tensors), and the box
[lo, hi] (``clip``) holds valid images. ``upcast`` computes in that dtype
(float64 for a ground truth) and returns that dtype.

NaN in ``grad`` is treated as 0 (that coordinate does not move), so a sample
whose gradient is all NaN stays where it is, up to the projection.
"""
from __future__ import annotations

import math

import torch

# torchattacks' PGDL2 adds this to the gradient norm; we keep it so that our
# L2 step matches torchattacks bit for bit on CPU float32.
L2_DIVISION_EPS = 1e-10


def _prep(upcast, *ts):
    if upcast is None:
        return ts
    return tuple(None if t is None else t.to(upcast) for t in ts)


def _per_sample(v, like: torch.Tensor) -> torch.Tensor:
    """A float or (B,) tensor as a (B, 1, ..., 1) tensor that broadcasts over a sample."""
    shape = (like.shape[0],) + (1,) * (like.dim() - 1)
    if isinstance(v, torch.Tensor):
        return v.to(device=like.device, dtype=like.dtype).reshape(-1).expand(like.shape[0]).reshape(shape)
    return torch.full(shape, float(v), dtype=like.dtype, device=like.device)


def _box(clip):
    return (-math.inf, math.inf) if clip is None else (float(clip[0]), float(clip[1]))


def _clamp_box(y, clip):
    return y if clip is None else y.clamp(*_box(clip))


def linf_step(x, x0, grad, alpha, eps, clip=(0.0, 1.0), *, upcast=None):
    """PGD L-inf step (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial Attacks").

    y = clip_[lo,hi]( x0 + clamp(x + alpha * sign(g) - x0, -eps, eps) ),
    in exactly torchattacks' order of operations, so float32 results agree bit for bit.
    """
    x, x0, grad = _prep(upcast, x, x0, grad)
    a, e = _per_sample(alpha, x), _per_sample(eps, x)
    adv = x + a * torch.nan_to_num(grad, nan=0.0).sign()
    delta = torch.clamp(adv - x0, min=-e, max=e)
    return _clamp_box(x0 + delta, clip)


def l2_step(x, x0, grad, alpha, eps, clip=(0.0, 1.0), *, upcast=None):
    """PGD L2 step with torchattacks' PGDL2 semantics.

    u = g / (||g||_2 + 1e-10)            (a zero gradient gives u = 0, no NaN)
    delta = x + alpha * u - x0
    delta *= min(1, eps / ||delta||_2)   (radial projection onto the ball)
    y = clip_[lo,hi](x0 + delta)
    Norms are per sample over all non-batch dimensions.
    """
    x, x0, grad = _prep(upcast, x, x0, grad)
    b = x.shape[0]
    a, e = _per_sample(alpha, x), _per_sample(eps, x)
    g = torch.nan_to_num(grad, nan=0.0)
    gnorm = torch.norm(g.reshape(b, -1), p=2, dim=1) + L2_DIVISION_EPS
    adv = x + a * (g / gnorm.reshape(a.shape))
    delta = adv - x0
    dnorm = torch.norm(delta.reshape(b, -1), p=2, dim=1).reshape(e.shape)
    # torchattacks writes min(eps / ||delta||, 1), which is NaN for eps = 0 and
    # delta = 0; this is the same number everywhere else. PyTorch evaluates a
    # Python scalar over a tensor as reciprocal(tensor) * scalar, so we do too:
    # a true division differs from PGDL2 by 1 ulp in ~28% of entries (measured).
    factor = torch.where(dnorm > e, dnorm.reciprocal() * e, torch.ones_like(dnorm))
    return _clamp_box(x0 + delta * factor, clip)


def l1_keep_count_rank(n: int, sparsity: float) -> int:
    """Rank k (0-based, ascending) of the |g| order statistic used as the SLIDE threshold.

    k = round(sparsity * (n - 1)), 'nearest' percentile interpolation as in
    the original SLIDE code (percentile of |g| at q = 100 * sparsity).
    """
    return int(math.floor(sparsity * (n - 1) + 0.5))


def l1_direction(grad, sparsity):
    """SLIDE's sparse L1 ascent direction (Tramer & Boneh 2019), shape (B, N).

    e_i = sign(g_i) if |g_i| >= q else 0, where q is the per-sample order
    statistic of |g| at rank ``l1_keep_count_rank(N, sparsity)``; then
    e /= ||e||_1 (e = 0 if no kept coordinate has a nonzero gradient).
    """
    b = grad.shape[0]
    g = torch.nan_to_num(grad, nan=0.0).reshape(b, -1)
    absg = g.abs()
    k = l1_keep_count_rank(absg.shape[1], sparsity)
    q = absg.kthvalue(k + 1, dim=1, keepdim=True).values
    e = torch.where(absg >= q, g.sign(), torch.zeros_like(g))
    norm = e.abs().sum(dim=1, keepdim=True)
    return e / torch.where(norm > 0, norm, torch.ones_like(norm))


def l1_step(x, x0, grad, alpha, eps, sparsity=0.95, clip=(0.0, 1.0), *, upcast=None):
    """Sparse L1 PGD step of SLIDE (Tramer & Boneh 2019, "Adversarial Training and
    Robustness for Multiple Perturbations"), with the exact projection APGD-L1 needs.

    y = x + alpha * e (``l1_direction``), then delta = y - x0 is projected
    exactly onto {||d||_1 <= eps} intersected with the box {lo <= x0 + d <= hi}
    (``project_l1``); the final clamp only removes rounding.
    """
    x, x0, grad = _prep(upcast, x, x0, grad)
    b = x.shape[0]
    a = _per_sample(alpha, x)
    e = l1_direction(grad, sparsity).reshape(x.shape)
    delta = project_l1(x + a * e - x0, eps, x0=x0, clip=clip)
    return _clamp_box(x0 + delta, clip)


def _bounds(delta, x0, clip):
    """Per-coordinate bounds a <= d <= b for d = delta, from the box around x0."""
    if x0 is None or clip is None:
        inf = torch.full_like(delta, math.inf)
        return -inf, inf
    lo, hi = _box(clip)
    return lo - x0, hi - x0


def project_linf(delta, eps, *, x0=None, clip=None, upcast=None):
    """Euclidean projection onto {||d||_inf <= eps} (and lo <= x0 + d <= hi if given).

    Both sets are boxes, so the projection is a clamp to their intersection:
    d = clamp(delta, max(-eps, lo - x0), min(eps, hi - x0)).
    """
    delta, x0 = _prep(upcast, delta, x0)
    e = _per_sample(eps, delta)
    lower, upper = _bounds(delta, x0, clip)
    return torch.minimum(torch.maximum(delta, torch.maximum(-e, lower)), torch.minimum(e, upper))


def project_l2(delta, eps, *, x0=None, clip=None, upcast=None):
    """Exact Euclidean projection onto {||d||_2 <= eps} intersected with the box.

    KKT: d(t) = clamp(t * v, a, b) with a = lo - x0 <= 0 <= b = hi - x0 and
    t = 1 / (1 + mu) in [0, 1]; f(t) = ||d(t)||^2 increases with t. If f(1) <= eps^2
    the answer is clamp(v, a, b); else t* solves f(t*) = eps^2. Coordinate i
    saturates at T_i = (b_i or a_i) / v_i, so between sorted breakpoints
    f(t) = t^2 S + C with S = sum of v_i^2 not yet saturated and C = sum of the
    saturated bounds squared: t* = sqrt((eps^2 - C) / S) on the right interval.
    Without a box this is d = v * min(1, eps / ||v||).
    Requires 0 in the box (x0 inside [lo, hi]).
    """
    delta, x0 = _prep(upcast, delta, x0)
    shape, b = delta.shape, delta.shape[0]
    e = _per_sample(eps, delta).reshape(b)
    v = delta.reshape(b, -1)
    if x0 is None or clip is None:
        n = v.norm(dim=1)
        factor = torch.where(n > e, e / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
        return (v * factor[:, None]).reshape(shape)
    lower, upper = (t.reshape(b, -1) for t in _bounds(delta, x0, clip))
    full = v.clamp(lower, upper)  # t = 1
    inside = full.square().sum(1) <= e.square()
    bound = torch.where(v > 0, upper, lower)  # the side v pushes against
    safe_v = torch.where(v != 0, v, torch.ones_like(v))
    brk = torch.where(v != 0, bound / safe_v, torch.full_like(v, math.inf))  # T_i >= 0
    brk, order = brk.sort(dim=1)
    v2 = v.square().gather(1, order)
    c2 = torch.where(v != 0, bound, torch.zeros_like(v)).square().gather(1, order)
    c_cum = c2.cumsum(1)  # saturated mass at t = T_j (inclusive)
    s_cum = v2.sum(1, keepdim=True) - v2.cumsum(1)  # unsaturated v^2 at t = T_j
    f = torch.where(brk < 1, brk.square() * s_cum + c_cum, torch.full_like(brk, math.inf))
    j = (f >= e.square()[:, None]).int().argmax(dim=1, keepdim=True)  # first crossing
    jm = (j - 1).clamp_min(0)
    first = j == 0
    c_prev = torch.where(first, torch.zeros_like(e[:, None]), c_cum.gather(1, jm))
    s_prev = torch.where(first, v2.sum(1, keepdim=True), s_cum.gather(1, jm))
    t = ((e.square()[:, None] - c_prev).clamp_min(0) / s_prev.clamp_min(torch.finfo(v.dtype).tiny)).sqrt()
    t = torch.where(inside[:, None], torch.ones_like(t), t.clamp(0, 1))
    return (t * v).clamp(lower, upper).reshape(shape)


def project_l1(delta, eps, *, x0=None, clip=None, upcast=None):
    """Exact Euclidean projection onto {||d||_1 <= eps} intersected with the box.

    KKT: d_i = clamp(soft(v_i, tau), a_i, b_i) (0 is in the box). With
    u_i = b_i if v_i > 0 else -a_i, the L1 norm is
    g(tau) = sum_i clip(|v_i| - tau, 0, u_i), piecewise linear and nonincreasing
    with breakpoints |v_i| - u_i and |v_i|. Sort the breakpoints, accumulate g
    at each (from the right), find the interval where g crosses eps and solve
    the linear piece. Without a box this is Duchi et al. 2008's sort-based
    projection (the eager baseline the fused kernels are measured against).
    """
    delta, x0 = _prep(upcast, delta, x0)
    shape, b = delta.shape, delta.shape[0]
    e = _per_sample(eps, delta).reshape(b, 1)
    v = delta.reshape(b, -1)
    lower, upper = (t.reshape(b, -1) for t in _bounds(delta, x0, clip))
    av = v.abs()
    u = torch.where(v > 0, upper, -lower).clamp_min(0)
    u = torch.where(v != 0, u, torch.zeros_like(u))
    # An infinite cap never saturates for tau >= 0: move its breakpoint to -1
    # (u = |v| + 1 keeps |v| - u = -1 consistent) so the sums stay finite.
    u = torch.where(torch.isinf(u), av + 1, u)
    inside = torch.minimum(av, u).sum(1, keepdim=True) <= e
    # Events when tau decreases past a breakpoint: at |v| a coordinate starts
    # moving (count +1, slope sum +|v|); at |v| - u it saturates (count -1,
    # sum -|v|, cap +u). A no-op event at tau = 0 makes g(0) a candidate, so
    # the crossing is always found among the breakpoints >= 0.
    zero = torch.zeros_like(av[:, :1])
    pts = torch.cat([av, av - u, zero], dim=1)
    d_cnt = torch.cat([torch.ones_like(av), -torch.ones_like(av), zero], dim=1)
    d_sum = torch.cat([av, -av, zero], dim=1)
    d_cap = torch.cat([torch.zeros_like(u), u, zero], dim=1)
    pts, order = pts.sort(dim=1, descending=True)
    cnt = d_cnt.gather(1, order).cumsum(1)
    ssum = d_sum.gather(1, order).cumsum(1)
    cap = d_cap.gather(1, order).cumsum(1)
    g = ssum - cnt * pts + cap  # g(pts_j): events at >= pts_j included
    valid = pts >= 0
    j = ((g >= e) & valid).int().argmax(dim=1, keepdim=True)
    jm = (j - 1).clamp_min(0)
    c_prev, s_prev, k_prev = cnt.gather(1, jm), ssum.gather(1, jm), cap.gather(1, jm)
    tau = (s_prev + k_prev - e) / c_prev.clamp_min(1)
    tau = torch.where(j == 0, pts[:, :1], tau)  # eps = 0: tau = max|v|, d = 0
    tau = torch.where(inside, torch.zeros_like(tau), tau.clamp_min(0))
    d = torch.sign(v) * (av - tau).clamp_min(0)
    return d.clamp(lower, upper).reshape(shape)
