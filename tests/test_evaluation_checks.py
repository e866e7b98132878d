"""fastadv.evaluation.checks: a gallery of deliberately masked models, each
flagged by the check meant to catch it; a healthy model that passes them all;
the contract (every check reported, JSON values, seeded, global RNG and trace
function untouched, options validated).

Every gallery model wraps the trained 784-100-10 MNIST MLP of
tests/parity_model.py, so a check that fires does so because of the masking
wrapped around a model that is otherwise healthy (the bare MLP passes every
check). ``robust`` / ``fooled_by`` come from a plain APGD-CE (100 steps) run
here on the wrapped model, as the evaluation's cascade would give them.
"""
import functools
import json
import random
import sys

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastadv.attacks import APGD, Attack  # noqa: E402
from fastadv.data import embedded_mnist  # noqa: E402
from fastadv.evaluation.checks import CHECKS, run_checks  # noqa: E402
from parity_model import trained_mnist_mlp  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

N = 48
EPS = 0.08  # the healthy MLP's APGD-CE robust accuracy is about 40% here
# Cheap settings for the tests that check the contract rather than a check's verdict.
CHEAP = {"huge_eps_steps": 10, "curve_steps": 5, "noise_draws": 2, "square_queries": 50, "pgd_steps": 2,
         "more_steps_factor": 2, "more_steps_restarts": 1, "spsa_steps": 2, "spsa_samples": 8, "raise_errors": True}


# ------------------------------------------------------------------ the gallery
class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = trained_mnist_mlp()

    def forward(self, x):
        return self.net(x)


class Threshold(Wrapped):
    """A hard threshold in front of the network: the graph is cut, the input gradient is exactly zero."""

    def forward(self, x):
        return self.net((x > 0.5).float())


class Shattered(Wrapped):
    """8-bit input quantization (the value the network sees) with a straight-through term plus a
    high-frequency term in the backward pass: d/dx = 1 + 100 cos(1e4 x), nonzero everywhere but a
    pseudo-random sign per pixel, so the input gradient points nowhere useful (Athalye et al.'s
    shattered gradients). The forward value is exactly the quantized input."""

    def forward(self, x):
        q = torch.round(x * 255) / 255
        hf = 0.01 * torch.sin(1e4 * x)
        return self.net(q.detach() + (x - x.detach()) + (hf - hf.detach()))


class Noisy(Wrapped):
    """Gaussian input noise at every call (drawn from the global RNG)."""

    def forward(self, x):
        return self.net((x + 0.05 * torch.randn_like(x)).clamp(0, 1))


class RandomResize(Wrapped):
    """Xie et al. 2018's random resizing and padding (global RNG)."""

    def forward(self, x):
        s = int(torch.randint(25, 29, ()))
        z = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        p = 28 - s
        left, top = int(torch.randint(0, p + 1, ())), int(torch.randint(0, p + 1, ()))
        return self.net(F.pad(z, (left, p - left, top, p - top)))


class Softmax(Wrapped):
    def forward(self, x):
        return self.net(x).softmax(1)


class Scaled(Wrapped):
    """Logits x 1e4: the float32 softmax saturates, the CE gradient is exactly zero for any margin above ~0.01."""

    def forward(self, x):
        return self.net(x) * 1e4


class CountsCalls(Wrapped):
    """Updates a buffer in forward."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.net(x)


class Hooked(Wrapped):
    """A forward hook on a submodule (here the identity, but it could change anything per call)."""

    def __init__(self):
        super().__init__()
        self.net[2].register_forward_hook(lambda module, inputs, output: output)


class AutogradInForward(Wrapped):
    """Calls torch.autograd.grad inside forward (an inner optimization, as test-time defences do)."""

    def forward(self, x):
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            g = torch.autograd.grad(self.net(xr).logsumexp(1).sum(), xr)[0]
        return self.net(x + 0.0 * g)


class TwoClass(Wrapped):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(10, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.linspace(-1, 1, 20).reshape(2, 10))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(self.net(x))


GALLERY = {  # model -> the checks meant to catch it
    "threshold": (Threshold, ["zero_gradient"]),
    "shattered": (Shattered, ["square_vs_gradient", "black_box"]),
    "noisy": (Noisy, ["randomized"]),
    "random_resize": (RandomResize, ["randomized"]),
    "softmax": (Softmax, ["probabilities"]),
    "scaled_logits": (Scaled, ["zero_gradient"]),
    "buffer_update": (CountsCalls, ["dynamic"]),
    "forward_hook": (Hooked, ["dynamic"]),
    "autograd_in_forward": (AutogradInForward, ["dynamic"]),
    "two_class": (TwoClass, ["n_classes"]),
}


@functools.lru_cache(maxsize=None)
def _data(n: int):
    x, y = embedded_mnist("heldout")
    return x[:n].contiguous(), y[:n].contiguous()


def apgd_outcome(model, x, y, eps=EPS, norm="linf"):
    """(robust, fooled_by) as the evaluation's cascade gives them, from APGD-CE 100 steps."""
    adv = APGD(model, eps, 100, norm=norm, generator=torch.Generator().manual_seed(0))(x, y)
    with torch.no_grad():
        correct = model(x).argmax(1) == y
        fooled = (model(adv).argmax(1) != y) & correct
    return correct & ~fooled, {"apgd-ce": fooled}


def checks_on(model, x, y, eps=EPS, norm="linf", *, num_classes=10, options=None, **kw):
    robust, fooled_by = apgd_outcome(model, x, y, eps, norm)
    kw.setdefault("robust", robust)
    kw.setdefault("fooled_by", fooled_by)
    return run_checks(model, Attack(model), x, y, eps=eps, norm=norm, common={}, num_classes=num_classes, seed=0,
                      options={"raise_errors": True, **(options or {})}, **kw)


@functools.lru_cache(maxsize=None)
def gallery_results(name: str) -> dict:
    cls, _ = GALLERY[name]
    model = cls().eval()
    x, y = _data(N)
    if name == "two_class":
        with torch.no_grad():
            y = model(x).argmax(1)
    return checks_on(model, x, y, num_classes=2 if name == "two_class" else 10)


def outcome_table() -> str:
    """The gallery x checks table (f = fail, . = pass, s = skip), for the report."""
    rows = [f"{'':20s} " + " ".join(f"{c[:6]:>6s}" for c in CHECKS)]
    for name in GALLERY:
        r = gallery_results(name)
        rows.append(f"{name:20s} " + " ".join(f"{ {'fail': 'f', 'pass': '.', 'skip': 's'}[r[c]['status']]:>6s}"
                                             for c in CHECKS))
    return "\n".join(rows)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", list(GALLERY))
def test_gallery_model_is_flagged_by_its_check(name):
    results = gallery_results(name)
    assert list(results) == list(CHECKS)
    json.dumps(results)
    for check in GALLERY[name][1]:
        assert results[check]["status"] == "fail", (check, results[check])
        assert results[check]["detail"]


def test_gallery_checks_fire_for_the_stated_reason():
    x, _ = _data(N)
    r = gallery_results("threshold")
    assert r["zero_gradient"]["value"] == N
    assert r["huge_eps"]["status"] == "fail"  # at eps = 1 the zero gradient still does not move anything
    # shattered: the gradient is NOT zero, it is useless: gradient-free attacks find what APGD cannot
    r = gallery_results("shattered")
    assert r["zero_gradient"]["status"] == "pass"
    assert r["square_vs_gradient"]["value"]["fooled_beyond_gradient"] >= 5
    assert r["black_box"]["value"]["spsa_fooled"] >= 2
    assert gallery_results("noisy")["randomized"]["value"]["max_diff"] > 1e-2
    assert gallery_results("random_resize")["randomized"]["value"]["prediction_changes"] > 0
    assert gallery_results("softmax")["probabilities"]["value"]["max_row_sum_error"] < 1e-5
    # scaled logits: verify the premise, float32 CE gradients are exactly zero on most samples
    model = Scaled().eval()
    xr = x.clone().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(model(xr), _data(N)[1], reduction="sum"), xr)[0]
    zero = int((g.reshape(N, -1).abs().sum(1) == 0).sum())
    assert zero > N // 2 and gallery_results("scaled_logits")["zero_gradient"]["value"] == zero
    assert gallery_results("buffer_update")["dynamic"]["value"]["changed_state"] == ["calls"]
    assert gallery_results("forward_hook")["dynamic"]["value"]["hooks"] == ["net.2: forward_hooks"]
    assert gallery_results("autograd_in_forward")["dynamic"]["value"]["autograd_calls"].get("grad", 0) >= 1
    assert gallery_results("two_class")["n_classes"]["value"] == 2
    # each dynamic model trips the dynamic check for its own reason only
    for name, key in (("buffer_update", "changed_state"), ("forward_hook", "hooks"),
                      ("autograd_in_forward", "autograd_calls")):
        v = gallery_results(name)["dynamic"]["value"]
        assert [k for k in ("changed_state", "hooks", "autograd_calls") if v[k]] == [key]


def test_healthy_model_passes_every_check():
    model = trained_mnist_mlp()
    x, y = _data(64)
    results = checks_on(model, x, y)
    assert list(results) == list(CHECKS)
    json.dumps(results)
    bad = {k: v for k, v in results.items() if v["status"] not in ("pass", "skip")}
    assert not bad, bad
    assert all(isinstance(v["detail"], str) and v["detail"] for v in results.values())
    assert results["huge_eps"]["value"]["survivors"] <= 1 and results["zero_gradient"]["value"] == 0
    # the same seed gives the same results
    again = checks_on(model, x, y)
    assert json.dumps(again, sort_keys=True) == json.dumps(results, sort_keys=True)


def test_healthy_model_l2():
    model = trained_mnist_mlp()
    x, y = _data(32)
    results = checks_on(model, x, y, eps=1.0, norm="l2", options=dict(CHEAP, square_queries=300))
    assert not {k: v for k, v in results.items() if v["status"] == "fail"}
    assert results["black_box"]["status"] == "skip"  # SPSA is linf only, no transfer sources


def test_global_rng_and_trace_function_are_left_alone():
    model = Noisy().eval()  # draws from the global RNG in every forward
    x, y = _data(16)
    robust, fooled_by = apgd_outcome(model, x, y)
    traced = []

    def tracer(frame, event, arg):  # stands in for a debugger or coverage
        traced.append(event)
        return None

    torch_state, py_state = torch.get_rng_state(), random.getstate()
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        run_checks(model, Attack(model), x, y, eps=EPS, norm="linf", common={}, robust=robust, fooled_by=fooled_by,
                   num_classes=10, seed=0, options=CHEAP)
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(old)
    assert torch.equal(torch_state, torch.get_rng_state()) and random.getstate() == py_state


def test_square_from_the_cascade_and_threshold():
    model = trained_mnist_mlp()
    x, y = _data(N)
    robust, fooled_by = apgd_outcome(model, x, y)
    spare = robust.nonzero().squeeze(1)
    for k, status in ((1, "pass"), (2, "fail")):  # allowed: max(1 sample, 0.2% of n)
        sq = torch.zeros(N, dtype=torch.bool)
        sq[spare[:k]] = True
        r = run_checks(model, Attack(model), x, y, eps=EPS, norm="linf", common={}, robust=robust & ~sq,
                       fooled_by={**fooled_by, "square": sq}, num_classes=10, seed=0, options=CHEAP)
        assert r["square_vs_gradient"]["status"] == status
        assert r["square_vs_gradient"]["value"]["source"] == "cascade"
        assert r["square_vs_gradient"]["value"]["fooled_beyond_gradient"] == k


def test_square_missing_is_a_skip(monkeypatch):
    monkeypatch.setitem(sys.modules, "fastadv.attacks.square", None)  # import raises ImportError
    model = trained_mnist_mlp()
    x, y = _data(16)
    r = checks_on(model, x, y, options=CHEAP)
    assert r["square_vs_gradient"]["status"] == "skip" and "not available" in r["square_vs_gradient"]["detail"]


def test_curve_and_transfer_and_errors():
    model = Shattered().eval()
    x, y = _data(32)
    curve = [{"eps": 0.0, "robust_accuracy": 0.9}, {"eps": 0.04, "robust_accuracy": 0.5},
             {"eps": 0.08, "robust_accuracy": 0.6, "n": 32}]
    # the underlying network is a perfect surrogate: its adversarial examples transfer
    r = checks_on(model, x, y, curve=curve, options=dict(CHEAP, transfer_sources=[model.net], transfer_steps=10))
    assert r["monotone_eps"]["status"] == "fail" and r["monotone_eps"]["value"]["source"] == "curve"
    assert r["black_box"]["status"] == "fail" and r["black_box"]["value"]["transfer_fooled"] >= 2

    def broken(x):
        raise RuntimeError("source exploded")

    opts = dict(CHEAP, transfer_sources=[broken], raise_errors=False)
    r = checks_on(model, x, y, options=opts)
    assert r["black_box"]["status"] == "skip" and "source exploded" in r["black_box"]["detail"]
    with pytest.raises(RuntimeError, match="source exploded"):
        checks_on(model, x, y, options=dict(opts, raise_errors=True))


def test_train_mode_batchnorm_statistics_are_not_dynamic():
    torch.manual_seed(0)
    # BatchNorm2d: a compacted batch of one sample still has 26 x 26 values per channel in train mode
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    x, y = _data(16)
    common = {"model_mode": "train"}
    robust = torch.zeros(16, dtype=torch.bool)
    r = run_checks(model, Attack(model, **common), x, y, eps=EPS, norm="linf", common=common, robust=robust,
                   fooled_by={}, num_classes=10, seed=0, options=CHEAP)
    assert r["dynamic"]["status"] == "pass" and r["dynamic"]["value"]["bn_running_stats_updated"]
    assert r["random_noise"]["status"] == "skip"  # nothing robust to test


def test_arguments_are_validated():
    model = trained_mnist_mlp()
    x, y = _data(8)
    kw = dict(eps=EPS, norm="linf", common={}, robust=torch.ones(8, dtype=torch.bool), fooled_by={},
              num_classes=10, seed=0)
    with pytest.raises(ValueError, match="spsa_stepz"):
        run_checks(model, Attack(model), x, y, **kw, options={"spsa_stepz": 3})
    with pytest.raises(ValueError, match="noise_draws"):
        run_checks(model, Attack(model), x, y, **kw, options={"noise_draws": 0})
    with pytest.raises(ValueError, match="robust"):
        run_checks(model, Attack(model), x, y, **{**kw, "robust": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="norm"):
        run_checks(model, Attack(model), x, y, **{**kw, "norm": "l3"})
