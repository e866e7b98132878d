"""DIAL and AFD: the gradient-reversal layer and its schedule, DIAL's loss and its reversed domain gradient,
AFD's three updates each moving only its own parameters, the reference's fooled-only adversarial batch, and
exact resume of both through the trainer."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.models.heads import dann_lambda, feature_layer, grad_reverse, split_head
from fastadv.train import TrainConfig, Trainer
from fastadv.train.methods.afd import AFD, critic_loss, encoder_loss
from fastadv.train.methods.base import BindContext
from fastadv.train.methods.dial import DIAL, dial_loss, dial_progress

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _net():
    # conv (encoder, with batch norm) -> flatten (DIAL's 'first_linear' features, 256-d) -> fc -> fc (the head);
    # no conv bias (as the ResNets): batch norm in train mode cancels it, so it would get no gradient
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(256, 16), nn.ReLU(), nn.Linear(16, 4))


def _bind(method, net, epochs=2, steps_per_epoch=3):
    return method.bind(BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu"),
                                   epochs=epochs, steps_per_epoch=steps_per_epoch))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(12, 1, 8, 8, generator=g), torch.randint(0, 4, (12,), generator=g)


# ------------------------------------------------------------------ GRL
def test_grl_is_identity_forward_and_minus_lambda_grad_backward():
    x = torch.randn(5, 7, requires_grad=True)
    g = torch.randn(5, 7)
    lam = 0.3
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, -lam * g)  # exactly: a sign flip and one float32 product per element


def test_reversal_schedule_and_reference_progress():
    # 2 / (1 + exp(-x)) - 1 = tanh(x / 2): an independent form
    for p in (0.0, 0.5, 1.0):
        assert dann_lambda(p) == pytest.approx(math.tanh(5 * p), abs=1e-15)
    assert dann_lambda(0.0) == 0.0 and dann_lambda(0.5) == pytest.approx(0.986614298, abs=1e-9)
    assert dann_lambda(1.0) == pytest.approx(0.999909204, abs=1e-9)
    # the reference's adjust_alpha: 1-based epoch, batch index over the number of SAMPLES
    assert dial_progress(0, 1, 100, 60000) == pytest.approx(0.01)
    assert dial_progress(468, 100, 100, 60000) == pytest.approx(1 + 468 / 6e6)
    m = _bind(DIAL(), _net(), epochs=2, steps_per_epoch=3)  # N = 3 batches x 4 samples = 12
    for step, want in ((0, 0.5), (2, (2 + 12) / 24), (3, 1.0), (4, (1 + 24) / 24)):
        m.on_step(step, 6)
        assert m.progress(4) == pytest.approx(want, rel=1e-12)
    m = _bind(DIAL(schedule="per_step"), _net())
    m.on_step(3, 6)
    assert m.progress(4) == 0.5 and m.reversal(4) == dann_lambda(0.5)


# ----------------------------------------------------------------- DIAL
@pytest.mark.parametrize("variant", ["kl", "ce"])
def test_dial_loss_is_the_hand_composition(variant):
    g = torch.Generator().manual_seed(2)
    lc, la = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    dc, da = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    r = torch.arange(6)

    def ce(logits, t):
        return -(logits - logits.logsumexp(1, keepdim=True))[r, t].mean()

    p, logq = lc.softmax(1), la.log_softmax(1)
    robust = (p * (p.log() - logq)).sum() / 6 if variant == "kl" else ce(la, y)
    want = ce(lc, y) + 0.7 * ce(dc, torch.zeros_like(y)) + 3.0 * robust + 0.7 * ce(da, torch.ones_like(y))
    got, terms = dial_loss(lc, la, dc, da, y, beta=3.0, domain_weight=0.7, variant=variant)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # float32 sums of <= 30 terms
    torch.testing.assert_close(terms["robust"], robust, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", ["kl", "ce"])
def test_dial_head_gets_the_domain_gradient_and_the_encoder_its_reversal(batch, variant):
    x, y = batch
    net = _net()
    m = _bind(DIAL(eps=0.1, alpha=0.05, steps=2, variant=variant, beta=2.0, domain_weight=0.5, schedule="per_step"),
              net)
    m.on_step(2, 10)  # p = 0.2: lam = tanh(1) = 0.76, so a sign error or a missing factor shows
    lam = m.reversal(x.shape[0])
    assert lam == pytest.approx(math.tanh(1.0), abs=1e-12)
    head = m.domain_head
    assert m.extra_modules() == [head] and head[0].in_features == 256
    out = m.loss(x, y)
    assert m.last_lambda == lam
    x_adv = m.last_adv
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and not torch.equal(x_adv, x)

    # the same forwards by hand, without the reversal layer
    enc, cls, hp = list(net[:4].parameters()), list(net[4:].parameters()), list(head.parameters())
    h_c, h_a = net[:4](x), net[:4](x_adv)
    lc, la = net[4:](h_c), net[4:](h_a)
    robust = F.kl_div(la.log_softmax(1), lc.softmax(1), reduction="batchmean") if variant == "kl" \
        else F.cross_entropy(la, y)
    task = F.cross_entropy(lc, y) + 2.0 * robust
    dom = 0.5 * (F.cross_entropy(head(h_c), torch.zeros_like(y)) + F.cross_entropy(head(h_a), torch.ones_like(y)))
    torch.testing.assert_close(out.loss, task + dom, rtol=1e-6, atol=1e-6)

    got = torch.autograd.grad(out.loss, enc + cls + hp)
    g_task = torch.autograd.grad(task, enc + cls, retain_graph=True)
    g_dom = torch.autograd.grad(dom, enc + cls + hp, allow_unused=True)
    g_dom = [torch.zeros_like(p) if g is None else g for g, p in zip(g_dom, enc + cls + hp)]
    n_enc, n_cls = len(enc), len(cls)
    # float32: the same products summed in another order (the reversed term joins at the features), ~1e-6
    for i in range(n_enc):  # encoder: task gradient minus lam times the domain gradient
        assert g_dom[i].abs().max() > 0
        torch.testing.assert_close(got[i], g_task[i] - lam * g_dom[i], rtol=1e-5, atol=1e-6)
    for i in range(n_enc, n_enc + n_cls):  # classifier layers behind the features: no domain gradient
        assert torch.equal(g_dom[i], torch.zeros_like(g_dom[i]))
        torch.testing.assert_close(got[i], g_task[i], rtol=1e-5, atol=1e-6)
    for i in range(n_enc + n_cls, len(got)):  # domain head: its own (not reversed) gradient
        assert g_dom[i].abs().max() > 0
        torch.testing.assert_close(got[i], g_dom[i], rtol=1e-5, atol=1e-6)


def test_dial_defaults_and_argument_errors():
    m = DIAL()
    assert (m.variant, m.beta, m.domain_weight, m.steps, m.alpha, m.head) == ("kl", 8.0, 6.0, 10, 0.007, "bn")
    assert m.attack_mode == "eval" and m.name == "dial"
    for kw, word in (({"variant": "mse"}, "variant"), ({"beta": -1}, "beta"), ({"domain_weight": "x"}, "domain_weight"),
                     ({"head": "big"}, "head"), ({"schedule": "cos"}, "schedule"), ({"steps": 0}, "steps")):
        with pytest.raises(ValueError, match=word):
            DIAL(**kw)
    with pytest.raises(ValueError, match="feature_layer"):
        _bind(DIAL(feature_layer="nope"), _net())


# ------------------------------------------------------------------ AFD
def _params(mod):
    return {k: v.detach().clone() for k, v in mod.named_parameters()}


def _same(a, b):
    return {k for k in a if torch.equal(a[k], b[k])}


def test_afd_critic_step_moves_only_the_critic_and_encoder_step_only_the_encoder(batch):
    x, y = batch
    net = _net()
    m = _bind(AFD(eps=0.2, steps=3, attack="pgd", alpha=0.1, critic_lr=0.1, encoder_lr=0.5), net)
    head, enc = split_head(net)
    assert head is net[6] and feature_layer(net, m.feature_layer) is net[6]
    assert {id(p) for p in enc} == {id(p) for p in net[:5].parameters()}
    out = m.loss(x, y)  # update 1's loss: clean CE only
    with torch.no_grad():
        assert torch.equal(out.logits, net(x))
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y), rtol=0, atol=0)
    _, x_adv, _ = m._batch
    net0, crit0 = _params(net), _params(m.critic)

    m.critic_step(x, x_adv, y)
    net1, crit1 = _params(net), _params(m.critic)
    assert _same(net0, net1) == set(net0)  # the network did not move (bitwise)
    # every critic parameter moved but the output bias: under the WGAN loss mean D(x') - mean D(x) it cancels
    assert _same(crit0, crit1) == {"l7.bias"}
    assert all(p.grad is None for p in net.parameters())

    m.encoder_step(x_adv, y)
    net2, crit2 = _params(net), _params(m.critic)
    assert _same(crit1, crit2) == set(crit1)  # the critic did not move
    unchanged = _same(net1, net2)
    assert unchanged == {"6.weight", "6.bias"}  # only the head kept its weights: every encoder parameter moved
    assert all(p.grad is None for p in net.parameters())


def test_afd_gan_losses_follow_the_reference_formulas():
    g = torch.Generator().manual_seed(3)
    fake, real = torch.randn(8, 1, generator=g), torch.randn(8, 1, generator=g)
    sp = lambda t: torch.log1p(torch.exp(t))  # noqa: E731
    torch.testing.assert_close(critic_loss(fake, real, "wgan"), fake.mean() - real.mean())
    torch.testing.assert_close(critic_loss(fake, real, "dcgan"), sp(-real).mean() + sp(fake).mean())
    torch.testing.assert_close(critic_loss(fake, real, "hinge"),
                               (1 - real).clamp_min(0).mean() + (1 + fake).clamp_min(0).mean())
    torch.testing.assert_close(encoder_loss(fake, "wgan"), -fake.mean())
    torch.testing.assert_close(encoder_loss(fake, "hinge"), -fake.mean())
    torch.testing.assert_close(encoder_loss(fake, "dcgan"), sp(-fake).mean())


def test_afd_apgd_batch_keeps_clean_images_where_the_attack_does_not_fool(batch):
    x, y = batch
    net = _net()
    m = _bind(AFD(eps=0.3, steps=5), net)
    assert m.attack == "apgd" and m.fooled_only
    x_adv = m.craft(x, y)
    assert net.training  # the eval-mode checks restored the mode
    with torch.no_grad():
        net.eval()
        ok_clean, ok_adv = net(x).argmax(1) == y, net(x_adv).argmax(1) == y
        net.train()
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.any()  # the tiny net is fooled on some samples at eps 0.3
    assert torch.equal(changed, ok_clean & ~ok_adv)  # adversarial exactly where x was right and x' fools
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6


def test_afd_milestones_and_argument_errors():
    m = AFD()
    assert (m.gan_loss, m.critic_lr, m.encoder_lr, m.steps, m.attack) == ("wgan", 0.1, 0.5, 20, "apgd")
    assert [m.lr_factor(e, 300) for e in (0, 149, 150, 249, 250, 299)] == \
        [1.0, 1.0, 0.1, 0.1, pytest.approx(0.01), pytest.approx(0.01)]
    for kw, word in (({"gan_loss": "ls"}, "gan_loss"), ({"attack": "fgsm"}, "attack"), ({"critic_lr": 0}, "critic_lr"),
                     ({"milestones": (0.5, 1.5)}, "milestones"), ({"fooled_only": 1}, "fooled_only")):
        with pytest.raises(ValueError, match=word):
            AFD(**kw)


# --------------------------------------------------------------- resume
def _data():
    g = torch.Generator().manual_seed(4)
    return torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g)


def _fit(method, out, resume=False, max_steps=None):
    torch.manual_seed(0)
    net = _net()
    cfg = TrainConfig(epochs=2, batch_size=16, optimizer="sgd", lr=0.05, schedule="cosine", out_dir=str(out),
                      resume=resume, progress=False, max_steps=max_steps, log_every=1, plot=False, device="cpu")
    tr = Trainer(net, method(), _data(), None, cfg)
    return tr.fit(), net, tr.method


def _dial():
    return DIAL(eps=0.1, alpha=0.05, steps=2, beta=2.0, domain_weight=0.5)


def _afd():
    return AFD(eps=0.2, steps=2, critic_lr=0.1, encoder_lr=0.2, milestones=(0.5,))


@pytest.mark.parametrize("make", [_dial, _afd], ids=["dial", "afd"])
def test_resume_through_the_trainer_is_exact(tmp_path, make):
    r_ref, ref, m_ref = _fit(make, tmp_path / "ref")
    r1, _, _ = _fit(make, tmp_path / "run", max_steps=5)  # into the 2nd epoch (4 batches per epoch)
    assert r1["stopped"]
    r2, net, m = _fit(make, tmp_path / "run", resume=True)
    assert not r2["stopped"]
    sa, sb = ref.state_dict(), net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ma, mb = m_ref.state_dict(), m.state_dict()
    mod = "domain_head" if isinstance(m, DIAL) else "critic"
    assert set(ma[mod]) == set(mb[mod]) and all(torch.equal(ma[mod][k], mb[mod][k]) for k in ma[mod])
    if isinstance(m, AFD):
        for key in ("critic_opt", "encoder_opt"):
            sa_, sb_ = ma[key]["state"], mb[key]["state"]
            assert set(sa_) == set(sb_) and all(torch.equal(sa_[i]["momentum_buffer"], sb_[i]["momentum_buffer"])
                                                for i in sa_)
        assert torch.equal(ma["sums"], mb["sums"]) and ma["sums"][6] == 4  # this epoch's 4 batches, resumed too
        assert set(r_ref["history"][-1]) >= {"afd_critic_loss", "afd_encoder_loss", "afd_adv_acc", "afd_adv_frac"}
    else:
        assert torch.equal(ma["domain_counts"], mb["domain_counts"]) and ma["domain_counts"][1] == 4 * 16 * 2
        assert r_ref["history"][-1]["dial_lambda"] == pytest.approx(dann_lambda(1.0 + 3 / 128))


def test_feature_taps_fire_under_torch_compile(batch):
    # dynamo does not guard on hooks added after a module was compiled, so the methods register theirs at bind
    import copy

    x, y = batch
    torch.manual_seed(0)
    nets = [_net(), None]
    nets[1] = copy.deepcopy(nets[0])
    out = []
    for net, compiled in zip(nets, (False, True)):
        model = torch.compile(net, backend="aot_eager") if compiled else net
        ctx = BindContext(net=net, model=model, attack_net=model, device=torch.device("cpu"), epochs=1,
                          steps_per_epoch=1)
        for m in (DIAL(eps=0.1, alpha=0.05, steps=2), AFD(eps=0.2, steps=2, attack="pgd", alpha=0.1)):
            torch.manual_seed(5)  # the same head / critic initialization and attack starts in both runs
            m.bind(ctx)
            model(x)  # a train-mode forward compiled before the method's first one (as a train-mode attack's)
            loss = m.loss(x, y).loss
            if isinstance(m, DIAL):
                g = torch.autograd.grad(loss, list(m.domain_head.parameters()) + list(net[:2].parameters()))
            else:
                m.after_step()
                g = [p.detach().clone() for p in m.critic.parameters()] + [p.detach().clone() for p in net.parameters()]
            out.append((loss.detach(), g))
    for (la, ga), (lb, gb) in zip(out[:2], out[2:]):
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)  # aot_eager decomposes ops: float32 rounding
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mnist_cnn_feature_norm_puts_unit_norm_features_before_the_head_that_afd_reads():
    from fastadv.models import MnistCNN

    torch.manual_seed(0)
    net = MnistCNN(width=0.25, feature_norm=True)
    afd = _bind(AFD(eps=0.1, steps=2), net)
    x = torch.rand(6, 1, 28, 28)
    h, logits = afd._features(x)
    assert afd._head is net[-1] and h.shape == (6, 256)
    torch.testing.assert_close(h.norm(dim=1), torch.ones(6))  # what the head and the critic see
    torch.testing.assert_close(logits, net[-1](h))
    plain = MnistCNN(width=0.25)
    assert len(plain) == len(net) - 1  # off by default: the Madry architecture and its state_dict keys
    with pytest.raises(ValueError, match="feature_norm must be True or False"):
        MnistCNN(feature_norm=1)
    afd.release()
