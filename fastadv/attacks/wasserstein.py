"""Wasserstein PGD: PGD whose steps are projected onto a local Wasserstein ball.

Wong, Schmidt & Kolter 2019, "Wasserstein Adversarial Examples via Projected
Sinkhorn Iterations" (ICML). The perturbation moves pixel mass a short
distance (within a channel, inside a k x k window, at cost ||(di, dj)||^p)
instead of changing every pixel a little.
"""
from __future__ import annotations

import math

import torch

from fastadv.attacks.base import Attack, check_eps, check_int
from fastadv.ot import wasserstein_project


class WassersteinPGD(Attack):
    """PGD in the L-inf geometry, each step projected onto a Wasserstein ball whose radius grows.

    Per sample, following the paper's attack (their ``pgd.attack`` with
    norm='linfinity', ball='wasserstein'):

        x_{t+1} = clip_[0,1]( P_{W(x, r_t)}( x_t + alpha * sign(grad_x loss(x_t, y)) ) )

    where P is ``fastadv.ops.wasserstein_project`` (projected Sinkhorn) and the
    radius r starts at ``eps_growth[0]`` and is multiplied by ``eps_growth[1]``
    every ``eps_growth[2]`` steps, capped at ``eps``. A sample stops as soon as
    it is misclassified (its images then cost nothing: the batch is compacted
    to the samples still running), and the radius of the ball its adversarial
    image was projected onto is recorded.

    Step size and attack strength. The projection sees the step through
    lam * w (w = image / its mass), so a step of alpha changes the target's
    log mass ratio by lam * alpha / mass: about 1 for the paper's MNIST
    setting (alpha 0.1, lam 1000, digit mass ~100), which is below the
    entropic blur of the projection (its z deviates from w by a few / lam in
    normalized units, i.e. ~0.1-0.3 in pixel units at lam 1000). The iterates
    then settle on a fixed point x = clip(P(x + alpha sign(grad))) early.
    Measured (this 2-core CPU, 64 MNIST test images, the small CNN of
    tests/test_wasserstein.py at 89% clean, radius 1.0, 5 x 5): alpha 0.1
    plateaus at 36% (lam 3000) / 75% (lam 1000, 16 images), a radius grown
    from 0.1 lands on the same plateau; alpha 1.0 with lam 3000 reaches 4.7%
    in 60 steps (15.6% at lam 1000), alpha 0.5 7.8% in 100 steps. Our
    projection matches the public reference code's (``projected_sinkhorn``,
    run to convergence) to 1e-3 relative in z and 1e-4 in psi on MNIST
    iterates, and this loop is theirs (``pgd.attack``: sign step, projection
    of the stepped image around the clean one, both divided by the clean
    mass, clamp), so the gap to the paper's 4% at alpha 0.1 is not the
    algorithm. The price of a large alpha is the [0, 1] clamp after the
    projection (as in their code): mass pushed above 1 is cut, up to 17% of
    the mass at alpha 1.0 (2% at alpha 0.1), so the clamped image is only
    approximately in the ball.

    Args:
        model: maps images in [0, 1] to logits.
        eps: largest radius (normalized mass x pixel distance^p). The paper
            reports MNIST at 1.0 and CIFAR-10 at 0.1 (5 x 5 windows).
        alpha: L-inf step size (default 0.1, the paper's MNIST setting; 0.5-1.0 is
            much stronger, see above).
        steps: PGD steps (default 200).
        kernel_size: transport window (odd, default 5). p: cost exponent (2).
        reg: the projection's lam (default 3000).
        eps_growth: (initial radius, factor, every k steps), default (0.001, 1.17, 10).
        sinkhorn_max_iter, sinkhorn_tol: the projection's per-sample cap and tolerance.
        model_mode, targeted, clip, ...: see ``fastadv.attacks.base.Attack``.

    After a call, ``atk.last_radius`` is a (B,) float tensor: the radius at
    which each sample was first fooled, 0 if the clean image was already
    misclassified, +inf if the attack failed (its returned image is then the
    last iterate, inside the ball of radius ``eps``); ``atk.last_fooled`` is
    the (B,) bool success mask.

    Example:
        >>> atk = WassersteinPGD(model, eps=1.0, alpha=0.1, steps=200, reg=1000.0)
        >>> x_adv = atk(x, y); atk.last_radius
    """

    name = "WassersteinPGD"

    def __init__(self, model, eps=1.0, alpha=0.1, steps=200, kernel_size=5, p=2, reg=3000.0,
                 eps_growth=(0.001, 1.17, 10), sinkhorn_max_iter=50, sinkhorn_tol=1e-4, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.alpha = check_eps("alpha", alpha)
        self.steps = check_int("steps", steps, 0)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ValueError(f"p must be a number > 0, got {p!r}")
        self.p = float(p)
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (reg > 0 and math.isfinite(reg)):
            raise ValueError(f"reg must be a finite number > 0, got {reg!r}")
        self.reg = float(reg)
        if not (isinstance(eps_growth, (tuple, list)) and len(eps_growth) == 3):
            raise ValueError(f"eps_growth must be (initial, factor, every), got {eps_growth!r}")
        r0, fac, every = eps_growth
        r0 = check_eps("eps_growth[0]", r0)
        if isinstance(fac, bool) or not isinstance(fac, (int, float)) or not fac >= 1:
            raise ValueError(f"eps_growth[1] (the growth factor) must be >= 1, got {fac!r}")
        self.eps_growth = (r0, float(fac), check_int("eps_growth[2]", every, 1))
        self.sinkhorn_max_iter = check_int("sinkhorn_max_iter", sinkhorn_max_iter, 1)
        self.sinkhorn_tol = check_eps("sinkhorn_tol", sinkhorn_tol)
        self.last_radius: torch.Tensor | None = None
        self.last_fooled: torch.Tensor | None = None

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bsz = x.shape[0]
        lo, hi = self.clip
        x_adv = x.clone()
        radius = torch.full((bsz,), math.inf, device=x.device)
        r0, fac, every = self.eps_growth
        cur = torch.full((bsz,), min(r0, self.eps), device=x.device)  # radius used for x_adv
        used = torch.zeros(bsz, device=x.device)  # radius of the ball x_adv lies in
        # an all-zero image has no mass to move: it cannot be attacked here
        movable = x.reshape(bsz, -1).sum(1) > 0
        active = torch.arange(bsz, device=x.device)
        for t in range(self.steps + 1):
            if active.numel() == 0:
                break
            xa = x_adv[active]
            ya = y[active]
            _, grad, logits = self.input_grad(xa, ya)
            fooled = self.fooled(logits, ya)
            if fooled.any():
                done = active[fooled]
                radius[done] = used[done]
            keep = ~fooled & movable[active]
            active, xa, grad = active[keep], xa[keep], grad[keep]
            if t == self.steps or active.numel() == 0:
                break
            with torch.no_grad():
                step = (xa + self.alpha * grad.sign()).clamp(lo - self.alpha, hi + self.alpha)
                z = wasserstein_project(step, x[active], cur[active], kernel_size=self.kernel_size, p=self.p,
                                        reg=self.reg, max_iter=self.sinkhorn_max_iter, tol=self.sinkhorn_tol)
                x_adv[active] = z.clamp(lo, hi)
                used[active] = cur[active]
                if (t + 1) % every == 0:
                    cur[active] = (cur[active] * fac).clamp(max=self.eps)
        self.last_radius = radius
        self.last_fooled = torch.isfinite(radius)
        return x_adv
