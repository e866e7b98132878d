"""Edge cases of the sort-free L1 projection (issue 10) on the C++ backend.

The kernels find tau (d = clamp(sign(v) max(|v| - tau, 0), a, b)) by Newton
on a bisection bracket from a subsample warm start and finish with the exact
piecewise-linear solve on the final active set, so they must match the
sort-based float64 reference (fastadv.reference.lp.project_l1) to float32
rounding. Tolerance: outputs scale with max |delta|; tau is a sum of up to N
float32 terms divided by a count, so its error is ~1e-7 relative to
sum |v| / count <= max |v|, and we allow 2e-5 * max |v| (the test_ops
tolerance, scaled). The AutoAttack timing twin of the benchmarks
(benchmarks/aa_l1_projection.py) is checked here against the same reference.
"""
from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest
import torch

import fastadv
from fastadv import _dispatch, ops
from fastadv.reference import lp as ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cpp(like):
    reasons = _dispatch.not_supported_reasons("project_l1", "cpp", [like])
    if reasons:
        pytest.skip(f"cpp cannot run project_l1: {'; '.join(reasons)}")
    return fastadv.use_backend("cpp")


def _inputs(b, n, norm, seed=0, dtype=torch.float32, box_scale=1.0):
    """delta with ||delta_i||_1 = norm_i * eps_i, x0 uniform in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, n, generator=g, dtype=torch.float64)
    delta = torch.randn(b, n, generator=g, dtype=torch.float64)
    eps = (0.004 * n) * (0.5 + torch.rand(b, generator=g, dtype=torch.float64))
    norm = torch.as_tensor(norm, dtype=torch.float64).expand(b)
    delta *= (norm * eps / delta.abs().sum(1))[:, None] * box_scale
    return delta.to(dtype), x0.to(dtype), eps.float()


def _check(delta, eps, x0=None, clip=None, tol=2e-5):
    kw = {"x0": x0, "clip": clip} if x0 is not None else {}
    with _cpp(delta):
        got = ops.project_l1(delta, eps, **kw)
    want = ref.project_l1(delta, eps, upcast=torch.float64, **kw)
    scale = delta.flatten(1).abs().amax(1).double().clamp_min(1e-30)
    err = ((got.double() - want).flatten(1).abs().amax(1) / scale).max().item()
    assert err <= tol, f"max error {err:.3g} of max|delta|"
    e = torch.as_tensor(eps, dtype=torch.float64).expand(delta.shape[0])
    l1 = got.double().flatten(1).abs().sum(1)
    assert (l1 <= e * (1 + 1e-5) + 1e-6).all()
    if x0 is not None:
        y = (x0.double() + got.double())
        assert (y >= clip[0] - 1e-6).all() and (y <= clip[1] + 1e-6).all()
    return got, want


@pytest.mark.parametrize("n", [3072, 40000])  # one chunk, no warm start on short rows; several chunks
@pytest.mark.parametrize("norm", [1.01, 1.5, 5.0, 30.0, 1000.0])
@pytest.mark.parametrize("boxed", [False, True])
def test_norms_from_just_outside_to_far(n, norm, boxed):
    delta, x0, eps = _inputs(3, n, norm, seed=int(norm * 10) + n)
    kw = {"x0": x0, "clip": (0.0, 1.0)} if boxed else {}
    got, _ = _check(delta, eps, **kw)
    # outside the ball: the budget is used exactly (unless the box caps it)
    l1 = got.double().abs().sum(1)
    if not boxed:
        torch.testing.assert_close(l1, eps.double(), rtol=2e-6, atol=0)


def test_inside_zero_eps_and_zero_rows():
    delta, x0, _ = _inputs(5, 3000, 1.0, seed=1)
    delta[3] = 0
    n1 = delta.abs().sum(1)
    eps = torch.stack([n1[0] * 2, torch.tensor(0.0), n1[2] * 0.999, torch.tensor(1.0), n1[4]]).float()
    for kw in ({}, {"x0": x0, "clip": (0.0, 1.0)}):
        got, _ = _check(delta, eps, **kw)
        want_inside = delta[0] if not kw else delta[0].clamp(-x0[0], 1 - x0[0])
        assert torch.equal(got[0], want_inside)  # inside: clamp(v, a, b), bit for bit
        assert torch.equal(got[1], torch.zeros_like(got[1]))  # eps = 0
        assert torch.equal(got[3], torch.zeros_like(got[3]))  # all-zero row
    with _cpp(delta):
        z = ops.project_l1(torch.zeros(2, 50), 0.0)
    assert torch.equal(z, torch.zeros(2, 50))


@pytest.mark.parametrize("boxed", [False, True])
def test_ties(boxed):
    g = torch.Generator().manual_seed(2)
    # magnitudes on a coarse grid: thousands of equal |v_i|, signs random
    delta = (torch.randint(0, 6, (4, 5000), generator=g).float() / 4) * (torch.randint(0, 2, (4, 5000), generator=g) * 2 - 1)
    x0 = torch.randint(0, 5, (4, 5000), generator=g).float() / 4  # box bounds tie too
    eps = torch.tensor([10.0, 100.0, 1000.0, 3000.0])
    _check(delta, eps, **({"x0": x0, "clip": (0.0, 1.0)} if boxed else {}))
    # every coordinate equal: tau = |v| - eps / n exactly
    const = torch.full((2, 1024), 0.5)
    _check(const, torch.tensor([3.0, 100.0]))


def test_box_active_on_many_coordinates():
    delta, x0, eps = _inputs(4, 20000, 3.0, seed=3)
    x0 = torch.where(torch.rand(x0.shape) < 0.5, x0 * 0.02, 1 - x0 * 0.02)  # near the box faces
    delta = delta.abs() * torch.where(x0 < 0.5, -1.0, 1.0) * 50  # pushes outward: clipped almost everywhere
    eps = eps * 5
    got, _ = _check(delta, eps, x0=x0, clip=(0.0, 1.0))
    sat = ((x0 + got == 0) | (x0 + got == 1)).float().mean()
    assert sat > 0.3
    # mixed: half pushing inward
    delta2 = delta * torch.where(torch.rand(delta.shape) < 0.5, 1.0, -0.01)
    _check(delta2, eps, x0=x0, clip=(0.0, 1.0))


def test_per_sample_eps_and_huge_tiny_scales():
    delta, x0, eps = _inputs(6, 5000, 5.0, seed=4)
    for s in (1e-20, 1e-6, 1e6, 1e18):
        _check(delta * s, eps * s)
        _check(delta * s, eps * s, x0=x0 * 0 + 0.5, clip=(-0.5 * s + 0.5, 0.5 * s + 0.5))


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_layouts(layout):
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 3, 20, 24, generator=g)
    delta = torch.randn(3, 3, 20, 24, generator=g) * 0.4
    if layout == "channels_last":
        x0, delta = (t.contiguous(memory_format=torch.channels_last) for t in (x0, delta))
    else:
        x0, delta = (torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0] for t in (x0, delta))
    eps = torch.tensor([5.0, 30.0, 300.0])
    got, _ = _check(delta, eps, x0=x0, clip=(0.0, 1.0))
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("boxed", [False, True])
def test_bfloat16_error_at_most_twice_the_eager_one(boxed):
    delta, x0, eps = _inputs(4, 6000, 5.0, seed=6, dtype=torch.bfloat16)
    kw = {"x0": x0, "clip": (0.0, 1.0)} if boxed else {}
    with _cpp(delta):
        got = ops.project_l1(delta, eps, **kw)
    want = ref.project_l1(delta, eps, upcast=torch.float64, **kw)
    lowp = ref.project_l1(delta, eps, **kw)
    err_k = (got.double() - want).abs().max().item()
    err_t = (lowp.double() - want).abs().max().item()
    assert err_k <= 2 * err_t + 0.5 * torch.finfo(torch.bfloat16).eps * delta.abs().max().item(), (err_k, err_t)


def test_long_single_sample_split_across_threads_is_deterministic():
    delta, x0, eps = _inputs(1, 3 * 224 * 224, 30.0, seed=7)
    prev = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(_check(delta, eps, x0=x0, clip=(0.0, 1.0))[0])
        assert torch.equal(outs[0], outs[1])
    finally:
        torch.set_num_threads(prev)


def _aa():
    path = ROOT / "benchmarks" / "aa_l1_projection.py"
    spec = importlib.util.spec_from_file_location("aa_l1_projection", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("norm", [0.5, 1.5, 30.0])
def test_speed_baselines_match_the_reference(norm):
    aa = _aa()
    delta, x0, eps = _inputs(4, 3072, norm, seed=8)
    want = ref.project_l1(delta, eps, x0=x0, clip=(0.0, 1.0), upcast=torch.float64)
    got = aa.aa_project_l1(delta, eps, x0)
    # AutoAttack accumulates the budget with a float32 cumsum over 2N sorted
    # breakpoints: its error grows with N (7e-6 of max|delta| seen at N = 3072).
    scale = delta.abs().max().item()
    assert (got.double() - want).abs().max().item() <= 5e-5 * scale
    want_nb = ref.project_l1(delta, eps, upcast=torch.float64)
    assert (aa.duchi_project_l1(delta, eps).double() - want_nb).abs().max().item() <= 2e-5 * scale
