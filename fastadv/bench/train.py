"""``fastadv bench train``: adversarial-training throughput, fastadv's loop vs plain eager PyTorch.

For each method (pgd, trades, fast) one training step on one batch is timed
two ways, in the same process, one after the other, on the same images
(real MNIST from the embedded set for the MNIST CNN; uniform noise at
CIFAR shape for the ResNets), each from the same initial weights:

* ``eager``: the recipe as its authors' public PyTorch code writes it, fp32:
  - pgd, fast (Wong, Rice & Kolter's ``fast_adversarial`` and Rice et al.'s
    ``robust_overfitting`` repositories): ``delta`` is a leaf with
    ``requires_grad``; each attack step runs ``loss.backward()`` (which also
    fills the parameter gradients, later zeroed), then
    ``delta = clamp(delta + alpha * sign(delta.grad), -eps, eps)`` and a
    clamp to the image box, in separate elementwise ops;
  - trades (Zhang et al.'s ``trades.py``): each attack step forwards both
    x_adv and the clean x (the code recomputes the clean softmax inside the
    loop) and takes ``torch.autograd.grad`` of the KL with respect to x_adv;
    the step as separate ops; then two forward passes (clean and
    adversarial) for the loss.
* ``fastadv``: ``fastadv.train.Trainer``'s step with the same method
  (attack suite: input-only gradients, the fused ``linf_step`` op, one
  concatenated forward for TRADES), channels_last by default (oneDNN's
  NHWC convolutions: on this 2-core Xeon, PGD-AT on the MNIST CNN went from
  1.06x to 1.41x the eager recipe with it; 1 thread, batch 128), in the
  precision asked for (fp32 on CPU: bf16 autocast measured 0.97x there).

Images/s = batch / median step time (``harness.time_fn``). The ratio is
fastadv / eager. ``full_epoch_s`` is the time one epoch of the full
dataset (MNIST 60,000, CIFAR-10 50,000 images) would take at the measured
rate. On a shared machine the load average is in the environment stamp.

``--imagefolder [DIR]`` (issue 12) measures the JPEG-folder path instead:
the loader alone (``fastadv.data.loader.EpochLoader``: decode,
RandomResizedCrop + flip, collate, copy) in images/s at each ``--sizes``
resolution, on DIR or on a generated folder of ImageNet-sized JPEGs; then
the Trainer's fast-AT and PGD-AT steps at 224 px in each ``--precisions``
against the model's own floor (K x forward+backward to the input + one
forward+backward+SGD step, plain PyTorch, same model, batch and layout),
and whether the loader or the step is the slower ('bound'). ResNet-50 at
batch 256 on CUDA; on a CPU a ResNet-50-shaped network with one
bottleneck per stage at 1/4 width, so that a run takes minutes.
"""
from __future__ import annotations

import argparse
import copy
import os
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

from fastadv.bench import harness

METHOD_NAMES = ("pgd", "trades", "fast")
DATASET_SIZE = {"mnist_cnn": 60000, "preact_resnet18": 50000, "wrn34_10": 50000, "resnet50": 1281167}


def add_arguments(p) -> None:
    p.add_argument("--methods", default="pgd,trades,fast", help="comma list of pgd, trades, fast")
    p.add_argument("--model", default=None, help="mnist_cnn (CPU default) | preact_resnet18 (CUDA default) | ...")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (MNIST CNN), 256 (ResNets on CUDA)")
    p.add_argument("--pgd-steps", type=int, default=None, help="PGD/TRADES attack steps (default 10)")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None,
                   help="precision of the fastadv step (default: bf16 on CUDA, fp32 on CPU); eager is always fp32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="fastadv step with channels_last inputs and weights (default on: on this 2-core Xeon it took "
                        "PGD-AT on the MNIST CNN from 1.06x to 1.41x the eager recipe)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in the fastadv step")
    g = p.add_argument_group("the JPEG-folder data path (issue 12): fastadv bench train --imagefolder [DIR]")
    g.add_argument("--imagefolder", nargs="?", const="generate", default=None, metavar="DIR",
                   help="loader images/s and training-step images/s (fast-AT, PGD-AT; fp32, bf16) against the "
                        "model's own forward+backward floor; DIR: root/<class>/*.jpg (default: a generated "
                        "folder of ImageNet-sized JPEGs in a temporary directory)")
    g.add_argument("--images", type=int, default=None, help="generated JPEGs (default 256; --quick 48)")
    g.add_argument("--workers", type=int, default=None, help="decoding processes (default: min(8, CPUs))")
    g.add_argument("--sizes", default=None, help="loader resolutions, comma list (default 128,224,288; --quick 224)")
    g.add_argument("--precisions", default=None, help="training steps: comma list of fp32,bf16 (default both)")


# ------------------------------------------------------------------ eager recipes
def eager_pgd_step(model, opt, x, y, eps, alpha, steps):
    """Rice et al. / Wong et al.'s PGD-AT step, as in their public repositories (fp32)."""
    delta = torch.zeros_like(x).uniform_(-eps, eps)
    delta = (torch.clamp(x + delta, 0, 1) - x).requires_grad_(True)
    for _ in range(steps):
        loss = F.cross_entropy(model(x + delta), y)
        loss.backward()
        g = delta.grad.detach()
        d = torch.clamp(delta.data + alpha * torch.sign(g), -eps, eps)
        d = torch.clamp(x + d, 0, 1) - x
        delta.data = d
        delta.grad.zero_()
    delta = delta.detach()
    out = model(torch.clamp(x + delta, 0, 1))
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def eager_fast_step(model, opt, x, y, eps, alpha):
    """Wong et al. 2020's FGSM-RS step (fast_adversarial/CIFAR10/train_fgsm.py, fp32)."""
    return eager_pgd_step(model, opt, x, y, eps, alpha, 1)


def eager_trades_step(model, opt, x, y, eps, alpha, steps, beta):
    """Zhang et al. 2019's trades_loss (TRADES/trades.py) and the optimizer step (fp32)."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        # as in trades.py: the clean softmax is recomputed inside every step
        loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = x_adv.detach()
    opt.zero_grad()
    logits = model(x)
    loss = F.cross_entropy(logits, y) + beta * F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                                                        reduction="batchmean")
    loss.backward()
    opt.step()
    return loss


# --------------------------------------------------------------------- cases
def _batch(model_name, batch, device):
    if model_name == "mnist_cnn":
        from fastadv.data import embedded_mnist

        x, y = embedded_mnist("train")
        return x[:batch].to(device), y[:batch].to(device)
    from fastadv.data.synthetic import synthetic_batch
    from fastadv.models import INPUT_SHAPES

    return synthetic_batch(batch, INPUT_SHAPES[model_name], 10, device=device, seed=0)


def _settings(model_name, method, steps):
    if model_name == "mnist_cnn":
        eps, alpha, beta = 0.3, 0.01, 1.0
    else:
        eps, alpha, beta = 8 / 255, 2 / 255, 6.0
    if method == "fast":
        return dict(eps=eps, alpha=1.25 * eps)
    if method == "trades":
        return dict(eps=eps, alpha=alpha, steps=steps, beta=beta)
    return dict(eps=eps, alpha=alpha, steps=steps)


def run(args) -> dict:
    if getattr(args, "imagefolder", None):
        return run_imagefolder(args)
    from fastadv.models import get_model
    from fastadv.train import TrainConfig, Trainer, get_method

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    model_name = args.model or ("preact_resnet18" if cuda else "mnist_cnn")
    batch = args.batch_size or (256 if cuda and model_name != "mnist_cnn" else 128)
    steps = args.pgd_steps or 10
    amp = args.amp or ("bf16" if cuda else "none")
    amp = None if amp == "none" else amp
    channels_last = bool(args.channels_last)
    min_time = args.min_time if args.min_time is not None else (1.0 if args.quick else 5.0)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHOD_NAMES:
            raise SystemExit(f"fastadv bench train: unknown method {m!r} (choose from {', '.join(METHOD_NAMES)})")
    if args.quick:
        batch = min(batch, 32)
        steps = min(steps, 3)
    x, y = _batch(model_name, batch, device)
    torch.manual_seed(0)
    base = get_model(model_name, num_classes=10,
                     normalize=None if model_name == "mnist_cnn" else "cifar10").to(device)
    rows, notes = [], []
    for method in methods:
        kw = _settings(model_name, method, steps)
        # eager, fp32, contiguous
        m_e = copy.deepcopy(base).train()
        opt_e = torch.optim.SGD(m_e.parameters(), lr=0.01, momentum=0.9)
        if method == "pgd":
            fn_e = lambda: eager_pgd_step(m_e, opt_e, x, y, kw["eps"], kw["alpha"], kw["steps"])  # noqa: E731
        elif method == "fast":
            fn_e = lambda: eager_fast_step(m_e, opt_e, x, y, kw["eps"], kw["alpha"])  # noqa: E731
        else:
            fn_e = lambda: eager_trades_step(m_e, opt_e, x, y, kw["eps"], kw["alpha"], kw["steps"],  # noqa: E731
                                             kw["beta"])
        # fastadv: the Trainer's own step
        m_f = copy.deepcopy(base)
        cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", lr=0.01, weight_decay=0.0, schedule="constant",
                          amp=amp, channels_last=channels_last, compile=args.compile, progress=False,
                          device=str(device))
        trainer = Trainer(m_f, get_method(method, **kw), (x.cpu(), y.cpu()), None, cfg)
        xs = x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
        fn_f = lambda: trainer._train_step(xs, y)  # noqa: E731
        print(f"bench train: {method} on {model_name}, batch {batch}, {device} ...", file=sys.stderr)
        t_e = harness.time_fn(fn_e, device=device, warmup=2, min_time=min_time, min_runs=3)
        t_f = harness.time_fn(fn_f, device=device, warmup=2 if not args.compile else 4, min_time=min_time,
                              min_runs=3)
        ips_e, ips_f = batch / (t_e.median_ms / 1e3), batch / (t_f.median_ms / 1e3)
        rows.append({"method": method, "model": model_name, "batch": batch, "attack_steps": kw.get("steps", 1),
                     "eps": kw["eps"], "eager_ms": t_e.median_ms, "eager_iqr_ms": t_e.iqr_ms,
                     "fastadv_ms": t_f.median_ms, "fastadv_iqr_ms": t_f.iqr_ms, "eager_img_s": ips_e,
                     "fastadv_img_s": ips_f, "speedup": ips_f / ips_e,
                     "full_epoch_s": DATASET_SIZE.get(model_name, 50000) / ips_f,
                     "fastadv_precision": amp or "fp32", "channels_last": bool(channels_last),
                     "compile": bool(args.compile)})
    notes.append("eager = the authors' public fp32 recipe (see fastadv/bench/train.py); fastadv = Trainer step, "
                 f"precision {amp or 'fp32'}, channels_last {bool(channels_last)}, compile {bool(args.compile)}")
    notes.append("full_epoch_s: seconds for one epoch of the full dataset at the fastadv rate "
                 f"({DATASET_SIZE.get(model_name, 50000)} images)")
    columns = [("method", "method", None), ("model", "model", None), ("batch", "batch", None),
               ("attack_steps", "K", None), ("eager_img_s", "eager img/s", "{:.1f}"),
               ("fastadv_img_s", "fastadv img/s", "{:.1f}"), ("speedup", "speedup", "{:.2f}x"),
               ("full_epoch_s", "full epoch s", "{:.0f}")]
    return {"rows": rows, "columns": columns, "notes": notes}


# ------------------------------------------------------------- the JPEG-folder data path (issue 12)
def generate_folder(root, n: int, classes: int = 4, seed: int = 0):
    """``n`` JPEGs under root/<class>/ with ImageNet's typical geometry (sides 300-500 px, quality 90) and
    smooth content plus noise (so they compress like photographs, about 30-60 kB each)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = pathlib.Path(root)
    for k in range(n):
        c = k % classes
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(300, 501, size=2))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.005, 0.05, size=3)
        img = np.stack([127 + 100 * np.sin(f[i] * xx + (i + 1) * f[(i + 1) % 3] * yy + c) for i in range(3)], -1)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{k:05d}.JPEG", quality=90)
    return root


def _loader_rate(ds, size, batch, workers, device, epochs=2):
    """Images/s of the loader alone at ``size``: the second of ``epochs`` passes (the first starts the
    persistent workers), decode + augment + collate + host-to-device copy."""
    from fastadv.data.loader import EpochLoader
    from fastadv.train import distributed as D

    loader = EpochLoader(ds, workers=workers, prefetch=4, pin_memory=device.type == "cuda")
    rate = None
    for e in range(epochs):
        batches = D.shard_indices(D.global_permutation(len(ds), 0, e), batch, 0, 1)
        t0, n = time.perf_counter(), 0
        for x, _ in loader.batches(batches, device, e, 0, size=size):
            n += x.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
    loader.close()
    return rate


def _floor_fns(net, x, y, amp, device):
    """The two pieces of the model's own floor, in plain PyTorch (autocast in ``amp``) on the same model, batch
    and layout: forward + backward + SGD step on the weights, and forward + backward to the input only."""
    import contextlib

    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext

    def weights():
        with ctx():
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def inputs():
        xr = x.detach().requires_grad_(True)
        with ctx():
            loss = F.cross_entropy(net(xr), y)
        torch.autograd.grad(loss, xr)

    return weights, inputs


def _paired(fns, device, rounds: int, min_time: float) -> list[list[float]]:
    """ms per call of each fn, timed in alternation (one call of each per round, after one warm-up call each),
    so a change of machine load hits all of them alike; at least ``rounds`` rounds and ``min_time`` seconds."""
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3

    for fn in fns:
        once(fn)
    out, t0 = [[] for _ in fns], time.perf_counter()
    while len(out[0]) < rounds or time.perf_counter() - t0 < min_time:
        for k, fn in enumerate(fns):
            out[k].append(once(fn))
    return out


def run_imagefolder(args) -> dict:
    """``fastadv bench train --imagefolder``: loader images/s per resolution, training-step images/s per
    method and precision, each step against the model's floor, and which of data or model bounds it."""
    import tempfile

    from fastadv.data.imagefolder import ImageFolder
    from fastadv.models import get_model
    from fastadv.models.resnet import ResNet
    from fastadv.train import TrainConfig, Trainer, get_method

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    quick = bool(args.quick)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    # --quick is a smoke test (seconds): 96 px, batch 4; the numbers to report come from the default 224 px run
    sizes = [int(s) for s in (args.sizes or ("96" if quick else "128,224,288")).split(",") if s]
    precisions = [p for p in (args.precisions or "fp32,bf16").split(",") if p]
    min_time = args.min_time if args.min_time is not None else (0.2 if quick else 3.0)
    # ResNet-50 on a GPU; on a CPU a ResNet-50-shaped network with one bottleneck per stage and 1/4 of the
    # width (0.6 M parameters), so a step at 224 px takes about a second instead of a minute on 2 cores
    if args.model in (None, "resnet50") and cuda:
        model_name, build = "resnet50", lambda: get_model("resnet50", num_classes=1000, normalize="imagenet")
        batch = args.batch_size or 256
    else:
        model_name = args.model or "resnet-1111-w16"
        if model_name == "resnet-1111-w16":
            build = lambda: ResNet((1, 1, 1, 1), num_classes=4, width=16)  # noqa: E731
        else:
            build = lambda: get_model(model_name, num_classes=4)  # noqa: E731
        batch = args.batch_size or (4 if quick else 32)
    tmp = None
    if args.imagefolder == "generate":
        tmp = tempfile.TemporaryDirectory(prefix="fastadv-bench-jpegs-")
        n = args.images or (24 if quick else 256)
        t0 = time.perf_counter()
        root = generate_folder(tmp.name, n)
        print(f"bench train --imagefolder: generated {n} JPEGs in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    else:
        root = pathlib.Path(args.imagefolder)
    rows, notes = [], []
    try:
        ds = ImageFolder(root, train=True, size=224, seed=0)
        lbatch = min(4 if quick else 64, len(ds))
        loader_rate = {}
        for s in sizes:
            print(f"bench train --imagefolder: loader at {s} px, {workers} workers ...", file=sys.stderr)
            loader_rate[s] = _loader_rate(ds, s, lbatch, workers, device)
            rows.append({"case": "loader", "size": s, "precision": "", "batch": lbatch, "img_s": loader_rate[s],
                         "floor_img_s": None, "ratio_to_floor": None, "bound": ""})
        size = 224 if 224 in sizes else sizes[-1]
        x, y = next(iter(_one_batch(ds, batch, size)))
        x, y = x.to(device), (y % 4 if model_name != "resnet50" else y).to(device)
        for amp in precisions:
            amp_ = None if amp == "fp32" else amp
            kpgd = args.pgd_steps or (2 if quick else 10)
            for method, kw, k in (("fast", dict(eps=4 / 255), 1),
                                  ("pgd", dict(eps=4 / 255, alpha=1 / 255, steps=kpgd), kpgd)):
                torch.manual_seed(0)
                net = build().to(device).to(memory_format=torch.channels_last)
                xs = x.contiguous(memory_format=torch.channels_last)
                cfg = TrainConfig(epochs=1, batch_size=batch, optimizer="sgd", lr=1e-3, schedule="constant",
                                  amp=amp_, channels_last=True, progress=False, device=str(device))
                tr = Trainer(net, get_method(method, **kw), (x.cpu(), y.cpu()), None, cfg)
                torch.manual_seed(0)
                fnet = build().to(device).to(memory_format=torch.channels_last)
                weights, inputs = _floor_fns(fnet, xs, y, amp_, device)
                print(f"bench train --imagefolder: {method} {amp} step, batch {batch} at {size} px ...",
                      file=sys.stderr)
                step_ms, w_ms, i_ms = _paired([lambda: tr._train_step(xs, y), weights, inputs], device,
                                              rounds=3 if quick else 5, min_time=min_time)
                # per round: step / (K x input-gradient pass + weight pass), then the median over rounds
                ratios = sorted(s_ / (k * i_ + w_) for s_, w_, i_ in zip(step_ms, w_ms, i_ms))
                med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
                t, floor = med(step_ms), k * med(i_ms) + med(w_ms)
                ips = batch / (t / 1e3)
                lr_ = loader_rate.get(size)
                rows.append({"case": f"{method} step (K={k})", "size": size, "precision": amp, "batch": batch,
                             "img_s": ips, "floor_img_s": batch / (floor / 1e3),
                             "ratio_to_floor": ratios[len(ratios) // 2], "ratio_min": ratios[0],
                             "ratio_max": ratios[-1], "rounds": len(ratios), "step_ms": t,
                             "step_min_ms": min(step_ms), "fwd_bwd_weights_ms": med(w_ms),
                             "fwd_bwd_input_ms": med(i_ms),
                             "bound": ("data" if lr_ is not None and lr_ < ips else "model")})
        notes.append(f"model {model_name}, {sum(p.numel() for p in build().parameters()):,} parameters, channels_last; "
                     f"images from {'a generated folder' if tmp else root} ({len(ds)} JPEGs), RandomResizedCrop + flip")
        notes.append("loader img/s: decode + augment + collate + copy, the second pass of a persistent "
                     f"{workers}-worker loader, alone (no training beside it)")
        notes.append("floor: K x (forward + backward to the input) + 1 x (forward + backward + SGD step) of the same "
                     "model in plain PyTorch; step / floor: the median over rounds that time the step and the two "
                     "floor passes in alternation (so load changes hit both), range in ratio_min/ratio_max")
        notes.append("bound: 'data' when the loader alone is slower than the training step at that size; on a CPU "
                     "the loader and the step share the same cores, so together they are slower than either alone")
    finally:
        if tmp is not None:
            tmp.cleanup()
    columns = [("case", "case", None), ("size", "px", None), ("precision", "precision", None),
               ("batch", "batch", None), ("img_s", "img/s", "{:.1f}"), ("floor_img_s", "floor img/s", "{:.1f}"),
               ("ratio_to_floor", "step / floor", "{:.2f}x"), ("ratio_min", "min", "{:.2f}x"),
               ("ratio_max", "max", "{:.2f}x"), ("bound", "bound", None)]
    return {"rows": rows, "columns": columns, "notes": notes}


def _one_batch(ds, batch, size):
    from fastadv.data.loader import EpochLoader

    loader = EpochLoader(ds, workers=0)
    return loader.batches([torch.arange(batch) % len(ds)], "cpu", 0, 0, size=size)
