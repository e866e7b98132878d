"""The elementwise Lp kernels' 2-D (sample group, chunk) grid (kernels/_lp_common.py elem_launch/elem_grids).

``linf_step`` and ``project_linf`` used to find each element's sample as
``offs // N`` (an int64 division per element). They now run one program per
(group of ROWS samples, BLOCK-element chunk of a sample): alpha/eps are loaded
once per sample, and nothing divides. Checked here, under TRITON_INTERPRET=1 on CPU:

* the results equal the pure-PyTorch reference bit for bit (the ops are
  elementwise in the reference's order of operations; in bfloat16 the kernel
  computes in float32 and rounds once, so it equals the float32 reference
  rounded to bfloat16, see ``_want``), on odd shapes, B = 1, several chunks per sample with
  a partial last chunk, several samples per program with a partial last
  group, a sample split over several launches (more chunks than the grid's
  axis 1 allows, scaled down), per-sample and scalar eps, contiguous and
  channels_last, outputs poisoned with NaN so an unwritten element fails;
* statically, that no Triton function in the Lp kernels uses ``//`` or ``%``
  (Python AST); tests/test_triton_lp.py::test_kernels_lower_to_ptx_for_sm90
  also checks the compiled TTIR for integer divisions on tensors.
"""
from __future__ import annotations

import ast
import pathlib
import textwrap

import pytest
import torch

pytest.importorskip("triton")

import fastadv  # noqa: E402
from fastadv import _dispatch, ops  # noqa: E402
from fastadv.kernels import _lp_common as C  # noqa: E402
from fastadv.reference import lp as ref  # noqa: E402
from triton_lowering import tensor_int_divisions  # noqa: E402  (tests/triton_lowering.py)

KERNEL_DIR = pathlib.Path(C.__file__).parent
LP_SOURCES = ("_lp_common.py", "lp_steps.py", "lp_project.py")


def _need_triton(op):
    reasons = _dispatch.not_supported_reasons(op, "triton", [torch.empty(1)])
    if reasons:
        pytest.skip("; ".join(reasons))


def _tile(monkeypatch, tile, grid_y_max=None):
    """Shrink the elementwise tile (and the axis-1 grid limit) so small shapes take every path."""
    monkeypatch.setattr(C, "ELEM_TILE_INTERPRET", tile)
    monkeypatch.setattr(C, "ELEM_TILE", tile)
    if grid_y_max is not None:
        monkeypatch.setattr(C, "GRID_Y_MAX", grid_y_max)


def _inputs(shape, dtype, layout, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    x = (x0 + 0.1 * (2 * torch.rand(shape, generator=g, dtype=torch.float64) - 1)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::11] = 0.0  # sign 0: no move
    out = [t.to(dtype) for t in (x, x0, grad)]
    if layout == "channels_last":
        out = [t.contiguous(memory_format=torch.channels_last) for t in out]
    b = shape[0]
    eps = 0.02 + 0.1 * torch.rand(b, generator=g)  # per sample, all different
    alpha = 0.01 + 0.05 * torch.rand(b, generator=g)
    return out, eps, alpha


def _want(fn, dtype, *args, **kw):
    """The reference in float32, rounded once to ``dtype`` (what a float32-math kernel returns).

    Seen with triton 3.9: the interpreter casts float32 to bfloat16 by truncation (its cast_impl passes no
    rounding mode), where compiled code rounds to nearest even (cvt.rn.bf16.f32); float16 rounds to nearest
    in both. So under the interpreter the expected bfloat16 result is the truncated one.
    """
    w = fn(*args, upcast=torch.float32, **kw)
    if dtype == torch.bfloat16 and C._interpreted():
        w = (w.view(torch.int32) & -65536).view(torch.float32)
    return w.to(dtype)


def _same(got, want, layout):
    assert got.dtype == want.dtype
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.contiguous(), want.contiguous()), (got - want).abs().max()


# (shape, tile, grid_y_max) -> the path it takes with elem_launch(b, n):
CASES = [
    ((3, 3, 7, 5), None, None),  # default tile: one 128-lane chunk a sample, 3 samples in one program
    ((1, 3, 7, 5), None, None),  # B = 1
    ((3, 3, 7, 5), 32, None),  # 105 = 3 x 32 + 9: four chunks a sample, the last one partial
    ((5, 1, 1, 3), 32, None),  # 3 elements: BLOCK 16, ROWS 2, the third program half empty
    ((2, 3, 7, 5), 32, 3),  # four chunks, at most 3 on axis 1: two launches (chunk0 = 0, 3)
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,tile,gy", CASES)
def test_linf_step_matches_reference(monkeypatch, shape, tile, gy, dtype, layout):
    _need_triton("linf_step")
    if tile is not None:
        _tile(monkeypatch, tile, gy)
    (x, x0, grad), eps, alpha = _inputs(shape, dtype, layout, seed=sum(shape))
    with fastadv.use_backend("triton"):
        got = ops.linf_step(x, x0, grad, alpha, eps, clip=(0.0, 1.0), out=torch.full_like(x, float("nan")))
        got_scalar = ops.linf_step(x, x0, grad, 0.03, 0.05, clip=None)
    _same(got, _want(ref.linf_step, dtype, x, x0, grad, alpha, eps, (0.0, 1.0)), layout)
    _same(got_scalar, _want(ref.linf_step, dtype, x, x0, grad, 0.03, 0.05, None), layout)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,tile,gy", CASES)
def test_project_linf_matches_reference(monkeypatch, shape, tile, gy, dtype, layout):
    _need_triton("project_linf")
    if tile is not None:
        _tile(monkeypatch, tile, gy)
    (_, x0, delta), eps, _ = _inputs(shape, dtype, layout, seed=sum(shape) + 1)
    with fastadv.use_backend("triton"):
        boxed = ops.project_linf(delta, eps, x0=x0, clip=(0.0, 1.0), out=torch.full_like(delta, float("nan")))
        plain = ops.project_linf(delta, 0.5, out=torch.full_like(delta, float("nan")))
    _same(boxed, _want(ref.project_linf, dtype, delta, eps, x0=x0, clip=(0.0, 1.0)), layout)
    _same(plain, _want(ref.project_linf, dtype, delta, 0.5), layout)


def test_elementwise_launch_settings(monkeypatch):
    """elem_launch: a sample is one chunk up to the tile, several chunks beyond; tiny samples share a
    program (never more rows than the batch needs). elem_grids: the launches cover every chunk once."""
    monkeypatch.setattr(C, "_interpreted", lambda: False)  # the GPU tile, 1024
    assert C.elem_launch(4, 3072) == (1, 1024, 4)  # CIFAR: three chunks a sample
    assert C.elem_launch(4, 150528) == (1, 1024, 4)
    assert C.elem_launch(4, 105) == (4, 128, 2)  # 4 samples of 105 in one 512-lane program
    assert C.elem_launch(1000, 1) == (64, 16, 4)
    assert C.elem_launch(1, 1) == (1, 16, 1)
    assert C.elem_grids(512, 150528, 1, 1024) == [((512, 147), 0)]
    assert C.elem_grids(5, 3, 2, 16) == [((3, 1), 0)]
    # 3x8192x8192 = 201M elements a sample: 196608 chunks of 1024 > 65535, so three launches
    grids = C.elem_grids(2, 3 * 8192 * 8192, 1, 1024)
    assert [g for g, _ in grids] == [(2, 65535)] * 3 + [(2, 3)]
    assert [c0 for _, c0 in grids] == [0, 65535, 131070, 196605]
    with pytest.raises(ValueError, match="int64 offsets within the sample"):
        C.elem_grids(1, 2**31, 1, 1024)


# ------------------------------------------------------------------ no division on offsets
def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(
            "jit" in ast.unparse(d) for d in node.decorator_list
        ):
            yield node


def _divisions(fn: ast.FunctionDef) -> list[str]:
    found = []
    for node in ast.walk(fn):
        op = getattr(node, "op", None)
        if isinstance(node, (ast.BinOp, ast.AugAssign)) and isinstance(op, (ast.FloorDiv, ast.Mod)):
            found.append(f"{fn.name}:{node.lineno}: {ast.unparse(node)}")
    return found


# The 1-D kernel this grid replaced; the check must find its division.
_OLD_KERNEL = textwrap.dedent('''
    @triton.jit
    def _linf_step_kernel(x_ptr, alpha_ptr, N, total, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        row = offs // N
        a = tl.load(alpha_ptr + row, mask=offs < total)
''')


def test_no_floor_division_or_modulo_in_lp_kernels():
    """No @triton.jit function in the Lp kernels divides with // or %: offsets come from the grid."""
    assert _divisions(next(_jit_functions(ast.parse(_OLD_KERNEL)))) == ["_linf_step_kernel:6: offs // N"]
    found, names = [], []
    for name in LP_SOURCES:
        for fn in _jit_functions(ast.parse((KERNEL_DIR / name).read_text())):
            names.append(fn.name)
            found += _divisions(fn)
    assert {"_linf_step_kernel", "_project_linf_kernel", "_elem_tile", "_l1_step_kernel"} <= set(names)
    assert found == []


def test_ttir_division_finder():
    """tensor_int_divisions flags integer division on tensors (the line below is the old linf kernel's
    TTIR, lowered for sm_90) and lets scalar and float divisions pass."""
    ttir = textwrap.dedent("""
        %row_9 = arith.divsi %offs_6, %row_8 : tensor<1024xi64> loc(#loc48)
        %r = arith.remui %a, %b : tensor<16x32xi32>
        %q = arith.divsi %n, %c16 : i32
        %f = arith.divf %x, %y : tensor<1024xf32>
    """)
    assert [ln.split(" = ")[0] for ln in tensor_int_divisions(ttir)] == ["%row_9", "%r"]
