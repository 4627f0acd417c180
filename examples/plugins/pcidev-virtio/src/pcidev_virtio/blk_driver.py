"""Host-side virtio-blk requests for tests and benchmarks: :class:`BlkDriver`.

It builds the chains Linux's ``virtio_blk`` builds (header, data, status byte) on a
:class:`~pcidev_virtio.testing.driver.DriverQueue` and reads the status back::

    drv = VirtioDriver(machine, pdev)
    drv.init()
    blk = BlkDriver(drv.queues[0])
    assert blk.write(8, b"x" * 4096) == BlkStatus.OK
    status, data = blk.read(8, 8)

Requests may also be only *placed* in the ring (:meth:`BlkDriver.add_write`, ...) and
announced later with one kick, or never (a migration test leaves them for the destination).
"""

from __future__ import annotations

from collections.abc import Sequence

from pcidev_virtio.blk_spec import DWZ_SEGMENT, ID_BYTES, OUTHDR, BlkStatus, BlkType
from pcidev_virtio.errors import DriverError
from pcidev_virtio.testing.driver import Completion, DriverQueue

__all__ = ["BlkDriver", "status_of"]


def status_of(done: Completion) -> BlkStatus:
    """The status byte of a completed request (the last device-writable byte).

    :raises DriverError: the device did not report the status byte as written.
    """
    if done.written < 1 or not done.data:
        raise DriverError(f"head {done.head}: no status byte written (used length {done.written})")
    return BlkStatus(done.data[-1])


class BlkDriver:
    """virtio-blk requests on one queue of a :class:`~pcidev_virtio.testing.driver.VirtioDriver`.

    :param queue: the request queue.
    :param timeout: seconds to wait for each completion.
    """

    def __init__(self, queue: DriverQueue, *, timeout: float = 10.0) -> None:
        self.queue = queue
        self.timeout = timeout

    # -- placing chains ------------------------------------------------------------------------
    def add_read(self, sector: int, count: int, *, split: Sequence[int] = ()) -> int:
        """Place a read of ``count`` sectors (data buffers cut at the byte offsets ``split``).

        :returns: the chain's head.
        """
        return self.queue.add([OUTHDR.pack(BlkType.IN, 0, sector)], [*_pieces(count * 512, split), 1])

    def add_write(self, sector: int, data: bytes, *, split: Sequence[int] = ()) -> int:
        """Place a write of ``data`` at ``sector`` (data cut at the byte offsets ``split``).

        :returns: the chain's head.
        """
        pieces = _pieces(len(data), split)
        bufs, pos = [], 0
        for n in pieces:
            bufs.append(data[pos:pos + n])
            pos += n
        return self.queue.add([OUTHDR.pack(BlkType.OUT, 0, sector), *bufs], [1])

    # -- one request, waited for -------------------------------------------------------------------
    def _one(self, out: Sequence[bytes], in_lens: Sequence[int]) -> Completion:
        return self.queue.request(out, in_lens, timeout=self.timeout)

    def read(self, sector: int, count: int) -> tuple[BlkStatus, bytes]:
        """Read ``count`` sectors: ``(status, data)``."""
        done = self._one([OUTHDR.pack(BlkType.IN, 0, sector)], [count * 512, 1])
        return status_of(done), done.data[:-1]

    def write(self, sector: int, data: bytes) -> BlkStatus:
        """Write ``data`` (a multiple of 512 bytes) at ``sector``."""
        return status_of(self._one([OUTHDR.pack(BlkType.OUT, 0, sector), data], [1]))

    def flush(self) -> BlkStatus:
        """VIRTIO_BLK_T_FLUSH."""
        return status_of(self._one([OUTHDR.pack(BlkType.FLUSH, 0, 0)], [1]))

    def get_id(self) -> tuple[BlkStatus, bytes]:
        """VIRTIO_BLK_T_GET_ID: ``(status, the 20-byte id)``."""
        done = self._one([OUTHDR.pack(BlkType.GET_ID, 0, 0)], [ID_BYTES, 1])
        return status_of(done), done.data[:ID_BYTES]

    def discard(self, *segments: tuple[int, int]) -> BlkStatus:
        """VIRTIO_BLK_T_DISCARD of ``(sector, count)`` segments."""
        body = b"".join(DWZ_SEGMENT.pack(sector, count, 0) for sector, count in segments)
        return status_of(self._one([OUTHDR.pack(BlkType.DISCARD, 0, 0), body], [1]))

    def write_zeroes(self, *segments: tuple[int, int], unmap: bool = False) -> BlkStatus:
        """VIRTIO_BLK_T_WRITE_ZEROES of ``(sector, count)`` segments."""
        body = b"".join(DWZ_SEGMENT.pack(sector, count, int(unmap)) for sector, count in segments)
        return status_of(self._one([OUTHDR.pack(BlkType.WRITE_ZEROES, 0, 0), body], [1]))

    def raw(self, rtype: int, sector: int = 0, payload: bytes = b"", in_data: int = 0) -> tuple[BlkStatus, bytes]:
        """Any request: header, ``payload`` (if any), ``in_data`` device-writable bytes and the status."""
        out = [OUTHDR.pack(rtype, 0, sector)] + ([payload] if payload else [])
        done = self._one(out, [in_data, 1] if in_data else [1])
        return status_of(done), done.data[:-1]


def _pieces(total: int, split: Sequence[int]) -> list[int]:
    """Lengths of ``total`` bytes cut at the offsets ``split`` (none empty)."""
    points = sorted({p for p in split if 0 < p < total})
    bounds = [0, *points, total]
    return [b - a for a, b in zip(bounds, bounds[1:], strict=False) if b > a] or [0]
