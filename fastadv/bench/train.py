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
"""
from __future__ import annotations

import argparse
import copy
import sys

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
