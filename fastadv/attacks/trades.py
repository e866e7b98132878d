"""The inner maximization of TRADES (Zhang et al. 2019, "Theoretically
Principled Trade-off between Robustness and Accuracy").

Maximizes KL(p(x) || p(x')) = sum_k p_k(x) (log p_k(x) - log p_k(x')) over
x' in the eps-ball around x (L-inf or L2) intersected with the box, starting
from x' = x + 0.001 * N(0, I), with the PGD steps of ``fastadv.ops``. p(x) is
the clean softmax, computed once without gradient. As in the paper's code the
KL is summed over the batch, so the step does not depend on the batch size.

Example::

    x_adv = TRADESAttack(model, eps=8/255, alpha=2/255, steps=10)(x, y)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack, check_choice, check_eps, check_int


def trades_kl(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(p_clean || softmax(logits_adv)), shape (B,)."""
    logq = F.log_softmax(logits_adv, dim=1)
    return F.kl_div(logq, p_clean, reduction="none").sum(1)


class TRADESAttack(Attack):
    """Args: eps (default 8/255), alpha (2/255), steps (10), norm 'linf' | 'l2',
    init_std (std of the Gaussian start, 0.001); others as ``Attack``.
    ``y`` is only validated: the objective uses the clean prediction."""

    name = "TRADESAttack"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps: int = 10, *, norm: str = "linf",
                 init_std: float = 0.001, generator: torch.Generator | None = None, compile: bool = False,
                 cuda_graph: bool = False, **kwargs):
        super().__init__(model, **kwargs)
        if self.targeted:
            raise ValueError("targeted must be False: TRADES' KL objective has no target")
        self.eps = check_eps("eps", eps)
        self.alpha = check_eps("alpha", alpha)
        self.steps = check_int("steps", steps, 0)
        self.norm = check_choice("norm", norm, ("linf", "l2"))
        self.init_std = float(check_eps("init_std", init_std))
        self.generator = generator
        self.compile, self.cuda_graph = bool(compile), bool(cuda_graph)

    @staticmethod
    def _loss(logits, s):
        per = trades_kl(logits, s["p_clean"])
        return per.sum(), per

    def _step(self, x, g, s, t, per, logits):
        fn = ops.linf_step if self.norm == "linf" else ops.l2_step
        return fn(x, s["x0"], g, s["alpha"], s["eps"], clip=self.clip)

    def perturb(self, x, y):
        b = x.shape[0]
        with torch.no_grad():
            p_clean = F.softmax(self.logits(x), dim=1)
        eps = engine._expand(self.eps, b, x.device)
        alpha = engine._expand(self.alpha, b, x.device)
        noise = torch.randn(x.shape, device=x.device, generator=self.generator) * self.init_std
        # Start inside the ball and the box (the paper's code clamps to the box only).
        start = x + ops.project_linf(noise, eps, x0=x, clip=self.clip) if self.norm == "linf" else \
            x + ops.project_l2(noise, eps, x0=x, clip=self.clip)
        res = engine.run_loop(self, x, y, start, self.steps, self._step, loss=self._loss,
                              state={"eps": eps, "alpha": alpha, "p_clean": p_clean}, compile=self.compile,
                              cuda_graph=self.cuda_graph)
        return res["x"]
