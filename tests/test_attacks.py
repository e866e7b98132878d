"""Attacks tested as attacks: the same batch as torchattacks and as a plain
reference loop, compaction that changes nothing but time, bad-input errors.

Tiny models and batches keep the file fast on a loaded 2-core CPU; the
models are fixed by the seed in conftest. Tests run with one intra-op thread:
on this machine, shared by several jobs, two OpenMP threads made each tiny
op ~1000x slower (20 ms for a (16, 10) cross-entropy, measured).
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadv
from fastadv import ops
from fastadv.attacks import (APGD, FGSM, PGD, PGDL2, RFGSM, SPSA, EarlyStoppedPGD, InvarianceAttack, TRADESAttack,
                             TransferAttack)
from fastadv.attacks.base import dlr_loss, margin
from fastadv.metrics import fosc
from fastadv.models import MnistCNN
from fastadv.reference import lp as ref

HAS_TA = importlib.util.find_spec("torchattacks") is not None


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def mlp(d=64, k=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, k)).eval()


def own_labels(model, x):
    """Labels = the model's clean predictions, so clean accuracy is 100%."""
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return MnistCNN(width=0.125).eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 1, 28, 28, generator=g), torch.randint(0, 10, (6,), generator=g)


def plain_pgd(model, x, y, eps, alpha, steps, norm):
    """torchattacks' PGD / PGDL2 loop, written out (random_start=False)."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = adv.detach()
        if norm == "linf":
            adv = adv + alpha * g.sign()
            delta = torch.clamp(adv - x, min=-eps, max=eps)
        else:
            gn = torch.norm(g.view(len(x), -1), p=2, dim=1) + 1e-10
            adv = adv + alpha * (g / gn.view(-1, 1, 1, 1))
            delta = adv - x
            dn = torch.norm(delta.view(len(x), -1), p=2, dim=1)
            factor = torch.min(eps / dn, torch.ones_like(dn))
            delta = delta * factor.view(-1, 1, 1, 1)
        adv = torch.clamp(x + delta, 0, 1)
    return adv


def ref_loop(model, x, y, eps, alpha, steps, step):
    """The same loop through fastadv.reference (the ground truth of the fused ops)."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        adv = step(adv.detach(), x, g, alpha, eps)
    return adv


# ---------------------------------------------------------------- exactness
def test_pgd_linf_bit_exact_vs_reference_loop(cnn, batch):
    x, y = batch
    ours = PGD(cnn, eps=0.3, alpha=0.01, steps=8, random_start=False)(x, y)
    assert torch.equal(ours, ref_loop(cnn, x, y, 0.3, 0.01, 8, ref.linf_step))
    assert torch.equal(ours, plain_pgd(cnn, x, y, 0.3, 0.01, 8, "linf"))


def test_pgd_l2_bit_exact_vs_reference_loop(cnn, batch):
    x, y = batch
    with fastadv.use_backend("ref"):
        ours = PGD(cnn, eps=1.5, alpha=0.2, steps=8, norm="l2", random_start=False)(x, y)
    assert torch.equal(ours, ref_loop(cnn, x, y, 1.5, 0.2, 8, ref.l2_step))
    # The compiled C++ kernel sums the norms in another order: equal to float32 rounding.
    compiled = PGD(cnn, eps=1.5, alpha=0.2, steps=8, norm="l2", random_start=False)(x, y)
    torch.testing.assert_close(compiled, ours)


@pytest.mark.skipif(not HAS_TA, reason="torchattacks not installed (pip install --no-deps torchattacks)")
def test_pgd_linf_bit_exact_vs_torchattacks(cnn, batch):
    import torchattacks

    x, y = batch
    theirs = torchattacks.PGD(cnn, eps=0.3, alpha=0.01, steps=8, random_start=False)(x, y)
    ours = PGD(cnn, eps=0.3, alpha=0.01, steps=8, random_start=False)(x, y)
    assert torch.equal(ours, theirs)


@pytest.mark.skipif(not HAS_TA, reason="torchattacks not installed (pip install --no-deps torchattacks)")
def test_pgd_l2_bit_exact_vs_torchattacks(cnn, batch):
    import torchattacks

    # One step on many random samples first: a 1-ulp disagreement is certain to show there,
    # while a short attack on 6 samples may pass by luck.
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(512, 3, 4, 4, generator=g)
    xk = (x0 + 0.2 * torch.randn(x0.shape, generator=g)).clamp(0, 1)
    grad = torch.randn(x0.shape, generator=g)
    gn = torch.norm(grad.view(512, -1), p=2, dim=1) + 1e-10
    delta = xk + 0.3 * (grad / gn.view(-1, 1, 1, 1)) - x0
    dn = torch.norm(delta.view(512, -1), p=2, dim=1)
    want = torch.clamp(x0 + delta * torch.min(0.7 / dn, torch.ones_like(dn)).view(-1, 1, 1, 1), 0, 1)
    with fastadv.use_backend("ref"):
        assert torch.equal(ops.l2_step(xk, x0, grad, 0.3, 0.7), want)

    x, y = batch
    theirs = torchattacks.PGDL2(cnn, eps=1.5, alpha=0.2, steps=8, random_start=False)(x, y)
    assert torch.equal(plain_pgd(cnn, x, y, 1.5, 0.2, 8, "l2"), theirs)  # the plain loop is torchattacks
    with fastadv.use_backend("ref"):
        ours = PGDL2(cnn, eps=1.5, alpha=0.2, steps=8, random_start=False)(x, y)
    assert torch.equal(ours, theirs)


def test_fgsm_formula(cnn, batch):
    x, y = batch
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(cnn(xr), y), xr)
    assert torch.equal(FGSM(cnn, eps=0.1)(x, y), (x + 0.1 * g.sign()).clamp(0, 1))


# ---------------------------------------------------------------- engine
def first_fooling_loop(model, x, y, eps, alpha, steps, tau=0):
    """Full-batch Linf PGD that freezes each sample at its (tau+1)-th fooling iterate (no compaction)."""
    adv, done = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    count = torch.zeros(len(x), dtype=torch.long)
    for _ in range(steps):
        adv.requires_grad_(True)
        logits = model(adv)
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y), adv)
        fooled = logits.argmax(1) != y
        done |= fooled & (count == tau)
        count += (fooled & ~done).long()
        new = ref.linf_step(adv.detach(), x, g, alpha, eps)
        adv = torch.where(done.view(-1, 1, 1, 1), adv.detach(), new)
    return adv, done


@pytest.mark.parametrize("compact_every", [1, 3])
def test_compaction_same_robust_accuracy_as_full_batch(compact_every):
    model = mlp()
    x = torch.rand(64, 1, 8, 8)
    y = own_labels(model, x)
    full, ever = first_fooling_loop(model, x, y, 0.06, 0.01, 12)
    fast = PGD(model, 0.06, 0.01, 12, random_start=False, early_stop=True, compact_every=compact_every)(x, y)
    fooled_fast = model(fast).argmax(1) != y
    fooled_full = model(full).argmax(1) != y
    assert 0 < int(fooled_full.sum()) < 64  # a case where compaction has work to do
    assert torch.equal(fooled_fast, fooled_full)
    assert torch.equal(fooled_full, ever)
    # Frozen samples sit at the same first fooling iterate (up to a batch-size-dependent
    # rounding of the gradient, which has not flipped a sign here).
    torch.testing.assert_close(fast, full)
    # ...and early stop is never weaker than the plain full-batch attack at its last iterate.
    plain = PGD(model, 0.06, 0.01, 12, random_start=False)(x, y)
    assert ((model(plain).argmax(1) != y) <= fooled_fast).all()


def test_early_stopped_pgd_tau():
    model = mlp()
    x = torch.rand(32, 1, 8, 8)
    y = own_labels(model, x)
    a0 = EarlyStoppedPGD(model, 0.1, 0.01, 15, tau=0)(x, y)
    a3 = EarlyStoppedPGD(model, 0.1, 0.01, 15, tau=3)(x, y)
    full, _ = first_fooling_loop(model, x, y, 0.1, 0.01, 15)
    torch.testing.assert_close(a0, full)
    full3, stopped3 = first_fooling_loop(model, x, y, 0.1, 0.01, 15, tau=3)
    torch.testing.assert_close(a3, full3)
    assert stopped3.any() and not torch.equal(a0, a3)  # tau moved the stopping point


def test_restarts_keep_the_worst_case():
    model = mlp()
    x = torch.rand(48, 1, 8, 8)
    y = own_labels(model, x)
    # One short step from a random start: restarts matter. Same seed: restart 0 is the single run.
    torch.manual_seed(5)
    one = PGD(model, 0.05, 0.025, 1)(x, y)
    torch.manual_seed(5)
    many = PGD(model, 0.05, 0.025, 1, restarts=8)(x, y)
    f1, f8 = model(one).argmax(1) != y, model(many).argmax(1) != y
    assert (f1 <= f8).all() and f8.sum() > f1.sum()
    assert (many - x).abs().max() <= 0.05 + 1e-6


def test_model_mode_is_explicit_and_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    stats = model[1].running_mean.clone()
    PGD(model, 0.1, 0.02, 3)(x, y)  # default: eval, BN statistics untouched
    assert model.training and not model[1].training
    assert torch.equal(model[1].running_mean, stats)
    PGD(model, 0.1, 0.02, 3, model_mode="train")(x, y)  # batch statistics: running stats move
    assert model.training and not model[1].training
    assert not torch.equal(model[1].running_mean, stats)
    model.eval()
    PGD(model, 0.1, 0.02, 3, model_mode="as-is")(x, y)
    assert not model.training


def test_targeted_reaches_target():
    model = mlp()
    x = torch.rand(32, 1, 8, 8)
    y = own_labels(model, x)
    t = (y + 1) % 10
    adv = PGD(model, 0.5, 0.05, 30, targeted=True, early_stop=True)(x, t)
    assert (model(adv).argmax(1) == t).float().mean() > 0.9
    assert (adv - x).abs().max() <= 0.5 + 1e-6


def test_autocast_bf16_keeps_float32_state(cnn, batch):
    x, y = batch
    adv = PGD(cnn, 0.1, 0.02, 3, autocast="bf16")(x, y)
    assert adv.dtype == torch.float32
    assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    # A bf16 model with bf16 images: state in float32 inside, the result in the input's dtype.
    half = mlp().to(torch.bfloat16)
    xb = torch.rand(8, 1, 8, 8).to(torch.bfloat16)
    adv = PGD(half, 0.1, 0.02, 3)(xb, own_labels(half, xb))
    # + 1e-2: the float32 result is rounded to bf16 on the way out (1 ulp at 1.0 is 2^-8 = 0.0039).
    assert adv.dtype == torch.bfloat16 and (adv.float() - xb.float()).abs().max() <= 0.1 + 1e-2


def test_channels_last_same_result(cnn, batch):
    x, y = batch
    a = PGD(cnn, 0.1, 0.02, 3, random_start=False, channels_last=False)(x, y)
    b = PGD(cnn, 0.1, 0.02, 3, random_start=False, channels_last=True)(x, y)
    torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_compile_gives_the_same_batch():
    """torch.compile of the model (the engine's compile=True); ~30 s of compilation on this CPU."""
    model = mlp()
    x = torch.rand(16, 1, 8, 8)
    y = own_labels(model, x)
    eager = PGD(model, 0.05, 0.01, 5, random_start=False)(x, y)
    compiled = PGD(model, 0.05, 0.01, 5, random_start=False, compile=True)(x, y)
    torch.testing.assert_close(compiled, eager)
    assert not model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_cuda_graph_matches_eager():
    model = MnistCNN(width=0.25).cuda().eval()
    x, y = torch.rand(16, 1, 28, 28, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    a = PGD(model, 0.1, 0.02, 5, random_start=False)(x, y)
    b = PGD(model, 0.1, 0.02, 5, random_start=False, cuda_graph=True)(x, y)
    c = PGD(model, 0.1, 0.02, 5, random_start=False, cuda_graph=True)(x, y)  # replay
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(b, c)


# ---------------------------------------------------------------- the suite
@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.5), ("l1", 4.0)])
def test_apgd_stays_in_ball_and_beats_pgd(norm, eps):
    model = mlp()
    x = torch.rand(48, 1, 8, 8)
    y = own_labels(model, x)
    torch.manual_seed(0)
    adv = APGD(model, eps, 30, norm=norm)(x, y)
    d = (adv - x).flatten(1)
    size = {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]
    assert (size <= eps * (1 + 1e-5) + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    pgd = PGD(model, eps, eps / 4, 30, norm=norm, random_start=False)(x, y)
    acc_apgd = (model(adv).argmax(1) == y).float().mean()
    acc_pgd = (model(pgd).argmax(1) == y).float().mean()
    assert acc_apgd < 1.0 and acc_apgd <= acc_pgd + 2 / 48


def test_apgd_dlr_and_losses():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 5.0]])
    y = torch.tensor([0, 1])
    torch.testing.assert_close(margin(z, y), torch.tensor([-2.0, 3.0]))
    # DLR = -(z_y - max_other) / (z_pi1 - z_pi3)
    torch.testing.assert_close(dlr_loss(z, y), torch.tensor([-(3 - 1) / (3 - 0 + 1e-12), -(2 - 5) / (5 - 1 + 1e-12)]))
    model = mlp()
    x = torch.rand(32, 1, 8, 8)
    yy = own_labels(model, x)
    adv = APGD(model, 0.05, 20, loss="dlr")(x, yy)
    assert (model(adv).argmax(1) != yy).any()


def test_rfgsm_trades_spsa_in_ball():
    model = mlp()
    x = torch.rand(16, 1, 8, 8)
    y = own_labels(model, x)
    for atk in (RFGSM(model, 0.1, 0.05), TRADESAttack(model, 0.1, 0.02, 5), SPSA(model, 0.1, 5, samples=16)):
        adv = atk(x, y)
        assert (adv - x).abs().max() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1, type(atk).__name__
    # TRADES raises the KL to the clean prediction
    p = F.softmax(model(x), 1)
    adv = TRADESAttack(model, 0.1, 0.02, 5)(x, y)
    assert F.kl_div(F.log_softmax(model(adv), 1), p, reduction="batchmean") > 1e-3


def test_spsa_fools_without_gradients():
    """A hard threshold in front of the model: zero gradients, PGD stuck, SPSA is not."""
    net = mlp()

    class Threshold(nn.Module):
        def forward(self, x):
            return net((x > 0.5).float())

    model = Threshold()
    x = torch.rand(16, 1, 8, 8)
    y = own_labels(model, x)
    pgd = PGD(model, 0.3, 0.05, 10, random_start=False)(x, y)
    assert torch.equal(pgd, x)  # zero gradient: no move
    torch.manual_seed(0)
    adv = SPSA(model, 0.3, 10, samples=32, delta=0.3, lr=0.1)(x, y)
    assert (model(adv).argmax(1) != y).sum() >= 4


def test_transfer_with_the_target_as_source_is_pgd(cnn, batch):
    x, y = batch
    tr = TransferAttack(cnn, [cnn], eps=0.1, alpha=0.02, steps=4, random_start=False)(x, y)
    assert torch.equal(tr, PGD(cnn, 0.1, 0.02, 4, random_start=False)(x, y))
    ens = TransferAttack(cnn, [mlp(784), mlp(784, seed=1)], eps=0.1, alpha=0.02, steps=4)(x, y)
    assert (ens - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0), ("l1", 20.0)])
def test_invariance_attack(norm, eps):
    g = torch.Generator().manual_seed(0)
    xr, yr = torch.rand(50, 1, 6, 6, generator=g), torch.randint(0, 5, (50,), generator=g)
    x, y = torch.rand(7, 1, 6, 6, generator=g), torch.randint(0, 5, (7,), generator=g)
    atk = InvarianceAttack(None, xr, yr, eps=eps, norm=norm, chunk=16)
    adv, t = atk(x, y)
    p = {"linf": float("inf"), "l2": 2.0, "l1": 1.0}[norm]
    dist = torch.cdist(x.flatten(1), xr.flatten(1), p=p)
    dist[y[:, None] == yr[None]] = float("inf")
    nearest = dist.argmin(1)
    assert torch.equal(t, yr[nearest]) and (t != y).all()
    d = (adv - x).flatten(1)
    size = {"linf": d.abs().amax(1), "l2": d.norm(dim=1), "l1": d.abs().sum(1)}[norm]
    assert (size <= eps * (1 + 1e-5) + 1e-6).all()
    reach = dist.min(1).values <= eps
    torch.testing.assert_close(adv[reach], xr[nearest][reach])


def test_fosc_zero_at_the_linf_vertex():
    """For a linear loss the PGD optimum is x0 + eps sign(grad): FOSC = 0 there, > 0 elsewhere."""
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    x0 = 0.25 + 0.5 * torch.rand(4, 1, 4, 4)  # away from the box, so only the ball binds
    y = torch.zeros(4, dtype=torch.long)
    xr = x0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(lin(xr), y, reduction="sum"), xr)
    vertex = x0 + 0.1 * g.sign()
    c_vertex = fosc(lin, vertex, x0, y, 0.1)
    c_start = fosc(lin, x0, x0, y, 0.1)
    assert (c_start > 0).all() and (c_vertex.abs() < 1e-3 * c_start).all()
    pgd = PGD(lin, 0.1, 0.02, 10, random_start=False)(x0, y)
    assert (fosc(lin, pgd, x0, y, 0.1) < 0.5 * c_start).all()


# ---------------------------------------------------------------- bad input
def test_bad_inputs_name_the_argument(cnn, batch):
    x, y = batch
    atk = PGD(cnn, 0.1, 0.02, 2)
    with pytest.raises(ValueError, match="y holds label 10"):
        atk(x, torch.full_like(y, 10))
    with pytest.raises(ValueError, match="labels >= 0"):
        atk(x, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="x must lie in the box"):
        atk(x + 1.5, y)
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        atk(x, y[:3])
    with pytest.raises(TypeError, match="y must be an integer"):
        atk(x, y.float())
    with pytest.raises(ValueError, match="x contains NaN"):
        atk(torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        PGD(cnn, -0.1)
    with pytest.raises(ValueError, match="norm must be one of"):
        PGD(cnn, 0.1, norm="l3")
    with pytest.raises(ValueError, match="model_mode must be one of"):
        PGD(cnn, 0.1, model_mode="inference")
    with pytest.raises(ValueError, match=r"model must return logits of shape \(B, num_classes\)"):
        PGD(lambda t: t.flatten(1)[:, :1], 0.1)(x, y)
    with pytest.raises(ValueError, match="model must return logits"):
        PGD(lambda t: t[:2].flatten(1), 0.1)(x, y)
    with pytest.raises(ValueError, match="dlr"):
        APGD(cnn, 0.1, loss="dlr", targeted=True)


def test_empty_batch_and_zero_eps(cnn, batch):
    x, y = batch
    assert PGD(cnn, 0.1, 0.02, 2)(x[:0], y[:0]).shape == (0, 1, 28, 28)
    assert torch.equal(PGD(cnn, 0.0, 0.02, 3)(x, y), x)
