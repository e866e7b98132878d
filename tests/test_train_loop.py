"""The training loop: exact stop/resume (SIGTERM and max_steps), checkpoints that fail
clearly, torchrun with gloo matching one process, the CLI, and PGD-AT beating
standard training on real MNIST."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch

from fastadv.data import embedded_mnist, load_mnist
from fastadv.models import MnistCNN
from fastadv.train import CheckpointError, TrainConfig, Trainer, load_checkpoint, methods as M, save_checkpoint
from fastadv.train.distributed import shard_indices

REPO = pathlib.Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def small():
    x, y = embedded_mnist("train")
    return x[:192].clone(), y[:192].clone()


def _run(data, out, method, epochs=2, callbacks=None, resume=False, max_steps=None, save_every=0, heldout=None):
    torch.manual_seed(0)
    net = MnistCNN(width=0.25)
    cfg = TrainConfig(epochs=epochs, batch_size=32, optimizer="sgd", lr=0.05, schedule="cosine", out_dir=str(out),
                      resume=resume, progress=False, max_steps=max_steps, save_every=save_every, log_every=1,
                      eval_eps=0.1, eval_alpha=0.05, eval_steps=2, eval_samples=32, plot=False)
    tr = Trainer(net, method(), data, heldout, cfg, callbacks=callbacks)
    return tr.fit(), net


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _pgd():
    return M.PGDAT(eps=0.1, alpha=0.05, steps=2)


def _free():
    return M.FreeAT(eps=0.1, replays=2)


@pytest.mark.parametrize("method,stop", [(_pgd, "sigterm"), (_free, "max_steps")])
def test_stop_and_resume_gives_the_same_weights(small, tmp_path, method, stop):
    _, ref = _run(small, tmp_path / "ref", method)
    calls = []

    def sigterm_at_4(trainer, record):
        calls.append(record["step"])
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    if stop == "sigterm":
        r1, _ = _run(small, tmp_path / "run", method, callbacks=[sigterm_at_4])
    else:
        r1, _ = _run(small, tmp_path / "run", method, max_steps=7)  # into the 2nd epoch (6 batches/epoch)
    assert r1["stopped"] and pathlib.Path(r1["checkpoint"]).exists()
    ck = load_checkpoint(r1["checkpoint"])
    assert (ck["epoch"], ck["batch_in_epoch"]) == ((0, 4) if stop == "sigterm" else (1, 1))
    r2, resumed = _run(small, tmp_path / "run", method, resume=True)
    assert not r2["stopped"] and r2["epoch"] == 2
    assert _same(ref, resumed)
    # SIGTERM's handler is removed after fit: the default action is back
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_checkpoint_contents_and_files(small, tmp_path):
    held = embedded_mnist("heldout")
    res, net = _run(small, tmp_path, _pgd, epochs=1, save_every=2, heldout=held)
    assert 0 <= res["clean_acc"] <= 1 and 0 <= res["robust_acc"] <= res["clean_acc"] + 1e-9 and res["n"] == 32
    ck = torch.load(tmp_path / "last.pt", weights_only=True)  # loads without unpickling code
    assert ck["epoch"] == 1 and ck["step"] == 6 and ck["batch_in_epoch"] == 0
    assert set(ck["rng"]) == {"python", "numpy", "torch", "cuda"} and ck["optimizer"]["state"]
    assert ck["scheduler"]["last_epoch"] == 6 and ck["config"]["method"] == "pgd"
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in lines].count("epoch") == 1 and lines[-1]["robust_acc"] == res["robust_acc"]
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,step,train_loss")
    assert (tmp_path / "model.pt").exists()
    assert not list(tmp_path.glob("*.tmp-*"))  # atomic writes leave no temporary files


def test_corrupt_checkpoint_gives_clear_error(small, tmp_path):
    net = MnistCNN(width=0.25)
    p = save_checkpoint(tmp_path / "c.pt", model=net, epoch=1, step=3)
    assert load_checkpoint(p)["step"] == 3
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt is corrupt or truncated"):
        load_checkpoint(tmp_path / "trunc.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="garbage.pt is corrupt"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastadv checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    # a checkpoint that would run code on load is refused by weights_only
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "fastadv-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt is corrupt"):
        load_checkpoint(tmp_path / "evil.pt")
    # resuming a run from a corrupt last.pt names the file
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="last.pt is corrupt"):
        _run(small, tmp_path / "run", _pgd, resume=True)


def test_shard_indices_cover_the_global_batches():
    order = torch.randperm(103)
    one = shard_indices(order, 20, 0, 1)
    two = [shard_indices(order, 20, r, 2) for r in range(2)]
    assert len(one) == 5 and all(len(b) == 10 for b in two[0] + two[1])
    for i in range(5):
        assert torch.equal(torch.cat([two[0][i], two[1][i]]), one[i])
    with pytest.raises(ValueError, match="divisible"):
        shard_indices(order, 21, 0, 2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_two(tmp_path, common, out):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          f"--master_port={_free_port()}", "-m", "fastadv.cli", "train", *common,
                          "--out", str(tmp_path / out)], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2" in two.stderr
    return two, torch.load(tmp_path / out / "model.pt", weights_only=True)["model"]


def _torchrun_pair(tmp_path, common, tag):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    one = subprocess.run([sys.executable, "-m", "fastadv.cli", "train", *common, "--out", str(tmp_path / f"{tag}1")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two, b = _torchrun_two(tmp_path, common, f"{tag}2")
    a = torch.load(tmp_path / f"{tag}1" / "model.pt", weights_only=True)["model"]
    return one, two, a, b


_SMALL = ["--dataset", "embedded-mnist", "--train-samples", "256", "--batch-size", "64", "--epochs", "1",
          "--width", "0.25", "--optimizer", "sgd", "--lr", "0.05", "--eval-samples", "64", "--eval-steps", "1",
          "--no-progress", "--device", "cpu", "--final-eval", "none"]


def _start_weights():
    torch.manual_seed(0)
    return MnistCNN(width=0.25).state_dict()


def _assert_equal_to_rounding(a, b, steps=256 // 64, batch=64):
    """Deterministic training on 1 and on 2 ranks: equal up to the order of the batch sums. Worst-case float32
    rounding of a 64-term sum, per step, on weights of this size: steps x batch x 2**-24 x max|w|."""
    start = _start_weights()
    for k in a:
        assert not torch.equal(a[k], start[k])  # it trained
        tol = steps * batch * 2.0 ** -24 * a[k].abs().max().item()
        assert (a[k] - b[k]).abs().max().item() <= tol, (k, (a[k] - b[k]).abs().max().item(), tol)


def _assert_same_training_other_draws(a, b):
    """Random starts per rank: the same training (each tensor within half its update of the other run), from
    other random draws (some tensor differs)."""
    start = _start_weights()
    differs = 0
    for k in a:
        update = (a[k].double() - start[k].double()).norm().item()
        diff = (a[k].double() - b[k].double()).norm().item()
        assert update > 0 and diff < 0.5 * update, (k, diff, update)
        differs += diff > 0
    assert differs


def test_torchrun_two_processes_match_one(tmp_path):
    # Standard training: deterministic math, so 2 ranks (each half of the 64-image global batch, gradients
    # all-reduced) must equal 1 process up to the order of the batch sum. (PGD-AT is not bit-comparable: a
    # gradient coordinate near zero can take the other sign in the attack's sign step, and the two runs
    # then differ by 0.4-0.7% of their update, measured; see the random-start test below.)
    one, two, a, b = _torchrun_pair(tmp_path, [*_SMALL, "--method", "standard"], "std")
    # and 2 ranks x 2 micro-batches of 16 (gradient accumulation, DDP's all-reduce on the last one only)
    _, c = _torchrun_two(tmp_path, [*_SMALL, "--method", "standard", "--grad-accum", "2"], "std2x2")
    # the bound is 3e-6 here; measured difference at most 1.5e-8, about one ulp
    _assert_equal_to_rounding(a, b)
    _assert_equal_to_rounding(a, c)
    # the held-out metrics were reduced across ranks (64 images evaluated in total)
    s1 = json.loads(one.stdout.strip().splitlines()[-1])
    s2 = json.loads(two.stdout.strip().splitlines()[-1])
    assert s1["clean_acc"] == pytest.approx(s2["clean_acc"], abs=1 / 64 + 1e-9)


def test_torchrun_ranks_draw_their_own_random_starts(tmp_path):
    # PGD-AT with random starts: each rank has its own RNG stream, so the runs agree in distribution, not in
    # bits: the same training (weights within a fraction of the update of each other) from different draws.
    _, _, a, b = _torchrun_pair(tmp_path, [*_SMALL, "--method", "pgd", "--steps", "2", "--alpha", "0.05",
                                           "--eps", "0.1"], "pgd")
    _assert_same_training_other_draws(a, b)
    ck = torch.load(tmp_path / "pgd2" / "last.pt", weights_only=True)
    ranks = ck["extra"]["rng_ranks"]  # every rank's stream is in the checkpoint, for the resume
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def test_cli_small_run(tmp_path, capsys):
    from fastadv.cli import main

    rc = main(["train", "--train-samples", "200", "--batch-size", "50", "--epochs", "1", "--steps", "2",
               "--width", "0.25", "--eval-samples", "50", "--eval-steps", "2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # The last line is the headline: fastadv.evaluate(version='fast') on the held-out images, named by its attacks.
    assert lines[-1].startswith("robust accuracy ") and "under APGD-CE + APGD-T" in lines[-1], lines[-1]
    summary = json.loads(lines[-2])
    assert summary["method"] == "pgd" and 0 <= summary["robust_acc"] <= 1
    fe = summary["final_eval"]
    assert fe["attacks"] == ["apgd-ce", "apgd-t"] and fe["n"] == 50
    assert f"{100 * fe['robust_acc']:.2f}%" in lines[-1]
    # APGD-CE + APGD-T is at least as strong as the per-epoch PGD-2 on the same images
    assert fe["robust_acc"] <= summary["robust_acc"] + 1e-9
    for f in ("last.pt", "model.pt", "metrics.jsonl", "metrics.csv", "curves.png", "eval/report.json",
              "eval/report.md"):
        assert (tmp_path / f).exists(), f
    # model.pt records what rebuilds the model, so `fastadv eval --checkpoint model.pt --eps ...` needs nothing else
    meta = torch.load(tmp_path / "model.pt", weights_only=True)["meta"]
    assert meta["name"] == "mnist_cnn" and meta["kwargs"] == {"width": 0.25} and meta["dataset"] == "embedded-mnist"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pgd_at_beats_standard_training_on_real_mnist(mnist_dir, tmp_path):
    x, y = load_mnist(mnist_dir, "train", as_float=True)
    xt, yt = load_mnist(mnist_dir, "test", as_float=True)
    train, held = (x[:2500], y[:2500]), (xt[:300], yt[:300])
    results = {}
    for name, method in (("standard", M.Standard()), ("pgd", M.PGDAT(eps=0.2, alpha=0.05, steps=5))):
        torch.manual_seed(0)
        net = MnistCNN(width=0.5)
        cfg = TrainConfig(epochs=1, batch_size=50, optimizer="adam", lr=2e-3, weight_decay=0.0, schedule="constant",
                          eval_eps=0.2, eval_alpha=0.02, eval_steps=20, eval_samples=None, progress=False,
                          plot=False)
        results[name] = Trainer(net, method, train, held, cfg).fit()
    std, adv = results["standard"], results["pgd"]
    # measured here (seed 0): standard 94.0% clean / 7.7% robust, PGD-AT 79.0% / 41.7%
    assert std["clean_acc"] > 0.85  # both learned the task
    assert adv["clean_acc"] > 0.6
    assert adv["robust_acc"] > std["robust_acc"] + 0.2, (std, adv)


def test_diverged_loss_stops_the_run_naming_the_step():
    from fastadv.train.methods import Method, StepOutput
    from fastadv.train.trainer import TrainConfig, Trainer

    class Diverges(Method):
        name = "diverges"

        def loss(self, x, y):
            logits = self.forward(x)
            bad = self.step >= 2  # steps 0 and 1 are finite, the third is NaN
            loss = torch.nn.functional.cross_entropy(logits, y) * (float("nan") if bad else 1.0)
            return StepOutput(loss, logits, y)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x, y = torch.rand(40, 1, 4, 4), torch.arange(40) % 3
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, plot=False, eval_samples=None)
    with pytest.raises(FloatingPointError, match="diverges: the training loss is nan at epoch 1, step 3"):
        Trainer(net, Diverges(), (x, y), None, cfg).fit()


def test_methods_remove_their_hooks_when_training_ends():
    # DIAL/AFD tap the features with a persistent hook; a hook left on the trained model would (rightly)
    # make the evaluation's dynamic check call it suspicious
    from fastadv.models import get_model
    from fastadv.train.methods import get_method
    from fastadv.train.trainer import TrainConfig, Trainer

    for name in ("dial", "afd"):
        torch.manual_seed(0)
        net = get_model("mnist_cnn", 10, width=0.125)
        x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
        cfg = TrainConfig(epochs=1, batch_size=8, progress=False, plot=False, eval_samples=None)
        Trainer(net, get_method(name, eps=0.1, steps=2), (x, y), None, cfg).fit()
        hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())
        assert hooks == 0, name


def test_torchrun_double_backward_method_matches_one_process(tmp_path):
    # aRUB differentiates through input gradients (double backward through the DDP forward) and draws
    # nothing random, so 2 ranks must give the 1-process weights up to the order of the batch sums, as
    # standard training does: DDP's all-reduce fires once per parameter even though the loss holds
    # the first backward's graph (measured: at most 7.5e-9 apart, 0.7% of the bound).
    _, _, a, b = _torchrun_pair(tmp_path, [*_SMALL, "--method", "arub", "--eps", "0.1"], "arub")
    _assert_equal_to_rounding(a, b)


def test_torchrun_two_forward_method_matches_one_process_in_distribution(tmp_path):
    # TRADES: a clean and an adversarial forward through DDP before one backward, random starts per rank.
    # As for PGD-AT, 2 ranks and 1 process draw other starts, so they agree in distribution: the same
    # training (each tensor within half its update of the other run; measured at most 0.34%), not the same bits.
    _, _, a, b = _torchrun_pair(tmp_path, [*_SMALL, "--method", "trades", "--steps", "2", "--alpha", "0.05",
                                           "--eps", "0.1"], "trades")
    _assert_same_training_other_draws(a, b)
