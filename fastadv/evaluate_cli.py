"""``fastadv eval``: robustness report of a model checkpoint (``fastadv.evaluate``).

Examples::

    fastadv eval --checkpoint runs/fastadv-train/model.pt --eps 0.3          # AutoAttack standard version
    fastadv eval --checkpoint run/model.pt --eps 0.3 --version fast --n 1000 --out eval/
    fastadv eval --model preact_resnet18 --normalize cifar10 --checkpoint ckpt.pt --data cifar10 \\
        --data-root data/cifar-10-batches-py --eps 0.03137 --curve auto --resume eval/state.json
    torchrun --nproc_per_node 2 -m fastadv.cli eval --checkpoint run/model.pt --eps 0.3   # sharded

A checkpoint that fastadv wrote (``model.pt`` of ``fastadv train``) records
its architecture, constructor options, normalization and dataset, so
``--checkpoint`` and ``--eps`` are all it needs; for other files give
``--model`` (and ``--model-kwargs``, ``--normalize``). Read with
``torch.load(weights_only=True)``: a state dict, or a dict holding one under
'model', 'state_dict' or 'model_state_dict'. Under ``torchrun`` the images
are sharded across ranks (gloo on CPU, NCCL on GPU) and rank 0 writes the
report; ``--resume`` then keeps one state file per rank. Exit status: 0 when
every check passed, 3 when the report is suspicious, 2 on bad arguments or files.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

DATASETS = ("mnist", "embedded-mnist", "cifar10", "cifar10-subset")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fastadv.evaluation import ATTACKS, VERSIONS
    from fastadv.models import MODELS

    parser.add_argument("--checkpoint", required=True,
                        help="weights file: a fastadv model.pt / last.pt (architecture read from it) or a state dict")
    parser.add_argument("--model", default=None, choices=sorted(MODELS),
                        help="model architecture (default: the one recorded in a fastadv checkpoint)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: recorded, else 10")
    parser.add_argument("--normalize", default=None, help="wrap the model in NormalizedModel: cifar10 | imagenet")
    parser.add_argument("--model-kwargs", default=None, help='JSON constructor options, e.g. \'{"width": 0.5}\'')
    parser.add_argument("--data", default=None, choices=DATASETS,
                        help="default: the dataset recorded in the checkpoint, else embedded-mnist")
    parser.add_argument("--data-root", default=None, help="folder of the dataset files (mnist, cifar10)")
    parser.add_argument("--split", default="test", help="dataset split (default test)")
    parser.add_argument("--n-samples", "--n", dest="n", type=int, default=None,
                        help="evaluate the first N samples (under torchrun write --n-samples: torchrun reads --n as its own)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--version", default=None, choices=VERSIONS,
                        help="standard (default: AutoAttack's APGD-CE, APGD-T, FAB-T, Square) | plus | rand | fast | "
                             "custom (with --attacks)")
    parser.add_argument("--attacks", default=None, help=f"custom comma list of {', '.join(ATTACKS)}")
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


def load_weights(path) -> tuple[dict, dict]:
    """(state dict, recorded model meta or {}) from ``path`` (torch.load with weights_only=True)."""
    import torch

    if not pathlib.Path(path).is_file():
        raise ValueError(f"--checkpoint {path}: no such file")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
        if not meta and isinstance(obj.get("config"), dict):  # a training checkpoint (last.pt)
            meta = obj["config"].get("model_meta") or {}
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key], meta
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise ValueError(f"checkpoint {path} holds no state dict (expected one, or a dict with 'model' or 'state_dict')")


def build_model(args):
    """The model the checkpoint holds: recorded architecture, overridden by any flag given."""
    from fastadv.models import get_model

    sd, meta = load_weights(args.checkpoint)
    name = args.model or meta.get("name")
    if name is None:
        raise ValueError(f"--checkpoint {args.checkpoint} records no architecture (not written by fastadv train): "
                         "give --model (and --model-kwargs / --normalize as it was trained)")
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs is not None else dict(meta.get("kwargs") or {})
    normalize = args.normalize if args.normalize is not None else meta.get("normalize")
    num_classes = args.num_classes or meta.get("num_classes") or 10
    ens = meta.get("ensemble") if args.model is None else None
    if ens:  # fastadv train --ensemble-size / --members: an Ensemble of the recorded architecture
        from fastadv.models import Ensemble

        model = Ensemble([get_model(name, num_classes, normalize=normalize, **kwargs) for _ in range(ens["size"])],
                         combine=ens.get("combine", "logits"))
        target = model
    else:
        model = get_model(name, num_classes, normalize=normalize, **kwargs)
        target = model.model if normalize is not None and not any(k.startswith("model.") for k in sd) else model
    try:
        target.load_state_dict(sd)
    except RuntimeError as exc:
        raise ValueError(f"--checkpoint {args.checkpoint} does not fit --model {name} with options {kwargs}: "
                         f"{str(exc).splitlines()[0]}") from exc
    return model, meta


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

    from fastadv.evaluation import evaluate
    from fastadv.train import distributed as D

    try:
        model, meta = build_model(args)
        data_name = args.data or meta.get("dataset") or "embedded-mnist"
        if data_name not in DATASETS:
            raise ValueError(f"the checkpoint was trained on --dataset {data_name}, which fastadv eval cannot read; "
                             f"give --data (one of {', '.join(DATASETS)})")
        x, y = load_data(data_name, args.data_root, args.split)
        attacks = None
        if args.attacks is not None:
            attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    except (ValueError, OSError, RuntimeError, KeyError, StopIteration) as exc:
        print(f"fastadv eval: {exc}", file=sys.stderr)
        return 2
    want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = D.setup(want)
    device = torch.device(f"cuda:{dist.local_rank}" if dist.distributed and want.startswith("cuda") else want)
    model.to(device)
    try:
        curve = None
        if args.curve:
            curve = "auto" if args.curve == "auto" else [float(v) for v in args.curve.split(",")]
        report = evaluate(model, (x, y), attacks=attacks, version=args.version, eps=args.eps, norm=args.norm,
                          batch_size=args.batch_size, n=args.n, device=device, cascade=not args.no_cascade,
                          curve=curve, checks=not args.no_checks, check_samples=args.check_samples,
                          model_mode=args.model_mode, autocast=args.autocast, state_path=args.resume,
                          out_dir=args.out, progress=not args.no_progress, seed=args.seed)
    except (ValueError, TypeError) as exc:
        print(f"fastadv eval: {exc}", file=sys.stderr)
        D.cleanup()
        return 2
    D.cleanup()
    if not dist.is_main:
        return 3 if report["suspicious"] else 0
    print(f"{report['version']} evaluation, {report['norm']} eps={report['eps']:g}, world size {report['world_size']}")
    print(f"clean accuracy   {report['clean_accuracy']:.2%}  (n={report['n']})")
    for name, r in report["attacks"].items():
        ips = r["images_per_s"]
        print(f"  after {name:<10} {r['robust_accuracy']:.2%}  ({r['time_s']:.1f} s"
              + (f", {ips:.1f} images/s)" if ips else ")"))
    print(f"robust accuracy  {report['robust_accuracy']:.2%}  (worst case over {len(report['attacks'])} attacks, "
          f"eps={report['eps']:g}, {report['norm']})")
    if report["curve"]:
        print("curve: " + ", ".join(f"{c['eps']:.4g}: {c['robust_accuracy']:.1%}" for c in report["curve"]))
    for note in report["notes"]:
        print(f"note: {note}")
    for name, c in report["checks"].items():
        print(f"  check {name:<20} {c['status'].upper():<5} {c['detail']}")
    print(report["verdict"])
    if args.out:
        print(f"wrote {pathlib.Path(args.out) / 'report.json'} and report.md")
    return 3 if report["suspicious"] else 0
