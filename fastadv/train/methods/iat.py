"""Interpolated adversarial training (Lamb et al. 2019): input mixup and manifold mixup."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos, refuse_compiled_hooks

INPUT = "input"


def resolve_layer(net: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (a qualified name, or the unique module whose name ends with it,
    so 'layer1' finds ``model.layer1`` inside a normalizing wrapper)."""
    mods = dict(net.named_modules())
    if name in mods:
        return mods[name]
    hits = [m for n, m in mods.items() if n.endswith("." + name)]
    if len(hits) != 1:
        raise ValueError(f"mix layer {name!r}: {'no' if not hits else len(hits)} modules of the model match; "
                         f"pass qualified names from model.named_modules() (or {INPUT!r} for the input)")
    return hits[0]


def mixup_ce(logits, y, y_perm, lam: float) -> torch.Tensor:
    """lam CE(logits, y) + (1 - lam) CE(logits, y_perm): the mixup loss of mixed labels."""
    return lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y_perm)


class IAT(Method):
    """Interpolated adversarial training: mixup on clean and on adversarial examples.

    Lamb, Verma, Kannala & Bengio, "Interpolated Adversarial Training:
    Achieving Robust Neural Networks without Sacrificing Too Much Accuracy",
    AISec 2019, Algorithm 1: x' = PGD(x) (``fastadv.attacks.PGD``), then
    loss = 1/2 [ mixCE(f(Mix_lam(x, x_p))) + mixCE(f(Mix_lam'(x', x'_p))) ],
    mixCE = lam CE(., y) + (1 - lam) CE(., y_p), each of the two mixes with
    its own lam ~ Beta(mix_alpha, mix_alpha) and random pairing p (labels
    mixed with the same lam and pairing as their inputs), each from its own
    forward (batch norm sees the clean mix and the adversarial mix
    separately).

    * ``mixup='input'``: Mix interpolates the images (Zhang et al. 2018).
    * ``mixup='manifold'``: Manifold Mixup (Verma et al. 2019): per mix, a
      layer k is drawn uniformly from ``mix_layers`` and Mix interpolates
      that layer's output ('input' = the images); default layers
      ('input', 'layer1', 'layer2'), the Manifold Mixup paper's PreActResNet
      choice {0, 1, 2}; name the modules for other networks.

    Defaults: the paper's CIFAR-10 settings, PGD eps = 8/255, alpha = 2/255,
    7 steps (batch norm in train mode); mix_alpha = 1 for input mixup and 2
    for manifold mixup.
    """

    name = "iat"

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7, *,
                 mix_alpha: float | None = None, mixup: str = "input",
                 mix_layers: Sequence[str] = (INPUT, "layer1", "layer2"), attack_mode: str = "train"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.mixup = _check_choice("mixup", mixup, ("input", "manifold"))
        default_alpha = 1.0 if self.mixup == "input" else 2.0
        self.mix_alpha = _check_pos("mix_alpha", default_alpha if mix_alpha is None else mix_alpha,
                                    allow_zero=False)
        self.mix_layers = tuple(mix_layers) if self.mixup == "manifold" else (INPUT,)
        if not self.mix_layers:
            raise ValueError("mix_layers must name at least one layer")
        self.attack_mode = attack_mode
        self._layers: list | None = None
        self.last_draws: list = []  # (lam, perm, layer name) of the last loss(), for tests and logging

    def bind(self, ctx):
        super().bind(ctx)
        self._layers = [None if n == INPUT else resolve_layer(ctx.net, n) for n in self.mix_layers]
        if any(layer is not None for layer in self._layers):
            refuse_compiled_hooks(ctx, "iat", "manifold mixup")
        return self

    def perturb(self, x, y):
        from fastadv.attacks import PGD

        return PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                   **self.attack_kwargs())(x, y)

    def draw(self, b: int, device):
        """(lam, perm, layer index): lam ~ Beta(a, a) from the torch RNG (restored on resume), a pairing, a layer."""
        lam = float(torch.distributions.Beta(self.mix_alpha, self.mix_alpha).sample())
        perm = torch.randperm(b, device=device)
        k = int(torch.randint(len(self.mix_layers), ())) if len(self.mix_layers) > 1 else 0
        return lam, perm, k

    def mixed_forward(self, x, lam: float, perm: torch.Tensor, k: int) -> torch.Tensor:
        layer = self._layers[k]
        if layer is None:
            return self.forward(lam * x + (1 - lam) * x[perm])

        def hook(mod, inputs, out):
            return lam * out + (1 - lam) * out[perm]

        handle = layer.register_forward_hook(hook)
        try:
            return self.forward(x)
        finally:
            handle.remove()

    def loss(self, x, y):
        x_adv = self.perturb(x, y)
        self.last_draws = []
        total, logits = 0.0, None
        for inputs in (x, x_adv):
            lam, perm, k = self.draw(x.shape[0], x.device)
            self.last_draws.append((lam, perm, self.mix_layers[k]))
            logits = self.mixed_forward(inputs, lam, perm, k)
            total = total + 0.5 * mixup_ce(logits, y, y[perm], lam)
        return StepOutput(total, logits, y)
