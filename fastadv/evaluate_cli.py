"""``fastadv eval``: robustness report of a model checkpoint (``fastadv.evaluate``).

Examples::

    fastadv eval --model mnist_cnn --checkpoint run/ckpt.pt --data mnist --data-root data/mnist \\
        --eps 0.3 --attacks pgd,apgd-ce,apgd-dlr --n 1000 --out eval/
    fastadv eval --model preact_resnet18 --normalize cifar10 --checkpoint ckpt.pt --data cifar10 \\
        --data-root data/cifar-10-batches-py --eps 0.03137 --curve auto --resume eval/state.json

The checkpoint is read with ``torch.load(weights_only=True)``: a state dict,
or a dict holding one under 'model' (fastadv's training checkpoints),
'state_dict' or 'model_state_dict'. Without ``--checkpoint`` the model keeps
its random initialisation (useful only for smoke tests). Exit status: 0 when
the report has no gradient-masking warning, 3 when it is suspicious, 2 on
bad arguments or files.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

DATASETS = ("mnist", "embedded-mnist", "cifar10", "cifar10-subset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastadv.evaluate import ATTACKS
    from fastadv.models import MODELS

    parser.add_argument("--model", required=True, choices=sorted(MODELS), help="model architecture (fastadv.models)")
    parser.add_argument("--checkpoint", default=None, help="weights file (state dict or fastadv checkpoint)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--normalize", default=None, help="wrap the model in NormalizedModel: cifar10 | imagenet")
    parser.add_argument("--model-kwargs", default="{}", help='JSON constructor options, e.g. \'{"width": 0.5}\'')
    parser.add_argument("--data", default="embedded-mnist", choices=DATASETS)
    parser.add_argument("--data-root", default=None, help="folder of the dataset files (mnist, cifar10)")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.add_argument("--n", type=int, default=None, help="evaluate the first n samples")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--attacks", default="apgd-ce,apgd-dlr", help=f"comma list of {', '.join(ATTACKS)}")
    parser.add_argument("--eps", type=float, required=True, help="radius in [0, 1] pixel units (e.g. 0.3, 8/255=0.03137)")
    parser.add_argument("--norm", default="linf", choices=("linf", "l2", "l1"))
    parser.add_argument("--no-cascade", action="store_true", help="run every attack on every clean-correct sample")
    parser.add_argument("--curve", default=None, help="'auto' or a comma list of eps for the accuracy-vs-eps curve")
    parser.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    parser.add_argument("--check-samples", type=int, default=128)
    parser.add_argument("--model-mode", default="eval", choices=("eval", "train", "as-is"))
    parser.add_argument("--autocast", default=None, choices=("bf16", "fp16"))
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--resume", default=None, metavar="STATE", help="state file: resume an interrupted run")
    parser.add_argument("--out", default=None, help="folder for report.json and the curve (JSON, PNG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def load_weights(path) -> dict:
    """A state dict from ``path`` (torch.load with weights_only=True)."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"checkpoint {path} holds no state dict (expected one, or a dict with 'model' or 'state_dict')")


def load_data(name: str, root, split: str):
    from fastadv import data as D

    if name == "embedded-mnist":
        return D.embedded_mnist("heldout" if split == "test" else split)
    if root is None:
        raise ValueError(f"--data {name} needs --data-root")
    if name == "mnist":
        return D.load_mnist(root, split, as_float=True)
    if name == "cifar10":
        return D.load_cifar10(root, split, as_float=True)
    import numpy as np
    import torch

    f = pathlib.Path(root)
    f = f / "cifar10_subset.npz" if f.is_dir() else f
    z = np.load(f)
    keys = sorted(z.files)
    xk = next(k for k in keys if k.startswith("x") and split in k) if any(split in k for k in keys) else "x"
    yk = xk.replace("x", "y", 1)
    x = torch.from_numpy(z[xk])
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    if x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(z[yk]).long()


def run(args) -> int:
    import torch

    from fastadv.evaluate import evaluate
    from fastadv.models import get_model

    try:
        kwargs = json.loads(args.model_kwargs)
        model = get_model(args.model, args.num_classes, normalize=args.normalize, **kwargs)
        if args.checkpoint is not None:
            sd = load_weights(args.checkpoint)
            target = model.model if args.normalize is not None and not any(k.startswith("model.") for k in sd) else model
            target.load_state_dict(sd)
        x, y = load_data(args.data, args.data_root, args.split)
    except (ValueError, OSError, RuntimeError, KeyError, StopIteration) as exc:
        print(f"fastadv eval: {exc}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    curve = None
    if args.curve:
        curve = "auto" if args.curve == "auto" else [float(v) for v in args.curve.split(",")]
    report = evaluate(model, (x, y), attacks=[a.strip() for a in args.attacks.split(",") if a.strip()], eps=args.eps,
                      norm=args.norm, batch_size=args.batch_size, n=args.n, device=device,
                      cascade=not args.no_cascade, curve=curve, checks=not args.no_checks,
                      check_samples=args.check_samples, model_mode=args.model_mode, autocast=args.autocast,
                      state_path=args.resume, out_dir=args.out, progress=not args.no_progress, seed=args.seed)
    print(f"clean accuracy   {report['clean_accuracy']:.2%}  (n={report['n']})")
    for name, r in report["attacks"].items():
        ips = r["images_per_s"]
        print(f"  after {name:<10} {r['robust_accuracy']:.2%}  ({r['time_s']:.1f} s"
              + (f", {ips:.1f} images/s)" if ips else ")"))
    print(f"robust accuracy  {report['robust_accuracy']:.2%}  (worst case over {len(report['attacks'])} attacks, "
          f"eps={report['eps']:g}, {report['norm']})")
    if report["curve"]:
        print("curve: " + ", ".join(f"{c['eps']:.4g}: {c['robust_accuracy']:.1%}" for c in report["curve"]))
    for w in report["warnings"]:
        print(f"WARNING: {w}")
    print(report["verdict"])
    if args.out:
        print(f"wrote {pathlib.Path(args.out) / 'report.json'}")
    return 3 if report["suspicious"] else 0
