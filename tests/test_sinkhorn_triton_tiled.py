"""Tiled Triton Sinkhorn (n or m > 128 on a GPU), forced on small odd sizes with 16 x 16 tiles.

Under TRITON_INTERPRET=1 (tests/conftest.py) the kernel runs on CPU; the float64
reference is the oracle. float32 kernel vs float64 reference: potentials agree
to ~1e-5 after a few dozen iterations (measured 1.5e-5 max at 300 iterations),
so 1e-4 tolerances; a stop at tol can move by one iteration when the float32
residual lands within rounding of tol, so stopped counts are compared to +-1 and
fixed-iteration runs (tol = 0) exactly.
"""

import pytest
import torch

import fastadv
from triton_lowering import lower_for_sm90  # noqa: E402  (tests/triton_lowering.py)
from fastadv import ops
from fastadv.reference import ot as R

pytestmark = pytest.mark.skipif(
    not fastadv.backends()["triton"]["available"], reason="Triton unavailable (needs CUDA or TRITON_INTERPRET=1)"
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(bsz, n, m, shared=False, zero_bins=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(2 * torch.randn(bsz, n, generator=g, dtype=torch.float64), 1)
    b = torch.softmax(2 * torch.randn(bsz, m, generator=g, dtype=torch.float64), 1)
    if zero_bins:
        a[0, 1] = 0
        b[-1, m - 1] = 0  # the last column sits in a partial tile
        a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost = torch.cdist(torch.randn(bsz, n, 2, generator=g, dtype=torch.float64),
                       torch.randn(bsz, m, 2, generator=g, dtype=torch.float64)) ** 2
    # different difficulty per problem: each stops on its own
    cost = cost * torch.linspace(0.5, 1.5, bsz, dtype=torch.float64)[:, None, None]
    return a, b, (cost[0] if shared else cost)


def _run_tiled(a, b, cost, reg, max_iter, tol):
    from fastadv.kernels import sinkhorn as S

    c3 = (cost if cost.dim() == 3 else cost.unsqueeze(0)).float().contiguous().to(DEV)
    return S.sinkhorn_triton(a.float().to(DEV), b.float().to(DEV), c3, reg, max_iter, tol, tiled=True, block_n=16, block_m=16)


@pytest.mark.parametrize("shared", [False, True])
def test_tiled_fixed_iterations_match_float64_reference(shared):
    # tol = 0: every problem runs exactly max_iter iterations, so the counts must be equal
    a, b, cost = _problem(2, 37, 53, shared=shared, zero_bins=True, seed=1)
    f, g, it, res = _run_tiled(a, b, cost, 0.3, 12, 0.0)
    r = R.sinkhorn(a, b, cost, 0.3, max_iter=12, tol=0.0)
    assert it.cpu().tolist() == r.iterations.tolist() == [12, 12]
    torch.testing.assert_close(f.cpu().double(), r.f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.cpu().double(), r.g, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.cpu().double(), r.residual, rtol=1e-3, atol=1e-6)


def test_tiled_stops_per_problem_like_reference():
    a, b, cost = _problem(3, 19, 33, seed=2)  # 33 = 2 full column tiles + 1
    f, g, it, res = _run_tiled(a, b, cost, 0.5, 200, 1e-4)
    r = R.sinkhorn(a, b, cost, 0.5, max_iter=200, tol=1e-4)
    assert len(set(r.iterations.tolist())) > 1  # the problems stop at different iterations
    assert (it.cpu() - r.iterations).abs().max() <= 1, (it, r.iterations)
    assert (res.cpu() <= 1e-4).all()
    torch.testing.assert_close(f.cpu().double(), r.f, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g.cpu().double(), r.g, rtol=1e-4, atol=1e-4)


def test_tiled_max_iter_zero_returns_zero_potentials():
    a, b, cost = _problem(1, 17, 5, seed=3)
    f, g, it, res = _run_tiled(a, b, cost, 0.5, 0, 1e-4)
    assert it.tolist() == [0] and torch.isinf(res).all()
    assert (f == 0).all() and (g == 0).all()


def test_public_op_dispatches_to_tiled_above_max_bins(monkeypatch):
    """Through ops.sinkhorn with the threshold lowered: value, plan, potentials, counts against the reference."""
    from fastadv.kernels import sinkhorn as S

    monkeypatch.setattr(S, "MAX_BINS", 16)
    monkeypatch.setattr(S, "TILE_N", 16)
    monkeypatch.setattr(S, "TILE_M", 16)
    calls = []
    real_launch = S.sinkhorn_triton

    def spy(a, b, *args, **kwargs):
        calls.append(max(a.shape[1], b.shape[1]) > S.MAX_BINS)  # tiled=None picks the tiled kernel
        return real_launch(a, b, *args, **kwargs)

    monkeypatch.setattr(S, "sinkhorn_triton", spy)
    a, b, cost = _problem(2, 21, 18, shared=True, seed=4)
    out = {}
    for backend in ("ref", "triton"):
        with fastadv.use_backend(backend):
            out[backend] = ops.sinkhorn(a.float().to(DEV), b.float().to(DEV), cost.float().to(DEV), 0.4, max_iter=10, tol=0.0,
                                        return_plan=True, return_potentials=True, return_iterations=True)
    assert calls == [True], "the triton backend did not reach the tiled kernel"
    v_ref, p_ref, (f_ref, g_ref), (it_ref, _) = out["ref"]
    v_tr, p_tr, (f_tr, g_tr), (it_tr, _) = out["triton"]
    assert it_tr.tolist() == it_ref.tolist() == [10, 10]
    torch.testing.assert_close(v_tr, v_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_tr, p_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f_tr, f_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(g_tr, g_ref, rtol=1e-4, atol=1e-4)


_LOWERING = """
S = load("sinkhorn")
types = ["*fp32"] * 8 + ["*i32", "*fp32", "i32", "i32", "i32", "fp32", "i32", "fp32"]
ptx = lower(S._sinkhorn_tiled_kernel, types, dict(BLOCK_N=S.TILE_N, BLOCK_M=S.TILE_M), 4)
assert "bar.sync" in ptx or "barrier" in ptx, "no CTA barrier between passes"
"""


def test_tiled_kernel_lowers_to_ptx_for_sm90(tmp_path):
    """Compile for an H100 (sm_90) without a GPU (the interpreter accepts what the compiler rejects)."""
    lower_for_sm90(_LOWERING, tmp_path, expect=1, timeout=300)
