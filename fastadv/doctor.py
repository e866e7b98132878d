"""``fastadv doctor --gpu``: the whole GPU validation as one command (also ``scripts/gpu_validate.sh``).

GPU time comes in short slots, so everything a GPU must prove runs in one call of at most 8 minutes:

1. ``build``: the extension with CUDA for sm_90 (``FASTADV_CUDA_ARCHS=9.0 FASTADV_REQUIRE_EXT=1
   python setup.py build_ext --inplace``);
2. ``tests``: test_ops.py on CUDA tensors (``FASTADV_TEST_DEVICE=cuda``: the CUDA C++ and natively compiled
   Triton kernels against the reference on odd shapes, every dtype and layout), tests/test_gpu.py
   (``torch.compile(fullgraph=True)`` over the Triton ops, Sinkhorn on CUDA, an attack on CUDA vs CPU) and
   the CUDA-graph attack test;
3. ``sanitizer``: ``compute-sanitizer --tool memcheck`` over the CUDA op tests, where it exists;
4. ``bench``: ``fastadv bench ops``, ``bench attacks`` and ``bench eval``, each in quick mode;
5. ``summary.json``: every step's status, time and the tail of its log, and which (backend, op) pairs
   passed every one of their tests: the candidate for fastadv/gpu_verified.json, which a session commits
   (with the results, under benchmarks/results/) so those backends become the automatic choice.

Everything goes into one folder (``--out``, default ``gpu-results/``, git-ignored), at most 8 files:
build.log, tests.log, sanitizer.log, bench.log, the three bench JSONs and summary.json. On a machine
without a GPU every GPU step is reported as skipped, with the reason; ``--dry-run`` prints the steps and
their commands and checks the tools without running them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 470 s in all: the whole validation stays inside one 8-minute device call with time for the start.
BUDGET_S = {"build": 200, "tests": 120, "sanitizer": 60, "bench": 90}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", action="store_true", help="run the GPU validation (the only check so far)")
    p.add_argument("--out", default="gpu-results", help="folder for logs and JSON (default gpu-results/)")
    p.add_argument("--dry-run", action="store_true", help="print the steps and check the tools; run nothing")
    p.add_argument("--skip", default="", help="comma list of steps to skip: build,tests,sanitizer,bench")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def steps(out: pathlib.Path) -> list[dict]:
    """The validation steps: name, command(s), environment, log file, time budget."""
    py = sys.executable  # this interpreter, not the first python on PATH
    gpu_tests = ["tests/test_ops.py", "tests/test_gpu.py", "tests/test_attacks.py::test_cuda_graph_matches_eager"]
    test_env = dict(FASTADV_TEST_DEVICE="cuda", FASTADV_GPU_UNVERIFIED="1", TRITON_INTERPRET="0")
    return [
        {"name": "build", "log": "build.log", "env": dict(FASTADV_CUDA_ARCHS="9.0", FASTADV_REQUIRE_EXT="1"),
         "cmds": [[py, "setup.py", "build_ext", "--inplace"]]},
        {"name": "tests", "log": "tests.log", "env": test_env,
         "cmds": [[py, "-m", "pytest", *gpu_tests, "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts="]]},
        {"name": "sanitizer", "log": "sanitizer.log", "env": test_env, "needs": "compute-sanitizer",
         "cmds": [["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "1", py, "-m", "pytest",
                   "tests/test_ops.py", "-q", "-k", "cuda", "-p", "no:cacheprovider", "-o", "addopts="]]},
        {"name": "bench", "log": "bench.log", "env": dict(FASTADV_GPU_UNVERIFIED="1"),
         "cmds": [[py, "-m", "fastadv.cli", "bench", t, "--quick", "--device", "cuda", "--out", str(out)]
                  for t in ("ops", "attacks", "eval")]},
    ]


def _gpu_state() -> tuple[bool, str]:
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, torch.cuda.get_device_name(0)


_RESULT = re.compile(r"^(PASSED|FAILED|ERROR|SKIPPED)\s+(\S+)")


def verified_pairs(test_log: str) -> dict[str, list[str]]:
    """{backend: [op, ...]} whose every parametrized test_ops case passed (none failed), from pytest -rA."""
    seen: dict[tuple[str, str], bool] = {}
    ops = ("linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1")
    for line in test_log.splitlines():
        m = _RESULT.match(line.strip())
        if not m or "test_ops.py" not in m.group(2):
            continue
        params = m.group(2).split("[", 1)[1].rstrip("]") if "[" in m.group(2) else ""
        parts = params.split("-")
        backend = next((b for b in ("triton", "cuda") if b in parts), None)
        op = next((o for o in ops if o in parts), None)
        if backend is None or op is None or m.group(1) == "SKIPPED":
            continue
        seen[(backend, op)] = seen.get((backend, op), True) and m.group(1) == "PASSED"
    out: dict[str, list[str]] = {}
    for (b, o), ok in sorted(seen.items()):
        if ok:
            out.setdefault(b, []).append(o)
    return out


def run(args) -> int:
    if not args.gpu:
        print("fastadv doctor: nothing to check; use --gpu", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    plan = steps(out.resolve())
    unknown = skip - {s["name"] for s in plan}
    if unknown:
        print(f"fastadv doctor: --skip has unknown steps {sorted(unknown)}", file=sys.stderr)
        return 2
    gpu, gpu_why = _gpu_state()
    summary = {"gpu": gpu, "device": gpu_why if gpu else None, "dry_run": bool(args.dry_run), "steps": [],
               "verified_candidate": {}}
    try:
        from fastadv.bench.harness import _git_commit

        summary["commit"] = _git_commit()
    except Exception:  # pragma: no cover - the summary is still useful without it
        summary["commit"] = None
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for st in plan:
        rec = {"name": st["name"], "commands": [" ".join(c) for c in st["cmds"]], "budget_s": BUDGET_S[st["name"]]}
        reason = None
        if st["name"] in skip:
            reason = "skipped by --skip"
        elif not gpu:
            reason = f"no GPU here ({gpu_why})"
        elif st.get("needs") and shutil.which(st["needs"]) is None:
            reason = f"{st['needs']} not found"
        if args.dry_run:
            rec["status"] = "would skip" if reason else "would run"
            if reason:
                rec["reason"] = reason
            print(f"[{rec['status']}] {st['name']}: " + " && ".join(rec["commands"]) + (f" ({reason})" if reason else ""))
            summary["steps"].append(rec)
            continue
        if reason:
            rec.update(status="skipped", reason=reason)
            print(f"[skipped] {st['name']}: {reason}")
            summary["steps"].append(rec)
            continue
        t0 = time.perf_counter()
        log = out / st["log"]
        rc = 0
        with open(log, "w") as f:
            for cmd in st["cmds"]:
                left = BUDGET_S[st["name"]] - (time.perf_counter() - t0)
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                try:
                    p = subprocess.run(cmd, cwd=ROOT, env=_env(**st["env"]), stdout=f, stderr=subprocess.STDOUT,
                                       timeout=max(left, 1))
                    rc = rc or p.returncode
                except subprocess.TimeoutExpired:
                    f.write(f"\n[timed out after {BUDGET_S[st['name']]} s]\n")
                    rc = 124
        rec.update(status="passed" if rc == 0 else "failed", returncode=rc, seconds=round(time.perf_counter() - t0, 1),
                   log_tail=log.read_text()[-1500:])
        print(f"[{rec['status']}] {st['name']} in {rec['seconds']} s (log {log})")
        summary["steps"].append(rec)
        if st["name"] == "build" and rc != 0:
            break  # nothing else can run on a failed build
    if not args.dry_run and (out / "tests.log").exists():
        summary["verified_candidate"] = verified_pairs((out / "tests.log").read_text())
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    if not args.dry_run:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {out / 'summary.json'}")
    failed = [s["name"] for s in summary["steps"] if s.get("status") == "failed"]
    return 1 if failed else 0
