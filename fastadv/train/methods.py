"""Robust training methods: each is a small object the loop calls once per batch.

A method turns a clean batch (x in [0, 1], y) into the scalar training loss.
Its inner maximization (the attack) runs on the attack suite
(``fastadv.attacks``: fused steps, compaction where the method allows it,
autocast, channels_last) against the *unwrapped* network, so DDP only sees
the one forward/backward that trains; parameter gradients are never touched
by an attack (it differentiates with respect to the input only).

The protocol (see :class:`Method`):

* ``bind(ctx)``: receive the network, the DDP/compiled model, the device and
  the precision once, before training;
* ``on_epoch(epoch, epochs)``: epoch-dependent settings (FAT's tau, the
  Wasserstein radius);
* ``loss(x, y) -> StepOutput(loss, logits, y)``: the training loss; the
  loop backpropagates it and steps the optimizer; ``logits``/``y`` give the
  accuracy shown on the progress bar;
* ``replays``: how many optimizer steps a batch gets (Free-AT's m), with
  ``after_backward()`` called after each backward;
* ``state_dict()``/``load_state_dict()``: what a resume needs.

``METHODS`` maps the command-line names to the classes; ``get_method(name,
**kwargs)`` builds one. Every class documents its paper and its defaults.
Radii are in [0, 1] pixel units: the defaults are the CIFAR-10 ones of each
paper unless stated; ``fastadv train`` passes the MNIST ones (eps 0.3) when
training on MNIST.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastadv import ops

__all__ = ["Method", "StepOutput", "BindContext", "Standard", "PGDAT", "TRADES", "FAT", "FastAT", "FreeAT",
           "EnsembleAT", "IAT", "MetricAT", "WassersteinAT", "METHODS", "get_method", "tau_schedule",
           "penultimate_features"]


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


class Method:
    """Base class: standard training, CE(f(x), y). Subclasses override ``loss``."""

    name = "standard"
    replays = 1
    #: batch-norm mode during the inner maximization: 'train' (batch statistics,
    #: as Madry's and Wong's reference code) or 'eval' (TRADES' reference code)
    attack_mode = "train"

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

    def ramp(self, eps: float, warmup: float) -> float:
        """eps scaled linearly from 0 over the first ``warmup`` fraction of the steps
        (a warm-up that keeps large-eps MNIST training from collapsing to chance early on)."""
        if warmup <= 0:
            return eps
        done = (getattr(self, "step", 0) + 1) / max(1.0, warmup * getattr(self, "total_steps", 1))
        return eps * min(1.0, done)

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

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k not in ("ctx",)
                and isinstance(v, (int, float, str, bool, type(None), list, tuple))}


Standard = Method


class PGDAT(Method):
    """PGD adversarial training: min_theta E max_{||d||_inf <= eps} CE(f(x + d), y).

    Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models
    Resistant to Adversarial Attacks", ICLR 2018. The inner maximization is
    ``fastadv.attacks.PGD`` (L-inf by default, uniform random start).

    Defaults: the paper's CIFAR-10 setting, eps = 8/255, alpha = 2/255, 7
    steps (MNIST: eps 0.3, alpha 0.01, 40 steps). ``norm='l2'`` trains
    against L2 PGD. ``eps_warmup=f`` ramps eps (and alpha with it) linearly
    from 0 over the first fraction f of the optimizer steps (not in the
    paper; off by default; the short embedded-MNIST default run uses it).
    """

    name = "pgd"

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7, *, norm: str = "linf",
                 random_start: bool = True, eps_warmup: float = 0.0, attack_mode: str = "train"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.norm, self.random_start, self.attack_mode = norm, bool(random_start), attack_mode
        self.eps_warmup = _check_pos("eps_warmup", eps_warmup)

    def attack(self):
        from fastadv.attacks import PGD

        eps = self.ramp(self.eps, self.eps_warmup)
        alpha = self.alpha * eps / self.eps if self.eps > 0 else self.alpha
        return PGD(self.ctx.attack_net, eps=eps, alpha=alpha, steps=self.steps, norm=self.norm,
                   random_start=self.random_start, **self.attack_kwargs())

    def loss(self, x, y):
        x_adv = self.attack()(x, y)
        logits = self.forward(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)


def trades_kl(logits_adv: torch.Tensor, logits_clean: torch.Tensor) -> torch.Tensor:
    """KL(softmax(clean) || softmax(adv)), summed over classes, mean over the batch (TRADES' 'batchmean')."""
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")


class TRADES(Method):
    """TRADES: CE(f(x), y) + beta * KL(f(x) || f(x')), x' = argmax_{||x'-x||_inf <= eps} KL(f(x) || f(x')).

    Zhang, Yu, Jiao, Xing, El Ghaoui & Jordan, "Theoretically Principled
    Trade-off between Robustness and Accuracy", ICML 2019. The inner
    maximization starts at x + 0.001 * N(0, I) and ascends the KL with
    L-inf PGD steps, in eval mode (as the paper's code). Uses
    ``fastadv.attacks.TRADESAttack``.

    Defaults: the paper's CIFAR-10 setting, beta = 6, eps = 8/255 (0.031),
    alpha = 0.007, 10 steps. MNIST (the paper's 99.48% / 96.07% row): beta = 1/lambda = 6,
    eps 0.3, alpha 0.01, 40 steps (the official MNIST script defaults to beta 1).
    """

    name = "trades"
    attack_mode = "eval"

    def __init__(self, eps: float = 8 / 255, alpha: float = 0.007, steps: int = 10, *, beta: float = 6.0,
                 attack_mode: str = "eval"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.beta = _check_pos("beta", beta)
        self.attack_mode = attack_mode

    def inner(self, x, y):
        from fastadv.attacks import TRADESAttack

        return TRADESAttack(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                            **self.attack_kwargs())(x, y)

    def loss(self, x, y):
        x_adv = self.inner(x, y)
        # one forward over [x; x_adv] instead of two: one weight read and one
        # launch per layer, and BN sees the batch TRADES' code feeds it
        logits = self.forward(torch.cat([x, x_adv]))
        clean, adv = logits[: x.shape[0]], logits[x.shape[0]:]
        loss = F.cross_entropy(clean, y) + self.beta * trades_kl(adv, clean)
        return StepOutput(loss, adv, y)


def tau_schedule(epoch: int, epochs: int, tau_max: int = 2, milestones: Sequence[float] = (50 / 120, 90 / 120)) -> int:
    """FAT's dynamic tau: 0 up to 50/120 of training, 1 up to 90/120, then 2 (the paper's 120-epoch
    CIFAR-10 schedule, as fractions), capped at tau_max."""
    frac = epoch / max(1, epochs)
    return min(tau_max, sum(frac >= m for m in milestones))


class FAT(Method):
    """Friendly adversarial training: train on early-stopped PGD examples.

    Zhang, Xu, Han, Niu, Cui, Sugiyama & Kankanhalli, "Attacks Which Do Not
    Kill Training Make Adversarial Learning Stronger", ICML 2020. Each
    sample's PGD stops ``tau`` steps after it is first misclassified
    (``fastadv.attacks.EarlyStoppedPGD``, with batch compaction: stopped
    samples leave the forward pass). tau follows the paper's dynamic
    schedule (:func:`tau_schedule`: 0, then 1 after 50/120 of the epochs,
    then 2 after 90/120) unless ``tau`` is fixed.

    ``trades=True`` gives FAT for TRADES: the loss is TRADES' with beta, on
    the early-stopped examples (the paper's section 5 variant).

    Defaults: the paper's CIFAR-10 setting, eps = 8/255, alpha = 2/255, 10
    steps, random start, dynamic tau (max 2); beta = 6 with trades.
    """

    name = "fat"

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, *, tau: int | None = None,
                 tau_max: int = 2, trades: bool = False, beta: float = 6.0, random_start: bool = True,
                 attack_mode: str = "train"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.fixed_tau = None if tau is None else _check_int("tau", tau, 0)
        self.tau_max = _check_int("tau_max", tau_max, 0)
        self.trades, self.beta = bool(trades), _check_pos("beta", beta)
        self.random_start, self.attack_mode = bool(random_start), attack_mode
        self.tau = self.fixed_tau or 0

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        self.tau = self.fixed_tau if self.fixed_tau is not None else tau_schedule(epoch, epochs, self.tau_max)

    def loss(self, x, y):
        from fastadv.attacks import EarlyStoppedPGD

        atk = EarlyStoppedPGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps, tau=self.tau,
                              random_start=self.random_start, **self.attack_kwargs())
        x_adv = atk(x, y)
        if not self.trades:
            logits = self.forward(x_adv)
            return StepOutput(F.cross_entropy(logits, y), logits, y)
        logits = self.forward(torch.cat([x, x_adv]))
        clean, adv = logits[: x.shape[0]], logits[x.shape[0]:]
        return StepOutput(F.cross_entropy(clean, y) + self.beta * trades_kl(adv, clean), adv, y)


class FastAT(Method):
    """Fast adversarial training: FGSM from a random start, with a cyclic learning rate.

    Wong, Rice & Kolter, "Fast is better than free: Revisiting adversarial
    training", ICLR 2020. delta ~ U[-eps, eps]^d, one signed-gradient step of
    alpha = 1.25 eps, projected to the eps ball and the box: exactly
    ``fastadv.attacks.PGD(steps=1, alpha=1.25 eps, random_start=True)``. The
    loop gives this method the triangular (cyclic) learning rate of the paper
    (0 -> lr_max at 2/5 of training -> 0, lr_max = 0.2 for CIFAR-10) unless
    another schedule is asked for.

    Defaults: eps = 8/255, alpha = 1.25 * eps = 10/255 (MNIST: eps 0.3, alpha 0.375).
    """

    name = "fast"
    default_schedule = "cyclic"

    def __init__(self, eps: float = 8 / 255, alpha: float | None = None, *, attack_mode: str = "train"):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.alpha = 1.25 * self.eps if alpha is None else _check_pos("alpha", alpha)
        self.attack_mode = attack_mode

    def loss(self, x, y):
        from fastadv.attacks import PGD

        x_adv = PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=1, random_start=True,
                    **self.attack_kwargs())(x, y)
        logits = self.forward(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)


class FreeAT(Method):
    """Free adversarial training: m replays of each minibatch, one backward for weights and perturbation.

    Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein,
    "Adversarial Training for Free!", NeurIPS 2019. For each minibatch,
    m times: loss = CE(f(clip(x + delta)), y); one backward gives the weight
    gradient (optimizer step) and grad_delta; then
    delta <- clamp(delta + eps * sign(grad_delta), -eps, eps) (the fused
    ``fastadv.ops.linf_step`` with alpha = eps, which also keeps x + delta in
    the box). delta carries over to the next minibatch. The loop runs
    ``epochs`` passes over the data in total, i.e. epochs/m "simulated"
    epochs of the paper, and m optimizer steps per batch.

    Defaults: the paper's CIFAR-10 setting, eps = 8/255, m = 8.
    """

    name = "free"

    def __init__(self, eps: float = 8 / 255, replays: int = 8):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.replays = _check_int("replays", replays, 1)
        self._delta: torch.Tensor | None = None
        self._x0 = None
        self._xadv = None

    def loss(self, x, y):
        if self._delta is None or self._delta.shape != x.shape or self._delta.device != x.device:
            self._delta = torch.zeros_like(x)
        # x + delta clipped to the box: the leaf whose gradient drives the next delta
        xadv = (x + self._delta).clamp_(0.0, 1.0).requires_grad_(True)
        self._x0, self._xadv = x, xadv
        logits = self.forward(xadv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)

    def after_backward(self):
        g = self._xadv.grad
        if g is None:
            return
        x_new = ops.linf_step(self._xadv.detach(), self._x0, g, self.eps, self.eps)
        self._delta = (x_new - self._x0).detach()
        self._xadv = self._x0 = None

    def state_dict(self):
        return {"delta": self._delta.cpu() if self._delta is not None else None}

    def load_state_dict(self, state):
        d = state.get("delta")
        self._delta = d.to(self.ctx.device) if (d is not None and self.ctx is not None) else d


def load_static_model(path_or_module, build=None, device="cpu") -> nn.Module:
    """A frozen model for ensemble training: an nn.Module, or a checkpoint path.

    A path may hold a fastadv checkpoint (its 'model' entry) or a plain state
    dict; ``build()`` makes the architecture. Loaded with weights_only=True.
    """
    if isinstance(path_or_module, nn.Module):
        m = path_or_module
    else:
        if build is None:
            raise ValueError("static models given as paths need an architecture: pass build=callable")
        state = torch.load(path_or_module, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        m = build()
        try:
            m.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"static model {path_or_module} does not match the architecture: {exc}") from exc
    m = m.to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class EnsembleAT(Method):
    """Ensemble adversarial training: half clean, half adversarial, the adversarial half
    alternately from the current model and transferred from static pre-trained models.

    Tramer, Kurakin, Papernot, Goodfellow, Boneh & McDaniel, "Ensemble
    Adversarial Training: Attacks and Defenses", ICLR 2018. Each batch is
    split in two halves: the first stays clean; the second is replaced by
    R+FGSM examples (``fastadv.attacks.RFGSM``: a random step of alpha, then
    an FGSM step of eps - alpha) crafted on a source model that cycles, batch
    by batch, through [current model, static_1, ..., static_k]. The static
    models (the user's pre-trained checkpoints) are frozen and never trained.

    loss = (sum_clean CE + adv_weight * sum_adv CE) / (n_clean + adv_weight * n_adv)
    (Kurakin et al. 2017's weighted form; adv_weight = 1 is the plain mean).

    Defaults: the paper's ImageNet values scaled to [0, 1]: eps = 16/255,
    alpha = eps / 2; adv_weight = 1.
    """

    name = "ensemble"

    def __init__(self, static_models: Sequence = (), eps: float = 16 / 255, alpha: float | None = None, *,
                 adv_weight: float = 1.0, attack_mode: str = "eval"):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.alpha = self.eps / 2 if alpha is None else _check_pos("alpha", alpha)
        if self.alpha > self.eps:
            raise ValueError(f"alpha must be <= eps, got alpha={self.alpha} > eps={self.eps}")
        self.adv_weight = _check_pos("adv_weight", adv_weight)
        self.attack_mode = attack_mode
        self._static = list(static_models)
        self.counter = 0

    def bind(self, ctx):
        super().bind(ctx)
        self._static = [load_static_model(m, device=ctx.device) if isinstance(m, nn.Module) else m
                        for m in self._static]
        for m in self._static:
            if not isinstance(m, nn.Module):
                raise TypeError("static_models must be nn.Modules here; load paths with load_static_model(path, build)")
        return self

    @property
    def sources(self) -> int:
        return 1 + len(self._static)

    def loss(self, x, y):
        from fastadv.attacks import RFGSM

        b = x.shape[0]
        h = b // 2
        src = self.counter % self.sources
        self.counter += 1
        net = self.ctx.attack_net if src == 0 else self._static[src - 1]
        mode = self.attack_mode if src == 0 else "as-is"  # static models stay in eval
        x_adv = RFGSM(net, eps=self.eps, alpha=self.alpha, model_mode=mode, autocast=self.ctx.amp)(x[h:], y[h:])
        xb = torch.cat([x[:h], x_adv])
        logits = self.forward(xb)
        per = F.cross_entropy(logits, y, reduction="none")
        w = torch.ones_like(per)
        w[h:] = self.adv_weight
        loss = (per * w).sum() / w.sum()
        return StepOutput(loss, logits[h:], y[h:])

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = int(state.get("counter", 0))


def _mixup(x, y, lam, perm):
    return lam * x + (1 - lam) * x[perm], y, y[perm]


class IAT(Method):
    """Interpolated adversarial training: mixup on clean and on adversarial examples.

    Lamb, Verma, Kannala & Bengio, "Interpolated Adversarial Training:
    Achieving Robust Neural Networks without Sacrificing Too Much Accuracy",
    AISec 2019. With lam ~ Beta(mix_alpha, mix_alpha) and a random pairing:
    loss = 1/2 [ mixCE(f(lam x + (1-lam) x_p)) + mixCE(f(lam x' + (1-lam) x'_p)) ],
    mixCE = lam CE(., y) + (1-lam) CE(., y_p), x' = PGD(x) (``fastadv.attacks.PGD``).

    Defaults: the paper's CIFAR-10 setting with input mixup, mix_alpha = 1.0,
    PGD eps = 8/255, alpha = 2/255, 7 steps.
    """

    name = "iat"

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7, *, mix_alpha: float = 1.0,
                 attack_mode: str = "train"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.mix_alpha = _check_pos("mix_alpha", mix_alpha, allow_zero=False)
        self.attack_mode = attack_mode

    def loss(self, x, y):
        from fastadv.attacks import PGD

        x_adv = PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                    **self.attack_kwargs())(x, y)
        # lam from the torch RNG (not numpy) so checkpoints restore it exactly
        lam = float(torch.distributions.Beta(self.mix_alpha, self.mix_alpha).sample())
        perm = torch.randperm(x.shape[0], device=x.device)
        xm = lam * x + (1 - lam) * x[perm]
        xam = lam * x_adv + (1 - lam) * x_adv[perm]
        logits = self.forward(torch.cat([xm, xam]))
        yy, yp = torch.cat([y, y]), torch.cat([y[perm], y[perm]])
        loss = lam * F.cross_entropy(logits, yy) + (1 - lam) * F.cross_entropy(logits, yp)
        return StepOutput(loss, logits[x.shape[0]:], y)


def penultimate_features(net: nn.Module) -> nn.Module:
    """The last nn.Linear of ``net`` (its input is the embedding the metric method uses)."""
    last = None
    for m in net.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("the metric method needs a model whose classifier is an nn.Linear (its input is the embedding)")
    return last


class _Embed:
    """Capture the classifier's input (the embedding) during a forward pass."""

    def __init__(self, layer: nn.Module):
        self.layer, self.value, self.handle = layer, None, None

    def __enter__(self):
        def hook(mod, inputs):
            self.value = inputs[0]

        self.handle = self.layer.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def triplet_terms(emb_anchor, emb_clean, y_anchor, y_clean, margin: float, exclude_self: bool = True):
    """Mao et al.'s triplet: anchor = adversarial embedding, positive = a clean embedding
    of the same class (another sample when the batch has one), negative = the nearest
    clean embedding of another class. L2-normalised embeddings; returns the mean hinge
    max(0, ||a - p|| - ||a - n|| + margin) over anchors that have both."""
    a = F.normalize(emb_anchor.float(), dim=1)
    c = F.normalize(emb_clean.float(), dim=1)
    d = torch.cdist(a, c)  # (B, B)
    same = y_anchor[:, None] == y_clean[None, :]
    n = a.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=a.device) if (exclude_self and c.shape[0] == n) else None
    # positive: a random clean same-class sample; the anchor's own clean twin is
    # used only when the class has no other member in the batch
    scores = torch.rand(d.shape, device=d.device)
    pos_mask = same.clone()
    if eye is not None:
        only_self = (same & ~eye).sum(1) == 0
        pos_mask = torch.where(only_self[:, None], same, same & ~eye)
    pos_idx = torch.where(pos_mask, scores, torch.full_like(scores, -1.0)).argmax(1)
    neg_d = torch.where(~same, d, torch.full_like(d, math.inf))
    has = pos_mask.any(1) & (~same).any(1)
    if not bool(has.any()):
        return d.sum() * 0.0
    d_pos = d.gather(1, pos_idx[:, None]).squeeze(1)
    d_neg = neg_d.min(1).values
    return F.relu(d_pos - d_neg + margin)[has].mean()


class MetricAT(Method):
    """Metric learning against sensitivity and invariance attacks.

    Sensitivity: Mao, Zhong, Yang, Vondrick & Ray, "Metric Learning for
    Adversarial Robustness", NeurIPS 2019 (TLA): loss = CE(f(x'), y)
    + lam_triplet * triplet + lam_norm * mean ||emb||_2, where the anchor is
    the adversarial embedding emb(x') (x' = ``fastadv.attacks.PGD``), the
    positive a clean example of the same class and the negative the nearest
    clean example of another class (the embedding is the classifier's input).

    Invariance (Tramer, Behrmann, Carlini, Papernot & Jacobsen, "Fundamental
    Tradeoffs between Invariance and Sensitivity to Adversarial
    Perturbations", ICML 2020): with ``invariance_weight > 0``,
    ``fastadv.attacks.InvarianceAttack`` (reference set: the batch itself,
    or ``invariance_ref=(x_ref, y_ref)``; radius ``inv_eps``, default 0.4,
    the paper's L-inf MNIST value) moves x to its nearest reference r of
    another class t. Where x_inv reaches r, its true label is t although it
    lies within inv_eps of x: it is trained with CE toward t and enters the
    triplet as an anchor of class t (positive: a clean t, negative: the
    nearest clean other class, usually y). Samples that cannot reach r are
    dropped (their label is ambiguous).

    Optional optimal-transport regularizer (``ot_weight > 0``): the
    entropic OT cost (``fastadv.ops.sinkhorn``, squared Euclidean cost between
    L2-normalised embeddings, reg ``ot_reg``) between the clean and the perturbed embedding distributions
    of the batch, pulling the two clouds together.

    Defaults (ours, chosen on MNIST; the paper tunes its weights per
    dataset): triplet_weight = 0.5, norm_weight = 0.01, margin = 0.03 on
    L2-normalised embeddings; PGD eps = 8/255, alpha = 2/255, 7 steps;
    invariance and OT off.
    """

    name = "metric"

    def __init__(self, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 7, *, triplet_weight: float = 0.5,
                 norm_weight: float = 0.01, margin: float = 0.03, invariance_weight: float = 0.0,
                 ot_weight: float = 0.0, ot_reg: float = 0.1, ot_iters: int = 50, inv_eps: float = 0.4,
                 inv_norm: str = "linf", invariance_ref=None, attack_mode: str = "train"):
        super().__init__()
        self.inv_eps, self.inv_norm = _check_pos("inv_eps", inv_eps), inv_norm
        self.invariance_ref = invariance_ref
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.triplet_weight = _check_pos("triplet_weight", triplet_weight)
        self.norm_weight = _check_pos("norm_weight", norm_weight)
        self.margin = _check_pos("margin", margin)
        self.invariance_weight = _check_pos("invariance_weight", invariance_weight)
        self.ot_weight = _check_pos("ot_weight", ot_weight)
        self.ot_reg = _check_pos("ot_reg", ot_reg, allow_zero=False)
        self.ot_iters = _check_int("ot_iters", ot_iters, 1)
        self.attack_mode = attack_mode

    def _invariance(self, x, y):
        """Invariance examples from the batch itself as the reference set: x_inv = x moved toward its
        nearest other-class neighbour r within inv_eps. Only samples that REACH r (distance <= inv_eps)
        have an unambiguous label (r's class t); the rest are dropped."""
        from fastadv.attacks import InvarianceAttack

        x_ref, y_ref = (x, y) if self.invariance_ref is None else self.invariance_ref
        atk = InvarianceAttack(self.ctx.attack_net, x_ref, y_ref, eps=self.inv_eps, norm=self.inv_norm)
        x_inv, t = atk(x, y)
        _, dist = atk.nearest_other(x, y)
        keep = dist <= self.inv_eps * (1 + 1e-6)
        return x_inv[keep], t[keep]

    def loss(self, x, y):
        from fastadv.attacks import PGD

        b = x.shape[0]
        x_adv = PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                    **self.attack_kwargs())(x, y)
        parts = [x, x_adv]
        y_inv = y[:0]
        if self.invariance_weight > 0:
            x_inv, y_inv = self._invariance(x, y)
            parts.append(x_inv)
        layer = penultimate_features(self.ctx.net)
        with _Embed(layer) as cap:
            logits = self.forward(torch.cat(parts))
        emb = cap.value.flatten(1)
        emb_clean, emb_adv = emb[:b], emb[b:2 * b]
        loss = F.cross_entropy(logits[b:2 * b], y)
        loss = loss + self.triplet_weight * triplet_terms(emb_adv, emb_clean, y, y, self.margin)
        loss = loss + self.norm_weight * emb[b:].norm(dim=1).mean()
        if self.invariance_weight > 0 and y_inv.numel():
            loss = loss + self.invariance_weight * (
                F.cross_entropy(logits[2 * b:], y_inv)
                + triplet_terms(emb[2 * b:], emb_clean, y_inv, y, self.margin, exclude_self=False))
        if self.ot_weight > 0:
            loss = loss + self.ot_weight * ot_regularizer(emb_clean, emb[b:], self.ot_reg, self.ot_iters)
        return StepOutput(loss, logits[b:2 * b], y)


def ot_regularizer(emb_a: torch.Tensor, emb_b: torch.Tensor, reg: float = 0.1, iters: int = 50) -> torch.Tensor:
    """Entropic OT cost OT_reg between the empirical distributions of two embedding clouds
    (uniform weights; C_ij = ||a_i - b_j||^2 on L2-normalised embeddings, as the triplet
    term uses, so C is in [0, 4] and ``reg`` has a fixed scale).

    Computed by the batched Sinkhorn ``fastadv.ops.sinkhorn`` (one problem),
    which is differentiable in the cost by the envelope theorem (dOT/dC = P),
    so the gradient reaches both embedding clouds through C.
    """
    cost = torch.cdist(F.normalize(emb_a.float(), dim=1), F.normalize(emb_b.float(), dim=1)).pow(2)
    n, m = cost.shape
    a = torch.full((1, n), 1.0 / n, device=cost.device, dtype=cost.dtype)
    b = torch.full((1, m), 1.0 / m, device=cost.device, dtype=cost.dtype)
    return ops.sinkhorn(a, b, cost[None], reg, max_iter=iters)[0]


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

    Defaults: eps = 0.1 (the paper's CIFAR-10 radius; MNIST is reported at
    1.0), alpha = 0.1 (the attack's MNIST step), 20 attack steps (the
    attack's evaluation default is 200: fewer keep a training step
    affordable). Extra keyword arguments go to WassersteinPGD (kernel_size,
    p, reg, ...).
    """

    name = "wasserstein"

    def __init__(self, eps: float = 0.1, steps: int = 20, *, alpha: float = 0.1, eps_start: float | None = None,
                 eps_growth: float = 1.1, attack_mode: str = "train", **attack_kwargs):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.steps = _check_int("steps", steps, 1)
        self.alpha = _check_pos("alpha", alpha)
        self.eps_start = None if eps_start is None else _check_pos("eps_start", eps_start)
        self.eps_growth = _check_pos("eps_growth", eps_growth, allow_zero=False)
        self.attack_mode = attack_mode
        self.extra = dict(attack_kwargs)
        self.current_eps = self.eps if self.eps_start is None else self.eps_start

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        if self.eps_start is not None:
            self.current_eps = min(self.eps, self.eps_start * self.eps_growth ** epoch)

    def loss(self, x, y):
        from fastadv.attacks.wasserstein import WassersteinPGD

        x_adv = WassersteinPGD(self.ctx.attack_net, eps=self.current_eps, alpha=self.alpha, steps=self.steps,
                               **self.extra, **self.attack_kwargs())(x, y)
        logits = self.forward(x_adv)
        return StepOutput(F.cross_entropy(logits, y), logits, y)


METHODS = {
    "standard": Standard,
    "pgd": PGDAT,
    "trades": TRADES,
    "fat": FAT,
    "fast": FastAT,
    "free": FreeAT,
    "ensemble": EnsembleAT,
    "iat": IAT,
    "metric": MetricAT,
    "wasserstein": WassersteinAT,
}


def get_method(name: str, **kwargs) -> Method:
    """Build method ``name`` (a key of METHODS) with keyword arguments (see each class)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name](**kwargs)
