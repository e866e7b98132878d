"""Fake (meta) kernels for every compiled fastadv op, in one place.

They let ``torch.compile`` and ``torch.library.opcheck`` trace the C++/CUDA
ops without running them. The Lp ops only mutate ``out`` and return nothing,
so their fake kernels check shapes and return None.
"""
from __future__ import annotations

import torch

from fastadv import _ext

_LP_OPS = ("linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1")


def _fake_lp(*args):
    first, out = args[0], args[-1]
    torch._check(first.shape == out.shape, lambda: "out must have the shape of the input rows")
    return None


if _ext.EXT_ERROR is None:
    for _op in _LP_OPS:
        torch.library.register_fake(f"fastadv::{_op}")(_fake_lp)
