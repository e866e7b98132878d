"""``fastadv.evaluate``: an honest robustness report for a model.

    report = fastadv.evaluate(model, (x, y), attacks=["apgd-ce", "apgd-dlr"], eps=8/255)

reports, for inputs in [0, 1]:

* clean accuracy;
* robust accuracy per attack and the worst case per sample over all attacks.
  With ``cascade=True`` (default, as AutoAttack) each attack runs only on the
  samples every earlier attack failed to fool, and the per-attack number is
  the robust accuracy after that attack; ``cascade=False`` runs every attack
  on every clean-correct sample and also reports each attack alone;
* wall time and images/s of the attacks;
* optionally a robust-accuracy-versus-eps curve (``curve=``), as JSON and PNG;
* the gradient-masking checks of Athalye et al. 2018 ("Obfuscated Gradients
  Give a False Sense of Security") and Uesato et al. 2018 ("Adversarial Risk
  and the Dangers of Evaluating Against Weak Attacks") plus AutoAttack's
  sanity checks, on a subset of ``check_samples`` inputs. Each failed check
  adds a warning; any warning sets ``report['suspicious'] = True`` and the
  verdict says the robust accuracy is only an upper bound:

  - ``probabilities``: the outputs look like probabilities (rows in [0, 1]
    summing to 1), not logits: softmax saturation hides the gradient;
  - ``zero_gradients``: more than ``zero_grad_share`` of the samples have an
    input gradient that is exactly zero;
  - ``more_steps``: 5x more PGD steps with 2 restarts leaves accuracy higher
    than plain PGD; ``single_step``: FGSM beats PGD;
  - ``black_box``: SPSA (gradient-free) or a transfer attack (if
    ``transfer_sources`` are given) fools samples the white-box attacks could not;
  - ``huge_eps``: accuracy stays above chance when eps covers the whole box;
  - ``randomized``: two identical calls give different outputs (randomized
    defences need EOT before any number means anything).

Resumable: with ``state_path=`` the per-batch results are written after every
batch (atomically: a temporary file, then ``os.replace``), and a later call
with the same settings skips the finished batches. Batches must come in the
same order (a tensor pair, or a DataLoader without shuffling).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import tempfile
import time
import warnings
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from fastadv.attacks import APGD, FGSM, PGD, SPSA, TransferAttack
from fastadv.attacks.base import Attack, check_choice, check_eps, check_int, grad_wrt

__all__ = ["evaluate", "make_attack", "ATTACKS", "save_curve", "GradientMaskingWarning"]

ATTACKS = ("fgsm", "pgd", "pgd-cw", "apgd-ce", "apgd-dlr", "spsa")


class GradientMaskingWarning(UserWarning):
    """Issued by ``evaluate`` when a gradient-masking check fails."""


def make_attack(name: str, model, eps, norm: str = "linf", **common) -> Attack:
    """A named attack at radius eps with the settings ``evaluate`` uses.

    fgsm (linf only); pgd: 20 steps, alpha = 2.5 eps / 20, random start,
    early stop; pgd-cw: the same with the margin loss; apgd-ce / apgd-dlr:
    APGD with 100 steps; spsa (linf only): 100 steps, 128 directions.
    ``common``: Attack options (model_mode, autocast, ...).
    """
    check_choice("attack", name, ATTACKS)
    if name == "fgsm":
        if norm != "linf":
            raise ValueError("attack 'fgsm' is L-inf only; use 'pgd' for norm l2/l1")
        return FGSM(model, eps, **common)
    if name in ("pgd", "pgd-cw"):
        steps = 20
        return PGD(model, eps, 2.5 * eps / steps, steps, norm=norm, loss="cw" if name == "pgd-cw" else "ce",
                   early_stop=True, **common)
    if name in ("apgd-ce", "apgd-dlr"):
        return APGD(model, eps, 100, norm=norm, loss=name.split("-")[1], **common)
    if norm != "linf":
        raise ValueError("attack 'spsa' is L-inf only")
    return SPSA(model, eps, 100, samples=128, **common)


# ------------------------------------------------------------------ helpers
def _batches(data, batch_size: int, n: int | None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"data[1] must be a tensor of labels, got {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data has mismatched sizes: {x.shape[0]} images and {y.shape[0]} labels")
        if n is not None:
            x, y = x[:n], y[:n]
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    seen = 0
    for item in data:
        xb, yb = item[0], item[1]
        if n is not None:
            if seen >= n:
                return
            xb, yb = xb[: n - seen], yb[: n - seen]
        seen += xb.shape[0]
        yield xb, yb


def _atomic_write(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _fingerprint(model, names, eps, norm, batch_size, n, cascade) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([names, float(eps), norm, batch_size, n, cascade]).encode())
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            for name, p in model.state_dict().items():
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                if p.numel() and p.dtype.is_floating_point:
                    h.update(f"{p.double().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def _within(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, clip) -> torch.Tensor:
    """Per sample: adv in the box and within eps (plus float32 rounding slack)."""
    b = x.shape[0]
    d = (adv - x).reshape(b, -1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1) if norm == "l2" else d.abs().sum(1)
    tol = 1e-5 * max(1.0, eps) * (1 if norm == "linf" else max(1.0, math.sqrt(d.shape[1])))
    flat = adv.reshape(b, -1)
    inbox = (flat >= clip[0] - 1e-6).all(1) & (flat <= clip[1] + 1e-6).all(1)
    return (n <= eps + tol) & inbox & torch.isfinite(flat).all(1)


@torch.no_grad()
def _predict(model, x, batch_size=1024):
    return torch.cat([model(c).argmax(1) for c in x.split(batch_size)])


def save_curve(curve: Sequence[dict], out_dir, *, title: str = "robust accuracy vs eps") -> dict:
    """Write curve.json and curve.png (matplotlib, Agg backend) under ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "curve.json", json.dumps(list(curve), indent=1) + "\n")
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
    ax.plot([c["eps"] for c in curve], [100 * c["robust_accuracy"] for c in curve], marker="o")
    ax.set_xlabel("eps")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    plt.close(fig)
    return {"json": str(out / "curve.json"), "png": str(out / "curve.png")}


# ------------------------------------------------------------------ main
def evaluate(model, data, attacks=("apgd-ce", "apgd-dlr"), eps=8 / 255, *, norm: str = "linf",
             batch_size: int = 256, n: int | None = None, device=None, cascade: bool = True,
             curve=None, curve_attack: str = "pgd", checks: bool = True, check_samples: int = 128,
             spsa_steps: int = 20, spsa_samples: int = 64, zero_grad_share: float = 0.1,
             transfer_sources=None, model_mode: str = "eval", autocast=None, clip=(0.0, 1.0),
             state_path=None, out_dir=None, progress: bool = True, seed: int = 0) -> dict:
    """Evaluate ``model`` on ``data`` (see the module docstring).

    Args:
        model: (B, ...) images in ``clip`` -> (B, K) logits.
        data: a pair (x, y) of tensors (x float in [0, 1], y int64), or an
            iterable of such batches (a DataLoader in a fixed order).
        attacks: names from ``ATTACKS``, Attack instances, or (name, Attack) pairs, run in this order.
        eps: radius for the named attacks, float >= 0.
        norm: 'linf' | 'l2' | 'l1'.
        batch_size: for a tensor pair. n: evaluate only the first n samples.
        device: where to run (default: the model's device).
        cascade: attacks run only on still-robust samples (default True).
        curve: None, 'auto' (0, .25, .5, 1, 1.5, 2 x eps) or a list of eps:
            robust accuracy of ``curve_attack`` at each, on the first
            ``check_samples`` * 4 samples.
        checks: run the gradient-masking checks (default True) on the first
            ``check_samples`` samples; SPSA there uses ``spsa_steps`` steps of
            ``spsa_samples`` directions.
        transfer_sources: models for the transfer check (optional).
        model_mode, autocast, clip: Attack options for the named attacks.
        state_path: JSON file for resuming (written after every batch).
        out_dir: if given, report.json (and curve.json/png) are written there.
        progress: tqdm progress bar. seed: torch seed for the attacks' random starts.
    Returns:
        a JSON-serialisable dict: n, clean_accuracy, robust_accuracy (worst
        case), attacks (per attack: robust_accuracy, fooled, time_s,
        images_per_s), time_s, images_per_s, curve, checks, warnings,
        suspicious, verdict.
    """
    eps = float(check_eps("eps", eps))
    check_choice("norm", norm, ("linf", "l2", "l1"))
    check_int("batch_size", batch_size, 1)
    if n is not None:
        check_int("n", n, 1)
    common = dict(model_mode=model_mode, autocast=autocast, clip=clip)
    named: list[tuple[str, Attack]] = []
    for a in attacks:
        if isinstance(a, str):
            named.append((a, make_attack(a, model, eps, norm, **common)))
        elif isinstance(a, Attack):
            named.append((type(a).__name__, a))
        elif isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[1], Attack):
            named.append((str(a[0]), a[1]))
        else:
            raise TypeError(f"attacks must hold attack names ({', '.join(ATTACKS)}), Attack instances or "
                            f"(name, Attack) pairs, got {a!r}")
    names = [nm for nm, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks has duplicate names: {names}")
    if device is None:
        p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    guard = Attack(model, model_mode=model_mode, autocast=autocast, clip=clip)

    state = {"fingerprint": _fingerprint(model, names, eps, norm, batch_size, n, cascade), "batches": []}
    state_file = pathlib.Path(state_path) if state_path is not None else None
    if state_file is not None and state_file.exists():
        saved = json.loads(state_file.read_text())
        if saved.get("fingerprint") != state["fingerprint"]:
            raise ValueError(f"state_path {state_file} holds a different evaluation (other model, attacks, eps, "
                             "batch size or n); delete it or pass another state_path")
        state = saved
    done_batches = len(state["batches"])

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    check_x, check_y = [], []
    curve_n = check_samples * 4
    curve_x, curve_y = [], []
    it = _batches(data, batch_size, n)
    bar = tqdm(it, desc="evaluate", unit="batch", disable=not progress) if tqdm else it
    for bi, (xb, yb) in enumerate(bar):
        xb, yb = xb.to(device), yb.to(device)
        have = sum(t.shape[0] for t in check_x)
        if have < check_samples:
            check_x.append(xb[: check_samples - have])
            check_y.append(yb[: check_samples - have])
        have = sum(t.shape[0] for t in curve_x)
        if curve is not None and have < curve_n:
            curve_x.append(xb[: curve_n - have])
            curve_y.append(yb[: curve_n - have])
        if bi < done_batches:
            continue  # finished before an interruption
        xb, yb = guard.check_inputs(xb, yb)
        with guard.model_context():
            with torch.no_grad():
                logits = guard.logits(xb)
        correct = logits.argmax(1) == yb
        robust = correct.clone()
        rec = {"n": int(xb.shape[0]), "correct": correct.tolist(), "attacks": {}}
        torch.manual_seed(seed + bi)
        for nm, atk in named:
            pool = robust if cascade else correct
            idx = pool.nonzero().squeeze(1)
            fooled_here = torch.zeros_like(correct)
            invalid = 0
            t0 = time.perf_counter()
            if idx.numel():
                adv = atk(xb[idx], yb[idx])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                ok = _within(adv, xb[idx], float(atk.eps) if isinstance(getattr(atk, "eps", None), (int, float))
                             else eps, norm, guard.clip)
                invalid = int((~ok).sum())
                with guard.model_context():
                    pred = _predict(guard.logits, adv)
                fooled_here[idx] = (pred != yb[idx]) & ok
            else:
                dt = 0.0
            robust &= ~fooled_here
            rec["attacks"][nm] = {"fooled": fooled_here.tolist(), "ran_on": int(idx.numel()), "time_s": dt,
                                  "invalid": invalid}
        rec["robust"] = robust.tolist()
        state["batches"].append(rec)
        if state_file is not None:
            _atomic_write(state_file, json.dumps(state))

    report = _summarize(state, names, cascade, eps, norm)
    warn_list: list[str] = []
    report["checks"] = {}
    if checks and check_x:
        cx, cy = torch.cat(check_x), torch.cat(check_y)
        cx, cy = guard.check_inputs(cx, cy)
        # white-box outcome per check sample: the first check_samples of the evaluation
        flat_robust = torch.tensor([r for b in state["batches"] for r in b["robust"]][: cx.shape[0]],
                                   dtype=torch.bool, device=device)
        report["checks"] = _masking_checks(model, guard, cx, cy, eps, norm, common, flat_robust, spsa_steps,
                                           spsa_samples, zero_grad_share, transfer_sources, seed, warn_list)
    for nm, r in report["attacks"].items():
        if r["invalid"]:
            warn_list.append(f"attack {nm} returned {r['invalid']} points outside the eps-ball or the box; "
                             "they were counted as not fooled")
    if curve is not None:
        eps_list = [f * eps for f in (0, 0.25, 0.5, 1, 1.5, 2)] if curve == "auto" else [float(e) for e in curve]
        cx, cy = guard.check_inputs(torch.cat(curve_x), torch.cat(curve_y))
        report["curve"] = _curve(model, guard, cx, cy, eps_list, norm, curve_attack, common, seed)
    else:
        report["curve"] = None
    report["warnings"] = warn_list
    report["suspicious"] = bool(warn_list)
    if warn_list:
        report["verdict"] = ("SUSPICIOUS: signs of gradient masking; the robust accuracy above is an upper bound, "
                             "not evidence of robustness")
        for w in warn_list:
            warnings.warn(w, GradientMaskingWarning, stacklevel=2)
    else:
        report["verdict"] = "no sign of gradient masking in the checks run" if checks else "checks not run"
    if out_dir is not None:
        out = pathlib.Path(out_dir)
        if report["curve"]:
            report["curve_files"] = save_curve(report["curve"], out)
        _atomic_write(out / "report.json", json.dumps(report, indent=1) + "\n")
    return report


def _summarize(state, names, cascade, eps, norm) -> dict:
    batches = state["batches"]
    total = sum(b["n"] for b in batches)
    correct = sum(sum(b["correct"]) for b in batches)
    robust = sum(sum(b["robust"]) for b in batches)
    attack_time = sum(a["time_s"] for b in batches for a in b["attacks"].values())
    per = {}
    remaining = correct
    for nm in names:
        fooled = sum(sum(b["attacks"][nm]["fooled"]) for b in batches)
        t = sum(b["attacks"][nm]["time_s"] for b in batches)
        ran = sum(b["attacks"][nm]["ran_on"] for b in batches)
        if cascade:
            remaining -= fooled
            acc = remaining / total if total else float("nan")
        else:
            acc = (correct - fooled) / total if total else float("nan")
        per[nm] = {"robust_accuracy": acc, "fooled": fooled, "ran_on": ran, "time_s": t,
                   "images_per_s": ran / t if t > 0 else None,
                   "invalid": sum(b["attacks"][nm]["invalid"] for b in batches)}
    return {"n": total, "eps": eps, "norm": norm, "cascade": cascade,
            "clean_accuracy": correct / total if total else float("nan"),
            "robust_accuracy": robust / total if total else float("nan"), "attacks": per,
            "time_s": attack_time, "images_per_s": total / attack_time if attack_time > 0 else None}


def _acc_under(guard, atk, x, y) -> float:
    if x.shape[0] == 0:
        return float("nan")
    adv = atk(x, y)
    with guard.model_context():
        pred = _predict(guard.logits, adv)
    return (pred == y).float().mean().item()


def _masking_checks(model, guard, x, y, eps, norm, common, wb_robust, spsa_steps, spsa_samples, zero_share,
                    transfer_sources, seed, warn_list) -> dict:
    out: dict = {}
    torch.manual_seed(seed)
    with guard.model_context():
        with torch.no_grad():
            z1 = guard.logits(x)
            z2 = guard.logits(x)
        # 1. probabilities instead of logits
        probs = bool(((z1 >= 0) & (z1 <= 1)).all() and torch.allclose(z1.sum(1), torch.ones_like(z1[:, 0]), atol=1e-3))
        out["probabilities"] = probs
        if probs:
            warn_list.append("the model outputs probabilities (rows in [0, 1] summing to 1), not logits: "
                             "cross-entropy on them saturates and hides the gradient; attack the logits")
        # 6. randomized predictions
        rand = not torch.allclose(z1, z2, rtol=1e-5, atol=1e-6)
        out["randomized"] = rand
        if rand:
            warn_list.append("two identical calls gave different outputs: a randomized model needs EOT "
                             "(expectation over transformation) attacks before its accuracy means anything")
        # 2. zero gradients
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            g = grad_wrt(F.cross_entropy(guard.logits(xr), y, reduction="sum"), xr)
        zero = (g.reshape(g.shape[0], -1) == 0).all(1).float().mean().item()
        out["zero_gradient_share"] = zero
        if zero > zero_share:
            warn_list.append(f"{zero:.0%} of the samples have an exactly zero input gradient: gradient-based "
                             "attacks cannot move them (shattered or masked gradients)")
        pred = _predict(guard.logits, x)
    correct = pred == y
    xc, yc = x[correct], y[correct]
    n = x.shape[0]
    tol = max(1.0 / max(n, 1), 0.02)
    # 3. more steps / restarts; single step vs iterative
    steps = 10
    base = PGD(model, eps, 2.5 * eps / steps, steps, norm=norm, **common)
    strong = PGD(model, eps, 2.5 * eps / (5 * steps), 5 * steps, norm=norm, restarts=2, **common)
    a_base = _acc_under(guard, base, xc, yc) * correct.float().mean().item()
    a_strong = _acc_under(guard, strong, xc, yc) * correct.float().mean().item()
    out["pgd10_accuracy"], out["pgd50x2_accuracy"] = a_base, a_strong
    if a_strong > a_base + tol:
        warn_list.append(f"more PGD steps and restarts RAISED accuracy ({a_base:.1%} with 10 steps, {a_strong:.1%} "
                         "with 50 steps x 2 restarts): the loss surface is noisy or masked")
    if norm == "linf":
        a_fgsm = _acc_under(guard, FGSM(model, eps, **common), xc, yc) * correct.float().mean().item()
        out["fgsm_accuracy"] = a_fgsm
        if a_fgsm + tol < a_base:
            warn_list.append(f"single-step FGSM ({a_fgsm:.1%}) beat 10-step PGD ({a_base:.1%}): a sign of "
                             "gradient masking")
    # 4. black box vs white box on the samples the white-box attacks left robust
    left = wb_robust & correct
    xl, yl = x[left], y[left]
    out["whitebox_robust_in_subset"] = int(left.sum())
    if norm == "linf" and xl.shape[0]:
        spsa = SPSA(model, eps, spsa_steps, samples=spsa_samples, **common)
        acc_spsa = _acc_under(guard, spsa, xl, yl)
        broken = int(round((1 - acc_spsa) * xl.shape[0]))
        out["spsa_fooled_whitebox_robust"] = broken
        if broken > max(1, 0.02 * n):
            warn_list.append(f"gradient-free SPSA fooled {broken} of {xl.shape[0]} samples that the white-box "
                             "attacks could not: the gradients are masked")
    if transfer_sources is not None and xl.shape[0]:
        tr = TransferAttack(model, transfer_sources, eps=eps, alpha=2.5 * eps / 20, steps=20, norm=norm, **common)
        acc_tr = _acc_under(guard, tr, xl, yl)
        broken = int(round((1 - acc_tr) * xl.shape[0]))
        out["transfer_fooled_whitebox_robust"] = broken
        if broken > max(1, 0.02 * n):
            warn_list.append(f"a transfer attack fooled {broken} of {xl.shape[0]} samples that the white-box "
                             "attacks could not: the gradients are masked")
    # 5. huge eps: the whole box is reachable, accuracy must fall to chance or below
    d = x[0].numel()
    big = {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[norm]
    huge = PGD(model, big, big / 10 if norm == "linf" else big / 5, 20, norm=norm, **common)
    k = z1.shape[1]
    a_huge = _acc_under(guard, huge, x, y)
    out["huge_eps"], out["huge_eps_accuracy"] = big, a_huge
    if a_huge > 1.0 / k + tol:
        warn_list.append(f"accuracy stays at {a_huge:.1%} (chance: {1 / k:.1%}) at eps={big:g}, where every image "
                         "is reachable: the attacks do not work on this model")
    return out


def _curve(model, guard, x, y, eps_list, norm, attack, common, seed) -> list[dict]:
    pts = []
    with guard.model_context():
        correct = _predict(guard.logits, x) == y
    for e in eps_list:
        torch.manual_seed(seed)
        if e == 0 or not bool(correct.any()):
            acc = correct.float().mean().item()
        else:
            atk = make_attack(attack, model, e, norm, **common)
            idx = correct.nonzero().squeeze(1)
            adv = atk(x[idx], y[idx])
            with guard.model_context():
                ok = _predict(guard.logits, adv) == y[idx]
            acc = ok.float().sum().item() / x.shape[0]
        pts.append({"eps": e, "robust_accuracy": acc})
    return pts
