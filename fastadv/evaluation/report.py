"""The report: numbers from the per-batch records, the verdict, report.json, report.md and the eps curve PNG."""
from __future__ import annotations

import json
import pathlib
import platform
import shlex
import sys
from typing import Sequence

from fastadv.evaluation.cascade import atomic_write

__all__ = ["summarize", "verdict", "save_curve", "write_report", "markdown"]


def summarize(records: list[dict], names: list[str], cascade: bool) -> dict:
    """Clean and robust accuracy, per attack and per class, from the batch records."""
    total = sum(r["n"] for r in records)
    correct = sum(sum(r["correct"]) for r in records)
    robust = sum(sum(r["robust"]) for r in records)
    attack_time = sum(a["time_s"] for r in records for a in r["attacks"].values())
    nan = float("nan")
    per, remaining = {}, correct
    for nm in names:
        fooled = sum(sum(r["attacks"][nm]["fooled"]) for r in records)
        t = sum(r["attacks"][nm]["time_s"] for r in records)
        ran = sum(r["attacks"][nm]["ran_on"] for r in records)
        if cascade:
            remaining -= fooled
            acc = remaining / total if total else nan
        else:
            acc = (correct - fooled) / total if total else nan
        per[nm] = {"robust_accuracy": acc, "fooled": fooled, "ran_on": ran, "time_s": t,
                   "images_per_s": ran / t if t > 0 else None,
                   "invalid": sum(r["attacks"][nm]["invalid"] for r in records),
                   "nonfinite": sum(r["attacks"][nm].get("nonfinite", 0) for r in records)}
    classes: dict[int, list[int]] = {}
    for r in records:
        for lab, c, rb in zip(r.get("labels", []), r["correct"], r["robust"]):
            e = classes.setdefault(int(lab), [0, 0, 0])
            e[0] += 1
            e[1] += int(c)
            e[2] += int(rb)
    per_class = {str(k): {"n": v[0], "clean_accuracy": v[1] / v[0], "robust_accuracy": v[2] / v[0]}
                 for k, v in sorted(classes.items())}
    return {"n": total, "clean_accuracy": correct / total if total else nan,
            "robust_accuracy": robust / total if total else nan, "attacks": per, "per_class": per_class,
            "invalid_points": sum(p["invalid"] for p in per.values()),
            "time_s": attack_time, "images_per_s": total / attack_time if attack_time > 0 else None}


def verdict(checks: dict, checks_run: bool) -> tuple[bool, str]:
    """(suspicious, one-sentence verdict) from the check outcomes."""
    failed = [k for k, c in checks.items() if c.get("status") == "fail"]
    if failed:
        return True, ("SUSPICIOUS: signs of gradient masking or a broken evaluation (" + ", ".join(failed) +
                      "); the robust accuracy above is an upper bound, not evidence of robustness")
    if not checks_run:
        return False, "checks not run: the robust accuracy is unchecked for gradient masking"
    return False, "no sign of gradient masking in the checks run"


def save_curve(curve: Sequence[dict], out_dir, *, title: str = "robust accuracy vs eps") -> dict:
    """Write curve.json and curve.png (matplotlib, Agg backend) under ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "curve.json", json.dumps(list(curve), indent=1) + "\n")
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


def environment() -> dict:
    import torch

    import fastadv

    return {"fastadv": fastadv.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": None, "command": shlex.join(sys.argv)}


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}%"


def markdown(report: dict) -> str:
    """report.md: the per-attack table, the worst case, every check with its outcome, the verdict."""
    env = report.get("environment", {})
    lines = [f"# Robustness report: {report['version']} evaluation, {report['norm']} eps = {report['eps']:g}", ""]
    lines += [f"**Robust accuracy: {_pct(report['robust_accuracy'])}** (worst case over "
              f"{', '.join(report['attacks']) or 'no attack'}; clean accuracy {_pct(report['clean_accuracy'])}, "
              f"n = {report['n']})", "", f"Verdict: {report['verdict']}", ""]
    lines += ["| attack | ran on | fooled | invalid points | robust accuracy after | time (s) | images/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for nm, a in report["attacks"].items():
        ips = f"{a['images_per_s']:.1f}" if a["images_per_s"] else "-"
        lines.append(f"| {nm} | {a['ran_on']} | {a['fooled']} | {a['invalid']} | {_pct(a['robust_accuracy'])} | "
                     f"{a['time_s']:.1f} | {ips} |")
    lines += ["", f"Points outside the threat model (never counted as fooled): {report['invalid_points']}.", ""]
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    lines += ["## Checks", "", "| check | outcome | value | detail |", "|---|---|---|---|"]
    for nm, c in report.get("checks", {}).items():
        val = json.dumps(c.get("value"), default=str)
        lines.append(f"| {nm} | {c.get('status', '?').upper()} | {val[:60]} | {c.get('detail', '')} |")
    if not report.get("checks"):
        lines.append("| (none run) | | | |")
    if report.get("transfer"):
        from fastadv.attacks.transfer import format_transfer_matrix

        lines += ["", "## Transfer (rows: crafted on; columns: evaluated on; robust accuracy)", "",
                  format_transfer_matrix(report["transfer"])]
    if report.get("per_class"):
        lines += ["", "## Per class", "", "| class | n | clean | robust |", "|---:|---:|---:|---:|"]
        for k, v in report["per_class"].items():
            lines.append(f"| {k} | {v['n']} | {_pct(v['clean_accuracy'])} | {_pct(v['robust_accuracy'])} |")
    if report.get("curve"):
        lines += ["", "## Robust accuracy vs eps", ""]
        if report.get("curve_files"):
            lines += ["![robust accuracy vs eps](curve.png)", ""]
        lines += ["| eps | robust accuracy |", "|---:|---:|"]
        lines += [f"| {c['eps']:.4g} | {_pct(c['robust_accuracy'])} |" for c in report["curve"]]
    lines += ["", "## Run", "", f"- fastadv {env.get('fastadv')}, torch {env.get('torch')}, Python "
              f"{env.get('python')}, device {report.get('device')}",
              f"- seed {report['settings']['seed']}, batch size {report['settings']['batch_size']}, model mode "
              f"{report['settings']['model_mode']}, autocast {report['settings']['autocast']}, world size "
              f"{report.get('world_size', 1)}",
              f"- wall time of the attacks {report['time_s']:.1f} s ({report['images_per_s'] or 0:.1f} images/s)",
              f"- command: `{env.get('command', '')}`", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir) -> dict:
    """report.json, report.md and (if there is a curve) curve.json / curve.png under out_dir."""
    out = pathlib.Path(out_dir)
    if report.get("curve"):
        report["curve_files"] = save_curve(report["curve"], out)
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str) + "\n")
    atomic_write(out / "report.md", markdown(report))
    return {"json": str(out / "report.json"), "md": str(out / "report.md")}
