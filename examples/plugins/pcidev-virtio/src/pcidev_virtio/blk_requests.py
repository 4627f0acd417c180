"""The virtio-blk request engine: one descriptor chain in, a status byte out.

:meth:`BlkRequestEngine.execute` takes a popped chain (anything with the
``out_bufs`` / ``in_bufs`` memoryview tuples of
:class:`pcidev_virtio.virtqueue.VirtqElement`), carries out the request on a
:class:`~pcidev_virtio.blk_backend.BlkBackend` and writes the status byte; it
returns the used length to push. It never raises for anything a driver can put
in a chain: every malformed or out-of-range request completes with a status.

Framing (virtio 1.2, 5.2.6.4: the device must not assume any): the 16-byte
header is gathered from the driver-written buffers wherever it is split; the
data of a read or write is handed to the backend as views into guest memory
(``os.preadv`` / ``os.pwritev`` straight between the file and the guest: no copy);
the status byte is the last byte of the device-writable buffers.

Statuses:

* ``UNSUPP``: a request type the device does not implement (SCSI, GET_LIFETIME,
  SECURE_ERASE, zoned, legacy BARRIER flag), DISCARD / WRITE_ZEROES when the
  feature was not negotiated, a segment with unknown flags (or UNMAP on a
  discard), more segments than ``max_*_seg``;
* ``IOERR``: a header shorter than 16 bytes, a read or write beyond the capacity
  or not aligned to the logical block size, data not a multiple of 512 bytes, a
  segment list that is empty or not a whole number of segments, a segment beyond
  the capacity or longer than ``max_*_sectors``, any write, discard or zeroing
  of a read-only disk, and any error of the backend;
* a chain with no device-writable byte at all has nowhere to put a status: it
  completes with a used length of 0 and nothing is done.

The used length is the size of the device-writable part whenever the status is
written (it is the last of those bytes), as the data of a successful read or
GET_ID fills everything before it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import attrs

from pcidev.errors import ConfigError
from pcidev.ratelog import RateLimitedLog
from pcidev_virtio.blk_backend import SECTOR_SIZE, BlkBackend
from pcidev_virtio.blk_spec import (
    DWZ_SEGMENT,
    ID_BYTES,
    OUTHDR,
    SECTOR_SHIFT,
    WRITE_ZEROES_FLAG_UNMAP,
    BlkStatus,
    BlkType,
)

__all__ = [
    "BlkLimits",
    "BlkRequestEngine",
    "Element",
    "gather",
    "total_len",
    "window",
]

log = logging.getLogger(__name__)


class Element(Protocol):
    """What the engine needs of a popped chain (a ``VirtqElement`` has it)."""

    @property
    def out_bufs(self) -> tuple[memoryview, ...]:
        """Driver-written buffers, in chain order."""
        ...

    @property
    def in_bufs(self) -> tuple[memoryview, ...]:
        """Device-writable buffers, in chain order."""
        ...


@attrs.frozen
class BlkLimits:
    """What the device advertises and enforces (config space fields).

    :param logical_block_size: bytes per logical block (``blk_size``); reads,
        writes and zeroing must be aligned to it.
    :param max_discard_sectors: most sectors in one discard segment.
    :param max_discard_seg: most segments in one discard request.
    :param max_write_zeroes_sectors: most sectors in one write-zeroes segment.
    :param max_write_zeroes_seg: most segments in one write-zeroes request.
    """

    logical_block_size: int = 512
    max_discard_sectors: int = 1 << 22
    max_discard_seg: int = 32
    max_write_zeroes_sectors: int = 1 << 22
    max_write_zeroes_seg: int = 32


def total_len(views: Sequence[memoryview]) -> int:
    """Bytes in a scatter list."""
    return sum(len(v) for v in views)


def window(views: Sequence[memoryview], start: int, stop: int) -> list[memoryview]:
    """The views covering bytes ``[start, stop)`` of the concatenated scatter list.

    :param views: the scatter list.
    :param start: first byte (>= 0).
    :param stop: one past the last byte (clipped to the list's length).
    :returns: slices of ``views`` (no copy), empty ones left out.
    """
    out: list[memoryview] = []
    pos = 0
    for v in views:
        n = len(v)
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        if lo < hi:
            out.append(v[lo:hi])
        pos += n
        if pos >= stop:
            break
    return out


def gather(views: Sequence[memoryview], start: int, n: int) -> bytes:
    """Copy bytes ``[start, start + n)`` of a scatter list (fewer if it is shorter)."""
    return b"".join(bytes(v) for v in window(views, start, start + n))


def _scatter(views: Sequence[memoryview], data: bytes) -> None:
    """Copy ``data`` into the start of a scatter list (as much as fits)."""
    pos = 0
    for v in views:
        if pos >= len(data):
            return
        k = min(len(v), len(data) - pos)
        v[:k] = data[pos:pos + k]
        pos += k


class BlkRequestEngine:
    """Carries out virtio-blk requests on a backend (see the module docstring).

    :param backend: the disk.
    :param serial: the GET_ID string (at most 20 bytes; NUL-padded).
    :param limits: block size and discard / write-zeroes limits.
    :raises ConfigError: ``serial`` is longer than 20 bytes.

    :ivar discard: VIRTIO_BLK_F_DISCARD was negotiated (else DISCARD is UNSUPP).
    :ivar write_zeroes: VIRTIO_BLK_F_WRITE_ZEROES was negotiated.
    :ivar writeback: the cache is write-back: a write completes before it is
        durable, FLUSH makes it so. False (write-through): every write is durable
        when it completes (``RWF_DSYNC``).
    """

    def __init__(self, backend: BlkBackend, *, serial: bytes = b"", limits: BlkLimits | None = None) -> None:
        if len(serial) > ID_BYTES:
            raise ConfigError(f"serial is {len(serial)} bytes, at most {ID_BYTES}")
        self.backend = backend
        self.serial = serial.ljust(ID_BYTES, b"\0")
        self.limits = limits if limits is not None else BlkLimits()
        self.discard = False
        self.write_zeroes = False
        self.writeback = True
        #: warnings a guest can trigger once per request, rate-limited
        self._guest_error = RateLimitedLog(log)

    # -- one request -------------------------------------------------------------------------
    def execute(self, elem: Element) -> int:
        """Carry out one request and write its status byte.

        :param elem: the chain (driver-written header and data, device-writable
            data and status).
        :returns: the used length to push (0 when there is no status byte).
        """
        ins = elem.in_bufs
        in_len = total_len(ins)
        if in_len == 0:
            self._guest_error("virtio-blk: a request without a status byte (no device-writable buffer) is dropped")
            return 0
        outs = elem.out_bufs
        out_len = total_len(outs)
        status = BlkStatus.IOERR
        if out_len < OUTHDR.size:
            log.debug("virtio-blk: request header of %d bytes (16 expected)", out_len)
        else:
            rtype, _ioprio, sector = OUTHDR.unpack(gather(outs, 0, OUTHDR.size))
            payload = window(outs, OUTHDR.size, out_len)
            data_in = window(ins, 0, in_len - 1)
            status = self._dispatch(rtype, sector, payload, data_in)
        status_view = window(ins, in_len - 1, in_len)[0]
        status_view[0] = status
        return in_len

    def _dispatch(self, rtype: int, sector: int, payload: list[memoryview], data_in: list[memoryview]) -> BlkStatus:
        try:
            if rtype == BlkType.IN:
                return self._read(sector, data_in)
            if rtype == BlkType.OUT:
                return self._write(sector, payload)
            if rtype == BlkType.FLUSH:
                self.backend.flush()
                return BlkStatus.OK
            if rtype == BlkType.GET_ID:
                _scatter(data_in, self.serial)
                return BlkStatus.OK
            if rtype == BlkType.DISCARD:
                if not self.discard:
                    return BlkStatus.UNSUPP
                return self._segments(payload, discard=True)
            if rtype == BlkType.WRITE_ZEROES:
                if not self.write_zeroes:
                    return BlkStatus.UNSUPP
                return self._segments(payload, discard=False)
        except OSError as exc:
            self._guest_error("virtio-blk: request type %d at sector %d failed: %s", rtype, sector, exc)
            return BlkStatus.IOERR
        return BlkStatus.UNSUPP

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        """``nbytes`` from ``sector`` lie inside the disk, aligned to the logical block."""
        lbs = self.limits.logical_block_size
        offset = sector << SECTOR_SHIFT
        return not (offset % lbs or nbytes % lbs) and offset + nbytes <= self.backend.size

    def _read(self, sector: int, data: list[memoryview]) -> BlkStatus:
        nbytes = total_len(data)
        if nbytes % SECTOR_SIZE or not self._range_ok(sector, nbytes):
            return BlkStatus.IOERR
        self.backend.readv(data, sector << SECTOR_SHIFT)
        return BlkStatus.OK

    def _write(self, sector: int, data: list[memoryview]) -> BlkStatus:
        nbytes = total_len(data)
        if self.backend.read_only or nbytes % SECTOR_SIZE or not self._range_ok(sector, nbytes):
            return BlkStatus.IOERR
        self.backend.writev(data, sector << SECTOR_SHIFT, fua=not self.writeback)
        return BlkStatus.OK

    def _segments(self, payload: list[memoryview], *, discard: bool) -> BlkStatus:
        """DISCARD or WRITE_ZEROES: every segment is checked before any is carried out."""
        nbytes = total_len(payload)
        if nbytes == 0 or nbytes % DWZ_SEGMENT.size:
            return BlkStatus.IOERR
        limits = self.limits
        max_seg = limits.max_discard_seg if discard else limits.max_write_zeroes_seg
        max_sectors = limits.max_discard_sectors if discard else limits.max_write_zeroes_sectors
        if nbytes // DWZ_SEGMENT.size > max_seg:
            return BlkStatus.UNSUPP
        raw = gather(payload, 0, nbytes)
        segments = list(DWZ_SEGMENT.iter_unpack(raw))
        allowed = 0 if discard else WRITE_ZEROES_FLAG_UNMAP
        for _sector, _count, flags in segments:
            if flags & ~allowed:
                return BlkStatus.UNSUPP
        if self.backend.read_only:
            return BlkStatus.IOERR
        for sector, count, _flags in segments:
            if count > max_sectors or not self._range_ok(sector, count << SECTOR_SHIFT):
                return BlkStatus.IOERR
        for sector, count, flags in segments:
            offset, length = sector << SECTOR_SHIFT, count << SECTOR_SHIFT
            if discard:
                self.backend.discard(offset, length)
            else:
                self.backend.write_zeroes(offset, length, unmap=bool(flags & WRITE_ZEROES_FLAG_UNMAP))
        return BlkStatus.OK
