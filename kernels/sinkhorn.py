"""Triton kernel for batched log-domain Sinkhorn (fastadv::triton_sinkhorn).

One program per problem; the whole (n, m) cost tile, both potentials and the
marginals stay on chip across all iterations, and each program stops on its
own test (``||P 1 - a||_1 <= tol``) inside a device-side while loop: no host
sync. Same updates, potentials (KL form) and stopping rule as
``fastadv.reference.ot.sinkhorn``. This version holds the tile in registers,
so it takes n, m <= 128 (``MAX_BINS``); larger problems go to the other
backends (the dispatcher asks ``supported``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BINS = 128
NEG = tl.constexpr(-1e30)  # finite log(0), as the reference; a plain global compiles only under the interpreter


@triton.jit
def _sinkhorn_kernel(a_ptr, b_ptr, c_ptr, f_ptr, g_ptr, it_ptr, res_ptr, n, m, stride_cb, reg, max_iter, tol,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # scalars cast to float32 in the kernel (Inductor may pass float64)
    reg = tl.full([], reg, tl.float32)
    tol = tl.full([], tol, tl.float32)
    inv = 1.0 / reg
    rn = tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    mn = rn < n
    mm = rm < m
    mask2 = mn[:, None] & mm[None, :]
    a = tl.load(a_ptr + pid * n + rn, mask=mn, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pid * m + rm, mask=mm, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + pid * stride_cb + rn[:, None] * m + rm[None, :], mask=mask2, other=0.0).to(tl.float32)
    la = tl.where(a > 0, tl.log(tl.maximum(a, 1e-38)), NEG)
    lb = tl.where(b > 0, tl.log(tl.maximum(b, 1e-38)), NEG)
    f = tl.zeros([BLOCK_N], dtype=tl.float32)
    g = tl.zeros([BLOCK_M], dtype=tl.float32)
    it = 0
    res = float("inf")
    while (it < max_iter) & (res > tol):
        t = tl.where(mask2, lb[None, :] + (g[None, :] - c) * inv, NEG)
        mx = tl.max(t, 1)
        f = -reg * (mx + tl.log(tl.sum(tl.exp(t - mx[:, None]), 1)))
        t2 = tl.where(mask2, la[:, None] + (f[:, None] - c) * inv, NEG)
        mx2 = tl.max(t2, 0)
        g = -reg * (mx2 + tl.log(tl.sum(tl.exp(t2 - mx2[None, :]), 0)))
        logp = tl.where(mask2, la[:, None] + lb[None, :] + (f[:, None] + g[None, :] - c) * inv, NEG)
        row = tl.sum(tl.exp(logp), 1)
        res = tl.sum(tl.where(mn, tl.abs(row - a), 0.0), 0)
        it += 1
    tl.store(f_ptr + pid * n + rn, f, mask=mn)
    tl.store(g_ptr + pid * m + rm, g, mask=mm)
    tl.store(it_ptr + pid, it)
    tl.store(res_ptr + pid, res)


def supported(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    if a.shape[1] > MAX_BINS or b.shape[1] > MAX_BINS:
        return [f"the Triton Sinkhorn kernel holds the cost tile on chip: n, m <= {MAX_BINS}, got {a.shape[1]} x {b.shape[1]}"]
    return []


def sinkhorn_triton(a, b, cost, reg, max_iter, tol, *, _wrap=lambda k: k):
    """a (B, n), b (B, m), cost (B | 1, n, m), float32 contiguous -> (f, g, iterations int32, residual)."""
    bsz, n = a.shape
    m = b.shape[1]
    f = torch.full((bsz, n), float("nan"), dtype=a.dtype, device=a.device)  # poisoned: every entry is written
    g = torch.full((bsz, m), float("nan"), dtype=a.dtype, device=a.device)
    it = torch.full((bsz,), -1, dtype=torch.int32, device=a.device)
    res = torch.full((bsz,), float("nan"), dtype=a.dtype, device=a.device)
    stride_cb = 0 if (cost.shape[0] == 1 and bsz != 1) else n * m
    _wrap(_sinkhorn_kernel)[(bsz,)](
        a, b, cost, f, g, it, res, n, m, stride_cb, float(reg), int(max_iter), float(tol),
        BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_M=max(16, triton.next_power_of_2(m)),
    )
    return f, g, it, res
