"""Preemptive robustification: move an image, before sending it, to a nearby point with a robust eps-ball.

Paper: Seungyong Moon, Gaon An & Hyun Oh Song, "Preemptive Image
Robustification for Protecting Users against Man-in-the-Middle Adversarial
Attacks", AAAI 2022 (arXiv 2112.05634). Reference code:
github.com/snu-mllab/preemptive-robustification (``defenses/preempt_robust_linf.py``,
``defenses/preempt_robust_l2.py``, ``robustify.py``, ``configs/cifar10_*.yaml``).

The bi-level problem, per image x with label y:

    x' = argmin_{||x' - x|| <= delta, x' in [0, 1]^d}  max_{||x_adv - x'|| <= eps}  CE(f(x_adv), y)

solved as in the reference: each outer step runs a PGD attack from the
current x' (the maximizer), then takes a descent step on x' with the
gradient of CE(f(x_adv), y) with respect to x', where x_adv stays a function
of x' through the attack's projections (the sign of each inner gradient is
a constant: no second-order terms, the reference's ``hessian: false``). For
L-inf PGD that gradient is the adversarial point's input gradient masked by
where the box clamps cut the dependence on x'.

L-inf (the reference's ``PreemptRobustLinf``): x' is parametrized by w in R^d,

    lower = max(x - delta, 0),  upper = min(x + delta, 1),
    x'(w) = lower + (tanh(w) + 1) / 2 * (upper - lower),

which covers the intersection of the delta-box and the image box, and w is
updated by RMSprop (torch's defaults: alpha 0.99, eps 1e-8) at ``lr``. The
start is x + U(-delta, delta) clipped to the box, mapped back by
w = atanh(1.999 * ((x_init - lower) / (upper - lower) - 0.5)) (the 1.999
keeps atanh finite at the corners). L2 (``PreemptRobustL2``): plain
projected gradient descent, x' <- P(x' - lr * grad), P the renorm onto the
delta-ball then the box clamp, from a start on the delta-sphere.

Defaults are the reference's CIFAR-10 L-inf config (configs/cifar10_linf.yaml):
delta = eps = 8/255, 100 outer steps, lr 0.1, inner PGD 20 steps of 2/255
with 1 random start. L2 (configs/cifar10_l2.yaml): delta = eps = 0.5, lr
0.001, inner step 0.125. The label is the model's prediction on x when y is
None (the reference's robustify.py: the sender knows no label).

Deliberate differences from the reference code:

* ``select='best'`` (not in the reference, whose result is the last iterate,
  ``select='last'``, the default) returns per sample the iterate with the
  lowest loss at its attacked point among the start, every outer iterate and
  the final one (one more attack after the loop). With ``random_starts=0``
  the inner attack is deterministic, so the returned image's attacked loss
  is the minimum over the run, never above the start's.
* The output is made to satisfy ||x' - x||_inf <= delta and the box exactly
  in float arithmetic (float32, and float64 for float64 inputs): clamped to
  the box and nudged toward x by one ulp where rounding of
  lower + t (upper - lower) left it a hair outside (the reference returns the
  raw formula, which on 16 MNIST digits with a saturated tanh left 18 of
  1600 pixels outside the 8/255 ball, measured). Half-precision inputs are
  computed in float32 and rounded back, so they meet delta to their own
  rounding. L2: renorm leaves ||x' - x||_2 <= delta up to float rounding
  (~1e-7 relative).
* Model mode is explicit (``model_mode='eval'``, the reference's ``model.eval()``
  models) and restored afterwards; autocast and channels_last as in
  ``fastadv.attacks`` (float32 state).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastadv.attacks.base import Attack, check_choice, check_int

__all__ = ["robustify", "RobustifyResult", "exact_linf", "NORMS", "SELECT"]

NORMS = ("linf", "l2")
SELECT = ("last", "best")


class RobustifyResult(tuple):
    """(x_rob, info): ``info`` holds 'y' (the labels used), 'loss' (T, B) the attacked CE per outer step
    (mean over random starts; T = steps, plus one row for the final iterate with select='best') and
    'selected' (B,) the index of the returned iterate in 'loss' (select='best'; steps for 'last')."""


class _Forward(Attack):
    """The attack base class for its model handling only (mode, autocast, channels_last, output checks)."""


def _bshape(t, like):
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def exact_linf(z: torch.Tensor, x: torch.Tensor, delta: float, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """z clamped to the box and to |z - x| <= delta as evaluated in z's dtype (x in the box, same dtype).

    z is clamped to [x - delta, x + delta] and the box; rounding can still
    leave fl(x + delta) - x above delta by an ulp: such elements are moved
    one ulp toward x (which keeps them in the box), at most 4 times.
    """
    d = torch.tensor(delta, dtype=z.dtype, device=z.device)
    z = torch.minimum(torch.maximum(z, x - d), x + d).clamp(lo, hi)
    for _ in range(4):
        bad = (z - x).abs() > d
        if not bool(bad.any()):
            break
        z = torch.where(bad, torch.nextafter(z, x), z)
    return z


def _renorm(d: torch.Tensor, r: float) -> torch.Tensor:
    # per-sample L2 renorm to at most r (the reference's diff.renorm(p=2, dim=0, maxnorm=r))
    return d.renorm(p=2, dim=0, maxnorm=r)


def _attacked(fwd: _Forward, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str,
              random_start: bool, lo: float, hi: float, generator=None) -> torch.Tensor:
    """PGD from x kept differentiable in x (the reference's PGDAttack with detach=False, create_graph=False).

    Each step: g = d sum CE / d x_adv (a constant), x_adv <- P_{x, eps}(x_adv + alpha * step(g)).
    """
    if random_start:
        if norm == "linf":
            noise = (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * eps
        else:
            noise = _renorm(torch.rand(x.shape, device=x.device, generator=generator) - 0.5, eps)
        xa = (x + noise).clamp(lo, hi)
    else:
        xa = x
    if not xa.requires_grad:  # x is a constant (not a function of a leaf): a plain attack from it
        xa = xa.detach().requires_grad_(True)
    for _ in range(steps):
        out = fwd.logits(xa)
        g, = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), xa)
        if norm == "linf":
            nxt = xa + alpha * g.sign()
            xa = (x + (nxt - x).clamp(-eps, eps)).clamp(lo, hi)
        else:
            gn = g.reshape(g.shape[0], -1).norm(dim=1)
            nxt = xa + alpha * g / _bshape(gn + 1e-10, g)
            xa = (x + _renorm(nxt - x, eps)).clamp(lo, hi)
    return xa


def robustify(model, x: torch.Tensor, y: torch.Tensor | None = None, *, delta: float | None = None,
              eps: float | None = None, steps: int = 100, lr: float | None = None, attack_steps: int = 20,
              attack_alpha: float | None = None, random_starts: int = 1, norm: str = "linf", select: str = "last",
              model_mode: str = "eval", autocast=None, channels_last="auto", clip=(0.0, 1.0), generator=None,
              return_info: bool = False):
    """Preemptively robustified images x' (Moon, An & Song 2022): see the module docstring.

    Args:
        model: maps (B, ...) images in ``clip`` to (B, K) logits.
        x: (B, ...) images in ``clip``. y: (B,) labels, or None (default) for the model's predictions on x.
        delta: the sender's budget ||x' - x|| <= delta (L-inf default 8/255; L2 0.5).
        eps: the man-in-the-middle's budget around x' (L-inf default 8/255; L2 0.5).
        steps: outer steps (default 100). lr: RMSprop's lr on w (L-inf, default 0.1) or the
            gradient step (L2, default 0.001).
        attack_steps: inner PGD steps (default 20); attack_alpha: its step (L-inf 2/255, L2 0.125).
        random_starts: inner attacks per outer step, gradients averaged; 0 = one attack from x'
            itself (deterministic). Default 1, a random start.
        norm: 'linf' (default) | 'l2'. select: 'last' (default, the reference) | 'best'.
        model_mode, autocast, channels_last, clip: as for ``fastadv.attacks`` (eval by default).
        generator: torch.Generator for the random starts (default: the global RNG).
        return_info: also return the info dict (see ``RobustifyResult``).
    Returns:
        x' with x's shape and dtype; with return_info, ``RobustifyResult((x', info))``.

    Example:
        >>> x_rob = robustify(model, x, delta=8/255, eps=8/255, steps=100)
        >>> (x_rob - x).abs().max() <= 8/255
        tensor(True)
    """
    norm = check_choice("norm", norm, NORMS)
    select = check_choice("select", select, SELECT)
    linf = norm == "linf"
    delta = (8 / 255 if linf else 0.5) if delta is None else delta
    eps = (8 / 255 if linf else 0.5) if eps is None else eps
    lr = (0.1 if linf else 1e-3) if lr is None else lr
    attack_alpha = (2 / 255 if linf else 0.125) if attack_alpha is None else attack_alpha
    for name, v, strict in (("delta", delta, True), ("eps", eps, False), ("lr", lr, True),
                            ("attack_alpha", attack_alpha, False)):
        if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
                or (strict and v == 0)):
            raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {v!r}")
    delta, eps, lr, attack_alpha = float(delta), float(eps), float(lr), float(attack_alpha)
    steps = check_int("steps", steps, 0)
    attack_steps = check_int("attack_steps", attack_steps, 0)
    random_starts = check_int("random_starts", random_starts, 0)
    fwd = _Forward(model, model_mode=model_mode, autocast=autocast, channels_last=channels_last, clip=clip)
    lo, hi = fwd.clip
    dtype = x.dtype if isinstance(x, torch.Tensor) else None
    if y is None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        y = torch.zeros(x.shape[0] if x.dim() else 0, dtype=torch.long, device=x.device)
        infer = True
    else:
        infer = False
    x_in = x
    x, y = fwd.check_inputs(x, y)
    bsz = x.shape[0]
    starts = max(random_starts, 1)
    with fwd.model_context(), torch.enable_grad():
        if infer:
            with torch.no_grad():
                fwd._y_range = None
                y = fwd.logits(x).argmax(1)
        if linf:
            lower, upper = (x - delta).clamp_min(lo), (x + delta).clamp_max(hi)
            span = upper - lower
            x_init = (x + (torch.rand(x.shape, device=x.device, generator=generator) * 2 - 1) * delta).clamp(lo, hi)
            w = torch.atanh(((x_init - lower) / span - 0.5) * 1.999).detach().requires_grad_(True)
            opt = torch.optim.RMSprop([w], lr=lr)

            def current(wt):
                return lower + (torch.tanh(wt) + 1) / 2 * span
        else:
            noise = _renorm(torch.rand(x.shape, device=x.device, generator=generator) - 0.5, delta)
            xr = (x + noise).clamp(lo, hi)

        def attacked_loss(xp, leaf):
            """(mean attacked CE per sample over the starts, its gradient wrt leaf)."""
            total_loss = torch.zeros(bsz, device=x.device)
            total_grad = torch.zeros_like(leaf)
            for _ in range(starts):
                xa = _attacked(fwd, xp, y, eps=eps, alpha=attack_alpha, steps=attack_steps, norm=norm,
                               random_start=random_starts > 0, lo=lo, hi=hi, generator=generator)
                loss = F.cross_entropy(fwd.logits(xa), y, reduction="none")
                g, = torch.autograd.grad(loss.sum(), leaf)
                total_loss += loss.detach()
                total_grad += g
            return total_loss / starts, total_grad / starts

        history = []
        best = best_loss = None
        for _ in range(steps + (1 if select == "best" else 0)):
            if linf:
                wt = w.detach().requires_grad_(True)
                xp, leaf = current(wt), wt
            else:
                leaf = xr.detach().requires_grad_(True)
                xp = leaf
            loss, g = attacked_loss(xp, leaf)
            history.append(loss)
            if select == "best":
                with torch.no_grad():
                    if best is None:
                        best, best_loss = xp.detach().clone(), loss.clone()
                        best_at = torch.zeros(bsz, dtype=torch.long, device=x.device)
                    else:
                        better = loss < best_loss
                        best = torch.where(_bshape(better, best), xp.detach(), best)
                        best_loss = torch.where(better, loss, best_loss)
                        best_at = torch.where(better, torch.full_like(best_at, len(history) - 1), best_at)
            if len(history) > steps:
                break  # select='best': the final iterate was evaluated, no more steps
            if linf:
                opt.zero_grad(set_to_none=True)
                w.grad = g  # RMSprop descends: lowers the attacked loss
                opt.step()
            else:
                with torch.no_grad():
                    xr = (x + _renorm(xr - lr * g - x, delta)).clamp(lo, hi)
        with torch.no_grad():
            if select == "best" and best is not None:
                out = best
            else:
                out = current(w.detach()) if linf else xr
                best_at = torch.full((bsz,), steps, dtype=torch.long, device=x.device)
            out = exact_linf(out, x, delta, lo, hi) if linf else out.clamp(lo, hi)
    out = out.detach().to(dtype)
    if linf and dtype == torch.float64:
        # computed in float32: check the ball again against the float64 input (its float32 copy is off by ~6e-8)
        out = exact_linf(out, x_in.detach(), delta, lo, hi)
    if not return_info:
        return out
    loss_hist = torch.stack(history) if history else torch.zeros(0, bsz, device=x.device)
    return RobustifyResult((out, {"y": y, "loss": loss_hist, "selected": best_at}))
