"""The small undefended MNIST CNN the Wasserstein attack is measured on (tests/test_wasserstein.py and
benchmarks/wasserstein_strength.py): the paper's architecture, 2 Adam epochs on the first 4000 training
images, seed 0 (89% on the first 64 test digits, 88.7% on the first 256)."""
import torch

from fastadv.data import load_mnist


def undefended_cnn(mnist_root) -> torch.nn.Module:
    torch.manual_seed(0)
    xs, ys = load_mnist(mnist_root, "train", as_float=True)
    xs, ys = xs[:4000], ys[:4000]
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 4, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 4, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(2):
        perm = torch.randperm(4000)
        for i in range(0, 4000, 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def mnist_test_digits(mnist_root, n: int):
    """The first n MNIST test images, float32 (n, 1, 28, 28) in [0, 1], and their labels."""
    x, y = load_mnist(mnist_root, "test", as_float=True)
    return x[:n], y[:n]
