"""Invariance attack (Tramer et al. 2020, "Fundamental Tradeoffs between
Invariance and Sensitivity to Adversarial Perturbations"), the
model-agnostic construction.

For each input x (label y) find the nearest reference image r of ANOTHER
class, in the attack's norm, and move x toward it while staying in the
eps-ball and the box:

    x' = x0 + P_eps(r - x0)   (P: projection onto {||d||_p <= eps} x box),

or, with ``segment=True``, the point of the segment [x, r] at distance eps:

    x' = x + min(1, eps / ||r - x||_p) (r - x)

(in the box because x and r are; for L2 the two coincide, for L-inf and L1
the projection leaves the segment).

When r is within eps (the classes overlap at this radius), x' = r: an input
that an oracle labels with r's class but an eps-invariant model must label y.
The attack returns (x', t) with t the label of r: the "correct" label of x'
is t when x' = r, and a model that still predicts y there is too invariant.
Short of r, ``examples()`` keeps the x' that a nearest-neighbour oracle over
the references and the source x labels t (x' is nearer to r than to x and
to every reference of class y): the paper's "the oracle label changed",
with the reference set as the oracle.

The reference set (x_ref, y_ref) is supplied by the user; the
nearest-neighbour search is batched on the inputs' device: distances in
chunks of ``chunk`` references (L2: one matmul per chunk via
||a||^2 + ||b||^2 - 2 a.b; L-inf and L1: ``torch.cdist``), same-class entries masked.

Example::

    atk = InvarianceAttack(model, x_train, y_train, eps=0.4, norm='linf')
    x_inv, t = atk(x, y)
    x_inv, t, keep, ref_index = atk.examples(x, y)   # oracle-labelled subset
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
        segment: move along the segment [x, r] (x + min(1, eps/||r - x||) (r - x))
            instead of projecting r - x onto the ball (default False).
    Returns (from ``atk(x, y)``): (x_inv (B, ...), target labels (B,) int64).
    """

    name = "InvarianceAttack"

    def __init__(self, model, x_ref: torch.Tensor, y_ref: torch.Tensor, eps=0.4, *, norm: str = "linf",
                 chunk: int = 4096, segment: bool = False, clip=(0.0, 1.0), **kwargs):
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
        self.segment = bool(segment)

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

    def _size(self, v: torch.Tensor) -> torch.Tensor:
        """Per-row norm of flat rows v (B, D) in the attack's norm."""
        if self.norm == "linf":
            return v.abs().amax(1)
        return v.norm(dim=1) if self.norm == "l2" else v.abs().sum(1)

    def _dist(self, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(B, M) distances in the attack's norm between flat rows a (B, D) and r (M, D)."""
        if self.norm == "l2":
            return (a.square().sum(1, keepdim=True) + r.square().sum(1)[None] - 2 * a @ r.T).clamp_min(0).sqrt()
        return torch.cdist(a, r, p=math.inf if self.norm == "linf" else 1.0)

    @torch.no_grad()
    def _nearest(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest reference to each row of x; with y, among references of another class only."""
        b = x.shape[0]
        a = x.reshape(b, -1).float()
        best_d = torch.full((b,), math.inf, device=x.device)
        best_i = torch.full((b,), -1, dtype=torch.long, device=x.device)
        for start in range(0, self.x_ref.shape[0], self.chunk):
            r = self.x_ref[start:start + self.chunk].reshape(-1, a.shape[1])
            d = self._dist(a, r)
            if y is not None:
                d = d.masked_fill(y[:, None] == self.y_ref[start:start + r.shape[0]][None], math.inf)
            dmin, imin = d.min(1)
            better = dmin < best_d
            best_d = torch.where(better, dmin, best_d)
            best_i = torch.where(better, imin + start, best_i)
        return best_i, best_d

    @torch.no_grad()
    def nearest_other(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (B,) of the nearest reference of another class, its distance (B,))."""
        best_i, best_d = self._nearest(x, y)
        if bool((best_i < 0).any()):
            raise ValueError("x_ref has no image of a class other than some input's label")
        return best_i, best_d

    @torch.no_grad()
    def oracle_labels(self, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Label of x_adv's nearest neighbour among the references and its own source x (label y)
        (ties go to the reference): the nearest-neighbour oracle of ``examples()``."""
        i, d = self._nearest(x_adv, None)
        d_src = self._size((x_adv - x).reshape(x.shape[0], -1).float())
        return torch.where(d_src < d, y, self.y_ref[i])

    @torch.no_grad()
    def examples(self, x: torch.Tensor, y: torch.Tensor):
        """(x_inv (B, ...), t (B,), keep (B,) bool, ref_index (B,)): the moved inputs, the labels of
        their references, and which of them the oracle (``oracle_labels``) labels t, i.e. which are
        invariance examples: within eps of x, labelled y by an eps-invariant model, t by the oracle."""
        if x.dim() >= 2 and x.shape[1:] != self.x_ref.shape[1:]:
            raise ValueError(f"x has sample shape {tuple(x.shape[1:])} but x_ref has {tuple(self.x_ref.shape[1:])}")
        x, y = self.check_inputs(x, y)
        if x.device != self.x_ref.device:
            raise ValueError(f"x is on {x.device} but x_ref is on {self.x_ref.device}")
        i, _ = self.nearest_other(x, y)
        with V.validation(False):
            x_inv = self._move(x, self.x_ref[i])
        t = self.y_ref[i]
        return x_inv, t, self.oracle_labels(x_inv, x, y) == t, i

    def _move(self, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        d = r - x
        eps = self.eps
        if self.segment:
            s = (eps / self._size(d.flatten(1)).clamp_min(1e-12)).clamp(max=1.0)
            return (x + s.view(-1, *([1] * (x.dim() - 1))) * d).clamp(*self.clip)
        if self.norm == "linf":
            d = ops.project_linf(d, eps, x0=x, clip=self.clip)
        elif self.norm == "l2":
            d = ops.project_l2(d, eps, x0=x, clip=self.clip)
        else:
            d = ops.project_l1(d, eps, x0=x, clip=self.clip)
        return (x + d).clamp(*self.clip)

    def perturb(self, x, y):
        i, _ = self.nearest_other(x, y)
        return self._move(x, self.x_ref[i]), self.y_ref[i]
