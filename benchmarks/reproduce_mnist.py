"""Every training method on the embedded MNIST, one budget, one table: docs/reproduction.md's rows.

Runs ``fastadv train`` once per method (sequentially, in subprocesses with the interpreter running
this script), each with the same data, model, optimizer, budget and evaluation, and collects from each
run's summary line: clean accuracy, PGD-40 robust accuracy (the per-epoch check, L-inf, random
start) and the final ``fastadv.evaluate`` robust accuracy (version ``standard``: AutoAttack's APGD-CE,
APGD-T, FAB-T and Square cascade), all at
eps 0.3 on the same held-out images, and the wall time.

    python benchmarks/reproduce_mnist.py                       # all methods, writes the JSON
    python benchmarks/reproduce_mnist.py --only pgd,trades --allow-dirty --no-save

The JSON goes to benchmarks/results/reproduction-mnist-<device>-<date>.json with the commit, the load
average before and after, every command and its parsed result; a dirty tree is refused (the commit
must name the code that produced the numbers) unless ``--allow-dirty``. ``--markdown`` prints the rows
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

# Shared by every run: embedded MNIST, the first 4,000 training images, 2 epochs (80 optimizer steps of batch
# 100), MNIST CNN width 0.5, Adam 1e-3, eps 0.3; evaluation on the same 500 held-out images: PGD-40 (alpha 0.02,
# random start, the per-epoch check) and `fastadv.evaluate` version standard (AutoAttack's). A demonstration
# budget for a 2-core CPU (about 1-5 minutes per method), not the papers' 100-epoch runs; only pgd (and awp on
# pgd) ramp eps over the first 30% of the steps, as `fastadv train`'s default run does.
COMMON = ("--train-samples 4000 --epochs 2 --eps 0.3 --eval-steps 40 --eval-samples 500 --final-eval standard "
          "--final-eval-samples 500 --width 0.5 --threads 1 --no-progress")

# (row name, method flags, what the inner maximization is, the paper's MNIST number where the paper gives one)
RUNS = [
    ("standard", "--method standard", "none", None),
    ("pgd", "--method pgd --steps 10 --alpha 0.04", "PGD-10, eps ramped over 30% of the steps", None),
    ("trades", "--method trades --steps 10 --alpha 0.04 --beta 6", "KL PGD-10", None),
    ("fat", "--method fat --steps 10 --alpha 0.04", "early-stopped PGD-10", None),
    ("fat-trades", "--method fat --fat-trades --steps 10 --alpha 0.04 --beta 6", "early-stopped KL PGD-10", None),
    ("fast", "--method fast", "FGSM-RS, alpha 1.25 eps", None),
    ("free", "--method free --replays 4", "m = 4 replays", None),
    ("ensemble", "--method ensemble --static-models {out}/standard/model.pt", "Step-LL on a static model", None),
    ("iat", "--method iat --steps 10 --alpha 0.04", "PGD-10 + mixup", None),
    ("metric", "--method metric --steps 10 --alpha 0.04", "PGD-10 + triplet", None),
    ("mart", "--method mart --steps 10 --alpha 0.04 --beta 6", "CE PGD-10 from 0.001 N(0, I)", None),
    ("awp", "--method awp", "PGD-10 (ramped) + weight perturbation gamma 0.01", None),
    ("fosc", "--method fosc --steps 10 --alpha 0.04", "PGD-10 stopped at FOSC <= c_t", None),
    ("arub", "--method arub", "none (linearized upper bound, rho = eps)", None),
    ("cost", "--method cost --method-arg protected=[3]", "FGSM on the cost-sensitive loss, class 3 protected",
     None),
    ("jsigr", "--method jsigr --steps 10 --alpha 0.04", "PGD-10 for the mask; Jacobian + selective penalties", None),
    ("dial", "--method dial --steps 10 --alpha 0.04", "CE PGD-10; domain head beta 6, lambda_d 0.1", None),
    # AFD's unit-norm-feature encoder (the default for --method afd) needs the reference's classifier optimizer
    # (SGD 0.1, weight decay 1e-4): under the common Adam 1e-3 it was at 12.6% clean after the 80 steps
    ("afd", "--method afd --steps 10 --alpha 0.04 --optimizer sgd --lr 0.1 --weight-decay 1e-4",
     "APGD-CE 10; critic on unit-norm features", None),
    ("boost", "--method boost --members 2", "MCE PGD-10 on the ensemble; 2 members, 2 epochs each", None),
    ("trs", "--method trs --ensemble-size 2", "TRS: |cos| of input gradients + smoothness PGD; 2 members", None),
    ("preemptive", "--method preemptive --steps 10 --alpha 0.04", "one-step move within delta, then PGD-10", None),
    ("iwd", "--method iwd", "IWD attack: 10 steps within IWD budget 0.05", None),
    # the methods that collapsed to a constant prediction with eps 0.3 from the first step, again with the eps
    # ramp that pgd and awp get (Method.set_eps_warmup; in none of their papers)
    ("mart+ramp", "--method mart --steps 10 --alpha 0.04 --beta 6 --eps-warmup 0.3", "as mart, eps ramped", None),
    ("metric+ramp", "--method metric --steps 10 --alpha 0.04 --eps-warmup 0.3", "as metric, eps ramped", None),
    ("preemptive+ramp", "--method preemptive --steps 10 --alpha 0.04 --eps-warmup 0.3", "as preemptive, eps ramped",
     None),
    ("boost+ramp", "--method boost --members 2 --eps-warmup 0.3", "as boost, eps ramped (per member)", None),
    # preemptive still collapses with the ramp: the reference's ascent step trains at delta + eps = 0.6 from x;
    # the descent step (a targeted move toward y, then the eps attack) does not
    # the papers' MNIST settings on the full MNIST (60k training images; held out: the first 500 test images), cut
    # only in how much of an epoch is run (Madry: ~83 epochs of batch 50; TRADES: 100 epochs of batch 128)
    ("madry-paper", "--dataset mnist --data-dir {data}/mnist --train-samples 3750 --epochs 1 --width 1 --method pgd "
     "--steps 40 --alpha 0.01 --eps-warmup 0 --batch-size 50 --optimizer adam --lr 1e-4 --weight-decay 0",
     "PGD-40 of 0.01, Madry's MNIST setting; 1/16 of an epoch of the full MNIST",
     "Madry: 98.8% clean, PGD-40 93.2%"),
    ("trades-paper", "--dataset mnist --data-dir {data}/mnist --train-samples 3840 --epochs 1 --model small_cnn "
     "--method trades --beta 6 --steps 40 --alpha 0.01 --batch-size 128 --optimizer sgd --lr 0.01 --weight-decay 0",
     "KL PGD-40 of 0.01, TRADES' MNIST setting (SmallCNN, beta 6); 1/16 of an epoch of the full MNIST",
     "TRADES: 99.48% clean, PGD-40 96.07%"),
    ("preemptive-descent+ramp", "--method preemptive --steps 10 --alpha 0.04 --eps-warmup 0.3 "
     "--method-arg direction='descent'", "descent delta move, then PGD-10, eps ramped", None),
]


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def run_one(name, flags, out_root, timeout) -> dict:
    out = out_root / name
    flags = flags.format(out=out_root, data=os.environ.get("FASTADV_TEST_DATA", str(ROOT.parent / "shared" / "data")))
    # mnist_cnn's width multiplier means nothing to TRADES' SmallCNN (fastadv train refuses it there)
    common = COMMON.replace(" --width 0.5", "") if "--model small_cnn" in flags else COMMON
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
    if dirty and not args.allow_dirty:
        print("refusing: the tree has uncommitted changes (commit, or pass --allow-dirty with --no-save)",
              file=sys.stderr)
        return 2
    from fastadv.bench.harness import environment, write_result

    env_before = environment("cpu")
    runs = [r for r in RUNS if not args.only or r[0] in args.only.split(",")]
    rows = []
    for name, flags, inner, paper in runs:
        print(f"[{name}] {flags}", file=sys.stderr, flush=True)
        row = run_one(name, flags, pathlib.Path(args.out), args.timeout)
        row.update(inner=inner, paper=paper)
        rows.append(row)
        print(json.dumps(row)[:400], file=sys.stderr, flush=True)
    payload = {"common": COMMON, "rows": rows, "dirty": dirty, "env_before": env_before,
               "load_after": os.getloadavg()}
    if args.markdown or args.no_save:
        print(markdown(rows))
    if not args.no_save:
        path = write_result("reproduction-mnist", payload)
        print(f"wrote {path}", file=sys.stderr)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
