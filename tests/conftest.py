"""Test setup. Runs before any fastadv or triton import.

Without a CUDA device the Triton kernels run under the interpreter, so CI
executes them on CPU tensors. TRITON_INTERPRET is read when @triton.jit
decorates, so it must be set here, before the kernels are imported.
"""
import os
import pathlib

import pytest


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Real datasets live beside the checkout (../shared/data); a user's clone has
# none, so tests that need them skip with this reason.
DATA_DIR = pathlib.Path(os.environ.get("FASTADV_TEST_DATA", pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
    d = DATA_DIR / "mnist"
    if not (d / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST not found under {d} (set FASTADV_TEST_DATA to the folder holding mnist/)")
    return d


@pytest.fixture(scope="session")
def cifar_subset() -> pathlib.Path:
    f = DATA_DIR / "cifar10-subset" / "cifar10_subset.npz"
    if not f.exists():
        pytest.skip(f"CIFAR-10 subset not found at {f} (set FASTADV_TEST_DATA to the folder holding cifar10-subset/)")
    return f


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for model-heavy test modules (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    On this shared 2-core machine at load ~12, ten forward/backward passes of the
    small MNIST CNN took 13.4 s with 2 OpenMP threads and 0.9 s with 1 (measured):
    a thread that loses its core stalls every parallel op.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_mnist():
    """An MLP on 10 x 10 MNIST (3 x 3 average pooling), 3 epochs on 2500 digits: 73% clean on 64 others (0.2 s).
    Module scope: each test module that uses it gets its own, trained from seed 0 (tests/test_iwd.py,
    tests/test_robustify.py)."""
    import torch
    import torch.nn.functional as F

    from fastadv.data import embedded_mnist

    torch.manual_seed(0)
    xs, ys = embedded_mnist("all")
    xs = F.avg_pool2d(xs[:3000], kernel_size=3, stride=3, padding=1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(3):
        perm = torch.randperm(2500)
        for i in range(0, 2500, 100):
            idx = perm[i:i + 100]
            loss = F.cross_entropy(model(xs[idx]), ys[:2500][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), xs[2500:2564], ys[2500:2564]
