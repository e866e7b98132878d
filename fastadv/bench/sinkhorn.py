"""``fastadv bench sinkhorn``: the Wasserstein projection, the Wasserstein attack and batched Sinkhorn.

Cases (issue 3), each backend against the eager reference of the same
algorithm in the same process, on the same inputs, with the same stopping
rule (so "the same accuracy": iterations and residuals are reported beside
the times):

* ``project``: one ``wasserstein_project`` call on 64 x 1 x 28 x 28 (MNIST
  test images) and 64 x 3 x 32 x 32 (the CIFAR-10 subset, or uniform noise
  when absent), kernel sizes 5 and 7, lam = 1000, tol 1e-4, max_iter 200;
  the point projected is the clean image plus a 0.1 sign step.
* ``attack``: one whole ``WassersteinPGD`` batch (a few steps, fixed radius)
  on the same images with a small random CNN, per backend.
* ``sinkhorn``: 64 problems of 784 x 784 (MNIST images as histograms, squared
  grid distance / 27^2 as cost, reg 0.01), ours vs POT's torch backend
  (``ot.sinkhorn2`` in a loop, plain and log-domain, and ``ot.batch`` when
  POT has it), all for the same number of iterations; the row-marginal error
  of every result is reported.

Reference and POT runs are timed once (they take seconds to minutes here);
compiled backends take the median of ``time_fn``.
"""
from __future__ import annotations

import gzip
import pathlib
import sys
import time

import torch

import fastadv
from fastadv.bench import harness
from fastadv.reference import ot as R

COLUMNS = [
    ("case", "case", None),
    ("shape", "shape", None),
    ("k", "k", None),
    ("backend", "backend", None),
    ("ms", "ms", "{:.1f}"),
    ("speedup", "x vs baseline", "{:.1f}"),
    ("iters_mean", "iters mean", "{:.1f}"),
    ("iters_max", "iters max", None),
    ("residual_max", "residual max", "{:.2e}"),
    ("diff_vs_baseline", "max rel diff", "{:.1e}"),
]


def add_arguments(parser) -> None:
    parser.add_argument("--cases", default="project,attack,sinkhorn", help="comma list of project, attack, sinkhorn")
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps per attack batch (default 10)")
    parser.add_argument("--sinkhorn-iters", type=int, default=100, help="iterations for the 784 x 784 problems")


def _log(msg):
    print(f"[bench sinkhorn] {msg}", file=sys.stderr, flush=True)


def _data_root():
    from fastadv.bench.harness import default_results_dir

    here = pathlib.Path(__file__).resolve()
    for cand in (here.parents[3] / "shared" / "data", here.parents[2] / "data", default_results_dir().parents[2] / "shared" / "data"):
        if cand.exists():
            return cand
    return None


def _mnist(n):
    root = _data_root()
    f = root / "mnist" / "t10k-images-idx3-ubyte.gz" if root else None
    if f is None or not f.exists():
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 1, 28, 28, generator=g)
        return x * (x > 0.7), "uniform noise (MNIST not found)"
    import numpy as np

    with gzip.open(f) as fh:
        d = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    return torch.tensor(d[:n] / 255.0, dtype=torch.float32), "MNIST test images"


def _cifar(n):
    root = _data_root()
    f = root / "cifar10-subset" / "cifar10_subset.npz" if root else None
    if f is not None and f.exists():
        import numpy as np

        z = np.load(f)
        key = next(k for k in z.files if z[k].ndim == 4)
        x = torch.tensor(z[key][:n], dtype=torch.float32)
        if x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.max() > 1.5:
            x = x / 255.0
        return x.contiguous(), "CIFAR-10 subset"
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g), "uniform noise (CIFAR subset not found)"


def _backends(args, op):
    want = [b.strip() for b in (args.backends or "").split(",") if b.strip()] or ["cpp", "triton", "cuda"]
    out, notes = [], []
    x = torch.zeros(1, 1, 4, 4, device=args.device)
    for b in want:
        if b == "ref":
            continue
        reasons = fastadv._dispatch.not_supported_reasons(op, b, [x])
        if reasons:
            notes.append(f"{op}: backend {b} skipped: {'; '.join(reasons)}")
        else:
            out.append(b)
    return out, notes


def _time_once(fn):
    t0 = time.perf_counter()
    r = fn()
    return (time.perf_counter() - t0) * 1e3, r


def _project_cases(args, rows, notes):
    from fastadv.ot import _project_impl

    n = 8 if args.quick else 64
    backends, bn = _backends(args, "wasserstein_project")
    notes += bn
    for name, (x0, src), eps in (("mnist", _mnist(n), 0.5), ("cifar", _cifar(n), 0.1)):
        notes.append(f"project/{name}: {src}, eps {eps}, lam 1000, tol 1e-4, max_iter 200")
        g = torch.Generator().manual_seed(2)
        x0 = x0.to(args.device)
        x = (x0 + 0.1 * torch.randn(x0.shape, generator=g).sign().to(args.device)).clamp(0, 1)
        for k in (5, 7):
            kw = dict(kernel_size=k, reg=1000.0, max_iter=200, tol=1e-4)
            _log(f"project {name} k={k}: reference")
            with fastadv.use_backend("ref"):
                ms_ref, ref = _time_once(lambda: _project_impl(x, x0, eps, **kw))
            base = dict(case="project", shape="x".join(map(str, x.shape)), k=k)
            rows.append(dict(base, backend="ref (eager)", ms=ms_ref, speedup=1.0, iters_mean=ref.iterations.float().mean().item(),
                             iters_max=int(ref.iterations.max()), residual_max=ref.residual.max().item(), diff_vs_baseline=0.0))
            for b in backends:
                _log(f"project {name} k={k}: {b}")
                with fastadv.use_backend(b):
                    t = harness.time_fn(lambda: _project_impl(x, x0, eps, **kw), device=args.device, warmup=1,
                                        min_time=args.min_time or (0.5 if args.quick else 3.0), min_runs=3)
                    out = _project_impl(x, x0, eps, **kw)
                diff = ((out.z - ref.z).abs().max() / ref.z.abs().max()).item()
                rows.append(dict(base, backend=b, ms=t.median_ms, iqr_ms=t.iqr_ms, speedup=ms_ref / t.median_ms,
                                 iters_mean=out.iterations.float().mean().item(), iters_max=int(out.iterations.max()),
                                 residual_max=out.residual.max().item(), diff_vs_baseline=diff,
                                 iters_equal_to_ref=bool(torch.equal(out.iterations.cpu(), ref.iterations.cpu()))))


def _small_cnn(ch):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(ch, 16, 4, stride=2, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 4, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(10),
    )


def _attack_cases(args, rows, notes):
    from fastadv.attacks.wasserstein import WassersteinPGD

    n = 8 if args.quick else 64
    steps = 2 if args.quick else args.attack_steps
    backends, _ = _backends(args, "wasserstein_project")
    notes.append(f"attack: {steps} steps, fixed radius (eps_growth=(eps, 1, 1)), random small CNN: every sample runs every step")
    for name, (x0, _src), eps in (("mnist", _mnist(n), 0.5), ("cifar", _cifar(n), 0.1)):
        x0 = x0.to(args.device)
        model = _small_cnn(x0.shape[1]).to(args.device)
        model(x0[:1])
        with torch.no_grad():
            y = model(x0).argmin(1)  # targeted at the least likely class: nobody succeeds early
        for k in (5, 7):
            base = dict(case="attack", shape="x".join(map(str, x0.shape)), k=k)
            times = {}
            for b in ["ref"] + backends:
                atk = WassersteinPGD(model, eps=eps, alpha=0.1, steps=steps, kernel_size=k, reg=1000.0,
                                     eps_growth=(eps, 1.0, 1), sinkhorn_max_iter=200, targeted=True)
                _log(f"attack {name} k={k}: {b}")
                with fastadv.use_backend(b):
                    ms, adv = _time_once(lambda: atk(x0, y))
                times[b] = ms
                rows.append(dict(base, backend="ref (eager)" if b == "ref" else b, ms=ms, speedup=times["ref"] / ms,
                                 images_per_s=n / (ms / 1e3), fooled=int(atk.last_fooled.sum())))


def _sinkhorn_cases(args, rows, notes):
    n = 8 if args.quick else 64
    iters = 20 if args.quick else args.sinkhorn_iters
    x, src = _mnist(n)
    a = x.reshape(n, -1).double() + 1e-6  # POT's plain Sinkhorn divides by the marginals
    a = a / a.sum(1, keepdim=True)
    b = a.roll(1, 0)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    pts = torch.stack([yy.reshape(-1), xx.reshape(-1)], 1).double()
    cost = torch.cdist(pts, pts) ** 2 / 27.0**2
    reg = 0.01
    notes.append(f"sinkhorn: {n} problems 784 x 784 ({src} + 1e-6, renormalized), cost |i-j|^2 / 27^2 shared, reg {reg}, "
                 f"exactly {iters} iterations each (tol 0 / stopThr 0); residual = ||P 1 - a||_1 + ||P^T 1 - b||_1 of the returned plan")
    dtype = torch.float32

    def resid(P, aa):
        # both marginals: POT's last update fixes the rows, ours the columns
        bb = aa.roll(1, 0)
        return ((P.sum(-1) - aa).abs().sum(-1) + (P.sum(-2) - bb).abs().sum(-1)).max().item()

    a32, b32, c32 = a.to(dtype), b.to(dtype), cost.to(dtype)
    base = dict(case="sinkhorn", shape=f"{n}x784x784", k="-")
    try:
        import ot
    except ImportError:
        notes.append("sinkhorn: POT not installed, no baseline")
        ot = None
    results = []
    if ot is not None:
        for method in ("sinkhorn", "sinkhorn_log"):
            _log(f"sinkhorn: POT {method}")

            def pot(method=method):
                return torch.stack([ot.sinkhorn(a32[i], b32[i], c32, reg, method=method, numItermax=iters, stopThr=0.0)
                                    for i in range(n)])

            ms, P = _time_once(pot)
            results.append((f"POT torch {method} (loop)", ms, P))
        if hasattr(ot, "batch") and hasattr(ot.batch, "solve_batch"):
            _log("sinkhorn: POT batch log_sinkhorn")
            try:
                ms, res = _time_once(lambda: ot.batch.solve_batch(M=c32.expand(n, -1, -1), reg=reg, a=a32, b=b32,
                                                                   max_iter=iters, tol=0.0, method="log_sinkhorn",
                                                                   reg_type="entropy", grad="detach"))
                results.append(("POT torch ot.batch log_sinkhorn", ms, res.plan))
            except Exception as exc:  # API differences between POT versions
                notes.append(f"sinkhorn: ot.batch.solve_batch failed: {type(exc).__name__}: {exc}")
    baseline = results[0][1] if results else None
    for label, ms, P in results:
        rows.append(dict(base, backend=label, ms=ms, speedup=(baseline / ms), residual_max=resid(P.double(), a), iters_mean=iters))
    for bk in ["ref"] + _backends(args, "sinkhorn")[0]:
        _log(f"sinkhorn: ours {bk}")
        with fastadv.use_backend(bk):
            fn = lambda: fastadv.ops.sinkhorn(a32, b32, c32, reg, max_iter=iters, tol=0.0, return_potentials=True)  # noqa: E731
            if bk == "ref":
                ms, (v, (f, g)) = _time_once(fn)
            else:
                ms = harness.time_fn(fn, warmup=1, min_time=args.min_time or 1.0, min_runs=3).median_ms
                v, (f, g) = fn()
        P = R.sinkhorn_plan(a, b, cost, reg, f.double(), g.double())
        rows.append(dict(base, backend=f"fastadv {bk}", ms=ms, speedup=(baseline / ms) if baseline else None,
                         residual_max=resid(P, a), iters_mean=iters))


def run(args) -> dict:
    cases = [c.strip() for c in getattr(args, "cases", "project,attack,sinkhorn").split(",")]
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    rows, notes = [], []
    torch.manual_seed(0)
    if "project" in cases:
        _project_cases(args, rows, notes)
    if "attack" in cases:
        _attack_cases(args, rows, notes)
    if "sinkhorn" in cases:
        _sinkhorn_cases(args, rows, notes)
    notes.append("speedup: time of the first row of the same case/shape/k (the eager reference, or POT's plain Sinkhorn) / this row")
    return {"rows": rows, "columns": COLUMNS + [("images_per_s", "img/s", "{:.1f}")], "notes": notes}


def main(argv=None) -> int:
    from fastadv.bench import cli

    return cli.main(["sinkhorn", *(argv or [])])
