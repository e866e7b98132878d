"""FOSC dynamic AT, aRUB, cost-sensitive AT and J-SIGR against their defining properties.

* fosc: each sample stops at the first step whose FOSC <= c (identical to a plain port of the reference
  loop, YisenWang/dynamic_adv_training pgd_attack.py), the linear c_t schedule, the code's loss weights;
* arub: on a linear model the loss is the CE of the exact worst case over the ball (closed form
  z_k - z_y + eps ||w_k - w_y||_*, and the model evaluated at the maximizing perturbation), and its
  training gradient equals a port of the reference per-class loop (kimvc7/Robustness);
* cost: the expected-cost term of a protected sample's loss is scaled by its cost exactly, the reference's
  cost matrix, the two-step FGSM loop (WinddyAkoky/Adversarial-cost-sensitive-learning);
* jsigr: the random-projection Jacobian estimate is unbiased for ||W||_F^2 on a linear model and the
  gradient penalty sees only the selected coordinates.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.attacks.fosc_pgd import FOSCPGD
from fastadv.attacks.pgd import random_start
from fastadv.metrics import fosc
from fastadv.train import methods as M
from fastadv.train.methods.arub import ARUB, input_jacobian
from fastadv.train.methods.cost import CostSensitiveAT, cost_sensitive_loss, expected_cost, protect_cost_matrix
from fastadv.train.methods.fosc import FOSCAT, fosc_schedule
from fastadv.train.methods.jsigr import (JSIGR, jacobian_frobenius_estimate, selective_gradient_penalty,
                                         selective_mask)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _bind(method, net):
    return method.bind(M.BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu")))


def _mlp(seed=0, d=64, k=5, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k))


def _linear(seed=0, d=64, k=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, k))


def _data(n=12, k=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g)


# --------------------------------------------------------------------------------------------- FOSC
def _ref_fosc_pgd(net, x, y, start, eps, alpha, steps, c, origin):
    """Port of LinfPGDAttack.perturb: step 0 always; before step t >= 1 the FOSC of the current iterate
    (fastadv.metrics.fosc about x0, or about the start as the code does) decides who moves."""
    xa = start.clone()
    taken = torch.zeros(x.shape[0], dtype=torch.int32)
    for t in range(steps):
        if origin == "clean":
            f = fosc(net, xa, x, y, eps)
        else:
            xr = xa.clone().requires_grad_(True)
            g0, = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="none").sum(), xr)
            f = eps * g0.flatten(1).abs().sum(1) - ((xa - start).flatten(1) * g0.flatten(1)).sum(1)
        move = torch.ones_like(f, dtype=torch.bool) if t == 0 else f > c
        xr = xa.clone().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="none").sum(), xr)
        new = torch.clamp(x + torch.clamp(xa + alpha * g.sign() - x, -eps, eps), 0.0, 1.0)
        xa = torch.where(move[:, None, None, None], new, xa)
        taken += move.int()
    return xa, taken


def _fosc_trajectory(net, x, y, start, eps, alpha, steps):
    """FOSC (about x0) of every iterate of the unstopped loop, (steps, B)."""
    xa, out = start.clone(), []
    for _ in range(steps):
        out.append(fosc(net, xa, x, y, eps))
        xr = xa.clone().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(net(xr), y, reduction="none").sum(), xr)
        xa = torch.clamp(x + torch.clamp(xa + alpha * g.sign() - x, -eps, eps), 0.0, 1.0)
    return torch.stack(out)


@pytest.mark.parametrize("origin", ["clean", "start"])
def test_fosc_pgd_stops_at_first_step_below_criterion(origin):
    net = _mlp()
    x, y = _data()
    eps, alpha, steps = 0.1, 0.025, 8
    start = random_start("linf", x, torch.full((12,), eps), (0.0, 1.0), torch.Generator().manual_seed(5))
    traj = _fosc_trajectory(net, x, y, start, eps, alpha, steps)
    # per-sample criteria that put the stops on different steps: halfway between FOSC(x^{t-1}) and FOSC(x^t)
    want = torch.arange(12) % (steps - 1) + 1
    c = torch.stack([(traj[t - 1, i] + traj[t, i]) / 2 for i, t in enumerate(want.tolist())])
    if origin == "clean":
        assert (traj[1:] < traj[:-1]).all(), "the test's FOSC trajectories must fall for the stops to be where wanted"
    x_ref, taken_ref = _ref_fosc_pgd(net, x, y, start, eps, alpha, steps, c, origin)
    atk = FOSCPGD(net, eps=eps, alpha=alpha, steps=steps, c=c, origin=origin,
                  generator=torch.Generator().manual_seed(5))
    x_adv = atk(x, y)
    assert torch.equal(atk.steps_taken, taken_ref)
    assert torch.equal(x_adv, x_ref)  # same ops in the same order: bit for bit
    if origin == "clean":
        # the defining property: stop at the first t >= 1 with FOSC(x^t) <= c, having taken t steps
        first = [next((t for t in range(1, steps) if traj[t, i] <= c[i]), steps) for i in range(12)]
        assert atk.steps_taken.tolist() == first == want.tolist()


def test_fosc_pgd_scalar_criterion_and_zero():
    net = _mlp(seed=2)
    x, y = _data(seed=3)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    start = random_start("linf", x, torch.full((12,), 0.1), (0.0, 1.0), gen())
    traj = _fosc_trajectory(net, x, y, start, 0.1, 0.025, 8)
    c = float(traj[1:].median())
    x_ref, taken_ref = _ref_fosc_pgd(net, x, y, start, 0.1, 0.025, 8, c, "clean")
    atk = FOSCPGD(net, eps=0.1, alpha=0.025, steps=8, c=c, generator=gen())
    assert torch.equal(atk(x, y), x_ref) and torch.equal(atk.steps_taken, taken_ref)
    assert atk.steps_taken.unique().numel() > 1  # the median criterion stops samples at different steps
    # c = 0 (after T'): the FOSC of a non-stationary iterate is > 0, so every sample takes every step
    atk0 = FOSCPGD(net, eps=0.1, alpha=0.025, steps=8, c=0.0, generator=gen())
    atk0(x, y)
    assert (atk0.steps_taken == 8).all()


def test_fosc_schedule_values():
    # train_models.py: fosc = max(fosc_max - fosc_max * ep / dynamic_epoch, 0), 120 epochs, dynamic_epoch 100
    assert fosc_schedule(0, 0.5, 100) == 0.5
    assert fosc_schedule(30, 0.5, 100) == pytest.approx(0.35, abs=1e-15)
    assert fosc_schedule(99, 0.5, 100) == pytest.approx(0.005, abs=1e-15)
    assert fosc_schedule(100, 0.5, 100) == 0.0 and fosc_schedule(119, 0.5, 100) == 0.0
    m = FOSCAT()
    cs = []
    for e in range(120):
        m.on_epoch(e, 120)  # T' = 100/120 of the epochs = 100
        cs.append(m.c)
    assert cs == [fosc_schedule(e, 0.5, 100.0) for e in range(120)]
    m = FOSCAT(c_max=0.3, dynamic_epochs=4)
    for e, want in enumerate([0.3, 0.225, 0.15, 0.075, 0.0, 0.0]):
        m.on_epoch(e, 6)
        assert m.c == pytest.approx(want, abs=1e-15)


def test_fosc_method_weights_and_metrics():
    net = _mlp(seed=4)
    x, y = _data(seed=6)
    m = _bind(FOSCAT(eps=0.1, steps=6), net)
    m.on_epoch(0, 6)
    torch.manual_seed(11)
    out0 = m.loss(x, y)  # epoch 0: unweighted CE on the FOSC-stopped batch
    torch.manual_seed(11)
    atk = m.attack()
    xa = atk(x, y)
    assert torch.equal(out0.loss, F.cross_entropy(net(xa), y))
    steps0 = atk.steps_taken.double().mean().item()
    rec = m.epoch_metrics()
    assert rec["fosc_c"] == 0.5 and rec["fosc_mean_steps"] == pytest.approx(steps0, abs=1e-12)
    m.on_epoch(1, 6)
    assert m.epoch_metrics() == {"fosc_c": pytest.approx(0.5 - 0.5 / 5)}  # counters reset, T' = 5
    torch.manual_seed(12)
    out1 = m.loss(x, y)
    torch.manual_seed(12)
    xa = m.attack()(x, y)
    z = net(xa)
    ce = F.cross_entropy(z, y, reduction="none")
    w = -torch.log(F.softmax(z, 1).gather(1, y[:, None]).squeeze(1) + 1e-12).detach()
    want = (w * ce).mean() / (w != 0).float().mean()  # Keras' sample_weight mean
    torch.testing.assert_close(out1.loss, want, rtol=1e-6, atol=0)


def test_fosc_weights_use_inference_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    x, y = _data(seed=2)
    net(x)  # non-trivial running statistics
    m = _bind(FOSCAT(), net)
    w = m.sample_weights(x, y, net(x))
    net.eval()
    want = -torch.log(F.softmax(net(x), 1).gather(1, y[:, None]).squeeze(1) + 1e-12)
    net.train()
    assert net.training and torch.equal(w, want)


# --------------------------------------------------------------------------------------------- aRUB
def _dual(a, norm):
    return {"linf": a.abs().sum(-1), "l2": a.norm(dim=-1), "l1": a.abs().amax(-1)}[norm]


def _worst_direction(a, eps, norm):
    """argmax over ||d|| <= eps of <a, d> (rows of a)."""
    if norm == "linf":
        return eps * a.sign()
    if norm == "l2":
        return eps * a / a.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    i = a.abs().argmax(-1, keepdim=True)
    return torch.zeros_like(a).scatter(-1, i, eps * a.gather(-1, i).sign())


@pytest.mark.parametrize("norm", ["linf", "l2", "l1"])
def test_arub_linear_model_is_exact_worst_case_ce(norm):
    net = _linear(d=64, k=5)
    x, y = _data(n=8)
    eps = {"linf": 0.03, "l2": 0.5, "l1": 2.0}[norm]
    m = _bind(ARUB(eps=eps, norm=norm), net)
    got = m.loss(x, y).loss
    w, bias = net[1].weight.detach().double(), net[1].bias.detach().double()
    xf = x.flatten(1).double()
    z = xf @ w.T + bias
    a = w[None, :, :] - w[y][:, None, :]                     # (B, K, D): w_k - w_y
    hand = torch.logsumexp(z - z.gather(1, y[:, None]) + eps * _dual(a, norm), dim=1).mean()
    # the same number from the model at the maximizing perturbation of each margin z_k - z_y
    d = _worst_direction(a, eps, norm)                          # (B, K, D)
    zk = torch.einsum("bkd,kd->bk", xf[:, None, :] + d, w) + bias
    zy = torch.einsum("bkd,bd->bk", xf[:, None, :] + d, w[y]) + bias[y][:, None]
    attained = torch.logsumexp(zk - zy, dim=1).mean()
    torch.testing.assert_close(hand, attained, rtol=1e-12, atol=0)
    # float32 sums of D = 64 products: ~64 * 1e-7 relative
    torch.testing.assert_close(got.double(), hand, rtol=1e-5, atol=0)
    if norm == "linf":
        assert torch.equal(_bind(ARUB(eps=0.0), net).loss(x, y).loss, F.cross_entropy(net(x), y))


def test_arub_box_variant_linear():
    net = _linear(d=64, k=5, seed=3)
    x, y = _data(n=8, seed=4)
    eps = 0.2  # large enough that the box cuts the ball for many pixels
    got = _bind(ARUB(eps=eps, box=True), net).loss(x, y).loss
    w, bias = net[1].weight.detach().double(), net[1].bias.detach().double()
    xf = x.flatten(1).double()
    z = xf @ w.T + bias
    a = w[None] - w[y][:, None]
    hi, lo = (1 - xf).clamp(max=eps)[:, None], (-xf).clamp(min=-eps)[:, None]
    d = torch.where(a > 0, hi, lo)                              # the box-and-ball maximizer of <a, d>
    assert ((xf[:, None] + d) >= 0).all() and ((xf[:, None] + d) <= 1).all() and (d.abs() <= eps).all()
    hand = torch.logsumexp(z - z.gather(1, y[:, None]) + (a * d).sum(-1), dim=1).mean()
    torch.testing.assert_close(got.double(), hand, rtol=1e-5, atol=0)


def test_arub_jacobian_and_gradient_match_reference_loop():
    net = _mlp(seed=5)
    x, y = _data(n=6, seed=7)
    xr = x.clone().requires_grad_(True)
    z = net(xr)
    jac = input_jacobian(z, xr)
    per_sample = torch.func.vmap(torch.func.jacrev(lambda xi: net(xi[None])[0]))(x)  # (B, K, 1, 8, 8)
    torch.testing.assert_close(jac.transpose(0, 1), per_sample, rtol=1e-5, atol=1e-7)
    m = _bind(ARUB(eps=0.05), net)
    net.zero_grad()
    m.loss(x, y).loss.backward()
    ours = [p.grad.clone() for p in net.parameters()]
    # port of RobustifyNetwork._full_call ('linf'): per class, the tape gradient of z_i - z_y, then
    # exp(eps * ||grad||_1 + (z_i - z_y)) summed, log, mean; the training gradient through the tape
    net.zero_grad()
    xr = x.clone().requires_grad_(True)
    z = net(xr)
    zy = z.gather(1, y[:, None]).squeeze(1)
    sum_exps = 0
    for i in range(z.shape[1]):
        nom = z[:, i] - zy
        g, = torch.autograd.grad(nom.sum(), xr, retain_graph=True, create_graph=True)
        sum_exps = sum_exps + torch.exp(0.05 * g.flatten(1).abs().sum(1) + nom)
    torch.log(sum_exps).mean().backward()
    for a, b in zip(ours, [p.grad for p in net.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert torch.isfinite(a).all()


def test_arub_l2_gradient_finite():
    net = _mlp(seed=6)
    x, y = _data(n=4)
    net.zero_grad()
    _bind(ARUB(eps=0.5, norm="l2"), net).loss(x, y).loss.backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in net.parameters())


# --------------------------------------------------------------------------------------------- cost
def test_protect_cost_matrix_is_the_reference_one():
    for p in range(4):
        want = torch.ones(4, 4)  # utils.get_cost_matric(i_label, c)
        want[p, :] = 10
        want[:, p] = 10
        want = want - torch.diag(want.diag())
        assert torch.equal(protect_cost_matrix(4, [p], 10.0), want)
    two = protect_cost_matrix(5, [1, 3], 4.0)
    assert two[1, 0] == two[0, 3] == 4 and two[0, 2] == 1 and two.diag().abs().sum() == 0


def test_cost_gradient_of_protected_sample_scaled_by_cost_exactly():
    torch.manual_seed(0)
    k, prot, c = 6, 2, 8.0  # a power of two: scaling commutes with float rounding, so "exactly" is bit for bit
    z = torch.randn(4, k, dtype=torch.float32)
    y = torch.tensor([prot, prot, 0, 5])

    def term_grad(cost):
        zz = z.clone().requires_grad_(True)
        return torch.autograd.grad(expected_cost(zz, y, cost).sum(), zz)[0]

    g_c = term_grad(protect_cost_matrix(k, [prot], c))
    g_1 = term_grad(protect_cost_matrix(k, [], 1.0))  # uniform costs 1 - I
    assert torch.equal(g_c[:2], c * g_1[:2])  # protected samples: the cost term is c (1 - p_y)
    p = F.softmax(z, 1)
    e = torch.eye(k)
    for i in (2, 3):  # unprotected: (1 - p_y) + (c - 1) p_prot
        u = int(y[i])
        want = -p[i, u] * (e[u] - p[i]) + (c - 1) * p[i, prot] * (e[prot] - p[i])
        torch.testing.assert_close(g_c[i], want, rtol=1e-6, atol=1e-7)
    # the full (mean) loss: dL/dz_i = ((p_i - e_y) + term gradient) / B
    zz = z.clone().requires_grad_(True)
    gl, = torch.autograd.grad(cost_sensitive_loss(zz, y, protect_cost_matrix(k, [prot], c)), zz)
    torch.testing.assert_close(gl, (p - e[y] + g_c) / 4, rtol=1e-6, atol=1e-7)


def test_cost_method_two_steps_fgsm_and_per_class_accuracy():
    net = _mlp(seed=7)
    x, _ = _data(n=10, seed=8)
    y = torch.tensor([0, 1, 2, 3, 4, 1, 1, 0, 2, 3])
    m = _bind(CostSensitiveAT(protected=[1], cost=10.0, eps=0.06), net)
    C = protect_cost_matrix(5, [1], 10.0)
    m.on_epoch(0, 1)
    m.on_step(0, 2)
    out = m.loss(x, y)  # replay 0: the clean cost-sensitive step
    assert torch.equal(out.loss, cost_sensitive_loss(net(x), y, C))
    with torch.no_grad():  # the trainer's optimizer step between the replays
        for prm in net.parameters():
            prm.add_(0.01)
    out = m.loss(x, y)  # replay 1: FGSM on L_C against the updated model, then L_C on it
    xr = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(cost_sensitive_loss(net(xr), y, C), xr)
    x_adv = (x + 0.06 * g.sign()).clamp(0, 1)
    torch.testing.assert_close(out.loss, cost_sensitive_loss(net(x_adv), y, C), rtol=1e-6, atol=0)
    pred = net(x_adv).argmax(1)
    rec = m.epoch_metrics()
    for cls in range(5):
        sel = y == cls
        if sel.any():
            assert rec[f"cost_adv_acc_class{cls}"] == pytest.approx((pred[sel] == cls).float().mean().item())
    assert rec["cost_adv_acc_protected"] == pytest.approx((pred[y == 1] == 1).float().mean().item())
    m.on_step(1, 2)
    assert m._phase == 0  # each batch starts with the clean step
    with pytest.raises(ValueError, match="protected"):
        _bind(CostSensitiveAT(protected=[7]), net).loss(x, y)
    with pytest.raises(ValueError, match="cost"):
        CostSensitiveAT(cost=[[0, 1, 2]])


# --------------------------------------------------------------------------------------------- J-SIGR
def test_jacobian_estimate_unbiased_on_linear_model():
    k, d, n = 5, 20, 20000
    torch.manual_seed(0)
    net = nn.Linear(d, k)
    x = torch.randn(n, d, requires_grad=True)  # one estimate per row: n independent projections
    est = jacobian_frobenius_estimate(net(x), x, generator=torch.Generator().manual_seed(0), create_graph=False)
    w = net.weight.detach().double()
    a = w @ w.T
    exact = (w * w).sum()
    # v uniform on the sphere: Var[K v'Av] = 2K/(K+2) (tr A^2 - (tr A)^2 / K)
    var = 2 * k / (k + 2) * ((a @ a).trace() - a.trace() ** 2 / k)
    tol = 5 * math.sqrt(var / n)
    assert abs(est.double().mean() - exact) < tol
    assert tol < 0.05 * exact  # the test can tell a biased estimator (e.g. a missing factor K) apart


def test_selective_mask_restricts_gradient_penalty():
    net = _linear(d=64, k=5, seed=9)
    x, y = _data(n=3, seed=10)
    torch.manual_seed(1)
    delta = torch.randn_like(x) * torch.rand_like(x)  # distinct magnitudes
    mask = selective_mask(delta, 0.25)
    top = delta.flatten(1).abs().topk(16, dim=1).indices
    want = torch.zeros(3, 64, dtype=torch.bool).scatter(1, top, True)
    assert torch.equal(mask.flatten(1), want)  # exactly the ceil(0.25 * 64) = 16 largest |delta|
    # the penalty of the method's input gradient against the closed form W^T (p - e_y) on the mask
    m = _bind(JSIGR(jacobian_weight=0.0, gradient_weight=1.0), net)
    _, ce, _, pen = m.terms(x, y, mask)
    w, b = net[1].weight.detach().double(), net[1].bias.detach().double()
    p = F.softmax(x.flatten(1).double() @ w.T + b, 1)
    g = (p - torch.eye(5, dtype=torch.double)[y]) @ w  # (B, D)
    torch.testing.assert_close(pen.double(), (g * g * want).sum(1), rtol=1e-5, atol=0)
    _, _, _, pen_rest = m.terms(x, y, ~mask)
    torch.testing.assert_close(pen + pen_rest, (g * g).sum(1).float(), rtol=1e-5, atol=0)
    # ties are kept: a saturated L-inf perturbation selects all of its +-eps coordinates
    sat = torch.where(delta > 0, 0.03, -0.03) * (delta.abs() > 0.2)
    assert torch.equal(selective_mask(sat, 0.1), sat != 0)


def test_jsigr_loss_composition():
    net = _mlp(seed=11)
    x, y = _data(n=6, seed=12)
    m = _bind(JSIGR(eps=0.1, alpha=0.025, steps=3, jacobian_weight=0.5, gradient_weight=2.0), net)
    m.on_epoch(0, 1)
    torch.manual_seed(3)
    out = m.loss(x, y)
    torch.manual_seed(3)
    mask = m.mask(x, y)
    _, ce, jac, pen = m.terms(x, y, mask)
    torch.testing.assert_close(out.loss, ce.mean() + 0.25 * jac.mean() + 2.0 * pen.mean(), rtol=1e-6, atol=0)
    net.zero_grad()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    rec = m.epoch_metrics()
    assert 0 < rec["jsigr_mask_frac"] <= 1 and rec["jsigr_jacobian"] > 0
    assert selective_gradient_penalty(torch.ones(2, 3), torch.tensor([[1, 0, 1], [0, 0, 0]]).bool()).tolist() == [2, 0]


def test_fosc_compaction_equals_the_masked_loop():
    # eval mode: stopped samples leave the batch (engine stop=...); 'as-is' on an eval-mode net runs the
    # masked loop with the same math: same iterates, same steps, bit for bit
    from fastadv.attacks import FOSCPGD

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.Tanh(),
                              torch.nn.Linear(12, 4)).eval()
    x, y = torch.rand(9, 1, 4, 4), torch.randint(0, 4, (9,))
    c = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0])
    outs = []
    for mode in ("eval", "as-is"):
        g = torch.Generator().manual_seed(3)
        atk = FOSCPGD(net, eps=0.3, alpha=0.05, steps=8, c=c, generator=g, model_mode=mode)
        outs.append((atk(x, y), atk.steps_taken.clone(), atk.last_fosc.clone()))
    (xa, sa, fa), (xb, sb, fb) = outs
    assert torch.equal(xa, xb) and torch.equal(sa, sb)
    # last_fosc of a stopped sample: taken at its stop (compacted) or recomputed at the same point in a
    # batch of another size (masked): equal up to float32 rounding of 16-term sums
    assert torch.allclose(fa, fb, rtol=1e-5, atol=1e-6)
    assert len(set(sa.tolist())) > 2  # the criteria stop samples at different steps: compaction ran
