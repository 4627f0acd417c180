"""``pcidev demo``: a short demonstration through the software host (:mod:`pcidev.demo`)."""

from __future__ import annotations

import argparse
import importlib

from pcidev.cli._command import CliContext, command
from pcidev.errors import PcidevError

__all__ = ["COMMAND"]


@command("demo", help="run a short demonstration through the software host")
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """Run :func:`pcidev.demo.main` (imported on use: it pulls in the NVMe plugin)."""
    try:
        demo = importlib.import_module("pcidev.demo")
    except ModuleNotFoundError as exc:
        if exc.name == "pcidev.demo":
            raise PcidevError("the demo is not available in this version of pcidev") from exc
        raise
    # pcidev.demo is imported by name, so its main() is untyped here
    status: int | None = demo.main(args)
    return status
