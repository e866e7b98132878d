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
  compiler rejects), without register spills (ptxas -v) or integer divisions
  on tensors (TTIR);
* the spill check of ``fastadv doctor --gpu`` (fastadv/doctor.py): ptxas -v
  parsing on real logs, CompiledKernel.n_regs/n_spills on stand-in objects.

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
# `fastadv doctor --gpu` compiles every variant the launchers pick at
# CIFAR/ImageNet sizes, and --spills-ptxas does it here in about 50 s).
cases = [
    (S._linf_step_kernel, [T, T, T, F, F, T, "fp32", "fp32", "i32", "i32", "i32"], dict(ROWS=1, BLOCK=1024), 4),
    (P._project_linf_kernel, [T, T, F, T, "fp32", "fp32", "i32", "i32", "i32"], dict(HAS_X0=True, ROWS=4, BLOCK=128), 2),
    (S._l2_step_apply_kernel, [T, T, T, F, F, F, T, "fp32", "fp32", "i32", "i32"], dict(BLOCK=4096, PBLOCK=64), 8),
    (S._l1_step_kernel, [T, T, T, F, F, T, "fp32", "fp32", "i32", "i32"], dict(SINGLE=True, BLOCK=4096, MAX_ITERS=80), 8),
    (S._l1_step_kernel, [T, T, T, F, F, T, "fp32", "fp32", "i32", "i32"], dict(SINGLE=False, BLOCK=4096, MAX_ITERS=80), 8),
    (P._project_l2_kernel, [T, T, F, T, "fp32", "fp32", "i32"], dict(HAS_BOX=True, SINGLE=True, BLOCK=4096, MAX_ITERS=64), 8),
    (P._project_l2_kernel, [T, T, F, T, "fp32", "fp32", "i32"], dict(HAS_BOX=True, SINGLE=False, BLOCK=4096, MAX_ITERS=64), 8),
    (P._project_l2_scale_kernel, [T, F, F, T, "i32", "i32"], dict(BLOCK=4096, PBLOCK=64), 8),
    (P._project_l1_kernel, [T, T, F, T, "fp32", "fp32", "i32"], dict(HAS_X0=True, SINGLE=False, BLOCK=4096, MAX_ITERS=80), 8),
]
for fn, types, consts, warps in cases:
    lower(fn, types, consts, warps, no_tensor_div=True)
# Control: the spill reading must see a spill. Triton's maxnreg=32 caps the
# registers of project_l1 (about 145 without it), so ptxas must spill.
c = compile_sm90(P._project_l1_kernel, [T, T, F, T, "fp32", "fp32", "i32"],
                 dict(HAS_X0=True, SINGLE=True, BLOCK=4096, MAX_ITERS=80), 8, maxnreg=32)
res = doctor.ptxas_resources(c)
assert res["n_regs"] <= 32 and res["n_spills"] > 0 and res["spill_stores"] > 0, res
print("control spills", res)
"""


def test_kernels_lower_to_ptx_for_sm90(tmp_path):
    """Compile the Lp kernels for an H100 (sm_90) without a GPU: catches what the
    interpreter accepts but the compiler rejects, register spills (ptxas -v), and
    integer divisions on tensors in the TTIR; a register-capped control must spill."""
    stdout = lower_for_sm90(_LOWERING, tmp_path, expect=9)
    assert "control spills" in stdout


# ------------------------------------------------------------------ the spill check's parsing (no GPU needed)
# Real ptxas -v output: the ptxas Triton 3.9 ships for sm_90 on two kernels of
# this package, the second built with maxnreg=32; then the nvcc-era prefix with
# two kernels in one log.
PTXAS_CLEAN = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_linf_step_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _linf_step_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 32 registers, used 0 barriers
ptxas-blackwell info    : Compile time = 31.762 ms
"""
PTXAS_SPILLED = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_project_l1_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _project_l1_kernel
    328 bytes stack frame, 416 bytes spill stores, 508 bytes spill loads
ptxas-blackwell info    : Used 32 registers, used 1 barriers, 328 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 156.169 ms
"""
PTXAS_TWO = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_a_kernel' for 'sm_90'
ptxas info    : Function properties for _a_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 20 registers, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_b_kernel' for 'sm_90'
ptxas info    : Function properties for _b_kernel
    6 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, 380 bytes cmem[0]
"""


def test_parse_ptxas_verbose():
    from fastadv import doctor

    assert doctor.parse_ptxas_verbose(PTXAS_CLEAN) == {
        "_linf_step_kernel": {"n_regs": 32, "n_spills": 0, "stack_frame": 0, "spill_stores": 0, "spill_loads": 0}}
    assert doctor.parse_ptxas_verbose(PTXAS_SPILLED)["_project_l1_kernel"] == {
        "n_regs": 32, "n_spills": 82, "stack_frame": 328, "spill_stores": 416, "spill_loads": 508}
    two = doctor.parse_ptxas_verbose(PTXAS_TWO)
    assert two["_a_kernel"]["n_regs"] == 20 and two["_a_kernel"]["n_spills"] == 0
    # n_spills as Triton counts it (local bytes / 4), rounded up: 6 bytes -> 2 words
    assert two["_b_kernel"] == {"n_regs": 255, "n_spills": 2, "stack_frame": 6, "spill_stores": 4, "spill_loads": 4}
    assert doctor.parse_ptxas_verbose("ptxas fatal   : Unsupported .version 9.4") == {}


class _FakeCompiled:
    """Stands for triton's CompiledKernel: n_regs / n_spills appear only once _init_handles has loaded the
    binary (as in Triton 3.x), or come in the metadata (as Triton plans)."""

    def __init__(self, name, regs, spills, *, in_metadata=False, block=0):
        import collections

        fields = dict(name=name, num_warps=4)
        if in_metadata:
            fields.update(n_regs=regs, n_spills=spills)
        self.metadata = collections.namedtuple("KernelMetadata", sorted(fields))(**fields)
        self.hash = f"{name}-{block}-{regs}-{spills}"
        self._res = (regs, spills)
        self.loaded = False

    def _init_handles(self):
        self.loaded = True
        self.n_regs, self.n_spills = self._res


def test_compiled_resources_from_a_compiled_kernel():
    from fastadv import doctor

    ck = _FakeCompiled("_k", 40, 0)
    assert not hasattr(ck, "n_spills")
    assert doctor.compiled_resources(ck) == {"n_regs": 40, "n_spills": 0} and ck.loaded
    ck = _FakeCompiled("_k", 255, 12, in_metadata=True)
    assert doctor.compiled_resources(ck) == {"n_regs": 255, "n_spills": 12} and not ck.loaded
    with pytest.raises(RuntimeError, match="neither n_spills nor _init_handles"):
        doctor.compiled_resources(object())


class _FakeJit:
    """Stands for a @triton.jit kernel: warmup returns a compiled kernel whose registers depend on BLOCK;
    maxnreg=32 makes it spill unless ``control_blind`` (a reading that cannot see spills)."""

    def __init__(self, name, regs_per_block, control_blind=False):
        self.name, self.regs, self.blind = name, regs_per_block, control_blind

    def warmup(self, *args, grid, BLOCK, num_warps, maxnreg=None):
        regs = self.regs[BLOCK]
        spills = 0 if regs < 255 else regs - 254
        if maxnreg is not None and not self.blind:
            regs, spills = maxnreg, max(1, regs - maxnreg)
        return _FakeCompiled(self.name, regs, spills, block=BLOCK)


def _fake_launches(kernel, blocks):
    x = torch.empty(1)
    return [(f"case{i}", (kernel, (1,), (x,), dict(BLOCK=b, num_warps=4))) for i, b in enumerate(blocks)]


def test_spill_check_reports_and_fails_on_spills():
    from fastadv import doctor

    k = _FakeJit("_k", {1024: 40, 4096: 120, 8192: 300})
    ok = doctor.spill_check("gpu", _fake_launches(k, [1024, 4096, 4096]))
    assert ok["status"] == "passed" and ok["method"] == "gpu" and ok["spilled"] == []
    rows = {r["constexprs"]["BLOCK"]: r for r in ok["kernels"]}
    assert rows[4096]["cases"] == ["case1", "case2"] and rows[4096]["n_regs"] == 120  # one row per compiled kernel
    assert rows[1024]["dtype"] == "float32" and rows[1024]["num_warps"] == 4
    assert ok["control"]["constexprs"] == {"BLOCK": 4096} and ok["control"]["n_spills"] > 0  # the most registers

    bad = doctor.spill_check("gpu", _fake_launches(k, [1024, 8192]))
    assert bad["status"] == "failed" and bad["spilled"] == ["_k float32 {'BLOCK': 8192}: 46 words"]

    blind = doctor.spill_check("gpu", _fake_launches(_FakeJit("_k", {1024: 40}, control_blind=True), [1024]))
    assert blind["status"] == "failed" and "cannot see them" in blind["reason"]


def test_spill_mode_without_a_gpu():
    """No GPU: skipped with the reason unless --spills-ptxas; --skip spills wins; a GPU reads n_spills."""
    from fastadv import doctor

    mode, why = doctor._spill_mode(False, "no CUDA device", False, False)
    assert mode is None and why.startswith("no GPU here (no CUDA device)") and "--spills-ptxas" in why
    assert doctor._spill_mode(True, "H200", True, False) == (None, "skipped by --skip")
    assert doctor._spill_mode(True, "H200", False, False) == ("gpu", None)
    mode, why = doctor._spill_mode(False, "no CUDA device", False, True)
    assert (mode, why) == ("ptxas", None) or (mode is None and "no usable ptxas" in why)


def test_lp_common_launch_heuristics():
    """kernels/_lp_common.py: one block in registers up to single_max, else chunked; warps grow with the block."""
    from fastadv.kernels import _lp_common as C

    assert [C.next_pow2(n) for n in (1, 2, 3, 1024, 1025)] == [1, 2, 4, 1024, 2048]
    assert C.row_launch(1, 8192, 4096) == (16, True, 4)  # at least 16 lanes
    assert C.row_launch(3072, 8192, 4096) == (4096, True, 8)  # 3x32x32 fits one block
    assert C.row_launch(150528, 8192, 4096) == (4096, False, 8)  # 3x224x224 streams in chunks
    assert [C.warps_for(b) for b in (16, 2048, 4096, 8192, 65536)] == [4, 4, 8, 16, 16]
