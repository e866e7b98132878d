"""The loop every iterative attack shares: forward, loss, input gradient, step.

``run_loop`` runs K steps of ``x <- step(x, grad)`` on a batch and makes it cheap:

* per-sample early stop with batch compaction (``early_stop=True``): a sample
  whose current iterate fools the model (after ``tau`` extra fooled steps,
  Zhang et al. 2020) is frozen there and, at the next compaction, leaves the
  active set; only active samples are forwarded. The frozen iterate is the
  first (or tau-th) fooling one, so the attack's success set is exactly what
  the same loop without compaction gives (tests/test_attacks.py checks it).
* host syncs only for compaction, batched every ``compact_every`` steps
  (default 1 on CPU, where a sync is free, and 4 on CUDA); in between, frozen
  samples ride along with a zero update (``torch.where``), no sync needed;
* the model may run under bf16/fp16 autocast (``Attack(autocast=...)``),
  the state (x, x0, eps, alpha, per-sample extras) stays float32;
* channels_last inputs when the model uses them (``Attack.logits``);
* ``compile=True``: the model is wrapped in ``torch.compile`` (once per model);
  the fused steps are registered ops with fake kernels, so they trace too;
* ``eot_iter=k`` (Expectation over Transformation, Athalye, Carlini & Wagner
  2018, "Obfuscated Gradients Give a False Sense of Security"; Athalye,
  Engstrom, Ilyas & Kwok 2018, "Synthesizing Robust Adversarial Examples"):
  each step's gradient, per-sample loss and logits are the mean over k
  forward+backward passes at the same iterate, which estimates E[grad] of a
  randomized model (input noise, random resizing, dropout at test time).
  AutoAttack sums the k gradients and divides by k, as here, but takes the
  loss and the prediction from the last draw; we average those too, so the
  step-size checkpoints and the fooled test see the expected loss and logits.
  A deterministic model gets the same iterates as k = 1 (bit for bit for
  k = 2, where the sum and the halving are exact, else up to the rounding of
  the mean); k = 1 is the plain loop;
* ``cuda_graph=True`` (CUDA tensors, no early stop, fixed shapes): the whole
  K-step loop (forward, backward, step, K times) is captured once into a CUDA
  graph and replayed per batch, which removes the per-kernel launch cost that
  dominates small models. GPU-only: not exercised by CI on the CPU machine.

``with_restarts`` runs a loop several times from fresh random starts, each
restart only on the samples no earlier restart fooled, keeping per sample the
worst case for the model (a fooling iterate, else the highest loss).
"""
from __future__ import annotations

from typing import Callable

import weakref
from collections import OrderedDict

import torch

from fastadv.attacks.base import Attack, attack_loss, check_int, grad_objective, grad_wrt, is_fooled

StepFn = Callable[[torch.Tensor, torch.Tensor, dict, int, torch.Tensor, torch.Tensor], torch.Tensor]

class _LRU(OrderedDict):
    """A bounded cache, least recently used entry evicted first.

    Compiled models and captured graphs hold their model (and a graph its
    static GPU buffers), so an unbounded dict keyed on ``id(model)`` kept every
    model ever attacked alive, and a recycled id could hand back another
    model's graph. Keys hold a weak reference check instead (see ``_model_ref``).
    """

    def __init__(self, maxsize: int):
        super().__init__()
        self.maxsize = maxsize

    def lookup(self, key):
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


_COMPILED = _LRU(4)   # model -> torch.compile(model)
_GRAPHS = _LRU(8)     # graph_key(...) -> (graph, static buffers, outputs)


def clear_caches() -> None:
    """Drop every compiled model and captured CUDA graph (frees their models and GPU buffers)."""
    _COMPILED.clear()
    _GRAPHS.clear()


def _model_ref(model):
    """(id, weak reference) of the model: the id alone can be reused by a new object after the old one dies."""
    try:
        return id(model), weakref.ref(model)
    except TypeError:  # a plain function or other object without weakref support
        return id(model), None


def _cache_get(cache: _LRU, key, model):
    entry = cache.lookup(key)
    if entry is None:
        return None
    ref, value = entry
    if ref is not None and ref() is not model:  # the id was recycled: stale entry
        del cache[key]
        return None
    return value


def _cache_put(cache: _LRU, key, model, value) -> None:
    cache.put(key, (_model_ref(model)[1], value))


def settings_key(atk) -> tuple:
    """Every public, non-tensor setting of the attack instance (norm, loss, clip, sparsity, model_mode,
    channels_last, targeted, autocast, steps, ...), as a hashable tuple."""
    items = []
    for k, v in sorted(vars(atk).items()):
        if k.startswith("_") or k in ("model", "generator"):
            continue
        if isinstance(v, (bool, int, float, str, type(None), torch.dtype)):
            items.append((k, v))
        elif isinstance(v, tuple) and all(isinstance(e, (bool, int, float, str, type(None))) for e in v):
            items.append((k, v))
    return (type(atk).__module__, type(atk).__qualname__, tuple(items))


def graph_key(atk, step, x: torch.Tensor, steps: int, loss, extra: dict, eot_iter: int) -> tuple:
    """What a captured K-step loop depends on: the model, the step function, the attack's settings, the
    shapes and dtypes of every buffer, steps, loss and EOT count. PGD(norm='l2') and PGD(norm='linf') share
    a step method, so the settings are what keeps their graphs apart."""
    fn = step.__func__ if hasattr(step, "__func__") else step
    return (id(atk.model), id(fn), settings_key(atk), tuple(x.shape), x.dtype, str(x.device), steps,
            loss if isinstance(loss, str) else id(loss),
            tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(extra.items())), eot_iter)


def _expand(value, batch: int, device) -> torch.Tensor:
    """float or (B,) tensor -> float32 (B,) tensor on device."""
    if isinstance(value, torch.Tensor):
        t = value.to(device=device, dtype=torch.float32).reshape(-1)
        return t.expand(batch).clone() if t.numel() == 1 else t.clone()
    return torch.full((batch,), float(value), dtype=torch.float32, device=device)


def model_forward(atk: Attack, compile: bool):
    """The callable that maps x to float32 logits, optionally torch.compile'd once per model."""
    if not compile:
        return atk.logits
    key = id(atk.model)
    compiled = _cache_get(_COMPILED, key, atk.model)
    if compiled is None:
        compiled = torch.compile(atk.model)
        _cache_put(_COMPILED, key, atk.model, compiled)

    def forward(x):
        model = atk.model
        atk.model = compiled
        try:
            return atk.logits(x)
        finally:
            atk.model = model

    return forward


def objective(loss, logits, s, targeted):
    if callable(loss):
        cost, per = loss(logits, s)
        return cost, per.detach()
    return grad_objective(loss, logits, s["y"], targeted)


def _bshape(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def eot_grad(forward, loss, xc: torch.Tensor, s: dict, targeted: bool, eot_iter: int = 1):
    """(grad, per-sample loss, logits) at xc, each the mean over ``eot_iter`` passes (EOT).

    One pass: forward, objective, d objective / d x. With eot_iter > 1 the k
    gradients, losses and logits are summed and divided by k (AutoAttack's
    ``grad /= eot_iter``); the model's own randomness (if any) gives each pass
    a fresh draw. Shapes: xc (B, ...), grad like xc, loss (B,), logits (B, K).
    """
    xr = xc.detach().requires_grad_(True)
    logits = forward(xr)
    cost, per = objective(loss, logits, s, targeted)
    g = grad_wrt(cost, xr)
    if eot_iter == 1:
        return g, per, logits.detach()
    logits = logits.detach()
    for _ in range(eot_iter - 1):
        xr = xc.detach().requires_grad_(True)
        z = forward(xr)
        cost, p = objective(loss, z, s, targeted)
        g = g + grad_wrt(cost, xr)
        per = per + p
        logits = logits + z.detach()
    return g / eot_iter, per / eot_iter, logits / eot_iter


def run_loop(atk: Attack, x0: torch.Tensor, y: torch.Tensor, x: torch.Tensor, steps: int, step: StepFn, *,
             loss: str = "ce", state: dict | None = None, early_stop: bool = False, tau: int = 0,
             compact_every: int | None = None, compile: bool = False, cuda_graph: bool = False,
             eot_iter: int = 1, stop: Callable | None = None) -> dict:
    """K attack steps on a batch, with per-sample early stop and compaction.

    Args:
        atk: the Attack (model, targeted flag, autocast, channels_last).
        x0: (B, ...) float32 clean inputs; y: (B,) labels (targets if atk.targeted).
        x: (B, ...) float32 start (x0 or a random start).
        steps: K >= 0.
        step: ``step(x, grad, s, t, loss, logits) -> x_new`` on the active
            samples; ``s`` holds the active rows of x0 ('x0'), y ('y') and of
            every tensor in ``state`` (per-sample extras such as eps, alpha,
            momentum, best loss); it may update them in place or replace them.
        loss: 'ce' | 'cw' | 'dlr' objective whose input gradient drives the step,
            or a callable ``loss(logits, s) -> (scalar to differentiate, per-sample loss)``
            (e.g. TRADES' KL to the clean prediction held in ``s``).
        early_stop: freeze a sample once fooled (after tau extra fooled steps).
        compact_every: steps between compactions (host syncs); default 1 on CPU, 4 on CUDA.
        compile, cuda_graph: see the module docstring.
        eot_iter: forward+backward passes averaged per step (EOT, default 1; see the module docstring).
        stop: with ``early_stop``, the per-sample stop criterion in place of "fooled":
            ``stop(x, grad, s, t, logits) -> bool (B',)`` on the active samples, evaluated before
            step t; a True sample does not take step t and leaves the batch (FOSC <= c for dynamic
            AT). It must be final: a stopped sample would stay stopped in the uncompacted loop.
    Returns:
        dict of full-batch tensors: 'x' (the final or frozen iterate), every key
        of ``state``, and 'stopped' (bool (B,), True where early stop froze the sample).
    """
    check_int("eot_iter", eot_iter, 1)
    b = x0.shape[0]
    s = {"x0": x0, "y": y}
    for k, v in (state or {}).items():
        s[k] = v
    if steps == 0 or b == 0:
        return {"x": x, **{k: v for k, v in s.items() if k not in ("x0", "y")},
                "stopped": torch.zeros(b, dtype=torch.bool, device=x.device)}
    forward = model_forward(atk, compile)
    if cuda_graph and x.is_cuda and not early_stop:
        return _graphed_loop(atk, forward, x0, y, x, steps, step, loss, s, eot_iter)

    def grad_at(xc, ss):
        return eot_grad(forward, loss, xc, ss, atk.targeted, eot_iter)

    if not early_stop:
        for t in range(steps):
            g, per, logits = grad_at(x, s)
            x = step(x, g, s, t, per, logits)
        return {"x": x, **{k: v for k, v in s.items() if k not in ("x0", "y")},
                "stopped": torch.zeros(b, dtype=torch.bool, device=x.device)}

    every = compact_every or (4 if x.is_cuda else 1)
    out = {"x": x.clone(), **{k: v.clone() for k, v in s.items() if k not in ("x0", "y")}}
    stopped_full = torch.zeros(b, dtype=torch.bool, device=x.device)
    idx = torch.arange(b, device=x.device)
    done = torch.zeros(b, dtype=torch.bool, device=x.device)
    budget = torch.full((b,), int(tau), dtype=torch.int32, device=x.device)
    for t in range(steps):
        g, per, logits = grad_at(x, s)
        fooled = is_fooled(logits, s["y"], atk.targeted) if stop is None else stop(x, g, s, t, logits)
        if tau > 0:
            # FAT (Zhang et al. 2020): a fooled sample may take `tau` more steps.
            newly = fooled & (budget == 0)
            budget = torch.where(fooled & ~done, (budget - 1).clamp_min(0), budget)
            done = done | newly
        else:
            done = done | fooled
        x_new = step(x, g, s, t, per, logits)
        x = torch.where(_bshape(done, x), x, x_new)
        last = t == steps - 1
        if (t + 1) % every == 0 and not last and bool(done.any()):
            keep = ~done
            gone = idx[done]
            out["x"][gone] = x[done]
            stopped_full[gone] = True
            for k in out:
                if k != "x":
                    out[k][gone] = s[k][done]
            if not bool(keep.any()):
                return {**out, "stopped": stopped_full}
            x, idx, budget = x[keep], idx[keep], budget[keep]
            s = {k: v[keep] for k, v in s.items()}
            done = done[keep]
    out["x"][idx] = x
    stopped_full[idx] = done
    for k in out:
        if k != "x":
            out[k][idx] = s[k]
    return {**out, "stopped": stopped_full}


def _graphed_loop(atk, forward, x0, y, x, steps, step, loss, s, eot_iter=1):
    """Capture the whole K-step loop in one CUDA graph (fixed shapes), replay per call.

    The graph is cached per (model, shapes, steps, loss, attack settings).
    Static input buffers are refilled with ``copy_`` before each replay; the
    output buffer is cloned so a later replay cannot overwrite a result.
    GPU-only path: never run on the CPU CI machine.
    """
    extra = {k: v for k, v in s.items() if k not in ("x0", "y")}
    key = graph_key(atk, step, x, steps, loss, extra, eot_iter)
    entry = _cache_get(_GRAPHS, key, atk.model)
    if entry is None:
        static = {"x": x.clone(), "x0": x0.clone(), "y": y.clone(), **{k: v.clone() for k, v in extra.items()}}

        def body():
            xc = static["x"]
            ss = {k: v for k, v in static.items() if k != "x"}
            for t in range(steps):
                g, per, logits = eot_grad(forward, loss, xc, ss, atk.targeted, eot_iter)
                xc = step(xc, g, ss, t, per, logits)
            return xc, ss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (cuDNN autotune, allocator) outside the capture
            saved = {k: v.clone() for k, v in static.items()}
            for _ in range(2):
                body()
                for k, v in saved.items():
                    static[k].copy_(v)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_x, out_s = body()
        entry = (graph, static, out_x, out_s)
        _cache_put(_GRAPHS, key, atk.model, entry)
    graph, static, out_x, out_s = entry
    static["x"].copy_(x)
    static["x0"].copy_(x0)
    static["y"].copy_(y)
    for k, v in extra.items():
        static[k].copy_(v)
    graph.replay()
    result = {"x": out_x.clone(), **{k: out_s[k].clone() for k in extra}}
    result["stopped"] = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return result


def target_groups(todo: torch.Tensor, targets: list, restarts: int, max_rows: int):
    """Groups of a multi-target attack's runs as replicated batches (APGD-T, FAB-T).

    Yields (restart, idx, group) per batch: ``idx`` the samples still to fool (``todo``, read afresh at
    each group, so the caller's updates of ``todo`` shrink the next one) and ``group`` a slice of
    ``targets`` with len(group) * len(idx) <= max_rows (at least one target). Stops when no sample is left.
    """
    for r in range(restarts):
        m = int(todo.sum())
        if m == 0:
            return
        per_group = max(1, max_rows // m)
        for g0 in range(0, len(targets), per_group):
            idx = todo.nonzero().squeeze(1)
            if idx.numel() == 0:
                return
            yield r, idx, targets[g0:g0 + per_group]


def sibling_stop(sample_of_row: torch.Tensor) -> Callable:
    """The stop rule of a multi-target attack whose targets run as rows of one batch (APGD-T, FAB-T).

    Row r attacks sample ``sample_of_row[r]`` toward its ``rank[r]``-th target, and the attack keeps,
    per sample, the lowest-rank row that succeeds. Returns ``stopped(success, sample, rank) -> bool``
    (all (B',), the active rows): True for rows with a lower-rank sibling that has succeeded, now or at
    an earlier call. Such a row can never be the one kept, so stopping it changes the work, never the
    result. The lowest successful rank per sample is kept on the device (a scatter-amin per call), so
    the rule needs no host sync.
    """
    n = int(sample_of_row.max()) + 1 if sample_of_row.numel() else 0
    big = torch.iinfo(torch.int64).max
    lowest = torch.full((n,), big, dtype=torch.int64, device=sample_of_row.device)

    def stopped(success: torch.Tensor, sample: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
        lowest.scatter_reduce_(0, sample, torch.where(success, rank, torch.full_like(rank, big)), reduce="amin")
        return rank > lowest[sample]

    return stopped


@torch.no_grad()
def evaluate_points(atk: Attack, x: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                    batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fooled (B,) bool, per-sample loss (B,)) at x, with the attack's model settings."""
    if x.shape[0] == 0:
        z = torch.zeros(0, device=x.device)
        return z.bool(), z
    logits = atk.logits(x)
    return is_fooled(logits, y, atk.targeted), attack_loss(loss, logits, y, atk.targeted)


def with_restarts(atk: Attack, x0: torch.Tensor, y: torch.Tensor, restarts: int,
                  run_once: Callable[[torch.Tensor | None, int], torch.Tensor], loss: str = "ce") -> torch.Tensor:
    """Run ``run_once(idx, r) -> x_adv[idx]`` up to ``restarts`` times.

    ``idx`` is None (all rows) for a single run, else a (n,) int64 tensor of
    the rows restart r runs on: the samples no earlier restart fooled (as
    AutoAttack does). Per sample it keeps a fooling point if any restart found
    one, else the point with the highest loss. One forward pass per restart
    checks the result (none when restarts == 1).
    """
    if restarts == 1:
        return run_once(None, 0)
    b = x0.shape[0]
    best = x0.clone()
    best_loss = torch.full((b,), -float("inf"), device=x0.device)
    fooled = torch.zeros(b, dtype=torch.bool, device=x0.device)
    for r in range(restarts):
        idx = (~fooled).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        adv = run_once(idx, r)
        f, lv = evaluate_points(atk, adv, y[idx], loss)
        better = f | (lv > best_loss[idx])
        best[idx[better]] = adv[better]
        best_loss[idx] = torch.maximum(best_loss[idx], lv)
        fooled[idx] = f
    return best
