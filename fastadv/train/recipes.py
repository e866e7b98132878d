"""``fastadv train --recipe NAME``: the papers' ImageNet settings as defaults, and ``--dry-run``'s plan.

A recipe is a dict of ``fastadv train`` settings (argparse dests) applied
under the explicit flags: a setting the command line gives wins; a flag
left out, or given with its argparse default, takes the recipe's value.
Values may be functions of the resolved arguments (FGSM's step follows
``--eps``). ``fastadv train --recipe fast-imagenet --dry-run`` prints what
a recipe resolves to.

``fast-imagenet``: Wong, Rice & Kolter, "Fast is better than free:
Revisiting adversarial training", ICLR 2020, ImageNet (locuslab/
fast_adversarial, ImageNet/run_fast_{2,4}px.sh). ResNet-50, FGSM from a
uniform random start with step alpha = 1.25 eps (the scripts'
``step5_eps4``; eps 4/255, ``--eps 2/255`` for the 2-px model, step 2.5/255),
three phases of 6, 6 and 3 epochs (checkpoints at epochs 6, 12, 15):
128 px crops at global batch 512 (from the 160 px resized copy), 224 px
at 224 (352 px copy), 288 px at 128 (full size), SGD momentum 0.9, weight
decay 1e-4, lr piecewise linear over epochs (0 -> 0.4 at epoch 1 -> 0.04
at 6 -> 0.004 at 12 -> 0.0004 at 15), mixed precision (the code's apex
``half``; here bf16 autocast), channels_last; per-epoch check PGD-10 (step
eps/4: 1/255 at eps 4/255, as Free-AT's validation) on 1,000 held-out
images, then ``fastadv.evaluate(version='fast')`` on them. The phase
sizes, batches, lr points and weight decay are read from
poloclub/robust-principles (configs/train_test/fat_phase{1,2,3}.yaml,
fat_default.yaml), a port of these phases: the original
ImageNet/configs/*.yml are not in the copy of locuslab/fast_adversarial
we could read. Label smoothing: none (the ImageNet code is forked from
Free-AT's main_free.py, whose criterion is plain cross-entropy; the port's
configs have none either). Differences: the random-resized crop is taken
from the full-size JPEG at every phase (the reference reads pre-resized
160 and 352 px copies for phases 1 and 2: same crop distribution up to
the resampling); the held-out check runs at the final phase's 288 px
(``--eval-size`` changes it).

``free-imagenet``: Shafahi et al., "Adversarial Training for Free!",
NeurIPS 2019 (mahyarnajibi/FreeAdversarialTraining, configs.yml and
main_free.py): ResNet-50, m = 4 replays, eps = step = 4/255, 90 simulated
epochs = ceil(90 / 4) = 23 passes, batch 256, 224 px crops, SGD lr 0.1
momentum 0.9 weight decay 1e-4, lr / 10 every ceil(30 / 4) = 8 passes
(``adjust_learning_rate``), validation PGD-10 and PGD-50 at step 1/255
(we run PGD-10 per epoch, then ``fastadv.evaluate``). Difference: the
reference trains in fp32; the CLI's default precision (bf16 autocast on
CUDA GPUs) applies unless ``--amp none``.

``pgd-imagenet``: PGD adversarial training (Madry et al., ICLR 2018) at
Free-AT's ImageNet comparison scale: ResNet-50, eps 4/255, 10 steps of
1/255 (step x steps = 2.5 eps, Madry et al.'s rule; the same attack as
the validation PGD-10), 90 epochs, batch 256, SGD 0.1 / 10 every 30
epochs, weight decay 1e-4, 224 px. Neither paper publishes a PGD-AT
ImageNet configuration file; the step count is our choice (``--steps``).
"""
from __future__ import annotations

import json
import sys

__all__ = ["RECIPES", "apply_recipe", "checkpoint_bytes", "plan", "dry_run"]


def _step_lr(lr: float, every: int, total: int) -> str:
    """'piecewise' points for lr / 10 every ``every`` epochs over ``total`` (exact at every step: the jump sits
    1e-6 epoch after the boundary, so the boundary's last step keeps the old lr)."""
    pts, cur, e = [f"0:{lr:g}"], lr, every
    while e < total:
        pts += [f"{e}:{cur:g}", f"{e + 1e-6:.6f}:{cur / 10:g}"]
        cur /= 10
        e += every
    pts.append(f"{total}:{cur:g}")
    return ",".join(pts)


RECIPES: dict[str, dict] = {
    "fast-imagenet": dict(
        dataset="imagefolder", model="resnet50", method="fast", eps=4 / 255, alpha=lambda a: 1.25 * a.eps,
        epochs=15, batch_size=512, resize_schedule="0:128@512,6:224@224,12:288@128", optimizer="sgd", lr=0.4,
        weight_decay=1e-4, schedule="piecewise", lr_points="0:0,1:0.4,6:0.04,12:0.004,15:0.0004", amp="bf16",
        channels_last=True, eval_eps=lambda a: a.eps, eval_steps=10, eval_samples=1000, final_eval="fast"),
    "free-imagenet": dict(
        dataset="imagefolder", model="resnet50", method="free", eps=4 / 255, replays=4, epochs=23, batch_size=256,
        image_size=224, optimizer="sgd", lr=0.1, weight_decay=1e-4, schedule="piecewise",
        lr_points=_step_lr(0.1, 8, 23), channels_last=True, eval_eps=lambda a: a.eps, eval_steps=10,
        eval_samples=1000, final_eval="fast"),
    "pgd-imagenet": dict(
        dataset="imagefolder", model="resnet50", method="pgd", eps=4 / 255, alpha=1 / 255, steps=10, epochs=90,
        batch_size=256, image_size=224, optimizer="sgd", lr=0.1, weight_decay=1e-4, schedule="piecewise",
        lr_points=_step_lr(0.1, 30, 90), channels_last=True, eval_eps=lambda a: a.eps, eval_steps=10,
        eval_samples=1000, final_eval="fast"),
}


def apply_recipe(args, defaults: dict | None = None) -> dict:
    """Fill ``args`` (an argparse Namespace) with ``args.recipe``'s settings where no flag set them.

    ``defaults``: the parser's {dest: default} (a value equal to its default
    counts as not given). Returns the settings the recipe supplied.
    """
    name = getattr(args, "recipe", None)
    if not name:
        return {}
    if name not in RECIPES:
        raise SystemExit(f"fastadv train: unknown --recipe {name!r} (choose from {', '.join(RECIPES)})")
    defaults = defaults if defaults is not None else getattr(args, "_defaults", {}) or {}
    applied = {}
    recipe = RECIPES[name]
    for key in sorted(recipe, key=lambda k: callable(recipe[k])):  # constants first: callables read them
        cur = getattr(args, key, None)
        if cur is None or (key in defaults and cur == defaults[key]):
            v = recipe[key]
            v = v(args) if callable(v) else v
            setattr(args, key, v)
            applied[key] = v
    return applied


# ---------------------------------------------------------------- dry run
def checkpoint_bytes(net, optimizer: str = "sgd", momentum: float = 0.9, extra_tensors: int = 0) -> dict:
    """Bytes of a fastadv checkpoint of ``net``: model state (parameters + buffers), optimizer state (SGD with
    momentum: one buffer per trainable parameter; Adam: two, plus a step count), and ``extra_tensors``
    bytes of method state. Pickle framing and RNG states add a few kB."""
    model = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    params = [p for p in net.parameters() if p.requires_grad]
    pbytes = sum(p.numel() * p.element_size() for p in params)
    if optimizer == "adam":
        opt = 2 * pbytes + 8 * len(params)
    else:
        opt = pbytes if momentum else 0
    return {"model_bytes": int(model), "optimizer_bytes": int(opt), "method_bytes": int(extra_tensors),
            "total_bytes": int(model + opt + extra_tensors),
            "parameters": int(sum(p.numel() for p in net.parameters()))}


def plan(cfg, n_train: int, world_size: int = 1, replays: int = 1) -> list[dict]:
    """One entry per epoch: image size, global and per-rank batch, optimizer steps."""
    from fastadv.data.loader import parse_schedule, phase_at

    phases = parse_schedule(cfg.resize_schedule)
    out = []
    for e in range(cfg.epochs):
        ph = phase_at(phases, e)
        b = ph.batch_size or cfg.batch_size
        out.append({"epoch": e, "image_size": ph.size, "batch_size": b, "per_rank_batch": b / world_size,
                    "batches": n_train // b, "optimizer_steps": (n_train // b) * replays})
    return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def dry_run(cfg, *, net, method, n_train: int, n_classes: int, heldout_n: int | None, input_shape, dataset: str,
            recipe: str | None = None, stream=None) -> dict:
    """Print the resolved run and return it as a dict; trains nothing, starts no process group, decodes no image."""
    import dataclasses
    import os

    stream = stream or sys.stdout
    world = int(os.environ.get("WORLD_SIZE", "1"))
    epochs = plan(cfg, n_train, world, getattr(method, "replays", 1))
    for p in {e["batch_size"] for e in epochs}:
        if p % world:
            raise SystemExit(f"fastadv train --dry-run: batch size {p} is not divisible by the world size {world}")
        if p > n_train:
            raise SystemExit(f"fastadv train --dry-run: batch size {p} is larger than the training set ({n_train})")
        if (p // world) % cfg.grad_accum:
            raise SystemExit(f"fastadv train --dry-run: grad_accum {cfg.grad_accum} does not divide the per-rank "
                             f"batch {p // world}")
    if cfg.grad_accum > 1 and not getattr(method, "supports_grad_accum", True):
        raise SystemExit(f"fastadv train --dry-run: method {method.name!r} cannot accumulate gradients "
                         f"({method.grad_accum_refusal})")
    extra = 0
    if getattr(method, "name", "") == "free":  # Free-AT checkpoints its running perturbation (local batch x image)
        size = max((e["image_size"] or input_shape[-1]) for e in epochs)
        b = max(e["per_rank_batch"] for e in epochs)
        extra = int(b * input_shape[0] * size * size * 4)
    ck = checkpoint_bytes(net, cfg.optimizer, cfg.momentum, extra)
    out = {"dry_run": True, "recipe": recipe, "dataset": dataset, "train_images": n_train, "classes": n_classes,
           "heldout_images": heldout_n, "input_shape": list(input_shape), "world_size": world,
           "method": method.name, "method_args": method.describe(), "config": dataclasses.asdict(cfg),
           "epochs": epochs, "total_optimizer_steps": sum(e["optimizer_steps"] for e in epochs),
           "checkpoint": ck}
    print(f"fastadv train --dry-run{f' --recipe {recipe}' if recipe else ''}: {method.name} on {dataset}, "
          f"{n_train} training images, {n_classes} classes, {heldout_n or 0} held-out images, world size {world}",
          file=stream)
    phases = []
    for e in epochs:
        key = (e["image_size"], e["batch_size"])
        if not phases or phases[-1][0] != key:
            phases.append([key, e["epoch"], e["epoch"], e["batches"]])
        else:
            phases[-1][2] = e["epoch"]
    for (size, b), e0, e1, steps in phases:
        micro = f", {cfg.grad_accum} micro-batches of {b // world // cfg.grad_accum}" if cfg.grad_accum > 1 else ""
        print(f"  epochs {e0 + 1}-{e1 + 1}: images {size or input_shape[-1]} px, global batch {b} "
              f"({b / world:g} per rank{micro}), {steps} batches per epoch", file=stream)
    lr = f"points {cfg.lr_points}" if cfg.schedule == "piecewise" else f"peak {cfg.lr:g}"
    print(f"  {out['total_optimizer_steps']} optimizer steps; lr {cfg.schedule} ({lr}), amp {cfg.amp or 'fp32'}, "
          f"channels_last {cfg.channels_last}", file=stream)
    print(f"  checkpoint about {_fmt_bytes(ck['total_bytes'])}: model {_fmt_bytes(ck['model_bytes'])} "
          f"({ck['parameters']:,} parameters + buffers), optimizer {_fmt_bytes(ck['optimizer_bytes'])}"
          + (f", method state {_fmt_bytes(extra)}" if extra else ""), file=stream)
    print(json.dumps(out, default=str), file=stream)
    return out
