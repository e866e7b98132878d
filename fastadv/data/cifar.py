"""CIFAR-10 from the standard python release, ``cifar-10-batches-py``
(Krizhevsky 2009, "Learning Multiple Layers of Features from Tiny Images").

The release holds six pickles: ``data_batch_1`` .. ``data_batch_5`` (10,000
images each, the training set) and ``test_batch`` (10,000), plus
``batches.meta`` (class names). Each batch is a dict with ``b'data'``: uint8
(N, 3072), one row per image, 1024 red then 1024 green then 1024 blue values,
each plane row major 32x32; and ``b'labels'``: N ints in 0-9.

The pickles are read with a restricted unpickler that only rebuilds dicts,
lists, bytes, numbers and numpy arrays, so a tampered file cannot run code.
"""
from __future__ import annotations

import io
import os
import pathlib
import pickle

import numpy as np
import torch

from fastadv.data.mnist import DatasetError

__all__ = ["load_cifar10", "CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "TRAIN_FILES", "TEST_FILES"]

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)

# What a numpy array pickle needs (numpy 1 names and numpy 2's numpy._core).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only plain data and numpy arrays are allowed)")


def _read_batch(path: pathlib.Path):
    if not path.is_file():
        raise DatasetError(
            f"{path}: file not found. CIFAR-10 needs the folder cifar-10-batches-py with data_batch_1..5 "
            "and test_batch (the python version of the release)"
        )
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(io.BufferedReader(f), encoding="bytes").load()
    except Exception as exc:  # truncated files raise EOFError, garbage UnpicklingError, ...
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(d).__name__}")
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DatasetError(f"{path}: missing key 'data' or 'labels' (keys: {sorted(d)})")
    data = np.asarray(d["data"])
    labels = np.asarray(d["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path}: labels span [{labels.min()}, {labels.max()}], expected 0-9")
    return data, labels.astype(np.int64)


def load_cifar10(root, split: str = "train", *, as_float: bool = True):
    """Load CIFAR-10's ``split`` ('train': 50,000 images; 'test': 10,000).

    Args:
        root: the ``cifar-10-batches-py`` folder, or a folder containing it.
        as_float: True gives float32 (N, 3, 32, 32) in [0, 1]; False uint8 (N, 3, 32, 32).
    Returns:
        (images, labels int64 (N,) in 0-9).
    Raises:
        DatasetError naming the file that is missing or corrupt.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = pathlib.Path(os.fspath(root)).expanduser()
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 root {root} is not a directory")
    parts = [_read_batch(root / f) for f in (TRAIN_FILES if split == "train" else TEST_FILES)]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    if as_float:
        x = x.to(torch.float32).div_(255.0)
    return x, torch.from_numpy(labels)
