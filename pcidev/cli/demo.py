"""``pcidev demo``: a short demonstration through the software host (:mod:`pcidev.demo`)."""

from __future__ import annotations

import argparse

from pcidev import demo
from pcidev.cli._command import CliContext, command

__all__ = ["COMMAND"]


@command("demo", help="run a short demonstration through the software host")
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """Run :func:`pcidev.demo.main` (the edu device migrating between processes)."""
    return demo.main(args, plugin_specs=ctx.plugin_specs)
