"""AWP: adversarial weight perturbation on top of PGD-AT, TRADES or MART (Wu et al. 2020)."""
from __future__ import annotations

import dataclasses
import inspect

import torch

from fastadv.train.methods.base import Method, _check_choice, _check_int, _check_pos
from fastadv.train.methods.mart import MART
from fastadv.train.methods.pgd import PGDAT
from fastadv.train.methods.trades import TRADES

BASES = {"pgd": PGDAT, "trades": TRADES, "mart": MART}

# The reference scripts' settings per base (csdongxian/AWP): gamma, warm-up epochs without AWP (0-based, see
# AWP's docstring) and the base method's attack where the AWP script differs from the base method's own defaults.
AWP_DEFAULTS = {
    "pgd": {"gamma": 0.01, "warmup": 0, "base": {"steps": 10}},  # AT_AWP/train_cifar10.py: PGD-10 of 2/255
    "trades": {"gamma": 0.005, "warmup": 9, "base": {"alpha": 2 / 255}},  # TRADES_AWP/train_trades_cifar.py
    "mart": {"gamma": 0.005, "warmup": 9, "base": {}},  # no MART-AWP script released: TRADES-AWP's gamma/warm-up
}

#: the reference proxy optimizer's learning rate (SGD, no momentum, no weight decay): diff = lr * grad exactly
PROXY_LR = 0.01
_EPS = 1e-20  # the reference's EPS in diff_in_weights


def _mean_across_ranks(ts: list) -> None:
    """Average tensors over DDP ranks in one collective (no-op on one process): the reference's proxy sees the
    whole batch (nn.DataParallel), so every rank takes the same perturbation."""
    import torch.distributed as dist

    if not ts or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in ts])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, f in zip(ts, flat.split([t.numel() for t in ts])):
        t.copy_(f.view_as(t))


class AWP(Method):
    """Adversarial weight perturbation: min_w max_{||v_l|| <= gamma ||w_l||} L_base(w + v), one ascent step for v.

    Wu, Xia & Wang, "Adversarial Weight Perturbation Helps Robust
    Generalization", NeurIPS 2020; reference code csdongxian/AWP
    (AT_AWP/utils_awp.py ``AdvWeightPerturb``, TRADES_AWP/utils_awp.py
    ``TradesAWP``, AT_AWP/train_cifar10.py, TRADES_AWP/train_trades_cifar.py).
    An add-on to a base method (PGD-AT, TRADES or MART). Per batch:

    1. x' = the base method's adversarial batch (its own attack, unchanged);
    2. g_l = d L_base(x, x', y; w) / d w_l at the current weights, batch norm
       in train mode (the reference's proxy model, a copy of the network
       stepped once by SGD(lr 0.01) on -L_base); for every parameter with
       dim > 1 and 'weight' in its name (conv and linear weights; biases and
       batch-norm affine parameters are never perturbed):
       v_l = gamma * ||w_l|| * d_l / (||d_l|| + 1e-20), d_l = 0.01 * g_l
       (Frobenius norms per tensor; ||v_l|| = gamma ||w_l||);
    3. w <- w + v; the loss returned is L_base(x, x', y; w + v), which the
       trainer backpropagates and steps the optimizer on (momentum and weight
       decay act at w + v, as in the reference, where optimizer.step runs on
       the perturbed model);
    4. ``after_step``: w <- w - v (the reference's ``restore`` after
       optimizer.step), so the step's net effect is w - update(grad at w + v).

    L_base is the base method's outer loss on the fixed x': CE(f(x'), y) for
    PGD-AT; CE(f(x), y) + beta KL(f(x) || f(x')) for TRADES (as ``TradesAWP``,
    which takes the proxy step on the whole TRADES loss); MART's loss for
    MART (the paper's appendix lists MART-AWP; no MART-AWP code is released,
    so the proxy loss is MART's own, by analogy with TradesAWP).

    Args:
        base: 'pgd' | 'trades' | 'mart', built from the keyword arguments
            below (None: that base's default, or the AWP script's where it
            differs), or a Method instance with ``perturb(x, y)`` and
            ``loss_from_adv(x, x_adv, y)`` (then no base keyword arguments).
        gamma: relative weight-perturbation size (None: 0.01 for 'pgd',
            0.005 for 'trades' and 'mart'); 0 turns AWP off (the base method).
        warmup: epochs (0-based) trained as the base method before AWP starts
            (None: 0 for 'pgd'; 9 for 'trades' and 'mart', the TRADES-AWP
            script's ``epoch >= awp_warmup = 10`` with epochs counted from 1).
        eps, alpha, steps, beta, attack_mode, random_start, eps_warmup: the
            base method's arguments (an argument the base does not take is
            an error that names it).

    Defaults (the reference scripts): AT-AWP (PreAct ResNet-18, CIFAR-10):
    gamma 0.01, no warm-up, PGD-10 with step 2/255 and eps 8/255 in batch-norm
    train mode (the mode the script leaves the model in between steps; so
    ``base='pgd'`` runs 10 steps, not PGD-AT's 7); SGD lr 0.1, momentum 0.9,
    weight decay 5e-4, 200 epochs, lr divided by 10 at epoch 100 and by 100
    at epoch 150. TRADES-AWP (WRN-34-10): gamma 0.005, warm-up as above,
    TRADES' attack with step 2/255 (not TRADES' 0.007), 10 steps, beta 6;
    weight decay 5e-4, lr 0.1 divided by 10 at epochs 100 and 150 of 200.
    MART-AWP: MART's defaults with TRADES-AWP's gamma and warm-up (our
    choice: no script). The released scripts cover CIFAR-10, CIFAR-100 and
    SVHN; we found no MNIST setting. We took the values above from the code;
    the paper's text was not available to check them against.

    Deliberate differences: no proxy network. One SGD step (no momentum, no
    weight decay) from the model's weights gives proxy - model = lr * grad,
    so we take the gradient with ``torch.autograd.grad`` on the live network
    (``ctx.attack_net``: the plain network or its compiled twin, never the
    DDP wrapper) and normalize lr * grad; the reference's (w + lr g) - w
    equals it up to float32 cancellation. The proxy forward does not change
    the network's batch-norm running statistics: the buffers are saved
    before it and copied back after (the reference's proxy keeps its own).
    Under torchrun the proxy gradient is averaged over ranks before
    normalizing (the reference's DataParallel proxy sees the whole batch), so
    every rank applies the same v. The memory cost is one copy of the
    perturbed weight tensors (v), kept until ``after_step``. The training
    forwards at w + v are the base method's own (TRADES: clean, adversarial,
    clean again without autograd; the TRADES-AWP script runs adversarial,
    clean, clean: the same loss and gradient, the batch-norm running averages
    updated in another order). Under fp16
    autocast the proxy gradient is not loss-scaled (its scale is normalized
    away, but tiny activation gradients can underflow); bf16 has no such
    issue.
    """

    supports_grad_accum = False
    grad_accum_refusal = "each loss call perturbs the weights, which after_step restores once"

    name = "awp"

    def __init__(self, base="pgd", *, gamma: float | None = None, warmup: int | None = None,
                 eps: float | None = None, alpha: float | None = None, steps: int | None = None,
                 beta: float | None = None, attack_mode: str | None = None, random_start: bool | None = None,
                 eps_warmup: float | None = None):
        super().__init__()
        given = {k: v for k, v in dict(eps=eps, alpha=alpha, steps=steps, beta=beta, attack_mode=attack_mode,
                                       random_start=random_start, eps_warmup=eps_warmup).items() if v is not None}
        if isinstance(base, Method):
            if given:
                raise ValueError(f"{sorted(given)[0]}: base is a {type(base).__name__} instance; give its settings "
                                 f"to it, not to AWP")
            for attr in ("perturb", "loss_from_adv"):
                if not callable(getattr(base, attr, None)):
                    raise TypeError(f"base must have perturb(x, y) and loss_from_adv(x, x_adv, y); "
                                    f"{type(base).__name__} has no {attr}")
            self.base = base
        else:
            _check_choice("base", base, tuple(BASES))
            cls = BASES[base]
            params = inspect.signature(cls.__init__).parameters
            for k in given:
                if k not in params:
                    raise ValueError(f"{k}: base {base!r} ({cls.__name__}) takes no {k}")
            self.base = cls(**{**AWP_DEFAULTS[base]["base"], **given})
        d = AWP_DEFAULTS.get(self.base.name, {"gamma": 0.01, "warmup": 0})
        self.gamma = _check_pos("gamma", d["gamma"] if gamma is None else gamma)
        self.warmup = _check_int("warmup", d["warmup"] if warmup is None else warmup, 0)
        self.attack_mode = self.base.attack_mode
        self.replays = self.base.replays
        self.default_schedule, self.default_lr = self.base.default_schedule, self.base.default_lr
        self._params: list = []
        self._v: list | None = None

    # ------------------------------------------------------------ protocol
    def bind(self, ctx):
        super().bind(ctx)
        self.base.bind(ctx)
        # the reference's diff_in_weights: state_dict entries with dim > 1 and 'weight' in the name
        self._params = [p for n, p in ctx.net.named_parameters() if p.requires_grad and p.dim() > 1 and "weight" in n]
        return self

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        self.base.on_epoch(epoch, epochs)

    def on_step(self, step, total_steps):
        super().on_step(step, total_steps)
        self.base.on_step(step, total_steps)

    @property
    def active(self) -> bool:
        """AWP is on this epoch (gamma > 0 and the warm-up is over)."""
        return self.gamma > 0 and self.epoch >= self.warmup

    def weight_perturbation(self, x, x_adv, y) -> list:
        """v for each perturbed parameter (``self._params`` order), from one proxy gradient of the base loss.

        The network's batch-norm running statistics (all buffers) are left as they were.
        """
        net, params = self.ctx.net, self._params
        buffers = list(net.buffers())
        saved = [b.clone() for b in buffers]
        ctx = self.base.ctx
        self.base.ctx = dataclasses.replace(ctx, model=ctx.attack_net)  # never the DDP wrapper: no reducer hooks
        try:
            loss = self.base.loss_from_adv(x, x_adv, y).loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            self.base.ctx = ctx
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        _mean_across_ranks(grads)
        with torch.no_grad():
            vs = []
            for p, g in zip(params, grads):
                diff = g * PROXY_LR  # proxy - model after the reference's SGD(lr=0.01) step on -loss
                vs.append(self.gamma * (p.norm() / (diff.norm() + _EPS) * diff))  # the reference's arithmetic order
        return vs

    def loss(self, x, y):
        if not self.active:
            return self.base.loss(x, y)
        self._restore()  # a perturbation left over from a step that never reached after_step
        x_adv = self.base.perturb(x, y)
        vs = self.weight_perturbation(x, x_adv, y)
        with torch.no_grad():
            for p, v in zip(self._params, vs):
                p.add_(v)
        self._v = vs
        return self.base.loss_from_adv(x, x_adv, y)

    def _restore(self):
        if self._v is None:
            return
        with torch.no_grad():
            for p, v in zip(self._params, self._v):
                p.sub_(v)
        self._v = None

    def after_backward(self):
        self.base.after_backward()

    def after_step(self):
        self._restore()
        self.base.after_step()

    def extra_modules(self):
        return self.base.extra_modules()

    def epoch_metrics(self):
        return {**self.base.epoch_metrics(), "awp_active": int(self.active)}

    def state_dict(self):
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state):
        self.base.load_state_dict(state.get("base", {}))

    def describe(self):
        return {"base": self.base.name, "gamma": self.gamma, "warmup": self.warmup,
                "base_args": self.base.describe()}
