"""Public fused ops: PGD steps for L-inf, L2 and L1, and exact Lp-ball projections.

Every op takes a batch: dimension 0 is the sample, every other dimension
belongs to the sample. ``eps`` and ``alpha`` are a float or a (B,) tensor (one
value per sample). ``clip=(lo, hi)`` is the box of valid images (default
[0, 1]); None means no box. ``out=`` writes the result in place so an attack
loop allocates nothing per step. dtypes: float32, float16, bfloat16 (computed
in float32 inside) and float64. Any layout (contiguous, channels_last,
strided) gives the same numbers; the result has x's layout.

Backends (see ``fastadv.backends()``): a fused Triton kernel on CUDA, compiled
C++ (OpenMP) on CPU, CUDA C++ where it pays, and the pure-PyTorch reference
in ``fastadv.reference`` that every kernel is tested against.
"""
from __future__ import annotations

import math

import torch

from fastadv import _dispatch, _ext
from fastadv import _fake  # noqa: F401  (registers the fake kernels)
from fastadv import _validate as V
from fastadv._layout import memory_order, output_like, rows
from fastadv.reference import lp as ref

__all__ = ["linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1"]


# ---------------------------------------------------------------- backends
def _ref_step(fn):
    def run(x, x0, g, alpha, eps, lo, hi, out):
        out.copy_(fn(x, x0, g, alpha, eps, (lo, hi)))

    return run


def _ref_l1_step(x, x0, g, alpha, eps, sparsity, lo, hi, out):
    out.copy_(ref.l1_step(x, x0, g, alpha, eps, sparsity, (lo, hi)))


def _ref_project(fn):
    def run(delta, eps, x0, lo, hi, out):
        clip = None if x0 is None else (lo, hi)
        out.copy_(fn(delta, eps, x0=x0, clip=clip))

    return run


def _compiled(name):
    def run(*args):
        getattr(torch.ops.fastadv, name)(*args)

    return run


for _name, _ref_impl in (
    ("linf_step", _ref_step(ref.linf_step)),
    ("l2_step", _ref_step(ref.l2_step)),
    ("l1_step", _ref_l1_step),
    ("project_linf", _ref_project(ref.project_linf)),
    ("project_l2", _ref_project(ref.project_l2)),
    ("project_l1", _ref_project(ref.project_l1)),
):
    _dispatch.register(_name, "ref", _ref_impl)
    _dispatch.register(_name, "cpp", _compiled(_name))
    _dispatch.register(_name, "cuda", _compiled(_name))
# On CUDA every op prefers Triton, then the CUDA C++ kernel, then the reference, and a compiled backend is
# chosen only once it has passed the GPU validation (_dispatch.gpu_verified). The L1 ops once preferred the
# CUDA C++ kernel on the grounds that the projection is bisection-heavy, a claim no GPU run ever measured.


def _step_inputs(x, x0, grad, alpha, eps, clip):
    """Metadata checks and the per-sample (B,) alpha and eps. The value check of x0 (no NaN, inside
    the box) is the launch's (``_launch(..., x0_box=)``), so it can ride in the kernel's own pass."""
    V.tensor("x", x)
    V.same("x0", x0, "x", x)
    V.same("grad", grad, "x", x)
    lo, hi = V.clip(clip)
    b = x.shape[0]
    alpha_t = V.per_sample("alpha", alpha, b, x.device)
    eps_t = V.per_sample("eps", eps, b, x.device)
    return alpha_t, eps_t, lo, hi


# Steps whose CPU kernel can count x0's entries outside the box in the pass that reads x0 anyway
# (fastadv::<op>_checked). At 256x3x32x32 float32 a separate aminmax pass over x0 is 0.065 ms, as much
# as half of the kernel (measured on the 2-core EPYC; docs/benchmarks.md has the committed numbers).
# Only the ops the loaded extension defines (a build older than the checked ops keeps the separate check).
_FOLDED_CHECK = {op: checked for op, checked in (("linf_step", "linf_step_checked"), ("l2_step", "l2_step_checked"))
                 if _ext.has_op(checked)}


def _launch(op: str, like: torch.Tensor, args: tuple, images: tuple[int, ...], out, x0_box=None):
    """Common tail of every op: layout, backend choice, value check, kernel call, write-back.

    ``args`` follows the op's schema (without ``out``); the positions in
    ``images`` hold tensors shaped like ``like``, which are passed to the
    backend as (B, N) rows in like's memory order. None entries pass through.
    ``x0_box = (x0, lo, hi)`` asks for the value check of x0 (no NaN, inside
    [lo, hi]) when value checks are on. On the C++ backend the steps fold it
    into the kernel's pass: the kernel writes ``out`` and counts, and the op
    raises after the write, so on that error ``out`` (and x, when ``out`` is
    x) holds the step from the invalid x0. Elsewhere it is a separate pass
    before the kernel.
    """
    check = x0_box is not None and V.value_checks_enabled()
    perm = memory_order(like)
    result, out_rows, writeback = output_like(like, out, perm)
    if like.numel() == 0:
        return result
    backend = _dispatch.choose(op, [like])
    folded = _FOLDED_CHECK.get(op) if (check and backend == "cpp") else None
    if check and folded is None:
        V.in_box("x0", *x0_box)
    call = [rows(a, perm) if (i in images and a is not None) else a for i, a in enumerate(args)]
    outside = 0
    if folded is None:
        _dispatch.impl(op, backend)(*call, out_rows)
    else:
        outside = int(getattr(torch.ops.fastadv, folded)(*call, out_rows))
    if writeback is not None:
        writeback()
    if outside:  # after the write-back, so out holds the step in every layout, as documented
        V.in_box("x0", *x0_box)  # raises, naming the span of values
        raise ValueError(f"x0 has {outside} entries that are NaN or outside the box clip={x0_box[1:]}")
    return result


def linf_step(x, x0, grad, alpha, eps, clip=(0.0, 1.0), out=None):
    """One PGD L-inf ascent step (Madry et al. 2018), fused.

    y = clip_[lo,hi]( x0 + clamp(x + alpha * sign(grad) - x0, -eps, eps) )

    Args:
        x: current iterate, (B, ...) float tensor, in the box.
        x0: clean input, same shape, dtype and device as x; in [lo, hi], no NaN.
        grad: loss gradient at x, same shape. NaN entries count as 0 (no move).
        alpha, eps: step size and radius: floats >= 0 or (B,) tensors.
        clip: (lo, hi) image range, default (0, 1); None for no box.
        out: optional output tensor (may alias x for an in-place update).
    Returns:
        y, shape and layout of x. In float32 it equals torchattacks' PGD step bit for bit.
    Raises:
        ValueError if x0 holds NaN or leaves the box (when value checks are on). On the C++ backend
        this check rides in the kernel's pass, so ``out`` has already been written when it raises.
    """
    alpha_t, eps_t, lo, hi = _step_inputs(x, x0, grad, alpha, eps, clip)
    return _launch("linf_step", x, (x, x0, grad, alpha_t, eps_t, lo, hi), (0, 1, 2), out, (x0, lo, hi))


def l2_step(x, x0, grad, alpha, eps, clip=(0.0, 1.0), out=None):
    """One PGD L2 ascent step with torchattacks' PGDL2 semantics, fused.

    u = grad / (||grad||_2 + 1e-10); delta = x + alpha * u - x0;
    delta *= min(1, eps / ||delta||_2); y = clip_[lo,hi](x0 + delta).
    Norms are per sample. A zero gradient moves nothing and yields no NaN.
    Arguments as in ``linf_step``. For the exact projection onto the L2 ball
    intersected with the box, use ``project_l2(..., x0=, clip=)``.
    """
    alpha_t, eps_t, lo, hi = _step_inputs(x, x0, grad, alpha, eps, clip)
    return _launch("l2_step", x, (x, x0, grad, alpha_t, eps_t, lo, hi), (0, 1, 2), out, (x0, lo, hi))


def l1_step(x, x0, grad, alpha, eps, sparsity=0.95, clip=(0.0, 1.0), out=None):
    """One sparse L1 ascent step of SLIDE (Tramer & Boneh 2019), with an exact projection.

    e_i = sign(grad_i) where |grad_i| >= q (q: per-sample order statistic of
    |grad| at rank round(sparsity * (N - 1)), N elements per sample), else 0;
    e /= ||e||_1; y = x + alpha * e; then y - x0 is projected EXACTLY onto
    {||d||_1 <= eps} intersected with {lo <= x0 + d <= hi} (as APGD-L1 of
    Croce & Hein 2021 requires: a clamp after an L1 projection wastes budget).

    Args:
        sparsity: fraction of coordinates left out of the step, in [0, 1); default 0.95.
        others: as in ``linf_step``.
    """
    alpha_t, eps_t, lo, hi = _step_inputs(x, x0, grad, alpha, eps, clip)
    s = V.sparsity(sparsity)
    return _launch("l1_step", x, (x, x0, grad, alpha_t, eps_t, s, lo, hi), (0, 1, 2), out, (x0, lo, hi))


def _project(op, delta, eps, x0, clip, out):
    V.tensor("delta", delta)
    if clip is not None and x0 is None:
        raise ValueError("clip requires x0: the box constrains x0 + delta")
    if x0 is not None:
        V.same("x0", x0, "delta", delta)
    lo, hi = V.clip(clip) if x0 is not None else (-math.inf, math.inf)
    eps_t = V.per_sample("eps", eps, delta.shape[0], delta.device)
    V.no_nan("delta", delta)
    if x0 is not None:
        V.in_box("x0", x0, lo, hi)
    return _launch(op, delta, (delta, eps_t, x0, lo, hi), (0, 2), out)


def project_linf(delta, eps, *, x0=None, clip=None, out=None):
    """Euclidean projection of delta onto {||d||_inf <= eps}, intersected with
    {lo <= x0 + d <= hi} when x0 and clip are given: a clamp to
    [max(-eps, lo - x0), min(eps, hi - x0)].

    Args:
        delta: (B, ...) perturbation. eps: float or (B,) radius >= 0.
        x0: optional clean input (same shape), inside the box. clip: (lo, hi), needs x0.
    """
    return _project("project_linf", delta, eps, x0, clip, out)


def project_l2(delta, eps, *, x0=None, clip=None, out=None):
    """Exact Euclidean projection of delta onto {||d||_2 <= eps}, intersected
    with {lo <= x0 + d <= hi} when x0 and clip are given.

    Without a box: d = delta * min(1, eps / ||delta||_2). With a box the answer
    is d = clamp(t * delta, lo - x0, hi - x0) with the t in [0, 1] that puts
    ||d||_2 on eps, found per sample by a root-find on the Lagrange
    multiplier (not project-then-clamp, which can leave the ball or waste budget).
    """
    return _project("project_l2", delta, eps, x0, clip, out)


def project_l1(delta, eps, *, x0=None, clip=None, out=None):
    """Exact Euclidean projection of delta onto {||d||_1 <= eps}, intersected
    with {lo <= x0 + d <= hi} when x0 and clip are given.

    d_i = clamp(sign(delta_i) * max(|delta_i| - tau, 0), lo - x0_i, hi - x0_i)
    with the tau >= 0 that puts ||d||_1 on eps (tau = 0 if already inside),
    found per sample without sorting (safeguarded Newton on a bisection
    bracket) in the kernels; the reference sorts (Duchi et al. 2008).
    """
    return _project("project_l1", delta, eps, x0, clip, out)

from fastadv.ot import sinkhorn, wasserstein_project  # noqa: E402,F401  (issue 3)

__all__ += ["sinkhorn", "wasserstein_project"]
