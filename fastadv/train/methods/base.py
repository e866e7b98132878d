"""The method protocol: ``Method``, ``StepOutput``, ``BindContext``, and standard training.

A method turns a clean batch (x in [0, 1], y) into the scalar training loss.
Its inner maximization (the attack) runs on the attack suite
(``fastadv.attacks``) against the *unwrapped* network, so DDP only sees the
forwards and the backward that train; parameter gradients are never touched
by an attack (it differentiates with respect to the input only).

The protocol (see :class:`Method`):

* ``bind(ctx)``: receive the network, the DDP/compiled model, the device and
  the precision once, before training;
* ``on_epoch(epoch, epochs)``: epoch-dependent settings (FAT's tau, the
  Wasserstein radius); ``on_step(step, total_steps)`` before each batch;
* ``loss(x, y) -> StepOutput(loss, logits, y)``: the training loss; the
  loop backpropagates it and steps the optimizer; ``logits``/``y`` give the
  accuracy shown on the progress bar;
* ``replays``: how many optimizer steps a batch gets (Free-AT's m), with
  ``after_backward()`` called after each backward and ``after_step()`` after
  each optimizer step (AWP restores its weight perturbation there; AFD takes
  its critic and encoder updates there);
* ``extra_modules()``: modules built at bind whose parameters join the
  trainer's optimizer and learning-rate schedule (DIAL's domain head); the
  method saves their weights in ``state_dict()``; under torchrun the trainer
  averages their gradients across ranks, as DDP does the network's;
* ``epoch_metrics() -> dict``: numbers the method measured during the epoch
  (invariance examples made, samples stopped early), merged into the epoch
  record of ``metrics.jsonl``; the method resets its counters in
  ``on_epoch``;
* ``state_dict()``/``load_state_dict()``: what a resume needs;
* ``default_schedule`` / ``default_lr``: the learning-rate recipe of the
  method's paper where it is part of the method (Fast-AT's cyclic schedule);
  :func:`train_config` and ``fastadv train`` apply it.

Forward passes follow the authors' code: where the reference runs clean and
adversarial images through separate forwards (TRADES, FAT, IAT), so do we.
With batch norm in train mode one concatenated forward would normalize both
with the statistics of the mixed batch and take one running-average update
instead of two; tests/test_train_methods.py checks the running statistics
against plain ports of the reference loops.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable
    logits: torch.Tensor  # (B', K) logits the accuracy is measured on
    y: torch.Tensor  # (B',) labels for those logits


@dataclasses.dataclass
class BindContext:
    """What the loop hands a method before training.

    net: the plain nn.Module (attacks run on it, or on its compiled twin);
    model: what the training forward calls (DDP- and/or compile-wrapped net);
    attack_net: what attacks call (net, or torch.compile(net) with --compile);
    amp: None | 'bf16' | 'fp16'; device; epochs; steps_per_epoch.
    """

    net: nn.Module
    model: nn.Module
    attack_net: nn.Module
    device: torch.device
    amp: str | None = None
    epochs: int = 1
    steps_per_epoch: int = 1


def _check_pos(name, v, allow_zero=True):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a number {'>=' if allow_zero else '>'} 0, got {v!r}")
    return float(v)


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def _check_choice(name, v, choices):
    if v not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {v!r}")
    return v


def set_attack_settings(method, eps, alpha, steps, *, beta=None, attack_mode="eval") -> None:
    """Check and set the inner attack's settings shared by the KL-regularized methods (TRADES, MART):
    eps, alpha > 0 or >= 0, steps >= 1, beta >= 0 (when given), the attack's batch-norm mode."""
    method.eps, method.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
    method.steps = _check_int("steps", steps, 1)
    if beta is not None:
        method.beta = _check_pos("beta", beta)
    method.attack_mode = attack_mode


def refuse_compiled_hooks(ctx: "BindContext", method: str, what: str) -> None:
    """Raise when the training forward is ``torch.compile``d and the method needs forward hooks added per
    call: dynamo does not guard on hooks registered after the first compiled call, so such a hook never
    fires (seen on torch 2.13 CPU; a silent no-op would train another method)."""
    if hasattr(ctx.model, "_orig_mod") or hasattr(ctx.attack_net, "_orig_mod"):
        raise ValueError(f"{method}: {what} uses forward hooks, which a torch.compile'd model does not run; "
                         "train without compile (--compile / TrainConfig.compile=False)")


def tracks_running_stats(net: nn.Module) -> bool:
    """True when a forward of ``net`` updates batch-norm running averages (a BN layer in train mode)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
               for m in net.modules())


class _RampedRadius:
    """``method.eps`` / ``method.alpha``: the configured value times the method's eps ramp factor.

    The configured value lives in the instance ``__dict__`` under the same name (so ``vars(method)``,
    ``describe()`` and the checkpoint metadata show what was configured); this data descriptor, which
    takes precedence over the instance ``__dict__``, returns it scaled by ``method.eps_ramp_factor()``
    (1 unless ``eps_warmup`` > 0), so every method's inner attack reads the ramped radius and step
    without code of its own. ``None`` (a default resolved later) and missing values pass through.
    """

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        try:
            value = obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(f"{type(obj).__name__!r} object has no attribute {self.name!r}") from None
        if value is None or obj.__dict__.get("eps_warmup", 0.0) <= 0:
            return value
        return value * obj.eps_ramp_factor()

    def __set__(self, obj, value):
        obj.__dict__[self.name] = value

    def __delete__(self, obj):
        del obj.__dict__[self.name]


class Method:
    """Base class: standard training, CE(f(x), y). Subclasses override ``loss``.

    eps warm-up (any method with an ``eps``): with ``eps_warmup = f`` > 0 (``set_eps_warmup(f)``,
    ``fastadv train --eps-warmup f``), ``self.eps`` and ``self.alpha`` read the configured values times
    min(1, (t + 1) / (f T)) at optimizer step t of T, so the inner attack's radius and step grow
    linearly from ~0 to the configured ones over the first fraction f of training; ``eps_target`` /
    ``alpha_target`` are the configured values. Not part of any of the papers' methods (off by
    default); short large-eps MNIST runs need it (without it most methods collapse to a constant
    prediction in 80 steps at eps 0.3: docs/reproduction.md).
    """

    eps = _RampedRadius()
    alpha = _RampedRadius()

    name = "standard"
    replays = 1
    #: batch-norm mode during the inner maximization: 'train' (batch statistics,
    #: as Madry's and Wong's reference code) or 'eval' (TRADES' and FAT's reference code)
    attack_mode = "train"
    #: the learning-rate schedule that is part of the method (None: the caller's)
    default_schedule: str | None = None
    #: peak learning rate per optimizer for ``default_schedule`` ({} : the caller's)
    default_lr: dict = {}
    #: whether ``loss`` may be called on k micro-batches whose gradients add up before one optimizer step
    #: (TrainConfig.grad_accum): False for a method whose loss has side effects per call (weight
    #: perturbations, its own optimizer steps, per-batch state); ``grad_accum_refusal`` says why
    supports_grad_accum = True
    grad_accum_refusal = ""

    def __init__(self):
        self.ctx: BindContext | None = None
        self.epoch, self.epochs = 0, 1

    def bind(self, ctx: BindContext) -> "Method":
        self.ctx = ctx
        return self

    def on_epoch(self, epoch: int, epochs: int) -> None:
        self.epoch, self.epochs = int(epoch), int(epochs)

    def on_step(self, step: int, total_steps: int) -> None:
        """Called before each batch with the optimizer steps taken so far and the run's total."""
        self.step, self.total_steps = int(step), int(total_steps)

    def eps_ramp_factor(self) -> float:
        """min(1, (t + 1) / (eps_warmup * T)) at optimizer step t of T (1 when eps_warmup is 0): the share
        of the configured eps and alpha in use at this step (a warm-up that keeps large-eps MNIST training
        from collapsing to a constant prediction early on)."""
        warmup = self.__dict__.get("eps_warmup", 0.0)
        if warmup <= 0:
            return 1.0
        done = (getattr(self, "step", 0) + 1) / max(1.0, warmup * getattr(self, "total_steps", 1))
        return min(1.0, done)

    @property
    def eps_target(self):
        """The configured eps (``self.eps`` is it times the warm-up factor)."""
        return self.__dict__.get("eps")

    @property
    def alpha_target(self):
        """The configured alpha (``self.alpha`` is it times the warm-up factor)."""
        return self.__dict__.get("alpha")

    def set_eps_warmup(self, fraction: float) -> "Method":
        """Ramp eps and alpha linearly from ~0 over the first ``fraction`` of the optimizer steps (0: off)."""
        fraction = _check_pos("eps_warmup", fraction)
        if fraction > 0 and self.eps_target is None:
            raise ValueError(f"eps_warmup: method {self.name!r} has no eps to ramp")
        if fraction > 1:
            raise ValueError(f"eps_warmup must be a fraction of the training steps in [0, 1], got {fraction!r}")
        self.eps_warmup = fraction
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The training forward (through DDP); float32 logits."""
        return self.ctx.model(x).float()

    def attack_kwargs(self, mode: str | None = None) -> dict:
        return {"model_mode": mode or self.attack_mode, "autocast": self.ctx.amp}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        logits = self.forward(x)
        return StepOutput(F.cross_entropy(logits, y), logits, y)

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        """Called after each optimizer (and scheduler) step."""

    def release(self) -> None:
        """Called when training ends: remove what the method attached to the network (forward hooks), so
        the trained model is a plain function again (a hook left on it makes the evaluation's dynamic check
        flag the model, rightly)."""

    def extra_modules(self) -> list:
        """Trainable modules of the method itself (not the network), trained by the trainer's optimizer."""
        return []

    def epoch_metrics(self) -> dict:
        """Per-epoch numbers for metrics.jsonl (plain floats/ints; keys must not clash with the loop's)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("ctx",)
                and isinstance(v, (int, float, str, bool, type(None), list, tuple))}


Standard = Method


def train_config(method: Method, **overrides):
    """A ``TrainConfig`` carrying the method's own learning-rate recipe under the caller's settings.

    ``method.default_schedule`` and ``method.default_lr[optimizer]`` fill
    ``schedule`` and ``lr`` unless given in ``overrides``; everything else is
    ``TrainConfig``'s default or the override. Example (Wong et al.'s cyclic
    lr, peak 0.2 with SGD)::

        cfg = train_config(FastAT(), epochs=15, batch_size=128)
        Trainer(net, method, train, held, cfg).fit()
    """
    from fastadv.train.trainer import TrainConfig

    kw = dict(overrides)
    if method.default_schedule is not None:
        kw.setdefault("schedule", method.default_schedule)
    lr = method.default_lr.get(kw.get("optimizer", TrainConfig.optimizer))
    if lr is not None:
        kw.setdefault("lr", lr)
    return TrainConfig(**kw)
