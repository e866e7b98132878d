"""FOSC-stopped L-inf PGD: the inner maximization of dynamic adversarial training.

Wang, Ma, Bailey, Yi, Zhou & Gu, "On the Convergence and Robustness of
Adversarial Training", ICML 2019; reference code YisenWang/dynamic_adv_training
(``LinfPGDAttack.perturb`` in pgd_attack.py). Each sample runs signed PGD
steps until its First-Order Stationary Condition

    c(x^t) = eps * ||g_t||_1 - <x^t - x^o, g_t>,   g_t = grad_x CE(f(x^t), y)

(per sample, the gradient of the sample's own, unaveraged cross-entropy, as
``fastadv.metrics.fosc``) falls to the criterion ``c``. As in the reference:

* step 0 (from the start x^0) is always taken;
* before step t >= 1 the FOSC of the current iterate x^t is computed from the
  gradient that also drives the step (no extra forward or backward), and the
  sample moves only if c(x^t) > c; the test is redone at every step (the
  reference's ``control_indicator``). With the model in eval mode (the default,
  as the reference's Keras attack, which runs in inference mode) an iterate
  that did not move has the same gradient and FOSC at the next step, so a
  sample that stops stays stopped: it stops at the first t >= 1 with
  c(x^t) <= c and has taken t steps (``steps_taken``). With batch norm in
  train mode the batch statistics change as other samples move, and a
  stopped sample can resume, exactly as in the reference;
* steps: x <- clip_[0,1](x0 + clamp(x + alpha * sign(g) - x0, -eps, eps))
  (``fastadv.ops.linf_step``; the reference clips to the ball, then the box).

With the model in eval mode (the default) a stopped sample leaves the batch:
the engine's compaction (``fastadv.attacks.engine.run_loop(stop=...)``)
takes the FOSC test as its stop criterion, so only moving samples are
forwarded; the result is bitwise that of the masked loop (tested). In train
mode, where a stopped sample can resume, the stop is a per-sample mask
(``torch.where``) and every sample rides along. Neither path syncs the host
inside the loop, except the compaction decision itself.

Deliberate differences from the reference:

* ``origin``: the paper defines the FOSC with x^o = x0, the clean point
  (the centre of the ball, which is what makes c >= 0 and c = 0 exactly at
  stationary points); the reference code takes x^o = the random start
  (``original_batch_x`` is copied after the uniform noise is added), where
  the value can be negative. ``origin='clean'`` (default) follows the paper
  and ``fastadv.metrics.fosc``; ``origin='start'`` the code.
* the uniform random start is clipped to the image box before the first
  gradient (the reference evaluates the first gradient at the unclipped
  start and clips after the first step);
* the loss is CE of the logits; the reference's is -log(softmax + 1e-20).

Example::

    atk = FOSCPGD(model, eps=8/255, alpha=2/255, steps=10, c=0.3)
    x_adv = atk(x, y)
    atk.steps_taken      # (B,) int32, steps each sample took, in [1, steps]
"""
from __future__ import annotations

import torch

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack, check_choice, check_eps, check_int

__all__ = ["FOSCPGD", "fosc_value"]


def fosc_value(x: torch.Tensor, origin: torch.Tensor, grad: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """eps * ||g||_1 - <x - origin, g> per sample, (B,) float32 (the math of ``fastadv.metrics.fosc``,
    from a gradient already at hand). x, origin, grad: (B, ...); eps: (B,)."""
    b = x.shape[0]
    g = grad.reshape(b, -1)
    d = (x - origin).reshape(b, -1)
    return eps * g.abs().sum(1) - (d * g).sum(1)


class FOSCPGD(Attack):
    """L-inf PGD whose samples stop once FOSC <= c (see the module docstring).

    Args:
        model: maps (B, ...) images in [0, 1] to (B, K) logits.
        eps: L-inf radius (float or (B,) tensor), default 8/255 (the code's 0.031).
        alpha: step size, default eps / 4 (the code's ``eps_iter=epsilon/4``).
        steps: K, default 10 (the code's ``nb_iter``).
        c: the FOSC criterion (float >= 0 or (B,) tensor), default 0.5 (the schedule's c_max).
        random_start: uniform start in the ball (default True, as the code).
        origin: 'clean' (x^o = x0, the paper; default) | 'start' (x^o = the start, the code).
        targeted must be False (the criterion is the untargeted CE's); model_mode
        defaults to 'eval'; others as ``Attack``.
    After a call, ``steps_taken`` holds the (B,) int32 steps each sample took and
    ``last_fosc`` the (B,) FOSC of the iterate before the last step (where the final test ran).
    """

    name = "FOSCPGD"

    def __init__(self, model, eps=8 / 255, alpha=None, steps: int = 10, *, c=0.5, random_start: bool = True,
                 origin: str = "clean", generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        if self.targeted:
            raise ValueError("targeted must be False: the FOSC criterion is that of the untargeted cross-entropy")
        self.eps = check_eps("eps", eps)
        self.alpha = check_eps("alpha", alpha, allow_none=True)
        self.steps = check_int("steps", steps, 0)
        self.c = check_eps("c", c)
        self.random_start = bool(random_start)
        self.origin = check_choice("origin", origin, ("clean", "start"))
        self.generator = generator
        self.steps_taken: torch.Tensor | None = None
        self.last_fosc: torch.Tensor | None = None

    @staticmethod
    def _ce_sum(logits, s):
        # per-sample CE summed over the batch: each sample's gradient is its own, unscaled by 1/B
        # (the reference differentiates the vector of per-sample losses; the FOSC depends on the scale)
        per = torch.nn.functional.cross_entropy(logits, s["y"], reduction="none")
        return per.sum(), per

    def _step(self, x, g, s, t, per, logits):
        f = fosc_value(x, s["origin"], g, s["eps"])
        s["fosc"] = f
        if t == 0:
            move = torch.ones_like(f, dtype=torch.bool)  # the reference's step 0 is unconditional
        else:
            move = f > s["c"]
        s["steps"] = s["steps"] + move.to(torch.int32)
        x_new = ops.linf_step(x, s["x0"], g, s["alpha"], s["eps"], clip=self.clip)
        return torch.where(move.reshape((-1,) + (1,) * (x.dim() - 1)), x_new, x)

    @staticmethod
    def _stop(x, g, s, t, logits):
        # the criterion _step applies (t >= 1 and FOSC <= c), evaluated on the same gradient
        f = fosc_value(x, s["origin"], g, s["eps"])
        return (f <= s["c"]) & (t >= 1)

    def perturb(self, x, y):
        from fastadv.attacks.pgd import random_start

        b = x.shape[0]
        eps = engine._expand(self.eps, b, x.device)
        alpha = engine._expand(eps / 4 if self.alpha is None else self.alpha, b, x.device)
        c = engine._expand(self.c, b, x.device)
        x1 = random_start("linf", x, eps, self.clip, self.generator) if self.random_start else x.clone()
        state = {"eps": eps, "alpha": alpha, "c": c, "origin": x if self.origin == "clean" else x1,
                 "steps": torch.zeros(b, dtype=torch.int32, device=x.device),
                 "fosc": torch.zeros(b, dtype=torch.float32, device=x.device)}
        # compaction needs a final stop: true in eval mode (a frozen iterate keeps its gradient), not with
        # batch statistics, where other samples' moves change a stopped sample's FOSC
        compact = self.model_mode == "eval"
        res = engine.run_loop(self, x, y, x1, self.steps, self._step, loss=self._ce_sum, state=state,
                              early_stop=compact, stop=self._stop if compact else None)
        self.steps_taken, self.last_fosc = res["steps"], res["fosc"]
        return res["x"]
