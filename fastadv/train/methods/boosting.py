"""Margin boosting (MRBoost.NN, Zhang et al. 2022): an ensemble grown one adversarially trained member at a time."""
from __future__ import annotations

import dataclasses
import pathlib
import sys
from typing import Callable, Sequence

import torch
from torch import nn

from fastadv.attacks import engine
from fastadv.attacks.pgd import PGD, random_start
from fastadv.losses import mce_loss
from fastadv.models.ensemble import Ensemble
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos
from fastadv.train.methods.ensemble import load_static_model


class MCEPGD(PGD):
    """PGD on the MCE objective of weight ``mce_weight`` with the margin-boosting reference's random start.

    The reference attack (zdhNarsil/Margin-Boosting lib/attack/pgd.py,
    ``IPGD.my_mr_oa_attack`` / ``my_ensemble_mr_oa_attack``): start at
    clip(x + U(-eps/2, eps/2)) (``start_scale=0.5``: HALF the radius), then
    ``steps`` signed steps on CE(z, y) + w * MCE margin term (``mce_loss``,
    batch mean), each projected onto the eps-ball and [0, 1]. The reference
    projects with min(max(x', x0 - eps), x0 + eps); ours is the fused
    torchattacks-style step clip(x0 + clamp(x' - x0, -eps, eps)): the same
    point up to float32 rounding of x0 + (x' - x0). Other arguments as ``PGD``
    (linf/l2/l1, early_stop, ...); ``restarts > 1`` needs ``mce_weight = 1``
    (restarts keep the point of highest loss, scored by ``attack_loss('mce')``).
    """

    name = "MCEPGD"

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps: int = 10, *, mce_weight: float = 1.0,
                 start_scale: float = 0.5, **kwargs):
        super().__init__(model, eps, alpha, steps, loss="mce", **kwargs)
        self.mce_weight = _check_pos("mce_weight", mce_weight)
        self.start_scale = _check_pos("start_scale", start_scale)
        if self.restarts != 1 and self.mce_weight != 1.0:
            raise ValueError("restarts > 1 scores restarts with the weight-1 MCE; use restarts=1 or mce_weight=1")

    def start(self, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x0.clone()
        return random_start(self.norm, x0, eps * self.start_scale, self.clip, self.generator)

    def _objective(self):
        w, targeted = self.mce_weight, self.targeted

        def loss(logits, s):
            cost = mce_loss(logits, s["y"], weight=w)  # batch mean: the reference's scalar
            with torch.no_grad():
                per = mce_loss(logits.detach(), s["y"], weight=w, reduction="none")
            return (-cost, -per) if targeted else (cost, per)

        return loss

    def perturb(self, x, y):
        b = x.shape[0]
        eps = engine._expand(self.eps, b, x.device)
        alpha = engine._expand(self.alpha, b, x.device)
        objective = self._objective()

        def once(idx, r):
            x0, ys, e, a = (x, y, eps, alpha) if idx is None else (x[idx], y[idx], eps[idx], alpha[idx])
            res = engine.run_loop(self, x0, ys, self.start(x0, e), self.steps, self._step, loss=objective,
                                  state={"eps": e, "alpha": a}, early_stop=self.early_stop, tau=self.tau,
                                  compact_every=self.compact_every, compile=self.compile, cuda_graph=self.cuda_graph,
                                  eot_iter=self.eot_iter)
            return res["x"]

        return engine.with_restarts(self, x, y, self.restarts, once, self.loss)


class MarginBoost(Method):
    """One round of margin boosting: train a new member against MCE-PGD examples of the whole ensemble.

    Zhang, Zhang, Courville, Bengio, Ravikumar & Suggala, "Building Robust
    Ensembles via Margin Boosting", ICML 2022 (MRBoost.NN); reference code
    zdhNarsil/Margin-Boosting, experiments/ladder_mce_main.py. The trainer's
    network is the NEW member h_t; ``frozen`` holds h_1..h_{t-1}, moved to the
    device, put in eval mode and given ``requires_grad=False`` at bind (never
    in the optimizer; their weights and batch-norm buffers stay bitwise
    unchanged). Each batch:

    1. x' = MCE-PGD on the ensemble H = (h_1 + ... + h_t) / t (mean of logits,
       ``fastadv.models.Ensemble``), the NEW member included, every member in
       eval mode during the attack (the reference appends h_t to ``model_ls``
       before training it and ``my_ensemble_mr_oa_attack`` calls ``eval()`` on
       all): maximize MCE_w(H(x'), y) over ||x' - x||_inf <= eps (see
       ``MCEPGD``: random start U(-eps/2, eps/2), signed steps).
    2. loss = MCE_w(z, y), the new member in train mode, with
       ``loss_on='member'`` (default; the reference's ``--individual``, whose
       argparse default True cannot be turned off from the command line):
       z = h_t(x'); ``loss_on='ensemble'`` (its other branch): z = H(x'), the
       frozen members' logits computed without autograd (they get no gradient
       either way), summed in the reference's order and divided by t.

    MCE_w(z, y) = CE(z, y) + w * 1/(K-1) sum_{j != y} -log softmax(-z)_j
    (``fastadv.losses.mce_loss``; ``mce_weight`` is the reference's
    ``other_weight``). With no frozen members this is MCE adversarial training
    of one model (the reference's experiments/main.py).

    Defaults: the reference's CIFAR-10 training attack, eps = 8/255,
    alpha = 2/255, 10 steps (its evaluation: 20 steps, CE); ResNet-18, SGD
    momentum 0.9, lr 0.1, weight decay 5e-4, 100 epochs per member, lr / 10
    at epochs 50 and 75, batch 128 (``TrainConfig(schedule='multistep')``).
    ``mce_weight`` defaults to 1: the reference's command-line default is 0
    (plain CE) and the value of the paper's runs is not in the repository.
    Use :func:`train_boosted` to grow a whole ensemble.
    """

    name = "boost"
    attack_mode = "eval"

    def __init__(self, frozen: Sequence[nn.Module] = (), eps: float = 8 / 255, alpha: float = 2 / 255,
                 steps: int = 10, *, mce_weight: float = 1.0, loss_on: str = "member", start_scale: float = 0.5,
                 vectorize="auto", attack_mode: str = "eval"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.mce_weight = _check_pos("mce_weight", mce_weight)
        self.loss_on = _check_choice("loss_on", loss_on, ("member", "ensemble"))
        self.start_scale = _check_pos("start_scale", start_scale)
        self.vectorize = vectorize
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("eval", "train"))
        frozen = list(frozen)
        for i, m in enumerate(frozen):
            if not isinstance(m, nn.Module):
                raise TypeError(f"frozen[{i}] must be an nn.Module, got {type(m).__name__}")
        self._frozen = frozen
        self.n_frozen = len(frozen)
        self.ensemble: nn.Module | None = None

    def bind(self, ctx):
        super().bind(ctx)
        for i, m in enumerate(self._frozen):
            if m is ctx.net:
                raise ValueError(f"frozen[{i}] is the network being trained; pass a new member")
        self._frozen = [load_static_model(m, device=ctx.device) for m in self._frozen]  # eval, requires_grad False
        self.ensemble = (Ensemble(self._frozen + [ctx.attack_net], combine="logits", vectorize=self.vectorize)
                         if self._frozen else ctx.attack_net)
        return self

    @property
    def frozen(self) -> list:
        return list(self._frozen)

    def attack(self) -> MCEPGD:
        return MCEPGD(self.ensemble, eps=self.eps, alpha=self.alpha, steps=self.steps, mce_weight=self.mce_weight,
                      start_scale=self.start_scale, **self.attack_kwargs())

    def perturb(self, x, y):
        """x' crafted on the current ensemble (frozen members + the new one)."""
        return self.attack()(x, y)

    def loss(self, x, y):
        x_adv = self.perturb(x, y)
        if self.loss_on == "member" or not self._frozen:
            z = self.forward(x_adv)
        else:
            with torch.no_grad():
                total = self._frozen[0](x_adv).float()
                for m in self._frozen[1:]:
                    total = total + m(x_adv).float()
            z = (total + self.forward(x_adv)) / (len(self._frozen) + 1)
        return StepOutput(mce_loss(z, y, weight=self.mce_weight), z, y)


def _finished_member(path: pathlib.Path):
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state, dict) and "model" in state else state


def train_boosted(build_member: Callable[[], nn.Module], n_members: int, train, heldout=None, config=None, *,
                  members: Sequence[nn.Module] = (), persistent: bool = False,
                  callback: Callable[[int, nn.Module, dict], None] | None = None, vectorize="auto",
                  eps_warmup: float = 0.0, **method_kwargs) -> Ensemble:
    """Grow an ensemble by margin boosting: one ``Trainer(member, MarginBoost(frozen=earlier), ...).fit()`` per member.

    The reference's ladder loop (zdhNarsil/Margin-Boosting
    experiments/ladder_mce_main.py): for t = 1..n_members, build a fresh
    member, train it with :class:`MarginBoost` against the ensemble of the
    members so far plus itself, freeze it, go on.

    Args:
        build_member: returns a new, untrained member (called with the global
            RNG seeded to ``config.seed + t``, so member t's initial weights are
            reproducible and differ between members).
        n_members: the ensemble size, >= 1.
        train, heldout: as ``Trainer`` (heldout: (x, y) or None).
        config: a ``TrainConfig`` for EACH member (the reference: the same
            100-epoch recipe per member). Member t runs with ``seed = config.seed + t``
            (its own batch order and random starts; the reference's single
            DataLoader also reshuffles across members) and ``out_dir/member{t}``.
            With ``resume=True`` a member whose ``member{t}/model.pt`` exists is
            loaded instead of trained, and an interrupted one resumes from its
            ``last.pt``.
        members: already trained members to start from (frozen; counted in n_members).
        persistent: initialize member t from member t-1's weights (the
            reference's ``--persistent``; off by default, as there).
        callback: ``callback(t, member, result)`` after each member; ``result`` is
            the Trainer's, plus 'ensemble_eval' (clean / PGD accuracy of the
            ensemble so far on ``heldout`` with the config's eval settings; the
            Trainer's own per-epoch numbers are of the member alone, the
            reference's ``ensemble_test`` those of the ensemble).
        vectorize: the ``Ensemble``'s and the attack ensemble's ``vectorize``.
        eps_warmup: each member's eps ramp (``Method.set_eps_warmup``; over that member's steps).
        method_kwargs: ``MarginBoost`` arguments (eps, alpha, steps, mce_weight, loss_on, ...).
    Returns:
        ``Ensemble(members, combine='logits')`` in eval mode. If training stops
        early (SIGTERM, ``max_steps``), the members finished so far (a message
        says where to resume); an error if none finished.
    """
    from fastadv.train.trainer import TrainConfig, Trainer, evaluate_accuracy

    n_members = _check_int("n_members", n_members, 1)
    cfg = config or TrainConfig()
    members = list(members)
    if len(members) > n_members:
        raise ValueError(f"members holds {len(members)} models, more than n_members={n_members}")
    for t in range(len(members), n_members):
        out = pathlib.Path(cfg.out_dir) / f"member{t}" if cfg.out_dir else None
        sub = dataclasses.replace(cfg, seed=cfg.seed + t, out_dir=str(out) if out else None)
        torch.manual_seed(sub.seed)
        net = build_member()
        if not isinstance(net, nn.Module):
            raise TypeError(f"build_member must return an nn.Module, got {type(net).__name__}")
        done = _finished_member(out / "model.pt") if (out is not None and cfg.resume) else None
        if done is not None:
            net.load_state_dict(done)
            result = {"stopped": False, "loaded": str(out / "model.pt")}
        else:
            if persistent and members:
                net.load_state_dict(members[-1].state_dict())
            method = MarginBoost(frozen=members, vectorize=vectorize, **method_kwargs).set_eps_warmup(eps_warmup)
            result = Trainer(net, method, train, heldout, sub).fit()
            if result["stopped"]:
                if not members:
                    where = f" (checkpoint {result['checkpoint']})" if result.get("checkpoint") else ""
                    raise RuntimeError("boosting stopped during member 0, before any member finished; rerun with "
                                       f"resume=True{where}")
                print(f"boosting stopped during member {t}; returning the {len(members)} finished member(s); rerun "
                      "with resume=True to continue", file=sys.stderr)
                break
        members.append(net)
        if heldout is not None:
            ens = Ensemble(members, combine="logits", vectorize=vectorize)
            x, y = heldout
            if cfg.eval_samples is not None:
                x, y = x[: cfg.eval_samples], y[: cfg.eval_samples]
            result["ensemble_eval"] = evaluate_accuracy(ens, x, y, eps=cfg.eval_eps, alpha=cfg.eval_alpha,
                                                        steps=cfg.eval_steps, batch_size=cfg.eval_batch_size,
                                                        amp=cfg.amp, seed=sub.seed)
        if callback is not None:
            callback(t, net, result)
    return Ensemble(members, combine="logits", vectorize=vectorize).eval()


__all__ = ["MarginBoost", "MCEPGD", "train_boosted"]
