"""Robustness metrics: accuracy helpers and the FOSC convergence criterion.

``fosc`` is the First-Order Stationary Condition of Wang et al. 2019 ("On the
Convergence and Robustness of Adversarial Training", ICML), which measures how
well an L-inf inner maximization converged, per sample:

    c(x^k) = eps * ||grad_x l(x^k)||_1 - <x^k - x^0, grad_x l(x^k)>,

with l the per-sample cross-entropy. c >= 0 for every x^k in the eps-ball
(Hoelder), and c = 0 iff x^k is a stationary point of the constrained
maximization (without the image box). Smaller is better converged.
"""
from __future__ import annotations

import torch

from fastadv import _validate as V
from fastadv.attacks.base import Attack, attack_loss, grad_wrt

__all__ = ["fosc", "predict", "accuracy", "robust_accuracy"]


def fosc(model, x_adv: torch.Tensor, x0: torch.Tensor, y: torch.Tensor, eps, *, loss: str = "ce",
         model_mode: str = "eval") -> torch.Tensor:
    """FOSC per sample (see the module docstring), shape (B,), float32, >= 0 up to rounding.

    Args:
        model: (B, ...) -> (B, K) logits. x_adv: the attack's iterate, in the
        eps-ball around x0; x0: clean inputs (same shape); y: (B,) labels.
        eps: L-inf radius (float or (B,) tensor). loss: 'ce' | 'cw' | 'dlr'.
        model_mode: as for attacks ('eval' default), restored afterwards.
    """
    V.same("x_adv", x_adv, "x0", x0)
    atk = Attack(model, model_mode=model_mode)
    xa, y = atk.check_inputs(x_adv, y)
    b = xa.shape[0]
    e = V.per_sample("eps", eps, b, xa.device)
    with atk.model_context(), torch.enable_grad():
        xr = xa.detach().requires_grad_(True)
        per = attack_loss(loss, atk.logits(xr), y, False)
        g = grad_wrt(per.sum(), xr)  # sum: each sample's own gradient, unscaled
    g = g.reshape(b, -1)
    d = (xa - x0.float()).reshape(b, -1)
    return e * g.abs().sum(1) - (d * g).sum(1)


@torch.no_grad()
def predict(model, x: torch.Tensor, batch_size: int = 512, *, model_mode: str = "eval") -> torch.Tensor:
    """argmax of model(x) in batches, int64 (N,); the model's mode is restored afterwards."""
    atk = Attack(model, model_mode=model_mode, clip=None)
    V.tensor("x", x, min_ndim=2)
    with atk.model_context():
        return torch.cat([model(c).argmax(1) for c in x.split(batch_size)]) if x.shape[0] else \
            torch.zeros(0, dtype=torch.long, device=x.device)


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512, *, model_mode: str = "eval") -> float:
    """Fraction of (x, y) the model classifies correctly, in [0, 1]."""
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y have mismatched batch sizes: {x.shape[0]} and {y.shape[0]}")
    if x.shape[0] == 0:
        return float("nan")
    return (predict(model, x, batch_size, model_mode=model_mode) == y).float().mean().item()


def robust_accuracy(model, attack, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Accuracy on attack(x, y), batch by batch (an Attack instance), counting a sample
    robust only if it is also classified correctly clean."""
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        clean = predict(model, xb) == yb
        adv = attack(xb, yb)
        correct += (clean & (predict(model, adv) == yb)).sum().item()
    return correct / max(x.shape[0], 1)
