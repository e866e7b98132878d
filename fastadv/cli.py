"""The ``fastadv`` command line: ``fastadv {bench,eval,train,doctor,info} ...``.

Each subcommand lives in its own module and is imported only when used, so
``fastadv info`` stays fast and never needs optional dependencies.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

# subcommand -> (module, help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "bench": ("fastadv.bench.cli", "benchmarks: ops | sinkhorn | attacks | train | eval"),
    "eval": ("fastadv.evaluate_cli", "robustness evaluation of a model checkpoint"),
    "train": ("fastadv.train.cli", "robust training (default: PGD-AT on the embedded MNIST)"),
    "doctor": ("fastadv.doctor", "checks of this install: --gpu runs the whole GPU validation in one call"),
}


def _info(args) -> int:
    import torch

    import fastadv

    print(json.dumps({"fastadv": fastadv.__version__, "torch": torch.__version__, "backends": fastadv.backends()}, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastadv", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and available backends")
    info.set_defaults(func=_info)
    argv = sys.argv[1:] if argv is None else list(argv)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # import only the module that is used
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
