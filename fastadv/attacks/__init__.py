"""Adversarial attacks, called as torchattacks does: ``atk = PGD(model, ...); x_adv = atk(x, y)``.

Inputs are images in [0, 1] (normalization belongs to the model, see
``fastadv.models.NormalizedModel``); labels are int64 (B,). Every iterative
attack runs on the shared engine (``fastadv.attacks.engine``): per-sample
early stop with batch compaction, autocast, channels_last, torch.compile and
CUDA graphs. See docs/attacks.md.
"""
from fastadv.attacks.base import Attack, attack_loss, dlr_loss, is_fooled, margin
from fastadv.attacks.fgsm import FGSM, RFGSM
from fastadv.attacks.pgd import PGD, PGDL2
from fastadv.attacks.early_stopped import EarlyStoppedPGD

__all__ = ["Attack", "FGSM", "RFGSM", "PGD", "PGDL2", "EarlyStoppedPGD", "attack_loss", "dlr_loss", "is_fooled",
           "margin"]
