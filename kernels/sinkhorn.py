"""Triton kernel for batched log-domain Sinkhorn (fastadv::triton_sinkhorn).

One program per problem; the whole (n, m) cost tile, both potentials and the
marginals stay on chip across all iterations, and each program stops on its
own test (``||P 1 - a||_1 <= tol``) inside a device-side while loop: no host
sync. Same updates, potentials (KL form) and stopping rule as
``fastadv.reference.ot.sinkhorn``. This version holds the tile in registers,
so it takes n, m <= 128 (``MAX_BINS``).

Above that, ``_sinkhorn_tiled_kernel`` (still one program per problem) streams
the cost matrix from global memory in (BLOCK_N x BLOCK_M) tiles, twice per
iteration, and keeps f, g (and the row log-sums L) in global scratch (the f and
g outputs themselves, O(n + m) per problem):

- column pass: g_j = -reg LSE_i(log a_i + (f_i - C_ij) / reg), online max/sum
  over row tiles;
- row pass: L_i = LSE_j(log b_j + (g_j - C_ij) / reg), online over column
  tiles. It gives the stopping test of the current (f, g) and the next f at
  once: (P 1)_i = exp(log a_i + f_i / reg + L_i) (the small kernel forms
  log P explicitly, a third pass), and f_new = -reg L_i.

So the updates, their order, the potentials and the stopping rule are those of
the small kernel and the reference; only the order of the float32 additions
inside a log-sum-exp differs (one online max per tile instead of one max per
row). Stores to scratch are followed by ``tl.debug_barrier()`` (a CTA barrier,
which also orders global memory inside the program) because the next pass
reads them in a different thread layout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_BINS = 128  # n, m above this take the tiled kernel (a Python global: tests lower it)
TILE_N = 64  # tiled kernel's default tile: 64 x 64 float32 = 16 KB of registers per pass (4 warps)
TILE_M = 64
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


@triton.jit
def _lse_rows(c_base, lb_ptr, g_ptr, row0, n, m, inv, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """L_i = LSE_j(lb_j + (g_j - C_ij) * inv) for rows row0 .. row0 + BLOCK_N, online over column tiles."""
    rn = row0 + tl.arange(0, BLOCK_N)
    mn = rn < n
    mx = tl.full([BLOCK_N], NEG, tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for col0 in range(0, m, BLOCK_M):
        rm = col0 + tl.arange(0, BLOCK_M)
        mm = rm < m
        mask2 = mn[:, None] & mm[None, :]
        lb = tl.load(lb_ptr + rm, mask=mm, other=0.0)
        g = tl.load(g_ptr + rm, mask=mm, other=0.0).to(tl.float32)
        c = tl.load(c_base + rn.to(tl.int64)[:, None] * m + rm[None, :], mask=mask2, other=0.0).to(tl.float32)
        t = tl.where(mask2, lb[None, :] + (g[None, :] - c) * inv, NEG)
        mx_new = tl.maximum(mx, tl.max(t, 1))
        s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(t - mx_new[:, None]), 1)
        mx = mx_new
    return mx + tl.log(s)


@triton.jit
def _sinkhorn_tiled_kernel(a_ptr, b_ptr, c_ptr, f_ptr, g_ptr, la_ptr, lb_ptr, l_ptr, it_ptr, res_ptr, n, m, stride_cb,
                           reg, max_iter, tol, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    reg = tl.full([], reg, tl.float32)
    tol = tl.full([], tol, tl.float32)
    inv = 1.0 / reg
    c_base = c_ptr + pid * stride_cb
    a_base = a_ptr + pid * n
    f_base = f_ptr + pid * n
    la_base = la_ptr + pid * n
    l_base = l_ptr + pid * n
    b_base = b_ptr + pid * m
    g_base = g_ptr + pid * m
    lb_base = lb_ptr + pid * m
    # log marginals once (scratch), g = 0
    for row0 in range(0, n, BLOCK_N):
        rn = row0 + tl.arange(0, BLOCK_N)
        mn = rn < n
        a = tl.load(a_base + rn, mask=mn, other=0.0).to(tl.float32)
        tl.store(la_base + rn, tl.where(a > 0, tl.log(tl.maximum(a, 1e-38)), NEG), mask=mn)
    for col0 in range(0, m, BLOCK_M):
        rm = col0 + tl.arange(0, BLOCK_M)
        mm = rm < m
        b = tl.load(b_base + rm, mask=mm, other=0.0).to(tl.float32)
        tl.store(lb_base + rm, tl.where(b > 0, tl.log(tl.maximum(b, 1e-38)), NEG), mask=mm)
        tl.store(g_base + rm, tl.zeros([BLOCK_M], dtype=tl.float32), mask=mm)
    tl.debug_barrier()
    # first f update (from g = 0); max_iter <= 0 leaves f = g = 0 as the reference does
    go = max_iter > 0
    for row0 in range(0, n, BLOCK_N):
        rn = row0 + tl.arange(0, BLOCK_N)
        mn = rn < n
        lrow = _lse_rows(c_base, lb_base, g_base, row0, n, m, inv, BLOCK_N, BLOCK_M)
        tl.store(f_base + rn, tl.where(go, -reg * lrow, 0.0), mask=mn)
    tl.debug_barrier()
    it = 0
    res = float("inf")
    while (it < max_iter) & (res > tol):
        # column pass: g from the current f
        for col0 in range(0, m, BLOCK_M):
            rm = col0 + tl.arange(0, BLOCK_M)
            mm = rm < m
            mx = tl.full([BLOCK_M], NEG, tl.float32)
            s = tl.zeros([BLOCK_M], dtype=tl.float32)
            for row0 in range(0, n, BLOCK_N):
                rn = row0 + tl.arange(0, BLOCK_N)
                mn = rn < n
                mask2 = mn[:, None] & mm[None, :]
                la = tl.load(la_base + rn, mask=mn, other=0.0)
                f = tl.load(f_base + rn, mask=mn, other=0.0).to(tl.float32)
                c = tl.load(c_base + rn.to(tl.int64)[:, None] * m + rm[None, :], mask=mask2, other=0.0).to(tl.float32)
                t = tl.where(mask2, la[:, None] + (f[:, None] - c) * inv, NEG)
                mx_new = tl.maximum(mx, tl.max(t, 0))
                s = s * tl.exp(mx - mx_new) + tl.sum(tl.exp(t - mx_new[None, :]), 0)
                mx = mx_new
            tl.store(g_base + rm, -reg * (mx + tl.log(s)), mask=mm)
        tl.debug_barrier()
        it += 1
        # row pass: residual of (f, g) and the next f's log-sums
        res = 0.0
        for row0 in range(0, n, BLOCK_N):
            rn = row0 + tl.arange(0, BLOCK_N)
            mn = rn < n
            lrow = _lse_rows(c_base, lb_base, g_base, row0, n, m, inv, BLOCK_N, BLOCK_M)
            a = tl.load(a_base + rn, mask=mn, other=0.0).to(tl.float32)
            la = tl.load(la_base + rn, mask=mn, other=0.0)
            f = tl.load(f_base + rn, mask=mn, other=0.0).to(tl.float32)
            row = tl.exp(la + f * inv + lrow)
            res += tl.sum(tl.where(mn, tl.abs(row - a), 0.0), 0)
            tl.store(l_base + rn, lrow, mask=mn)
        tl.debug_barrier()
        # the next iteration's f; on exit f stays the one whose residual was measured
        more = (it < max_iter) & (res > tol)
        for row0 in range(0, n, BLOCK_N):
            rn = row0 + tl.arange(0, BLOCK_N)
            mn = rn < n
            lrow = tl.load(l_base + rn, mask=mn, other=0.0)
            f = tl.load(f_base + rn, mask=mn, other=0.0).to(tl.float32)
            tl.store(f_base + rn, tl.where(more, -reg * lrow, f), mask=mn)
        tl.debug_barrier()
    tl.store(it_ptr + pid, it)
    tl.store(res_ptr + pid, res)


def supported(a: torch.Tensor, b: torch.Tensor) -> list[str]:
    """Any n, m: n, m <= MAX_BINS run on chip, larger problems take the tiled kernel."""
    return []


def sinkhorn_triton(a, b, cost, reg, max_iter, tol, *, tiled=None, block_n=None, block_m=None, _wrap=lambda k: k):
    """a (B, n), b (B, m), cost (B | 1, n, m), float32 contiguous -> (f, g, iterations int32, residual).

    tiled: None picks the tiled kernel when n or m > MAX_BINS; True / False force it (tests).
    block_n, block_m: the tiled kernel's tile (powers of two >= 16); None: TILE_N, TILE_M.
    """
    bsz, n = a.shape
    m = b.shape[1]
    f = torch.full((bsz, n), float("nan"), dtype=a.dtype, device=a.device)  # poisoned: every entry is written
    g = torch.full((bsz, m), float("nan"), dtype=a.dtype, device=a.device)
    it = torch.full((bsz,), -1, dtype=torch.int32, device=a.device)
    res = torch.full((bsz,), float("nan"), dtype=a.dtype, device=a.device)
    stride_cb = 0 if (cost.shape[0] == 1 and bsz != 1) else n * m
    if tiled is None:
        tiled = n > MAX_BINS or m > MAX_BINS
    if tiled:
        la = torch.empty((bsz, n), dtype=torch.float32, device=a.device)  # scratch: log a, row log-sums, log b
        lsum = torch.empty((bsz, n), dtype=torch.float32, device=a.device)
        lb = torch.empty((bsz, m), dtype=torch.float32, device=a.device)
        _wrap(_sinkhorn_tiled_kernel)[(bsz,)](
            a, b, cost, f, g, la, lb, lsum, it, res, n, m, stride_cb, float(reg), int(max_iter), float(tol),
            BLOCK_N=block_n or TILE_N, BLOCK_M=block_m or TILE_M,
        )
        return f, g, it, res
    _wrap(_sinkhorn_kernel)[(bsz,)](
        a, b, cost, f, g, it, res, n, m, stride_cb, float(reg), int(max_iter), float(tol),
        BLOCK_N=max(16, triton.next_power_of_2(n)), BLOCK_M=max(16, triton.next_power_of_2(m)),
    )
    return f, g, it, res
