"""The decoded-image data path of ``fastadv.train``: one persistent DataLoader per run, resumable, per-rank.

``EpochLoader(dataset, workers=..., prefetch=..., pin_memory=...,
on_bad_image=...)`` wraps a map-style dataset (``fastadv.data.ImageFolder``
above all) and serves the trainer's index batches:

* one ``torch.utils.data.DataLoader`` for the whole run, built on first use,
  with ``persistent_workers`` (the decoding processes survive from epoch to
  epoch), ``prefetch`` batches in flight per worker, and page-locked
  (pinned) host batches when the training device is CUDA, copied with
  ``non_blocking=True``;
* the order is the trainer's: each epoch the loader gets this rank's index
  batches (``fastadv.train.distributed.shard_indices`` of the permutation
  drawn from (seed, epoch)), so ranks read disjoint shards and a resumed
  run that skips the batches already done reads the rest in the same
  order;
* reproducible augmentation: a sample travels to its worker as a key
  (index, epoch, size, batch seed). A dataset with
  ``load(i, epoch, size, key)`` (``ImageFolder``) draws its crop and flip
  from (seed, epoch, index), and before each batch the worker seeds
  ``random``, ``numpy`` and ``torch`` from (seed, epoch, rank, position of
  the batch in the epoch), for datasets whose transforms use the global
  generators. Neither depends on which worker decodes the batch: seeding
  per (seed, epoch, rank, worker) would not survive a mid-epoch resume,
  since skipping k batches moves every later batch to another worker
  (batches go round-robin);
* progressive resizing: the size travels with the key, so a persistent
  worker needs no message when a phase changes the resolution (see
  :func:`parse_schedule`);
* unreadable images (``on_bad_image``): ``'fail'`` stops the run with a
  :class:`BadImageError` naming the file; ``'skip'`` replaces the sample by
  the next readable one in dataset order (index i+1, i+2, ... modulo N),
  augmented with the skipped sample's random stream so it is not a copy of
  that image's own crop, prints the path on stderr and counts it
  (:attr:`EpochLoader.bad`), so the batch keeps its shape and the run stays
  deterministic. Decoding workers ignore SIGTERM: a SIGTERM to the whole
  process group (Slurm, Kubernetes) reaches the trainer, which stops after
  the current step and checkpoints, instead of killing the workers under
  it.

The time the training loop waits for a batch is summed in
:attr:`EpochLoader.wait_s` (the trainer logs it per epoch as
``data_wait_s``).
"""
from __future__ import annotations

import dataclasses
import random
import signal
import sys
import time
import weakref

import numpy as np
import torch

from fastadv.data.mnist import DatasetError

__all__ = ["Phase", "parse_schedule", "phase_at", "EpochLoader", "BadImageError", "BAD_IMAGE_POLICIES",
           "batch_seed", "HeldoutImages"]

BAD_IMAGE_POLICIES = ("skip", "fail")
# consecutive unreadable images tried before a skip gives up (a folder that is mostly corrupt is a setup error)
MAX_REPLACEMENTS = 16


class BadImageError(DatasetError):
    """An image that cannot be decoded, under ``on_bad_image='fail'`` (or too many in a row under 'skip')."""


# ----------------------------------------------------------- schedules
@dataclasses.dataclass(frozen=True)
class Phase:
    """From ``epoch`` on: images at side ``size`` (None: the dataset's own) in global batches of ``batch_size``
    (None: the run's ``batch_size``)."""

    epoch: int
    size: int | None = None
    batch_size: int | None = None


def parse_schedule(spec: str | None) -> list[Phase]:
    """``'0:128@512,6:224@224,12:288@128'`` -> phases (epoch:size[@global batch]).

    Each entry starts a phase at a 0-based epoch; the first must start at 0
    and epochs must increase. ``@batch`` is optional (the run's batch size
    otherwise); ``'0:@256,10:@512'`` changes only the batch. None or ''
    gives [] (no schedule).
    """
    if spec is None or not str(spec).strip():
        return []
    phases = []
    for item in str(spec).split(","):
        item = item.strip()
        ep, sep, rest = item.partition(":")
        size_s, _, batch_s = rest.partition("@")
        try:
            epoch = int(ep)
            size = int(size_s) if size_s.strip() else None
            batch = int(batch_s) if batch_s.strip() else None
        except ValueError:
            raise ValueError(f"resize schedule entry {item!r}: expected EPOCH:SIZE[@BATCH], e.g. 0:128@512") from None
        if not sep or (size is None and batch is None):
            raise ValueError(f"resize schedule entry {item!r}: expected EPOCH:SIZE[@BATCH], e.g. 0:128@512")
        if (size is not None and size < 1) or (batch is not None and batch < 1) or epoch < 0:
            raise ValueError(f"resize schedule entry {item!r}: epoch must be >= 0, size and batch >= 1")
        if phases and epoch <= phases[-1].epoch:
            raise ValueError(f"resize schedule {spec!r}: epochs must increase ({epoch} after {phases[-1].epoch})")
        phases.append(Phase(epoch, size, batch))
    if phases[0].epoch != 0:
        raise ValueError(f"resize schedule {spec!r} must start at epoch 0")
    return phases


def phase_at(phases: list[Phase], epoch: int) -> Phase:
    """The phase that covers ``epoch`` (an empty schedule: Phase(0))."""
    cur = Phase(0)
    for p in phases:
        if p.epoch <= epoch:
            cur = p
    return cur


def batch_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The worker's global-RNG seed for the batch at ``position`` of ``epoch`` on ``rank`` (a 32-bit int)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank), int(position)]).generate_state(1)[0])


# --------------------------------------------------------- the loader
def _seed_globals(s: int) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _worker_init(worker_id: int) -> None:
    # A SIGTERM sent to the process group must stop the trainer cleanly (it checkpoints after the step);
    # workers killed by it would fail the next batch instead. They still exit with their parent.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shutdown(loader) -> None:
    """Stop a persistent DataLoader's workers: ask them to exit, then SIGKILL any left (they ignore SIGTERM,
    so DataLoader's own terminate() and multiprocessing's exit-time join would wait on them forever)."""
    it = getattr(loader, "_iterator", None)
    if it is None or not hasattr(it, "_shutdown_workers"):
        return
    workers = list(getattr(it, "_workers", []))
    it._shutdown_workers()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


def _collate(samples):
    x = torch.stack([s[0] for s in samples])
    y = torch.stack([torch.as_tensor(s[1]) for s in samples]).long()
    bad = [b for s in samples for b in s[2]]
    return x, y, bad


class _Keyed(torch.utils.data.Dataset):
    """Loads keys (index, epoch, size, batch seed); see the module docstring."""

    def __init__(self, dataset, on_bad_image: str):
        self.dataset, self.on_bad_image = dataset, on_bad_image
        # a Subset (fastadv train --train-samples) of a loadable dataset keeps load(): map through its indices
        self.base, self.index = dataset, None
        if isinstance(dataset, torch.utils.data.Subset) and callable(getattr(dataset.dataset, "load", None)):
            self.base, self.index = dataset.dataset, list(dataset.indices)
        self.can_load = callable(getattr(self.base, "load", None))

    def __len__(self):
        return len(self.dataset)

    def _real(self, i: int) -> int:
        return self.index[i] if self.index is not None else i

    def _path(self, i: int) -> str:
        base, i = (self.base, self._real(i)) if self.index is not None else (self.dataset, i)
        if callable(getattr(base, "path", None)):
            return str(base.path(i))
        samples = getattr(base, "samples", None)
        if samples is not None:
            return str(samples[i][0])
        return f"sample {i}"

    def _load(self, i, epoch, size, key):
        if self.can_load:
            return self.base.load(self._real(i), epoch, size, key=self._real(key))
        return self.dataset[i]

    def _one(self, i: int, epoch: int, size):
        n = len(self.dataset)
        bad = []
        for k in range(MAX_REPLACEMENTS + 1):
            j = (i + k) % n
            try:
                x, y = self._load(j, epoch, size, key=i)
                return x, y, tuple(bad)
            except (DatasetError, OSError, SyntaxError, ValueError) as exc:  # PIL raises all of these
                path = self._path(j)
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if self.on_bad_image == "fail":
                    raise BadImageError(f"{path}: unreadable image ({reason}); --on-bad-image skip replaces such "
                                        "images and logs them") from None
                bad.append((path, reason))
        raise BadImageError(f"{len(bad)} unreadable images in a row from {bad[0][0]}: is the folder corrupt?")

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        # torch's fetcher calls this with the whole batch (torch >= 2.0)
        _seed_globals(keys[0][3])
        return [self._one(int(i), int(epoch), size) for i, epoch, size, _ in keys]


class _PlanSampler:
    """A batch sampler the loader keeps for the whole run; each epoch gets a new plan (list of key batches)."""

    def __init__(self):
        self.plan: list[list[tuple]] = []

    def __iter__(self):
        return iter(self.plan)

    def __len__(self):
        return len(self.plan)


class EpochLoader:
    """One DataLoader for a whole run over a map-style ``dataset``; see the module docstring.

    Args:
        dataset: map-style; with ``load(i, epoch, size, key=...)`` (as
            ``ImageFolder``) its augmentation and size follow the keys.
        workers: decoding processes (0: in the main process).
        prefetch: batches in flight per worker (DataLoader's
            ``prefetch_factor``; ignored with 0 workers).
        pin_memory: page-locked host batches (for CUDA devices).
        on_bad_image: 'skip' or 'fail' (see the module docstring).
    """

    def __init__(self, dataset, *, workers: int = 4, prefetch: int = 2, pin_memory: bool = False,
                 on_bad_image: str = "fail"):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be 'skip' or 'fail', got {on_bad_image!r}")
        if int(workers) < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if int(prefetch) < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.dataset = dataset
        self.keyed = _Keyed(dataset, on_bad_image)
        self.workers, self.prefetch, self.pin_memory = int(workers), int(prefetch), bool(pin_memory)
        self._sampler = _PlanSampler()
        self._loader = None
        self.builds = 0  # DataLoaders constructed (one per run)
        self.bad: list[tuple[int, str, str]] = []  # (epoch, path, reason) skipped on this rank
        self.wait_s = 0.0  # seconds the consumer waited for batches

    @property
    def resizable(self) -> bool:
        return self.keyed.can_load

    def _build(self):
        # an explicit generator: DataLoader draws its base seed at every iter(); from the global generator that
        # would shift the training stream (random starts) by one draw per epoch, and a resumed run by one more
        kw = dict(batch_sampler=self._sampler, num_workers=self.workers, collate_fn=_collate,
                  pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0))
        if self.workers > 0:
            kw.update(persistent_workers=True, prefetch_factor=self.prefetch, worker_init_fn=_worker_init)
        self._loader = torch.utils.data.DataLoader(self.keyed, **kw)
        # runs when this EpochLoader is collected or, at the latest, at interpreter exit (before
        # multiprocessing's own exit handler, registered earlier, joins the workers)
        self._finalizer = weakref.finalize(self, _shutdown, self._loader)
        self.builds += 1

    def plan(self, index_batches, epoch: int, seed: int, *, size=None, rank: int = 0, start: int = 0):
        """The key batches for ``index_batches`` (this rank's batches ``start``, ``start + 1``, ... of ``epoch``)."""
        if size is not None and not self.resizable:
            raise ValueError(f"{type(self.dataset).__name__} has no load(i, epoch, size): it cannot be resized "
                             "(progressive resizing needs fastadv.data.ImageFolder or a dataset with that method)")
        return [[(int(i), int(epoch), size, batch_seed(seed, epoch, rank, start + k)) for i in b.tolist()]
                for k, b in enumerate(index_batches)]

    def batches(self, index_batches, device, epoch: int, seed: int, *, size=None, rank: int = 0, start: int = 0):
        """Yield (x, y) on ``device`` for this rank's ``index_batches`` (see :meth:`plan`)."""
        plan = self.plan(index_batches, epoch, seed, size=size, rank=rank, start=start)
        if not plan:
            return
        if self._loader is None:
            self._build()
        self._sampler.plan = plan
        it = iter(self._loader)  # persistent workers: a new epoch reuses them
        non_blocking = self.pin_memory
        while True:
            t = time.perf_counter()
            try:
                xb, yb, bad = next(it)
            except StopIteration:
                return
            xb = xb.to(device, non_blocking=non_blocking)
            yb = yb.to(device, non_blocking=non_blocking)
            self.wait_s += time.perf_counter() - t
            for path, reason in bad:
                self.bad.append((int(epoch), path, reason))
                print(f"fastadv: skipped unreadable image {path} ({reason}); replaced by the next readable one "
                      f"(--on-bad-image skip, {len(self.bad)} so far on this rank)", file=sys.stderr)
            yield xb, yb

    def close(self) -> None:
        """Stop the workers (they also stop when the loader is garbage-collected or the process exits)."""
        if self._loader is not None:
            self._finalizer()
            self._loader = None


# ---------------------------------------------------------- held-out
class HeldoutImages:
    """``k`` held-out images of ``dataset`` (evenly spread over it), decoded when first used, in worker processes.

    Behaves as the pair ``(x, y)`` the trainer and ``fastadv.evaluate``
    take (``x, y = held``; ``held[0]``), but decodes nothing until then:
    a dry run or a startup never pays for it, and when it does run, the
    images are decoded at the eval size (JPEG DCT scaling, see
    ``ImageFolder.load``) by ``workers`` processes. x: float32
    (k, 3, size, size) in [0, 1]; y: int64 (k,).
    """

    def __init__(self, dataset, k: int | None = None, *, workers: int = 4, batch_size: int = 64):
        n = len(dataset)
        k = n if k is None else max(1, min(int(k), n))
        self.dataset, self.k, self.workers, self.batch_size = dataset, k, int(workers), int(batch_size)
        self.indices = torch.linspace(0, n - 1, k).long().tolist()  # spread over the (sorted) classes
        self._pair = None
        self._shard_key, self._shard = None, None  # the last (m, rank, world) shard decoded, and it
        self.decoded_here: int | None = None  # images the last eval_batches call decoded on this rank

    def _decode(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        sub = torch.utils.data.Subset(self.dataset, indices)
        # own generator: decoding must not draw from (and shift) the training run's global stream
        dl = torch.utils.data.DataLoader(sub, batch_size=self.batch_size, num_workers=self.workers,
                                         worker_init_fn=_worker_init if self.workers else None,
                                         generator=torch.Generator().manual_seed(0))
        xs, ys = [], []
        for xb, yb in dl:
            xs.append(xb)
            ys.append(yb.long())
        return torch.cat(xs), torch.cat(ys)

    def materialize(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._pair is None:
            self._pair = self._decode(self.indices)
        return self._pair

    def shard(self, m: int | None, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the first ``m`` images (all k if None), decoded alone: the contiguous
        slice [rank * s, (rank + 1) * s) with s = ceil(m / world), the split ``evaluate_accuracy`` uses.
        Under torchrun each rank then decodes and holds 1/world of the held-out set instead of all of it
        (cached; taken from the whole set when that is decoded already)."""
        m = self.k if m is None else max(0, min(int(m), self.k))
        per = -(-m // max(world, 1))
        lo, hi = min(m, rank * per), min(m, (rank + 1) * per)
        if self._pair is not None:
            return self._pair[0][lo:hi], self._pair[1][lo:hi]
        key = (m, rank, world)
        if self._shard_key != key:
            if hi > lo:
                self._shard = self._decode(self.indices[lo:hi])
            else:
                probe = self.dataset[self.indices[0]][0]
                self._shard = (torch.zeros((0, *probe.shape)), torch.zeros(0, dtype=torch.long))
            self._shard_key = key
        return self._shard

    def eval_batches(self, m: int | None, rank: int, world: int, *, batch_size: int = 500,
                     keep: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``m`` images (all k if None) as ``fastadv.evaluate`` batches of ``batch_size``, decoding
        on this rank only the batches it reads under torchrun: its own (batch i is rank i % world's, the
        evaluation's split), batch 0 (evaluate validates the first batch and reads the class count from it
        on every rank) and, on rank 0, the batches holding the first ``keep`` images (the checks' samples).
        The others are placeholders of the right shape that hold no memory (a broadcast zero) and that
        evaluate never reads on this rank. At 1000 images, batches of 125 and 8 ranks a rank decodes 250
        images instead of 1000 (rank 0: 250 with keep = 128)."""
        m = self.k if m is None else max(1, min(int(m), self.k))
        bs = max(1, int(batch_size))
        spans = [(lo, min(m, lo + bs)) for lo in range(0, m, bs)]
        need = {i for i in range(len(spans)) if i == 0 or i % world == rank or (rank == 0 and spans[i][0] < keep)}
        out: list = []
        for i, (lo, hi) in enumerate(spans):
            if i not in need:
                x0 = out[0][0]
                out.append((x0.new_zeros(()).expand(hi - lo, *x0.shape[1:]),
                            torch.zeros((), dtype=torch.long).expand(hi - lo)))
            elif self._pair is not None:
                out.append((self._pair[0][lo:hi], self._pair[1][lo:hi]))
            else:
                out.append(self._decode(self.indices[lo:hi]))
        self.decoded_here = sum(hi - lo for i, (lo, hi) in enumerate(spans) if i in need)
        return out

    @property
    def decoded(self) -> bool:
        return self._pair is not None

    def __len__(self):
        return 2

    def __iter__(self):
        return iter(self.materialize())

    def __getitem__(self, i):
        return self.materialize()[i]
