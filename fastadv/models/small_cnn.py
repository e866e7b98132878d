"""SmallCNN: the MNIST model of TRADES (Zhang et al., ICML 2019, "Theoretically Principled Trade-off between
Robustness and Accuracy"; yaodongyu/TRADES models/small_cnn.py), used for the paper's MNIST row (beta 6:
99.48% clean, 96.07% under PGD-40 at eps 0.3).

conv 3x3, 32 -> ReLU -> conv 3x3, 32 -> ReLU -> maxpool 2 -> conv 3x3, 64 -> ReLU -> conv 3x3, 64 -> ReLU ->
maxpool 2 -> fc 1024 -> 200 -> ReLU -> dropout 0.5 -> fc 200 -> ReLU -> fc 10 (no padding: 28 -> 26 -> 24 ->
12 -> 10 -> 8 -> 4). Input (B, 1, 28, 28) in [0, 1]; output logits (B, num_classes); 0.31 M parameters.
Initialization as the reference: Kaiming-normal conv weights, zero conv biases, a zero last layer (so every
logit is 0 at the start); the linear layers otherwise keep PyTorch's default. Dropout is active in train mode
only, so attacks run with the model in eval mode see none (TRADES' attack does).
"""
from __future__ import annotations

import collections

import torch
from torch import nn


class SmallCNN(nn.Module):
    """See the module docstring. The submodule names are the reference's (``feature_extractor.conv1`` ...
    ``classifier.fc3``), so its released state_dicts load as they are."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, drop: float = 0.5):
        super().__init__()
        if not 0 <= drop < 1:
            raise ValueError(f"drop must be in [0, 1), got {drop!r}")
        self.feature_extractor = nn.Sequential(collections.OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3)), ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3)), ("relu2", nn.ReLU()),
            ("maxpool1", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Conv2d(32, 64, 3)), ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3)), ("relu4", nn.ReLU()),
            ("maxpool2", nn.MaxPool2d(2, 2)),
        ]))
        self.classifier = nn.Sequential(collections.OrderedDict([
            ("fc1", nn.Linear(64 * 4 * 4, 200)), ("relu1", nn.ReLU()), ("drop", nn.Dropout(drop)),
            ("fc2", nn.Linear(200, 200)), ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(200, num_classes)),
        ]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.classifier.fc3.weight)
        nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feature_extractor(x).flatten(1))
