"""Every training method on the full MNIST, one budget, one table: docs/reproduction.md's rows.

Runs ``fastadv train`` once per method (sequentially, in subprocesses with the interpreter running
this script), each with the same data, model, optimizer, budget and evaluation, and collects from each
run's summary line: clean accuracy, PGD-40 robust accuracy (the per-epoch check, L-inf, random
start) and the final ``fastadv.evaluate`` robust accuracy (version ``standard``: AutoAttack's APGD-CE,
APGD-T, FAB-T and Square cascade), all at
eps 0.3 on the same held-out images, and the wall time.

    python benchmarks/reproduce_mnist.py                       # all methods, writes the JSON
    python benchmarks/reproduce_mnist.py --only pgd,trades --allow-dirty --no-save

The JSON goes to benchmarks/results/reproduction-mnist-<device>-<date>.json with the commit, the load
average before and after, every command and its parsed result (rewritten after every row, with
``complete`` false until the last); a dirty tree is refused (the commit
must name the code that produced the numbers) unless ``--allow-dirty --no-save``. ``--markdown`` prints the rows
for docs/reproduction.md.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Shared by every run: the full MNIST (the four IDX files of ../shared/data/mnist; 60,000 training and 10,000 test
# images), one pass over the first 10,000 training images (100 optimizer steps of batch 100: 1/6 of an epoch of the
# full set; MNIST's training order is not sorted by class), MNIST CNN width 0.5, Adam 1e-3, eps 0.3 ramped over the
# first 30% of the steps for every method that has an eps (the main job's default; without it mart, metric, boost and
# preemptive collapsed to a constant prediction at this budget, commit c87135a's table); evaluation on the first 500
# test images: PGD-40 (alpha 0.02, random start, the per-epoch check) and `fastadv.evaluate` version standard
# (AutoAttack's). A budget a developer can rerun on a 2-core CPU (about 1-6 minutes per method), about 1/600 of the
# papers' 100-epoch runs. The rows that set their own --train-samples/--epochs/--eps-warmup (the papers' settings)
# override these (the later flag wins).
COMMON = ("--dataset mnist --data-dir {data}/mnist --train-samples 10000 --epochs 1 --eps 0.3 --eval-steps 40 "
          "--eval-samples 500 --final-eval standard --final-eval-samples 500 --width 0.5 --threads 1 --no-progress")
RAMP = " --eps-warmup 0.3"  # methods without an eps (standard, trs, iwd) refuse it

# (row name, method flags, what the inner maximization is, the paper's MNIST number where the paper gives one)
RUNS = [
    ("standard", "--method standard", "none", None),
    ("pgd", "--method pgd --steps 10 --alpha 0.04" + RAMP, "PGD-10", None),
    ("trades", "--method trades --steps 10 --alpha 0.04 --beta 6" + RAMP, "KL PGD-10", None),
    ("fat", "--method fat --steps 10 --alpha 0.04" + RAMP, "early-stopped PGD-10", None),
    ("fat-trades", "--method fat --fat-trades --steps 10 --alpha 0.04 --beta 6" + RAMP, "early-stopped KL PGD-10",
     None),
    ("fast", "--method fast" + RAMP, "FGSM-RS, alpha 1.25 eps", None),
    ("free", "--method free --replays 4" + RAMP, "m = 4 replays", None),
    ("ensemble", "--method ensemble --static-models {out}/standard/model.pt" + RAMP, "Step-LL on a static model",
     None),
    ("iat", "--method iat --steps 10 --alpha 0.04" + RAMP, "PGD-10 + mixup", None),
    ("metric", "--method metric --steps 10 --alpha 0.04" + RAMP, "PGD-10 + triplet", None),
    ("mart", "--method mart --steps 10 --alpha 0.04 --beta 6" + RAMP, "CE PGD-10 from 0.001 N(0, I)", None),
    ("awp", "--method awp" + RAMP, "PGD-10 + weight perturbation gamma 0.01", None),
    ("fosc", "--method fosc --steps 10 --alpha 0.04" + RAMP, "PGD-10 stopped at FOSC <= c_t", None),
    ("arub", "--method arub" + RAMP, "none (linearized upper bound, rho = eps)", None),
    ("cost", "--method cost --method-arg protected=[3]" + RAMP,
     "FGSM on the cost-sensitive loss, class 3 protected", None),
    ("jsigr", "--method jsigr --steps 10 --alpha 0.04" + RAMP, "PGD-10 for the mask; Jacobian + selective penalties",
     None),
    ("dial", "--method dial --steps 10 --alpha 0.04" + RAMP, "CE PGD-10; domain head beta 6, lambda_d 0.1", None),
    # AFD's unit-norm-feature encoder (the default for --method afd) needs the reference's classifier optimizer
    # (SGD 0.1, weight decay 1e-4): under the common Adam 1e-3 it was at 12.6% clean after 80 steps (f860ea2)
    ("afd", "--method afd --steps 10 --alpha 0.04 --optimizer sgd --lr 0.1 --weight-decay 1e-4" + RAMP,
     "APGD-CE 10; critic on unit-norm features", None),
    ("boost", "--method boost --members 2" + RAMP, "MCE PGD-10 on the ensemble; 2 members, 1 epoch each", None),
    ("trs", "--method trs --ensemble-size 2", "TRS: |cos| of input gradients + smoothness PGD; 2 members", None),
    # the reference's delta move ascends the loss: it trains at up to delta + eps = 0.6 from x (collapsed at the
    # 80-step budget even with the ramp); the descent move (toward y, then the eps attack) is the row after
    ("preemptive", "--method preemptive --steps 10 --alpha 0.04" + RAMP, "one-step move within delta, then PGD-10",
     None),
    ("preemptive-descent", "--method preemptive --steps 10 --alpha 0.04 --method-arg direction='descent'" + RAMP,
     "descent delta move, then PGD-10", None),
    ("iwd", "--method iwd", "IWD attack: 10 steps within IWD budget 0.05", None),
    # trained against another threat model (the Wasserstein ball): its L-inf numbers say what Wasserstein training
    # gives against L-inf; its own threat model is measured by benchmarks/wasserstein_training.py
    ("wasserstein", "--method wasserstein --eps 2.0661046784",  # the reference's radius (0.1 * 1.4^9), not 0.3
     "Wasserstein PGD-50, the reference's MNIST training attack (radius 0.1 x1.4 every 5 steps to 2.07, lam 1000)",
     "Wong et al.: 97% clean, 86% under the Wasserstein attack at radius 1.0"),
    # the papers' MNIST settings, cut only in how much of an epoch is run (Madry: ~83 epochs of batch 50, no ramp;
    # TRADES: 100 epochs of batch 128)
    ("madry-paper", "--train-samples 3750 --epochs 1 --width 1 --method pgd --steps 40 --alpha 0.01 --eps-warmup 0 "
     "--batch-size 50 --optimizer adam --lr 1e-4 --weight-decay 0",
     "PGD-40 of 0.01, Madry's MNIST setting; 1/16 of an epoch of the full MNIST",
     "Madry: 98.8% clean, PGD-40 93.2%"),
    ("trades-paper", "--train-samples 3840 --epochs 1 --model small_cnn --method trades --beta 6 --steps 40 "
     "--alpha 0.01 --batch-size 128 --optimizer sgd --lr 0.01 --weight-decay 0",
     "KL PGD-40 of 0.01, TRADES' MNIST setting (SmallCNN, beta 6); 1/16 of an epoch of the full MNIST",
     "TRADES: 99.48% clean, PGD-40 96.07%"),
]


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def run_one(name, flags, out_root, timeout) -> dict:
    out = out_root / name
    data = os.environ.get("FASTADV_TEST_DATA", str(ROOT.parent / "shared" / "data"))
    flags = flags.format(out=out_root, data=data)
    common = COMMON.format(data=data)
    # mnist_cnn's width multiplier means nothing to TRADES' SmallCNN (fastadv train refuses it there)
    if "--model small_cnn" in flags:
        common = common.replace(" --width 0.5", "")
    cmd = [sys.executable, "-m", "fastadv.cli", "train", *shlex.split(common), *shlex.split(flags),
           "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wall = time.perf_counter() - t0
    row = {"name": name, "command": "fastadv train " + common + " " + flags, "rc": proc.returncode,
           "wall_s": round(wall, 1)}
    summary = None
    for line in proc.stdout.splitlines():
        if line.startswith("{") and '"method"' in line:
            summary = json.loads(line)
    if proc.returncode != 0 or summary is None:
        row["error"] = (proc.stderr or proc.stdout)[-2000:]
        return row
    fe = summary.get("final_eval") or {}
    row.update(clean=summary.get("clean_acc"), pgd40=summary.get("robust_acc"), eval_standard=fe.get("robust_acc"), eval_attacks=fe.get("attacks"),
               eval_clean=fe.get("clean_acc"), suspicious=fe.get("suspicious"), train_s=summary.get("wall_time_s"))
    return row


def markdown(rows) -> str:
    lines = ["| method | clean | PGD-40 robust, eps 0.3 | `fastadv eval` (standard) robust, eps 0.3 | wall (s) |",
             "|---|---|---|---|---|"]
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | failed (rc {r['rc']}) | | | {r['wall_s']} |")
            continue
        flag = " (checks: suspicious)" if r.get("suspicious") else ""
        lines.append(f"| {r['name']} | {pct(r['clean'])} | {pct(r['pgd40'])} | {pct(r['eval_standard'])}{flag} | "
                     f"{r['wall_s']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated row names")
    p.add_argument("--out", default="runs/reproduce-mnist", help="run folders (default runs/reproduce-mnist)")
    p.add_argument("--allow-dirty", action="store_true")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if dirty and not (args.allow_dirty and args.no_save):
        print("refusing: the tree has uncommitted changes (commit, or pass --allow-dirty with --no-save)",
              file=sys.stderr)
        return 2
    unknown = sorted(set(args.only.split(",")) - {r[0] for r in RUNS}) if args.only else []
    if unknown:
        print(f"--only: no row named {', '.join(unknown)} (rows: {', '.join(r[0] for r in RUNS)})", file=sys.stderr)
        return 2
    from fastadv.bench.harness import environment, write_result

    env_before = environment("cpu")
    runs = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    rows, path = [], None

    def payload():
        return {"common": COMMON, "rows": rows, "dirty": dirty, "env_before": env_before,
                "load_after": os.getloadavg(), "complete": len(rows) == len(runs)}

    for name, flags, inner, paper in runs:
        print(f"[{name}] {flags}", file=sys.stderr, flush=True)
        row = run_one(name, flags, pathlib.Path(args.out), args.timeout)
        row.update(inner=inner, paper=paper)
        rows.append(row)
        print(json.dumps(row)[:400], file=sys.stderr, flush=True)
        if not args.no_save:  # after every row: a run stopped part-way keeps what it measured
            path = write_result("reproduction-mnist", payload(), path=path)
    if args.markdown or args.no_save:
        print(markdown(rows))
    if path is not None:
        print(f"wrote {path}", file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
