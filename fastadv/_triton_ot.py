"""Register the Triton optimal-transport kernels as ``fastadv::triton_<op>`` ops (issue 3).

Imported lazily by ``fastadv._dispatch``. Under ``TRITON_INTERPRET=1`` the ops
run eagerly on CPU tensors (how CI executes the kernels).

Registered: ``sinkhorn`` (one program per problem, n, m <= 128). Not yet:
``wasserstein_project`` (CUDA tensors run it on the reference backend).
"""
from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from fastadv import _dispatch
from fastadv.kernels import sinkhorn as _sk


@triton_op("fastadv::triton_sinkhorn", mutates_args=())
def triton_sinkhorn(
    a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sk.sinkhorn_triton(a, b, cost, reg, max_iter, tol, _wrap=wrap_triton)


def _run_sinkhorn(a, b, cost, reg, max_iter, tol):
    reasons = _sk.supported(a, b)
    if reasons:  # the dispatcher checks device and dtype; the size limit is the kernel's
        if _dispatch.forced_backend() == "triton":
            raise _dispatch.BackendUnavailable("fastadv: backend 'triton' was forced but cannot run sinkhorn:\n  - " + reasons[0])
        return _dispatch.impl("sinkhorn", "ref")(a, b, cost, reg, max_iter, tol)  # automatic choice: fall back quietly
    return torch.ops.fastadv.triton_sinkhorn(a, b, cost, reg, max_iter, tol)


_dispatch.register("sinkhorn", "triton", _run_sinkhorn)
