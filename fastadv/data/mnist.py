"""MNIST from the four standard gzipped IDX files (LeCun, Cortes & Burges).

File format (big-endian), as published at yann.lecun.com/exdb/mnist:

* images: magic 2051 (0x00000803), int32 count N, int32 rows 28, int32 cols 28,
  then N*28*28 uint8 pixels (0 = background, 255 = ink), row major;
* labels: magic 2049 (0x00000801), int32 count N, then N uint8 labels in 0-9.

Plain (unzipped) files are read too: a name without ``.gz`` is tried when the
``.gz`` is absent, which covers torchvision's ``MNIST/raw`` folder after it
unpacks. Every check (magic, header, byte count, label range, image and label
counts agreeing) raises :class:`DatasetError` naming the file.
"""
from __future__ import annotations

import gzip
import os
import pathlib
import struct
import zlib

import numpy as np
import torch

__all__ = ["load_mnist", "read_idx", "DatasetError", "MNIST_FILES", "MNIST_MEAN", "MNIST_STD"]

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Pixel statistics of the training set in [0, 1]; models normalise themselves
# (fastadv keeps attack inputs in [0, 1]), so these are for users who want them.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


class DatasetError(RuntimeError):
    """A dataset file is missing, truncated or not in the expected format."""


def _open_bytes(path: pathlib.Path) -> bytes:
    candidates = [path]
    if path.suffix == ".gz":
        candidates.append(path.with_suffix(""))  # torchvision's unpacked copy
    for p in candidates:
        if p.is_file():
            try:
                if p.suffix == ".gz":
                    with gzip.open(p, "rb") as f:
                        return f.read()
                return p.read_bytes()
            except (OSError, EOFError, zlib.error) as exc:
                raise DatasetError(f"{p}: cannot decompress/read ({exc}); the file is corrupt or truncated") from exc
    raise DatasetError(
        f"{path}: file not found (looked for {', '.join(str(c.name) for c in candidates)} in {path.parent}). "
        "MNIST needs the four IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) in one folder"
    )


def read_idx(path, expect_magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or plain) into a uint8 numpy array of the header's shape."""
    path = pathlib.Path(path)
    data = _open_bytes(path)
    if len(data) < 8:
        raise DatasetError(f"{path}: {len(data)} bytes, too short for an IDX header")
    magic, n = struct.unpack(">ii", data[:8])
    if magic != expect_magic:
        kind = "image" if expect_magic == _IMAGE_MAGIC else "label"
        raise DatasetError(f"{path}: IDX magic number {magic}, expected {expect_magic} for an MNIST {kind} file")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header")
    dims = struct.unpack(">" + "i" * ndim, data[4:header])
    if any(d < 0 for d in dims):
        raise DatasetError(f"{path}: negative dimension in header {dims}")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: {len(data)} bytes after decompression, header {dims} needs {expected}; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_mnist(root, split: str = "train", *, as_float: bool = False):
    """Load MNIST's ``split`` ('train': 60000 images, 'test': 10000) from ``root``.

    Args:
        root: folder holding the IDX files (``.gz`` or unpacked).
        split: 'train' or 'test'.
        as_float: False gives images as uint8 (N, 28, 28) in 0-255; True gives
            float32 (N, 1, 28, 28) in [0, 1] (x / 255).
    Returns:
        (images, labels): labels int64 (N,) in 0-9.
    Raises:
        DatasetError: missing or corrupt file, wrong magic, wrong size, a label
            outside 0-9, or image and label counts that disagree.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = pathlib.Path(os.fspath(root)).expanduser()
    if not root.is_dir():
        raise DatasetError(f"MNIST root {root} is not a directory")
    img_name, lbl_name = MNIST_FILES[split]
    images = read_idx(root / img_name, _IMAGE_MAGIC)
    labels = read_idx(root / lbl_name, _LABEL_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{root / img_name}: images of shape {images.shape[1:]}, expected (28, 28)")
    if labels.ndim != 1:
        raise DatasetError(f"{root / lbl_name}: labels must be 1-D, got shape {labels.shape}")
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{root}: {images.shape[0]} images in {img_name} but {labels.shape[0]} labels in {lbl_name}"
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{root / lbl_name}: label {int(labels.max())} outside 0-9; the file is corrupt")
    x = torch.from_numpy(images.copy())
    y = torch.from_numpy(labels.astype(np.int64))
    if as_float:
        x = x.unsqueeze(1).to(torch.float32).div_(255.0)
    return x, y
