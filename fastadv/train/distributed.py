"""Multi-process training through ``torch.distributed``, launched by ``torchrun``.

One code path for every scale: ``torchrun --nproc_per_node=N -m fastadv.cli
train ...`` (add ``--nnodes``/``--rdzv_endpoint`` for several nodes) sets RANK,
WORLD_SIZE and LOCAL_RANK; :func:`setup` then joins the process group with
NCCL on GPUs and gloo on CPUs. Without those variables everything below is a
single-process no-op, so the loop never branches on "is this distributed".

Data split (:func:`shard_indices`): every rank draws the same permutation
from (seed, epoch) and takes its own contiguous slice of each global batch, so
N ranks with local batch b see exactly the global batches one process with
batch N*b sees. DDP averages gradients across ranks, which equals the
gradient of the mean loss over the global batch: the two runs agree up to
floating-point summation order (tested with gloo on CPU).
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup", "cleanup", "info", "all_reduce_sum", "broadcast_flag", "barrier", "shard_indices",
           "global_permutation", "all_gather_object", "rank_seed"]


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO = DistInfo()


def setup(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group torchrun describes (env RANK/WORLD_SIZE); no-op without it.

    Backend: NCCL when the training device is CUDA, gloo otherwise. On GPU the
    process uses cuda:LOCAL_RANK.
    """
    global _INFO
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _INFO = DistInfo()
        return _INFO
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else None
    use_cuda = dev.type == "cuda" if dev is not None else torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        import datetime

        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    _INFO = DistInfo(rank=rank, world_size=world, local_rank=local, backend=backend)
    return _INFO


def info() -> DistInfo:
    return _INFO


def cleanup() -> None:
    global _INFO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO = DistInfo()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place; returns t). Identity on one process."""
    if _INFO.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean_grads(params) -> None:
    """Average the .grad of ``params`` across ranks (no-op when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def broadcast_flag(flag: bool, device) -> bool:
    """True on every rank if any rank's flag is True (e.g. one rank got SIGTERM)."""
    if not _INFO.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] on one process."""
    if not _INFO.distributed:
        return [obj]
    out = [None] * _INFO.world_size
    dist.all_gather_object(out, obj)
    return out


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own RNG stream (random starts, noise): distinct per rank, rank 0 = seed.

    With one shared seed every rank drew the same random starts and noise, so N ranks perturbed their
    shards with N copies of one draw instead of N independent draws.
    """
    return int(seed) + 1_000_003 * int(rank)


def barrier() -> None:
    if _INFO.distributed:
        dist.barrier()


def global_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The same order of 0..n-1 on every rank: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return torch.randperm(n, generator=g)


def shard_indices(order: torch.Tensor, global_batch: int, rank: int, world: int, drop_last: bool = True) -> list[torch.Tensor]:
    """This rank's index batches: its contiguous 1/world slice of each global batch.

    ``global_batch`` must divide by ``world``. The last, short global batch is
    dropped when ``drop_last``; otherwise it is split as evenly as possible
    (ranks may then get batches differing in size by one, or an empty one, as
    DistributedSampler pads instead; evaluation uses this, training drops).
    """
    if global_batch % world:
        raise ValueError(f"batch size {global_batch} must be divisible by the world size {world}")
    n = order.numel()
    batches = []
    for start in range(0, n, global_batch):
        chunk = order[start:start + global_batch]
        if chunk.numel() < global_batch and drop_last:
            break
        per = -(-chunk.numel() // world)
        batches.append(chunk[rank * per:(rank + 1) * per])
    return batches
