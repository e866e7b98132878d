"""Fake (meta) kernels for every compiled fastadv op, in one place.

They let ``torch.compile`` and ``torch.library.opcheck`` trace the C++/CUDA
ops without running them. The Lp ops only mutate ``out`` and return nothing,
so their fake kernels check shapes and return None.
"""
from __future__ import annotations

import math

import torch

from fastadv import _ext

_LP_OPS = ("linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1")


def _fake_lp(*args):
    first, out = args[0], args[-1]
    torch._check(first.shape == out.shape, lambda: "out must have the shape of the input rows")
    return None


def _register(op: str, fn) -> None:
    """Register ``fn`` as the fake kernel of ``fastadv::op`` if the built extension defines it.

    A stale build (older than the schema list) must not break ``import fastadv``.
    """
    if _ext.EXT_ERROR is None and _ext.has_op(op):
        torch.library.register_fake(f"fastadv::{op}")(fn)


for _op in _LP_OPS:
    _register(_op, _fake_lp)


def _fake_step_checked(*args):
    """linf_step_checked / l2_step_checked: out is written, and a 0-d int64 count comes back."""
    _fake_lp(*args)
    return args[0].new_empty((), dtype=torch.int64)


for _op in ("linf_step_checked", "l2_step_checked"):
    _register(_op, _fake_step_checked)


# ---- Sinkhorn / Wasserstein projection (issue 3) ----------------------------
def _fake_sinkhorn(a, b, cost, reg, max_iter, tol):
    torch._check(a.dim() == 2 and b.dim() == 2 and cost.dim() == 3, lambda: "sinkhorn: a (B, n), b (B, m), cost (B|1, n, m)")
    bsz = a.shape[0]
    return (
        a.new_empty(a.shape),
        b.new_empty(b.shape),
        a.new_empty((bsz,), dtype=torch.int32),
        a.new_empty((bsz,)),
    )


def _fake_wasserstein_project(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper=math.inf):
    torch._check(x.dim() == 4 and x0.shape == x.shape, lambda: "wasserstein_project: x, x0 (B, C, H, W)")
    bsz = x.shape[0]
    return (
        x.new_empty(x.shape),
        x.new_empty((bsz,), dtype=torch.int32),
        x.new_empty((bsz,)),
        x.new_empty((bsz,)),
    )


_register("sinkhorn", _fake_sinkhorn)
_register("wasserstein_project", _fake_wasserstein_project)
