"""PGD adversarial training (Madry et al. 2018)."""
from __future__ import annotations

import torch.nn.functional as F

from fastadv.train.methods.base import Method, StepOutput, _check_int, _check_pos


class PGDAT(Method):
    """PGD adversarial training: min_theta E max_{||d||_inf <= eps} CE(f(x + d), y).

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR 2018. The inner maximization is
    ``fastadv.attacks.PGD`` (L-inf by default, uniform random start, signed
    steps projected onto the ball and the box); the loss is CE on the
    adversarial batch only (no clean term).

    Defaults: the paper's CIFAR-10 setting, eps = 8/255, alpha = 2/255, 7
    steps (MNIST: eps 0.3, alpha 0.01, 40 steps). The attack runs with batch
    norm in train mode, as Wong et al.'s and Rice et al.'s PyTorch ports do
    (batch statistics; each attack forward also updates the running
    averages). ``norm='l2'`` trains against L2 PGD. ``eps_warmup=f`` ramps eps
    (and alpha with it) linearly from 0 over the first fraction f of the
    optimizer steps (not in the paper; off by default; the short
    embedded-MNIST default run uses it).
    """

    name = "pgd"

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7, *, norm: str = "linf",
                 random_start: bool = True, eps_warmup: float = 0.0, attack_mode: str = "train"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.norm, self.random_start, self.attack_mode = norm, bool(random_start), attack_mode
        self.set_eps_warmup(eps_warmup)  # eps and alpha read ramped (Method.eps_ramp_factor)

    def attack(self):
        from fastadv.attacks import PGD

        return PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                   random_start=self.random_start, **self.attack_kwargs())

    def perturb(self, x, y):
        """The adversarial batch the loss is taken on."""
        return self.attack()(x, y)

    def loss_from_adv(self, x, x_adv, y):
        """CE on a given adversarial batch (AWP takes its weight perturbation on this)."""
        logits = self.forward(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)

    def loss(self, x, y):
        return self.loss_from_adv(x, self.perturb(x, y), y)
