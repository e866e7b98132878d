"""Model definitions for adversarial robustness work (no torchvision dependency).

All models take images and return logits (B, num_classes). Models trained on
standardized inputs are wrapped in ``NormalizedModel`` so attacks see [0, 1].

``get_model(name, num_classes=10, ...)`` builds one by name:

=================  ==============================  ===========  =========
name               model                           input        params
=================  ==============================  ===========  =========
mnist_cnn          Madry et al. 2018 MNIST CNN     1x28x28      3.27 M
small_cnn          TRADES' MNIST SmallCNN          1x28x28      0.31 M
preact_resnet18    PreAct-ResNet-18                3x32x32      11.2 M
wrn34_10           WideResNet-34-10                3x32x32      46.2 M
resnet50           ResNet-50 (v1.5)                3x224x224    25.6 M
=================  ==============================  ===========  =========

``Ensemble(members, combine='logits' | 'probs', weights=None)`` combines
classifiers into one model (fastadv.models.ensemble).

Example::

    from fastadv.models import get_model
    net = get_model("preact_resnet18", num_classes=10, normalize="cifar10")
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from fastadv.models.ensemble import Ensemble
from fastadv.models.mnist_cnn import MnistCNN
from fastadv.models.normalize import (CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, Normalize,
                                      NormalizedModel)
from fastadv.models.preact_resnet import PreActResNet, PreActResNet18
from fastadv.models.resnet import ResNet, ResNet50
from fastadv.models.small_cnn import SmallCNN
from fastadv.models.wide_resnet import WideResNet, WideResNet34_10

MODELS = {
    "mnist_cnn": MnistCNN,
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
    "wrn34_10": WideResNet34_10,
    "resnet50": ResNet50,
}
# Named (mean, std) pairs for ``normalize=``.
NORMALIZATIONS = {"cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
# The input shape each model is meant for (C, H, W).
INPUT_SHAPES = {"mnist_cnn": (1, 28, 28), "small_cnn": (1, 28, 28), "preact_resnet18": (3, 32, 32), "wrn34_10": (3, 32, 32),
                "resnet50": (3, 224, 224)}


def get_model(name: str, num_classes: int = 10, *, normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
              **kwargs) -> nn.Module:
    """Build model ``name`` (see ``MODELS``) with ``num_classes`` outputs.

    Args:
        name: 'mnist_cnn' | 'small_cnn' | 'preact_resnet18' | 'wrn34_10' | 'resnet50'.
        num_classes: number of logits, >= 2.
        normalize: None (the model takes [0, 1] images as they are), a name in
            ``NORMALIZATIONS`` ('cifar10', 'imagenet') or a (mean, std) pair: the
            model is wrapped in ``NormalizedModel``.
        kwargs: passed to the constructor (e.g. ``width=0.25`` for mnist_cnn,
            ``in_channels=``).
    """
    if name not in MODELS:
        raise ValueError(f"name must be one of {', '.join(MODELS)}, got {name!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    model = MODELS[name](num_classes=num_classes, **kwargs)
    if normalize is not None:
        if isinstance(normalize, str):
            if normalize not in NORMALIZATIONS:
                raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)} or a (mean, std) pair, "
                                 f"got {normalize!r}")
            mean, std = NORMALIZATIONS[normalize]
        else:
            mean, std = normalize
        model = NormalizedModel(model, mean, std)
    return model


__all__ = ["get_model", "Ensemble", "MODELS", "NORMALIZATIONS", "INPUT_SHAPES", "MnistCNN", "SmallCNN", "PreActResNet",
           "PreActResNet18",
           "WideResNet", "WideResNet34_10", "ResNet", "ResNet50", "Normalize", "NormalizedModel",
           "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD"]
