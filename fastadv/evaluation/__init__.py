"""``fastadv.evaluate``: robust accuracy you can put in a paper, and the checks that say when not to.

    report = fastadv.evaluate(model, (x, y), eps=8/255)                 # AutoAttack's standard version
    report = fastadv.evaluate(model, (x, y), eps=0.3, version="fast")   # APGD-CE + APGD-T
    report = fastadv.evaluate(model, (x, y), attacks=["pgd", "apgd-ce"], eps=0.3)   # a custom list

For images in ``clip`` (default [0, 1]) and a model returning logits:

1. **Versions** (:mod:`fastadv.evaluation.versions`): ``standard`` runs
   AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square; the same
   order, settings and per-sample cascade), ``plus`` and ``rand`` as
   AutoAttack defines them, ``fast`` (APGD-CE + APGD-T), or a custom list of
   names and Attack instances. A model with fewer than 4 classes gets an
   attack list that runs on it, with a note in the report.
2. **The cascade** (:mod:`fastadv.evaluation.cascade`): each attack runs only
   on the samples every earlier attack failed to fool; every returned point
   is checked against the evaluation's own threat model (norm, eps, box) and a
   point outside it is never counted as fooled. Attack instances whose eps or
   norm differ from the evaluation's, and targeted instances, are refused.
   Resumable per batch (``state_path``), shardable across ``torchrun`` ranks.
3. **The checks** (:mod:`fastadv.evaluation.checks`): AutoAttack's checks.py
   and Athalye et al. 2018's list of signs of obfuscated gradients; each
   outcome is reported, and a failed one makes the verdict SUSPICIOUS.
4. **The report** (:mod:`fastadv.evaluation.report`): a JSON-serialisable
   dict; with ``out_dir`` also report.json, report.md and the eps curve.
"""
from __future__ import annotations

import itertools
import math
import numbers
import warnings

import torch

from fastadv.attacks.base import Attack, check_choice, check_int
from fastadv.evaluation import cascade as C
from fastadv.evaluation.report import environment, save_curve, summarize, verdict, write_report
from fastadv.evaluation.versions import (ATTACKS, VERSIONS, adapt_to_classes, adapted_for, attack_settings,
                                         check_instance, make_attack, version_attacks)

__all__ = ["evaluate", "make_attack", "ATTACKS", "VERSIONS", "save_curve", "GradientMaskingWarning"]


class GradientMaskingWarning(UserWarning):
    """Issued by ``evaluate`` when a gradient-masking check fails."""


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        if isinstance(eps, torch.Tensor) and eps.numel() == 1:
            eps = eps.item()
        else:
            raise TypeError(f"eps must be a float >= 0, got {type(eps).__name__}")
    eps = float(eps)  # numpy floats are numbers.Real
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite float >= 0, got {eps}")
    return eps


def _model_device(model, device):
    if device is None:
        p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    return torch.device(device)


def _resolve_attacks(version, attacks, model, eps, norm, n_classes, common):
    """[(name, Attack)] in cascade order, and notes."""
    notes: list[str] = []
    if version != "custom":
        names, notes = version_attacks(version, norm)
        names, more = adapt_to_classes(names, n_classes)
        notes += more
        named = [(nm, make_attack(nm, model, eps, norm, version=version, n_classes=n_classes, **common))
                 for nm in names]
        return named, notes
    if isinstance(attacks, (str, Attack)):
        attacks = [attacks]
    attacks = list(attacks)
    # the names are adapted together, so two names that map to one replacement run it once
    str_names = [a for a in attacks if isinstance(a, str)]
    adapted, more = adapt_to_classes(str_names, n_classes)
    notes += more
    named, pending = [], list(adapted)
    for a in attacks:
        if isinstance(a, str):
            if a not in ATTACKS:
                check_choice("attack", a, ATTACKS)
            nm = adapted_for(a, n_classes)
            if nm in pending:
                pending.remove(nm)
                named.append((nm, make_attack(nm, model, eps, norm, version="custom", n_classes=n_classes,
                                              **common)))
        elif isinstance(a, Attack):
            check_instance(type(a).__name__, a, eps, norm, n_classes)
            named.append((type(a).__name__, a))
        elif isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str):
            check_instance(a[0], a[1], eps, norm, n_classes)
            named.append((a[0], a[1]))
        else:
            raise TypeError(f"attacks must hold attack names ({', '.join(ATTACKS)}), Attack instances or "
                            f"(name, Attack) pairs, got {a!r}")
    names = [nm for nm, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks has duplicate names: {names}")
    if not named:
        raise ValueError("attacks is empty: give at least one attack, or a version")
    return named, notes


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_records(local: dict, world: int, error: Exception | None = None) -> dict:
    """Every rank's batch records, merged; an error on any rank is raised on every rank."""
    if world == 1:
        return local
    import torch.distributed as dist

    parts = [None] * world
    dist.all_gather_object(parts, {"error": f"{type(error).__name__}: {error}"} if error else {"records": local})
    failed = [(r, p["error"]) for r, p in enumerate(parts) if "error" in p]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError("evaluation failed on rank " + "; ".join(f"{r}: {e}" for r, e in failed))
    merged = {}
    for p in parts:
        merged.update(p["records"])
    return merged


def evaluate(model, data, attacks=None, eps=8 / 255, *, version: str | None = None, norm: str = "linf",
             batch_size: int = 256, n: int | None = None, device=None, cascade: bool = True, curve=None,
             curve_attack: str = "apgd-ce", checks: bool = True, check_samples: int = 128, spsa_steps: int = 20,
             spsa_samples: int = 64, transfer_sources=None, model_mode: str = "eval", autocast=None,
             clip=(0.0, 1.0), state_path=None, out_dir=None, progress: bool = True, seed: int = 0) -> dict:
    """Robust accuracy of ``model`` on ``data`` under an AutoAttack-style evaluation (see the module docstring).

    Args:
        model: maps (B, ...) images in ``clip`` to (B, K) logits, K >= 2.
        data: a pair (x, y) of tensors (x float in ``clip``, y int64 labels in
            [0, K)), or an iterable of such batches (a DataLoader in a fixed order).
        attacks: None (use ``version``), or a custom list of names from
            ``ATTACKS``, Attack instances, or (name, Attack) pairs, run in this order.
            Instances must be untargeted and use the evaluation's eps and norm.
        eps: radius, a finite float >= 0 (numpy floats accepted).
        version: 'standard' (default without ``attacks``) | 'plus' | 'rand' |
            'fast' | 'custom' (default with ``attacks``).
        norm: 'linf' | 'l2' | 'l1'.
        batch_size: for a tensor pair; n: evaluate only the first n samples.
        device: where to run (default: the model's device).
        cascade: attacks run only on still-robust samples (default True, as AutoAttack).
        curve: None, 'auto' (0, .25, .5, 1, 1.5, 2 x eps) or a list of eps: robust
            accuracy of ``curve_attack`` at each, on the first 4 x ``check_samples`` samples.
        checks: run the gradient-masking checks (default True) on the first
            ``check_samples`` samples (SPSA there: ``spsa_steps`` x ``spsa_samples``).
        transfer_sources: models for the transfer check (optional).
        model_mode, autocast, clip: Attack options for the attacks evaluate builds.
        state_path: JSON file for resuming (written after every batch; under
            torchrun one file per rank, ``<state_path>.rank<r>``).
        out_dir: if given, report.json, report.md (and curve.json/png) are written there.
        progress: tqdm progress bar. seed: the attacks' seed (the global RNG is left alone).
    Returns:
        a JSON-serialisable dict: version, eps, norm, n, clean_accuracy,
        robust_accuracy (worst case), attacks (per attack: robust_accuracy
        after it, fooled, ran_on, invalid, time_s, images_per_s), per_class,
        invalid_points, notes, checks (each: status, value, detail), warnings,
        suspicious, verdict, curve, settings, environment.
    """
    eps = _check_eps(eps)
    check_choice("norm", norm, ("linf", "l2", "l1"))
    check_int("batch_size", batch_size, 1)
    check_int("check_samples", check_samples, 1)
    if n is not None:
        check_int("n", n, 1)
    if version is None:
        version = "custom" if attacks is not None else "standard"
    check_choice("version", version, VERSIONS)
    if version == "custom" and attacks is None:
        raise ValueError("version='custom' needs attacks=[...]")
    if version != "custom" and attacks is not None:
        raise ValueError(f"attacks= is given with version={version!r}: pass version='custom' (or no version) to "
                         "run your own list, or drop attacks= to run the version's list")
    if isinstance(curve, str) and curve != "auto":
        raise ValueError(f"curve must be None, 'auto' or a list of eps, got {curve!r}")
    if curve is not None and curve != "auto":
        try:
            curve = [_check_eps(e) for e in curve]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"curve must be 'auto' or a list of finite eps >= 0: {exc}") from exc
    if state_path is not None and not isinstance(model, torch.nn.Module):
        raise ValueError("state_path needs model to be an nn.Module: the resume fingerprint hashes its weights, "
                         "and a plain callable's cannot be read (wrap it in an nn.Module)")
    device = _model_device(model, device)
    common = dict(model_mode=model_mode, autocast=autocast, clip=clip)
    guard = Attack(model, **common)
    rank, world = _dist()
    # model_mode='train' updates batch-norm running statistics on every forward; the evaluation must not
    # change the user's model, so the buffers are put back at the end.
    saved_buffers = ({k: b.detach().clone() for k, b in model.named_buffers()}
                     if model_mode == "train" and isinstance(model, torch.nn.Module) else None)
    try:
        return _evaluate(model, data, attacks, eps, version, norm, batch_size, n, device, cascade, curve,
                         curve_attack, checks, check_samples, spsa_steps, spsa_samples, transfer_sources, common,
                         guard, rank, world, state_path, out_dir, progress, seed, autocast, model_mode)
    finally:
        if saved_buffers is not None:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(saved_buffers[k])


def _evaluate(model, data, attacks, eps, version, norm, batch_size, n, device, cascade, curve, curve_attack, checks,
              check_samples, spsa_steps, spsa_samples, transfer_sources, common, guard, rank, world, state_path,
              out_dir, progress, seed, autocast, model_mode) -> dict:

    # 1. The first batch: validates the data and tells the number of classes.
    it = C.iterate_batches(data, batch_size, n)
    first = next(it)
    it = itertools.chain([first], it)
    x0, y0 = guard.check_inputs(first[0].to(device), first[1].to(device))
    with guard.model_context(), torch.no_grad():
        n_classes = guard.logits(x0[:2]).shape[1]  # 2 rows: BatchNorm1d in train mode refuses one

    # 2. The attacks, the resume state.
    named, notes = _resolve_attacks(version, attacks, model, eps, norm, n_classes, common)
    names = [nm for nm, _ in named]
    if curve is not None:  # fail now, not after the cascade
        check_choice("curve_attack", curve_attack, ATTACKS)
        curve_attack, more = adapt_to_classes([curve_attack], n_classes)
        curve_attack = curve_attack[0]
        make_attack(curve_attack, model, eps, norm, version="custom", n_classes=n_classes, **common)
    settings = {"version": version, "eps": eps, "norm": norm, "seed": seed, "clip": list(guard.clip),
                "model_mode": model_mode, "autocast": str(autocast), "batch_size": batch_size, "n": n,
                "cascade": cascade, "order": names, "attacks": {nm: attack_settings(a) for nm, a in named}}
    path = None if state_path is None else (state_path if world == 1 else f"{state_path}.rank{rank}")
    state = C.ResumeState(path, C.fingerprint(model, settings), settings)

    # 3. The cascade, batch by batch (this rank's share under torchrun).
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    keep_n = check_samples * 4 if curve is not None else check_samples
    kept_x, kept_y, kept = [], [], 0
    batches = (b for b in it)
    bar = tqdm(batches, desc=f"evaluate ({version})", unit="batch", disable=not progress or rank != 0) \
        if tqdm else batches
    error = None
    try:
        for bi, (xb, yb) in enumerate(bar):
            if kept < keep_n:
                kept_x.append(xb[: keep_n - kept])
                kept_y.append(yb[: keep_n - kept])
                kept += kept_x[-1].shape[0]
            if bi % world != rank or state.done(bi, yb):
                continue
            xb, yb = guard.check_inputs(xb.to(device), yb.to(device))
            state.add(bi, C.run_batch(guard, named, xb, yb, batch_index=bi, eps=eps, norm=norm, seed=seed,
                                      cascade=cascade))
    except Exception as exc:  # under torchrun the other ranks must hear of it, not wait for a timeout
        if world == 1:
            raise
        error = exc
    all_batches = _gather_records(state.data["batches"], world, error)
    records = [all_batches[k] for k in sorted(all_batches, key=int)]

    report = {"version": version, "eps": eps, "norm": norm, "cascade": cascade, "num_classes": n_classes,
              **summarize(records, names, cascade), "notes": notes, "settings": settings,
              "device": str(device), "world_size": world, "environment": environment()}
    for nm, r in report["attacks"].items():
        if r["invalid"]:
            notes.append(f"attack {nm} returned {r['invalid']} points outside the threat model ({norm} ball of "
                         f"radius {eps:g} and the box); they were counted as not fooled")
        if r.get("nonfinite"):
            notes.append(f"attack {nm} found {r['nonfinite']} points where the model's logits are NaN or inf; "
                         "they were counted as fooled (an output the model cannot score is no evidence of robustness)")

    # 4. Checks and curve (rank 0; the others get rank 0's report, or rank 0's error).
    if world == 1:
        return _finish(report, model, guard, kept_x, kept_y, records, names, curve, curve_attack, checks,
                       check_samples, eps, norm, common, n_classes, seed, spsa_steps, spsa_samples,
                       transfer_sources, device, out_dir, version, notes)
    import torch.distributed as dist

    box: list = [None]
    if rank == 0:
        try:
            box = [_finish(report, model, guard, kept_x, kept_y, records, names, curve, curve_attack, checks,
                           check_samples, eps, norm, common, n_classes, seed, spsa_steps, spsa_samples,
                           transfer_sources, device, out_dir, version, notes)]
        except Exception as exc:
            box = [{"error": f"{type(exc).__name__}: {exc}"}]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    if "error" in box[0]:
        raise RuntimeError(f"evaluation failed on rank 0: {box[0]['error']}")
    return box[0]


def _finish(report, model, guard, kept_x, kept_y, records, names, curve, curve_attack, checks, check_samples, eps,
            norm, common, n_classes, seed, spsa_steps, spsa_samples, transfer_sources, device, out_dir, version,
            notes) -> dict:
    """The curve, the checks, the verdict and the files (rank 0)."""
    kx, ky = guard.check_inputs(torch.cat(kept_x).to(device), torch.cat(kept_y).to(device))
    report["curve"] = None
    if curve is not None:
        eps_list = [f * eps for f in (0, 0.25, 0.5, 1, 1.5, 2)] if curve == "auto" else list(curve)
        report["curve"] = _curve(model, guard, kx, ky, eps_list, norm, curve_attack, common, seed, n_classes)
    report["checks"] = {}
    if checks:
        from fastadv.evaluation.checks import run_checks

        m = min(check_samples, kx.shape[0])
        flat = {k: [v for r in records for v in r[k]][:m] for k in ("robust",)}
        fooled_by = {nm: torch.tensor([v for r in records for v in r["attacks"][nm]["fooled"]][:m],
                                      dtype=torch.bool, device=device) for nm in names}
        report["checks"] = run_checks(
            model, guard, kx[:m], ky[:m], eps=eps, norm=norm, common=common,
            robust=torch.tensor(flat["robust"], dtype=torch.bool, device=device), fooled_by=fooled_by,
            num_classes=n_classes, seed=seed, curve=report["curve"],
            options={"spsa_steps": spsa_steps, "spsa_samples": spsa_samples,
                     "transfer_sources": transfer_sources})
        _expected_outcomes(report["checks"], version, notes, n_classes)
    report["transfer"] = _transfer(model, transfer_sources, kx[:check_samples], ky[:check_samples], eps, norm,
                                   common, seed)
    report["suspicious"], report["verdict"] = verdict(report["checks"], checks)
    report["warnings"] = [f"{k}: {c['detail']}" for k, c in report["checks"].items() if c["status"] == "fail"]
    for w in report["warnings"]:
        warnings.warn(w, GradientMaskingWarning, stacklevel=2)
    if out_dir is not None:
        report["files"] = write_report(report, out_dir)
    return report


def _transfer(model, transfer_sources, x, y, eps, norm, common, seed):
    """The transfer matrix (``fastadv.attacks.transfer_matrix``) on the check samples, when there is more
    than one model to craft on: the members and the whole of an ``Ensemble``, and ``transfer_sources``
    given as a dict name -> model. None otherwise (a plain list of sources only feeds the black-box check)."""
    from fastadv.attacks.transfer import ensemble_sources, transfer_matrix
    from fastadv.models import Ensemble

    models = ensemble_sources(model) if isinstance(model, Ensemble) else {}
    if isinstance(transfer_sources, dict):
        models.update(transfer_sources)
    if not models:
        return None
    if not any(m is model for m in models.values()):
        models["evaluated model"] = model
    opts = {k: common[k] for k in ("model_mode", "autocast", "clip") if k in common}
    return transfer_matrix(models, x, y, eps, norm=norm, seed=seed, **opts)


def _expected_outcomes(checks: dict, version: str, notes: list, n_classes: int) -> None:
    """Two check failures that the evaluation has already answered are outcomes, not suspicions:

    * ``n_classes``: with K < 4 the attack list was adapted (see ``notes``), so the DLR attacks that cannot
      run were replaced; the check passes, and says so;
    * ``randomized`` under version 'rand': that version exists for randomized models (EOT over 20 passes),
      as AutoAttack skips its randomization check for it.
    """
    c = checks.get("n_classes")
    if c is not None and c["status"] == "fail" and any(n.startswith(f"{n_classes} classes:") for n in notes):
        c["status"] = "pass"
        c["detail"] = f"{n_classes} classes: the attack list was adapted (see the notes). " + c["detail"]
    c = checks.get("randomized")
    if c is not None and c["status"] == "fail" and version == "rand":
        c["status"] = "pass"
        c["detail"] = "randomized outputs, evaluated with EOT (version 'rand'). " + c["detail"]


def _curve(model, guard, x, y, eps_list, norm, attack, common, seed, n_classes) -> list[dict]:
    """Robust accuracy of one attack at each eps, on (x, y); the same seed at every eps."""
    pts = []
    with guard.model_context():
        correct = C._predict(guard, x) == y
    for i, e in enumerate(eps_list):
        if e == 0 or not bool(correct.any()):
            acc = correct.float().mean().item()
        else:
            atk = make_attack(attack, model, e, norm, version="custom", n_classes=n_classes, **common)
            idx = correct.nonzero().squeeze(1)
            with C.seeded(C.attack_seed(seed, 0, 0), x.device, atk):
                adv = atk(x[idx], y[idx])
            ok = C.inside_threat_model(adv.float(), x[idx], e, norm, guard.clip)
            with guard.model_context():
                survived = (C._predict(guard, adv.float()) == y[idx]) | ~ok
            acc = survived.float().sum().item() / x.shape[0]
        pts.append({"eps": e, "robust_accuracy": acc, "n": int(x.shape[0])})
    return pts
