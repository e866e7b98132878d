"""Benchmarks: ``fastadv bench {ops,sinkhorn,attacks,train}``.

``fastadv.bench.harness`` holds the shared timing, bandwidth, environment,
JSON and table functions (its docstring documents the API and the interface
every target module implements); ``fastadv.bench.cli`` is the command.
"""
from fastadv.bench.harness import (  # noqa: F401
    Timing,
    copy_bandwidth,
    environment,
    gbs,
    print_table,
    time_fn,
    write_result,
)

__all__ = ["Timing", "time_fn", "copy_bandwidth", "gbs", "environment", "write_result", "print_table"]
