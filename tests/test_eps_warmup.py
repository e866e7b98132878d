"""The eps warm-up every method shares (``Method.set_eps_warmup``, ``fastadv train --eps-warmup``).

Defining property: at optimizer step t of T with warm-up fraction f, every input the method feeds
the network (attack iterates and training batch) lies in the L-inf ball of radius
eps * min(1, (t + 1) / (f T)) around the clean batch, and after the warm-up the full radius is used.
"""
import pytest
import torch

from fastadv.data import embedded_mnist
from fastadv.models import MnistCNN
from fastadv.train import methods as M

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

EPS = 0.3
# methods whose every network input is the clean batch or a point of the eps ball (metric's invariance
# examples and IAT's mixup leave the ball by design, so they are not in this list)
RAMPED = {
    "pgd": dict(alpha=0.04, steps=5),
    "trades": dict(alpha=0.04, steps=5),
    "mart": dict(alpha=0.04, steps=5),
    "fat": dict(alpha=0.04, steps=5),
    "fast": dict(),
    "fosc": dict(alpha=0.04, steps=5),
    "dial": dict(alpha=0.04, steps=5),
    "free": dict(replays=2),
}


@pytest.fixture(scope="module")
def batch():
    x, y = embedded_mnist("train")
    return x[:24].clone(), y[:24].clone()


def _bound(name, seed=0):
    torch.manual_seed(seed)
    net = MnistCNN(width=0.25)
    method = M.METHODS[name](eps=EPS, **RAMPED[name])
    method.bind(M.BindContext(net=net, model=net, attack_net=net, device=torch.device("cpu")))
    return net, method


def _largest_distance(net, method, x, y, step, total):
    """max over the network's inputs during one training step of ||input - x||_inf (inputs of x's shape)."""
    seen = []
    handle = net.register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].detach() - x).abs().amax().item()) if args[0].shape == x.shape
        else None)
    try:
        method.on_epoch(0, 1)
        method.on_step(step, total)
        for _ in range(method.replays):  # Free-AT moves its delta in after_backward, between replays
            method.loss(x, y).loss.backward()
            method.after_backward()
    finally:
        handle.remove()
    assert seen, "the method never called the network on a batch of x's shape"
    return max(seen)


@pytest.mark.parametrize("name", sorted(RAMPED))
def test_every_input_lies_in_the_ramped_ball_and_the_full_ball_is_used_after(batch, name):
    x, y = batch
    net, method = _bound(name)
    method.set_eps_warmup(0.5)  # T = 10 steps: factor (t + 1) / 5
    early = _largest_distance(net, method, x, y, step=0, total=10)
    assert method.eps == pytest.approx(0.2 * EPS) and method.eps_target == EPS
    assert early <= 0.2 * EPS + 1e-6
    late = _largest_distance(net, method, x, y, step=7, total=10)
    assert method.eps == EPS
    # not blind: once the warm-up is over the attack leaves the early ball (an MNIST CNN's attack reaches
    # well past 0.06 at eps 0.3)
    assert 0.2 * EPS + 1e-3 < late <= EPS + 1e-6


def test_alpha_ramps_with_eps_and_describe_keeps_the_configured_values():
    m = M.METHODS["trades"](eps=0.3, alpha=0.04, steps=3).set_eps_warmup(0.25)
    m.on_step(1, 40)  # (1 + 1) / (0.25 * 40) = 0.2
    assert m.eps == pytest.approx(0.06) and m.alpha == pytest.approx(0.008)
    assert (m.eps_target, m.alpha_target) == (0.3, 0.04)
    d = m.describe()
    assert (d["eps"], d["alpha"], d["eps_warmup"]) == (0.3, 0.04, 0.25)
    m.on_step(9, 40)
    assert (m.eps, m.alpha) == (0.3, 0.04)
    # off by default: the configured values, whatever the step
    m = M.METHODS["mart"](eps=0.3)
    m.on_step(0, 1000)
    assert m.eps == 0.3 and "eps_warmup" not in m.describe()


def test_pgd_constructor_warmup_is_the_shared_one():
    p = M.METHODS["pgd"](eps=0.3, alpha=0.04, eps_warmup=0.5)
    p.on_step(0, 10)
    assert p.eps == pytest.approx(0.06) and p.alpha == pytest.approx(0.008)


def test_bad_warmups_are_refused_with_the_argument_named():
    with pytest.raises(ValueError, match="eps_warmup"):
        M.METHODS["mart"]().set_eps_warmup(-0.1)
    with pytest.raises(ValueError, match="eps_warmup must be a fraction"):
        M.METHODS["mart"]().set_eps_warmup(2.0)
    with pytest.raises(ValueError, match="'standard' has no eps"):
        M.METHODS["standard"]().set_eps_warmup(0.3)


def test_boosting_ramps_each_members_eps(monkeypatch, batch):
    from fastadv.train import TrainConfig
    from fastadv.train.methods.boosting import MarginBoost, train_boosted

    seen = []
    orig = MarginBoost.loss

    def spy(self, x, y):
        seen.append((len(self._frozen), self.eps))
        return orig(self, x, y)

    monkeypatch.setattr(MarginBoost, "loss", spy)
    x, y = batch
    cfg = TrainConfig(epochs=1, batch_size=6, optimizer="sgd", lr=0.01, schedule="constant", progress=False,
                      plot=False, eval_steps=1, eval_samples=6, workers=0)
    train_boosted(lambda: MnistCNN(width=0.125), 2, (x, y), (x[:6], y[:6]), cfg, eps=EPS, alpha=0.04, steps=1,
                  eps_warmup=0.5)
    # 4 steps per member, ramp over 2: eps/2, eps, eps, eps, for each member
    expect = [EPS / 2, EPS, EPS, EPS]
    assert [e for t, e in seen if t == 0] == pytest.approx(expect)
    assert [e for t, e in seen if t == 1] == pytest.approx(expect)
