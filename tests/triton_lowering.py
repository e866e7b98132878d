"""Compile Triton kernels for an H100 (sm_90) without a GPU, in a subprocess.

The interpreter accepts code the real compiler rejects (a plain module-level
global, a Python-float ``.to``), and it cannot show register spills. Each test
passes a short script body that calls ``load(module)`` and
``lower(fn, types, constexprs, num_warps)``; ``lower`` compiles to a cubin and
returns the PTX after these checks:

* no register spills, read from ``ptxas -v`` on the kernel's PTX
  (``fastadv.doctor.ptxas_resources``). Spills appear only when ptxas
  allocates registers, so the PTX itself never shows them: the earlier check
  (``.local`` in the PTX) could not fail.
* with ``no_tensor_div=True``: no integer division or remainder on tensors in
  the TTIR (``tensor_int_divisions``): an ``offs // N`` per element shows
  there as ``arith.divsi``/``arith.remsi`` on a ``tensor<...>``. Scalar
  divisions (once a program) are allowed.

``compile_sm90(...)`` (same arguments plus Triton options such as
``maxnreg``) returns the CompiledKernel without checks, and ``doctor`` is
fastadv/doctor.py.

The subprocess runs with TRITON_INTERPRET=0 and imports ``kernels/`` and
``fastadv/doctor.py`` by path (not the fastadv package), so the check depends
on nothing else.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import textwrap

import pytest

# arith ops that divide integers; an op on tensors carries "tensor<" in its result type.
_INT_DIV = re.compile(r"\barith\.(?:divsi|divui|remsi|remui|floordivsi|ceildivsi|ceildivui)\b")


def tensor_int_divisions(ttir: str) -> list[str]:
    """The TTIR lines that divide (or take the remainder of) integer tensors."""
    return [ln.strip() for ln in ttir.splitlines() if _INT_DIV.search(ln) and "tensor<" in ln]


_PRELUDE = (
    textwrap.dedent(
        """
    import importlib, importlib.util, os, re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kdir = os.environ["FASTADV_KERNELS_DIR"]
    spec = importlib.util.spec_from_file_location(
        "_fastadv_kernels", os.path.join(kdir, "__init__.py"), submodule_search_locations=[kdir])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["_fastadv_kernels"] = pkg
    spec.loader.exec_module(pkg)
    spec = importlib.util.spec_from_file_location("_fastadv_doctor", os.environ["FASTADV_DOCTOR_PATH"])
    doctor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(doctor)

    def load(name):
        return importlib.import_module("_fastadv_kernels." + name)

    def compile_sm90(fn, types, consts, warps, **options):
        names = [a for a in fn.arg_names if a not in consts]
        assert len(names) == len(types), (fn.__name__, names)
        sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
        return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, **options})

    def lower(fn, types, consts, warps, no_tensor_div=False, report_spills=False):
        c = compile_sm90(fn, types, consts, warps)
        if no_tensor_div:
            divs = tensor_int_divisions(c.asm["ttir"])
            assert not divs, ("integer division on tensors", fn.__name__, consts, divs[:3])
        res = doctor.ptxas_resources(c)
        if report_spills:  # the caller decides (a known spill is reported, not hidden)
            print("spills", fn.__name__, res["n_spills"], res["spill_stores"])
        else:
            assert res["n_spills"] == 0 and res["spill_stores"] == 0, ("register spills", fn.__name__, consts, res)
        print("lowered", fn.__name__, consts, "registers", res["n_regs"])
        return c.asm["ptx"]
    """
    )
    + "\n_INT_DIV = re.compile(" + repr(_INT_DIV.pattern) + ")\n"
    + inspect.getsource(tensor_int_divisions)
)


def lower_for_sm90(body: str, tmp_path, *, expect: int, timeout: int = 600) -> str:
    """Run ``body`` after the prelude; require ``expect`` kernels lowered; return its stdout.

    Skips without the NVIDIA backend or its ptxas."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton without its NVIDIA backend: {exc}")
    import fastadv.doctor
    import fastadv.kernels

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               FASTADV_KERNELS_DIR=os.path.dirname(fastadv.kernels.__file__),
               FASTADV_DOCTOR_PATH=fastadv.doctor.__file__)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = _PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("ptxas not available to the triton NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("lowered") == expect, proc.stdout
    return proc.stdout
