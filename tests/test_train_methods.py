"""Each training method takes optimizer steps that lower its own loss on a fixed batch of real MNIST."""
import pytest
import torch

from fastadv.data import embedded_mnist
from fastadv.models import MnistCNN
from fastadv.train import methods as M


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def batch():
    x, y = embedded_mnist("train")
    return x[:48].clone(), y[:48].clone()


def _net(seed=0):
    torch.manual_seed(seed)
    return MnistCNN(width=0.25)


def _bind(method, net):
    return method.bind(M.BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu")))


def _measure(method, x, y, seed=123, state=None):
    if state is not None:
        method.load_state_dict(state)
    torch.manual_seed(seed)  # same attack start / mixup draw / pairing for both measurements
    out = method.loss(x, y)
    return float(out.loss.detach())


CASES = {
    "standard": lambda: M.Standard(),
    "pgd": lambda: M.PGDAT(eps=0.1, alpha=0.03, steps=3),
    "trades": lambda: M.TRADES(eps=0.1, alpha=0.03, steps=3, beta=1.0),
    "fat": lambda: M.FAT(eps=0.1, alpha=0.03, steps=4, tau=1),
    "fat-trades": lambda: M.FAT(eps=0.1, alpha=0.03, steps=4, tau=0, trades=True, beta=1.0),
    "fast": lambda: M.FastAT(eps=0.1),
    "iat": lambda: M.IAT(eps=0.1, alpha=0.03, steps=3),
    "metric": lambda: M.MetricAT(eps=0.1, alpha=0.03, steps=3),
    "metric-inv-ot": lambda: M.MetricAT(eps=0.1, alpha=0.03, steps=3, invariance_weight=0.5, inv_eps=1.0,
                                        ot_weight=0.5, ot_iters=30),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_step_lowers_its_loss(name, batch):
    x, y = batch
    net = _net()
    method = _bind(CASES[name](), net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    method.on_epoch(0, 1)
    before = _measure(method, x, y)
    for i in range(12):
        torch.manual_seed(1000 + i)
        out = method.loss(x, y)
        assert out.loss.dim() == 0 and torch.isfinite(out.loss)
        assert out.logits.shape == (out.y.shape[0], 10)
        opt.zero_grad()
        out.loss.backward()
        method.after_backward()
        opt.step()
    after = _measure(method, x, y)
    assert after < 0.95 * before, (name, before, after)


def test_free_replays_and_delta(batch):
    x, y = batch
    net = _net()
    method = _bind(M.FreeAT(eps=0.1, replays=3), net)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    clean0 = torch.nn.functional.cross_entropy(net(x), y).item()
    losses = []
    for _ in range(2):  # two minibatches x 3 replays
        for _ in range(method.replays):
            out = method.loss(x, y)
            opt.zero_grad()
            out.loss.backward()
            method.after_backward()
            opt.step()
            losses.append(out.loss.item())
    d = method.state_dict()["delta"]
    # the perturbation evolves by eps-sized sign steps and stays in the ball and the box
    assert d.abs().max() <= 0.1 + 1e-6 and (d != 0).float().mean() > 0.5
    assert ((x + d) >= 0).all() and ((x + d) <= 1).all()
    clean1 = torch.nn.functional.cross_entropy(net(x), y).item()
    assert clean1 < 0.9 * clean0
    # state round trip
    m2 = _bind(M.FreeAT(eps=0.1, replays=3), net)
    m2.load_state_dict(method.state_dict())
    assert torch.equal(m2._delta, method._delta)


def test_ensemble_alternates_sources(batch):
    x, y = batch
    net, static = _net(0), _net(1)
    method = _bind(M.EnsembleAT([static], eps=0.1), net)
    assert method.sources == 2
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    before = [_measure(method, x, y, state={"counter": k}) for k in (0, 1)]
    w_static = [p.clone() for p in static.parameters()]
    method.counter = 0
    for i in range(6):
        out = method.loss(x, y)
        assert out.y.shape[0] == x.shape[0] - x.shape[0] // 2
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert method.counter == 6
    after = [_measure(method, x, y, state={"counter": k}) for k in (0, 1)]
    assert after[0] < 0.9 * before[0] and after[1] < 0.9 * before[1]
    # static models never train
    assert all(torch.equal(a, b) for a, b in zip(w_static, static.parameters()))
    assert all(not p.requires_grad for p in static.parameters())


def test_wasserstein_step_lowers_its_loss(batch):
    pytest.importorskip("fastadv.attacks.wasserstein")
    x, y = batch
    x, y = x[:16], y[:16]
    net = _net()
    method = _bind(M.WassersteinAT(eps=0.5, steps=3), net)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    before = _measure(method, x, y)
    for _ in range(6):
        out = method.loss(x, y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert _measure(method, x, y) < 0.9 * before


def test_fat_tau_schedule():
    assert [M.tau_schedule(e, 120) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]
    assert M.tau_schedule(119, 120, tau_max=1) == 1
    m = M.FAT()
    m.on_epoch(100, 120)
    assert m.tau == 2
    m = M.FAT(tau=0)
    m.on_epoch(100, 120)
    assert m.tau == 0


def test_triplet_picks_nearest_negative():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    ya = torch.tensor([0, 1, 2])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    # each anchor's class has only its own clean twin: positive distance 0 (row 3: not quite),
    # negative = the nearest other class; with margin 0 the hinge is zero for these well-separated points
    assert M.triplet_terms(a, c, ya, ya, margin=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # a large margin makes it positive: mean(d_pos - d_neg + margin)
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
    with pytest.raises(ValueError, match="nn.Linear"):
        M.penultimate_features(torch.nn.Conv2d(1, 1, 1))
