"""A small trained model and images for the peer-parity tests (ours vs torchattacks).

Parity between two implementations of an attack means something only where the
attack is neither hopeless nor trivial, so the tests pick a radius at which the
robust accuracy lies between 20% and 80%. An untrained model has no such
radius worth the name; this one is an MLP (784-100-10) trained for 3 epochs
of plain SGD on the embedded MNIST training split (8,000 images), about 2 s on
one core, 93-95% clean accuracy on the held-out split. Trained once per test
process (``functools.lru_cache``) and deterministic (fixed seed, one thread).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fastadv.data import embedded_mnist


@functools.lru_cache(maxsize=None)
def _trained_state(hidden: int = 100, epochs: int = 3, seed: int = 0):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        x, y = embedded_mnist("train")
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], 64):
                idx = perm[i:i + 64]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        return {k: v.clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)


def trained_mnist_mlp(hidden: int = 100) -> nn.Module:
    """A fresh copy (eval mode) of the trained MLP; maps (B, 1, 28, 28) in [0, 1] to (B, 10) logits."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    model.load_state_dict(_trained_state(hidden))
    return model.eval()


def heldout_correct(model: nn.Module, n: int):
    """The first n held-out images the model classifies correctly, and their labels."""
    x, y = embedded_mnist("heldout")
    with torch.no_grad():
        ok = model(x[: 4 * n]).argmax(1) == y[: 4 * n]
    return x[: 4 * n][ok][:n].contiguous(), y[: 4 * n][ok][:n].contiguous()
