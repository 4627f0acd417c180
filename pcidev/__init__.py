"""pcidev: emulated PCIe devices as Python plugins."""

from __future__ import annotations

__version__ = "0.1.0"

from pcidev.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
