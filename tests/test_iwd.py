"""The internal Wasserstein distance (fastadv.iwd), the IWD attack and IWD adversarial training.

Defining properties: IWD(x, x) lies in [0, reg * log n] (the entropic bias), IWD is symmetric, it is
POT's Sinkhorn value on the patch cost (and within reg * log n of the exact EMD), its gradient is the
envelope gradient; the attack's output meets its budget (by the same estimator) and the box.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastadv.iwd import entropic_bias_bound, extract_patches, internal_wasserstein, num_patches, patch_cost

pytestmark = pytest.mark.usefixtures("one_thread")


def _rand(shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=dtype)


# ------------------------------------------------------------------ the distance
def test_patches_and_cost_shapes():
    x = _rand((2, 3, 9, 7), 0)
    p = extract_patches(x, patch=3, stride=2)
    assert p.shape == (2, num_patches(9, 7, 3, 2), 27) == (2, 4 * 3, 27)
    # patch (0, 0) of sample 1 is the top-left 3 x 3 block, channel-major
    torch.testing.assert_close(p[1, 0], x[1, :, :3, :3].reshape(-1))
    c = patch_cost(x, x.flip(0), patch=3, stride=2)
    ref = torch.cdist(p, extract_patches(x.flip(0), 3, 2)) ** 2
    torch.testing.assert_close(c, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("value", ["transport", "regularized"])
def test_identical_images_within_the_entropic_bias(value):
    """0 <= IWD_reg(x, x) <= reg * log(n): diag(1/n) is a feasible plan with <P, C> = 0 and KL = log n."""
    reg = 0.05
    x = _rand((3, 2, 8, 8), 1)
    n = num_patches(8, 8, 3, 1)
    bound = entropic_bias_bound(8, 8, 3, 1, reg)
    assert bound == pytest.approx(reg * math.log(n))
    v = internal_wasserstein(x, x.clone(), patch=3, stride=1, reg=reg, value=value, tol=1e-10, max_iter=100000)
    assert (v >= -1e-12).all() and (v <= bound * (1 + 1e-9)).all(), (v, bound)
    # not blind: a different image is farther than the bias
    other = internal_wasserstein(x, _rand((3, 2, 8, 8), 2), patch=3, stride=1, reg=reg, value=value, tol=1e-8)
    assert (other > 5 * bound).all()


def test_identical_digits_default_settings(one_thread):
    """float32, the defaults (4 x 4 patches, stride 2, reg 0.01, tol 1e-3) on MNIST-like digits."""
    from fastadv.data import embedded_mnist

    x = embedded_mnist("heldout")[0][:8]
    v = internal_wasserstein(x, x.clone())
    bound = entropic_bias_bound(28, 28)  # 0.01 * log(169) = 0.051
    assert v.dtype == torch.float32 and (v >= 0).all() and (v <= bound).all()
    # measured ~6e-4 (background patches are many and identical): far below the bound
    assert v.max() < 0.1 * bound


def test_symmetric():
    a, b = _rand((3, 1, 8, 8), 3), _rand((3, 1, 8, 8), 4)
    kw = dict(patch=3, stride=1, reg=0.1, tol=1e-11, max_iter=100000)
    for value in ("transport", "regularized"):
        ab = internal_wasserstein(a, b, value=value, **kw)
        ba = internal_wasserstein(b, a, value=value, **kw)
        # uniform weights and C(b, a) = C(a, b)^T: the same problem transposed; converged to 1e-11
        torch.testing.assert_close(ab, ba, rtol=1e-9, atol=0)


def test_matches_pot():
    ot = pytest.importorskip("ot", reason="POT (pip install pot) is the independent solver this test compares with")
    import numpy as np

    a, b = _rand((3, 1, 8, 8), 5), _rand((3, 1, 8, 8), 6)
    cost = patch_cost(a, b, 3, 1)
    n = cost.shape[1]
    w = np.full(n, 1.0 / n)
    for reg in (0.1, 0.5):
        v = internal_wasserstein(a, b, patch=3, stride=1, reg=reg, tol=1e-11, max_iter=100000)
        vr = internal_wasserstein(a, b, patch=3, stride=1, reg=reg, value="regularized", tol=1e-11, max_iter=100000)
        for i in range(3):
            m = cost[i].numpy()
            ref = float(ot.sinkhorn2(w, w, m, reg, numItermax=100000, stopThr=1e-13))
            assert v[i].item() == pytest.approx(ref, rel=1e-8)
            plan = ot.sinkhorn(w, w, m, reg, numItermax=100000, stopThr=1e-13)
            kl = float((plan * np.log(plan / np.outer(w, w))).sum())
            assert vr[i].item() == pytest.approx(float((plan * m).sum()) + reg * kl, rel=1e-8)
    # the unregularized limit: EMD <= <P_reg, C> <= OT_reg <= EMD + reg * KL <= EMD + reg * log n
    reg = 0.05  # 0.01 takes 2.4 s to converge to 1e-10 here; 0.05 takes 0.14 s
    v = internal_wasserstein(a, b, patch=3, stride=1, reg=reg, tol=1e-9, max_iter=200000)
    for i in range(3):
        emd = float(ot.emd2(w, w, cost[i].numpy()))
        assert emd * (1 - 1e-9) <= v[i].item() <= emd + reg * math.log(n)
    # float32 with the default tolerance (1e-3): within 0.5% of POT's value
    v32 = internal_wasserstein(a.float(), b.float(), patch=3, stride=1, reg=0.1)
    ref = [float(ot.sinkhorn2(w, w, cost[i].numpy(), 0.1, numItermax=100000, stopThr=1e-13)) for i in range(3)]
    torch.testing.assert_close(v32.double(), torch.tensor(ref, dtype=torch.float64), rtol=5e-3, atol=0)


def test_regularized_gradient_is_exact():
    """d OT_reg / d b = sum_ij P_ij d C_ij / d b (envelope theorem), checked by finite differences."""
    a = _rand((2, 1, 5, 5), 7)
    b = _rand((2, 1, 5, 5), 8).requires_grad_(True)

    def f(bb):
        return internal_wasserstein(a, bb, patch=2, stride=1, reg=0.2, value="regularized", tol=1e-13, max_iter=100000)

    assert torch.autograd.gradcheck(f, (b,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_different_sizes_and_validation():
    a, b = _rand((2, 1, 8, 8), 9), _rand((2, 1, 10, 6), 10)
    v, plan = internal_wasserstein(a, b, patch=3, stride=1, reg=0.1, return_plan=True)
    assert v.shape == (2,) and plan.shape == (2, 36, 32)
    torch.testing.assert_close(plan.sum(1), torch.full((2, 32), 1 / 32, dtype=torch.float64))  # columns exact
    with pytest.raises(ValueError, match="patch"):
        internal_wasserstein(a, a, patch=9)
    with pytest.raises(ValueError, match="value"):
        internal_wasserstein(a, a, value="emd")
    with pytest.raises(ValueError, match="reg"):
        internal_wasserstein(a, a, reg=0.0)
    with pytest.raises(ValueError, match="channels"):
        internal_wasserstein(a, _rand((2, 3, 8, 8), 11))
    with pytest.raises(ValueError, match="batch"):
        internal_wasserstein(a, a[:1])


# -------------------------------------------------------------------- the attack


ATK = dict(patch=3, stride=1)  # 64 patches of 3 x 3 on 10 x 10


def test_attack_output_meets_budget_and_box(tiny_mnist):
    from fastadv.attacks.iwd import IWDAttack

    model, x, y = tiny_mnist
    x, y = x[:16], y[:16]
    budget = 0.05
    atk = IWDAttack(model, budget=budget, steps=15, **ATK)
    adv = atk(x, y)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    d = atk.distance(x, adv)
    changed = (adv != x).flatten(1).any(1)
    # the same estimator on the same inputs gives the same value: the returned image meets the budget
    assert (d[changed] <= budget).all()
    torch.testing.assert_close(d[changed], atk.last_iwd[changed], rtol=1e-5, atol=1e-7)
    assert (atk.last_iwd[~changed] == 0).all()
    with torch.no_grad():
        pred = model(adv).argmax(1)
    assert torch.equal(atk.last_fooled, pred != y)
    # not blind: the attack moves images and fools some (measured: 16 of 16 changed, 14/16 correct -> 3/16)
    assert changed.sum() >= 4 and (pred != y).sum() > (model(x).argmax(1) != y).sum()


def test_attack_budget_zero_returns_clean(tiny_mnist):
    from fastadv.attacks.iwd import IWDAttack

    model, x, y = tiny_mnist
    adv = IWDAttack(model, budget=0.0, steps=3, **ATK)(x[:4], y[:4])
    assert torch.equal(adv, x[:4])


def test_attack_matches_a_plain_loop(tiny_mnist):
    """Three steps of the Lagrangian scheme written out: signed steps on CE - lam * relu(IWD - budget)."""
    from fastadv.attacks.iwd import IWDAttack

    model, x, y = tiny_mnist
    x, y = x[:6], y[:6]
    budget, alpha, lam, fac = 0.02, 4 / 255, 10.0, 2.0
    atk = IWDAttack(model, budget=budget, steps=3, alpha=alpha, lam=lam, lam_factor=fac, **ATK)
    adv = atk(x, y)
    xa, lam_t = x.clone(), torch.full((6,), lam)
    best, best_loss = x.clone(), F.cross_entropy(model(x), y, reduction="none").detach()
    best_fooled = model(x).argmax(1) != y
    for t in range(4):
        xr = xa.clone().requires_grad_(True)
        out = model(xr)
        per = F.cross_entropy(out, y, reduction="none")
        d = internal_wasserstein(x, xr, patch=3, stride=1, reg=0.01)
        fooled = out.argmax(1) != y
        ok = (d <= budget) | (t == 0)
        better = ok & ((fooled & ~best_fooled) | ((fooled == best_fooled) & (per > best_loss)))
        best = torch.where(better[:, None, None, None], xr.detach(), best)
        best_loss = torch.where(better, per.detach(), best_loss)
        best_fooled = best_fooled | (better & fooled)
        if t == 3:
            break
        g, = torch.autograd.grad((per - lam_t * (d - budget).clamp_min(0)).sum(), xr)
        lam_t = torch.where(d > budget, lam_t * fac, lam_t / fac).clamp(1e-2, 1e6)
        xa = (xa + alpha * g.sign()).clamp(0, 1)
    torch.testing.assert_close(adv, best, rtol=0, atol=1e-6)


def test_attack_validation(tiny_mnist):
    from fastadv.attacks.iwd import IWDAttack

    model = tiny_mnist[0]
    for kw, name in ((dict(budget=-1.0), "budget"), (dict(reg=0.0), "reg"), (dict(steps=-1), "steps"),
                     (dict(lam_min=2.0, lam_max=1.0), "lam_min"), (dict(loss="kl"), "loss")):
        with pytest.raises(ValueError, match=name):
            IWDAttack(model, **kw)


def test_iwd_adversarial_training_loss(tiny_mnist):
    """IWDAT's loss is CE on the IWD attack's output (eval-mode attack), which meets the budget."""
    from fastadv.attacks.iwd import IWDAttack
    from fastadv.train.methods.base import BindContext
    from fastadv.train.methods.robustify import IWDAT

    model, x, y = tiny_mnist
    x, y = x[:8], y[:8]
    m = IWDAT(budget=0.05, steps=4, **ATK).bind(BindContext(net=model, model=model, attack_net=model,
                                                            device=torch.device("cpu")))
    out = m.loss(x, y)
    adv = IWDAttack(model, budget=0.05, steps=4, **ATK)(x, y)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(adv), y))
    assert (internal_wasserstein(x, adv, patch=3, stride=1)[(adv != x).flatten(1).any(1)] <= 0.05).all()
    with pytest.raises(ValueError, match="budget"):
        IWDAT(budget=-0.1)
