"""Ensemble adversarial training (Tramer et al. 2018)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastadv import ops
from fastadv.attacks import engine
from fastadv.attacks.base import Attack, check_choice, check_eps, grad_wrt
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_pos


def load_static_model(path_or_module, build=None, device="cpu") -> nn.Module:
    """A frozen model for ensemble training: an nn.Module, or a checkpoint path.

    A path may hold a fastadv checkpoint (its 'model' entry) or a plain state
    dict; ``build()`` makes the architecture. Loaded with weights_only=True.
    """
    if isinstance(path_or_module, nn.Module):
        m = path_or_module
    else:
        if build is None:
            raise ValueError("static models given as paths need an architecture: pass build=callable")
        state = torch.load(path_or_module, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        m = build()
        try:
            m.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"static model {path_or_module} does not match the architecture: {exc}") from exc
    m = m.to(device).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


class SingleStep(Attack):
    """The single-step attacks of ensemble adversarial training, labels taken from the model itself.

    * 'step-ll' (Kurakin et al. 2017, the paper's ImageNet training attack):
      x' = clip(x - eps * sign(grad_x CE(f(x), y_LL))), y_LL = argmin_k f(x)_k;
    * 'fgsm' (the authors' MNIST code, train_adv.py with loss='training'):
      x' = clip(x + eps * sign(grad_x CE(f(x), argmax_k f(x)_k))): the model's
      own prediction instead of the true label, against label leaking.

    One forward and one backward; ``y`` is only validated.
    """

    name = "SingleStep"

    def __init__(self, model, eps=16 / 255, *, kind: str = "step-ll", **kwargs):
        super().__init__(model, **kwargs)
        self.eps = check_eps("eps", eps)
        self.kind = check_choice("kind", kind, ("step-ll", "fgsm"))

    def perturb(self, x, y):
        xr = x.detach().requires_grad_(True)
        logits = self.logits(xr)
        target = logits.detach().argmin(1) if self.kind == "step-ll" else logits.detach().argmax(1)
        g = grad_wrt(F.cross_entropy(logits, target, reduction="sum"), xr)
        eps = engine._expand(self.eps, x.shape[0], x.device)
        return ops.linf_step(x, x, -g if self.kind == "step-ll" else g, eps, eps, clip=self.clip)


class EnsembleAT(Method):
    """Ensemble adversarial training: adversarial examples from the current model or from static pre-trained ones.

    Tramer, Kurakin, Papernot, Goodfellow, Boneh & McDaniel, "Ensemble
    Adversarial Training: Attacks and Defenses", ICLR 2018, and the authors'
    code (ftramer/ensemble-adv-training, train_adv.py / tf_utils.py). For
    each batch the source of the adversarial examples is one of
    [current model, static_1, ..., static_k] (the static models: the user's
    pre-trained checkpoints, frozen, in eval mode, never trained):

    * ``source='random'`` (default): drawn uniformly at random per batch, as
      tf_train's ``np.random.randint(len(x_advs))``, from the torch RNG (so a
      resumed run draws the same sources); ``'cycle'``: round robin.
    * ``attack``: 'step-ll' (default; the paper's ImageNet runs, eps 16/256),
      'fgsm' (the MNIST code: FGSM on the model's own prediction) or 'rfgsm'
      (the paper's R+FGSM, ``fastadv.attacks.RFGSM``: a random step of alpha,
      then eps - alpha of FGSM on the true label); see :class:`SingleStep`.
    * ``split='half'`` (default; Kurakin et al. 2017's ImageNet recipe the
      paper follows): the second half of the batch is replaced by adversarial
      examples, one forward of the mixed batch, loss
      (sum_clean CE + adv_weight * sum_adv CE) / (n_clean + adv_weight * n_adv);
      ``split='full'`` (the MNIST code): every image clean and adversarial,
      separate forwards, loss 0.5 * (mean CE clean + mean CE adversarial).

    Defaults: eps = 16/255, alpha = eps / 2 (R+FGSM only), adv_weight = 1,
    the current model's attack in eval mode (``attack_mode``).
    """

    name = "ensemble"

    def __init__(self, static_models: Sequence = (), eps: float = 16 / 255, alpha: float | None = None, *,
                 attack: str = "step-ll", source: str = "random", split: str = "half", adv_weight: float = 1.0,
                 attack_mode: str = "eval"):
        super().__init__()
        self.eps = _check_pos("eps", eps)
        self.alpha = self.eps / 2 if alpha is None else _check_pos("alpha", alpha)
        if self.alpha > self.eps:
            raise ValueError(f"alpha must be <= eps, got alpha={self.alpha} > eps={self.eps}")
        self.attack = _check_choice("attack", attack, ("step-ll", "fgsm", "rfgsm"))
        self.source = _check_choice("source", source, ("random", "cycle"))
        self.split = _check_choice("split", split, ("half", "full"))
        self.adv_weight = _check_pos("adv_weight", adv_weight)
        self.attack_mode = attack_mode
        self._static = list(static_models)
        self.counter = 0
        self.last_source: int | None = None

    def bind(self, ctx):
        super().bind(ctx)
        self._static = [load_static_model(m, device=ctx.device) if isinstance(m, nn.Module) else m
                        for m in self._static]
        for m in self._static:
            if not isinstance(m, nn.Module):
                raise TypeError("static_models must be nn.Modules here; load paths with load_static_model(path, build)")
        return self

    @property
    def sources(self) -> int:
        return 1 + len(self._static)

    def next_source(self) -> int:
        """0 = the current model, i >= 1 = static model i."""
        if self.source == "cycle":
            src = self.counter % self.sources
        else:
            src = int(torch.randint(self.sources, ())) if self.sources > 1 else 0
        self.counter += 1
        self.last_source = src
        return src

    def craft(self, x, y, src: int):
        from fastadv.attacks import RFGSM

        net = self.ctx.attack_net if src == 0 else self._static[src - 1]
        kw = {"model_mode": self.attack_mode if src == 0 else "as-is", "autocast": self.ctx.amp}  # static: eval
        if self.attack == "rfgsm":
            return RFGSM(net, eps=self.eps, alpha=self.alpha, **kw)(x, y)
        return SingleStep(net, eps=self.eps, kind=self.attack, **kw)(x, y)

    def loss(self, x, y):
        src = self.next_source()
        if self.split == "full":
            x_adv = self.craft(x, y, src)
            clean = self.forward(x)
            adv = self.forward(x_adv)
            return StepOutput(0.5 * (F.cross_entropy(clean, y) + F.cross_entropy(adv, y)), adv, y)
        h = x.shape[0] // 2
        x_adv = self.craft(x[h:], y[h:], src)
        logits = self.forward(torch.cat([x[:h], x_adv]))  # one batch with half of it replaced (Kurakin et al.)
        per = F.cross_entropy(logits, y, reduction="none")
        w = torch.ones_like(per)
        w[h:] = self.adv_weight
        loss = (per * w).sum() / w.sum()
        return StepOutput(loss, logits[h:], y[h:])

    def state_dict(self):
        return {"counter": self.counter}

    def load_state_dict(self, state):
        self.counter = int(state.get("counter", 0))
