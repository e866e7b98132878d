"""Every backend of every Lp op against the pure-PyTorch reference.

Backends: ref, cpp (compiled C++, CPU), triton (under TRITON_INTERPRET=1 on
CPU, natively on a GPU). A backend that cannot run here is skipped with the
dispatcher's reasons, except that CI sets FASTADV_REQUIRE_EXT=1 so a missing
C++ build fails instead of skipping.

Tolerances (float32): linf_step and project_linf are elementwise with the
reference's exact order of operations, so they must agree bit for bit.
l2_step and the L2/L1 projections reduce over a sample in a different order
(and the C++ kernels accumulate in float64), so they agree to float32 rounding
of the per-sample norm: outputs are O(1), and a relative error of ~1e-6 in a
norm over <= 1e4 terms moves them by < 1e-5; we use atol = rtol = 2e-5.
Low precision follows flash-attention's rule: the error of the kernel against
a float64 reference is at most twice that of the reference run in the same
precision, plus half an ulp at 1.0 (the kernels round once, at the end).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import fastadv
from fastadv import _dispatch, ops
from fastadv.reference import lp as ref

# FASTADV_TEST_DEVICE=cuda (set by `fastadv doctor --gpu`) runs the same tests on the GPU: the tensors of
# make() live there and the compiled backends are the CUDA C++ and natively compiled Triton kernels.
DEVICE = os.environ.get("FASTADV_TEST_DEVICE", "cpu")
if DEVICE != "cpu" and not torch.cuda.is_available():
    raise RuntimeError(f"FASTADV_TEST_DEVICE={DEVICE} but no CUDA device is available")
BACKENDS = ["ref", "cpp", "triton"] if DEVICE == "cpu" else ["ref", "cuda", "triton"]
STEP_OPS = ["linf_step", "l2_step", "l1_step"]
PROJ_OPS = ["project_linf", "project_l2", "project_l1"]
SHAPES = [(1, 1, 1, 1), (3, 5, 7, 11), (2, 385), (4, 3, 8, 8)]


def use(backend: str, op: str, like: torch.Tensor):
    reasons = _dispatch.not_supported_reasons(op, backend, [like])
    if reasons:
        if backend == "cpp" and os.environ.get("FASTADV_REQUIRE_EXT") == "1":
            pytest.fail(f"C++ backend required but unavailable: {reasons}")
        pytest.skip(f"{backend} cannot run {op}: {'; '.join(reasons)}")
    return fastadv.use_backend(backend)


def make(shape, dtype=torch.float32, layout="contiguous", seed=0):
    """x0 in [0, 1], x inside a 0.1-ball around it (in the box), a random gradient."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x0 + 0.1 * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    out = [t.to(dtype=dtype, device=DEVICE) for t in (x, x0, grad)]
    if layout == "channels_last":
        out = [t.contiguous(memory_format=torch.channels_last) for t in out]
    elif layout == "strided":  # every other element of a wider tensor
        out = [torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0] for t in out]
        assert not out[0].is_contiguous()
    return out


def step(op, x, x0, grad, alpha, eps, **kw):
    return getattr(ops, op)(x, x0, grad, alpha, eps, **kw)


def ref_step(op, x, x0, grad, alpha, eps, upcast=None, **kw):
    return getattr(ref, op)(x, x0, grad, alpha, eps, upcast=upcast, **kw)


PARAMS = {"linf_step": (0.05, 0.08), "l2_step": (0.3, 0.5), "l1_step": (0.5, 2.0)}


def assert_step_close(op, got, want):
    if op == "linf_step":
        assert torch.equal(got, want), (got - want).abs().max()
    else:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def _fast_shapes(backend):
    # Interpreted Triton is slow: two small shapes cover the one-block path.
    return SHAPES if backend != "triton" or DEVICE != "cpu" else [(1, 1, 1, 1), (3, 5, 7, 11)]


# ------------------------------------------------------------------ steps
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_step_matches_reference_fp32(backend, op):
    for shape in _fast_shapes(backend):
        x, x0, grad = make(shape)
        alpha, eps = PARAMS[op]
        with use(backend, op, x):
            got = step(op, x, x0, grad, alpha, eps)
        want = ref_step(op, x, x0, grad, alpha, eps)
        assert got.shape == x.shape and got.dtype == x.dtype
        assert_step_close(op, got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_step_layouts(backend, op, layout):
    shape = (3, 3, 6, 5)
    x, x0, grad = make(shape, layout=layout)
    alpha, eps = PARAMS[op]
    with use(backend, op, x):
        got = step(op, x, x0, grad, alpha, eps)
    want = ref_step(op, x.contiguous(), x0.contiguous(), grad.contiguous(), alpha, eps)
    assert_step_close(op, got.contiguous(), want)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_step_per_sample_eps_alpha(backend, op):
    x, x0, grad = make((4, 2, 5, 3))
    alpha = torch.tensor([0.01, 0.2, 0.0, 0.5], device=DEVICE)
    eps = torch.tensor([0.0, 0.05, 0.3, 3.0], device=DEVICE)
    with use(backend, op, x):
        got = step(op, x, x0, grad, alpha, eps)
    want = ref_step(op, x, x0, grad, alpha, eps)
    assert_step_close(op, got, want)
    # eps = 0 pins the first sample to x0 exactly.
    assert torch.equal(got[0], x0[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_step_low_precision(backend, op, dtype):
    x, x0, grad = make((3, 4, 5, 6), dtype=dtype)
    alpha, eps = PARAMS[op]
    with use(backend, op, x):
        got = step(op, x, x0, grad, alpha, eps)
    assert got.dtype == dtype
    want64 = ref_step(op, x, x0, grad, alpha, eps, upcast=torch.float64)
    lowp = ref_step(op, x, x0, grad, alpha, eps)
    err_kernel = (got.double() - want64).abs().max().item()
    err_torch = (lowp.double() - want64).abs().max().item()
    half_ulp = 0.5 * torch.finfo(dtype).eps
    assert err_kernel <= 2 * err_torch + half_ulp, (err_kernel, err_torch)


@pytest.mark.parametrize("backend", ["ref", "cpp"])
@pytest.mark.parametrize("op", STEP_OPS)
def test_step_float64(backend, op):
    x, x0, grad = make((2, 3, 4, 5), dtype=torch.float64)
    # alpha and eps reach the kernels as float32 (B,) tensors (the op schema):
    # dyadic values make that exact, so float64 must agree to float64 rounding.
    alpha, eps = {"linf_step": (0.046875, 0.078125), "l2_step": (0.3125, 0.5), "l1_step": (0.5, 2.0)}[op]
    with use(backend, op, x):
        got = step(op, x, x0, grad, alpha, eps)
    torch.testing.assert_close(got, ref_step(op, x, x0, grad, alpha, eps), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_step_zero_grad_moves_nothing(backend, op):
    x, x0, _ = make((3, 2, 4, 4))
    with use(backend, op, x):
        got = step(op, x, x0, torch.zeros_like(x), *PARAMS[op])
    # x lies within 0.1 of x0 in L-inf; with zero gradient each step projects x
    # onto its ball, which leaves linf (eps 0.08 < 0.1) clipped and l2/l1 radially
    # or exactly projected; compare with the reference and check no NaN.
    assert not torch.isnan(got).any()
    assert_step_close(op, got, ref_step(op, x, x0, torch.zeros_like(x), *PARAMS[op]))
    with use(backend, op, x):
        same = step(op, x0, x0, torch.zeros_like(x), *PARAMS[op])
    assert torch.equal(same, x0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_step_nan_grad_is_zero(backend, op):
    """Documented: NaN entries of grad count as 0; an all-NaN sample does not move."""
    x, x0, grad = make((3, 2, 4, 4))
    grad[1] = float("nan")
    grad[2, 0, 0, 0] = float("nan")
    alpha, eps = PARAMS[op]
    with use(backend, op, x):
        got = step(op, x0, x0, grad, alpha, eps)
    assert not torch.isnan(got).any()
    assert torch.equal(got[1], x0[1])
    clean = grad.clone()
    clean[2, 0, 0, 0] = 0.0
    assert_step_close(op, got[2:], ref_step(op, x0, x0, clean, alpha, eps)[2:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_step_box_boundary_and_large_eps(backend, op):
    x, x0, grad = make((3, 3, 5, 5))
    x0[:, 0] = 0.0  # on the lower face of the box
    x0[:, 1] = 1.0  # on the upper face
    x = x0.clone()
    with use(backend, op, x):
        got = step(op, x, x0, grad, 5.0, 100.0)  # radius far beyond the box
    assert got.min() >= 0 and got.max() <= 1
    assert_step_close(op, got, ref_step(op, x, x0, grad, 5.0, 100.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_and_inplace(backend):
    op = "linf_step"
    x, x0, grad = make((3, 3, 4, 4))
    want = ref_step(op, x, x0, grad, *PARAMS[op])
    with use(backend, op, x):
        out = torch.full_like(x, float("nan"))  # poisoned: an unwritten element fails
        res = ops.linf_step(x, x0, grad, *PARAMS[op], out=out)
        assert res is out and torch.equal(out, want)
        # out in another layout than x: written through a temporary
        out_cl = torch.full_like(x, float("nan")).contiguous(memory_format=torch.channels_last)
        ops.linf_step(x, x0, grad, *PARAMS[op], out=out_cl)
        assert torch.equal(out_cl, want)
        # in place: out aliases x
        xi = x.clone()
        ops.linf_step(xi, x0, grad, *PARAMS[op], out=xi)
        assert torch.equal(xi, want)
    for op2 in ("l2_step", "l1_step"):
        with use(backend, op2, x):
            xi = x.clone()
            step(op2, xi, x0, grad, *PARAMS[op2], out=xi)
        assert_step_close(op2, xi, ref_step(op2, x, x0, grad, *PARAMS[op2]))


def test_empty_batch_and_no_clip():
    x, x0, grad = make((0, 3, 4, 4))
    assert ops.linf_step(x, x0, grad, 0.1, 0.1).shape == (0, 3, 4, 4)
    x, x0, grad = make((2, 7))
    y = ops.linf_step(x, x0, grad, 5.0, 10.0, clip=None)  # no box, ball not reached: x + alpha*sign(g)
    torch.testing.assert_close(y, x + 5.0 * grad.sign())


# ------------------------------------------------------------ projections
def _proj(op, delta, eps, x0=None, clip=None):
    return getattr(ops, op)(delta, eps, x0=x0, clip=clip)


def _ref_proj(op, delta, eps, x0=None, clip=None, upcast=None):
    return getattr(ref, op)(delta, eps, x0=x0, clip=clip, upcast=upcast)


def _norm(op, d):
    p = {"project_linf": math.inf, "project_l2": 2, "project_l1": 1}[op]
    return torch.linalg.vector_norm(d.flatten(1).double(), ord=p, dim=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PROJ_OPS)
@pytest.mark.parametrize("boxed", [False, True])
def test_projection_matches_reference(backend, op, boxed):
    for shape in _fast_shapes(backend):
        _, x0, _ = make(shape)
        delta = torch.randn(shape) * 0.5
        n = x0[0].numel()
        eps = torch.rand(shape[0]) * {"project_linf": 0.3, "project_l2": 0.5 * n**0.5, "project_l1": 0.3 * n}[op]
        kw = {"x0": x0, "clip": (0.0, 1.0)} if boxed else {}
        with use(backend, op, delta):
            got = _proj(op, delta, eps, **kw)
        want = _ref_proj(op, delta, eps, upcast=torch.float64, **kw).float()
        if op == "project_linf":
            assert torch.equal(got, _ref_proj(op, delta, eps, **kw))
        else:
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        # feasibility: in the ball (up to float32 rounding of the norm) and the box
        assert (_norm(op, got) <= eps.double() * (1 + 1e-5) + 1e-6).all()
        if boxed:
            assert ((x0 + got) >= -1e-6).all() and ((x0 + got) <= 1 + 1e-6).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PROJ_OPS)
def test_projection_layouts_and_lowp(backend, op):
    _, x0, _ = make((3, 3, 6, 5), layout="channels_last")
    delta = (torch.randn(3, 3, 6, 5) * 0.5).contiguous(memory_format=torch.channels_last)
    eps = {"project_linf": 0.2, "project_l2": 1.5, "project_l1": 6.0}[op]
    with use(backend, op, delta):
        got = _proj(op, delta, eps, x0=x0, clip=(0.0, 1.0))
    want = _ref_proj(op, delta.contiguous(), eps, x0=x0.contiguous(), clip=(0, 1), upcast=torch.float64)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    d16, x16 = delta.to(torch.bfloat16), x0.to(torch.bfloat16)
    with use(backend, op, d16):
        got16 = _proj(op, d16, eps, x0=x16, clip=(0.0, 1.0))
    want64 = _ref_proj(op, d16, eps, x0=x16, clip=(0, 1), upcast=torch.float64)
    lowp = _ref_proj(op, d16, eps, x0=x16, clip=(0, 1))
    err_k = (got16.double() - want64).abs().max().item()
    err_t = (lowp.double() - want64).abs().max().item()
    assert err_k <= 2 * err_t + 0.5 * torch.finfo(torch.bfloat16).eps, (err_k, err_t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", PROJ_OPS)
def test_projection_properties(backend, op):
    """Idempotent; already-feasible points do not move; eps = 0 gives 0."""
    _, x0, _ = make((4, 2, 5, 5))
    delta = torch.randn(4, 2, 5, 5)
    eps = torch.tensor([0.0, 0.3, 1.0, 4.0])
    with use(backend, op, delta):
        p1 = _proj(op, delta, eps, x0=x0, clip=(0.0, 1.0))
        p2 = _proj(op, p1, eps, x0=x0, clip=(0.0, 1.0))
        inside = _proj(op, p1 * 0.5, eps, x0=x0, clip=(0.0, 1.0))
    torch.testing.assert_close(p2, p1, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(inside, p1 * 0.5, atol=2e-6, rtol=2e-6)
    assert torch.equal(p1[0], torch.zeros_like(p1[0]))


def _solve_qp(v, lower, upper, eps, p):
    """Generic solver: min ||d - v||^2 s.t. ||d||_p <= eps, lower <= d <= upper (scipy SLSQP).

    L1 uses the smooth split d = a - b with a, b >= 0 and sum(a + b) <= eps.
    """
    np = pytest.importorskip("numpy")
    opt = pytest.importorskip("scipy.optimize")
    n = len(v)
    if p == 1:
        def f(z):
            return float(((z[:n] - z[n:] - v) ** 2).sum())

        def jac(z):
            g = 2 * (z[:n] - z[n:] - v)
            return np.concatenate([g, -g])

        bounds = [(0, max(u, 0)) for u in upper] + [(0, max(-lo, 0)) for lo in lower]
        cons = [{"type": "ineq", "fun": lambda z: eps - z.sum(), "jac": lambda z: -np.ones(2 * n)}]
        r = opt.minimize(f, np.zeros(2 * n), jac=jac, bounds=bounds, constraints=cons, method="SLSQP",
                         options={"ftol": 1e-15, "maxiter": 1000})
        return r.x[:n] - r.x[n:]
    cons = [{"type": "ineq", "fun": lambda d: eps**2 - (d**2).sum(), "jac": lambda d: -2 * d}]
    r = opt.minimize(lambda d: float(((d - v) ** 2).sum()), np.zeros(n), jac=lambda d: 2 * (d - v),
                     bounds=list(zip(lower, upper)), constraints=cons, method="SLSQP",
                     options={"ftol": 1e-15, "maxiter": 1000})
    return r.x


@pytest.mark.parametrize("op,p", [("project_l2", 2), ("project_l1", 1)])
def test_reference_projection_is_optimal(op, p):
    """The reference projections agree with a generic QP solver on small cases."""
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        n = int(torch.randint(1, 9, (1,), generator=g))
        x0 = torch.rand(1, n, generator=g, dtype=torch.float64)
        x0[0, 0] = 1.0 if trial % 3 == 0 else x0[0, 0]  # a coordinate on the box face
        delta = torch.randn(1, n, generator=g, dtype=torch.float64) * 0.7
        eps = float(torch.rand((), generator=g, dtype=torch.float64)) * (1.5 if p == 1 else 1.0)
        got = _ref_proj(op, delta, eps, x0=x0, clip=(0.0, 1.0))[0].numpy()
        want = _solve_qp(delta[0].numpy(), (-x0)[0].numpy(), (1 - x0)[0].numpy(), eps, p)
        assert abs(got - want).max() < 1e-5, (trial, got, want)
        # and the no-box case reduces to the classic formulas
        free = _ref_proj(op, delta, eps)[0]
        if p == 2:
            nrm = delta.norm()
            torch.testing.assert_close(free, delta[0] * min(1.0, eps / float(nrm)))
        else:
            assert float(free.abs().sum()) <= eps + 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_l1_step_sparsity_and_exact_budget(backend):
    """SLIDE keeps the top (1 - sparsity) fraction of |grad|; the projection uses the whole budget."""
    x0 = torch.full((2, 1, 10, 10), 0.5)
    grad = torch.randn(2, 1, 10, 10)
    with use(backend, "l1_step", x0):
        y = ops.l1_step(x0, x0, grad, 1.0, 0.5, sparsity=0.9)
    moved = (y != x0).flatten(1).sum(1)
    # 100 coordinates: threshold rank round(0.9 * 99) = 89, so ranks 89..99 (11) move,
    # each by (1/11 - tau) with tau = 1/22 after projecting alpha = 1 onto budget 0.5.
    assert (moved == 11).all()
    torch.testing.assert_close((y - x0).flatten(1).abs().sum(1), torch.full((2,), 0.5))


# ------------------------------------------------------------- bad input
def test_errors_name_the_argument():
    x, x0, grad = make((2, 3, 4, 4))
    cases = [
        (lambda: ops.linf_step(x, x0, grad[:1], 0.1, 0.1), "grad"),
        (lambda: ops.linf_step(x, x0[:, :2], grad, 0.1, 0.1), "x0"),
        (lambda: ops.linf_step(x.to(torch.int32), x0, grad, 0.1, 0.1), "x"),
        (lambda: ops.linf_step(x, x0.double(), grad, 0.1, 0.1), "x0"),
        (lambda: ops.linf_step(x, x0.to("meta"), grad, 0.1, 0.1), "x0"),
        (lambda: ops.linf_step(x, x0, grad, 0.1, -0.1), "eps"),
        (lambda: ops.linf_step(x, x0, grad, -0.1, 0.1), "alpha"),
        (lambda: ops.linf_step(x, x0, grad, 0.1, torch.tensor([0.1, 0.2, 0.3])), "eps"),
        (lambda: ops.linf_step(x, x0, grad, 0.1, torch.tensor([0.1, -0.2])), "eps"),
        (lambda: ops.linf_step(x, x0, grad, 0.1, float("nan")), "eps"),
        (lambda: ops.linf_step(x, x0, grad, 0.1, 0.1, clip=(1.0, 0.0)), "clip"),
        (lambda: ops.linf_step(x, torch.where(x0 > 0.5, float("nan"), x0), grad, 0.1, 0.1), "x0"),
        (lambda: ops.linf_step(x, x0 + 2, grad, 0.1, 0.1), "x0"),
        (lambda: ops.l1_step(x, x0, grad, 0.1, 0.1, sparsity=1.0), "sparsity"),
        (lambda: ops.l1_step(x, x0, grad, 0.1, 0.1, sparsity=-0.1), "sparsity"),
        (lambda: ops.project_l2(x, 0.1, clip=(0, 1)), "clip"),
        (lambda: ops.project_l1(x, -1.0), "eps"),
        (lambda: ops.project_l1(x, 1.0, x0=x0[:1], clip=(0, 1)), "x0"),
        (lambda: ops.linf_step(x, x0, grad, 0.1, 0.1, out=torch.empty(3)), "out"),
    ]
    for fn, name in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            fn()
        assert name in str(info.value).split()[0] or f"{name} " in str(info.value), (name, str(info.value))


def test_forced_backend_that_cannot_run_lists_reasons(monkeypatch):
    x, x0, grad = make((2, 3))
    monkeypatch.setenv("FASTADV_BACKEND", "cuda")
    with pytest.raises(fastadv.BackendUnavailable, match="cuda.*linf_step"):
        ops.linf_step(x, x0, grad, 0.1, 0.1)
    monkeypatch.setenv("FASTADV_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTADV_BACKEND"):
        ops.linf_step(x, x0, grad, 0.1, 0.1)
    monkeypatch.delenv("FASTADV_BACKEND")
    with fastadv.use_backend("ref"):
        assert _dispatch.choose("linf_step", [x]) == "ref"


def test_backends_report():
    info = fastadv.backends()
    assert set(info) == {"ref", "cpp", "cuda", "triton"}
    assert info["ref"]["available"]
    if os.environ.get("FASTADV_REQUIRE_EXT") == "1":
        assert info["cpp"]["available"], info["cpp"]


# ------------------------------------------------------------ torch.compile
def _linear_pgd(x0, y, w, steps, alpha, eps):
    """PGD on a linear softmax classifier with its analytic input gradient, so the
    whole K-step loop is one graph: dCE/dx = (softmax(x W) - onehot(y)) W^T."""
    x = x0.clone()
    onehot = torch.nn.functional.one_hot(y, w.shape[1]).to(x.dtype)
    for _ in range(steps):
        logits = x.flatten(1) @ w
        grad = ((logits.softmax(1) - onehot) @ w.t()).reshape(x.shape)
        x = ops.linf_step(x, x0, grad, alpha, eps)
    return x


@pytest.mark.parametrize("backend", ["ref", "cpp"])
def test_compiled_pgd_loop_matches_eager(backend):
    torch._dynamo.reset()
    x0 = torch.rand(8, 1, 6, 6)
    y = torch.randint(0, 5, (8,))
    w = torch.randn(36, 5)
    with use(backend, "linf_step", x0):
        eager = _linear_pgd(x0, y, w, 5, 0.02, 0.05)
        compiled = torch.compile(_linear_pgd, fullgraph=True)(x0, y, w, 5, 0.02, 0.05)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    assert ((compiled - x0).abs().max() <= 0.05 + 1e-7)
