"""FAB / FAB-T (fastadv.attacks.fab): the projections against a scipy LP / QP,
parity with torchattacks' FAB on a trained MLP, and FAB's defining properties.

torchattacks' FAB (3.5.1) is AutoAttack's (fab_base / fab_pt) with the same
defaults except steps (10 there, 100 here: both are passed explicitly) and
n_target_classes (n_classes - 1 there, 9 in AutoAttack: equal for the 10
MNIST classes). It seeds the global RNG with ``seed`` and draws random
starts only for restarts > 0, so with restarts=1 both attacks are
deterministic and, with early_stop=False, ours returns the same points. Its
``perturb`` computes the in-ball check only for Linf and L2 (L1 raises a
NameError), so L1 is tested here by its properties only.
"""
import importlib.util
import math

import numpy as np
import pytest
import torch
from torch import nn

from fastadv.attacks.fab import FAB, projection_l1, projection_l2, projection_linf
from parity_model import heldout_correct, trained_mnist_mlp

HAS_TA = importlib.util.find_spec("torchattacks") is not None
HAS_SCIPY = importlib.util.find_spec("scipy") is not None

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

PROJ = {"linf": projection_linf, "l2": projection_l2, "l1": projection_l1}
TA_NORM = {"linf": "Linf", "l2": "L2", "l1": "L1"}


def lp_norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.reshape(d.shape[0], -1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1) if norm == "l2" else d.abs().sum(1)


def mlp(d=64, k=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, k)).eval()


# ------------------------------------------------------------------ projections
def scipy_min_norm(t, w, b, norm):
    """min ||d||_p s.t. w.(t + d) = b, 0 <= t + d <= 1 with scipy (LP for Linf / L1, SLSQP QP for L2)."""
    from scipy.optimize import linprog, minimize

    n = t.size
    lo, hi = -t, 1 - t
    rhs = b - w @ t
    if norm == "linf":  # variables (d, lam): min lam, |d_i| <= lam
        c = np.r_[np.zeros(n), 1.0]
        a_ub = np.block([[np.eye(n), -np.ones((n, 1))], [-np.eye(n), -np.ones((n, 1))]])
        res = linprog(c, A_ub=a_ub, b_ub=np.zeros(2 * n), A_eq=np.r_[w, 0.0][None], b_eq=[rhs],
                      bounds=list(zip(lo, hi)) + [(0, None)], method="highs")
        return res.fun, res.x[:n]
    if norm == "l1":  # d = u - v, u, v >= 0
        res = linprog(np.ones(2 * n), A_eq=np.r_[w, -w][None], b_eq=[rhs],
                      bounds=[(0, h) for h in hi] + [(0, -lo_) for lo_ in lo], method="highs")
        return res.fun, res.x[:n] - res.x[n:]
    res = minimize(lambda d: d @ d, np.zeros(n), jac=lambda d: 2 * d, method="SLSQP", bounds=list(zip(lo, hi)),
                   constraints=[{"type": "eq", "fun": lambda d: w @ d - rhs, "jac": lambda d: w}],
                   options={"ftol": 1e-14, "maxiter": 500})
    return math.sqrt(res.fun), res.x


@pytest.mark.skipif(not HAS_SCIPY, reason="scipy not installed")
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_is_the_min_norm_point_of_plane_and_box(norm):
    g = torch.Generator().manual_seed(3)
    rows_t, rows_w, rows_b = [], [], []
    for case in range(24):
        n = 6
        t = torch.rand(n, generator=g, dtype=torch.float64)
        if case % 3 == 0:
            t[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # on the box faces
        w = torch.randn(n, generator=g, dtype=torch.float64)
        if case % 4 == 0:
            w[1] = 0.0  # a coordinate the plane ignores
        u = torch.rand(n, generator=g, dtype=torch.float64)  # a box point on the plane: feasible
        rows_t.append(t), rows_w.append(w), rows_b.append(w @ u)
    t, w, b = torch.stack(rows_t), torch.stack(rows_w), torch.stack(rows_b)
    d = PROJ[norm](t, w, b)
    p = t + d
    assert (p >= -1e-12).all() and (p <= 1 + 1e-12).all()
    torch.testing.assert_close((w * p).sum(1), b, atol=1e-9, rtol=0)  # on the hyperplane
    for i in range(t.shape[0]):
        best, d_ref = scipy_min_norm(t[i].numpy(), w[i].numpy(), float(b[i]), norm)
        assert lp_norm(d[i:i + 1], norm).item() == pytest.approx(best, abs=1e-6), i
        if norm == "l2":  # the L2 minimizer is unique
            np.testing.assert_allclose(d[i].numpy(), d_ref, atol=1e-5)


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_infeasible_goes_to_the_closest_corner(norm):
    g = torch.Generator().manual_seed(4)
    t = torch.rand(8, 5, generator=g, dtype=torch.float64)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)
    reach_hi = w.clamp_min(0).sum(1)  # max of w.x over the box
    b = torch.where(torch.arange(8) % 2 == 0, reach_hi + 1.0, w.clamp_max(0).sum(1) - 1.0)  # out of reach
    p = t + PROJ[norm](t, w, b)
    best = torch.where(torch.arange(8) % 2 == 0, reach_hi, w.clamp_max(0).sum(1))
    torch.testing.assert_close((w * p).sum(1), best)  # the box point closest to the plane
    # A point already on its plane does not move.
    assert PROJ[norm](t, w, (w * t).sum(1)).abs().max() < 1e-12


@pytest.mark.skipif(not HAS_TA, reason="torchattacks not installed (pip install --no-deps torchattacks)")
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_projection_equals_the_reference(norm):
    """The vectorized port against AutoAttack's routine (as shipped in torchattacks), MNIST-like rows."""
    from torchattacks.attacks import fab as ta_fab

    g = torch.Generator().manual_seed(5)
    for n in (1, 2, 7, 100):
        t = torch.rand(9, n, generator=g)
        t = t * (t > 0.4)  # many exact zeros, as in MNIST
        w = torch.randn(9, n, generator=g) * (torch.rand(9, n, generator=g) > 0.2)
        b = (w * torch.rand(9, n, generator=g)).sum(1) * torch.tensor([1.0, 3.0, -2.0]).repeat(3)
        ref = getattr(ta_fab, f"projection_{norm}")(t.clone(), w.clone(), b.clone())
        torch.testing.assert_close(PROJ[norm](t, w, b), ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def mnist100():
    model = trained_mnist_mlp()
    x, y = heldout_correct(model, 100)
    return model, x, y


def robust_and_in_ball(model, adv, x, y, eps, norm):
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        robust = model(adv).argmax(1) == y
    dist = lp_norm(adv - x, norm)
    assert (dist <= eps * (1 + 1e-6)).all()
    assert (dist[robust] == 0).all()  # AutoAttack's convention: not fooled within eps -> the clean input
    return robust


# (norm, eps, multi_targeted, steps). FAB-T runs 9 targets: 50 steps keep the test under 20 s.
PARITY = [("linf", 0.08, False, 100), ("l2", 1.0, False, 100), ("linf", 0.08, True, 50)]


@pytest.mark.skipif(not HAS_TA, reason="torchattacks not installed (pip install --no-deps torchattacks)")
@pytest.mark.parametrize("norm,eps,multi,steps", PARITY)
def test_robust_accuracy_matches_torchattacks(mnist100, norm, eps, multi, steps):
    import torchattacks

    model, x, y = mnist100
    theirs = torchattacks.FAB(model, norm=TA_NORM[norm], eps=eps, steps=steps, n_restarts=1, alpha_max=0.1, eta=1.05,
                              beta=0.9, multi_targeted=multi, n_classes=10, seed=0)(x, y)
    ours = FAB(model, eps, norm=norm, steps=steps, multi_targeted=multi, n_target_classes=9)(x, y)
    r_theirs = robust_and_in_ball(model, theirs, x, y, eps, norm)
    r_ours = robust_and_in_ball(model, ours, x, y, eps, norm)
    acc_t, acc_o = r_theirs.float().mean().item(), r_ours.float().mean().item()
    assert 0.2 <= acc_t <= 0.8, acc_t  # a radius where the attack is neither hopeless nor trivial
    assert abs(acc_o - acc_t) <= 0.01, (acc_o, acc_t)
    assert (r_ours == r_theirs).float().mean() >= 0.95
    if not multi:
        # Without early stop ours is AutoAttack's loop: the same minimal points.
        full = FAB(model, eps, norm=norm, steps=steps, early_stop=False)(x, y)
        torch.testing.assert_close(full, theirs, atol=1e-5, rtol=0)


def test_l1_in_ball_and_sane(mnist100):
    model, x, y = mnist100
    accs = []
    for eps in (5.0, 10.0):
        adv = FAB(model, eps, norm="l1", steps=100)(x, y)
        accs.append(robust_and_in_ball(model, adv, x, y, eps, "l1").float().mean().item())
    assert 0.2 <= accs[0] <= 0.8 and accs[1] < accs[0], accs  # measured 0.69 and 0.18


# ------------------------------------------------------------------ properties
@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_linear_binary_model_distance_is_the_analytic_one(norm):
    """On f(x) = w.x + c the minimal Lp distance to the boundary is |f(x0)| / ||w||_q (q dual to p)
    while the box does not bind; FAB gets within its overshoot (eta = 1.05 leaves ~0.5%)."""
    g = torch.Generator().manual_seed(6)
    n = 10
    lin = nn.Linear(n, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, n, generator=g))
        wd = lin.weight[0] - lin.weight[1]
        lin.bias.copy_(torch.tensor([-0.5 * wd.sum().item(), 0.0]))  # the boundary passes through 0.5 * 1
        s = (0.02 + 0.06 * torch.rand(16, 1, generator=g)) * torch.where(torch.arange(16) % 2 == 0, 1.0, -1.0)[:, None]
        x = 0.5 + s * wd / wd.norm()  # off the boundary along its normal: every Lp projection stays in the box
        y = lin(x).argmax(1)
        f = (lin(x)[:, 0] - lin(x)[:, 1]).abs()
    q = {"linf": 1, "l2": 2, "l1": math.inf}[norm]
    analytic = f / wd.norm(p=q)
    adv = FAB(lin, 10.0, norm=norm, steps=20, early_stop=False)(x, y)
    assert (lin(adv).argmax(1) != y).all()
    ratio = lp_norm(adv - x, norm) / analytic
    assert (ratio >= 1 - 1e-4).all() and (ratio <= 1.01).all(), ratio


def test_generator_reproducible_and_global_rng_untouched():
    model = mlp()
    x = torch.rand(24, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    runs = []
    for _ in range(2):
        state = torch.get_rng_state()
        adv = FAB(model, 0.5, norm="l2", steps=5, restarts=3, generator=torch.Generator().manual_seed(7))(x, y)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(adv)
    assert torch.equal(runs[0], runs[1])
    # Restarts only add fooled samples.
    one = FAB(model, 0.5, norm="l2", steps=5)(x, y)
    f1, f3 = model(one).argmax(1) != y, model(runs[0]).argmax(1) != y
    assert (f1 <= f3).all()
    # The random start lies at radius eps / 2 (before clipping), as in AutoAttack.
    atk = FAB(model, 0.4, norm="linf", generator=torch.Generator().manual_seed(8), clip=(-10.0, 10.0))
    x0 = torch.zeros(5, 64)
    torch.testing.assert_close(lp_norm(atk._random_start(x0, torch.full((5,), 0.4)) - x0, "linf"), torch.full((5,), 0.2))


def test_early_stop_same_outcome_and_compaction_schedule():
    model = mlp()
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    full = FAB(model, 0.1, steps=30, early_stop=False)(x, y)
    fooled = model(full).argmax(1) != y
    assert 0 < fooled.sum() < 32
    for every in (1, 4):
        es = FAB(model, 0.1, steps=30, compact_every=every)(x, y)
        assert torch.equal(model(es).argmax(1) != y, fooled)
        assert (lp_norm(es - x, "linf") <= 0.1 + 1e-6).all()


def test_fab_t_targets_and_attack_sense_targeted(mnist100):
    model, x, y = mnist100
    x, y = x[:30], y[:30]
    with torch.no_grad():
        second = model(x).sort(1)[1][:, -2]
    # FAB-T with one target: the runner-up class by clean logit. torchattacks runs n_classes - 1 targets,
    # so n_classes=2 there is one target; without early stop the points agree.
    adv = FAB(model, 0.08, steps=30, multi_targeted=True, n_target_classes=1, early_stop=False)(x, y)
    with torch.no_grad():
        assert (model(adv).argmax(1) != y).any()
    if HAS_TA:
        import torchattacks

        ref = torchattacks.FAB(model, norm="Linf", eps=0.08, steps=30, multi_targeted=True, n_classes=2)(x, y)
        torch.testing.assert_close(adv, ref, atol=1e-5, rtol=0)
    # Targeted (Attack sense): y = targets; a returned point within eps predicts its target.
    adv_t = FAB(model, 0.1, steps=30, targeted=True)(x, second)
    with torch.no_grad():
        pred_t = model(adv_t).argmax(1)
    moved = lp_norm(adv_t - x, "linf") > 0
    assert moved.any() and (pred_t[moved] == second[moved]).all() and (pred_t[~moved] == y[~moved]).all()
    assert (lp_norm(adv_t - x, "linf") <= 0.1 + 1e-6).all()


def test_other_box_is_rescaled():
    """A model on [-1, 1] inputs, attacked in clip=(-1, 1) at twice the radius, is the same attack.

    Equal up to float rounding, which can flip the adversarial check of an
    iterate sitting on the boundary (a near-tie of two logits) and send that
    sample down another path: hence "all but one sample"."""
    model = mlp()

    class Shifted(nn.Module):
        def forward(self, u):
            return model((u + 1) / 2)

    x = torch.rand(16, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    for norm, eps in (("linf", 0.04), ("l2", 0.1), ("l1", 0.6)):
        a = FAB(model, eps, norm=norm, steps=10, early_stop=False)(x, y)
        b = (FAB(Shifted(), 2 * eps, norm=norm, steps=10, early_stop=False, clip=(-1, 1))(2 * x - 1, y) + 1) / 2
        assert (lp_norm(b - x, norm) <= eps * (1 + 1e-5)).all()
        with torch.no_grad():
            fa, fb = model(a).argmax(1) != y, model(b).argmax(1) != y
        assert 0 < fa.sum() < 16 and (fa != fb).sum() <= 1
        assert ((b - a).flatten(1).abs().amax(1) < 1e-4).sum() >= 15


def test_bad_arguments_name_themselves():
    model = mlp()
    for kwargs, name in [(dict(norm="l3"), "norm"), (dict(steps=-1), "steps"), (dict(restarts=0), "restarts"),
                         (dict(n_target_classes=0), "n_target_classes"), (dict(alpha_max=2.0), "alpha_max"),
                         (dict(eps=-1.0), "eps"), (dict(clip=None), "clip"),
                         (dict(multi_targeted=True, targeted=True), "multi_targeted")]:
        with pytest.raises((ValueError, TypeError), match=name):
            FAB(model, **kwargs)
    # Misclassified inputs and an empty batch come back unchanged.
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        wrong = (model(x).argmax(1) + 1) % 10
    assert torch.equal(FAB(model, 0.3, steps=5)(x, wrong), x)
    assert FAB(model, 0.3, steps=5)(x[:0], wrong[:0]).shape == (0, 1, 8, 8)


def test_batched_targets_equal_the_sequential_order():
    # restarts=1 draws nothing random, so all targets in one replicated batch must give the same points
    from fastadv.attacks.fab import FAB
    from parity_model import heldout_correct, trained_mnist_mlp

    model = trained_mnist_mlp()
    x, y = heldout_correct(model, 40)
    seq = FAB(model, 0.08, multi_targeted=True, steps=20, batch_targets=False)(x, y)
    bat = FAB(model, 0.08, multi_targeted=True, steps=20, batch_targets=True, max_rows=100)(x, y)  # 3 groups
    assert torch.equal(seq, bat)


def test_batched_targets_sibling_stop_changes_only_the_work():
    """A row stops once a row of its sample toward an earlier target is within eps: the same points as
    without that stop, with fewer rows forwarded."""
    from fastadv.attacks.fab import FAB
    from fastadv.bench.floor import ModelCallRecorder
    from parity_model import heldout_correct, trained_mnist_mlp

    model = trained_mnist_mlp()
    x, y = heldout_correct(model, 40)
    out, rows = {}, {}
    for sibling in (True, False):
        rec = ModelCallRecorder(model)
        atk = FAB(rec, 0.08, multi_targeted=True, steps=20, batch_targets=True)
        if not sibling:
            run = atk._run
            atk._run = lambda *a, siblings=None, **k: run(*a, **k)
        out[sibling] = atk(x, y)
        rows[sibling] = sum(c[1][0] for c in rec.calls)
    assert torch.equal(out[True], out[False])
    with torch.no_grad():
        fooled = (model(out[True]).argmax(1) != y).float().mean()
    assert 0.2 < fooled < 0.9, fooled
    assert rows[True] < 0.8 * rows[False], rows
