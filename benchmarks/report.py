"""Summarise benchmark results (benchmarks/results/*.json) as markdown, optionally a PNG chart.

Usage::

    python benchmarks/report.py                       # newest result per (bench, device)
    python benchmarks/report.py --all                 # every file
    python benchmarks/report.py benchmarks/results/ops-*.json --png /tmp/ops.png
    python benchmarks/report.py --impl cpp,"eager ref","compile ref"   # fewer rows

It reads the JSON that ``fastadv bench <target>`` writes (``rows``,
``columns``, ``notes``, ``environment``; see fastadv/bench/harness.py), so it
works for every target. The chart draws, for each file with a ``speedup``
column, the speedup over the eager reference per op and implementation
(log scale), one panel per shape.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import signal
import sys

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def load(paths) -> list[tuple[pathlib.Path, dict]]:
    out = []
    for p in paths:
        p = pathlib.Path(p)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"skipping {p}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and "rows" in data:
            out.append((p, data))
    return out


def newest(results):
    """The newest file per (bench name, device name, thread count, --quick), by the date in its stamp."""
    best = {}
    for p, d in results:
        env = d.get("environment", {})
        key = (d.get("name", p.stem.split("-")[0]), env.get("device_name"), env.get("torch_num_threads"),
               bool(d.get("quick")))
        if key not in best or env.get("date", "") > best[key][1].get("environment", {}).get("date", ""):
            best[key] = (p, d)
    return sorted(best.values(), key=lambda pd: str(pd[0]))


def _cell(v, fmt):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if fmt:
        try:
            return fmt.format(v)
        except (ValueError, TypeError):
            pass
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(path: pathlib.Path, data: dict, impls=None) -> str:
    env = data.get("environment", {})
    lines = [f"## {data.get('name', path.stem)}: {env.get('device_name', '?')} ({path.name})", ""]
    load = env.get("loadavg")
    lines.append(
        f"torch {env.get('torch')}, triton {env.get('triton')}, fastadv {env.get('fastadv')}"
        f" (git {env.get('git_commit')}), {env.get('torch_num_threads')} threads"
        f" (OMP_NUM_THREADS={env.get('omp_num_threads')}), {env.get('cpu_count')} cores,"
        f" load {', '.join(f'{v:.2f}' for v in load) if load else '?'}, {env.get('date')}"
        + (", --quick" if data.get("quick") else "")
    )
    if data.get("copy_gbs_large") is not None:
        mib = (data.get("copy_large_bytes") or 0) >> 20
        lines.append(f"\nCopy bandwidth, {mib} MiB buffer: {data['copy_gbs_large']:.1f} GB/s.")
    lines.append("")
    cols = data.get("columns") or [[k, k] for k in sorted({k for r in data["rows"] for k in r})]
    cols = [(c, c, None) if isinstance(c, str) else (c[0], c[1] if len(c) > 1 else c[0], c[2] if len(c) > 2 else None) for c in cols]
    rows = [r for r in data["rows"] if impls is None or r.get("impl") in impls or r.get("op") == "copy_"]
    lines.append("| " + " | ".join(h for _, h, _ in cols) + " |")
    lines.append("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in cols) + " |")
    targets = data.get("targets") or []
    if targets:
        lines += ["", "Targets:", ""]
        lines += [f"- {'met' if t['met'] else 'MISSED'}: {t['target']} (measured {t['measured']})" for t in targets]
    notes = [n for n in data.get("notes", []) if not n.startswith("target ")]
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def chart(results, png: str, impls=None) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for p, d in results:
        rows = [r for r in d["rows"] if r.get("speedup") is not None and r.get("op") != "copy_"]
        rows = [r for r in rows if impls is None or r.get("impl") in impls]
        for shape in sorted({r.get("shape") for r in rows}, key=str):
            panels.append((f"{d.get('name')} {shape} ({d.get('environment', {}).get('device_name', '')})",
                           [r for r in rows if r.get("shape") == shape]))
    if not panels:
        print("no rows with a speedup column: no chart", file=sys.stderr)
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, (title, rows) in zip(axes[:, 0], panels):
        ops = list(dict.fromkeys(r["op"] for r in rows))
        kinds = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / max(len(kinds), 1)
        for k, kind in enumerate(kinds):
            vals = [next((r["speedup"] for r in rows if r["op"] == op and r["impl"] == kind), 0.0) for op in ops]
            ax.bar([i + k * width for i in range(len(ops))], vals, width, label=kind)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ops))], ops, rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speedup over eager ref")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(kinds), 6))
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return True


def main(argv=None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `report.py | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", help="result files (default: benchmarks/results/*.json)")
    ap.add_argument("--all", action="store_true", help="every file, not just the newest per (bench, device)")
    ap.add_argument("--impl", default=None, help="comma list of impl names to keep (ops results)")
    ap.add_argument("--png", default=None, help="also draw a speedup bar chart to this PNG")
    args = ap.parse_args(argv)
    paths = args.paths or sorted(RESULTS.glob("*.json"))
    results = load(paths)
    if not results:
        print(f"no results found ({'given paths' if args.paths else RESULTS})", file=sys.stderr)
        return 1
    if not args.all and not args.paths:
        results = newest(results)
    impls = set(s.strip() for s in args.impl.split(",")) if args.impl else None
    print("\n".join(markdown(p, d, impls) for p, d in results))
    if args.png and chart(results, args.png, impls):
        print(f"chart: {args.png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
