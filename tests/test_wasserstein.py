"""fastadv.ops.wasserstein_project (projected Sinkhorn, Wong et al. 2019) and the WassersteinPGD attack."""
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


def _images(bsz, ch, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(bsz, ch, h, w, generator=g, dtype=torch.float64)
    x0[x0 < 0.3] = 0  # empty pixels, as in MNIST
    x = (x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), x0.to(dtype)


# converged solutions: both sides run to the fixed point, so they can be compared
TIGHT = dict(max_iter=3000, tol=1e-8)


@pytest.mark.skipif(not HAS_CPP, reason="no C++ extension")
@pytest.mark.parametrize("shape,k", [((3, 1, 4, 4), 3), ((2, 3, 5, 7), 5), ((1, 2, 8, 6), 7)])
def test_cpp_matches_float64_reference(shape, k):
    x, x0 = _images(*shape)
    eps = torch.linspace(0.02, 0.2, shape[0], dtype=torch.float64)  # per-sample radius
    ref = R.wasserstein_project(x, x0, eps, kernel_size=k, reg=1000.0, upcast=torch.float64, return_info=True, **TIGHT)
    with fastadv.use_backend("cpp"):
        out = O._project_impl(x, x0, eps, kernel_size=k, reg=1000.0, **TIGHT)
        out32 = O._project_impl(x.float(), x0.float(), eps, kernel_size=k, reg=1000.0, max_iter=4000, tol=1e-6)
    assert (ref.residual <= 1e-8).all()
    assert out.iterations.tolist() == ref.iterations.tolist()
    torch.testing.assert_close(out.z, ref.z, rtol=1e-4, atol=1e-4 * ref.z.abs().max().item())
    torch.testing.assert_close(out.psi, ref.psi, rtol=1e-4, atol=0)
    # float32: log-domain values reach lam * w ~ 1e2 here (6e-6 absolute in float32), and tol 1e-6
    torch.testing.assert_close(out32.z.double(), ref.z, rtol=0, atol=2e-3 * ref.z.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 1, 4, 4), (2, 3, 6, 6), (2, 1, 8, 8)])
def test_constraint_and_mass(backend, shape):
    x, x0 = _images(*shape, seed=1)
    eps = 0.05
    with fastadv.use_backend(backend):
        r = O._project_impl(x, x0, eps, kernel_size=3, reg=1000.0, max_iter=3000, tol=1e-7)
    assert (r.residual <= 1e-7).all()
    mass0, mass = x0.sum((1, 2, 3)), r.z.sum((1, 2, 3))
    torch.testing.assert_close(mass, mass0, rtol=2e-7, atol=0)  # conserved up to the marginal residual
    assert (r.z >= 0).all()
    # the plan of the projection, rebuilt independently through sinkhorn with the
    # explicit (N, N) local cost at the effective regularization 1/psi, costs <= eps
    cost = R.local_cost_matrix(shape[1:], 3, 2.0)
    big = R.local_cost_matrix(shape[1:], 3, 2.0, big=1e6)
    a = (x0 / mass0[:, None, None, None]).reshape(shape[0], -1)
    b = (r.z / mass0[:, None, None, None]).reshape(shape[0], -1)
    # mass cannot cross channels: give b a's channel masses exactly (they agree
    # to the marginal residual, 1e-7; a cross-channel mismatch would cost 1e6 in emd2)
    ca = a.reshape(shape[0], shape[1], -1).sum(2, keepdim=True)
    cb = b.reshape(shape[0], shape[1], -1).sum(2, keepdim=True)
    b = (b.reshape(shape[0], shape[1], -1) * ca / cb).reshape(shape[0], -1)
    for i in range(shape[0]):
        assert r.psi[i] > 0  # the constraint is active at this radius
        v, plan = ops.sinkhorn(a[i : i + 1], b[i : i + 1], cost, 1.0 / r.psi[i].item(), max_iter=20000, tol=1e-10, return_plan=True)
        lin = (plan[0] * torch.where(torch.isinf(cost), 0, cost)).sum().item()
        # 1e-3: psi is returned one Newton step after the plan it was measured on
        # (measured up to 1.2e-4 relative on these images), and z's marginal residual
        assert lin <= eps * (1 + 1e-3), (i, lin)
        assert lin >= eps * (1 - 1e-3), (i, lin)  # active: on the boundary
        ot = pytest.importorskip("ot")
        assert ot.emd2(a[i], b[i], big) <= eps * (1 + 1e-5)  # the unregularized distance too


@pytest.mark.parametrize("backend", BACKENDS)
def test_idempotent_inside_the_ball(backend):
    x, x0 = _images(3, 1, 6, 6, seed=2)
    with fastadv.use_backend(backend):
        # x0 is the center: its projection moves it only by the entropic blur,
        # measured 1.4% at lam = 1000 and 0.7% at lam = 3000 on these sparse images
        errs = []
        for lam in (1000.0, 3000.0):
            z = ops.wasserstein_project(x0, x0, 0.05, kernel_size=3, reg=lam, max_iter=3000, tol=1e-8)
            errs.append(((z - x0).flatten(1).norm(dim=1) / x0.flatten(1).norm(dim=1)).max().item())
        assert errs[0] < 0.02 and errs[1] < 0.6 * errs[0], errs
        # projecting a projection again moves it by a small fraction of the first step
        # (entropic blur again: measured 8-11% at lam = 1000, 1.5-2.3% at lam = 1e4)
        z1 = ops.wasserstein_project(x, x0, 0.05, kernel_size=3, reg=1000.0, max_iter=3000, tol=1e-8)
        z2 = ops.wasserstein_project(z1, x0, 0.05, kernel_size=3, reg=1000.0, max_iter=3000, tol=1e-8)
    ratio = (z2 - z1).flatten(1).norm(dim=1) / (z1 - x).flatten(1).norm(dim=1)
    assert (ratio < 0.15).all(), ratio


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_zero_is_center_and_iterations_reported(backend):
    x, x0 = _images(3, 1, 5, 5, dtype=torch.float32, seed=3)
    with fastadv.use_backend(backend):
        z, it = ops.wasserstein_project(x, x0, torch.tensor([0.0, 0.1, 0.5]), kernel_size=3, return_iterations=True)
        z_cap, it_cap = ops.wasserstein_project(x, x0, 0.1, kernel_size=3, max_iter=2, tol=0.0, return_iterations=True)
    torch.testing.assert_close(z[0], x0[0])
    assert it[0] == 0 and (it[1:] > 0).all()
    assert (it_cap == 2).all()  # not converged: the cap is reported, the last iterate returned
    assert torch.isfinite(z_cap).all()


@pytest.mark.skipif(not HAS_CPP, reason="no C++ extension")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layouts_and_dtypes(dtype):
    x, x0 = _images(2, 3, 6, 7, dtype=torch.float32, seed=4)
    base = ops.wasserstein_project(x, x0, 0.1, kernel_size=3)
    xl, x0l = x.to(dtype).contiguous(memory_format=torch.channels_last), x0.to(dtype).contiguous(memory_format=torch.channels_last)
    z = ops.wasserstein_project(xl, x0l, 0.1, kernel_size=3)
    assert z.dtype == dtype and z.is_contiguous(memory_format=torch.channels_last)
    if dtype == torch.float32:
        torch.testing.assert_close(z, base)
    else:  # bfloat16 inputs are computed in float32: the error is the input and output rounding
        ref = ops.wasserstein_project(x.to(dtype).float(), x0.to(dtype).float(), 0.1, kernel_size=3)
        torch.testing.assert_close(z.float(), ref, rtol=1e-2, atol=1e-2)
    strided = ops.wasserstein_project(x[:, :, :, ::1].transpose(2, 3).transpose(2, 3), x0, 0.1, kernel_size=3)
    torch.testing.assert_close(strided, base)


def test_validation_names_the_argument():
    x, x0 = _images(2, 1, 5, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="^kernel_size must be odd"):
        ops.wasserstein_project(x, x0, 0.1, kernel_size=4)
    with pytest.raises(ValueError, match="^eps must be >= 0"):
        ops.wasserstein_project(x, x0, -0.1)
    with pytest.raises(ValueError, match="^x0 must be nonnegative"):
        ops.wasserstein_project(x, x0 - 1, 0.1)
    with pytest.raises(ValueError, match="^x0 must have positive total mass"):
        ops.wasserstein_project(x, torch.zeros_like(x0), 0.1)
    with pytest.raises(ValueError, match="^x contains NaN"):
        ops.wasserstein_project(x.clone().fill_(math.nan), x0, 0.1)
    with pytest.raises(ValueError, match="^x0 has shape"):
        ops.wasserstein_project(x, x0[:, :, :4], 0.1)
    with pytest.raises(ValueError, match="^reg must be"):
        ops.wasserstein_project(x, x0, 0.1, reg=0)


def test_lambertw_matches_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    L = torch.tensor([-30.0, -20.5, -5.0, -1.0, 0.0, 0.5, 1.0, 2.0, 10.0, 100.0, 1000.0, 3000.0, 1e5], dtype=torch.float64)
    w = R.lambertw_exp(L)
    small = L < 700
    expect = torch.from_numpy(np.real(scipy_special.lambertw(np.exp(L[small].numpy()))))
    torch.testing.assert_close(w[small], expect, rtol=1e-13, atol=1e-300)
    big = ~small  # w + log w = L
    torch.testing.assert_close(w[big] + torch.log(w[big]), L[big], rtol=1e-14, atol=0)


def test_local_cost_matrix_is_the_window_cost():
    c = R.local_cost_matrix((2, 4, 5), 3, 2.0)
    k = R.local_cost(3, 2.0)
    # pixel (c=1, y=2, x=2) -> (c=1, y=1, x=3): offset (-1, +1), cost 2
    i, j = 1 * 20 + 2 * 5 + 2, 1 * 20 + 1 * 5 + 3
    assert c[i, j] == k[0, 2] and abs(c[i, j] - 2.0) < 1e-12  # sqrt(2)^2
    assert math.isinf(c[i, 2 * 5 + 2])  # other channel
    assert math.isinf(c[i, 1 * 20 + 0 * 5 + 2])  # two rows away: outside a 3 x 3 window
    torch.testing.assert_close(c, c.T)


# ------------------------------------------------------------------ attack
@pytest.fixture(scope="module")
def mnist_model(mnist_dir):
    """The paper's small MNIST CNN, undefended, trained 2 epochs on 4000 images (89% on the 64-image test slice)."""
    from wasserstein_model import mnist_test_digits, undefended_cnn

    return (undefended_cnn(mnist_dir), *mnist_test_digits(mnist_dir, 64))


def _plain_loop(model, x, y, steps, update):
    """The attack as a plain loop: each sample still classified correctly moves to update(x_t, grad CE);
    returns the iterates and which samples were never misclassified."""
    xa = x.clone()
    still = torch.ones(x.shape[0], dtype=torch.bool)
    for _ in range(steps):
        xr = xa.clone().requires_grad_(True)
        out = model(xr)
        g, = torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), xr)
        still &= out.argmax(1) == y
        with torch.no_grad():
            z = update(xa, g)
        xa = torch.where(still[:, None, None, None], z, xa)
    return xa, still


def test_attack_matches_a_plain_loop(mnist_model):
    """Fixed radius, nobody fooled early: the attack is x <- clip(P(x + alpha sign(grad))), step for step."""
    from fastadv.attacks.wasserstein import WassersteinPGD

    model, x, y = mnist_model
    x, y = x[:6], y[:6]
    # the reference's map: the clamp, and every iterate accepted (these 100-iteration projections do not converge)
    atk = WassersteinPGD(model, eps=0.05, alpha=0.5, steps=3, reg=3000.0, eps_growth=(0.05, 1.0, 1), sinkhorn_max_iter=100,
                         box="clamp", accept_tol=math.inf, certify_max_iter=0)
    x_adv = atk(x, y)
    xa, _ = _plain_loop(model, x, y, 3, lambda xa, g: ops.wasserstein_project(
        xa + 0.5 * g.sign(), x, 0.05, kernel_size=5, reg=3000.0, max_iter=100).clamp(0, 1))
    torch.testing.assert_close(x_adv, xa, rtol=0, atol=1e-5)


def test_wasserstein_step_is_the_conjugate_step_then_the_projection(mnist_model):
    """step='wasserstein': x <- P_{ball & box}(conjugate step of radius alpha from x along grad), step for step."""
    from fastadv.attacks.wasserstein import WassersteinPGD
    from fastadv.attacks.wasserstein_ascent import wasserstein_ascent_step

    model, x, y = mnist_model
    x, y = x[:6], y[:6]
    iterates = []
    atk = WassersteinPGD(model, eps=0.05, alpha=0.3, steps=3, reg=3000.0, eps_growth=(0.05, 1.0, 1),
                         sinkhorn_max_iter=100, accept_tol=math.inf, certify_max_iter=0, step="wasserstein",
                         step_reg=500.0, callback=lambda t, xs, used, active: iterates.append(xs.clone()))
    atk(x, y)
    xa, still = _plain_loop(model, x, y, 3, lambda xa, g: ops.wasserstein_project(
        wasserstein_ascent_step(xa, g, 0.3, kernel_size=5, reg=500.0), x, 0.05, kernel_size=5, reg=3000.0,
        max_iter=100, upper=1.0))
    assert still.any()  # not blind: some samples ran all three steps
    # the iterates (the points returned are their certified points, fastadv.ot_certificate)
    torch.testing.assert_close(iterates[-1], xa, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="step must be one of"):
        WassersteinPGD(model, step="l2")
    with pytest.raises(ValueError, match="step_reg must be"):
        WassersteinPGD(model, step="wasserstein", step_reg=0.0)


def test_attack_drives_undefended_mnist_accuracy_down_with_points_inside_ball_and_box(mnist_model):
    from fastadv.attacks.wasserstein import WassersteinPGD

    model, x, y = mnist_model
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean >= 0.85
    model.train()  # the attack must use eval mode and restore this flag
    # The defaults at the paper's MNIST radius 1.0 (5 x 5 windows): alpha 0.5, 400 Sinkhorn iterations, ball and
    # box, lam 3000 then lam 1e4 on the samples left, only certified points count (benchmarks/wasserstein_strength.py:
    # 9.4% on 256 digits, lam 3000 alone 10.2%; the paper reports 4% for its model, which is trained: the next test).
    atk = WassersteinPGD(model, eps=1.0)
    x_adv = atk(x, y)
    assert model.training
    model.eval()
    with torch.no_grad():
        fooled = model(x_adv).argmax(1) != y
    adv_acc = 1 - fooled.float().mean().item()
    assert adv_acc <= 0.15, (clean, adv_acc)
    assert torch.equal(atk.last_fooled, fooled)  # reported successes are real, and all of them are reported
    r = atk.last_radius
    assert r.shape == (64,) and (r[atk.last_fooled] <= 1.0 + 1e-6).all()
    assert torch.equal(atk.last_fooled, torch.isfinite(r))
    # inside the threat model: in the box, no mass cut, the clean mass kept, the plan within the radius
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (atk.last_clamped_mass == 0).all()
    assert (atk.last_cost_bound[fooled] <= atk.last_radius[fooled] * (1 + atk.accept_tol) + 1e-12).all()
    mass, mass_adv = x.sum((1, 2, 3)), x_adv.sum((1, 2, 3))
    assert ((mass_adv - mass).abs() / mass).max() <= 1e-5  # the certified plan keeps it (float32 rounding)
    # the exact (unregularized) transport cost of three returned points, by POT's network simplex on the local
    # cost (moves outside the 5 x 5 window priced out of reach): within their certified cost
    ot = pytest.importorskip("ot")
    cost = R.local_cost_matrix((1, 28, 28), 5, 2.0).numpy()
    big = np.where(np.isfinite(cost), cost, 1e6)
    for i in fooled.nonzero().squeeze(1)[:3].tolist():
        a = x[i].flatten().double().numpy()
        b = x_adv[i].flatten().double().numpy()
        a, b = a / a.sum(), b / b.sum()
        w = ot.emd2(a, b, big)
        # the certified plan's cost bounds it (1e-5: the float32 image's rounding, renormalized here)
        assert w <= atk.last_cost_bound[i].item() * (1 + 1e-5), (i, w, atk.last_cost_bound[i].item())
        assert atk.last_cost_bound[i] <= atk.last_radius[i] * (1 + 1e-9)


def test_unconverged_points_never_count():
    """accept_tol: with projections stopped far from convergence (5 iterations), no iterate is accepted without a
    re-projection; with the re-projection off, nothing is fooled and every image comes back as x."""
    from fastadv.attacks.wasserstein import WassersteinPGD

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = model(x).argmax(1)
    kw = dict(eps=2.0, alpha=2.0, steps=10, sinkhorn_max_iter=5, eps_growth=(2.0, 1.0, 1))
    # box='clamp' (the reference's map): no certificate, so the unchecked loop's points are what it returns
    loose = WassersteinPGD(model, accept_tol=math.inf, certify_max_iter=0, box="clamp", **kw)
    loose(x, y)
    assert loose.last_fooled.any()  # the unchecked loop "fools" with unconverged points...
    assert (loose.last_cost_bound[loose.last_fooled] > 2.0 * 1.001).any()  # ...some of them outside the ball
    strict = WassersteinPGD(model, certify_max_iter=0, **kw)
    out = strict(x, y)
    assert not strict.last_fooled.any() and torch.equal(out, x)
    certified = WassersteinPGD(model, **kw)
    out = certified(x, y)
    assert certified.last_certified == int(certified.last_fooled.sum())
    f = certified.last_fooled
    assert (certified.last_cost_bound[f] <= 2.0 * 1.001).all()
    with torch.no_grad():
        assert torch.equal(model(out).argmax(1) != y, f)

def test_benchmark_port_of_the_public_reference_computes_the_same_projection():
    """benchmarks/ps_projection.py (the baseline of benchmarks/wasserstein_projection.py) is the same map.

    Their stop (objective change <= 1e-4, Lambert W to 1e-5) against ours converged: measured 7.0e-5 of
    max|z| at lam 100 (33 of their iterations). 1e-3 bounds that, and a different map misses by far more
    (measured here: the point itself is 0.38 of max|z| from z, the projection at lam 200 0.072).
    """
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ps_projection.py"
    spec = importlib.util.spec_from_file_location("ps_projection", path)
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    x0[x0 < 0.4] = 0
    x = (x0 + 0.2 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    mass = x0.sum((1, 2, 3), keepdim=True)
    zp, it = ps.public_projected_sinkhorn(x0 / mass, x / mass, ps.public_cost(5, dtype=torch.float64),
                                          torch.full((3,), 0.1, dtype=torch.float64), 100.0, maxiters=400,
                                          return_iterations=True)
    ours = R.wasserstein_project(x, x0, 0.1, kernel_size=5, reg=100.0, max_iter=20000, tol=1e-11, return_info=True)
    assert it < 400  # stopped on its own test
    dev = ((zp * mass - ours.z).abs().max() / ours.z.abs().max()).item()
    assert dev < 1e-3, dev


def test_as_strong_as_the_paper_on_its_architecture_trained_as_undefended_models_are(mnist_dir):
    """Wong et al. 2019 report 4% accuracy for their undefended MNIST model at radius 1.0. Their architecture
    trained on all 60,000 training images (3 Adam epochs, 98.3% test accuracy) falls to 0% on its first 128 test
    digits under the defaults, every point inside ball and box (benchmarks/wasserstein_strength.py --model full);
    here 64 digits, <= the paper's 4%."""
    from wasserstein_model import mnist_test_digits, undefended_cnn

    from fastadv.attacks.wasserstein import WassersteinPGD

    model = undefended_cnn(mnist_dir, 60000, 3)
    x, y = mnist_test_digits(mnist_dir, 64)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.97
    atk = WassersteinPGD(model, eps=1.0)
    x_adv = atk(x, y)
    with torch.no_grad():
        acc = (model(x_adv).argmax(1) == y).float().mean().item()
    assert acc <= 0.04, acc
    f = atk.last_fooled
    assert (atk.last_cost_bound[f] <= atk.last_radius[f] * (1 + atk.accept_tol) + 1e-12).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
