"""The client side of vfio-user migration: device features, migration states, the
state stream, DMA dirty logging, and :func:`migrate`.

Functions over a connected :class:`~pcidev.transport.vfio_user.client.VfioUserClient`
(after VERSION), speaking ``VFIO_USER_DEVICE_FEATURE`` and
``VFIO_USER_MIG_DATA_READ/WRITE`` as a VMM's migration code would
(docs/vfio-user-migration.md). A refusal raises
:class:`~pcidev.transport.vfio_user.protocol.VfioUserError` with the server's errno.

::

    src = VfioUserDevice.connect("/run/a.sock")       # plugged into a Machine, driven...
    dst = VfioUserClient.connect("/run/b.sock")        # a second ``pcidev serve``
    result = migrate(src, dst, path="/run/b.sock")     # src now drives the device at b
    result.precopy_bytes, result.downtime              # the pre-copy's iterations, the stop
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable

import attrs

from pcidev.errors import MigrationError, TransportError
from pcidev.migration.precopy import passes_stalled
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.remote import VfioUserDevice

__all__ = [
    "MigrationOutcome",
    "dirty_pages",
    "feature",
    "feature_probe",
    "logging_report",
    "logging_start",
    "logging_stop",
    "mig_copy",
    "mig_read",
    "mig_read_all",
    "mig_state",
    "mig_write",
    "mig_write_all",
    "migrate",
    "migration_flags",
    "set_mig_state",
]

_HDR = protocol.DEVICE_FEATURE_S


def feature(client: VfioUserClient, flags: int, data: bytes = b"", *, reply_room: int = 0) -> bytes:
    """One DEVICE_FEATURE request (low level).

    :param client: the connection.
    :param flags: the feature number | ``FEATURE_GET``/``SET``/``PROBE``.
    :param data: the feature's data.
    :param reply_room: bytes of reply data the client accepts beyond ``data`` (argsz).
    :returns: the reply's data (after argsz and flags).
    :raises VfioUserError: the server refused.
    """
    argsz = _HDR.size + max(len(data), reply_room)
    rep = client.request(protocol.DEVICE_FEATURE, _HDR.pack(argsz, flags) + data)
    if rep.fds or len(rep.payload) < _HDR.size:
        raise TransportError(f"vfio-user: malformed DEVICE_FEATURE reply ({len(rep.payload)} bytes, "
                             f"{len(rep.fds)} fds)")
    return rep.payload[_HDR.size:]


def feature_probe(client: VfioUserClient, number: int, ops: int = protocol.FEATURE_GET) -> bool:
    """Whether the server supports ``ops`` (``FEATURE_GET`` and/or ``FEATURE_SET``) of feature ``number``.

    :returns: False when the server refuses the probe (EINVAL or ENOTTY).
    """
    try:
        feature(client, number | ops | protocol.FEATURE_PROBE)
    except VfioUserError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTTY):
            return False
        raise
    return True


def migration_flags(client: VfioUserClient) -> int:
    """The MIGRATION feature: ``MIGRATION_STOP_COPY`` | ``MIGRATION_PRE_COPY`` | ``MIGRATION_P2P``."""
    data = feature(client, protocol.FEATURE_MIGRATION | protocol.FEATURE_GET, reply_room=protocol.MIGRATION_S.size)
    return int(protocol.MIGRATION_S.unpack_from(data)[0])


def mig_state(client: VfioUserClient) -> int:
    """The device's migration state (``MIG_STATE_*``)."""
    data = feature(client, protocol.FEATURE_MIG_DEVICE_STATE | protocol.FEATURE_GET,
                   reply_room=protocol.MIG_STATE_S.size)
    return int(protocol.MIG_STATE_S.unpack_from(data)[0])


def set_mig_state(client: VfioUserClient, state: int) -> int:
    """Move the device to migration state ``state`` (the server walks the arcs).

    :returns: the state the server reports afterwards.
    :raises VfioUserError: ``EINVAL`` (no such arc; a refused stream), ``EBUSY`` (cannot migrate now).
    """
    data = feature(client, protocol.FEATURE_MIG_DEVICE_STATE | protocol.FEATURE_SET,
                   protocol.MIG_STATE_S.pack(state, 0xFFFF_FFFF))
    return int(protocol.MIG_STATE_S.unpack_from(data)[0])


def _chunk_size(client: VfioUserClient, chunk: int | None) -> int:
    return min(chunk or client.max_data_xfer_size, client.max_data_xfer_size)


def mig_read(client: VfioUserClient, size: int) -> bytes:
    """One MIG_DATA_READ of up to ``size`` bytes (fewer: the end of a PRE_COPY iteration
    or of the STOP_COPY data).

    :param size: at most the connection's ``max_data_xfer_size``.
    :raises TransportError: a malformed reply.
    """
    rep = client.request(protocol.MIG_DATA_READ, protocol.MIG_DATA_S.pack(protocol.MIG_DATA_S.size + size, size))
    body = rep.payload
    if rep.fds or len(body) < protocol.MIG_DATA_S.size:
        raise TransportError("vfio-user: malformed MIG_DATA_READ reply")
    _argsz, got = protocol.MIG_DATA_S.unpack_from(body)
    data = body[protocol.MIG_DATA_S.size:]
    if got != len(data) or got > size:
        raise TransportError(f"vfio-user: MIG_DATA_READ reply says {got} bytes, carries {len(data)}")
    return data


def mig_write(client: VfioUserClient, piece: bytes) -> None:
    """One MIG_DATA_WRITE of ``piece`` (at most the connection's ``max_data_xfer_size``)."""
    client.request(protocol.MIG_DATA_WRITE,
                   protocol.MIG_DATA_S.pack(protocol.MIG_DATA_S.size + len(piece), len(piece)) + piece)


def mig_read_all(client: VfioUserClient, chunk: int | None = None) -> bytes:
    """MIG_DATA_READ until a short read: the whole state in STOP_COPY, one iteration in PRE_COPY.

    :param chunk: bytes per request (default and at most: the connection's negotiated
        ``max_data_xfer_size``; a server refuses more, as a shorter reply would end the stream).
    """
    size = _chunk_size(client, chunk)
    out = bytearray()
    while True:
        data = mig_read(client, size)
        out += data
        if len(data) < size:
            return bytes(out)


def mig_write_all(client: VfioUserClient, data: bytes, chunk: int | None = None) -> None:
    """MIG_DATA_WRITE of ``data`` in pieces (RESUMING).

    :param chunk: bytes per request (default and at most: the connection's ``max_data_xfer_size``).
    """
    size = _chunk_size(client, chunk)
    for pos in range(0, len(data), size):
        mig_write(client, data[pos:pos + size])


def mig_copy(src: VfioUserClient, dst: VfioUserClient, chunk: int | None = None) -> int:
    """Read from ``src`` until a short read and write each piece into ``dst`` as it comes
    (one PRE_COPY iteration, or the STOP_COPY data; never held whole in memory).

    :param chunk: bytes per request (default and at most: both connections' limit).
    :returns: the bytes copied.
    """
    size = min(_chunk_size(src, chunk), _chunk_size(dst, chunk))
    total = 0
    while True:
        data = mig_read(src, size)
        if data:
            mig_write(dst, data)
            total += len(data)
        if len(data) < size:
            return total


def logging_start(client: VfioUserClient, ranges: list[tuple[int, int]] | tuple[()] = (),
                  page_size: int = protocol.MIGRATION_PGSIZE) -> None:
    """DMA_LOGGING_START over ``ranges`` (``(iova, length)``; none: all mapped memory)."""
    body = protocol.LOGGING_CONTROL_S.pack(page_size, len(ranges), 0) + b"".join(
        protocol.LOGGING_RANGE_S.pack(a, n) for a, n in ranges)
    feature(client, protocol.FEATURE_DMA_LOGGING_START | protocol.FEATURE_SET, body)


def logging_stop(client: VfioUserClient) -> None:
    """DMA_LOGGING_STOP."""
    feature(client, protocol.FEATURE_DMA_LOGGING_STOP | protocol.FEATURE_SET,
            protocol.LOGGING_CONTROL_S.pack(protocol.MIGRATION_PGSIZE, 0, 0))


def logging_report(client: VfioUserClient, iova: int, length: int,
                   page_size: int = protocol.MIGRATION_PGSIZE) -> bytes:
    """DMA_LOGGING_REPORT of ``[iova, iova + length)``: the bitmap (u64 little-endian words,
    bit *i* = page ``iova + i * page_size``); the server clears what it reported."""
    pages = (length + page_size - 1) // page_size
    words = (pages + 63) // 64
    data = feature(client, protocol.FEATURE_DMA_LOGGING_REPORT | protocol.FEATURE_GET,
                   protocol.LOGGING_REPORT_S.pack(iova, length, page_size),
                   reply_room=protocol.LOGGING_REPORT_S.size + 8 * words)
    if len(data) != protocol.LOGGING_REPORT_S.size + 8 * words:
        raise TransportError(f"vfio-user: DMA_LOGGING_REPORT reply of {len(data)} bytes, expected "
                             f"{protocol.LOGGING_REPORT_S.size + 8 * words}")
    return data[protocol.LOGGING_REPORT_S.size:]


def dirty_pages(bitmap: bytes, iova: int, page_size: int = protocol.MIGRATION_PGSIZE) -> list[int]:
    """The page addresses whose bits are set in a :func:`logging_report` bitmap."""
    bits = int.from_bytes(bitmap, "little")
    out = []
    i = 0
    while bits:
        if bits & 1:
            out.append(iova + i * page_size)
        bits >>= 1
        i += 1
    return out


@attrs.frozen
class MigrationOutcome:
    """What :func:`migrate` did.

    :ivar state_bytes: bytes of migration data read in STOP_COPY (the device's state
        stream, and the rest of its memory sources' contents when it has some).
    :ivar downtime: seconds from the source's stop to the destination's RUNNING.
    :ivar dirty_pages: page addresses reported dirty during the migration (sorted, unique).
    :ivar precopy_bytes: bytes of migration data copied in each PRE_COPY iteration (the
        first: every memory source; then what was written since; an iteration of 0
        bytes ended the pre-copy).
    :ivar converged: the pre-copy ended because the last iteration was small enough
        (False: ``max_iterations`` or ``max_stalled_passes`` ended it, or there was none).
    """

    state_bytes: int
    downtime: float
    dirty_pages: tuple[int, ...]
    precopy_bytes: tuple[int, ...] = ()
    converged: bool = False

    @property
    def precopy_iterations(self) -> int:
        """How many PRE_COPY iterations were copied."""
        return len(self.precopy_bytes)


def _report_all(client: VfioUserClient, ranges: list[tuple[int, int]], seen: set[int]) -> None:
    page = protocol.MIGRATION_PGSIZE
    most = max(client.max_data_xfer_size - 64, 8) * 8 * page  # bytes one bitmap reply may cover
    for start, length in ranges:
        for pos in range(start, start + length, most):
            n = min(most, start + length - pos)
            seen.update(dirty_pages(logging_report(client, pos, n), pos))


def _logged_ranges(device: VfioUserDevice) -> list[tuple[int, int]]:
    """The page-widened ranges of the proxy's guest memory (what logging without ranges covers)."""
    page = protocol.MIGRATION_PGSIZE
    spans: list[list[int]] = []
    memory = device.memory
    for r in memory.regions() if memory is not None else []:
        lo, hi = r.gpa - r.gpa % page, -(-r.end // page) * page
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    return [(lo, hi - lo) for lo, hi in spans]


def migrate(device: VfioUserDevice, dst: VfioUserClient, *, path: str | None = None,
            chunk: int | None = None, max_iterations: int = 30, max_downtime_ms: float = 10.0,
            on_iteration: Callable[[int, int], None] | None = None,
            before_stop: Callable[[], None] | None = None, max_stalled_passes: int = 4) -> MigrationOutcome:
    """Move the device behind ``device`` (a proxy the host drives) to the server behind
    ``dst``, and make the proxy drive it there.

    The steps (docs/vfio-user-migration.md): ``dst`` is given the same guest memory and
    eventfds (:meth:`~pcidev.transport.vfio_user.remote.VfioUserDevice.establish`) and
    goes to RESUMING; the source starts dirty logging and, when it offers PRE_COPY, goes
    there: each iteration (a run of MIG_DATA_READ up to a short read: its memory
    sources' contents, then what was written since) is written into ``dst`` as it is
    read, until an iteration is empty or would take at most ``max_downtime_ms`` at the
    bandwidth measured so far, or ``max_iterations`` were copied, or ``max_stalled_passes``
    iterations in a row were no smaller than the smallest before them (the device
    dirties faster than it is copied); then the source goes to
    STOP_COPY and the rest is copied; the destination goes through STOP (the load) to
    RUNNING; the source reports its dirty pages a last time, stops logging and stays in
    STOP; the proxy is retargeted to ``dst`` and the old connection closed.

    The host may drive the device during the pre-copy (its requests share the source's
    connection), and must not from ``before_stop`` on. On a failure before the
    destination runs, the source runs again (and stops logging) and
    :class:`~pcidev.errors.MigrationError` is raised; the destination is left as it is
    (reset it or close it).

    :param device: the source's proxy (plugged into the host, attached).
    :param dst: a connection to the destination server, after VERSION (owned by the proxy
        on success).
    :param path: the destination's socket path (for a later
        :meth:`~pcidev.transport.vfio_user.remote.VfioUserDevice.reconnect`).
    :param chunk: bytes per MIG_DATA request (default: each connection's limit).
    :param max_iterations: the most PRE_COPY iterations (0: no pre-copy data).
    :param max_downtime_ms: the pre-copy ends once the next iteration is estimated to take
        at most this long.
    :param on_iteration: called with ``(iteration, bytes)`` after each PRE_COPY iteration
        (the device still runs).
    :param before_stop: called once the pre-copy ended, before the source stops (a host
        quiesces its own I/O there).
    :param max_stalled_passes: see :func:`~pcidev.migration.precopy.passes_stalled` (0:
        only ``max_iterations`` ends a pre-copy that does not converge).
    :returns: the state size, the downtime, the dirty pages reported and the pre-copy's figures.
    :raises MigrationError: the migration failed (the source runs).
    :raises ValueError: a negative ``max_iterations``, ``max_stalled_passes`` or ``max_downtime_ms``.
    """
    if max_iterations < 0 or max_downtime_ms < 0 or max_stalled_passes < 0:
        raise ValueError("max_iterations, max_stalled_passes and max_downtime_ms must be >= 0")
    src = device.client
    want = protocol.MIGRATION_STOP_COPY
    offers = []
    for name, c in (("source", src), ("destination", dst)):
        try:
            flags = migration_flags(c)
        except VfioUserError as exc:
            raise MigrationError(f"the {name} does not support migration: {exc}") from exc
        if flags & want != want:
            raise MigrationError(f"the {name} does not offer STOP_COPY (flags {flags:#x})")
        offers.append(flags)
    ranges = _logged_ranges(device)
    seen: set[int] = set()
    src_stopped = False
    dst_running = False
    precopy: list[int] = []
    converged = False
    try:
        device.establish(dst)
        set_mig_state(dst, protocol.MIG_STATE_RESUMING)  # it takes data from the first pre-copy byte on
        logging_start(src)
        if offers[0] & protocol.MIGRATION_PRE_COPY and max_iterations:
            set_mig_state(src, protocol.MIG_STATE_PRE_COPY)
            converged = _precopy(src, dst, chunk, max_iterations, max_downtime_ms, precopy, on_iteration,
                                 max_stalled_passes)
        _report_all(src, ranges, seen)
        if before_stop is not None:
            before_stop()
        t0 = time.monotonic()
        src_stopped = True
        set_mig_state(src, protocol.MIG_STATE_STOP_COPY)
        state_bytes = mig_copy(src, dst, chunk)
        set_mig_state(dst, protocol.MIG_STATE_STOP)
        set_mig_state(dst, protocol.MIG_STATE_RUNNING)
        dst_running = True
        downtime = time.monotonic() - t0
        _report_all(src, ranges, seen)
        logging_stop(src)
        set_mig_state(src, protocol.MIG_STATE_STOP)
    except (TransportError, MigrationError) as exc:
        if not dst_running:
            _resume_source(src)
            raise MigrationError(f"vfio-user migration failed ({'after' if src_stopped else 'before'} the "
                                 f"source stopped): {exc}; the source runs") from exc
        raise MigrationError(f"vfio-user migration: the destination runs, but finishing on the source "
                             f"failed: {exc}") from exc
    old = device.retarget(dst, path=path)
    old.close()
    return MigrationOutcome(state_bytes=state_bytes, downtime=downtime, dirty_pages=tuple(sorted(seen)),
                            precopy_bytes=tuple(precopy), converged=converged)


def _precopy(src: VfioUserClient, dst: VfioUserClient, chunk: int | None, max_iterations: int,
             max_downtime_ms: float, sizes: list[int], on_iteration: Callable[[int, int], None] | None,
             max_stalled_passes: int) -> bool:
    """Copy PRE_COPY iterations from ``src`` into ``dst`` (appending their sizes to
    ``sizes``) until one is small enough; returns whether one was (False: the limit, or
    the iterations stopped shrinking: :func:`~pcidev.migration.precopy.passes_stalled`)."""
    copied = 0
    seconds = 0.0
    while len(sizes) < max_iterations and not passes_stalled(sizes, max_stalled_passes):
        t0 = time.monotonic()
        n = mig_copy(src, dst, chunk)
        seconds += time.monotonic() - t0
        copied += n
        sizes.append(n)
        if on_iteration is not None:
            on_iteration(len(sizes), n)
        if len(sizes) > 1 or n == 0:  # (the first is everything: the next tells the rate of change)
            bandwidth = copied / seconds if seconds > 0 else 0.0
            if n == 0 or (bandwidth and 1000.0 * n / bandwidth <= max_downtime_ms):
                return True
    return False


def _resume_source(src: VfioUserClient) -> None:
    """Back to RUNNING with logging off, as far as the source lets us."""
    for step in (lambda: set_mig_state(src, protocol.MIG_STATE_RUNNING), lambda: logging_stop(src)):
        try:
            step()
        except TransportError:
            pass
