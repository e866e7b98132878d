"""The small MNIST CNN of Madry et al. 2018 ("Towards Deep Learning Models
Resistant to Adversarial Attacks", the MNIST challenge model).

conv 5x5, 32 -> ReLU -> maxpool 2 -> conv 5x5, 64 -> ReLU -> maxpool 2 ->
fc 1024 -> ReLU -> fc num_classes. Input (B, 1, 28, 28) in [0, 1]; output
logits (B, num_classes). 3.27 M parameters at width 1 (``width`` scales the
channel and hidden sizes, e.g. width=0.25 for fast tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class L2Normalize(nn.Module):
    """h / max(||h||_2, 1e-12) over dim 1 (F.normalize): features on the unit sphere."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=1)


class MnistCNN(nn.Sequential):
    """See the module docstring. ``feature_norm=True`` puts :class:`L2Normalize` between the hidden
    ReLU and the last linear layer, so the classifier (and a feature critic on its input) sees unit-norm
    features: the encoder of AFD's reference code (BashivanLab/afd ``lenetnorm`` / ``resnet18norm``
    normalize their features the same way). Its logits are then bounded by the last layer's row norms."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, input_size: int = 28,
                 feature_norm: bool = False):
        if not isinstance(feature_norm, bool):
            raise ValueError(f"feature_norm must be True or False, got {feature_norm!r}")
        c1, c2, h = max(1, int(32 * width)), max(1, int(64 * width)), max(1, int(1024 * width))
        s = input_size // 4  # two 2x2 pools; 'same' padding keeps the conv sizes
        super().__init__(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * s * s, h),
            nn.ReLU(),
            *([L2Normalize()] if feature_norm else []),
            nn.Linear(h, num_classes),
        )
