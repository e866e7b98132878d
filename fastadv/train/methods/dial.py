"""DIAL: Domain Invariant Adversarial Learning (Levi, Attias & Kontorovich, TMLR 2022)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadv import ops
from fastadv.attacks import PGD
from fastadv.models.heads import (DOMAIN_HEADS, FeatureTap, broadcast_module, dann_lambda, domain_head, feature_layer,
                                  grad_reverse)
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos
from fastadv.train.methods.trades import trades_kl

#: The reference's MNIST recipe (train_dial_mnist.py; SmallCNN, 100 epochs, SGD lr 0.01, momentum 0.9, no weight
#: decay, lr x0.1 at 55%, x0.01 at 75%, x0.001 at 90% of the epochs): ``DIAL(**DIAL_MNIST)``.
DIAL_MNIST = dict(variant="ce", beta=6.0, domain_weight=0.1, eps=0.3, alpha=0.01, steps=40)
#: CIFAR-100 (train_dial_cifar100.py, PreAct ResNet-18): the 3-layer domain head, beta 6, domain weight 4.
DIAL_CIFAR100 = dict(variant="kl", beta=6.0, domain_weight=4.0, head="mlp")
SCHEDULES = ("reference", "per_step")


def dial_progress(batch_idx: int, epoch: int, epochs: int, dataset_len: int) -> float:
    """The reference's training progress p (train_utils.adjust_alpha), epoch counted from 1:
    p = (batch_idx + epoch * dataset_len) / epochs / dataset_len = epoch / epochs + batch_idx / (epochs * dataset_len).

    batch_idx counts batches but dataset_len counts samples, so within an epoch p moves by at most
    1 / (epochs * batch_size) (8e-5 at 100 epochs of 128): p is in effect epoch / epochs, from 1 / epochs
    in the first epoch to 1 in the last."""
    return (batch_idx + epoch * dataset_len) / epochs / dataset_len


def dial_loss(logits_clean, logits_adv, dom_clean, dom_adv, y, *, beta: float, domain_weight: float,
              variant: str = "kl") -> tuple[torch.Tensor, dict]:
    """DIAL's objective from the forwards of x and x' (dial.py ``dial_loss``).

    logits_*: (B, K) class logits; dom_*: (B, 2) domain logits (computed behind the gradient-reversal layer);
    y: (B,) labels. Domain labels: 0 = natural, 1 = adversarial.

    kl: CE(f(x), y) + w CE(D(x), 0) + beta KL(f(x) || f(x'))_batchmean + w CE(D(x'), 1)   (DIAL_KL)
    ce: CE(f(x), y) + w CE(D(x), 0) + beta CE(f(x'), y)               + w CE(D(x'), 1)   (DIAL_CE)
    w = domain_weight. Returns (loss, unweighted terms)."""
    zeros = torch.zeros_like(y)
    terms = {"ce_clean": F.cross_entropy(logits_clean, y), "dom_clean": F.cross_entropy(dom_clean, zeros),
             "robust": trades_kl(logits_adv, logits_clean) if variant == "kl" else F.cross_entropy(logits_adv, y),
             "dom_adv": F.cross_entropy(dom_adv, zeros + 1)}
    loss = (terms["ce_clean"] + domain_weight * terms["dom_clean"]) + \
        (beta * terms["robust"] + domain_weight * terms["dom_adv"])
    return loss, terms


class _NoiseStartPGD(PGD):
    """L-inf CE PGD started at x + init_std * N(0, I) (projected into the ball and the box): DIAL's
    'linf_ce' inner loop, sign steps of the mean CE, projection and clamp after each."""

    def __init__(self, model, eps, alpha, steps, *, init_std: float = 0.001, **kwargs):
        super().__init__(model, eps, alpha, steps, random_start=False, **kwargs)
        self.init_std = float(init_std)

    def start(self, x0, eps):
        noise = torch.randn(x0.shape, device=x0.device, generator=self.generator) * self.init_std
        return x0 + ops.project_linf(noise, eps, x0=x0, clip=self.clip)


class DIAL(Method):
    """Domain Invariant Adversarial Learning: adversarial training whose features cannot tell natural
    from adversarial inputs, a DANN (Ganin & Lempitsky 2015) on the natural and adversarial "domains".

    Levi, Attias & Kontorovich, "Domain Invariant Adversarial Learning",
    TMLR 2022; reference code matanle51/DIAL (dial.py, train_utils.py,
    models/*DANN.py, train_dial_*.py), which we follow.

    A domain head D (:func:`fastadv.models.heads.domain_head`) reads the
    encoder's features h(x) (the input of ``feature_layer``, an nn.Linear of
    the network) through a gradient-reversal layer R (forward identity,
    backward -lam_p * grad):

        loss = CE(f(x), y) + w CE(D(R h(x)), 0) + beta L(f(x), f(x')) + w CE(D(R h(x')), 1)

    with L = KL(f(x) || f(x')) (batchmean) for ``variant='kl'`` (DIAL_KL) or
    CE(f(x'), y) for ``variant='ce'`` (DIAL_CE), w = ``domain_weight``
    (the code's ``domain_ratio``), domain labels 0 natural / 1 adversarial.
    D is trained to tell the domains apart (its gradient is w dCE/dtheta_D);
    the encoder receives -lam_p w dCE/dh through R, so it learns features D
    cannot separate. lam_p = 2 / (1 + exp(-10 p)) - 1 (the reversal ratio).

    x' (batch norm in eval mode, as the code's ``model.eval()``): for 'kl'
    TRADES' KL maximization (``fastadv.attacks.TRADESAttack``: start x +
    0.001 N(0, I), signed steps of the summed KL); for 'ce' signed PGD steps on
    CE from the same Gaussian start (the code's 'linf_ce'). Then, in train
    mode, separate forwards of x and x' (batch norm normalizes each set with
    its own statistics), D applied to each one's features.

    Progress p (``schedule``): 'reference' (default) as the code's
    ``adjust_alpha``, p = epoch / epochs + batch / (epochs * N) with the
    epoch counted from 1 and N the number of training samples (taken as
    steps_per_epoch x the global batch): in effect per epoch, lam_p from
    dann_lambda(1 / epochs) (0.050 at 100 epochs) in the first epoch to
    0.99991 in the last (see :func:`dial_progress`); 'per_step': DANN's
    p = step / total_steps, from 0.

    The domain head is method-owned: built at ``bind`` (its input width is
    ``feature_layer.in_features``), returned by ``extra_modules()`` so the
    trainer's optimizer trains it with the network (the reference optimizes
    ``model.parameters()``, head included, with the same SGD, weight decay
    and lr schedule), kept in train mode (its batch norm sees the natural and
    the adversarial batch separately), saved in ``state_dict()``; under
    torchrun rank 0's initial weights are broadcast.

    Heads (``head``, by the reference model): 'bn' Linear(d, 100) - BN - ReLU -
    Linear(100, 2) (SmallCNN MNIST, WRN-34-10 CIFAR-10), 'mlp' d-256-256-2 with
    ReLU (PreAct ResNet-18 CIFAR-100), 'linear' d-2 (PreAct ResNet-18 SVHN).
    Features: the reference reads the input of the class classifier: the
    flattened conv features of its SmallCNN (its classifier is an MLP), the
    pooled features of the ResNets. ``feature_layer='first_linear'``
    (default) picks the same place in our models: MnistCNN's flattened conv
    features (3136-d; the input of its first nn.Linear), the penultimate
    features of PreAct ResNet-18 / WRN / ResNet-50 (their only nn.Linear).

    Defaults: the reference's CIFAR-10 setting (train_dial_cifar10.py,
    WRN-34-10): DIAL_KL, beta 8, domain_weight 6, eps 8/255 (the code's
    0.031), alpha 0.007, 10 steps; its recipe is SGD lr 0.1, momentum 0.9,
    weight decay 7e-4, batch 128, 100 epochs, lr x0.1 at 75% and x0.01 at 90%.
    MNIST (``DIAL_MNIST``): DIAL_CE, beta 6, domain_weight 0.1, eps 0.3,
    alpha 0.01, 40 steps (SGD lr 0.01, no weight decay). CIFAR-100
    (``DIAL_CIFAR100``): DIAL_KL, beta 6, domain_weight 4, the 'mlp' head.
    These are the code's values; we could not read the paper's
    hyperparameter table, so where paper and code differ the code is what
    we followed.

    Deliberate differences: the Gaussian start is projected into the ball and
    the box before the first step (the code clamps only after it; as
    ``TRADESAttack``); the reference's SmallCNN (with dropout) is not our
    MnistCNN; no AWP (the code's optional DIAL-AWP).

    After each ``loss``: ``last_terms`` (the unweighted terms, detached),
    ``last_lambda`` (lam_p) and ``last_adv`` (x'). ``epoch_metrics()``:
    ``dial_lambda`` (the last lam_p) and ``dial_domain_acc`` (the domain head's
    accuracy on natural and adversarial inputs over the epoch, this rank).
    """

    name = "dial"
    attack_mode = "eval"

    def __init__(self, eps: float = 8 / 255, alpha: float = 0.007, steps: int = 10, *, variant: str = "kl",
                 beta: float = 8.0, domain_weight: float = 6.0, head: str = "bn", feature_layer: str = "first_linear",
                 schedule: str = "reference", attack_mode: str = "eval"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.variant = _check_choice("variant", variant, ("kl", "ce"))
        self.beta = _check_pos("beta", beta)
        self.domain_weight = _check_pos("domain_weight", domain_weight)
        self.head = _check_choice("head", head, DOMAIN_HEADS)
        if not isinstance(feature_layer, str):
            raise ValueError("feature_layer must be 'first_linear', 'last_linear' or a module name, "
                             f"got {feature_layer!r}")
        self.feature_layer = feature_layer
        self.schedule = _check_choice("schedule", schedule, SCHEDULES)
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("train", "eval"))
        self._layer = self._tap = None
        self._head: torch.nn.Module | None = None
        self._pending_state: dict | None = None
        self._dom_counts = None
        self._counts_epoch = -1  # the epoch _dom_counts belong to (a resume mid-epoch keeps them)
        self.last_terms: dict = {}
        self.last_lambda = 0.0
        self.last_adv = None

    # ------------------------------------------------------------ setup
    def bind(self, ctx):
        super().bind(ctx)
        self._layer = feature_layer(ctx.net, self.feature_layer)
        if self._tap is not None:
            self._tap.remove()
        self._tap = FeatureTap(self._layer, persistent=True)  # before any compiled call: see FeatureTap
        self._head = domain_head(self._layer.in_features, self.head).to(ctx.device)
        broadcast_module(self._head)
        self._dom_counts = torch.zeros(2, dtype=torch.float64, device=ctx.device)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        return self

    @property
    def domain_head(self) -> torch.nn.Module | None:
        """The domain classifier (None before ``bind``)."""
        return self._head

    def release(self):
        """Remove the feature tap's hook from the network (training is over)."""
        if getattr(self, "_tap", None) is not None:
            self._tap.remove()

    def extra_modules(self) -> list:
        return [] if self._head is None else [self._head]

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        if self._dom_counts is not None and epoch != self._counts_epoch:
            self._dom_counts.zero_()
            self._counts_epoch = int(epoch)

    # ---------------------------------------------------------- schedule
    def progress(self, batch: int) -> float:
        """Training progress p for the coming step (see the class docstring); ``batch``: this rank's batch size."""
        step = getattr(self, "step", 0)
        if self.schedule == "per_step":
            return step / max(1, getattr(self, "total_steps", 1))
        spe = max(1, self.ctx.steps_per_epoch if self.ctx is not None else 1)
        epochs = max(1, self.ctx.epochs if self.ctx is not None else self.epochs)
        epoch = step // spe  # == self.epoch in the trainer (replays = 1)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
        return dial_progress(step - epoch * spe, epoch + 1, epochs, spe * batch * world)

    def reversal(self, batch: int) -> float:
        """lam_p = dann_lambda(progress)."""
        return dann_lambda(self.progress(batch))

    # -------------------------------------------------------------- loss
    def inner(self, x, y):
        from fastadv.attacks import TRADESAttack

        kw = self.attack_kwargs()
        if self.variant == "kl":
            return TRADESAttack(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps, **kw)(x, y)
        return _NoiseStartPGD(self.ctx.attack_net, self.eps, self.alpha, self.steps, **kw)(x, y)

    def loss(self, x, y):
        if self._head is None:
            raise RuntimeError("DIAL.loss before bind(): the domain head is built at bind")
        lam = self.reversal(x.shape[0])
        x_adv = self.inner(x, y)
        with self._tap as tap:
            clean = self.forward(x)
            h_clean = tap.value.flatten(1)
            adv = self.forward(x_adv)
            h_adv = tap.value.flatten(1)
        dom_clean = self._head(grad_reverse(h_clean, lam)).float()
        dom_adv = self._head(grad_reverse(h_adv, lam)).float()
        loss, terms = dial_loss(clean, adv, dom_clean, dom_adv, y, beta=self.beta, domain_weight=self.domain_weight,
                                variant=self.variant)
        with torch.no_grad():
            right = (dom_clean.argmax(1) == 0).sum() + (dom_adv.argmax(1) == 1).sum()
            self._dom_counts += torch.stack([right.double(), right.new_tensor(2 * y.numel()).double()])
        self.last_terms = {k: v.detach() for k, v in terms.items()}
        self.last_lambda, self.last_adv = lam, x_adv
        return StepOutput(loss, adv, y)

    # ----------------------------------------------------------- reports
    def epoch_metrics(self) -> dict:
        if self._dom_counts is None:
            return {}
        right, n = self._dom_counts.tolist()
        return {"dial_lambda": float(self.last_lambda), "dial_domain_acc": right / n if n else float("nan")}

    def state_dict(self) -> dict:
        if self._head is None:
            return dict(self._pending_state or {})
        return {"domain_head": {k: v.detach().clone() for k, v in self._head.state_dict().items()},
                "last_lambda": float(self.last_lambda), "domain_counts": self._dom_counts.detach().cpu().clone(),
                "counts_epoch": self._counts_epoch}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self._head is None:  # not bound yet: applied at bind
            self._pending_state = dict(state)
            return
        self._pending_state = None
        if "domain_head" in state:
            self._head.load_state_dict(state["domain_head"])
        self.last_lambda = float(state.get("last_lambda", 0.0))
        if "domain_counts" in state:
            self._dom_counts.copy_(state["domain_counts"].to(self._dom_counts.device))
            self._counts_epoch = int(state.get("counts_epoch", -1))
