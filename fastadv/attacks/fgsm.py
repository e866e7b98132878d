"""Single-step attacks.

* ``FGSM`` (Goodfellow et al. 2015, "Explaining and Harnessing Adversarial
  Examples"): x_adv = clip(x + eps * sign(grad_x L(f(x), y))).
* ``RFGSM`` (Tramer et al. 2018, "Ensemble Adversarial Training: Attacks and
  Defenses"): x' = clip(x + alpha * sign(N(0, I))), then
  x_adv = clip(x' + (eps - alpha) * sign(grad_x' L)); an L-inf attack of radius eps.

Example::

    x_adv = FGSM(model, eps=8/255)(x, y)
"""
from __future__ import annotations

import torch

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import LOSSES, Attack, check_choice, check_eps


class FGSM(Attack):
    """FGSM. Args: eps (float >= 0 or (B,) tensor, default 8/255), loss 'ce' | 'cw' | 'dlr'; others as ``Attack``."""

    name = "FGSM"

    def __init__(self, model, eps=8 / 255, *, loss: str = "ce", **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.loss = check_choice("loss", loss, LOSSES)

    def perturb(self, x, y):
        eps = engine._expand(self.eps, x.shape[0], x.device)
        _, g, _ = self.input_grad(x, y, self.loss)
        return ops.linf_step(x, x, g, eps, eps, clip=self.clip)


class RFGSM(Attack):
    """R+FGSM. Args: eps (default 8/255), alpha (random step, default 4/255, <= eps), loss; others as ``Attack``."""

    name = "RFGSM"

    def __init__(self, model, eps=8 / 255, alpha=4 / 255, *, loss: str = "ce",
                 generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.alpha = check_eps("alpha", alpha)
        if not isinstance(self.eps, torch.Tensor) and not isinstance(self.alpha, torch.Tensor) and self.alpha > self.eps:
            raise ValueError(f"alpha must be <= eps, got alpha={alpha} > eps={eps}")
        self.loss = check_choice("loss", loss, LOSSES)
        self.generator = generator

    def perturb(self, x, y):
        b = x.shape[0]
        eps = engine._expand(self.eps, b, x.device)
        alpha = engine._expand(self.alpha, b, x.device)
        noise = torch.randn(x.shape, device=x.device, generator=self.generator)
        x1 = ops.linf_step(x, x, noise, alpha, eps, clip=self.clip)
        _, g, _ = self.input_grad(x1, y, self.loss)
        return ops.linf_step(x1, x, g, (eps - alpha).clamp_min(0), eps, clip=self.clip)
