"""Training and attack losses on logits that are not in ``torch.nn.functional``.

``mce_loss``: the margin-maximizing cross-entropy (MCE) of Zhang, Zhang,
Courville, Bengio, Ravikumar & Suggala, "Building Robust Ensembles via Margin
Boosting", ICML 2022 (reference code: zdhNarsil/Margin-Boosting,
experiments/main.py and lib/attack/pgd.py). It is the training loss of their
MRBoost.NN ensembles (``fastadv.train.methods.boosting``) and, as
``PGD(loss='mce')`` (``fastadv.attacks.base.attack_loss``), the objective of
the attack that crafts their training examples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


def mce_loss(logits: torch.Tensor, y: torch.Tensor, weight: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Margin-maximizing cross-entropy (Zhang et al., ICML 2022).

    For logits z (B, K) and labels y (B,), per sample::

        MCE(z, y) = CE(z, y) + w * 1/(K-1) * sum_{j != y} -log softmax(-z)_j
                  = CE(z, y) + w * 1/(K-1) * sum_{j != y} [ z_j + log sum_k exp(-z_k) ]

    The softmax of the NEGATED logits runs over all K classes (the true class
    in the denominator too). The second term is smallest when the non-true
    logits are equal and the true logit is large, so beyond CE it pushes the
    largest wrong logit down: the margin z_y - max_{j != y} z_j grows. This is
    the reference code's ``other_advloss`` exactly (experiments/main.py:
    ``-F.log_softmax(-out, 1) * (1 - one_hot(y))`` summed and divided by
    (K - 1) * B), with their ``other_weight`` as ``weight``; the formula the
    issue gave, CE + w * mean_{j != y} -log softmax(-z)_j, is the same thing.
    The reference's command-line default ``other_weight=0`` is plain CE; the
    value behind the paper's tables is not in the repository, so ``weight``
    defaults to 1 (the unweighted sum of the two terms).

    Args:
        logits: (B, K) float, K >= 2 (any real values).
        y: (B,) int64 labels in [0, K).
        weight: w >= 0, the weight of the margin term (0 gives CE).
        reduction: 'mean' (default: the reference's batch mean of both terms),
            'sum' or 'none' ((B,) per-sample values).
    Returns:
        a scalar, or (B,) with reduction='none'; >= 0 up to rounding (both
        terms are negative log-probabilities).
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be a (B, K >= 2) tensor, got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != logits.shape[0]:
        raise ValueError(f"y must be a (B,) tensor of labels with B = {logits.shape[0]}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or math.isnan(weight) or weight < 0:
        raise ValueError(f"weight must be a number >= 0, got {weight!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    b, k = logits.shape
    others = 1 - F.one_hot(y, num_classes=k).to(logits.dtype)
    terms = -F.log_softmax(-logits, dim=1) * others  # (B, K), zero at the true class
    if reduction == "mean":
        # the reference's order of operations: CE batch mean + w * (sum of all terms) / ((K - 1) * B)
        return F.cross_entropy(logits, y) + weight * (terms.sum() / ((k - 1) * b))
    per = F.cross_entropy(logits, y, reduction="none") + weight * (terms.sum(1) / (k - 1))
    return per.sum() if reduction == "sum" else per


__all__ = ["mce_loss"]
