"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"; L1: Croce & Hein 2021,
"Mind the box: l1-APGD for sparse adversarial attacks on image classifiers").

Budget-aware step size without tuning: N_iter iterations with checkpoints
w_j (first after p_1 = 0.22 N_iter, gaps shrinking by 0.03 N_iter down to
0.06 N_iter). Per sample, the step size eta (initially 2 eps; L1: eps) is
halved at a checkpoint when fewer than 75% of the steps since the previous
checkpoint increased the loss, or when the step was not halved at the last
checkpoint and the best loss has not improved since; the iterate then
restarts from the best point. Momentum 0.75 (Linf, L2):

    z = P(x_k + eta * s(grad)),  x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1})),

s = sign (Linf) or grad / ||grad||_2 (L2), P the projection onto the ball
intersected with [0, 1]. L1: the sparse step of l1-APGD (top-k coordinates,
k adapted at checkpoints) with the exact L1 x box projection
``fastadv.ops.project_l1``; no momentum. Losses: 'ce' and 'dlr'
(``fastadv.attacks.base.dlr_loss``), 'cw' also accepted.

Any iterate that fools the model is kept (``early_stop=True``, the default,
also drops it from the batch); otherwise the point of highest loss is returned.

Differences from the reference implementation, all minor: the oscillation
count compares each iterate's loss with the previous iterate's (the first
window compares with the start's loss instead of AutoAttack's stale zero
entry); no EOT; the L1 variant has no eps warm-up ("use_largereps").

Example::

    x_adv = APGD(model, eps=8/255, steps=100, loss='dlr')(x, y)
"""
from __future__ import annotations

import torch

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import LOSSES, Attack, check_choice, check_eps, check_int
from fastadv.attacks.pgd import NORMS


def _flat_norm(t: torch.Tensor, p: int) -> torch.Tensor:
    f = t.reshape(t.shape[0], -1)
    return f.abs().sum(1) if p == 1 else f.norm(dim=1)


class APGD(Attack):
    """Args: eps (default 8/255), steps (N_iter, default 100), norm 'linf' | 'l2' | 'l1',
    loss 'ce' (default) | 'dlr' | 'cw', restarts (default 1), rho (0.75),
    early_stop (True), seed generator; others as ``Attack``."""

    name = "APGD"

    def __init__(self, model, eps=8 / 255, steps: int = 100, *, norm: str = "linf", loss: str = "ce",
                 restarts: int = 1, rho: float = 0.75, early_stop: bool = True, compact_every: int | None = None,
                 compile: bool = False, generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.steps = check_int("steps", steps, 1)
        self.norm = check_choice("norm", norm, NORMS)
        self.loss = check_choice("loss", loss, LOSSES)
        if self.loss == "dlr" and self.targeted:
            raise ValueError("loss='dlr' is untargeted; use loss='ce' or 'cw' with targeted=True")
        self.restarts = check_int("restarts", restarts, 1)
        self.rho = float(rho)
        self.early_stop = bool(early_stop)
        self.compact_every = compact_every
        self.compile = bool(compile)
        self.generator = generator

    # --------------------------------------------------------- pieces
    def _project(self, x0, xn, eps):
        d = xn - x0
        if self.norm == "linf":
            return x0 + ops.project_linf(d, eps, x0=x0, clip=self.clip)
        if self.norm == "l2":
            return x0 + ops.project_l2(d, eps, x0=x0, clip=self.clip)
        return x0 + ops.project_l1(d, eps, x0=x0, clip=self.clip)

    def _start(self, x0, eps):
        b = x0.shape[0]
        e = eps.reshape((b,) + (1,) * (x0.dim() - 1))
        if self.norm == "linf":
            t = torch.rand(x0.shape, device=x0.device, generator=self.generator) * 2 - 1
            t = t / t.reshape(b, -1).abs().amax(1).clamp_min(1e-12).reshape(e.shape)
            return (x0 + e * t).clamp(*self.clip)
        t = torch.randn(x0.shape, device=x0.device, generator=self.generator)
        if self.norm == "l2":
            t = t / _flat_norm(t, 2).clamp_min(1e-12).reshape(e.shape)
            return (x0 + e * t).clamp(*self.clip)
        return self._project(x0, x0 + t, eps)

    def _run(self, x0, y, eps):
        n = self.steps
        n2, n_min, decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)
        b = x0.shape[0]
        bshape = (-1,) + (1,) * (x0.dim() - 1)
        n_fts = x0[0].numel()
        x = self._start(x0, eps)
        alpha0 = 1.0 if self.norm == "l1" else 2.0
        state = {
            "eps": eps, "step": alpha0 * eps.clone(), "x_prev": x.clone(), "x_best": x.clone(),
            "g_best": torch.zeros_like(x), "loss_best": torch.full((b,), -float("inf"), device=x.device),
            "loss_prev": torch.full((b,), -float("inf"), device=x.device),
            "incr": torch.zeros(b, device=x.device), "best_at_check": torch.full((b,), -float("inf"), device=x.device),
            "reduced": torch.ones(b, dtype=torch.bool, device=x.device),
            "topk": torch.full((b,), 0.2, device=x.device), "sp_old": torch.full((b,), float(n_fts), device=x.device),
            "fooled": torch.zeros(b, dtype=torch.bool, device=x.device), "x_adv": x.clone(),
        }
        ctr = {"k": max(int(0.04 * n), 1) if self.norm == "l1" else n2, "count": 0}

        def step(x, g, s, t, per, logits):
            # Bookkeeping for the iterate x (the forward pass just done).
            f = self.fooled(logits, s["y"])
            s["x_adv"] = torch.where(f.reshape(bshape) & ~s["fooled"].reshape(bshape), x, s["x_adv"])
            s["fooled"] = s["fooled"] | f
            if t > 0:
                s["incr"] = s["incr"] + (per > s["loss_prev"]).float()
            s["loss_prev"] = per
            better = per > s["loss_best"]
            s["x_best"] = torch.where(better.reshape(bshape), x, s["x_best"])
            s["g_best"] = torch.where(better.reshape(bshape), g, s["g_best"])
            s["loss_best"] = torch.where(better, per, s["loss_best"])
            if t == 0:
                s["best_at_check"] = s["loss_best"].clone()
            if t == n:  # the last forward only records; no step after it
                return x
            if t > 0:
                ctr["count"] += 1
                if ctr["count"] == ctr["k"]:
                    if self.norm == "l1":
                        sp = (s["x_best"] - s["x0"]).reshape(x.shape[0], -1).ne(0).sum(1).float()
                        red = sp / s["sp_old"].clamp_min(1) < 0.95
                        s["topk"] = sp / n_fts / 1.5
                        a0 = alpha0 * s["eps"]
                        s["step"] = torch.where(red, a0, s["step"] / 1.5)
                        s["step"] = torch.minimum(torch.maximum(s["step"], a0 / 10.0), a0)
                        s["sp_old"] = sp
                        osc = red
                    else:
                        osc = s["incr"] <= ctr["k"] * self.rho
                        no_impr = ~s["reduced"] & (s["best_at_check"] >= s["loss_best"])
                        osc = osc | no_impr
                        s["reduced"] = osc
                        s["best_at_check"] = s["loss_best"].clone()
                        s["step"] = torch.where(osc, s["step"] / 2, s["step"])
                        ctr["k"] = max(ctr["k"] - decr, n_min)
                    x = torch.where(osc.reshape(bshape), s["x_best"], x)
                    g = torch.where(osc.reshape(bshape), s["g_best"], g)
                    s["incr"] = torch.zeros_like(s["incr"])
                    ctr["count"] = 0
            eta = s["step"].reshape(bshape)
            x0 = s["x0"]
            if self.norm == "l1":
                ag = g.abs().reshape(x.shape[0], -1)
                kth = ((1 - s["topk"]) * n_fts).clamp(0, n_fts - 1).long()
                thr = ag.sort(1).values.gather(1, kth[:, None]).reshape(bshape)
                sg = torch.where(g.abs() >= thr, g.sign(), torch.zeros_like(g))
                sg = sg / (sg.abs().reshape(x.shape[0], -1).sum(1).reshape(bshape) + 1e-10)
                x_new = self._project(x0, x + eta * sg, s["eps"])
            else:
                if self.norm == "linf":
                    dirn = g.sign()
                else:
                    dirn = g / (_flat_norm(g, 2).reshape(bshape) + 1e-12)
                z = self._project(x0, x + eta * dirn, s["eps"])
                a = 0.75 if t > 0 else 1.0
                x_new = self._project(x0, x + a * (z - x) + (1 - a) * (x - s["x_prev"]), s["eps"])
            s["x_prev"] = x
            return x_new

        res = engine.run_loop(self, x0, y, x, n + 1, step, loss=self.loss, state=state, early_stop=self.early_stop,
                              compact_every=self.compact_every, compile=self.compile)
        fooled = res["stopped"] | res["fooled"]
        first_fool = torch.where(res["stopped"].reshape(bshape), res["x"], res["x_adv"])
        return torch.where(fooled.reshape(bshape), first_fool, res["x_best"])

    def perturb(self, x, y):
        eps = engine._expand(self.eps, x.shape[0], x.device)

        def once(idx, r):
            if idx is None:
                return self._run(x, y, eps)
            return self._run(x[idx], y[idx], eps[idx])

        return engine.with_restarts(self, x, y, self.restarts, once, self.loss)
