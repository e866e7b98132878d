"""fastadv.ops.sinkhorn: batched entropic OT against POT, finite differences, per-sample stopping."""
import math

import pytest
import torch

import fastadv
from fastadv import ops
from fastadv.reference import ot as R

ot = pytest.importorskip("ot")

CPU_BACKENDS = ["ref", pytest.param("cpp", marks=pytest.mark.skipif(not fastadv.backends()["cpp"]["available"], reason="no C++ extension"))]


def _problem(bsz, n, m, dtype=torch.float64, shared=False, zero_bins=False):
    g = torch.Generator().manual_seed(1000 * n + m)
    a = torch.softmax(2 * torch.randn(bsz, n, generator=g, dtype=torch.float64), 1)
    b = torch.softmax(2 * torch.randn(bsz, m, generator=g, dtype=torch.float64), 1)
    if zero_bins:
        a[0, 1] = 0
        b[-1, 0] = 0
        a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    xs, xt = torch.randn(bsz, n, 2, generator=g, dtype=torch.float64), torch.randn(bsz, m, 2, generator=g, dtype=torch.float64)
    cost = torch.cdist(xs, xt) ** 2
    if shared:
        cost = cost[0]
    return a.to(dtype), b.to(dtype), cost.to(dtype)


def _plan_value(a, b, cost, reg, plan):
    c = cost if cost.dim() == 2 else cost
    kl = (plan * (torch.log(plan.clamp_min(1e-300)) - torch.log((a[:, None] * b[None, :]).clamp_min(1e-300)))).sum()
    return (plan * c).sum() + reg * kl


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape,shared,zero_bins", [((3, 7, 9), False, False), ((4, 13, 5), True, False), ((2, 10, 11), False, True), ((1, 1, 6), False, False)])
@pytest.mark.parametrize("reg", [0.5, 0.05])
def test_matches_pot_every_item(backend, shape, shared, zero_bins, reg):
    a, b, cost = _problem(*shape, shared=shared, zero_bins=zero_bins)
    with fastadv.use_backend(backend):
        value, plan, (f, g), (it, res) = ops.sinkhorn(a, b, cost, reg, max_iter=5000, tol=1e-11, return_plan=True,
                                                      return_potentials=True, return_iterations=True)
    assert (res <= 1e-11).all(), res
    for i in range(shape[0]):
        c = cost if shared else cost[i]
        p_pot = ot.sinkhorn(a[i], b[i], c, reg, method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
        torch.testing.assert_close(plan[i], p_pot, rtol=1e-6, atol=1e-9)
        lin = ot.sinkhorn2(a[i], b[i], c, reg, method="sinkhorn_log", numItermax=20000, stopThr=1e-13)
        torch.testing.assert_close((plan[i] * c).sum(), torch.as_tensor(lin, dtype=torch.float64), rtol=1e-6, atol=1e-9)
        # the returned value is the regularized optimum <P, C> + reg KL(P || a b^T)
        torch.testing.assert_close(value[i], _plan_value(a[i], b[i], c, reg, p_pot), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_approaches_emd_as_reg_shrinks(backend):
    a, b, cost = _problem(3, 8, 10)
    emd = torch.tensor([ot.emd2(a[i], b[i], cost[i]) for i in range(3)], dtype=torch.float64)
    gaps = []
    with fastadv.use_backend(backend):
        for reg in (0.3, 0.1, 0.03, 0.01):
            v = ops.sinkhorn(a, b, cost, reg, max_iter=20000, tol=1e-10)
            gaps.append((v - emd).abs().max().item())
    assert all(g2 < g1 for g1, g2 in zip(gaps, gaps[1:])), gaps
    # reg KL(P || ab) <= reg * min(H(a), H(b)) <= reg * log(8): 0.021 at reg 0.01
    assert gaps[-1] < 0.01 * math.log(8), gaps


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared", [False, True])
def test_gradients_match_finite_differences(backend, shared):
    a, b, cost = _problem(2, 6, 7, shared=shared)
    reg = 0.2
    a.requires_grad_(True)
    b.requires_grad_(True)
    cost.requires_grad_(True)
    w = torch.tensor([1.0, -0.7], dtype=torch.float64)
    with fastadv.use_backend(backend):
        (ops.sinkhorn(a, b, cost, reg, max_iter=20000, tol=1e-13) * w).sum().backward()

        def loss(aa, bb, cc):
            return (ops.sinkhorn(aa, bb, cc, reg, max_iter=20000, tol=1e-13) * w).sum().item()

        g = torch.Generator().manual_seed(3)
        h = 1e-6
        for _ in range(2):
            # a and b live on the simplex: directions with zero sum per sample
            da = torch.randn(a.shape, generator=g, dtype=torch.float64)
            da -= da.mean(1, keepdim=True)
            db = torch.randn(b.shape, generator=g, dtype=torch.float64)
            db -= db.mean(1, keepdim=True)
            dc = torch.randn(cost.shape, generator=g, dtype=torch.float64)
            with torch.no_grad():
                for k, (d, grad) in enumerate(((da, a.grad), (db, b.grad), (dc, cost.grad))):
                    args_p = [a.detach(), b.detach(), cost.detach()]
                    args_m = list(args_p)
                    args_p[k] = args_p[k] + h * d
                    args_m[k] = args_m[k] - h * d
                    fd = (loss(*args_p) - loss(*args_m)) / (2 * h)
                    assert abs(fd - (grad * d).sum().item()) <= 1e-5 * max(1.0, abs(fd)), (k, fd, (grad * d).sum().item())


def test_cpp_matches_reference_float32_and_iterations():
    if not fastadv.backends()["cpp"]["available"]:
        pytest.skip("no C++ extension")
    a, b, cost = _problem(5, 15, 20)
    cost = cost * torch.linspace(0.5, 3, 5, dtype=torch.float64)[:, None, None]  # different difficulty per sample
    out = {}
    for backend in ("ref", "cpp"):
        with fastadv.use_backend(backend):
            out[backend] = ops.sinkhorn(a, b, cost, 0.1, max_iter=3000, tol=1e-8, return_potentials=True, return_iterations=True)
    v_ref, (f_ref, _), (it_ref, _) = out["ref"]
    v_cpp, (f_cpp, _), (it_cpp, _) = out["cpp"]
    assert len(set(it_ref.tolist())) > 1  # samples stop on their own
    assert it_cpp.tolist() == it_ref.tolist()
    torch.testing.assert_close(v_cpp, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_cpp, f_ref, rtol=1e-8, atol=1e-10)
    with fastadv.use_backend("cpp"):
        v32 = ops.sinkhorn(a.float(), b.float(), cost.float(), 0.1, max_iter=3000, tol=1e-5)
    # float32: the plan is formed from potentials in float32 (6e-8 relative each)
    torch.testing.assert_close(v32.double(), v_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_small_reg_and_forbidden_entries_stay_finite(backend):
    a, b, cost = _problem(2, 12, 12)
    cost = cost.clone()
    cost[:, 0, 1:] = math.inf  # bin 0 of a may only go to bin 0 of b
    with fastadv.use_backend(backend):
        v, plan = ops.sinkhorn(a, b, cost, 1e-3, max_iter=200, tol=1e-9, return_plan=True)
    assert torch.isfinite(v).all()
    assert (plan[:, 0, 1:] == 0).all()


def test_validation_names_the_argument():
    a, b, cost = _problem(2, 4, 5)
    with pytest.raises(ValueError, match="^a must be a nonnegative"):
        ops.sinkhorn(a - 0.3, b, cost, 0.1)
    with pytest.raises(ValueError, match="^b must sum to 1"):
        ops.sinkhorn(a, b * 2, cost, 0.1)
    with pytest.raises(ValueError, match="^cost must have shape"):
        ops.sinkhorn(a, b, cost[:, :3], 0.1)
    with pytest.raises(ValueError, match="^reg must be"):
        ops.sinkhorn(a, b, cost, 0.0)
    with pytest.raises(ValueError, match="^cost contains NaN"):
        ops.sinkhorn(a, b, cost.clone().fill_(math.nan), 0.1)
    with pytest.raises(ValueError, match="^max_iter must be"):
        ops.sinkhorn(a, b, cost, 0.1, max_iter=0)
    with pytest.raises(TypeError, match="^b has dtype"):
        ops.sinkhorn(a, b.float(), cost, 0.1)


def test_opcheck_and_compile():
    if not fastadv.backends()["cpp"]["available"]:
        pytest.skip("no C++ extension")
    a, b, cost = _problem(2, 5, 6, dtype=torch.float32)
    torch.library.opcheck(torch.ops.fastadv.sinkhorn, (a, b, cost, 0.1, 100, 1e-6))
    fn = torch.compile(lambda a, b, c: torch.ops.fastadv.sinkhorn(a, b, c, 0.1, 100, 1e-6)[0], fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(a, b, cost), torch.ops.fastadv.sinkhorn(a, b, cost, 0.1, 100, 1e-6)[0])


def test_reference_plan_helper_matches_marginals():
    a, b, cost = _problem(2, 6, 8)
    r = R.sinkhorn(a, b, cost, 0.1, max_iter=5000, tol=1e-12)
    plan = R.sinkhorn_plan(a, b, cost, 0.1, r.f, r.g)
    torch.testing.assert_close(plan.sum(2), a, rtol=0, atol=1e-11)
    torch.testing.assert_close(plan.sum(1), b, rtol=0, atol=1e-11)


triton_interp = pytest.mark.skipif(
    not fastadv.backends()["triton"]["available"], reason="Triton unavailable (needs CUDA or TRITON_INTERPRET=1)"
)


@triton_interp
@pytest.mark.parametrize("shape,shared,zero_bins", [((3, 7, 9), False, False), ((2, 5, 12), True, True), ((1, 1, 3), False, False)])
def test_triton_matches_reference(shape, shared, zero_bins):
    a, b, cost = _problem(*shape, dtype=torch.float32, shared=shared, zero_bins=zero_bins)
    out = {}
    for backend in ("ref", "triton"):
        with fastadv.use_backend(backend):
            out[backend] = ops.sinkhorn(a, b, cost, 0.2, max_iter=300, tol=1e-5, return_potentials=True, return_iterations=True)
    v_ref, (f_ref, g_ref), (it_ref, _) = out["ref"]
    v_tr, (f_tr, g_tr), (it_tr, res_tr) = out["triton"]
    assert (res_tr <= 1e-5).all()  # float32 marginals: 1e-6 is at the rounding level
    # float32 on both sides, same updates: iteration counts may differ by one at the threshold
    assert (it_tr - it_ref).abs().max() <= 1
    torch.testing.assert_close(v_tr, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_tr, f_ref, rtol=1e-4, atol=1e-5)


@triton_interp
def test_triton_large_problem_runs_tiled_kernel():
    # n = 130 > 128: the tiled kernel (default 64 x 64 tiles, a partial row tile) instead of a size error
    a, b, cost = _problem(2, 130, 4, dtype=torch.float32)
    out = {}
    for backend in ("ref", "triton"):
        with fastadv.use_backend(backend):
            out[backend] = ops.sinkhorn(a, b, cost, 0.2, max_iter=30, tol=0.0, return_potentials=True,
                                        return_iterations=True)
    v_ref, (f_ref, _), (it_ref, _) = out["ref"]
    v_tr, (f_tr, _), (it_tr, _) = out["triton"]
    assert it_tr.tolist() == it_ref.tolist() == [30, 30]
    torch.testing.assert_close(v_tr, v_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f_tr, f_ref, rtol=1e-4, atol=1e-5)
