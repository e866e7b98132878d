"""C++-specific tests of the compiled Lp kernels (csrc/cpu/, csrc/cuda/).

The backend-parametrized correctness tests (every backend against
fastadv.reference.lp) live in tests/test_ops.py; this file checks what only
the compiled ops promise:
* the registered ops pass torch.library.opcheck (schema, fake kernel,
  mutation of ``out`` only);
* OpenMP thread-count invariance: the reductions sum fixed 16384-element
  chunks in a fixed order, so 1 and 2 threads give bit-identical results,
  including the split-within-a-sample path (B not a multiple of the thread
  count, rows longer than one chunk);
* ``out`` may alias the first input (an in-place attack step);
* the CUDA sources compile with nvcc (scripts/check_nvcc.sh) where nvcc exists.
"""
from __future__ import annotations

import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from fastadv import _ext

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1")

needs_cpp = pytest.mark.skipif(
    _ext.EXT_ERROR is not None or not all(_ext.has_kernel(op, "CPU") for op in OPS),
    reason=f"compiled CPU kernels unavailable: {_ext.EXT_ERROR}",
)


def _inputs(b, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, n, generator=gen, dtype=torch.float64)
    x0[:, ::7] = 0.0  # points on the box boundary
    x0[:, 3::7] = 1.0
    x = (x0 + 0.05 * torch.randn(b, n, generator=gen, dtype=torch.float64)).clamp(0, 1)
    g = torch.randn(b, n, generator=gen, dtype=torch.float64)
    delta = 0.1 * torch.randn(b, n, generator=gen, dtype=torch.float64)
    alpha = torch.rand(b, generator=gen) * 0.1 + 0.01
    eps = torch.rand(b, generator=gen) * 2.0 + 0.1
    return [t.to(dtype) for t in (x, x0, g, delta)] + [alpha, eps]


def _call(op, x, x0, g, delta, alpha, eps, out, box=True):
    """Invoke torch.ops.fastadv.<op> with the schema's arguments."""
    f = getattr(torch.ops.fastadv, op)
    lo, hi = (0.0, 1.0) if box else (-math.inf, math.inf)
    if op in ("linf_step", "l2_step"):
        return f(x, x0, g, alpha, eps, lo, hi, out)
    if op == "l1_step":
        return f(x, x0, g, alpha, eps * 5, 0.9, lo, hi, out)
    eps_p = eps * 5 if op == "project_l1" else eps
    return f(delta, eps_p, x0 if box else None, lo, hi, out)


def _run(op, args, box=True):
    out = torch.full_like(args[0], math.nan)  # poison: an unwritten element fails
    _call(op, *args, out, box=box)
    return out


@needs_cpp
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op):
    args = _inputs(3, 37)
    out = torch.full_like(args[0], math.nan)
    f = getattr(torch.ops.fastadv, op)
    x, x0, g, delta, alpha, eps = args
    if op in ("linf_step", "l2_step"):
        call = (x, x0, g, alpha, eps, 0.0, 1.0, out)
    elif op == "l1_step":
        call = (x, x0, g, alpha, eps, 0.9, 0.0, 1.0, out)
    else:
        call = (delta, eps, x0, 0.0, 1.0, out)
    torch.library.opcheck(f, call)
    if op.startswith("project"):  # the x0=None (no box) form of the schema
        torch.library.opcheck(f, (delta, eps, None, -math.inf, math.inf, out))


@needs_cpp
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_thread_count_invariance(op, dtype):
    # (3, 40000): 3 chunks per row and B = 3 is not a multiple of 2 threads,
    # so with 2 threads one sample is split across both; (8, 777): whole rows.
    prev = torch.get_num_threads()
    try:
        for b, n in ((3, 40000), (8, 777)):
            args = _inputs(b, n, dtype, seed=b)
            for box in (True, False):
                if not box and not op.startswith("project"):
                    continue
                torch.set_num_threads(1)
                one = _run(op, args, box)
                torch.set_num_threads(2)
                two = _run(op, args, box)
                assert not one.isnan().any()
                assert torch.equal(one, two), f"{op} {dtype} ({b}, {n}) box={box}: 1 vs 2 threads differ"
    finally:
        torch.set_num_threads(prev)


@needs_cpp
@pytest.mark.parametrize("op", OPS)
def test_out_may_alias_first_input(op):
    args = _inputs(5, 20000, seed=3)
    expect = _run(op, args)
    first = 3 if op.startswith("project") else 0  # delta or x
    aliased = [t.clone() for t in args]
    _call(op, *aliased, aliased[first])
    torch.testing.assert_close(aliased[first], expect, rtol=0, atol=0)


@needs_cpp
def test_bad_arguments_are_named():
    x, x0, g, delta, alpha, eps = _inputs(2, 10)
    out = torch.empty_like(x)
    with pytest.raises(RuntimeError, match="x0"):
        torch.ops.fastadv.linf_step(x, x0[:, :5].contiguous(), g, alpha, eps, 0.0, 1.0, out)
    with pytest.raises(RuntimeError, match="alpha"):
        torch.ops.fastadv.l2_step(x, x0, g, alpha.double(), eps, 0.0, 1.0, out)
    with pytest.raises(RuntimeError, match="eps"):
        torch.ops.fastadv.project_l1(delta, eps[:1], None, -math.inf, math.inf, out)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastadv.project_l2(delta.t().contiguous().t(), eps, None, -math.inf, math.inf, out)
    with pytest.raises(RuntimeError, match="grad"):
        torch.ops.fastadv.l1_step(x, x0, g.double(), alpha, eps, 0.5, 0.0, 1.0, out)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"), reason="nvcc not found"
)
def test_cuda_sources_compile_with_nvcc():
    # About 40 s of CPU per .cu file (torch headers dominate); this is the
    # only check the CUDA sources get on a machine without a GPU.
    # PYTHON: this interpreter, not the first `python` on PATH (without an activated venv that one has no torch)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "check_nvcc.sh")], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout


# ---- the steps with the x0 value check folded into their pass (fastadv::<op>_checked)
CHECKED = ("linf_step", "l2_step")
needs_checked = pytest.mark.skipif(
    _ext.EXT_ERROR is not None or not all(_ext.has_op(f"{op}_checked") for op in CHECKED),
    reason=f"compiled checked steps unavailable (extension older than them?): {_ext.EXT_ERROR}",
)


def _outside_count(x0, lo, hi):
    x0 = x0.double()
    return int((~((x0 >= lo) & (x0 <= hi))).sum())  # NaN fails both compares


@needs_checked
@pytest.mark.parametrize("op", CHECKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_checked_step_writes_the_step_and_counts_x0_outside_the_box(op, dtype):
    # (3, 40000): rows split over chunks and threads; (8, 777): whole rows. Bad entries at a chunk's
    # first and last element, NaN, +-inf, and just outside the box, in some rows only.
    for b, n in ((3, 40000), (8, 777)):
        x, x0, g, _, alpha, eps = _inputs(b, n, dtype, seed=b)
        expect = _run(op, (x, x0, g, None, alpha, eps))
        out = torch.full_like(x, math.nan)
        count = getattr(torch.ops.fastadv, f"{op}_checked")(x, x0, g, alpha, eps, 0.0, 1.0, out)
        assert count.dtype == torch.int64 and count.dim() == 0 and int(count) == 0
        assert torch.equal(out, expect), f"{op} {dtype}: the checked step differs from the step"
        bad = x0.clone()
        bad[0, 0] = math.nan
        bad[0, min(n - 1, 16383)] = 1.0 + 2 ** -6
        bad[b - 1, n - 1] = -math.inf
        bad[b - 1, n // 2] = math.inf
        bad[b - 1, 1] = -(2 ** -6)
        for lo, hi in ((0.0, 1.0), (-math.inf, math.inf), (0.25, 0.75)):
            c = getattr(torch.ops.fastadv, f"{op}_checked")(x, bad, g, alpha, eps, lo, hi, out)
            assert int(c) == _outside_count(bad, lo, hi), f"{op} {dtype} box ({lo}, {hi})"


@needs_checked
@pytest.mark.parametrize("op", CHECKED)
def test_opcheck_checked_steps(op):
    x, x0, g, _, alpha, eps = _inputs(3, 37)
    out = torch.full_like(x, math.nan)
    torch.library.opcheck(getattr(torch.ops.fastadv, f"{op}_checked"), (x, x0, g, alpha, eps, 0.0, 1.0, out))


@needs_checked
@pytest.mark.parametrize("op", CHECKED)
def test_public_step_raises_on_bad_x0_with_the_folded_check(op):
    """On the C++ backend the public step's x0 check runs in the kernel; the errors are those of the
    separate check (the reference backend's): NaN named, and the span of values outside the box."""
    import fastadv

    x0 = torch.rand(4, 3, 9, 9)
    x, g = x0.clone(), torch.randn(4, 3, 9, 9)
    fn = getattr(fastadv.ops, op)
    nan_x0 = x0.clone()
    nan_x0[2, 1, 3, 3] = math.nan
    wide_x0 = x0.clone()
    wide_x0[3, 0, 0, 0] = 1.5
    for backend in ("cpp", "ref"):
        with fastadv.use_backend(backend):
            with pytest.raises(ValueError, match="x0 contains NaN"):
                fn(x, nan_x0, g, 0.01, 0.03)
            with pytest.raises(ValueError, match=r"x0 must lie in the box clip=\(0, 1\).*1\.5"):
                fn(x, wide_x0, g, 0.01, 0.03)
            with fastadv.validation(False):
                fn(x, wide_x0, g, 0.01, 0.03)  # the check is off: no error
            # channels_last, the same check
            with pytest.raises(ValueError, match="x0 contains NaN"):
                fn(x.to(memory_format=torch.channels_last), nan_x0.to(memory_format=torch.channels_last),
                   g.to(memory_format=torch.channels_last), 0.01, 0.03)
