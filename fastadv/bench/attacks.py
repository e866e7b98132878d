"""``fastadv bench attacks``: the PGD attack engine vs torchattacks, a plain loop and the model's floor.

Per case (model, batch, device, precision), in one process, on the same
inputs and model, every run without random start:

* ``floor``: the model's own K forward + input-gradient passes at the same
  precision (what any K-step attack must pay; no step, no loss bookkeeping);
* ``torchattacks``: ``torchattacks.PGD(random_start=False)`` when installed;
* ``reference loop``: the plain eager loop with ``fastadv.reference.lp.linf_step``;
* ``fastadv``: ``fastadv.attacks.PGD`` with no engine option, then with each
  option on: ``early_stop`` (per-sample early stop with compaction),
  ``channels_last``, ``autocast`` (bf16; fp16 on CUDA too), ``compile``
  (torch.compile of the model) and, on CUDA, ``cuda_graph``.

Columns: images/s, ms per attack, ratio to the floor's time (1.00 = free
attack), speed-up over torchattacks, and robust accuracy, which must be
identical for every float32 run without early stop (``same_acc``; early stop
can only lower it, by keeping a fooling iterate the last step would leave).

Cases: PGD-10 L-inf (eps 8/255, alpha 2/255) on the Madry MNIST CNN (batch
256) and PreAct-ResNet-18 (batch 256 on GPU, 32 on CPU: one PGD-10 there is
~15 s on this 2-core machine); on CUDA also WideResNet-34-10 (batch 128) and
ResNet-50 at 224 (batch 64). And the Madry MNIST setting (eps 0.3, alpha 0.01,
40 steps) on a normally trained MNIST CNN, where most samples fall within a
few steps and early stop pays: the model is trained here for ``--train-steps``
Adam steps on the embedded MNIST training split (about 97% test accuracy),
or loaded from ``--mnist-checkpoint``.

CPU timing: the variants of a case run round-robin, ``--repeats`` times
(after one warm-up each), and each reports its median: on a machine shared
with other jobs the load drifts, and interleaving spreads the drift over all
variants instead of penalising whichever ran last. CUDA timing: the
harness's ``time_fn`` (CUDA events / do_bench). On CPU the process time
(``time.process_time``) of each run is recorded too: with one intra-op thread
(``OMP_NUM_THREADS=1``) it counts only this process's work, so its ratios
stay meaningful when other jobs load the machine (wall-clock medians swung
3x between rounds at load 5 on this 2-core machine; process time far less).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastadv.attacks import PGD
from fastadv.bench import harness
from fastadv.models import get_model
from fastadv.reference import lp as ref

COLUMNS = [
    ("case", "case"),
    ("variant", "variant"),
    ("images_per_s", "images/s", "{:.1f}"),
    ("ms", "ms", "{:.1f}"),
    ("x_floor", "x floor", "{:.2f}x"),
    ("x_torchattacks", "vs torchattacks", "{:.2f}x"),
    ("cpu_x_floor", "cpu x floor", "{:.2f}x"),
    ("cpu_x_torchattacks", "cpu vs ta", "{:.2f}x"),
    ("robust_acc", "robust acc", "{:.4f}"),
    ("same_acc", "same acc"),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default=None, help="comma list of mnist_cnn, preact_resnet18, madry_mnist, wrn34_10, "
                                                 "resnet50 (default: all for the device)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every case (default: per case)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per variant (default 5, quick 2)")
    p.add_argument("--train-steps", type=int, default=300, help="Adam steps to train the madry_mnist model")
    p.add_argument("--mnist-checkpoint", default=None, help="state dict of a trained mnist_cnn (skips training)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (slow to compile)")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_fn(model, x, y, steps, autocast, channels_last):
    """K forward + input-gradient passes: the cost any K-step attack pays."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def run():
        for _ in range(steps):
            xr = xin.detach().requires_grad_(True)
            with torch.autocast(x.device.type, dtype=dt, enabled=dt is not None):
                out = model(xr)
            (g,) = torch.autograd.grad(F.cross_entropy(out.float(), y), xr)
        return g

    return run


def reference_loop(model, x, y, eps, alpha, steps):
    def run():
        adv = x.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
            adv = ref.linf_step(adv.detach(), x, g, alpha, eps)
        return adv

    return run


def _train_mnist(steps: int, device, log) -> torch.nn.Module:
    from fastadv.data import embedded_mnist

    x, y = embedded_mnist("train")
    torch.manual_seed(0)
    model = get_model("mnist_cnn", 10).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.cross_entropy(model(x[idx].to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    log(f"trained mnist_cnn for {steps} steps in {time.perf_counter() - t0:.0f} s")
    return model


def _case_specs(device, args):
    cuda = device.type == "cuda"
    quick = args.quick
    specs = {
        "mnist_cnn": dict(model="mnist_cnn", shape=(1, 28, 28), batch=64 if quick else 256, eps=8 / 255,
                          alpha=2 / 255, steps=10, data="random"),
        "preact_resnet18": dict(model="preact_resnet18", shape=(3, 32, 32), batch=8 if quick else (512 if cuda else 32),
                                eps=8 / 255, alpha=2 / 255, steps=10, data="random"),
        "madry_mnist": dict(model="mnist_cnn", shape=(1, 28, 28), batch=64 if quick else 256, eps=0.3, alpha=0.01,
                            steps=40, data="mnist"),
    }
    if cuda:
        specs["wrn34_10"] = dict(model="wrn34_10", shape=(3, 32, 32), batch=128, eps=8 / 255, alpha=2 / 255,
                                 steps=10, data="random")
        specs["resnet50"] = dict(model="resnet50", shape=(3, 224, 224), batch=64, eps=8 / 255, alpha=2 / 255,
                                 steps=10, data="random", classes=1000)
    names = args.cases.split(",") if args.cases else list(specs)
    for n in names:
        if n not in specs:
            raise SystemExit(f"--cases: unknown or not available on {device.type}: {n} (have {', '.join(specs)})")
    if args.batch:
        for s in specs.values():
            s["batch"] = args.batch
    return [(n, specs[n]) for n in names]


def run(args) -> dict:
    device = torch.device(args.device or "cpu")
    cuda = device.type == "cuda"
    repeats = args.repeats or (2 if args.quick else 5)

    def log(msg):
        print(f"[bench attacks] {msg}", file=sys.stderr, flush=True)

    try:
        import torchattacks
    except Exception as exc:  # absent or broken: the comparison is skipped, and said so
        torchattacks = None
        ta_note = f"torchattacks not importable ({type(exc).__name__}: {exc}); its rows are missing"
    else:
        ta_note = None
    rows, notes = [], []
    if ta_note:
        notes.append(ta_note)
    if not cuda:
        notes.append("CUDA graphs and the WRN-34-10 / ResNet-50 cases run on GPU only; not measured here")
    for case, spec in _case_specs(device, args):
        torch.manual_seed(0)
        if spec["data"] == "mnist":
            from fastadv.data import embedded_mnist

            if args.mnist_checkpoint:
                model = get_model("mnist_cnn", 10)
                model.load_state_dict(torch.load(args.mnist_checkpoint, map_location="cpu", weights_only=True))
                model = model.to(device).eval()
            else:
                model = _train_mnist(20 if args.quick else args.train_steps, device, log)
            xs, ys = embedded_mnist("heldout")
            x, y = xs[: spec["batch"]].to(device), ys[: spec["batch"]].to(device)
            with torch.no_grad():
                clean = (model(x).argmax(1) == y).float().mean().item()
            notes.append(f"{case}: normally trained mnist_cnn, clean accuracy {clean:.4f} on the batch")
        else:
            model = get_model(spec["model"], spec.get("classes", 10)).to(device).eval()
            x = torch.rand((spec["batch"],) + spec["shape"], device=device)
            with torch.no_grad():
                y = model(x).argmax(1)  # labels = clean predictions: clean accuracy 1
        eps, alpha, steps = spec["eps"], spec["alpha"], spec["steps"]
        common = dict(eps=eps, alpha=alpha, steps=steps, random_start=False)
        variants = [("floor", floor_fn(model, x, y, steps, None, False), None)]
        if torchattacks is not None:
            ta = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
            variants.append(("torchattacks", lambda ta=ta: ta(x, y), None))
        variants.append(("reference loop", reference_loop(model, x, y, eps, alpha, steps), None))
        variants.append(("fastadv", lambda: PGD(model, **common)(x, y), "fp32"))
        variants.append(("fastadv +early_stop", lambda: PGD(model, early_stop=True, **common)(x, y), "es"))
        if len(spec["shape"]) == 3:
            variants.append(("fastadv +channels_last", lambda: PGD(model, channels_last=True, **common)(x, y), "fp32"))
        precisions = ["bf16", "fp16"] if cuda else ["bf16"]
        for p in precisions:
            variants.append((f"floor {p}", floor_fn(model, x, y, steps, p, False), None))
            variants.append((f"fastadv +autocast {p}", lambda p=p: PGD(model, autocast=p, **common)(x, y), p))
        if cuda:
            variants.append(("floor bf16 channels_last", floor_fn(model, x, y, steps, "bf16", True), None))
            variants.append(("fastadv bf16+channels_last+cuda_graph",
                             lambda: PGD(model, autocast="bf16", channels_last=True, cuda_graph=True, **common)(x, y),
                             "bf16"))
            variants.append(("fastadv bf16+channels_last+early_stop",
                             lambda: PGD(model, autocast="bf16", channels_last=True, early_stop=True, **common)(x, y),
                             "bf16-es"))
        if not args.no_compile and not args.quick:
            variants.append(("fastadv +compile", lambda: PGD(model, compile=True, **common)(x, y), "fp32"))
        log(f"{case}: batch {x.shape[0]}, {len(variants)} variants x {repeats} runs")
        # warm-up (and compile) once, and record each variant's robust accuracy
        accs = {}
        for name, fn, _ in variants:
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            if not name.startswith("floor"):
                with torch.no_grad():
                    accs[name] = (model(out).argmax(1) == y).float().mean().item()
            log(f"  warm-up {name}: {time.perf_counter() - t0:.2f} s")
        times = {name: [] for name, _, _ in variants}
        cpu_times = {name: [] for name, _, _ in variants}
        if cuda:
            for name, fn, _ in variants:
                times[name] = [harness.time_fn(fn, device=device, min_time=args.min_time or 1.0).median_ms]
        else:
            for _ in range(repeats):
                for name, fn, _ in variants:
                    c0, t0 = time.process_time(), time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    cpu_times[name].append((time.process_time() - c0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        cpu_med = {k: statistics.median(v) for k, v in cpu_times.items() if v}
        ref_acc = accs.get("torchattacks", accs.get("reference loop"))
        for name, _, prec in variants:
            floor_name = "floor" if prec in (None, "fp32", "es") else f"floor {prec.split('-')[0]}"
            if name.startswith("floor"):
                floor_name = name
            if cuda and "channels_last" in name and prec and prec.startswith("bf16"):
                floor_name = "floor bf16 channels_last"
            acc = accs.get(name)
            rows.append({
                "case": case, "variant": name, "batch": x.shape[0], "steps": steps, "eps": eps, "alpha": alpha,
                "ms": med[name], "runs_ms": times[name], "images_per_s": x.shape[0] / (med[name] / 1e3),
                "x_floor": med[name] / med[floor_name] if floor_name in med else None,
                "cpu_ms": cpu_med.get(name), "runs_cpu_ms": cpu_times[name],
                "cpu_x_floor": cpu_med[name] / cpu_med[floor_name] if name in cpu_med and floor_name in cpu_med
                else None,
                "cpu_x_torchattacks": cpu_med["torchattacks"] / cpu_med[name]
                if name in cpu_med and "torchattacks" in cpu_med else None,
                "x_torchattacks": med["torchattacks"] / med[name] if "torchattacks" in med else None,
                "robust_acc": acc,
                # float32 runs must match exactly; early stop may only be lower (it keeps the first
                # fooling iterate); bf16/fp16 change the model's numbers, so only the difference is shown.
                "same_acc": None if acc is None or ref_acc is None else (
                    acc == ref_acc if prec in ("fp32", None) else
                    ("<=" if acc <= ref_acc else "HIGHER") if prec == "es" else f"{acc - ref_acc:+.4f} ({prec})"),
            })
            log(f"  {name}: {med[name]:.1f} ms" + (f", acc {acc:.4f}" if acc is not None else ""))
    return {"rows": rows, "columns": COLUMNS, "notes": notes, "repeats": repeats}
