"""MART: misclassification-aware adversarial training (Wang et al. 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastadv.attacks import PGD
from fastadv.train.methods.base import Method, StepOutput, _check_pos, set_attack_settings, tracks_running_stats


class GaussianStartPGD(PGD):
    """L-inf CE PGD started at x + init_std * N(0, I), as MART's reference ``mart_loss`` starts it.

    The start is the reference's exactly: the Gaussian noise is added to x and
    neither projected onto the eps-ball nor clipped to the box (the first
    signed step is, as every later one: x <- clip(x0 + clamp(x + alpha * sign(g)
    - x0, -eps, eps))). ``TRADESAttack`` uses the same noise on another
    objective (the KL to the clean prediction) and projects its start; this
    is plain PGD's CE objective (mean over the batch, so the signed step is
    the reference's bit for bit up to the projection's float32 rounding).
    Args: as ``PGD`` (``norm='linf'``, no restarts), plus ``init_std`` (0.001).
    """

    name = "GaussianStartPGD"

    def __init__(self, model, eps=8 / 255, alpha=0.007, steps: int = 10, *, init_std: float = 0.001, **kwargs):
        if kwargs.get("norm", "linf") != "linf":
            raise ValueError(f"norm must be 'linf' (MART's reference attack is L-inf only), got {kwargs['norm']!r}")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, **kwargs)
        self.init_std = _check_pos("init_std", init_std)

    def start(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return x0 + self.init_std * torch.randn(x0.shape, device=x0.device, generator=self.generator)

    def perturb(self, x, y):
        # with steps=0 the reference returns clamp(x + noise, 0, 1); with steps >= 1 the last step has clipped
        return super().perturb(x, y).clamp(*self.clip)


def mart_terms(logits_adv: torch.Tensor, logits_nat: torch.Tensor, y: torch.Tensor) -> dict:
    """The per-sample pieces of MART's loss, as the reference ``mart_loss`` computes them.

    logits_adv, logits_nat: (B, K) float; y: (B,) int64. Returns (B,) tensors:

    * ``bce``: the boosted cross-entropy on the adversarial example,
      CE(p', y) - log(1.0001 - max_{k != y} p'_k + 1e-12), p' = softmax(logits_adv);
      the most likely wrong class comes from the reference's top-2 trick (the
      larger of the top two classes that is not y);
    * ``kl``: KL(p || p') = sum_k p_k (log p_k - log(p'_k + 1e-12)), p = softmax(logits_nat)
      (``nn.KLDivLoss(reduction='none')(log(p' + 1e-12), p)`` summed over classes);
    * ``weight``: the misclassification weight 1.0000001 - p_y (1 - p_y in the
      paper; the reference adds 1e-7 so a sample with p_y = 1 keeps a weight).
      It is not detached: as in the reference, the gradient also flows
      through p_y.
    """
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = adv_probs.topk(2, dim=1).indices  # [:, 0] the largest, [:, 1] the second
    new_y = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])
    p_wrong = adv_probs.gather(1, new_y[:, None]).squeeze(1)
    bce = F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - p_wrong + 1e-12)
    nat_probs = F.softmax(logits_nat, dim=1)
    kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(1)
    weight = 1.0000001 - nat_probs.gather(1, y[:, None]).squeeze(1)
    return {"bce": bce, "kl": kl, "weight": weight}


def mart_loss(logits_adv: torch.Tensor, logits_nat: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART's outer loss, a scalar: mean_i BCE_i + beta * mean_i KL_i * (1.0000001 - p_y(x_i)).

    See :func:`mart_terms`. ``beta = 0`` returns the boosted CE term alone
    (no ``0 * KL`` term, so a non-finite KL cannot reach the gradient).
    """
    t = mart_terms(logits_adv, logits_nat, y)
    loss = t["bce"].mean()
    if beta == 0:
        return loss
    return loss + float(beta) * (t["kl"] * t["weight"]).sum() / logits_adv.shape[0]


class MART(Method):
    """MART: BCE(f(x'), y) + beta * KL(f(x) || f(x')) * (1 - p_y(x)), x' = argmax_{||x'-x||_inf <= eps} CE(f(x'), y).

    Wang, Zou, Yi, Bailey, Ma & Gu, "Improving Adversarial Robustness
    Requires Revisiting Misclassified Examples", ICLR 2020; reference code
    YisenWang/MART (mart.py ``mart_loss``, train_wideresnet.py,
    train_resnet.py). With p = softmax(f(x)), p' = softmax(f(x')):

        L = 1/B sum_i [ CE(p'_i, y_i) - log(1.0001 - max_{k != y_i} p'_ik + 1e-12) ]
            + beta / B * sum_i KL(p_i || p'_i) * (1.0000001 - p_i,y_i)

    (the boosted CE punishes the most likely wrong class on x'; the KL term,
    summed over classes and averaged over the batch, weighs each sample by
    how far its clean prediction is from correct; :func:`mart_terms`).

    As the reference: the inner maximization is CE PGD (``GaussianStartPGD``)
    from x + 0.001 * N(0, I), signed steps projected onto the L-inf ball and
    [0, 1], with batch norm in eval mode (``model.eval()`` in mart_loss);
    then, in train mode, separate forwards of x and of x' (in that order, so
    the batch-norm running averages see the same two updates); gradients flow
    through the misclassification weight (not detached, as in the code).

    Shapes: x (B, C, H, W) in [0, 1], y (B,) int64; the loss is a scalar, the
    accuracy is taken on the adversarial logits.

    Defaults: the paper's CIFAR-10 setting, eps = 8/255 (the code's 0.031),
    step 0.007, 10 steps, beta = 6 (train_wideresnet.py, WRN-34-10: SGD lr 0.1,
    momentum 0.9, weight decay 2e-4, batch 128, 76 epochs, lr / 10 from epoch
    75; train_resnet.py for ResNet-18: beta = 5, lr 0.01, weight decay
    3.5e-3, 120 epochs, lr / 10 at 75, / 100 at 90, / 1000 at 100). We default
    to the WRN value, the paper's headline model; pass ``beta=5`` for
    ResNet-18. The reference repository ships CIFAR-10 scripts only, and we
    did not take MNIST settings from the paper (on MNIST, ``fastadv train``
    passes the dataset's attack settings, as for every method).
    ``beta = 0`` is the boosted CE alone (one more clean forward without
    autograd keeps the batch-norm running averages as the reference's).

    Deliberate differences: the most likely wrong class is picked with
    ``topk(2)`` on p' instead of the reference's full ``argsort`` (the same
    class values; only the tie order between equal probabilities can differ,
    and the loss depends on the probability value only); the L-inf projection
    is ``fastadv.ops.linf_step`` (x0 + clamp(x - x0) instead of
    min(max(x, x0 - eps), x0 + eps): the same point up to float32 rounding).
    """

    name = "mart"
    attack_mode = "eval"

    def __init__(self, eps: float = 8 / 255, alpha: float = 0.007, steps: int = 10, *, beta: float = 6.0,
                 attack_mode: str = "eval"):
        super().__init__()
        set_attack_settings(self, eps, alpha, steps, beta=beta, attack_mode=attack_mode)

    def attack(self):
        return GaussianStartPGD(self.ctx.attack_net, eps=self.eps, alpha=self.alpha, steps=self.steps,
                                **self.attack_kwargs())

    def perturb(self, x, y):
        """The adversarial batch x' (CE PGD from the Gaussian start)."""
        return self.attack()(x, y)

    def loss_from_adv(self, x, x_adv, y):
        """MART's loss for a given adversarial batch (AWP takes its weight perturbation on this)."""
        if self.beta == 0:
            if tracks_running_stats(self.ctx.net):
                with torch.no_grad():  # the reference's model(x_natural): batch-norm running averages only
                    self.forward(x)
            adv = self.forward(x_adv)
            return StepOutput(mart_loss(adv, adv, y, 0.0), adv, y)
        nat = self.forward(x)
        adv = self.forward(x_adv)
        return StepOutput(mart_loss(adv, nat, y, self.beta), adv, y)

    def loss(self, x, y):
        return self.loss_from_adv(x, self.perturb(x, y), y)
