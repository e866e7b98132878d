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

Beside the steps, from the start: ``spills``, every Lp Triton kernel compiled at the settings its launcher
picks for CIFAR/ImageNet-sized samples, its n_regs and n_spills read from the loaded CompiledKernel; any
spill fails the validation (``summary.json["spills"]``; without a GPU, ``--spills-ptxas`` reads ptxas -v of
an sm_90 build instead, otherwise it is skipped with the reason).

Everything goes into one folder (``--out``, default ``gpu-results/``, git-ignored), at most 8 files:
build.log, tests.log, sanitizer.log, bench.log, the three bench JSONs and summary.json. On a machine
without a GPU every GPU step is reported as skipped, with the reason; ``--dry-run`` prints the steps and
their commands and checks the tools without running them.
"""
from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--skip", default="", help="comma list of steps to skip: build,tests,sanitizer,bench,spills")
    p.add_argument("--spills-ptxas", action="store_true",
                   help="without a GPU, check register spills by compiling the Lp kernels for sm_90 and reading "
                        "ptxas -v (about 50 s of CPU); off by default, so a CPU run stays short")


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
    unknown = skip - {s["name"] for s in plan} - {"spills"}
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
    spill_mode, spill_why = _spill_mode(gpu, gpu_why, "spills" in skip, args.spills_ptxas)
    if args.dry_run:
        state = "would run" if spill_mode else "would skip"
        print(f"[{state}] spills: {' '.join(_spill_cmd())} (FASTADV_SPILL_MODE={spill_mode or '-'}; beside the "
              f"other steps, {SPILL_BUDGET_S} s)" + (f" ({spill_why})" if spill_why else ""))
        summary["spills"] = {"status": state, "method": spill_mode, **({"reason": spill_why} if spill_why else {})}
    spill_job = _start_spills(spill_mode) if spill_mode and not args.dry_run else None
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
    if not args.dry_run:
        summary["spills"] = _finish_spills(spill_job, t_all) if spill_job else {"status": "skipped",
                                                                             "reason": spill_why}
        sp = summary["spills"]
        print(f"[{sp['status']}] spills: " + (sp.get("reason") or f"{len(sp.get('kernels', []))} kernels by "
              f"{sp.get('method')}, {sp.get('seconds')} s" + (f"; spilled: {sp['spilled']}" if sp.get("spilled")
                                                              else "")))
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    if not args.dry_run:
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"wrote {out / 'summary.json'}")
    failed = [s["name"] for s in summary["steps"] if s.get("status") == "failed"]
    if summary.get("spills", {}).get("status") == "failed":
        failed.append("spills")
    return 1 if failed else 0


# ============================================================================ register spills
# Register spills are made by ptxas, when it maps PTX's unlimited virtual registers onto the hardware's (255 a
# thread, 128 at 16 warps: 64K registers / 512 threads): the PTX shows none of them (.local there is an explicit
# local array), so looking for `.local` in the PTX cannot catch a spill. The spill check compiles every Lp
# kernel at the launch settings its launcher picks for SPILL_SHAPES x SPILL_DTYPES (the launchers run with a
# recording _wrap, so nothing is launched and no setting is copied by hand) and reads, per compiled kernel:
# * on a GPU: the loaded CompiledKernel's n_regs / n_spills (Triton 3.x sets them when it loads the binary:
#   cuFuncGetAttribute NUM_REGS and LOCAL_SIZE_BYTES / 4, so n_spills counts 4-byte words of local memory a
#   thread);
# * without a GPU, when asked (--spills-ptxas) and Triton's NVIDIA backend and ptxas are present: the same
#   kernels compiled for sm_90 and ptxas -v on their PTX with Triton's ptxas flags, n_spills = stack frame / 4.
# The record goes into summary.json as "spills"; any n_spills > 0 fails the validation.
# (B, N) rows: 3x32x32 and 3x224x224 images; 2x64x64 = 8192 elements is SINGLE_MAX, the largest sample held
# in registers by the one-program-per-sample kernels (16 warps), so the most register-hungry variant.
SPILL_SHAPES = {"3x32x32": (4, 3072), "2x64x64": (4, 8192), "3x224x224": (4, 150528)}
SPILL_DTYPES = ("float32", "bfloat16")
# (op, variant): the launcher flags that select different kernels or constexprs
SPILL_VARIANTS = (
    ("linf_step", "box"), ("l2_step", "box"), ("l1_step", "box"),
    ("project_linf", "x0+box"), ("project_linf", "plain"),
    ("project_l2", "x0+box"), ("project_l2", "plain"),
    ("project_l1", "x0+box"), ("project_l1", "plain"),
)
# The check runs beside the steps (run() starts it first and collects it last), so it adds no time unless it
# outlasts them all. Measured in ptxas mode: 46 distinct kernels in 47 s on a shared 2-core CPU (Triton compile
# plus ptxas each); GPU mode compiles the same kernels on the device's CPU. Not measured on a GPU yet.
SPILL_BUDGET_S = 240

_PTXAS_ENTRY = re.compile(r"(?:Compiling entry function|Function properties for) '?([A-Za-z_$][\w$]*)'?")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas_verbose(log: str) -> dict[str, dict]:
    """{kernel: {n_regs, n_spills, stack_frame, spill_stores, spill_loads}} from ``ptxas -v`` output.

    ptxas prints, per entry function (the tool's name prefixes each line; "ptxas-blackwell info" for the
    ptxas Triton 3.9 ships for sm_90):
        ptxas info    : Compiling entry function '_k' for 'sm_90a'
        ptxas info    : Function properties for _k
            8 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
        ptxas info    : Used 255 registers, used 0 barriers
    n_spills is the stack frame in 4-byte words, as Triton's CompiledKernel.n_spills (LOCAL_SIZE_BYTES / 4).
    """
    out: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            cur = out.setdefault(m.group(1), {"n_regs": None, "n_spills": 0, "stack_frame": 0,
                                              "spill_stores": 0, "spill_loads": 0})
            continue
        if cur is None:
            continue
        m = _PTXAS_FRAME.search(line)
        if m:
            frame, st, ld = (int(g) for g in m.groups())
            cur.update(stack_frame=frame, spill_stores=st, spill_loads=ld, n_spills=-(-frame // 4))
            continue
        m = _PTXAS_REGS.search(line)
        if m:
            cur["n_regs"] = int(m.group(1))
    return out


def compiled_resources(kernel) -> dict:
    """{"n_regs", "n_spills"} of a Triton CompiledKernel.

    Read from ``kernel.metadata`` when it carries them (Triton's own TODO plans to move them there), else
    from the attributes Triton 3.x sets when it loads the binary on the GPU (``_init_handles``; needs a GPU).
    """
    md = getattr(kernel, "metadata", None)
    md = md._asdict() if hasattr(md, "_asdict") else (md if isinstance(md, dict) else {})
    if md.get("n_regs") is not None and md.get("n_spills") is not None:
        return {"n_regs": int(md["n_regs"]), "n_spills": int(md["n_spills"])}
    if getattr(kernel, "n_spills", None) is None:
        init = getattr(kernel, "_init_handles", None)
        if init is None:
            raise RuntimeError(f"{type(kernel).__name__} has neither n_spills nor _init_handles")
        init()
    return {"n_regs": int(kernel.n_regs), "n_spills": int(kernel.n_spills)}


def ptxas_resources(kernel, extra: tuple[str, ...] = ()) -> dict:
    """Run ptxas -v on a CompiledKernel's PTX for its own target with Triton's flags (plus ``extra``, e.g.
    ``--maxrregcount=32`` in the test that forces a spill); the kernel's record from parse_ptxas_verbose."""
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    md = kernel.metadata
    arch = md.target.arch
    cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
    if not md.enable_fp_fusion:
        cmd.append("--fmad=false")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(kernel.asm["ptx"])
        p = subprocess.run([*cmd, *extra, src, "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {p.stderr[-800:]}")
    res = parse_ptxas_verbose(p.stdout + p.stderr)
    if md.name not in res:
        raise RuntimeError(f"no ptxas -v record for {md.name}: {(p.stdout + p.stderr)[-800:]}")
    return res[md.name]


class _Recorder:
    """A launcher ``_wrap``: ``_wrap(kernel)[grid](*args, **kw)`` records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        rec = self

        class _Grid:
            def __getitem__(self, grid):
                return lambda *args, **kw: rec.launches.append((kernel, grid, args, kw))

        return _Grid()


def spill_launches(device: str, shapes=None, dtypes=None, variants=None) -> list[tuple[str, tuple]]:
    """[(case, (kernel, grid, args, kwargs)), ...]: what the Lp launchers would launch for each case."""
    import torch

    from fastadv.kernels import lp_project, lp_steps

    shapes = SPILL_SHAPES if shapes is None else shapes
    out = []
    for sname, (b, n) in shapes.items():
        for dname in SPILL_DTYPES if dtypes is None else dtypes:
            dt = getattr(torch, dname)
            x = torch.rand(b, n, device=device).to(dt)
            s = torch.rand(b, device=device)
            for op, var in SPILL_VARIANTS if variants is None else variants:
                rec = _Recorder()
                box = (0.0, 1.0) if "box" in var else (-math.inf, math.inf)
                if op.endswith("_step"):
                    extra = (0.8,) if op == "l1_step" else ()
                    getattr(lp_steps, f"{op}_triton")(x, x, x, s, s, *extra, *box, torch.empty_like(x), _wrap=rec)
                else:
                    getattr(lp_project, f"{op}_triton")(x, s, x if "x0" in var else None, *box, torch.empty_like(x),
                                                        _wrap=rec)
                out += [(f"{op}[{var}] {sname} {dname}", launch) for launch in rec.launches]
    return out


def _sm90_compile(kernel, args, kw):
    """Compile a recorded launch for sm_90 without a GPU, with the specialization Triton's launcher derives
    (pointer alignment, ints divisible by 16 or equal to 1) from the same arguments."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kw, bound, spec, opts)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _resources(mode: str, kernel, grid, args, kw, seen: dict):
    """(CompiledKernel, resources or None when ``seen`` has its hash) of one recorded launch."""
    if mode == "gpu":
        ck = kernel.warmup(*args, grid=grid, **kw)
        return ck, None if ck.hash in seen else compiled_resources(ck)
    ck = _sm90_compile(kernel, args, kw)
    return ck, None if ck.hash in seen else ptxas_resources(ck)


def spill_check(mode: str, launches=None) -> dict:
    """The "spills" record: mode "gpu" (warm up on the GPU, CompiledKernel.n_spills) or "ptxas" (sm_90
    compile + ptxas -v). One row per distinct compiled kernel, with the cases that launch it.

    Control: the kernel with the most registers is compiled once more with Triton's ``maxnreg=32`` option,
    which must spill; if the reading reports no spill there, it cannot see spills and the check fails.
    """
    t0 = time.perf_counter()
    launches = spill_launches("cuda" if mode == "gpu" else "cpu") if launches is None else launches
    rows: dict[str, dict] = {}
    first: dict[str, tuple] = {}
    for case, (kernel, grid, args, kw) in launches:
        ck, res = _resources(mode, kernel, grid, args, kw, rows)
        if res is not None:
            consts = {k: v for k, v in kw.items() if k.isupper()}
            dtype = str(args[0].dtype).replace("torch.", "")  # the storage dtype (first operand)
            rows[ck.hash] = {"kernel": ck.metadata.name, "dtype": dtype, "constexprs": consts,
                             "num_warps": ck.metadata.num_warps, **res, "cases": []}
            first[ck.hash] = (kernel, grid, args, kw)
        rows[ck.hash]["cases"].append(case)
    kernels = sorted(rows.values(), key=lambda r: (r["kernel"], str(r["constexprs"]), r["dtype"]))
    spilled = [r for r in kernels if r["n_spills"] > 0 or r.get("spill_stores", 0) > 0]
    rec = {"status": "failed" if spilled else "passed", "method": mode, "kernels": kernels,
           "spilled": [f"{r['kernel']} {r['dtype']} {r['constexprs']}: {r['n_spills']} words" for r in spilled]}
    if rows:
        h = max(rows, key=lambda k: rows[k]["n_regs"] or 0)
        kernel, grid, args, kw = first[h]
        _, res = _resources(mode, kernel, grid, args, dict(kw, maxnreg=32), {})
        rec["control"] = {"kernel": rows[h]["kernel"], "dtype": rows[h]["dtype"], "constexprs": rows[h]["constexprs"],
                          "maxnreg": 32, **res}
        if res["n_spills"] == 0:
            rec["status"] = "failed"
            rec["reason"] = "the control kernel built with maxnreg=32 reports no spills: the reading cannot see them"
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    return rec


def spills_main() -> int:
    """Entry of the spill-check subprocess: prints the record as JSON; mode from FASTADV_SPILL_MODE."""
    rec = spill_check(os.environ.get("FASTADV_SPILL_MODE", "gpu"))
    print(json.dumps(rec))
    return 0


def _spill_cmd() -> list[str]:
    return [sys.executable, "-c", "from fastadv.doctor import spills_main; raise SystemExit(spills_main())"]


def _ptxas_state() -> tuple[bool, str]:
    """Whether Triton's NVIDIA backend can lower for sm_90 here and its ptxas runs."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
        subprocess.run([path, "--version"], check=True, capture_output=True, timeout=30)
        return True, path
    except Exception as exc:  # no triton, no NVIDIA backend, no or broken ptxas
        return False, f"{type(exc).__name__}: {exc}"


def _spill_mode(gpu: bool, gpu_why: str, skipped: bool, ptxas: bool) -> tuple[str | None, str | None]:
    """("gpu" | "ptxas" | None, reason when None)."""
    if skipped:
        return None, "skipped by --skip"
    if gpu:
        return "gpu", None
    if not ptxas:
        return None, f"no GPU here ({gpu_why}); --spills-ptxas checks sm_90 with ptxas -v instead"
    ok, why = _ptxas_state()
    return ("ptxas", None) if ok else (None, f"no GPU here ({gpu_why}) and no usable ptxas ({why})")


def _start_spills(mode: str):
    """Start the spill check beside the steps (it only compiles: a few CPU cores, no GPU time to speak of).
    TRITON_INTERPRET=0: compiled kernels; FASTADV_NO_EXT=1: it needs no extension, and the build step may be
    rewriting fastadv/_C meanwhile. Output to files, not pipes, so a chatty compiler cannot block it."""
    import tempfile

    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    env = _env(FASTADV_SPILL_MODE=mode, TRITON_INTERPRET="0", FASTADV_NO_EXT="1")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, without its warning
    proc = subprocess.Popen(_spill_cmd(), cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
    return proc, stdout, stderr


def _finish_spills(job, t_start: float) -> dict:
    proc, stdout, stderr = job
    try:
        rc = proc.wait(timeout=max(1.0, SPILL_BUDGET_S - (time.perf_counter() - t_start)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    stdout.seek(0)
    stderr.seek(0)
    text, err = stdout.read(), stderr.read()
    if rc is None:
        return {"status": "failed", "reason": f"timed out after {SPILL_BUDGET_S} s", "log_tail": err[-1500:]}
    lines = text.strip().splitlines()
    try:
        rec = json.loads(lines[-1]) if rc == 0 and lines else None
    except ValueError:
        rec = None
    if rec is None:
        return {"status": "failed", "reason": f"spill check exited with {rc}", "log_tail": (text + err)[-1500:]}
    return rec
