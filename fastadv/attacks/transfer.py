"""Transfer attacks: perturbations crafted on one or more source models and
applied to the target (Papernot et al. 2017; the ensemble of Tramer et al.
2018, "Ensemble Adversarial Training: Attacks and Defenses").

With several sources the attack runs on their ensemble, whose logits are the
mean of the sources' logits. The target model is only used to validate the
labels and the output shape; its gradients are never read, so a transfer
attack that beats a white-box attack on the target is a sign of gradient
masking (``fastadv.evaluate`` checks that).

Example::

    atk = TransferAttack(target, [surrogate_a, surrogate_b], eps=8/255, steps=20)
    x_adv = atk(x, y)
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from fastadv.attacks.base import Attack


class Ensemble(nn.Module):
    """Mean of the logits of ``models`` (each (B, ...) -> (B, K))."""

    def __init__(self, models: Sequence[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x):
        out = self.models[0](x)
        for m in self.models[1:]:
            out = out + m(x)
        return out / len(self.models)


class TransferAttack(Attack):
    """Args:
        model: the target (validation only).
        sources: a model or a sequence of models to craft on (their ensemble).
        attack: the Attack class run on the sources (default ``PGD``).
        attack_kwargs: passed to it (eps, alpha, steps, norm, ...); shared
            options (targeted, model_mode, autocast, clip) are forwarded.
    """

    name = "TransferAttack"

    def __init__(self, model, sources, attack=None, *, targeted: bool = False, model_mode: str = "eval",
                 autocast=None, channels_last="auto", clip=(0.0, 1.0), **attack_kwargs):
        super().__init__(model, targeted=targeted, model_mode=model_mode, autocast=autocast,
                         channels_last=channels_last, clip=clip)
        if isinstance(sources, nn.Module) or callable(sources) and not isinstance(sources, (list, tuple)):
            sources = [sources]
        sources = list(sources)
        if not sources:
            raise ValueError("sources must hold at least one model")
        for i, s in enumerate(sources):
            if not callable(s):
                raise TypeError(f"sources[{i}] must be a model, got {type(s).__name__}")
        self.sources = sources
        if attack is None:
            from fastadv.attacks.pgd import PGD

            attack = PGD
        source = sources[0] if len(sources) == 1 else Ensemble(sources)
        self.inner = attack(source, targeted=targeted, model_mode=model_mode, autocast=autocast,
                            channels_last=channels_last, clip=clip, **attack_kwargs)
        self.eps = getattr(self.inner, "eps", None)

    def perturb(self, x, y):
        with torch.no_grad():
            self.logits(x[:1])  # validates the target's output shape and the label range
        return self.inner(x, y)
