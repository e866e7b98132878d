"""Triton-specific tests for the Lp kernels (kernels/lp_steps.py, kernels/lp_project.py).

The generic backend comparison (every op, layouts, dtypes, edge cases) lives in
tests/test_ops.py and already runs the triton backend on one-block shapes.
This file covers what only the Triton code has:

* the chunked / two-pass paths for samples larger than one block, forced on
  small shapes by lowering SINGLE_MAX and CHUNK, at block-boundary sizes;
* ``out`` aliasing the input on those paths (each kernel must read an
  element before writing it, and write only in its last pass);
* the exact SLIDE quantile (bisection on float32 bit patterns) on ties,
  zeros, infinities and NaN, and the L1/L2 root-finds on hard cases;
* opcheck of the registered ``fastadv::triton_*`` ops;
* that every kernel lowers to PTX for sm_90 (no GPU needed), which the
  interpreter does not check (it accepted a non-constexpr global that the
  compiler rejects).

On CPU these run under TRITON_INTERPRET=1 (set by conftest.py). Tolerances:
the float32 reference and the kernels sum a sample in different orders; the
outputs are O(1) and a relative error of ~1e-6 in a norm over <= 1e3 terms
moves them by < 1e-5, so atol = rtol = 2e-5 (as in tests/test_ops.py).
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import fastadv  # noqa: E402
from triton_lowering import lower_for_sm90  # noqa: E402  (tests/triton_lowering.py)
from fastadv import _dispatch, ops  # noqa: E402
from fastadv.reference import lp as ref  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)
OPS = ("linf_step", "l2_step", "l1_step", "project_linf", "project_l2", "project_l1")


def _need_triton(op="linf_step", like=None):
    like = torch.empty(1) if like is None else like
    reasons = _dispatch.not_supported_reasons(op, "triton", [like])
    if reasons:
        pytest.skip("; ".join(reasons))


@pytest.fixture
def small_blocks(monkeypatch):
    """Force the multi-block paths: samples above 64 elements are streamed in 32-element chunks."""
    from fastadv.kernels import lp_project, lp_steps

    for mod in (lp_steps, lp_project):
        monkeypatch.setattr(mod, "SINGLE_MAX", 64)
        monkeypatch.setattr(mod, "CHUNK", 32)
    return 32


def _inputs(b, n, seed, dtype=torch.float32, nan_grad=False):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, n, generator=g, dtype=torch.float64)
    x = (x0 + 0.1 * (2 * torch.rand(b, n, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
    grad = torch.randn(b, n, generator=g, dtype=torch.float64)
    if nan_grad:
        grad[0, ::7] = float("nan")
    eps = 0.2 + torch.rand(b, generator=g)
    alpha = 0.05 + 0.2 * torch.rand(b, generator=g)
    return [t.to(dtype) for t in (x, x0, grad)] + [eps, alpha]


def _poisoned(like):
    return torch.full_like(like, float("nan"))


def _call(op, x, x0, grad, eps, alpha, out=None, boxed=True):
    """Run ``op`` through the public API; projections project grad (an O(1) random delta)."""
    clip = (0.0, 1.0) if boxed else None
    if op == "linf_step":
        return ops.linf_step(x, x0, grad, alpha * 0.3, eps * 0.1, clip=clip, out=out)
    if op == "l2_step":
        return ops.l2_step(x, x0, grad, alpha, eps, clip=clip, out=out)
    if op == "l1_step":
        return ops.l1_step(x, x0, grad, alpha * 10, eps * 3, sparsity=0.8, clip=clip, out=out)
    fn = getattr(ops, op)
    scale = {"project_linf": 0.3, "project_l2": 1.0, "project_l1": 5.0}[op]
    if boxed:
        return fn(grad, eps * scale, x0=x0, clip=clip, out=out)
    return fn(grad, eps * scale, out=out)


def _ref(op, x, x0, grad, eps, alpha, boxed=True, upcast=None):
    clip = (0.0, 1.0) if boxed else None
    if op == "linf_step":
        return ref.linf_step(x, x0, grad, alpha * 0.3, eps * 0.1, clip, upcast=upcast)
    if op == "l2_step":
        return ref.l2_step(x, x0, grad, alpha, eps, clip, upcast=upcast)
    if op == "l1_step":
        return ref.l1_step(x, x0, grad, alpha * 10, eps * 3, 0.8, clip, upcast=upcast)
    fn = getattr(ref, op)
    scale = {"project_linf": 0.3, "project_l2": 1.0, "project_l1": 5.0}[op]
    if boxed:
        return fn(grad, eps * scale, x0=x0, clip=clip, upcast=upcast)
    return fn(grad, eps * scale, upcast=upcast)


# ------------------------------------------------------------------ multi-block paths
# N = 64: one full block (SINGLE, BLOCK = 64; masked one-block shapes are in
# tests/test_ops.py); 96, 97: streamed in 32-element chunks (exactly 3 full
# chunks; 4 chunks with 1 element in the last).
@pytest.mark.parametrize("n", [64, 96, 97])
@pytest.mark.parametrize("op", OPS)
def test_block_boundaries_match_reference(small_blocks, op, n):
    _need_triton(op)
    x, x0, grad, eps, alpha = _inputs(2, n, seed=n, nan_grad=op.endswith("step"))
    boxes = (True,) if op.endswith("step") else (True, False)
    for boxed in boxes:
        want = _ref(op, x, x0, grad, eps, alpha, boxed=boxed)
        with fastadv.use_backend("triton"):
            got = _call(op, x, x0, grad, eps, alpha, out=_poisoned(x), boxed=boxed)
        if op in ("linf_step", "project_linf"):
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("op", OPS)
def test_out_may_alias_input_on_chunked_path(small_blocks, op):
    """out = x (steps) or out = delta (projections): the result equals the out-of-place one."""
    _need_triton(op)
    x, x0, grad, eps, alpha = _inputs(2, 65, seed=1)
    with fastadv.use_backend("triton"):
        want = _call(op, x, x0, grad, eps, alpha)
        if op.endswith("step"):
            buf = x.clone()
            got = _call(op, buf, x0, grad, eps, alpha, out=buf)
        else:
            buf = grad.clone()
            got = _call(op, x, x0, buf, eps, alpha, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert torch.equal(got, want)


def test_chunked_l2_step_is_deterministic_and_on_the_sphere(small_blocks):
    """Two-pass l2_step: the per-chunk partials are summed in a fixed order
    (same bits on every run), and a step that leaves the ball lands on it."""
    _need_triton("l2_step")
    x, x0, grad, eps, alpha = _inputs(4, 200, seed=3)
    eps = torch.full((4,), 0.3)
    with fastadv.use_backend("triton"):
        a = ops.l2_step(x, x0, grad, 1.0, eps, clip=None)
        b = ops.l2_step(x, x0, grad, 1.0, eps, clip=None)
    assert torch.equal(a, b)
    norms = (a.double() - x0.double()).norm(dim=1)
    torch.testing.assert_close(norms, eps.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "op,dtype",
    [(op, dt) for op in ("l2_step", "project_l2", "project_l1") for dt in (torch.bfloat16, torch.float16)]
    + [("l1_step", torch.bfloat16)],  # the slowest under the interpreter (4.5 s): one dtype
)
def test_chunked_low_precision(small_blocks, op, dtype):
    """Half-precision storage, float32 math. Flash-attention's rule: error vs a
    float64 reference at most twice the reference's own in that dtype, plus
    half an ulp at 1.0 (the kernels round once, at the end)."""
    _need_triton(op)
    x, x0, grad, eps, alpha = _inputs(2, 80, seed=5, dtype=dtype)
    want64 = _ref(op, x, x0, grad, eps, alpha, upcast=torch.float64)
    ref_err = (_ref(op, x, x0, grad, eps, alpha).double() - want64).abs().max().item()
    with fastadv.use_backend("triton"):
        got = _call(op, x, x0, grad, eps, alpha, out=_poisoned(x))
    assert got.dtype == dtype
    half_ulp = torch.finfo(dtype).eps / 2
    err = (got.double() - want64).abs().max().item()
    assert err <= 2 * ref_err + half_ulp, (err, ref_err)


# ------------------------------------------------------------------ SLIDE quantile
@pytest.mark.parametrize(
    "sparsity,chunked", [(0.0, False), (0.5, False), (0.8, False), (0.99, False), (0.0, True), (0.8, True)]
)
def test_l1_step_quantile_on_ties_zeros_inf_nan(request, chunked, sparsity):
    """The bisection on bit patterns finds the exact order statistic, whatever the ties."""
    _need_triton("l1_step")
    if chunked:
        request.getfixturevalue("small_blocks")
    b, n = 3, 70
    x, x0, _, eps, alpha = _inputs(b, n, seed=7)
    g = torch.Generator().manual_seed(8)
    grad = torch.randint(-3, 4, (b, n), generator=g).float()  # many ties and zeros
    grad[1] = 0.0
    grad[1, 5] = -2.0  # a single nonzero coordinate
    grad[2, ::9] = float("nan")
    grad[2, 4] = float("inf")
    grad[2, 11] = float("-inf")
    want = ref.l1_step(x, x0, grad, alpha, eps * 5, sparsity, (0.0, 1.0))
    with fastadv.use_backend("triton"):
        got = ops.l1_step(x, x0, grad, alpha, eps * 5, sparsity=sparsity, out=_poisoned(x))
    torch.testing.assert_close(got, want, **TOL)


def test_l1_step_moves_only_kept_coordinates(small_blocks):
    """Inside the ball (large eps, no box) the step is x + alpha * e: with
    distinct |g|, the N - k coordinates at or above rank k = round(s (N - 1))
    move, each by alpha / (N - k)."""
    _need_triton("l1_step")
    n = 101
    x, x0, grad, _, _ = _inputs(1, n, seed=9)
    with fastadv.use_backend("triton"):
        y = ops.l1_step(x, x0, grad, 0.5, 1e3, sparsity=0.9, clip=None)
    # y = x0 + ((x + alpha e) - x0) differs from x by rounding (< 1e-7) off the kept set
    moved = (y - x).abs() > 1e-4
    k = ref.l1_keep_count_rank(n, 0.9)
    assert int(moved.sum()) == n - k
    torch.testing.assert_close((y - x)[moved].abs(), torch.full((n - k,), 0.5 / (n - k)), atol=1e-7, rtol=1e-6)


# ------------------------------------------------------------------ root-finds on hard cases
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("op,p", [("project_l2", 2), ("project_l1", 1)])
def test_projection_hard_cases(request, op, p, chunked):
    """x0 on the box faces, eps = 0, eps tiny, eps beyond what the box allows,
    and |delta| with ties: same answer as the float64 reference, feasible."""
    _need_triton(op)
    if chunked:
        request.getfixturevalue("small_blocks")
    b, n = 6, 80
    g = torch.Generator().manual_seed(11)
    x0 = torch.rand(b, n, generator=g)
    x0[:, ::3] = 0.0
    x0[:, 1::3] = 1.0
    delta = torch.randn(b, n, generator=g)
    delta[3] = torch.sign(delta[3]) * 0.5  # all |delta| tied
    delta[4, ::2] = 0.0
    eps = torch.tensor([0.0, 1e-6, 0.5, 2.0, 1e3, 3.0])
    want = getattr(ref, op)(delta, eps, x0=x0, clip=(0.0, 1.0), upcast=torch.float64)
    with fastadv.use_backend("triton"):
        got = getattr(ops, op)(delta, eps, x0=x0, clip=(0.0, 1.0), out=_poisoned(delta))
    torch.testing.assert_close(got.double(), want, **TOL)
    assert torch.all(x0 + got >= -1e-7) and torch.all(x0 + got <= 1 + 1e-7)
    norms = got.double().norm(p=p, dim=1)
    assert torch.all(norms <= eps.double() * (1 + 1e-6) + 1e-7), (norms, eps)
    assert torch.all(got[0] == 0)  # eps = 0 projects onto the origin


def test_l1_projection_converges_from_a_far_start():
    """One large coordinate among tiny ones: the bracket [0, max|v|] starts far
    from tau, and safeguarded Newton must still land on the answer. tau near
    1e4 carries float32's ulp there (~1e-3), so the bar is the float32
    reference's own error against float64 (2.3e-4 for eps = 1e-2), not 1e-6."""
    _need_triton("project_l1")
    g = torch.Generator().manual_seed(12)
    delta = 1e-3 * torch.randn(3, 300, generator=g)
    delta[:, 17] = 1e4
    eps = torch.tensor([1.0, 1e-2, 1e4 - 5])
    want = ref.project_l1(delta, eps, upcast=torch.float64)
    ref_err = (ref.project_l1(delta, eps).double() - want).abs().amax(dim=1)
    with fastadv.use_backend("triton"):
        got = ops.project_l1(delta, eps)
    err = (got.double() - want).abs().amax(dim=1)
    assert torch.all(err <= 2 * ref_err + 1e-6), (err, ref_err)
    assert torch.all(got.double().abs().sum(dim=1) <= eps.double() * (1 + 1e-6))


# ------------------------------------------------------------------ registration
@pytest.mark.parametrize("op", OPS)
def test_opcheck_triton_ops(op):
    """The registered fastadv::triton_* ops pass opcheck. On CPU the interpreter
    cannot run under AOTDispatch (torch.compile), so that check needs a GPU."""
    _need_triton(op)
    b, n = 2, 37
    x, x0, grad, eps, alpha = _inputs(b, n, seed=13)
    out = torch.empty_like(x)
    args = {
        "linf_step": (x, x0, grad, alpha, eps, 0.0, 1.0, out),
        "l2_step": (x, x0, grad, alpha, eps, 0.0, 1.0, out),
        "l1_step": (x, x0, grad, alpha, eps, 0.8, 0.0, 1.0, out),
        "project_linf": (grad, eps, x0, 0.0, 1.0, out),
        "project_l2": (grad, eps, None, -math.inf, math.inf, out),
        "project_l1": (grad, eps, x0, 0.0, 1.0, out),
    }[op]
    triton_op = getattr(torch.ops.fastadv, f"triton_{op}")
    assert _dispatch.impl(op, "triton") is triton_op
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if x.is_cuda:
        utils = utils + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(triton_op, args, test_utils=utils)


# ------------------------------------------------------------------ GPU lowering without a GPU
_LOWERING = """
P = load("lp_project")
S = load("lp_steps")
T = "*fp32"
F = "*fp32"  # alpha, eps, partials are float32
# The kernels with loops, bitcasts and two-pass reductions, at the launch
# settings the launchers pick (the simpler variants share their helpers;
# all 17 variants x 3 dtypes were lowered once by hand, see docs/backends-triton.md).
cases = [
    (S._linf_step_kernel, [T, T, T, F, F, T, "fp32", "fp32", "i32", "i64"], dict(BLOCK=1024), 4),
    (S._l2_step_apply_kernel, [T, T, T, F, F, F, T, "fp32", "fp32", "i32", "i32"], dict(BLOCK=4096, PBLOCK=64), 8),
    (S._l1_step_kernel, [T, T, T, F, F, T, "fp32", "fp32", "i32", "i32"], dict(SINGLE=True, BLOCK=4096, MAX_ITERS=80), 8),
    (S._l1_step_kernel, [T, T, T, F, F, T, "fp32", "fp32", "i32", "i32"], dict(SINGLE=False, BLOCK=4096, MAX_ITERS=80), 8),
    (P._project_l2_kernel, [T, T, F, T, "fp32", "fp32", "i32"], dict(HAS_BOX=True, SINGLE=True, BLOCK=4096, MAX_ITERS=64), 8),
    (P._project_l2_kernel, [T, T, F, T, "fp32", "fp32", "i32"], dict(HAS_BOX=True, SINGLE=False, BLOCK=4096, MAX_ITERS=64), 8),
    (P._project_l2_scale_kernel, [T, F, F, T, "i32", "i32"], dict(BLOCK=4096, PBLOCK=64), 8),
    (P._project_l1_kernel, [T, T, F, T, "fp32", "fp32", "i32"], dict(HAS_X0=True, SINGLE=False, BLOCK=4096, MAX_ITERS=80), 8),
]
for fn, types, consts, warps in cases:
    lower(fn, types, consts, warps)
"""


def test_kernels_lower_to_ptx_for_sm90(tmp_path):
    """Compile every kernel for an H100 (sm_90) without a GPU: catches what the
    interpreter accepts but the compiler rejects, and register spills."""
    lower_for_sm90(_LOWERING, tmp_path, expect=8)


def test_lp_common_launch_heuristics():
    """kernels/_lp_common.py: one block in registers up to single_max, else chunked; warps grow with the block."""
    from fastadv.kernels import _lp_common as C

    assert [C.next_pow2(n) for n in (1, 2, 3, 1024, 1025)] == [1, 2, 4, 1024, 2048]
    assert C.row_launch(1, 8192, 4096) == (16, True, 4)  # at least 16 lanes
    assert C.row_launch(3072, 8192, 4096) == (4096, True, 8)  # 3x32x32 fits one block
    assert C.row_launch(150528, 8192, 4096) == (4096, False, 8)  # 3x224x224 streams in chunks
    assert [C.warps_for(b) for b in (16, 2048, 4096, 8192, 65536)] == [4, 4, 8, 16, 16]
