"""Robust training: methods (``fastadv.train.methods``), the loop (``Trainer``),
checkpoints, and multi-process training through torchrun. See docs/training.md.

Example::

    from fastadv.data import embedded_mnist
    from fastadv.models import get_model
    from fastadv.train import Trainer, TrainConfig, PGDAT

    net = get_model("mnist_cnn")
    method = PGDAT(eps=0.3, alpha=0.01, steps=40)
    cfg = TrainConfig(epochs=2, batch_size=100, optimizer="adam", lr=1e-3, schedule="constant",
                      eval_eps=0.3, out_dir="runs/pgd")
    result = Trainer(net, method, embedded_mnist("train"), embedded_mnist("heldout"), cfg).fit()
"""
from fastadv.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastadv.train.methods import (FAT, IAT, METHODS, TRADES, EnsembleAT, FastAT, FreeAT, MetricAT, Method, PGDAT,
                                   Standard, WassersteinAT, get_method)
from fastadv.train.trainer import DatasetData, TensorData, TrainConfig, Trainer, evaluate_accuracy

__all__ = ["Trainer", "TrainConfig", "TensorData", "DatasetData", "evaluate_accuracy", "Method", "Standard", "PGDAT",
           "TRADES", "FAT", "FastAT", "FreeAT", "EnsembleAT", "IAT", "MetricAT", "WassersteinAT", "METHODS",
           "get_method", "save_checkpoint", "load_checkpoint", "CheckpointError"]
