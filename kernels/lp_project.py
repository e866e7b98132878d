"""Triton kernels for the exact Lp-ball projections (with an optional box).

Semantics are those of ``fastadv.reference.lp.project_linf/_l2/_l1``; the
backend contract (``csrc/fastadv.cpp``): ``delta``, ``x0``, ``out`` are (B, N)
contiguous rows of one dtype, ``eps`` a float32 (B,) tensor, ``lo``/``hi``
floats (+-inf: no box; the box applies only when x0 is given), the result goes
to ``out``, which may alias ``delta`` (every kernel reads an element before it
writes it, and writes ``out`` only in its last pass).

* project_linf: elementwise clamp on a 2-D grid (sample groups, chunks of a
  sample; ``_lp_common.elem_launch``), eps loaded once a program.
* project_l2 without a box: a norm and a scale. One program per sample when
  the sample fits in one block; otherwise two passes over a (B, chunks) grid:
  per-chunk partial sums of squares into a float32 (B, chunks) buffer, then
  a scaling pass that sums its row's partials in a fixed order
  (deterministic, no atomics).
* project_l2 with a box: one program per sample; the multiplier t in [0, 1]
  by the monotone fixed point t <- sqrt((eps^2 - C(t)) / S(t)) from t = 0,
  which is Newton's method on the concave f(s = t^2) = ||clamp(t v, a, b)||^2
  from below: every iterate is feasible and it ends once the saturated set
  stops changing (exact up to rounding).
* project_l1: one program per sample; tau by safeguarded Newton on
  g(tau) = sum clip(|v| - tau, 0, u) inside a bisection bracket [0, max|v|].
  No sort.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._lp_common import (
    L1_MAX_ITERS,
    L2_MAX_ITERS,
    _clamp,
    _elem_tile,
    _l1_caps,
    _l1_sums,
    _l1_update,
    _l2_box_sums,
    _l2_box_terms,
    _l2_fixed_point,
    _nan_to_zero,
    _sign,
    elem_grids,
    elem_launch,
    next_pow2,
    row_launch,
)

# A sample of up to SINGLE_MAX elements is one block held in registers
# (ptxas -v for sm_90: up to 127-128 registers a thread at 16 warps, no spills;
# docs/backends-triton.md); larger
# samples are streamed in CHUNK-element blocks. Tests lower both to force the
# chunked and two-pass paths on small shapes.
SINGLE_MAX = 8192
CHUNK = 4096
def _launch(kernel, wrap):
    return wrap(kernel) if wrap is not None else kernel


# ===================================================================== L-inf
@triton.jit
def _project_linf_kernel(
    d_ptr, x0_ptr, eps_ptr, out_ptr, lo, hi, B, N, chunk0,
    HAS_X0: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (i, j): samples i*ROWS .. i*ROWS + ROWS - 1, chunk chunk0 + j of each."""
    rows, offs, mask = _elem_tile(tl.program_id(0), tl.program_id(1), chunk0, B, N, ROWS, BLOCK)
    e = tl.load(eps_ptr + rows, mask=rows < B, other=0.0).to(tl.float32)[:, None]  # once per sample
    d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lower = -e
    upper = e
    if HAS_X0:
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        lower = tl.maximum(lower, tl.cast(lo, tl.float32) - x0)
        upper = tl.minimum(upper, tl.cast(hi, tl.float32) - x0)
    y = tl.minimum(tl.maximum(d, lower), upper)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def project_linf_triton(delta, eps, x0, lo, hi, out, *, _wrap=None):
    """out = clamp(delta, max(-eps, lo - x0), min(eps, hi - x0)) on (B, N) rows."""
    b, n = delta.shape
    if b * n == 0:
        return
    rows, block, warps = elem_launch(b, n)
    for grid, chunk0 in elem_grids(b, n, rows, block):
        _launch(_project_linf_kernel, _wrap)[grid](
            delta, delta if x0 is None else x0, eps, out, float(lo), float(hi), b, n, chunk0,
            HAS_X0=x0 is not None, ROWS=rows, BLOCK=block, num_warps=warps,
        )


# ===================================================================== L2
@triton.jit
def _l2_box_row_sums(t, v1, a1, b1, d_ptr, x0_ptr, base, N, lo, hi, BLOCK: tl.constexpr, SINGLE: tl.constexpr):
    """(C(t), S(t)) over the whole sample (see ``_l2_box_sums``)."""
    if SINGLE:
        c, s = _l2_box_sums(v1, a1, b1, t)
    else:
        acc_c = tl.zeros([BLOCK], tl.float32)
        acc_s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            v = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            cterm, sterm = _l2_box_terms(v, lo - x0, hi - x0, t)
            acc_c += cterm
            acc_s += sterm
        c = tl.sum(acc_c, axis=0)
        s = tl.sum(acc_s, axis=0)
    return c, s


@triton.jit
def _project_l2_kernel(
    d_ptr, x0_ptr, eps_ptr, out_ptr, lo, hi, N,
    HAS_BOX: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    """One program per sample. Without a box only the SINGLE case runs here
    (larger samples take the two-pass kernels below)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    e = tl.load(eps_ptr + row).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    if not HAS_BOX:
        v = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        nrm = tl.sqrt(tl.sum(v * v, axis=0))
        factor = tl.where(nrm > e, e / tl.where(nrm > 0, nrm, 1.0), 1.0)
        tl.store(out_ptr + base + offs, (v * factor).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        e2 = e * e
        if SINGLE:
            v1 = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            x01 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            a1 = lo - x01
            b1 = hi - x01
            f1 = _clamp(v1, a1, b1)
            f_one = tl.sum(f1 * f1, axis=0)
        else:
            v1 = tl.zeros([BLOCK], tl.float32)
            a1 = v1
            b1 = v1
            acc = tl.zeros([BLOCK], tl.float32)
            for start in range(0, N, BLOCK):
                o = start + offs
                m = o < N
                v = tl.load(d_ptr + base + o, mask=m, other=0.0).to(tl.float32)
                x0 = tl.load(x0_ptr + base + o, mask=m, other=0.0).to(tl.float32)
                f = _clamp(v, lo - x0, hi - x0)
                acc += f * f
            f_one = tl.sum(acc, axis=0)
        # t = 1 (plain clamp) is the answer when it is inside the ball;
        # otherwise iterate from t = 0, each iterate feasible and increasing.
        inside = f_one <= e2
        t = tl.where(inside, 1.0, 0.0)
        go = tl.where(inside, 0, 1)
        it = 0
        while go != 0:
            c, s = _l2_box_row_sums(t, v1, a1, b1, d_ptr, x0_ptr, base, N, lo, hi, BLOCK, SINGLE)
            tn = _l2_fixed_point(e2, c, s, t)
            it += 1
            go = tl.where((tn > t) & (it < MAX_ITERS), 1, 0)
            t = tl.maximum(t, tn)
        if SINGLE:
            tl.store(out_ptr + base + offs, _clamp(t * v1, a1, b1).to(out_ptr.dtype.element_ty), mask=mask)
        else:
            for start in range(0, N, BLOCK):
                o = start + offs
                m = o < N
                v = tl.load(d_ptr + base + o, mask=m, other=0.0).to(tl.float32)
                x0 = tl.load(x0_ptr + base + o, mask=m, other=0.0).to(tl.float32)
                y = _clamp(t * v, lo - x0, hi - x0)
                tl.store(out_ptr + base + o, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _sumsq_partial_kernel(d_ptr, part_ptr, N, NCHUNK, BLOCK: tl.constexpr):
    """Pass 1 of the large-sample L2 projection: part[b, c] = sum of v^2 over chunk c of row b."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(d_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(part_ptr + row * NCHUNK + chunk, tl.sum(v * v, axis=0))


@triton.jit
def _project_l2_scale_kernel(d_ptr, part_ptr, eps_ptr, out_ptr, N, NCHUNK, BLOCK: tl.constexpr, PBLOCK: tl.constexpr):
    """Pass 2: every program sums its row's partials in the same fixed order, then scales its chunk."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    pidx = tl.arange(0, PBLOCK)
    part = tl.load(part_ptr + row * NCHUNK + pidx, mask=pidx < NCHUNK, other=0.0)
    nrm = tl.sqrt(tl.sum(part, axis=0))
    e = tl.load(eps_ptr + row).to(tl.float32)
    factor = tl.where(nrm > e, e / tl.where(nrm > 0, nrm, 1.0), 1.0)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.load(d_ptr + row * N + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (v * factor).to(out_ptr.dtype.element_ty), mask=mask)


def _has_box(x0, lo, hi) -> bool:
    return x0 is not None and (math.isfinite(lo) or math.isfinite(hi))


def project_l2_triton(delta, eps, x0, lo, hi, out, *, _wrap=None):
    """Exact projection of each row onto {||d||_2 <= eps} (and lo <= x0 + d <= hi)."""
    b, n = delta.shape
    if b * n == 0:
        return
    has_box = _has_box(x0, lo, hi)
    block, single, warps = row_launch(n, SINGLE_MAX, CHUNK)
    if has_box or single:
        _launch(_project_l2_kernel, _wrap)[(b,)](
            delta, delta if x0 is None else x0, eps, out, float(lo), float(hi), n,
            HAS_BOX=has_box, SINGLE=single, BLOCK=block, MAX_ITERS=L2_MAX_ITERS, num_warps=warps,
        )
        return
    nchunk = triton.cdiv(n, block)
    part = torch.empty((b, nchunk), dtype=torch.float32, device=delta.device)
    _launch(_sumsq_partial_kernel, _wrap)[(b, nchunk)](delta, part, n, nchunk, BLOCK=block, num_warps=warps)
    _launch(_project_l2_scale_kernel, _wrap)[(b, nchunk)](
        delta, part, eps, out, n, nchunk, BLOCK=block, PBLOCK=max(16, next_pow2(nchunk)), num_warps=warps
    )


# ===================================================================== L1
@triton.jit
def _l1_chunk(d_ptr, x0_ptr, g_ptr, base, offs, mask, lo, hi, alpha, q, nnz,
              STEP: tl.constexpr, HAS_X0: tl.constexpr):
    """(v, x0, a, b) for one block of a row: v is the point to project, [a, b] its box.

    STEP=False (project_l1): v = delta. STEP=True (l1_step): v = x + alpha * e - x0
    with SLIDE's e = sign(g) * [|g| >= q] / nnz, in torch's order of operations.
    """
    if STEP:
        x = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        g = _nan_to_zero(tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(tl.float32))
        e = tl.where(tl.abs(g) >= q, _sign(g), 0.0) / nnz
        v = tl.where(mask, (x + alpha * e) - x0, 0.0)
    else:
        v = tl.load(d_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_X0:
            x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            x0 = tl.zeros_like(v)
    if HAS_X0:
        a = lo - x0
        b = hi - x0
    else:
        a = tl.full(v.shape, float("-inf"), tl.float32)
        b = tl.full(v.shape, float("inf"), tl.float32)
    return v, x0, a, b


@triton.jit
def _l1_row_sums(tau, av1, u1, d_ptr, x0_ptr, g_ptr, base, N, lo, hi, alpha, q, nnz,
                 BLOCK: tl.constexpr, SINGLE: tl.constexpr, STEP: tl.constexpr, HAS_X0: tl.constexpr):
    """g(tau) and its right/left slope counts over the whole sample (see ``_l1_sums``)."""
    if SINGLE:
        gsum, nr, nl = _l1_sums(av1, u1, tau)
    else:
        acc_g = tl.zeros([BLOCK], tl.float32)
        acc_r = tl.zeros([BLOCK], tl.float32)
        acc_l = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            v, x0, a, b = _l1_chunk(d_ptr, x0_ptr, g_ptr, base, offs, mask, lo, hi, alpha, q, nnz, STEP, HAS_X0)
            av, u = _l1_caps(v, a, b)
            lowb = av - u
            acc_g += tl.minimum(tl.maximum(av - tau, 0.0), u)
            acc_r += ((lowb <= tau) & (tau < av)).to(tl.float32)
            acc_l += ((lowb < tau) & (tau <= av)).to(tl.float32)
        gsum = tl.sum(acc_g, axis=0)
        nr = tl.sum(acc_r, axis=0)
        nl = tl.sum(acc_l, axis=0)
    return gsum, nr, nl


@triton.jit
def _l1_tau(av1, u1, d_ptr, x0_ptr, g_ptr, base, N, lo, hi, alpha, q, nnz, eps,
            BLOCK: tl.constexpr, SINGLE: tl.constexpr, STEP: tl.constexpr, HAS_X0: tl.constexpr,
            MAX_ITERS: tl.constexpr):
    """The L1 threshold tau >= 0 with ||clamp(soft(v, tau), a, b)||_1 = eps (0 if inside).

    Safeguarded Newton on the piecewise-linear, nonincreasing g(tau) inside
    the bracket [0, max|v|] (g(max|v|) = 0 <= eps). Returns a tau whose g is
    <= eps up to float32 rounding of the sum: on convergence the Newton target,
    at the iteration cap the feasible end of the bracket.
    """
    if SINGLE:
        vmax = tl.max(av1, axis=0)
    else:
        accm = tl.zeros([BLOCK], tl.float32)
        for start in range(0, N, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < N
            v, x0, a, b = _l1_chunk(d_ptr, x0_ptr, g_ptr, base, offs, mask, lo, hi, alpha, q, nnz, STEP, HAS_X0)
            accm = tl.maximum(accm, tl.abs(v))
        vmax = tl.max(accm, axis=0)
    tau = vmax * 0.0
    lo_t = tau
    hi_t = vmax
    fin = tau
    go = 1
    it = 0
    while go != 0:
        gsum, nr, nl = _l1_row_sums(tau, av1, u1, d_ptr, x0_ptr, g_ptr, base, N, lo, hi, alpha, q, nnz,
                                    BLOCK, SINGLE, STEP, HAS_X0)
        nxt, lo_t, hi_t, done, fin = _l1_update(tau, gsum, nr, nl, eps, lo_t, hi_t)
        it += 1
        go = tl.where(done | (it >= MAX_ITERS), 0, 1)
        tau = nxt
    return fin


@triton.jit
def _project_l1_kernel(
    d_ptr, x0_ptr, eps_ptr, out_ptr, lo, hi, N,
    HAS_X0: tl.constexpr, SINGLE: tl.constexpr, BLOCK: tl.constexpr, MAX_ITERS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    lo = tl.cast(lo, tl.float32)
    hi = tl.cast(hi, tl.float32)
    e = tl.load(eps_ptr + row).to(tl.float32)
    offs = tl.arange(0, BLOCK)
    one = e * 0.0 + 1.0  # unused SLIDE arguments (alpha, q, nnz) of the shared loader
    if SINGLE:
        mask = offs < N
        v1, x01, a1, b1 = _l1_chunk(d_ptr, x0_ptr, d_ptr, base, offs, mask, lo, hi, one, one, one, False, HAS_X0)
        av1, u1 = _l1_caps(v1, a1, b1)
    else:
        av1 = tl.zeros([BLOCK], tl.float32)
        u1 = av1
    tau = _l1_tau(av1, u1, d_ptr, x0_ptr, d_ptr, base, N, lo, hi, one, one, one, e,
                  BLOCK, SINGLE, False, HAS_X0, MAX_ITERS)
    if SINGLE:
        y = _clamp(_sign(v1) * tl.maximum(av1 - tau, 0.0), a1, b1)
        tl.store(out_ptr + base + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        for start in range(0, N, BLOCK):
            o = start + offs
            m = o < N
            v, x0, a, b = _l1_chunk(d_ptr, x0_ptr, d_ptr, base, o, m, lo, hi, one, one, one, False, HAS_X0)
            y = _clamp(_sign(v) * tl.maximum(tl.abs(v) - tau, 0.0), a, b)
            tl.store(out_ptr + base + o, y.to(out_ptr.dtype.element_ty), mask=m)


def project_l1_triton(delta, eps, x0, lo, hi, out, *, _wrap=None):
    """Exact projection of each row onto {||d||_1 <= eps} (and lo <= x0 + d <= hi)."""
    b, n = delta.shape
    if b * n == 0:
        return
    block, single, warps = row_launch(n, SINGLE_MAX, CHUNK)
    _launch(_project_l1_kernel, _wrap)[(b,)](
        delta, delta if x0 is None else x0, eps, out, float(lo), float(hi), n,
        HAS_X0=x0 is not None, SINGLE=single, BLOCK=block, MAX_ITERS=L1_MAX_ITERS, num_warps=warps,
    )
