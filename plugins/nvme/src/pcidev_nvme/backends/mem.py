"""The ``mem`` backend: volatile memory (``mem:size=64M``).

A memfd (default) or an anonymous mapping (``anon=on``); deallocation punches
holes in the memfd (or zeroes the anonymous mapping). Fast: commands complete inline.

Every change to the contents goes through :meth:`MemoryBackend.writev`,
:meth:`~MemoryBackend.write_zeroes` or :meth:`~MemoryBackend.deallocate`, and each marks
:attr:`MemoryBackend.dirty` after it changed the memory, so a migration over a channel
without descriptors (TCP) copies the namespace while it keeps serving I/O (pre-copy,
:mod:`pcidev.migration.precopy`) and sends only what was written since at the stop.

**Migration.** The stream names the memory by a descriptor (:meth:`MemoryBackend.stream_fd`):
the memfd itself, or, for anonymous memory, which has none, an *export memfd* into which
the pages written so far are copied at the stop (the quiesced save). Over a UNIX socket
that memfd travels and the destination maps it (from then on its namespace is
memfd-backed: :meth:`MemoryBackend.from_fd`); over TCP the contents travel instead
(:meth:`MemoryBackend.memory_source`: the anonymous mapping is read directly, and the
export memfd only names it), pre-copied while I/O runs. The copy at the stop costs about
a ``memcpy`` of the pages written (some milliseconds per 64 MiB), inside the downtime.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from typing import Any

import attrs

from pcidev.errors import ConfigError
from pcidev.memory_source import ALLOCATION_PAGE, DirtyBitmap, MemorySource
from pcidev.properties import Size
from pcidev_nvme.backends.base import (
    BaseBackend,
    check_size,
    full_preadv,
    punch_hole,
    size_field,
    take_options,
    zero_views,
)

__all__ = ["DIRTY_GRANULE", "MAX_DIRTY_MAP", "dirty_granule", "PageMap", "MemConfig", "MemoryBackend", "make_mem"]

#: the dirty tracking granule of a memory namespace: one page, so that the random 4 KiB
#: writes of a running guest dirty no more than they wrote (a 256 MiB namespace's
#: bitmap is 64 KiB) -- up to :data:`MAX_DIRTY_MAP` bytes of bitmap (a 4 GiB namespace);
#: a larger namespace tracks coarser granules (:func:`dirty_granule`)
DIRTY_GRANULE = 4096
#: the largest dirty bitmap of one memory namespace (bytes: one per granule)
MAX_DIRTY_MAP = 1 << 20


def dirty_granule(size: int) -> int:
    """The dirty tracking granule of a ``size``-byte memory namespace: :data:`DIRTY_GRANULE`,
    or the smallest power of two keeping its bitmap within :data:`MAX_DIRTY_MAP` bytes
    (the bitmap is a bytearray the size of the granule count, allocated at once)."""
    granule = DIRTY_GRANULE
    while (size + granule - 1) // granule > MAX_DIRTY_MAP:
        granule <<= 1
    return granule


class PageMap:
    """One byte per 4 KiB page of a memory namespace (1: the page holds written data),
    committed only where written: an anonymous private mapping, whose untouched pages
    read as zeros from the shared zero page (a 1 TiB namespace's 256 MiB map costs
    nothing until written; clearing a range gives its whole pages back).

    :param pages: the number of pages (> 0).
    :raises OSError: the mapping cannot be made.
    """

    __slots__ = ("_mm", "_n")

    #: bytes compared or written per step (a bounded temporary)
    STEP = 1 << 20

    def __init__(self, pages: int) -> None:
        self._n = pages
        self._mm = mmap.mmap(-1, max(pages, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def __len__(self) -> int:
        return self._n

    def __eq__(self, other: object) -> bool:
        """Equal to another map, or to bytes, with the same pages (compared step by step)."""
        if isinstance(other, PageMap):
            theirs: Any = other._mm
        elif isinstance(other, (bytes, bytearray)):
            theirs = other
        else:
            return NotImplemented
        if self._n != len(other):
            return False
        step = self.STEP
        return all(self._mm[a:a + step] == bytes(theirs[a:a + step]) for a in range(0, self._n, step))

    def find(self, value: int, start: int, end: int) -> int:
        """The first page in ``[start, end)`` whose byte is ``value`` (0 or 1), or -1."""
        return self._mm.find(b"\x01" if value else b"\x00", start, min(end, self._n))

    def count(self, value: int, start: int = 0, end: int | None = None) -> int:
        """How many pages in ``[start, end)`` have the byte ``value``."""
        end = self._n if end is None else min(end, self._n)
        n, mm, step = 0, self._mm, self.STEP
        for a in range(start, end, step):
            n += mm[a:min(a + step, end)].count(value)
        return n

    def fill(self, start: int, end: int, value: int) -> None:
        """Set pages ``[start, end)`` to ``value`` (0 gives the map's whole pages back)."""
        end = min(end, self._n)
        if start >= end:
            return
        mm = self._mm
        if not value:
            lo = (start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
            hi = end // mmap.PAGESIZE * mmap.PAGESIZE
            if hi > lo:
                mm[start:lo] = bytes(lo - start)
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
                mm[hi:end] = bytes(end - hi)
                return
        step = self.STEP
        chunk = (b"\x01" if value else b"\x00") * min(step, end - start)
        for a in range(start, end, step):
            b = min(a + step, end)
            mm[a:b] = chunk[:b - a]

    def load(self, data: bytes) -> None:
        """Take a whole map (``len(data)`` pages, nonzero bytes count as 1)."""
        mm, step = self._mm, self.STEP
        for a in range(0, len(data), step):
            part = data[a:a + step]
            if part.count(0) != len(part):  # (zero steps stay uncommitted)
                mm[a:a + len(part)] = part.translate(_NONZERO_IS_ONE)

    def close(self) -> None:
        """Unmap (idempotent)."""
        self._mm.close()


@attrs.define(kw_only=True)
class MemConfig:
    """Options of the ``mem`` backend."""

    size: Size = size_field(required=True)
    anon: bool = attrs.field(default=False, metadata={
        "help": "an anonymous private mapping instead of a memfd"})


class MemoryBackend(BaseBackend):
    """Volatile memory: a memfd (default) or an anonymous private mapping.

    Reads and writes are one ``memcpy`` between the mapping and the guest views.
    A map with one byte per 4 KiB page records which pages were written: reads
    of pages never written (or deallocated) go through ``preadv`` on the memfd,
    which returns zeros without allocating memory (touching a hole through the
    mapping would allocate it), so :meth:`allocated_bytes` (NUSE) stays true.
    Deallocation frees whole pages (``PUNCH_HOLE`` on the memfd,
    ``MADV_DONTNEED`` on the anonymous mapping) and zeroes partial ones.

    :attr:`dirty` records the writes while a migration tracks them (see the module
    docstring for how each kind of memory migrates).

    :param size: bytes (a multiple of 4096).
    :param anon: use an anonymous private mapping instead of a memfd.
    """

    kind = "mem"
    #: the map of written 4 KiB pages tells the holes
    holes = True
    inline = True

    def __init__(self, size: int, *, anon: bool = False) -> None:
        super().__init__(check_size(size))
        self.fd = -1
        try:
            if anon:
                self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            else:
                self.fd = os.memfd_create("pcidev-nvme-ns", os.MFD_CLOEXEC)
                os.ftruncate(self.fd, size)
                self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except (OSError, OverflowError) as exc:
            if self.fd >= 0:
                os.close(self.fd)
            raise ConfigError(f"cannot allocate {size} bytes of namespace memory: {exc}") from exc
        try:
            self._written = PageMap(size >> _PAGE_SHIFT)  # 1 = page holds written data
        except OSError as exc:
            self._mm.close()
            if self.fd >= 0:
                os.close(self.fd)
            raise ConfigError(f"cannot allocate {size} bytes of namespace memory "
                              f"(no memory for its page map: {exc})") from None
        self._mv = memoryview(self._mm)
        self._closed = False
        self._unwritten = len(self._written)  # pages never written (or deallocated)
        self._lock = threading.Lock()
        #: the writes since a migration started tracking them
        self.dirty = DirtyBitmap(size, dirty_granule(size))
        #: anonymous memory: the memfd a migration stream names (made on first use)
        self._export_fd = -1

    @classmethod
    def from_fd(cls, fd: int, size: int, *, allocated: bytes | None = None) -> MemoryBackend:
        """A backend over an existing memfd (a migrated namespace: the source's memory).

        ``fd`` is duplicated (the caller keeps its own). The map of written pages is
        rebuilt from the file's data extents (``SEEK_DATA``/``SEEK_HOLE``), so NUSE and
        the hole-reading shortcut stay what they were on the source -- or taken from
        ``allocated`` when the migration channel staged the memfd and knows it.

        :param fd: the memfd.
        :param size: the namespace's size in bytes.
        :param allocated: one byte per 4 KiB page, nonzero where the memfd holds data
            (:meth:`pcidev.device.PciDevice.vmstate_load_allocated`); a map of another
            length is ignored (the extents are scanned).

        :raises ConfigError: the descriptor is not a file of ``size`` bytes or cannot be mapped.
        """
        check_size(size)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise ConfigError(f"namespace memory descriptor: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise ConfigError(f"namespace memory descriptor is not a {size}-byte memory file "
                              f"(mode {st.st_mode:o}, {st.st_size} bytes)")
        self = cls.__new__(cls)
        BaseBackend.__init__(self, size)
        self.fd = os.dup(fd)
        try:
            os.set_inheritable(self.fd, False)
            self._mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        except OSError as exc:
            os.close(self.fd)
            raise ConfigError(f"cannot map the namespace memory: {exc}") from exc
        self._mv = memoryview(self._mm)
        self._closed = False
        try:
            written = PageMap(size >> _PAGE_SHIFT)
        except OSError as exc:
            self._mm.close()
            os.close(self.fd)
            raise ConfigError(f"cannot map the namespace memory's page map: {exc}") from exc
        pos = 0
        if allocated is not None and len(allocated) == len(written) and 1 << _PAGE_SHIFT == ALLOCATION_PAGE:
            # the channel wrote this memfd and knows its pages: no scan inside the downtime
            written.load(allocated)
            pos = size
        elif st.st_blocks * 512 >= size:
            # every page allocated: no hole to look for (SEEK_HOLE walks every page of a
            # memfd, ~15 ms per 256 MiB, inside a migration's downtime)
            written.fill(0, len(written), 1)
            pos = size
        while pos < size:
            try:
                start = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), size)
            a, b = start >> _PAGE_SHIFT, (end + _PAGE_MASK) >> _PAGE_SHIFT
            written.fill(a, b, 1)
            pos = end
        self._written = written
        self._unwritten = written.count(0)
        self._lock = threading.Lock()
        self.dirty = DirtyBitmap(size, dirty_granule(size))
        self._export_fd = -1
        return self

    # -- migration ---------------------------------------------------------------------------
    @property
    def anonymous(self) -> bool:
        """The memory is an anonymous mapping (``anon=on``): no descriptor holds it."""
        return self.fd < 0

    def _export(self) -> int:
        """The export memfd of anonymous memory (created once, closed with the backend)."""
        with self._lock:
            if self._closed:
                raise ConfigError("the namespace memory is closed")
            if self._export_fd < 0:
                try:
                    self._export_fd = os.memfd_create("pcidev-nvme-ns-export", os.MFD_CLOEXEC)
                    os.ftruncate(self._export_fd, self.size)
                except OSError as exc:
                    if self._export_fd >= 0:
                        os.close(self._export_fd)
                        self._export_fd = -1
                    raise ConfigError(f"cannot make the export memfd of anonymous namespace memory: {exc}") from exc
            return self._export_fd

    def stream_fd(self) -> int:
        """The descriptor a migration stream names for this memory (borrowed): the memfd,
        or for anonymous memory the export memfd, emptied and filled now with the pages
        written (holes elsewhere). Call it with the namespace quiesced (the save).

        :raises ConfigError: the export memfd cannot be made or filled.
        """
        if not self.anonymous:
            return self.fd
        fd = self._export()
        try:
            os.ftruncate(fd, 0)  # (drop what an earlier save copied)
            os.ftruncate(fd, self.size)
            for off, length in self.allocated_ranges(0, self.size):
                done = 0
                while done < length:
                    done += os.pwrite(fd, self._mv[off + done:off + length], off + done)
        except OSError as exc:
            raise ConfigError(f"cannot copy anonymous namespace memory into its export memfd: {exc}") from exc
        return fd

    def memory_source(self, name: str, covers: frozenset[str] = frozenset()) -> MemorySource | None:
        """This memory as a migration's :class:`~pcidev.memory_source.MemorySource`, tracked
        by :attr:`dirty`: the memfd, or the anonymous mapping read in place (the export memfd
        then only names it: :meth:`stream_fd`). The name gets ``@<inode>`` (a store replaced
        meanwhile is another source). None once closed.

        :param name: the object's name (``"nvme/ns1"``).
        :param covers: the features the source stands in for.
        :raises ConfigError: the export memfd cannot be made.
        """
        if self._closed:
            return None
        fd = self.fd if not self.anonymous else self._export()
        try:
            ino = os.fstat(fd).st_ino
        except OSError:  # closed meanwhile
            return None
        return MemorySource(name=f"{name}@{ino}", fd=fd, size=self.size, bitmap=self.dirty, covers=covers,
                            buffer=self._mm if self.anonymous else None)

    def same_memory(self, fd: int) -> bool:
        """Whether ``fd`` is this memory's memfd (or, for anonymous memory, its export
        memfd: a stream of this very backend)."""
        own = self.fd if not self.anonymous else self._export_fd
        try:
            return own >= 0 and os.path.sameopenfile(fd, own)
        except OSError:
            return False

    def readv(self, views: list[memoryview], offset: int) -> None:
        """Copy from the memory into the views (one ``memcpy`` each)."""
        if len(views) == 1:
            v = views[0]
            n = len(v)
            if not self._unwritten or self._written.find(
                0, offset >> _PAGE_SHIFT, (offset + n + _PAGE_MASK) >> _PAGE_SHIFT
            ) < 0:
                v[:] = self._mv[offset : offset + n]
                return
        else:
            n = sum(len(v) for v in views)
            if not self._unwritten or self._written.find(
                0, offset >> _PAGE_SHIFT, (offset + n + _PAGE_MASK) >> _PAGE_SHIFT
            ) < 0:
                mv = self._mv
                for v in views:
                    k = len(v)
                    v[:] = mv[offset : offset + k]
                    offset += k
                return
        # Some page was never written: read through the file (holes give zeros).
        if self.fd >= 0:
            full_preadv(self.fd, views, offset)
        else:  # untouched anonymous pages are the shared zero page: reading is free
            mv = self._mv
            for v in views:
                k = len(v)
                v[:] = mv[offset : offset + k]
                offset += k

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """Copy the views into the memory (FUA means nothing for volatile memory)."""
        mv = self._mv
        start = offset
        for v in views:
            n = len(v)
            mv[offset : offset + n] = v
            offset += n
        if self._unwritten:
            self._mark(start >> _PAGE_SHIFT, (offset + _PAGE_MASK) >> _PAGE_SHIFT)
        self.dirty.mark(start, offset - start)  # after the copy (see DirtyBitmap)

    def _mark(self, a: int, b: int) -> None:
        """Record pages ``[a, b)`` as written."""
        with self._lock:
            written = self._written
            self._unwritten -= written.count(0, a, b)
            written.fill(a, b, 1)

    def deallocate(self, offset: int, length: int) -> None:
        """Free the whole pages of the range and zero the rest."""
        end = offset + length
        a = (offset + _PAGE_MASK) >> _PAGE_SHIFT  # first whole page
        b = end >> _PAGE_SHIFT  # one past the last whole page
        if a >= b:
            self.write_zeroes(offset, length)
            return
        if offset < a << _PAGE_SHIFT:
            self.write_zeroes(offset, (a << _PAGE_SHIFT) - offset)
        if end > b << _PAGE_SHIFT:
            self.write_zeroes(b << _PAGE_SHIFT, end - (b << _PAGE_SHIFT))
        start, n = a << _PAGE_SHIFT, (b - a) << _PAGE_SHIFT
        with self._lock:
            if self.fd >= 0:
                punch_hole(self.fd, start, n)
            else:
                self._mm.madvise(mmap.MADV_DONTNEED, start, n)
            self._unwritten += self._written.count(1, a, b)
            self._written.fill(a, b, 0)
        self.dirty.mark(start, n)  # after the hole (a pre-copy sends it as zeros)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Zero the range (``memset``); the pages count as written."""
        zero_views([self._mv[offset : offset + length]])
        self._mark(offset >> _PAGE_SHIFT, (offset + length + _PAGE_MASK) >> _PAGE_SHIFT)
        self.dirty.mark(offset, length)

    def allocated_bytes(self) -> int:
        """Bytes of the pages written and not deallocated since."""
        return (len(self._written) - self._unwritten) << _PAGE_SHIFT

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The runs of written pages in the range, from the map of written pages."""
        out: list[tuple[int, int]] = []
        end = offset + length
        a, b = offset >> _PAGE_SHIFT, (end + _PAGE_MASK) >> _PAGE_SHIFT
        written = self._written
        p = a
        while p < b:
            s = written.find(1, p, b)
            if s < 0:
                break
            e = written.find(0, s, b)
            if e < 0:
                e = b
            lo, hi = max(s << _PAGE_SHIFT, offset), min(e << _PAGE_SHIFT, end)
            out.append((lo, hi - lo))
            p = e
        return out

    def close(self) -> None:
        """Unmap and close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._mv.release()
            self._mm.close()
            self._written.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if self._export_fd >= 0:
                os.close(self._export_fd)
                self._export_fd = -1


_PAGE_SHIFT = 12
_PAGE_MASK = (1 << _PAGE_SHIFT) - 1
#: bytes.translate table: every nonzero byte to 1
_NONZERO_IS_ONE = bytes([0]) + bytes([1]) * 255


def make_mem(options: dict[str, Any]) -> MemoryBackend:
    """The ``mem`` factory: takes ``size`` and ``anon`` from ``options``."""
    cfg = take_options(MemConfig, options, what="mem backend")
    return MemoryBackend(cfg.size, anon=cfg.anon)
