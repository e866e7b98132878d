"""Fast adversarial training (Wong et al. 2020) and its guard against catastrophic overfitting."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fastadv.train.methods.base import Method, StepOutput, _check_pos


class FastAT(Method):
    """Fast adversarial training: FGSM from a random start, with a cyclic learning rate.

    Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial
    training", ICLR 2020 (locuslab/fast_adversarial, CIFAR10/train_fgsm.py).
    delta ~ U[-eps, eps]^d clipped so that x + delta is in the box, one
    signed-gradient step of alpha = 1.25 eps, projected to the eps ball and
    the box: exactly ``fastadv.attacks.PGD(steps=1, alpha=1.25 eps,
    random_start=True)``, with batch norm in train mode as the reference.

    The learning-rate recipe is part of the method: ``default_schedule =
    'cyclic'`` and ``default_lr`` (0.2 with SGD, the code's lr_max; 5e-3 with
    Adam, its MNIST script's). ``fastadv train`` and :func:`train_config`
    apply them unless told otherwise; a hand-built ``TrainConfig`` keeps
    what it says. Our 'cyclic' is the triangle 0 -> lr_max at 2/5 of the
    steps -> 0 of train_cifar.py and the MNIST script; train_fgsm.py's
    ``CyclicLR`` peaks at 1/2 instead.

    The paper's guard against catastrophic overfitting (``--early-stop``) is
    :class:`FastATEarlyStop`, a ``Trainer`` callback.

    Defaults: eps = 8/255, alpha = 1.25 * eps = 10/255 (MNIST: eps 0.3, alpha 0.375).
    """

    name = "fast"
    default_schedule = "cyclic"
    default_lr = {"sgd": 0.2, "adam": 5e-3}

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None, *, attack_mode: str = "train"):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.alpha = 1.25 * self.eps if alpha is None else _check_pos("alpha", alpha)
        self.attack_mode = attack_mode
        self._first: tuple | None = None
        self._first_epoch = -1

    def perturb(self, x, y):
        from fastadv.attacks import PGD

        return PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=1, random_start=True,
                   **self.attack_kwargs())(x, y)

    @property
    def first_batch(self) -> tuple | None:
        """(x, y) of the first batch of the current epoch: the reference's early-stop check batch."""
        return self._first

    def loss(self, x, y):
        if self._first_epoch != self.epoch or self._first is None:
            self._first, self._first_epoch = (x.detach(), y.detach()), self.epoch
        logits = self.forward(self.perturb(x, y))
        return StepOutput(F.cross_entropy(logits, y), logits, y)


class FastATEarlyStop:
    """Stop training when PGD accuracy collapses (catastrophic overfitting), keeping the last good weights.

    Wong et al. 2020, section 5.3 and train_fgsm.py ``--early-stop``: after
    each epoch, PGD (``steps`` = 5, alpha = 2/255, one restart, each sample
    frozen once fooled, batch norm in train mode) on the first training batch
    of the epoch; if the robust accuracy fell by more than ``drop`` (0.2)
    since the previous epoch, training ends and the weights of the previous
    epoch are restored; otherwise they become the new "last good" weights.

    A ``Trainer`` callback (``callbacks=[FastATEarlyStop()]``) for a method
    that records its first batch (``FastAT``). It acts after the last
    optimizer step of an epoch; on a collapse it loads the good weights and
    marks the current epoch as the last one, so the loop still evaluates,
    checkpoints and writes ``model.pt`` (of the restored weights) and
    finishes normally; ``stopped_epoch`` then holds the 0-based epoch. Unlike
    the reference, the check leaves the batch-norm running averages as they
    were (the reference's 6 check forwards also update them). Under torchrun
    the counts are summed over ranks, so every rank takes the same decision.
    eps defaults to the method's.
    """

    def __init__(self, eps: float | None = None, alpha: float = 2 / 255, steps: int = 5, drop: float = 0.2,
                 verbose: bool = True):
        self.eps, self.alpha, self.steps, self.drop = eps, float(alpha), int(steps), float(drop)
        self.verbose = verbose
        self.prev_acc = 0.0
        self.history: list[float] = []
        self.best: dict | None = None
        self.stopped_epoch: int | None = None

    def robust_accuracy(self, net, x, y, eps, amp=None, seed=0) -> float:
        from fastadv.attacks import PGD
        from fastadv.train import distributed as D

        buffers = {k: b.detach().clone() for k, b in net.named_buffers()}
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):  # the check never shifts the training RNG stream
            torch.manual_seed(seed)
            atk = PGD(net, eps=eps, alpha=self.alpha, steps=self.steps, random_start=True, early_stop=True,
                      model_mode="train", autocast=amp)
            x_adv = atk(x, y)
            with atk.model_context(), torch.no_grad():
                correct = (atk.logits(x_adv).argmax(1) == y).sum()
        with torch.no_grad():
            for k, b in net.named_buffers():
                b.copy_(buffers[k])
        counts = torch.stack([correct.double(), torch.tensor(float(y.numel()), device=x.device,
                                                             dtype=torch.float64)])
        D.all_reduce_sum(counts)
        return float(counts[0] / counts[1].clamp_min(1))

    def __call__(self, trainer, record) -> None:
        if trainer.batch_in_epoch != trainer.steps_per_epoch or self.stopped_epoch is not None:
            return
        batch = getattr(trainer.method, "first_batch", None)
        if batch is None:
            raise TypeError("FastATEarlyStop needs a method that records its first batch (FastAT)")
        eps = self.eps if self.eps is not None else trainer.method.eps_target  # the threat model, not a warm-up's
        acc = self.robust_accuracy(trainer.net, *batch, eps, trainer.cfg.amp, seed=trainer.cfg.seed + trainer.epoch)
        self.history.append(acc)
        if acc - self.prev_acc < -self.drop and self.best is not None:
            trainer.net.load_state_dict(self.best)
            self.stopped_epoch = trainer.epoch
            trainer.epoch = trainer.cfg.epochs - 1  # the loop ends after this epoch's evaluation and checkpoint
            if self.verbose and trainer.is_main:
                print(f"FastATEarlyStop: PGD-{self.steps} accuracy on the first batch fell from {self.prev_acc:.3f} "
                      f"to {acc:.3f} in epoch {self.stopped_epoch + 1}; restored the weights of the previous "
                      "epoch and stopped", file=sys.stderr)
            return
        self.prev_acc = acc
        self.best = {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}
