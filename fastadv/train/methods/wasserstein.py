"""Adversarial training against the Wasserstein attack (Wong et al. 2019)."""
from __future__ import annotations

import torch.nn.functional as F

from fastadv.train.methods.base import Method, StepOutput, _check_int, _check_pos


class WassersteinAT(Method):
    """Adversarial training against the Wasserstein attack.

    Wong, Schmidt & Kolter, "Wasserstein Adversarial Examples via Projected
    Sinkhorn Iterations", ICML 2019, section 4.3 (adversarial training on
    MNIST and CIFAR-10): x' = ``fastadv.attacks.WassersteinPGD`` (signed
    L-inf steps projected onto the Wasserstein ball with projected Sinkhorn,
    local k x k transport cost, the radius grown geometrically inside the
    attack up to eps, each sample stopped once misclassified), then
    CE(f(x'), y). ``eps_start``/``eps_growth`` optionally add a per-epoch
    curriculum on the largest radius: eps_t = min(eps, eps_start * eps_growth^epoch).
    ``attack_eps_growth`` is the attack's own radius schedule inside each
    call (WassersteinPGD's ``eps_growth``: (initial, factor, every); None
    fits it to eps and steps).

    The reference's settings, per dataset (``REFERENCE``,
    ``WassersteinAT.reference(dataset)``; ``fastadv train --method
    wasserstein`` uses them on MNIST and CIFAR-10 under any flag given):
    adv_training_mnist.py attacks with 50 steps of alpha 0.1, lam 1000, the
    radius from 0.1 grown x1.4 every 5 steps (0.1 * 1.4^9 = 2.07 at the
    last); adv_training_cifar.py with 50 steps of alpha 0.1, lam 3000, from
    0.01 grown x1.5 every 5 steps (0.384 at the last). Their radius has no
    cap but the schedule's last value, which is ``eps`` here. Both use 5 x 5
    windows, p 2, SGD lr 0.1 (momentum 0.9, weight decay 5e-4, constant),
    batch 128.

    Class defaults (dataset-agnostic): eps = 0.1 (the paper's CIFAR-10
    evaluation radius), alpha = 0.1, 20 attack steps with the schedule
    fitted to them (the reference's 50 steps cost 2.5x), lam 3000 (the
    CIFAR reference's; ``reg``). Other keyword arguments go to
    WassersteinPGD (p, ...). The inner attack runs as the paper's code
    does, not with the evaluation defaults: 50 Sinkhorn iterations per
    projection, every iterate accepted whether or not its projection
    converged, the [0, 1] clamp after it, one lam (``TRAINING_ATTACK``; the
    evaluation defaults accept only converged points inside ball and box,
    at 400 iterations and more per projection, lam 3000 then 1e4, about 3x
    the cost of a training step's attack).
    """

    #: the inner attack's settings (the reference code's), under any given in attack_kwargs
    TRAINING_ATTACK = {"box": "clamp", "sinkhorn_max_iter": 50, "accept_tol": float("inf"), "certify_max_iter": 0}
    #: the reference scripts' training attack (adv_training_mnist.py, adv_training_cifar.py)
    REFERENCE = {
        "mnist": dict(eps=0.1 * 1.4 ** 9, steps=50, alpha=0.1, attack_eps_growth=(0.1, 1.4, 5), reg=1000.0,
                      kernel_size=5),
        "cifar10": dict(eps=0.01 * 1.5 ** 9, steps=50, alpha=0.1, attack_eps_growth=(0.01, 1.5, 5), reg=3000.0,
                        kernel_size=5),
    }

    name = "wasserstein"

    def __init__(self, eps: float = 0.1, steps: int = 20, *, alpha: float = 0.1, eps_start: float | None = None,
                 eps_growth: float = 1.1, attack_eps_growth=None, reg: float = 3000.0, kernel_size: int = 5,
                 attack_mode: str = "train", **attack_kwargs):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.steps = _check_int("steps", steps, 1)
        self.alpha = _check_pos("alpha", alpha)
        self.eps_start = None if eps_start is None else _check_pos("eps_start", eps_start)
        self.eps_growth = _check_pos("eps_growth", eps_growth, allow_zero=False)
        self.attack_mode = attack_mode
        self.reg = _check_pos("reg", reg, allow_zero=False)
        self.kernel_size = _check_int("kernel_size", kernel_size, 1)
        self.extra = {**self.TRAINING_ATTACK, "reg": self.reg, "kernel_size": self.kernel_size, **attack_kwargs}
        self.attack_eps_growth = None if attack_eps_growth is None else tuple(attack_eps_growth)
        if attack_eps_growth is not None:
            from fastadv.attacks.wasserstein import radius_schedule

            radius_schedule(self.eps, self.steps, attack_eps_growth)  # refuses a schedule that cannot reach eps
            self.extra["eps_growth"] = self.attack_eps_growth
        self.current_eps = self.eps_target if self.eps_start is None else self.eps_start

    @classmethod
    def reference(cls, dataset: str, **overrides) -> "WassersteinAT":
        """The reference script's training attack for ``dataset`` ('mnist' or 'cifar10'), under ``overrides``."""
        if dataset not in cls.REFERENCE:
            raise ValueError(f"dataset must be one of {', '.join(cls.REFERENCE)}, got {dataset!r}")
        return cls(**{**cls.REFERENCE[dataset], **overrides})

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        if self.eps_start is not None:
            self.current_eps = min(self.eps_target, self.eps_start * self.eps_growth ** epoch)

    def loss(self, x, y):
        from fastadv.attacks.wasserstein import WassersteinPGD

        x_adv = WassersteinPGD(self.ctx.attack_net, eps=self.current_eps * self.eps_ramp_factor(), alpha=self.alpha, steps=self.steps,
                               **self.extra, **self.attack_kwargs())(x, y)
        logits = self.forward(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)
