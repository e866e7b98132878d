"""Compile Triton kernels for an H100 (sm_90) without a GPU, in a subprocess.

The interpreter accepts code the real compiler rejects (a plain module-level
global, a Python-float ``.to``), and it cannot show register spills. Each test
passes a short script body that calls ``load(module)`` and
``lower(fn, types, constexprs, num_warps)``; ``lower`` asserts no local-memory
spills and returns the PTX. The subprocess runs with TRITON_INTERPRET=0 and
imports ``kernels/`` on its own (not fastadv), so the check depends on nothing else.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

_PRELUDE = textwrap.dedent(
    """
    import importlib, importlib.util, os, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kdir = os.environ["FASTADV_KERNELS_DIR"]
    spec = importlib.util.spec_from_file_location(
        "_fastadv_kernels", os.path.join(kdir, "__init__.py"), submodule_search_locations=[kdir])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["_fastadv_kernels"] = pkg
    spec.loader.exec_module(pkg)

    def load(name):
        return importlib.import_module("_fastadv_kernels." + name)

    def lower(fn, types, consts, warps):
        names = [a for a in fn.arg_names if a not in consts]
        assert len(names) == len(types), (fn.__name__, names)
        sig = dict(zip(names, types), **{k: "constexpr" for k in consts})
        c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        ptx = c.asm["ptx"]
        assert ".local" not in ptx, ("register spills", fn.__name__, consts)
        print("lowered", fn.__name__, consts)
        return ptx
    """
)


def lower_for_sm90(body: str, tmp_path, *, expect: int, timeout: int = 600) -> None:
    """Run ``body`` after the prelude; require ``expect`` kernels lowered. Skips without the NVIDIA backend."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the triton build
        pytest.skip(f"triton without its NVIDIA backend: {exc}")
    import fastadv.kernels

    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               FASTADV_KERNELS_DIR=os.path.dirname(fastadv.kernels.__file__))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = _PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr.lower():
        pytest.skip("ptxas not available to the triton NVIDIA backend")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("lowered") == expect, proc.stdout
