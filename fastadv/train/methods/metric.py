"""Metric learning against sensitivity and invariance attacks (Mao et al. 2019; Tramer et al. 2020)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastadv import ops
from fastadv.train.methods.base import Method, StepOutput, _check_int, _check_pos


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

        x_adv = PGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                    **self.attack_kwargs())(x, y)
        y_inv = y[:0]
        if self.invariance_weight > 0:
            x_inv, y_inv = self._invariance(x, y)
        layer = penultimate_features(self.ctx.net)
        # separate forwards (clean, adversarial, invariance): batch norm normalizes each set with its own
        # statistics, as every other method here and the authors' per-input graphs
        with _Embed(layer) as cap:
            self.forward(x)
            emb_clean = cap.value.flatten(1)
            logits_adv = self.forward(x_adv)
            emb_adv = cap.value.flatten(1)
            if y_inv.numel():
                logits_inv = self.forward(x_inv)
                emb_inv = cap.value.flatten(1)
        emb_pert = torch.cat([emb_adv, emb_inv]) if y_inv.numel() else emb_adv
        loss = F.cross_entropy(logits_adv, y)
        loss = loss + self.triplet_weight * triplet_terms(emb_adv, emb_clean, y, y, self.margin)
        loss = loss + self.norm_weight * emb_pert.norm(dim=1).mean()
        if self.invariance_weight > 0 and y_inv.numel():
            loss = loss + self.invariance_weight * (
                F.cross_entropy(logits_inv, y_inv)
                + triplet_terms(emb_inv, emb_clean, y_inv, y, self.margin, exclude_self=False))
        if self.ot_weight > 0:
            loss = loss + self.ot_weight * ot_regularizer(emb_clean, emb_pert, self.ot_reg, self.ot_iters)
        return StepOutput(loss, logits_adv, y)


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
