"""fastadv.evaluate: the report, the gradient-masking checks on deliberately
masked models, resume after an interruption, the curve files, the CLI."""
import json

import pytest
import torch
from torch import nn

from fastadv.attacks import FGSM, PGD, Attack
from fastadv.evaluate import GradientMaskingWarning, evaluate

FAST_CHECKS = dict(check_samples=24, spsa_steps=10, spsa_samples=32, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def data(model, n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 10  # a few clean mistakes
    return x, y


class Threshold(nn.Module):
    """A hard threshold in front of a normal network: zero gradients everywhere."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x > 0.5).float())


def deterministic_attacks(model):
    return [("fgsm", FGSM(model, 0.05)), ("pgd", PGD(model, 0.05, 0.01, 10, random_start=False))]


def test_report_and_cascade():
    model = mlp()
    x, y = data(model)
    r = evaluate(model, (x, y), attacks=deterministic_attacks(model), eps=0.05, batch_size=16, checks=False,
                 progress=False)
    assert r["n"] == 48 and r["clean_accuracy"] == pytest.approx(44 / 48)
    a = r["attacks"]
    assert r["clean_accuracy"] >= a["fgsm"]["robust_accuracy"] >= a["pgd"]["robust_accuracy"] == r["robust_accuracy"]
    assert 0 < r["robust_accuracy"] < r["clean_accuracy"]
    assert a["fgsm"]["ran_on"] == 44 and a["pgd"]["ran_on"] == 44 - a["fgsm"]["fooled"]  # cascading
    assert r["images_per_s"] > 0 and r["time_s"] > 0
    # Without cascading every attack runs on all clean-correct samples; the worst case is the same.
    r2 = evaluate(model, (x, y), attacks=deterministic_attacks(model), eps=0.05, batch_size=16, cascade=False,
                  checks=False, progress=False)
    assert r2["attacks"]["pgd"]["ran_on"] == 44
    assert r2["robust_accuracy"] == r["robust_accuracy"]
    assert r2["attacks"]["pgd"]["robust_accuracy"] >= r["robust_accuracy"]


def test_healthy_model_passes_the_checks():
    model = mlp()
    x, y = data(model)
    r = evaluate(model, (x, y), attacks=["pgd"], eps=0.05, batch_size=24, **FAST_CHECKS)
    assert r["warnings"] == [] and not r["suspicious"]
    assert r["checks"]["zero_gradient_share"] == 0 and r["checks"]["huge_eps_accuracy"] <= 0.1


def test_masked_model_is_suspicious_not_robust():
    model = Threshold(mlp())
    x, y = data(model)
    with pytest.warns(GradientMaskingWarning):
        r = evaluate(model, (x, y), attacks=["pgd", "apgd-ce"], eps=0.1, batch_size=24, **FAST_CHECKS)
    assert r["suspicious"] and r["verdict"].startswith("SUSPICIOUS")
    text = " ".join(r["warnings"])
    assert "exactly zero input gradient" in text
    assert "every image is reachable" in text  # huge eps cannot move it either
    assert "SPSA" in text  # the gradient-free attack finds what PGD cannot
    assert r["checks"]["zero_gradient_share"] == 1.0


def test_probabilities_and_randomness_are_flagged():
    net = mlp()
    x, y = data(net)
    probs = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    with pytest.warns(GradientMaskingWarning):
        r = evaluate(probs, (x, y), attacks=["fgsm"], eps=0.05, batch_size=48, **FAST_CHECKS)
    assert r["checks"]["probabilities"] and any("probabilities" in w for w in r["warnings"])

    class Noisy(nn.Module):
        def forward(self, t):
            return net(t + 0.05 * torch.randn_like(t))

    with pytest.warns(GradientMaskingWarning):
        r = evaluate(Noisy(), (x, y), attacks=["fgsm"], eps=0.05, batch_size=48, **FAST_CHECKS)
    assert r["checks"]["randomized"] and any("EOT" in w for w in r["warnings"])


class Counting(Attack):
    """Wraps an attack and counts the samples it is called on."""

    def __init__(self, inner):
        super().__init__(inner.model)
        self.inner, self.eps, self.seen = inner, inner.eps, 0

    def perturb(self, x, y):
        self.seen += x.shape[0]
        return self.inner(x, y)


def test_resume_after_interruption(tmp_path):
    model = mlp()
    x, y = data(model, n=64)
    state = tmp_path / "state.json"

    def batches(stop_after=None):
        for i in range(4):
            if stop_after is not None and i == stop_after:
                raise KeyboardInterrupt("simulated interruption")
            yield x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)]

    first = Counting(PGD(model, 0.05, 0.01, 10, random_start=False))
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, batches(stop_after=2), attacks=[("pgd", first)], eps=0.05, checks=False, state_path=state,
                 progress=False)
    saved = json.loads(state.read_text())
    assert len(saved["batches"]) == 2 and not list(tmp_path.glob("*.tmp"))
    second = Counting(PGD(model, 0.05, 0.01, 10, random_start=False))
    resumed = evaluate(model, batches(), attacks=[("pgd", second)], eps=0.05, checks=False, state_path=state,
                       progress=False)
    correct_late = int((model(x[32:]).argmax(1) == y[32:]).sum())
    assert second.seen == correct_late  # only the two unfinished batches were attacked
    fresh = evaluate(model, batches(), attacks=[("pgd", PGD(model, 0.05, 0.01, 10, random_start=False))], eps=0.05,
                     checks=False, progress=False)
    for k in ("n", "clean_accuracy", "robust_accuracy"):
        assert resumed[k] == fresh[k]
    # A state from another evaluation is refused, not silently mixed in.
    with pytest.raises(ValueError, match="state_path .* holds a different evaluation"):
        evaluate(model, batches(), attacks=[("pgd", second)], eps=0.1, checks=False, state_path=state, progress=False)


def test_curve_files(tmp_path):
    model = mlp()
    x, y = data(model)
    r = evaluate(model, (x, y), attacks=["fgsm"], eps=0.05, checks=False, curve=[0.0, 0.05, 0.2], out_dir=tmp_path,
                 progress=False)
    assert [p["eps"] for p in r["curve"]] == [0.0, 0.05, 0.2]
    assert r["curve"][0]["robust_accuracy"] == pytest.approx(r["clean_accuracy"])
    assert r["curve"][2]["robust_accuracy"] < r["curve"][0]["robust_accuracy"]
    assert json.loads((tmp_path / "curve.json").read_text()) == r["curve"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["robust_accuracy"] == r["robust_accuracy"]


def test_bad_arguments():
    model = mlp()
    x, y = data(model)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        evaluate(model, (x, y), eps=-1.0)
    with pytest.raises(ValueError, match="attack must be one of"):
        evaluate(model, (x, y), attacks=["deepfool"], eps=0.1)
    with pytest.raises(ValueError, match="mismatched sizes"):
        evaluate(model, (x, y[:3]), attacks=["fgsm"], eps=0.1, checks=False, progress=False)
    with pytest.raises(ValueError, match="y holds label 12"):
        evaluate(model, (x, torch.full_like(y, 12)), attacks=["fgsm"], eps=0.1, checks=False, progress=False)
    with pytest.raises(ValueError, match="x must lie in the box"):
        evaluate(model, (x * 3, y), attacks=["fgsm"], eps=0.1, checks=False, progress=False)


def test_cli_on_mnist(tmp_path, mnist_dir):
    from fastadv.cli import main
    from fastadv.models import get_model

    ckpt = tmp_path / "cnn.pt"
    torch.manual_seed(0)
    torch.save({"model": get_model("mnist_cnn", 10, width=0.125).state_dict()}, ckpt)
    rc = main(["eval", "--model", "mnist_cnn", "--model-kwargs", '{"width": 0.125}', "--checkpoint", str(ckpt),
               "--data", "mnist", "--data-root", str(mnist_dir), "--n", "16", "--batch-size", "8", "--eps", "0.1",
               "--attacks", "fgsm,pgd", "--no-checks", "--no-progress", "--out", str(tmp_path / "out")])
    assert rc == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n"] == 16 and list(report["attacks"]) == ["fgsm", "pgd"]
    rc = main(["eval", "--model", "mnist_cnn", "--checkpoint", str(tmp_path / "missing.pt"), "--eps", "0.1"])
    assert rc == 2
