"""Gradient accumulation (TrainConfig.grad_accum / --grad-accum): k micro-batches per optimizer step give the
training of the whole batch, up to the order of the float sums; methods that cannot split a batch refuse."""
import pytest
import torch

from fastadv.data import embedded_mnist
from fastadv.models import MnistCNN
from fastadv.train import TrainConfig, Trainer, methods as M

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small():
    x, y = embedded_mnist("train")
    return x[:128].clone(), y[:128].clone()


def _train(data, method, accum, **kw):
    torch.manual_seed(0)
    net = MnistCNN(width=0.25)
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.05, schedule="cosine", progress=False,
                      plot=False, log_every=0, grad_accum=accum, **kw)
    out = Trainer(net, method, data, None, cfg).fit()
    return net, out


def test_micro_batches_train_like_the_whole_batch(small):
    # CE on a network without batch norm: the batch gradient is the mean of the k micro-batch means exactly,
    # so the weights differ only by float32 rounding: per step at most (batch) x 2**-24 relative to the
    # largest weight, over 4 steps (the bound is 4e-6 x max|w|; measured: about one ulp).
    a, ra = _train(small, M.Method(), 1)
    b, rb = _train(small, M.Method(), 4)
    assert ra["step"] == rb["step"] == 4
    steps, batch = 4, 32
    for (k, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        tol = steps * batch * 2.0 ** -24 * wa.abs().max().item()
        assert (wa - wb).abs().max().item() <= tol, (k, (wa - wb).abs().max().item(), tol)
    # the logged loss and accuracy are those of the whole batch
    assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-5)
    assert ra["train_acc"] == rb["train_acc"]


def test_adversarial_methods_accumulate_too(small):
    # PGD-AT and TRADES draw their random starts per micro-batch (another draw of the same law), so the runs
    # differ; the step count and the schedule must not
    for method in (M.PGDAT(eps=0.1, alpha=0.05, steps=2), M.TRADES(eps=0.1, alpha=0.05, steps=2)):
        _, r1 = _train(small, method, 1)
        _, r2 = _train(small, method, 2)
        assert r1["step"] == r2["step"] == 4 and r1["lr"] == r2["lr"]


def test_grad_accum_refusals_name_the_argument(small):
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="grad_accum 3 must divide each rank's batch"):
        _train(small, M.Method(), 3)
    for method, why in ((M.FreeAT(eps=0.1, replays=2), "perturbation"), (M.AWP(M.PGDAT(eps=0.1, alpha=0.05, steps=1)),
                                                                          "perturbs the weights")):
        with pytest.raises(ValueError, match=f"method '{method.name}' cannot split a batch.*{why}"):
            _train(small, method, 2)
