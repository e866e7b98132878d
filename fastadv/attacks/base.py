"""The Attack base class: torchattacks' calling convention, explicit model mode, validated inputs.

Usage (every attack)::

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10)
    x_adv = atk(x, y)          # x: (B, C, H, W) float in [0, 1], y: (B,) int64 labels

Subclasses implement ``perturb(x, y) -> x_adv``; ``__call__`` does the rest:

* validates once at entry, naming the bad argument: ``x`` a float tensor with a
  batch dimension, finite, inside ``clip`` (default [0, 1]); ``y`` an integer
  (B,) tensor on x's device with B = x.shape[0]; labels inside the model's
  number of classes and the model's output shaped (B, num_classes) (checked on
  the first forward pass, which the attack needs anyway); then runs
  ``perturb`` inside ``fastadv.validation(False)`` so the fused ops skip their
  data-reading checks in the step loop;
* sets batch-norm/dropout behaviour explicitly: ``model_mode='eval'``
  (default, like torchattacks), ``'train'`` (batch statistics, as some
  adversarial-training recipes do) or ``'as-is'`` (leave the model alone);
  every module's ``training`` flag is restored afterwards, even on error;
* ``targeted=True``: ``y`` holds the TARGET labels and the attack maximizes
  the targeted objective (e.g. -CE(f(x), y)); success means f(x) predicts y;
* ``autocast='bf16' | 'fp16' | None``: the model runs under ``torch.autocast``
  while the attack state (x, delta, step sizes) stays float32 and the logits
  are cast to float32 before the loss;
* ``channels_last=True | False | 'auto'``: feed the model channels_last 4-D
  inputs ('auto': when the model's conv weights are channels_last).

A subclass needs only ``self.logits(x)`` (forward with all of the above) and
``self.input_grad(x, y)`` (loss and its gradient), e.g.::

    class MyAttack(Attack):
        def perturb(self, x, y):
            loss, grad, logits = self.input_grad(x, y)
            return (x + self.eps * grad.sign()).clamp(*self.clip)
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from fastadv import _validate as V
from fastadv.losses import mce_loss

MODEL_MODES = ("eval", "train", "as-is")
LOSSES = ("ce", "cw", "dlr", "mce")
_AUTOCAST = {None: None, "none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}


def check_eps(name: str, value, *, allow_none: bool = False):
    """A radius/step argument: a float >= 0 or a tensor of them (checked per call for tensors)."""
    if value is None and allow_none:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a float or a real tensor, got dtype {value.dtype}")
        if value.numel() and (torch.isnan(value).any() or (value < 0).any()):
            raise ValueError(f"{name} must be >= 0 and not NaN")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float >= 0 or a (B,) tensor, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# ------------------------------------------------------------------- losses
def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per sample (> 0 iff misclassified), shape (B,)."""
    zy = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return other - zy


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020, "Reliable evaluation of
    adversarial robustness with an ensemble of diverse parameter-free attacks").

    Untargeted: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3 + 1e-12);
    targeted:   -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12),
    z_pi sorted descending. Shape (B,), to maximize. Needs >= 3 (4 targeted) classes.
    """
    zs = logits.sort(dim=1, descending=True).values
    zy = logits.gather(1, y[:, None]).squeeze(1)
    if target is None:
        return -(zy - margin(logits, y).add(zy)) / (zs[:, 0] - zs[:, 2] + 1e-12)
    zt = logits.gather(1, target[:, None]).squeeze(1)
    return -(zy - zt) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)


def attack_loss(kind: str, logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per-sample objective to MAXIMIZE, shape (B,). logits float32 (B, K).

    ce: CE(z, y) untargeted, -CE(z, t) targeted; cw: the margin
    max_{j!=y} z_j - z_y untargeted, z_t - max_{j!=t} z_j targeted (Carlini &
    Wagner 2017, unclamped); dlr: ``dlr_loss`` (targeted DLR needs the true
    label, so the targeted engine passes y = target and uses CE-style DLR on it);
    mce: ``fastadv.losses.mce_loss`` with weight 1 (Zhang et al. 2022, margin
    boosting), MCE(z, y) untargeted, -MCE(z, t) targeted.
    """
    if kind == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    if kind == "cw":
        m = margin(logits, y)
        return -m if targeted else m
    if kind == "dlr":
        if targeted:
            raise ValueError("loss='dlr' is untargeted (targeted DLR needs the true label too); use 'ce' or 'cw'")
        return dlr_loss(logits, y)
    if kind == "mce":
        per = mce_loss(logits, y, reduction="none")
        return -per if targeted else per
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {kind!r}")


def grad_objective(kind: str, logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar to differentiate, detached per-sample loss).

    For 'ce' the scalar is ``F.cross_entropy(logits, y)`` (mean over the
    batch, negated when targeted), exactly torchattacks' ``cost``, so the
    gradient matches theirs bit for bit. The per-sample mean scaling does not
    change a sign or an L2-normalized direction.
    """
    per = attack_loss(kind, logits, y, targeted)
    if kind == "ce":
        cost = F.cross_entropy(logits, y)
        return (-cost if targeted else cost), per.detach()
    if kind == "mce":
        cost = mce_loss(logits, y)  # the batch mean, as the reference attack's (zdhNarsil/Margin-Boosting pgd.py)
        return (-cost if targeted else cost), per.detach()
    return per.sum(), per.detach()


def grad_wrt(cost: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """d cost / d x; zeros where x does not reach cost (a model that cuts the graph, e.g. a
    hard threshold, has a zero gradient: it is reported by evaluate, not an error)."""
    if not cost.requires_grad:
        return torch.zeros_like(x)
    return torch.autograd.grad(cost, x, allow_unused=True, materialize_grads=True)[0]


def is_fooled(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Attack success per sample, bool (B,): untargeted argmax != y, targeted argmax == y."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


# ------------------------------------------------------------------ base
class OutputShapeError(ValueError):
    pass


class Attack:
    """Base class. See the module docstring for the arguments every attack shares.

    Args:
        model: nn.Module (or callable) mapping (B, ...) images in ``clip`` to (B, K) logits.
        targeted: y holds target labels (default False).
        model_mode: 'eval' (default) | 'train' | 'as-is'; restored afterwards.
        autocast: None | 'bf16' | 'fp16': model precision; attack state stays float32.
        channels_last: True | False | 'auto' (default).
        clip: (lo, hi) image box, default (0, 1).
    """

    name = "Attack"

    def __init__(self, model, *, targeted: bool = False, model_mode: str = "eval", autocast=None,
                 channels_last="auto", clip=(0.0, 1.0)):
        if not callable(model):
            raise TypeError(f"model must be a callable nn.Module, got {type(model).__name__}")
        self.model = model
        self.targeted = bool(targeted)
        self.model_mode = check_choice("model_mode", model_mode, MODEL_MODES)
        key = autocast.lower() if isinstance(autocast, str) else autocast
        if key not in _AUTOCAST and key not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
        self.autocast_dtype = _AUTOCAST.get(key, key)
        if channels_last not in (True, False, "auto"):
            raise ValueError(f"channels_last must be True, False or 'auto', got {channels_last!r}")
        self.channels_last = channels_last
        self.clip = V.clip(clip)
        self._num_classes: int | None = None
        self._checked = False
        self._model_info: tuple | None = None  # (model dtype, model channels_last), set by the first forward
        self._y_range: tuple[int, int] | None = None

    # ------------------------------------------------------------- public
    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x_adv, same shape and dtype as x (the attack itself runs in float32)."""
        dtype = x.dtype if isinstance(x, torch.Tensor) else None
        x, y = self.check_inputs(x, y)
        with self.model_context(), V.validation(False), torch.enable_grad():
            adv = self.perturb(x, y)
        return adv.detach().to(dtype)

    forward = __call__

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The attack proper: x float32 (B, ...) in the box, y int64 (B,). Returns x_adv (B, ...)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        keys = [k for k in vars(self) if not k.startswith("_") and k != "model"]
        return f"{type(self).__name__}({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"

    # ---------------------------------------------------------- checks
    def check_inputs(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate (x, y) once; returns x as float32 (detached) and y as int64."""
        V.tensor("x", x, min_ndim=2)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor of int64 labels, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"y must be an integer tensor of labels, got dtype {y.dtype}")
        if y.dim() != 1:
            raise ValueError(f"y must be 1-D (B,), got shape {tuple(y.shape)}")
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"x and y have mismatched batch sizes: x has {x.shape[0]} samples, y has {y.shape[0]}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        if x.numel():
            if torch.isnan(x).any():
                raise ValueError("x contains NaN")
            V.in_box("x", x, *self.clip)
        if y.numel():
            lo, hi = torch.aminmax(y)
            self._y_range = (int(lo), int(hi))
            if self._y_range[0] < 0:
                raise ValueError(f"y must hold labels >= 0, got a minimum of {self._y_range[0]}")
        else:
            self._y_range = None
        self._checked = False
        self._model_info = None  # the model may have changed dtype or layout since the last call
        return x.detach().float(), y.long()

    def check_output(self, out, batch: int) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise OutputShapeError(f"model must return a logits tensor (B, num_classes), got {type(out).__name__}")
        if out.dim() != 2 or out.shape[0] != batch or out.shape[1] < 2:
            raise OutputShapeError(
                f"model must return logits of shape (B, num_classes) = ({batch}, K >= 2), got shape {tuple(out.shape)}")
        self._num_classes = out.shape[1]
        if self._y_range is not None and self._y_range[1] >= out.shape[1]:
            raise ValueError(f"y holds label {self._y_range[1]} but the model has {out.shape[1]} classes (labels must be "
                             f"in [0, {out.shape[1] - 1}])")
        self._checked = True
        return out

    # ---------------------------------------------------------- model
    @contextlib.contextmanager
    def model_context(self):
        """Set the model mode for the attack and restore every module's flag afterwards."""
        if self.model_mode == "as-is" or not isinstance(self.model, nn.Module):
            yield
            return
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.train(self.model_mode == "train")
        try:
            yield
        finally:
            for m, f in flags:
                m.training = f

    def _model_dtype(self):
        """dtype of the model's first floating parameter (None for a plain callable or no parameters)."""
        if not isinstance(self.model, nn.Module):
            return None
        for p in self.model.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
        return None

    def _model_is_channels_last(self) -> bool:
        """True if the model's first 4-D parameter is channels_last (and not also contiguous)."""
        if not isinstance(self.model, nn.Module):
            return False
        for p in self.model.parameters():
            if p.dim() == 4:
                return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        return False

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """model(x) with autocast and channels_last applied; float32 (B, K) logits."""
        info = self._model_info
        if info is None:  # once per call: walking the parameters took ~20 us a forward (Square: 5000 of them)
            info = self._model_info = (self._model_dtype(), self._model_is_channels_last())
        mdt, model_cl = info
        if x.dim() == 4 and (self.channels_last is True or (self.channels_last == "auto" and model_cl)):
            x = x.contiguous(memory_format=torch.channels_last)
        if mdt is not None and mdt != x.dtype and self.autocast_dtype is None:
            x = x.to(mdt)  # a half/bf16 model: the float32 attack state is cast on the way in
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        if not self._checked:
            out = self.check_output(out, x.shape[0])
        return out.float()

    def input_grad(self, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"):
        """(per-sample loss (B,), d loss / d x, logits) at x for the attack objective ``loss``."""
        xr = x.detach().requires_grad_(True)
        logits = self.logits(xr)
        cost, per = grad_objective(loss, logits, y, self.targeted)
        grad = grad_wrt(cost, xr)
        return per, grad, logits.detach()

    def fooled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return is_fooled(logits, y, self.targeted)

