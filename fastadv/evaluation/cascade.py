"""The per-sample attack cascade, the threat-model check of every returned point, and the resume state.

Per batch (AutoAttack's ``run_standard_evaluation``): the clean prediction,
then each attack in order on the samples that are still robust (with
``cascade=False``: on every clean-correct sample). A sample counts as fooled
by an attack only if the returned point is misclassified AND lies inside the
evaluation's threat model (:func:`inside_threat_model`): the norm ball of
radius eps around the clean image, the box, finite values. Points outside are
counted per attack ("invalid") and never as fooled.

Randomness: each (batch, attack) pair runs under its own seed,
``seed * 1_000_003 + 1009 * batch + attack index``, inside
``torch.random.fork_rng``, so the global RNG state is unchanged afterwards
and a resumed, reordered or sharded run draws exactly the numbers an
uninterrupted single-process run draws for the same batch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pathlib
import tempfile
import time
from typing import Iterable, Iterator

import torch

__all__ = ["iterate_batches", "fingerprint", "inside_threat_model", "run_batch", "ResumeState", "atomic_write"]


def iterate_batches(data, batch_size: int, n: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches from a tensor pair or an iterable of batches; at most n samples in all."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"data[1] must be a tensor of labels, got {type(y).__name__}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data has mismatched sizes: {x.shape[0]} images and {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise ValueError("data is empty: 0 images")
        if n is not None:
            x, y = x[:n], y[:n]
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
        return
    if isinstance(data, torch.Tensor):
        raise TypeError("data must be a pair (x, y) of tensors or an iterable of (x, y) batches, got one tensor")
    seen = 0
    for item in data:
        xb, yb = item[0], item[1]
        if n is not None:
            if seen >= n:
                return
            xb, yb = xb[: n - seen], yb[: n - seen]
        seen += xb.shape[0]
        yield xb, yb
    if seen == 0:
        raise ValueError("data is empty: the iterable gave no batch")


def atomic_write(path: pathlib.Path, text: str) -> None:
    """Write text to path through a temporary file and ``os.replace`` (a crash leaves the old file whole)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _hash_model(h, model) -> None:
    """Every parameter and buffer, bytes and all (a sum would miss a permutation of weights)."""
    if not isinstance(model, torch.nn.Module):
        h.update(f"callable:{type(model).__qualname__}".encode())
        return
    with torch.no_grad():
        for name, t in model.state_dict().items():
            h.update(name.encode())
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            if t.numel():
                c = t.detach().contiguous().cpu()
                if c.dtype == torch.bfloat16:
                    c = c.view(torch.int16)
                h.update(c.numpy().tobytes())


def fingerprint(model, settings: dict) -> str:
    """sha256 (16 hex) of the model's weights and every setting that changes the result."""
    h = hashlib.sha256()
    # sort_keys would sort the attacks dict too; the cascade order changes the per-attack counts
    h.update(json.dumps([settings, list(settings.get("attacks", {}))], sort_keys=True, default=str).encode())
    _hash_model(h, model)
    return h.hexdigest()[:16]


def inside_threat_model(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, clip) -> torch.Tensor:
    """Per sample, bool (B,): adv in the box, finite, and ||adv - x||_p <= eps up to float32 rounding.

    The distance is summed in float64, so the only slack is the rounding of
    the float32 images themselves: at most half an ulp of 1 (6e-8) per
    coordinate, i.e. 6e-8 (Linf), 6e-8 sqrt(d) (L2), 6e-8 d (L1), plus 1e-6
    relative for the radius. The box is checked exactly: every attack clamps.
    """
    b = x.shape[0]
    d = (adv.double() - x.double()).reshape(b, -1)
    dim = d.shape[1]
    ulp = 6e-8 * max(1.0, abs(clip[0]), abs(clip[1]))
    if norm == "linf":
        dist, slack = d.abs().amax(1), ulp
    elif norm == "l2":
        dist, slack = d.norm(dim=1), ulp * math.sqrt(dim)
    else:
        dist, slack = d.abs().sum(1), ulp * dim
    flat = adv.reshape(b, -1)
    finite = torch.isfinite(flat).all(1)
    inbox = (flat >= clip[0]).all(1) & (flat <= clip[1]).all(1)
    return (dist <= eps * (1 + 1e-6) + slack) & inbox & finite


def attack_seed(seed: int, batch_index: int, attack_index: int) -> int:
    return (seed * 1_000_003 + 1009 * batch_index + attack_index) % (2 ** 63)


def _set_generator(atk, gseed: int, device) -> None:
    """Give an attack its own generator, seeded for this batch."""
    if hasattr(atk, "generator"):
        g = torch.Generator(device=device)
        g.manual_seed(gseed)
        atk.generator = g


@contextlib.contextmanager
def seeded(gseed: int, device, atk=None):
    """Run with the global RNG of the CPU and of ``device`` seeded to ``gseed`` and ``atk.generator`` (if the
    attack has one) replaced by a fresh generator seeded to ``gseed``; everything is put back afterwards.

    ``torch.manual_seed`` would also reseed every other CUDA device (or queue a seed for a CUDA not yet
    initialised), which ``fork_rng`` does not restore: only the two generators used here are touched.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(gseed)
        if cuda:
            torch.cuda.default_generators[device.index if device.index is not None
                                          else torch.cuda.current_device()].manual_seed(gseed)
        had = atk is not None and hasattr(atk, "generator")
        old = atk.generator if had else None
        if had:
            _set_generator(atk, gseed, device)
        try:
            yield
        finally:
            if had:
                atk.generator = old


@torch.no_grad()
def _predict(guard, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """argmax of the logits; -1 where they are not finite (an output the model cannot score is no
    evidence of robustness: it never counts as the true class)."""
    if not x.shape[0]:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    out = []
    for c in x.split(chunk):
        z = guard.logits(c)
        out.append(torch.where(torch.isfinite(z).all(1), z.argmax(1), torch.full_like(z[:, 0], -1).long()))
    return torch.cat(out)


def run_batch(guard, named: list, xb: torch.Tensor, yb: torch.Tensor, *, batch_index: int, eps: float, norm: str,
              seed: int, cascade: bool) -> dict:
    """The cascade on one batch; returns its JSON record.

    Record: n, labels, correct, robust (lists per sample), and per attack:
    fooled (list), ran_on, invalid (returned points outside the threat
    model), nonfinite (returned points where the model's logits are NaN or
    inf: counted as fooled), time_s. ``named``: [(name, Attack)]; every
    attack runs under :func:`seeded` (its generator, if it has one, replaced
    for the batch and restored afterwards), so a batch draws the same numbers
    whichever rank runs it and whether or not the run was resumed.
    """
    device = xb.device
    with guard.model_context(), torch.no_grad():
        logits = guard.logits(xb)
    if not torch.isfinite(logits).all():
        raise ValueError(f"model returned non-finite (NaN or inf) logits on batch {batch_index}: the evaluation "
                         "cannot score it")
    correct = logits.argmax(1) == yb
    robust = correct.clone()
    rec = {"n": int(xb.shape[0]), "labels": yb.tolist(), "correct": correct.tolist(), "attacks": {}}
    for ai, (nm, atk) in enumerate(named):
        pool = robust if cascade else correct
        idx = pool.nonzero().squeeze(1)
        fooled = torch.zeros_like(correct)
        invalid, nonfinite, dt = 0, 0, 0.0
        if idx.numel():
            with seeded(attack_seed(seed, batch_index, ai), device, atk):
                t0 = time.perf_counter()
                xin = xb[idx]
                adv = atk(xin, yb[idx])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
            if not isinstance(adv, torch.Tensor) or tuple(adv.shape) != tuple(xin.shape):
                got = tuple(adv.shape) if isinstance(adv, torch.Tensor) else type(adv).__name__
                raise ValueError(f"attack {nm!r} returned {got}, not a tensor of the input's shape "
                                 f"{tuple(xin.shape)}")
            adv = adv.to(device=device, dtype=torch.float32)
            ok = inside_threat_model(adv, xin, eps, norm, guard.clip)
            invalid = int((~ok).sum())
            with guard.model_context():
                pred = _predict(guard, adv)
            nonfinite = int(((pred < 0) & ok).sum())
            fooled[idx] = (pred != yb[idx]) & ok
        robust &= ~fooled
        rec["attacks"][nm] = {"fooled": fooled.tolist(), "ran_on": int(idx.numel()), "time_s": dt,
                              "invalid": invalid, "nonfinite": nonfinite}
    rec["robust"] = robust.tolist()
    return rec


class ResumeState:
    """Per-batch records, written after every batch; a later run with the same fingerprint skips them.

    ``path`` None keeps the state in memory only. A file that holds another
    evaluation (other fingerprint) is an error naming ``state_path``.
    """

    def __init__(self, path, fp: str, settings: dict):
        self.path = pathlib.Path(path) if path is not None else None
        self.data = {"fingerprint": fp, "settings": settings, "batches": {}}
        if self.path is not None and self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"state_path {self.path} is not an evaluation state file ({exc})") from exc
            if not isinstance(saved, dict) or saved.get("fingerprint") != fp:
                old = saved.get("settings") if isinstance(saved, dict) else None
                diff = ""
                if isinstance(old, dict):
                    keys = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
                    diff = f" (differs in: {', '.join(keys) if keys else 'model weights'})"
                raise ValueError(f"state_path {self.path} holds a different evaluation{diff}; delete it or pass "
                                 "another state_path")
            if isinstance(saved.get("batches"), list):  # a state written by fastadv <= 0.1
                saved["batches"] = {str(i): b for i, b in enumerate(saved["batches"])}
            self.data = saved

    def done(self, batch_index: int, labels: torch.Tensor | None = None) -> bool:
        """Whether the batch is finished; with ``labels``, also that it was this data (else an error)."""
        rec = self.data["batches"].get(str(batch_index))
        if rec is None:
            return False
        if labels is not None and rec.get("labels") is not None and rec["labels"] != labels.tolist():
            raise ValueError(f"state_path {self.path} holds batch {batch_index} of other data (its labels differ); "
                             "delete it or pass another state_path")
        return True

    def add(self, batch_index: int, rec: dict) -> None:
        self.data["batches"][str(batch_index)] = rec
        if self.path is not None:
            atomic_write(self.path, json.dumps(self.data))

    def records(self) -> list[dict]:
        """Records in batch order."""
        return [self.data["batches"][k] for k in sorted(self.data["batches"], key=int)]


def shard(batches: Iterable, rank: int, world: int) -> Iterator[tuple[int, tuple]]:
    """(global batch index, batch) for the batches of this rank: index % world == rank."""
    for i, b in enumerate(batches):
        if i % world == rank:
            yield i, b
