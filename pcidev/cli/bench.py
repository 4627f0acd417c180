"""``pcidev bench NAME``: run a benchmark a plugin provides.

Benchmarks are registry components of kind ``bench``: ``run(argv) -> exit status``.
A plugin registers one with ``registry.add_component("bench", "nvme", run)``;
``run`` gets the arguments after the name and parses them itself.
"""

from __future__ import annotations

import argparse

from pcidev.cli._command import CliContext, command
from pcidev.errors import PluginError

__all__ = ["BENCH_KIND", "COMMAND"]

#: Registry component kind of benchmarks (``pcidev bench NAME``).
BENCH_KIND = "bench"


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", help="the benchmark (omit to list them)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                        help="the benchmark's own options (e.g. --json)")


@command("bench", help="run a benchmark a plugin provides (pcidev bench NAME [--json])", configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """List the benchmarks, or run one with its own arguments."""
    entries = ctx.registry.components(BENCH_KIND)
    if args.name is None:
        if not entries:
            print("no benchmarks available")
        for entry in entries:
            doc = (getattr(entry.obj, "__doc__", None) or "").strip().splitlines()
            print(f"{entry.name:12s} {doc[0] if doc else ''}".rstrip())
        return 0
    run = ctx.registry.component(BENCH_KIND, args.name)
    if not callable(run):
        raise PluginError(f"bench component {args.name!r} is not callable: {run!r}")
    status: int | None = run(list(args.bench_args))  # a benchmark returns its exit status
    return status
