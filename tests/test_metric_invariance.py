"""The metric method's invariance term (Tramer et al. 2020) and OT regularizer against their defining properties.

On a real MNIST batch at the defaults: the bank is larger than the batch, a share of the batch above 0
gets an invariance example, each lies within eps of its source on the segment toward its nearest bank
reference of another class (short of the reference), the nearest-neighbour oracle labels it with the
reference's class, every loss term is nonzero and the Sinkhorn of the OT term converged.
"""
import argparse
import math
import warnings

import pytest
import torch

from fastadv.attacks import InvarianceAttack
from fastadv.data import embedded_mnist
from fastadv.models import MnistCNN
from fastadv.train import methods as M
from fastadv.train.methods import metric as MM

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

P = {"l2": 2.0, "linf": math.inf, "l1": 1.0}


@pytest.fixture(scope="module")
def train():
    return embedded_mnist("train")


@pytest.fixture(scope="module")
def batch(train):
    x, y = train
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))[:100]  # the CLI's MNIST batch
    return x[idx].clone(), y[idx].clone()


def _bind(method, seed=0):
    torch.manual_seed(seed)
    net = MnistCNN(width=0.25)
    return method.bind(M.BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu"))), net


def _check_examples(x, y, x_inv, t, ref_index, xb, yb, eps, norm):
    """Each example: within eps of its source, on the segment [x, r] toward its nearest bank reference r of
    another class (strictly short of r), and nearer to a reference of class t than to x and to any other."""
    p = P[norm]
    assert x_inv.shape[0] > 0
    r = xb[ref_index]
    assert (yb[ref_index] == t).all() and (t != y).all()
    d = (x_inv - x).flatten(1).double()
    full = (r - x).flatten(1).double()
    assert (d.norm(p=p, dim=1) <= eps * (1 + 1e-5)).all()
    # on the segment: d = s (r - x) with s = min(1, eps / ||r - x||)
    s = (eps / full.norm(p=p, dim=1)).clamp(max=1)
    torch.testing.assert_close(d, s[:, None] * full, atol=1e-5, rtol=0)
    assert (s < 1).all(), "an example equal to its reference: eps reaches the other image itself"
    # r is the nearest bank image of another class (brute force, float64)
    dist = torch.cdist(x.flatten(1).double(), xb.flatten(1).double(), p=p)
    dist[y[:, None] == yb[None]] = math.inf
    torch.testing.assert_close(dist.gather(1, ref_index[:, None]).squeeze(1), dist.min(1).values, atol=1e-4, rtol=0)
    # the oracle: x_inv's nearest neighbour among the bank and its source has label t
    dd = torch.cdist(x_inv.flatten(1).double(), xb.flatten(1).double(), p=p)
    d_src = d.norm(p=p, dim=1)
    assert (dd.min(1).values <= d_src + 1e-4).all()
    assert (yb[dd.argmin(1)] == t).all()


def test_bank_is_a_fixed_subset_of_the_training_set_larger_than_the_batch(train, batch):
    m, _ = _bind(M.MetricAT(invariance_weight=1.0, invariance_ref=train))
    xb, yb = m.bank
    assert xb.shape[0] == MM.INV_BANK == 2000 > batch[0].shape[0]
    idx = torch.randperm(train[0].shape[0], generator=torch.Generator().manual_seed(0))[:2000].sort().values
    assert torch.equal(xb, train[0][idx]) and torch.equal(yb, train[1][idx])
    m2, _ = _bind(M.MetricAT(invariance_weight=1.0).set_invariance_bank(train), seed=5)
    assert torch.equal(m2.bank[0], xb)  # fixed: the bank does not depend on the global seed
    # a map-style dataset gives the same bank
    ds = torch.utils.data.TensorDataset(*train)
    assert torch.equal(MM.draw_bank(ds, 50, seed=1)[0], MM.draw_bank(train, 50, seed=1)[0])


def test_bank_errors(train, batch):
    with pytest.raises(ValueError, match="reference bank"):
        _bind(M.MetricAT(invariance_weight=1.0))
    m, _ = _bind(M.MetricAT(invariance_weight=1.0, invariance_ref=train, inv_bank=100))
    with pytest.raises(ValueError, match="larger than the batch"):
        m.loss(*batch)
    with pytest.raises(ValueError, match="inv_norm"):
        M.MetricAT(inv_norm="l3")
    with pytest.raises(ValueError, match="inv_eps"):
        M.MetricAT(inv_eps=0.0)


def test_every_term_is_nonzero_at_the_defaults(train, batch):
    x, y = batch
    m, net = _bind(M.MetricAT(invariance_weight=0.5, ot_weight=0.5, invariance_ref=train))
    assert (m.inv_norm, m.inv_eps, m.inv_bank) == ("l2", 3.0, 2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unconverged Sinkhorn warns
        out = m.loss(x, y)
    terms = m.last_terms
    assert set(terms) == {"ce_adv", "triplet", "norm", "inv_ce", "inv_triplet", "ot"}
    for k, v in terms.items():
        assert torch.isfinite(v) and v > 0, k
    st = m.epoch_stats()[-1]
    share = st["inv_examples"] / st["inv_candidates"]
    assert st["inv_candidates"] == 100 and share > 0  # measured 0.22 on 1,000 training images (metric.py)
    assert st["ot_calls"] == 1 and st["ot_unconverged"] == 0 and st["ot_max_residual"] <= m.ot_tol
    out.loss.backward()
    g = [p.grad for p in net.parameters()]
    assert all(torch.isfinite(t).all() for t in g) and any(t.abs().sum() > 0 for t in g)
    inv = m.last_invariance
    _check_examples(inv["x"], inv["y"], inv["x_inv"], inv["t"], inv["ref_index"], *m.bank, m.inv_eps, m.inv_norm)


@pytest.mark.parametrize("norm,eps", [("l2", 3.0), ("linf", 0.5), ("l2", 4.0)])
def test_invariance_examples_lie_on_the_segment_within_eps(train, batch, norm, eps):
    x, y = batch
    xb, yb = MM.draw_bank(train, 2000)
    atk = InvarianceAttack(None, xb, yb, eps=eps, norm=norm, segment=True)
    x_inv, t, keep, ref = atk.examples(x, y)
    assert keep.float().mean() > 0
    _check_examples(x[keep], y[keep], x_inv[keep], t[keep], ref[keep], xb, yb, eps, norm)
    # the dropped ones: the oracle still says y (nearer to the source or to a bank image of class y)
    drop = ~keep
    if drop.any():
        assert (atk.oracle_labels(x_inv[drop], x[drop], y[drop]) != t[drop]).all()


def test_the_papers_linf_radius_makes_none_on_mnist(train, batch):
    """Why the default is L2: at L-inf 0.4 no batch image is within 2 eps of a bank image of another class."""
    x, y = batch
    xb, yb = MM.draw_bank(train, 2000)
    atk = InvarianceAttack(None, xb, yb, eps=0.4, norm="linf", segment=True)
    assert not atk.examples(x, y)[2].any()
    assert atk.nearest_other(x, y)[1].min() > 0.9


def test_epoch_stats_count_per_epoch_and_survive_a_resume(train, batch):
    x, y = batch
    m, _ = _bind(M.MetricAT(steps=1, invariance_weight=0.5, invariance_ref=train))
    for epoch in range(2):
        m.on_epoch(epoch, 2)
        for _ in range(epoch + 1):
            m.loss(x, y)
    stats = m.describe()["epoch_stats"]
    assert [s["epoch"] for s in stats] == [0, 1]
    assert [s["inv_candidates"] for s in stats] == [100, 200]
    assert stats[1]["inv_examples"] >= stats[0]["inv_examples"] > 0
    m2 = M.MetricAT(invariance_weight=0.5, invariance_ref=train)
    m2.load_state_dict(m.state_dict())
    assert m2.epoch_stats() == stats


def test_trainer_checkpoint_carries_the_counts(train, tmp_path):
    from fastadv.train.checkpoint import load_checkpoint
    from fastadv.train.trainer import TrainConfig, Trainer

    x, y = train
    torch.manual_seed(0)
    m = M.MetricAT(eps=0.1, alpha=0.05, steps=1, invariance_weight=0.5, ot_weight=0.1, invariance_ref=train,
                   inv_bank=500)
    cfg = TrainConfig(epochs=1, batch_size=100, optimizer="adam", lr=1e-3, schedule="constant", progress=False,
                      plot=False, out_dir=str(tmp_path), eval_samples=None, device="cpu", channels_last=False)
    Trainer(MnistCNN(width=0.25), m, (x[:200], y[:200]), None, cfg).fit()
    st = load_checkpoint(tmp_path / "last.pt")["config"]["method_args"]["epoch_stats"]
    assert len(st) == 1 and st[0]["inv_candidates"] == 200 and st[0]["inv_examples"] > 0 and st[0]["ot_calls"] == 2


def test_ot_non_convergence_is_reported(train, batch):
    x, y = batch
    m, _ = _bind(M.MetricAT(steps=1, ot_weight=1.0, ot_iters=1, ot_tol=0.0))
    with pytest.warns(UserWarning, match="Sinkhorn stopped"):
        m.loss(x, y)
    st = m.epoch_stats()[-1]
    assert st["ot_unconverged"] == 1 and st["ot_max_residual"] > 0


def test_ot_regularizer_gradient_is_the_gradient_of_its_value():
    """Converged, the envelope gradient equals a finite difference of the returned value."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(12, 6, generator=g, dtype=torch.float64)
    b = torch.randn(15, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    v, it, res = MM.ot_regularizer(a, b, 0.1, 2000, tol=1e-10, return_info=True)
    assert res <= 1e-10
    (gb,) = torch.autograd.grad(v, b)
    d = torch.randn(b.shape, generator=g, dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (MM.ot_regularizer(a, b + h * d, 0.1, 2000, tol=1e-12)
              - MM.ot_regularizer(a, b - h * d, 0.1, 2000, tol=1e-12)) / (2 * h)
    torch.testing.assert_close((gb * d).sum(), fd, rtol=1e-4, atol=1e-7)


def test_cli_flags_reach_the_method():
    from fastadv.train import cli

    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    args = p.parse_args(["--method", "metric", "--invariance-weight", "0.5", "--inv-eps", "2.5", "--inv-norm", "linf",
                         "--inv-bank", "500"])
    m = cli.build_method(args, cli.DATASET_DEFAULTS[args.dataset], None)
    assert (m.invariance_weight, m.inv_eps, m.inv_norm, m.inv_bank) == (0.5, 2.5, "linf", 500)
    d = cli.build_method(p.parse_args(["--method", "metric"]), cli.DATASET_DEFAULTS["embedded-mnist"], None)
    assert (d.inv_eps, d.inv_norm, d.inv_bank) == (3.0, "l2", 2000)
