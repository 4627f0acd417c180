"""A BAR made of sub-regions, each answered by its own handler.

Some devices lay out one BAR as several independent structures: virtio-pci puts its
common configuration, ISR status, device configuration and notification area each
at its own offset of one memory BAR, NVMe a register block and a doorbell array.
:class:`RegionMap` is a :class:`~pcidev.bar.BarHandler` that dispatches each access
to the region containing it, with offsets relative to the region::

    regions = RegionMap(0x4000, name="virtio-bar4")
    regions.add("common", 0x0000, 0x1000, common_cfg)        # a RegisterMap, say
    regions.add("notify", 0x3000, 0x1000, CallbackHandler(on_notify))
    dev.add_mem_bar(4, 0x4000, regions, bits64=True)

An access outside every region, or straddling two, reads 0 and ignores the write
(with a rate-limited log line), as an unassigned register of a
:class:`~pcidev.bar.RegisterMap` does. :meth:`RegionMap.reset` resets every region
whose handler has a ``reset()`` (a :class:`~pcidev.device.PciDevice` resets its BAR
handlers at every function reset). MSI-X tables placed in the same BAR stay the
framework's: they are dispatched before the BAR's handler is asked.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterator

import attrs

from pcidev.bar import BarHandler
from pcidev.errors import ConfigError
from pcidev.ratelog import RateLimitedLog

__all__ = ["Region", "RegionMap"]

log = logging.getLogger(__name__)


@attrs.frozen
class Region:
    """One sub-region of a :class:`RegionMap`.

    :param name: unique name (for logs and lookups).
    :param offset: first byte in the BAR.
    :param size: bytes (at least 1).
    :param handler: what answers accesses, with offsets relative to ``offset``.
    """

    name: str
    offset: int
    size: int
    handler: BarHandler

    @property
    def end(self) -> int:
        """The offset just past the region."""
        return self.offset + self.size


class RegionMap:
    """A BAR handler dispatching to non-overlapping sub-regions.

    :param size: the BAR's size.
    :param name: used in log lines.
    """

    def __init__(self, size: int, *, name: str = "") -> None:
        if size <= 0:
            raise ConfigError(f"region map size {size} must be positive")
        self.size = size
        self.name = name
        self._regions: list[Region] = []
        self._starts: list[int] = []
        self._unassigned_log = RateLimitedLog(log)

    def add(self, name: str, offset: int, size: int, handler: BarHandler) -> Region:
        """Add a region; it may not overlap another one or leave the BAR.

        :param name: unique name.
        :param offset: first byte in the BAR.
        :param size: bytes.
        :param handler: answers accesses at offsets relative to ``offset``.
        :returns: the region.
        :raises ConfigError: a bad, overlapping or duplicate region.
        """
        if size <= 0 or offset < 0 or offset + size > self.size:
            raise ConfigError(f"region {name} at {offset:#x}+{size:#x} is outside the {self.size:#x}-byte map")
        if any(r.name == name for r in self._regions):
            raise ConfigError(f"duplicate region name {name}")
        i = bisect.bisect_left(self._starts, offset)
        if (i < len(self._regions) and self._regions[i].offset < offset + size) or (
                i > 0 and self._regions[i - 1].end > offset):
            raise ConfigError(f"region {name} overlaps another region")
        region = Region(name, offset, size, handler)
        self._regions.insert(i, region)
        self._starts.insert(i, offset)
        return region

    def __getitem__(self, name: str) -> Region:
        for region in self._regions:
            if region.name == name:
                return region
        raise KeyError(name)

    def __iter__(self) -> Iterator[Region]:
        return iter(self._regions)

    def find(self, offset: int, size: int) -> Region | None:
        """The region holding all of ``[offset, offset+size)``, or None."""
        i = bisect.bisect_right(self._starts, offset) - 1
        if i < 0:
            return None
        region = self._regions[i]
        return region if offset + size <= region.end else None

    def _unassigned(self, what: str, offset: int, size: int) -> None:
        self._unassigned_log("%s: %s of %d bytes at %#x is outside every region", self.name or "bar", what, size,
                             offset)

    def read(self, offset: int, size: int) -> int:
        region = self.find(offset, size)
        if region is None:
            self._unassigned("read", offset, size)
            return 0
        return region.handler.read(offset - region.offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        region = self.find(offset, size)
        if region is None:
            self._unassigned("write", offset, size)
            return
        region.handler.write(offset - region.offset, size, value)

    def reset(self) -> None:
        """Reset every region whose handler has a ``reset()`` method."""
        for region in self._regions:
            reset = getattr(region.handler, "reset", None)
            if callable(reset):
                reset()
