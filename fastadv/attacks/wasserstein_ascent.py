"""The Wasserstein steepest-ascent step: the entropic conjugate problem of Wong, Schmidt & Kolter 2019.

Paper: Eric Wong, Frank R. Schmidt & J. Zico Kolter, "Wasserstein Adversarial Examples via Projected
Sinkhorn Iterations", ICML 2019; public code locuslab/projected_sinkhorn, ``conjugate_sinkhorn`` (called by
``pgd.attack`` with norm='wasserstein'). Where the L-inf step moves every pixel by alpha along the sign of
the gradient, this step moves *mass*: it solves, per image,

    z* = argmax_z  g^T z   subject to  W_C(x, z) <= a         (a: the step's radius)

with entropic regularization, for the normalized image x (mass 1) and the gradient g. With the plan
Pi (Pi 1 = x, z = Pi^T 1) and local transport (pixel i may send mass only to the k x k window N(i) around
it, cost c_ij = ||i - j||^p), the regularized problem

    min_Pi  -<Pi, 1 g^T> + (1/lam) sum_ij Pi_ij log Pi_ij   s.t.  Pi 1 = x,  <Pi, C> <= a

has the solution, for the multiplier psi >= 0 of the cost constraint (in units of 1/lam),

    Pi_ij = x_i softmax_{j in N(i)}( lam g_j - psi c_ij ),        z_j = sum_i Pi_ij,

so each pixel's mass is spread over its window, tilted toward large gradient and away from far pixels.
The row marginal is exact for any psi, so psi is the root of the one-dimensional, decreasing

    f(psi) = sum_i x_i E_{softmax_i}[c] - a,      f'(psi) = -sum_i x_i Var_{softmax_i}[c],

or psi = 0 when f(0) <= 0 (the step budget is not binding). We find it by Newton's method kept inside a
bracket (bisection when Newton leaves it), per image, to |f| <= tol * a. The reference code alternates
the alpha (row) update with one Newton step in psi (its Hessian the partial one, -<Pi, C^2>) and stops
batch-wide when its objective changes by < 1e-4; the fixed point is the same. Its version of the file in
the public repository calls an ``eval_z`` that it does not define (an earlier version defines
z = exp(-beta) * K exp(-alpha), the column marginal above), and it sets z = 0 for an image whose
gradient is zero on every window that holds mass; here an image whose gradient is zero everywhere is left
where it is (g^T z is then the same for every z: there is no ascent direction).

The result keeps the input's mass (z is multiplied back by it) and is >= 0; it may exceed the box's
upper bound, which the attack's ball-and-box projection that follows removes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["wasserstein_ascent_step", "window_costs"]


def window_costs(kernel_size: int, p: float, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """c_o = (dy^2 + dx^2)^(p/2) for the k*k offsets of a k x k window, row-major (F.unfold's order)."""
    r = kernel_size // 2
    d = torch.arange(-r, r + 1, dtype=torch.float64)
    c = (d[:, None] ** 2 + d[None, :] ** 2) ** (p / 2)
    return c.reshape(-1).to(dtype=dtype, device=device)


def _window_moments(score, mask, cost, x_unf, psi):
    """Per sample: sum_i x_i E[c], sum_i x_i Var[c], and the softmax P, for the tilt psi (B,)."""
    s = score - psi[:, None, None, None] * cost[None, None, :, None]
    s = s.masked_fill(~mask, -math.inf)
    prob = torch.softmax(s, dim=2)  # over the window offsets
    mean_c = (prob * cost[None, None, :, None]).sum(2, keepdim=True)  # (B, C, 1, HW), as x_unf
    mean_c2 = (prob * (cost ** 2)[None, None, :, None]).sum(2, keepdim=True)
    e = (x_unf * mean_c).flatten(1).sum(1)
    v = (x_unf * (mean_c2 - mean_c ** 2).clamp_min(0)).flatten(1).sum(1)
    return e, v, prob


def wasserstein_ascent_step(x: torch.Tensor, grad: torch.Tensor, radius, *, kernel_size: int = 5, p: float = 2.0,
                            reg: float = 1000.0, tol: float = 1e-4, max_iter: int = 100,
                            return_info: bool = False):
    """One Wasserstein steepest-ascent step from x along grad (see the module docstring).

    Args:
        x: (B, C, H, W) images, >= 0 (their mass is moved, not changed).
        grad: (B, C, H, W) the loss gradient at x (the ascent direction g).
        radius: the step's Wasserstein radius a, in the normalized-mass units of the attack's eps: a float or
            (B,) tensor, > 0.
        kernel_size: the transport window k (odd). p: the cost exponent.
        reg: lam, the entropic weight's inverse (the reference passes its projection's regularization, 1000
            on MNIST); g enters as lam * g, so lam sets how sharply mass goes to the largest gradient.
        tol: |f(psi)| <= tol * a per sample. max_iter: Newton/bisection iterations per sample; a sample
            that has not converged by then gets the bracket's feasible end (its step costs < a).
        return_info: also return a dict with 'psi' (B,), 'cost' (B,) the step plan's transport cost
            (normalized mass), 'iters' (int).
    Returns:
        z (B, C, H, W) in x's dtype, z.sum() == x.sum() per sample (to rounding), z >= 0.
    """
    if x.dim() != 4 or grad.shape != x.shape:
        raise ValueError(f"x and grad must be (B, C, H, W) of one shape, got {tuple(x.shape)} and {tuple(grad.shape)}")
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be a finite number > 0, got {reg!r}")
    bsz, ch, h, w = x.shape
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    xd, gd = x.to(cd), grad.to(cd)
    a = torch.as_tensor(radius, dtype=cd, device=x.device).expand(bsz).clone()
    if not bool((a > 0).all()):
        raise ValueError("radius must be > 0")
    mass = xd.flatten(1).sum(1)
    xn = xd / mass.clamp_min(torch.finfo(cd).tiny)[:, None, None, None]
    k, pad = kernel_size, kernel_size // 2
    cost = window_costs(k, p, dtype=cd, device=x.device)

    def unf(t):  # (B, C, H, W) -> (B, C, k*k, HW): entry [.., o, i] = t at pixel i + offset o
        return F.unfold(t.reshape(bsz * ch, 1, h, w), k, padding=pad).reshape(bsz, ch, k * k, h * w)

    # pixel i's own mass (B, C, 1, HW); window validity (out-of-image offsets excluded), from a ones image
    x_unf = xn.reshape(bsz, ch, 1, h * w)
    mask = F.unfold(torch.ones(1, 1, h, w, dtype=cd, device=x.device), k, padding=pad).reshape(1, 1, k * k, h * w) > 0
    score = reg * unf(gd)

    lo = torch.zeros(bsz, dtype=cd, device=x.device)
    e0, v0, _ = _window_moments(score, mask, cost, x_unf, lo)
    psi = lo.clone()
    binding = e0 > a * (1 + tol)
    hi = torch.full_like(psi, math.inf)
    f, fp = e0 - a, -v0
    iters = 0
    for iters in range(1, max_iter + 1):
        todo = binding & (f.abs() > tol * a)
        if not bool(todo.any()):
            break
        # bracket: f(lo) > 0 >= f(hi). Newton from psi while it stays inside; else bisect, or double psi while
        # no upper end is known (a flat f, as in float32 at a large lam * g, has fp = 0: no Newton step)
        lo = torch.where(todo & (f > 0), psi, lo)
        hi = torch.where(todo & (f <= 0), psi, hi)
        newton = psi - f / fp.clamp(max=-torch.finfo(cd).tiny)
        inside = (fp < 0) & (newton > lo) & (newton < hi)
        other = torch.where(torch.isfinite(hi), 0.5 * (lo + hi), 2 * lo + 1)
        psi = torch.where(todo, torch.where(inside, newton, other), psi)
        e, v, _ = _window_moments(score, mask, cost, x_unf, psi)
        f, fp = torch.where(todo, e - a, f), torch.where(todo, -v, fp)
    # not converged (a cost that jumps over a): take the feasible end of the bracket, so the step never
    # costs more than its radius
    over = binding & (f > tol * a) & torch.isfinite(hi)
    psi = torch.where(over, hi, psi)
    e, _, prob = _window_moments(score, mask, cost, x_unf, psi)
    plan = (x_unf * prob).reshape(bsz * ch, k * k, h * w)
    z = F.fold(plan, (h, w), k, padding=pad).reshape(bsz, ch, h, w) * mass[:, None, None, None]
    # a gradient that is zero everywhere gives no direction (g^T z is the same for every z): leave the image
    flat = (gd.abs().flatten(1).amax(1) == 0) | (mass <= 0)
    z = torch.where(flat[:, None, None, None], xd, z).to(x.dtype)
    if return_info:
        return z, {"psi": psi, "cost": torch.where(flat, torch.zeros_like(e), e), "iters": iters}
    return z
