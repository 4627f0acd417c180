# SPDX-License-Identifier: MIT
"""Guest memory: a table of fd-backed regions, accessed by guest physical address.

A device model reaches guest RAM only through a :class:`GuestMemory`. Each region is
an ``mmap`` (``MAP_SHARED``) of a file descriptor (a memfd or a file) so that another
process, such as the VMM that owns the RAM or a test peer, can map the same memory:
what the device writes the guest sees, and vice versa. Over vfio-user every
``DMA_MAP`` becomes one :meth:`GuestMemory.map` and every ``DMA_UNMAP`` one
:meth:`GuestMemory.unmap`.

Addresses, lengths and errors
-----------------------------
Guest physical addresses (*gpa*) are ints in ``[0, 2**64)``. Every access is bounds-
and overflow-checked before memory is touched, and anything a guest could get wrong
raises :class:`~pcidev.errors.DmaError`, which devices turn into an error status
(NVMe: Data Transfer Error):

* a negative address or length, or ``gpa + length > 2**64`` (64-bit wrap-around);
* any byte of the range outside mapped memory;
* a write (or ``write=True`` views) touching a read-only region;
* :meth:`~GuestMemory.load32` and friends on a misaligned address.

A range may cross from one region into the next when the two are *adjacent*
(``a.gpa + a.size == b.gpa``): reads, writes and views split at the boundary.
A write is validated in full before the first byte is written, so a refused write
changes nothing.

**Zero-length accesses** (``read(gpa, 0)``, ``views(gpa, 0)``, an SGL entry of
length 0) touch nothing and return ``b""`` / ``[]``, and do *not* require ``gpa`` to
be mapped (NVMe and PCI allow any address with a zero length). They still reject an
absurd address: negative, or above ``2**64``.

Addresses and lengths must be ``int`` (or support ``__index__``); other types are a
programming error and raise :class:`TypeError`. Values that do not fit a typed write
(``write_u32(gpa, -1)``) raise :class:`struct.error` before anything is written.

**No transient values.** Another process (a vfio-user client or server, a guest) may
read guest memory while it is written. A typed write (``write_u8`` .. ``write_u64``,
:meth:`~GuestMemory.write_struct`) packs its bytes first and copies them in one go, never
leaving the zeros :meth:`struct.Struct.pack_into` stores before the value (it clears its
target first: an unchanged shadow doorbell written with it read as 0 in 2 % of reads by
another process). At an aligned address that copy is one store of the value's width with
glibc on x86-64 (its small ``memcpy``; the test suite checks it with a second process), so a
reader sees the old value or the new one; the C library does not promise it. For a value
another side polls (doorbells, flags), use the ordered :meth:`~GuestMemory.store32` /
:meth:`~GuestMemory.load32`: one store by contract, and ordered after what it publishes.
Where both sides store a value and then load the other's (EventIdx), put
:func:`pcidev.native.fence` between the store and the load, as Linux's ``mb()``.

Lifetime rules: device state holds addresses, never views
---------------------------------------------------------
:meth:`~GuestMemory.views` returns :class:`memoryview` slices straight into the
mapping, so a backend can ``os.preadv``/``os.pwritev`` between a file and guest RAM
with no copy in Python. Every live view (and every slice of one) pins its mapping:
:meth:`~GuestMemory.unmap` refuses with :class:`~pcidev.errors.DmaError`, leaving the
region fully mapped, until they are released. So:

* device state stores guest addresses (ints), never views;
* take views for one command, preferably with ``with gm.access(sgl) as views:``,
  which releases them on exit;
* map and unmap only while the device is quiesced (the vfio-user rule): a
  :class:`GuestMemory` is not synchronized against concurrent map/unmap.

File descriptors
----------------
:meth:`~GuestMemory.map` does not take ownership of the caller's fd: it keeps its own
close-on-exec duplicate, so the caller may close its copy at once (over vfio-user
the received fd should be closed right after mapping). The duplicate is what
:meth:`~GuestMemory.fd_of` and :meth:`~GuestMemory.fds` return, ready to send to
another process with ``SCM_RIGHTS``; it stays open until the region is unmapped.
On Python < 3.13 ``mmap`` keeps one more duplicate internally, so a region costs
two fds; ``max_regions`` bounds the total.

An unsealed file can be truncated by its owner while mapped, and touching a page
past the new end raises ``SIGBUS``, which kills the process: prefer sealed memfds
(:func:`alloc_memfd` seals against shrinking; :func:`shrink_sealed` tells whether an
fd from a peer is, and the vfio-user server refuses a ``DMA_MAP`` of one that is not)
and never use a region after its unmap.

Performance
-----------
Lookup is a ``bisect`` over the sorted region starts, with the last region hit
cached so repeated accesses to one region skip it. Single-region accesses use
``struct`` on the ``mmap`` itself, views slice a memoryview kept per region, and
ordered accesses use :mod:`pcidev.native`. ``examples/bench_guest_memory.py``
measures the cost of each access; docs/development.md has its latest table.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import operator
import os
import struct
import sys
import threading
import weakref
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs

from pcidev import native
from pcidev.errors import DmaError

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

__all__ = [
    "ADDRESS_LIMIT",
    "DIRTY_PAGE",
    "MAX_DIRTY_PAGES",
    "MAX_DIRTY_RANGES",
    "DirtyLog",
    "GuestMemory",
    "MemoryRegion",
    "alloc_memfd",
    "shrink_sealed",
]

ADDRESS_LIMIT = 1 << 64
"""One past the highest guest physical address."""

_PAGE = mmap.ALLOCATIONGRANULARITY

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
# Bound once (one lookup less per access) and typed once, so that the readers return
# an int with no cast per call.
_u8_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U8.unpack_from
_u16_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U16.unpack_from
_u32_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U32.unpack_from
_u64_unpack: Callable[[ReadableBuffer, int], tuple[int]] = _U64.unpack_from
# typed writes pack first and copy (struct.pack_into clears its target before it writes
# the value: a reader in another process could see zeros; see "No transient values")
_u8_bytes = _U8.pack
_u16_bytes = _U16.pack
_u32_bytes = _U32.pack
_u64_bytes = _U64.pack

_MMAP_KWARGS: dict[str, Any] = {"trackfd": False} if sys.version_info >= (3, 13) else {}

DIRTY_PAGE = 4096
"""The granule of :class:`DirtyLog`: one flag per 4 KiB page of a tracked range."""

#: the most pages one :class:`DirtyLog` tracks (64 GiB of guest memory at 4 KiB)
MAX_DIRTY_PAGES = 1 << 24
#: the most ranges one :class:`DirtyLog` tracks
MAX_DIRTY_RANGES = 4096
_DIRTY_SHIFT = 12  # log2(DIRTY_PAGE)
_ASCII01 = bytes.maketrans(b"\x00\x01", b"01")


def _runs(flags: bytearray) -> Iterator[tuple[int, int]]:
    """The ``[lo, hi)`` runs of non-zero bytes of a 0/1 page map."""
    pos = flags.find(1)
    while pos >= 0:
        end = flags.find(0, pos)
        if end < 0:
            end = len(flags)
        yield pos, end
        pos = flags.find(1, end)


def alloc_memfd(size: int, name: str = "pcidev-ram", *, seal: bool = True) -> int:
    """Create an anonymous shared-memory file of ``size`` bytes.

    ``memfd_create(MFD_CLOEXEC | MFD_ALLOW_SEALING)``, then ``ftruncate``, then (with
    ``seal``) ``F_SEAL_SHRINK | F_SEAL_GROW`` so that no process holding the fd can
    change its size, which rules out ``SIGBUS`` from truncation. The memory reads as
    zeros until written.

    :param size: size in bytes, > 0.
    :param name: name shown in ``/proc/<pid>/fd`` (for debugging only).
    :param seal: add the shrink/grow seals.
    :returns: the new fd (close-on-exec); the caller owns it.
    :raises DmaError: ``size`` is not positive, or the kernel refused.
    """
    size = operator.index(size)
    if size <= 0:
        raise DmaError(f"memfd size must be positive, got {size}")
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as exc:
        raise DmaError(f"memfd_create({name!r}) failed: {exc}") from exc
    try:
        os.ftruncate(fd, size)
        if seal:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError as exc:
        os.close(fd)
        raise DmaError(f"cannot size or seal memfd {name!r} ({size:#x} bytes): {exc}") from exc
    return fd


def shrink_sealed(fd: int) -> bool:
    """Whether ``fd`` carries ``F_SEAL_SHRINK``: nobody can truncate the file under a
    mapping of it (touching a page past a new end would raise ``SIGBUS``).

    A regular file, a pipe or anything else that cannot carry seals is not sealed.
    QEMU's ``memory-backend-memfd`` seals its memfds by default (``seal=on``), and so
    does :func:`alloc_memfd`.

    :param fd: any file descriptor.
    :returns: ``True`` when the shrink seal is set.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return bool(seals & fcntl.F_SEAL_SHRINK)


@attrs.frozen
class MemoryRegion:
    """Description of one mapped region of guest memory (holds no mapping itself).

    :ivar gpa: guest physical address of the first byte.
    :ivar size: length in bytes.
    :ivar fd_offset: offset of the first byte in the backing file.
    :ivar writable: whether the device may write to it.
    :ivar name: free-form label for logs.
    """

    gpa: int
    size: int
    fd_offset: int = 0
    writable: bool = True
    name: str = ""

    @property
    def end(self) -> int:
        """One past the last guest physical address of the region."""
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa + length)`` lies inside this region.

        :param gpa: first address.
        :param length: number of bytes (``>= 0``).
        :returns: ``True`` if the whole range is inside.
        """
        return self.gpa <= gpa and length >= 0 and gpa + length <= self.gpa + self.size


class _Region:
    """Live state of one mapped region (internal; never handed out).

    ``mm``, ``desc`` and, between :meth:`export` and :meth:`unexport`, ``mv_ro``,
    ``mv_rw`` and ``pin`` are set on every region in the table. The sentinel
    :data:`_NO_REGION` leaves them unset: it matches no address, so no access
    reaches them. ``mv_rw`` of a read-only region is the read-only view; only
    write paths, which check ``writable`` first, use it.
    """

    __slots__ = (
        "delta",
        "desc",
        "end",
        "fd",
        "gpa",
        "mm",
        "mv_ro",
        "mv_rw",
        "pin",
        "writable",
    )

    mm: mmap.mmap
    desc: MemoryRegion
    mv_ro: memoryview
    mv_rw: memoryview
    pin: native.Pinned

    def __init__(self) -> None:
        # A sentinel made this way matches no address: gpa > every valid end.
        self.gpa = ADDRESS_LIMIT + 1
        self.end = 0
        self.delta = 0
        self.writable = False
        self.fd = -1

    def export(self) -> None:
        """Create the per-region memoryviews and the native pin."""
        base = memoryview(self.mm)
        self.mv_rw = base
        self.mv_ro = base.toreadonly() if self.writable else base
        self.pin = native.pin(self.mm, writable=self.writable)

    def unexport(self) -> None:
        """Drop this object's own exports (views handed out stay valid).

        Safe after a partial :meth:`export`: what it did not reach is unset.
        """
        for name in ("pin", "mv_ro", "mv_rw"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.release()
                delattr(self, name)


_NO_REGION = _Region()


def _close_fds(fds: dict[int, int]) -> None:
    """Finalizer: close the duplicated fds of a GuestMemory that was never closed."""
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


def _fmt(gpa: int, length: int) -> str:
    return f"[{gpa:#x}, +{length:#x})"


class _Access:
    """Context manager returned by :meth:`GuestMemory.access`."""

    __slots__ = ("_views",)

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views

    def __enter__(self) -> list[memoryview]:
        return self._views

    def __exit__(self, *exc: object) -> None:
        # A view someone re-exported (memoryview(v), a cffi from_buffer...) cannot
        # be released yet: it keeps pinning until they let go, and unmap says so.
        # (try/except rather than contextlib.suppress: it costs nothing here.)
        for v in self._views:
            try:
                v.release()
            except BufferError:
                pass
        self._views = []


class DirtyLog:
    """Which pages of guest memory a device wrote since the last report (DMA dirty logging).

    Tracks a set of guest-physical ranges with one byte per :data:`DIRTY_PAGE` page.
    :class:`GuestMemory` marks pages on every write path while its
    :attr:`~GuestMemory.dirty` is set: after a plain write (so a report racing with it
    reports the page now or in the next report, never not at all), and when it hands
    out writable views (the write through them comes later, so such a page stays
    reported until :meth:`settle` says the device is quiescent: its writes are done).
    Reporting more pages than were written is allowed; fewer never.

    Memory: two bytes per tracked page (at most :data:`MAX_DIRTY_PAGES` pages, 32 MiB).
    A mark inside the range marked last takes a fast path (no search).

    Thread-safe: the device's threads mark while the transport reports. Plain marks take
    no lock (a store into a ``bytearray`` is atomic under the GIL); a report copies its
    pages in one step and clears only those it reports, so a mark racing with it is
    either in this report (its page is read after the report) or kept for the next.

    :param ranges: ``(iova, length)`` pairs, each a multiple of :data:`DIRTY_PAGE`,
        non-empty, not overlapping (any order).
    :param follow_maps: the log covers "all mapped memory": :meth:`GuestMemory.map`
        adds each region mapped later (:meth:`add`).
    :raises DmaError: a range is misaligned, empty, overlaps another or wraps past
        ``2**64``; too many ranges or pages.
    """

    def __init__(self, ranges: Iterable[tuple[int, int]], *, follow_maps: bool = False) -> None:
        spans = sorted((operator.index(a), operator.index(n)) for a, n in ranges)
        self._check(spans, 0, 0)
        prev_end = 0
        for a, n in spans:
            if a < prev_end:
                raise DmaError(f"dirty logging: range {_fmt(a, n)} overlaps another")
            prev_end = a + n
        #: whether regions mapped later are added (logging of "all mapped memory")
        self.follow_maps = follow_maps
        self._starts = [a for a, _ in spans]
        self._ends = [a + n for a, n in spans]
        self._dirty = [bytearray(n // DIRTY_PAGE) for _, n in spans]
        self._viewed = [bytearray(n // DIRTY_PAGE) for _, n in spans]
        self._pages = sum(n // DIRTY_PAGE for _, n in spans)
        # the range marked last (start, end, its dirty bytes): the fast path of mark()
        self._hit: tuple[int, int, bytearray] = (ADDRESS_LIMIT + 1, 0, bytearray())
        self._lock = threading.Lock()

    @staticmethod
    def _check(spans: list[tuple[int, int]], have_ranges: int, have_pages: int) -> None:
        """Raise if ``spans`` are malformed, or too many with what is tracked already."""
        if len(spans) + have_ranges > MAX_DIRTY_RANGES:
            raise DmaError(f"dirty logging: more than {MAX_DIRTY_RANGES} ranges")
        pages = have_pages
        for a, n in spans:
            if a < 0 or n <= 0 or a % DIRTY_PAGE or n % DIRTY_PAGE or a + n > ADDRESS_LIMIT:
                raise DmaError(f"dirty logging: bad range {_fmt(a, n)} (page-aligned, non-empty, below 2**64)")
            pages += n // DIRTY_PAGE
        if pages > MAX_DIRTY_PAGES:
            raise DmaError(f"dirty logging: {pages} pages to track (at most {MAX_DIRTY_PAGES})")

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The tracked ranges ``(iova, length)``, sorted."""
        with self._lock:
            return [(a, e - a) for a, e in zip(self._starts, self._ends, strict=True)]

    def _uncovered(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """The whole pages around ``[gpa, gpa + length)`` that no range tracks yet."""
        lo = gpa - gpa % DIRTY_PAGE
        hi = min(-(-(gpa + length) // DIRTY_PAGE) * DIRTY_PAGE, ADDRESS_LIMIT)
        out = []
        cur = lo
        for s, e in zip(self._starts, self._ends, strict=True):
            if e <= cur:
                continue
            if s >= hi:
                break
            if s > cur:
                out.append((cur, s - cur))
            cur = max(cur, e)
        if cur < hi:
            out.append((cur, hi - cur))
        return out

    def check_add(self, gpa: int, length: int) -> None:
        """Raise :class:`~pcidev.errors.DmaError` if :meth:`add` of this region would exceed the limits."""
        with self._lock:
            self._check(self._uncovered(gpa, length), len(self._starts), self._pages)

    def add(self, gpa: int, length: int) -> None:
        """Track the pages of ``[gpa, gpa + length)`` too (widened to whole pages; pages
        tracked already keep their bits).

        :raises DmaError: beyond :data:`MAX_DIRTY_PAGES` or :data:`MAX_DIRTY_RANGES`.
        """
        with self._lock:
            new = self._uncovered(gpa, length)
            self._check(new, len(self._starts), self._pages)
            for a, n in new:
                i = bisect_right(self._starts, a)
                self._starts.insert(i, a)
                self._ends.insert(i, a + n)
                self._dirty.insert(i, bytearray(n // DIRTY_PAGE))
                self._viewed.insert(i, bytearray(n // DIRTY_PAGE))
                self._pages += n // DIRTY_PAGE

    def _set(self, maps: tuple[list[bytearray], ...], gpa: int, length: int) -> None:
        end = gpa + length
        with self._lock:
            starts, ends = self._starts, self._ends
            i = max(bisect_right(starts, gpa) - 1, 0)
            while i < len(starts) and starts[i] < end:
                lo, hi = max(gpa, starts[i]), min(end, ends[i])
                if lo < hi:
                    first = (lo - starts[i]) >> _DIRTY_SHIFT
                    last = (hi - 1 - starts[i]) >> _DIRTY_SHIFT
                    for bm in maps:
                        if first == last:
                            bm[i][first] = 1
                        else:
                            bm[i][first : last + 1] = b"\x01" * (last + 1 - first)
                    if maps[0] is self._dirty:
                        self._hit = (starts[i], ends[i], self._dirty[i])
                i += 1

    def mark(self, gpa: int, length: int) -> None:
        """Record that ``[gpa, gpa + length)`` was written (parts outside every range are ignored)."""
        lo, hi, d = self._hit
        if lo <= gpa and gpa + length <= hi:  # inside the range marked last: no search
            if length > 0:
                # no lock: a store into a bytearray is atomic under the GIL, and a report
                # clears only the pages it reports (see report())
                first = (gpa - lo) >> _DIRTY_SHIFT
                last = (gpa + length - 1 - lo) >> _DIRTY_SHIFT
                if first == last:
                    d[first] = 1
                else:
                    d[first : last + 1] = b"\x01" * (last + 1 - first)
            return
        if length > 0:
            self._set((self._dirty,), gpa, length)

    def mark_view(self, gpa: int, length: int) -> None:
        """Record writable views of ``[gpa, gpa + length)``: reported until :meth:`settle`."""
        if length > 0:
            self._set((self._dirty, self._viewed), gpa, length)

    def settle(self) -> None:
        """The device is quiescent (every write through a view it took is done): pages
        of writable views are reported once more, then no longer for the views alone."""
        with self._lock:
            for d, v in zip(self._dirty, self._viewed, strict=True):
                if any(v):
                    for lo, hi in _runs(v):  # only sets pages: a concurrent mark is never undone
                        d[lo:hi] = b"\x01" * (hi - lo)
                    v[:] = bytes(len(v))

    @staticmethod
    def bitmap_size(length: int, page_size: int) -> int:
        """Bytes of the bitmap of ``length`` bytes at ``page_size``: whole u64 words."""
        pages = -(-length // page_size)
        return -(-pages // 64) * 8

    def report(self, iova: int, length: int, page_size: int) -> bytes:
        """The dirty bitmap of ``[iova, iova + length)``, then clear it (report and clear).

        Bit *i* (of u64 little-endian words: bit ``i % 64`` of word ``i // 64``) is
        set when the page ``iova + i * page_size`` was written, or overlaps a page
        that was.

        :param iova: first address, a multiple of ``page_size``.
        :param length: bytes, a positive multiple of ``page_size``.
        :param page_size: a power of two, at least :data:`DIRTY_PAGE`.
        :returns: :meth:`bitmap_size` bytes.
        :raises DmaError: a bad page size or alignment, or part of the range is not tracked.
        """
        if page_size < DIRTY_PAGE or page_size & (page_size - 1):
            raise DmaError(f"dirty report: page size {page_size:#x} is not a power of two >= {DIRTY_PAGE:#x}")
        if iova < 0 or length <= 0 or iova % page_size or length % page_size or iova + length > ADDRESS_LIMIT:
            raise DmaError(f"dirty report: range {_fmt(iova, length)} is not whole pages of {page_size:#x}")
        end = iova + length
        pages = bytearray()
        with self._lock:  # add() may insert ranges meanwhile: indexes are taken under the lock
            parts: list[tuple[int, int, int]] = []  # (range index, first page, last page + 1)
            cur = iova
            i = max(bisect_right(self._starts, iova) - 1, 0)
            while cur < end:
                if i >= len(self._starts) or not self._starts[i] <= cur < self._ends[i]:
                    raise DmaError(f"dirty report: {cur:#x} of {_fmt(iova, length)} is not logged")
                hi = min(end, self._ends[i])
                parts.append((i, (cur - self._starts[i]) // DIRTY_PAGE, (hi - self._starts[i]) // DIRTY_PAGE))
                cur = hi
                i += 1
            for i, a, b in parts:
                d, v = self._dirty[i], self._viewed[i]
                got = d[a:b]  # one copy (atomic under the GIL; marks take no lock)
                # clear only the pages reported: a mark that lands meanwhile on another page
                # stays for the next report, and one on a reported page is covered by this
                # report (the page is read after it)
                for lo, hi in _runs(got):
                    d[a + lo : a + hi] = bytes(hi - lo)
                if any(v[a:b]):
                    got = bytearray((int.from_bytes(got, "little") | int.from_bytes(v[a:b], "little")).to_bytes(
                        b - a, "little"))
                pages += got
        k = page_size // DIRTY_PAGE
        if k > 1:
            if k <= 64:
                acc = 0
                for j in range(k):
                    acc |= int.from_bytes(pages[j::k], "little")
                pages = bytearray(acc.to_bytes(len(pages) // k, "little"))
            else:
                pages = bytearray(1 if pages.find(1, p, p + k) >= 0 else 0 for p in range(0, len(pages), k))
        bits = int(pages[::-1].translate(_ASCII01), 2) if pages else 0
        return bits.to_bytes(self.bitmap_size(length, page_size), "little")


class GuestMemory:
    """The guest-physical address space as seen by one device: fd-backed regions.

    :param max_regions: cap on the number of regions (a rogue or buggy peer could
        otherwise exhaust fds and memory with tiny maps).

    Use as a context manager, or call :meth:`close`, to unmap everything.
    """

    def __init__(self, *, max_regions: int = 4096) -> None:
        if operator.index(max_regions) <= 0:
            raise DmaError(f"max_regions must be positive, got {max_regions}")
        self.max_regions = max_regions
        # (sorted starts, regions in the same order), replaced as a whole on change.
        self._table: tuple[list[int], list[_Region]] = ([], [])
        self._last = _NO_REGION
        self._fds: dict[int, int] = {}  # gpa -> own fd, shared with the finalizer
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_fds, self._fds)
        #: the dirty-page log while DMA logging is on (:meth:`start_dirty_log`), else None;
        #: every write path marks the pages it wrote in it
        self.dirty: DirtyLog | None = None

    # ------------------------------------------------------------------ table

    def map(
        self,
        gpa: int,
        size: int,
        fd: int,
        fd_offset: int = 0,
        *,
        writable: bool = True,
        name: str = "",
    ) -> MemoryRegion:
        """Map ``size`` bytes of ``fd`` starting at ``fd_offset`` at guest address ``gpa``.

        The mapping is ``MAP_SHARED``, read-write or read-only. ``fd_offset`` need not
        be page-aligned: the page-aligned mapping and the requested window are kept
        apart. The fd is duplicated (close-on-exec) and the duplicate kept; the
        caller still owns ``fd`` and may close it.

        :param gpa: guest physical address of the first byte.
        :param size: length in bytes, > 0.
        :param fd: file descriptor of a memfd or a regular file (or anything mmap-able).
        :param fd_offset: offset in the file of the first byte.
        :param writable: map read-write (the fd must be open for writing) or read-only.
        :param name: label for logs.
        :returns: the region's description.
        :raises DmaError: bad arguments, overlap with a mapped region, ``gpa + size >
            2**64``, too many regions, a range beyond the end of the file, or the
            kernel refused the mapping.
        """
        self._check_open()
        gpa, size, fd, fd_offset = (operator.index(v) for v in (gpa, size, fd, fd_offset))
        if gpa < 0 or size <= 0 or fd < 0 or fd_offset < 0:
            raise DmaError(
                f"bad map request gpa={gpa:#x} size={size:#x} fd={fd} fd_offset={fd_offset:#x}"
            )
        if gpa + size > ADDRESS_LIMIT:
            raise DmaError(f"map {_fmt(gpa, size)} wraps past 2**64")
        starts, regions = self._table
        if len(regions) >= self.max_regions:
            raise DmaError(f"too many DMA regions (limit {self.max_regions})")
        i = bisect_right(starts, gpa)
        if i > 0 and regions[i - 1].end > gpa:
            raise DmaError(f"map {_fmt(gpa, size)} overlaps {regions[i - 1].desc}")
        if i < len(regions) and regions[i].gpa < gpa + size:
            raise DmaError(f"map {_fmt(gpa, size)} overlaps {regions[i].desc}")
        d = self.dirty
        follow = d is not None and d.follow_maps
        if d is not None and follow:
            d.check_add(gpa, size)  # logging "all mapped memory": this region must fit the log

        aligned_off = fd_offset - fd_offset % _PAGE
        window = fd_offset - aligned_off
        access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
        own_fd = -1
        mm = None
        try:
            own_fd = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
            mm = mmap.mmap(own_fd, window + size, access=access, offset=aligned_off, **_MMAP_KWARGS)
        except (OSError, ValueError, OverflowError) as exc:
            if own_fd >= 0:
                os.close(own_fd)
            raise DmaError(
                f"cannot map fd {fd} offset {fd_offset:#x} size {size:#x} at gpa {gpa:#x}: {exc}"
            ) from exc

        r = _Region()
        r.gpa = gpa
        r.end = gpa + size
        r.delta = gpa - window  # mmap offset of address a is a - delta
        r.writable = bool(writable)
        r.mm = mm
        r.fd = own_fd
        r.desc = MemoryRegion(gpa, size, fd_offset, bool(writable), name)
        try:
            r.export()
        except BaseException:
            r.unexport()
            mm.close()
            os.close(own_fd)
            raise
        if d is not None and follow:
            d.add(gpa, size)  # before the region is reachable: its first write is logged
        self._table = ([*starts[:i], gpa, *starts[i:]], [*regions[:i], r, *regions[i:]])
        self._fds[gpa] = own_fd
        return r.desc

    def unmap(self, gpa: int, size: int | None = None, *, forget_views: bool = False) -> None:
        """Unmap the region that starts at ``gpa``.

        All or nothing: if views of the region are still alive the region stays
        mapped and usable, and :class:`~pcidev.errors.DmaError` says so. Release the
        views (leave the ``access`` block, ``view.release()``, or drop them) and
        retry.

        With ``forget_views`` the region leaves the table all the same (its range is free
        for a new map at once): the mapping itself lives on, unreachable through this
        object, until the last view of it is released. For a transport whose client left
        while a view was stuck (no write through it reaches the next client's memory).

        :param gpa: start address of a mapped region.
        :param size: if given, must equal the region's size (a vfio-user
            ``DMA_UNMAP`` carries both).
        :param forget_views: do not refuse because views are alive (see above).
        :raises DmaError: no region starts at ``gpa``, ``size`` does not match, or
            views of the region are still exported.
        """
        self._check_open()
        starts, regions = self._table
        i = bisect_right(starts, gpa) - 1
        if i < 0 or starts[i] != gpa:
            raise DmaError(f"unmap: no region starts at {gpa:#x}")
        r = regions[i]
        if size is not None and size != r.desc.size:
            raise DmaError(f"unmap: size {size:#x} does not match region {_fmt(gpa, r.desc.size)}")
        if forget_views:
            r.unexport()
            try:
                r.mm.close()
            except BufferError:
                pass  # the views keep the mapping until they are released; this object forgets it
        else:
            self._release_region(r)
        self._table = (starts[:i] + starts[i + 1 :], regions[:i] + regions[i + 1 :])
        self._last = _NO_REGION
        os.close(self._fds.pop(gpa))

    def _release_region(self, r: _Region) -> None:
        """Close the mapping of ``r``, or restore it and raise if views are alive."""
        r.unexport()
        try:
            r.mm.close()
        except BufferError:
            r.export()  # back to a fully working region
            raise DmaError(
                f"cannot unmap {r.desc}: memoryviews of it are still alive "
                "(release them or leave the access() block first)"
            ) from None

    def regions(self) -> list[MemoryRegion]:
        """Descriptions of all mapped regions, sorted by ``gpa``.

        :returns: a new list.
        """
        return [r.desc for r in self._table[1]]

    def region_count(self) -> int:
        """How many regions are mapped (no list is built)."""
        return len(self._table[1])

    def overlapping(self, gpa: int, size: int) -> MemoryRegion | None:
        """A mapped region that shares a byte with ``[gpa, gpa + size)``, or ``None``
        (``O(log n)``: a ``bisect`` over the sorted starts).

        :param gpa: first address.
        :param size: length in bytes (> 0).
        :returns: such a region's description, or ``None``.
        """
        starts, regions = self._table
        i = bisect_right(starts, gpa)
        if i > 0 and regions[i - 1].end > gpa:
            return regions[i - 1].desc
        if i < len(regions) and regions[i].gpa < gpa + size:
            return regions[i].desc
        return None

    def region_at(self, gpa: int) -> MemoryRegion | None:
        """The region containing address ``gpa``, or ``None``.

        :param gpa: any address.
        :returns: the region's description or ``None``.
        """
        starts, regions = self._table
        i = bisect_right(starts, gpa) - 1
        if i >= 0 and gpa < regions[i].end:
            return regions[i].desc
        return None

    def is_mapped(self, gpa: int, length: int, *, write: bool = False) -> bool:
        """Whether ``[gpa, gpa + length)`` is fully accessible (writable with ``write``).

        :param gpa: first address.
        :param length: number of bytes.
        :param write: also require every byte to be writable.
        :returns: ``True`` if the access would succeed.
        """
        try:
            self._resolve(gpa, length, write)
        except DmaError:
            return False
        return True

    def fd_of(self, gpa: int) -> int:
        """The fd backing the region that starts at ``gpa``, e.g. to send with ``SCM_RIGHTS``.

        It is this object's own duplicate: do not close it; it is valid until the
        region is unmapped. The region's data starts at ``regions()[...].fd_offset``.

        :param gpa: start address of a mapped region.
        :returns: the fd.
        :raises DmaError: no region starts at ``gpa``.
        """
        try:
            return self._fds[gpa]
        except KeyError:
            raise DmaError(f"no region starts at {gpa:#x}") from None

    def fds(self) -> list[tuple[MemoryRegion, int]]:
        """Every region with its fd (see :meth:`fd_of`), sorted by ``gpa``.

        :returns: a new list of ``(region, fd)`` pairs.
        """
        return [(r.desc, r.fd) for r in self._table[1]]

    def start_dirty_log(self, ranges: Iterable[tuple[int, int]] | None = None) -> DirtyLog:
        """Start logging the pages the device writes (:attr:`dirty`).

        :param ranges: ``(iova, length)`` ranges, page-aligned; None: all mapped memory,
            now and later: every region mapped now and every region mapped while logging
            (widened to whole pages; :meth:`map` refuses a region beyond the log's limits).
            With ranges, regions mapped later inside a range are logged too. An unmap
            keeps its pages' bits.
        :returns: the new log.
        :raises DmaError: logging is on already, or bad ranges (see :class:`DirtyLog`).
        """
        if self.dirty is not None:
            raise DmaError("dirty logging is already on")
        follow = ranges is None
        if ranges is None:
            spans: list[list[int]] = []
            for r in self.regions():
                lo = r.gpa - r.gpa % DIRTY_PAGE
                hi = min(-(-r.end // DIRTY_PAGE) * DIRTY_PAGE, ADDRESS_LIMIT)
                if spans and lo <= spans[-1][1]:
                    spans[-1][1] = max(spans[-1][1], hi)
                else:
                    spans.append([lo, hi])
            ranges = [(lo, hi - lo) for lo, hi in spans]
        log = DirtyLog(ranges, follow_maps=follow)
        self.dirty = log
        return log

    def stop_dirty_log(self) -> None:
        """Stop logging (idempotent)."""
        self.dirty = None

    def close(self) -> None:
        """Unmap every region. Idempotent.

        Regions whose views are still alive stay mapped (and the object stays
        usable for them); the others are unmapped, then
        :class:`~pcidev.errors.DmaError` lists what is left. Call again after
        releasing the views.

        :raises DmaError: some regions still have live views.
        """
        if self._closed:
            return
        busy = []
        for r in list(self._table[1]):
            try:
                self.unmap(r.gpa)
            except DmaError:
                busy.append(r.desc)
        if busy:
            raise DmaError(f"close: {len(busy)} region(s) still have live views: {busy}")
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        """``True`` after a successful :meth:`close`."""
        return self._closed

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        regions = self._table[1]
        total = sum(r.end - r.gpa for r in regions)
        return f"<GuestMemory {len(regions)} regions, {total:#x} bytes>"

    def _check_open(self) -> None:
        if self._closed:
            raise DmaError("guest memory is closed")

    # ------------------------------------------------------------- resolution

    def _resolve(self, gpa: int, length: int, write: bool) -> list[tuple[_Region, int, int]]:
        """Validate ``[gpa, gpa + length)`` and split it into ``(region, offset, n)``.

        ``offset`` is the offset in the region's mmap. Raises before returning
        anything if any byte is unmapped (or read-only with ``write``). Caches the
        last region.
        """
        gpa = operator.index(gpa)
        length = operator.index(length)
        if gpa < 0 or length < 0:
            raise DmaError(f"negative guest address or length {_fmt(gpa, length)}")
        if gpa + length > ADDRESS_LIMIT:
            raise DmaError(f"guest range {_fmt(gpa, length)} wraps past 2**64")
        if length == 0:
            return []
        starts, regions = self._table
        i = bisect_right(starts, gpa) - 1
        if i < 0 or gpa >= regions[i].end:
            raise DmaError(f"guest address {gpa:#x} of {_fmt(gpa, length)} is not mapped")
        r = regions[i]
        segs = []
        cur, remaining = gpa, length
        while True:
            if write and not r.writable:
                raise DmaError(f"guest range {_fmt(gpa, length)} hits read-only {r.desc}")
            n = min(remaining, r.end - cur)
            segs.append((r, cur - r.delta, n))
            remaining -= n
            cur += n
            if not remaining:
                break
            i += 1
            if i >= len(regions) or regions[i].gpa != cur:
                raise DmaError(f"guest address {cur:#x} of {_fmt(gpa, length)} is not mapped")
            r = regions[i]
        self._last = r
        return segs

    def _single(self, gpa: int, length: int, write: bool) -> _Region | None:
        """Region holding the whole range, ``None`` if it spans several; validates."""
        segs = self._resolve(gpa, length, write)
        return segs[0][0] if len(segs) == 1 else None

    # ---------------------------------------------------------- bulk access

    def read(self, gpa: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest memory at ``gpa`` into a new ``bytes``.

        :param gpa: first address.
        :param length: number of bytes (0 returns ``b""``).
        :returns: the data.
        :raises DmaError: see the module docstring.
        """
        r = self._last
        if r.gpa <= gpa and length >= 0 and gpa + length <= r.end:
            off = gpa - r.delta
            return r.mm[off : off + length]
        segs = self._resolve(gpa, length, False)
        return b"".join([s[0].mm[s[1] : s[1] + s[2]] for s in segs])

    def read_into(self, gpa: int, buf: Any) -> None:
        """Fill the writable buffer ``buf`` from guest memory at ``gpa``.

        :param gpa: first address.
        :param buf: any writable C-contiguous buffer; its byte length is the length.
        :raises DmaError: see the module docstring (``buf`` is untouched then).
        """
        with memoryview(buf) as mv, mv.cast("B") as out:
            pos = 0
            for r, off, n in self._resolve(gpa, out.nbytes, False):
                out[pos : pos + n] = r.mv_ro[off : off + n]
                pos += n

    def write(self, gpa: int, data: Any) -> None:
        """Copy ``data`` (any C-contiguous buffer) into guest memory at ``gpa``.

        :param gpa: first address.
        :param data: bytes, bytearray, memoryview, array...
        :raises DmaError: see the module docstring; nothing is written then.
        """
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        n = len(data)
        r = self._last
        if r.writable and r.gpa <= gpa and gpa + n <= r.end:
            off = gpa - r.delta
            r.mm[off : off + n] = data
            d = self.dirty
            if d is not None:
                d.mark(gpa, n)
            return
        pos = 0
        for r, off, k in self._resolve(gpa, n, True):
            r.mm[off : off + k] = data[pos : pos + k]
            pos += k
        d = self.dirty
        if d is not None:
            d.mark(gpa, n)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        """Set ``length`` bytes at ``gpa`` to ``byte``.

        :param gpa: first address.
        :param length: number of bytes.
        :param byte: value, 0..255.
        :raises DmaError: see the module docstring; nothing is written then.
        :raises ValueError: ``byte`` is not in 0..255.
        """
        if type(byte) is not int or not 0 <= byte <= 0xFF:
            raise ValueError(f"fill byte {byte!r} is not in 0..255")
        for r, off, n in self._resolve(gpa, length, True):
            r.pin.fill(off, n, byte)
        d = self.dirty
        if d is not None:
            d.mark(gpa, length)

    def copy(self, dst_gpa: int, src_gpa: int, length: int) -> None:
        """Copy ``length`` bytes from ``src_gpa`` to ``dst_gpa`` (``memmove`` semantics).

        Overlapping ranges are handled. Both ranges are validated before anything
        is written.

        :param dst_gpa: destination address (must be writable).
        :param src_gpa: source address.
        :param length: number of bytes.
        :raises DmaError: see the module docstring.
        """
        src = self._resolve(src_gpa, length, False)
        dst = self._resolve(dst_gpa, length, True)
        if not length:
            return
        if len(src) == 1 and len(dst) == 1 and src[0][0] is dst[0][0]:
            # One mapping: memmove copes with overlap.
            r = dst[0][0]
            r.pin.move(dst[0][1], src[0][1], length)
            d = self.dirty
            if d is not None:
                d.mark(dst_gpa, length)
            return
        # Different mappings may alias the same file pages, which memmove cannot
        # see: go through a bounce buffer (correct whatever the aliasing).
        bounce = bytearray(length)
        pos = 0
        for r, off, n in src:
            bounce[pos : pos + n] = r.mv_ro[off : off + n]
            pos += n
        pos = 0
        for r, off, n in dst:
            r.mm[off : off + n] = memoryview(bounce)[pos : pos + n]
            pos += n
        d = self.dirty
        if d is not None:
            d.mark(dst_gpa, length)

    # --------------------------------------------------------- typed access

    def _unpack_slow(self, st: struct.Struct, gpa: int) -> tuple[Any, ...]:
        starts, regions = self._table
        i = bisect_right(starts, gpa) - 1
        if i >= 0:
            r = regions[i]
            if gpa <= r.end - st.size:  # bisect already gives r.gpa <= gpa
                self._last = r
                return st.unpack_from(r.mm, gpa - r.delta)
        segs = self._resolve(gpa, st.size, False)
        if len(segs) == 1:
            r, off, _ = segs[0]
            return st.unpack_from(r.mm, off)
        data = b"".join([s[0].mm[s[1] : s[1] + s[2]] for s in segs])
        return st.unpack(data)

    def _pack_slow(self, st: struct.Struct, gpa: int, values: tuple[Any, ...]) -> None:
        """Typed write off the fast path (values already range-checked)."""
        starts, regions = self._table
        i = bisect_right(starts, gpa) - 1
        if i >= 0:
            r = regions[i]
            if r.writable and gpa <= r.end - st.size:
                self._last = r
                off = gpa - r.delta
                r.mm[off:off + st.size] = st.pack(*values)  # (one copy, as the fast path)
                d = self.dirty
                if d is not None:
                    d.mark(gpa, st.size)
                return
        self._write_slow(gpa, st.pack(*values))

    def _write_slow(self, gpa: int, data: bytes) -> None:
        pos = 0
        for r, off, n in self._resolve(gpa, len(data), True):
            r.mm[off : off + n] = data[pos : pos + n]
            pos += n
        d = self.dirty
        if d is not None:
            d.mark(gpa, len(data))

    def read_u8(self, gpa: int) -> int:
        """Read one byte at ``gpa``.

        :raises DmaError: not mapped.
        """
        r = self._last
        if r.gpa <= gpa < r.end:
            return _u8_unpack(r.mm, gpa - r.delta)[0]
        value: int = self._unpack_slow(_U8, gpa)[0]
        return value

    def read_u16(self, gpa: int) -> int:
        """Read a little-endian 16-bit value at ``gpa`` (any alignment).

        :raises DmaError: not mapped.
        """
        r = self._last
        if r.gpa <= gpa <= r.end - 2:
            return _u16_unpack(r.mm, gpa - r.delta)[0]
        value: int = self._unpack_slow(_U16, gpa)[0]
        return value

    def read_u32(self, gpa: int) -> int:
        """Read a little-endian 32-bit value at ``gpa`` (any alignment; not ordered).

        :raises DmaError: not mapped.
        """
        r = self._last
        if r.gpa <= gpa <= r.end - 4:
            return _u32_unpack(r.mm, gpa - r.delta)[0]
        value: int = self._unpack_slow(_U32, gpa)[0]
        return value

    def read_u64(self, gpa: int) -> int:
        """Read a little-endian 64-bit value at ``gpa`` (any alignment; not ordered).

        :raises DmaError: not mapped.
        """
        r = self._last
        if r.gpa <= gpa <= r.end - 8:
            return _u64_unpack(r.mm, gpa - r.delta)[0]
        value: int = self._unpack_slow(_U64, gpa)[0]
        return value

    def write_u8(self, gpa: int, value: int) -> None:
        """Write one byte at ``gpa``.

        :raises DmaError: not mapped or read-only.
        :raises struct.error: ``value`` does not fit.
        """
        if not 0 <= value <= 0xFF:  # (a clear message; nothing is written)
            raise struct.error(f"{value!r} does not fit in 8 bits")
        r = self._last
        if r.writable and r.gpa <= gpa < r.end:
            off = gpa - r.delta
            r.mm[off:off + 1] = _u8_bytes(value)  # (one copy: never pack_into's transient zeros)
            d = self.dirty
            if d is not None:
                d.mark(gpa, 1)
            return
        self._pack_slow(_U8, gpa, (value,))

    def write_u16(self, gpa: int, value: int) -> None:
        """Write ``value`` little-endian as 16 bits at ``gpa``.

        :raises DmaError: not mapped or read-only.
        :raises struct.error: ``value`` does not fit.
        """
        if not 0 <= value <= 0xFFFF:  # (a clear message; nothing is written)
            raise struct.error(f"{value!r} does not fit in 16 bits")
        r = self._last
        if r.writable and r.gpa <= gpa <= r.end - 2:
            off = gpa - r.delta
            r.mm[off:off + 2] = _u16_bytes(value)  # (one copy: never pack_into's transient zeros)
            d = self.dirty
            if d is not None:
                d.mark(gpa, 2)
            return
        self._pack_slow(_U16, gpa, (value,))

    def write_u32(self, gpa: int, value: int) -> None:
        """Write ``value`` little-endian as 32 bits at ``gpa`` (not ordered).

        :raises DmaError: not mapped or read-only.
        :raises struct.error: ``value`` does not fit.
        """
        if not 0 <= value <= 0xFFFF_FFFF:  # (a clear message; nothing is written)
            raise struct.error(f"{value!r} does not fit in 32 bits")
        r = self._last
        if r.writable and r.gpa <= gpa <= r.end - 4:
            off = gpa - r.delta
            r.mm[off:off + 4] = _u32_bytes(value)  # (one copy: never pack_into's transient zeros)
            d = self.dirty
            if d is not None:
                d.mark(gpa, 4)
            return
        self._pack_slow(_U32, gpa, (value,))

    def write_u64(self, gpa: int, value: int) -> None:
        """Write ``value`` little-endian as 64 bits at ``gpa`` (not ordered).

        :raises DmaError: not mapped or read-only.
        :raises struct.error: ``value`` does not fit.
        """
        if not 0 <= value <= 0xFFFF_FFFF_FFFF_FFFF:  # (a clear message; nothing is written)
            raise struct.error(f"{value!r} does not fit in 64 bits")
        r = self._last
        if r.writable and r.gpa <= gpa <= r.end - 8:
            off = gpa - r.delta
            r.mm[off:off + 8] = _u64_bytes(value)  # (one copy: never pack_into's transient zeros)
            d = self.dirty
            if d is not None:
                d.mark(gpa, 8)
            return
        self._pack_slow(_U64, gpa, (value,))

    def read_struct(self, st: struct.Struct, gpa: int) -> tuple[Any, ...]:
        """Unpack ``st`` (use an explicit ``"<"`` format) from guest memory at ``gpa``.

        :param st: a compiled :class:`struct.Struct`.
        :param gpa: first address.
        :returns: the unpacked tuple.
        :raises DmaError: see the module docstring.
        """
        r = self._last
        if r.gpa <= gpa <= r.end - st.size:
            return st.unpack_from(r.mm, gpa - r.delta)
        return self._unpack_slow(st, gpa)

    def write_struct(self, st: struct.Struct, gpa: int, *values: Any) -> None:
        """Pack ``values`` with ``st`` into guest memory at ``gpa``.

        :param st: a compiled :class:`struct.Struct`.
        :param gpa: first address.
        :param values: the fields.
        :raises DmaError: see the module docstring; nothing is written then.
        :raises struct.error: the values do not match ``st``; nothing is written.
        """
        # Pack first: struct.pack_into can write part of the bytes before
        # raising on a bad value, which would leave guest memory half-updated.
        data = st.pack(*values)
        r = self._last
        if r.writable and r.gpa <= gpa <= r.end - len(data):
            off = gpa - r.delta
            r.mm[off : off + len(data)] = data
            d = self.dirty
            if d is not None:
                d.mark(gpa, len(data))
            return
        self._write_slow(gpa, data)

    # ------------------------------------------------------ ordered access

    def _ordered_slow(self, gpa: int, width: int, write: bool) -> tuple[native.Pinned, int]:
        """Find the pin and mmap offset for an ordered access, or raise."""
        r = self._single(gpa, width, write)
        if r is None:
            raise DmaError(f"ordered {width * 8}-bit access at {gpa:#x} crosses a region boundary")
        if gpa & (width - 1):
            raise DmaError(f"ordered {width * 8}-bit access at {gpa:#x} is misaligned")
        return r.pin, gpa - r.delta

    def load32(self, gpa: int) -> int:
        """Single aligned 32-bit load with acquire ordering (see :mod:`pcidev.native`).

        Use for values another process or thread writes concurrently (doorbells,
        flags): later reads are not reordered before it.

        :param gpa: 4-byte aligned address.
        :returns: the little-endian value.
        :raises DmaError: unmapped, misaligned, or crossing a region boundary.
        """
        r = self._last
        if r.gpa <= gpa <= r.end - 4 and not gpa & 3:
            return r.pin.load32(gpa - r.delta)
        p, off = self._ordered_slow(gpa, 4, False)
        return p.load32(off)

    def load64(self, gpa: int) -> int:
        """Single aligned 64-bit load with acquire ordering.

        :param gpa: 8-byte aligned address.
        :returns: the little-endian value.
        :raises DmaError: unmapped, misaligned, or crossing a region boundary.
        """
        r = self._last
        if r.gpa <= gpa <= r.end - 8 and not gpa & 7:
            return r.pin.load64(gpa - r.delta)
        p, off = self._ordered_slow(gpa, 8, False)
        return p.load64(off)

    def store32(self, gpa: int, value: int) -> None:
        """Single aligned 32-bit store with release ordering.

        Earlier writes (e.g. a completion entry) are visible before it (e.g. the
        phase tag or flag it publishes).

        :param gpa: 4-byte aligned address.
        :param value: 0 .. 2**32-1.
        :raises DmaError: unmapped, read-only, misaligned, or crossing a boundary.
        :raises OverflowError: ``value`` does not fit.
        """
        r = self._last
        if r.writable and r.gpa <= gpa <= r.end - 4 and not gpa & 3:
            r.pin.store32(gpa - r.delta, value)
            d = self.dirty
            if d is not None:
                d.mark(gpa, 4)
            return
        p, off = self._ordered_slow(gpa, 4, True)
        p.store32(off, value)
        d = self.dirty
        if d is not None:
            d.mark(gpa, 4)

    def store64(self, gpa: int, value: int) -> None:
        """Single aligned 64-bit store with release ordering.

        :param gpa: 8-byte aligned address.
        :param value: 0 .. 2**64-1.
        :raises DmaError: unmapped, read-only, misaligned, or crossing a boundary.
        :raises OverflowError: ``value`` does not fit.
        """
        r = self._last
        if r.writable and r.gpa <= gpa <= r.end - 8 and not gpa & 7:
            r.pin.store64(gpa - r.delta, value)
            d = self.dirty
            if d is not None:
                d.mark(gpa, 8)
            return
        p, off = self._ordered_slow(gpa, 8, True)
        p.store64(off, value)
        d = self.dirty
        if d is not None:
            d.mark(gpa, 8)

    # --------------------------------------------------------------- views

    def views(self, gpa: int, length: int, *, write: bool = False) -> list[memoryview]:
        """Memoryview slices covering ``[gpa, gpa + length)``, split at region boundaries.

        The views point straight into the mapping (no copy): pass them to
        ``os.preadv`` (``write=True``) or ``os.pwritev``. Without ``write`` they are
        read-only. Release them promptly (see :meth:`access`): they block
        :meth:`unmap`.

        :param gpa: first address.
        :param length: number of bytes (0 returns ``[]``).
        :param write: writable views; every byte must be in a writable region.
        :returns: one view per region touched.
        :raises DmaError: see the module docstring.
        """
        r = self._last
        if r.gpa <= gpa and length > 0 and gpa + length <= r.end:
            off = gpa - r.delta
            if not write:
                return [r.mv_ro[off : off + length]]
            if r.writable:
                d = self.dirty
                if d is not None:
                    d.mark_view(gpa, length)
                return [r.mv_rw[off : off + length]]
        segs = self._resolve(gpa, length, write)
        if write:
            d = self.dirty
            if d is not None:
                d.mark_view(gpa, length)
            return [s[0].mv_rw[s[1] : s[1] + s[2]] for s in segs]
        return [s[0].mv_ro[s[1] : s[1] + s[2]] for s in segs]

    def sg_views(self, sgl: Iterable[tuple[int, int]], *, write: bool = False) -> list[memoryview]:
        """Views for a scatter-gather list of ``(gpa, length)`` entries, in order.

        If any entry is invalid, the views already created are released before
        the error propagates, so an error leaves nothing pinned. Zero-length
        entries contribute no view.

        :param sgl: iterable of ``(gpa, length)`` pairs.
        :param write: writable views.
        :returns: the concatenated views of all entries.
        :raises DmaError: any entry is invalid (see the module docstring).
        """
        views: list[memoryview] = []
        dirty = self.dirty if write else None
        try:
            for entry in sgl:
                try:
                    gpa, length = entry
                except (TypeError, ValueError):
                    raise DmaError(f"bad scatter-gather entry {entry!r}") from None
                r = self._last
                if (
                    r.gpa <= gpa
                    and length > 0
                    and gpa + length <= r.end
                    and (r.writable or not write)
                ):
                    off = gpa - r.delta
                    views.append((r.mv_rw if write else r.mv_ro)[off : off + length])
                else:
                    for r, off, n in self._resolve(gpa, length, write):
                        views.append((r.mv_rw if write else r.mv_ro)[off : off + n])
                if dirty is not None and length:
                    dirty.mark_view(gpa, length)
        except BaseException:
            # Release what was created so far: a traceback keeps this frame's
            # locals alive, and unreleased views would block unmap.
            for v in views:
                v.release()
            raise
        return views

    def access(self, sgl: Iterable[tuple[int, int]], *, write: bool = False) -> _Access:
        """Context manager yielding :meth:`sg_views` and releasing them on exit.

        ::

            with gm.access([(prp1, 4096), (prp2, 4096)], write=True) as views:
                os.preadv(backing_fd, views, offset)

        Slices taken from the yielded views are not released by the block; drop
        them before it ends.

        :param sgl: iterable of ``(gpa, length)`` pairs.
        :param write: writable views.
        :returns: a context manager whose ``__enter__`` returns ``list[memoryview]``.
        :raises DmaError: any entry is invalid (raised here, before the block runs).
        """
        return _Access(self.sg_views(sgl, write=write))
