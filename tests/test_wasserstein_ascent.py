"""The Wasserstein steepest-ascent step (``fastadv.attacks.wasserstein_ascent``) against a port of the
reference's ``conjugate_sinkhorn`` loop, and its defining properties: the mass is kept, the step plan
costs the radius when the budget binds, and the step ascends along the gradient."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastadv.attacks.wasserstein_ascent import wasserstein_ascent_step, window_costs


def _mm(kernel, v):
    """The reference's mm(A, v): sum over the window offsets o of A_o v[i + o], zero outside the image."""
    b, c, h, w = v.shape
    k = kernel.shape[-1]
    return F.conv2d(v.reshape(b * c, 1, h, w), kernel[None, None], padding=k // 2).reshape(b, c, h, w)


def _ref_conjugate(x, g, eps, lam, kernel_size, p=2.0, iters=400):
    """Port of locuslab/projected_sinkhorn log_sinkhorn(objective='conjugate') for one image (mass 1):
    alternate the row potential alpha with one damped Newton step in psi (partial Hessian -<Pi, C^2>),
    psi clamped at 0, then z = exp(-beta) * mm(K, exp(-alpha)) (the earlier version's eval_z)."""
    k = kernel_size
    cmat = window_costs(k, p, dtype=torch.float64).reshape(k, k)
    exp_beta = torch.exp(lam * g)
    psi = torch.ones((), dtype=torch.float64)
    kmat = torch.exp(-psi * cmat - 1)
    for _ in range(iters):
        with torch.no_grad():
            alpha = torch.log(_mm(kmat, exp_beta)) - torch.log(x)
            exp_alpha = torch.exp(-alpha)
            dpsi = -eps + (exp_alpha * _mm(cmat * kmat, exp_beta)).sum()
            ddpsi = -(exp_alpha * _mm(cmat * cmat * kmat, exp_beta)).sum()
            delta = dpsi / ddpsi
            t = 1.0
            while psi - t * delta < 0 and t > 1e-2:
                t /= 2
            psi = torch.clamp(psi - t * delta, min=0)
            kmat = torch.exp(-psi * cmat - 1)
    alpha = torch.log(_mm(kmat, exp_beta)) - torch.log(x)
    return exp_beta * _mm(kmat, torch.exp(-alpha)), psi


def _images(b=3, c=1, h=9, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g, dtype=torch.float64) + 0.05  # every pixel holds mass
    grad = torch.randn(b, c, h, w, generator=g, dtype=torch.float64)
    return x, grad


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_equals_the_reference_conjugate_loop(kernel_size):
    x, grad = _images()
    lam, radius = 5.0, 0.3
    z, info = wasserstein_ascent_step(x, grad, radius, kernel_size=kernel_size, reg=lam, tol=1e-12, max_iter=200,
                                      return_info=True)
    for i in range(x.shape[0]):
        mass = x[i].sum()
        ref, psi = _ref_conjugate(x[i:i + 1] / mass, grad[i:i + 1], radius, lam, kernel_size)
        torch.testing.assert_close(z[i:i + 1], ref * mass, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(info["psi"][i], psi, rtol=1e-7, atol=1e-9)
        assert psi > 0  # the budget binds here: a test of the Newton path, not of psi = 0


def test_keeps_mass_spends_the_radius_and_ascends():
    x, grad = _images(b=4, c=3, h=10, w=11, seed=1)
    x[0, :, :4] = 0  # pixels without mass: they send nothing
    z, info = wasserstein_ascent_step(x, grad, 0.2, kernel_size=5, reg=20.0, tol=1e-10, return_info=True)
    assert (z >= 0).all()
    torch.testing.assert_close(z.flatten(1).sum(1), x.flatten(1).sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(info["cost"], torch.full((4,), 0.2, dtype=torch.float64), rtol=1e-9, atol=0)
    gain = (grad * (z - x)).flatten(1).sum(1)
    assert (gain > 0).all()
    # a larger step ascends further (the feasible set grows)
    z2 = wasserstein_ascent_step(x, grad, 0.6, kernel_size=5, reg=20.0, tol=1e-10)
    assert ((grad * (z2 - x)).flatten(1).sum(1) > gain).all()


def test_slack_budget_gives_psi_zero_and_the_window_softmax():
    x, grad = _images(b=2, seed=2)
    z, info = wasserstein_ascent_step(x, grad, 1e6, kernel_size=3, reg=3.0, return_info=True)
    assert (info["psi"] == 0).all() and (info["cost"] < 1e6).all()
    # psi = 0: pixel i's mass goes to its window by softmax(lam g) over the in-image neighbours
    b, c, h, w = x.shape
    e = torch.exp(3.0 * grad)
    denom = _mm(torch.ones(3, 3, dtype=torch.float64), e)
    expect = e * _mm(torch.ones(3, 3, dtype=torch.float64), x / denom)
    torch.testing.assert_close(z, expect, rtol=1e-10, atol=1e-12)


def test_zero_gradient_leaves_the_image_and_float32_works():
    x, grad = _images(b=2, seed=3)
    grad[1] = 0
    z = wasserstein_ascent_step(x, grad, 0.1, kernel_size=3, reg=10.0)
    torch.testing.assert_close(z[1], x[1], rtol=0, atol=0)
    z32 = wasserstein_ascent_step(x.float(), grad.float(), 0.1, kernel_size=3, reg=10.0)
    assert z32.dtype == torch.float32
    torch.testing.assert_close(z32[0].double(), z[0], rtol=1e-4, atol=1e-5)


def test_large_lam_times_gradient_does_not_overflow():
    # the reference's exp(lam g) overflows (it raises for lam g > ~88 in float32); the log-domain softmax does not
    x, grad = _images(b=2, seed=4)
    z, info = wasserstein_ascent_step(x.float(), (50 * grad).float(), 0.3, kernel_size=5, reg=1000.0,
                                      return_info=True)
    assert torch.isfinite(z).all()
    # float32 at lam g ~ 1e5: the cost is a step function of psi; the step spends at most its radius, and most
    # of it
    assert ((info["cost"] <= 0.3 * (1 + 1e-4)) & (info["cost"] > 0.2)).all(), info["cost"]


def test_argument_errors():
    x, grad = _images(b=1)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        wasserstein_ascent_step(x, grad, 0.1, kernel_size=4)
    with pytest.raises(ValueError, match="radius must be > 0"):
        wasserstein_ascent_step(x, grad, 0.0)
    with pytest.raises(ValueError, match="one shape"):
        wasserstein_ascent_step(x, grad[..., :-1], 0.1)
