"""The one benchmark harness: timing, copy bandwidth, environment stamp, JSON, tables.

Every ``fastadv bench <target>`` and the pytest-benchmark suites in
``benchmarks/`` use these functions, so all numbers are taken the same way.

API
---
``time_fn(fn, *, device="cpu", warmup=3, min_time=0.5, ...) -> Timing``
    Median time of ``fn()`` in milliseconds, with its interquartile range and
    the number of timed samples. CPU: ``time.perf_counter`` around each run,
    after ``warmup`` untimed runs, repeated until ``min_time`` seconds (and at
    least ``min_runs`` samples); calls shorter than ``group_s`` are timed in
    groups and divided, so timer overhead stays below 1%. CUDA:
    ``triton.testing.do_bench`` (median over runs with a flushed L2), or CUDA
    events when triton is missing. CUDA is touched only when ``device`` is a
    CUDA device, so a CPU run never initialises it.
``copy_bandwidth(device="cpu", nbytes=256 MiB, ...) -> float``
    This machine's copy bandwidth in GB/s (1e9 bytes/s), measured now with
    ``dst.copy_(src)`` on a float32 buffer larger than any cache. Bytes moved
    per copy = 2 * nbytes (one read, one write), the STREAM "Copy" convention;
    op bandwidths count reads + writes the same way, so the fraction
    ``op GB/s / copy GB/s`` compares like with like.
``gbs(nbytes, ms) -> float``
    Effective bandwidth of a call that moves ``nbytes`` in ``ms`` milliseconds.
``environment(device="cpu") -> dict``
    The stamp every result carries: device name (CPU model from
    /proc/cpuinfo, or ``torch.cuda.get_device_name``), cores, torch / triton /
    fastadv / python versions, OMP_NUM_THREADS, OMP_WAIT_POLICY and
    ``torch.get_num_threads()``, the load average (on a shared machine a
    spinning OpenMP thread that loses its core costs a whole scheduler tick:
    medians of 8 or 16 ms for 0.05 ms calls were seen here at load 5 on 2
    cores), git commit when run from a checkout, and the UTC date.
``write_result(name, payload, out_dir=None) -> Path``
    Writes ``payload`` (plus the environment stamp if absent) as JSON to
    ``<out_dir>/<name>-<device-slug>-<YYYYmmdd-HHMMSS>.json``; ``out_dir``
    defaults to ``benchmarks/results`` of the checkout this package lives in,
    else of the working directory.
``print_table(rows, columns, file=None)``
    A plain-text, aligned table of dicts. ``columns`` is a list of keys or of
    ``(key, header, format)`` tuples, e.g. ``("ms", "ms", "{:.3f}")``.

Interface of a bench target (``fastadv bench <target>``)
-------------------------------------------------------
A target is a module ``fastadv/bench/<target>.py`` (ops, sinkhorn, attacks,
train) defining:

``add_arguments(parser)`` (optional)
    Adds the target's own options. The common options already exist on the
    parser and must not be added again: ``--quick`` (small shapes, few repeats:
    a smoke test that finishes in seconds), ``--backends`` (comma list, default
    every available one), ``--dtype`` (comma list, e.g. ``float32,bfloat16``;
    None: the target's default), ``--device`` (``cpu`` | ``cuda``; default
    cuda when available), ``--min-time`` (seconds per timed case, None: the
    target's default), ``--out`` (results folder) and ``--no-save``.
``run(args) -> dict``
    Runs the cases (baseline and ours in the same process, one after the
    other, on the same inputs) and returns the payload::

        {"rows": [dict, ...],            # one dict per case, JSON-serialisable
         "columns": [(key, header, fmt), ...],  # what the table shows
         "notes": ["...", ...],          # skipped backends and why, caveats
         ...}                            # anything else worth keeping

``fastadv.bench.cli`` prints the notes and the table, adds the environment
stamp and writes the JSON (``write_result(target, payload)``); the target
itself neither prints the table nor writes files. Progress lines on stderr
are welcome.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "Timing",
    "time_fn",
    "copy_bandwidth",
    "gbs",
    "environment",
    "load_warning",
    "device_name",
    "device_slug",
    "default_results_dir",
    "write_result",
    "format_table",
    "print_table",
]


# ------------------------------------------------------------------ timing
@dataclasses.dataclass(frozen=True)
class Timing:
    """Median and interquartile range of the timed samples, in milliseconds."""

    median_ms: float
    iqr_ms: float
    min_ms: float
    n: int  # number of timed samples (each may average a group of calls)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _summary(samples_ms: Sequence[float]) -> Timing:
    s = sorted(samples_ms)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4, method="inclusive")
        iqr = q[2] - q[0]
    else:
        iqr = s[-1] - s[0]
    return Timing(median_ms=statistics.median(s), iqr_ms=iqr, min_ms=s[0], n=len(s))


def time_fn(
    fn: Callable[[], Any],
    *,
    device="cpu",
    warmup: int = 3,
    min_time: float = 0.5,
    min_runs: int = 5,
    max_runs: int = 10_000,
    group_s: float = 2e-4,
) -> Timing:
    """Median wall time of ``fn()`` (see the module docstring).

    Args:
        fn: a callable with no arguments; its result is discarded.
        device: where fn's work runs. CUDA devices are timed with
            ``triton.testing.do_bench`` (CUDA events, L2 flushed per run).
        warmup: untimed calls first (CPU); on CUDA, warm-up time is
            ``max(25 ms, warmup calls)``.
        min_time: seconds of timed calls to collect (at least ``min_runs``
            samples, at most ``max_runs``).
        group_s: CPU calls faster than this are timed ``k`` at a time, and
            ``k`` is chosen so a group lasts about ``group_s``; perf_counter's
            own cost (about 0.1 us) then stays under 0.1% of a sample.
    """
    if _is_cuda(device):
        return _time_cuda(fn, warmup=warmup, min_time=min_time, min_runs=min_runs)
    # Warm-up stops early once it has used min_time: a 3 s call (the sort-based
    # L1 projection at 32x3x224x224 on 2 cores) needs one warm-up call, not three.
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        fn()
        now = time.perf_counter()
        if now - start > max(min_time, 0.01):
            break
    est = max(now - t0, 1e-9)  # the last warm-up call sets the group size
    group = 1 if est >= group_s else int(math.ceil(group_s / est))
    samples: list[float] = []
    deadline = time.perf_counter() + min_time
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        for _ in range(group):
            fn()
        samples.append((time.perf_counter() - t0) * 1e3 / group)
    return _summary(samples)


def _time_cuda(fn, *, warmup: int, min_time: float, min_runs: int) -> Timing:
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        samples = do_bench(fn, warmup=25, rep=max(1, int(min_time * 1e3)), return_mode="all")
        return _summary(samples)
    # Fallback without triton: CUDA events around each call after warm-up.
    for _ in range(max(warmup, 1)):
        fn()
    torch.cuda.synchronize()
    samples = []
    deadline = time.perf_counter() + min_time
    while len(samples) < min_runs or time.perf_counter() < deadline:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return _summary(samples)


def gbs(nbytes: float, ms: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``ms``."""
    return nbytes / (ms * 1e-3) / 1e9 if ms > 0 else float("nan")


def copy_bandwidth(device="cpu", nbytes: int = 256 * 2**20, *, min_time: float = 0.5) -> float:
    """Copy bandwidth of this machine in GB/s, measured now: ``dst.copy_(src)``.

    ``nbytes`` is the size of one buffer (default 256 MiB, far above any CPU
    cache or a GPU's L2); a copy moves 2 * nbytes (read src, write dst). On
    CPU the copy uses torch's intra-op threads (``torch.get_num_threads()``),
    the same threads the ops use.
    """
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, min_time=min_time, min_runs=5)
    return gbs(2 * n * 4, t.median_ms)


# ------------------------------------------------------------- environment
def device_name(device="cpu") -> str:
    """'NVIDIA H100 80GB HBM3' or the CPU model from /proc/cpuinfo (platform's name elsewhere)."""
    if _is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(name: str) -> str:
    """A file-name friendly form of a device name: 'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor'."""
    s = re.sub(r"\((r|tm|c)\)", "", name.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s[:40].rstrip("-") or "device"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # an absent or broken optional package is just "None"
        return None


def _git_commit() -> str | None:
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device="cpu") -> dict:
    """The stamp every result carries (see the module docstring)."""
    dev = torch.device(device)
    env = {
        "device": str(dev),
        "device_name": device_name(dev),
        "cpu_model": device_name("cpu"),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch_num_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fastadv": _version("fastadv"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if dev.type == "cuda":
        env["cuda"] = torch.version.cuda
        props = torch.cuda.get_device_properties(dev)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
    return env


def load_warning(env: dict) -> str | None:
    """A warning when the 1-minute load average exceeds 75% of the cores (CPU timings are then disturbed)."""
    load, cores = env.get("loadavg"), env.get("cpu_affinity") or env.get("cpu_count")
    if env.get("device", "cpu") != "cpu" or not load or not cores or load[0] <= 0.75 * cores:
        return None
    return (f"load average {load[0]:.2f} on {cores} cores: other processes share the CPU, so medians "
            "are inflated and noisy (compare min ms, or re-run when `uptime` shows a quiet machine)")


# ------------------------------------------------------------------ output
def default_results_dir() -> pathlib.Path:
    """``benchmarks/results`` of the checkout holding this package, else of the working directory."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if (root / "benchmarks").is_dir() and (root / "setup.py").exists():
        return root / "benchmarks" / "results"
    return pathlib.Path.cwd() / "benchmarks" / "results"


def _jsonable(o):
    if isinstance(o, Timing):
        return o.as_dict()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if isinstance(o, pathlib.Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(o):
    """NaN/inf as null (strict JSON) and tuples as lists, recursively."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_result(name: str, payload: dict, out_dir=None, path=None) -> pathlib.Path:
    """Write ``payload`` as JSON under ``out_dir``; returns the path.

    The file is ``<name>-<device slug>-<UTC YYYYmmdd-HHMMSS>.json``. An
    ``environment`` entry is added when the payload has none (for the device
    named by ``payload["device"]``, default cpu). ``path`` (a path this function
    returned before) overwrites that file instead: a long benchmark rewrites its
    JSON after every row, so a run stopped part-way keeps the rows it finished.
    """
    payload = dict(payload)
    payload.setdefault("name", name)
    if "environment" not in payload:
        payload["environment"] = environment(payload.get("device", "cpu"))
    env = payload["environment"]
    if path is None:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path(out_dir) if out_dir is not None else default_results_dir()
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{name}-{device_slug(env.get('device_name', 'device'))}-{stamp}.json"
    path = pathlib.Path(path)
    text = json.dumps(_clean(payload), indent=1, default=_jsonable, allow_nan=False)
    path.write_text(text + "\n")
    return path


def _columns(columns) -> list[tuple[str, str, str | None]]:
    cols = []
    for c in columns:
        if isinstance(c, str):
            cols.append((c, c, None))
        else:
            c = tuple(c)
            cols.append((c[0], c[1] if len(c) > 1 else c[0], c[2] if len(c) > 2 else None))
    return cols


def _cell(value, fmt) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if fmt is not None:
        try:
            return fmt.format(value)
        except (ValueError, TypeError):
            return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: Iterable[dict], columns) -> str:
    """Rows of dicts as an aligned plain-text table (missing values show as '-')."""
    cols = _columns(columns)
    body = [[_cell(r.get(k), f) for k, _, f in cols] for r in rows]
    head = [h for _, h, _ in cols]
    widths = [max([len(head[i])] + [len(line[i]) for line in body]) for i in range(len(cols))]

    def fmt_line(cells):
        # text columns left-aligned, numbers right-aligned
        out = []
        for i, c in enumerate(cells):
            numeric = all(_looks_numeric(line[i]) for line in body) and body
            out.append(c.rjust(widths[i]) if numeric else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt_line(head), "  ".join("-" * w for w in widths)]
    lines += [fmt_line(line) for line in body]
    return "\n".join(lines)


def _looks_numeric(s: str) -> bool:
    return s == "-" or bool(re.fullmatch(r"[-+]?[0-9.,]+(e[-+]?\d+)?[x%]?", s))


def print_table(rows: Iterable[dict], columns, file=None) -> None:
    """Print ``format_table(rows, columns)`` to ``file`` (default stdout)."""
    print(format_table(list(rows), columns), file=file or sys.stdout)
