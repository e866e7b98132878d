"""``fastadv bench [ops|sinkhorn|attacks|train] [options]``.

With no target, runs ``ops`` on its built-in shapes. Each target is a module
``fastadv.bench.<target>`` implementing ``add_arguments(parser)`` (optional)
and ``run(args) -> dict`` (the interface is documented in
``fastadv.bench.harness``); it is imported only when used. This module adds
the common options, prints the target's notes and table, stamps the
environment and writes the JSON under ``benchmarks/results/``.

Examples::

    fastadv bench                         # = fastadv bench ops
    fastadv bench ops --quick --no-save   # smoke test, a few seconds
    OMP_NUM_THREADS=2 fastadv bench ops --backends cpp,ref --out /tmp/res
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

TARGETS = {
    "ops": "fused Lp steps and projections vs the eager reference and torch.compile (issue 2)",
    "sinkhorn": "batched Sinkhorn projection and Wasserstein attack (issue 3)",
    "attacks": "PGD attack engine vs torchattacks and the model's floor (issue 4)",
    "train": "adversarial training images/s vs an eager recipe (issue 5)",
    "eval": "fastadv.evaluate(version='standard') vs AutoAttack's standard version from torchattacks (issue 8)",
}
DEFAULT_TARGET = "ops"


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every target shares (targets must not add these again)."""
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats: a smoke test in seconds")
    p.add_argument("--backends", default=None, help="comma list of backends to time (default: every available one)")
    p.add_argument("--dtype", default=None, help="comma list of dtypes, e.g. float32,bfloat16 (default: the target's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed runs per case (default: the target's)")
    p.add_argument("--out", default=None, help="folder for the JSON result (default: benchmarks/results/)")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no JSON")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write the JSON even from a tree with uncommitted changes (marked -dirty)")


def _module_name(target: str) -> str:
    return f"fastadv.bench.{target}"


def _load(target: str):
    name = _module_name(target)
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


class _TargetParser(argparse.ArgumentParser):
    """A target's subparser that imports the target module only when it is used.

    argparse hands the arguments after the target name to this parser's
    parse_known_args, so ``fastadv bench ops`` never imports the attacks or
    train modules (and a broken one cannot break the others).
    """

    def __init__(self, *a, target: str = "", **kw):
        super().__init__(*a, **kw)
        self._target = target
        self._loaded = False

    def _load_target(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            mod = _load(self._target)
        except Exception as exc:  # reported by run(): a broken target must not hide the others
            self.set_defaults(_load_error=f"{type(exc).__name__}: {exc}")
            return
        if mod is not None and hasattr(mod, "add_arguments"):
            mod.add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        self._load_target()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._load_target()
        return super().format_help()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Called by ``fastadv.cli`` for ``fastadv bench``: one lazily loaded subparser per target."""
    sub = parser.add_subparsers(dest="target", metavar="{" + ",".join(TARGETS) + "}", parser_class=_TargetParser)
    for target, help_text in TARGETS.items():
        p = sub.add_parser(target, help=help_text, description=help_text, target=target)
        add_common_arguments(p)
    # With no target, `fastadv bench` runs ops: the bare parser takes ops' options too.
    add_common_arguments(parser)
    ops = _load(DEFAULT_TARGET)
    if ops is not None and hasattr(ops, "add_arguments"):
        ops.add_arguments(parser)
    parser.set_defaults(target=None)


def run(args: argparse.Namespace) -> int:
    """Run the chosen target, print its table, write its JSON; exit status 0 on success."""
    from fastadv.bench import harness

    target = args.target or DEFAULT_TARGET
    if getattr(args, "_load_error", None):
        print(f"fastadv bench {target}: importing {_module_name(target)} failed: {args._load_error}", file=sys.stderr)
        return 2
    mod = _load(target)
    if mod is None or not hasattr(mod, "run"):
        print(
            f"fastadv bench {target}: not available in this install ({_module_name(target)} "
            f"{'is missing' if mod is None else 'has no run(args)'}). Available: "
            + ", ".join(t for t in TARGETS if importlib.util.find_spec(_module_name(t)) is not None),
            file=sys.stderr,
        )
        return 2
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    commit = harness._git_commit()
    # benchmarks/results/ holds the committed results: only from a committed tree. Elsewhere (--out) the JSON
    # is written with its commit marked -dirty.
    if not args.no_save and args.out is None and commit and commit.endswith("-dirty") and not args.allow_dirty:
        print(f"fastadv bench {target}: the tree has uncommitted changes ({commit}); results come from a committed "
              "tree: commit first, or pass --no-save (print only) or --allow-dirty (the JSON is marked dirty)",
              file=sys.stderr)
        return 2
    env_before = harness.environment(args.device)  # the stamp of the tree and machine the run started on
    payload = mod.run(args)
    if not isinstance(payload, dict) or "rows" not in payload:
        print(f"fastadv bench {target}: run(args) must return a dict with 'rows'", file=sys.stderr)
        return 2
    payload.setdefault("target", target)
    payload.setdefault("device", args.device)
    payload.setdefault("quick", bool(args.quick))
    if "environment" not in payload:
        payload["environment"] = env_before
        after = harness.environment(args.device)
        payload["environment"]["loadavg_after"] = after.get("loadavg")
        if after.get("git_commit") != env_before.get("git_commit"):
            payload.setdefault("notes", []).append(f"the tree changed during the run ({env_before.get('git_commit')} "
                                                   f"-> {after.get('git_commit')})")
    env = payload["environment"]
    print(
        f"# fastadv bench {target}: {env['device_name']}, torch {env['torch']}, "
        f"{env['torch_num_threads']} threads, load {', '.join(f'{v:.2f}' for v in env.get('loadavg') or [])}"
    )
    warning = harness.load_warning(env)
    if warning and warning not in payload.setdefault("notes", []):
        payload["notes"].insert(0, warning)
    for note in payload.get("notes", []):
        print(f"# note: {note}")
    columns = payload.get("columns") or sorted({k for r in payload["rows"] for k in r})
    harness.print_table(payload["rows"], columns)
    if not args.no_save:
        path = harness.write_result(target, payload, args.out)
        print(f"# wrote {path}")
    return 0


def main(argv=None) -> int:
    """``python -m fastadv.bench.cli ...`` (same as ``fastadv bench ...``)."""
    parser = argparse.ArgumentParser(prog="fastadv bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
