"""Evaluation versions and the attack factory: which attacks run, in which order, with which settings.

AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"; fra31/auto-attack,
``autoattack.py: set_version``) defines three versions; ``evaluate`` runs
them with the same attacks, order and settings, and adds two of its own:

==========  ==========================================================  =====================
version     attacks, in cascade order                                   for
==========  ==========================================================  =====================
standard    apgd-ce, apgd-t (9 targets), fab-t (9 targets), square      papers (the default)
            (5000 queries); L1: apgd-ce 5 restarts, apgd-t 5 targets
plus        apgd-ce (5 restarts), apgd-dlr (5 restarts), fab (5         a stronger check
            restarts), square, apgd-t, fab-t
rand        apgd-ce, apgd-dlr, each with EOT over 20 passes             randomized defences
fast        apgd-ce, apgd-t                                             quick looks in training
custom      the ``attacks=`` list                                       anything else
==========  ==========================================================  =====================

Every APGD runs 100 iterations, rho 0.75; FAB 100 iterations, alpha_max 0.1,
eta 1.05, beta 0.9; Square p_init 0.8. Differences from AutoAttack's code
are listed in each attack's docstring. Two are version-level:

* L1 'standard': APGD-CE 5 restarts and APGD-T 5 targets (FAB-T keeps 9),
  as AutoAttack. AutoAttack's APGD uses ``use_largereps`` (a warm start at
  larger radii); ours does not, and Square is not run (our Square is Linf and
  L2 only; AutoAttack added its L1 Square later). Both are noted in the report.
* Models with fewer than 4 classes (AutoAttack only warns and then fails on
  the DLR loss): see :func:`adapt_to_classes`.
"""
from __future__ import annotations

import math

from fastadv.attacks.base import Attack, check_choice

__all__ = ["VERSIONS", "ATTACKS", "make_attack", "version_attacks", "adapt_to_classes", "check_instance",
           "attack_settings"]

VERSIONS = ("standard", "plus", "rand", "fast", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "apgd-cw", "fab", "fab-t", "square", "fgsm", "pgd", "pgd-cw", "spsa")

_VERSION_LISTS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
    "rand": ("apgd-ce", "apgd-dlr"),
    "fast": ("apgd-ce", "apgd-t"),
}


def version_attacks(version: str, norm: str) -> tuple[list[str], list[str]]:
    """(attack names in cascade order, notes) for an AutoAttack-style version."""
    check_choice("version", version, tuple(_VERSION_LISTS))
    names = list(_VERSION_LISTS[version])
    notes = []
    if norm == "l1" and "square" in names:
        names.remove("square")
        notes.append("L1: Square is not run (fastadv's Square is Linf/L2 only); AutoAttack's L1 standard version "
                     "runs an L1 Square, so this evaluation may be weaker on models that mask gradients")
    if norm == "l1" and version == "standard":
        notes.append("L1: APGD runs without AutoAttack's use_largereps warm start")
    return names, notes


def make_attack(name: str, model, eps: float, norm: str = "linf", *, version: str = "standard",
                n_classes: int | None = None, **common) -> Attack:
    """The named attack at radius ``eps`` with the settings of ``version``.

    ``common``: Attack options shared by every attack (model_mode, autocast,
    clip, channels_last). ``n_classes`` caps the number of target classes of
    apgd-t / fab-t at K - 1 (AutoAttack uses 9 on 10 classes).
    """
    check_choice("attack", name, ATTACKS)
    l1 = norm == "l1"
    # AutoAttack's set_version: APGD-T 5 targets for L1 standard, 9 otherwise; FAB-T always 9
    targets = 5 if (l1 and version == "standard") else 9
    fab_targets = 9
    if n_classes is not None:
        targets, fab_targets = min(targets, n_classes - 1), min(fab_targets, n_classes - 1)
    restarts_apgd = 5 if (version == "plus" or (l1 and version == "standard")) else 1
    eot = 20 if version == "rand" else 1
    if name in ("apgd-ce", "apgd-dlr", "apgd-cw"):
        from fastadv.attacks import APGD

        return APGD(model, eps, 100, norm=norm, loss=name.split("-")[1], restarts=restarts_apgd, eot_iter=eot,
                    **common)
    if name == "apgd-t":
        from fastadv.attacks.apgd import APGDT

        return APGDT(model, eps, 100, norm=norm, n_target_classes=targets, restarts=1, **common)
    if name in ("fab", "fab-t"):
        from fastadv.attacks.fab import FAB

        if name == "fab":
            return FAB(model, eps, norm=norm, steps=100, restarts=5 if version == "plus" else 1, **common)
        return FAB(model, eps, norm=norm, steps=100, restarts=1, multi_targeted=True, n_target_classes=fab_targets,
                   **common)
    if name == "square":
        if l1:
            raise ValueError("attack 'square' is Linf/L2 only in fastadv; use norm 'linf' or 'l2'")
        from fastadv.attacks.square import Square

        # autoattack.py: SquareAttack(p_init=.8, n_queries=5000, n_restarts=1, resc_schedule=False)
        return Square(model, eps, norm=norm, queries=5000, p_init=0.8, restarts=1, rescale_schedule=False, **common)
    from fastadv.attacks import FGSM, PGD, SPSA

    if name == "fgsm":
        if norm != "linf":
            raise ValueError("attack 'fgsm' is L-inf only; use 'pgd' for norm l2/l1")
        return FGSM(model, eps, **common)
    if name in ("pgd", "pgd-cw"):
        steps = 20
        return PGD(model, eps, 2.5 * eps / steps, steps, norm=norm, loss="cw" if name == "pgd-cw" else "ce",
                   early_stop=True, **common)
    if norm != "linf":
        raise ValueError("attack 'spsa' is L-inf only")
    return SPSA(model, eps, 100, samples=128, **common)


def adapt_to_classes(names: list[str], n_classes: int) -> tuple[list[str], list[str]]:
    """An attack list that runs on a K-class model, and a note per change.

    The DLR loss divides by z_pi1 - z_pi3 and so needs K >= 3; the targeted
    DLR reads z_pi4 and needs K >= 4. AutoAttack only warns (checks.py,
    ``check_n_classes``) and then fails; here:

    * K = 2: apgd-dlr -> apgd-cw (the margin z_other - z_y: DLR's numerator,
      whose sign is what decides success); apgd-t -> apgd-cw (with two classes
      the only target is the other class, so targeted = untargeted); fab-t ->
      fab (the same reason);
    * K = 3: apgd-t -> apgd-dlr (the untargeted DLR still runs), fab-t keeps
      its K - 1 = 2 targets.
    Duplicates that result are dropped (the first occurrence keeps its place).
    """
    if n_classes >= 4:
        return list(names), []
    swaps = {2: {"apgd-dlr": ("apgd-cw", "the DLR loss needs 3 classes"),
                 "apgd-t": ("apgd-cw", "with 2 classes the only target is the other class"),
                 "fab-t": ("fab", "with 2 classes the only target is the other class")},
             3: {"apgd-t": ("apgd-dlr", "the targeted DLR loss needs 4 classes")}}
    swap = swaps.get(n_classes, {})
    out, notes = [], []
    for nm in names:
        new, why = swap.get(nm, (nm, ""))
        if new != nm:
            notes.append(f"{n_classes} classes: {nm} replaced by {new} ({why})")
        if new in out:
            notes.append(f"{n_classes} classes: {new} is already in the list; the replacement of {nm} is dropped")
            continue
        out.append(new)
    return out, notes


def adapted_for(name: str, n_classes: int) -> str:
    """The name ``adapt_to_classes`` puts in place of ``name`` on a K-class model."""
    return adapt_to_classes([name], n_classes)[0][0]


def attack_settings(atk) -> dict:
    """The settings of an attack instance that change its result, JSON-friendly (for the resume fingerprint)."""
    out = {"class": f"{type(atk).__module__}.{type(atk).__qualname__}"}
    for k, v in sorted(vars(atk).items()):
        if k.startswith("_") or k in ("model", "generator", "last_queries"):
            continue
        if isinstance(v, (bool, int, float, str, type(None))):
            out[k] = v
        elif isinstance(v, (tuple, list)) and all(isinstance(e, (bool, int, float, str, type(None))) for e in v):
            out[k] = list(v)
        elif hasattr(v, "tolist") and getattr(v, "numel", lambda: 1e9)() <= 4096:
            out[k] = v.tolist()
        elif isinstance(v, Attack):
            out[k] = attack_settings(v)
        else:
            out[k] = f"<{type(v).__name__}>"
    return out


def check_instance(label: str, atk, eps: float, norm: str, n_classes: int | None = None) -> None:
    """Refuse an attack instance that does not attack the evaluation's threat model.

    An instance whose ``eps`` or ``norm`` differs from the evaluation's would
    be scored against the wrong ball (a PGD at eps 0.5 reported "at eps
    0.01"); a targeted instance would be handed the true labels as targets.
    Both are errors that name the two values.
    """
    if not isinstance(atk, Attack):
        raise TypeError(f"attack {label!r} must be a fastadv Attack, got {type(atk).__name__}")
    if getattr(atk, "targeted", False):
        raise ValueError(f"attack {label!r} is targeted (targeted=True): evaluate passes the true labels, so it "
                         "would aim at the true class; pass an untargeted instance (multi-target attacks such as "
                         "APGDT and FAB(multi_targeted=True) pick their targets themselves)")
    a_eps = getattr(atk, "eps", None)
    if a_eps is not None:
        if hasattr(a_eps, "numel"):
            if a_eps.numel() != 1:
                raise ValueError(f"attack {label!r} has a per-sample eps tensor; evaluate uses one radius, eps={eps:g}")
            a_eps = float(a_eps)
        if not math.isclose(float(a_eps), eps, rel_tol=1e-6, abs_tol=1e-12):
            raise ValueError(f"attack {label!r} has eps={float(a_eps):g} but the evaluation's eps={eps:g}: it would "
                             "be scored against the wrong ball; build it with the evaluation's eps")
    a_norm = getattr(atk, "norm", None)
    if a_norm is None and type(atk).__name__ in ("FGSM", "RFGSM", "SPSA"):
        a_norm = "linf"
    if a_norm is not None and a_norm != norm:
        raise ValueError(f"attack {label!r} has norm={a_norm!r} but the evaluation's norm={norm!r}")
    if n_classes is not None:
        need = 4 if type(atk).__name__ == "APGDT" else 3 if getattr(atk, "loss", None) == "dlr" else 2
        if n_classes < need:
            raise ValueError(f"attack {label!r} needs >= {need} classes ({'targeted DLR' if need == 4 else 'DLR'} "
                             f"loss) but the model has {n_classes}; pass the name instead (evaluate then swaps in "
                             "an attack that runs) or use loss='cw'")
