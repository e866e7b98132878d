"""TRADES (Zhang et al. 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadv.train.methods.base import Method, StepOutput, set_attack_settings, tracks_running_stats


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """KL(softmax(clean) || softmax(adv)), summed over classes, mean over the batch (TRADES' 'batchmean':
    ``KLDivLoss(size_average=False)(...) / batch_size`` in the reference trades_loss)."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


class TRADES(Method):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x')), x' = argmax_{||x'-x||_inf <= eps} KL(f(x) || f(x')).

    Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled
    Trade-off between Robustness and Accuracy", ICML 2019. As the reference
    ``trades_loss`` (yaodongyu/TRADES, trades.py): the inner maximization
    (``fastadv.attacks.TRADESAttack``) starts at x + 0.001 * N(0, I) and
    ascends the summed KL with signed L-inf steps, batch norm in eval mode;
    then, in train mode, separate forwards of x and x' give
    CE(f(x), y) + beta * KL_batchmean. The reference calls ``model(x_natural)``
    a second time for the KL target: same logits and gradient as the first
    (no dropout in its networks), but one more batch-norm running-average
    update, which we repeat (without autograd) when the model has batch norm
    in train mode, so the running statistics equal the reference's.

    ``beta = 0`` is natural training exactly: no attack, one clean forward.

    Defaults: the paper's CIFAR-10 setting, beta = 6, eps = 8/255 (the code's
    0.031), alpha = 0.007, 10 steps. MNIST (the paper's 99.48% / 96.07% row):
    beta = 1/lambda = 6, eps 0.3, alpha 0.01, 40 steps (the official MNIST
    script defaults to beta 1).
    """

    name = "trades"
    attack_mode = "eval"

    def __init__(self, eps: float = 8 / 255, alpha: float = 0.007, steps: int = 10, *, beta: float = 6.0,
                 attack_mode: str = "eval"):
        super().__init__()
        set_attack_settings(self, eps, alpha, steps, beta=beta, attack_mode=attack_mode)

    def inner(self, x, y):
        from fastadv.attacks import TRADESAttack

        return TRADESAttack(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                            **self.attack_kwargs())(x, y)

    def perturb(self, x, y):
        """The adversarial batch x' (``inner``; the name AWP and PGDAT share)."""
        return self.inner(x, y)

    def loss(self, x, y):
        if self.beta == 0:
            logits = self.forward(x)
            return StepOutput(F.cross_entropy(logits, y), logits, y)
        return self.loss_from_adv(x, self.inner(x, y), y)

    def loss_from_adv(self, x, x_adv, y):
        """The outer loss for a given adversarial batch (AWP takes its weight perturbation on this)."""
        clean = self.forward(x)
        adv = self.forward(x_adv)
        loss = F.cross_entropy(clean, y) + self.beta * trades_kl(adv, clean)
        if tracks_running_stats(self.ctx.net):
            with torch.no_grad():  # the reference's second model(x_natural): BN running averages only
                self.forward(x)
        return StepOutput(loss, adv, y)
