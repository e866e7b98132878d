"""Speed baselines for the L-inf/L2 steps and the boxed L2 projection (issue 10).

A speed claim counts only against what a user would otherwise run, and that
is not fastadv.reference.lp: the reference is written for clarity and
robustness (NaN gradients zeroed, per-sample eps broadcast, an exact sorted
projection), so it does more work than the few lines a user types. These are
those few lines, in eager PyTorch; ``fastadv bench ops`` also times
``torch.compile(fn, dynamic=False)`` of the two steps.

* ``linf_step_plain``: the PGD L-inf step as written in Madry et al.'s code
  and advertorch, ``min(max(x + alpha sign(g), x0 - eps), x0 + eps)``, then
  the [0, 1] clamp. Same numbers as the reference up to float32 rounding
  (the clamp is applied to x rather than to x - x0).
* ``l2_step_plain``: torchattacks' PGDL2 step (normalize g per sample with
  +1e-10, step, rescale the perturbation by min(eps / ||delta||, 1), clamp).
* ``project_l2_then_clamp``: the radial projection onto the L2 ball, then a
  clamp into the box. NOT the projection onto the ball intersected with the
  box (the clamp can waste budget, so a closer feasible point exists when the
  box is active); the benchmark labels it "project-then-clamp".
* ``project_l2_bisect``: the exact projection onto the ball intersected with
  the box, d(t) = clamp(t v, lo - x0, hi - x0), found by an eager bisection
  on the KKT multiplier t = 1 / (1 + mu) in [eps / ||v||, 1] (||d(t)||
  increases with t), vectorized over samples: 30 iterations shrink the
  bracket by 2**-30, below float32 resolution of t.

All take and return the same tensors as the fastadv op they stand beside
(the projections return the projected perturbation); tests/test_bench_baselines.py
checks each against the reference.
"""
from __future__ import annotations

import torch

BISECT_ITERS = 30


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) tensor shaped to broadcast against ``like`` (B, ...)."""
    return t.view(-1, *([1] * (like.dim() - 1)))


def linf_step_plain(x, x0, g, alpha: float, eps: float):
    return torch.min(torch.max(x + alpha * g.sign(), x0 - eps), x0 + eps).clamp(0, 1)


def l2_step_plain(x, x0, g, alpha: float, eps: float):
    b = x.shape[0]
    gnorm = torch.norm(g.reshape(b, -1), p=2, dim=1) + 1e-10
    adv = x + alpha * (g / _col(gnorm, g))
    delta = adv - x0
    dnorm = torch.norm(delta.reshape(b, -1), p=2, dim=1)
    factor = torch.min(eps / dnorm, torch.ones_like(dnorm))
    return torch.clamp(x0 + delta * _col(factor, delta), min=0, max=1)


def project_l2_then_clamp(delta, eps: float, x0, lo: float = 0.0, hi: float = 1.0):
    """Radial L2 projection, then the box: feasible, not the exact projection."""
    b = delta.shape[0]
    n = torch.norm(delta.reshape(b, -1), p=2, dim=1)
    factor = torch.min(eps / n, torch.ones_like(n))
    return (delta * _col(factor, delta)).clamp(lo - x0, hi - x0)


def project_l2_bisect(delta, eps: float, x0, lo: float = 0.0, hi: float = 1.0, iters: int = BISECT_ITERS):
    """Exact projection onto {||d||_2 <= eps} and {lo <= x0 + d <= hi} by bisection on t."""
    b = delta.shape[0]
    v = delta.reshape(b, -1)
    lower = (lo - x0).reshape(b, -1)
    upper = (hi - x0).reshape(b, -1)
    vnorm = torch.linalg.vector_norm(v, dim=1)
    # clamp(t v) has norm <= t ||v||, so t = eps / ||v|| is inside the ball.
    t_lo = (eps / vnorm.clamp_min(torch.finfo(v.dtype).tiny)).clamp_max(1.0)
    t_hi = torch.ones_like(t_lo)
    buf = torch.empty_like(v)  # one scratch row-block for all iterations, not one allocation each
    for _ in range(iters):
        t = 0.5 * (t_lo + t_hi)
        out = torch.linalg.vector_norm(torch.mul(v, t[:, None], out=buf).clamp_(lower, upper), dim=1) > eps
        t_hi = torch.where(out, t, t_hi)
        t_lo = torch.where(out, t_lo, t)
    inside = torch.linalg.vector_norm(v.clamp(lower, upper), dim=1) <= eps
    t = torch.where(inside, torch.ones_like(t_lo), t_lo)
    return (v * t[:, None]).clamp_(lower, upper).reshape(delta.shape)
