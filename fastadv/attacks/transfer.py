"""Transfer attacks: perturbations crafted on one or more source models and
applied to the target (Papernot et al. 2017; the ensemble of Tramer et al.
2018, "Ensemble Adversarial Training: Attacks and Defenses").

With several sources the attack runs on their ensemble
(``fastadv.models.Ensemble``, mean of the sources' logits). The target model
is only used to validate the labels and the output shape; its gradients are
never read, so a transfer attack that beats a white-box attack on the target
is a sign of gradient masking (``fastadv.evaluate`` checks that).

``transfer_matrix`` crafts adversarial examples once per source and reports
the robust accuracy of every target on each source's examples, the table of
ensemble-diversity papers (TRS, Yang et al. 2021,
AI-secure/Transferability-Reduced-Smooth-Ensemble eval/Empirical/trans_matrix.py;
DVERGE, Yang et al. 2020): rows are sources, columns targets, the diagonal
is white-box. ``ensemble_sources(ens)`` names an ensemble's members and the
ensemble itself for it; ``format_transfer_matrix`` renders the result as a
markdown table.

Example::

    atk = TransferAttack(target, [surrogate_a, surrogate_b], eps=8/255, steps=20)
    x_adv = atk(x, y)

    res = transfer_matrix(ensemble_sources(ens), x, y, eps=8/255)
    res["robust_accuracy"]["member0"]["member1"]   # member 1 on member 0's examples
    print(format_transfer_matrix(res))
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from fastadv.attacks.base import Attack
from fastadv.models.ensemble import Ensemble  # the one implementation; ``fastadv.attacks.Ensemble`` is this class


def _as_source_list(sources) -> list:
    if isinstance(sources, dict):
        sources = list(sources.values())
    elif isinstance(sources, nn.Module) or callable(sources) and not isinstance(sources, (list, tuple)):
        sources = [sources]
    return list(sources)


class TransferAttack(Attack):
    """Args:
        model: the target (validation only).
        sources: a model, a sequence of models or a dict name -> model to craft on
            (several: their ``Ensemble``, mean of logits).
        attack: the Attack class run on the sources (default ``PGD``).
        attack_kwargs: passed to it (eps, alpha, steps, norm, ...); shared
            options (targeted, model_mode, autocast, clip) are forwarded.
    """

    name = "TransferAttack"

    def __init__(self, model, sources, attack=None, *, targeted: bool = False, model_mode: str = "eval",
                 autocast=None, channels_last="auto", clip=(0.0, 1.0), **attack_kwargs):
        super().__init__(model, targeted=targeted, model_mode=model_mode, autocast=autocast,
                         channels_last=channels_last, clip=clip)
        sources = _as_source_list(sources)
        if not sources:
            raise ValueError("sources must hold at least one model")
        for i, s in enumerate(sources):
            if not callable(s):
                raise TypeError(f"sources[{i}] must be a model, got {type(s).__name__}")
            if len(sources) > 1 and not isinstance(s, nn.Module):
                raise TypeError(f"sources[{i}] must be an nn.Module to be ensembled, got {type(s).__name__}")
        self.sources = sources
        if attack is None:
            from fastadv.attacks.pgd import PGD

            attack = PGD
        source = sources[0] if len(sources) == 1 else Ensemble(sources)
        self.inner = attack(source, targeted=targeted, model_mode=model_mode, autocast=autocast,
                            channels_last=channels_last, clip=clip, **attack_kwargs)
        self.eps = getattr(self.inner, "eps", None)

    def perturb(self, x, y):
        with torch.no_grad():
            self.logits(x[:1])  # validates the target's output shape and the label range
        return self.inner(x, y)


# ------------------------------------------------------------ matrices
def ensemble_sources(ensemble: Ensemble, prefix: str = "member", name: str = "ensemble") -> dict:
    """{'member0': m0, ..., 'member{M-1}': m_{M-1}, 'ensemble': ensemble} for ``transfer_matrix``."""
    if not isinstance(ensemble, Ensemble):
        raise TypeError(f"ensemble must be a fastadv.models.Ensemble, got {type(ensemble).__name__}")
    out = {f"{prefix}{i}": m for i, m in enumerate(ensemble.members)}
    out[name] = ensemble
    return out


def _device(model, fallback):
    if isinstance(model, nn.Module):
        for t in model.parameters():
            return t.device
    return fallback


def _check_models(arg: str, models) -> dict:
    if not isinstance(models, dict) or not models:
        raise TypeError(f"{arg} must be a non-empty dict name -> model, got {type(models).__name__}")
    for k, m in models.items():
        if not isinstance(k, str):
            raise TypeError(f"{arg} keys must be names (str), got {k!r}")
        if not callable(m):
            raise TypeError(f"{arg}[{k!r}] must be a model, got {type(m).__name__}")
    return models


def _json_safe(v):
    if isinstance(v, (bool, int, str, type(None))):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return [_json_safe(u) for u in v]
    return repr(v)


def transfer_matrix(models: dict, x: torch.Tensor, y: torch.Tensor, eps: float, attack=None, *, targets=None,
                    batch_size: int = 256, model_mode: str = "eval", autocast=None, clip=(0.0, 1.0), seed: int = 0,
                    **attack_kwargs) -> dict:
    """Robust accuracy of each target on adversarial examples crafted on each source.

    For every source s the attack runs once on s (white-box on s) and every
    target t predicts on the result: ``robust_accuracy[s][t]`` = fraction of
    the n samples t classifies correctly at x_adv(s). Where s is t (the same
    object) the entry is s's white-box robust accuracy under the attack.

    Args:
        models: dict name -> model (nn.Module or callable, (B, ...) -> (B, K)); the
            sources, and the targets unless ``targets`` is given. For an ensemble and
            its members use ``ensemble_sources(ens)``.
        x: (N, ...) float images in ``clip``; y: (N,) int64 labels.
        eps: the radius (float >= 0).
        attack: the Attack class run on each source (default ``PGD`` with
            alpha = 2.5 eps / steps, steps = 20, random start: the transfer attack
            of ``fastadv.evaluate``'s black-box check; never early stop, whose
            first-fooling iterates transfer worse). Other keyword arguments go to it
            (alpha, steps, norm, loss, ...).
        targets: dict name -> model (default: ``models``).
        batch_size: rows per attack call.
        model_mode, autocast, clip: Attack options, for the attacks and for the
            targets' predictions (each model's training flags are restored).
        seed: the attacks' random starts come from torch.Generator(seed + i) for
            source i (when the attack takes ``generator=``), so the matrix is
            reproducible and the global RNG is left alone.
    Returns:
        a JSON-serialisable dict: 'sources', 'targets' (names, in order), 'n',
        'eps', 'attack' (class name), 'settings' (the attack's keyword arguments),
        'clean_accuracy' {target: float}, 'robust_accuracy' {source: {target: float}}.
    """
    from fastadv.attacks.pgd import PGD

    models = _check_models("models", models)
    targets = models if targets is None else _check_models("targets", targets)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape[0] != y.shape[0]:
        raise ValueError("x and y must be tensors with the same number of rows")
    attack = PGD if attack is None else attack
    kw = dict(attack_kwargs)
    if attack is PGD:
        kw.setdefault("steps", 20)
        kw.setdefault("alpha", 2.5 * eps / kw["steps"] if kw["steps"] else eps)
        if kw.get("early_stop"):
            raise ValueError("early_stop=True returns first-fooling iterates, which transfer worse than the full run; "
                             "leave it off for transfer matrices")
    takes_generator = "generator" in inspect.signature(attack).parameters and "generator" not in kw
    common = dict(model_mode=model_mode, autocast=autocast, clip=clip)
    n = int(x.shape[0])
    guards = {t: Attack(m, **common) for t, m in targets.items()}

    def correct(tname, xb, yb):
        g = guards[tname]
        dev = _device(g.model, xb.device)
        xb, yb = g.check_inputs(xb.to(dev), yb.to(dev))
        with g.model_context(), torch.no_grad():
            return int((g.logits(xb).argmax(1) == yb).sum())

    clean = {t: 0 for t in targets}
    robust = {s: {t: 0 for t in targets} for s in models}
    for i, (sname, source) in enumerate(models.items()):
        extra = {}
        dev = _device(source, x.device)
        if takes_generator:
            extra["generator"] = torch.Generator(device=dev).manual_seed(seed + i)
        atk = attack(source, eps=eps, **common, **kw, **extra)
        for lo in range(0, n, batch_size):
            xb, yb = x[lo:lo + batch_size].to(dev), y[lo:lo + batch_size].to(dev)
            adv = atk(xb, yb) if eps > 0 else xb
            for tname in targets:
                robust[sname][tname] += correct(tname, adv, yb)
                if i == 0:
                    clean[tname] += correct(tname, xb, yb)
    div = max(n, 1)
    return {
        "sources": list(models), "targets": list(targets), "n": n, "eps": float(eps),
        "attack": getattr(attack, "__name__", type(attack).__name__),
        "settings": {k: _json_safe(v) for k, v in kw.items()},
        "clean_accuracy": {t: c / div for t, c in clean.items()},
        "robust_accuracy": {s: {t: c / div for t, c in row.items()} for s, row in robust.items()},
    }


def format_transfer_matrix(result: dict, digits: int = 1) -> str:
    """A markdown table of ``transfer_matrix``'s result: robust accuracy in %, rows = sources, columns = targets."""
    tg = result["targets"]
    lines = [f"Robust accuracy (%) of each target (column) on {result['attack']} examples crafted on each source "
             f"(row), eps = {result['eps']:g}, n = {result['n']}; the diagonal is white-box.", "",
             "| source \\ target | " + " | ".join(tg) + " |", "|---|" + "---|" * len(tg),
             "| (clean) | " + " | ".join(f"{100 * result['clean_accuracy'][t]:.{digits}f}" for t in tg) + " |"]
    for s in result["sources"]:
        row = result["robust_accuracy"][s]
        lines.append(f"| {s} | " + " | ".join(f"{100 * row[t]:.{digits}f}" for t in tg) + " |")
    return "\n".join(lines)


__all__ = ["TransferAttack", "Ensemble", "transfer_matrix", "ensemble_sources", "format_transfer_matrix"]
