"""Cost-sensitive adversarial training with protected classes (Shen et al. 2021)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack, check_eps, check_int
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos


def protect_cost_matrix(num_classes: int, protected: Sequence[int], cost: float = 10.0) -> torch.Tensor:
    """The reference's cost matrix (utils.py ``get_cost_matric``), for any number of protected classes.

    C = ones(K, K); C[p, :] = C[:, p] = cost for every protected p; diag(C) = 0.
    So misclassifying a protected class, or misclassifying anything as a
    protected class, costs ``cost``; other errors cost 1; a correct
    prediction costs 0. Shape (K, K), float32.
    """
    c = torch.ones(num_classes, num_classes)
    for p in protected:
        c[p, :] = cost
        c[:, p] = cost
    c.fill_diagonal_(0.0)
    return c


def expected_cost(logits: torch.Tensor, y: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """sum_k C[y_i, k] softmax(z_i)_k per sample, (B,): the expected misclassification cost."""
    return (F.softmax(logits, dim=1) * cost.to(logits)[y]).sum(1)


def cost_sensitive_loss(logits: torch.Tensor, y: torch.Tensor, cost: torch.Tensor,
                        reduction: str = "mean") -> torch.Tensor:
    """CE(z, y) + sum_k C[y, k] softmax(z)_k: cross-entropy plus the expected misclassification cost.

    logits (B, K) float32, y (B,) int64, cost (K, K) with C[y, k] the cost of
    predicting k for a sample of class y (the reference indexes C[k, y], the
    same for its symmetric matrices). reduction 'mean' (the reference's: both
    terms averaged over the batch) or 'none' (B,).
    """
    per = F.cross_entropy(logits, y, reduction="none") + expected_cost(logits, y, cost)
    return per.mean() if reduction == "mean" else per


class CostSensitivePGD(Attack):
    """Signed L-inf ascent on the cost-sensitive loss (FGSM for steps=1, alpha=eps, no random start:
    the reference's ``my_fgsm`` with the cost-sensitive criterion). ``cost``: a (K, K) matrix, or a
    callable num_classes -> matrix (sized from the first logits). alpha default: eps for one step,
    else eps / 4; others as ``Attack``."""

    name = "CostSensitivePGD"

    def __init__(self, model, cost: torch.Tensor, eps=0.06, alpha=None, steps: int = 1, *,
                 random_start: bool = False, generator: torch.Generator | None = None, **kwargs):
        super().__init__(model, **kwargs)
        self.cost = cost
        self.eps = check_eps("eps", eps)
        self.alpha = check_eps("alpha", alpha, allow_none=True)
        self.steps = check_int("steps", steps, 0)
        self.random_start = bool(random_start)
        self.generator = generator

    def _loss(self, logits, s):
        c = self.cost(logits.shape[1]) if callable(self.cost) else self.cost
        per = cost_sensitive_loss(logits, s["y"], c, reduction="none")
        # the reference differentiates the batch mean; the sum has the same sign, the step only uses the sign
        return per.sum(), per

    def _step(self, x, g, s, t, per, logits):
        return ops.linf_step(x, s["x0"], g, s["alpha"], s["eps"], clip=self.clip)

    def perturb(self, x, y):
        from fastadv.attacks.pgd import random_start

        b = x.shape[0]
        eps = engine._expand(self.eps, b, x.device)
        alpha = engine._expand(self.alpha if self.alpha is not None else (eps if self.steps == 1 else eps / 4),
                               b, x.device)
        x1 = random_start("linf", x, eps, self.clip, self.generator) if self.random_start else x.clone()
        return engine.run_loop(self, x, y, x1, self.steps, self._step, loss=self._loss,
                               state={"eps": eps, "alpha": alpha})["x"]


class CostSensitiveAT(Method):
    """Cost-sensitive adversarial training (CSA): protected classes made harder to attack.

    Shen, Chen, Wang & Wang, "Adversarial Learning with Cost-Sensitive
    Classes", arXiv 2101.12372 (2021; IEEE Transactions on Cybernetics);
    reference code WinddyAkoky/Adversarial-cost-sensitive-learning (the first
    author's; MNIST/CSA.py, cifar/CSA_cifar.py, utils.py), which we follow.
    With C the cost matrix (:func:`protect_cost_matrix`: ``cost`` = c on the
    rows and columns of the protected classes, 1 elsewhere, 0 on the
    diagonal) the loss is

        L_C(x, y) = CE(f(x), y) + sum_k C[y, k] softmax(f(x))_k,

    averaged over the batch (:func:`cost_sensitive_loss`): a protected
    sample's expected-cost term is c (1 - p_y), c times that of an
    unprotected one, and putting mass on a protected class costs c. Each
    batch takes two optimizer steps, as the reference loop does (``replays``
    = 2): first on L_C(x, y), then on L_C(x', y) with x' = FGSM on L_C
    against the just-updated model, x' = clip_[0,1](x + eps sign(grad_x
    L_C(x, y))) (:class:`CostSensitivePGD`, steps=1); the inner attack thus
    weights samples by the same cost matrix. ``clean_step=False`` keeps only
    the adversarial step; ``steps > 1`` runs PGD on L_C (alpha default eps/4).

    ``protected``: class indices; ``cost``: the scalar c (default 10, the
    code's ``--c``) or a full (K, K) matrix (nested lists or a tensor, C[y, k]
    = cost of predicting k for class y; ``protected`` then only selects the
    classes summarized in the metrics). With no protected class and a scalar
    cost, C = 1 - I (uniform costs).

    Per-class robust accuracy: the method sees no held-out data, so
    ``epoch_metrics`` reports the training robust accuracy per class on its
    own adversarial batches of the epoch (``cost_adv_acc_class{k}``, and
    ``cost_adv_acc_protected`` / ``cost_adv_acc_unprotected`` pooled), on this
    rank only under torchrun. The held-out per-class robust accuracy is the
    final evaluation's ``per_class``.

    Defaults: the code's FGSM radius 0.3 is in units of normalized inputs
    (std 0.3081 on MNIST, about 0.2 per channel on CIFAR-10); in [0, 1]
    pixel units that is 0.0924 (MNIST) and 0.06 (CIFAR-10; the default here).
    The attack runs with the model in train mode (the code calls ``my_fgsm``
    during ``model.train()``). Deliberate differences: x' is clipped to the
    image box (the code's normalized inputs are not clipped); multiple
    protected classes at once (the code protects one class per model, looping
    over the classes); the code starts from an adversarially pre-trained LeNet
    and trains with Adam (lr 1e-3, decay 0.95 per epoch, batch 64), which is
    the caller's choice here.
    """

    supports_grad_accum = False
    grad_accum_refusal = "each loss call advances the clean/adversarial phase of the batch"

    name = "cost"
    attack_mode = "train"

    def __init__(self, protected: Sequence[int] = (), cost=10.0, eps: float = 0.06, alpha: float | None = None,
                 steps: int = 1, *, clean_step: bool = True, random_start: bool = False, attack_mode: str = "train"):
        super().__init__()
        if isinstance(protected, int) and not isinstance(protected, bool):
            protected = [protected]
        try:
            self.protected = sorted({int(p) for p in protected})
        except (TypeError, ValueError):
            raise ValueError(f"protected must be a list of class indices, got {protected!r}") from None
        if any(p < 0 for p in self.protected):
            raise ValueError(f"protected must hold class indices >= 0, got {protected!r}")
        if isinstance(cost, (int, float)) and not isinstance(cost, bool):
            self.cost = _check_pos("cost", cost)
            self._matrix = None
        else:
            m = torch.as_tensor(cost, dtype=torch.float32)
            if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2 or bool((m < 0).any()) or \
                    bool(torch.isnan(m).any()):
                raise ValueError(f"cost must be a number >= 0 or a (K, K) matrix of costs >= 0, got shape "
                                 f"{tuple(m.shape)}")
            if self.protected and self.protected[-1] >= m.shape[0]:
                raise ValueError(f"protected class {self.protected[-1]} is outside the {m.shape[0]}-class cost matrix")
            self.cost, self._matrix = None, m
        self.eps = _check_pos("eps", eps)
        self.alpha = None if alpha is None else _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.clean_step = bool(clean_step)
        self.replays = 2 if self.clean_step else 1
        self.random_start = bool(random_start)
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("train", "eval"))
        self._phase = 0
        self._cache: dict = {}
        self._count: torch.Tensor | None = None   # (K,) float64 on the device, per epoch
        self._correct: torch.Tensor | None = None

    def matrix(self, num_classes: int, device=None) -> torch.Tensor:
        """The (K, K) cost matrix for a K-class network (built once per K and device)."""
        key = (num_classes, str(device))
        if key not in self._cache:
            self._cache[key] = self._build(num_classes, device)
        return self._cache[key]

    def _build(self, num_classes, device):
        if self._matrix is not None:
            if self._matrix.shape[0] != num_classes:
                raise ValueError(f"cost is a {self._matrix.shape[0]}-class matrix but the network has "
                                 f"{num_classes} classes")
            m = self._matrix
        else:
            if self.protected and self.protected[-1] >= num_classes:
                raise ValueError(f"protected class {self.protected[-1]} is outside the network's {num_classes} "
                                 f"classes")
            m = protect_cost_matrix(num_classes, self.protected, self.cost)
        return m.to(device) if device is not None else m

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        self._count = self._correct = None

    def on_step(self, step, total_steps):
        super().on_step(step, total_steps)
        self._phase = 0

    def attack(self) -> CostSensitivePGD:
        return CostSensitivePGD(self.ctx.attack_net, lambda k: self.matrix(k, self.ctx.device), eps=self.eps,
                                alpha=self.alpha, steps=self.steps, random_start=self.random_start,
                                **self.attack_kwargs())

    def _record(self, logits, y):
        k = logits.shape[1]
        ok = (logits.detach().argmax(1) == y).to(torch.float64)
        n = torch.bincount(y, minlength=k).to(torch.float64)
        c = torch.bincount(y, weights=ok, minlength=k)
        self._count = n if self._count is None else self._count + n
        self._correct = c if self._correct is None else self._correct + c

    def loss(self, x, y):
        phase = self._phase
        self._phase = (self._phase + 1) % self.replays
        if self.clean_step and phase == 0:
            logits = self.forward(x)
            return StepOutput(cost_sensitive_loss(logits, y, self.matrix(logits.shape[1], logits.device)), logits, y)
        x_adv = self.attack()(x, y)
        logits = self.forward(x_adv)
        self._record(logits, y)
        return StepOutput(cost_sensitive_loss(logits, y, self.matrix(logits.shape[1], logits.device)), logits, y)

    def epoch_metrics(self):
        if self._count is None:
            return {}
        n, c = self._count.cpu(), self._correct.cpu()
        out = {f"cost_adv_acc_class{k}": float(c[k] / n[k]) for k in range(n.numel()) if n[k] > 0}
        prot = torch.zeros(n.numel(), dtype=torch.bool)
        prot[[p for p in self.protected if p < n.numel()]] = True
        for name, sel in (("protected", prot), ("unprotected", ~prot)):
            if n[sel].sum() > 0:
                out[f"cost_adv_acc_{name}"] = float(c[sel].sum() / n[sel].sum())
        return out

    def describe(self):
        d = super().describe()
        d["cost"] = self.cost if self._matrix is None else self._matrix.tolist()
        return d
