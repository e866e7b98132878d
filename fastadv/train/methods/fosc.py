"""Dynamic adversarial training with the FOSC criterion (Wang et al. 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos

#: the reference schedule: c_t reaches 0 after dynamic_epoch = 100 of its 120 epochs (train_models.py)
FOSC_DYNAMIC_FRACTION = 100 / 120


def fosc_schedule(epoch: int, c_max: float = 0.5, dynamic_epochs: float = 100.0) -> float:
    """c_t = max(c_max - c_max * epoch / T', 0) at 0-based ``epoch``, T' = ``dynamic_epochs``
    (train_models.py: ``fosc = fosc_max - fosc_max * (ep * 1.0 / dynamic_epoch); fosc = max(fosc, 0)``)."""
    if dynamic_epochs <= 0:
        return 0.0
    return max(c_max - c_max * (epoch / dynamic_epochs), 0.0)


def _mode_dependent(net: nn.Module) -> bool:
    """True when net's output depends on train/eval mode (batch norm or dropout inside)."""
    return any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)) for m in net.modules())


class FOSCAT(Method):
    """Dynamic adversarial training: PGD stopped per sample at FOSC <= c_t, c_t falling to 0.

    Wang, Ma, Bailey, Yi, Zhou & Gu, "On the Convergence and Robustness of
    Adversarial Training", ICML 2019; reference code YisenWang/dynamic_adv_training
    (train_models.py, pgd_attack.py), which we follow:

    * inner maximization: :class:`fastadv.attacks.fosc_pgd.FOSCPGD` (uniform
      start, signed L-inf steps, a sample stops moving once its FOSC
      c(x) = eps ||g||_1 - <x - x0, g> <= c_t), batch norm in eval mode (the
      reference's Keras attack runs in inference mode);
    * criterion schedule: c_t = max(c_max - c_max * t / T', 0) at 0-based
      epoch t (:func:`fosc_schedule`), c_max = 0.5, T' = 100 of the code's 120
      epochs (``dynamic_epochs``; default ``100/120 * epochs`` of this run);
    * loss: from the second epoch on (epoch index >= 1; epoch 0 is unweighted)
      each sample's CE is weighted by w_i = -log(p_y(x'_i) + 1e-12), its own
      CE at the adversarial example under the current model in inference mode
      (the code's ``model.predict`` before ``train_on_batch(...,
      sample_weight=loss_weight)``), w detached; the batch loss is Keras'
      weighted mean, mean_i(w_i CE_i) / mean_i(1[w_i != 0]). The paper does not
      describe this weighting; the code does it. ``weighting=False`` gives
      plain CE on the adversarial batch.

    Defaults: the code's CIFAR-10 settings, eps = 8/255 (its 0.031), alpha =
    eps/4, 10 steps, c_max = 0.5. Recorded per epoch (``epoch_metrics``):
    ``fosc_c`` (c_t) and ``fosc_mean_steps`` (mean PGD steps a training sample
    took this epoch, in [1, steps]; on this rank only under torchrun).

    Deliberate differences (see also ``FOSCPGD``): the FOSC is taken about the
    clean point as in the paper (``fosc_origin='start'`` for the code's
    random-start origin); the start is clipped to the box first; the loss is
    CE of the logits (the code's Keras loss clips probabilities to
    [1e-7, 1 - 1e-7]); the inference-mode forward for the weights is skipped
    when the network has no batch norm or dropout (same logits as the
    training forward, so the training logits are reused, detached).
    """

    name = "fosc"
    attack_mode = "eval"

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10, *, c_max: float = 0.5,
                 dynamic_epochs: float | None = None, weighting: bool = True, random_start: bool = True,
                 fosc_origin: str = "clean", attack_mode: str = "eval"):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.alpha = self.eps / 4 if alpha is None else _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.c_max = _check_pos("c_max", c_max)
        self.dynamic_epochs = None if dynamic_epochs is None else _check_pos("dynamic_epochs", dynamic_epochs)
        self.weighting = bool(weighting)
        self.random_start = bool(random_start)
        self.fosc_origin = _check_choice("fosc_origin", fosc_origin, ("clean", "start"))
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("train", "eval"))
        self.c = self.c_max
        self._steps_sum: torch.Tensor | None = None  # on the device: no host sync per batch
        self._n = 0
        self._count_epoch = 0

    def t_prime(self) -> float:
        """T' in epochs: ``dynamic_epochs`` or 100/120 of this run's epochs (the code's 100 of 120)."""
        return self.dynamic_epochs if self.dynamic_epochs is not None else FOSC_DYNAMIC_FRACTION * self.epochs

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        self.c = fosc_schedule(epoch, self.c_max, self.t_prime())
        if epoch != self._count_epoch:  # a resume mid-epoch keeps the counts loaded by load_state_dict
            self._steps_sum, self._n, self._count_epoch = None, 0, epoch

    def attack(self):
        from fastadv.attacks.fosc_pgd import FOSCPGD

        return FOSCPGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps, c=self.c,
                       random_start=self.random_start, origin=self.fosc_origin, **self.attack_kwargs())

    def _count(self, steps: torch.Tensor) -> None:
        s = steps.sum().to(torch.float64)
        self._steps_sum = s if self._steps_sum is None else self._steps_sum + s
        self._n += steps.numel()

    def sample_weights(self, x_adv: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """w_i = -log(p_y(x'_i) + 1e-12) under the model in inference mode, detached, (B,) float32."""
        with torch.no_grad():
            if _mode_dependent(self.ctx.net):
                from fastadv.attacks.base import Attack

                atk = Attack(self.ctx.attack_net, model_mode="eval", autocast=self.ctx.amp)
                with atk.model_context():
                    z = atk.logits(x_adv)
            else:
                z = logits.detach()
            p = F.softmax(z.float(), dim=1).gather(1, y[:, None]).squeeze(1)
            return -torch.log(p + 1e-12)

    def loss(self, x, y):
        atk = self.attack()
        x_adv = atk(x, y)
        self._count(atk.steps_taken)
        logits = self.forward(x_adv)
        if not self.weighting or self.epoch == 0:
            return StepOutput(F.cross_entropy(logits, y), logits, y)
        ce = F.cross_entropy(logits, y, reduction="none")
        w = self.sample_weights(x_adv, y, logits)
        nonzero = (w != 0).float().mean()
        # Keras' weighted mean; all-zero weights (every sample fit with p_y == 1 in float32) give loss 0
        loss = (w * ce).mean() / nonzero.clamp_min(1.0 / max(1, y.numel()))
        return StepOutput(loss, logits, y)

    def epoch_metrics(self):
        out = {"fosc_c": float(self.c)}
        if self._n > 0:
            out["fosc_mean_steps"] = float(self._steps_sum) / self._n
        return out

    def state_dict(self):
        return {"steps_sum": None if self._steps_sum is None else float(self._steps_sum), "n": self._n,
                "count_epoch": self._count_epoch}

    def load_state_dict(self, state):
        dev = self.ctx.device if self.ctx is not None else "cpu"
        self._n, self._count_epoch = int(state.get("n", 0)), int(state.get("count_epoch", 0))
        s = state.get("steps_sum")
        self._steps_sum = None if s is None else torch.tensor(s, dtype=torch.float64, device=dev)
