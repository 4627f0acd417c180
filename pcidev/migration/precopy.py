"""Memory contents over a migration channel without descriptors: pre-copy while the
device runs, the rest at the stop, and the destination's staging (docs/migration.md §6).

Over a UNIX socket a memfd that a device's vmstate stream names by an
:class:`~pcidev.vmstate.FdRef` travels as itself (``SCM_RIGHTS``). Over TCP it cannot:
its **contents** travel instead. The device lists such objects as
:class:`~pcidev.memory_source.MemorySource` (:meth:`pcidev.device.PciDevice.memory_sources`:
RAM BARs by default, a device's own memfds beside them), and:

* the source (:class:`Precopy`) first runs the pre-flight (:mod:`pcidev.migration.preflight`:
  a destination that cannot take the device refuses before anything is copied), announces
  them in a ``MEMORY`` frame, then copies them
  while the device keeps running (:meth:`Precopy.run`: the first pass skips holes with
  ``SEEK_DATA``/``SEEK_HOLE`` and chunks of zeros; each further iteration sends what was
  written since the previous one; with a destination that takes ``SYNC`` each pass ends
  when the destination has applied it) until what is left fits the downtime budget at the
  measured bandwidth, or ``max_iterations`` passed; after the caller stopped the device,
  :meth:`Precopy.finish` sends the rest (inside the downtime), and
  :func:`~pcidev.migration.channel.migrate_out` sends the OFFER (protocol 2, with
  ``fd_sources``: which of the stream's descriptor indexes each source stands for) and
  the state as usual;
* what was written is known exactly from a :class:`~pcidev.memory_source.DirtyBitmap`
  that the device marks on every write it makes; a source without one (a RAM BAR a
  vfio-user client maps: its writes never pass through this process) is tracked by
  the CRC-32C of each 4 KiB page, compared each iteration and at the stop (about
  0.1 s of CPU per GiB hashed, plus the read: docs/migration.md §6);
* the destination (:class:`StagedMemory`, driven by
  :func:`~pcidev.migration.channel.migrate_in`) collects the contents in memfds of its
  own, never mapped here (``pwrite``; sparse: a chunk of zeros punches a hole), checks everything (sizes, names,
  offsets, frame order), and hands the load a descriptor list in which each streamed
  index is its staging memfd and every other index None (guest RAM and interrupt
  eventfds: the host attaches them, as over TCP before). The staging memfds are closed
  whatever happens (the load keeps duplicates of what it adopts).

Nothing here changes the source device: reading its memory and the dirty bitmaps (the
only new state, beside it) is all pre-copy does, so a destination that dies or refuses
during pre-copy leaves the device running as it was (:meth:`Precopy.abort` stops the
tracking).

Wire format (frames of :mod:`pcidev.migration.frames`, little-endian)::

    MEMORY 14  msgpack {"protocol": 2, "sources": [{"name": str, "size": int}...], "boot_id"}
               (the first frame; another MEMORY may add sources before the OFFER)
    CHUNK  15  "<HQI" name length, offset, length | name (UTF-8) | data: ``length``
               bytes, or none (``length`` bytes of zeros: a hole)
    SYNC   18  msgpack {"seq", "sent"}: the end of a pass (only when the VERDICT named "sync")
    SYNCED 19  msgpack {"seq", "applied"}: the destination's answer, once everything before
               the SYNC is applied ("applied" must equal "sent")
    OFFER   1  as in protocol 1, with "protocol": 2, "stream_fds": the number of the
               stream's descriptors, "fd_sources": {str(index): source name}
"""

from __future__ import annotations

import array
import errno
import math
import mmap
import os
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import crc32c

from pcidev.device import PciDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import DmaError, MigrationError, TransportError
from pcidev.memory_source import ALLOCATION_PAGE, ContentDescriptors, DirtyBitmap, MemorySource, object_name
from pcidev.migration.frames import (
    CHUNK,
    FEATURE_SYNC,
    MAX_OFFER_FDS,
    MEMORY,
    NACK,
    PROTOCOL_MEMORY,
    SYNC,
    SYNCED,
    boot_id,
    frame_meta,
    frame_name,
    peer_data,
    recv_frame,
    send_meta,
    send_parts,
)
from pcidev.migration.preflight import Verdict, ask
from pcidev.sriov import vf_memory_objects
from pcidev.transport.fdpass import close_fds, is_unix

__all__ = [
    "DirtyBitmap",
    "MemorySource",
    "PrecopyReport",
    "Precopy",
    "StagedMemory",
    "destination_sources",
    "checked_sources",
    "passes_stalled",
    "TrackedSource",
    "track_sources",
    "check_source_name",
    "file_id",
    "fd_source_names",
    "is_zero",
    "CHUNK_HEAD",
    "MAX_CHUNK",
    "MAX_SOURCES",
    "MAX_SOURCE_NAME",
    "MAX_MEMORY_SIZE",
    "MAX_CHUNK_FRAME",
    "MAX_ROUNDS",
    "HASH_PAGE",
]

#: the most data one CHUNK carries (1 MiB)
MAX_CHUNK = 1 << 20
#: the most memory sources one migration announces
MAX_SOURCES = 64
#: the longest source name (bytes of UTF-8)
MAX_SOURCE_NAME = 64
#: the sum of the announced sizes a destination accepts by default (16 GiB): staging
#: memfds are sparse, but a hostile source could fill every byte it announced
MAX_MEMORY_SIZE = 16 << 30
#: how many times over a destination accepts the announced memory by default (each pass
#: of a pre-copy may re-send what the device dirtied, up to all of it; a source's default
#: ``max_iterations`` plus the stop is 31): past it a source that keeps re-sending is
#: refused, which bounds the incoming stream's time (:func:`~pcidev.migration.channel.migrate_in`'s
#: deadline grows with the bytes applied)
MAX_ROUNDS = 64
#: the page whose CRC-32C tracks a source without a dirty bitmap
HASH_PAGE = 4096
#: a CHUNK body's head: the name's length, the offset, the data's length (the name
#: and the data follow; no data: that many zeros)
CHUNK_HEAD = struct.Struct("<HQI")
#: the longest CHUNK body
MAX_CHUNK_FRAME = CHUNK_HEAD.size + MAX_SOURCE_NAME + MAX_CHUNK
_ZEROS = bytes(MAX_CHUNK)
_ZERO_PAGE_CRC = crc32c.crc32c(bytes(HASH_PAGE))
#: how often (chunks) the source looks for a refusal from the destination during pre-copy
_POLL_EVERY = 8


def is_zero(data: bytes) -> bool:
    """Whether ``data`` (at most :data:`MAX_CHUNK` bytes) is all zeros: a CHUNK without
    data (a hole), or nothing at all on a first copy."""
    return data == (_ZEROS if len(data) == MAX_CHUNK else _ZEROS[:len(data)])


#: what a source name may hold: ASCII letters, digits and ``_ . / : + -`` (no space, no
#: control character, nothing a memfd name or a log line could choke on)
_NAME = re.compile(r"[A-Za-z0-9_./:@+-]+")
#: a descriptor index in an OFFER's ``fd_sources``: plain ASCII decimal, no leading zero
_INDEX = re.compile(r"0|[1-9][0-9]{0,4}")


def check_source_name(name: object) -> str:
    """A source name's checks (shared by both sides and every carrier): a non-empty string of at most
    :data:`MAX_SOURCE_NAME` characters of ``[A-Za-z0-9_./:@+-]``.

    :raises ValueError: why not.
    """
    if not isinstance(name, str) or not name:
        raise ValueError("a source name must be a non-empty string")
    if len(name) > MAX_SOURCE_NAME:
        raise ValueError(f"source name {name[:MAX_SOURCE_NAME]!r}... is longer than {MAX_SOURCE_NAME} bytes")
    if not _NAME.fullmatch(name):
        raise ValueError(f"source name {name!r} holds a character other than ASCII letters, digits and _./:+-")
    return name


# ------------------------------------------------------------------------ source
@attrs.frozen
class PrecopyReport:
    """What a pre-copy did.

    :ivar iterations: passes made while the device ran (the first copies everything).
    :ivar bytes_per_iteration: bytes of contents sent in each pass.
    :ivar converged: the remainder was estimated to fit ``max_downtime_ms`` at the
        measured bandwidth when the iterations ended (False: ``max_iterations`` ended them).
    :ivar remainder_bytes: bytes sent at the stop (:meth:`Precopy.finish`).
    :ivar bandwidth: bytes per second measured while the device ran (0: nothing sent).
    :ivar estimated_downtime_ms: the copy time of the remainder estimated at the end
        of the iterations (bandwidth and hashing rate), in milliseconds (infinite, None in
        :meth:`as_dict`: not known, e.g. the first pass never ended).
    :ivar hashed_bytes: bytes hashed page by page (sources without a bitmap).
    :ivar hash_seconds: time spent hashing them.
    :ivar finish_seconds: time :meth:`Precopy.finish` took (part of the downtime).
    :ivar synced: each pass ended with a SYNC round trip (negotiated in the pre-flight):
        ``bandwidth`` is the rate at which the destination *applied* the contents, and no
        backlog in the socket buffers was left when the passes ended (False: the rate at
        which the socket accepted them, as with a destination from before SYNC).
    :ivar ended: why the passes ended: ``"converged"`` (the remainder fits the budget),
        ``"not-converging"`` (``max_stalled_passes`` passes in a row sent no less than
        the smallest pass before them: the device dirties its memory as fast as the
        channel carries it, so more passes would only take time), ``"max-iterations"``,
        or ``""`` (no pass ran, or :meth:`Precopy.run` has not ended).
    """

    iterations: int = 0
    bytes_per_iteration: tuple[int, ...] = ()
    converged: bool = False
    remainder_bytes: int = 0
    bandwidth: float = 0.0
    estimated_downtime_ms: float = 0.0
    hashed_bytes: int = 0
    hash_seconds: float = 0.0
    finish_seconds: float = 0.0
    synced: bool = False
    ended: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {"iterations": self.iterations, "bytes_per_iteration": list(self.bytes_per_iteration),
                "converged": self.converged, "remainder_bytes": self.remainder_bytes,
                "bandwidth": self.bandwidth,
                "estimated_downtime_ms": (self.estimated_downtime_ms if math.isfinite(self.estimated_downtime_ms)
                                          else None),
                "hashed_bytes": self.hashed_bytes, "hash_seconds": self.hash_seconds,
                "finish_seconds": self.finish_seconds, "synced": self.synced, "ended": self.ended}


def file_id(fd: int) -> tuple[int, int]:
    """The identity of the object ``fd`` opens: ``(st_dev, st_ino)``.

    :raises OSError: ``fstat`` failed.
    """
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _reopen(fd: int) -> int:
    """A descriptor of the same object with its own file offset (SEEK_DATA must not move
    the device's), falling back to a duplicate."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return os.dup(fd)


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ranges of ``fd`` that hold data (``SEEK_DATA``/``SEEK_HOLE``; everything when
    the file system cannot say)."""
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return
            yield off, size - off
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        off = end


def fd_source_names(by_id: Mapping[tuple[int, int], str], fds: Sequence[int]) -> dict[str, str]:
    """An OFFER's ``fd_sources``: ``{str(index): name}`` for each of ``fds`` (a saved
    stream's descriptors) that is one of ``by_id``'s objects.

    :param by_id: source names by :func:`file_id` (:attr:`TrackedSource.ident`).
    :param fds: the descriptors :func:`~pcidev.migration.snapshot.save_device_stream` returned.
    """
    out = {}
    for i, fd in enumerate(fds):
        try:
            name = by_id.get(file_id(fd))
        except OSError:
            continue
        if name is not None:
            out[str(i)] = name
    return out


class TrackedSource:
    """One memory source on the sending side of any carrier of its contents (the TCP
    pre-copy, :class:`Precopy`; vfio-user migration data,
    :class:`~pcidev.transport.vfio_user.migration_data.OutboundData`): its own
    descriptor, its identity and the tracking of what was written since it was last
    sent (its :class:`~pcidev.memory_source.DirtyBitmap`, else the CRC-32C of each
    :data:`HASH_PAGE` as last sent, hashed in a read-only mapping). The carrier frames
    what :meth:`changes` and :meth:`everything` yield as CHUNKs (:data:`CHUNK_HEAD`,
    :attr:`head`; :func:`is_zero` data as a hole). Open several at once with
    :func:`track_sources`; :meth:`close` whatever happens.

    :param src: the source (checked: :func:`checked_sources`).
    :raises ValueError: its name is invalid, or a buffer source has no bitmap.
    :raises OSError: its descriptor cannot be reopened or mapped.
    """

    def __init__(self, src: MemorySource) -> None:
        #: the source's name (checked)
        self.name = check_source_name(src.name)
        #: its size in bytes
        self.size = src.size
        #: its dirty bitmap (None: tracked by page hashes)
        self.bitmap = src.bitmap
        if src.buffer is not None and (src.bitmap is None or len(src.buffer) < src.size):
            raise ValueError(f"memory source {self.name!r}: a source read from a buffer needs a bitmap "
                             "and a buffer of its size")
        #: the contents when ``fd`` only names the object (MemorySource.buffer)
        self.buffer = src.buffer
        #: the identity of its object (:func:`file_id`)
        self.ident = file_id(src.fd)
        self.fd = _reopen(src.fd)
        #: its name as a CHUNK carries it (UTF-8)
        self.head = self.name.encode()
        #: CRC-32C of each page as last sent (sources without a bitmap)
        self.hashes: array.array[int] | None = None
        #: a read-only mapping to hash in place (sources without a bitmap)
        self.map: mmap.mmap | None = None
        if self.bitmap is None:
            self.hashes = array.array("I", [_ZERO_PAGE_CRC]) * ((self.size + HASH_PAGE - 1) // HASH_PAGE)
            try:
                self.map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            except (OSError, ValueError):
                os.close(self.fd)
                raise
        #: bytes that changed in the last hash scan after the first copy (the estimate of
        #: the next one; None: no such scan yet, the rate of change is unknown)
        self.changed_last: int | None = None
        #: bytes hashed page by page so far, and the seconds it took
        self.hashed_bytes = 0
        self.hash_seconds = 0.0

    def chunk_head(self, off: int, length: int) -> bytes:
        """A CHUNK body's head for ``length`` bytes at ``off`` (the data follows it, or
        nothing for a hole)."""
        return CHUNK_HEAD.pack(len(self.head), off, length) + self.head

    def changes(self, *, whole: bool) -> Iterator[tuple[int, bytes]]:
        """The contents to send, as ``(offset, data)`` pieces of at most :data:`MAX_CHUNK`
        bytes: with ``whole`` (the first copy) every range that may hold data, else what
        was written since the last call (the bitmap, cleared first) or the runs of pages
        whose hash is not the one last sent. A hashed piece is a copy taken after the scan
        and its pages' stored hashes are that copy's, so a scan once the writers stopped
        (at the stop) finds every difference; a scan that is not ``whole`` sets
        :attr:`changed_last`.

        :raises MigrationError: a short read.
        :raises OSError: reading failed.
        """
        if self.hashes is not None:
            yield from self._hashed(whole=whole)
            return
        assert self.bitmap is not None
        ranges = self.bitmap.take()  # clears: read after it (see DirtyBitmap)
        if whole:
            ranges = list(self.extents())
        for off, length in ranges:
            end = off + length
            while off < end:
                n = min(MAX_CHUNK, end - off)
                data = self.read(off, n)
                if len(data) != n:
                    raise MigrationError(f"memory source {self.name!r}: short read at {off:#x}")
                yield off, data
                off += n

    def everything(self) -> Iterator[tuple[int, bytes]]:
        """All of the contents, as ``(offset, data)`` pieces: what the destination has of it
        is not known to be right (its tracking was lost; the bitmap is cleared).

        :raises MigrationError: a short read.
        :raises OSError: reading failed.
        """
        if self.bitmap is not None:
            self.bitmap.take()
        for off in range(0, self.size, MAX_CHUNK):
            data = self.read(off, min(MAX_CHUNK, self.size - off))
            if not data:
                raise MigrationError(f"memory source {self.name!r}: short read at {off:#x}")
            yield off, data

    def _hashed(self, *, whole: bool) -> Iterator[tuple[int, bytes]]:
        """Hash every page in place (the read-only mapping: no copy) and yield each run of
        pages whose hash changed (see :meth:`changes`)."""
        hashes = self.hashes
        assert hashes is not None and self.map is not None
        extents = list(self.extents()) if whole else [(0, self.size)]
        changed = 0
        with memoryview(self.map) as whole_view:
            for off, length in extents:
                end = off + length
                off -= off % HASH_PAGE
                while off < end:
                    n = min(MAX_CHUNK, end - off, self.size - off)
                    h0 = time.perf_counter()
                    with whole_view[off:off + n] as view:
                        crcs = [crc32c.crc32c(view[i:i + HASH_PAGE]) for i in range(0, n, HASH_PAGE)]
                    self.hash_seconds += time.perf_counter() - h0
                    self.hashed_bytes += n
                    first = off // HASH_PAGE
                    runs = []
                    start = -1
                    for k, crc in enumerate(crcs):
                        if hashes[first + k] != crc:
                            if start < 0:
                                start = k
                        elif start >= 0:
                            runs.append((start, k))
                            start = -1
                    if start >= 0:
                        runs.append((start, len(crcs)))
                    for a, b in runs:
                        lo, hi = off + a * HASH_PAGE, min(off + b * HASH_PAGE, self.size)
                        piece = bytes(whole_view[lo:hi])
                        with memoryview(piece) as pv:
                            for k in range(a, b):
                                i = (k - a) * HASH_PAGE
                                hashes[first + k] = crc32c.crc32c(pv[i:i + HASH_PAGE])
                        changed += len(piece)
                        yield lo, piece
                    off += n
        if not whole:
            self.changed_last = changed

    def read(self, off: int, n: int) -> bytes:
        """``n`` bytes of the contents at ``off`` (fewer at the end)."""
        if self.buffer is not None:
            return bytes(self.buffer[off:min(off + n, self.size)])
        return os.pread(self.fd, n, off)

    def extents(self) -> Iterator[tuple[int, int]]:
        """The ranges that may hold data (a buffer: all of it; chunks of zeros are skipped)."""
        if self.buffer is not None:
            return iter([(0, self.size)])
        return _extents(self.fd, self.size)

    def close(self) -> None:
        """Stop the tracking, close the descriptor and the mapping (idempotent)."""
        self.buffer = None
        if self.bitmap is not None:
            self.bitmap.stop()
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # a scan in another thread still holds a view: the GC unmaps it
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def track_sources(sources: Sequence[MemorySource]) -> list[TrackedSource]:
    """Open each of ``sources`` as a :class:`TrackedSource` and start its bitmap (everything
    counts as written): all of them, or none (what was opened is closed on a failure).

    :param sources: the sources (:func:`checked_sources`).
    :returns: them, tracked, in the same order.
    :raises MigrationError: a source is unusable.
    """
    new: list[TrackedSource] = []
    try:
        for src in sources:
            t = TrackedSource(src)
            new.append(t)
            if t.bitmap is not None:
                t.bitmap.start()
    except (OSError, ValueError) as exc:
        for t in new:
            t.close()
        raise MigrationError(f"a memory source is unusable: {exc}") from exc
    return new


def checked_sources(device: PciDevice) -> list[MemorySource]:
    """``device``'s memory sources now, checked as every carrier of their contents needs
    them (names valid and unique, sizes positive, a bitmap covering its source, at most
    :data:`MAX_SOURCES`).

    :param device: the device.
    :returns: the sources.
    :raises MigrationError: ``memory_sources()`` failed or returned an unusable list.
    """
    try:
        sources = list(device.memory_sources())
    except Exception as exc:
        raise MigrationError(f"memory_sources() failed: {type(exc).__name__}: {exc}") from exc
    names: set[str] = set()
    for src in sources:
        try:
            check_source_name(src.name)
        except ValueError as exc:
            raise MigrationError(f"memory source: {exc}") from None
        if src.name in names:
            raise MigrationError(f"memory source {src.name!r} appears twice")
        if src.size <= 0:
            raise MigrationError(f"memory source {src.name!r} has size {src.size}")
        if src.bitmap is not None and src.bitmap.size < src.size:
            raise MigrationError(f"memory source {src.name!r}: its bitmap covers {src.bitmap.size} bytes "
                                 f"of {src.size}")
        names.add(src.name)
    if len(sources) > MAX_SOURCES:
        raise MigrationError(f"{len(sources)} memory sources (at most {MAX_SOURCES})")
    return sources


class Precopy:
    """Pre-copy of a device's memory sources on an open migration channel; the device
    keeps running (and serving) while :meth:`run` runs, in any thread.

    ``active`` is False when nothing is streamed (a UNIX channel, which passes the
    descriptors, or a device without memory sources): then every method does nothing
    and :func:`~pcidev.migration.channel.migrate_out` sends protocol 1 as always.

    :param device: the running source device.
    :param sock: the connected migration channel.
    :param max_downtime_ms: stop iterating once the remainder is estimated to take at
        most this long to send (and hash) at the measured rates.
    :param max_iterations: the most passes while the device runs (0: everything is
        sent at the stop).
    :param max_stalled_passes: end the passes (not converged) once this many in a row
        sent no fewer bytes than the smallest pass before them: the device dirties its
        memory at least as fast as the channel carries it, and further passes would not
        shrink the remainder (0: only ``max_iterations`` ends them).
    :param max_bandwidth: bytes per second the passes may send (None: unlimited); the
        remainder at the stop is sent at full speed.
    :param timeout: seconds each send may block, and the pre-flight's and each SYNC's
        answer may take.
    :param preflight: :meth:`run` starts with the pre-flight (:meth:`check`), before it
        copies anything; False: a destination from before it (no SYNC either).
    :raises MigrationError: the device's memory sources are unusable (nothing started).
    """

    def __init__(self, device: PciDevice, sock: socket.socket, *, max_downtime_ms: float = 10.0,
                 max_iterations: int = 30, max_bandwidth: float | None = None, timeout: float = 10.0,
                 preflight: bool = True, max_stalled_passes: int = 4) -> None:
        if (max_iterations < 0 or max_downtime_ms < 0 or max_stalled_passes < 0
                or (max_bandwidth is not None and max_bandwidth <= 0)):
            raise ValueError("max_iterations, max_stalled_passes and max_downtime_ms must be >= 0, "
                             "max_bandwidth > 0")
        self.device = device
        self.sock = sock
        self.max_downtime_ms = max_downtime_ms
        self.max_iterations = max_iterations
        self.max_stalled_passes = max_stalled_passes
        self.max_bandwidth = max_bandwidth
        self.timeout = timeout
        self.preflight = preflight
        #: the destination's answer to the pre-flight, once :meth:`check` ran
        self.verdict: Verdict | None = None
        self._tracked: dict[str, TrackedSource] = {}
        self._state = "new"  # new, running, ran, finishing, finished, aborted
        self._lock = threading.Lock()
        #: set by :meth:`abort`: a :meth:`run` or :meth:`finish` in another thread stops at
        #: its next chunk
        self._stop = threading.Event()
        #: clear while :meth:`run` or :meth:`finish` works (:meth:`abort` waits for it)
        self._idle = threading.Event()
        self._idle.set()
        self._worker: int | None = None
        self._iter_bytes: list[int] = []
        self._sent_time = 0.0
        self._sent_bytes = 0
        self._hash_bytes = 0
        self._hash_time = 0.0
        self._converged = False
        #: the stop's deadline while :meth:`finish` runs (each send ends by it)
        self._finish_by: float | None = None
        self._ended = ""
        self._estimate_ms = 0.0
        self._remainder = 0
        self._finish_time = 0.0
        self._chunks = 0
        self._throttle_from = 0.0
        self._throttle_bytes = 0
        #: bytes of contents sent so far (what a SYNCED must report applied)
        self._total = 0
        self._seq = 0
        self._synced = False
        sources = self._sources() if not is_unix(sock) else []
        self.active = bool(sources)
        self._initial = sources

    # -- what the engine knows -------------------------------------------------------------
    def _sources(self) -> list[MemorySource]:
        return checked_sources(self.device)

    def sources(self) -> list[MemorySource]:
        """The device's memory sources now, checked (on a UNIX channel: none; they may
        differ from those :meth:`run` announced: :meth:`finish` announces the new ones).

        :raises MigrationError: ``memory_sources()`` failed or returned unusable sources.
        """
        return self._sources() if not is_unix(self.sock) else []

    @property
    def report(self) -> PrecopyReport:
        """What it did so far."""
        bw = self._sent_bytes / self._sent_time if self._sent_time > 0 else 0.0
        return PrecopyReport(iterations=len(self._iter_bytes), bytes_per_iteration=tuple(self._iter_bytes),
                             converged=self._converged, remainder_bytes=self._remainder, bandwidth=bw,
                             estimated_downtime_ms=self._estimate_ms, hashed_bytes=self._hash_bytes,
                             hash_seconds=self._hash_time, finish_seconds=self._finish_time,
                             synced=self._synced, ended=self._ended)

    @property
    def failed(self) -> bool:
        """It was aborted (a failure, or :meth:`abort`): it cannot finish."""
        return self._state == "aborted"

    # -- the source's side ----------------------------------------------------------------
    def check(self) -> Verdict:
        """Run the pre-flight on the channel unless it ran (a no-op answer ``ok`` without
        ``preflight``): the destination says whether it can take the device, before
        anything is copied or stopped (:func:`pcidev.migration.preflight.ask`).

        :returns: the destination's verdict (its features: SYNC).
        :raises MigrationBlockedError: the destination refused, with every reason; the
            pre-copy is aborted.
        :raises MigrationError: no answer (the destination went away, stalled, or does not
            know the pre-flight); the pre-copy is aborted.
        """
        if self.verdict is None:
            if not self.preflight:
                self.verdict = Verdict(ok=True)
            else:
                try:
                    self.verdict = ask(self.device, self.sock, timeout=self.timeout)
                except MigrationError:
                    self.abort()
                    raise
        return self.verdict

    def run(self, cancel: threading.Event | None = None) -> None:
        """The pre-flight (:meth:`check`), then announce the sources and copy them while the
        device runs: the first pass, then passes of what was written since, until the
        remainder fits the downtime budget or ``max_iterations`` passes were made; with a
        destination that takes SYNC, each pass ends when the destination applied it (the
        bandwidth and the remainder are then what it applied, with no backlog left in
        the socket buffers). The device is never stopped or changed.

        :param cancel: set it (from another thread) to end the pre-copy early (it then
            aborts and raises).
        :raises MigrationBlockedError: the destination refused in the pre-flight (every
            reason); nothing was copied.
        :raises MigrationError: the destination refused (its reason), went away or
            stalled, or ``cancel`` was set: the pre-copy is aborted (tracking stopped),
            and the device keeps running untouched.
        """
        with self._lock:
            if self._state != "new":
                raise MigrationError(f"pre-copy cannot run: it is {self._state}")
            self._state = "running"
            self._busy()
        try:
            self._run(cancel)
        finally:
            self._done()

    def _busy(self) -> None:
        """(Under the lock) :meth:`run` or :meth:`finish` starts working in this thread."""
        self._worker = threading.get_ident()
        self._idle.clear()

    def _done(self) -> None:
        self._worker = None
        self._idle.set()

    def _set_state_unless_aborted(self, state: str) -> None:
        """Move to ``state``. :raises MigrationError: :meth:`abort` came first (from another thread)."""
        with self._lock:
            if self._state == "aborted":
                raise MigrationError("pre-copy aborted")
            self._state = state

    def _run(self, cancel: threading.Event | None) -> None:
        self.check()
        if not self.active:
            self._set_state_unless_aborted("ran")
            return
        try:
            self.sock.settimeout(self.timeout)
            self._announce(self._initial)
            if self.max_iterations:
                self._first_pass(cancel)
            while len(self._iter_bytes) and len(self._iter_bytes) < self.max_iterations:
                self._converged = self._estimate() <= self.max_downtime_ms
                if self._converged:
                    self._ended = "converged"
                    break
                if self._stalled():
                    self._ended = "not-converging"
                    break
                self._pass(cancel)
            else:
                self._converged = bool(self._iter_bytes) and self._estimate() <= self.max_downtime_ms
                if self._iter_bytes:
                    self._ended = "converged" if self._converged else "max-iterations"
        except BaseException as exc:
            self.abort()
            if isinstance(exc, TransportError):  # a destination refuses, then closes unread
                refusal = self._refusal(wait=min(self.timeout, 1.0))
                if refusal is not None:
                    raise MigrationError(f"{refusal}; the device keeps running on the source") from exc
            if isinstance(exc, MigrationError):
                raise MigrationError(f"{exc}; the device keeps running on the source") from exc
            raise MigrationError(f"pre-copy failed ({type(exc).__name__}: {exc}); "
                                 "the device keeps running on the source") from exc
        try:
            self._set_state_unless_aborted("ran")
        except MigrationError:
            self.abort()
            raise

    def finish(self, *, deadline: float | None = None) -> None:
        """Send what is left (call it with the device stopped: inside the downtime): a
        source that appeared since the announcement is announced and sent whole, every
        written range (bitmap) or changed page (hash) is sent, and the tracking stops.
        A pre-copy that never ran announces and sends everything now.

        :param deadline: the caller's ``CLOCK_MONOTONIC`` limit for the stop: each send
            waits at most what was left of it when this began, not the pre-copy's own
            ``timeout`` (None: that ``timeout``); the caller ends the whole at the deadline
            (:func:`~pcidev.migration.channel.migrate_out` shuts the channel down).
        :raises MigrationError: a source changed identity (another object under the same
            name), the channel broke, or the pre-copy had failed before.
        """
        with self._lock:
            if self._state in ("finished", "aborted", "running", "finishing"):
                raise MigrationError(f"pre-copy cannot finish: it is {self._state}")
            first = self._state == "new"
            self._state = "finishing"
            self._busy()
        try:
            self._finish(first, deadline)
        finally:
            self._done()

    def _finish(self, first: bool, deadline: float | None) -> None:
        if not self.active:
            self._set_state_unless_aborted("finished")
            return
        t0 = time.monotonic()
        self._throttle_from = 0.0  # the remainder goes at full speed
        self._finish_by = deadline
        try:
            wait = self.timeout if deadline is None else min(self.timeout, deadline - time.monotonic())
            if wait <= 0:
                raise MigrationError("no time left at the stop for the memory contents")
            self.sock.settimeout(wait)
            if first:
                self._announce(self._initial)
            fresh = []
            lost_track = set()
            for src in self._sources():
                known = self._tracked.get(src.name)
                if known is None:
                    fresh.append(src)
                elif known.ident != file_id(src.fd):
                    raise MigrationError(f"memory source {src.name!r} is another object than the one announced")
                elif known.bitmap is not None and src.bitmap is None:
                    lost_track.add(src.name)  # now written past its bitmap (mapped elsewhere): all of it
            if fresh:
                self._announce(fresh)
            sent = 0
            for t in self._tracked.values():
                if t.name in lost_track:
                    sent += self._send_everything(t)
                else:
                    sent += self._send_changes(t, None, whole=t.name in {s.name for s in fresh} or first)
            self._remainder = sent
        except BaseException as exc:
            self.abort()
            if isinstance(exc, MigrationError):
                raise
            raise MigrationError(f"the memory contents could not be sent at the stop "
                                 f"({type(exc).__name__}: {exc})") from exc
        try:
            self._set_state_unless_aborted("finished")
        except MigrationError:
            self.abort()
            raise
        for t in self._tracked.values():
            if t.bitmap is not None:
                t.bitmap.stop()  # (descriptors and mappings: release(), after the ACK)
        self._finish_time = time.monotonic() - t0

    def fd_sources(self, fds: Sequence[int]) -> dict[str, str]:
        """Which of a saved stream's descriptors each source stands for (matched by
        device and inode), for the OFFER.

        :param fds: the descriptors :func:`~pcidev.migration.snapshot.save_device_stream`
            returned.
        :returns: ``{str(index): source name}``.
        """
        return fd_source_names({t.ident: t.name for t in self._tracked.values()}, fds)

    def abort(self) -> None:
        """Stop the tracking and release everything (failure paths; idempotent; callable
        from any thread). The device is not touched. A :meth:`run` (or :meth:`finish`)
        working in another thread stops at its next chunk (or when its send times out)
        and raises :class:`~pcidev.errors.MigrationError`; this waits for it to end
        before it closes anything, so no descriptor is closed under it.
        """
        with self._lock:
            self._state = "aborted"
            self._stop.set()
            other = self._worker is not None and self._worker != threading.get_ident()
        if other:
            self._idle.wait()
        self.release()

    def release(self) -> None:
        """Close the descriptors and mappings it holds, and stop any tracking (idempotent;
        :func:`~pcidev.migration.channel.migrate_out` calls it after the ACK: unmapping
        a large hashed source takes time, which must not count in the downtime)."""
        with self._lock:
            tracked = list(self._tracked.values())
        for t in tracked:
            t.close()

    # -- sending -----------------------------------------------------------------------------
    def _announce(self, sources: Sequence[MemorySource]) -> None:
        new = track_sources(sources)
        with self._lock:  # an abort() that came first released what it saw: add nothing after it
            aborted = self._state == "aborted"
            if not aborted:
                for t in new:
                    self._tracked[t.name] = t
        if aborted:
            for t in new:
                t.close()
            raise MigrationError("pre-copy aborted")
        total = sum(t.size for t in self._tracked.values())
        if total > MAX_MEMORY_SIZE:
            raise MigrationError(f"the memory sources hold {total} bytes; a destination accepts at most "
                                 f"{MAX_MEMORY_SIZE} by default")
        send_meta(self.sock, MEMORY, {"protocol": PROTOCOL_MEMORY, "boot_id": boot_id(),
                                      "sources": [{"name": t.name, "size": t.size} for t in new]},
                  deadline=self._send_deadline())

    def _send_deadline(self) -> float:
        """When the frame being sent must have gone out: at the stop, the stop's deadline
        (:meth:`finish`); while the device runs, ``timeout`` from now (each frame: a
        destination that reads a byte at a time cannot hold one send longer)."""
        now = time.monotonic() + self.timeout
        return now if self._finish_by is None else min(now, self._finish_by)

    def _first_pass(self, cancel: threading.Event | None) -> None:
        t0 = time.monotonic()
        sent = 0
        for t in self._tracked.values():
            sent += self._send_changes(t, cancel, whole=True)
        self._sync()
        self._iteration_done(sent, time.monotonic() - t0)

    def _pass(self, cancel: threading.Event | None) -> None:
        t0 = time.monotonic()
        sent = 0
        for t in self._tracked.values():
            sent += self._send_changes(t, cancel, whole=False)
        self._sync()
        self._iteration_done(sent, time.monotonic() - t0)

    def _sync(self) -> None:
        """With a destination that takes SYNC: ask, and wait until it applied everything
        sent so far (it answers SYNCED with the bytes applied, which must be all of them).

        :raises MigrationError: a refusal, another frame, a wrong count, or no answer
            within ``timeout``.
        """
        if self.verdict is None or FEATURE_SYNC not in self.verdict.features:
            return
        self._seq += 1
        send_meta(self.sock, SYNC, {"seq": self._seq, "sent": self._total}, deadline=self._send_deadline())
        kind, body, stray = recv_frame(self.sock, deadline=time.monotonic() + self.timeout)
        close_fds(stray)
        if kind == NACK:
            raise self._nack(body)
        if kind != SYNCED:
            raise MigrationError(f"the destination answered SYNC with {frame_name(kind)}")
        meta = frame_meta(SYNCED, body, {"seq": int, "applied": int})
        if meta["seq"] != self._seq or meta["applied"] != self._total:
            raise MigrationError(f"the destination answered SYNC {self._seq} with SYNCED {meta['seq']}, "
                                 f"{meta['applied']} bytes applied of {self._total} sent")
        self._synced = True

    def _stalled(self) -> bool:
        return passes_stalled(self._iter_bytes, self.max_stalled_passes)

    def _iteration_done(self, sent: int, seconds: float) -> None:
        self._iter_bytes.append(sent)
        if sent:
            self._sent_bytes += sent
            self._sent_time += seconds

    def _estimate(self) -> float:
        """Milliseconds the remainder would take now: what the bitmaps hold and what the
        last hash scans found, at the measured bandwidth, plus a hash scan of every
        hashed source at the measured hashing rate."""
        dirty = 0
        hashed = 0
        for t in self._tracked.values():
            if t.bitmap is not None:
                dirty += t.bitmap.dirty_bytes()
            elif t.changed_last is None:
                self._estimate_ms = float("inf")  # scan once more to learn how fast it changes
                return self._estimate_ms
            else:
                dirty += t.changed_last
                hashed += t.size
        bw = self._sent_bytes / self._sent_time if self._sent_time > 0 else 0.0
        if self.max_bandwidth is not None:
            bw = min(bw, self.max_bandwidth) if bw else self.max_bandwidth
        hash_rate = self._hash_bytes / self._hash_time if self._hash_time > 0 else 0.0
        if (dirty and not bw) or (hashed and not hash_rate):
            self._estimate_ms = float("inf")
        else:
            self._estimate_ms = 1000.0 * ((dirty / bw if dirty else 0.0) + (hashed / hash_rate if hashed else 0.0))
        return self._estimate_ms

    def _send_changes(self, t: TrackedSource, cancel: threading.Event | None, *, whole: bool) -> int:
        """Send ``t``'s contents: all that holds data (``whole``: the first copy, zeros
        skipped), else what its bitmap recorded or what its page hashes show changed
        (:meth:`TrackedSource.changes`)."""
        hashed, seconds = t.hashed_bytes, t.hash_seconds
        try:
            return sum(self._chunk(t, off, data, skip_zero=whole, cancel=cancel)
                       for off, data in t.changes(whole=whole))
        finally:
            self._hash_bytes += t.hashed_bytes - hashed
            self._hash_time += t.hash_seconds - seconds

    def _send_everything(self, t: TrackedSource) -> int:
        """Send all of ``t`` (chunks of zeros as holes): what the destination has of it is
        not known to be right (its tracking was lost)."""
        return sum(self._chunk(t, off, data, skip_zero=False, cancel=None) for off, data in t.everything())

    def _chunk(self, t: TrackedSource, off: int, data: bytes, *, skip_zero: bool,
               cancel: threading.Event | None) -> int:
        """Send one CHUNK (a chunk of zeros: skipped on a first copy, else a hole)."""
        if cancel is not None and cancel.is_set():
            raise MigrationError("pre-copy cancelled")
        if self._stop.is_set():
            raise MigrationError("pre-copy aborted")
        zero = is_zero(data)
        if zero and skip_zero:
            return 0
        head = t.chunk_head(off, len(data))
        send_parts(self.sock, CHUNK, (head,) if zero else (head, data), deadline=self._send_deadline())
        self._chunks += 1
        self._total += len(data)
        if self._state == "running":
            if self._chunks % _POLL_EVERY == 0:
                self._check_refusal()
            self._throttle(len(head) if zero else len(head) + len(data))
        return len(data)

    def _throttle(self, nbytes: int) -> None:
        if self.max_bandwidth is None:
            return
        now = time.monotonic()
        if not self._throttle_from:
            self._throttle_from, self._throttle_bytes = now, 0
        self._throttle_bytes += nbytes
        due = self._throttle_from + self._throttle_bytes / self.max_bandwidth
        if due > now:
            time.sleep(due - now)

    def _check_refusal(self) -> None:
        """Raise the destination's refusal if it sent one (it never speaks during pre-copy)."""
        refusal = self._refusal(wait=0.0)
        if refusal is not None:
            raise refusal

    def _refusal(self, *, wait: float) -> MigrationError | None:
        """What the destination said, if it said anything within ``wait`` seconds (a
        destination speaks during pre-copy only to refuse)."""
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            if not poller.poll(int(wait * 1000)):
                return None
            self.sock.settimeout(max(wait, 0.1))
            # one deadline for the whole frame: a NACK trickled a byte at a time cannot hold
            # the pre-copy (each read would restart the socket's timeout)
            kind, body, stray = recv_frame(self.sock, deadline=time.monotonic() + max(wait, 0.1)
                                           + min(self.timeout, 1.0))
        except (TransportError, OSError, ValueError) as exc:
            return MigrationError(f"the destination went away during pre-copy ({exc})")
        close_fds(stray)
        if kind == NACK:
            return self._nack(body)
        return MigrationError(f"the destination sent {frame_name(kind)} during pre-copy")

    @staticmethod
    def _nack(body: bytes) -> MigrationError:
        """The error a NACK during pre-copy stands for."""
        try:
            meta = frame_meta(NACK, body, {"error": str, "message": str})
        except TransportError as exc:
            return MigrationError(f"the destination refused with a malformed NACK ({exc})")
        return MigrationError(f"the destination refused the memory: {meta['error']}: {meta['message']}")


# ------------------------------------------------------------------- destination
class _Staged:
    """One source's staging memfd on the destination. It is never mapped here: CHUNKs are
    written with ``pwrite`` and holes punched through a short-lived window, so releasing it
    is the close of a descriptor (the load maps the memfd itself, lazily), not the
    teardown of a mapping of every page it holds."""

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size
        try:
            self.fd = alloc_memfd(size, f"pcidev-staging[{name}]")
        except DmaError as exc:
            raise TransportError(f"migration channel: cannot stage memory source {name!r} "
                                 f"({size} bytes): {exc}") from None
        #: one byte per page, 1 where the memfd holds data (written), 0 where it is a hole
        #: (never written, or punched): ContentDescriptors.allocated
        self.pages = bytearray(-(-size // ALLOCATION_PAGE))

    def write(self, off: int, data: memoryview) -> None:
        """Write ``data`` at ``off``. :raises TransportError: the kernel refused (no memory)."""
        if data:
            a, b = off // ALLOCATION_PAGE, -(-(off + len(data)) // ALLOCATION_PAGE)
            self.pages[a:b] = b"\x01" * (b - a)  # (marked first: a failed write fails the load)
        try:
            while data:
                n = os.pwrite(self.fd, data, off)
                data, off = data[n:], off + n
        except OSError as exc:
            raise TransportError(f"migration channel: cannot stage {len(data)} bytes of {self.name!r} at "
                                 f"{off:#x}: {exc.strerror or exc}") from None

    def zero(self, off: int, length: int) -> None:
        """Make ``[off, off + length)`` read as zeros: whole pages are punched out
        (``MADV_REMOVE`` through a window mapped for it alone: no page is faulted in),
        the edges written."""
        end = off + length
        lo = -(-off // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        hi = end - end % mmap.ALLOCATIONGRANULARITY
        if hi <= lo:
            self.write(off, memoryview(bytes(length)))
            return
        try:
            with mmap.mmap(self.fd, hi - lo, offset=lo) as window:
                window.madvise(mmap.MADV_REMOVE)
        except (OSError, ValueError):
            self.write(lo, memoryview(bytes(hi - lo)))
        else:
            if mmap.ALLOCATIONGRANULARITY % ALLOCATION_PAGE == 0:  # (whole pages punched)
                a, b = lo // ALLOCATION_PAGE, hi // ALLOCATION_PAGE
                self.pages[a:b] = bytes(b - a)
        self.write(off, memoryview(bytes(lo - off)))
        self.write(hi, memoryview(bytes(end - hi)))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def destination_sources(device: PciDevice) -> dict[str, int]:
    """``{name: size}`` of ``device``'s memory sources: all that a source may announce to it
    (:class:`StagedMemory` ``expected``).

    :raises TransportError: ``memory_sources()`` failed or returned an unusable list (the
        channel refuses the migration with it).
    """
    try:
        sources = list(device.memory_sources())
        out = {object_name(check_source_name(src.name)): int(src.size) for src in sources}
    except Exception as exc:
        raise TransportError(f"this device's memory sources are unusable ({type(exc).__name__}: {exc})") from None
    if len(out) != len(sources):
        raise TransportError("this device's memory sources repeat a name")
    # an SR-IOV PF: its VFs' RAM BARs travel with it, and the load builds the VFs
    return {**vf_memory_objects(device, MAX_SOURCES), **out}


def passes_stalled(sizes: Sequence[int], n: int) -> bool:
    """Whether a pre-copy stopped converging: its last ``n`` passes (after the first,
    which copies everything) each copied no fewer bytes than the smallest pass before
    them -- the device dirties its memory at least as fast as the channel carries it,
    and more passes would only take time.

    :param sizes: bytes copied by each pass so far, the first included.
    :param n: passes without progress that count as stalled (0: never).
    """
    later = sizes[1:]
    if n <= 0 or len(later) <= n:
        return False
    return min(later[-n:]) >= min(later[:-n])


class StagedMemory:
    """The destination's side of streamed memory: a staging memfd per announced source,
    filled by CHUNK frames, handed to the load by descriptor index.

    Every check refuses with :class:`~pcidev.errors.TransportError` (one sentence; the
    channel NACKs with it; anything malformed in a peer's frame is one too, never another
    exception): sizes (each > 0, the sum at most ``max_total``), names (at most
    :data:`MAX_SOURCE_NAME` characters of ``[A-Za-z0-9_./:@+-]``, unique, at most
    :data:`MAX_SOURCES`), with ``expected`` each name one of the destination's own
    memory objects and its size exactly that object's (a peer cannot make it stage more
    than the device holds), a CHUNK naming an announced source with its range inside it
    and at most :data:`MAX_CHUNK` bytes, and the OFFER's ``fd_sources`` (indexes in plain
    decimal inside ``stream_fds``, each announced name at most once).
    :meth:`close` releases everything; call it whatever happened.

    :param max_total: the largest sum of announced sizes accepted (a cap above
        ``expected``: :data:`MAX_MEMORY_SIZE` by default).
    :param expected: ``{name: size}`` of the destination device's memory sources
        (:func:`destination_sources`), or None to accept any name (a caller that checks
        them itself).
    :param max_rounds: the most bytes applied in all, as a multiple of the announced
        sizes (a CHUNK past it is refused: a source re-sending without end).
    """

    def __init__(self, max_total: int = MAX_MEMORY_SIZE, expected: Mapping[str, int] | None = None, *,
                 max_rounds: int = MAX_ROUNDS) -> None:
        self.max_total = max_total
        self.max_rounds = max_rounds
        self.expected = dict(expected) if expected is not None else None
        self._sources: dict[str, _Staged] = {}
        self._total = 0
        #: bytes of contents applied (holes count their length)
        self.received = 0

    def announce(self, body: bytes) -> None:
        """Apply a MEMORY frame: create a staging memfd per new source.

        :raises TransportError: a malformed or unacceptable announcement.
        """
        with peer_data("MEMORY"):
            self._announce(body)

    def _announce(self, body: bytes) -> None:
        meta = frame_meta(MEMORY, body, {"protocol": int, "sources": list, "boot_id": str})
        if meta["protocol"] != PROTOCOL_MEMORY:
            raise TransportError(f"migration channel: MEMORY of protocol {meta['protocol']}, "
                                 f"expected {PROTOCOL_MEMORY}")
        sources = meta["sources"]
        if not sources or len(self._sources) + len(sources) > MAX_SOURCES:
            raise TransportError(f"migration channel: MEMORY announces {len(sources)} sources "
                                 f"({len(self._sources)} before; 1 to {MAX_SOURCES} in all)")
        for entry in sources:
            if not isinstance(entry, dict) or set(entry) != {"name", "size"}:
                raise TransportError("migration channel: a MEMORY source is not a map of name and size")
            try:
                name = check_source_name(entry["name"])
            except ValueError as exc:
                raise TransportError(f"migration channel: MEMORY: {exc}") from None
            size = entry["size"]
            if type(size) is not int or size <= 0:
                raise TransportError(f"migration channel: MEMORY source {name!r} has size {size!r}")
            if name in self._sources:
                raise TransportError(f"migration channel: MEMORY source {name!r} announced twice")
            if self.expected is not None and self.expected.get(object_name(name)) != size:
                raise TransportError(
                    f"migration channel: MEMORY source {name!r} of {size} bytes is not one of this device's "
                    f"memory objects ({', '.join(f'{k}: {v}' for k, v in self.expected.items()) or 'none'})")
            if self._total + size > self.max_total:
                raise TransportError(f"migration channel: MEMORY sources of more than {self.max_total} bytes "
                                     "in all")
            self._sources[name] = _Staged(name, size)
            self._total += size

    def apply(self, body: bytes) -> None:
        """Apply a CHUNK frame to its staging memfd.

        :raises TransportError: a malformed chunk, an unknown source, a range outside it.
        """
        with peer_data("CHUNK"):
            self._apply(body)

    def _apply(self, body: bytes) -> None:
        if len(body) < CHUNK_HEAD.size:
            raise TransportError(f"migration channel: CHUNK of {len(body)} bytes is shorter than its header")
        nlen, off, length = CHUNK_HEAD.unpack_from(body)
        start = CHUNK_HEAD.size + nlen
        if nlen > MAX_SOURCE_NAME or len(body) < start:
            raise TransportError(f"migration channel: CHUNK with a source name of {nlen} bytes")
        try:
            name = body[CHUNK_HEAD.size:start].decode()
        except UnicodeDecodeError:
            raise TransportError("migration channel: CHUNK source name is not UTF-8") from None
        staged = self._sources.get(name)
        if staged is None:
            raise TransportError(f"migration channel: CHUNK for unknown memory source {name[:MAX_SOURCE_NAME]!r}")
        if not 0 < length <= MAX_CHUNK:
            raise TransportError(f"migration channel: CHUNK of {length} bytes (1 to {MAX_CHUNK})")
        if off + length > staged.size:
            raise TransportError(f"migration channel: CHUNK [{off:#x}, +{length:#x}) outside memory source "
                                 f"{name!r} of {staged.size:#x} bytes")
        data = memoryview(body)[start:]
        if len(data) == length:
            staged.write(off, data)
        elif not data:
            staged.zero(off, length)
        else:
            raise TransportError(f"migration channel: CHUNK announces {length} bytes and carries {len(data)}")
        self.received += length
        if self.received > self.max_rounds * self._total:
            raise TransportError(f"migration channel: the source sent {self.received} bytes of memory contents, "
                                 f"more than {self.max_rounds} times the {self._total} it announced")

    @property
    def names(self) -> list[str]:
        """The announced sources."""
        return list(self._sources)

    @property
    def announced_bytes(self) -> int:
        """The sum of the announced sizes."""
        return self._total

    def load_fds(self, offer: dict[str, Any]) -> ContentDescriptors:
        """The descriptor list for the load from a protocol-2 OFFER: each index
        ``fd_sources`` names is the source's staging memfd (borrowed: :meth:`close`
        closes it), every other index None. The load accepts a staging memfd only
        where the stream names a memory object's descriptor (a RAM BAR of that name, a
        device's own): never for guest memory or an eventfd (see
        :class:`~pcidev.memory_source.ContentDescriptors`).

        :raises TransportError: ``stream_fds`` or ``fd_sources`` missing or malformed, an
            index outside the stream's descriptors or not plain decimal, a name not
            announced or named twice.
        """
        with peer_data("OFFER fd_sources"):
            return self._load_fds(offer)

    def _load_fds(self, offer: dict[str, Any]) -> ContentDescriptors:
        count, mapping = offer.get("stream_fds"), offer.get("fd_sources")
        if type(count) is not int or not 0 <= count <= MAX_OFFER_FDS:
            raise TransportError(f"migration channel: OFFER stream_fds {count!r} (0 to {MAX_OFFER_FDS})")
        if not isinstance(mapping, dict):
            raise TransportError("migration channel: OFFER fd_sources is not a map")
        fds: list[int | None] = [None] * count
        names: dict[int, str] = {}
        allocated: dict[int, bytes] = {}
        for key, name in mapping.items():
            if not isinstance(key, str) or not _INDEX.fullmatch(key) or not int(key) < count:
                raise TransportError(f"migration channel: OFFER fd_sources index {str(key)[:16]!r} is not one of "
                                     f"the stream's {count} descriptors (in decimal)")
            staged = self._sources.get(name) if isinstance(name, str) else None
            if staged is None:
                raise TransportError(f"migration channel: OFFER fd_sources names {str(name)[:MAX_SOURCE_NAME]!r}, "
                                     "which MEMORY did not announce")
            if name in names.values():
                raise TransportError(f"migration channel: OFFER fd_sources names {name!r} for more than one "
                                     "descriptor")
            fds[int(key)] = staged.fd
            names[int(key)] = name
            allocated[int(key)] = bytes(staged.pages)
        return ContentDescriptors(fds, names, allocated)

    def close(self) -> None:
        """Close every staging memfd (the load holds its own duplicates of those it adopted)."""
        for staged in self._sources.values():
            staged.close()
        self._sources.clear()

