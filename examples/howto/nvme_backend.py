"""A namespace backend for the NVMe plugin: ``sparse``, the how-to "Write an NVMe namespace backend".

``ns=sparse:size=1G`` keeps the namespace's data in memory, 4 KiB chunk by chunk, allocated
on the first write: a namespace reports only what was written as in use (NUSE), Dataset
Management's deallocate frees chunks, and unwritten blocks read as zeros.  Load it as a
plugin: ``PYTHONPATH=examples/howto pcidev -p nvme_backend serve --vfio-user SOCK
nvme,ns=sparse:size=1G``; an installed plugin registers it from its entry point instead.
"""

from __future__ import annotations

from typing import Any

import attrs

from pcidev import hookimpl
from pcidev.properties import Size
from pcidev.registry import DeviceRegistry
from pcidev_nvme.backends import BaseBackend, add_backend, take_options
from pcidev_nvme.backends.base import size_field

CHUNK = 4096
_ZERO = bytes(CHUNK)


# [options]
@attrs.define(kw_only=True)
class SparseConfig:
    """Options of the ``sparse`` backend (``ns=sparse:size=64M``)."""

    size: Size = size_field(required=True)  # a multiple of 4096, checked
    max_chunks: int | None = attrs.field(default=None, metadata={
        "help": "refuse writes that would allocate more chunks than this (ENOSPC)"})
# [end options]


# [backend]
class SparseBackend(BaseBackend):
    """Namespace data in a dictionary of 4 KiB chunks, allocated on first write."""

    kind = "sparse"
    inline = True  # never blocks: the I/O command set calls it on the submitting thread

    def __init__(self, cfg: SparseConfig) -> None:
        super().__init__(cfg.size)
        self.max_chunks = cfg.max_chunks
        self.chunks: dict[int, bytearray] = {}

    def _pieces(self, offset: int, length: int) -> Any:
        """``(chunk index, offset in chunk, length)`` covering ``[offset, offset + length)``."""
        while length:
            index, start = divmod(offset, CHUNK)
            n = min(CHUNK - start, length)
            yield index, start, n
            offset += n
            length -= n

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Fill each view from the chunks; chunks never written read as zeros."""
        for view in views:
            pos = 0
            for index, start, n in self._pieces(offset, len(view)):
                chunk = self.chunks.get(index)
                view[pos:pos + n] = chunk[start:start + n] if chunk is not None else _ZERO[:n]
                pos += n
            offset += len(view)

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Copy each view into its chunks (memory: ``fua`` needs nothing more)."""
        new = {i for view_offset, view in self._spans(views, offset)
               for i, _s, _n in self._pieces(view_offset, len(view)) if i not in self.chunks}
        if self.max_chunks is not None and len(self.chunks) + len(new) > self.max_chunks:
            raise OSError(28, "sparse backend: no chunk left")  # ENOSPC: Capacity Exceeded
        for view_offset, view in self._spans(views, offset):
            pos = 0
            for index, start, n in self._pieces(view_offset, len(view)):
                chunk = self.chunks.setdefault(index, bytearray(CHUNK))
                chunk[start:start + n] = view[pos:pos + n]
                pos += n

    @staticmethod
    def _spans(views: list[memoryview], offset: int) -> list[tuple[int, memoryview]]:
        spans = []
        for view in views:
            spans.append((offset, view))
            offset += len(view)
        return spans

    def deallocate(self, offset: int, length: int) -> None:
        """Free whole chunks in the range; zero the partial ones at its ends."""
        for index, start, n in self._pieces(offset, length):
            if n == CHUNK:
                self.chunks.pop(index, None)
            elif index in self.chunks:
                self.chunks[index][start:start + n] = _ZERO[:n]

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zeros read back from freed chunks, so this is a deallocate."""
        self.deallocate(offset, length)

    def allocated_bytes(self) -> int:
        """What the namespace reports as in use."""
        return len(self.chunks) * CHUNK

    def close(self) -> None:
        """Drop the data."""
        self.chunks.clear()
# [end backend]


# [registration]
def make_sparse(options: dict[str, Any]) -> SparseBackend:
    """The factory: takes (removes) the options it knows from ``options``."""
    return SparseBackend(take_options(SparseConfig, options, what="sparse backend"))


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Make ``ns=sparse:...`` known to every NVMe controller the registry creates."""
    add_backend(registry, "sparse", make_sparse)
# [end registration]
