"""Backend choice: triton | cuda | cpp | ref, with reasons.

Every op registers one implementation per backend, all with the same
signature (the op's schema in ``csrc/fastadv.cpp``). Each backend answers
``not_supported_reasons(op, tensors)``; an empty list means it can run.

* Automatic choice takes the first backend with no reasons, in the op's
  preference order for the device (CUDA: triton, cuda, ref by default, each only once it has passed the
  GPU validation, see ``gpu_verified``; CPU:
  cpp, ref), so a missing extension falls back quietly.
* A forced backend, from ``FASTADV_BACKEND`` or ``with fastadv.use_backend(...)``,
  that cannot run raises ``BackendUnavailable`` listing every reason.
* Under ``TRITON_INTERPRET=1`` the triton backend accepts CPU tensors, so CI
  executes the Triton kernels when that backend is forced. It is never chosen
  automatically for CPU tensors: interpreted Triton is for testing.

The forced backend is read from module state (not a ContextVar) so that
``torch.compile`` can trace through dispatch and guard on it as a constant.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Callable, Iterable

import torch

from fastadv import _ext

BACKENDS = ("triton", "cuda", "cpp", "ref")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "ref"), "cpu": ("cpp", "ref")}
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Modules that register Triton implementations (one per op family), imported
# on first use so ``import fastadv`` never imports triton.
TRITON_MODULES = ("fastadv._triton_lp", "fastadv._triton_ot")

_IMPLS: dict[str, dict[str, Callable]] = {}
_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}
_forced_stack: list[str] = []


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this call; the message lists why."""


def register(op: str, backend: str, impl: Callable) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _IMPLS.setdefault(op, {})[backend] = impl


def set_preference(op: str, device_type: str, order: Iterable[str]) -> None:
    """Override the automatic order for ``op`` on ``device_type`` ('cuda' | 'cpu')."""
    _ORDER.setdefault(op, {})[device_type] = tuple(order)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    return name


def forced_backend() -> str | None:
    """The backend forced by ``use_backend`` (innermost) or FASTADV_BACKEND, else None."""
    if _forced_stack:
        return _forced_stack[-1]
    env = os.environ.get("FASTADV_BACKEND", "").strip().lower()
    if env in ("", "auto"):
        return None
    return _check_name(env, "FASTADV_BACKEND")


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force a backend for every fastadv op called inside the block.

    ``None`` or ``"auto"`` restores automatic choice inside the block.
    """
    name = "auto" if name is None else _check_name(str(name).lower(), "backend")
    _forced_stack.append(name)
    try:
        yield
    finally:
        _forced_stack.pop()


def triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton)"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_triton_impls() -> str | None:
    """Import the Triton op registrations once; returns an error string or None."""
    global _TRITON_ERROR
    if _TRITON_ERROR is not _UNSET:
        return _TRITON_ERROR
    ok, why = triton_available()
    if not ok:
        _TRITON_ERROR = why
        return why
    try:
        for module in TRITON_MODULES:
            if importlib.util.find_spec(module) is not None:
                importlib.import_module(module)
        _TRITON_ERROR = None
    except Exception as exc:  # a broken triton install must not break fastadv
        _TRITON_ERROR = f"importing the Triton kernels failed: {type(exc).__name__}: {exc}"
    return _TRITON_ERROR


_UNSET = object()
_TRITON_ERROR: object = _UNSET


def not_supported_reasons(op: str, backend: str, tensors: Iterable[torch.Tensor]) -> list[str]:
    """Why ``backend`` cannot run ``op`` on these tensors (empty list: it can)."""
    device_type, dtype = _signature(tensors)
    return _reasons(op, backend, device_type, dtype)


def _signature(tensors: Iterable[torch.Tensor]) -> tuple[str, torch.dtype]:
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return "cpu", torch.float32
    return tensors[0].device.type, tensors[0].dtype


def _reasons(op: str, backend: str, device_type: str, dtype: torch.dtype) -> list[str]:
    reasons: list[str] = []
    if backend == "triton":
        err = _load_triton_impls()
        if err:
            reasons.append(err)
        elif "triton" not in _IMPLS.get(op, {}):
            reasons.append(f"no Triton kernel for {op}")
        if device_type == "cpu" and not triton_interpreted():
            reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
        elif device_type not in ("cpu", "cuda"):
            reasons.append(f"Triton does not run on {device_type} tensors")
        if dtype not in _TRITON_DTYPES:
            reasons.append(f"the Triton kernels take float32/float16/bfloat16, not {dtype}")
    elif backend in ("cpp", "cuda"):
        key = "CPU" if backend == "cpp" else "CUDA"
        want = "cpu" if backend == "cpp" else "cuda"
        if _ext.EXT_ERROR is not None:
            reasons.append(_ext.EXT_ERROR)
        elif backend not in _IMPLS.get(op, {}) or not _ext.has_kernel(op, key):
            reasons.append(f"the extension has no {key} kernel for {op}")
        if device_type != want:
            reasons.append(f"the {backend} backend runs on {want} tensors, these are on {device_type}")
    elif backend == "ref":
        if "ref" not in _IMPLS.get(op, {}):
            reasons.append(f"no reference implementation for {op}")
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return reasons


def choose(op: str, tensors: Iterable[torch.Tensor]) -> str:
    """The backend that will run ``op`` on these tensors (see module docstring).

    Under ``torch.compile`` the choice is made once, when the function is
    traced, and is a constant of the compiled graph.
    """
    device_type, dtype = _signature(tensors)
    return _choose(op, device_type, dtype)


# A backend that has never passed on a real GPU is never the automatic choice there. The record of what
# passed is fastadv/gpu_verified.json, written by `fastadv doctor --gpu` (scripts/gpu_validate.sh) on a GPU
# machine and committed: {"backends": {"triton": {"ops": [...], "device": ..., "commit": ..., "date": ...}}}.
# Until a backend's op is listed there, CUDA tensors run the reference (or a backend forced with
# FASTADV_BACKEND / use_backend, which is the caller's choice). FASTADV_GPU_UNVERIFIED=1 lifts the gate (the
# validation script itself, and users who have run it on their own machine).
_VERIFIED: dict | None = None


def gpu_verified() -> dict:
    """{backend: set of ops that passed the GPU validation}, from fastadv/gpu_verified.json."""
    global _VERIFIED
    if _VERIFIED is None:
        import json
        import pathlib

        f = pathlib.Path(__file__).with_name("gpu_verified.json")
        try:
            data = json.loads(f.read_text()).get("backends", {})
        except (OSError, ValueError):
            data = {}
        _VERIFIED = {b: set(v.get("ops", [])) for b, v in data.items() if isinstance(v, dict)}
    return _VERIFIED


def _gpu_gate(op: str, backend: str, device_type: str) -> bool:
    """True if ``backend`` may be the automatic choice for ``op`` on ``device_type``."""
    if device_type != "cuda" or backend not in ("triton", "cuda"):
        return True
    if os.environ.get("FASTADV_GPU_UNVERIFIED") == "1":
        return True
    return op in gpu_verified().get(backend, set())


def _choose(op: str, device_type: str, dtype: torch.dtype) -> str:
    forced = forced_backend()
    if forced is not None and forced != "auto":
        reasons = _reasons(op, forced, device_type, dtype)
        if reasons:
            raise BackendUnavailable(
                f"fastadv: backend {forced!r} was forced but cannot run {op}:\n  - " + "\n  - ".join(reasons)
            )
        return forced
    order = _ORDER.get(op, {}).get(device_type) or _DEFAULT_ORDER.get(device_type, ("ref",))
    for backend in order:
        if _gpu_gate(op, backend, device_type) and not _reasons(op, backend, device_type, dtype):
            return backend
    return "ref"


# What torch.compiler.assume_constant_result does (Dynamo calls _choose at trace
# time and bakes in the answer), without importing torch._dynamo, which added
# 1.9 s to `import fastadv` here (measured). test_compiled_pgd_loop_matches_eager
# fails if torch ever changes this mechanism.
_choose._dynamo_marked_constant = True  # type: ignore[attr-defined]


def impl(op: str, backend: str) -> Callable:
    return _IMPLS[op][backend]


def backends() -> dict[str, dict]:
    """What this install can run: ``{backend: {"available": bool, "notes": [...]}}``.

    Never initialises CUDA unless it is already initialised.
    """
    cuda_ok = torch.cuda.is_available()
    ok, why = triton_available()
    out = {
        "ref": {"available": True, "notes": ["pure PyTorch, any device"]},
        "cpp": {
            "available": _ext.EXT_ERROR is None,
            "notes": [_ext.EXT_ERROR] if _ext.EXT_ERROR else [f"built: {_ext.BUILD_INFO}"],
        },
        "cuda": {
            "available": _ext.EXT_ERROR is None and "cuda" in _ext.BUILD_INFO and cuda_ok,
            "notes": [],
        },
        "triton": {"available": ok and (cuda_ok or triton_interpreted()), "notes": []},
    }
    if _ext.EXT_ERROR:
        out["cuda"]["notes"].append(_ext.EXT_ERROR)
    elif "cuda" not in _ext.BUILD_INFO:
        out["cuda"]["notes"].append("extension built without CUDA sources")
    if not cuda_ok:
        out["cuda"]["notes"].append("no CUDA device")
    verified = gpu_verified()
    for b in ("triton", "cuda"):
        if verified.get(b):
            out[b]["notes"].append(f"verified on GPU for: {', '.join(sorted(verified[b]))}")
        else:
            out[b]["notes"].append("unverified on GPU: never the automatic choice on CUDA tensors until "
                                   "`fastadv doctor --gpu` has passed and fastadv/gpu_verified.json records it")
    if not ok:
        out["triton"]["notes"].append(why)
    elif not cuda_ok:
        out["triton"]["notes"].append(
            "interpreter on CPU (TRITON_INTERPRET=1)" if triton_interpreted() else "no CUDA device and TRITON_INTERPRET is not 1"
        )
    return out
