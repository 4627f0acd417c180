"""The controller's DMA view while it has controller memory space: guest memory, with the
addresses of its Controller Memory Buffer (:mod:`pcidev_nvme.cmb`) and Persistent Memory
Region (:mod:`pcidev_nvme.pmr`) sent to their own memory.

Each of them, while its controller memory space is enabled (CMBMSC.CMSE / PMRMSCL.CMSE),
is a :class:`MemoryWindow`: ``[start, end)`` at the base address the host gave (CBA),
mapped by a private :class:`~pcidev.dma.GuestMemory` over the RAM BAR's descriptor. The
controller composes the windows into one :class:`ControllerMemoryView`, which its
``dma`` property returns instead of guest memory (without windows it returns guest
memory itself: one comparison on the hot path).

**Mixing rule** (as QEMU's): the data buffer of one command is either wholly in
controller memory or wholly in host memory; a PRP or SGL data pointer that mixes the two,
or one piece that straddles a window's edge, fails with Invalid Use of Controller Memory
Buffer (00h/12h, DNR). PRP lists and SGL segments may be in either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from pcidev.dma import GuestMemory
from pcidev.errors import DmaError
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["ControllerMemoryView", "MemoryWindow", "map_window", "invalid_use"]


def invalid_use(what: str) -> NvmeStatusError:
    """Invalid Use of Controller Memory Buffer (DNR)."""
    return NvmeStatusError(Status.INVALID_USE_OF_CMB, what, dnr=True)


@attrs.frozen
class MemoryWindow:
    """Controller memory at bus addresses ``[start, end)``.

    :ivar name: ``"CMB"`` or ``"PMR"`` (for messages).
    :ivar start: the base address the host gave (CBA).
    :ivar end: one past the last address.
    :ivar memory: maps the window at ``start``.
    """

    name: str
    start: int
    end: int
    memory: GuestMemory

    def overlaps(self, base: int, length: int) -> bool:
        """Whether ``[base, base + length)`` touches the window."""
        return base < self.end and base + length > self.start


def map_window(name: str, start: int, size: int, fd: int) -> MemoryWindow:
    """A window of ``size`` bytes of ``fd`` at ``start``.

    :raises DmaError: the kernel refused the mapping.
    """
    mem = GuestMemory(max_regions=1)
    mem.map(start, size, fd, 0, writable=True, name=f"nvme-{name.lower()}")
    return MemoryWindow(name, start, start + size, mem)


def close_window(window: MemoryWindow | None) -> None:
    """Unmap a window (views still alive keep their mapping)."""
    if window is not None:
        try:
            window.memory.close()
        except DmaError:
            pass


class ControllerMemoryView(GuestMemory):
    """Guest memory with controller memory windows (see the module docstring).

    A :class:`~pcidev.dma.GuestMemory` for the data path (``read``, ``write``, ``views``,
    ``sg_views``, ``access``, ``load32``...) that maps nothing itself: each access goes
    to :attr:`host` or to the window holding it.

    :param windows: the windows (disjoint).
    """

    def __init__(self, windows: Sequence[MemoryWindow]) -> None:
        super().__init__(max_regions=1)
        self.windows = tuple(windows)
        self.host: GuestMemory = self  # set by over() before any use

    def over(self, host: GuestMemory) -> ControllerMemoryView:
        """This view on top of ``host`` (the device's guest memory now)."""
        if self.host is not host:
            self.host = host
        return self

    def window_of(self, gpa: int) -> MemoryWindow | None:
        """The window holding ``gpa``, or None (host memory)."""
        for w in self.windows:
            if w.start <= gpa < w.end:
                return w
        return None

    def _side(self, gpa: int, length: int) -> GuestMemory:
        for w in self.windows:
            if gpa < w.end and gpa + length > w.start:
                if gpa >= w.start and gpa + length <= w.end:
                    return w.memory
                raise invalid_use(f"[{gpa:#x}, +{length:#x}) straddles the edge of the {w.name} "
                                  f"[{w.start:#x}, {w.end:#x})")
        return self.host

    # -- the data path's accesses --------------------------------------------------------
    def read(self, gpa: int, length: int) -> bytes:
        return self._side(gpa, length).read(gpa, length)

    def read_into(self, gpa: int, buf: Any) -> None:
        with memoryview(buf) as mv:
            self._side(gpa, mv.nbytes).read_into(gpa, buf)

    def write(self, gpa: int, data: Any) -> None:
        with memoryview(data) as mv:
            self._side(gpa, mv.nbytes).write(gpa, data)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self._side(gpa, length).fill(gpa, length, byte)

    def copy(self, dst_gpa: int, src_gpa: int, length: int) -> None:
        src, dst = self._side(src_gpa, length), self._side(dst_gpa, length)
        if src is dst:
            src.copy(dst_gpa, src_gpa, length)
        else:
            dst.write(dst_gpa, src.read(src_gpa, length))

    def load32(self, gpa: int) -> int:
        return self._side(gpa, 4).load32(gpa)

    def load64(self, gpa: int) -> int:
        return self._side(gpa, 8).load64(gpa)

    def store32(self, gpa: int, value: int) -> None:
        self._side(gpa, 4).store32(gpa, value)

    def store64(self, gpa: int, value: int) -> None:
        self._side(gpa, 8).store64(gpa, value)

    def read_u32(self, gpa: int) -> int:
        return self._side(gpa, 4).read_u32(gpa)

    def write_u32(self, gpa: int, value: int) -> None:
        self._side(gpa, 4).write_u32(gpa, value)

    def is_mapped(self, gpa: int, length: int, *, write: bool = False) -> bool:
        try:
            side = self._side(gpa, length)
        except NvmeStatusError:
            return False
        return side.is_mapped(gpa, length, write=write)

    def views(self, gpa: int, length: int, *, write: bool = False) -> list[memoryview]:
        return self._side(gpa, length).views(gpa, length, write=write)

    def sg_views(self, sgl: Iterable[tuple[int, int]], *, write: bool = False) -> list[memoryview]:
        """Views of a scatter-gather list: all of it in controller memory or all in guest
        memory, else Invalid Use of Controller Memory Buffer."""
        entries = list(sgl)
        sides: list[GuestMemory] = []
        host = self.host
        in_host = in_ctrl = False
        for entry in entries:
            try:
                gpa, length = entry
            except (TypeError, ValueError):
                raise DmaError(f"bad scatter-gather entry {entry!r}") from None
            side = self._side(gpa, length) if length else host
            sides.append(side)
            if not length:
                continue
            if side is host:
                in_host = True
            else:
                in_ctrl = True
            if in_host and in_ctrl:
                raise invalid_use("a data buffer mixes controller memory and host memory")
        if not in_ctrl:
            return host.sg_views(entries, write=write)
        views: list[memoryview] = []
        try:
            for side, entry in zip(sides, entries, strict=True):
                if entry[1]:
                    views.extend(side.sg_views([entry], write=write))
        except BaseException:
            for v in views:
                v.release()
            raise
        return views
