"""The Triton projection kernel (kernels/wasserstein.py, fastadv::triton_wasserstein_project).

Runs under TRITON_INTERPRET=1 on CPU (set by conftest.py), on a GPU when there
is one. The kernel follows the C++ twin (csrc/cpu/wasserstein.cpp) update for
update, in float32 with float64 scalars (psi, constraint moments, mass), so it
is compared with the C++ op on the same float32 inputs and with the float64
reference (fastadv.reference.ot.wasserstein_project), with the same max_iter
and tol on every side.

The interpreter runs ~0.1-0.25 s per iteration per image on these shapes
(this 2-core CPU), so the problems are chosen to stop on their own in < 15
iterations (small reg, tol 1e-3..1e-2; per-sample counts differ, eps = 0 in
one batch), plus one lam = 1000 case cut at max_iter = 6 (nobody converges:
the last iterate is returned).

Tolerances, measured on this CPU: z differs from the C++ op and from the
float64 reference by <= 4e-7 of max|z|, psi by <= 1.4e-7 relative, and the
iteration counts are equal in every case. float32 log-domain potentials of
magnitude up to ~1e2 carry rounding ~1e-5 absolute, i.e. ~1e-5 relative in
exp(); z is a ratio of such sums, so we allow 5e-6 of max|z| (psi: 2e-6
relative). A GPU's exp/log differ from numpy's in the last ulp and may move a
sample across the stopping threshold: counts may then differ by one, and such
a sample is compared at the scale of one update past a residual <= tol.
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton")

import fastadv  # noqa: E402
from triton_lowering import lower_for_sm90  # noqa: E402  (tests/triton_lowering.py)
import fastadv.ot as O  # noqa: E402
from fastadv import _dispatch, ops  # noqa: E402
from fastadv.reference import ot as R  # noqa: E402

pytestmark = pytest.mark.skipif(
    not fastadv.backends()["triton"]["available"], reason="Triton unavailable (needs CUDA or TRITON_INTERPRET=1)"
)
HAS_CPP = fastadv.backends()["cpp"]["available"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
Z_TOL = 5e-6  # of max|z|; measured <= 4e-7 (see module docstring)


def _images(bsz, ch, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(bsz, ch, h, w, generator=g, dtype=torch.float64)
    x0[x0 < 0.3] = 0  # empty pixels, as in MNIST: log x0 = NEG there
    x = (x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, x0


def _compare(got, want, *, zmax, tol, name):
    """got, want: ProjectionResult. Equal-count samples tightly, off-by-one samples at the tol scale."""
    dit = (got.iterations.cpu().long() - want.iterations.cpu().long()).abs()
    assert (dit <= 1).all(), (name, got.iterations, want.iterations)
    same = dit == 0
    gz, wz = got.z.detach().cpu().double(), want.z.detach().cpu().double()
    gp, wp = got.psi.cpu().double(), want.psi.cpu().double()
    if same.any():
        torch.testing.assert_close(gz[same], wz[same], rtol=0, atol=Z_TOL * zmax, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(gp[same], wp[same], rtol=2e-6, atol=1e-7, msg=lambda m: f"{name} psi: {m}")
    if (~same).any():
        torch.testing.assert_close(gz[~same], wz[~same], rtol=0, atol=10 * tol * zmax, msg=lambda m: f"{name}: {m}")


# (shape, kernel_size, reg, tol, per-sample eps); counts measured: [12, 0, 8], [9, 7], [7, 4], [8, 6]
CONVERGING = [
    ((3, 1, 4, 4), 3, 10.0, 1e-3, [0.05, 0.0, 2.0]),
    ((2, 3, 5, 5), 5, 50.0, 1e-2, [0.05, 0.5]),
    ((2, 1, 8, 8), 5, 50.0, 1e-2, [0.5, 2.0]),
    ((2, 3, 4, 4), 3, 10.0, 1e-2, [0.05, 2.0]),
]


@pytest.mark.parametrize("shape,k,reg,tol,eps", CONVERGING, ids=["1x4x4-k3", "3x5x5-k5", "1x8x8-k5", "3x4x4-k3"])
def test_triton_matches_cpp_and_float64_reference(shape, k, reg, tol, eps):
    x, x0 = _images(*shape)
    e = torch.tensor(eps, dtype=torch.float64)
    kw = dict(kernel_size=k, reg=reg, max_iter=30, tol=tol)
    with fastadv.use_backend("triton"):
        tr = O._project_impl(x.float().to(DEV), x0.float().to(DEV), e.float().to(DEV), **kw)
    ref = R.wasserstein_project(x, x0, e, upcast=torch.float64, return_info=True, **kw)
    zmax = ref.z.abs().max().item()
    assert torch.isfinite(tr.z).all() and torch.isfinite(tr.psi).all()  # the launcher poisons z, res, psi with NaN
    pos = e > 0
    it = tr.iterations.cpu()
    assert (it[pos] >= 1).all() and (it[pos] < 30).all(), it  # each sample stopped on its own test
    assert (tr.residual.cpu()[pos] <= tol).all()
    assert len(set(it[pos].tolist())) > 1  # per-sample stopping, not a batch-wide count
    # eps = 0: the ball is {x0}; returned exactly, without iterating
    assert (it[~pos] == 0).all() and (tr.residual.cpu()[~pos] == 0).all() and (tr.psi.cpu()[~pos] == 1).all()
    assert torch.equal(tr.z.cpu()[~pos], x0.float()[~pos])
    _compare(tr, ref, zmax=zmax, tol=tol, name="triton vs float64 reference")
    if HAS_CPP:
        with fastadv.use_backend("cpp"):
            cp = O._project_impl(x.float(), x0.float(), e.float(), **kw)
        _compare(tr, cp, zmax=zmax, tol=tol, name="triton vs cpp")


# the box 0 <= z <= 1 (upper): (shape, kernel_size, reg, tol, eps); measured counts [10, 8] and [15, 9],
# 1-3 pixels capped per sample. Through the launcher (the registered op takes no upper yet).
BOX = [((2, 1, 5, 5), 3, 10.0, 1e-3, [0.05, 0.5]), ((2, 1, 6, 6), 5, 50.0, 1e-2, [0.05, 0.5])]


@pytest.mark.parametrize("shape,k,reg,tol,eps", BOX, ids=["1x5x5-k3", "1x6x6-k5"])
def test_triton_box_matches_cpp_and_float64_reference(shape, k, reg, tol, eps):
    from fastadv.kernels.wasserstein import wasserstein_project_triton

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    x0[x0 < 0.3] = 0
    x0[x0 > 0.8] = 1.0  # saturated pixels, pushed above 1 by x
    x = (x0 + 0.6 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(0, 1.5)
    e = torch.tensor(eps, dtype=torch.float64)
    tr = R.ProjectionResult(*wasserstein_project_triton(x.float().to(DEV), x0.float().to(DEV), e.float().to(DEV), k, 2.0,
                                                        reg, 30, tol, 1.0))
    kw = dict(kernel_size=k, reg=reg, max_iter=30, tol=tol)
    ref = R.wasserstein_project(x, x0, e, upper=1.0, upcast=torch.float64, return_info=True, **kw)
    free = R.wasserstein_project(x, x0, e, upcast=torch.float64, return_info=True, **kw)
    assert ((ref.z >= 1 - 1e-9).flatten(1).sum(1) > 0).all() and (free.z > 1).flatten(1).any(1).all()  # box active
    assert torch.isfinite(tr.z).all() and tr.z.max().item() <= 1.0 and tr.z.min().item() >= 0  # in the box exactly
    assert (tr.residual.cpu() <= tol).all()
    zmax = ref.z.abs().max().item()
    _compare(tr, ref, zmax=zmax, tol=tol, name="triton box vs float64 reference")
    if HAS_CPP:
        with fastadv.use_backend("cpp"):
            cp = O._project_impl(x.float(), x0.float(), e.float(), upper=1.0, **kw)
        _compare(tr, cp, zmax=zmax, tol=tol, name="triton box vs cpp")
    # upper = +inf is the ball projection: the launcher's default
    inf = R.ProjectionResult(*wasserstein_project_triton(x.float().to(DEV), x0.float().to(DEV), e.float().to(DEV), k, 2.0,
                                                         reg, 30, tol))
    _compare(inf, free, zmax=free.z.abs().max().item(), tol=tol, name="triton upper=inf vs reference without box")


def _triton_op_takes_upper() -> bool:
    import inspect

    import fastadv._triton_ot as T

    return "upper" in inspect.signature(T._run_wasserstein_project).parameters


def test_triton_box_through_ops():
    """The public op with upper= on the triton backend (needs fastadv/_triton_ot.py to pass upper through)."""
    if not _triton_op_takes_upper():
        pytest.skip("fastadv/_triton_ot.py does not pass upper to the kernel yet (the launcher does: tested above)")
    x, x0 = _images(2, 1, 5, 5, seed=0)
    x0[x0 > 0.8] = 1.0
    x = (x0 + 0.6 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).clamp(0, 1.5)
    e = torch.tensor([0.05, 0.5])
    kw = dict(kernel_size=3, reg=10.0, max_iter=30, tol=1e-3, upper=1.0)
    with fastadv.use_backend("triton"):
        z, it = ops.wasserstein_project(x.float().to(DEV), x0.float().to(DEV), e.to(DEV), return_iterations=True, **kw)
    ref = R.wasserstein_project(x, x0, e.double(), upcast=torch.float64, return_info=True, **{k: v for k, v in kw.items()})
    assert z.max().item() <= 1.0 and (it.cpu() - ref.iterations).abs().max() <= 1
    torch.testing.assert_close(z.cpu().double(), ref.z, rtol=0, atol=10 * 1e-3 * ref.z.abs().max().item())


def test_triton_not_converged_returns_last_iterate():
    """lam = 1000 (the paper's), cut at max_iter = 6: every sample returns iterate 6, as the reference."""
    x, x0 = _images(2, 3, 5, 7, seed=3)
    e = torch.tensor([0.05, 0.5], dtype=torch.float64)
    kw = dict(kernel_size=5, reg=1000.0, max_iter=6, tol=1e-4)
    with fastadv.use_backend("triton"):
        tr = O._project_impl(x.float().to(DEV), x0.float().to(DEV), e.float().to(DEV), **kw)
    ref = R.wasserstein_project(x, x0, e, upcast=torch.float64, return_info=True, **kw)
    assert tr.iterations.tolist() == [6, 6] and (tr.residual.cpu() > 1e-4).all()
    torch.testing.assert_close(tr.residual.cpu().double(), ref.residual, rtol=1e-5, atol=0)
    _compare(tr, ref, zmax=ref.z.abs().max().item(), tol=1e-4, name="triton vs float64 reference")


@pytest.mark.parametrize("layout", ["channels_last", "bhw_bfloat16_strided"])
def test_triton_layouts_and_dtypes_through_ops(layout):
    """The public op: the result keeps x's layout and dtype; float32 compute either way."""
    if layout == "channels_last":
        x, x0 = _images(2, 3, 4, 4, seed=5)
        x, x0 = x.float().to(memory_format=torch.channels_last), x0.float().to(memory_format=torch.channels_last)
    else:
        x, x0 = _images(2, 1, 6, 12, seed=6)
        x, x0 = x[:, 0, :, ::2].bfloat16(), x0[:, 0, :, ::2].bfloat16()  # (B, H, W), non-contiguous
    eps = torch.tensor([0.05, 2.0])
    kw = dict(kernel_size=3, reg=10.0, max_iter=30, tol=1e-2, return_iterations=True)
    with fastadv.use_backend("triton"):
        z, it = ops.wasserstein_project(x.to(DEV), x0.to(DEV), eps.to(DEV), **kw)
    assert z.dtype == x.dtype and z.shape == x.shape
    if layout == "channels_last":
        assert z.is_contiguous(memory_format=torch.channels_last)
    x4, x04 = x.double().reshape(2, -1, *x.shape[-2:]), x0.double().reshape(2, -1, *x.shape[-2:])
    ref = R.wasserstein_project(x4, x04, eps.double(), kernel_size=3, reg=10.0, max_iter=30, tol=1e-2,
                                upcast=torch.float64, return_info=True)
    assert (it.cpu() - ref.iterations).abs().max() <= 1
    # bfloat16 output: 8 mantissa bits, i.e. 2^-8 relative rounding of each element
    atol = (2**-8 if x.dtype == torch.bfloat16 else Z_TOL) * ref.z.abs().max().item()
    torch.testing.assert_close(z.cpu().double().reshape(ref.z.shape), ref.z, rtol=0, atol=atol)


def test_triton_size_limit_is_reported_when_forced():
    x = torch.rand(1, 1, 65, 65, device=DEV)  # 4225 > 4096 values
    with fastadv.use_backend("triton"), pytest.raises(fastadv.BackendUnavailable, match=r"C\*H\*W <= 4096"):
        ops.wasserstein_project(x, x, 0.1)


def test_opcheck_triton_wasserstein_project():
    """Schema, autograd registration and fake tensors of the registered op (AOT dispatch needs a GPU, as for the Lp ops)."""
    x, x0 = _images(2, 1, 4, 4, seed=7)
    args = (x.float().to(DEV), x0.float().to(DEV), torch.tensor([0.1, 0.0], device=DEV), 3, 2.0, 10.0, 2, 1e-3)
    assert not _dispatch.not_supported_reasons("wasserstein_project", "triton", [args[0]])  # loads fastadv._triton_ot
    if _triton_op_takes_upper():  # the schema with the box's upper (fastadv/_triton_ot.py)
        args = args + (1.0,)
    op = torch.ops.fastadv.triton_wasserstein_project
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if DEV == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, args, test_utils=utils)


_LOWERING = """
Wm = load("wasserstein")
types = ["*fp32", "*fp32", "*fp32", "*fp64", "*fp32", "*i32", "*fp32", "*fp32", "*fp32", "*fp32",
         "i32", "i32", "i32", "fp32", "i32", "fp32", "fp32"]
# the CIFAR shape (3x32x32 -> BLOCK 4096) at k = 5: the largest block, the most registers
lower(Wm._wasserstein_project_kernel, types, dict(K=5, BLOCK=4096), Wm.num_warps_for(4096), report_spills=True)
"""


def test_kernel_lowers_to_ptx_for_sm90(tmp_path):
    """Compile for an H100 (sm_90) without a GPU: the interpreter accepts what the
    compiler rejects (a plain global NEG was one). 10 s here; k = 7 takes 32 s, so only k = 5."""
    out = lower_for_sm90(_LOWERING, tmp_path, expect=1, timeout=300)
    spills = [line.split() for line in out.splitlines() if line.startswith("spills")]
    assert len(spills) == 1
    if int(spills[0][2]) or int(spills[0][3]):
        # ptxas -v (not the PTX, where spills never show): 128 registers and local-memory spills at K = 5,
        # BLOCK 4096, 16 warps, before and after the box. Lowering works; the spill is a known GPU
        # performance defect, reported here until fixed (docs/sinkhorn.md, section 7)
        pytest.xfail(f"known register spill in _wasserstein_project_kernel: {spills[0][2:]} (n_spills, spill stores)")
