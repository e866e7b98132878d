"""The Wasserstein projection against a port of the public reference code (issue 10's CPU target: >= 20x).

Case: 64 MNIST test images (1 x 28 x 28; uniform noise when MNIST is absent),
the point projected is the clean image plus a 0.1 sign step (clamped to
[0, 1]), radius 0.5, 5 x 5 windows, p = 2, lam = 1000, float32.

* baseline: ``benchmarks/ps_projection.public_projected_sinkhorn``, the port of
  locuslab/projected_sinkhorn's ``projected_sinkhorn`` with ``maxiters=400``
  (what their ``pgd.attack`` passes: sinkhorn_maxiters=400); it stops
  batch-wide on its own objective test;
* ours: ``fastadv.ops.wasserstein_project`` on the C++ backend (``--backend``),
  ``max_iter=200, tol=1e-4``, each image stopping on its own residual test;
  with ``--box`` also ``upper=1.0`` (the projection onto ball and box: no clamp
  needed; the port has no such option).

Both run in the same process on the same inputs, interleaved (baseline, ours,
baseline, ours, ...) so that load on a shared machine hits both alike; the
table gives the min and the median of ``--repeats`` timed runs of each after
one warm-up, and the ratios of the mins and of the medians. Accuracy is
reported beside the times: the largest deviation of each result from a
converged solution of the same problem (fastadv float64, tol 1e-10), relative
to its max, and the iteration counts (the port's is batch-wide).

    OMP_NUM_THREADS=1 python benchmarks/wasserstein_projection.py            # 1 thread
    python benchmarks/wasserstein_projection.py --threads 2 --repeats 7 --box
    python benchmarks/wasserstein_projection.py --save   # JSON to benchmarks/results/

Run it on a quiet machine (the stamp records the load average): the port's
time is dominated by many small eager ops and Python-side syncs, ours by
vectorized exps, so load does not scale the two alike.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fastadv  # noqa: E402
from fastadv.bench import harness  # noqa: E402
from fastadv.bench.sinkhorn import _mnist  # noqa: E402
from fastadv.ot import _project_impl  # noqa: E402
from ps_projection import public_cost, public_projected_sinkhorn  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=64, help="images (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads for both (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved (default 5)")
    ap.add_argument("--backend", default="cpp", help="fastadv backend (default cpp)")
    ap.add_argument("--port-maxiters", type=int, default=400, help="the port's maxiters (default 400, their pgd.attack)")
    ap.add_argument("--box", action="store_true", help="also time ours with upper=1.0")
    ap.add_argument("--save", action="store_true", help="write JSON to benchmarks/results/")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    x0, src = _mnist(args.n)
    g = torch.Generator().manual_seed(2)
    x = (x0 + 0.1 * torch.randn(x0.shape, generator=g).sign()).clamp(0, 1)
    eps, lam, k = 0.5, 1000.0, 5
    mass = x0.sum((1, 2, 3), keepdim=True)
    cost = public_cost(k)
    eps_b = torch.full((args.n,), eps)

    def port():
        z, it = public_projected_sinkhorn(x0 / mass, x / mass, cost, eps_b, lam, maxiters=args.port_maxiters,
                                          return_iterations=True)
        return z * mass, torch.full((args.n,), it)

    def ours(upper=None):
        with fastadv.use_backend(args.backend):
            r = _project_impl(x, x0, eps, kernel_size=k, reg=lam, max_iter=200, tol=1e-4, upper=upper)
        return r.z, r.iterations

    cases = {"port (public reference)": port, f"fastadv {args.backend}": ours}
    if args.box:
        cases[f"fastadv {args.backend} upper=1"] = lambda: ours(1.0)
    with fastadv.use_backend(args.backend):
        gt = _project_impl(x.double(), x0.double(), eps, kernel_size=k, reg=lam, max_iter=20000, tol=1e-10)
        gt_box = _project_impl(x.double(), x0.double(), eps, kernel_size=k, reg=lam, max_iter=20000, tol=1e-10, upper=1.0)
    times = {name: [] for name in cases}
    results = {name: fn() for name, fn in cases.items()}  # warm-up, and the results compared below
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    base = "port (public reference)"
    rows = []
    for name in cases:
        z, it = results[name]
        ref = gt_box if name.endswith("upper=1") else gt
        dev = ((z.double() - ref.z).abs().max() / ref.z.abs().max()).item()
        t = times[name]
        rows.append(dict(impl=name, min_ms=min(t), median_ms=statistics.median(t),
                         x_min=min(times[base]) / min(t), x_median=statistics.median(times[base]) / statistics.median(t),
                         iters_mean=it.float().mean().item(), iters_max=int(it.max()), dev_vs_converged=dev))
    cols = [("impl", "impl", None), ("min_ms", "min ms", "{:.1f}"), ("median_ms", "median ms", "{:.1f}"),
            ("x_min", "x (mins)", "{:.1f}"), ("x_median", "x (medians)", "{:.1f}"), ("iters_mean", "iters mean", "{:.1f}"),
            ("iters_max", "iters max", None), ("dev_vs_converged", "max rel dev", "{:.1e}")]
    env = harness.environment("cpu")
    print(f"{args.n}x1x28x28 ({src}), k {k}, lam {lam:g}, eps {eps}, float32, {args.threads} thread(s), "
          f"{args.repeats} interleaved repeats; load average {env.get('loadavg')}")
    harness.print_table(rows, cols)
    if args.save:
        payload = dict(rows=rows, columns=cols, device="cpu", environment=env,
                       notes=[f"input: {src}", f"threads {args.threads}", f"repeats {args.repeats} (interleaved)",
                              "dev: max |z - z*| / max |z*|, z* = fastadv float64 at tol 1e-10 (with the box for upper=1)"])
        print("wrote", harness.write_result("wasserstein-projection", payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
