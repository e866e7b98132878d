"""`fastadv doctor --gpu` / scripts/gpu_validate.sh on a machine without a GPU: the steps parse and run in
--dry-run, and a real run completes with every GPU step reported as skipped (the GPU run itself happens on a
lent device)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastadv import doctor

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_dry_run_lists_every_step(capsys):
    from fastadv.cli import main

    assert main(["doctor", "--gpu", "--dry-run", "--out", "/nonexistent/never-written"]) == 0
    out = capsys.readouterr().out
    for name in ("build", "tests", "sanitizer", "bench"):
        assert f"] {name}:" in out
    assert sys.executable in out  # the running interpreter, not the first python on PATH
    assert not pathlib.Path("/nonexistent/never-written").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real validation")
def test_script_completes_on_cpu_with_gpu_steps_skipped(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_validate.sh"), "--out", str(tmp_path / "res")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((tmp_path / "res" / "summary.json").read_text())
    assert [s["name"] for s in summary["steps"]] == ["build", "tests", "sanitizer", "bench"]
    assert all(s["status"] == "skipped" and "no GPU" in s["reason"] for s in summary["steps"])
    assert len(list((tmp_path / "res").iterdir())) <= 8
    assert sum(doctor.BUDGET_S.values()) <= 8 * 60


def test_verified_pairs_from_pytest_summary():
    log = "\n".join([
        "PASSED tests/test_ops.py::test_step_matches_reference_fp32[linf_step-triton]",
        "PASSED tests/test_ops.py::test_step_layouts[channels_last-linf_step-triton]",
        "FAILED tests/test_ops.py::test_step_layouts[strided-l2_step-triton] - AssertionError",
        "PASSED tests/test_ops.py::test_step_matches_reference_fp32[l2_step-triton]",
        "PASSED tests/test_ops.py::test_step_matches_reference_fp32[project_l1-cuda]",
        "SKIPPED tests/test_ops.py::test_step_matches_reference_fp32[l1_step-cuda]",
        "PASSED tests/test_gpu.py::test_pgd_on_cuda_matches_cpu",
    ])
    # a single failed case keeps its (backend, op) out of the record
    assert doctor.verified_pairs(log) == {"cuda": ["project_l1"], "triton": ["linf_step"]}
