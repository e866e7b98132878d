"""Dataset readers: MNIST (IDX), CIFAR-10 (python pickles), ImageNet-style JPEG
folders, synthetic data, and the embedded MNIST default.

Every reader validates what it reads and raises :class:`DatasetError` naming
the missing or corrupt file. Images come out in [0, 1]; normalisation belongs
to the model (see CONVENTIONS.md, Attack API).
"""
from __future__ import annotations

from fastadv.data.mnist import MNIST_MEAN, MNIST_STD, DatasetError, load_mnist, read_idx

__all__ = [
    "DatasetError",
    "load_mnist",
    "read_idx",
    "embedded_mnist",
    "load_cifar10",
    "ImageFolder",
    "SyntheticDataset",
    "synthetic_batch",
    "MNIST_MEAN",
    "MNIST_STD",
    "EMBEDDED_DIR",
]

import pathlib

import torch

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "embedded"


def embedded_mnist(split: str = "train", *, as_float: bool = True):
    """The MNIST test set shipped with fastadv, split deterministically.

    ``split='train'``: the 8,000 images with index % 5 != 0; ``'heldout'``
    (alias ``'test'``): the 2,000 with index % 5 == 0; ``'all'``: all 10,000.
    Returns (images, labels) as in :func:`load_mnist` (float (N, 1, 28, 28)
    in [0, 1] by default, labels int64).
    """
    x, y = load_mnist(EMBEDDED_DIR, "test", as_float=as_float)
    idx = torch.arange(x.shape[0])
    if split == "all":
        return x, y
    if split == "train":
        keep = idx % 5 != 0
    elif split in ("heldout", "test", "val"):
        keep = idx % 5 == 0
    else:
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    return x[keep].contiguous(), y[keep].contiguous()


def __getattr__(name):  # lazy: PIL and pickle readers load only when used
    if name == "load_cifar10":
        from fastadv.data.cifar import load_cifar10

        return load_cifar10
    if name == "ImageFolder":
        from fastadv.data.imagefolder import ImageFolder

        return ImageFolder
    if name in ("SyntheticDataset", "synthetic_batch"):
        from fastadv.data import synthetic as _s

        return getattr(_s, name)
    raise AttributeError(f"module 'fastadv.data' has no attribute {name!r}")
