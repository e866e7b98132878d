"""MART and AWP against their defining properties and plain ports of the authors' code.

Ports: YisenWang/MART mart.py ``mart_loss`` (``_ref_mart_outer``, ``_ref_mart_loss``) and csdongxian/AWP
utils_awp.py (``_ref_awp_diff``: a proxy copy of the model, one SGD(lr=0.01) step on -loss,
``diff_in_weights`` scaled by gamma).
"""
import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.data import embedded_mnist
from fastadv.train.methods.awp import AWP
from fastadv.train.methods.base import BindContext
from fastadv.train.methods.free import FreeAT
from fastadv.train.methods.mart import MART, mart_loss, mart_terms
from fastadv.train.methods.pgd import PGDAT
from fastadv.train.methods.trades import TRADES

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def batch():
    x, y = embedded_mnist("train")
    return x[:16].clone(), y[:16].clone()


def _bn_net(seed=0, dtype=torch.float32):
    """conv (4-D weight + bias), batch norm (1-D weight/bias + running stats), linear (2-D weight + bias)."""
    torch.manual_seed(seed)
    net = nn.Sequential(collections.OrderedDict([
        ("conv", nn.Conv2d(1, 4, 3, stride=2)), ("bn", nn.BatchNorm2d(4)), ("relu", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(3)), ("flat", nn.Flatten()), ("fc", nn.Linear(36, 10))]))
    return net.to(dtype).train()


def _bind(method, net):
    return method.bind(BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu")))


def _buffers(net):
    return {k: b.clone() for k, b in net.named_buffers()}


def _step(method, opt, x, y):
    """One step of the trainer's loop (trainer.py _train_step)."""
    out = method.loss(x, y)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    method.after_backward()
    opt.step()
    method.after_step()
    return out


# ---------------------------------------------------------------- MART
def _ref_mart_outer(logits_adv, logits, y, beta):
    """The outer half of the reference mart_loss, line by line."""
    kl = nn.KLDivLoss(reduction="none")
    batch_size = len(logits)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_robust = (1.0 / batch_size) * torch.sum(
        torch.sum(kl(torch.log(adv_probs + 1e-12), nat_probs), dim=1) * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def _ref_mart_loss(model, x_natural, y, step_size, epsilon, perturb_steps, beta):
    """The reference mart_loss (CPU noise instead of .cuda())."""
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    logits = model(x_natural)
    logits_adv = model(x_adv)
    return _ref_mart_outer(logits_adv, logits, y, beta), x_adv


# Hand-made logits: y on top of the adversarial prediction (rows 0, 3), y second (row 1), y last (row 2),
# a clean prediction that is right with p_y ~ 1 (row 3: the 1.0000001 - p_y floor), a wrong one (row 2).
_LOGITS_NAT = torch.tensor([[2.0, 0.5, -1.0, 0.1], [0.3, 1.5, -0.2, 0.9], [-1.0, 0.2, 3.0, 0.4],
                            [20.0, -5.0, -4.0, -6.0], [0.1, 0.2, 0.3, 0.4]])
_LOGITS_ADV = torch.tensor([[1.0, 0.8, -0.5, 0.3], [1.2, 0.7, -0.1, 0.2], [2.0, -0.3, 0.5, 1.1],
                            [4.0, 1.0, 3.0, -1.0], [0.5, -0.4, 0.25, 0.05]])
_Y = torch.tensor([0, 1, 1, 0, 3])


def test_mart_weight_is_one_minus_the_clean_true_class_probability():
    t = mart_terms(_LOGITS_ADV, _LOGITS_NAT, _Y)
    hand = []
    for z, y in zip(_LOGITS_NAT.tolist(), _Y.tolist()):  # float64 softmax by hand
        hand.append(1.0 - math.exp(z[y]) / sum(math.exp(v) for v in z))
    hand = torch.tensor(hand, dtype=torch.float64)
    # the reference's 1.0000001 - p_y: the paper's 1 - p_y plus 1e-7, each within two float32 ulps at 1 (2.4e-7)
    torch.testing.assert_close(t["weight"].double(), hand + 1e-7, rtol=0, atol=2.4e-7)
    assert t["weight"][3] < 1e-6 and t["weight"][2] > 0.9  # right and confident ~ 0; misclassified ~ 1
    # the KL term of the loss is weighted by exactly these weights (KL by hand in float64)
    p = F.softmax(_LOGITS_NAT.double(), 1)
    q = F.softmax(_LOGITS_ADV.double(), 1)
    kl_hand = (p * (p.log() - (q + 1e-12).log())).sum(1)
    robust = mart_loss(_LOGITS_ADV, _LOGITS_NAT, _Y, 1.0) - mart_loss(_LOGITS_ADV, _LOGITS_NAT, _Y, 0.0)
    torch.testing.assert_close(robust.double(), (kl_hand * (hand + 1e-7)).mean(), rtol=1e-5, atol=1e-7)


def test_mart_loss_equals_the_reference_formula_on_hand_made_logits():
    for beta in (0.0, 5.0, 6.0):
        a = _LOGITS_ADV.clone().requires_grad_(True)
        n = _LOGITS_NAT.clone().requires_grad_(True)
        ours = mart_loss(a, n, _Y, beta)
        ga, gn = torch.autograd.grad(ours, (a, n), allow_unused=True, materialize_grads=True)
        a2 = _LOGITS_ADV.clone().requires_grad_(True)
        n2 = _LOGITS_NAT.clone().requires_grad_(True)
        ref = _ref_mart_outer(a2, n2, _Y, beta)
        ra, rn = torch.autograd.grad(ref, (a2, n2))
        # float32 sums of 5 x 4 terms in another order: ~20 ulp at most
        torch.testing.assert_close(ours, ref, rtol=2e-6, atol=1e-7)
        torch.testing.assert_close(ga, ra, rtol=2e-6, atol=1e-7)
        # the gradient reaches the clean logits through the KL and the (not detached) weight 1 - p_y
        torch.testing.assert_close(gn, rn, rtol=2e-6, atol=1e-7)
        assert (gn.abs().sum() > 0) == (beta > 0)


def test_mart_beta_zero_is_exactly_the_boosted_ce(batch):
    x, y = batch
    net = _bn_net()
    m = _bind(MART(beta=0.0), net)
    torch.manual_seed(1)
    x_adv = (x + 0.1 * torch.randn(x.shape)).clamp(0, 1)
    out = m.loss_from_adv(x, x_adv, y)
    z = net(x_adv)
    p = F.softmax(z, 1)
    p_wrong = p.masked_fill(F.one_hot(y, 10).bool(), -math.inf).amax(1)  # max_{k != y} p_k, no top-2 trick
    boosted = (F.cross_entropy(z, y, reduction="none") - torch.log(1.0001 - p_wrong + 1e-12)).mean()
    torch.testing.assert_close(out.loss, boosted, rtol=1e-6, atol=0)
    g_ours = torch.autograd.grad(out.loss, list(net.parameters()))
    g_boost = torch.autograd.grad(boosted, list(net.parameters()))
    for a, b in zip(g_ours, g_boost):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # beta > 0 adds the weighted KL: the same batch gives another loss
    other = _bind(MART(beta=6.0), net).loss_from_adv(x, x_adv, y).loss.detach()
    assert (other - out.loss.detach()).abs() > 1e-3


def test_mart_inner_max_is_the_reference_ce_pgd_from_a_gaussian_start_in_eval_mode(batch):
    x, y = batch
    net = _bn_net()
    eps, alpha, steps = 0.1, 0.03, 3
    m = _bind(MART(eps=eps, alpha=alpha, steps=steps), net)
    before = _buffers(net)
    torch.manual_seed(3)
    xa = m.perturb(x, y)
    for k, b in _buffers(net).items():  # eval mode: no running-average update, and the train flag is back
        assert torch.equal(b, before[k]), k
    assert net.training and net.bn.training
    torch.manual_seed(3)
    net.eval()
    ref = x + 0.001 * torch.randn(x.shape)
    for _ in range(steps):
        xr = ref.clone().requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(net(xr), y), xr)
        ref = torch.min(torch.max(ref + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    net.train()
    torch.testing.assert_close(xa, ref, rtol=0, atol=1e-6)


def test_mart_loss_gradient_and_bn_stats_equal_the_reference_mart_loss(batch):
    x, y = batch
    net_a, net_b = _bn_net(), _bn_net()
    m = _bind(MART(eps=0.1, alpha=0.03, steps=2, beta=6.0), net_a)
    torch.manual_seed(7)
    out = m.loss(x, y)
    ga = torch.autograd.grad(out.loss, list(net_a.parameters()))
    torch.manual_seed(7)
    ref, _ = _ref_mart_loss(net_b, x, y, 0.03, 0.1, 2, 6.0)
    gb = torch.autograd.grad(ref, list(net_b.parameters()))
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for k, b in _buffers(net_b).items():  # two train-mode forwards, clean first, as the reference
        torch.testing.assert_close(_buffers(net_a)[k], b, msg=k)


# ---------------------------------------------------------------- AWP
def _capture(awp):
    """Record the adversarial batch and v of each AWP step."""
    rec = {"x_adv": [], "v": []}
    perturb, wp = awp.base.perturb, awp.weight_perturbation

    def perturb_rec(x, y):
        rec["x_adv"].append(perturb(x, y))
        return rec["x_adv"][-1]

    def wp_rec(x, x_adv, y):
        rec["v"].append(wp(x, x_adv, y))
        return rec["v"][-1]

    awp.base.perturb, awp.weight_perturbation = perturb_rec, wp_rec
    return rec


def test_awp_step_is_the_optimizer_update_from_the_gradient_at_w_plus_v(batch):
    x, y = batch
    net = _bn_net()
    manual = copy.deepcopy(net)
    awp = _bind(AWP(PGDAT(eps=0.1, alpha=0.03, steps=2), gamma=0.05, warmup=0), net)
    awp.on_epoch(0, 1)
    rec = _capture(awp)
    lr, mom, wd = 0.05, 0.9, 5e-4
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=mom, weight_decay=wd)
    perturbed = {id(p) for p in awp._params}
    names = [n for n, p in net.named_parameters() if id(p) in perturbed]
    assert names == ["conv.weight", "fc.weight"]
    mparams = list(manual.parameters())
    bufs = [None] * len(mparams)
    for step in range(2):  # two steps: the momentum buffer carries the first step's gradient at w + v
        _step(awp, opt, x, y)
        x_adv, vs = rec["x_adv"][-1], dict(zip(names, rec["v"][-1]))
        with torch.no_grad():  # w + v, exactly as AWP adds it
            for n, p in manual.named_parameters():
                if n in vs:
                    p.add_(vs[n])
        grads = torch.autograd.grad(F.cross_entropy(manual(x_adv).float(), y), mparams)
        with torch.no_grad():  # torch.optim.SGD's update, written out: d = g + wd p; buf = mom buf + d; p -= lr buf
            for i, ((n, p), g) in enumerate(zip(manual.named_parameters(), grads)):
                d = g.add(p, alpha=wd)
                bufs[i] = d.clone() if bufs[i] is None else bufs[i].mul_(mom).add_(d)
                p.add_(bufs[i], alpha=-lr)
                if n in vs:
                    p.sub_(vs[n])
        for (n, p), q in zip(net.named_parameters(), mparams):
            # the same float32 ops in the same order; 1e-6 leaves room for a few ulps of |w| < 1 (6e-8 each)
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    assert awp._v is None  # restored after the step


def test_awp_without_v_would_give_another_step(batch):
    """The comparison above can fail: the plain PGD-AT step from the same start differs by far more than 1e-6."""
    x, y = batch
    net_a, net_b = _bn_net(), _bn_net()
    awp = _bind(AWP(PGDAT(eps=0.1, alpha=0.03, steps=2), gamma=0.05, warmup=0), net_a)
    awp.on_epoch(0, 1)
    base = _bind(PGDAT(eps=0.1, alpha=0.03, steps=2), net_b)
    for net, m in ((net_a, awp), (net_b, base)):
        torch.manual_seed(11)
        _step(m, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4), x, y)
    assert (net_a.fc.weight - net_b.fc.weight).abs().max() > 1e-4


def test_awp_perturbs_each_weight_by_gamma_times_its_norm_and_leaves_1d_parameters(batch):
    x, y = batch
    net = _bn_net()
    gamma = 0.01
    awp = _bind(AWP(PGDAT(eps=0.1, alpha=0.03, steps=1), gamma=gamma, warmup=0), net)
    awp.on_epoch(0, 1)
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    torch.manual_seed(2)
    awp.loss(x, y)  # the weights are now w + v
    vs = dict(zip(["conv.weight", "fc.weight"], awp._v))
    for n, p in net.named_parameters():
        if n in vs:
            # ||v_l|| = gamma ||w_l||: float32 norms of <= 360 entries (relative error measured ~1e-7)
            torch.testing.assert_close(vs[n].norm(), gamma * w0[n].norm(), rtol=1e-5, atol=0, msg=n)
            assert (p.detach() - w0[n] - vs[n]).abs().max() <= 2 ** -23 * (w0[n].abs() + vs[n].abs()).max()
        else:  # conv.bias, bn.weight, bn.bias, fc.bias: 1-D, never perturbed
            assert p.dim() == 1 and torch.equal(p.detach(), w0[n]), n
    awp.after_step()
    for n, p in net.named_parameters():
        assert (p.detach() - w0[n]).abs().max() <= 2 ** -23 * (w0[n].abs().max() + gamma * w0[n].norm()), n


def _ref_awp_diff(model, loss_fn, gamma):
    """csdongxian/AWP utils_awp.py: proxy <- model; SGD(lr=0.01) step on -loss; diff_in_weights; times gamma."""
    proxy = copy.deepcopy(model)
    proxy.load_state_dict(model.state_dict())
    proxy.train()
    proxy_optim = torch.optim.SGD(proxy.parameters(), lr=0.01)
    loss = -1.0 * loss_fn(proxy)
    proxy_optim.zero_grad()
    loss.backward()
    proxy_optim.step()
    diff = collections.OrderedDict()
    for (old_k, old_w), (_, new_w) in zip(model.state_dict().items(), proxy.state_dict().items()):
        if len(old_w.size()) <= 1:
            continue
        if "weight" in old_k:
            diff_w = new_w - old_w
            diff[old_k] = gamma * (old_w.norm() / (diff_w.norm() + 1e-20) * diff_w)
    return diff


@pytest.mark.parametrize("base", ["pgd", "trades", "mart"])
def test_awp_direction_equals_the_reference_proxy_step(base, batch):
    # float64 network: the reference's (w + 0.01 g) - w then loses ~1e-16 |w| / (0.01 |g|), not float32's 1e-7
    x, y = batch
    x = x.double()
    net = _bn_net(dtype=torch.float64)
    awp = _bind(AWP(base, gamma=0.005, warmup=0), net)
    torch.manual_seed(4)
    x_adv = (x + 0.05 * torch.randn(x.shape, dtype=torch.float64)).clamp(0, 1)
    ours = awp.weight_perturbation(x, x_adv, y)
    beta = getattr(awp.base, "beta", 0.0)
    losses = {  # each base's outer loss as its reference writes it (Method.forward casts logits to float32)
        "pgd": lambda m: F.cross_entropy(m(x_adv).float(), y),
        "trades": lambda m: F.cross_entropy(m(x).float(), y) + beta * F.kl_div(
            F.log_softmax(m(x_adv).float(), dim=1), F.softmax(m(x).float(), dim=1), reduction="batchmean"),
        "mart": lambda m: _ref_mart_outer(m(x_adv).float(), m(x).float(), y, beta),
    }
    ref = _ref_awp_diff(net, losses[base], 0.005)
    assert list(ref) == ["conv.weight", "fc.weight"]
    for (k, r), v in zip(ref.items(), ours):
        # max |v - ref| / max |ref| measured: pgd 2e-14; trades, mart 5e-8: the reference's proxy runs the clean
        # batch twice (CE and KL target), whose float32 logit gradients meet in float64 at the weights; our one
        # clean forward (as TRADES' and MART's losses) adds them in float32 at the logits (~1e-7 of the scale)
        torch.testing.assert_close(v, r, rtol=0, atol=1e-6 * float(r.abs().max()), msg=k)


def test_awp_proxy_step_leaves_bn_running_stats(batch):
    x, y = batch
    net_a, net_b = _bn_net(), _bn_net()
    awp = _bind(AWP(TRADES(eps=0.1, alpha=0.03, steps=1), gamma=0.01, warmup=0), net_a)
    awp.on_epoch(0, 1)
    torch.manual_seed(5)
    x_adv = (x + 0.05 * torch.randn(x.shape)).clamp(0, 1)
    before = _buffers(net_a)
    awp.weight_perturbation(x, x_adv, y)  # three train-mode forwards inside (TRADES' clean, adv, clean)
    after = _buffers(net_a)
    for k in before:
        assert torch.equal(after[k], before[k]), k
    net_b(x)  # a train-mode forward does move them (so the check above can fail)
    assert not torch.equal(net_b.bn.running_mean, before["bn.running_mean"])
    # end to end: the statistics after an AWP loss are those of the base method's own forwards at w + v
    net_b = _bn_net()
    rec = _capture(awp)
    torch.manual_seed(6)
    awp.loss(x, y)
    base_b = _bind(TRADES(eps=0.1, alpha=0.03, steps=1), net_b)
    torch.manual_seed(6)
    xb = base_b.perturb(x, y)
    torch.testing.assert_close(xb, rec["x_adv"][-1], rtol=0, atol=0)
    with torch.no_grad():
        net_b.conv.weight.add_(rec["v"][-1][0])
        net_b.fc.weight.add_(rec["v"][-1][1])
    base_b.loss_from_adv(x, xb, y)
    for k, b in _buffers(net_b).items():
        assert torch.equal(_buffers(net_a)[k], b), k


def test_awp_restore_gives_back_the_weights_when_lr_is_zero(batch):
    x, y = batch
    net = _bn_net()
    awp = _bind(AWP(MART(eps=0.1, alpha=0.03, steps=1), gamma=0.05, warmup=0), net)
    awp.on_epoch(0, 1)
    rec = _capture(awp)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, weight_decay=5e-4)
    w0 = {n: p.detach().clone() for n, p in net.named_parameters()}
    _step(awp, opt, x, y)
    vs = dict(zip(["conv.weight", "fc.weight"], rec["v"][-1]))
    for n, p in net.named_parameters():
        if n not in vs:
            assert torch.equal(p.detach(), w0[n]), n  # never perturbed: bitwise
            continue
        assert vs[n].abs().max() > 1e-4  # the step really ran at w + v
        # (w + v) - v in float32: two roundings, |error| <= 2^-24 (|w + v| + |w|) <= 2^-23 (|w| + |v|) per entry
        err = (p.detach() - w0[n]).abs()
        assert (err <= 2 ** -23 * (w0[n].abs() + vs[n].abs())).all(), n


@pytest.mark.parametrize("how", ["warmup", "gamma0"])
def test_awp_before_its_warmup_epoch_is_the_base_method_exactly(how, batch):
    x, y = batch
    net_a, net_b = _bn_net(), _bn_net()
    awp = AWP(PGDAT(eps=0.1, alpha=0.03, steps=2), gamma=0.05 if how == "warmup" else 0.0, warmup=1)
    awp = _bind(awp, net_a)
    base = _bind(PGDAT(eps=0.1, alpha=0.03, steps=2), net_b)
    opt_a = torch.optim.SGD(net_a.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    opt_b = torch.optim.SGD(net_b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    for epoch in (0, 1):
        awp.on_epoch(epoch, 2)
        base.on_epoch(epoch, 2)
        for s in range(2):
            torch.manual_seed(100 * epoch + s)
            la = _step(awp, opt_a, x, y).loss
            torch.manual_seed(100 * epoch + s)
            lb = _step(base, opt_b, x, y).loss
            same = torch.equal(la, lb)
            same = same and all(torch.equal(p, q) for p, q in zip(net_a.parameters(), net_b.parameters()))
            same = same and all(torch.equal(a, b) for a, b in zip(net_a.buffers(), net_b.buffers()))
            # epoch 0 is before the warm-up ends: bit for bit the base; epoch 1 with gamma > 0: AWP moves the weights
            assert same == (epoch == 0 or how == "gamma0"), (epoch, s)


def test_awp_in_the_trainer_restores_after_every_step_and_starts_after_warmup(batch):
    from fastadv.train import TrainConfig, Trainer

    x, y = batch
    awp = AWP(PGDAT(eps=0.1, alpha=0.03, steps=1), gamma=0.01, warmup=1)
    rec = _capture(awp)
    left = []
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="sgd", lr=0.01, schedule="constant", progress=False,
                      plot=False, device="cpu")
    r = Trainer(_bn_net(), awp, (x, y), None, cfg, callbacks=[lambda tr, rec_: left.append(awp._v)]).fit()
    assert left == [None] * 4  # after each optimizer step, v is gone
    assert len(rec["v"]) == 2  # epoch 0 (warm-up) takes none, epoch 1 one per batch
    assert [h["awp_active"] for h in r["history"]] == [0, 1]


def test_awp_builds_its_base_from_keyword_arguments():
    from fastadv.train.cli import parse_method_args

    a = AWP(base="trades", beta=6)
    assert isinstance(a.base, TRADES) and a.base.beta == 6.0 and a.base.alpha == 2 / 255 and a.base.steps == 10
    assert (a.gamma, a.warmup, a.attack_mode) == (0.005, 9, "eval")
    p = AWP()
    assert isinstance(p.base, PGDAT) and p.base.steps == 10 and p.base.alpha == 2 / 255 and p.attack_mode == "train"
    assert (p.gamma, p.warmup) == (0.01, 0)
    m = AWP(base="mart", eps=0.3)
    assert isinstance(m.base, MART) and m.base.eps == 0.3 and m.base.alpha == 0.007 and m.base.beta == 6.0
    assert AWP(PGDAT(steps=3)).base.steps == 3
    assert AWP(base="pgd", eps_warmup=0.3).base.eps_warmup == 0.3
    with pytest.raises(ValueError, match="beta"):
        AWP(base="pgd", beta=1.0)
    with pytest.raises(ValueError, match="base"):
        AWP(base="free")
    with pytest.raises(ValueError, match="eps"):
        AWP(PGDAT(), eps=0.1)
    with pytest.raises(TypeError, match="loss_from_adv"):
        AWP(FreeAT())
    with pytest.raises(ValueError, match="gamma"):
        AWP(gamma=-0.01)
    with pytest.raises(ValueError, match="warmup"):
        AWP(warmup=1.5)
    assert parse_method_args(['base="trades"', "beta=6"], AWP) == {"base": "trades", "beta": 6}
    assert AWP(**parse_method_args(["base=mart", "gamma=0.01"], AWP)).base.name == "mart"
    d = AWP(base="trades").describe()
    assert d["base"] == "trades" and d["base_args"]["alpha"] == 2 / 255
