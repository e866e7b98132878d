"""Input normalization as part of the model, so attacks work on images in [0, 1].

Attacks (and ``fastadv.evaluate``) perturb pixels in [0, 1] and measure eps
there. A network trained on standardized inputs ((x - mean) / std) must carry
that standardization inside its forward pass; ``NormalizedModel`` does that
explicitly instead of asking every attack to know about it.

Example::

    net = NormalizedModel(PreActResNet18(), mean=CIFAR10_MEAN, std=CIFAR10_STD)
    x_adv = PGD(net, eps=8/255, alpha=2/255, steps=10)(x, y)   # x in [0, 1]
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalize(nn.Module):
    """y = (x - mean) / std per channel (dimension 1). x: (B, C, ...) in [0, 1]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean and std must have the same length, got {mean_t.numel()} and {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be > 0, got {std_t.tolist()}")
        # Buffers: they follow .to(device) and are saved in the state dict.
        self.register_buffer("mean", mean_t.reshape(1, -1, 1, 1))
        self.register_buffer("std", std_t.reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"x must be (B, {self.mean.shape[1]}, ...), got shape {tuple(x.shape)}")
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return (x - self.mean.reshape(shape).to(x.dtype)) / self.std.reshape(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedModel(nn.Module):
    """``model(Normalize(mean, std)(x))``: a model that takes images in [0, 1].

    ``.model`` is the wrapped network; the state dict nests it under ``model.``.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))
