"""Batched entropic optimal transport: ``sinkhorn`` and ``wasserstein_project``.

Public functions (also exported from ``fastadv.ops``). Math, definitions and
the papers are in ``fastadv/reference/ot.py``; docs/sinkhorn.md has examples
and measured numbers. Backends: compiled C++ (OpenMP over the batch) on CPU,
Triton on CUDA (and under TRITON_INTERPRET=1 when forced), and the
pure-PyTorch reference anywhere.

Computation dtype: float64 inputs are computed in float64, everything else in
float32 (log-domain values reach lam * w ~ 1e3, which float16/bfloat16 cannot
resolve); results come back in the input dtype.
"""
from __future__ import annotations

import math

import torch

from fastadv import _dispatch, _fake  # noqa: F401  (_fake registers fake kernels)
from fastadv import _validate as V
from fastadv.reference import ot as ref

__all__ = ["sinkhorn", "wasserstein_project"]


# ---------------------------------------------------------------- backends
def _ref_sinkhorn(a, b, cost, reg, max_iter, tol):
    r = ref.sinkhorn(a, b, cost[0] if cost.shape[0] == 1 and a.shape[0] != 1 else cost, reg, max_iter=max_iter, tol=tol)
    return r.f, r.g, r.iterations, r.residual


# The projection's backends take (x, x0, eps, kernel_size, p, reg, max_iter, tol[, upper]):
# upper (float, +inf = no box) is passed only when the box is asked for, so a backend
# registered before the box existed still serves every call without one.
def _ref_project(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper=math.inf):
    r = ref.wasserstein_project(
        x, x0, eps, kernel_size=kernel_size, p=p, reg=reg, max_iter=max_iter, tol=tol,
        upper=None if math.isinf(upper) else upper, return_info=True,
    )
    return r.z, r.iterations, r.residual, r.psi


def _cpp_project(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper=math.inf):
    return torch.ops.fastadv.wasserstein_project(x, x0, eps, kernel_size, p, reg, max_iter, tol, upper)


def _compiled(name):
    def run(*args):
        return getattr(torch.ops.fastadv, name)(*args)

    return run


_dispatch.register("sinkhorn", "ref", _ref_sinkhorn)
_dispatch.register("sinkhorn", "cpp", _compiled("sinkhorn"))
_dispatch.register("wasserstein_project", "ref", _ref_project)
_dispatch.register("wasserstein_project", "cpp", _cpp_project)


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _positive(name, value, *, allow_zero=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or math.isinf(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")
    return v


def _histogram(name, t, dtype):
    if not V.value_checks_enabled() or t.numel() == 0:
        return
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN")
    if (t < 0).any():
        raise ValueError(f"{name} must be a nonnegative histogram (mass >= 0), got a minimum of {t.min().item():g}")
    # sums of float32 histograms of a few thousand bins are exact to ~1e-6
    tol = {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)
    s = t.double().sum(1)
    bad = (s - 1).abs() > tol
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must sum to 1 over dim 1 (a probability histogram), but sample {i} sums to {s[i].item():.9g}")


# ----------------------------------------------------------------- Sinkhorn
class _SinkhornFn(torch.autograd.Function):
    """OT_reg with envelope-theorem gradients: dOT/da = f, dOT/db = g, dOT/dC = P."""

    @staticmethod
    def forward(ctx, a, b, cost3, reg, max_iter, tol, cost_batched):
        backend = _dispatch.choose("sinkhorn", [a, b, cost3])
        f, g, it, res = _dispatch.impl("sinkhorn", backend)(a, b, cost3, reg, max_iter, tol)
        value = (f * a).sum(1) + (g * b).sum(1)
        ctx.save_for_backward(a, b, cost3, f, g)
        ctx.reg, ctx.cost_batched = reg, cost_batched
        ctx.mark_non_differentiable(f, g, it, res)
        return value, f, g, it, res

    @staticmethod
    def backward(ctx, grad_value, *_):
        a, b, cost3, f, g = ctx.saved_tensors
        ga = gb = gc = None
        gv = grad_value
        if ctx.needs_input_grad[0]:
            ga = gv[:, None] * f
        if ctx.needs_input_grad[1]:
            gb = gv[:, None] * g
        if ctx.needs_input_grad[2]:
            plan = ref.sinkhorn_plan(a, b, cost3 if ctx.cost_batched else cost3[0], ctx.reg, f, g)
            gc = gv[:, None, None] * plan
            if not ctx.cost_batched:
                gc = gc.sum(0, keepdim=True)
        return ga, gb, gc, None, None, None, None


def sinkhorn(
    a,
    b,
    cost,
    reg,
    *,
    max_iter=1000,
    tol=1e-6,
    return_plan=False,
    return_potentials=False,
    return_iterations=False,
):
    """Batched entropic optimal transport (Cuturi 2013), log-domain, per-sample stopping.

    OT_reg(a, b) = min_{P >= 0, P 1 = a, P^T 1 = b} <P, C> + reg * KL(P || a b^T)

    solved in the dual with log-domain (stabilized) Sinkhorn updates, one
    problem per batch item. A sample stops when ||P 1 - a||_1 <= tol (column
    marginals are exact after each update); one that has not met it after
    ``max_iter`` returns its last iterate, and ``return_iterations`` says which.

    Differentiable with respect to a, b and cost by the envelope theorem (the
    iterations are not unrolled): dOT/da = f, dOT/db = g, dOT/dC = P, so it can
    serve as a training loss. The gradients wrt a and b are defined up to a
    constant per sample (a and b live on the simplex).

    Args:
        a: (B, n) histograms, >= 0, each summing to 1. b: (B, m), same.
        cost: (B, n, m) or (n, m) (shared), no NaN; +inf forbids a transport.
        reg: entropic regularization > 0, in units of the cost.
        max_iter: most (f, g) updates per sample. tol: stopping threshold >= 0.
        return_plan: also return P (B, n, m), detached.
        return_potentials: also return (f, g), (B, n) and (B, m), detached.
        return_iterations: also return (iterations, residual): (B,) int32 and
            the final ||P 1 - a||_1 per sample.
    Returns:
        cost (B,) = OT_reg, in a's dtype; with any return_* flag a tuple
        (cost, [plan], [(f, g)], [(iterations, residual)]) in that order.

    Example:
        >>> a = torch.softmax(torch.randn(4, 50), 1); b = torch.softmax(torch.randn(4, 60), 1)
        >>> C = torch.cdist(torch.randn(50, 2), torch.randn(60, 2)) ** 2
        >>> fastadv.ops.sinkhorn(a, b, C, 0.05).shape
        torch.Size([4])
    """
    V.tensor("a", a, min_ndim=2)
    V.tensor("b", b, min_ndim=2)
    V.tensor("cost", cost, min_ndim=2)
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D (B, n), got shape {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"b must be 2-D (B, m), got shape {tuple(b.shape)}")
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"b has batch size {b.shape[0]} but a has {a.shape[0]}")
    bsz, n, m = a.shape[0], a.shape[1], b.shape[1]
    if cost.dim() == 2:
        if tuple(cost.shape) != (n, m):
            raise ValueError(f"cost must have shape (n, m) = ({n}, {m}) or (B, n, m), got {tuple(cost.shape)}")
        cost_batched = False
    elif cost.dim() == 3:
        if tuple(cost.shape) != (bsz, n, m):
            raise ValueError(f"cost must have shape (B, n, m) = ({bsz}, {n}, {m}) or (n, m), got {tuple(cost.shape)}")
        cost_batched = True
    else:
        raise ValueError(f"cost must be (n, m) or (B, n, m), got shape {tuple(cost.shape)}")
    for name, t in (("b", b), ("cost", cost)):
        if t.device != a.device:
            raise ValueError(f"{name} is on {t.device} but a is on {a.device}")
        if t.dtype != a.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but a has dtype {a.dtype}")
    if n == 0 or m == 0:
        raise ValueError(f"a and b need at least one bin, got n={n}, m={m}")
    reg = _positive("reg", reg)
    max_iter = _count("max_iter", max_iter, 1)
    tol = _positive("tol", tol, allow_zero=True)
    _histogram("a", a, a.dtype)
    _histogram("b", b, a.dtype)
    if V.value_checks_enabled():
        if torch.isnan(cost).any():
            raise ValueError("cost contains NaN")
        if (cost == -math.inf).any():
            raise ValueError("cost contains -inf")
    cd = _compute_dtype(a.dtype)
    ac, bc = a.to(cd).contiguous(), b.to(cd).contiguous()
    cost3 = (cost if cost_batched else cost.unsqueeze(0)).to(cd).contiguous()
    value, f, g, it, res = _SinkhornFn.apply(ac, bc, cost3, reg, max_iter, tol, cost_batched)
    value = value.to(a.dtype)
    if not (return_plan or return_potentials or return_iterations):
        return value
    out = [value]
    if return_plan:
        with torch.no_grad():
            out.append(ref.sinkhorn_plan(ac, bc, cost3 if cost_batched else cost3[0], reg, f, g).to(a.dtype))
    if return_potentials:
        out.append((f.to(a.dtype), g.to(a.dtype)))
    if return_iterations:
        out.append((it, res))
    return tuple(out)


# ---------------------------------------------------- Wasserstein projection
def _project_impl(x, x0, eps, *, kernel_size=5, p=2, reg=1000.0, max_iter=50, tol=1e-4, upper=None):
    """Validated call of the projection op; returns ``ref.ProjectionResult`` (z, iterations, residual, psi)."""
    V.tensor("x", x)
    V.same("x0", x0, "x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (B, C, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    kernel_size = _count("kernel_size", kernel_size, 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the window is centered on the pixel), got {kernel_size}")
    p = _positive("p", p)
    reg = _positive("reg", reg)
    max_iter = _count("max_iter", max_iter, 1)
    tol = _positive("tol", tol, allow_zero=True)
    if upper is not None:
        upper = _positive("upper", upper)
    bsz = x.shape[0]
    eps_t = V.per_sample("eps", eps, bsz, x.device)  # validated; float32
    if x.dtype == torch.float64:  # float64 computes with eps unrounded (float32 moved psi by 1e-9 relative)
        if isinstance(eps, torch.Tensor):
            eps64 = eps.to(device=x.device, dtype=torch.float64)
        else:
            eps64 = torch.tensor(float(eps), dtype=torch.float64, device=x.device)
        eps_t = eps64.reshape(-1).expand(bsz).contiguous()
    V.no_nan("x", x)
    V.no_nan("x0", x0)
    if V.value_checks_enabled() and x0.numel():
        if (x0 < 0).any():
            raise ValueError(f"x0 must be nonnegative (pixel mass), got a minimum of {x0.min().item():g}")
        if (x0.reshape(bsz, -1).sum(1) <= 0).any():
            raise ValueError("x0 must have positive total mass in every sample (an all-zero image has no distribution)")
        if upper is not None and (x0 > upper).any():
            raise ValueError(
                f"x0 must lie in the box [0, upper] = [0, {upper:g}] (then x0 itself is a feasible point), "
                f"got a maximum of {x0.max().item():g}"
            )
    shape4 = x.shape if x.dim() == 4 else (bsz, 1, *x.shape[1:])
    cd = _compute_dtype(x.dtype)
    xc = x.reshape(shape4).to(cd).contiguous()
    x0c = x0.reshape(shape4).to(cd).contiguous()
    if x.numel() == 0:
        z = torch.empty_like(x)
        zeros = torch.zeros(bsz, dtype=torch.int32, device=x.device)
        return ref.ProjectionResult(z, zeros, torch.zeros(bsz, dtype=cd, device=x.device), torch.zeros(bsz, dtype=cd, device=x.device))
    with torch.no_grad():
        backend = _dispatch.choose("wasserstein_project", [xc, x0c])
        box = () if upper is None else (upper,)
        z, it, res, psi = _dispatch.impl("wasserstein_project", backend)(
            xc, x0c, eps_t.to(cd), kernel_size, p, reg, max_iter, tol, *box
        )
        out = torch.empty_like(x)  # keeps x's layout (channels_last stays channels_last)
        out.copy_(z.reshape(x.shape))
    return ref.ProjectionResult(out, it, res, psi)


def wasserstein_project(x, x0, eps, *, kernel_size=5, p=2, reg=1000.0, max_iter=50, tol=1e-4, upper=None,
                        return_iterations=False):
    """Projection onto a local Wasserstein ball (optionally intersected with a box) by projected Sinkhorn.

    Wong, Schmidt & Kolter 2019, "Wasserstein Adversarial Examples via
    Projected Sinkhorn Iterations" (ICML). For each sample, with x0 and x
    divided by the total mass of x0 (over C x H x W):

        z = argmin_z 1/2 ||x - z||^2 + (1/reg) sum Pi log Pi
            s.t. Pi 1 = x0, Pi^T 1 = z, <Pi, C> <= eps  [, 0 <= z <= upper / mass(x0)]

    where Pi moves mass only within a channel and inside a k x k window, at
    cost ||(di, dj)||_2^p. The result is z times the mass of x0, so it keeps
    x0's total mass and is nonnegative. With ``upper=None`` (the paper's
    projection) it may exceed 1; with ``upper=1.0`` it is the projection onto
    the ball intersected with the image box [0, 1]: every value <= upper
    exactly, and no clamp is needed afterwards (a clamp would cut mass and
    leave the ball). The box changes only the column update (a pixel whose
    unconstrained value would pass u = upper / mass takes u, its potential
    log u - log s_j); docs/sinkhorn.md has the derivation. Not in the paper
    nor in its code (which clamps after projecting). With the box the
    iterations converge more slowly where a capped pixel is also at the bound
    in x0 (x0 = upper: MNIST strokes): check the iteration counts.
    The dual is solved with the paper's alternating potential updates (the
    second through Lambert W, evaluated in the log domain) and a safeguarded
    Newton step on the constraint multiplier; each sample stops on its own
    when the row-marginal error and the relative constraint error are both
    <= tol. A sample not converged after ``max_iter`` iterations returns its
    last iterate: its mass and distance are then off by about its residual
    (the C++ and reference backends return the same iterate).
    eps = 0 returns x0. Not differentiable (use it under torch.no_grad()).

    Args:
        x: (B, C, H, W) or (B, H, W) point to project, any real values, no NaN.
        x0: same shape: the clean image, >= 0, positive total mass per sample.
        eps: float or (B,) radius >= 0 (normalized mass x distance^p).
        kernel_size: odd window size (default 5). p: cost exponent (default 2).
        reg: lam, the entropy weight is 1/lam (default 1000, as in the paper).
        max_iter: iteration cap per sample (default 50). tol: default 1e-4.
        upper: None (default: the ball only) or a float > 0, the box's upper end
            (x0 must be <= upper: x0 is then a feasible point).
        return_iterations: also return the (B,) int32 iterations per sample.
    Returns:
        z with x's shape, dtype and layout; or (z, iterations).

    Example:
        >>> x0 = torch.rand(8, 1, 28, 28); x = (x0 + 0.1 * torch.randn_like(x0)).clamp(0, 1)
        >>> z = fastadv.ops.wasserstein_project(x, x0, 0.5)
    """
    r = _project_impl(x, x0, eps, kernel_size=kernel_size, p=p, reg=reg, max_iter=max_iter, tol=tol, upper=upper)
    return (r.z, r.iterations) if return_iterations else r.z
