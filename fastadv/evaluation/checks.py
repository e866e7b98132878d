"""Gradient-masking checks for a robustness evaluation.

A robust accuracy measured with gradient attacks is only an upper bound on the
true one; it is a tight bound only if the gradients the attacks follow are
informative. These checks look for the signs that they are not, after
Athalye, Carlini & Wagner 2018 ("Obfuscated Gradients Give a False Sense of
Security", Sec. 3.1 "Identifying obfuscated & masked gradients"), Uesato et
al. 2018 ("Adversarial Risk and the Dangers of Evaluating Against Weak
Attacks", SPSA) and AutoAttack's sanity checks (Croce & Hein 2020, "Reliable
evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ``autoattack/checks.py``):

==================  ==========================================================  ===========================
check               fails when                                                   source
==================  ==========================================================  ===========================
randomized          5 identical calls differ: for some sample and pair of calls   AutoAttack check_randomized
                    a, b: ||z_a/||z_a|| - z_b/||z_b||||_2 > 1e-4, or a
                    prediction changes
probabilities       every output in [0, 1] and every row sums to 1 (+-1e-5)      AutoAttack check_range_output
zero_gradient       ANY sample has an exactly zero d CE / d x                     AutoAttack check_zero_gradients
dynamic             parameters/buffers change across forward calls, module        AutoAttack check_dynamic
                    hooks are registered, or forward calls autograd
n_classes           K < 3 (DLR needs 3 classes; K = 3 with APGD-T: targeted      AutoAttack check_n_classes
                    DLR needs 4)
huge_eps            accuracy > max(1 sample, 2%) at a radius covering the box    Athalye: "unbounded attacks
                    (linf: width, l2: sqrt(d) width, l1: d width)                 do not reach 100%"
monotone_eps        robust accuracy rises with eps by more than 1 sample         Athalye: "increasing the
                                                                                 distortion bound does not
                                                                                 increase success"
random_noise        random points of radius eps fool ANY sample the evaluation  Athalye: "random sampling
                    counted robust                                               finds adversarial examples"
square_vs_gradient  Square fools more than max(1 sample, 0.2%) of the samples    AutoAttack check_square_sr;
                    the gradient attacks left robust                             Athalye: "black-box beats
                                                                                 white-box"
more_steps          PGD with 5x the steps and 2 restarts leaves MORE samples     Athalye; Carlini et al. 2019
                    correct than PGD-10 (more than 1 sample)                     ("On Evaluating Adversarial
                                                                                 Robustness")
single_step         the single-step attack (FGSM) leaves fewer samples correct   Athalye: "one-step attacks
                    than PGD-10 (more than 1 sample)                              perform better than
                                                                                 iterative attacks"
black_box           SPSA (linf) or a transfer attack (``transfer_sources``)      Uesato et al. 2018;
                    fools more than max(1 sample, 0.2%) white-box-robust          Athalye: "black-box beats
                    samples                                                      white-box"
==================  ==========================================================  ===========================

Usage (``fastadv.evaluation`` calls it after the attacks)::

    results = run_checks(model, guard, x, y, eps=8/255, norm="linf", common=common, robust=robust,
                         fooled_by={"apgd-ce": f1, "apgd-t": f2}, num_classes=10, seed=0)
    results["zero_gradient"]  # {"status": "pass", "value": 0, "detail": "..."}

Cost, for n check samples (default 128), r of them robust, with the default
``options``; F = one forward and FB = one forward+backward of a batch of at
most n images:

* randomized + probabilities: 5 F; zero_gradient: 1 FB; dynamic: 2 F of 8
  samples plus two SHA-256 hashes of the model's state (one device-to-host
  copy of the parameters and buffers each);
* huge_eps: APGD-CE, at most 100 FB (early stop: a few on a healthy model),
  plus APGD-margin on any survivors;
* monotone_eps: 4 PGD-20 runs (at most 80 FB), none when ``curve`` is given;
* random_noise: 16 F of r images;
* square_vs_gradient: none when the cascade ran Square, else Square with
  1000 queries on r images (at most 1000 F);
* more_steps + single_step: PGD-10, PGD-50 x 2 restarts and FGSM: at most 111 FB;
* black_box (linf): SPSA 20 steps x 64 directions: 20 x 65 F of r images
  (in chunks of ``spsa_max_batch``), plus PGD-20 on each transfer source.

About 300 FB plus 2,400 F of the robust subset in the worst case. Measured
on the 784-100-10 MNIST MLP of the tests (128 samples, eps 0.08, 49 robust,
one CPU thread): 1.8 s in all on a quiet core, 3.0-4.2 s on a loaded one, of
which Square about half, SPSA a quarter, the PGD runs of monotone_eps and
more_steps a sixth, everything else under 0.1 s. The
attacks stop early per sample, so a model that falls quickly costs far less.

Randomness: every check draws from its own ``torch.Generator`` seeded from
``seed``, so the same seed gives the same results. The global RNGs (torch
CPU and the CUDA device of x, Python's ``random``, NumPy's) are forked and
restored: a randomized model that draws from them during the checks leaves
them as they were (its own draws, and so its results, follow the caller's
global state; the checks' draws do not).

An exception inside one check makes that check "skip" with the error in its
detail (the evaluation's report is not lost to a failing check), unless
``options["raise_errors"]`` is True.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import random
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fastadv.attacks.apgd import APGD
from fastadv.attacks.base import check_choice, check_eps
from fastadv.attacks.fgsm import FGSM
from fastadv.attacks.pgd import NORMS, PGD
from fastadv.attacks.spsa import SPSA
from fastadv.attacks.transfer import TransferAttack

__all__ = ["run_checks", "CHECKS", "DEFAULT_OPTIONS"]

CHECKS = ("randomized", "probabilities", "zero_gradient", "dynamic", "n_classes", "huge_eps", "monotone_eps",
          "random_noise", "square_vs_gradient", "more_steps", "single_step", "black_box")

DEFAULT_OPTIONS: dict = {
    "batch_size": 512,          # images per forward pass in the forward-only checks
    "random_calls": 5,          # randomized: identical calls compared (AutoAttack: 5)
    "random_tol": 1e-4,         # randomized: max L2 difference of normalized logits (AutoAttack's alpha)
    "prob_tol": 1e-5,           # probabilities: slack on [0, 1] and on the row sums (AutoAttack's alpha)
    "dynamic_samples": 8,       # dynamic: samples in the traced forward calls
    "huge_eps_steps": 100,      # huge_eps: APGD iterations
    "huge_eps_tol": 0.02,       # huge_eps: accuracy allowed at the box-covering radius (or 1 sample)
    "curve_factors": (0.25, 0.5, 1.0, 2.0),  # monotone_eps without a curve: PGD at these multiples of eps
    "curve_steps": 20,          # monotone_eps: PGD steps
    "noise_draws": 16,          # random_noise: random points per robust sample
    "square_queries": 1000,     # square_vs_gradient when the cascade did not run Square
    "square_p_init": 0.8,
    "square_tol": 0.002,        # square / black_box: share of n allowed (AutoAttack: 0.2%), at least 1 sample
    "pgd_steps": 10,            # more_steps / single_step baseline: PGD-10
    "more_steps_factor": 5,     # more_steps: 5x the steps ...
    "more_steps_restarts": 2,   # ... and 2 restarts
    "spsa_steps": 20,           # black_box: SPSA steps and directions per step
    "spsa_samples": 64,
    "spsa_max_batch": 4096,
    "transfer_sources": None,   # black_box: a model or list of models to craft transfer attacks on
    "transfer_steps": 20,
    "raise_errors": False,      # re-raise an exception inside a check instead of reporting "skip"
}

_GRADIENT_FREE = ("square", "spsa")  # cascade names whose success does not come from the target's gradients
_AUTOGRAD_NAMES = ("grad", "backward", "_make_grads")  # what AutoAttack's tracer counts


# ------------------------------------------------------------------ helpers
def _result(status: str, value, detail: str) -> dict:
    return {"status": status, "value": value, "detail": detail}


def _skip(detail: str, value=None) -> dict:
    return _result("skip", value, detail)


def _pct(count: int, n: int) -> str:
    return f"{100.0 * count / max(n, 1):.1f}%"


@dataclass
class _Ctx:
    model: object
    guard: object
    x: torch.Tensor
    y: torch.Tensor
    eps: float
    norm: str
    common: dict
    robust: torch.Tensor
    fooled_by: dict
    num_classes: int
    seed: int
    curve: list | None
    opts: dict
    logits: torch.Tensor = None
    pred: torch.Tensor = None
    correct: torch.Tensor = None
    cache: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def gen(self, key: int) -> torch.Generator:
        """A generator for one check (or one eps of a check), seeded from seed and the key."""
        g = torch.Generator(device=self.x.device)
        g.manual_seed((int(self.seed) * 1_000_003 + key) % (2 ** 63))
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits under the evaluation's model mode, without gradient, in chunks."""
        bs = self.opts["batch_size"]
        if x.shape[0] == 0:
            return torch.zeros(0, self.num_classes, device=x.device)
        with self.guard.model_context(), torch.no_grad():
            return torch.cat([self.guard.logits(c) for c in x.split(bs)])

    def box_width(self) -> float:
        lo, hi = self.guard.clip
        return hi - lo


def _within(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, clip) -> torch.Tensor:
    """Per sample: adv finite, in the box and within eps (plus float32 rounding slack)."""
    b = x.shape[0]
    d = (adv - x).reshape(b, -1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1) if norm == "l2" else d.abs().sum(1)
    tol = 1e-5 * max(1.0, eps) * (1 if norm == "linf" else max(1.0, math.sqrt(d.shape[1])))
    flat = adv.reshape(b, -1)
    inbox = (flat >= clip[0] - 1e-6).all(1) & (flat <= clip[1] + 1e-6).all(1)
    return (size <= eps + tol) & inbox & torch.isfinite(flat).all(1)


def _fooled_by_attack(c: _Ctx, atk, idx: torch.Tensor, eps: float, norm: str | None = None) -> tuple[torch.Tensor, int]:
    """Run ``atk`` on the rows ``idx``; (bool (n,) fooled and valid, number of invalid outputs)."""
    fooled = torch.zeros(c.n, dtype=torch.bool, device=c.x.device)
    if idx.numel() == 0:
        return fooled, 0
    xs, ys = c.x[idx], c.y[idx]
    adv = atk(xs, ys)
    ok = _within(adv, xs, eps, norm or c.norm, c.guard.clip)
    fooled[idx] = (c.forward(adv).argmax(1) != ys) & ok
    return fooled, int((~ok).sum())


def _l1_start(gen: torch.Generator, clip):
    """A random L1 start drawn from ``gen`` (pgd.random_start's L1 branch samples its Laplace
    direction from the global RNG, which would make the check depend on the global state)."""

    def start(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        b = x0.shape[0]
        u = torch.rand(x0.shape, device=x0.device, generator=gen).clamp_min(1e-12)
        sign = torch.randint(0, 2, x0.shape, device=x0.device, generator=gen).to(x0.dtype) * 2 - 1
        z = -u.log() * sign  # Laplace(0, 1)
        r = torch.rand(b, device=x0.device, generator=gen)
        scale = r * eps / z.reshape(b, -1).abs().sum(1).clamp_min(1e-12)
        return (x0 + z * scale.reshape((b,) + (1,) * (x0.dim() - 1))).clamp(*clip)

    return start


def _pgd(c: _Ctx, eps: float, steps: int, key: int, *, restarts: int = 1) -> PGD:
    """PGD with alpha = 2.5 eps / steps, a random start from gen(key), early stop (same success set)."""
    g = c.gen(key)
    atk = PGD(c.model, eps, 2.5 * eps / steps, steps, norm=c.norm, restarts=restarts, early_stop=True,
              generator=g, **c.common)
    if c.norm == "l1":
        atk.start = _l1_start(g, c.guard.clip)
    return atk


def _pgd10(c: _Ctx) -> tuple[int, torch.Tensor]:
    """(samples correct after PGD-10, per-sample correct), shared by more_steps and single_step."""
    if "pgd10" not in c.cache:
        idx = c.correct.nonzero().squeeze(1)
        steps = c.opts["pgd_steps"]
        fooled, _ = _fooled_by_attack(c, _pgd(c, c.eps, steps, 100), idx, c.eps)
        still = c.correct & ~fooled
        c.cache["pgd10"] = (int(still.sum()), still)
    return c.cache["pgd10"]


def _state_digests(model) -> dict[str, str]:
    """SHA-256 of the raw bytes of every parameter and buffer (persistent or not), by name."""
    out = {}
    if not isinstance(model, nn.Module):
        return out
    with torch.no_grad():
        for items in (model.named_parameters(), model.named_buffers()):
            for name, t in items:
                h = hashlib.sha256()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                if t.numel():
                    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
                out[name] = h.hexdigest()
    return out


def _benign_hook(hook) -> bool:
    """Hooks torch itself installs that recompute a weight from its parametrization (weight_norm,
    spectral_norm); a spectral_norm update in train mode changes a buffer and is caught there."""
    try:
        from torch.nn.utils.spectral_norm import SpectralNorm
        from torch.nn.utils.weight_norm import WeightNorm
    except ImportError:  # pragma: no cover
        return False
    return isinstance(hook, (WeightNorm, SpectralNorm))


def _hooks(model) -> list[str]:
    """'module-name: kind' for each user hook on the model's modules, and the global module hooks."""
    found = []
    mod = torch.nn.modules.module
    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        if getattr(mod, kind, None):
            found.append(f"(global): {kind[len('_global_'):]}")
    if not isinstance(model, nn.Module):
        return found
    for name, m in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(m, kind, None) or {}
            if any(not _benign_hook(h) for h in hooks.values()):
                found.append(f"{name or '(root)'}: {kind.strip('_')}")
    return found


@contextlib.contextmanager
def _rng_preserved(device: torch.device):
    """Fork torch's CPU (and x's CUDA device's) RNG, Python's and NumPy's; restore them on exit."""
    py_state = random.getstate()
    np_mod = sys.modules.get("numpy")
    np_state = np_mod.random.get_state() if np_mod is not None else None
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np_mod.random.set_state(np_state)


# ------------------------------------------------------------------ the checks
def _check_randomized(c: _Ctx) -> dict:
    k = c.opts["random_calls"]
    outs = [c.logits] + [c.forward(c.x) for _ in range(k - 1)]
    # non-finite outputs are zeroed: a model that returns NaN every time is not thereby randomized
    normed = [torch.nan_to_num(o / (o.norm(dim=1, keepdim=True) + 1e-10), nan=0.0, posinf=0.0, neginf=0.0)
              for o in outs]
    max_diff = 0.0
    for a in range(k):
        for b in range(a + 1, k):
            d = (normed[a] - normed[b]).norm(dim=1)
            if d.numel():
                max_diff = max(max_diff, float(d.max()))
    preds = torch.stack([o.argmax(1) for o in outs])
    changed = int((preds != preds[:1]).any(0).sum())
    value = {"max_diff": max_diff, "prediction_changes": changed, "calls": k}
    tol = c.opts["random_tol"]
    if max_diff > tol or changed:
        return _result("fail", value,
                       f"{k} identical forward passes differ (max L2 distance of normalized logits {max_diff:.2e} > "
                       f"{tol:g}, {changed} of {c.n} predictions changed): the model is randomized, so a one-draw "
                       "attack optimizes a moving target and the robust accuracy is an upper bound; evaluate with "
                       "EOT (expectation over transformation, AutoAttack's version='rand')")
    return _result("pass", value, f"{k} identical forward passes agree (max L2 distance of normalized logits "
                                  f"{max_diff:.2e} <= {tol:g}, no prediction changed)")


def _check_probabilities(c: _Ctx) -> dict:
    z, a = c.logits, c.opts["prob_tol"]
    if z.numel() == 0:
        return _skip("no samples")
    lo, hi = float(z.min()), float(z.max())
    sum_err = float((z.sum(1) - 1).abs().max())
    value = {"min": lo, "max": hi, "max_row_sum_error": sum_err}
    if hi < 1 + a and lo > -a and sum_err < a:
        return _result("fail", value,
                       "every output lies in [0, 1] and every row sums to 1: the model returns probabilities, not "
                       "logits, so the cross-entropy of the attacks saturates and its gradient vanishes; the robust "
                       "accuracy is an upper bound: attack the logits (remove the final softmax)")
    return _result("pass", value,
                   f"the outputs look like logits (range [{lo:.3g}, {hi:.3g}], rows do not all sum to 1)")


def _check_zero_gradient(c: _Ctx) -> dict:
    bs = c.opts["batch_size"]
    zero = []
    with c.guard.model_context(), torch.enable_grad():
        for xs, ys in zip(c.x.split(bs), c.y.split(bs)):
            xr = xs.detach().clone().requires_grad_(True)
            # reduction='sum': each sample's gradient is its own, not scaled by 1/B (no underflow from the mean)
            loss = F.cross_entropy(c.guard.logits(xr), ys, reduction="sum")
            if loss.requires_grad:
                g = torch.autograd.grad(loss, xr, allow_unused=True, materialize_grads=True)[0]
            else:  # the model cut the graph (e.g. a hard threshold under torch.no_grad)
                g = torch.zeros_like(xr)
            zero.append(g.reshape(g.shape[0], -1).abs().sum(1) == 0)
    zero = torch.cat(zero) if zero else torch.zeros(0, dtype=torch.bool, device=c.x.device)
    count, among_correct = int(zero.sum()), int((zero & c.correct).sum())
    if count:
        return _result("fail", count,
                       f"{count} of {c.n} samples ({among_correct} of them classified correctly) have an exactly zero "
                       "input gradient of the cross-entropy: gradient attacks cannot move them (a hard threshold, "
                       "non-differentiable preprocessing or a saturated softmax), so the robust accuracy is an upper "
                       "bound; use BPDA or a margin/DLR loss and gradient-free attacks")
    return _result("pass", 0, f"every one of the {c.n} samples has a nonzero input gradient of the cross-entropy")


def _check_dynamic(c: _Ctx, digests_before: dict[str, str]) -> dict:
    """Run last: the state hashes span every forward of every check (plus the two traced ones here)."""
    funcs = (torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward)
    codes = {getattr(f, "__code__", None) for f in funcs}
    codes.discard(None)
    calls: dict[str, int] = {}

    def tracer(frame, event, arg):
        if event == "call":
            code = frame.f_code
            if code in codes or (code.co_name in _AUTOGRAD_NAMES and "autograd" in code.co_filename):
                calls[code.co_name] = calls.get(code.co_name, 0) + 1
        return None  # no line tracing: only the calls matter

    xs = c.x[: c.opts["dynamic_samples"]]
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        with c.guard.model_context():
            with torch.enable_grad():  # as AutoAttack: a plain call, so forward may use autograd
                c.guard.logits(xs)
            with torch.no_grad():
                c.guard.logits(xs)
    finally:
        sys.settrace(old)  # restores a debugger's or coverage's tracer
    hooks = _hooks(c.model)
    digests_after = _state_digests(c.model)
    # Batch-norm running statistics move in train mode (model_mode='train') without changing the outputs,
    # which use the batch statistics there; they are reported, not failed.
    bn_train = set()
    if isinstance(c.model, nn.Module):
        with c.guard.model_context():
            for name, m in c.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                    bn_train.update(f"{name}.{b}" if name else b for b in ("running_mean", "running_var",
                                                                            "num_batches_tracked"))
    changed = sorted(k for k in set(digests_before) | set(digests_after)
                     if digests_before.get(k) != digests_after.get(k))
    bn_changed = [k for k in changed if k in bn_train]
    changed = [k for k in changed if k not in bn_train]
    value = {"changed_state": changed[:10], "hooks": hooks[:10], "autograd_calls": calls,
             "bn_running_stats_updated": bool(bn_changed)}
    reasons = []
    if changed:
        reasons.append(f"{len(changed)} parameter(s)/buffer(s) changed during forward calls ({', '.join(changed[:3])})")
    if hooks:
        reasons.append(f"{len(hooks)} module hook(s) are registered ({', '.join(hooks[:3])})")
    if calls:
        reasons.append(f"forward calls autograd ({', '.join(f'{k} x{v}' for k, v in sorted(calls.items()))})")
    if reasons:
        return _result("fail", value,
                       "the model may be dynamic: " + "; ".join(reasons) + ". A model whose state, hooks or "
                       "inner optimization change what each call computes defeats attacks that assume a fixed "
                       "function, so the robust accuracy is an upper bound; use an adaptive attack")
    return _result("pass", value, "no parameter or buffer changed during the checks' forward calls, no module hook "
                                  "is registered and forward does not call autograd")


def _check_n_classes(c: _Ctx) -> dict:
    k = int(c.num_classes)
    if k < 3:
        return _result("fail", k, f"the model has {k} classes: DLR-based attacks (APGD-DLR, APGD-T; targeted DLR "
                                  "needs 4) cannot run, so an ensemble relying on them is weaker than intended "
                                  "(a note, not a sign of masking)")
    if k == 3 and "apgd-t" in c.fooled_by:
        return _result("fail", k, "the model has 3 classes: the targeted DLR loss of APGD-T needs 4, so that "
                                  "attack of the evaluation is not the intended one (a note, not a sign of masking)")
    return _result("pass", k, f"the model has {k} classes, enough for the DLR losses")


def _check_huge_eps(c: _Ctx) -> dict:
    width = c.box_width()
    if not math.isfinite(width):
        return _skip("the input box is unbounded (clip=None), so no radius covers it")
    d = c.x[0].numel() if c.n else 0
    big = width * {"linf": 1.0, "l2": math.sqrt(d), "l1": float(d)}[c.norm]
    idx = c.correct.nonzero().squeeze(1)
    steps = c.opts["huge_eps_steps"]
    fooled, _ = _fooled_by_attack(c, APGD(c.model, big, steps, norm=c.norm, loss="ce", generator=c.gen(600),
                                          **c.common), idx, big)
    left = (c.correct & ~fooled).nonzero().squeeze(1)
    if left.numel():  # the margin loss does not saturate where the CE does
        more, _ = _fooled_by_attack(c, APGD(c.model, big, steps, norm=c.norm, loss="cw", generator=c.gen(601),
                                            **c.common), left, big)
        fooled |= more
    survivors = int((c.correct & ~fooled).sum())
    acc = survivors / max(c.n, 1)
    allowed = max(1.0, c.opts["huge_eps_tol"] * c.n)
    value = {"eps": big, "accuracy": acc, "survivors": survivors}
    if survivors > allowed:
        return _result("fail", value,
                       f"at eps={big:g}, where every point of the box is reachable, APGD still leaves {survivors} of "
                       f"{c.n} samples ({_pct(survivors, c.n)}) correct: the attacks cannot follow this model's "
                       "gradients, so the robust accuracy at the real eps is an upper bound, not a measurement")
    return _result("pass", value, f"at eps={big:g} (covering the box) APGD brings the accuracy to "
                                  f"{_pct(survivors, c.n)} ({int(allowed)} sample(s) allowed)")


def _check_monotone_eps(c: _Ctx) -> dict:
    if c.curve:
        pts = []
        for p in c.curve:
            pts.append({"eps": float(p["eps"]), "robust_accuracy": float(p["robust_accuracy"]),
                        **({"n": int(p["n"])} if p.get("n") else {})})
        source = "curve"
    else:
        if c.eps == 0:
            return _skip("eps is 0 and no curve was given")
        idx = c.correct.nonzero().squeeze(1)
        pts = [{"eps": 0.0, "robust_accuracy": float(c.correct.sum()) / max(c.n, 1), "n": c.n}]
        for f in c.opts["curve_factors"]:
            e = float(f) * c.eps
            # the same seed (generator key) at each eps: only the radius differs
            fooled, _ = _fooled_by_attack(c, _pgd(c, e, c.opts["curve_steps"], 700), idx, e)
            pts.append({"eps": e, "robust_accuracy": float((c.correct & ~fooled).sum()) / max(c.n, 1), "n": c.n})
        source = "computed"
    pts.sort(key=lambda p: p["eps"])
    worst, where = 0.0, None
    bad = False
    for a, b in zip(pts, pts[1:]):
        n = min(a.get("n", c.n), b.get("n", c.n))
        rise = b["robust_accuracy"] - a["robust_accuracy"]
        if rise > worst:
            worst, where = rise, (a, b)
        if rise > 1.0 / max(n, 1) + 1e-9:
            bad = True
    value = {"source": source, "points": [{"eps": p["eps"], "robust_accuracy": p["robust_accuracy"]} for p in pts],
             "max_increase": worst}
    if bad:
        a, b = where
        return _result("fail", value,
                       f"robust accuracy rose from {a['robust_accuracy']:.1%} at eps={a['eps']:g} to "
                       f"{b['robust_accuracy']:.1%} at eps={b['eps']:g}: the larger ball contains the smaller, so "
                       "the attack misses points it can reach and the robust accuracy is an upper bound")
    return _result("pass", value, f"robust accuracy does not increase with eps over {len(pts)} points ({source}; "
                                  f"largest rise {worst:.1%}, 1 sample allowed)")


def _noise(c: _Ctx, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random points at radius eps around x, clipped to the box: linf: random vertices
    x + eps * s, s in {-1, 1}^d; l2: x + eps * z / ||z||_2, z ~ N(0, I); l1: x + eps * z / ||z||_1,
    z Laplace (a uniform direction on the L1 sphere)."""
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    if c.norm == "linf":
        d = torch.randint(0, 2, x.shape, device=x.device, generator=g).to(x.dtype) * 2 - 1
    elif c.norm == "l2":
        z = torch.randn(x.shape, device=x.device, generator=g)
        d = z / z.reshape(b, -1).norm(dim=1).clamp_min(1e-12).reshape(shape)
    else:
        u = torch.rand(x.shape, device=x.device, generator=g).clamp_min(1e-12)
        s = torch.randint(0, 2, x.shape, device=x.device, generator=g).to(x.dtype) * 2 - 1
        z = -u.log() * s
        d = z / z.reshape(b, -1).abs().sum(1).clamp_min(1e-12).reshape(shape)
    return (x + c.eps * d).clamp(*c.guard.clip)


def _check_random_noise(c: _Ctx) -> dict:
    idx = c.robust.nonzero().squeeze(1)
    draws = c.opts["noise_draws"]
    if idx.numel() == 0:
        return _skip("no sample survived the evaluation's attacks, so random noise has nothing to beat",
                     {"fooled_robust": 0, "robust": 0, "draws": draws})
    if c.eps == 0:
        return _skip("eps is 0: no noise to draw", {"fooled_robust": 0, "robust": int(idx.numel()), "draws": draws})
    g = c.gen(800)
    xs, ys = c.x[idx], c.y[idx]
    hit = torch.zeros(idx.numel(), dtype=torch.bool, device=c.x.device)
    for _ in range(draws):
        hit |= c.forward(_noise(c, xs, g)).argmax(1) != ys
    count = int(hit.sum())
    value = {"fooled_robust": count, "robust": int(idx.numel()), "draws": draws}
    if count:
        return _result("fail", value,
                       f"random points at radius eps fooled {count} of the {idx.numel()} samples every attack of the "
                       f"evaluation failed on ({draws} draws each): the attacks do worse than random search, so the "
                       f"robust accuracy is overestimated by at least {_pct(count, c.n)} (gradient masking)")
    return _result("pass", value, f"{draws} random points at radius eps per sample fooled none of the "
                                  f"{idx.numel()} samples the evaluation counted robust")


def _check_square(c: _Ctx) -> dict:
    allowed = max(1.0, c.opts["square_tol"] * c.n)
    gradient_names = [k for k in c.fooled_by if not any(k.startswith(g) for g in _GRADIENT_FREE)]
    if "square" in c.fooled_by:
        others = torch.zeros(c.n, dtype=torch.bool, device=c.x.device)
        for k in gradient_names:
            others |= c.fooled_by[k].to(c.x.device)
        beyond = c.fooled_by["square"].to(c.x.device) & ~others
        count = int(beyond.sum())
        order = list(c.fooled_by)
        note = "" if order.index("square") > max((order.index(k) for k in gradient_names), default=-1) else \
            " (Square ran before some gradient attacks, so this counts only what those did not also fool)"
        value = {"source": "cascade", "fooled_beyond_gradient": count, "allowed": allowed}
        what = f"in the evaluation, Square fooled {count} of {c.n} samples the gradient attacks did not{note}"
    else:
        if c.norm == "l1":
            return _skip("Square runs for linf and l2 only", {"source": "run"})
        if c.x.dim() != 4:
            return _skip("Square needs (n, C, H, W) images", {"source": "run"})
        if c.eps == 0:
            return _skip("eps is 0", {"source": "run"})
        idx = c.robust.nonzero().squeeze(1)
        if idx.numel() == 0:
            return _skip("no sample survived the evaluation's attacks, so Square has nothing to beat",
                         {"source": "run", "fooled_beyond_gradient": 0})
        try:
            from fastadv.attacks.square import Square
        except ImportError as e:
            return _skip(f"the Square attack is not available ({e})", {"source": "run"})
        q = c.opts["square_queries"]
        atk = Square(c.model, c.eps, norm=c.norm, queries=q, p_init=c.opts["square_p_init"], generator=c.gen(900),
                     **c.common)
        fooled, invalid = _fooled_by_attack(c, atk, idx, c.eps)
        count = int(fooled.sum())
        value = {"source": "run", "queries": q, "fooled_beyond_gradient": count, "robust": int(idx.numel()),
                 "allowed": allowed, "invalid": invalid}
        what = f"Square ({q} queries) fooled {count} of the {idx.numel()} samples the evaluation counted robust"
    if count > allowed:
        return _result("fail", value, f"{what}: a gradient-free attack beats the gradient attacks, so their "
                                      f"gradients are masked and the robust accuracy is overestimated by at least "
                                      f"{_pct(count, c.n)}")
    return _result("pass", value, f"{what} ({int(allowed)} allowed)")


def _check_more_steps(c: _Ctx) -> dict:
    if c.eps == 0:
        return _skip("eps is 0")
    if not bool(c.correct.any()):
        return _skip("no sample is classified correctly")
    base, _ = _pgd10(c)
    steps = c.opts["pgd_steps"] * c.opts["more_steps_factor"]
    restarts = c.opts["more_steps_restarts"]
    idx = c.correct.nonzero().squeeze(1)
    fooled, _ = _fooled_by_attack(c, _pgd(c, c.eps, steps, 101, restarts=restarts), idx, c.eps)
    strong = int((c.correct & ~fooled).sum())
    k0 = c.opts["pgd_steps"]
    value = {f"pgd{k0}": base / c.n, f"pgd{steps}x{restarts}": strong / c.n}
    if strong > base + 1:
        return _result("fail", value,
                       f"PGD with {steps} steps x {restarts} restarts leaves {strong} of {c.n} samples correct, MORE "
                       f"than PGD-{k0} ({base}): a stronger attack should never do worse, so the loss surface is "
                       "noisy or masked and the robust accuracy is an upper bound")
    return _result("pass", value, f"PGD-{steps} x {restarts} restarts leaves {strong} of {c.n} samples correct, "
                                  f"PGD-{k0} {base} (1 sample of slack)")


def _check_single_step(c: _Ctx) -> dict:
    if c.eps == 0:
        return _skip("eps is 0")
    if not bool(c.correct.any()):
        return _skip("no sample is classified correctly")
    base, _ = _pgd10(c)
    idx = c.correct.nonzero().squeeze(1)
    if c.norm == "linf":
        atk, name = FGSM(c.model, c.eps, **c.common), "FGSM"
    else:  # the single-step L2/L1 analogue: one full-radius normalized-gradient step from x
        atk, name = PGD(c.model, c.eps, c.eps, 1, norm=c.norm, random_start=False, **c.common), f"one-step {c.norm} PGD"
    fooled, _ = _fooled_by_attack(c, atk, idx, c.eps)
    single = int((c.correct & ~fooled).sum())
    k0 = c.opts["pgd_steps"]
    value = {"single_step": single / c.n, f"pgd{k0}": base / c.n}
    if single + 1 < base:
        return _result("fail", value,
                       f"{name} leaves {single} of {c.n} samples correct, fewer than PGD-{k0} ({base}): one step beats "
                       "an iterative attack that contains it only when the gradient is useless near x (masking), "
                       "so the robust accuracy is an upper bound")
    return _result("pass", value, f"{name} leaves {single} of {c.n} samples correct, PGD-{k0} {base}: the iterative "
                                  "attack is at least as strong (1 sample of slack)")


def _check_black_box(c: _Ctx) -> dict:
    idx = c.robust.nonzero().squeeze(1)
    allowed = max(1.0, c.opts["square_tol"] * c.n)
    sources = c.opts["transfer_sources"]
    value = {"robust": int(idx.numel()), "spsa_fooled": None, "transfer_fooled": None, "allowed": allowed}
    if idx.numel() == 0:
        return _skip("no sample survived the evaluation's attacks, so a black-box attack has nothing to beat", value)
    if c.eps == 0:
        return _skip("eps is 0", value)
    if c.norm != "linf" and sources is None:
        return _skip("SPSA is linf only and no transfer_sources were given", value)
    parts = []
    total = torch.zeros(c.n, dtype=torch.bool, device=c.x.device)
    if c.norm == "linf":
        spsa = SPSA(c.model, c.eps, c.opts["spsa_steps"], samples=c.opts["spsa_samples"],
                    max_batch=c.opts["spsa_max_batch"], generator=c.gen(1000), **c.common)
        fooled, _ = _fooled_by_attack(c, spsa, idx, c.eps)
        value["spsa_fooled"] = int(fooled.sum())
        total |= fooled
        parts.append(f"SPSA ({c.opts['spsa_steps']} steps x {c.opts['spsa_samples']} directions) fooled "
                     f"{value['spsa_fooled']}")
    if sources is not None:
        steps = c.opts["transfer_steps"]
        tr = TransferAttack(c.model, sources, eps=c.eps, alpha=2.5 * c.eps / steps, steps=steps, norm=c.norm,
                            generator=c.gen(1001), **c.common)
        fooled, _ = _fooled_by_attack(c, tr, idx, c.eps)
        value["transfer_fooled"] = int(fooled.sum())
        total |= fooled
        parts.append(f"a transfer attack (PGD-{steps} on the sources) fooled {value['transfer_fooled']}")
    count = int(total.sum())
    what = " and ".join(parts) + f" of the {idx.numel()} samples the white-box attacks left robust"
    if count > allowed:
        return _result("fail", value, f"{what}: attacks that never read this model's gradients beat those that do, so "
                                      f"the gradients are masked and the robust accuracy is overestimated by at least "
                                      f"{_pct(count, c.n)}")
    return _result("pass", value, f"{what} ({int(allowed)} allowed)")


_RUNNERS = {
    "randomized": _check_randomized,
    "probabilities": _check_probabilities,
    "zero_gradient": _check_zero_gradient,
    "n_classes": _check_n_classes,
    "huge_eps": _check_huge_eps,
    "monotone_eps": _check_monotone_eps,
    "random_noise": _check_random_noise,
    "square_vs_gradient": _check_square,
    "more_steps": _check_more_steps,
    "single_step": _check_single_step,
    "black_box": _check_black_box,
}


def _options(options: dict | None) -> dict:
    opts = dict(DEFAULT_OPTIONS)
    if options:
        unknown = sorted(set(options) - set(opts))
        if unknown:
            raise ValueError(f"options has unknown key(s) {', '.join(map(repr, unknown))}; known: "
                             f"{', '.join(sorted(opts))}")
        opts.update(options)
    for k in ("batch_size", "random_calls", "dynamic_samples", "huge_eps_steps", "curve_steps", "noise_draws",
              "square_queries", "pgd_steps", "more_steps_factor", "more_steps_restarts", "spsa_steps",
              "spsa_samples", "spsa_max_batch", "transfer_steps"):
        v = opts[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "random_calls" else 1):
            raise ValueError(f"options['{k}'] must be an int >= {2 if k == 'random_calls' else 1}, got {v!r}")
    if opts["spsa_samples"] % 2:
        raise ValueError(f"options['spsa_samples'] must be even (SPSA uses antithetic pairs), got {opts['spsa_samples']}")
    for k in ("random_tol", "prob_tol", "huge_eps_tol", "square_tol", "square_p_init"):
        check_eps(f"options['{k}']", opts[k])
    return opts


def run_checks(model, guard, x, y, *, eps: float, norm: str, common: dict, robust: torch.Tensor,
               fooled_by: dict[str, torch.Tensor], num_classes: int, seed: int, curve: list[dict] | None = None,
               options: dict | None = None) -> dict[str, dict]:
    """Run every gradient-masking check (see the module docstring) on the check subset.

    Args:
        model: the nn.Module (or callable) under evaluation: (B, ...) in ``guard.clip`` -> (B, K) logits.
        guard: a ``fastadv.attacks.Attack`` on ``model`` with the evaluation's settings: its
            ``logits(x)`` is the forward (autocast, channels_last) and ``model_context()`` the model mode.
        x: (n, ...) float32 inside ``guard.clip``; y: (n,) int64 true labels.
        eps: the evaluation's radius, float >= 0. norm: 'linf' | 'l2' | 'l1'.
        common: Attack keyword arguments (model_mode, autocast, clip) for the attacks built here.
        robust: bool (n,), True where the sample survived every attack of the evaluation.
        fooled_by: {attack name: bool (n,)} the samples each attack of the evaluation fooled, in cascade
            order; a 'square' entry is used instead of running Square again.
        num_classes: K. seed: seeds every check's torch.Generator.
        curve: the evaluation's [{"eps": e, "robust_accuracy": a, ("n": samples)}, ...] if computed.
        options: overrides of ``DEFAULT_OPTIONS`` (unknown keys are an error).
    Returns:
        {check name: {"status": "pass" | "fail" | "skip", "value": JSON-serialisable, "detail": str}}
        for every name in ``CHECKS``, in that order.
    """
    eps = float(check_eps("eps", eps))
    check_choice("norm", norm, NORMS)
    opts = _options(options)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a (n, ...) tensor with a batch dimension")
    n = x.shape[0]
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (n,):
        raise ValueError(f"y must be a ({n},) tensor of labels, got {getattr(y, 'shape', type(y).__name__)}")
    if not isinstance(robust, torch.Tensor) or tuple(robust.shape) != (n,):
        raise ValueError(f"robust must be a bool ({n},) tensor, got {getattr(robust, 'shape', type(robust).__name__)}")
    for k, v in fooled_by.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
            got = getattr(v, "shape", type(v).__name__)
            raise ValueError(f"fooled_by[{k!r}] must be a bool ({n},) tensor, got {got}")
    x, y = x.detach().float(), y.long().to(x.device)
    c = _Ctx(model, guard, x, y, eps, norm, dict(common or {}), robust.to(x.device).bool(),
             {k: v.to(x.device).bool() for k, v in fooled_by.items()}, int(num_classes), int(seed), curve, opts)
    results: dict[str, dict] = {}
    with _rng_preserved(x.device):
        digests = _state_digests(model)  # before the first forward: dynamic compares with it at the end
        c.logits = c.forward(x)
        c.pred = c.logits.argmax(1) if n else torch.zeros(0, dtype=torch.long, device=x.device)
        c.correct = c.pred == y
        for name in CHECKS:
            if name != "dynamic":  # dynamic runs last, so its state hashes span every forward call
                results[name] = _guarded(name, _RUNNERS[name], c, opts)
        results["dynamic"] = _guarded("dynamic", lambda cc: _check_dynamic(cc, digests), c, opts)
    return {name: results[name] for name in CHECKS}


def _guarded(name, fn, c, opts) -> dict:
    try:
        return fn(c)
    except Exception as e:  # one broken check must not lose the whole evaluation's report
        if opts["raise_errors"]:
            raise
        return _skip(f"the {name} check raised {type(e).__name__}: {e}; not evaluated")
