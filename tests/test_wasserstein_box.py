"""wasserstein_project(..., upper=u): the projection onto the Wasserstein ball intersected with the box [0, u].

The design (fastadv/reference/ot.py, docs/sinkhorn.md section 3): only the
column update changes; a pixel whose unconstrained Lambert-W root passes
u / mass takes that value, with beta_j = log u - log s_j. Checked here:

* the result lies in the box exactly, keeps x0's mass to the marginal
  residual, and its plan (rebuilt independently by Sinkhorn on the dense
  local cost at reg 1/psi) costs eps; the exact transport cost (ot.emd2) is
  <= eps;
* on small problems it equals the solution of the same entropic problem by a
  generic solver: L-BFGS-B (scipy) on the Lagrangian dual, written from the
  problem statement (no Lambert W, no closed-form column update: the box
  enters only through z_j = clip(w_j - beta_j / lam, 0, u));
* upper=None returns what the code without the box returns: the box path
  never binding (upper = 1e30) gives bitwise the same result;
* the C++ op equals the float64 reference (p = 2: the separable window sums;
  p = 1.5: the k^2 form);
* WassersteinPGD(box='project') is the plain loop x <- P_{ball & box}(x + alpha sign(grad)),
  with nothing clamped.
The Triton twin is checked in tests/test_wasserstein_triton.py.
"""
import math

import numpy as np
import pytest
import torch

import fastadv
import fastadv.ot as O
from fastadv import ops
from fastadv.reference import ot as R

HAS_CPP = fastadv.backends()["cpp"]["available"]
BACKENDS = ["ref", pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ extension"))]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="no C++ extension")


def _images(bsz, ch, h, w, seed=0, spread=0.6, sat=0.95, dtype=torch.float64):
    """Sparse images with bright pixels (x0 = sat, MNIST strokes have sat = 1) and a point that pushes mass above 1.

    sat = 0.95, not 1: a capped pixel whose x0 is exactly the upper bound converges slowly
    (test_saturated_capped_pixels_converge_slowly_and_say_so), and the exact comparisons need converged solutions.
    """
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(bsz, ch, h, w, generator=g, dtype=torch.float64)
    x0[x0 < 0.3] = 0
    x0[x0 > 0.8] = sat
    x = (x0 + spread * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(0, 1.5)
    return x.to(dtype), x0.to(dtype)


def _capped(z, upper=1.0):
    """Pixels at the upper bound (u * mass rounds to within an ulp or two of upper, and the min keeps it <= upper)."""
    return (z >= upper * (1 - 1e-6)).flatten(1).sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,k", [((3, 1, 6, 6), 3), ((2, 2, 5, 5), 3)])
def test_in_box_mass_conserved_and_plan_costs_eps(backend, shape, k):
    x, x0 = _images(*shape, seed=1)
    eps, tol = 0.2, 1e-8  # measured: 170-450 iterations, 3-7 capped pixels per sample
    with fastadv.use_backend(backend):
        r = O._project_impl(x, x0, eps, kernel_size=k, reg=200.0, max_iter=5000, tol=tol, upper=1.0)
        free = O._project_impl(x, x0, eps, kernel_size=k, reg=200.0, max_iter=5000, tol=tol)
    assert (r.residual <= tol).all()
    assert (free.z > 1).any() and (_capped(r.z) > 0).all()  # the box is active in every sample
    assert r.z.max() <= 1.0 and r.z.min() >= 0  # in the box exactly
    mass0, mass = x0.sum((1, 2, 3)), r.z.sum((1, 2, 3))
    # the returned z is one update past a marginal residual <= tol (relative to the unit mass)
    torch.testing.assert_close(mass, mass0, rtol=2 * tol, atol=0)
    cost = R.local_cost_matrix(shape[1:], k, 2.0)
    big = R.local_cost_matrix(shape[1:], k, 2.0, big=1e6)
    a = (x0 / mass0[:, None, None, None]).reshape(shape[0], -1)
    b = (r.z / mass0[:, None, None, None]).reshape(shape[0], -1)
    # channel masses of b set to a's exactly (they agree to the residual; crossing channels costs 1e6 in emd2)
    ca = a.reshape(shape[0], shape[1], -1).sum(2, keepdim=True)
    cb = b.reshape(shape[0], shape[1], -1).sum(2, keepdim=True)
    b = (b.reshape(shape[0], shape[1], -1) * ca / cb).reshape(shape[0], -1)
    ot = pytest.importorskip("ot")
    for i in range(shape[0]):
        assert r.psi[i] > 0  # the ball constraint is active too
        _, plan = ops.sinkhorn(a[i : i + 1], b[i : i + 1], cost, 1.0 / r.psi[i].item(), max_iter=20000, tol=1e-11,
                               return_plan=True)
        lin = (plan[0] * torch.where(torch.isinf(cost), 0, cost)).sum().item()
        # psi is returned one Newton step after the plan it was measured on: 1e-3 as in test_wasserstein.py
        assert abs(lin - eps) <= 1e-3 * eps, (i, lin)
        assert ot.emd2(a[i], b[i], big) <= eps * (1 + 1e-5)


def test_saturated_capped_pixels_converge_slowly_and_say_so():
    """x0 = upper on a capped pixel: known slow regime, reported through iterations and residual.

    A capped column is a hard marginal (its potential no longer feels the quadratic term), and where
    x0 is at the bound too, row and column of that pixel can only trade mass through the window's
    off-diagonal plan entries (~exp(-psi C), psi ~ 14 here): the alternating updates then creep
    (measured: residual 4e-6 after 300 iterations, 3e-6 after 10000, against 190-230 iterations to
    1e-8 without the box). The iterate is still in the box, with its mass off by its residual.
    """
    x, x0 = _images(3, 1, 6, 6, seed=1, sat=1.0)
    kw = dict(kernel_size=3, reg=200.0, max_iter=300, tol=1e-8)
    box = R.wasserstein_project(x, x0, 0.05, upper=1.0, return_info=True, **kw)
    free = R.wasserstein_project(x, x0, 0.05, return_info=True, **kw)
    assert (free.iterations < 300).all() and (free.residual <= 1e-8).all()
    assert (box.iterations == 300).all() and (box.residual > 1e-8).all()  # the cap is reported, not hidden
    assert box.z.max() <= 1.0 and box.z.min() >= 0
    rel = (box.z.sum((1, 2, 3)) / x0.sum((1, 2, 3)) - 1).abs()
    assert (rel <= box.residual).all()


# ------------------------------------------------------------ generic solver
def _dual_lbfgs(x, x0, eps, k, lam, upper, p=2.0):
    """The same problem by L-BFGS-B on its Lagrangian dual (float64), for one C x H x W image.

    D(alpha, beta, psi) = (<alpha, a> - sum_ij Pi_ij - psi eps) / lam + sum_j min_{0 <= z <= u} [1/2 (w_j - z)^2 + beta_j z / lam],
    Pi_ij = exp(alpha_i + beta_j - psi C_ij - 1) on the window pairs; maximized over alpha, beta and psi >= 0;
    the primal point is z_j = clip(w_j - beta_j / lam, 0, u).
    """
    from scipy.optimize import minimize

    mass = x0.sum().item()
    a = (x0 / mass).reshape(-1).numpy()
    w = (x / mass).reshape(-1).numpy()
    cmat = R.local_cost_matrix(tuple(x.shape), k, p).numpy()
    ok = np.isfinite(cmat)
    cf = np.where(ok, cmat, 0.0)
    n = a.size
    u = np.inf if upper is None else upper / mass

    def neg_dual(v):
        al, be, psi = v[:n], v[n : 2 * n], v[2 * n]
        plan = np.where(ok, np.exp(np.minimum(al[:, None] + be[None, :] - psi * cf - 1, 700)), 0.0)
        z = np.clip(w - be / lam, 0, u)
        d = (al @ a - plan.sum() - psi * eps) / lam + np.sum(0.5 * (w - z) ** 2 + be * z / lam)
        grad = np.concatenate([(a - plan.sum(1)) / lam, (z - plan.sum(0)) / lam, [((cf * plan).sum() - eps) / lam]])
        return -d, -grad

    v0 = np.concatenate([np.where(a > 0, np.log(np.maximum(a, 1e-300)), -50.0), np.zeros(n), [1.0]])
    res = minimize(neg_dual, v0, jac=True, method="L-BFGS-B", bounds=[(None, None)] * (2 * n) + [(0, None)],
                   options=dict(maxiter=20000, maxfun=40000, ftol=1e-20, gtol=1e-12, maxcor=50))
    assert np.abs(res.jac).max() < 1e-9, res  # a stationary point of the concave dual: its maximum
    return torch.from_numpy(np.clip(w - res.x[n : 2 * n] / lam, 0, u) * mass).reshape(x.shape)


@pytest.mark.parametrize("shape,k,lam,eps,p,seed", [
    ((1, 4, 4), 3, 50.0, 0.2, 2.0, 0),
    ((1, 4, 4), 3, 50.0, 0.2, 2.0, 4),
    ((2, 3, 4), 3, 30.0, 0.1, 1.0, 0),
])
def test_equals_a_generic_convex_solver(shape, k, lam, eps, p, seed):
    pytest.importorskip("scipy")
    x, x0 = _images(1, *shape, seed=seed)
    kw = dict(kernel_size=k, p=p, reg=lam, max_iter=100000, tol=1e-12)
    ours = R.wasserstein_project(x, x0, eps, upper=1.0, return_info=True, **kw)
    free = R.wasserstein_project(x, x0, eps, return_info=True, **kw)
    assert (ours.residual <= 1e-12).all()
    generic = _dual_lbfgs(x[0], x0[0], eps, k, lam, 1.0, p)
    # Both stop at marginal errors ~1e-11 (ours: tol; L-BFGS-B: gtol x lam), so z agrees to
    # ~mass x 1e-11 / curvature: measured <= 1.4e-8 on these problems; 1e-6 leaves margin and is
    # still 1e4 below the box's effect (asserted next)
    torch.testing.assert_close(ours.z[0], generic, rtol=0, atol=1e-6)
    torch.testing.assert_close(free.z[0], _dual_lbfgs(x[0], x0[0], eps, k, lam, None, p), rtol=0, atol=1e-6)
    assert (free.z > 1).any()  # without the box some pixel passes 1 ...
    assert (ours.z - free.z.clamp(0, 1)).abs().max() > 1e-3  # ... and the box projection is not the clamp


# -------------------------------------------------------- upper=None unchanged
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_box_never_binding_is_bitwise_the_ball_projection(backend, dtype):
    x, x0 = _images(3, 2, 5, 6, seed=3, dtype=dtype)
    eps = torch.tensor([0.05, 0.3, 0.0], dtype=dtype)
    kw = dict(kernel_size=3, reg=300.0, max_iter=300, tol=1e-6)
    with fastadv.use_backend(backend):
        plain = O._project_impl(x, x0, eps, **kw)
        huge = O._project_impl(x, x0, eps, upper=1e30, **kw)
    for name in ("z", "iterations", "residual", "psi"):
        assert torch.equal(getattr(plain, name), getattr(huge, name)), name


# ------------------------------------------------------------ C++ vs reference
@needs_cpp
@pytest.mark.parametrize("shape,k,p,lam", [((3, 1, 6, 6), 3, 2.0, 500.0), ((2, 1, 5, 7), 5, 2.0, 300.0),
                                           ((2, 1, 6, 6), 3, 1.5, 500.0)])
def test_cpp_matches_float64_reference(shape, k, p, lam):
    x, x0 = _images(*shape, seed=4)
    eps = torch.linspace(0.05, 0.3, shape[0], dtype=torch.float64)
    kw = dict(kernel_size=k, p=p, reg=lam, max_iter=3000, tol=1e-8, upper=1.0)
    ref = R.wasserstein_project(x, x0, eps, return_info=True, **kw)
    with fastadv.use_backend("cpp"):
        out = O._project_impl(x, x0, eps, **kw)
        out32 = O._project_impl(x.float(), x0.float(), eps.float(), **dict(kw, tol=1e-5))
    assert (ref.residual <= 1e-8).all() and (_capped(ref.z) > 0).any()
    assert out.iterations.tolist() == ref.iterations.tolist()
    # float64 against float64, same update order: measured <= 1e-15 relative
    torch.testing.assert_close(out.z, ref.z, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.psi, ref.psi, rtol=1e-10, atol=0)
    assert torch.equal(_capped(out.z), _capped(ref.z))
    # float32 (stopped at tol 1e-5): log-domain values ~ lam w ~ 1e2 carry 1e-5 absolute rounding, as in
    # test_wasserstein.py (2e-3 of max|z|); the box itself is exact in float32 too
    assert out32.z.max() <= 1.0 and out32.z.min() >= 0
    torch.testing.assert_close(out32.z.double(), ref.z, rtol=0, atol=2e-3)


@needs_cpp
def test_cpp_opcheck_with_upper():
    x, x0 = _images(2, 1, 4, 4, seed=6, dtype=torch.float32)
    args = (x, x0, torch.tensor([0.1, 0.0]), 3, 2.0, 50.0, 5, 1e-3, 1.0)
    torch.library.opcheck(torch.ops.fastadv.wasserstein_project, args)
    fn = torch.compile(lambda a, b: torch.ops.fastadv.wasserstein_project(a, b, args[2], 3, 2.0, 50.0, 5, 1e-3, 1.0)[0],
                       fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(x, x0), torch.ops.fastadv.wasserstein_project(*args)[0])


# ------------------------------------------------------------------ validation
def test_validation_names_upper():
    x, x0 = _images(2, 1, 5, 5, dtype=torch.float32)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="^upper must be a finite number > 0"):
            ops.wasserstein_project(x, x0, 0.1, upper=bad)
    with pytest.raises(ValueError, match=r"^x0 must lie in the box \[0, upper\] = \[0, 0.5\]"):
        ops.wasserstein_project(x, x0, 0.1, upper=0.5)


# ---------------------------------------------------------------------- attack
class _Lin(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(d, 10, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_attack_box_project_is_the_plain_loop_and_stays_in_the_box():
    from fastadv.attacks.wasserstein import WassersteinPGD

    _, x0 = _images(4, 1, 7, 7, seed=7)
    model = _Lin(49)
    with torch.no_grad():
        y = model(x0).argmin(1)  # targeted at the least likely class: nobody is fooled in 3 steps
    kw = dict(eps=0.1, alpha=0.5, steps=3, kernel_size=5, reg=300.0, eps_growth=(0.1, 1.0, 1), sinkhorn_max_iter=300,
              sinkhorn_tol=1e-6, targeted=True, accept_tol=math.inf, certify_max_iter=0)
    iterates = []
    atk = WassersteinPGD(model, box="project", callback=lambda t, xs, used, active: iterates.append(xs.clone()), **kw)
    x_adv = atk(x0, y)
    clamp = WassersteinPGD(model, box="clamp", **kw)
    x_clamp = clamp(x0, y)
    assert not atk.last_fooled.any()
    xa = x0.clone()
    for _ in range(3):
        xr = xa.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(xr), y)
        g, = torch.autograd.grad(-loss, xr)  # targeted: descend the loss of y
        with torch.no_grad():
            step = (xa + 0.5 * g.sign()).clamp(-0.5, 1.5)
            xa = ops.wasserstein_project(step, x0, 0.1, kernel_size=5, reg=300.0, max_iter=300, tol=1e-6, upper=1.0)
    torch.testing.assert_close(iterates[-1], xa, rtol=0, atol=1e-12)  # the iterates are the plain loop's
    # the returned points are their certified points (fastadv.ot_certificate): in the box, the clean mass
    # exactly, a plan within the radius; the clamp cuts mass instead
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (atk.last_clamped_mass == 0).all() and (clamp.last_clamped_mass > 0).any()  # the clamp would cut here
    assert (atk.last_cost_bound <= atk.last_radius_used * (1 + 1e-12)).all() and (atk.last_radius_used == 0.1).all()
    torch.testing.assert_close(x_adv.sum((1, 2, 3)), x0.sum((1, 2, 3)), rtol=1e-12, atol=0)
    assert ((x_clamp.sum((1, 2, 3)) / x0.sum((1, 2, 3)) - 1).abs() > 1e-4).all()
    assert (x_adv - xa).abs().max() <= 1e-3  # certified about where the projection left it


def test_attack_box_argument_is_checked():
    from fastadv.attacks.wasserstein import WassersteinPGD

    model = _Lin(49)
    with pytest.raises(ValueError, match="^box must be 'clamp' or 'project'"):
        WassersteinPGD(model, box="none")
    with pytest.raises(ValueError, match=r"^box='project' needs clip\[0\] <= 0"):
        WassersteinPGD(model, box="project", clip=(0.1, 1.0))


def test_attack_with_several_lams_is_a_cascade_of_single_lam_attacks_on_the_samples_left():
    """reg=(a, b): the attack at lam a on the batch, then at lam b from the clean images of the samples it
    left unfooled; each sample's point and last_* entries from the pass that returned it (AutoAttack's
    cascade over the projection's lam, so never weaker than its first pass)."""
    from fastadv.attacks.wasserstein import WassersteinPGD

    _, x0 = _images(16, 1, 7, 7, seed=3)
    model = _Lin(49)
    with torch.no_grad():
        y = model(x0).argmax(1)  # every clean image classified "correctly"
    # measured: lam 30 fools 5 of the 16, lam 300 fools 8 (3 of them among the 11 left)
    kw = dict(eps=0.03, alpha=0.5, steps=4, kernel_size=5, eps_growth=(0.03, 1.0, 1), sinkhorn_max_iter=300,
              sinkhorn_tol=1e-6)
    both = WassersteinPGD(model, reg=(30.0, 300.0), **kw)
    x_both = both(x0, y)
    first = WassersteinPGD(model, reg=30.0, **kw)
    x_first = first(x0, y)
    left = (~first.last_fooled).nonzero().squeeze(1)
    assert 0 < left.numel() < 16, "the case needs samples fooled and left by the first pass"
    second = WassersteinPGD(model, reg=300.0, **kw)
    x_second = second(x0[left], y[left])
    assert second.last_fooled.any(), "the case needs the second pass to fool a sample the first left"
    expect = x_first.clone()
    expect[left] = x_second
    torch.testing.assert_close(x_both, expect, rtol=0, atol=0)
    for name in ("last_radius", "last_radius_used", "last_cost_bound", "last_clamped_mass"):
        want = getattr(first, name).clone()
        want[left] = getattr(second, name)
        torch.testing.assert_close(getattr(both, name), want, rtol=0, atol=0, msg=name)
    fooled = first.last_fooled.clone()
    fooled[left] = second.last_fooled
    assert torch.equal(both.last_fooled, fooled) and fooled.sum() > first.last_fooled.sum()
    lam = torch.full((16,), 30.0, dtype=both.last_reg.dtype)
    lam[left] = 300.0
    assert torch.equal(both.last_reg, lam)
    assert both.last_certificates == first.last_certificates + second.last_certificates
    with pytest.raises(ValueError, match="^reg must be a finite number > 0 or a non-empty sequence"):
        WassersteinPGD(model, reg=())
    with pytest.raises(ValueError, match="^reg must be"):
        WassersteinPGD(model, reg=(3000.0, math.inf))
