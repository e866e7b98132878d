"""WassersteinPGD against an independent port of the public reference code (oracle).

The oracle below is a port, written for this test from reading
locuslab/projected_sinkhorn (Wong, Schmidt & Kolter 2019, "Wasserstein
Adversarial Examples via Projected Sinkhorn Iterations"): ``pgd.attack`` with
norm='linfinity', ball='wasserstein'; ``projected_sinkhorn`` (log_sinkhorn
with objective '2norm', in the scaling domain as theirs); their Lambert W (a
port of scipy's k=0 branch). It shares no code with fastadv.

What differs from fastadv by design (see the WassersteinPGD docstring) and
how the comparison controls it:
* their projection stops batch-wide when the dual objective moves by
  <= 1e-4 (abs + rel), and its objective call passes (exp_alpha, beta) in
  swapped positions (ported as is: it only decides when to stop); ours stops
  per sample on the residuals. Step-by-step equality needs both converged:
  the oracle gets ``obj_tol`` and ours a tight ``sinkhorn_tol``;
* their Lambert W stops batch-wide at 1e-5 relative and returns the
  iterate before the last update; ported as is (``w_tol``), tightened for the
  equality runs;
* their radius grows without bound; ours is capped at eps, here set to the
  radius their schedule reaches, so the cap never binds.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.attacks.wasserstein import WassersteinPGD

# ------------------------------------------------------------------ the oracle
_OMEGA = 0.56714329040978387299997  # W(1)


def oracle_lambertw(z0, tol=1e-5):
    """Their Lambert W, principal branch, z0 >= 0: Pade / asymptotic start, Halley-type steps, batch-wide stop."""
    w0 = torch.empty_like(z0)
    pade = (z0 > -1.0) & (z0 < 1.5)
    asy = ~pade
    f32 = lambda c: torch.tensor(c, dtype=torch.float32).to(z0.dtype)  # their coefficients are float32 tensors
    num, den = f32([12.85106382978723404255, 12.34042553191489361902, 1.0]), f32([32.53191489361702127660, 14.34042553191489361702, 1.0])
    z = z0[pade]
    w0[pade] = z * (num[0] * z**2 + num[1] * z + num[2]) / (den[0] * z**2 + den[1] * z + den[2])
    z = z0[asy]
    w0[asy] = torch.log(z) - torch.log(torch.log(z))
    w0[z0 == 1] = _OMEGA
    pos = (w0 >= 0) & (z0 != 1)
    w, z = w0[pos], z0[pos]
    for _ in range(100):
        wewz = w - z * torch.exp(-w)
        wn = w - wewz / (w + 1 - (w + 2) * wewz / (2 * w + 2))
        if (torch.abs(wn - w) < tol * torch.abs(wn)).all():
            break  # (sic) the previous iterate w is returned, as in theirs
        w = wn
    w0[pos] = w
    assert not ((w0 < 0) & (z0 != 1)).any()  # the negative branch never occurs for z0 >= 0
    return w0


def _lamw(x, tol):
    y = x.clone()
    big = x > 1e-10
    y[big] = oracle_lambertw(x[big], tol)
    return y


def _window_mm(kern, v):
    """out_i = sum_d kern[b, d] v_{i+d} per channel, zero padding (their unfold-based _mm). kern (B, k, k)."""
    bsz, ch, h, w = v.shape
    k = kern.shape[-1]
    r = k // 2
    vp = F.pad(v, (r, r, r, r))
    out = torch.zeros_like(v)
    for i in range(k):
        for j in range(k):
            out += kern[:, i, j].view(bsz, 1, 1, 1) * vp[:, :, i:i + h, j:j + w]
    return out


def oracle_cost(kernel_size, p, dtype):
    c = kernel_size // 2
    idx = torch.arange(kernel_size, dtype=torch.float64)
    return (((idx[:, None] - c) ** 2 + (idx[None, :] - c) ** 2) ** (p / 2)).to(dtype)


def oracle_projected_sinkhorn(X, Y, C, epsilon, lam, maxiters=50, obj_tol=1e-4, w_tol=1e-5):
    """Their projection of Y onto the Wasserstein ball around X (both already divided by X's mass)."""
    bsz = X.shape[0]
    m = X[0].numel()
    bdot = lambda a, b: (a.reshape(bsz, -1) * b.reshape(bsz, -1)).sum(1)
    alpha = torch.full_like(Y, math.log(1 / m))
    beta = torch.full_like(Y, math.log(1 / m))
    exp_alpha, exp_beta = torch.exp(-alpha), torch.exp(-beta)
    psi = torch.ones(bsz, dtype=X.dtype)
    K = torch.exp(-psi.view(-1, 1, 1) * C - 1)

    def eval_obj(alpha, beta, exp_alpha, exp_beta, psi, K):
        return (-0.5 / lam * bdot(beta, beta) - psi * epsilon - bdot(alpha.clamp(max=1e10), X)
                - bdot(beta.clamp(max=1e10), Y) - bdot(exp_alpha, _window_mm(K, exp_beta)))

    old_obj = torch.full((bsz,), -math.inf, dtype=X.dtype)
    i = 0
    while True:
        alpha = torch.log(_window_mm(K, exp_beta)) - torch.log(X)
        exp_alpha = torch.exp(-alpha)
        beta = _lamw(lam * torch.exp(lam * Y) * _window_mm(K, exp_alpha), w_tol) - lam * Y
        exp_beta = torch.exp(-beta)
        dpsi = -epsilon + bdot(exp_alpha, _window_mm(C * K, exp_beta))
        ddpsi = -bdot(exp_alpha, _window_mm(C * C * K, exp_beta))
        delta = dpsi / ddpsi
        t = torch.ones_like(delta)
        neg = psi - t * delta < 0
        while neg.any() and t.min().item() > 1e-2:
            t[neg] /= 2
            neg = psi - t * delta < 0
        psi = torch.clamp(psi - t * delta, min=0)
        K = torch.exp(-psi.view(-1, 1, 1) * C - 1)
        obj = eval_obj(alpha, exp_alpha, beta, exp_beta, psi, K)  # (sic) argument order as in theirs
        i += 1
        if i > maxiters or ((old_obj - obj).abs() <= obj_tol + obj_tol * obj.abs()).all():
            break
        old_obj = obj
    return beta / lam + Y


def oracle_attack(X, y, net, epsilon, epsilon_iters, epsilon_factor, p, kernel_size, maxiters, alpha,
                  regularization, sinkhorn_maxiters, obj_tol=1e-4, w_tol=1e-5):
    """Their pgd.attack (norm='linfinity', ball='wasserstein'), recording every iterate and radius."""
    bsz = X.shape[0]
    epsilon = torch.ones(bsz, dtype=X.dtype) * epsilon
    C = oracle_cost(kernel_size, p, X.dtype)
    normalization = X.reshape(bsz, -1).sum(-1).view(bsz, 1, 1, 1)
    X_ = X.clone()
    X_best = X.clone()
    err_best = err = net(X).argmax(1) != y
    epsilon_best = epsilon.clone()
    trace = []
    t = 0
    while True:
        X_.requires_grad_(True)
        loss = nn.CrossEntropyLoss()(net(X_), y)
        grad, = torch.autograd.grad(loss, X_)
        X_ = X_.detach()
        with torch.no_grad():
            used = epsilon.clone()
            X_[~err] += alpha * torch.sign(grad[~err])
            X_[~err] = (oracle_projected_sinkhorn(X / normalization, X_ / normalization, C, epsilon, regularization,
                                                  maxiters=sinkhorn_maxiters, obj_tol=obj_tol, w_tol=w_tol)
                        * normalization)[~err]
            X_ = torch.clamp(X_, 0, 1)
            err = net(X_).argmax(1) != y
            trace.append((X_.clone(), used, err.clone()))
            if err.sum() > err_best.sum():
                X_best, err_best, epsilon_best = X_.clone(), err, epsilon.clone()
            t += 1
            if bool(err.all()) or t == maxiters:
                break
            if t % epsilon_iters == 0:
                epsilon[~err] *= epsilon_factor
    epsilon_best[~err] = float("inf")
    return X_best, err_best, epsilon_best, trace


# ------------------------------------------------------------------ the setup
def _setup(n=6, seed=0):
    """n MNIST digits at 7 x 7 (4 x 4 average), a tiny random float64 CNN, labels = its clean predictions."""
    from fastadv.data import embedded_mnist

    x, _ = embedded_mnist("heldout")
    x = F.avg_pool2d(x[:n].double(), 4)
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 10)).double().eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    return net, x, y


# the reference settings (pgd.attack defaults: lam 1000, alpha 0.1, x1.1, k 5,
# p 2), the start radius raised to 0.05 and the growth every 4 steps so that 12
# steps fool half of these digits
REF = dict(epsilon=0.05, epsilon_iters=4, epsilon_factor=1.1, p=2, kernel_size=5, maxiters=12, alpha=0.1,
           regularization=1000.0)


def _ours(net, x, y, sinkhorn_tol, sinkhorn_max_iter, steps=REF["maxiters"]):
    top = REF["epsilon"] * REF["epsilon_factor"] ** ((steps - 1) // REF["epsilon_iters"])
    trace = []
    atk = WassersteinPGD(net, eps=top, alpha=REF["alpha"], steps=steps, kernel_size=REF["kernel_size"],
                         p=REF["p"], reg=REF["regularization"],
                         eps_growth=(REF["epsilon"], REF["epsilon_factor"], REF["epsilon_iters"]),
                         sinkhorn_max_iter=sinkhorn_max_iter, sinkhorn_tol=sinkhorn_tol,
                         box="clamp", accept_tol=math.inf, certify_max_iter=0,  # the reference's map
                         callback=lambda t, xa, used, active: trace.append((xa.clone(), used.clone())))
    return atk(x, y), atk, trace


def _compare(ref_trace, ours_trace, ref_eps, atk):
    """(max |x_ours - x_ref| over steps, first step whose fooled set differs or None); radii checked exactly."""
    worst, first_diff = 0.0, None
    fooled_ours = torch.zeros(len(atk.last_radius), dtype=torch.bool)
    for t, ((xr, used_r, err_r), (xo, used_o)) in enumerate(zip(ref_trace, ours_trace)):
        stepped = ~fooled_ours
        torch.testing.assert_close(used_o[stepped], used_r[stepped], rtol=1e-12, atol=0)
        worst = max(worst, (xo - xr).abs().max().item())
        fooled_ours = fooled_ours | (torch.isfinite(atk.last_radius) & (atk.last_radius == used_o) & stepped)
        if first_diff is None and not torch.equal(fooled_ours | err_r, err_r):
            first_diff = t
    return worst, first_diff


def test_matches_the_reference_step_by_step_when_both_converge():
    torch.set_num_threads(1)
    net, x, y = _setup()
    # both projections run (nearly) to their fixed point, the oracle's Lambert W to float64 round-off.
    # Their projection converges slowly (measured max |x_ours - x_ref| after step 1: 1.4e-2 at 300
    # iterations, 2.5e-6 at 1500), so this runs 2 steps only (the 12-step run is the next test)
    _, err_r, eps_r, ref_trace = oracle_attack(x, y, net, **dict(REF, maxiters=2), sinkhorn_maxiters=1500,
                                               obj_tol=1e-13, w_tol=1e-15)
    x_adv, atk, ours_trace = _ours(net, x, y, sinkhorn_tol=1e-11, sinkhorn_max_iter=5000, steps=2)
    assert len(ours_trace) == len(ref_trace)
    worst, first_diff = _compare(ref_trace, ours_trace, eps_r, atk)
    print(f"max |x_ours - x_ref| over {len(ref_trace)} steps: {worst:.3g}; fooled {err_r.sum().item()}/{len(y)}")
    # measured 2.5e-6: what their projection has left to converge after 1500 iterations
    assert worst < 1e-5
    assert first_diff is None
    assert torch.equal(atk.last_fooled, err_r)
    torch.testing.assert_close(atk.last_radius, eps_r, rtol=1e-12, atol=0)  # inf where both failed


def test_same_fooled_sets_and_radii_over_twelve_steps():
    """12 steps, their stop at 300 iterations against ours at tol 1e-8: the same fooled sets and radii."""
    torch.set_num_threads(1)
    net, x, y = _setup()
    _, err_r, eps_r, ref_trace = oracle_attack(x, y, net, **REF, sinkhorn_maxiters=300)
    _, atk, ours_trace = _ours(net, x, y, sinkhorn_tol=1e-8, sinkhorn_max_iter=2000)
    worst, first_diff = _compare(ref_trace, ours_trace, eps_r, atk)
    print(f"12 steps: max |x_ours - x_ref| {worst:.3g}; fooled ours {atk.last_fooled.tolist()} ref {err_r.tolist()}")
    assert first_diff is None and torch.equal(atk.last_fooled, err_r)
    assert 0 < err_r.sum() < len(y)  # a comparison where the attack is neither hopeless nor trivial
    torch.testing.assert_close(atk.last_radius, eps_r, rtol=1e-12, atol=0)
    assert worst < 0.1  # measured 0.041: their unconverged projections (see above), not a different map


def test_largest_radius_used_is_eps_under_the_default_schedule():
    torch.set_num_threads(1)
    net, x, y = _setup(n=4)
    for eps, steps in ((1.0, 40), (0.37, 25), (0.05, 7)):
        # a model that always says 9 (its logits still depend on x): nobody is fooled, all run every step
        never = lambda xa: 1e-3 * net(xa) + 100.0 * F.one_hot(torch.full((len(xa),), 9), 10).to(xa.dtype)
        atk2 = WassersteinPGD(never, eps=eps, steps=steps, sinkhorn_max_iter=30, accept_tol=math.inf)
        atk2(x, torch.full_like(y, 9))
        assert atk2.last_radius_used.max().item() == eps, (eps, steps)
        assert (atk2.last_radius_used == eps).all()
        # the cost of the returned point's certified plan (fastadv.ot_certificate): within the radius even
        # though these projections stop unconverged at 30 iterations
        assert (atk2.last_cost_bound <= eps * (1 + 1e-9)).all() and (atk2.last_cost_bound > 0).all()
        assert (atk2.last_clamped_mass >= 0).all()
        assert torch.isinf(atk2.last_radius).all() and not atk2.last_fooled.any()


def test_schedule_that_cannot_reach_eps_is_refused():
    net, _, _ = _setup(n=1)
    with pytest.raises(ValueError, match=r"eps_growth=\(0.001, 1.17, 10\) cannot reach eps=1 in steps=200"):
        WassersteinPGD(net, eps=1.0, kernel_size=7, eps_growth=(0.001, 1.17, 10))
    with pytest.raises(ValueError, match="steps=440"):  # the last step's radius 0.001 * 1.17**43 = 0.86
        WassersteinPGD(net, eps=1.0, steps=440, eps_growth=(0.001, 1.17, 10))
    atk = WassersteinPGD(net, eps=1.0, steps=441, eps_growth=(0.001, 1.17, 10))  # 0.001 * 1.17**44 = 1.0004
    assert atk.schedule == (0.001, 1.17, 10)
