"""pytest-benchmark suites for fastadv (not part of the default test run).

Run them with::

    OMP_NUM_THREADS=2 pytest benchmarks/ --benchmark-only
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-json=benchmarks/results/pytest-ops.json

(``--benchmark-only`` overrides the ``--benchmark-skip`` in pyproject.toml's
addopts.) ``FASTADV_BENCH_QUICK=1`` switches to small shapes for a smoke
test. The cases are the ones ``fastadv bench ops`` times
(``fastadv.bench.ops.make_case``), so both report on the same inputs; the
``fastadv bench`` command adds the bandwidth and speedup columns and the
environment stamp.

Unlike tests/conftest.py this file does not set TRITON_INTERPRET: Triton is
benchmarked on CUDA only (interpreted Triton timings mean nothing).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastadv.bench import ops as bench_ops

QUICK = os.environ.get("FASTADV_BENCH_QUICK", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = bench_ops.QUICK_SHAPES if QUICK else bench_ops.SHAPES
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def case_factory():
    """make_case(label, shape, dtype) on DEVICE, built once per session and key."""
    cache: dict = {}

    def get(label, shape, dtype):
        key = (label, tuple(shape), dtype)
        if key not in cache:
            cache.clear()  # one case alive at a time: the 224 inputs are 77 MB each
            cache[key] = bench_ops.make_case(label, shape, dtype, DEVICE)
        return cache[key]

    return get


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Stamp pytest-benchmark's JSON with the same environment as `fastadv bench`."""
    from fastadv.bench import harness

    output_json["fastadv_environment"] = harness.environment(DEVICE)
