"""SPSA (Uesato et al. 2018, "Adversarial Risk and the Dangers of Evaluating
Against Weak Attacks"): a gradient-free L-inf attack, the standard check
for gradient masking (it never calls backward, so zeroed or shattered
gradients do not stop it).

Per step and sample, the gradient of the margin loss
L(x) = z_y(x) - max_{j != y} z_j(x) (to minimize; targeted: max_{j!=t} z_j - z_t)
is estimated from ``samples`` Rademacher directions v (antithetic pairs):

    g ~= mean_v [ (L(x + delta v) - L(x - delta v)) / (2 delta) ] v,

then Adam (lr, betas 0.9/0.999) descends L and the iterate is projected onto
the eps-ball intersected with [0, 1]. All 2 * samples perturbed copies of all
active samples are forwarded in chunks of ``max_batch`` images, without
gradient. A sample leaves the batch once L < 0 (fooled), as in cleverhans'
``early_stop_loss_threshold=0``.

Example::

    x_adv = SPSA(model, eps=0.3, steps=100, samples=128)(x, y)
"""
from __future__ import annotations

import torch

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack, check_eps, check_int, margin


class SPSA(Attack):
    """Args: eps (default 8/255), steps (100), samples (128 directions per step, even),
    delta (0.01, finite-difference size), lr (0.01, Adam), max_batch (images
    per forward, 4096); others as ``Attack``."""

    name = "SPSA"

    def __init__(self, model, eps=8 / 255, steps: int = 100, *, samples: int = 128, delta: float = 0.01,
                 lr: float = 0.01, max_batch: int = 4096, generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.steps = check_int("steps", steps, 0)
        self.samples = check_int("samples", samples, 2)
        if self.samples % 2:
            raise ValueError(f"samples must be even (antithetic pairs), got {samples}")
        self.delta = float(check_eps("delta", delta))
        self.lr = float(check_eps("lr", lr))
        self.max_batch = check_int("max_batch", max_batch, 1)
        self.generator = generator

    @torch.no_grad()
    def _loss(self, x, y):
        outs = [self.logits(c) for c in x.split(self.max_batch)]
        m = -margin(torch.cat(outs), y)  # z_y - max_other: < 0 iff fooled (untargeted)
        return -m if self.targeted else m

    @torch.no_grad()
    def perturb(self, x0, y):
        b = x0.shape[0]
        eps = engine._expand(self.eps, b, x0.device)
        out = x0.clone()
        x = x0.clone()
        idx = torch.arange(b, device=x0.device)
        m = torch.zeros_like(x)
        v2 = torch.zeros_like(x)
        half = self.samples // 2
        xs, ys, es = x0, y, eps
        for t in range(self.steps):
            loss = self._loss(x, ys)
            done = loss < 0
            if bool(done.any()):
                out[idx[done]] = x[done]
                keep = ~done
                if not bool(keep.any()):
                    return out
                x, xs, ys, es, idx, m, v2 = (a[keep] for a in (x, xs, ys, es, idx, m, v2))
            n = x.shape[0]
            v = torch.randint(0, 2, (n, half) + x.shape[1:], device=x.device, generator=self.generator)
            v = v.to(x.dtype).mul_(2).sub_(1)
            xp = (x[:, None] + self.delta * v).reshape((-1,) + x.shape[1:])
            xm = (x[:, None] - self.delta * v).reshape((-1,) + x.shape[1:])
            yy = ys.repeat_interleave(half)
            diff = (self._loss(xp, yy) - self._loss(xm, yy)).reshape((n, half) + (1,) * (x.dim() - 1))
            g = (diff / (2 * self.delta) * v).mean(1)
            # Adam on the estimate (descend L).
            m.mul_(0.9).add_(g, alpha=0.1)
            v2.mul_(0.999).addcmul_(g, g, value=0.001)
            mhat = m / (1 - 0.9 ** (t + 1))
            vhat = v2 / (1 - 0.999 ** (t + 1))
            x = x - self.lr * mhat / (vhat.sqrt() + 1e-8)
            x = xs + ops.project_linf(x - xs, es, x0=xs, clip=self.clip)
        out[idx] = x
        return out
