"""The model floor of an attack: what its model calls alone cost, with the attack's own work taken away.

An attack's wall time is (the model's forward and backward passes it makes) + (everything else: the
steps, projections, bookkeeping, Python). The first part is the floor: no implementation of the same
attack, making the same model calls, can be faster than it. A benchmark that reports the floor next to
the wall time says how much of a speedup is left to win, and when a speed target is out of reach.

Measured in two passes:

1. ``ModelCallRecorder(model)`` wraps the model and records, per forward call, its ``tag`` (set by
   the caller, e.g. the name of the attack now running), the input's shape, dtype, memory format and
   whether a backward to the input follows (grad enabled and the input requires grad: the pattern of
   every gradient attack here and in torchattacks). One run of the attack through the recorder yields
   its call list; it is not timed.
2. ``replay_floor(model, calls)`` replays that list on the bare model: for each call, a forward of a
   fixed random input of that shape and, where recorded, ``torch.autograd.grad(out.sum(), x)`` (the
   attacks' loss and its gradient are a few elementwise ops on (B, K) logits, under 1% of a conv
   net's backward). Returns {tag: seconds}.

The replay assumes one backward per recorded grad forward, to the input only. It is exact for APGD,
APGD-T, PGD, FGSM and FAB-T (one backward of one scalar per forward) and for Square (no backward);
an attack that takes several backwards per forward (FAB's full Jacobian when not vectorized) is
under-counted, i.e. its floor reads low, never high. Example::

    rec = ModelCallRecorder(model)
    rec.tag = "apgd-t"
    APGDT(rec, eps=0.3)(x, y)
    floor_s = replay_floor(model, rec.calls)["apgd-t"]
"""
from __future__ import annotations

import time

import torch


class ModelCallRecorder(torch.nn.Module):
    """``model`` with a log of its forward calls: ``calls`` is a list of
    (tag, shape, dtype, channels_last, backward, autocast) tuples, one per call, in call order; ``tag``
    is whatever the caller last set (default None), ``autocast`` the autocast dtype in force (or None)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.calls: list[tuple] = []
        self.tag = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        dev = x.device.type
        amp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        self.calls.append((self.tag, tuple(x.shape), x.dtype, cl, bool(torch.is_grad_enabled() and x.requires_grad),
                           amp))
        return self.model(x)


def replay_floor(model: torch.nn.Module, calls, device="cpu", repeats: int = 1) -> dict:
    """{tag: seconds} that ``model`` alone takes for ``calls`` (``ModelCallRecorder.calls``): each forward
    and, where recorded, the backward to the input. Inputs are one random tensor per distinct shape,
    made before the clock starts; each run of consecutive calls with one tag is timed as a whole.
    Backward passes are replayed with ``torch.autograd.grad`` outside any ``no_grad``. ``repeats``:
    replay that many times and keep each tag's minimum (two replays of the same list differ by 3-10%
    on the 2-core CPU)."""
    best: dict = {}
    for _ in range(max(int(repeats), 1)):
        for tag, sec in _replay_once(model, calls, device).items():
            best[tag] = min(best.get(tag, float("inf")), sec)
    return best


def _replay_once(model, calls, device) -> dict:
    device = torch.device(device)
    inputs: dict = {}
    for _, shape, dtype, cl, _, _ in calls:
        if (shape, dtype, cl) not in inputs:
            t = torch.rand(shape, device=device, dtype=dtype)
            inputs[(shape, dtype, cl)] = t.contiguous(memory_format=torch.channels_last) if cl else t
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict = {}
    i = 0
    while i < len(calls):  # one clock per run of consecutive calls with the same tag (synced at its ends)
        tag = calls[i][0]
        j = i
        while j < len(calls) and calls[j][0] == tag:
            j += 1
        sync()
        t0 = time.perf_counter()
        for _, shape, dtype, cl, backward, amp in calls[i:j]:
            x = inputs[(shape, dtype, cl)]
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if backward:
                    x = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        torch.autograd.grad(model(x).float().sum(), x)
                else:
                    with torch.no_grad():
                        model(x)
        sync()
        out[tag] = out.get(tag, 0.0) + time.perf_counter() - t0
        i = j
    return out


def summarize_calls(calls) -> dict:
    """{tag: {'forwards', 'backwards', 'rows_forward', 'rows_backward'}}: the model work ``calls`` hold."""
    out: dict = {}
    for tag, shape, _, _, backward, _ in calls:
        d = out.setdefault(tag, {"forwards": 0, "backwards": 0, "rows_forward": 0, "rows_backward": 0})
        d["forwards"] += 1
        d["rows_forward"] += shape[0]
        if backward:
            d["backwards"] += 1
            d["rows_backward"] += shape[0]
    return out
