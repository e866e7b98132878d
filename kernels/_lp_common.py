"""Shared Triton helpers for the Lp steps and projections (``lp_steps``, ``lp_project``).

Every kernel sees (B, N) row-major rows (``fastadv._layout.rows``): sample b
is the N elements starting at ``b * N``. Row offsets are int64 (B * N passes
2**31 at 512x3x224x224). Arithmetic is float32 whatever the storage dtype.
No kernel derives a sample index from an element offset (no ``//`` or ``%``
on offsets): programs are laid out by sample (``elem_launch`` / ``elem_grids``
for the elementwise kernels, one program or one grid row per sample for the
reductions). tests/test_triton_grid.py checks the source, and
tests/test_triton_lp.py the compiled TTIR.

The per-sample root-finds (the L2-ball-with-box multiplier, the L1 threshold
tau and the SLIDE quantile) run as one program per sample. When the sample fits
in one block (``SINGLE``) its values are loaded once and every iteration works
on registers; otherwise each iteration streams the sample in BLOCK chunks,
which on a GPU stay in L2 (a 3x224x224 fp32 sample is 0.6 MB a tensor, 1.8 MB
for x, x0 and grad).
A split-sample variant (several programs per sample, partial sums through a
scratch buffer, one launch per iteration) would raise occupancy for small
batches; it is not written because the iteration count is data dependent and
would need a host sync or a persistent grid-wide barrier per iteration.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Caps for the per-sample root-finds. Both loops exit early when converged:
# measured with a float32 numpy replica of the loops on random images (3072
# and 150528 elements, with and without the [0, 1] box), the L2 fixed point
# takes 4-7 passes and the L1 Newton 7-13. The caps only bound adversarial
# inputs: every iterate of the L2 fixed point is feasible, and the L1 loop
# returns the feasible end of its bracket if it hits the cap.
L2_MAX_ITERS = 64
L1_MAX_ITERS = 80


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------- elementwise launches
# The elementwise kernels (linf_step, project_linf) run on a 2-D grid: axis 0
# walks the samples, axis 1 the BLOCK-element chunks of a sample, so a program
# loads its sample's alpha/eps once and computes no per-element sample index
# (the 1-D version divided every int64 offset by N). A program is a
# [ROWS, BLOCK] tile: ROWS = 1 when a sample spans at least one tile, else
# several whole samples a program, so a batch of tiny samples does not become
# one mostly-masked program per sample. ELEM_TILE = ROWS * BLOCK elements:
# 1024 over 4 warps on a GPU (Triton's vector-add tutorial setting); the
# interpreter runs a program as numpy calls, so fewer, larger tiles are faster.
ELEM_TILE = 1024
ELEM_TILE_INTERPRET = 8192
# CUDA caps grid axes 1 and 2 at 65535 programs; a sample with more chunks
# (over 67M elements at BLOCK = 1024) is covered by several launches, each
# passing the index of its first chunk.
GRID_Y_MAX = 65535


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def elem_launch(b: int, n: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps) for the elementwise kernels on b rows of n elements.

    BLOCK: the chunk of one sample a program covers (a power of two, at least
    16, at most the tile); ROWS: samples a program covers (> 1 only when a
    sample fits in half a tile; never more than the batch needs).
    """
    tile = ELEM_TILE_INTERPRET if _interpreted() else ELEM_TILE
    block = min(tile, max(16, next_pow2(n)))
    rows = max(1, min(tile // block, next_pow2(b)))
    # one warp per 256 elements of the tile (8 fp32 a thread at 1024), at most 4
    return rows, block, int(min(4, max(1, rows * block // 256)))


def elem_grids(b: int, n: int, rows: int, block: int) -> list[tuple[tuple[int, int], int]]:
    """[(grid, chunk0), ...]: the (sample groups, chunks) grids covering b rows of n elements.

    One launch unless a sample has more than GRID_Y_MAX chunks; launch i
    covers chunks chunk0 .. chunk0 + grid[1] - 1. Chunk offsets within a sample
    are int32, so a sample must stay below 2**31 elements (8 GiB of float32).
    """
    if n > 2**31 - 1 - block:
        raise ValueError(f"a sample of {n} elements needs int64 offsets within the sample (limit 2**31 - {block + 1})")
    groups = triton.cdiv(b, rows)
    nchunk = triton.cdiv(n, block)
    return [((groups, min(GRID_Y_MAX, nchunk - c0)), c0) for c0 in range(0, nchunk, GRID_Y_MAX)]


@triton.jit
def _elem_tile(pid_rows, pid_chunk, chunk0, B, N, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """(rows, offs, mask) of one [ROWS, BLOCK] tile of the (B, N) rows.

    rows: the tile's sample indices (int64, shape [ROWS]); offs: int64
    element offsets row * N + column ([ROWS, BLOCK]). The column is
    (chunk0 + pid_chunk) * BLOCK + lane: no division anywhere.
    """
    rows = pid_rows.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = (chunk0 + pid_chunk) * BLOCK + tl.arange(0, BLOCK)
    offs = (rows * N)[:, None] + cols[None, :]
    mask = (rows < B)[:, None] & (cols < N)[None, :]
    return rows, offs, mask


def row_launch(n: int, single_max: int, chunk: int) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) for a one-program-per-sample kernel on rows of n elements.

    SINGLE: the whole sample is one block held in registers; otherwise the
    kernel loops over the sample in chunks of ``chunk`` elements.
    """
    if n <= single_max:
        block = max(16, next_pow2(n))
        single = True
    else:
        block = chunk
        single = False
    return block, single, warps_for(block)


def warps_for(block: int) -> int:
    # 4 warps up to 2048 elements (16 fp32 per thread), then one warp per 512
    # elements up to 16, so a thread holds at most 16 values per operand.
    return int(min(16, max(4, block // 512)))


@triton.jit
def _sign(g):
    # NaN compares false both ways, so a NaN gradient coordinate gives 0 (no move).
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))


@triton.jit
def _nan_to_zero(g):
    return tl.where(g == g, g, 0.0)


@triton.jit
def _clamp(v, lo, hi):
    # torch.clamp(v, lo, hi) = min(max(v, lo), hi)
    return tl.minimum(tl.maximum(v, lo), hi)


# ----------------------------------------------------------------- L2 with box
@triton.jit
def _l2_box_terms(v, a, b, t):
    """Per-coordinate terms of (C(t), S(t)): a coordinate is saturated at t when
    t*v reaches the bound on the side v points to (T_i = bound / v_i <= t);
    it then adds its bound^2 to C, otherwise v^2 to S. Only v's own side
    counts: with x0 on a face (a = 0 or b = 0) the other bound is 0 = t*v at
    t = 0 and must not saturate a coordinate moving away from it."""
    w = t * v
    sat = ((v > 0) & (w >= b)) | ((v < 0) & (w <= a))
    bound = tl.where(v > 0, b, a)
    cterm = tl.where(sat, bound * bound, 0.0)
    sterm = tl.where(sat, 0.0, v * v)
    return cterm, sterm


@triton.jit
def _l2_box_sums(v, a, b, t):
    """(C, S) at multiplier t: C = sum of squared bounds of the saturated
    coordinates, S = sum of v^2 over the others (see ``_l2_box_terms``)."""
    cterm, sterm = _l2_box_terms(v, a, b, t)
    return tl.sum(cterm, axis=0), tl.sum(sterm, axis=0)


@triton.jit
def _l2_fixed_point(e2, c, s, t):
    """t_next = sqrt((eps^2 - C(t)) / S(t)) in [0, 1]; never below t (monotone from below)."""
    tn = tl.where(s > 0, tl.sqrt(tl.maximum(e2 - c, 0.0) / tl.where(s > 0, s, 1.0)), 1.0)
    return tl.minimum(tn, 1.0)


# ----------------------------------------------------------------- L1
@triton.jit
def _l1_caps(v, a, b):
    """|v| and the cap u on |d| the box allows in v's direction (0 where v = 0)."""
    u = tl.where(v > 0, b, -a)
    u = tl.where(v != 0, tl.maximum(u, 0.0), 0.0)
    return tl.abs(v), u


@triton.jit
def _l1_sums(av, u, tau):
    """g(tau) = sum clip(|v| - tau, 0, u), and the slope counts on its right
    (|v| - u <= tau < |v|) and left (|v| - u < tau <= |v|)."""
    gsum = tl.sum(tl.minimum(tl.maximum(av - tau, 0.0), u), axis=0)
    lowb = av - u  # -inf without a box
    nr = tl.sum(((lowb <= tau) & (tau < av)).to(tl.float32), axis=0)
    nl = tl.sum(((lowb < tau) & (tau <= av)).to(tl.float32), axis=0)
    return gsum, nr, nl


@triton.jit
def _l1_update(tau, gsum, nr, nl, eps, lo_t, hi_t):
    """One safeguarded Newton step on g(tau) = eps inside the bracket [lo_t, hi_t].

    Returns (next tau, lo_t, hi_t, done, answer). g is piecewise linear and
    nonincreasing; Newton uses the slope on the side of the root and falls
    back to bisection when it leaves the bracket or the slope is 0. ``answer``
    is the tau to use if the loop stops now: tau itself when g(tau) <= eps,
    the Newton target when converged from above, else the bracket's feasible end.
    """
    over = gsum > eps
    lo_t = tl.where(over, tau, lo_t)
    hi_t = tl.where(over, hi_t, tau)
    newton = tl.where(over, tau + (gsum - eps) / tl.maximum(nr, 1.0), tau - (eps - gsum) / tl.maximum(nl, 1.0))
    slope_ok = tl.where(over, nr > 0, nl > 0)
    ok = slope_ok & (newton > lo_t) & (newton < hi_t)
    nxt = tl.where(ok, newton, 0.5 * (lo_t + hi_t))
    # Converged: g hit eps, the Newton step is within 2 float32 ulps of tau
    # (seen: a step of 0.5 ulp rounds back onto tau and would otherwise fall
    # back to bisection for ~20 more passes), or the bracket collapsed.
    tol = 2.4e-7 * tau
    done = (gsum == eps) | (slope_ok & (tl.abs(newton - tau) <= tol)) | (hi_t - lo_t <= tol)
    target = tl.minimum(tl.maximum(newton, tau), hi_t)
    answer = tl.where(over, tl.where(done, target, hi_t), tau)
    return nxt, lo_t, hi_t, done, answer
