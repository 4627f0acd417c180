"""``pcidev fuzz TARGET --seconds N``: fuzz a device, transport or stream.

Targets are the framework's own and those plugins register as components of kind
``fuzz-target`` (see :mod:`pcidev.testing.fuzz`); ``pcidev fuzz --list`` lists them.
The default engine is libFuzzer through atheris (coverage-guided; install the
``fuzz`` extra: ``pip install 'pcidev[fuzz]'``); ``--engine random`` mutates inputs
at random without coverage and needs nothing extra. The run prints executions,
exec/s, coverage (libFuzzer's ``cov`` edges and ``ft`` features) and one line per
distinct finding, whose input is saved under ``--findings``. The exit status is 1
when something was found.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pcidev.cli._command import CliContext, UsageError, command
from pcidev.testing.fuzz.catalogue import make_target, target_factories
from pcidev.testing.fuzz.engine import run_atheris, run_random

__all__ = ["COMMAND"]


#: the longest ``--seconds`` (a week): ``inf`` or ``nan`` would run forever or not at all
MAX_SECONDS = 7 * 86400.0
#: most fuzzing processes one run starts
MAX_JOBS = 64

def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="the target to fuzz (see --list)")
    parser.add_argument("--list", action="store_true", help="list the targets and their invariants")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="corpus directory to start from and (atheris) add to (default: the target's seeds)")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings"),
                        help="where inputs that broke an invariant are saved (default ./fuzz-findings)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="fuzzing processes at once, sharing the corpus (atheris only; 1-64, default 1)")
    parser.add_argument("--engine", choices=("atheris", "random"), default="atheris",
                        help="atheris: coverage-guided (the fuzz extra); random: no coverage, nothing to install")
    parser.add_argument("--seed", type=int, default=None, help="random seed of the engine")


@command("fuzz", help="fuzz a device, transport or stream (pcidev fuzz TARGET --seconds N)", configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """List the targets, or fuzz one and print the figures and findings."""
    factories = target_factories(ctx.registry)
    if args.list or args.target is None:
        for name, factory in factories.items():
            summary = getattr(factory, "summary", "") or ""
            invariants = getattr(factory, "invariants", ()) or ()
            print(f"{name:14s} {summary}".rstrip())
            if invariants:
                print(f"{'':14s} invariants: {'; '.join(invariants)}")
        return 0
    if not 0 < args.seconds <= MAX_SECONDS:
        raise UsageError(f"--seconds {args.seconds:g}: must be above 0 and at most {MAX_SECONDS:g} (a week)")
    if args.corpus is not None and not args.corpus.is_dir():
        raise UsageError(f"--corpus {args.corpus}: not a directory")
    if not 1 <= args.jobs <= MAX_JOBS:
        raise UsageError(f"--jobs must be from 1 to {MAX_JOBS}")
    if args.engine == "random":
        if args.jobs != 1:
            raise UsageError("--jobs needs --engine atheris")
        report = run_random(make_target(ctx.registry, args.target), seconds=args.seconds, corpus=args.corpus,
                            findings=args.findings, seed=args.seed)
    else:
        make_target(ctx.registry, args.target)  # an unknown name is one error line, before the child starts
        report = run_atheris(args.target, seconds=args.seconds, corpus=args.corpus, findings=args.findings,
                             jobs=args.jobs, plugin_specs=ctx.plugin_specs, seed=args.seed)
    for line in report.lines():
        print(line)
    if report.findings:
        return 1
    return 0 if report.interrupted is None else 128 + report.interrupted
