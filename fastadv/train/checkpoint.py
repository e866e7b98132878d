"""Checkpoints that resume exactly, load without running pickled code, and
never leave a half-written file.

A checkpoint is one ``torch.save`` of a dict of plain types and tensors:

==================  =====================================================
key                 content
==================  =====================================================
format              "fastadv-checkpoint", version 1
model               model.state_dict() (unwrapped from DDP / torch.compile)
optimizer           optimizer.state_dict()
scheduler           scheduler.state_dict() or None
scaler              GradScaler.state_dict() or None
method              the training method's state (e.g. Free-AT's running delta)
rng                 python, numpy, torch CPU and every CUDA generator
epoch, step         epoch to continue in; optimizer steps taken so far
batch_in_epoch      batches of ``epoch`` already consumed (mid-epoch saves)
config              the run's settings (plain types), for checking a resume
==================  =====================================================

Writes are atomic: the file is written to ``<name>.tmp-<pid>`` in the same
folder, flushed and fsync'ed, then ``os.replace``'d onto the final name, so a
crash or SIGTERM mid-write leaves the previous checkpoint intact. Loading uses
``torch.load(weights_only=True)``; numpy's RNG state is stored as a tensor so
that no numpy object needs unpickling.
"""
from __future__ import annotations

import os
import pathlib
import pickle
import random
import zipfile

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "unwrap"]

FORMAT, VERSION = "fastadv-checkpoint", 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or from an incompatible run."""


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state() -> dict:
    """Every RNG a training step may draw from, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    # random.getstate() is (version, tuple of 625 ints, gauss_next); a torch
    # round trip turns the inner tuple into a list
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    # .cpu(): a checkpoint loaded with map_location='cuda' brings the state tensors to the GPU
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"][: torch.cuda.device_count()]])


def save_checkpoint(path, *, model, optimizer=None, scheduler=None, scaler=None, method_state=None,
                    epoch: int = 0, step: int = 0, batch_in_epoch: int = 0, config: dict | None = None,
                    extra: dict | None = None) -> pathlib.Path:
    """Write a checkpoint atomically to ``path`` and return it."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "method": method_state or {},
        "rng": rng_state(),
        "epoch": int(epoch),
        "step": int(step),
        "batch_in_epoch": int(batch_in_epoch),
        "config": config or {},
        "extra": extra or {},
    }
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


MODEL_FORMAT = "fastadv-model"


def save_model_file(path, model, meta: dict | None = None) -> pathlib.Path:
    """The final weights with what rebuilds the model: {'format', 'model': state dict, 'meta': {...}}.

    ``meta`` (JSON types only): name, num_classes, kwargs, normalize, dataset,
    input_shape; ``fastadv eval --checkpoint`` reads it. Written atomically.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": MODEL_FORMAT, "model": unwrap(model).state_dict(), "meta": dict(meta or {})}, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load and check a checkpoint written by :func:`save_checkpoint`.

    Uses ``torch.load(weights_only=True)``: no pickled code runs. Raises
    :class:`CheckpointError` naming the file when it is missing, truncated,
    corrupt, or not a fastadv checkpoint.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and cannot be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Delete it or resume from an older one"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastadv checkpoint (no 'format': '{FORMAT}' entry)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')}, this fastadv reads version {VERSION}")
    for key in ("model", "rng", "epoch", "step"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt
