"""A vfio-user client: drive a device served by ``pcidev serve --vfio-user`` as QEMU would.

:class:`VfioUserClient` speaks the client side of the protocol in :mod:`~pcidev.transport.vfio_user.protocol`:
one request at a time (a lock serializes callers), every reply checked against
the request's id and command. Guest RAM is a memfd passed with ``SCM_RIGHTS``
(:meth:`VfioUserClient.dma_map`), interrupts are eventfds
(:meth:`VfioUserClient.set_irq_eventfds`, :func:`wait_eventfd`).

Errors are typed:

* the server refused a request: :class:`~pcidev.transport.vfio_user.protocol.VfioUserError`
  with the ``errno`` it replied;
  the connection stays usable;
* the connection broke, a reply did not come within the timeout, or the server sent
  something malformed (a short message, a wrong id, a size beyond the negotiated
  maximum, more descriptors than allowed): :class:`~pcidev.errors.TransportError`;
  the stream cannot be re-synchronized, so the client closes the socket.

:class:`~pcidev.transport.vfio_user.protocol.VfioUserError` derives from
:class:`~pcidev.errors.TransportError`: catch it first when both matter.

Example::

    with VfioUserClient.connect("/tmp/edu.sock") as dev:
        vendor = dev.config_read(0x00, 2)
        dev.write_int(0, 0x04, 4, 0x12345678)
"""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import attrs

from pcidev.errors import TransportError
from pcidev.transport.fdpass import close_fds, recv_exact, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.protocol import VfioUserError

__all__ = [
    "DEFAULT_MAX_DATA_XFER_SIZE",
    "DeviceInfo",
    "IrqInfo",
    "RegionInfo",
    "Reply",
    "VfioUserClient",
    "wait_eventfd",
]

#: what this client announces in VERSION (the server never answers with more)
DEFAULT_MAX_DATA_XFER_SIZE = 1 << 20
#: reply bytes beyond the data size a reply may carry (its own fixed fields, capabilities)
_SLACK = 4096
#: the most descriptors accepted with one reply (GET_REGION_INFO sends one; announced in VERSION)
_MAX_REPLY_FDS = 8
_PCI_CAP_LIST = 0x34
_PCI_STATUS_CAP_LIST = 0x10


@attrs.frozen
class Reply:
    """One reply as received.

    :ivar mid: the message id (the request's).
    :ivar cmd: the command (the request's).
    :ivar flags: the header flags (type, ERROR).
    :ivar error: the errno of an ERROR reply (0 otherwise).
    :ivar payload: the bytes after the header.
    :ivar fds: descriptors sent with it; the caller owns (and closes) them.
    """

    mid: int
    cmd: int
    flags: int
    error: int
    payload: bytes
    fds: list[int]


@attrs.frozen
class DeviceInfo:
    """``DEVICE_GET_INFO``: flags (``DEVICE_FLAGS_*``), region and IRQ index counts."""

    flags: int
    num_regions: int
    num_irqs: int


@attrs.frozen
class IrqInfo:
    """``DEVICE_GET_IRQ_INFO``: the IRQ index, its flags (``IRQ_INFO_*``) and vector count."""

    index: int
    flags: int
    count: int


@attrs.frozen
class RegionInfo:
    """``DEVICE_GET_REGION_INFO`` of one region.

    :ivar index: the region (``BAR0_REGION`` .. ``VGA_REGION``).
    :ivar flags: ``REGION_FLAG_*``.
    :ivar size: bytes (0: the region does not exist).
    :ivar offset: where the region starts in ``fd`` (mmap offset).
    :ivar sparse_areas: ``(offset, size)`` parts of the region that may be mmapped.
    :ivar fd: the descriptor to mmap, if the server sent one; the caller owns it.
    """

    index: int
    flags: int
    size: int
    offset: int
    sparse_areas: tuple[tuple[int, int], ...] = ()
    fd: int | None = None


def wait_eventfd(fd: int, timeout: float) -> int:
    """Wait until eventfd ``fd`` is signalled and read (reset) its counter.

    :param fd: an eventfd (blocking or not).
    :param timeout: seconds to wait at most.
    :returns: the counter (> 0), or 0 if it was not signalled in time.
    """
    ready, _, _ = select.select([fd], [], [], max(timeout, 0.0))
    if not ready:
        return 0
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:  # another reader took it
        return 0


class VfioUserClient:
    """The client side of one vfio-user connection.

    :param sock: a connected ``AF_UNIX`` stream socket (owned by the client from now on).
    :param timeout: seconds a request waits for its whole reply at most.
    :param max_data_xfer_size: the most data this client moves in one region access
        (announced in VERSION; the server's own, smaller limit wins).
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0,
                 max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout {timeout} is not positive")
        self.sock = sock
        self.timeout = timeout
        # set once: a send never waits longer than this (a receive sets its own deadline
        # and puts this back), so that a posted write costs no fcntl calls
        sock.settimeout(timeout)
        self.max_data_xfer_size = max_data_xfer_size
        #: the server's capabilities from VERSION (None before :meth:`version`)
        self.server_caps: dict[str, Any] | None = None
        self._mid = 0
        self._lock = threading.Lock()
        self._closed = False

    # -- connection ------------------------------------------------------------------
    @classmethod
    def connect(cls, path: str | os.PathLike[str], *, timeout: float = 10.0, negotiate: bool = True,
                max_data_xfer_size: int = DEFAULT_MAX_DATA_XFER_SIZE) -> VfioUserClient:
        """Connect to the vfio-user socket ``path`` and (with ``negotiate``) send VERSION.

        :param path: the server's socket path.
        :param timeout: see :class:`VfioUserClient`; also bounds the connect.
        :param negotiate: run :meth:`version` before returning.
        :param max_data_xfer_size: see :class:`VfioUserClient`.
        :returns: the connected client.
        :raises TransportError: nobody listens there, or the negotiation failed.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except OSError as exc:
            sock.close()
            raise TransportError(f"vfio-user socket {os.fspath(path)}: {exc.strerror or exc}") from exc
        client = cls(sock, timeout=timeout, max_data_xfer_size=max_data_xfer_size)
        if negotiate:
            try:
                client.version()
            except BaseException:
                client.close()
                raise
        return client

    @property
    def closed(self) -> bool:
        """Whether the socket is closed (by :meth:`close` or after a transport error)."""
        return self._closed

    def close(self) -> None:
        """Close the socket (idempotent); the server sees the client leave."""
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _broken(self, text: str) -> TransportError:
        """Close the connection (the stream cannot be trusted any more); the error to raise."""
        self.close()
        return TransportError(f"vfio-user: {text}")

    # -- messages ----------------------------------------------------------------------
    def send(self, cmd: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = protocol.TYPE_COMMAND) -> int:
        """Send one message without waiting for a reply (low level; see :meth:`request`).

        :param cmd: the command number.
        :param payload: the bytes after the header.
        :param fds: descriptors to pass with it (the caller keeps its copies).
        :param flags: header flags (``FLAG_NO_REPLY`` for a posted write).
        :returns: the message id used.
        :raises TransportError: the connection is closed or broke.
        """
        if self._closed:
            raise TransportError("vfio-user: the connection is closed")
        self._mid = (self._mid + 1) & 0xFFFF
        try:
            send_all(self.sock, protocol.message(self._mid, cmd, payload, flags), fds)
        except TransportError as exc:
            raise self._broken(str(exc)) from exc
        except OSError as exc:
            raise self._broken(f"send failed: {exc}") from exc
        return self._mid

    def _read(self, n: int, deadline: float) -> bytearray:
        """Exactly ``n`` bytes before ``deadline`` (no descriptors expected)."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._broken(f"timed out waiting for a reply ({got} of {n} bytes read)")
            try:
                self.sock.settimeout(left)
                k = self.sock.recv_into(view[got:])
            except TimeoutError as exc:
                raise self._broken(f"timed out waiting for a reply ({got} of {n} bytes read)") from exc
            except OSError as exc:
                raise self._broken(f"receive failed: {exc}") from exc
            if k == 0:
                raise self._broken(f"the server closed the connection ({got} of {n} bytes read)")
            got += k
        return buf

    def recv(self, timeout: float | None = None) -> Reply:
        """Receive one message (low level; see :meth:`request`).

        :param timeout: seconds to wait for all of it (default: the client's).
        :returns: the message as received, ERROR or not.
        :raises TransportError: timeout, closed connection, or a malformed message
            (size smaller than a header or beyond the negotiated maximum, too many fds).
        """
        if self._closed:
            raise TransportError("vfio-user: the connection is closed")
        try:
            return self._recv(timeout)
        finally:
            if not self._closed:
                try:
                    self.sock.settimeout(self.timeout)
                except OSError:
                    pass

    def _recv(self, timeout: float | None) -> Reply:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            self.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            first, fds = recv_exact(self.sock, 1, max_fds=_MAX_REPLY_FDS)
        except TransportError as exc:
            raise self._broken(str(exc)) from exc
        except OSError as exc:
            raise self._broken(f"receive failed: {exc}") from exc
        try:
            rest = self._read(protocol.HEADER_SIZE - 1, deadline)
            mid, cmd, size, flags, err = protocol.HEADER.unpack(first + rest)
            if size < protocol.HEADER_SIZE:
                raise self._broken(f"reply size {size} is smaller than its header")
            if size - protocol.HEADER_SIZE > self._max_reply_payload():
                raise self._broken(f"reply size {size} exceeds the maximum")
            body = bytes(self._read(size - protocol.HEADER_SIZE, deadline))
        except BaseException:
            close_fds(fds)
            raise
        return Reply(mid, cmd, flags, err, body, fds)

    def _max_reply_payload(self) -> int:
        return self.max_data_xfer_size + protocol.REGION_ACCESS_S.size + _SLACK

    def request(self, cmd: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                timeout: float | None = None) -> Reply:
        """Send a command and wait for its reply.

        :param cmd: the command number.
        :param payload: the bytes after the header.
        :param fds: descriptors to pass (the caller keeps its copies).
        :param timeout: seconds to wait for the reply (default: the client's).
        :returns: the successful reply (its fds are the caller's).
        :raises VfioUserError: the server refused (an ERROR reply with an errno).
        :raises TransportError: see :meth:`recv`; also a reply whose id, command or
            type does not match the request.
        """
        with self._lock:
            mid = self.send(cmd, payload, fds)
            rep = self.recv(timeout)
        if (rep.mid, rep.cmd) != (mid, cmd) or rep.flags & protocol.TYPE_MASK != protocol.TYPE_REPLY:
            close_fds(rep.fds)
            raise self._broken(f"reply id {rep.mid} command {rep.cmd} type {rep.flags & protocol.TYPE_MASK} "
                               f"does not answer request id {mid} command {cmd}")
        if rep.flags & protocol.FLAG_ERROR:
            close_fds(rep.fds)
            name = protocol.COMMAND_NAMES.get(cmd, str(cmd))
            if rep.error <= 0 or rep.payload:
                raise self._broken(f"malformed error reply to {name} (errno {rep.error}, "
                                   f"{len(rep.payload)} payload bytes)")
            raise VfioUserError(rep.error, f"{name} refused by the server")
        return rep

    def _payload(self, rep: Reply, n: int, what: str) -> bytes:
        """``rep``'s payload, which must be at least ``n`` bytes (no fds expected)."""
        if len(rep.payload) < n:
            close_fds(rep.fds)
            raise self._broken(f"{what} reply of {len(rep.payload)} bytes, need {n}")
        return rep.payload

    def _no_fds(self, rep: Reply, what: str) -> None:
        if rep.fds:
            close_fds(rep.fds)
            raise self._broken(f"{what} reply carries {len(rep.fds)} unexpected file descriptors")

    # -- negotiation and information --------------------------------------------------
    def version(self, caps: dict[str, Any] | None = None) -> dict[str, Any]:
        """VERSION: announce 0.0 and ``caps``; keep the server's capabilities.

        The server's ``max_data_xfer_size`` (if smaller) becomes the client's.

        :param caps: the client's capabilities (default: ``max_msg_fds``,
            ``max_data_xfer_size`` and ``migration``, so that a server's reply, never
            longer than the request, has room for its own).
        :returns: the server's capabilities (``{}`` if it sent none).
        :raises VfioUserError: the server refused the version.
        """
        mine = caps if caps is not None else {"max_msg_fds": _MAX_REPLY_FDS,
                                              "max_data_xfer_size": self.max_data_xfer_size,
                                              "migration": {"pgsize": protocol.MIGRATION_PGSIZE}}
        text = json.dumps({"capabilities": mine}, separators=(",", ":")).encode() + b"\0"
        rep = self.request(protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + text)
        self._no_fds(rep, "VERSION")
        body = self._payload(rep, protocol.VERSION_HDR.size, "VERSION")
        major, _minor = protocol.VERSION_HDR.unpack_from(body)
        if major != 0:
            raise self._broken(f"the server speaks version {major}")
        try:
            server = protocol.parse_caps(body[protocol.VERSION_HDR.size:])
        except ValueError as exc:
            raise self._broken(f"bad VERSION capabilities from the server ({exc})") from exc
        limit = server.get("max_data_xfer_size")
        if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < self.max_data_xfer_size:
            self.max_data_xfer_size = limit
        self.server_caps = server
        return server

    def device_info(self) -> DeviceInfo:
        """DEVICE_GET_INFO.

        :returns: the device's flags and counts.
        """
        rep = self.request(protocol.DEVICE_GET_INFO,
                           protocol.DEVICE_INFO_S.pack(protocol.DEVICE_INFO_S.size, 0, 0, 0))
        self._no_fds(rep, "DEVICE_GET_INFO")
        body = self._payload(rep, protocol.DEVICE_INFO_S.size, "DEVICE_GET_INFO")
        _argsz, flags, nreg, nirq = protocol.DEVICE_INFO_S.unpack_from(body)
        return DeviceInfo(flags, nreg, nirq)

    def irq_info(self, index: int) -> IrqInfo:
        """DEVICE_GET_IRQ_INFO of IRQ ``index`` (``IRQ_INTX``, ``IRQ_MSI``, ``IRQ_MSIX`` ...)."""
        rep = self.request(protocol.DEVICE_GET_IRQ_INFO,
                           protocol.IRQ_INFO_S.pack(protocol.IRQ_INFO_S.size, 0, index, 0))
        self._no_fds(rep, "DEVICE_GET_IRQ_INFO")
        body = self._payload(rep, protocol.IRQ_INFO_S.size, "DEVICE_GET_IRQ_INFO")
        _argsz, flags, got, count = protocol.IRQ_INFO_S.unpack_from(body)
        return IrqInfo(got, flags, count)

    def region_info(self, index: int) -> RegionInfo:
        """DEVICE_GET_REGION_INFO of region ``index``, with its sparse-mmap areas.

        Asks again with a larger buffer when the server says its answer needs one,
        as QEMU does.

        :returns: the region; its ``fd`` (if any) is the caller's.
        """
        argsz = protocol.REGION_INFO_S.size
        for _attempt in range(2):
            rep = self.request(protocol.DEVICE_GET_REGION_INFO,
                               protocol.REGION_INFO_S.pack(argsz, 0, index, 0, 0, 0))
            if len(rep.fds) > 1:
                close_fds(rep.fds)
                raise self._broken(f"DEVICE_GET_REGION_INFO reply carries {len(rep.fds)} fds")
            body = self._payload(rep, protocol.REGION_INFO_S.size, "DEVICE_GET_REGION_INFO")
            needed, flags, got, cap_off, size, offset = protocol.REGION_INFO_S.unpack_from(body)
            if needed > argsz and len(body) <= argsz:
                close_fds(rep.fds)
                if needed > _SLACK:
                    raise self._broken(f"DEVICE_GET_REGION_INFO wants a {needed}-byte buffer")
                argsz = needed
                continue
            try:
                areas = self._sparse_areas(body, cap_off) if flags & protocol.REGION_FLAG_CAPS else ()
            except BaseException:
                close_fds(rep.fds)
                raise
            return RegionInfo(got, flags, size, offset, areas, rep.fds[0] if rep.fds else None)
        raise self._broken("DEVICE_GET_REGION_INFO asked for a larger buffer twice")

    def _sparse_areas(self, body: bytes, cap_off: int) -> tuple[tuple[int, int], ...]:
        """The sparse-mmap areas in the capability chain of a region-info reply."""
        areas: list[tuple[int, int]] = []
        seen: set[int] = set()
        pos = cap_off
        while pos:
            if pos in seen or pos < protocol.REGION_INFO_S.size \
                    or pos + protocol.CAP_HDR_S.size > len(body):
                raise self._broken(f"region capability at {pos} is outside the reply or loops")
            seen.add(pos)
            cid, _ver, nxt = protocol.CAP_HDR_S.unpack_from(body, pos)
            if cid == protocol.REGION_CAP_SPARSE_MMAP:
                start = pos + protocol.CAP_HDR_S.size
                if start + protocol.SPARSE_HDR_S.size > len(body):
                    raise self._broken("sparse-mmap capability is truncated")
                nr, _ = protocol.SPARSE_HDR_S.unpack_from(body, start)
                start += protocol.SPARSE_HDR_S.size
                if start + nr * protocol.SPARSE_AREA_S.size > len(body):
                    raise self._broken(f"sparse-mmap capability claims {nr} areas")
                areas.extend(protocol.SPARSE_AREA_S.unpack_from(body, start + i * protocol.SPARSE_AREA_S.size)
                             for i in range(nr))
            pos = nxt
        return tuple(areas)

    # -- region accesses --------------------------------------------------------------
    def read(self, region: int, offset: int, count: int) -> bytes:
        """REGION_READ of ``count`` bytes (split into ``max_data_xfer_size`` pieces).

        :param region: the region (``CONFIG_REGION`` for config space, 0..5 for BARs).
        :param offset: the offset in the region.
        :param count: bytes to read (> 0).
        :returns: the data.
        """
        out = bytearray()
        pos, end = offset, offset + count
        while pos < end:
            n = min(end - pos, self.max_data_xfer_size)
            rep = self.request(protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(pos, region, n))
            self._no_fds(rep, "REGION_READ")
            body = self._payload(rep, protocol.REGION_ACCESS_S.size, "REGION_READ")
            if protocol.REGION_ACCESS_S.unpack_from(body) != (pos, region, n) \
                    or len(body) != protocol.REGION_ACCESS_S.size + n:
                raise self._broken(f"REGION_READ reply does not match the request ({pos:#x}+{n} of region "
                                   f"{region}; {len(body)} bytes)")
            out += body[protocol.REGION_ACCESS_S.size:]
            pos += n
        return bytes(out)

    def write(self, region: int, offset: int, data: bytes, *, posted: bool = False) -> None:
        """REGION_WRITE of ``data`` (split into ``max_data_xfer_size`` pieces).

        :param region: the region.
        :param offset: the offset in the region.
        :param data: the bytes (not empty).
        :param posted: send with ``NO_REPLY`` as QEMU does for BAR writes (no error
            comes back; a later request sees the write done, messages are in order).
        """
        for start in range(0, len(data), self.max_data_xfer_size):
            piece = data[start:start + self.max_data_xfer_size]
            payload = protocol.REGION_ACCESS_S.pack(offset + start, region, len(piece)) + piece
            if posted:
                with self._lock:
                    self.send(protocol.REGION_WRITE, payload, flags=protocol.FLAG_NO_REPLY)
                continue
            rep = self.request(protocol.REGION_WRITE, payload)
            self._no_fds(rep, "REGION_WRITE")
            if rep.payload[:protocol.REGION_ACCESS_S.size] != payload[:protocol.REGION_ACCESS_S.size]:
                raise self._broken("REGION_WRITE reply does not echo the request")

    def read_int(self, region: int, offset: int, width: int) -> int:
        """A ``width``-byte little-endian register of ``region``."""
        return int.from_bytes(self.read(region, offset, width), "little")

    def write_int(self, region: int, offset: int, width: int, value: int, *, posted: bool = False) -> None:
        """Write a ``width``-byte little-endian register of ``region``."""
        self.write(region, offset, (value & ((1 << 8 * width) - 1)).to_bytes(width, "little"), posted=posted)

    def config_read(self, offset: int, width: int) -> int:
        """A ``width``-byte config-space register."""
        return self.read_int(protocol.CONFIG_REGION, offset, width)

    def config_write(self, offset: int, width: int, value: int) -> None:
        """Write a ``width``-byte config-space register (always acknowledged)."""
        self.write_int(protocol.CONFIG_REGION, offset, width, value)

    def find_capability(self, cap_id: int) -> int | None:
        """The config-space offset of the first PCI capability ``cap_id`` (0x11: MSI-X).

        :returns: the offset, or None if the device has none.
        """
        if not self.config_read(0x06, 2) & _PCI_STATUS_CAP_LIST:
            return None
        ptr = self.config_read(_PCI_CAP_LIST, 1) & 0xFC
        seen: set[int] = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            hdr = self.read(protocol.CONFIG_REGION, ptr, 2)
            if hdr[0] == cap_id:
                return ptr
            ptr = hdr[1] & 0xFC
        return None

    # -- DMA ------------------------------------------------------------------------------
    def dma_map(self, addr: int, size: int, fd: int | None, offset: int = 0, *, writable: bool = True) -> None:
        """DMA_MAP: make ``[addr, addr+size)`` of guest memory the bytes of ``fd`` at ``offset``.

        :param addr: the guest physical address.
        :param size: bytes.
        :param fd: a memfd (e.g. :func:`pcidev.dma.alloc_memfd`); the caller keeps
            it. None maps the range without memory (the server refuses DMA to it).
        :param offset: where the range starts in ``fd``.
        :param writable: whether the device may write it.
        """
        flags = protocol.DMA_FLAG_READ | (protocol.DMA_FLAG_WRITE if writable else 0)
        rep = self.request(protocol.DMA_MAP, protocol.DMA_MAP_S.pack(protocol.DMA_MAP_S.size, flags, offset,
                                                                      addr, size),
                           [fd] if fd is not None else [])
        self._no_fds(rep, "DMA_MAP")

    def dma_unmap(self, addr: int, size: int) -> None:
        """DMA_UNMAP of one range given to :meth:`dma_map` (the same address and size)."""
        rep = self.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(protocol.DMA_UNMAP_S.size, 0, addr, size))
        self._no_fds(rep, "DMA_UNMAP")

    def dma_unmap_all(self) -> None:
        """DMA_UNMAP with the ALL flag: the device loses all guest memory."""
        rep = self.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(
            protocol.DMA_UNMAP_S.size, protocol.DMA_UNMAP_FLAG_ALL, 0, 0))
        self._no_fds(rep, "DMA_UNMAP")

    # -- interrupts -----------------------------------------------------------------------
    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: Sequence[int] = (),
                 data: bytes = b"") -> None:
        """DEVICE_SET_IRQS as given (low level; ``flags``: one ``IRQ_SET_DATA_*`` | one action)."""
        rep = self.request(protocol.DEVICE_SET_IRQS,
                           protocol.SET_IRQS_S.pack(protocol.SET_IRQS_S.size + len(data), flags, index, start,
                                                    count) + data, fds)
        self._no_fds(rep, "DEVICE_SET_IRQS")

    def set_irq_eventfds(self, index: int, fds: Sequence[int], start: int = 0) -> None:
        """Give vectors ``start..start+len(fds)-1`` of IRQ ``index`` these eventfds.

        For MSI-X the server unmasks a vector that gets an eventfd (QEMU emulates
        the table); the device's MSI-X enable bit is the caller's (config space).
        The eventfds go in as many messages as the server's ``max_msg_fds``
        (from VERSION) requires.

        :param index: ``IRQ_MSIX``, ``IRQ_MSI`` or ``IRQ_INTX``.
        :param fds: eventfds (``os.eventfd``); the caller keeps its copies.
        :param start: the first vector.
        """
        flags = protocol.IRQ_SET_DATA_EVENTFD | protocol.IRQ_SET_ACTION_TRIGGER
        # the server's fd limit per message (1 if it announced none; unknown before VERSION)
        limit = len(fds) if self.server_caps is None else self.server_caps.get("max_msg_fds", 1)
        step = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else 1
        for first in range(0, len(fds), step) if fds else (0,):
            self.set_irqs(index, flags, start + first, len(fds[first:first + step]), fds[first:first + step])

    def disable_irqs(self, index: int) -> None:
        """Take every eventfd of IRQ ``index`` away (the device's vectors are masked again)."""
        self.set_irqs(index, protocol.IRQ_SET_DATA_NONE | protocol.IRQ_SET_ACTION_TRIGGER, 0, 0)

    def trigger_irq(self, index: int, start: int, count: int = 1) -> None:
        """Ask the server to signal the eventfds of these vectors (a loopback test)."""
        self.set_irqs(index, protocol.IRQ_SET_DATA_NONE | protocol.IRQ_SET_ACTION_TRIGGER, start, count)

    def mask_intx(self, masked: bool = True) -> None:
        """Mask (or unmask) INTx; unmasking a still-asserted line signals its eventfd again."""
        action = protocol.IRQ_SET_ACTION_MASK if masked else protocol.IRQ_SET_ACTION_UNMASK
        self.set_irqs(protocol.IRQ_INTX, protocol.IRQ_SET_DATA_NONE | action, 0, 1)

    def reset(self) -> None:
        """DEVICE_RESET: a function-level reset (eventfds and DMA maps stay)."""
        self._no_fds(self.request(protocol.DEVICE_RESET), "DEVICE_RESET")

