"""Robust training methods: each is a small object the loop calls once per batch.

One module per method family (``base`` holds the protocol, :class:`Method`);
every public name is re-exported here, so ``from fastadv.train import methods
as M; M.PGDAT`` works. Each method follows its authors' reference code, and
its docstring names that code and every deliberate difference.

``METHODS`` maps the command-line names to the classes; ``get_method(name,
**kwargs)`` builds one; :func:`train_config` gives a ``TrainConfig`` with a
method's own learning-rate recipe (Fast-AT's cyclic schedule). Radii are in
[0, 1] pixel units: the defaults are the CIFAR-10 ones of each paper unless
stated; ``fastadv train`` passes the MNIST ones (eps 0.3) when training on
MNIST.
"""
from __future__ import annotations

from fastadv.train.methods.base import (BindContext, Method, Standard, StepOutput, _check_int, _check_pos,
                                        tracks_running_stats, train_config)
from fastadv.train.methods.ensemble import EnsembleAT, SingleStep, load_static_model
from fastadv.train.methods.fast import FastAT, FastATEarlyStop
from fastadv.train.methods.fat import FAT, FAT_MILESTONES, FAT_TRADES_MILESTONES, FriendlyPGD, tau_schedule
from fastadv.train.methods.free import FreeAT
from fastadv.train.methods.iat import IAT, mixup_ce, resolve_layer
from fastadv.train.methods.metric import (MetricAT, _Embed, ot_regularizer, penultimate_features,
                                          triplet_terms)
from fastadv.train.methods.pgd import PGDAT
from fastadv.train.methods.trades import TRADES, trades_kl
from fastadv.train.methods.wasserstein import WassersteinAT
from fastadv.train.methods.mart import MART, GaussianStartPGD, mart_loss, mart_terms
from fastadv.train.methods.awp import AWP
from fastadv.train.methods.arub import ARUB, arub_loss, input_jacobian
from fastadv.train.methods.cost import (CostSensitiveAT, CostSensitivePGD, cost_sensitive_loss, expected_cost,
                                        protect_cost_matrix)
from fastadv.train.methods.fosc import FOSCAT, fosc_schedule
from fastadv.train.methods.boosting import MCEPGD, MarginBoost, train_boosted
from fastadv.train.methods.trs import TRS, pairwise_abs_cosine
from fastadv.train.methods.dial import DIAL, DIAL_CIFAR100, DIAL_MNIST, dial_loss, dial_progress
from fastadv.train.methods.afd import AFD, AFD_MNIST, critic_loss, encoder_loss
from fastadv.train.methods.robustify import IWDAT, PreemptiveAT
from fastadv.train.methods.jsigr import (JSIGR, jacobian_frobenius_estimate, selective_gradient_penalty,
                                         selective_mask)

__all__ = ["Method", "StepOutput", "BindContext", "Standard", "PGDAT", "TRADES", "FAT", "FastAT", "FreeAT",
           "EnsembleAT", "IAT", "MetricAT", "WassersteinAT", "METHODS", "get_method", "tau_schedule",
           "penultimate_features", "train_config", "FastATEarlyStop", "FriendlyPGD", "SingleStep",
           "load_static_model", "trades_kl", "triplet_terms", "ot_regularizer", "mixup_ce", "resolve_layer",
           "tracks_running_stats", "FAT_MILESTONES", "FAT_TRADES_MILESTONES", "MART", "AWP", "GaussianStartPGD",
           "mart_loss", "mart_terms", "ARUB", "arub_loss", "input_jacobian", "CostSensitiveAT", "CostSensitivePGD",
           "cost_sensitive_loss", "expected_cost", "protect_cost_matrix", "FOSCAT", "fosc_schedule", "JSIGR",
           "jacobian_frobenius_estimate", "selective_gradient_penalty", "selective_mask", "MarginBoost", "MCEPGD",
           "train_boosted", "TRS", "pairwise_abs_cosine", "DIAL", "DIAL_MNIST", "DIAL_CIFAR100", "dial_loss",
           "dial_progress", "AFD", "AFD_MNIST", "critic_loss", "encoder_loss", "PreemptiveAT", "IWDAT"]

METHODS = {
    "standard": Standard,
    "pgd": PGDAT,
    "trades": TRADES,
    "fat": FAT,
    "fast": FastAT,
    "free": FreeAT,
    "ensemble": EnsembleAT,
    "iat": IAT,
    "metric": MetricAT,
    "wasserstein": WassersteinAT,
    "mart": MART,
    "awp": AWP,
    "fosc": FOSCAT,
    "arub": ARUB,
    "cost": CostSensitiveAT,
    "jsigr": JSIGR,
    "boost": MarginBoost,
    "trs": TRS,
    "dial": DIAL,
    "afd": AFD,
    "preemptive": PreemptiveAT,
    "iwd": IWDAT,
}


def get_method(name: str, **kwargs) -> Method:
    """Build method ``name`` (a key of METHODS) with keyword arguments (see each class)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    return METHODS[name](**kwargs)
