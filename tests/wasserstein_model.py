"""The small undefended MNIST CNN the Wasserstein attack is measured on (tests/test_wasserstein.py and
benchmarks/wasserstein_strength.py): the paper's architecture, 2 Adam epochs on the first 4000 training
images, seed 0 (89% on the first 64 test digits, 88.7% on the first 256)."""
import torch

from fastadv.data import load_mnist


def paper_mnist_cnn() -> torch.nn.Module:
    """The paper's MNIST CNN (locuslab/projected_sinkhorn attack_mnist.py / adv_training_mnist.py ``net``),
    freshly initialized from the global RNG."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 4, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 4, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10),
    )


def undefended_cnn(mnist_root, n_train: int = 4000, epochs: int = 2) -> torch.nn.Module:
    """The paper's MNIST architecture (locuslab/projected_sinkhorn attack_mnist.py), Adam 1e-3, batch 128,
    seed 0, on the first ``n_train`` training images for ``epochs`` epochs. The defaults are the small test
    model (88.7% on the first 256 test digits); ``n_train=60000, epochs=3`` trains it as an undefended
    model is trained (98.3% on the 10,000 test digits, ~20 s on one core of this CPU)."""
    torch.manual_seed(0)
    xs, ys = load_mnist(mnist_root, "train", as_float=True)
    xs, ys = xs[:n_train], ys[:n_train]
    n = xs.shape[0]
    model = paper_mnist_cnn()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(epochs):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
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


def cifar_subset_cnn(npz_path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A small undefended CNN on the CIFAR-10 subset (``../shared/data/cifar10-subset``, 4660 training
    images): two conv blocks and a linear head, 8 Adam epochs, seed 0. Returns (model, x_test, y_test),
    x float32 (932, 3, 32, 32) in [0, 1]. Far weaker than the paper's ResNet-18 (about 50% clean)."""
    import numpy as np

    d = np.load(npz_path)
    xs = torch.tensor(d["x_train"], dtype=torch.float32).permute(0, 3, 1, 2) / 255
    ys = torch.tensor(d["y_train"], dtype=torch.int64)
    xt = torch.tensor(d["x_test"], dtype=torch.float32).permute(0, 3, 1, 2) / 255
    yt = torch.tensor(d["y_test"], dtype=torch.int64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
    )
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    n = xs.shape[0]
    for _ in range(8):
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), xt, yt
