"""``Ensemble``: several classifiers as one nn.Module (attacks, ``fastadv.evaluate`` and training take it as any model).

Two ways to combine the members' logits z_1..z_M (each (B, K)), with weights
w_m >= 0 (default equal):

* ``combine='logits'`` (default): sum_m w_m z_m / sum_m w_m, the mean of the
  logits (Tramer et al. 2018's ensemble of sources; margin boosting's
  ensemble, Zhang et al. 2022, zdhNarsil/Margin-Boosting ``ensemble_test``).
* ``combine='probs'``: log( sum_m w_m softmax(z_m) / sum_m w_m ), the LOG of
  the mean probability vector (TRS's ensemble, Yang et al. 2021,
  AI-secure/Transferability-Reduced-Smooth-Ensemble models/ensemble.py).
  The output is a vector of log-probabilities (logsumexp = 0), so everything
  downstream that treats it as logits is right: argmax is the class of
  highest mean probability, ``F.cross_entropy(out, y)`` is -log of the mean
  probability of y (log_softmax of a log-probability vector is itself), and
  attacks differentiate through it. Computed as a logsumexp of
  log_softmax(z_m) + log w_m, which stays finite where the reference's
  ``log(clamp(mean softmax, 1e-40))`` clamps (probabilities below 1e-40).

A single member is combined by the same formula (z itself for 'logits',
log_softmax(z) for 'probs'). Output dtype: at least float32 (bf16/fp16 member
outputs are upcast before they are combined).

Vectorized members (``vectorize``). When every member has the same
architecture (same class, same ``repr`` and the same parameter and buffer
names, shapes and dtypes) the members can run as ONE batched call:
``torch.func.stack_module_state``'s layout (parameters stacked along a new
leading dim), ``torch.func.functional_call`` on a weightless copy of the
architecture, ``torch.vmap`` over the stack. ``vectorize='auto'`` (default)
does so for CUDA inputs only, where one batched kernel per layer replaces M
small launches; on CPU it buys nothing (3 conv+BN members on 1x8x8 inputs,
batch 128, this 2-core machine: 1.49 ms vmapped vs 1.40 ms looped per
forward). ``True`` vectorizes on any device (an error if the architectures
differ); ``False`` never. It applies only while no
member module is in training mode: batch-norm statistics updates and dropout
draws must happen on the members' own modules, so train mode always loops.

Stacked weights are a COPY, so which copy is used matters:

* grad mode on and any member parameter requiring grad (training in eval
  mode, or an attack on a model whose weights require grad): the stack is
  rebuilt at each call with ``torch.stack`` of the members' own parameters,
  which is differentiable, so gradients reach every member's parameters (an
  attack only asks for the input gradient and never runs that part);
* otherwise (``torch.no_grad()`` evaluation, or frozen members): a cached
  stack, rebuilt when any member tensor changed (its version counter or
  storage: an optimizer step, ``load_state_dict``, ``.to()``).

Under ``'auto'`` a member whose forward vmap cannot trace (data-dependent
Python control flow, an op without a batching rule) falls back to the loop
once, with a warning; under ``True`` the error is raised.

Example::

    ens = Ensemble([net_a, net_b, net_c])                 # mean of logits
    x_adv = PGD(ens, eps=8/255)(x, y)                     # attacks the ensemble
    per_member = ens(x, per_member=True)                  # (M, B, K) raw logits
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

COMBINES = ("logits", "probs")


def _same_architecture(members: Sequence[nn.Module]) -> tuple[bool, str]:
    """(True, '') when every member has the first one's class, repr, parameter and buffer names/shapes/dtypes."""
    first = members[0]

    def sig(m):
        return ([(n, tuple(p.shape), p.dtype) for n, p in m.named_parameters()],
                [(n, tuple(b.shape), b.dtype) for n, b in m.named_buffers()])

    ref, ref_repr = sig(first), repr(first)
    for i, m in enumerate(members[1:], 1):
        if type(m) is not type(first):
            return False, f"member {i} is a {type(m).__name__}, member 0 a {type(first).__name__}"
        if repr(m) != ref_repr:
            return False, f"member {i}'s repr differs from member 0's (other hyperparameters)"
        if sig(m) != ref:
            return False, f"member {i}'s parameter or buffer names, shapes or dtypes differ from member 0's"
    return True, ""


def _meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (no memory), for functional_call.
    The memo maps each tensor to its meta twin, so deepcopy never copies the real weights."""
    memo = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo).eval()


class Ensemble(nn.Module):
    """M classifiers combined into one (see the module docstring for the formulas).

    Args:
        members: a sequence of nn.Modules, each mapping (B, ...) inputs to (B, K) logits
            (the same K). They are registered as submodules (``ens.members``, a
            ModuleList), so ``parameters()``, ``state_dict()``, ``.to()``,
            ``.train()``/``.eval()`` reach every member.
        combine: 'logits' (default, mean of logits) | 'probs' (log of the mean softmax).
        weights: None (equal) or M numbers >= 0 with a positive sum; stored normalized
            (sum 1) as the buffer ``weights`` (in the state dict; None for equal weights).
        vectorize: 'auto' (default: CUDA inputs) | True | False; see the module docstring.
    ``forward(x, per_member=False)``: (B, K) combined output, float32 or wider;
    ``per_member=True`` gives the members' raw logits stacked, (M, B, K).
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "logits", weights=None, vectorize="auto"):
        super().__init__()
        if isinstance(members, nn.Module) and not isinstance(members, nn.ModuleList):
            raise TypeError("members must be a sequence of nn.Modules (a list or ModuleList), got a single "
                            f"{type(members).__name__}")
        members = list(members)
        if not members:
            raise ValueError("members must hold at least one model")
        for i, m in enumerate(members):
            if not isinstance(m, nn.Module):
                raise TypeError(f"members[{i}] must be an nn.Module, got {type(m).__name__}")
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINES))}, got {combine!r}")
        if vectorize not in ("auto", True, False):
            raise ValueError(f"vectorize must be 'auto', True or False, got {vectorize!r}")
        self.members = nn.ModuleList(members)
        self.combine = combine
        self.vectorize = vectorize
        w = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64).flatten()
            if w.numel() != len(members):
                raise ValueError(f"weights must hold one number per member ({len(members)}), got {w.numel()}")
            if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
            w = (w / w.sum()).float()  # normalized: sum 1
        self.register_buffer("weights", w)  # None (equal weights) is not part of the state dict
        same, why = _same_architecture(members) if len(members) > 1 else (False, "a single member")
        self._same_arch, self._why_not = same, why
        if vectorize is True and len(members) > 1 and not same:
            raise ValueError(f"vectorize=True needs members of one architecture: {why}")
        self._vmap_failed = False
        # A weightless copy of the architecture for functional_call; kept out of the module tree (a tuple) so it
        # never shows up in parameters(), state_dict() or .to().
        self._base = (_meta_copy(members[0]),) if same else None
        self._cache_key = None
        self._cache = None

    @property
    def models(self) -> nn.ModuleList:
        """The members (the name ``fastadv.attacks.Ensemble`` used)."""
        return self.members

    def __len__(self) -> int:
        return len(self.members)

    def extra_repr(self) -> str:
        w = "" if self.weights is None else f", weights={[round(v, 4) for v in self.weights.tolist()]}"
        return f"combine={self.combine!r}{w}, vectorize={self.vectorize!r}"

    # ------------------------------------------------------------ vmap
    def _tensors(self):
        return [t for m in self.members for t in list(m.parameters()) + list(m.buffers())]

    def uses_vmap(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs the members as one vmapped call (see the module docstring)."""
        if not self._same_arch or self._vmap_failed or self.vectorize is False:
            return False
        if self.vectorize == "auto" and x.device.type != "cuda":
            return False
        return not any(mod.training for m in self.members for mod in m.modules())

    def _stacked(self):
        """(params, buffers): name -> (M, ...) tensors. Differentiable when gradients may be wanted, else cached."""
        names_p = [n for n, _ in self.members[0].named_parameters()]
        names_b = [n for n, _ in self.members[0].named_buffers()]
        per_p = [dict(m.named_parameters()) for m in self.members]
        per_b = [dict(m.named_buffers()) for m in self.members]
        grads = torch.is_grad_enabled() and any(p.requires_grad for d in per_p for p in d.values())
        if grads:
            params = {n: torch.stack([d[n] for d in per_p]) for n in names_p}
            buffers = {n: torch.stack([d[n] for d in per_b]) for n in names_b}
            return params, buffers
        # a stack built under inference_mode holds inference tensors, which autograd may not save later
        key = (torch.is_inference_mode_enabled(),) + tuple((t.data_ptr(), t._version, t.dtype) for t in self._tensors())
        if key != self._cache_key:
            with torch.no_grad():
                params = {n: torch.stack([d[n].detach() for d in per_p]) for n in names_p}
                buffers = {n: torch.stack([d[n].detach() for d in per_b]) for n in names_b}
            self._cache, self._cache_key = (params, buffers), key
        return self._cache

    def _vmap_forward(self, x: torch.Tensor) -> torch.Tensor:
        params, buffers = self._stacked()
        base = self._base[0]

        def one(p, b, xx):
            return torch.func.functional_call(base, (p, b), (xx,))

        return torch.vmap(one, in_dims=(0, 0, None))(params, buffers, x)

    # ---------------------------------------------------------- forward
    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The members' raw logits, stacked: (M, B, K)."""
        if self.uses_vmap(x):
            try:
                return self._vmap_forward(x)
            except Exception as exc:  # noqa: BLE001 - vmap's failures have many types; 'auto' falls back
                if self.vectorize is True:
                    raise
                self._vmap_failed = True
                warnings.warn(f"Ensemble: vmap over the members failed ({type(exc).__name__}: {exc}); running them "
                              "one by one from now on", RuntimeWarning, stacklevel=2)
        return torch.stack([m(x) for m in self.members])

    def combine_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Combine stacked member logits (M, B, K) into (B, K) by ``self.combine`` with ``self.weights``."""
        if z.dim() != 3 or z.shape[0] != len(self.members):
            raise ValueError(f"z must be (M={len(self.members)}, B, K), got shape {tuple(z.shape)}")
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        if self.combine == "logits":
            if self.weights is None:
                # sequential sum, then one division: the reference loops' arithmetic (sum(nets) / n)
                out = z[0]
                for i in range(1, z.shape[0]):
                    out = out + z[i]
                return out / z.shape[0]
            w = self.weights.to(z.dtype)
            out = w[0] * z[0]
            for i in range(1, z.shape[0]):
                out = out + w[i] * z[i]
            return out
        if self.weights is None:
            lw = torch.full((z.shape[0],), -math.log(z.shape[0]), dtype=z.dtype, device=z.device)
        else:
            lw = torch.log(self.weights.to(device=z.device, dtype=z.dtype))  # log 0 = -inf drops a member
        return torch.logsumexp(F.log_softmax(z, dim=-1) + lw[:, None, None], dim=0)

    def forward(self, x: torch.Tensor, per_member: bool = False) -> torch.Tensor:
        z = self.member_logits(x)
        return z if per_member else self.combine_logits(z)


__all__ = ["Ensemble", "COMBINES"]
