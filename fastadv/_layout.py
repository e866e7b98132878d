"""Batches as (B, N) rows in memory order, so kernels see one flat row per sample.

A per-sample op only needs every tensor to list a sample's elements in the
same order. Taking x's memory order (dimension 0 outermost, the rest sorted by
stride) makes contiguous and channels_last batches zero-copy rows; any other
tensor is copied once into that order. Results keep x's layout.
"""
from __future__ import annotations

import torch

from fastadv import _validate as V


def memory_order(like: torch.Tensor) -> tuple[int, ...]:
    """Permutation (0, ...) listing like's dims from outermost to innermost in memory.

    Falls back to the logical order when like is not dense in that order (a
    strided slice, say), which makes every operand a contiguous copy.
    """
    if like.dim() <= 1 or like.is_contiguous():
        return tuple(range(like.dim()))
    rest = sorted(range(1, like.dim()), key=lambda d: (-like.stride(d), d))
    perm = (0, *rest)
    return perm if like.permute(perm).is_contiguous() else tuple(range(like.dim()))


def _inverse(perm):
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def rows(t: torch.Tensor, perm: tuple[int, ...]) -> torch.Tensor:
    """``t`` as a contiguous (B, N) view in the memory order ``perm`` (from ``memory_order``)."""
    b = t.shape[0]
    n = t[0].numel() if b else 0
    if t.is_contiguous() and perm == tuple(range(t.dim())):
        return t.view(b, n)  # the common case: ~2 us instead of ~8 us (measured)
    p = t.permute(perm) if t.dim() > 1 else t
    if not p.is_contiguous():
        p = p.contiguous()
    return p.reshape(b, n)


def output_like(like: torch.Tensor, out: torch.Tensor | None, perm: tuple[int, ...]):
    """(result, out_rows, writeback): where a kernel writes, and what to return.

    result has like's shape and layout (or is ``out``). If ``out`` is not laid
    out in memory order ``perm`` the kernel writes a temporary and
    ``writeback()`` copies it into ``out``.
    """
    b = like.shape[0]
    n = like[0].numel() if b else 0
    if out is None:
        buf = torch.empty([like.shape[d] for d in perm], dtype=like.dtype, device=like.device)
        return buf.permute(_inverse(perm)), buf.reshape(b, n), None
    V.same("out", out, "x", like)
    p = out.permute(perm) if out.dim() > 1 else out
    if p.is_contiguous():
        return out, p.reshape(b, n), None
    tmp = torch.empty(p.shape, dtype=out.dtype, device=out.device)

    def writeback():
        out.copy_(tmp.permute(_inverse(perm)))

    return out, tmp.reshape(b, n), writeback
