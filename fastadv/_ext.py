"""Load the compiled extension ``fastadv._C`` if it was built.

Importing it runs the C++ static registrations (``TORCH_LIBRARY(fastadv, ...)``).
A missing or broken extension is not an error: fastadv then runs on its
Triton and reference backends, logs the reason once, and
``fastadv.backends()`` reports it.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger("fastadv")

EXT_ERROR: str | None = None
try:
    if os.environ.get("FASTADV_NO_EXT", "0") == "1":
        raise ImportError("disabled by FASTADV_NO_EXT=1")
    if importlib.util.find_spec("fastadv._C") is None:
        raise ImportError("not built (pip install --no-build-isolation -e . builds it)")
    from fastadv import _C  # noqa: F401  (registers the fastadv:: ops)

    BUILD_INFO: str = torch.ops.fastadv.build_info()
except (ImportError, OSError, RuntimeError) as exc:  # not built, ABI mismatch
    EXT_ERROR = f"compiled extension fastadv._C unavailable: {exc}"
    BUILD_INFO = ""
    log.info("fastadv: %s; using the Triton and reference backends", EXT_ERROR)


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True if ``fastadv::<op>`` has a compiled kernel for ``dispatch_key``."""
    if EXT_ERROR is not None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastadv::{op}", dispatch_key)
    except RuntimeError:
        return False


def has_op(op: str) -> bool:
    """True if the loaded extension defines the schema ``fastadv::<op>``."""
    if EXT_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel(f"fastadv::{op}") or hasattr(torch.ops.fastadv, op)
