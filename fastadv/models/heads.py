"""Heads that training methods attach to a network's features: gradient reversal, domain heads, critics.

Used by DIAL (``fastadv.train.methods.dial``: a domain classifier behind a
gradient-reversal layer) and AFD (``fastadv.train.methods.afd``: a
label-conditioned, spectrally normalized critic). The network itself is
never changed: its features are read with :class:`FeatureTap`, a forward
pre-hook on an ``nn.Linear`` that captures that layer's input, so the
model saved and evaluated is the plain classifier.

* :func:`grad_reverse` / :class:`GradReverse`: identity forward, backward
  ``-lam * grad`` (Ganin & Lempitsky, "Unsupervised Domain Adaptation by
  Backpropagation", ICML 2015); :func:`dann_lambda` the DANN schedule
  ``lam_p = 2 / (1 + exp(-gamma p)) - 1``, gamma = 10.
* :func:`domain_head`: DIAL's domain classifiers (matanle51/DIAL, models/*DANN.py).
* :class:`ProjectionCritic`: AFD's ``SNPDFC3`` (BashivanLab/afd, models/*_models.py),
  a projection discriminator (Miyato & Koyama, "cGANs with Projection
  Discriminator", ICLR 2018) with spectral normalization (Miyato et al., ICLR 2018).
* :func:`feature_layer`: the ``nn.Linear`` whose input is the feature vector
  ('first_linear' | 'last_linear' | a module name); :func:`split_head`: the
  classifier head (the last ``nn.Linear``) and the encoder parameters (all others).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

__all__ = ["GradReverse", "grad_reverse", "dann_lambda", "domain_head", "DOMAIN_HEADS", "ProjectionCritic",
           "FeatureTap", "feature_layer", "linear_layers", "split_head", "broadcast_module", "module_mode"]


class GradReverse(torch.autograd.Function):
    """y = x forward; dL/dx = -lam * dL/dy backward (no gradient for lam)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.neg() * ctx.lam, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    """The gradient-reversal layer: returns x; the gradient flowing back through it is multiplied by -lam."""
    return GradReverse.apply(x, lam)


def dann_lambda(p: float, gamma: float = 10.0) -> float:
    """DANN's reversal coefficient 2 / (1 + exp(-gamma p)) - 1: 0 at p = 0, 0.98661 at p = 0.5, 0.99991 at p = 1."""
    return 2.0 / (1.0 + math.exp(-gamma * float(p))) - 1.0


#: DIAL's domain classifiers (2 logits: natural, adversarial), by the reference model that carries them:
#: 'bn': Linear(d, 100) -> BatchNorm1d -> ReLU -> Linear(100, 2) (SmallCNNDANN for MNIST, WideResNetDANN for CIFAR-10);
#: 'mlp': Linear(d, 256) -> ReLU -> Linear(256, 256) -> ReLU -> Linear(256, 2) (PreActResNetDANN, CIFAR-100);
#: 'linear': Linear(d, 2) (PreActResNetDANN, SVHN).
DOMAIN_HEADS = ("bn", "mlp", "linear")


def domain_head(in_features: int, kind: str = "bn") -> nn.Sequential:
    """A domain classifier on (B, in_features) features -> (B, 2) logits (see ``DOMAIN_HEADS``);
    PyTorch's default initialization, as the reference."""
    if kind == "bn":
        return nn.Sequential(nn.Linear(in_features, 100), nn.BatchNorm1d(100), nn.ReLU(), nn.Linear(100, 2))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 2))
    if kind == "linear":
        return nn.Sequential(nn.Linear(in_features, 2))
    raise ValueError(f"head must be one of {', '.join(map(repr, DOMAIN_HEADS))}, got {kind!r}")


class ProjectionCritic(nn.Module):
    """AFD's critic D(h, y) on features h (B, d) and labels y (B,) -> scores (B, 1).

    phi(h) = lrelu(SN(W2) lrelu(SN(W1) h)), both d x hidden (hidden = d, as the
    reference's ``num_decoder_feats`` = feature width), LeakyReLU slope 0.2;
    D(h, y) = SN(w7) . phi(h) + b7 + <SN(E)[y], phi(h)> (the projection term,
    E a (num_classes, hidden) embedding). Every weight is spectrally normalized
    (``torch.nn.utils.parametrizations.spectral_norm``, one power iteration per
    forward in train mode); w7 and E start Xavier-uniform, W1, W2 with PyTorch's
    default, as the reference ``SNPDFC3._initialize``.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None):
        super().__init__()
        hidden = int(in_features if hidden is None else hidden)
        self.linear1 = spectral_norm(nn.Linear(in_features, hidden))
        self.linear2 = spectral_norm(nn.Linear(hidden, hidden))
        self.l7 = nn.Linear(hidden, 1)
        self.l_y = nn.Embedding(num_classes, hidden)
        nn.init.xavier_uniform_(self.l7.weight)
        nn.init.xavier_uniform_(self.l_y.weight)
        self.l7 = spectral_norm(self.l7)
        self.l_y = spectral_norm(self.l_y)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.linear1(h), 0.2)
        h = F.leaky_relu(self.linear2(h), 0.2)
        return self.l7(h) + (self.l_y(y) * h).sum(1, keepdim=True)


# ------------------------------------------------------------ features
def linear_layers(net: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear in ``net``, in registration order."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]


def feature_layer(net: nn.Module, which: str = "last_linear") -> nn.Linear:
    """The nn.Linear whose INPUT is the feature vector a method reads.

    'last_linear': the classifier (its input is the penultimate features: the
    pooled features of the ResNets and WRN here, the 1024-unit hidden layer of
    MnistCNN); 'first_linear': the first nn.Linear (MnistCNN: the flattened conv
    features; networks with a single Linear: the same as 'last_linear'); or a
    qualified name from ``net.named_modules()`` (or a unique suffix of one).
    """
    layers = linear_layers(net)
    if not layers:
        raise ValueError("the network has no nn.Linear: the features are read as the input of one")
    if which == "last_linear":
        return layers[-1][1]
    if which == "first_linear":
        return layers[0][1]
    mods = dict(net.named_modules())
    hits = [mods[which]] if which in mods else [m for n, m in mods.items() if n.endswith("." + which)]
    if len(hits) != 1 or not isinstance(hits[0], nn.Linear):
        raise ValueError(f"feature_layer must be 'first_linear', 'last_linear' or the name of one nn.Linear of the "
                         f"model (one of {', '.join(n for n, _ in layers)}), got {which!r}")
    return hits[0]


def split_head(net: nn.Module) -> tuple[nn.Linear, list[nn.Parameter]]:
    """(classifier head = the last nn.Linear, encoder parameters = every other trainable parameter)."""
    head = feature_layer(net, "last_linear")
    ids = {id(p) for p in head.parameters()}
    return head, [p for p in net.parameters() if p.requires_grad and id(p) not in ids]


class FeatureTap:
    """``with FeatureTap(layer) as tap: out = net(x); h = tap.value``: the input of ``layer`` in the last
    forward inside the block (differentiable, part of that forward's graph); None again after the block.

    ``persistent=False``: the hook is registered on entry and removed on exit. ``persistent=True``: registered
    once, at construction, and only active inside the block. A method that may run under ``torch.compile``
    needs the persistent form, built before the first compiled call: dynamo does not guard on hooks added
    later (``torch._dynamo.config.skip_nnmodule_hook_guards``), so a hook registered around a compiled forward
    never fires (seen on torch 2.13 CPU, backend 'eager'); the ``active`` flag it reads is guarded, so the
    capturing and the plain forward (the attack's) each get their own graph.
    """

    def __init__(self, layer: nn.Module, persistent: bool = False):
        self.layer, self.value, self.active, self.persistent = layer, None, False, bool(persistent)
        self._handle = layer.register_forward_pre_hook(self._hook) if self.persistent else None

    def _hook(self, mod, inputs):
        if self.active:
            self.value = inputs[0]

    def __enter__(self):
        if self._handle is None:
            self._handle = self.layer.register_forward_pre_hook(self._hook)
        self.value, self.active = None, True
        return self

    def __exit__(self, *exc):
        self.active, self.value = False, None
        if not self.persistent:
            self._handle.remove()
            self._handle = None

    def remove(self) -> None:
        """Remove the hook (a persistent tap stops capturing for good)."""
        self.active = False
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ------------------------------------------------------------ helpers
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (no-op when not distributed): a method-owned
    module is built after each rank seeded its own RNG, and DDP only broadcasts the network's weights."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


@contextlib.contextmanager
def module_mode(net: nn.Module, training: bool):
    """Set every submodule's ``training`` flag and restore each one's own flag afterwards."""
    flags = [(m, m.training) for m in net.modules()]
    net.train(training)
    try:
        yield net
    finally:
        for m, f in flags:
            m.training = f
