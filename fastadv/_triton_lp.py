"""Register the Triton Lp kernels as ``fastadv::triton_<op>`` torch ops.

Each op has the signature of the C++ schema in ``csrc/fastadv.cpp`` (rows in,
result written into ``out``) and is registered with the dispatcher as the
``triton`` backend of ``<op>``. ``torch.library.triton_op`` + ``wrap_triton``
make the launches visible to ``torch.compile`` (Inductor sees the kernels and
the mutation of ``out``), and give opcheck a fake kernel for free.

Imported lazily by ``fastadv._dispatch`` the first time the triton backend
is considered, so ``import fastadv`` never imports triton.

Under ``TRITON_INTERPRET=1`` the ops run eagerly on CPU tensors (that is how
CI executes the kernels); ``torch.compile`` of them needs a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from fastadv import _dispatch
from fastadv.kernels import lp_project, lp_steps

_MUT = {"out"}


@triton_op("fastadv::triton_linf_step", mutates_args=_MUT)
def triton_linf_step(
    x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
    lo: float, hi: float, out: torch.Tensor,
) -> None:
    lp_steps.linf_step_triton(x, x0, grad, alpha, eps, lo, hi, out, _wrap=wrap_triton)


@triton_op("fastadv::triton_l2_step", mutates_args=_MUT)
def triton_l2_step(
    x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
    lo: float, hi: float, out: torch.Tensor,
) -> None:
    lp_steps.l2_step_triton(x, x0, grad, alpha, eps, lo, hi, out, _wrap=wrap_triton)


@triton_op("fastadv::triton_l1_step", mutates_args=_MUT)
def triton_l1_step(
    x: torch.Tensor, x0: torch.Tensor, grad: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
    sparsity: float, lo: float, hi: float, out: torch.Tensor,
) -> None:
    lp_steps.l1_step_triton(x, x0, grad, alpha, eps, sparsity, lo, hi, out, _wrap=wrap_triton)


@triton_op("fastadv::triton_project_linf", mutates_args=_MUT)
def triton_project_linf(
    delta: torch.Tensor, eps: torch.Tensor, x0: Optional[torch.Tensor], lo: float, hi: float, out: torch.Tensor
) -> None:
    lp_project.project_linf_triton(delta, eps, x0, lo, hi, out, _wrap=wrap_triton)


@triton_op("fastadv::triton_project_l2", mutates_args=_MUT)
def triton_project_l2(
    delta: torch.Tensor, eps: torch.Tensor, x0: Optional[torch.Tensor], lo: float, hi: float, out: torch.Tensor
) -> None:
    lp_project.project_l2_triton(delta, eps, x0, lo, hi, out, _wrap=wrap_triton)


@triton_op("fastadv::triton_project_l1", mutates_args=_MUT)
def triton_project_l1(
    delta: torch.Tensor, eps: torch.Tensor, x0: Optional[torch.Tensor], lo: float, hi: float, out: torch.Tensor
) -> None:
    lp_project.project_l1_triton(delta, eps, x0, lo, hi, out, _wrap=wrap_triton)


def _fake(*args) -> None:
    """Fake kernel: the ops only write ``out``, so tracing needs nothing but the shape check.

    triton_op's own fake runs the body under FakeTensorMode, where wrap_triton
    launches nothing on a GPU, so this is the same on a GPU. Under
    TRITON_INTERPRET=1 wrap_triton hands back the interpreted kernel, which
    would try to run on fake tensors; with this fake, FakeTensor propagation
    (opcheck's test_faketensor) works on CPU too. torch.compile still needs a
    GPU: AOTDispatch decomposes the op into its kernels (functional_decomp).
    """
    first, out = args[0], args[-1]
    torch._check(first.shape == out.shape, lambda: "out must have the shape of the input rows")
    return None


OPS = ("linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1")
# The kernels each op launches. triton_op finds kernels by reading the body's
# source, which does not see through the launchers' _wrap argument; AOTAutograd
# hashes these kernels' sources into its cache key, so an edited kernel must
# not hit a stale cache entry.
KERNELS = {
    "linf_step": (lp_steps._linf_step_kernel,),
    "l2_step": (lp_steps._l2_step_kernel, lp_steps._l2_step_partial_kernel, lp_steps._l2_step_apply_kernel),
    "l1_step": (lp_steps._l1_step_kernel,),
    "project_linf": (lp_project._project_linf_kernel,),
    "project_l2": (
        lp_project._project_l2_kernel,
        lp_project._sumsq_partial_kernel,
        lp_project._project_l2_scale_kernel,
    ),
    "project_l1": (lp_project._project_l1_kernel,),
}
_kernel_table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
for _op in OPS:
    globals()[f"triton_{_op}"].register_fake(_fake)
    if isinstance(_kernel_table, dict) and not _kernel_table.get(f"fastadv::triton_{_op}"):
        _kernel_table[f"fastadv::triton_{_op}"] = list(KERNELS[_op])
    _dispatch.register(_op, "triton", getattr(torch.ops.fastadv, f"triton_{_op}"))
