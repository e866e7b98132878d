"""Argument checks shared by every public op and attack. Messages name the argument.

Two levels:
* metadata checks (type, dtype, shape, device, eps as a float, clip, sparsity)
  always run; they never touch tensor data and never sync with the device;
* value checks (NaN in x0, x0 outside the box, negative or NaN entries of a
  tensor eps) read the data, which costs a pass over x0 and, on a GPU, a host
  sync. They run by default and are skipped inside ``fastadv.validation(False)``
  (the attack engine validates once at entry, then turns them off inside its
  step loop) and while ``torch.compile`` traces (a data-dependent check would
  break the graph).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_value_checks: list[bool] = [True]


@contextlib.contextmanager
def validation(enabled: bool):
    """Turn the data-reading checks on or off inside the block (metadata checks always run)."""
    _value_checks.append(bool(enabled))
    try:
        yield
    finally:
        _value_checks.pop()


def value_checks_enabled() -> bool:
    if torch.compiler.is_compiling():
        return False
    return _value_checks[-1]


def tensor(name: str, t, *, min_ndim: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {t.dtype}")
    if t.dim() < min_ndim:
        raise ValueError(f"{name} must have a batch dimension (at least {min_ndim}-D), got shape {tuple(t.shape)}")
    return t


def same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    tensor(name, t)
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    return t


def clip(value) -> tuple[float, float]:
    """``(lo, hi)`` as floats, or ``(-inf, inf)`` for None."""
    if value is None:
        return -math.inf, math.inf
    if not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"clip must be a pair (lo, hi) or None, got {value!r}")
    lo, hi = (float(v) for v in value)
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"clip must not contain NaN, got {value!r}")
    if lo > hi:
        raise ValueError(f"clip must have lo <= hi, got lo={lo} > hi={hi}")
    return lo, hi


def sparsity(value) -> float:
    s = float(value)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {value}")
    return s


def per_sample(name: str, value, batch: int, device: torch.device) -> torch.Tensor:
    """``value`` (a float, a 0-d tensor or a (B,) tensor) as a float32 (B,) tensor on ``device``."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be a float or a real tensor, got dtype {value.dtype}")
        if value.device != device and value.numel() != 1:
            raise ValueError(f"{name} is on {value.device} but the inputs are on {device}")
        if value.dim() == 0 or (value.dim() == 1 and value.numel() == 1 and batch != 1):
            value = value.reshape(()).expand(batch)
        elif value.shape != (batch,):
            raise ValueError(
                f"{name} must be a float or a tensor of shape (B,) = ({batch},), got shape {tuple(value.shape)}"
            )
        t = value.to(device=device, dtype=torch.float32)
        if value_checks_enabled() and t.numel():
            if torch.isnan(t).any():
                raise ValueError(f"{name} contains NaN")
            if (t < 0).any():
                raise ValueError(f"{name} must be >= 0, got a minimum of {t.min().item():g}")
        return t.contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor of shape (B,), got {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} must not be NaN")
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return torch.full((batch,), v, dtype=torch.float32, device=device)


def no_nan(name: str, t: torch.Tensor) -> None:
    in_box(name, t, -math.inf, math.inf)


def in_box(name: str, t: torch.Tensor, lo: float, hi: float) -> None:
    """Raise if ``t`` contains NaN or has entries outside [lo, hi] (the stated image range).

    One ``aminmax`` pass (NaN propagates into it) and one host sync: 0.21 ms
    against 1.34 ms for a separate ``isnan().any()`` on 256x3x32x32 (measured).
    """
    if not value_checks_enabled() or t.numel() == 0:
        return
    tmin, tmax = torch.stack(torch.aminmax(t)).tolist()
    if math.isnan(tmin) or math.isnan(tmax):
        raise ValueError(f"{name} contains NaN")
    if tmin < lo or tmax > hi:
        raise ValueError(f"{name} must lie in the box clip=({lo:g}, {hi:g}), but its values span [{tmin:g}, {tmax:g}]")
