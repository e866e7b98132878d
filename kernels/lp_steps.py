"""Triton kernels for the fused PGD steps: L-inf, L2 and SLIDE's sparse L1.

Semantics are those of ``fastadv.reference.lp.linf_step/l2_step/l1_step``;
the backend contract is in ``csrc/fastadv.cpp``: x, x0, grad, out are (B, N)
contiguous rows of one dtype, alpha and eps float32 (B,) tensors, lo/hi floats
(+-inf: no box), result in ``out``, which may alias x (each kernel reads an
element before it writes it and writes ``out`` only in its last pass).
Arithmetic is float32; a NaN gradient coordinate counts as 0.

* linf_step: purely elementwise on a 2-D grid (sample groups, chunks of a
  sample; ``_lp_common.elem_launch``): each program loads its samples' alpha
  and eps once, no per-element sample index. Same operations in the same order as
  torchattacks' PGD, so float32 results are bit-identical (alpha * sign(g)
  is exact, so FMA contraction on a GPU cannot change it either).
* l2_step: one program per sample when it fits in one block (direct norms on
  registers, as the reference computes them). Larger samples: two passes
  over a (B, chunks) grid; pass 1 writes per-chunk partials of ||g||^2,
  <x - x0, g> and ||x - x0||^2 into a float32 (B, 3, chunks) buffer, pass 2
  sums them in a fixed order (deterministic), gets
  ||delta||^2 = ||x - x0||^2 + 2c <x - x0, g> + c^2 ||g||^2 with
  c = alpha / (||g|| + 1e-10), and writes the step. Reading each input twice
  instead of three times (g, then delta, then the write) is why the norm of
  delta is expanded rather than computed from delta.
* l1_step: one program per sample: SLIDE's quantile by bisection on the float32
  bit pattern of |g| (31 counting passes, exact), then the exact L1-ball-with-box
  projection of x + alpha * e - x0 (shared with project_l1), then the write.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._lp_common import (
    L1_MAX_ITERS,
    _clamp,
    _elem_tile,
    _l1_caps,
    _nan_to_zero,
    _sign,
    elem_grids,
    elem_launch,
    next_pow2,
    row_launch,
)
from .lp_project import _l1_chunk, _l1_tau, _launch

# See lp_project.SINGLE_MAX / CHUNK; tests lower these to force the chunked paths.
SINGLE_MAX = 8192
CHUNK = 4096
# Bit pattern of +inf: |g| (NaN mapped to 0) lies in [0, INF_BITS] as int32,
# and non-negative floats order like their bit patterns.
INF_BITS = tl.constexpr(0x7F800000)


# ===================================================================== L-inf
@triton.jit
def _linf_step_kernel(
    x_ptr, x0_ptr, g_ptr, alpha_ptr, eps_ptr, out_ptr, lo, hi, B, N, chunk0,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (i, j): samples i*ROWS .. i*ROWS + ROWS - 1, chunk chunk0 + j of each."""
    rows, offs, mask = _elem_tile(tl.program_id(0), tl.program_id(1), chunk0, B, N, ROWS, BLOCK)
    rmask = rows < B
    # once per sample, broadcast over the chunk
    a = tl.load(alpha_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    e = tl.load(eps_ptr + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    adv = x + a * _sign(g)
    delta = _clamp(adv - x0, -e, e)
    y = _clamp(x0 + delta, tl.cast(lo, tl.float32), tl.cast(hi, tl.float32))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def linf_step_triton(x, x0, grad, alpha, eps, lo, hi, out, *, _wrap=None):
    """out = clamp(x0 + clamp(x + alpha * sign(grad) - x0, -eps, eps), lo, hi) on (B, N) rows."""
    b, n = x.shape
    if b * n == 0:
        return
    rows, block, warps = elem_launch(b, n)
    for grid, chunk0 in elem_grids(b, n, rows, block):
        _launch(_linf_step_kernel, _wrap)[grid](
            x, x0, grad, alpha, eps, out, float(lo), float(hi), b, n, chunk0,
            ROWS=rows, BLOCK=block, num_warps=warps,
        )


# ===================================================================== L2
@triton.jit
def _l2_step_kernel(x_ptr, x0_ptr, g_ptr, alpha_ptr, eps_ptr, out_ptr, lo, hi, N, BLOCK: tl.constexpr):
    """One program per sample, the whole sample in one block (N <= BLOCK)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    a = tl.load(alpha_ptr + row).to(tl.float32)
    e = tl.load(eps_ptr + row).to(tl.float32)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    g = _nan_to_zero(tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
    gn = tl.sqrt(tl.sum(g * g, axis=0)) + 1e-10
    delta = (x + a * (g / gn)) - x0
    dn = tl.sqrt(tl.sum(delta * delta, axis=0))
    factor = tl.where(dn > e, (1.0 / tl.where(dn > 0, dn, 1.0)) * e, 1.0)
    y = _clamp(x0 + delta * factor, tl.cast(lo, tl.float32), tl.cast(hi, tl.float32))
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _l2_step_partial_kernel(x_ptr, x0_ptr, g_ptr, part_ptr, N, NCHUNK, BLOCK: tl.constexpr):
    """Pass 1: part[b, k, c] for k = ||g||^2, <x - x0, g>, ||x - x0||^2 over chunk c of row b."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = row * N
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    g = _nan_to_zero(tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
    d0 = x - x0
    p = part_ptr + row * 3 * NCHUNK + chunk
    tl.store(p, tl.sum(g * g, axis=0))
    tl.store(p + NCHUNK, tl.sum(d0 * g, axis=0))
    tl.store(p + 2 * NCHUNK, tl.sum(d0 * d0, axis=0))


@triton.jit
def _l2_step_apply_kernel(
    x_ptr, x0_ptr, g_ptr, alpha_ptr, eps_ptr, part_ptr, out_ptr, lo, hi, N, NCHUNK,
    BLOCK: tl.constexpr, PBLOCK: tl.constexpr,
):
    """Pass 2: the row's norms from the partials (same fixed order in every program), then the step."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    pidx = tl.arange(0, PBLOCK)
    pm = pidx < NCHUNK
    p = part_ptr + row * 3 * NCHUNK + pidx
    gg = tl.sum(tl.load(p, mask=pm, other=0.0), axis=0)
    dg = tl.sum(tl.load(p + NCHUNK, mask=pm, other=0.0), axis=0)
    dd = tl.sum(tl.load(p + 2 * NCHUNK, mask=pm, other=0.0), axis=0)
    a = tl.load(alpha_ptr + row).to(tl.float32)
    e = tl.load(eps_ptr + row).to(tl.float32)
    gn = tl.sqrt(gg) + 1e-10
    c = a / gn
    dn = tl.sqrt(tl.maximum(dd + 2.0 * c * dg + c * c * gg, 0.0))
    factor = tl.where(dn > e, (1.0 / tl.where(dn > 0, dn, 1.0)) * e, 1.0)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = row * N
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    g = _nan_to_zero(tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
    delta = (x + a * (g / gn)) - x0
    y = _clamp(x0 + delta * factor, tl.cast(lo, tl.float32), tl.cast(hi, tl.float32))
    tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def l2_step_triton(x, x0, grad, alpha, eps, lo, hi, out, *, _wrap=None):
    """torchattacks' PGDL2 step on (B, N) rows (see the module docstring for the passes)."""
    b, n = x.shape
    if b * n == 0:
        return
    block, single, warps = row_launch(n, SINGLE_MAX, CHUNK)
    if single:
        _launch(_l2_step_kernel, _wrap)[(b,)](
            x, x0, grad, alpha, eps, out, float(lo), float(hi), n, BLOCK=block, num_warps=warps
        )
        return
    nchunk = triton.cdiv(n, block)
    part = torch.empty((b, 3, nchunk), dtype=torch.float32, device=x.device)
    _launch(_l2_step_partial_kernel, _wrap)[(b, nchunk)](x, x0, grad, part, n, nchunk, BLOCK=block, num_warps=warps)
    _launch(_l2_step_apply_kernel, _wrap)[(b, nchunk)](
        x, x0, grad, alpha, eps, part, out, float(lo), float(hi), n, nchunk,
        BLOCK=block, PBLOCK=max(16, next_pow2(nchunk)), num_warps=warps,
    )


# ===================================================================== L1 (SLIDE)
@triton.jit
def _abs_bits(g_ptr, base, offs, mask):
    """|g| (NaN as 0) as int32 bit patterns; masked lanes get a pattern above +inf so they never count."""
    g = _nan_to_zero(tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
    bits = tl.abs(g).to(tl.int32, bitcast=True)
    return tl.where(mask, bits, 0x7FFFFFFF)


@triton.jit
def _l1_step_kernel(
    x_ptr, x0_ptr, g_ptr, alpha_ptr, eps_ptr, out_ptr, lo, hi, N, K,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    """One program per sample: quantile, direction, exact L1 + box projection, write."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    alpha = tl.load(alpha_ptr + row).to(tl.float32)
    e = tl.load(eps_ptr + row).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    mask = offs < N

    # 1. q = the K-th smallest |g| (0-based): the smallest bit pattern m with
    #    #{|g| <= m} >= K + 1, by bisection on [0, +inf bits] (31 passes, exact).
    if SINGLE:
        bits1 = _abs_bits(g_ptr, base, offs, mask)
    else:
        bits1 = tl.zeros([BLOCK], tl.int32)
    lo_b = tl.full([], 0, tl.int32)
    hi_b = tl.full([], INF_BITS, tl.int32)
    while lo_b < hi_b:
        mid = lo_b + ((hi_b - lo_b) >> 1)
        if SINGLE:
            cnt = tl.sum((bits1 <= mid).to(tl.int32), axis=0)
        else:
            acc = tl.zeros([BLOCK], tl.int32)
            for start in range(0, N, BLOCK):
                acc += (_abs_bits(g_ptr, base, start + offs, start + offs < N) <= mid).to(tl.int32)
            cnt = tl.sum(acc, axis=0)
        enough = cnt >= K + 1
        hi_b = tl.where(enough, mid, hi_b)
        lo_b = tl.where(enough, lo_b, mid + 1)
    q = lo_b.to(tl.float32, bitcast=True)

    # 2. ||e||_1 before normalisation: kept coordinates with a nonzero gradient.
    if SINGLE:
        g1 = _nan_to_zero(tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
        nnz = tl.sum(((tl.abs(g1) >= q) & (g1 != 0) & mask).to(tl.float32), axis=0)
    else:
        accn = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            o = start + offs
            m = o < N
            g = _nan_to_zero(tl.load(g_ptr + base + o, mask=m, other=0.0).to(tl.float32))
            accn += ((tl.abs(g) >= q) & (g != 0) & m).to(tl.float32)
        nnz = tl.sum(accn, axis=0)
    nnz = tl.maximum(nnz, 1.0)  # e = 0 when nothing is kept: divide by 1 like the reference

    # 3. tau for the exact projection of v = x + alpha * e - x0 onto the L1 ball and the box.
    if SINGLE:
        v1, x01, a1, b1 = _l1_chunk(x_ptr, x0_ptr, g_ptr, base, offs, mask, lo, hi, alpha, q, nnz, True, True)
        av1, u1 = _l1_caps(v1, a1, b1)
    else:
        av1 = tl.zeros([BLOCK], tl.float32)
        u1 = av1
    tau = _l1_tau(av1, u1, x_ptr, x0_ptr, g_ptr, base, N, lo, hi, alpha, q, nnz, e,
                  BLOCK, SINGLE, True, True, MAX_ITERS)

    # 4. y = clamp(x0 + d, lo, hi): the clamp only removes rounding.
    if SINGLE:
        d = _clamp(_sign(v1) * tl.maximum(av1 - tau, 0.0), a1, b1)
        tl.store(out_ptr + base + offs, _clamp(x01 + d, lo, hi).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, N, BLOCK):
            o = start + offs
            m = o < N
            v, x0, a, b = _l1_chunk(x_ptr, x0_ptr, g_ptr, base, o, m, lo, hi, alpha, q, nnz, True, True)
            d = _clamp(_sign(v) * tl.maximum(tl.abs(v) - tau, 0.0), a, b)
            tl.store(out_ptr + base + o, _clamp(x0 + d, lo, hi).to(out_ptr.dtype.element_ty), mask=m)


def l1_keep_rank(n: int, sparsity: float) -> int:
    """Same as ``fastadv.reference.lp.l1_keep_count_rank``: round(sparsity * (n - 1))."""
    return int(math.floor(sparsity * (n - 1) + 0.5))


def l1_step_triton(x, x0, grad, alpha, eps, sparsity, lo, hi, out, *, _wrap=None):
    """SLIDE's sparse L1 step with the exact L1-ball-with-box projection on (B, N) rows."""
    b, n = x.shape
    if b * n == 0:
        return
    block, single, warps = row_launch(n, SINGLE_MAX, CHUNK)
    _launch(_l1_step_kernel, _wrap)[(b,)](
        x, x0, grad, alpha, eps, out, float(lo), float(hi), n, l1_keep_rank(n, float(sparsity)),
        SINGLE=single, BLOCK=block, MAX_ITERS=L1_MAX_ITERS, num_warps=warps,
    )
