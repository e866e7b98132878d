"""Early-stopped PGD of friendly adversarial training (Zhang et al. 2020,
"Attacks Which Do Not Kill Training Make Adversarial Learning Stronger").

Each sample stops ``tau`` steps after it is first misclassified (tau = 0:
at its first fooling iterate), so the returned adversarial example is the
"friendly" one that is just past the decision boundary. Runs on the engine's
compacted batch, so stopped samples cost nothing.

Example::

    atk = EarlyStoppedPGD(model, eps=8/255, alpha=2/255, steps=10, tau=1)
    x_adv = atk(x, y)
"""
from __future__ import annotations

from fastadv.attacks.base import check_int
from fastadv.attacks.pgd import PGD


class EarlyStoppedPGD(PGD):
    """PGD (any norm, see ``PGD``) with early stop tau steps after misclassification.

    Args:
        tau: extra steps allowed after the first misclassification, int >= 0 (default 0).
        random_start: default False here (FAT starts from a small random
            perturbation in the paper's code; pass True for that).
        others: as in ``PGD``; ``early_stop`` is always on.
    """

    name = "EarlyStoppedPGD"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps: int = 10, *, tau: int = 0, random_start: bool = False,
                 **kwargs):
        kwargs.pop("early_stop", None)
        super().__init__(model, eps, alpha, steps, random_start=random_start, early_stop=True, **kwargs)
        self.tau = check_int("tau", tau, 0)
