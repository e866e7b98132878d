"""Each training method against its DEFINING property and a plain port of its authors' loop.

The ports (``_ref_*``) follow the reference code line by line (yaodongyu/TRADES trades.py,
zjfheart/Friendly-Adversarial-Training earlystop.py + FAT_for_TRADES.py, locuslab/fast_adversarial
train_fgsm.py, mahyarnajibi/FreeAdversarialTraining main_free.py); models with batch norm check that the
running statistics after a step equal the port's (separate clean/adversarial forwards).
"""
import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.data import embedded_mnist
from fastadv.models import MnistCNN
from fastadv.train import methods as M

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def batch():
    x, y = embedded_mnist("train")
    return x[:32].clone(), y[:32].clone()


def _net(seed=0):
    torch.manual_seed(seed)
    return MnistCNN(width=0.25)


def _bn_net(seed=0):
    """A small CNN with batch norm and named blocks (for the running-statistics and manifold-mixup checks)."""
    torch.manual_seed(seed)
    return nn.Sequential(collections.OrderedDict([
        ("block1", nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU())),
        ("block2", nn.Sequential(nn.Conv2d(4, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU())),
        ("head", nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10)))]))


def _bind(method, net):
    return method.bind(M.BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu")))


def _grads(net):
    return [p.grad.clone() for p in net.parameters()]


def _buffers(net):
    return {k: b.clone() for k, b in net.named_buffers()}


def _assert_same_buffers(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def _kl_sum(logits_adv, logits_clean):
    return F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="sum")


# ---------------------------------------------------------------- PGD-AT
def test_pgd_examples_equal_a_plain_loop_and_the_loss_is_adversarial_only(batch):
    x, y = batch
    net = _net()
    eps, alpha, steps = 0.1, 0.03, 3
    m = _bind(M.PGDAT(eps=eps, alpha=alpha, steps=steps), net)
    torch.manual_seed(5)
    xa = m.perturb(x, y)
    torch.manual_seed(5)
    ref = (x + (torch.rand(x.shape) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        xr = ref.clone().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(net(xr), y), xr)
        ref = (x + (ref + alpha * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(xa, ref, rtol=0, atol=1e-6)
    assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    torch.manual_seed(5)
    out = m.loss(x, y)
    assert torch.equal(out.loss, F.cross_entropy(net(xa), y))  # no clean term


# ---------------------------------------------------------------- TRADES
def _ref_trades_loss(model, x, y, step_size, epsilon, perturb_steps, beta):
    """yaodongyu/TRADES trades_loss (L-inf); the start is clamped to the box as fastadv's TRADESAttack does
    (the reference feeds x + 0.001 N(0, I) unclamped to the first step)."""
    model.eval()
    x_adv = (x.detach() + 0.001 * torch.randn(x.shape)).clamp(0.0, 1.0)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = _kl_sum(model(x_adv), model(x))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * _kl_sum(model(x_adv), model(x))
    return loss_natural + beta * loss_robust


def test_trades_matches_the_reference_loss_gradient_and_bn_stats(batch):
    x, y = batch
    a, b = _bn_net(), _bn_net()
    m = _bind(M.TRADES(eps=0.1, alpha=0.03, steps=3, beta=6.0), a)
    torch.manual_seed(3)
    out = m.loss(x, y)
    out.loss.backward()
    torch.manual_seed(3)
    ref = _ref_trades_loss(b, x, y, 0.03, 0.1, 3, 6.0)
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    for ga, gb in zip(_grads(a), _grads(b)):
        torch.testing.assert_close(ga, gb)
    _assert_same_buffers(_buffers(a), _buffers(b))  # two clean forwards and one adversarial, as the reference


def test_trades_beta_zero_is_natural_training(batch):
    x, y = batch
    a, b = _bn_net(), _bn_net()
    out = _bind(M.TRADES(eps=0.1, beta=0.0), a).loss(x, y)
    out.loss.backward()
    ref = F.cross_entropy(b(x), y)
    ref.backward()
    assert torch.equal(out.loss, ref)
    assert all(torch.equal(p, q) for p, q in zip(_grads(a), _grads(b)))
    _assert_same_buffers(_buffers(a), _buffers(b))


def test_trades_inner_max_increases_kl_and_outer_kl_is_batchmean(batch):
    x, y = batch
    net = _net()
    m = _bind(M.TRADES(eps=0.1, alpha=0.03, steps=5), net)
    torch.manual_seed(0)
    xa = m.inner(x, y)
    with torch.no_grad():
        start = (x + 0.001 * torch.randn(x.shape)).clamp(0, 1)
        kl_start, kl_adv = _kl_sum(net(start), net(x)), _kl_sum(net(xa), net(x))
    assert kl_adv > 10 * kl_start
    la, lc = torch.randn(7, 10), torch.randn(7, 10)
    torch.testing.assert_close(M.trades_kl(la, lc), _kl_sum(la, lc) / 7)


# ---------------------------------------------------------------- FAT
def _ref_early_stop_one(model, x, y, eps, alpha, steps, tau):
    """earlystop.py for one sample (no random start, omega 0, loss_fn 'cent'), model in eval mode."""
    control, xi = tau, x.clone()
    for _ in range(steps):
        xr = xi.clone().requires_grad_(True)
        out = model(xr)
        if out.argmax(1).item() != y.item():
            if control == 0:
                return xi
            control -= 1
        g, = torch.autograd.grad(F.cross_entropy(out, y), xr)
        xi = (torch.min(torch.max(xi + alpha * g.sign(), x - eps), x + eps)).clamp(0, 1)
    return xi


@pytest.mark.parametrize("tau", [0, 2])
def test_fat_stops_each_sample_tau_steps_after_its_first_misclassification(batch, tau):
    x, y = batch
    x, y = x[:16], y[:16]
    net = _net()
    m = _bind(M.FAT(eps=0.3, alpha=0.05, steps=8, tau=tau, random_start=False, omega=0.0), net)
    m.on_epoch(0, 1)
    xa = m.attack()(x, y)
    ref = torch.cat([_ref_early_stop_one(net, x[i:i + 1], y[i:i + 1], 0.3, 0.05, 8, tau) for i in range(16)])
    torch.testing.assert_close(xa, ref, rtol=0, atol=1e-6)
    moved = (ref - x).flatten(1).abs().amax(1)
    assert (moved < 0.3 - 1e-6).any()  # some samples stopped before reaching the ball's edge


def test_fat_defaults_follow_the_official_code():
    fat, ft = M.FAT(), M.FAT(trades=True)
    assert (fat.alpha, fat.steps, fat.omega, fat.attack_mode) == (0.007, 10, 0.001, "eval")
    assert (ft.omega, ft.tau_max) == (0.0, 3)
    assert [M.tau_schedule(e, 120) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]
    assert [M.tau_schedule(e, 85, 3, M.FAT_TRADES_MILESTONES) for e in (29, 30, 49, 50, 69, 70, 84)] == \
        [0, 1, 1, 2, 2, 3, 3]
    ft.on_epoch(75, 85)
    assert ft.tau == 3
    m = M.FAT(tau=0)
    m.on_epoch(100, 120)
    assert m.tau == 0


def test_fat_trades_kl_ascent_and_separate_forwards(batch):
    x, _ = batch
    a, b = _bn_net(), _bn_net()
    # labels the untrained net gets right (in eval mode, as the attack runs): FAT stops a misclassified sample
    # at once, and this net misclassifies all 32 true labels (measured), so with them nothing would move
    with torch.no_grad():
        y = b.eval()(x).argmax(1)
    b.train()
    m = _bind(M.FAT(eps=0.1, alpha=0.03, steps=4, trades=True, beta=6.0), a)
    m.on_epoch(0, 1)
    torch.manual_seed(2)
    out = m.loss(x, y)
    m2 = _bind(M.FAT(eps=0.1, alpha=0.03, steps=4, trades=True, beta=6.0), b)
    m2.on_epoch(0, 1)
    torch.manual_seed(2)
    xa = m2.attack()(x, y)
    with torch.no_grad():  # the KL ascent moved the prediction away from the clean one
        b.eval()
        assert _kl_sum(b(xa), b(x)) > 0
        b.train()
    nat, adv = b(x), b(xa)  # FAT_for_TRADES.py: natural_logits = model(x); adv_logits = model(x_adv)
    ref = F.cross_entropy(nat, y) + 6.0 * _kl_sum(adv, nat) / len(x)
    torch.testing.assert_close(out.loss, ref)
    _assert_same_buffers(_buffers(a), _buffers(b))


# ---------------------------------------------------------------- Free AT
def test_free_matches_main_free_replays_carry_and_clamp(batch):
    x, y = batch
    eps, m_rep = 0.1, 3
    a, b = _net(), _net()
    method = _bind(M.FreeAT(eps=eps, replays=m_rep), a)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    noise = torch.zeros_like(x[:16])  # main_free.py's global_noise_data
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    for xb, yb in batches:
        for _ in range(m_rep):
            out = method.loss(xb, yb)
            opt_a.zero_grad()
            out.loss.backward()
            method.after_backward()
            opt_a.step()
            # the reference replay
            nb = noise.clone().requires_grad_(True)
            in1 = (xb + nb).clamp(0, 1.0)
            loss = F.cross_entropy(b(in1), yb)
            opt_b.zero_grad()
            loss.backward()
            clamped = ((xb + noise) < 0) | ((xb + noise) > 1)
            assert (nb.grad[clamped] == 0).all()  # no gradient through clamped coordinates
            noise = (noise + eps * nb.grad.sign()).clamp(-eps, eps)
            assert torch.equal(method._delta[clamped], noise[clamped])
            opt_b.step()
            torch.testing.assert_close(method._delta, noise, rtol=0, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    # delta carried across batches, raw (not clipped to the box), inside the ball
    assert method._delta.abs().max() <= eps and ((x[16:] + method._delta) < 0).any()
    m2 = _bind(M.FreeAT(eps=eps, replays=m_rep), a)
    m2.load_state_dict(method.state_dict())
    assert torch.equal(m2._delta, method._delta)


def test_free_replays_each_batch_m_times_in_the_trainer(batch):
    from fastadv.train import TrainConfig, Trainer

    x, y = batch
    calls = []
    method = M.FreeAT(eps=0.1, replays=3)
    orig = method.loss
    method.loss = lambda xb, yb: (calls.append(xb.clone()), orig(xb, yb))[1]
    cfg = TrainConfig(epochs=1, batch_size=16, optimizer="sgd", lr=0.01, schedule="constant", progress=False,
                      plot=False, device="cpu")
    r = Trainer(_net(), method, (x, y), None, cfg).fit()
    assert len(calls) == 6 and r["step"] == 6
    assert torch.equal(calls[0], calls[1]) and torch.equal(calls[0], calls[2]) and not torch.equal(calls[2], calls[3])


# ---------------------------------------------------------------- Fast AT
def test_fast_step_is_one_and_a_quarter_eps_from_a_uniform_start(batch):
    x, y = batch
    net, eps = _net(), 0.1
    m = _bind(M.FastAT(eps=eps), net)
    assert m.alpha == pytest.approx(1.25 * eps)
    torch.manual_seed(9)
    xa = m.perturb(x, y)
    torch.manual_seed(9)  # train_fgsm.py: delta ~ U(-eps, eps), clamped to the box, one step of alpha
    delta = ((torch.rand(x.shape) * 2 - 1) * eps)
    x1 = (x + delta).clamp(0, 1).requires_grad_(True)
    g, = torch.autograd.grad(F.cross_entropy(net(x1), y), x1)
    ref = (x + (x1.detach() + 1.25 * eps * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(xa, ref, rtol=0, atol=1e-6)


def test_fast_cyclic_schedule_holds_in_the_python_api(batch):
    from fastadv.train import Trainer

    x, y = batch
    lrs = []
    cfg = M.train_config(M.FastAT(eps=0.1), epochs=2, batch_size=4, progress=False, plot=False, device="cpu")
    assert (cfg.schedule, cfg.lr) == ("cyclic", 0.2)
    assert M.train_config(M.FastAT(), optimizer="adam").lr == 5e-3
    assert M.train_config(M.FastAT(), lr=0.1, schedule="multistep").schedule == "multistep"
    Trainer(_net(), M.FastAT(eps=0.1), (x[:20], y[:20]), None, cfg,
            callbacks=[lambda tr, rec: lrs.append(rec["lr"])]).fit()
    # 10 steps: the triangle 0 -> 0.2 at 2/5 -> 0, evaluated after each step
    expect = [0.2 * min(t / 0.4, (1 - t) / 0.6) for t in [(i + 2) / 10 for i in range(10)]]
    torch.testing.assert_close(torch.tensor(lrs[:-1]), torch.tensor(expect[:-1]), atol=1e-9, rtol=1e-6)
    assert max(lrs) == pytest.approx(0.2)


def test_fast_early_stop_keeps_the_last_good_weights(batch):
    from fastadv.train import TrainConfig, Trainer

    x, y = batch
    stop = M.FastATEarlyStop(verbose=False)
    accs = iter([0.5, 0.6, 0.1, 0.9])
    stop.robust_accuracy = lambda *a, **k: next(accs)
    snapshots = []

    def snap(tr, rec):
        if tr.batch_in_epoch == tr.steps_per_epoch:
            snapshots.append(copy.deepcopy(tr.net.state_dict()))

    net = _net()
    cfg = TrainConfig(epochs=4, batch_size=8, optimizer="sgd", lr=0.05, schedule="constant", progress=False,
                      plot=False, device="cpu")
    r = Trainer(net, M.FastAT(eps=0.1), (x[:16], y[:16]), None, cfg, callbacks=[snap, stop]).fit()
    assert stop.stopped_epoch == 2 and len(r["history"]) == 3 and not r["stopped"]
    assert all(torch.equal(v, snapshots[1][k]) for k, v in net.state_dict().items())  # epoch 2's weights
    assert not all(torch.equal(v, snapshots[2][k]) for k, v in net.state_dict().items())


def test_fast_early_stop_check_leaves_bn_statistics(batch):
    x, y = batch
    net = _bn_net().train()
    before = _buffers(net)
    acc = M.FastATEarlyStop().robust_accuracy(net, x, y, eps=0.1)
    assert 0.0 <= acc <= 1.0
    _assert_same_buffers(before, _buffers(net))


# ---------------------------------------------------------------- Ensemble AT
def test_ensemble_static_models_never_train_and_sources_are_drawn_uniformly(batch):
    x, y = batch
    net, s1, s2 = _bn_net(0), _bn_net(1), _bn_net(2)
    method = _bind(M.EnsembleAT([s1, s2], eps=0.1), net)
    assert method.sources == 3 and method.attack == "step-ll" and method.source == "random"
    frozen = [copy.deepcopy(s.state_dict()) for s in (s1, s2)]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    torch.manual_seed(4)
    seen = []
    for _ in range(6):
        out = method.loss(x, y)
        seen.append(method.last_source)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.manual_seed(4)
    assert seen == [int(torch.randint(3, ())) for _ in range(6)]  # tf_train: np.random.randint(len(x_advs))
    for s, st in zip((s1, s2), frozen):
        assert all(torch.equal(v, st[k]) for k, v in s.state_dict().items())  # weights and BN buffers
        assert all(not p.requires_grad for p in s.parameters())
    counts = collections.Counter(method.next_source() for _ in range(300))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 60
    cyc = _bind(M.EnsembleAT([s1, s2], eps=0.1, source="cycle"), net)
    assert [cyc.next_source() for _ in range(5)] == [0, 1, 2, 0, 1]


def test_ensemble_step_ll_on_the_static_source_and_the_loss_weighting(batch):
    x, y = batch
    net, s1 = _net(0), _net(1)
    method = _bind(M.EnsembleAT([s1], eps=0.1, source="cycle", adv_weight=0.3), net)
    method.counter = 1  # the static model's turn
    h = x.shape[0] // 2
    xr = x[h:].clone().requires_grad_(True)
    logits = s1(xr)
    g, = torch.autograd.grad(F.cross_entropy(logits, logits.argmin(1), reduction="sum"), xr)
    x_adv = (x[h:] - 0.1 * g.sign()).clamp(0, 1)  # Step-LL toward the least likely class
    per = F.cross_entropy(net(torch.cat([x[:h], x_adv])), y, reduction="none")
    ref = (per[:h].sum() + 0.3 * per[h:].sum()) / (h + 0.3 * (len(x) - h))  # Kurakin et al.'s weighting
    torch.testing.assert_close(method.loss(x, y).loss, ref)
    full = _bind(M.EnsembleAT([s1], eps=0.1, source="cycle", split="full"), net)
    out = full.loss(x, y)  # source 0, the current model, FGSM-LL on the whole batch
    assert out.y.shape[0] == len(x)


# ---------------------------------------------------------------- IAT
def test_iat_mixes_labels_with_the_inputs_lambda_and_pairing_in_separate_forwards(batch):
    x, y = batch
    a, b = _bn_net(), _bn_net()
    m = _bind(M.IAT(eps=0.1, alpha=0.03, steps=2), a)
    torch.manual_seed(6)
    out = m.loss(x, y)
    (lc, pc, kc), (la, pa, ka) = m.last_draws
    assert kc == ka == "input" and lc != la
    m2 = _bind(M.IAT(eps=0.1, alpha=0.03, steps=2), b)
    torch.manual_seed(6)
    xa = m2.perturb(x, y)
    zc = b(lc * x + (1 - lc) * x[pc])
    za = b(la * xa + (1 - la) * xa[pa])
    ref = 0.5 * (lc * F.cross_entropy(zc, y) + (1 - lc) * F.cross_entropy(zc, y[pc])
                 + la * F.cross_entropy(za, y) + (1 - la) * F.cross_entropy(za, y[pa]))
    torch.testing.assert_close(out.loss, ref)
    _assert_same_buffers(_buffers(a), _buffers(b))


def test_iat_manifold_mixup_mixes_the_chosen_layer(batch):
    x, y = batch
    net = _bn_net()
    m = _bind(M.IAT(eps=0.1, alpha=0.03, steps=1, mixup="manifold", mix_layers=("input", "block1")), net)
    assert m.mix_alpha == 2.0
    lam, perm = 0.3, torch.randperm(len(x))
    got = m.mixed_forward(x, lam, perm, 1)
    h = net.block1(x)
    torch.testing.assert_close(got, net.head(net.block2(lam * h + (1 - lam) * h[perm])))
    assert not net.block1._forward_hooks  # the hook is removed after the forward
    torch.manual_seed(0)
    layers = {m.draw(len(x), x.device)[2] for _ in range(20)}
    assert layers == {0, 1}
    with pytest.raises(ValueError, match="mix layer"):
        _bind(M.IAT(mixup="manifold"), _net())  # MnistCNN has no 'layer1'


# ---------------------------------------------------------------- the rest
@pytest.mark.parametrize("name", ["standard", "metric", "metric-inv-ot"])
def test_other_methods_give_a_finite_differentiable_loss(name, batch):
    x, y = batch
    net = _net()
    method = _bind({"standard": lambda: M.Standard(),
                    "metric": lambda: M.MetricAT(eps=0.1, alpha=0.03, steps=2),
                    # the default invariance radius and bank (tests/test_metric_invariance.py checks the examples)
                    "metric-inv-ot": lambda: M.MetricAT(eps=0.1, alpha=0.03, steps=2, invariance_weight=0.5,
                                                        ot_weight=0.5,
                                                        invariance_ref=embedded_mnist("train"))}[name](), net)
    out = method.loss(x, y)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.logits.shape == (out.y.shape[0], 10)
    if name == "metric-inv-ot":
        assert method.bank[0].shape[0] > x.shape[0] and method.last_invariance["x_inv"].shape[0] > 0
        assert all(v > 0 for v in method.last_terms.values()) and len(method.last_terms) == 6
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_wasserstein_step_lowers_its_loss(batch):
    pytest.importorskip("fastadv.attacks.wasserstein")
    x, y = batch
    x, y = x[:16], y[:16]
    net = _net()
    method = _bind(M.WassersteinAT(eps=0.5, steps=3), net)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    torch.manual_seed(0)
    before = float(method.loss(x, y).loss)
    for _ in range(6):
        out = method.loss(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.manual_seed(0)
    assert float(method.loss(x, y).loss) < 0.9 * before


def test_wasserstein_trains_on_the_reference_attack_with_its_radius_schedule(batch):
    """WassersteinAT's training examples are WassersteinPGD's at the reference's training settings
    (adv_training_mnist.py: radius 0.1 grown x1.4 every 5 steps, lam 1000, its 50-iteration accept-all
    clamped loop), and the loss is the CE of the model on them."""
    from fastadv.attacks.wasserstein import WassersteinPGD

    x, y = batch
    x, y = x[:8], y[:8]
    net = _net()
    kw = dict(eps=0.1 * 1.4 ** 2, steps=12, alpha=0.1, reg=1000.0, kernel_size=3)
    method = _bind(M.WassersteinAT(**kw, attack_eps_growth=(0.1, 1.4, 5)), net)
    out = method.loss(x, y)
    atk = WassersteinPGD(net, eps_growth=(0.1, 1.4, 5), model_mode="train", **kw, **M.WassersteinAT.TRAINING_ATTACK)
    x_adv = atk(x, y)
    assert atk.last_radius_used.max().item() == pytest.approx(kw["eps"])
    assert not torch.equal(x_adv, x)
    torch.testing.assert_close(out.logits, net(x_adv).float(), rtol=0, atol=0)
    assert float(out.loss) == pytest.approx(float(F.cross_entropy(net(x_adv), y)), rel=1e-6)
    with pytest.raises(ValueError, match="cannot reach eps"):
        M.WassersteinAT(eps=1.0, steps=10, attack_eps_growth=(0.1, 1.4, 5))


def test_wasserstein_reference_presets_are_the_reference_scripts():
    """adv_training_mnist.py: 50 steps of 0.1, lam 1000, radius 0.1 x1.4 every 5 steps; adv_training_cifar.py:
    lam 3000, radius 0.01 x1.5 every 5 steps. The schedule's last radius is eps (the reference has no cap)."""
    from fastadv.attacks.wasserstein import radius_schedule
    from fastadv.train.cli import add_arguments, build_method

    m = M.WassersteinAT.reference("mnist")
    assert (m.steps, m.alpha, m.reg, m.kernel_size, m.attack_eps_growth) == (50, 0.1, 1000.0, 5, (0.1, 1.4, 5))
    c = M.WassersteinAT.reference("cifar10")
    assert (c.steps, c.reg, c.attack_eps_growth) == (50, 3000.0, (0.01, 1.5, 5))
    for method, (r0, fac) in ((m, (0.1, 1.4)), (c, (0.01, 1.5))):
        # growth at steps 5, 10, ..., 45: nine growths in 50 steps
        assert method.eps == pytest.approx(r0 * fac ** 9)
        radius_schedule(method.eps, method.steps, method.attack_eps_growth)
    with pytest.raises(ValueError, match="dataset must be one of"):
        M.WassersteinAT.reference("imagenet")
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    from wasserstein_training import REFERENCE_TRAINING  # the benchmark trains with the same preset

    assert {k: v for k, v in REFERENCE_TRAINING.items() if k != "p"} == M.WassersteinAT.REFERENCE["mnist"]
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    for argv, want in ((["--method", "wasserstein"], m.describe()),
                       (["--method", "wasserstein", "--dataset", "mnist", "--steps", "60"],
                        M.WassersteinAT.reference("mnist", steps=60).describe())):
        got = build_method(p.parse_args(argv), {}, None).describe()
        assert got == want, argv
    # another eps: the reference's growth capped at it, while the growth reaches it; else fitted
    got = build_method(p.parse_args(["--method", "wasserstein", "--eps", "0.5"]), {}, None)
    assert got.attack_eps_growth == (0.1, 1.4, 5) and got.eps == 0.5 and got.reg == 1000.0
    got = build_method(p.parse_args(["--method", "wasserstein", "--eps", "5.0"]), {}, None)
    assert got.attack_eps_growth is None and got.eps == 5.0
    # steps too few for the reference's schedule to reach its eps: fitted to them
    got = build_method(p.parse_args(["--method", "wasserstein", "--steps", "20"]), {}, None)
    assert got.attack_eps_growth is None and got.eps == m.eps and got.steps == 20


def test_triplet_picks_nearest_negative():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    ya = torch.tensor([0, 1, 2])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    assert M.triplet_terms(a, c, ya, ya, margin=0.0).item() == pytest.approx(0.0, abs=1e-6)
    v = M.triplet_terms(a, c, ya, ya, margin=10.0).item()
    assert 9.0 < v < 10.0


def test_get_method_and_argument_errors():
    assert isinstance(M.get_method("pgd", eps=0.3), M.PGDAT)
    with pytest.raises(ValueError, match="method must be one of"):
        M.get_method("nope")
    with pytest.raises(ValueError, match="eps must be"):
        M.PGDAT(eps=-1)
    with pytest.raises(ValueError, match="steps must be"):
        M.TRADES(steps=0)
    with pytest.raises(ValueError, match="alpha must be <= eps"):
        M.EnsembleAT(eps=0.1, alpha=0.2)
    with pytest.raises(ValueError, match="attack must be one of"):
        M.EnsembleAT(attack="pgd")
    with pytest.raises(ValueError, match="nn.Linear"):
        M.penultimate_features(torch.nn.Conv2d(1, 1, 1))
