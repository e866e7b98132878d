"""Projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models
Resistant to Adversarial Attacks") for the L-inf, L2 and L1 balls.

Each step ascends the loss and projects back onto {||x - x0||_p <= eps}
intersected with the image box, through the fused ops:

* linf: x <- clip(x0 + clamp(x + alpha * sign(g) - x0, -eps, eps))  (``fastadv.ops.linf_step``)
* l2:   x <- clip(x0 + P_eps(x + alpha * g / ||g||_2 - x0))           (``fastadv.ops.l2_step``)
* l1:   SLIDE's sparse step (Tramer & Boneh 2019) + exact L1 x box projection (``fastadv.ops.l1_step``)

With ``random_start=False`` and ``early_stop=False`` (the defaults of
torchattacks' ``PGD(random_start=False)``) the result equals torchattacks'
``PGD`` / ``PGDL2`` bit for bit on CPU float32 (L2: with the 'ref' backend;
the compiled L2 kernel sums the norm in another order and agrees to float32
rounding). ``early_stop=True`` freezes each sample at its first fooling
iterate and drops it from the batch: the same set of fooled samples as
without it, in less time when many samples fall early.

What ``early_stop`` changes in the returned images: a fooled sample comes
back as its FIRST fooling iterate, not the iterate after all ``steps``. It is
still inside the ball and the box and still fooled, but its loss is lower
and its perturbation usually smaller than the full run's (the remaining
steps would have kept ascending). Samples never fooled come back identical
to the full run. So robust accuracy is unchanged, but anything that uses the
adversarial images themselves (adversarial training, which wants the
highest-loss point; transfer attacks; perturbation statistics) gets other
images. That is why it is off by default (drop-in equality with
torchattacks' ``PGD``) and on in ``fastadv.evaluate``, where only "fooled or
not" counts.

Example::

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10)
    x_adv = atk(x, y)
"""
from __future__ import annotations

import torch

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import LOSSES, Attack, check_choice, check_eps, check_int

NORMS = ("linf", "l2", "l1")


def random_start(norm: str, x0: torch.Tensor, eps: torch.Tensor, clip, generator=None) -> torch.Tensor:
    """A uniformly random start in the eps-ball (torchattacks' constructions), clipped to the box.

    linf: x0 + U(-eps, eps) per coordinate; l2: x0 + r * eps * z / ||z||,
    z ~ N(0, I), r ~ U(0, 1) (torchattacks' PGDL2); l1: a Laplace direction
    scaled to radius r * eps, r ~ U(0, 1). eps: (B,) float32.
    """
    b = x0.shape[0]
    e = eps.reshape((b,) + (1,) * (x0.dim() - 1))
    if norm == "linf":
        d = (torch.rand(x0.shape, device=x0.device, generator=generator) * 2 - 1) * e
    else:
        if norm == "l2":
            z = torch.randn(x0.shape, device=x0.device, generator=generator)
            n = z.reshape(b, -1).norm(dim=1)
        else:
            # Laplace(0, 1) = random sign x Exp(1), drawn from the generator (not the global RNG)
            z = torch.empty(x0.shape, device=x0.device).exponential_(generator=generator)
            z = z * (torch.rand(x0.shape, device=x0.device, generator=generator) < 0.5).float().mul(2).sub(1)
            n = z.reshape(b, -1).abs().sum(1)
        r = torch.rand(b, device=x0.device, generator=generator)
        d = z * (r / n.clamp_min(1e-12)).reshape(e.shape) * e
    return (x0 + d).clamp(*clip)


class PGD(Attack):
    """PGD with norm 'linf' (default) | 'l2' | 'l1'.

    Args:
        model: maps (B, ...) images in [0, 1] to (B, K) logits.
        eps: radius (float >= 0 or (B,) tensor), default 8/255.
        alpha: step size, default 2/255.
        steps: K, default 10.
        norm: 'linf' | 'l2' | 'l1'.
        random_start: start uniformly in the ball (default True).
        restarts: random restarts, keeping per sample the worst case (default 1).
        loss: 'ce' (default) | 'cw' (margin) | 'dlr'.
        early_stop: freeze fooled samples and drop them from the batch (default False).
        sparsity: L1 only: fraction of coordinates left out of each step (default 0.95).
        eot_iter: gradients averaged per step (Expectation over Transformation, for
            randomized models; default 1 = plain PGD; see ``fastadv.attacks.engine``).
        compact_every, compile, cuda_graph: engine options (``fastadv.attacks.engine``).
        targeted, model_mode, autocast, channels_last, clip: see ``Attack``.
    Shapes: x (B, ...) float in clip, y (B,) int64 -> x_adv like x.
    """

    name = "PGD"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps: int = 10, *, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, loss: str = "ce", early_stop: bool = False,
                 sparsity: float = 0.95, compact_every: int | None = None, compile: bool = False,
                 cuda_graph: bool = False, eot_iter: int = 1, generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.alpha = check_eps("alpha", alpha)
        self.steps = check_int("steps", steps, 0)
        self.norm = check_choice("norm", norm, NORMS)
        self.random_start = bool(random_start)
        self.restarts = check_int("restarts", restarts, 1)
        self.loss = check_choice("loss", loss, LOSSES)
        self.early_stop = bool(early_stop)
        self.sparsity = float(sparsity)
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        if compact_every is not None:
            check_int("compact_every", compact_every, 1)
        self.compact_every = compact_every
        self.compile = bool(compile)
        self.cuda_graph = bool(cuda_graph)
        self.eot_iter = check_int("eot_iter", eot_iter, 1)
        self.generator = generator
        self.tau = 0

    def _step(self, x, g, s, t, per, logits):
        if self.norm == "linf":
            return ops.linf_step(x, s["x0"], g, s["alpha"], s["eps"], clip=self.clip)
        if self.norm == "l2":
            return ops.l2_step(x, s["x0"], g, s["alpha"], s["eps"], clip=self.clip)
        return ops.l1_step(x, s["x0"], g, s["alpha"], s["eps"], sparsity=self.sparsity, clip=self.clip)

    def start(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x0.clone()
        return random_start(self.norm, x0, eps, self.clip, self.generator)

    def perturb(self, x, y):
        b = x.shape[0]
        eps = engine._expand(self.eps, b, x.device)
        alpha = engine._expand(self.alpha, b, x.device)

        def once(idx, r):
            x0, ys, e, a = (x, y, eps, alpha) if idx is None else (x[idx], y[idx], eps[idx], alpha[idx])
            res = engine.run_loop(self, x0, ys, self.start(x0, e), self.steps, self._step, loss=self.loss,
                                  state={"eps": e, "alpha": a}, early_stop=self.early_stop, tau=self.tau,
                                  compact_every=self.compact_every, compile=self.compile, cuda_graph=self.cuda_graph,
                                  eot_iter=self.eot_iter)
            return res["x"]

        return engine.with_restarts(self, x, y, self.restarts, once, self.loss)


class PGDL2(PGD):
    """``PGD(norm='l2')`` with torchattacks' PGDL2 defaults (eps 1.0, alpha 0.2, 10 steps)."""

    def __init__(self, model, eps=1.0, alpha=0.2, steps: int = 10, **kwargs):
        super().__init__(model, eps, alpha, steps, norm="l2", **kwargs)
