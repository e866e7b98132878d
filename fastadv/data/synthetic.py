"""Synthetic data of any shape, for throughput runs and tests that need no files.

Images are uniform in [0, 1] and labels uniform over the classes, drawn from a
generator seeded per index, so item i is the same in every worker, process and
epoch (a DistributedSampler split sees consistent data) and nothing is stored.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["SyntheticDataset", "synthetic_batch"]


class SyntheticDataset(torch.utils.data.Dataset):
    """``length`` items of ``(image float32 shape, label int64)``.

    Args:
        length: number of items (>= 1).
        shape: image shape, e.g. (3, 224, 224).
        num_classes: labels in [0, num_classes).
        seed: base seed; item i uses seed + i.
    """

    def __init__(self, length: int, shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, seed: int = 0):
        if int(length) < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not shape or any(int(s) < 1 for s in shape):
            raise ValueError(f"shape must be a non-empty sequence of positive ints, got {shape!r}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.length, self.shape, self.num_classes, self.seed = int(length), tuple(int(s) for s in shape), int(num_classes), int(seed)

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        g = torch.Generator().manual_seed(self.seed + (i % self.length))
        x = torch.rand(self.shape, generator=g)
        y = torch.randint(self.num_classes, (), generator=g)
        return x, y


def synthetic_batch(batch_size: int, shape: Sequence[int] = (3, 32, 32), num_classes: int = 10, *,
                    device="cpu", dtype=torch.float32, seed: int = 0, channels_last: bool = False):
    """One batch made directly on ``device`` (no host copy): x (B, *shape) in [0, 1], y (B,) int64."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.rand((int(batch_size), *shape), generator=g, device=device, dtype=dtype)
    y = torch.randint(int(num_classes), (int(batch_size),), generator=g, device=device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y
