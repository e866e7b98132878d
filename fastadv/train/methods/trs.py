"""TRS: Transferability Reduced Smooth ensemble training (Yang et al. 2021)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack
from fastadv.attacks.pgd import random_start
from fastadv.models.ensemble import Ensemble
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos


def magnitude(g: torch.Tensor) -> torch.Tensor:
    """The reference's ``Magnitude``: 2 * mean_b ||g_b||_2^2 for flattened gradients g (B, D)."""
    return g.pow(2).sum(1).mean() * 2


def pairwise_abs_cosine(grads) -> torch.Tensor:
    """Mean over member pairs i < j of mean_b |cos(g_i[b], g_j[b])| (the reference's ``Cosine`` per pair).

    grads: a sequence of M >= 2 tensors (B, D). ``F.cosine_similarity`` clamps each norm at 1e-8, so a
    zero gradient gives cosine 0, not NaN.
    """
    m = len(grads)
    total, pairs = 0, 0
    for i in range(m):
        for j in range(i + 1, m):
            total = total + F.cosine_similarity(grads[i], grads[j]).abs().mean()
            pairs += 1
    return total / pairs


def member_input_grads(z: torch.Tensor, y: torch.Tensor, xr: torch.Tensor, create_graph: bool = True):
    """(per-member CE (M,), [d CE_m / d x flattened (B, D)] * M) for stacked member logits z (M, B, K) at xr.

    CE_m is the batch MEAN (the reference's ``nn.CrossEntropyLoss()``), so each gradient row is 1/B times the
    per-sample one.
    """
    ces, grads = [], []
    for m in range(z.shape[0]):
        ce = F.cross_entropy(z[m].float(), y)
        g = torch.autograd.grad(ce, xr, create_graph=create_graph, retain_graph=True)[0]
        ces.append(ce)
        grads.append(g.flatten(1))
    return torch.stack(ces), grads


class TRS(Method):
    """TRS: summed member CE + gradient-diversity and smoothness penalties on the members' input gradients.

    Yang, Li, Xu, Zuo, Chen, Rubinstein, Zhou, Zhang & Li, "TRS:
    Transferability Reduced Ensemble via Promoting Gradient Diversity and
    Model Smoothness", NeurIPS 2021; reference code
    AI-secure/Transferability-Reduced-Smooth-Ensemble
    (train/Empirical/trainer.py ``TRS_Trainer``, train_trs.py). The trainer's
    network is a ``fastadv.models.Ensemble`` of M >= 2 members, all trained
    (the reference optimizes all members' parameters with one Adam). With
    g_m(x) = d CE(h_m(x), y) / dx (CE the batch mean, so 1/B per sample) and
    B the batch size::

        loss = sum_m CE(h_m(x), y)
             + scale * ( coeff * mean_{i<j} mean_b |cos(g_i(x_b), g_j(x_b))|
                       + lamda * 1/M * sum_m 2 * mean_b ||g_m(x~_b)||^2 )

    * cosine term: at the clean batch, over all M(M-1)/2 pairs (the reference
      hard-codes 3 members: pairs 01, 02, 12, divided by 3);
    * smoothness term with ``plus_adv=True`` (the reference's training script):
      x~ = [x_1..x_{B/2}, PGD points for the other half], the PGD MAXIMIZING
      the members' summed gradient magnitude (1/M) sum_m 2 mean_b ||g_m||^2
      (not CE) with 6 steps of eps/3 from a uniform start in the L-inf ball
      of radius eps_t = init_eps + (adv_eps - init_eps) * epoch / epochs
      (epoch 0-based, as the reference's); ``plus_adv=False``: x~ = x.
      The reference sets ``adv.requires_grad`` once and calls ``backward()``
      each step without zeroing ``adv.grad``, so step t moves along the sign
      of the SUM of the gradients of steps 1..t; ``accumulate_grad=True``
      (default) does the same, ``False`` gives plain PGD steps.
      The inner maximization differentiates through input gradients (double
      backward) and runs with batch norm as the training forwards (the
      reference leaves the members in train mode): ``attack_mode='train'``.
    * StepOutput logits: the ensemble's combined output at the clean batch.

    Defaults: the reference's scripts (utils/Empirical/script_train.py and the
    required train_trs.py flags): coeff = 2, lamda = 2, scale = 5 (so the
    paper's lambda_a = scale * coeff = 10 and lambda_b = scale * lamda = 10),
    plus_adv = True, init_eps = 0.1, adv_eps = 0.2, 6 steps of eps/3; Adam
    lr 1e-3 (eps 1e-7), weight decay 1e-4, 120 epochs, lr x 0.1 every 40 epochs,
    batch 128, 3 members (ResNet-20 on CIFAR-10). The script's eps values are the
    ones it sets for MNIST; the paper's per-dataset values could not be read here.

    Deliberate differences: with ``plus_adv=False`` the reference runs a second
    clean forward for the smoothness term; its gradients are the cosine term's
    (same batch, same batch statistics), so we reuse them: one batch-norm
    running-average update per step instead of two. The smoothness PGD
    projects with the fused step clip(x0 + clamp(x' - x0, -eps, eps)) instead
    of min/max then clamp (equal up to float32 rounding), and draws its start
    from the torch RNG like the reference. The PGD's backward is
    ``autograd.grad`` to the input only; the reference's ``backward()`` also
    filled parameter ``.grad`` fields that its ``zero_grad`` then discarded.

    Needs double backward: not with ``torch.compile`` (``--compile``);
    under DDP untested.
    """

    name = "trs"
    attack_mode = "train"
    default_lr = {"adam": 1e-3}  # the reference's Adam learning rate (train_trs.py --lr)

    def __init__(self, scale: float = 5.0, coeff: float = 2.0, lamda: float = 2.0, *, plus_adv: bool = True,
                 init_eps: float = 0.1, adv_eps: float = 0.2, steps: int = 6, accumulate_grad: bool = True,
                 attack_mode: str = "train"):
        super().__init__()
        self.scale = _check_pos("scale", scale)
        self.coeff = _check_pos("coeff", coeff)
        self.lamda = _check_pos("lamda", lamda)
        self.plus_adv = bool(plus_adv)
        self.init_eps = _check_pos("init_eps", init_eps)
        self.adv_eps = _check_pos("adv_eps", adv_eps)
        self.steps = _check_int("steps", steps, 1)
        self.accumulate_grad = bool(accumulate_grad)
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("train", "eval"))
        self.last: dict = {}
        self._sums = {"cos": 0.0, "smooth": 0.0, "n": 0}

    def bind(self, ctx):
        super().bind(ctx)
        if not isinstance(ctx.net, Ensemble):
            raise TypeError(f"TRS trains a fastadv.models.Ensemble of >= 2 members; the network is a "
                            f"{type(ctx.net).__name__}: pass Ensemble([member, member, ...])")
        if len(ctx.net) < 2:
            raise ValueError(f"TRS needs an Ensemble of >= 2 members, got {len(ctx.net)}")
        if hasattr(ctx.model, "_orig_mod"):
            raise ValueError("TRS differentiates through input gradients (double backward), which torch.compile "
                             "does not support: train without compile")
        return self

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        self._sums = {"cos": 0.0, "smooth": 0.0, "n": 0}

    def current_eps(self) -> float:
        """eps_t = init_eps + (adv_eps - init_eps) * epoch / epochs (the reference's ``cureps``)."""
        return (self.adv_eps - self.init_eps) * self.epoch / self.epochs + self.init_eps

    def members(self, x: torch.Tensor) -> torch.Tensor:
        """Stacked member logits (M, B, K) through the training model (DDP if any)."""
        return self.ctx.model(x, per_member=True)

    def smooth_pgd(self, x: torch.Tensor, y: torch.Tensor, eps: float, generator=None) -> torch.Tensor:
        """Points of large input-gradient norm: ``steps`` signed steps of eps/3 on (1/M) sum_m magnitude(g_m),
        from clip(x + U(-eps, eps)) (drawn from ``generator``, default the torch RNG as the reference)."""
        net = self.ctx.net
        guard = Attack(net, model_mode=self.attack_mode)
        b = x.shape[0]
        e = engine._expand(eps, b, x.device)
        a = engine._expand(eps / 3.0, b, x.device)
        adv = random_start("linf", x, e, (0.0, 1.0), generator)
        total = None
        with guard.model_context(), torch.enable_grad():
            for _ in range(self.steps):
                xr = adv.detach().requires_grad_(True)
                _, grads = member_input_grads(net(xr, per_member=True), y, xr)
                obj = sum(magnitude(g) for g in grads) / len(grads)
                g = torch.autograd.grad(obj, xr)[0]
                # the reference never zeroes adv.grad inside its loop: step t follows the SUM of gradients 1..t
                total = g if (total is None or not self.accumulate_grad) else total + g
                adv = ops.linf_step(adv.detach(), x, total, a, e, clip=(0.0, 1.0))
        return adv.detach()

    def loss(self, x, y):
        xr = x.detach().requires_grad_(True)
        z = self.members(xr)
        ces, grads = member_input_grads(z, y, xr)
        cos = pairwise_abs_cosine(grads)
        m = len(grads)
        if self.plus_adv:
            h = x.shape[0] // 2
            adv = self.smooth_pgd(x[h:].detach(), y[h:], self.current_eps())
            xs = torch.cat([x[:h].detach(), adv]).requires_grad_(True)
            _, sgrads = member_input_grads(self.members(xs), y, xs)
        else:
            sgrads = grads
        smooth = sum(magnitude(g) for g in sgrads) / m
        loss = ces.sum() + self.scale * (self.coeff * cos + self.lamda * smooth)
        # detached tensors, summed on the device: no host sync per step (read once per epoch)
        self.last = {"cos": cos.detach(), "smooth": smooth.detach()}
        self._sums["cos"] = self._sums["cos"] + self.last["cos"]
        self._sums["smooth"] = self._sums["smooth"] + self.last["smooth"]
        self._sums["n"] += 1
        with torch.no_grad():
            logits = self.ctx.net.combine_logits(z.detach())
        return StepOutput(loss, logits, y)

    def epoch_metrics(self) -> dict:
        n = max(self._sums["n"], 1)
        return {"trs_cos": float(self._sums["cos"]) / n, "trs_smooth": float(self._sums["smooth"]) / n}


__all__ = ["TRS", "pairwise_abs_cosine", "magnitude", "member_input_grads"]
