"""Ensembles (fastadv.models.Ensemble), the MCE loss, margin boosting, TRS and transfer matrices.

Each against its defining property and, for the training methods, a plain port of the authors' loops
(zdhNarsil/Margin-Boosting lib/attack/pgd.py ``my_ensemble_mr_oa_attack``; AI-secure/Transferability-
Reduced-Smooth-Ensemble train/Empirical/trainer.py ``TRS_Trainer`` and its ``PGD``), written here line by
line on tiny models (1x8x8 inputs, a few samples).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadv.attacks
from fastadv.attacks import PGD
from fastadv.attacks.base import attack_loss, grad_objective
from fastadv.attacks.transfer import TransferAttack, ensemble_sources, format_transfer_matrix, transfer_matrix
from fastadv.losses import mce_loss
from fastadv.models import Ensemble
from fastadv.train.methods.base import BindContext
from fastadv.train.methods.boosting import MarginBoost, MCEPGD, train_boosted
from fastadv.train.methods.trs import TRS, pairwise_abs_cosine
from fastadv.train.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def mlp(seed, k=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, k))


def bn_cnn(seed, k=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, k))


def warm_bn(net):
    """Non-trivial running statistics, then eval mode."""
    net.train()
    with torch.no_grad():
        net(torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(7)) * 2)
    return net.eval()


def batch(n=12, seed=3, k=10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g)


def bind(method, net):
    return method.bind(BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu")))


# ------------------------------------------------------------------ Ensemble
def test_combine_formulas_and_weights():
    ms = [mlp(i).eval() for i in range(3)]
    x, _ = batch()
    with torch.no_grad():
        z = [m(x) for m in ms]
        # 'logits': the reference loops' (z0 + z1 + z2) / 3, the same float32 operations, so bit for bit
        assert torch.equal(Ensemble(ms)(x), (z[0] + z[1] + z[2]) / 3)
        # 'probs': log of the mean probability (TRS' models/ensemble.py); logsumexp of log-probs vs the direct
        # formula in float64: float32 rounding of a 10-term softmax, ~1e-7 relative
        p = Ensemble(ms, combine="probs")(x)
        direct = torch.log(sum(F.softmax(t.double(), 1) for t in z) / 3)
        torch.testing.assert_close(p.double(), direct, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p.logsumexp(1), torch.zeros(x.shape[0]), rtol=0, atol=1e-6)  # log-probabilities
        # CE downstream is -log of the mean probability of y
        y = torch.arange(x.shape[0]) % 10
        torch.testing.assert_close(F.cross_entropy(p, y, reduction="none").double(),
                                   -direct.gather(1, y[:, None]).squeeze(1), rtol=1e-6, atol=1e-6)
        # weights (normalized): weighted mean of logits; a zero weight drops a member from 'probs'
        w = Ensemble(ms, weights=[1.0, 3.0, 0.0])
        torch.testing.assert_close(w(x), 0.25 * z[0] + 0.75 * z[1], rtol=1e-6, atol=1e-6)
        pw = Ensemble(ms, combine="probs", weights=[2.0, 0.0, 2.0])(x)
        want = torch.log((F.softmax(z[0].double(), 1) + F.softmax(z[2].double(), 1)) / 2)
        torch.testing.assert_close(pw.double(), want, rtol=1e-6, atol=1e-6)
        # one member: z itself / log_softmax(z)
        assert torch.equal(Ensemble(ms[:1])(x), z[0])
        torch.testing.assert_close(Ensemble(ms[:1], combine="probs")(x), F.log_softmax(z[0], 1))
        assert Ensemble(ms)(x, per_member=True).shape == (3, x.shape[0], 10)
    assert "weights" not in Ensemble(ms).state_dict() and "weights" in Ensemble(ms, weights=[1, 1, 2]).state_dict()
    assert fastadv.attacks.Ensemble is Ensemble  # one implementation, the old name kept
    with pytest.raises(ValueError, match="combine"):
        Ensemble(ms, combine="mean")
    with pytest.raises(ValueError, match="weights"):
        Ensemble(ms, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        Ensemble(ms, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="vectorize=True"):
        Ensemble([mlp(0), bn_cnn(1)], vectorize=True)


@pytest.mark.parametrize("combine", ["logits", "probs"])
def test_vmap_path_equals_loop(combine):
    ms = [warm_bn(bn_cnn(i)) for i in range(3)]
    x, y = batch()
    loop = Ensemble(ms, combine=combine, vectorize=False)
    vec = Ensemble(ms, combine=combine, vectorize=True)
    assert vec.uses_vmap(x) and not loop.uses_vmap(x)
    assert not Ensemble(ms, vectorize="auto").uses_vmap(x)  # auto: CUDA inputs only
    # The batched convolution sums its 9-term windows and the Linear its 144-term rows in another order than
    # the per-member calls: float32 rounding ~ 150 * 6e-8 ~ 1e-5 on logits of size ~1 (measured: 4.5e-8).
    tol = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        a = loop(x)
        torch.testing.assert_close(vec(x), a, **tol)       # cached stack
        buffers = {k: v.clone() for k, v in vec.named_buffers()}
        ms[1][0].weight.mul_(1.5)                          # an in-place weight change refreshes the cache
        torch.testing.assert_close(vec(x), loop(x), **tol)
        assert not torch.allclose(vec(x), a)
    assert all(torch.equal(b, dict(vec.named_buffers())[k]) for k, b in buffers.items())  # BN stats untouched
    # with grad: the stack is rebuilt differentiably, so parameter and input gradients are the loop's
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(vec(xr), y).backward()
    g_vec = [p.grad.clone() for m in ms for p in m.parameters()] + [xr.grad.clone()]
    for m in ms:
        m.zero_grad()
    xr.grad = None
    F.cross_entropy(loop(xr), y).backward()
    g_loop = [p.grad for m in ms for p in m.parameters()] + [xr.grad]
    for gv, gl in zip(g_vec, g_loop):
        torch.testing.assert_close(gv, gl, **tol)
    # train mode (batch statistics) always loops on the members' own modules
    vec.train()
    assert not vec.uses_vmap(x)


def test_ensemble_under_attack_and_evaluate():
    ms = [mlp(i).eval() for i in range(3)]
    x, y = batch()

    class Mean(nn.Module):  # the plain mean of logits, written out
        def forward(self, inp):
            return (ms[0](inp) + ms[1](inp) + ms[2](inp)) / 3

    a = PGD(Ensemble(ms), eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    b = PGD(Mean(), eps=0.1, alpha=0.02, steps=5, random_start=False)(x, y)
    assert torch.equal(a, b)
    from fastadv.evaluation import evaluate

    ens = Ensemble(ms)
    with torch.no_grad():
        robust = (ens(b).argmax(1) == y).float().mean().item()
    r = evaluate(ens, (x, y), attacks=[("pgd", PGD(ens, 0.1, 0.02, 5, random_start=False))], eps=0.1,
                 checks=False, progress=False)
    assert r["robust_accuracy"] == pytest.approx(robust)


# ------------------------------------------------------------------ MCE
def test_mce_closed_form():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 3.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])

    def by_hand(row, label):
        lse = math.log(sum(math.exp(v) for v in row))
        ce = lse - row[label]
        neg = math.log(sum(math.exp(-v) for v in row))  # log sum_k exp(-z_k)
        other = sum(row[j] + neg for j in range(3) if j != label) / 2  # mean over j != y of -log softmax(-z)_j
        return ce, other

    parts = [by_hand(z[i].tolist(), int(y[i])) for i in range(2)]
    for w in (0.0, 1.0, 2.5):
        want = torch.tensor([ce + w * o for ce, o in parts], dtype=torch.float64)
        torch.testing.assert_close(mce_loss(z, y, weight=w, reduction="none"), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mce_loss(z, y, weight=w), want.mean(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mce_loss(z, y, weight=w, reduction="sum"), want.sum(), rtol=1e-12, atol=1e-12)
    assert torch.equal(mce_loss(z, y, weight=0.0, reduction="none"), F.cross_entropy(z, y, reduction="none"))
    # the attack kind: PGD(loss='mce') maximizes weight-1 MCE; targeted negates it
    torch.testing.assert_close(attack_loss("mce", z, y, False), mce_loss(z, y, reduction="none"))
    torch.testing.assert_close(attack_loss("mce", z, y, True), -mce_loss(z, y, reduction="none"))
    cost, _ = grad_objective("mce", z, y, False)
    torch.testing.assert_close(cost, mce_loss(z, y))
    with pytest.raises(ValueError, match="weight"):
        mce_loss(z, y, weight=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        mce_loss(z, y, reduction="avg")
    net = mlp(0).eval()
    x, yy = batch()
    a = PGD(net, eps=0.1, alpha=0.02, steps=3, random_start=False, loss="mce")(x, yy)
    b = MCEPGD(net, eps=0.1, alpha=0.02, steps=3, random_start=False, mce_weight=1.0)(x, yy)
    assert torch.equal(a, b)


# ------------------------------------------------------------------ margin boosting
def _ref_ensemble_mr_oa_attack(nets, inp, label, start, eps, sigma, steps, other_weight, k=10):
    """zdhNarsil/Margin-Boosting lib/attack/pgd.py IPGD.my_ensemble_mr_oa_attack, from a given start."""
    for net in nets:
        net.eval()
    x = start.clone()
    for _ in range(steps):
        x.requires_grad_()
        with torch.enable_grad():
            pred = sum([net(x) for net in nets]) / len(nets)
            loss = F.cross_entropy(pred, label)
            other = -F.log_softmax(-pred, dim=1) * (1 - F.one_hot(label, num_classes=k))
            loss = loss + other_weight * (other.sum() / ((k - 1) * len(label)))
        g = torch.autograd.grad(loss, x)[0].detach().sign()
        x = x.detach() + sigma * g
        x = torch.min(torch.max(x, inp - eps), inp + eps)
        x = torch.clamp(x, 0.0, 1.0)
    return x


def test_boost_attack_is_crafted_on_the_ensemble():
    frozen = [warm_bn(bn_cnn(i)) for i in range(2)]
    new = bn_cnn(5)  # in train mode, as the trainer leaves it
    method = bind(MarginBoost(frozen, eps=0.1, alpha=0.02, steps=5, mce_weight=2.0), new)
    x, y = batch()
    torch.manual_seed(11)
    ours = method.perturb(x, y)
    assert new.training and all(not m.training for m in frozen)  # modes restored after the attack
    torch.manual_seed(11)  # the same draw as MCEPGD.start: U(-eps/2, eps/2) via torch.rand * 2 - 1
    start = (x + (torch.rand(x.shape) * 2 - 1) * 0.05).clamp(0, 1)
    ref = _ref_ensemble_mr_oa_attack(frozen + [new], x, y, start, 0.1, 0.02, 5, 2.0)
    new.train()
    # the reference projects with min/max, ours clip(x0 + clamp(x' - x0)): the same up to one float32 rounding
    # of x0 + (x' - x0) per step (<= 6e-8 each, 5 steps); the signs agree, so no step differs
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # not the attack on the new member alone
    torch.manual_seed(11)
    alone = MCEPGD(new, eps=0.1, alpha=0.02, steps=5, mce_weight=2.0, model_mode="eval")(x, y)
    assert (alone - ours).abs().max() > 0.01
    # the training loss at a given x': MCE of the new member's logits (the reference's --individual) or of the
    # mean logits (its other branch), the new member in train mode (batch statistics)
    for loss_on in ("member", "ensemble"):
        m = bind(MarginBoost(frozen, mce_weight=2.0, loss_on=loss_on), new)
        m.perturb = lambda xx, yy: ours
        got = m.loss(x, y).loss
        with torch.no_grad():
            z = new(ours) if loss_on == "member" else (frozen[0](ours) + frozen[1](ours) + new(ours)) / 3
        torch.testing.assert_close(got.detach(), mce_loss(z, y, weight=2.0), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="loss_on"):
        MarginBoost(frozen, loss_on="sum")


@pytest.mark.parametrize("loss_on", ["member", "ensemble"])
def test_train_boosted_freezes_earlier_members(loss_on):
    x, y = batch(n=32, seed=4)
    snaps = {}

    def cb(t, member, result):
        snaps[t] = {k: v.detach().clone() for k, v in member.state_dict().items()}

    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.05, schedule="constant", progress=False,
                      plot=False, eval_steps=2, eval_samples=8, workers=0)
    ens = train_boosted(lambda: bn_cnn(0), 3, (x, y), (x, y), cfg, callback=cb, eps=0.1, alpha=0.05, steps=2,
                        loss_on=loss_on)
    assert isinstance(ens, Ensemble) and len(ens) == 3 and not ens.training
    for t in range(3):  # each member's weights and BN buffers bitwise as they were when it finished
        now = ens.members[t].state_dict()
        assert all(torch.equal(now[k], snaps[t][k]) for k in now), t
    assert not all(torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])  # member 1 was trained
    assert all(not p.requires_grad for m in ens.members[:2] for p in m.parameters())


# ------------------------------------------------------------------ TRS
def _ref_cosine(g1, g2):
    return torch.abs(F.cosine_similarity(g1, g2)).mean()


def _ref_magnitude(g):
    return (torch.sum(g ** 2, 1)).mean() * 2


def _ref_trs_loss(models, inputs, targets, scale, coeff, lamda):
    """TRS_Trainer with plus_adv=False, three members."""
    inputs = inputs.clone().requires_grad_(True)
    grads, loss_std = [], 0
    for m in models:
        loss = F.cross_entropy(m(inputs), targets)
        grads.append(torch.autograd.grad(loss, inputs, create_graph=True)[0].flatten(start_dim=1))
        loss_std += loss
    cos_loss = (_ref_cosine(grads[0], grads[1]) + _ref_cosine(grads[0], grads[2])
                + _ref_cosine(grads[1], grads[2])) / 3.
    smooth = 0
    for m in models:
        loss = F.cross_entropy(m(inputs), targets)
        smooth += _ref_magnitude(torch.autograd.grad(loss, inputs, create_graph=True)[0].flatten(start_dim=1))
    smooth /= 3
    return loss_std + scale * (coeff * cos_loss + lamda * smooth)


def _ref_trs_pgd(models, inputs, labels, eps, start, steps=6):
    """trainer.py PGD (adv.grad never zeroed inside the loop), from a given start."""
    alpha = eps / 3.
    adv = start.clone()
    adv.requires_grad = True
    for _ in range(steps):
        grad_loss = 0
        for m in models:
            loss = F.cross_entropy(m(adv), labels)
            grad_loss += _ref_magnitude(torch.autograd.grad(loss, adv, create_graph=True)[0].flatten(start_dim=1))
        grad_loss /= 3
        grad_loss.backward()
        sign_grad = adv.grad.data.sign()
        with torch.no_grad():
            adv.data = adv.data + alpha * sign_grad
            adv.data = torch.max(torch.min(adv.data, inputs + eps), inputs - eps)
            adv.data = torch.clamp(adv.data, 0., 1.)
    return adv.detach()


def test_trs_cosine_term():
    x, y = batch()
    twin = mlp(0)
    same = Ensemble([twin, mlp(0)])  # identical weights: identical input gradients
    method = bind(TRS(plus_adv=False), same)
    method.loss(x, y)
    # |cos(g, g)| = g.g / (|g| |g|): float32 rounding of 64-term sums, ~64 * 6e-8 ~ 4e-6
    assert abs(float(method.last["cos"]) - 1.0) < 1e-5
    # the cos term's gradient reaches every member of a 3-member ensemble
    ens = Ensemble([mlp(i) for i in range(3)])
    xr = x.clone().requires_grad_(True)
    z = ens(xr, per_member=True)
    grads = [torch.autograd.grad(F.cross_entropy(z[m], y), xr, create_graph=True)[0].flatten(1) for m in range(3)]
    pairwise_abs_cosine(grads).backward()
    for i, m in enumerate(ens.members):
        assert m[1].weight.grad is not None and m[1].weight.grad.abs().sum() > 0, i
    with pytest.raises(ValueError, match=">= 2 members"):
        bind(TRS(), Ensemble([mlp(0)]))
    with pytest.raises(TypeError, match="Ensemble"):
        bind(TRS(), mlp(0))


def test_trs_matches_reference_loop():
    x, y = batch()
    ms = [mlp(i) for i in range(3)]
    ens = Ensemble(ms)
    method = bind(TRS(scale=5.0, coeff=2.0, lamda=2.0, plus_adv=False), ens)
    ours = method.loss(x, y).loss
    ours.backward()
    g_ours = [p.grad.clone() for p in ens.parameters()]
    ens.zero_grad()
    ref = _ref_trs_loss(ms, x, y, 5.0, 2.0, 2.0)
    ref.backward()
    # the same operations except the order of the pairwise cosine sum: float32, ~1e-6 relative
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, [p.grad for p in ens.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the smoothness PGD (accumulated gradient signs) from the same start as the reference's
    g = torch.Generator().manual_seed(5)
    adv = method.smooth_pgd(x, y, 0.1, generator=g)
    start = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * 2 - 1) * 0.1).clamp(0, 1)
    ref_adv = _ref_trs_pgd(ms, x, y, 0.1, start)
    torch.testing.assert_close(adv, ref_adv, rtol=0, atol=1e-6)  # projection rounding as in the boosting test
    assert (adv - x).abs().max() <= 0.1 + 1e-6
    # eps schedule: the reference's cureps
    method.on_epoch(3, 10)
    assert method.current_eps() == pytest.approx(0.1 + 0.1 * 3 / 10)


def test_trs_trains_an_ensemble_with_the_trainer():
    from fastadv.train.trainer import Trainer

    x, y = batch(n=32, seed=6)
    ens = Ensemble([bn_cnn(i) for i in range(2)])
    before = [p.detach().clone() for p in ens.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-3, schedule="constant", progress=False,
                      plot=False, workers=0)
    res = Trainer(ens, TRS(), (x, y), None, cfg).fit()
    assert res["step"] == 2 and 0 <= res["history"][-1]["trs_cos"] <= 1
    for i, m in enumerate(ens.members):  # every member's parameters were trained
        assert any(not torch.equal(p, before[j]) for j, p in enumerate(ens.parameters())
                   if any(p is q for q in m.parameters())), i


# ------------------------------------------------------------------ transfer
def test_transfer_matrix():
    ms = [mlp(i).eval() for i in range(2)]
    ens = Ensemble(ms)
    x, y = batch(n=20)
    with torch.no_grad():
        y = ens(x).argmax(1)  # clean-correct for the ensemble
    models = ensemble_sources(ens)
    assert list(models) == ["member0", "member1", "ensemble"]
    res = transfer_matrix(models, x, y, eps=0.2, steps=5, batch_size=8, seed=3)
    assert res["sources"] == res["targets"] == ["member0", "member1", "ensemble"]
    # every entry by hand: PGD on the source with generator seed + i, in batches of 8, then the target's accuracy
    for i, (s, src) in enumerate(models.items()):
        gen = torch.Generator().manual_seed(3 + i)
        atk = PGD(src, eps=0.2, alpha=2.5 * 0.2 / 5, steps=5, generator=gen)
        adv = torch.cat([atk(x[lo:lo + 8], y[lo:lo + 8]) for lo in range(0, 20, 8)])
        for t, tgt in models.items():
            with torch.no_grad():
                acc = (tgt(adv).argmax(1) == y).float().mean().item()
            assert res["robust_accuracy"][s][t] == pytest.approx(acc), (s, t)
    assert res["clean_accuracy"]["ensemble"] == 1.0
    # white-box (diagonal) PGD fools its own model at least as often as the transferred examples here
    assert res["robust_accuracy"]["ensemble"]["ensemble"] < 1.0
    table = format_transfer_matrix(res)
    assert "| member0 |" in table and "(clean)" in table
    # TransferAttack on a dict of sources = PGD on their ensemble
    tr = TransferAttack(ms[0], {"a": ms[0], "b": ms[1]}, eps=0.2, alpha=0.05, steps=5, random_start=False)
    assert torch.equal(tr(x, y), PGD(ens, eps=0.2, alpha=0.05, steps=5, random_start=False)(x, y))
    with pytest.raises(ValueError, match="early_stop"):
        transfer_matrix(models, x, y, eps=0.2, early_stop=True)
