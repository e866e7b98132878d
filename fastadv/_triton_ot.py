"""Register the Triton optimal-transport kernels as ``fastadv::triton_<op>`` ops (issue 3).

Imported lazily by ``fastadv._dispatch``. Under ``TRITON_INTERPRET=1`` the ops
run eagerly on CPU tensors (how CI executes the kernels).

Registered: ``sinkhorn`` (one program per problem: the cost tile on chip for
n, m <= 128, streamed in 64 x 64 tiles from global memory above that) and
``wasserstein_project`` (one program per image, C*H*W <= 4096).
"""
from __future__ import annotations

import math

import torch
from torch.library import triton_op, wrap_triton

from fastadv import _dispatch
from fastadv._fake import _fake_wasserstein_project
from fastadv.kernels import sinkhorn as _sk
from fastadv.kernels import wasserstein as _ws


@triton_op("fastadv::triton_sinkhorn", mutates_args=())
def triton_sinkhorn(
    a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sk.sinkhorn_triton(a, b, cost, reg, max_iter, tol, _wrap=wrap_triton)


def _run_sinkhorn(a, b, cost, reg, max_iter, tol):
    reasons = _sk.supported(a, b)  # no size limit since the tiled kernel; kept for future limits
    if reasons:  # the dispatcher checks device and dtype; any size limit is the kernel's
        if _dispatch.forced_backend() == "triton":
            raise _dispatch.BackendUnavailable("fastadv: backend 'triton' was forced but cannot run sinkhorn:\n  - " + reasons[0])
        return _dispatch.impl("sinkhorn", "ref")(a, b, cost, reg, max_iter, tol)  # automatic choice: fall back quietly
    return torch.ops.fastadv.triton_sinkhorn(a, b, cost, reg, max_iter, tol)


_dispatch.register("sinkhorn", "triton", _run_sinkhorn)


@triton_op("fastadv::triton_wasserstein_project", mutates_args=())
def triton_wasserstein_project(
    x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, kernel_size: int, p: float, reg: float, max_iter: int, tol: float,
    upper: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ws.wasserstein_project_triton(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper, _wrap=wrap_triton)


# The same fake as the C++ op. triton_op's own fake runs the body under
# FakeTensorMode, and under TRITON_INTERPRET=1 that launches the interpreted
# kernel on fake tensors (no data); with this fake, opcheck's test_faketensor
# works on CPU too (as fastadv/_triton_lp.py does for the Lp ops).
triton_wasserstein_project.register_fake(_fake_wasserstein_project)


def _run_wasserstein_project(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper=math.inf):
    reasons = _ws.supported(x)
    if reasons:  # the dispatcher checks device and dtype; the size limit is the kernel's
        if _dispatch.forced_backend() == "triton":
            raise _dispatch.BackendUnavailable(
                "fastadv: backend 'triton' was forced but cannot run wasserstein_project:\n  - " + reasons[0]
            )
        return _dispatch.impl("wasserstein_project", "ref")(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper)
    return torch.ops.fastadv.triton_wasserstein_project(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper)


_dispatch.register("wasserstein_project", "triton", _run_wasserstein_project)
