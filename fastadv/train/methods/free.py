"""Free adversarial training (Shafahi et al. 2019)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadv import ops
from fastadv.train.methods.base import Method, StepOutput, _check_int, _check_pos


class FreeAT(Method):
    """Free adversarial training: m replays of each minibatch, one backward for weights and perturbation.

    Shafahi, Najibi, Ghiasi, Xu, Dickerson, Studer, Davis, Taylor & Goldstein,
    "Adversarial Training for Free!", NeurIPS 2019, as main_free.py
    (mahyarnajibi/FreeAdversarialTraining) runs it: for each minibatch, m
    times: loss = CE(f(clamp(x + delta, 0, 1)), y) with delta the leaf; one
    backward gives the weight gradient (optimizer step) and grad_delta,
    which is zero where the clamp is active (no gradient through clamped
    coordinates, so they do not move); then
    delta <- clamp(delta + step * sign(grad_delta), -eps, eps) (the fused
    ``fastadv.ops.linf_step`` with no box). delta itself is not clipped to
    the box: it carries over, raw, to the next minibatch, whose forward
    clamps x + delta again. The loop runs ``epochs`` passes over the data in
    total, i.e. epochs/m "simulated" epochs of the paper, and m optimizer
    steps per batch.

    Defaults: the paper's CIFAR-10 setting, eps = 8/255, m = 8, step = eps
    (the code's fgsm_step = clip_eps).
    """

    supports_grad_accum = False
    grad_accum_refusal = "the perturbation is one tensor of the batch's shape, carried across replays and batches"

    name = "free"

    def __init__(self, eps: float = 8 / 255, replays: int = 8, *, step: float | None = None):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.step_size = self.eps if step is None else _check_pos("step", step)
        self.replays = _check_int("replays", replays, 1)
        self._delta: torch.Tensor | None = None
        self._leaf: torch.Tensor | None = None

    def loss(self, x, y):
        if self._delta is None or self._delta.shape != x.shape or self._delta.device != x.device:
            self._delta = torch.zeros_like(x)
        self._leaf = self._delta.detach().requires_grad_(True)
        logits = self.forward((x + self._leaf).clamp(0.0, 1.0))
        return StepOutput(F.cross_entropy(logits, y), logits, y)

    def after_backward(self):
        leaf, self._leaf = self._leaf, None
        if leaf is None or leaf.grad is None:
            return
        d = leaf.detach()
        self._delta = ops.linf_step(d, torch.zeros_like(d), leaf.grad, self.step_size, self.eps, clip=None)

    def state_dict(self):
        return {"delta": self._delta.cpu() if self._delta is not None else None}

    def load_state_dict(self, state):
        d = state.get("delta")
        self._delta = d.to(self.ctx.device) if (d is not None and self.ctx is not None) else d
