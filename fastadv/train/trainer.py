"""The lean training loop: ``Trainer(model, method, train, heldout, config).fit()``.

One loop for a laptop CPU and for many GPUs:

* precision: ``amp='bf16'`` (autocast, no scaler) or ``'fp16'`` (autocast +
  GradScaler); fp32 by default on CPU, where bf16 autocast measured slower
  for the MNIST CNN (0.89 s vs 0.73 s for 10 PGD steps on 128 images, this
  2-core Xeon); ``channels_last`` for conv nets; optional ``torch.compile``;
* data: in-memory tensors (MNIST, CIFAR-10: batches are index gathers, no
  DataLoader overhead) or any map-style Dataset (JPEG folders: one
  persistent, pinned DataLoader for the run, ``fastadv.data.loader``, with
  per-sample augmentation streams and progressive resizing,
  ``resize_schedule``); the same seeded global permutation on every rank,
  each rank taking its slice of each global batch
  (``fastadv.train.distributed``);
* DDP through torchrun (NCCL on GPU, gloo on CPU), metrics summed across
  ranks, only rank 0 writes;
* checkpoints (``fastadv.train.checkpoint``) every epoch and every
  ``save_every`` steps, atomic; ``resume=True`` continues exactly (the
  permutation is a function of (seed, epoch) and the RNG states are
  restored, so a resumed CPU run ends with the same weights); SIGTERM saves
  and returns with ``result['stopped'] = True``;
* a tqdm bar (loss, accuracy, images/s), metrics to ``metrics.jsonl`` and
  ``metrics.csv``, clean and PGD robust accuracy on the held-out set after
  each epoch, ``curves.png`` at the end.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import pathlib
import signal
import sys
import threading
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastadv.train import distributed as D
from fastadv.train.checkpoint import (CheckpointError, load_checkpoint, rng_state, save_checkpoint, save_model_file,
                                      set_rng_state, unwrap)
from fastadv.train.methods import BindContext, Method

__all__ = ["TrainConfig", "Trainer", "evaluate_accuracy", "make_scheduler", "TensorData", "DatasetData",
           "cifar_augment"]

SCHEDULES = ("constant", "cyclic", "multistep", "cosine", "piecewise")


@dataclasses.dataclass
class TrainConfig:
    """Settings of a run (all plain types, so they go into checkpoints and metrics).

    batch_size is the GLOBAL batch: with N ranks each takes batch_size / N.
    lr is the peak learning rate; schedule 'cyclic' is Wong et al. 2020's
    triangle (0 -> lr at 2/5 of the steps -> 0), 'multistep' divides by 10
    at 1/2 and 3/4 of the steps, 'cosine' anneals to 0, 'constant' keeps lr.
    eval_eps/eval_alpha/eval_steps set the held-out PGD (L-inf, random start).
    resize_schedule ('EPOCH:SIZE[@BATCH],...', 0-based epochs) sets the
    training image size and the global batch per phase (Dataset data with
    ``load(i, epoch, size)``, e.g. ``fastadv.data.ImageFolder``); 'piecewise'
    interpolates the absolute lrs of lr_points ('EPOCH:LR,...') linearly in
    fractional epochs. workers / prefetch / on_bad_image configure the
    Dataset loader (``fastadv.data.loader.EpochLoader``).
    """

    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"  # 'sgd' (momentum, nesterov off) | 'adam'
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    warmup_steps: int = 0
    amp: str | None = None  # None | 'bf16' | 'fp16'
    channels_last: bool = False
    compile: bool = False
    grad_clip: float | None = None
    # micro-batches per optimizer step: each rank's share of the global batch is split into this many
    # forward/backward passes whose gradients add up (the global batch, the lr schedule and the step count
    # stay those of the recipe; only the memory per pass shrinks)
    grad_accum: int = 1
    eval_eps: float = 8 / 255
    eval_alpha: float | None = None  # default eps / 4
    eval_steps: int = 10
    eval_samples: int | None = 1000  # None: the whole held-out set
    eval_batch_size: int = 500
    out_dir: str | None = None
    save_every: int = 0  # steps between mid-epoch checkpoints (0: only at epoch ends)
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    workers: int = 2
    prefetch: int = 2  # batches in flight per decoding worker (Dataset data)
    on_bad_image: str = "fail"  # 'fail' | 'skip': an unreadable image stops the run / is replaced and logged
    # progressive resizing and per-phase global batch: 'EPOCH:SIZE[@BATCH],...' (fastadv.data.loader.parse_schedule)
    resize_schedule: str | None = None
    # schedule 'piecewise': 'EPOCH:LR,...' points (LR absolute), linear in between, on fractional epochs
    lr_points: str | None = None
    device: str | None = None
    augment: str | None = None  # None | 'crop-flip' (CIFAR: pad-4 random crop + flip on tensors)
    plot: bool = True
    max_steps: int | None = None  # stop (with a checkpoint) after this many optimizer steps in this call
    # What rebuilds the model: {"name", "num_classes", "kwargs", "normalize", "dataset", "input_shape"}; written
    # into model.pt so `fastadv eval --checkpoint model.pt` needs no --model / --model-kwargs.
    model_meta: dict | None = None

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.augment not in (None, "crop-flip"):
            raise ValueError(f"augment must be None or 'crop-flip', got {self.augment!r}")
        from fastadv.data.loader import BAD_IMAGE_POLICIES, parse_schedule

        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {self.on_bad_image!r}")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be an int >= 1, got {self.grad_accum!r}")
        parse_schedule(self.resize_schedule)  # raises ValueError naming the bad entry
        if self.schedule == "piecewise":
            parse_lr_points(self.lr_points)
        elif self.lr_points:
            raise ValueError("lr_points is only used with schedule='piecewise'")


# ------------------------------------------------------------------ data
class TensorData:
    """An in-memory dataset: x float (N, ...) in [0, 1], y int64 (N,). Batches are index gathers."""

    resizable = False

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise TypeError("x must be a float tensor of images in [0, 1]")
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must be (N,) with N = x.shape[0] = {x.shape[0]}")
        self.x, self.y = x, y.long()
        self.wait_s = 0.0

    def __len__(self):
        return self.x.shape[0]

    def batches(self, index_batches, device, epoch, seed, augment=None, *, start=0, size=None, rank=0):
        """``start``: the position of ``index_batches[0]`` in the epoch (a mid-epoch resume passes the batches
        already done), so batch k's augmentation stream is the same with or without the interruption."""
        if size is not None:
            raise ValueError("in-memory tensors cannot be resized: a resize schedule needs a Dataset with "
                             "load(i, epoch, size) (fastadv.data.ImageFolder)")
        for i, idx in enumerate(index_batches, start=start):
            t = time.perf_counter()
            xb, yb = self.x[idx], self.y[idx]
            if augment == "crop-flip":
                g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + i)
                xb = cifar_augment(xb, g)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            self.wait_s += time.perf_counter() - t
            yield xb, yb

    def epoch_stats(self) -> dict:
        return {}


class DatasetData:
    """Any map-style Dataset of (image, label), served by one persistent ``fastadv.data.loader.EpochLoader``.

    ``workers`` decoding processes with ``prefetch`` batches in flight each,
    pinned host memory for CUDA, ``on_bad_image`` 'skip' | 'fail'. The
    augmentation of ``fastadv.data.ImageFolder`` is a function of (seed,
    epoch, sample index) and the workers' global generators are seeded per
    (seed, epoch, rank, batch position), so a resumed run loads the same
    images with the same augmentation.
    """

    def __init__(self, dataset, workers: int = 2, pin_memory: bool = False, *, prefetch: int = 2,
                 on_bad_image: str = "fail"):
        from fastadv.data.loader import EpochLoader

        self.dataset = dataset
        self.loader = EpochLoader(dataset, workers=workers, prefetch=prefetch, pin_memory=pin_memory,
                                  on_bad_image=on_bad_image)

    def __len__(self):
        return len(self.dataset)

    @property
    def resizable(self) -> bool:
        return self.loader.resizable

    @property
    def wait_s(self) -> float:
        return self.loader.wait_s

    def batches(self, index_batches, device, epoch, seed, augment=None, *, start=0, size=None, rank=0):
        if augment is not None:
            raise ValueError(f"augment={augment!r} is for in-memory tensors; a Dataset augments itself")
        yield from self.loader.batches(index_batches, device, epoch, seed, size=size, rank=rank, start=start)

    def epoch_stats(self) -> dict:
        """Unreadable images skipped so far, over all ranks: {'bad_images': n, 'bad_image_paths': [...]}."""
        paths = [p for _, p, _ in self.loader.bad]
        allp = [p for r in D.all_gather_object(paths) for p in r]
        return {"bad_images": len(allp), "bad_image_paths": sorted(set(allp))} if allp else {"bad_images": 0}


def cifar_augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with ``pad`` zero padding and a horizontal flip, per sample (the CIFAR-10 standard)."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    i = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    j = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    rows = (i[:, None] + torch.arange(h)[None, :])  # (B, H)
    cols = (j[:, None] + torch.arange(w)[None, :])  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :]]
    return out.contiguous()


def _as_data(d, workers, *, prefetch: int = 2, pin_memory: bool = False, on_bad_image: str = "fail"):
    if d is None:
        return None
    if isinstance(d, (TensorData, DatasetData)):
        return d
    if isinstance(d, (tuple, list)) and len(d) == 2 and isinstance(d[0], torch.Tensor):
        return TensorData(d[0], d[1])
    if isinstance(d, torch.utils.data.Dataset):
        return DatasetData(d, workers, pin_memory, prefetch=prefetch, on_bad_image=on_bad_image)
    raise TypeError("data must be (x, y) tensors, a TensorData/DatasetData, or a map-style torch Dataset")


# ------------------------------------------------------------ schedules
def parse_lr_points(spec) -> list[tuple[float, float]]:
    """``'0:0,1:0.4,6:0.04'`` -> [(0.0, 0.0), (1.0, 0.4), (6.0, 0.04)]: (epoch, lr) points, epochs increasing."""
    pts = []
    for item in str(spec or "").split(","):
        ep, sep, lr = item.strip().partition(":")
        try:
            pt = (float(ep), float(lr))
        except ValueError:
            raise ValueError(f"lr_points entry {item!r}: expected EPOCH:LR, e.g. 0:0,1:0.4,6:0.04") from None
        if not sep or pt[1] < 0 or (pts and pt[0] <= pts[-1][0]):
            raise ValueError(f"lr_points {spec!r}: EPOCH:LR entries with increasing epochs and lr >= 0")
        pts.append(pt)
    if len(pts) < 2:
        raise ValueError(f"lr_points {spec!r}: at least two EPOCH:LR points")
    return pts


def make_scheduler(optimizer, schedule: str, total_steps: int, warmup_steps: int = 0, *, lr_points=None,
                   epoch_steps=None):
    """A per-step LambdaLR. Its state dict holds only plain numbers (weights_only-safe).

    ``'piecewise'`` (the fast-AT ImageNet recipe's ``np.interp(t, lr_epochs,
    lr_values)``) needs ``lr_points`` (``parse_lr_points``; absolute lrs,
    divided here by the optimizer's lr) and ``epoch_steps`` (optimizer steps
    of each epoch, which progressive batch sizes make unequal); the lr of
    step k of epoch e is the interpolation at t = e + (k + 1) / steps(e).
    """
    total = max(1, int(total_steps))
    warm = max(0, int(warmup_steps))
    if schedule == "piecewise":
        import bisect

        pts = parse_lr_points(lr_points) if isinstance(lr_points, str) else list(lr_points)
        base = optimizer.param_groups[0].get("initial_lr", optimizer.param_groups[0]["lr"])
        steps = [max(1, int(s)) for s in (epoch_steps or [total])]
        starts = [0]
        for n in steps:
            starts.append(starts[-1] + n)
        xs, ys = [p[0] for p in pts], [p[1] / base for p in pts]

        def piecewise(step: int) -> float:
            e = min(max(bisect.bisect_right(starts, step) - 1, 0), len(steps) - 1)
            t = e + (step - starts[e] + 1) / steps[e]
            return float(np.interp(t, xs, ys))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, piecewise)

    def factor(step: int) -> float:
        if schedule == "cyclic":
            # Wong et al. 2020: np.interp(t, [0, 2/5 T, T], [0, lr_max, 0]), evaluated
            # at the END of the step so that the first step has a nonzero lr.
            t = (step + 1) / total
            return t / 0.4 if t <= 0.4 else max(0.0, (1 - t) / 0.6)
        f = 1.0
        if warm and step < warm:
            f = (step + 1) / warm
        if schedule == "multistep":
            f *= 0.1 ** ((step >= total // 2) + (step >= (3 * total) // 4))
        elif schedule == "cosine":
            f *= 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        return f

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------- evaluation
@torch.no_grad()
def _predict(net, x):
    return net(x).argmax(1)


def evaluate_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float | None = None,
                      steps: int = 10, batch_size: int = 500, device=None, amp: str | None = None,
                      seed: int = 0, presharded: bool = False) -> dict:
    """Clean and L-inf PGD robust accuracy (``fastadv.attacks.PGD``, random start, eval mode)
    of ``net`` on (x, y). Counts are summed across ranks when distributed
    (each rank evaluates its share: the slice [r * s, (r + 1) * s), s = ceil(n / world); with
    ``presharded``, (x, y) is that slice already, e.g. ``HeldoutImages.shard``, and gives the same
    numbers). Returns {'clean_acc', 'robust_acc', 'n'}."""
    from fastadv.attacks import PGD

    device = device or next(net.parameters()).device
    info = D.info()
    n = x.shape[0]
    per = -(-n // info.world_size)
    lo, hi = (0, n) if presharded else (min(n, info.rank * per), min(n, (info.rank + 1) * per))
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    alpha = eps / 4 if alpha is None else alpha
    was_training = net.training
    net.eval()
    try:
        with torch.random.fork_rng(devices=[]):  # eval never shifts the training RNG stream
            torch.manual_seed(seed)
            atk = PGD(net, eps=eps, alpha=alpha, steps=steps, random_start=True, model_mode="eval", autocast=amp)
            for s in range(lo, hi, batch_size):
                xb = x[s:min(hi, s + batch_size)].to(device)
                yb = y[s:min(hi, s + batch_size)].to(device)
                with _autocast(device, amp):
                    clean = _predict(net, xb) == yb
                adv = atk(xb, yb) if eps > 0 else xb
                with _autocast(device, amp):
                    robust = _predict(net, adv) == yb
                counts += torch.stack([clean.sum(), robust.sum(), torch.tensor(yb.numel(), device=device)]).double()
    finally:
        net.train(was_training)
    D.all_reduce_sum(counts)
    c, r, total = counts.tolist()
    return {"clean_acc": c / max(total, 1), "robust_acc": r / max(total, 1), "n": int(total)}


def _autocast(device, amp):
    if amp is None:
        return contextlib.nullcontext()
    dev = torch.device(device).type
    return torch.autocast(device_type=dev, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _to_cpu(obj):
    """``obj`` with every tensor moved to the CPU (what all_gather_object pickles, on any backend)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ------------------------------------------------------------------ loop
class _Sigterm:
    """Turns SIGTERM into a flag the loop polls between steps (main thread only)."""

    def __init__(self):
        self.flag = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


class Trainer:
    """Train ``model`` with ``method`` on ``train`` data, evaluating on ``heldout`` after each epoch.

    Args:
        model: an nn.Module mapping images in [0, 1] to logits (use
            ``fastadv.models.NormalizedModel`` for standardized inputs).
        method: a ``fastadv.train.methods.Method`` (e.g. ``PGDAT(eps=0.3, alpha=0.01, steps=40)``).
        train: (x, y) tensors, a ``TensorData``/``DatasetData``, or a map-style Dataset.
        heldout: (x, y) tensors for the per-epoch clean/robust accuracy, or None.
        config: ``TrainConfig``.
        callbacks: functions ``cb(trainer, record)`` called after every
            optimizer step with the step record (tests use it to inject SIGTERM).
    ``fit()`` returns a dict: final metrics, 'stopped' (SIGTERM/max_steps),
    'checkpoint' (path of the last one written) and 'history' (epoch records).
    """

    def __init__(self, model: nn.Module, method: Method, train, heldout=None, config: TrainConfig | None = None,
                 callbacks: list[Callable] | None = None):
        self.cfg = config or TrainConfig()
        self.dist = D.setup(self.cfg.device)
        if self.cfg.device:
            device = torch.device(self.cfg.device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", self.dist.local_rank)
        else:
            device = torch.device("cpu")
        self.device = device
        from fastadv.data.loader import parse_schedule

        self.phases = parse_schedule(self.cfg.resize_schedule)
        for b in {self.cfg.batch_size, *(p.batch_size for p in self.phases if p.batch_size)}:
            if b % self.dist.world_size:
                raise ValueError(f"batch_size {b} must be divisible by the world size {self.dist.world_size}")
            if (b // self.dist.world_size) % self.cfg.grad_accum:
                raise ValueError(f"grad_accum {self.cfg.grad_accum} must divide each rank's batch (global batch {b} "
                                 f"/ {self.dist.world_size} rank(s) = {b // self.dist.world_size})")
        self.train_data = _as_data(train, self.cfg.workers, prefetch=self.cfg.prefetch,
                                   pin_memory=device.type == "cuda", on_bad_image=self.cfg.on_bad_image)
        if self.train_data is None or len(self.train_data) == 0:
            raise ValueError("train data is empty")
        if any(p.size for p in self.phases) and not getattr(self.train_data, "resizable", False):
            raise ValueError("resize_schedule sets image sizes, but the training data cannot be resized (in-memory "
                             "tensors, or a Dataset without load(i, epoch, size)); give batch sizes only "
                             "('0:@256,...') or use fastadv.data.ImageFolder")
        self.heldout = heldout
        self.callbacks = list(callbacks or [])
        # per-rank stream: random starts and noise are independent across ranks (the model's initial weights
        # come from rank 0: DDP broadcasts them)
        torch.manual_seed(D.rank_seed(self.cfg.seed, self.dist.rank))

        net = model.to(device)
        if self.cfg.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self.net = net
        self.model = net
        if self.dist.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == "cuda" else None)
        self.attack_net = net
        if self.cfg.compile:
            self.model = torch.compile(self.model)
            self.attack_net = torch.compile(net)

        self.method = method
        if self.cfg.grad_accum > 1 and not method.supports_grad_accum:
            raise ValueError(f"grad_accum={self.cfg.grad_accum}: method {method.name!r} cannot split a batch into "
                             f"micro-batches ({method.grad_accum_refusal}); use grad_accum=1")
        self.local_batch = self.cfg.batch_size // self.dist.world_size
        n = len(self.train_data)
        # batches of each epoch (a resize schedule can change the global batch per phase)
        self.epoch_steps = [n // self.batch_size_at(e) for e in range(self.cfg.epochs)]
        if min(self.epoch_steps) == 0:
            big = max(self.batch_size_at(e) for e in range(self.cfg.epochs))
            raise ValueError(f"batch_size {big} is larger than the training set ({n} samples)")
        self.steps_per_epoch = self.epoch_steps[0]  # fit() sets it to the current epoch's count
        # bind before the optimizer: a method may add trainable modules (DIAL's domain head) at bind time
        method.bind(BindContext(net=net, model=self.model, attack_net=self.attack_net, device=device,
                                amp=self.cfg.amp, epochs=self.cfg.epochs, steps_per_epoch=self.steps_per_epoch))
        self.extra_params = [p for m in method.extra_modules() for p in m.parameters() if p.requires_grad]
        params = [p for p in net.parameters() if p.requires_grad] + self.extra_params
        if self.cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=self.cfg.lr, momentum=self.cfg.momentum,
                                             weight_decay=self.cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        total = sum(self.epoch_steps) * method.replays
        self.scheduler = make_scheduler(self.optimizer, self.cfg.schedule, total, self.cfg.warmup_steps,
                                        lr_points=self.cfg.lr_points,
                                        epoch_steps=[k * method.replays for k in self.epoch_steps])
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.cfg.amp == "fp16")
        self.out_dir = pathlib.Path(self.cfg.out_dir) if self.cfg.out_dir else None
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.history: list[dict] = []
        self.last_checkpoint: pathlib.Path | None = None

    def batch_size_at(self, epoch: int) -> int:
        """The global batch of ``epoch`` (its resize-schedule phase's, else ``batch_size``)."""
        from fastadv.data.loader import phase_at

        return phase_at(self.phases, epoch).batch_size or self.cfg.batch_size

    def image_size_at(self, epoch: int) -> int | None:
        """The training image side of ``epoch`` (None: the dataset's own)."""
        from fastadv.data.loader import phase_at

        return phase_at(self.phases, epoch).size

    # ----------------------------------------------------------- files
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def checkpoint_path(self) -> pathlib.Path | None:
        return self.out_dir / "last.pt" if self.out_dir else None

    def config_dict(self) -> dict:
        d = dataclasses.asdict(self.cfg)
        d["method"] = self.method.name
        d["method_args"] = self.method.describe()
        d["world_size"] = self.dist.world_size
        return d

    def save(self) -> pathlib.Path | None:
        path = self.checkpoint_path()
        if path is None:
            return None
        ranks_rng = D.all_gather_object(rng_state())  # every rank's stream, so a resume continues each
        # every rank's method state too: Free-AT's perturbation, counters and the like are per rank
        ranks_method = D.all_gather_object(_to_cpu(self.method.state_dict())) if self.dist.distributed else None
        if self.is_main:
            save_checkpoint(path, model=self.net, optimizer=self.optimizer, scheduler=self.scheduler,
                            scaler=self.scaler, method_state=self.method.state_dict(), epoch=self.epoch,
                            step=self.step, batch_in_epoch=self.batch_in_epoch, config=self.config_dict(),
                            extra={"rng_ranks": ranks_rng, "method_ranks": ranks_method})
        D.barrier()
        self.last_checkpoint = path
        return path

    def load(self, path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        old = ckpt.get("config", {})
        ranks_rng = (ckpt.get("extra") or {}).get("rng_ranks")
        written = len(ranks_rng) if ranks_rng else old.get("world_size", 1)
        if written != self.dist.world_size:
            raise CheckpointError(f"{path}: written by {written} rank(s), this run has {self.dist.world_size}: each "
                                  "rank's random stream and data shard are in the checkpoint, so resume with the same "
                                  "number of ranks")
        for key in ("batch_size", "epochs", "method", "resize_schedule"):
            mine = self.config_dict().get(key)
            if key in old and old[key] != mine:
                raise CheckpointError(f"{path}: the checkpoint was written with {key}={old[key]!r}, this run has "
                                      f"{key}={mine!r}; resume with the same settings")
        try:
            self.net.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: model weights do not match this architecture: {exc}") from exc
        if ckpt.get("optimizer") is not None:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        ranks_method = (ckpt.get("extra") or {}).get("method_ranks")
        self.method.load_state_dict(ranks_method[self.dist.rank] if ranks_method else ckpt.get("method", {}))
        set_rng_state(ranks_rng[self.dist.rank] if ranks_rng else ckpt["rng"])
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.history = [r for r in self._read_history() if r.get("epoch", -1) < self.epoch]

    def _read_history(self) -> list[dict]:
        if not self.out_dir or not (self.out_dir / "metrics.jsonl").exists():
            return []
        out = []
        for line in (self.out_dir / "metrics.jsonl").read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("type") == "epoch":
                out.append(r)
        return out

    def _log(self, record: dict) -> None:
        if not (self.is_main and self.out_dir):
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("type") == "epoch":
            path = self.out_dir / "metrics.csv"
            fields = ["epoch", "step", "train_loss", "train_acc", "clean_acc", "robust_acc", "lr", "epoch_time_s",
                      "data_wait_s",
                      "images_per_s"]
            new = not path.exists()
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(record)

    # ------------------------------------------------------------ train
    def _index_batches(self, epoch: int) -> list[torch.Tensor]:
        order = D.global_permutation(len(self.train_data), self.cfg.seed, epoch)
        return D.shard_indices(order, self.batch_size_at(epoch), self.dist.rank, self.dist.world_size,
                               drop_last=True)

    def _train_step(self, x, y):
        cfg = self.cfg
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        k = cfg.grad_accum
        xs, ys = (x, ), (y, )
        if k > 1:
            xs, ys = x.chunk(k), y.chunk(k)  # equal parts: the trainer checked that k divides the batch
        for _ in range(self.method.replays):
            losses, correct, n = [], 0, 0
            for i, (xc, yc) in enumerate(zip(xs, ys)):
                # DDP all-reduces the gradients once, on the last micro-batch
                sync = contextlib.nullcontext() if i == k - 1 or not self.dist.distributed else self.model.no_sync()
                with sync:
                    with _autocast(self.device, cfg.amp):
                        out = self.method.loss(xc, yc)
                    if i == 0:  # after the first loss: whatever a method's loss left in .grad is not trained on
                        self.optimizer.zero_grad(set_to_none=True)
                    # mean over the rank's batch = mean of the k equal micro-batch means
                    self.scaler.scale(out.loss / k if k > 1 else out.loss).backward()
                losses.append(out.loss.detach())
                with torch.no_grad():
                    correct = correct + (out.logits.argmax(1) == out.y).sum()
                n += out.y.numel()
            if self.extra_params and self.dist.distributed:
                D.all_reduce_mean_grads(self.extra_params)  # not inside DDP: average them as DDP does the net's
            self.method.after_backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.method.after_step()
        loss = losses[0] if k == 1 else torch.stack(losses).mean()
        return loss, correct, n

    def _evaluate(self, epoch: int) -> dict:
        if self.heldout is None:
            return {}
        kw = dict(eps=self.cfg.eval_eps, alpha=self.cfg.eval_alpha, steps=self.cfg.eval_steps,
                  batch_size=self.cfg.eval_batch_size, device=self.device, amp=self.cfg.amp,
                  seed=self.cfg.seed + 7919 * epoch)
        if self.dist.distributed and hasattr(self.heldout, "shard"):
            # lazily decoded images (ImageFolder): each rank decodes and holds only its share
            x, y = self.heldout.shard(self.cfg.eval_samples, self.dist.rank, self.dist.world_size)
            return evaluate_accuracy(self.net, x, y, presharded=True, **kw)
        x, y = self.heldout
        if self.cfg.eval_samples is not None:
            x, y = x[: self.cfg.eval_samples], y[: self.cfg.eval_samples]
        return evaluate_accuracy(self.net, x, y, **kw)

    def fit(self) -> dict:
        cfg = self.cfg
        have_checkpoint = bool(cfg.resume and self.checkpoint_path() and self.checkpoint_path().exists())
        if cfg.resume and self.dist.distributed:
            # Every rank loads the checkpoint (its RNG stream and data position are in it). On several nodes
            # whose --out is not on a shared filesystem only rank 0's node has it: the other ranks would start
            # from scratch beside a resumed rank 0, silently. Refuse unless every rank sees it, or none does.
            seen = D.all_gather_object(have_checkpoint)
            if any(seen) and not all(seen):
                present = [r for r, s in enumerate(seen) if s]
                missing = [r for r, s in enumerate(seen) if not s]
                raise CheckpointError(
                    f"resume: {self.checkpoint_path()} exists on rank(s) {present} but not on rank(s) {missing}: "
                    "every rank reads the checkpoint, so the output folder (--out) must be on a filesystem that "
                    "every node shares")
        if have_checkpoint:
            self.load(self.checkpoint_path())
            if self.is_main:
                print(f"resumed from {self.checkpoint_path()} at epoch {self.epoch}, batch {self.batch_in_epoch}, "
                      f"step {self.step}", file=sys.stderr)
        elif self.is_main and self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics.jsonl", "metrics.csv"):
                (self.out_dir / name).unlink(missing_ok=True)
        stopped = False
        steps_this_call = 0
        self.net.train()
        with _Sigterm() as sig:
            while self.epoch < cfg.epochs and not stopped:
                epoch = self.epoch
                self.method.on_epoch(epoch, cfg.epochs)
                batches = self._index_batches(epoch)
                self.steps_per_epoch = len(batches)
                size = self.image_size_at(epoch)
                if self.is_main and self.phases and cfg.progress and (epoch == 0 or self.batch_in_epoch or any(
                        p.epoch == epoch for p in self.phases)):
                    print(f"epoch {epoch + 1}: images {size or 'as the dataset'} px, global batch "
                          f"{self.batch_size_at(epoch)}, {len(batches)} steps", file=sys.stderr)
                skip = self.batch_in_epoch
                wait0 = getattr(self.train_data, "wait_s", 0.0)
                sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss*n, correct, n
                bar = None
                if cfg.progress and self.is_main:
                    from tqdm.auto import tqdm

                    bar = tqdm(total=len(batches), initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                               unit="batch", dynamic_ncols=True, leave=True, file=sys.stderr)
                t0 = time.perf_counter()
                seen = 0
                total_steps = sum(self.epoch_steps) * self.method.replays
                for x, y in self.train_data.batches(batches[skip:], self.device, epoch, cfg.seed, cfg.augment,
                                                    start=skip, size=size, rank=self.dist.rank):
                    self.method.on_step(self.step, total_steps)
                    loss, correct, n = self._train_step(x, y)
                    self.step += self.method.replays
                    self.batch_in_epoch += 1
                    steps_this_call += 1
                    sums += torch.stack([loss.double() * n, correct.double(), torch.tensor(float(n), device=self.device,
                                                                                          dtype=torch.float64)])
                    seen += n * self.dist.world_size
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    record = {"type": "step", "epoch": epoch, "step": self.step, "loss": float(loss),
                              "acc": float(correct) / max(n, 1), "lr": self.optimizer.param_groups[0]["lr"],
                              "images_per_s": rate}
                    if not math.isfinite(record["loss"]):
                        # the loss is on the host already (the record): a diverged run stops here, naming the
                        # step, instead of training on NaN weights for the rest of the run (AFD's authors' lrs
                        # diverged on the MNIST CNN by step 40 of 80)
                        raise FloatingPointError(
                            f"{self.method.name}: the training loss is {record['loss']} at epoch {epoch + 1}, step "
                            f"{self.step}; the run diverged (lower the learning rate(s) or the method's weights); "
                            f"last checkpoint: {self.last_checkpoint}")
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                        img_s=f"{rate:.0f}", refresh=False)
                        bar.update(1)
                    if cfg.log_every and self.batch_in_epoch % cfg.log_every == 0:
                        self._log(record)
                    for cb in self.callbacks:
                        cb(self, record)
                    want_stop = sig.flag or (cfg.max_steps is not None and steps_this_call >= cfg.max_steps)
                    if D.broadcast_flag(want_stop, self.device) if self.dist.distributed else want_stop:
                        stopped = True
                        break
                    if cfg.save_every and self.batch_in_epoch % cfg.save_every == 0 and \
                            self.batch_in_epoch < len(batches):
                        self.save()
                if bar is not None:
                    bar.close()
                if stopped:
                    self.save()
                    if self.is_main:
                        why = "SIGTERM" if sig.flag else f"max_steps={cfg.max_steps}"
                        where = f"; checkpoint {self.last_checkpoint}" if self.last_checkpoint else ""
                        print(f"stopped ({why}) at epoch {epoch + 1}, batch {self.batch_in_epoch}{where}; "
                              "continue with --resume", file=sys.stderr)
                    break
                epoch_time = time.perf_counter() - t0
                D.all_reduce_sum(sums)
                ev = self._evaluate(epoch)
                total_n = max(sums[2].item(), 1.0)
                # seconds this rank's loop waited for batches (the largest over ranks: the slowest sets the pace)
                wait = torch.tensor([getattr(self.train_data, "wait_s", 0.0) - wait0], dtype=torch.float64)
                if self.dist.distributed:
                    wait = wait.to(self.device)
                    torch.distributed.all_reduce(wait, op=torch.distributed.ReduceOp.MAX)
                data_wait = float(wait.item())
                record = {"type": "epoch", "epoch": epoch, "step": self.step, "train_loss": sums[0].item() / total_n,
                          "train_acc": sums[1].item() / total_n, "lr": self.optimizer.param_groups[0]["lr"],
                          "epoch_time_s": epoch_time, "images_per_s": seen / max(epoch_time, 1e-9),
                          "data_wait_s": data_wait,
                          "bound": "data" if data_wait > 0.1 * epoch_time else "model",
                          "image_size": size, "batch_size": self.batch_size_at(epoch), **ev}
                record.update(self.train_data.epoch_stats())
                extra = self.method.epoch_metrics()
                clash = set(extra) & set(record)
                if clash:
                    raise ValueError(f"{type(self.method).__name__}.epoch_metrics() returned reserved keys {sorted(clash)}")
                record.update(extra)
                self.history.append(record)
                self._log(record)
                if self.is_main and cfg.progress:
                    msg = (f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f} | "
                           f"{record['images_per_s']:.0f} img/s, waited {data_wait:.1f} s of {epoch_time:.1f} s for "
                           f"data: {record['bound']}-bound")
                    if record.get("bad_images"):
                        msg += f" | {record['bad_images']} unreadable image(s) skipped so far"
                    if ev:
                        msg += (f" | held-out clean {ev['clean_acc']:.4f} PGD-{cfg.eval_steps} "
                                f"(eps {cfg.eval_eps:g}) {ev['robust_acc']:.4f}")
                    print(msg, file=sys.stderr)
                self.epoch += 1
                self.batch_in_epoch = 0
                self.save()
        if not stopped:
            self.method.release()  # hooks the method put on the network go before anyone evaluates it
            if self.is_main and self.out_dir:
                save_model_file(self.out_dir / "model.pt", self.net, self.cfg.model_meta)
                if cfg.plot:
                    self.plot(self.out_dir / "curves.png")
        result = {k: v for k, v in (self.history[-1] if self.history else {}).items() if k not in ("type", "epoch")}
        # 'epoch' = epochs completed (the next one to run), not the last record's 0-based index
        result.update({"stopped": stopped, "epoch": self.epoch, "step": self.step,
                       "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                       "history": self.history})
        return result

    def plot(self, path) -> pathlib.Path | None:
        """PNG of the curves: step loss, and per-epoch train/clean/robust accuracy."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except Exception as exc:  # plotting is a convenience: never fail a run on it
            print(f"no curves.png: matplotlib unavailable ({exc})", file=sys.stderr)
            return None
        steps, epochs = [], []
        if self.out_dir and (self.out_dir / "metrics.jsonl").exists():
            for line in (self.out_dir / "metrics.jsonl").read_text().splitlines():
                r = json.loads(line)
                (steps if r["type"] == "step" else epochs).append(r)
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        if steps:
            axes[0].plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1)
        axes[0].set(xlabel="optimizer step", ylabel="training loss", title=f"{self.method.name}: loss")
        ep = [r["epoch"] + 1 for r in epochs]
        for key, label in (("train_acc", "train (on training inputs)"), ("clean_acc", "held-out clean"),
                           ("robust_acc", f"held-out PGD-{self.cfg.eval_steps} eps={self.cfg.eval_eps:g}")):
            vals = [r.get(key) for r in epochs]
            if any(v is not None for v in vals):
                axes[1].plot(ep, vals, marker="o", label=label)
        axes[1].set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title="accuracy")
        axes[1].legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return pathlib.Path(path)
