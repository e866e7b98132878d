"""Friendly adversarial training (Zhang et al. 2020) and its TRADES variant."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack, check_choice, check_eps, check_int
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos
from fastadv.train.methods.trades import trades_kl

#: the official dynamic-tau milestones, as fractions of training: FAT.py (120 epochs: tau 0 up to epoch 50,
#: 1 up to 90, then 2) and FAT_for_TRADES.py (85 epochs: 0 up to 30, 1 up to 50, 2 up to 70, then 3)
FAT_MILESTONES = (50 / 120, 90 / 120)
FAT_TRADES_MILESTONES = (30 / 85, 50 / 85, 70 / 85)


def tau_schedule(epoch: int, epochs: int, tau_max: int = 2, milestones: Sequence[float] = FAT_MILESTONES) -> int:
    """FAT's dynamic tau at 0-based ``epoch``: the number of milestones (fractions of ``epochs``) passed,
    capped at tau_max. The defaults are FAT.py's 120-epoch CIFAR-10 schedule (``adjust_tau(epoch + 1)``:
    0 for epochs 1-50, 1 for 51-90, 2 after)."""
    frac = epoch / max(1, epochs)
    return min(tau_max, sum(frac >= m for m in milestones))


class FriendlyPGD(Attack):
    """The official early-stopped PGD of FAT (zjfheart/Friendly-Adversarial-Training, earlystop.py).

    Each sample stops at the iterate where it is misclassified for the
    (tau + 1)-th time (tau = 0: its first misclassified iterate; an iterate is
    checked before the step that would leave it); samples still correct after
    ``steps`` steps return their last iterate. A step is
    x <- P(x + alpha * sign(grad) + omega * N(0, I)), P the projection onto
    the eps-ball and the box. Runs on ``fastadv.attacks.engine.run_loop``
    with batch compaction.

    Args:
        loss: 'ce' (FAT) or 'kl' (FAT for TRADES: KL(p(x) || p(x')) summed, p(x) the
            clean softmax computed once, as the official loss_fn='kl').
        start: 'uniform' (U(-eps, eps), FAT.py), 'normal' (0.001 * N(0, I), FAT_for_TRADES.py) or 'none'.
        omega: std of the Gaussian noise added at each step (official: 0.001 in FAT.py, 0 in
            FAT_for_TRADES.py).
        eps, alpha, steps, tau, compact_every; others as ``Attack``.
    """

    name = "FriendlyPGD"

    def __init__(self, model, eps=8 / 255, alpha=0.007, steps: int = 10, *, tau: int = 0, loss: str = "ce",
                 start: str = "uniform", init_std: float = 0.001, omega: float = 0.0,
                 compact_every: int | None = None, generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.eps, self.alpha = check_eps("eps", eps), check_eps("alpha", alpha)
        self.steps, self.tau = check_int("steps", steps, 0), check_int("tau", tau, 0)
        self.loss = check_choice("loss", loss, ("ce", "kl"))
        self.start = check_choice("start", start, ("uniform", "normal", "none"))
        self.init_std, self.omega = float(check_eps("init_std", init_std)), float(check_eps("omega", omega))
        self.compact_every = compact_every
        self.generator = generator

    @staticmethod
    def _kl(logits, s):
        per = F.kl_div(F.log_softmax(logits, dim=1), s["p_clean"], reduction="none").sum(1)
        return per.sum(), per

    def _step(self, x, g, s, t, per, logits):
        if self.omega > 0:
            x = x + self.omega * torch.randn(x.shape, device=x.device, generator=self.generator)
        return ops.linf_step(x, s["x0"], g, s["alpha"], s["eps"], clip=self.clip)

    def perturb(self, x, y):
        from fastadv.attacks.pgd import random_start

        b = x.shape[0]
        eps, alpha = engine._expand(self.eps, b, x.device), engine._expand(self.alpha, b, x.device)
        if self.start == "uniform":
            x1 = random_start("linf", x, eps, self.clip, self.generator)
        elif self.start == "normal":
            # the official code clamps the start to the box only; we also keep it in the ball (the same
            # point whenever |noise| <= eps, i.e. always at eps 8/255 with std 0.001)
            noise = torch.randn(x.shape, device=x.device, generator=self.generator) * self.init_std
            x1 = x + ops.project_linf(noise, eps, x0=x, clip=self.clip)
        else:
            x1 = x.clone()
        state = {"eps": eps, "alpha": alpha}
        loss = "ce"
        if self.loss == "kl":
            with torch.no_grad():
                state["p_clean"] = F.softmax(self.logits(x), dim=1)
            loss = self._kl
        res = engine.run_loop(self, x, y, x1, self.steps, self._step, loss=loss, state=state, early_stop=True,
                              tau=self.tau, compact_every=self.compact_every)
        return res["x"]


class FAT(Method):
    """Friendly adversarial training: train on early-stopped PGD examples.

    Zhang, Xu, Han, Niu, Cui, Sugiyama & Kankanhalli, "Attacks Which Do Not
    Kill Training Make Adversarial Learning Stronger", ICML 2020, as the
    official code runs it (FAT.py, FAT_for_TRADES.py, earlystop.py): the
    inner maximization is :class:`FriendlyPGD` with batch norm in eval mode;
    each sample stops ``tau`` misclassified steps after it is first
    misclassified. tau follows the official dynamic schedule
    (:func:`tau_schedule`) unless ``tau`` is fixed.

    * FAT (``trades=False``): uniform start, CE ascent, omega = 0.001 noise
      per step; loss CE(f(x'), y); tau 0 / 1 / 2 after 50/120 and 90/120 of
      the epochs.
    * FAT for TRADES (``trades=True``): start x + 0.001 N(0, I), ascent on
      the summed KL(f(x) || f(x')), no noise; loss CE(f(x), y) + beta *
      KL_batchmean(f(x) || f(x')) from separate clean and adversarial
      forwards; tau 0 / 1 / 2 / 3 after 30/85, 50/85 and 70/85 of the epochs.

    Defaults: the official CIFAR-10 settings, eps = 8/255 (the code's 0.031),
    alpha = 0.007, 10 steps, beta = 6. ``omega``, ``tau_max``,
    ``milestones`` and ``attack_mode`` override the variant's defaults.
    """

    name = "fat"
    attack_mode = "eval"

    def __init__(self, eps: float = 8 / 255, alpha: float = 0.007, steps: int = 10, *, tau: int | None = None,
                 tau_max: int | None = None, milestones: Sequence[float] | None = None, trades: bool = False,
                 beta: float = 6.0, omega: float | None = None, random_start: bool = True,
                 attack_mode: str = "eval"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.trades, self.beta = bool(trades), _check_pos("beta", beta)
        self.fixed_tau = None if tau is None else _check_int("tau", tau, 0)
        self.tau_max = _check_int("tau_max", (3 if self.trades else 2) if tau_max is None else tau_max, 0)
        self.milestones = tuple(milestones if milestones is not None else
                                (FAT_TRADES_MILESTONES if self.trades else FAT_MILESTONES))
        self.omega = _check_pos("omega", (0.0 if self.trades else 0.001) if omega is None else omega)
        self.random_start = bool(random_start)
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("train", "eval"))
        self.tau = self.fixed_tau or 0

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        self.tau = self.fixed_tau if self.fixed_tau is not None else \
            tau_schedule(epoch, epochs, self.tau_max, self.milestones)

    def attack(self) -> FriendlyPGD:
        start = ("normal" if self.trades else "uniform") if self.random_start else "none"
        return FriendlyPGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps, tau=self.tau,
                           loss="kl" if self.trades else "ce", start=start, omega=self.omega,
                           **self.attack_kwargs())

    def loss(self, x, y):
        x_adv = self.attack()(x, y)
        if not self.trades:
            logits = self.forward(x_adv)
            return StepOutput(F.cross_entropy(logits, y), logits, y)
        clean = self.forward(x)
        adv = self.forward(x_adv)
        return StepOutput(F.cross_entropy(clean, y) + self.beta * trades_kl(adv, clean), adv, y)
