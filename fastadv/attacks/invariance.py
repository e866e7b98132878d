"""Invariance attack (Tramer et al. 2020, "Fundamental Tradeoffs between
Invariance and Sensitivity to Adversarial Perturbations"), the
model-agnostic construction.

For each input x (label y) find the nearest reference image r of ANOTHER
class, in the attack's norm, and move x toward it while staying in the
eps-ball and the box:

    x' = x0 + P_eps(r - x0)   (P: projection onto {||d||_p <= eps} x box).

When r is within eps (the classes overlap at this radius), x' = r: an input
that an oracle labels with r's class but an eps-invariant model must label y.
The attack returns (x', t) with t the label of r: the "correct" label of x'
is t when x' = r, and a model that still predicts y there is too invariant.

The reference set (x_ref, y_ref) is supplied by the user; the
nearest-neighbour search is batched on the inputs' device: distances in
chunks of ``chunk`` references (L2: one matmul per chunk via
||a||^2 + ||b||^2 - 2 a.b; L-inf and L1: ``torch.cdist``), same-class entries masked.

Example::

    atk = InvarianceAttack(model, x_train, y_train, eps=0.4, norm='linf')
    x_inv, t = atk(x, y)
"""
from __future__ import annotations

import math

import torch

from fastadv import ops
from fastadv import _validate as V
from fastadv.attacks.base import Attack, check_choice, check_eps, check_int


class InvarianceAttack(Attack):
    """Args:
        model: the model under evaluation (optional: None; used only to validate labels).
        x_ref: (N, ...) reference images in the box; y_ref: (N,) int64 labels.
        eps: radius (default 0.4, the L-inf MNIST setting of the paper).
        norm: 'linf' (default) | 'l2' | 'l1'.
        chunk: references per distance block (default 4096).
    Returns (from ``atk(x, y)``): (x_inv (B, ...), target labels (B,) int64).
    """

    name = "InvarianceAttack"

    def __init__(self, model, x_ref: torch.Tensor, y_ref: torch.Tensor, eps=0.4, *, norm: str = "linf",
                 chunk: int = 4096, clip=(0.0, 1.0), **kwargs):
        super().__init__(model if model is not None else (lambda x: x), clip=clip, **kwargs)
        self._has_model = model is not None
        V.tensor("x_ref", x_ref, min_ndim=2)
        if not isinstance(y_ref, torch.Tensor) or y_ref.dtype.is_floating_point or y_ref.dim() != 1:
            raise TypeError("y_ref must be a 1-D integer tensor of labels")
        if y_ref.shape[0] != x_ref.shape[0]:
            raise ValueError(f"x_ref and y_ref have mismatched sizes: {x_ref.shape[0]} and {y_ref.shape[0]}")
        if y_ref.device != x_ref.device:
            raise ValueError(f"y_ref is on {y_ref.device} but x_ref is on {x_ref.device}")
        V.in_box("x_ref", x_ref, *self.clip)
        self.x_ref = x_ref.detach().float()
        self.y_ref = y_ref.long()
        self.eps = check_eps("eps", eps)
        self.norm = check_choice("norm", norm, ("linf", "l2", "l1"))
        self.chunk = check_int("chunk", chunk, 1)

    def __call__(self, x, y):
        if x.dim() >= 2 and x.shape[1:] != self.x_ref.shape[1:]:
            raise ValueError(f"x has sample shape {tuple(x.shape[1:])} but x_ref has {tuple(self.x_ref.shape[1:])}")
        x, y = self.check_inputs(x, y)
        if x.device != self.x_ref.device:
            raise ValueError(f"x is on {x.device} but x_ref is on {self.x_ref.device}")
        if self._has_model and x.shape[0]:
            with self.model_context(), torch.no_grad():
                self.logits(x[:1])
        with V.validation(False):
            return self.perturb(x, y)

    @torch.no_grad()
    def nearest_other(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B,) of the nearest reference of another class, its distance (B,))."""
        b = x.shape[0]
        a = x.reshape(b, -1)
        best_d = torch.full((b,), math.inf, device=x.device)
        best_i = torch.full((b,), -1, dtype=torch.long, device=x.device)
        a2 = a.square().sum(1, keepdim=True)
        for start in range(0, self.x_ref.shape[0], self.chunk):
            r = self.x_ref[start:start + self.chunk].reshape(-1, a.shape[1])
            if self.norm == "l2":
                d = (a2 + r.square().sum(1)[None] - 2 * a @ r.T).clamp_min(0).sqrt()
            else:
                d = torch.cdist(a, r, p=math.inf if self.norm == "linf" else 1.0)
            same = y[:, None] == self.y_ref[start:start + r.shape[0]][None]
            d = d.masked_fill(same, math.inf)
            dmin, imin = d.min(1)
            better = dmin < best_d
            best_d = torch.where(better, dmin, best_d)
            best_i = torch.where(better, imin + start, best_i)
        if bool((best_i < 0).any()):
            raise ValueError("x_ref has no image of a class other than some input's label")
        return best_i, best_d

    def perturb(self, x, y):
        i, _ = self.nearest_other(x, y)
        r = self.x_ref[i]
        d = r - x
        eps = self.eps
        if self.norm == "linf":
            d = ops.project_linf(d, eps, x0=x, clip=self.clip)
        elif self.norm == "l2":
            d = ops.project_l2(d, eps, x0=x, clip=self.clip)
        else:
            d = ops.project_l1(d, eps, x0=x, clip=self.clip)
        return (x + d).clamp(*self.clip), self.y_ref[i]
