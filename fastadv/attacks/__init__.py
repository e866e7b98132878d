"""Adversarial attacks, called as torchattacks does: ``atk = PGD(model, ...); x_adv = atk(x, y)``.

Inputs are images in [0, 1] (normalization belongs to the model, see
``fastadv.models.NormalizedModel``); labels are int64 (B,). Every iterative
attack runs on the shared engine (``fastadv.attacks.engine``): per-sample
early stop with batch compaction, autocast, channels_last, torch.compile and
CUDA graphs. See docs/attacks.md.

=================  ==================================================
FGSM, RFGSM        single step (Goodfellow 2015; Tramer 2018)
PGD, PGDL2         Linf / L2 / L1 PGD (Madry 2018), ce | cw | dlr
EarlyStoppedPGD    friendly AT's early-stopped PGD (Zhang 2020)
TRADESAttack       TRADES' KL maximization (Zhang 2019)
APGD               Auto-PGD, CE / DLR, Linf / L2 / L1 (Croce & Hein 2020)
APGDT              targeted APGD over the top non-true classes (AutoAttack's APGD-T)
FAB                fast adaptive boundary, untargeted / multi-targeted (Croce & Hein 2020)
Square             query-efficient black-box random search (Andriushchenko et al. 2020)
SPSA               gradient-free (Uesato 2018)
TransferAttack     crafted on source models (Tramer 2018)
InvarianceAttack   nearest other-class reference (Tramer 2020)
WassersteinPGD     Wasserstein-ball PGD (Wong et al. 2019), fastadv.ot
FOSCPGD            PGD stopped per sample at FOSC <= c (Wang et al. 2019)
IWDAttack          internal (patch) Wasserstein budget (Li et al. 2021), fastadv.iwd
=================  ==================================================
"""
from fastadv.attacks.base import Attack, attack_loss, dlr_loss, is_fooled, margin
from fastadv.attacks.fgsm import FGSM, RFGSM
from fastadv.attacks.pgd import PGD, PGDL2
from fastadv.attacks.early_stopped import EarlyStoppedPGD
from fastadv.attacks.trades import TRADESAttack
from fastadv.attacks.apgd import APGD, APGDT
from fastadv.attacks.fab import FAB
from fastadv.attacks.square import Square
from fastadv.attacks.spsa import SPSA
from fastadv.attacks.transfer import Ensemble, TransferAttack, ensemble_sources, format_transfer_matrix, transfer_matrix
from fastadv.attacks.invariance import InvarianceAttack
from fastadv.attacks.wasserstein import WassersteinPGD
from fastadv.attacks.fosc_pgd import FOSCPGD
from fastadv.attacks.iwd import IWDAttack

__all__ = ["Attack", "FGSM", "RFGSM", "PGD", "PGDL2", "EarlyStoppedPGD", "TRADESAttack", "APGD", "APGDT", "FAB", "Square", "SPSA",
           "TransferAttack", "Ensemble", "InvarianceAttack", "WassersteinPGD", "FOSCPGD", "IWDAttack", "transfer_matrix", "ensemble_sources", "format_transfer_matrix", "attack_loss", "dlr_loss", "is_fooled", "margin"]
