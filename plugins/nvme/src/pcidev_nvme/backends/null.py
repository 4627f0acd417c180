"""The ``null`` backend: reads return zeros, writes are discarded (``null:size=1G``). Fast."""

from __future__ import annotations

from typing import Any

import attrs

from pcidev.properties import Size
from pcidev_nvme.backends.base import BaseBackend, size_field, take_options, zero_views

__all__ = ["NullBackend", "NullConfig", "make_null"]


@attrs.define(kw_only=True)
class NullConfig:
    """Options of the ``null`` backend."""

    size: Size = size_field(required=True)


class NullBackend(BaseBackend):
    """Reads zeros, discards writes; nothing is ever allocated."""

    kind = "null"
    inline = True

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill the views with zeros."""
        zero_views(views)

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Discard."""

    def write_zeroes(self, offset: int, length: int) -> None:
        """Nothing to do."""

    def deallocate(self, offset: int, length: int) -> None:
        """Nothing to do."""

    def allocated_bytes(self) -> int:
        """Always 0."""
        return 0


def make_null(options: dict[str, Any]) -> NullBackend:
    """The ``null`` factory: takes ``size`` from ``options``."""
    return NullBackend(take_options(NullConfig, options, what="null backend").size)
