"""The controller's DMA view while it has controller memory space: guest memory, with the
addresses of its Controller Memory Buffer (:mod:`pcidev_nvme.cmb`) and Persistent Memory
Region (:mod:`pcidev_nvme.pmr`) sent to their own memory.

Each of them, while its controller memory space is enabled (CMBMSC.CMSE / PMRMSCL.CMSE),
is a :class:`MemoryWindow`: ``[start, end)`` at the base address the host gave (CBA),
mapped by a private :class:`~pcidev.dma.GuestMemory` that the RAM BAR makes
(:meth:`pcidev.bar.RamBacking.map_view`). The
controller composes the windows into one :class:`ControllerMemoryView`, which its
``dma`` property returns instead of guest memory (without windows it returns guest
memory itself: one comparison on the hot path).

**Mixing rule** (as QEMU's): the data buffer of one command is wholly in one memory: the
CMB, the PMR or host memory; a PRP or SGL data pointer that mixes two of them, or one piece
that straddles a window's edge, fails with Invalid Use of Controller Memory Buffer (00h/12h,
DNR). PRP lists and SGL segments may be in either, whatever memory the command's queue and
its data are in (CMBLOC.CDPMLS and CDPCILS are set). A command's data buffer and its
separate metadata buffer are both in the CMB or both outside it (CMBLOC.CDMMMS is clear:
:func:`check_data_metadata`).

**Errors.** Every accessor of the view raises :class:`ControllerMemoryError` for such an
access: a :class:`~pcidev.errors.DmaError` (so the paths that are not a command's data
transfer -- completion posting, shadow doorbells, SQ fetch -- treat it as any failed DMA)
that is also the :class:`~pcidev_nvme.status.NvmeStatusError` a command completes with.

**Windows are never unmapped eagerly**: a window that is replaced or disabled is only
dropped; the fetch and I/O threads that still hold the previous view keep a valid mapping,
which the garbage collector unmaps once nobody uses it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from pcidev.bar import RamBacking
from pcidev.dma import DirtyLog, GuestMemory, MemoryRegion
from pcidev.errors import DmaError
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["ControllerMemoryView", "ControllerMemoryError", "MemoryWindow", "map_window", "invalid_use",
           "ranges_overlap", "check_data_metadata"]


class ControllerMemoryError(NvmeStatusError, DmaError):
    """An access that breaks the controller memory rules: Invalid Use of Controller Memory
    Buffer (00h/12h, DNR) for a command, a failed DMA for everything else."""


def invalid_use(what: str) -> ControllerMemoryError:
    """Invalid Use of Controller Memory Buffer (DNR).

    :param what: the message.
    """
    return ControllerMemoryError(Status.INVALID_USE_OF_CMB, what, dnr=True)


def check_data_metadata(mem: GuestMemory, data: Iterable[tuple[int | None, int]],
                        meta: Iterable[tuple[int | None, int]]) -> None:
    """CMBLOC.CDMMMS is clear: a command's data buffer and its separate metadata buffer
    are both in the CMB or both outside it.

    :param mem: the controller's DMA view (nothing to check without controller memory space).
    :param data: the data buffer's pieces (address None: a bit bucket).
    :param meta: the metadata buffer's pieces.
    :raises ControllerMemoryError: Invalid Use of Controller Memory Buffer when one is in
        the CMB and the other is not.
    """
    if not isinstance(mem, ControllerMemoryView):
        return

    def in_cmb(segs: Iterable[tuple[int | None, int]]) -> bool | None:
        for gpa, length in segs:
            if gpa is not None and length:
                w = mem.window_of(gpa)
                return w is not None and w.name == "CMB"
        return None

    d, m = in_cmb(data), in_cmb(meta)
    if d is not None and m is not None and d != m:
        raise invalid_use(f"the data buffer is {'in' if d else 'outside'} the CMB and the metadata buffer "
                          f"{'in' if m else 'outside'} it (CMBLOC.CDMMMS is clear)")


def ranges_overlap(a: tuple[int, int] | None, b: tuple[int, int] | None) -> bool:
    """Whether two ``(start, end)`` ranges (None: no range) overlap."""
    return a is not None and b is not None and a[0] < b[1] and b[0] < a[1]


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


def map_window(name: str, start: int, size: int, ram: RamBacking) -> MemoryWindow:
    """A window of the first ``size`` bytes of ``ram`` at ``start``
    (:meth:`RamBacking.map_view <pcidev.bar.RamBacking.map_view>`: the controller's DMA
    writes it past the BAR's MMIO path, so a pre-copy tracks it by page hashes from then on).

    :raises DmaError: the kernel refused the mapping.
    """
    return MemoryWindow(name, start, start + size, ram.map_view(start, size, name=f"nvme-{name.lower()}"))


class ControllerMemoryView(GuestMemory):
    """Guest memory with controller memory windows (see the module docstring).

    A :class:`~pcidev.dma.GuestMemory` that maps nothing itself: every accessor sends the
    access to :attr:`host` or to the window holding it (an access that straddles a
    window's edge raises :class:`ControllerMemoryError`).

    :param windows: the windows (disjoint: the CMB and PMR refuse overlapping base addresses).
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
            if gpa < w.end and gpa + max(length, 1) > w.start:
                if gpa >= w.start and gpa + length <= w.end:
                    return w.memory
                raise invalid_use(f"[{gpa:#x}, +{length:#x}) straddles the edge of the {w.name} "
                                  f"[{w.start:#x}, {w.end:#x})")
        if self.host is self:
            raise DmaError("controller memory view used before it was put over guest memory")
        return self.host

    # -- what the view maps: nothing of its own ------------------------------------------
    @property
    def dirty(self) -> DirtyLog | None:
        """The host memory's dirty log (writes to controller memory are not logged: its
        contents migrate as the RAM BAR)."""
        return None if self.host is self else self.host.dirty

    @dirty.setter
    def dirty(self, value: DirtyLog | None) -> None:
        pass  # (GuestMemory.__init__ sets it; the host's log is the one that counts)

    def map(self, gpa: int, size: int, fd: int, fd_offset: int = 0, *, writable: bool = True,
            name: str = "") -> MemoryRegion:
        raise DmaError("a controller memory view maps nothing itself: map guest memory")

    def unmap(self, gpa: int, size: int | None = None, *, forget_views: bool = False) -> None:
        raise DmaError("a controller memory view maps nothing itself: unmap guest memory")

    def regions(self) -> list[MemoryRegion]:
        return [] if self.host is self else self.host.regions()

    def fds(self) -> list[tuple[MemoryRegion, int]]:
        return [] if self.host is self else self.host.fds()

    def region_at(self, gpa: int) -> MemoryRegion | None:
        try:
            return self._side(gpa, 1).region_at(gpa)
        except DmaError:
            return None

    def fd_of(self, gpa: int) -> int:
        return self._side(gpa, 1).fd_of(gpa)

    def start_dirty_log(self, ranges: Iterable[tuple[int, int]] | None = None) -> DirtyLog:
        if self.host is self:
            raise DmaError("controller memory view used before it was put over guest memory")
        return self.host.start_dirty_log(ranges)

    def stop_dirty_log(self) -> None:
        if self.host is not self:
            self.host.stop_dirty_log()

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

    def read_u8(self, gpa: int) -> int:
        return self._side(gpa, 1).read_u8(gpa)

    def read_u16(self, gpa: int) -> int:
        return self._side(gpa, 2).read_u16(gpa)

    def read_u32(self, gpa: int) -> int:
        return self._side(gpa, 4).read_u32(gpa)

    def read_u64(self, gpa: int) -> int:
        return self._side(gpa, 8).read_u64(gpa)

    def write_u8(self, gpa: int, value: int) -> None:
        self._side(gpa, 1).write_u8(gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._side(gpa, 2).write_u16(gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._side(gpa, 4).write_u32(gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._side(gpa, 8).write_u64(gpa, value)

    def read_struct(self, st: struct.Struct, gpa: int) -> tuple[Any, ...]:
        return self._side(gpa, st.size).read_struct(st, gpa)

    def write_struct(self, st: struct.Struct, gpa: int, *values: Any) -> None:
        self._side(gpa, st.size).write_struct(st, gpa, *values)

    def load32(self, gpa: int) -> int:
        return self._side(gpa, 4).load32(gpa)

    def load64(self, gpa: int) -> int:
        return self._side(gpa, 8).load64(gpa)

    def store32(self, gpa: int, value: int) -> None:
        self._side(gpa, 4).store32(gpa, value)

    def store64(self, gpa: int, value: int) -> None:
        self._side(gpa, 8).store64(gpa, value)

    def is_mapped(self, gpa: int, length: int, *, write: bool = False) -> bool:
        try:
            side = self._side(gpa, length)
        except DmaError:
            return False
        return side.is_mapped(gpa, length, write=write)

    def views(self, gpa: int, length: int, *, write: bool = False) -> list[memoryview]:
        return self._side(gpa, length).views(gpa, length, write=write)

    def sg_views(self, sgl: Iterable[tuple[int, int]], *, write: bool = False) -> list[memoryview]:
        """Views of a scatter-gather list: all of it in one memory (the CMB, the PMR or
        guest memory), else Invalid Use of Controller Memory Buffer."""
        entries = list(sgl)
        sides: list[GuestMemory] = []
        host = self.host
        if host is self:
            raise DmaError("controller memory view used before it was put over guest memory")
        used: GuestMemory | None = None
        for entry in entries:
            try:
                gpa, length = entry
            except (TypeError, ValueError):
                raise DmaError(f"bad scatter-gather entry {entry!r}") from None
            side = self._side(gpa, length) if length else host
            sides.append(side)
            if not length:
                continue
            if used is None:
                used = side
            elif side is not used:
                what = "controller memory and host memory" if host in (side, used) else "the CMB and the PMR"
                raise invalid_use(f"a data buffer mixes {what}")
        if used is None or used is host:
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
