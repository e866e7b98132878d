"""fastadv.evaluate: versions, the cascade, the threat-model check of every returned point, resume and its
fingerprint, few-class models, bad input, the report files and the CLI.

The gradient-masking checks have their own gallery in tests/test_evaluation_checks.py; the attacks their
peer-parity tests (test_apgdt_parity.py, test_fab.py, test_square.py)."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastadv
from fastadv.attacks import FGSM, PGD, Attack
from fastadv.evaluation import GradientMaskingWarning, evaluate
from fastadv.evaluation.cascade import inside_threat_model
from fastadv.evaluation.versions import adapt_to_classes, version_attacks

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py

QUIET = dict(checks=False, progress=False)


def mlp(seed=0, k=10, d=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, k)).eval()


def data(model, n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    y[:4] = (y[:4] + 1) % z.shape[1]  # a few clean mistakes
    return x, y


def deterministic_attacks(model, eps=0.05):
    return [("fgsm", FGSM(model, eps)), ("pgd", PGD(model, eps, eps / 5, 10, random_start=False))]


def test_report_and_cascade():
    model = mlp()
    x, y = data(model)
    r = evaluate(model, (x, y), attacks=deterministic_attacks(model), eps=0.05, batch_size=16, **QUIET)
    assert r["version"] == "custom" and r["n"] == 48 and r["clean_accuracy"] == pytest.approx(44 / 48)
    a = r["attacks"]
    assert r["clean_accuracy"] >= a["fgsm"]["robust_accuracy"] >= a["pgd"]["robust_accuracy"] == r["robust_accuracy"]
    assert 0 < r["robust_accuracy"] < r["clean_accuracy"]
    assert a["fgsm"]["ran_on"] == 44 and a["pgd"]["ran_on"] == 44 - a["fgsm"]["fooled"]  # cascading
    assert r["images_per_s"] > 0 and r["time_s"] > 0 and r["invalid_points"] == 0
    assert sum(c["n"] for c in r["per_class"].values()) == 48
    # Without cascading every attack runs on all clean-correct samples; the worst case is the same.
    r2 = evaluate(model, (x, y), attacks=deterministic_attacks(model), eps=0.05, batch_size=16, cascade=False,
                  **QUIET)
    assert r2["attacks"]["pgd"]["ran_on"] == 44
    assert r2["robust_accuracy"] == r["robust_accuracy"]
    assert r2["attacks"]["pgd"]["robust_accuracy"] >= r["robust_accuracy"]


def test_version_lists_are_autoattacks():
    # autoattack.py set_version: the same attacks, in the same order
    assert version_attacks("standard", "linf")[0] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert version_attacks("standard", "l2")[0] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert version_attacks("plus", "linf")[0] == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert version_attacks("rand", "linf")[0] == ["apgd-ce", "apgd-dlr"]
    assert version_attacks("fast", "linf")[0] == ["apgd-ce", "apgd-t"]
    names, notes = version_attacks("standard", "l1")
    assert "square" not in names and any("Square" in n for n in notes)  # documented gap, not silent


def test_version_settings():
    from fastadv.evaluation.versions import make_attack

    model = mlp()
    ce = make_attack("apgd-ce", model, 0.1, "linf", version="standard", n_classes=10)
    assert (ce.steps, ce.restarts, ce.loss, ce.eot_iter) == (100, 1, "ce", 1)
    at = make_attack("apgd-t", model, 0.1, "linf", version="standard", n_classes=10)
    assert (at.steps, at.n_target_classes, at.restarts) == (100, 9, 1)
    ft = make_attack("fab-t", model, 0.1, "linf", version="standard", n_classes=10)
    assert (ft.steps, ft.n_target_classes, ft.restarts, ft.multi_targeted) == (100, 9, 1, True)
    sq = make_attack("square", model, 0.1, "linf", version="standard", n_classes=10)
    assert (sq.queries, sq.p_init, sq.rescale_schedule) == (5000, 0.8, False)  # AutoAttack: resc_schedule=False
    assert make_attack("apgd-ce", model, 0.1, "linf", version="plus").restarts == 5
    assert make_attack("fab", model, 0.1, "linf", version="plus").restarts == 5
    assert make_attack("apgd-dlr", model, 0.1, "linf", version="rand").eot_iter == 20
    assert make_attack("apgd-ce", model, 1.0, "l1", version="standard").restarts == 5
    assert make_attack("apgd-t", model, 1.0, "l1", version="standard", n_classes=10).n_target_classes == 5
    assert make_attack("apgd-t", model, 0.1, "linf", version="standard", n_classes=5).n_target_classes == 4


def test_instances_outside_the_threat_model_are_refused():
    model = mlp()
    x, y = data(model)
    # the example: a PGD at eps 0.5 must not be reported "at eps 0.01"
    with pytest.raises(ValueError, match=r"eps=0.5 but the evaluation's eps=0.01"):
        evaluate(model, (x, y), attacks=[("pgd", PGD(model, eps=0.5))], eps=0.01, **QUIET)
    with pytest.raises(ValueError, match=r"norm='l2' but the evaluation's norm='linf'"):
        evaluate(model, (x, y), attacks=[PGD(model, eps=0.01, norm="l2")], eps=0.01, **QUIET)
    with pytest.raises(ValueError, match="targeted"):
        evaluate(model, (x, y), attacks=[PGD(model, eps=0.01, targeted=True)], eps=0.01, **QUIET)
    with pytest.raises(ValueError, match="attacks= is given with version='standard'"):
        evaluate(model, (x, y), attacks=["pgd"], version="standard", eps=0.01, **QUIET)


class Returns(Attack):
    """An attack that returns whatever ``make(x)`` gives, to test what evaluate does with it."""

    def __init__(self, model, eps, make):
        super().__init__(model)
        self.eps, self.make = eps, make

    def perturb(self, x, y):
        return self.make(x)


def test_points_outside_the_ball_are_never_counted_as_fooled():
    model = mlp()
    x, y = data(model)
    eps = 0.05
    big = Returns(model, eps, lambda t: (t + 0.5).clamp(0, 1))  # far outside the ball: fools plenty
    r = evaluate(model, (x, y), attacks=[("cheat", big)], eps=eps, **QUIET)
    assert r["attacks"]["cheat"]["fooled"] == 0 and r["robust_accuracy"] == r["clean_accuracy"]
    assert r["attacks"]["cheat"]["invalid"] > 0 and r["invalid_points"] == r["attacks"]["cheat"]["invalid"]
    assert any("outside the threat model" in n for n in r["notes"])
    outside_box = Returns(model, eps, lambda t: t - 1e-3)  # within eps, but below 0 where x == 0
    x0 = x.clone()
    x0[:, :, 0, 0] = 0.0
    r = evaluate(model, (x0, y), attacks=[("box", outside_box)], eps=eps, **QUIET)
    assert r["attacks"]["box"]["fooled"] == 0 and r["attacks"]["box"]["invalid"] == r["attacks"]["box"]["ran_on"]
    with pytest.raises(ValueError, match="not a tensor of the input's shape"):
        evaluate(model, (x, y), attacks=[("flat", Returns(model, eps, lambda t: t.flatten(1)))], eps=eps, **QUIET)


def test_threat_model_tolerance_is_float32_rounding_only():
    x = 0.3 + 0.4 * torch.rand(4, 3, 32, 32)
    d = torch.randn_like(x)
    eps = 0.2
    for norm, p in (("linf", math.inf), ("l2", 2), ("l1", 1)):
        n = d.flatten(1).norm(p=p, dim=1).reshape(-1, 1, 1, 1)
        on = x + eps * d / n  # on the sphere, rounded to float32
        assert inside_threat_model(on, x, eps, norm, (0.0, 1.0)).all(), norm
        # 0.5% outside: refused. The slack is the worst case of float32 rounding, half an ulp of 1 per
        # coordinate: 6e-8 (linf), 3.3e-6 (l2) and 1.8e-4 (l1) here, against 1e-3 outside.
        out = x + eps * 1.005 * d / n
        assert not inside_threat_model(out, x, eps, norm, (0.0, 1.0)).any(), norm


@pytest.mark.parametrize("k", [2, 3])
def test_few_class_models_get_attacks_that_run(k):
    model = mlp(k=k)
    x, y = data(model, n=24)
    r = evaluate(model, (x, y), eps=0.05, version="fast", **QUIET)  # apgd-t cannot run on K < 4
    assert r["num_classes"] == k and r["notes"], r
    assert list(r["attacks"]) == (["apgd-ce", "apgd-cw"] if k == 2 else ["apgd-ce", "apgd-dlr"])
    assert adapt_to_classes(["apgd-ce", "apgd-t", "fab-t", "square"], 2)[0] == ["apgd-ce", "apgd-cw", "fab", "square"]
    assert adapt_to_classes(["apgd-ce", "apgd-dlr"], 2)[0] == ["apgd-ce", "apgd-cw"]


def test_global_rng_is_untouched_and_results_reproducible():
    model = mlp()
    x, y = data(model)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    r1 = evaluate(model, (x, y), attacks=["pgd", "apgd-ce"], eps=0.05, seed=3, **QUIET)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)
    r2 = evaluate(model, (x, y), attacks=["pgd", "apgd-ce"], eps=0.05, seed=3, **QUIET)
    assert r1["robust_accuracy"] == r2["robust_accuracy"]
    assert r1["attacks"]["pgd"]["fooled"] == r2["attacks"]["pgd"]["fooled"]


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

    first = Counting(PGD(model, 0.05, 0.01, 10))
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, batches(stop_after=2), attacks=[("pgd", first)], eps=0.05, state_path=state, **QUIET)
    saved = json.loads(state.read_text())
    assert len(saved["batches"]) == 2 and not list(tmp_path.glob("*.tmp"))
    second = Counting(PGD(model, 0.05, 0.01, 10))
    resumed = evaluate(model, batches(), attacks=[("pgd", second)], eps=0.05, state_path=state, **QUIET)
    correct_late = int((model(x[32:]).argmax(1) == y[32:]).sum())
    assert second.seen == correct_late  # only the two unfinished batches were attacked
    fresh = evaluate(model, batches(), attacks=[("pgd", PGD(model, 0.05, 0.01, 10))], eps=0.05, **QUIET)
    for k in ("n", "clean_accuracy", "robust_accuracy"):  # random starts included: seeded per batch
        assert resumed[k] == fresh[k]


@pytest.mark.parametrize("change", ["eps", "seed", "clip", "model_mode", "autocast", "attack_settings", "weights",
                                    "batch_size", "n"])
def test_resume_fingerprint_covers_every_setting(tmp_path, change):
    model = mlp()
    x, y = data(model, n=32)
    state = tmp_path / "state.json"
    base = dict(attacks=[("pgd", PGD(model, 0.05, 0.01, 5))], eps=0.05, seed=0, clip=(0.0, 1.0), model_mode="eval",
                autocast=None, batch_size=16, n=None)
    evaluate(model, (x, y), state_path=state, **base, **QUIET)
    other = dict(base)
    m2 = model
    if change == "eps":
        other.update(eps=0.06, attacks=[("pgd", PGD(model, 0.06, 0.01, 5))])
    elif change == "seed":
        other["seed"] = 1
    elif change == "clip":
        other["clip"] = (0.0, 2.0)
    elif change == "model_mode":
        other["model_mode"] = "train"
    elif change == "autocast":
        other["autocast"] = "bf16"
    elif change == "attack_settings":
        other["attacks"] = [("pgd", PGD(model, 0.05, 0.02, 5))]  # same name, another alpha
    elif change == "weights":
        m2 = mlp()
        with torch.no_grad():
            w = m2[1].weight
            w.copy_(w.flip(0))  # same sum, other weights: a sum-based hash misses this
    elif change == "batch_size":
        other["batch_size"] = 8
    else:
        other["n"] = 16
    with pytest.raises(ValueError, match="holds a different evaluation"):
        evaluate(m2, (x, y), state_path=state, **other, **QUIET)


def test_bad_input_names_the_argument(tmp_path):
    model = mlp()
    x, y = data(model)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="eps must be a finite float >= 0"):
            evaluate(model, (x, y), eps=bad, **QUIET)
    with pytest.raises(ValueError, match="attack must be one of"):
        evaluate(model, (x, y), attacks=["deepfool"], eps=0.1, **QUIET)
    with pytest.raises(ValueError, match="version must be one of"):
        evaluate(model, (x, y), version="strong", eps=0.1, **QUIET)
    with pytest.raises(ValueError, match="data is empty"):
        evaluate(model, (x[:0], y[:0]), attacks=["fgsm"], eps=0.1, **QUIET)
    with pytest.raises(ValueError, match="data is empty"):
        evaluate(model, iter([]), attacks=["fgsm"], eps=0.1, **QUIET)
    with pytest.raises(ValueError, match="mismatched sizes"):
        evaluate(model, (x, y[:3]), attacks=["fgsm"], eps=0.1, **QUIET)
    with pytest.raises(ValueError, match="y holds label 12"):
        evaluate(model, (x, torch.full_like(y, 12)), attacks=["fgsm"], eps=0.1, **QUIET)
    with pytest.raises(ValueError, match="x must lie in the box"):
        evaluate(model, (x * 3, y), attacks=["fgsm"], eps=0.1, **QUIET)

    class NaNModel(nn.Module):
        def forward(self, t):
            return model(t) * float("nan")

    with pytest.raises(ValueError, match="non-finite .* logits"):
        evaluate(NaNModel(), (x, y), attacks=["fgsm"], eps=0.1, **QUIET)
    state = tmp_path / "s.json"
    state.write_text("not json")
    with pytest.raises(ValueError, match="state_path .* is not an evaluation state file"):
        evaluate(model, (x, y), attacks=["fgsm"], eps=0.1, state_path=state, **QUIET)
    # a numpy float eps is a float
    r = evaluate(model, (x, y), attacks=["fgsm"], eps=np.float32(0.05), **QUIET)
    assert r["eps"] == pytest.approx(0.05)


def test_report_files(tmp_path):
    model = mlp()
    x, y = data(model)
    r = evaluate(model, (x, y), attacks=["fgsm", "pgd"], eps=0.05, curve=[0.0, 0.05, 0.2], out_dir=tmp_path,
                 check_samples=24, progress=False)
    assert [p["eps"] for p in r["curve"]] == [0.0, 0.05, 0.2]
    assert r["curve"][0]["robust_accuracy"] == pytest.approx(r["clean_accuracy"] * 48 / 48, abs=0.1)
    assert r["curve"][2]["robust_accuracy"] < r["curve"][0]["robust_accuracy"]
    assert json.loads((tmp_path / "curve.json").read_text()) == r["curve"]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["robust_accuracy"] == r["robust_accuracy"]
    md = (tmp_path / "report.md").read_text()
    assert "| fgsm |" in md and "| pgd |" in md and "## Checks" in md and "curve.png" in md
    for name, c in r["checks"].items():  # every check's outcome, not only the failures
        assert c["status"] in ("pass", "fail", "skip") and f"| {name} |" in md
    assert r["verdict"] in md and f"torch {torch.__version__}" in md


def test_readme_call_still_works():
    model = mlp()
    x, y = data(model, n=16)
    report = fastadv.evaluate(model, (x, y), attacks=["pgd", "apgd-ce"], eps=0.05, progress=False, checks=False)
    assert 0 <= report["robust_accuracy"] <= report["clean_accuracy"]


def test_threshold_model_is_suspicious():
    class Threshold(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, t):
            return self.net((t > 0.5).float())

    model = Threshold(mlp())
    x, y = data(model)
    with pytest.warns(GradientMaskingWarning):
        r = evaluate(model, (x, y), attacks=["pgd"], eps=0.1, check_samples=24, spsa_steps=10, spsa_samples=32,
                     progress=False)
    assert r["suspicious"] and r["verdict"].startswith("SUSPICIOUS")
    assert r["checks"]["zero_gradient"]["status"] == "fail"


@pytest.mark.slow
def test_readme_usage_example_runs_as_written():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Use it from your code\s+```python\n(.*?)```", readme, re.S).group(1)
    env: dict = {}
    exec(compile(block, "README.md", "exec"), env)  # noqa: S102 - the README's own example
    assert 0 <= env["report"]["robust_accuracy"] <= env["report"]["clean_accuracy"] <= 1


def test_review_fixes_few_classes_order_generators_and_nonfinite(tmp_path):
    from fastadv.attacks import APGD
    from fastadv.evaluation.versions import make_attack

    # L1 standard: APGD-T 5 targets but FAB-T keeps AutoAttack's 9
    m10 = mlp()
    assert make_attack("fab-t", m10, 1.0, "l1", version="standard", n_classes=10).n_target_classes == 9
    # 2 classes: names adapted together (apgd-t and apgd-dlr both become apgd-cw, run once, with notes)
    m2 = mlp(k=2)
    x, y = data(m2, n=16)
    r = evaluate(m2, (x, y), attacks=["apgd-t", "apgd-dlr"], eps=0.05, **QUIET)
    assert list(r["attacks"]) == ["apgd-cw"] and len(r["notes"]) >= 2
    # an instance that cannot run on 2 classes is refused with a reason, not an IndexError
    with pytest.raises(ValueError, match="needs >= 3 classes"):
        evaluate(m2, (x, y), attacks=[APGD(m2, 0.05, 10, loss="dlr")], eps=0.05, **QUIET)
    # the fingerprint sees the cascade order
    x, y = data(m10, n=16)
    state = tmp_path / "s.json"
    evaluate(m10, (x, y), attacks=["fgsm", "pgd"], eps=0.05, state_path=state, **QUIET)
    with pytest.raises(ValueError, match="holds a different evaluation"):
        evaluate(m10, (x, y), attacks=["pgd", "fgsm"], eps=0.05, state_path=state, **QUIET)
    # ... and other data under the same settings
    with pytest.raises(ValueError, match="other data"):
        evaluate(m10, (x, (y + 1) % 10), attacks=["fgsm", "pgd"], eps=0.05, state_path=state, **QUIET)
    # a user instance with its own generator: per-batch generator, restored afterwards, reproducible
    g = torch.Generator().manual_seed(5)
    atk = PGD(m10, 0.05, 0.01, 5, generator=g)
    r1 = evaluate(m10, (x, y), attacks=[("pgd", atk)], eps=0.05, batch_size=8, **QUIET)
    r2 = evaluate(m10, (x, y), attacks=[("pgd", atk)], eps=0.05, batch_size=8, **QUIET)
    assert atk.generator is g and r1["attacks"]["pgd"]["fooled"] == r2["attacks"]["pgd"]["fooled"]
    # curve_attack is checked before the cascade runs
    with pytest.raises(ValueError, match="curve_attack must be one of"):
        evaluate(m10, (x, y), attacks=["fgsm"], eps=0.05, curve="auto", curve_attack="nope", **QUIET)
    with pytest.raises(ValueError, match="curve must be"):
        evaluate(m10, (x, y), attacks=["fgsm"], eps=0.05, curve="all", **QUIET)

    class NaNAway(nn.Module):  # finite at the clean points, NaN anywhere else
        def forward(self, t):
            z = m10(t)
            far = (t - x[: t.shape[0]]).abs().flatten(1).amax(1) > 0 if t.shape[0] == x.shape[0] else \
                torch.ones(t.shape[0], dtype=torch.bool)
            return torch.where(far[:, None], torch.full_like(z, float("nan")), z)

    nan_model = NaNAway()
    r = evaluate(nan_model, (x, y), attacks=[("move", Returns(nan_model, 0.05, lambda t: (t + 0.01).clamp(0, 1)))],
                 eps=0.05, batch_size=16, **QUIET)
    # a NaN output at the adversarial point is no evidence of robustness: counted as fooled, and noted
    assert r["robust_accuracy"] == 0 and r["attacks"]["move"]["nonfinite"] == r["attacks"]["move"]["ran_on"]
    assert any("NaN or inf" in n for n in r["notes"])


def test_two_class_model_is_not_suspicious_for_being_binary():
    model = mlp(k=2)
    x, y = data(model, n=32)
    r = evaluate(model, (x, y), eps=0.05, version="fast", check_samples=32, spsa_steps=5, spsa_samples=16,
                 progress=False)
    assert r["checks"]["n_classes"]["status"] == "pass" and "adapted" in r["checks"]["n_classes"]["detail"]


def test_ensemble_gets_a_transfer_matrix_in_the_report(tmp_path):
    # an Ensemble is evaluated as one model, and the report adds robust accuracy of every member and the
    # whole under attacks crafted on each (members' white-box numbers on the diagonal)
    from fastadv.attacks import transfer_matrix
    from fastadv.models import Ensemble

    ens = Ensemble([mlp(seed=s) for s in range(3)]).eval()
    x, y = data(ens)
    r = evaluate(ens, (x, y), attacks=deterministic_attacks(ens), eps=0.05, batch_size=16, out_dir=tmp_path,
                 check_samples=16, **QUIET)
    t = r["transfer"]
    assert t is not None and len(t["sources"]) == 4 and t["n"] == 16
    # the same matrix, computed directly on the same check samples
    names = t["sources"]
    direct = transfer_matrix(dict(zip(names, [*ens.members, ens])), x[:16], y[:16], 0.05, seed=0)
    assert direct["robust_accuracy"] == t["robust_accuracy"]
    assert "## Transfer" in (tmp_path / "report.md").read_text()
    plain = evaluate(mlp(), data(mlp()), attacks=deterministic_attacks(mlp()), eps=0.05, batch_size=16, **QUIET)
    assert plain["transfer"] is None
