"""GPU-only checks that the CPU suite cannot make (run by `fastadv doctor --gpu`; skipped without CUDA).

test_ops.py covers the Lp ops on the GPU when FASTADV_TEST_DEVICE=cuda; this file adds what only a GPU
shows: natively compiled Triton under torch.compile(fullgraph=True), the Sinkhorn and Wasserstein kernels on
CUDA tensors against the reference, and an attack on CUDA against the same attack on CPU.
"""
import pytest
import torch
from torch import nn

import fastadv
import fastadv.attacks
from fastadv import ops

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run by fastadv doctor --gpu)")]


def _data(shape=(7, 3, 13, 11), seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g)
    x = (x0 + 0.05 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    return [t.cuda() for t in (x, x0, grad)]


@pytest.mark.parametrize("op", ["linf_step", "l2_step"])
def test_triton_ops_under_torch_compile_fullgraph(op):
    x, x0, grad = _data()

    def loop(x):
        for _ in range(3):
            x = getattr(ops, op)(x, x0, grad, 0.01, 0.05)
        return x

    with fastadv.use_backend("triton"):
        eager = loop(x)
        compiled = torch.compile(loop, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=2e-5, rtol=2e-5)
    with fastadv.use_backend("ref"):
        want = loop(x)
    torch.testing.assert_close(eager, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_sinkhorn_on_cuda_matches_reference(backend):
    g = torch.Generator().manual_seed(1)
    n, m = 37, 53
    a = torch.rand(4, n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(4, m, generator=g, dtype=torch.float64) + 0.1
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    cost = torch.rand(4, n, m, generator=g, dtype=torch.float64)
    with fastadv.use_backend("ref"):
        want = fastadv.ops.sinkhorn(a.cuda(), b.cuda(), cost.cuda(), 0.05)
    try:
        ctx = fastadv.use_backend(backend)
        with ctx:
            got = fastadv.ops.sinkhorn(a.float().cuda(), b.float().cuda(), cost.float().cuda(), 0.05)
    except fastadv.BackendUnavailable as exc:
        pytest.skip(str(exc))
    w = want[0] if isinstance(want, tuple) else want
    h = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(h.double(), w.double(), atol=1e-4, rtol=1e-3)


def test_pgd_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)).eval()
    x = torch.rand(32, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    cpu = fastadv.attacks.PGD(model, 0.1, 0.02, 10, random_start=False)(x, y)
    gpu = fastadv.attacks.PGD(model.cuda(), 0.1, 0.02, 10, random_start=False)(x.cuda(), y.cuda()).cpu()
    # sign steps: a gradient entry within rounding of 0 may take the other sign on another device; the rest agree
    agree = (cpu - gpu).abs().le(1e-5).float().mean().item()
    assert agree > 0.99, agree
