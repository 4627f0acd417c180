"""The bytes of vfio-user migration data (``MIG_DATA_READ`` on the source, ``MIG_DATA_WRITE``
on the destination) when the device has memory sources.

A device whose state includes memory objects that travel only as a descriptor (its
RAM BARs, memfd- or file-backed, an NVMe ``mem`` namespace and its metadata:
:meth:`PciDevice.memory_sources <pcidev.device.PciDevice.memory_sources>`) sends their
**contents** in the migration data, framed as a migration channel of protocol 2 would
carry them (:mod:`pcidev.migration.precopy`: ``MEMORY``, ``CHUNK``, ``OFFER``, ``STATE``).
A device without memory sources sends its bare vmstate stream, as before.

* :class:`OutboundData` (the source): in ``PRE_COPY`` each run of ``MIG_DATA_READ``
  requests up to a short read is one **iteration**: the first announces the sources
  (``MEMORY``) and copies everything that holds data; each later one copies what was
  written since (the source's :class:`~pcidev.memory_source.DirtyBitmap`, or the CRC-32C
  of each page for a source without one, such as a RAM BAR the client maps); an
  iteration with nothing to send is an empty read. ``STOP_COPY`` carries the rest: the
  bytes of an iteration not read yet, a source that appeared since (a namespace created,
  a store Format NVM replaced: a new name), what was written since the last iteration,
  the ``OFFER`` and the ``STATE``. Chunks are read from the sources when the client asks
  for them (the data is never built whole in memory).
* :class:`InboundData` (the destination, ``RESUMING``): applies each frame as soon as it
  is complete (:class:`~pcidev.migration.precopy.StagedMemory`, with every check of the
  TCP channel: names and sizes only of the destination's own sources, ranges inside
  them, frames in order) and keeps at most one frame in memory; a malformed frame is
  refused at the ``MIG_DATA_WRITE`` that completes it, a truncated stream at the load.
  A chunk repeated is applied again (pre-copy re-sends what was written meanwhile: the
  last one wins).

Nothing here changes the source device: reading its memory and its dirty bitmaps is all
the pre-copy does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import msgpack

from pcidev.device import PciDevice
from pcidev.errors import MigrationError, TransportError
from pcidev.memory_source import ContentDescriptors, MemorySource
from pcidev.migration.frames import (
    CHUNK,
    FRAME_HEADER,
    MAGIC,
    MAX_STREAM_SIZE,
    MEMORY,
    OFFER,
    PROTOCOL_MEMORY,
    STATE,
    boot_id,
    frame_meta,
    frame_name,
)
from pcidev.migration.precopy import (
    MAX_CHUNK_FRAME,
    MAX_MEMORY_SIZE,
    StagedMemory,
    TrackedSource,
    fd_source_names,
    file_id,
    is_zero,
    track_sources,
)
from pcidev.migration.precopy import (
    checked_sources as precopy_checked_sources,
)

__all__ = ["DataTooLarge", "InboundData", "OutboundData", "checked_sources"]

#: the longest frame other than CHUNK and STATE (MEMORY, OFFER: msgpack maps)
_MAX_META_FRAME = 64 << 10


class DataTooLarge(TransportError):
    """A bare state stream beyond :data:`~pcidev.migration.frames.MAX_STREAM_SIZE` bytes."""


def _frame(kind: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(MAGIC, kind, 0, len(body)) + body


def _meta_frame(kind: int, meta: dict[str, Any]) -> bytes:
    return _frame(kind, msgpack.packb(meta, use_bin_type=True))


def checked_sources(device: PciDevice) -> list[MemorySource]:
    """``device``'s memory sources now, checked as a pre-copy checks them (names valid and
    unique, sizes positive, a bitmap covering its source, at most
    :data:`~pcidev.migration.precopy.MAX_SOURCES`, at most
    :data:`~pcidev.migration.precopy.MAX_MEMORY_SIZE` bytes in all).

    :param device: the device.
    :returns: the sources.
    :raises MigrationError: ``memory_sources()`` failed or returned an unusable list.
    """
    sources = precopy_checked_sources(device)
    total = sum(s.size for s in sources)
    if total > MAX_MEMORY_SIZE:
        raise MigrationError(f"the memory sources hold {total} bytes; migration data carries at most "
                             f"{MAX_MEMORY_SIZE}")
    return sources


# ------------------------------------------------------------------------------ source
class OutboundData:
    """The source's migration data of a device with memory sources (see the module).

    Created when the device enters ``PRE_COPY`` (:meth:`start`: the tracking starts) or
    ``STOP_COPY`` directly; :meth:`close` stops the tracking and releases the descriptors
    (call it whatever happened).

    :param device: the source device.
    :param sources: its memory sources (:func:`checked_sources`).
    """

    def __init__(self, device: PciDevice, sources: Sequence[MemorySource]) -> None:
        self.device = device
        self._initial = list(sources)
        self._tracked: dict[str, TrackedSource] = {}
        self._announced = False
        #: the frames of the iteration being read (None: the next read starts one)
        self._gen: Iterator[bytes] | None = None
        self._buf = bytearray()
        self._owe_short = False
        self._final = False
        #: bytes of contents sent per pre-copy iteration (holes count their length)
        self.iterations: list[int] = []
        self._sent = 0

    # -- setting up ----------------------------------------------------------------------
    def start(self) -> None:
        """Open the sources and start their tracking (everything counts as written).

        :raises MigrationError: a source is unusable (nothing is left open).
        """
        self._track(self._initial)

    def _track(self, sources: Sequence[MemorySource]) -> list[TrackedSource]:
        new = track_sources(sources)
        for t in new:
            self._tracked[t.name] = t
        return new

    def close(self) -> None:
        """Stop the tracking, close the descriptors and mappings (idempotent)."""
        self._gen = None
        self._buf = bytearray()
        for t in self._tracked.values():
            t.close()
        self._tracked.clear()

    @property
    def pending_bytes(self) -> int:
        """Bytes framed and not read yet (of the iteration being read)."""
        return len(self._buf)

    def dirty_bytes(self) -> int:
        """About how many bytes of contents the next iteration would send (whole granules
        of the bitmaps; a source tracked by hashes counts what its last scan found, all
        of it before a first iteration)."""
        if not self._announced:
            return sum(t.size for t in self._tracked.values())
        out = 0
        for t in self._tracked.values():
            if t.bitmap is not None:
                out += t.bitmap.dirty_bytes()
            else:
                out += t.size if t.changed_last is None else t.changed_last
        return out

    # -- reading -------------------------------------------------------------------------
    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer: the end of an iteration; in ``STOP_COPY``, of the data).

        :param size: bytes asked for (> 0).
        :raises MigrationError: a source could not be read.
        :raises OSError: reading a source failed.
        """
        if self._gen is None and not self._buf:
            if self._owe_short or self._final:
                self._owe_short = False
                return b""
            self._gen = self._iteration()
        while len(self._buf) < size and self._gen is not None:
            frame = next(self._gen, None)
            if frame is None:
                self._gen = None
                if not self._final:
                    self.iterations.append(self._sent)
                    self._sent = 0
            else:
                self._buf += frame
        out = bytes(self._buf[:size])
        del self._buf[:size]
        if self._gen is None and not self._buf and len(out) == size:
            self._owe_short = True  # the end must still be told by a short read
        return out

    def _iteration(self) -> Iterator[bytes]:
        """One pre-copy iteration: the first announces the sources and copies what holds data."""
        first = not self._announced
        if first:
            self._announced = True
            yield self._memory_frame(list(self._tracked.values()))
        for t in list(self._tracked.values()):
            yield from self._changes(t, whole=first)

    @staticmethod
    def _memory_frame(tracked: Sequence[TrackedSource]) -> bytes:
        return _meta_frame(MEMORY, {"protocol": PROTOCOL_MEMORY, "boot_id": boot_id(),
                                    "sources": [{"name": t.name, "size": t.size} for t in tracked]})

    def stop_copy(self, stream: bytes, fds: Sequence[int]) -> None:
        """The device stopped and its state was saved: what the reads return from now on is
        the rest of the data (see the module), ending with the OFFER and the STATE.

        :param stream: the saved vmstate stream.
        :param fds: the descriptors :func:`~pcidev.migration.snapshot.save_device_stream` returned.
        :raises MigrationError: the sources are unusable now, or one is another object
            under a name already announced (nothing changed: the pre-copy may go on).
        """
        fresh, lost_track = [], set()
        for src in checked_sources(self.device):
            known = self._tracked.get(src.name)
            if known is None:
                fresh.append(src)
            else:
                try:
                    same = known.ident == file_id(src.fd)
                except OSError:
                    same = False
                if not same:
                    raise MigrationError(f"memory source {src.name!r} is another object than the one announced")
                if known.bitmap is not None and src.bitmap is None:
                    lost_track.add(src.name)  # written past its bitmap meanwhile (mapped elsewhere): all of it
        total = sum(t.size for t in self._tracked.values()) + sum(s.size for s in fresh)
        if total > MAX_MEMORY_SIZE:
            raise MigrationError(f"the memory sources hold {total} bytes, more than {MAX_MEMORY_SIZE}")
        new = self._track(fresh)  # (the last step that may fail: it leaves nothing open then)
        offer = _meta_frame(OFFER, {"protocol": PROTOCOL_MEMORY, "device_type": self.device.vmstate_device_type,
                                    "stream_size": len(stream), "fds": 0, "boot_id": boot_id(),
                                    "stream_fds": len(fds),
                                    "fd_sources": fd_source_names({t.ident: t.name for t in self._tracked.values()},
                                                              fds)})
        state = _frame(STATE, stream)
        rest = self._gen
        self._final = True
        self._owe_short = False
        self._gen = self._remainder(rest, new, lost_track, offer, state)

    def _remainder(self, rest: Iterator[bytes] | None, new: list[TrackedSource], lost_track: set[str],
                   offer: bytes, state: bytes) -> Iterator[bytes]:
        if rest is not None:  # an iteration the client did not read to its end
            yield from rest
        first = not self._announced
        if first:
            self._announced = True
            yield self._memory_frame(list(self._tracked.values()))
        elif new:
            yield self._memory_frame(new)
        fresh = {t.name for t in new}
        for t in list(self._tracked.values()):
            if t.name in lost_track:
                yield from self._everything(t)
            else:
                yield from self._changes(t, whole=first or t.name in fresh)
        yield offer
        yield state

    # -- the contents --------------------------------------------------------------------
    def _chunk(self, t: TrackedSource, off: int, data: bytes, *, skip_zero: bool) -> Iterator[bytes]:
        zero = is_zero(data)
        if zero and skip_zero:
            return
        head = t.chunk_head(off, len(data))
        self._sent += len(data)
        yield _frame(CHUNK, head if zero else head + data)

    def _changes(self, t: TrackedSource, *, whole: bool) -> Iterator[bytes]:
        """``t``'s contents as CHUNK frames (:meth:`~pcidev.migration.precopy.TrackedSource.changes`)."""
        for off, data in t.changes(whole=whole):
            yield from self._chunk(t, off, data, skip_zero=whole)

    def _everything(self, t: TrackedSource) -> Iterator[bytes]:
        for off, data in t.everything():
            yield from self._chunk(t, off, data, skip_zero=False)


# ------------------------------------------------------------------------- destination
class InboundData:
    """The destination's side of the migration data (``RESUMING``): a bare vmstate stream,
    or frames applied as they complete (see the module).

    :param expected: called once, at the first ``MEMORY`` frame: ``{name: size}`` of the
        destination device's memory sources
        (:func:`~pcidev.migration.precopy.destination_sources`), the only names and sizes
        accepted.
    """

    def __init__(self, expected: Callable[[], Mapping[str, int]]) -> None:
        self._expected = expected
        self._staged: StagedMemory | None = None
        self._head = bytearray()  # the first bytes, until they tell bare stream from frames
        self._framed: bool | None = None
        self._raw = bytearray()
        self._pending = bytearray()
        self._phase = "memory"  # the frame expected: memory, chunk (or memory/offer), state, end
        self._stream_size = 0
        self._stream = b""
        self._fds: ContentDescriptors | None = None
        #: bytes received so far
        self.received = 0

    def write(self, data: bytes) -> None:
        """Take the next bytes of the data.

        :raises TransportError: a malformed frame (everything staged is released).
        :raises DataTooLarge: a bare stream beyond :data:`~pcidev.migration.frames.MAX_STREAM_SIZE`.
        """
        try:
            self._write(data)
        except BaseException:
            self.close()
            raise

    def _write(self, data: bytes) -> None:
        self.received += len(data)
        if self._framed is None:
            self._head += data
            if len(self._head) < len(MAGIC) and self._head == MAGIC[:len(self._head)]:
                return
            self._framed = self._head.startswith(MAGIC)
            data, self._head = bytes(self._head), bytearray()
        if not self._framed:
            if len(self._raw) + len(data) > MAX_STREAM_SIZE:
                raise DataTooLarge(f"migration data: a state stream beyond {MAX_STREAM_SIZE} bytes")
            self._raw += data
            return
        self._pending += data
        self._drain()

    def _drain(self) -> None:
        pending = self._pending
        pos = 0
        hdr = FRAME_HEADER.size
        while len(pending) - pos >= hdr:
            magic, kind, flags, length = FRAME_HEADER.unpack_from(pending, pos)
            if magic != MAGIC or flags:
                raise TransportError(f"migration data: bad frame header at byte {self.received - len(pending) + pos}")
            limit = MAX_CHUNK_FRAME if kind == CHUNK else MAX_STREAM_SIZE if kind == STATE else _MAX_META_FRAME
            if length > limit:
                raise TransportError(f"migration data: {frame_name(kind)} frame of {length} bytes "
                                     f"(at most {limit})")
            if len(pending) - pos - hdr < length:
                break
            self._apply(kind, bytes(pending[pos + hdr:pos + hdr + length]))
            pos += hdr + length
        del pending[:pos]

    def _apply(self, kind: int, body: bytes) -> None:
        phase = self._phase
        if phase == "memory":
            if kind != MEMORY:
                raise TransportError(f"migration data: expected MEMORY, got {frame_name(kind)}")
            expected = self._expected()
            total = min(2 * sum(expected.values()), MAX_MEMORY_SIZE)  # (a generation replaced: twice)
            self._staged = StagedMemory(total, expected)
            self._staged.announce(body)
            self._phase = "chunk"
            return
        staged = self._staged
        assert staged is not None
        if phase == "chunk" and kind == CHUNK:
            staged.apply(body)
        elif phase == "chunk" and kind == MEMORY:
            staged.announce(body)
        elif phase == "chunk" and kind == OFFER:
            offer = frame_meta(OFFER, body, {"protocol": int, "stream_size": int})
            if offer["protocol"] != PROTOCOL_MEMORY:
                raise TransportError(f"migration data: OFFER of protocol {offer['protocol']}")
            if not 0 < offer["stream_size"] <= MAX_STREAM_SIZE:
                raise TransportError(f"migration data: OFFER of a {offer['stream_size']}-byte stream")
            self._fds = staged.load_fds(offer)
            self._stream_size = offer["stream_size"]
            self._phase = "state"
        elif phase == "state" and kind == STATE:
            if len(body) != self._stream_size:
                raise TransportError(f"migration data: STATE of {len(body)} bytes, the OFFER said "
                                     f"{self._stream_size}")
            self._stream = body
            self._phase = "end"
        elif phase == "end":
            raise TransportError(f"migration data: {frame_name(kind)} after the STATE")
        else:
            raise TransportError(f"migration data: {frame_name(kind)} where "
                                 f"{'CHUNK, MEMORY or OFFER' if phase == 'chunk' else 'STATE'} belongs")

    @property
    def pending_bytes(self) -> int:
        """Bytes held in memory now (a partial frame, or the bare stream so far)."""
        return len(self._head) + len(self._raw) + len(self._pending)

    def finish(self) -> tuple[bytes, ContentDescriptors | None]:
        """The stream and the load's descriptors, once everything arrived (a bare stream:
        no descriptors). The staging memfds stay open until :meth:`close` (call it after
        the load).

        :raises TransportError: the frames ended early (truncated data).
        """
        if not self._framed:
            return bytes(self._head or self._raw), None
        if self._phase != "end" or self._pending:
            raise TransportError(f"migration data: truncated ({len(self._pending)} bytes of a frame left; "
                                 f"{'no STATE yet' if self._phase != 'end' else 'after the STATE'})")
        return self._stream, self._fds

    def close(self) -> None:
        """Release the staging memfds and the buffers (idempotent)."""
        if self._staged is not None:
            self._staged.close()
            self._staged = None
        self._raw = bytearray()
        self._pending = bytearray()
