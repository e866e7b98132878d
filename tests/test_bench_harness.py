"""The benchmark harness and ``fastadv bench ops`` (no timing assertions: timings are a report).

What is checked: the table and JSON writers, the environment stamp, that
time_fn calls the function as often as it claims, that every benchmark case
computes the same result on every path it times (so the speedups compare like
with like), the target checks, and that ``fastadv bench ops --quick`` runs end
to end and writes valid JSON.
"""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from fastadv.bench import cli as bench_cli
from fastadv.bench import harness as H
from fastadv.bench import ops as bench_ops


def test_format_table_aligns_and_formats():
    rows = [
        {"op": "linf_step", "ms": 0.1234, "speedup": 3.5},
        {"op": "project_l1+box", "ms": 12.0, "speedup": None},
        {"op": "nan", "ms": float("nan")},
    ]
    text = H.format_table(rows, ["op", ("ms", "ms", "{:.2f}"), ("speedup", "x eager", "{:.1f}x")])
    lines = text.splitlines()
    assert lines[0].split() == ["op", "ms", "x", "eager"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert "0.12" in lines[2] and "3.5x" in lines[2]
    assert lines[3].split()[-1] == "-"  # None shows as '-'
    assert lines[4].split()[1:] == ["-", "-"]  # NaN and a missing key too
    # numbers are right-aligned: every "ms" cell ends in the same column
    ends = {line.index(cell) + len(cell) for line, cell in zip(lines[2:4], ("0.12", "12.00"))}
    assert len(ends) == 1


def test_print_table_writes_to_file(capsys):
    H.print_table([{"a": 1}], ["a"])
    assert capsys.readouterr().out.splitlines()[-1].strip() == "1"


def test_environment_stamp():
    env = H.environment("cpu")
    for key in ("device_name", "cpu_count", "torch", "triton", "fastadv", "date", "torch_num_threads", "omp_num_threads"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert env["device_name"] and env["cpu_count"] >= 1
    json.dumps(env)  # serialisable as is


def test_device_slug():
    assert H.device_slug("Intel(R) Xeon(R) Processor") == "intel-xeon-processor"
    assert H.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert H.device_slug("???") == "device"


def test_write_result_strict_json(tmp_path):
    path = H.write_result("unit", {"rows": [{"ms": 1.5, "bad": float("inf")}], "t": (1, 2)}, tmp_path)
    assert path.parent == tmp_path
    assert path.name.startswith("unit-") and path.suffix == ".json"
    data = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["rows"] == [{"ms": 1.5, "bad": None}]
    assert data["t"] == [1, 2]
    assert data["name"] == "unit"
    assert data["environment"]["device_name"] == H.device_name("cpu")


def test_time_fn_counts_calls():
    calls = []
    t = H.time_fn(lambda: calls.append(1), warmup=4, min_time=0.0, min_runs=7, group_s=0.0)
    assert isinstance(t, H.Timing) and t.n == 7
    # warm-up calls + one per sample
    assert len(calls) == 4 + 7
    assert 0 <= t.min_ms <= t.median_ms and t.iqr_ms >= 0


def test_time_fn_groups_fast_calls():
    calls = []
    t = H.time_fn(lambda: calls.append(1), warmup=1, min_time=0.0, min_runs=3, group_s=0.01)
    # a call far below group_s is timed in groups: many calls per sample
    assert t.n == 3 and len(calls) > 3 * 10


def test_gbs():
    assert H.gbs(2e9, 1000.0) == pytest.approx(2.0)
    assert math.isnan(H.gbs(1.0, 0.0))


@pytest.mark.parametrize("label", bench_ops.OPS)
def test_cases_compute_the_same_result_on_every_path(label):
    # The benchmark compares timings of these paths, so they must agree.
    case = bench_ops.make_case(label, (3, 2, 5, 7), torch.float32, "cpu", seed=1)
    want = case.reference()
    case.out.fill_(float("nan"))
    with __import__("fastadv").use_backend("ref"):
        got = case.public()
    torch.testing.assert_close(got, want)
    case.out.fill_(float("nan"))
    case.raw("ref")()
    torch.testing.assert_close(case.out, want)
    per_elem = {"step": 4, "+box": 3}.get("step" if "_step" in label else ("+box" if "+box" in label else ""), 2)
    assert case.nbytes == per_elem * want.numel() * 4


def test_cases_are_active():
    # projections get a delta outside the ball, so the timed path is the real one
    for label, norm, eps in (("project_l2+box", 2, 0.5), ("project_l1", 1, 12.0)):
        case = bench_ops.make_case(label, (4, 3, 32, 32), torch.float32, "cpu")
        delta = case.reference_args[0]
        assert (delta.reshape(4, -1).norm(p=norm, dim=1) > 1.5 * eps).all()


def test_check_targets():
    # The step targets are against what a user would otherwise run (the plain eager formula and torch.compile of
    # it), for the public op as a user calls it (checks on): never against our own reference.
    rows = [
        dict(op="linf_step", shape="256x3x32x32", dtype="float32", impl="cpp +checks", speedup=9.0, vs_plain=3.2,
             vs_compile_plain=0.9),
        dict(op="linf_step", shape="256x3x32x32", dtype="float32", impl="cpp", frac_copy=0.6, gbs=30.0),
        dict(op="project_l1", shape="256x3x32x32", dtype="float32", impl="cpp", speedup=25.0),
    ]
    rows[0]["vs_plain_min"] = 2.5
    targets = bench_ops.check_targets(rows, "cpu")
    got = {t["target"]: t["met"] for t in targets}
    assert got == {
        "cpp +checks linf_step 256x3x32x32 >= 3x eager plain": True,
        "cpp +checks linf_step 256x3x32x32 >= 1.0x compile plain": False,
        "cpp linf_step 256x3x32x32 >= 50% of copy bandwidth": True,
        "cpp project_l1 256x3x32x32 >= 20x sort-based eager projection": True,
    }
    first = next(t for t in targets if t["target"].endswith("3x eager plain"))
    assert first["met_at_min"] is False and all(t.get("baseline") for t in targets)
    for r in rows:
        r["shape"] = "16x3x16x16"
    assert bench_ops.check_targets(rows, "cpu") == []  # no targets for other shapes


def _results(tmp_path):
    files = sorted(tmp_path.glob("ops-*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_bench_ops_quick_end_to_end(tmp_path, capsys):
    from fastadv.cli import main

    rc = main(["bench", "ops", "--quick", "--backends", "ref", "--out", str(tmp_path)])
    assert rc == 0
    data = _results(tmp_path)
    out = capsys.readouterr().out
    assert "x eager" in out and "wrote" in out
    assert data["target"] == "ops" and data["quick"] is True
    assert data["environment"]["torch"] == torch.__version__
    labels = {r["op"] for r in data["rows"]}
    assert labels == set(bench_ops.OPS) | {"copy_"}
    impls = {r["impl"] for r in data["rows"]}
    assert {"eager ref", "ref", "ref +checks"} <= impls
    for r in data["rows"]:
        assert r["ms"] > 0 and r["n"] >= 3 and r["bytes"] > 0 and r["gbs"] > 0
        assert r["shape"] == "16x3x16x16" and r["dtype"] == "float32"
    assert data["copy_gbs_large"] > 0


def test_bench_default_target_is_ops(tmp_path):
    from fastadv.cli import main

    # default backends: cpp is timed where its kernels exist, noted where not
    rc = main(["bench", "--quick", "--ops", "linf_step,project_l1", "--out", str(tmp_path)])
    assert rc == 0
    data = _results(tmp_path)
    assert {r["op"] for r in data["rows"]} == {"copy_", "linf_step", "project_l1"}
    assert any("triton" in n and "skipped" in n for n in data["notes"])


def test_missing_target_is_reported(capsys):
    args = argparse.Namespace(target="no_such_target", _load_error=None)
    assert bench_cli.run(args) == 2
    assert "not available" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_eval_quick_runs(tmp_path, capsys):
    # A smoke test of `fastadv bench eval` (the measurement itself is a report, never a pass/fail test):
    # ours and torchattacks' AutoAttack-at-100-iterations on the same model and images, per-attack rows.
    pytest.importorskip("torchattacks")
    from fastadv.cli import main

    rc = main(["bench", "eval", "--quick", "--n", "16", "--skip-torchattacks-default", "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("eval-*.json")
    payload = json.loads(path.read_text())
    variants = [r["variant"] for r in payload["rows"]]
    assert variants[:2] == ["fastadv standard", "torchattacks-100"]
    assert "  square: torchattacks" in variants and payload["environment"]["git_commit"]
    assert all(len(r["times_s"]) == r["repeats"] for r in payload["rows"][:2])
    # the model floor of both cascades, next to their times
    floors = payload["model_floor"]
    assert set(floors) == {"fastadv standard", "torchattacks-100"}
    assert all(r["floor_s"] > 0 for r in payload["rows"][:2])
    assert floors["fastadv standard"]["robust_accuracy"] == payload["rows"][0]["robust_accuracy"]
