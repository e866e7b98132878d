"""pytest-benchmark timings of every Lp op: eager reference, torch.compile(reference), each backend.

Groups are "<op> <shape> <dtype>"; within a group compare the "impl"
entries (pytest-benchmark prints them sorted by time). Each benchmark's
extra_info holds the bytes moved (see fastadv/bench/ops.py for the count) and
the effective GB/s at the median.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastadv
from fastadv import _dispatch
from fastadv.bench import ops as bench_ops

# Same choices as conftest.py (imported by value: `from conftest import` is
# ambiguous when tests/ and benchmarks/ are collected together).
QUICK = os.environ.get("FASTADV_BENCH_QUICK", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = bench_ops.QUICK_SHAPES if QUICK else bench_ops.SHAPES
DTYPES = (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,)

IMPLS = ("eager ref", "compile ref", "cpp", "cuda", "triton")


def _callable(case, impl):
    if impl == "eager ref":
        return case.reference
    if impl == "compile ref":
        comp = bench_ops._compile_fn(case.reference_fn)
        comp(*case.reference_args, **case.reference_kwargs)  # compile outside the timing

        return lambda: comp(*case.reference_args, **case.reference_kwargs)
    if impl == "triton" and DEVICE.type == "cpu":
        pytest.skip("Triton is not benchmarked under the CPU interpreter")
    reasons = _dispatch.not_supported_reasons(case.op, impl, case.tensors)
    if reasons:
        pytest.skip(f"{impl}: " + "; ".join(reasons))

    def call():
        with fastadv.use_backend(impl), fastadv.validation(False):
            return case.public()

    return call


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=bench_ops.shape_str)
@pytest.mark.parametrize("label", bench_ops.OPS)
def test_op(benchmark, case_factory, label, shape, dtype, impl):
    case = case_factory(label, shape, dtype)
    fn = _callable(case, impl)
    if DEVICE.type == "cuda":
        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()

    benchmark.group = f"{label} {bench_ops.shape_str(shape)} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(op=label, impl=impl, bytes=case.nbytes)
    benchmark(fn)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info["gbs"] = case.nbytes / median_s / 1e9


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=bench_ops.shape_str)
def test_copy(benchmark, shape, dtype):
    """dst.copy_(src) on one tensor of the shape: the bandwidth yardstick."""
    src = torch.rand(shape, device=DEVICE).to(dtype)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    benchmark.group = f"copy_ {bench_ops.shape_str(shape)} {str(dtype).replace('torch.', '')}"
    benchmark.extra_info.update(op="copy_", bytes=nbytes)
    benchmark(lambda: dst.copy_(src))
    benchmark.extra_info["gbs"] = nbytes / benchmark.stats.stats.median / 1e9
