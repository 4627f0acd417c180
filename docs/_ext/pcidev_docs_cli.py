"""The ``pcidev`` argument parser for sphinx-argparse (docs/cli.rst)."""

from __future__ import annotations

import argparse

from pcidev.cli import build_parser
from pcidev.plugins import make_plugin_manager


def parser() -> argparse.ArgumentParser:
    """The full parser of ``pcidev`` with the installed plugins' options.

    :returns: the parser that ``pcidev`` itself builds.
    """
    return build_parser(make_plugin_manager())
