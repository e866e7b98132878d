"""AFD: Adversarial Feature Desensitization (Bashivan et al., NeurIPS 2021)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastadv.models.heads import FeatureTap, ProjectionCritic, broadcast_module, feature_layer, module_mode, split_head
from fastadv.train.methods.base import Method, StepOutput, _check_choice, _check_int, _check_pos, tracks_running_stats

GAN_LOSSES = ("wgan", "dcgan", "hinge")
ATTACKS = ("apgd", "pgd")
#: The reference's MNIST setting (utils.get_train_args / get_attack, SGD): APGD-CE 40 iterations at eps 0.3,
#: critic lr 0.5, encoder lr 0.5 (classifier lr 0.1, weight decay 1e-4), 100 epochs, milestones 50 and 80.
AFD_MNIST = dict(eps=0.3, steps=40, alpha=0.01, critic_lr=0.5, encoder_lr=0.5, milestones=(0.5, 0.8))


def critic_loss(d_adv: torch.Tensor, d_clean: torch.Tensor, kind: str = "wgan") -> torch.Tensor:
    """The critic's loss (losses.DisLoss, 'fake' = adversarial, 'real' = clean features); scores (B, 1):
    wgan: mean D(adv) - mean D(clean); dcgan: mean softplus(-D(clean)) + mean softplus(D(adv))
    (BCE with clean = 1, adversarial = 0); hinge: mean relu(1 - D(clean)) + mean relu(1 + D(adv))."""
    if kind == "wgan":
        return d_adv.mean() - d_clean.mean()
    if kind == "dcgan":
        return F.softplus(-d_clean).mean() + F.softplus(d_adv).mean()
    if kind == "hinge":
        return F.relu(1.0 - d_clean).mean() + F.relu(1.0 + d_adv).mean()
    raise ValueError(f"gan_loss must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


def encoder_loss(d_adv: torch.Tensor, kind: str = "wgan") -> torch.Tensor:
    """The encoder's loss against the critic (losses.GenLoss): make adversarial features score as clean.
    wgan and hinge: -mean D(adv); dcgan: mean softplus(-D(adv)) (non-saturating BCE toward 'clean')."""
    if kind in ("wgan", "hinge"):
        return -d_adv.mean()
    if kind == "dcgan":
        return F.softplus(-d_adv).mean()
    raise ValueError(f"gan_loss must be one of {', '.join(GAN_LOSSES)}, got {kind!r}")


class AFD(Method):
    """Adversarial Feature Desensitization: the encoder learns features whose adversarial version a
    label-conditioned critic cannot tell from the clean one.

    Bashivan, Bayat, Ibrahim, Ahuja, Faramarzi, Laleh, Richards & Rish,
    "Adversarial Feature Desensitization", NeurIPS 2021; reference code
    BashivanLab/afd (afd_train.py, losses.py, models/*_models.py,
    utils.py), which we follow. The network is split into the encoder E
    (every parameter but the classifier head) and the head C (its last
    nn.Linear); features h = E(x) are the input of ``feature_layer``
    (default the head: the penultimate features). Per batch, with x'
    crafted on C(E(.)) before any update:

    1. classifier: min_{E, C} CE(C(E(x)), y), clean inputs only: the
       trainer's optimizer, through ``loss()`` (the code's optEDc: SGD lr
       0.1, momentum 0.9, weight decay 1e-4);
    2. critic: min_D L_D(D(E(x'), y), D(E(x), y)), features of the current
       encoder (gradient only to D): in ``after_step()``, the method's own
       SGD (``critic_lr``, momentum 0.9, no weight decay; the code's optDa);
    3. encoder: min_E L_E(D(E(x'), y)) with the updated critic, gradient
       only to E (neither D nor C moves): in ``after_step()``, the method's
       SGD on E (``encoder_lr``, momentum 0.9, no weight decay; optE).

    ``gan_loss`` (clean = 'real', adversarial = 'fake'; :func:`critic_loss`,
    :func:`encoder_loss`): 'wgan' (default) L_D = mean D(x') - mean D(x),
    L_E = -mean D(x') (the code's default 'wgan_gp' with dis_lambda 0, so no
    gradient penalty: the critic's Lipschitz bound comes from spectral
    normalization); 'dcgan' the BCE form L_D = mean softplus(-D(x)) + mean
    softplus(D(x')), L_E = mean softplus(-D(x')); 'hinge'.

    Critic (:class:`fastadv.models.heads.ProjectionCritic`, the code's
    SNPDFC3): two spectrally normalized d x d layers with LeakyReLU(0.2) and
    a projection-discriminator output, D(h, y) = w . phi(h) + b + <E_y, phi(h)>,
    w and E spectrally normalized; width d = the feature width, classes =
    the head's outputs. Built at ``bind``, kept in train mode (one power
    iteration per forward: two in the critic step, one in the encoder step,
    as the code), broadcast from rank 0 under torchrun, where the critic's
    and the encoder's gradients of updates 2 and 3 are averaged across
    ranks (DDP averages only update 1's).

    x' (``attack``), batch norm in eval mode (the code's
    ``ctx_noparamgrad_and_eval``): 'apgd' (default; the code's 'aa_apgdce',
    AutoAttack's APGD-CE with 1 restart through its evaluation wrapper,
    ``fastadv.attacks.APGD``); as that wrapper returns, with ``fooled_only``
    (default for 'apgd') x' is the APGD image only where the model
    classified x correctly and the APGD image fools it (both checked in eval
    mode), x itself elsewhere; 'pgd' (the code's 'linf_pgd', advertorch
    LinfPGDAttack: random start, ``alpha`` steps) returns every final
    iterate. Batch-norm running averages see the forwards the code makes:
    x (update 1), x and x' (critic), x' (encoder), and the code's extra
    no-gradient forward of x' for its adversarial training accuracy (repeated
    when the network tracks running statistics).

    Defaults: the code's CIFAR-10 setting (ResNet-18, 300 epochs, batch
    128): APGD-CE, eps 8/255, 20 iterations, wgan, critic_lr 0.1,
    encoder_lr 0.5, the classifier's lr 0.1 (``default_lr``), lr x
    ``gamma`` = 0.1 at epochs 150 and 250 (``milestones`` as fractions of
    the epochs, 0.5 and 5/6, applied here to the critic's and encoder's
    optimizers per epoch like the code's MultiStepLR; the trainer's own
    schedule drives update 1: its 'multistep' drops at 1/2 and 3/4).
    MNIST (``AFD_MNIST``): eps 0.3, 40 iterations, critic_lr 0.5, milestones
    50 and 80 of 100 epochs.

    Features on the unit sphere: the reference encoders ('resnet18norm',
    'lenetnorm') L2-normalize the features that both the head and the
    critic read. AFD needs it: with the linear WGAN loss and a piecewise
    linear critic, D(c h) ~ c D(h), so an encoder with raw features lowers
    L_E without bound by scaling them; at the MNIST lrs (0.5, SGD momentum
    0.9) our MnistCNN without normalization gave a NaN loss at step 11
    (docs/reproduction.md). ``fastadv train --method afd`` therefore builds
    ``MnistCNN(feature_norm=True)`` (``--no-feature-norm`` to turn it off;
    other models: give the network an L2 normalization before its head).
    The normalized model's logits are bounded by the head's row norms, so
    it needs the code's classifier optimizer (SGD lr 0.1, weight decay
    1e-4): with Adam 1e-3 it was at 12.6% clean after 80 steps, with SGD
    0.1 at 66.6% (embedded MNIST, 4,000 images, 2 epochs).

    Deliberate differences: our APGD returns a fooled sample's first fooling
    iterate (AutoAttack's, its last); the critic step computes the features
    without gradient (the code backpropagates into E and discards it: same
    critic update); spectral norm is the
    parametrization (15 power iterations at construction, the code's
    ``utils.spectral_norm`` none); no gradient penalty, no Adam option, and
    the code's ``dis_iters`` (encoder update on a random 1/dis_iters of the
    batches) is 1, its default. The paper's text (its losses are written in
    the BCE form, our 'dcgan') was not re-read here; the code is what we
    followed.

    ``epoch_metrics()``: afd_critic_loss, afd_encoder_loss, afd_d_clean,
    afd_d_adv (mean critic scores; batch means), afd_adv_acc (the code's
    adversarial training accuracy, measured after the critic step),
    afd_adv_frac (share of samples whose x' is not x), this rank.
    """

    supports_grad_accum = False
    grad_accum_refusal = "the critic and the encoder take their own optimizer steps per batch"

    name = "afd"
    attack_mode = "eval"
    default_lr = {"sgd": 0.1}

    def __init__(self, eps: float = 8 / 255, steps: int = 20, *, attack: str = "apgd", alpha: float = 2 / 255,
                 fooled_only: bool | None = None, gan_loss: str = "wgan", critic_lr: float = 0.1,
                 encoder_lr: float = 0.5, momentum: float = 0.9, milestones=(0.5, 5 / 6), gamma: float = 0.1,
                 feature_layer: str = "last_linear", attack_mode: str = "eval"):
        super().__init__()
        self.eps, self.alpha = _check_pos("eps", eps), _check_pos("alpha", alpha)
        self.steps = _check_int("steps", steps, 1)
        self.attack = _check_choice("attack", attack, ATTACKS)
        if fooled_only is not None and not isinstance(fooled_only, bool):
            raise ValueError(f"fooled_only must be True, False or None (True for 'apgd'), got {fooled_only!r}")
        self.fooled_only = (self.attack == "apgd") if fooled_only is None else fooled_only
        self.gan_loss = _check_choice("gan_loss", gan_loss, GAN_LOSSES)
        self.critic_lr = _check_pos("critic_lr", critic_lr, allow_zero=False)
        self.encoder_lr = _check_pos("encoder_lr", encoder_lr)
        self.momentum = _check_pos("momentum", momentum)
        try:
            ms = tuple(float(_check_pos("milestones", m)) for m in milestones)
        except TypeError:
            raise ValueError(f"milestones must be a sequence of fractions of the epochs in (0, 1], got {milestones!r}")
        if any(not 0 < m <= 1 for m in ms):
            raise ValueError(f"milestones must be fractions of the epochs in (0, 1], got {milestones!r}")
        self.milestones = ms
        self.gamma = _check_pos("gamma", gamma, allow_zero=False)
        if not isinstance(feature_layer, str):
            raise ValueError("feature_layer must be 'first_linear', 'last_linear' or a module name, "
                             f"got {feature_layer!r}")
        self.feature_layer = feature_layer
        self.attack_mode = _check_choice("attack_mode", attack_mode, ("train", "eval"))
        self._critic = self._critic_opt = self._enc_opt = self._scaler = None
        self._layer = self._head = self._tap = None
        self._enc_params: list = []
        self._batch = None
        self._sums = None
        self._sums_epoch = -1  # the epoch _sums belong to (a resume mid-epoch keeps them)
        self._pending_state: dict | None = None

    # ------------------------------------------------------------ setup
    def bind(self, ctx):
        super().bind(ctx)
        self._head, self._enc_params = split_head(ctx.net)
        self._layer = feature_layer(ctx.net, self.feature_layer)
        if self._tap is not None:
            self._tap.remove()
        self._tap = FeatureTap(self._layer, persistent=True)  # before any compiled call: see FeatureTap
        self._critic = ProjectionCritic(self._layer.in_features, self._head.out_features).to(ctx.device)
        broadcast_module(self._critic)
        self._critic_opt = torch.optim.SGD(self._critic.parameters(), lr=self.critic_lr, momentum=self.momentum)
        self._enc_opt = torch.optim.SGD(self._enc_params, lr=self.encoder_lr, momentum=self.momentum)
        self._scaler = torch.amp.GradScaler(ctx.device.type, enabled=ctx.amp == "fp16")
        # critic loss, encoder loss, D(x), D(x') (batch sums), adversarial correct, samples, batches, x' != x
        self._sums = torch.zeros(8, dtype=torch.float64, device=ctx.device)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
        return self

    @property
    def critic(self):
        """The critic (None before ``bind``)."""
        return self._critic

    @property
    def encoder_params(self) -> list:
        """The parameters update 3 moves: every trainable parameter of the network but the head's."""
        return list(self._enc_params)

    def lr_factor(self, epoch: int, epochs: int) -> float:
        """gamma ** (milestones passed): the critic's and encoder's lr factor in ``epoch`` (0-based), as
        MultiStepLR(milestones = round(m * epochs)) stepped after each epoch."""
        return self.gamma ** sum(epoch >= round(m * epochs) for m in self.milestones)

    def on_epoch(self, epoch, epochs):
        super().on_epoch(epoch, epochs)
        if self._critic_opt is None:
            return
        f = self.lr_factor(epoch, epochs)
        for opt, lr in ((self._critic_opt, self.critic_lr), (self._enc_opt, self.encoder_lr)):
            for g in opt.param_groups:
                g["lr"] = lr * f
        if epoch != self._sums_epoch:
            self._sums.zero_()
            self._sums_epoch = int(epoch)

    def _amp(self):
        if self.ctx.amp is None:
            return contextlib.nullcontext()
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16 if self.ctx.amp == "bf16" else torch.float16)

    # ------------------------------------------------------------ attack
    def craft(self, x, y):
        """x' for the batch (see the class docstring), detached."""
        from fastadv.attacks import APGD, PGD

        net, kw = self.ctx.attack_net, self.attack_kwargs()
        if self.attack == "pgd":
            atk = PGD(net, eps=self.eps, alpha=self.alpha, steps=self.steps, random_start=True, **kw)
        else:
            atk = APGD(net, eps=self.eps, steps=self.steps, loss="ce", restarts=1, **kw)
        if not self.fooled_only:
            return atk(x, y)
        with torch.no_grad(), module_mode(self.ctx.net, False), self._amp():
            idx = (net(x).argmax(1) == y).nonzero().squeeze(1)
        x_adv = x.detach().clone()
        if idx.numel():
            a = atk(x[idx], y[idx])
            with torch.no_grad(), module_mode(self.ctx.net, False), self._amp():
                fooled = net(a).argmax(1) != y[idx]
            x_adv[idx[fooled]] = a[fooled].to(x_adv.dtype)
        return x_adv

    # ------------------------------------------------------------ update 1
    def loss(self, x, y):
        if self._critic is None:
            raise RuntimeError("AFD.loss before bind(): the critic is built at bind")
        x_adv = self.craft(x, y)
        logits = self.forward(x)
        self._batch = (x.detach(), x_adv.detach(), y)
        return StepOutput(F.cross_entropy(logits, y), logits, y)

    # ----------------------------------------------------- updates 2 and 3
    def _features(self, x):
        with self._tap as tap:
            out = self.ctx.net(x)
            return tap.value.flatten(1), out

    @staticmethod
    def _set_grads(params, grads):
        from fastadv.train import distributed as D

        for p, g in zip(params, grads):
            p.grad = None if g is None else g.detach()
        D.all_reduce_mean_grads(params)

    def critic_step(self, x, x_adv, y) -> torch.Tensor:
        """Update 2: one critic step on the current encoder's features of x (clean) and x' (adversarial)."""
        with torch.no_grad(), self._amp():
            h_clean, _ = self._features(x)
            h_adv, _ = self._features(x_adv)
        d_clean = self._critic(h_clean.float(), y)
        d_adv = self._critic(h_adv.float(), y)
        loss = critic_loss(d_adv, d_clean, self.gan_loss)
        params = [p for p in self._critic.parameters() if p.requires_grad]
        self._set_grads(params, torch.autograd.grad(loss, params))
        self._critic_opt.step()
        self._critic_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self._sums[[0, 2, 3]] += torch.stack([loss.detach(), d_clean.mean(), d_adv.mean()]).double()
        return loss.detach()

    def encoder_step(self, x_adv, y) -> torch.Tensor:
        """Update 3: one encoder step against the (updated) critic on x'; only the encoder's parameters move."""
        with self._amp():
            h_adv, logits = self._features(x_adv)
        if tracks_running_stats(self.ctx.net):
            with torch.no_grad(), self._amp():  # the code's EDc(adv_data) for its accuracy: BN running averages only
                self.ctx.net(x_adv)
        loss = encoder_loss(self._critic(h_adv.float(), y), self.gan_loss)
        params = self._enc_params
        grads = torch.autograd.grad(self._scaler.scale(loss), params, allow_unused=True)
        self._set_grads(params, grads)
        self._scaler.step(self._enc_opt)
        self._scaler.update()
        self._enc_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            correct = (logits.argmax(1) == y).sum().double()
            self._sums[[1, 4, 5, 6]] += torch.stack([loss.detach().double(), correct,
                                                     correct.new_tensor(float(y.numel())), correct.new_tensor(1.0)])
        return loss.detach()

    def after_step(self) -> None:
        if self._batch is None:
            return
        x, x_adv, y = self._batch
        self._batch = None
        with torch.no_grad():
            self._sums[7] += (x_adv != x).flatten(1).any(1).sum().double()
        self.critic_step(x, x_adv, y)
        self.encoder_step(x_adv, y)

    # ----------------------------------------------------------- reports
    def epoch_metrics(self) -> dict:
        if self._sums is None:
            return {}
        ld, le, dc, da, corr, n, nb, nadv = self._sums.tolist()
        if nb == 0:
            return {}
        return {"afd_critic_loss": ld / nb, "afd_encoder_loss": le / nb, "afd_d_clean": dc / nb, "afd_d_adv": da / nb,
                "afd_adv_acc": corr / n, "afd_adv_frac": nadv / n}

    def release(self):
        """Remove the feature tap's hook from the network (training is over)."""
        if getattr(self, "_tap", None) is not None:
            self._tap.remove()

    def state_dict(self) -> dict:
        if self._critic is None:
            return dict(self._pending_state or {})
        return {"critic": {k: v.detach().clone() for k, v in self._critic.state_dict().items()},
                "critic_opt": self._critic_opt.state_dict(), "encoder_opt": self._enc_opt.state_dict(),
                "scaler": self._scaler.state_dict(), "sums": self._sums.detach().cpu().clone(),
                "sums_epoch": self._sums_epoch}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self._critic is None:  # not bound yet: applied at bind
            self._pending_state = dict(state)
            return
        self._pending_state = None
        self._critic.load_state_dict(state["critic"])
        self._critic_opt.load_state_dict(state["critic_opt"])
        self._enc_opt.load_state_dict(state["encoder_opt"])
        if state.get("scaler"):
            self._scaler.load_state_dict(state["scaler"])
        if "sums" in state:
            self._sums.copy_(state["sums"].to(self._sums.device))
            self._sums_epoch = int(state.get("sums_epoch", -1))
