"""A vfio-user server: the handlers of one client's (QEMU's ``vfio-user-pci``) connection.

The server takes one message at a time, in order (read by
:class:`~pcidev.transport.vfio_user.reader.MessageReader`, driven by
:class:`~pcidev.transport.vfio_user.loop.ConnectionLoop`), calls the device's
:class:`~pcidev.transport.endpoint.DeviceEndpoint`, and answers. Every malformed
or refused request gets an ERROR reply with an errno (unless it was sent with
NO_REPLY); an unexpected exception in a handler is answered with ``EIO`` and logged, so a
client's request does not end the server (a reply that cannot be sent ends the connection).
A message whose size cannot be trusted (larger than the advertised maximum) is
answered with ``E2BIG`` and ends the connection, because the stream cannot be
re-synchronized.

**A client that leaves is not a dead device** (the spec's "Socket Disconnection
Behavior"): when the connection ends by EOF or a transport error,
:meth:`VfioUserServer.disconnect` quiesces the device, unmaps the client's memory,
removes its eventfds (MSI-X vectors masked, so interrupts latch as pending) and resets
the connection's state, keeping the device's. The next client's first BAR access or
``DEVICE_RESET`` resumes the device (config space and info requests do not).

**Migration** (VFIO migration v2 over the socket): ``DEVICE_FEATURE`` with the
``MIGRATION``, ``MIG_DEVICE_STATE`` and ``DMA_LOGGING_*`` features and
``MIG_DATA_READ/WRITE`` (:mod:`~pcidev.transport.vfio_user.migration`; dirty pages are
logged by the device's :class:`~pcidev.dma.GuestMemory`). docs/vfio-user-migration.md.

Regions are Linux's ``VFIO_PCI_*``: BAR0..5, the expansion ROM (6), config space
(7), VGA (8, empty). A BAR whose handler is a :class:`~pcidev.bar.RamBacking` is
offered for mmap with a sparse-mmap capability over its memfd. Interrupts are
eventfds only (SET_IRQS); QEMU emulates the MSI-X table, so a vector that has an
eventfd is unmasked in the device's own table, and masked again when its eventfd
is removed.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import select
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from pcidev.bar import RamBacking
from pcidev.dma import shrink_sealed
from pcidev.errors import (
    ConfigError,
    ConfigSpaceError,
    DmaError,
    IrqError,
    MigrationError,
    MmioError,
    TransportError,
)
from pcidev.irq import is_eventfd, signal_eventfd
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import ENTRY_CTRL, ENTRY_SIZE, MsixCapability
from pcidev.pci.config import ResetKind
from pcidev.ratelog import RateLimitedLog
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.conn import ConnectionState, NofdMaps
from pcidev.transport.vfio_user.fastpath import FastPath
from pcidev.transport.vfio_user.loop import ConnectionLoop
from pcidev.transport.vfio_user.migration import MIGRATION_FLAGS, MigrationStateMachine
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.reader import Message, MessageReader

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_DMA_MAPS", "DEFAULT_MESSAGE_TIMEOUT", "MIN_MESSAGE_TIMEOUT", "MAX_MESSAGE_TIMEOUT",
           "ExtraClientGuard", "VfioUserServer", "client_left"]

#: the most DMA maps (with and without an fd) one client may have at a time
DEFAULT_MAX_DMA_MAPS = 1024
#: seconds a message that started may take to arrive whole, and a reply to be taken
DEFAULT_MESSAGE_TIMEOUT = 30.0
#: the shortest ``message_timeout`` (seconds): ``SO_SNDTIMEO`` of zero would mean none
MIN_MESSAGE_TIMEOUT = 0.001
#: the longest ``message_timeout`` (seconds): a day
MAX_MESSAGE_TIMEOUT = 86400.0
#: replies up to this size go out in one ``send`` bounded by ``SO_SNDTIMEO``; larger ones
#: get an overall deadline
_ONE_SEND = 4096

#: how handle_one()'s one-message loop ends once the message is answered
_ONE_DONE = "answered one message"
#: the reason of a connection ended by a message too large to skip (the stream is lost)
_OVERSIZED = "a message whose size cannot be trusted (oversized, or below its header)"

#: endpoints whose device migrated out (VfioUserServer.migrated_out): outlives the
#: connection and its server object, as the device does
_MIGRATED_OUT: weakref.WeakSet[DeviceEndpoint] = weakref.WeakSet()


def endpoint_migrated_out(endpoint: DeviceEndpoint) -> bool:
    """Whether ``endpoint``'s device migrated out over vfio-user and has not run since
    (:attr:`VfioUserServer.migrated_out`; outlives its connection)."""
    return endpoint in _MIGRATED_OUT


def client_left(reason: str) -> bool:
    """Whether a connection ended because of its client (EOF, a transport error, a message
    that broke the stream), as opposed to a wake-up hook (a handover stops reading)."""
    return reason == "eof" or reason.startswith("transport:") or reason == _OVERSIZED


def _chunks(offset: int, count: int, widths: tuple[int, ...]) -> list[tuple[int, int]]:
    """Split ``[offset, offset+count)`` into naturally aligned accesses of ``widths``."""
    out = []
    pos, end = offset, offset + count
    while pos < end:
        for w in widths:
            if pos % w == 0 and pos + w <= end:
                break
        else:  # pragma: no cover - widths always ends with 1
            raise AssertionError
        out.append((pos, w))
        pos += w
    return out


class VfioUserServer:
    """Serves one :class:`~pcidev.transport.endpoint.DeviceEndpoint` to one client.

    :param endpoint: the device endpoint (started by the caller).
    :param sock: the connected ``AF_UNIX`` stream socket (the server closes it at the end).
    :param max_msg_fds: the most fds accepted with one message (advertised).
    :param max_data_xfer_size: the most data in one region access (advertised).
    :param max_dma_maps: the most DMA maps, with and without an fd, at a time (more:
        ``ENOSPC``).
    :param message_timeout: seconds a message that started may take to arrive whole,
        and a reply may wait for the client to take it (``SO_SNDTIMEO``); then the
        connection ends. A client idle between messages is never timed out.
    :param allow_unsealed_dma: accept ``DMA_MAP`` fds without ``F_SEAL_SHRINK``. **Only
        for a trusted client**: one that shrinks such a file under a mapping kills the
        server with ``SIGBUS``. Off: such a map is refused with ``EINVAL``.
    """

    def __init__(self, endpoint: DeviceEndpoint, sock: socket.socket, *, max_msg_fds: int = 8,
                 max_data_xfer_size: int = 1 << 20, max_dma_maps: int = DEFAULT_MAX_DMA_MAPS,
                 message_timeout: float = DEFAULT_MESSAGE_TIMEOUT, allow_unsealed_dma: bool = False) -> None:
        if max_dma_maps <= 0 or not MIN_MESSAGE_TIMEOUT <= message_timeout <= MAX_MESSAGE_TIMEOUT:
            raise ConfigError(f"vfio-user server: max_dma_maps {max_dma_maps} must be positive and message_timeout "
                              f"{message_timeout} in [{MIN_MESSAGE_TIMEOUT}, {MAX_MESSAGE_TIMEOUT:g}] seconds")
        self.endpoint = endpoint
        self.device = endpoint.device
        self.sock = sock
        #: the most DMA maps at a time (with and without an fd)
        self.max_dma_maps = max_dma_maps
        #: seconds a started message may take to arrive, and a reply to be taken
        self.message_timeout = message_timeout
        #: DMA_MAP accepts fds that can shrink (a trusted client only)
        self.allow_unsealed_dma = allow_unsealed_dma
        self._refusal_log = RateLimitedLog(log)
        self._conn = ConnectionState(max_msg_fds=max_msg_fds, max_data_xfer_size=max_data_xfer_size)
        self.reader = MessageReader(sock, max_msg_fds=max_msg_fds, max_data_xfer_size=max_data_xfer_size)
        self.fast = FastPath(endpoint, self._conn)
        self.loop = ConnectionLoop(self.handle_message, self.reader, fast=self.fast,
                                   message_timeout=message_timeout)
        try:  # a reply the client does not take ends the connection instead of blocking the server
            sec = int(message_timeout)
            usec = int((message_timeout - sec) * 1_000_000)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("@ll", sec, usec))
        except OSError as exc:  # pragma: no cover - an AF_UNIX stream socket takes it
            log.warning("vfio-user: no send deadline on the client socket: %s", exc)
        #: the migration state machine (its state is ``conn.mig_state``)
        self.migration = MigrationStateMachine(self.device, self._conn, pm=endpoint.pm, settle=self._settle_dirty,
                                               loaded=self._remirror_msix, arc=self._arc_taken)
        if self.migrated_out:  # a previous client migrated the device out: it is stopped, and says so
            self._conn.mig_state = protocol.MIG_STATE_STOP
        #: the device was left quiesced by a client that went away: the first BAR access
        #: or DEVICE_RESET of this connection resumes it
        self.dormant = self.device.quiesced
        #: :meth:`handle_one` answered a message that broke the framing: it reads no more
        self._stream_lost = False

    @property
    def migrated_out(self) -> bool:
        """Whether the device's state was saved for a migration (it reached STOP_COPY) and
        it has not run since: its state lives on at the destination, so it must not run
        here again by itself (a ``file`` namespace would be written by two processes).
        Outlives the connection: a later client finds the device in STOP, and neither its
        BAR accesses nor anything else resume it but ``DEVICE_RESET`` or an explicit
        ``MIG_DEVICE_STATE`` RUNNING. Cleared by those and by a successful load
        (RESUMING to STOP)."""
        return self.endpoint in _MIGRATED_OUT

    @migrated_out.setter
    def migrated_out(self, value: bool) -> None:
        if value:
            _MIGRATED_OUT.add(self.endpoint)
        else:
            _MIGRATED_OUT.discard(self.endpoint)

    def _arc_taken(self, cur: int, nxt: int) -> None:
        if nxt == protocol.MIG_STATE_STOP_COPY:
            self.migrated_out = True
        elif (cur, nxt) in ((protocol.MIG_STATE_STOP, protocol.MIG_STATE_RUNNING),
                            (protocol.MIG_STATE_RESUMING, protocol.MIG_STATE_STOP)):
            self.migrated_out = False

    @property
    def conn(self) -> ConnectionState:
        """The connection's own state (what the client set up; travels in a handover).
        Replace it as a whole (a handover's destination restores one): the migration state
        machine follows."""
        return self._conn

    @conn.setter
    def conn(self, state: ConnectionState) -> None:
        self._conn = state
        self.migration.conn = state
        self.fast.conn = state

    @property
    def max_msg_fds(self) -> int:
        """The most fds accepted with one message (advertised)."""
        return self.conn.max_msg_fds

    @property
    def max_data_xfer_size(self) -> int:
        """The most data in one region access (advertised)."""
        return self.conn.max_data_xfer_size

    @property
    def client_caps(self) -> dict[str, Any] | None:
        """What the client said in VERSION (None before)."""
        return self.conn.client_caps

    @property
    def nofd_maps(self) -> NofdMaps:
        """DMA ranges the client gave without an fd: address -> (size, flags)."""
        return self.conn.nofd_maps

    @property
    def irq_vectors(self) -> dict[int, set[int]]:
        """Vectors of each IRQ index that have an eventfd."""
        return self.conn.irq_vectors

    @property
    def intx_masked(self) -> bool:
        """Whether the client masked INTx."""
        return self.conn.intx_masked

    @property
    def counts(self) -> dict[str, int]:
        """Messages handled, by command name."""
        return self.conn.counts

    # -- loop ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Make :meth:`serve` return at the next message boundary (any thread). The
        socket is not shut down: only this process stops reading it."""
        self.loop.wake()

    def serve(self) -> str:
        """Handle messages until the client leaves or :meth:`stop`. Closes the socket.

        When the client left (:func:`client_left`), :meth:`disconnect` runs; when a
        wake-up hook ended the loop (a handover), nothing is torn down.

        :returns: why it ended.
        """
        try:
            reason = self.loop.run()
        finally:
            self.loop.close()
            self.reader.close()  # fds of a message read but never handled (a handover took its pending bytes first)
            try:
                self.sock.close()
            except OSError:
                pass
        if client_left(reason):
            self.disconnect()
        return reason

    def disconnect(self) -> None:
        """The client left: quiesce the device (no DMA lands in memory about to vanish),
        unmap every DMA region and fd-less map, remove every eventfd (MSI-X vectors masked:
        interrupts latch as pending; INTx cleared), stop dirty logging, reset the
        migration state machine and the connection state (its message counts stay). The
        device keeps its state and stays quiesced until the next client's first BAR
        access or DEVICE_RESET (a device that migrated out stays stopped: see
        :attr:`migrated_out`).

        Never raises: each step that fails is logged in one line and the others still
        run. A region whose views are still alive (a device that did not quiesce) leaves
        the table all the same (:meth:`GuestMemory.unmap <pcidev.dma.GuestMemory.unmap>`
        with ``forget_views``), so the next client's ``DMA_MAP`` of the same range works.
        """
        dev = self.device
        memory = self.endpoint.memory

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as exc:  # a client that left must not take the server down
                log.warning("vfio-user: after the client left, %s failed: %s: %s", what, type(exc).__name__, exc)

        step("quiescing the device", dev.quiesce)
        step("stopping dirty logging", memory.stop_dirty_log)
        step("resetting the migration state", self.migration.reset)
        step("forgetting fd-less maps", self.conn.nofd_maps.clear)
        for region in memory.regions():
            step(f"unmapping {region.gpa:#x}+{region.size:#x}",
                 functools.partial(memory.unmap, region.gpa, region.size, forget_views=True))
        step("removing the eventfds", self._drop_eventfds)
        counts = self.conn.counts
        self.conn = self._fresh_conn(counts)
        self.dormant = True

    def _drop_eventfds(self) -> None:
        sink = self.endpoint.sink
        with self.device.irq.lock:
            for index, vectors in self.conn.irq_vectors.items():
                for v in sorted(vectors):
                    self._assign(index, v, None)
            for v in sorted(sink.vector_fds):  # eventfds this connection did not record (adopted)
                self._assign(protocol.IRQ_MSIX, v, None)
            if sink.intx_fd is not None:
                self._assign(protocol.IRQ_INTX, 0, None)

    def _fresh_conn(self, counts: dict[str, int] | None = None) -> ConnectionState:
        """The state of a connection that set nothing up yet (in STOP if the device migrated out)."""
        conn = ConnectionState(max_msg_fds=self.conn.max_msg_fds, max_data_xfer_size=self.conn.max_data_xfer_size,
                               counts={} if counts is None else counts)
        if self.migrated_out:
            conn.mig_state = protocol.MIG_STATE_STOP
        return conn

    def migration_busy(self) -> str | None:
        """Why the device is not simply running on this connection, or None: a migration
        state other than RUNNING, or DMA dirty logging on. A handover refuses then."""
        if self.conn.mig_state != protocol.MIG_STATE_RUNNING:
            return f"migration state {protocol.MIG_STATE_NAMES.get(self.conn.mig_state, self.conn.mig_state)}"
        if self.endpoint.memory.dirty is not None:
            return "DMA dirty logging is on"
        return None

    def _wake(self) -> None:
        """Resume a device a previous client left quiesced (first BAR access, DEVICE_RESET)."""
        self.dormant = False
        if self.device.quiesced and self.conn.mig_state == protocol.MIG_STATE_RUNNING:
            self.device.resume()

    def _settle_dirty(self) -> None:
        log_ = self.endpoint.memory.dirty
        if log_ is not None:
            log_.settle()

    def _remirror_msix(self) -> None:
        """After a load: the MSI-X mask bits mirror this connection's eventfds again."""
        msix = self.device.caps.find(MsixCapability)
        if msix is None:
            return
        have = self.conn.irq_vectors[protocol.IRQ_MSIX]
        with self.device.lock, self.device.irq.lock:
            for v in range(msix.nvectors):
                self._msix_mask(v, v not in have)

    def handle_one(self) -> str | None:
        """Read and answer one message (blocks until one came; :meth:`serve`'s loop does not
        use it). It runs a :class:`~pcidev.transport.vfio_user.loop.ConnectionLoop` for
        one message, so the deadlines are the loop's: a client idle *between* messages may
        wait as long as it likes, but a message that started (some of its bytes were read,
        here or before) must arrive whole within ``message_timeout`` seconds of the first of
        them this call saw, however slowly its bytes come; a reply is bounded as in the loop
        (``SO_SNDTIMEO``, and ``message_timeout`` as a whole for a large one).

        :returns: a reason to end the connection, as the loop's (``"eof"``,
            ``"transport: deadline: ..."``, ``"transport: ..."`` also when the reply could
            not be sent, a message that broke the framing), or None.
        """
        if self._stream_lost:  # the reader reads nothing more: a loop would poll in vain
            return _OVERSIZED
        answered: list[str | None] = []

        def once(msg: Message) -> str | None:
            answered.append(self.handle_message(msg))
            return _ONE_DONE

        loop = ConnectionLoop(once, self.reader, message_timeout=self.message_timeout)
        try:
            ended = loop.run()
        finally:
            loop.close()
        reason = answered[0] if answered and ended == _ONE_DONE else ended
        if reason == _OVERSIZED:
            self._stream_lost = True
        return reason

    def handle_message(self, msg: Message) -> str | None:
        """Answer one message read by the reader (the reply is sent when this returns).

        :returns: a reason to end the connection, or None.
        :raises TransportError: the reply could not be sent.
        """
        mid, cmd, flags, body, fds = msg.mid, msg.cmd, msg.flags, msg.body, msg.fds
        if msg.error is not None:
            close_fds(fds)
            self._error(mid, cmd, flags, msg.error[0], msg.error[1])
            return _OVERSIZED if msg.fatal else None
        kind = flags & protocol.TYPE_MASK
        if kind == protocol.TYPE_REPLY:
            close_fds(fds)
            log.warning("vfio-user: unexpected reply id %d cmd %d (the server sends no requests)", mid, cmd)
            return None
        name = protocol.COMMAND_NAMES.get(cmd, str(cmd))
        counts = self.conn.counts
        counts[name] = counts.get(name, 0) + 1
        out_fds: list[int] = []
        try:
            if kind != protocol.TYPE_COMMAND:
                raise VfioUserError(errno.EINVAL, f"message type {kind} is neither command nor reply")
            if flags & ~(protocol.TYPE_MASK | protocol.FLAG_NO_REPLY | protocol.FLAG_ERROR) \
                    or flags & protocol.FLAG_ERROR:
                raise VfioUserError(errno.EINVAL, f"bad flags {flags:#x} on a command")
            payload, out_fds = self.dispatch(cmd, body, fds)
            fds = []
        except VfioUserError as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, exc.errno, str(exc))
            return None
        except (ConfigSpaceError, MmioError, IrqError, ConfigError) as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, errno.EINVAL, str(exc))
            return None
        except DmaError as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, errno.EINVAL, str(exc))
            return None
        except (MigrationError, TransportError) as exc:
            close_fds(fds)
            self._error(mid, cmd, flags, errno.ENODEV, str(exc))
            return None
        except Exception as exc:  # a bug here must not end the guest's device
            close_fds(fds)
            log.exception("vfio-user: %s failed", name)
            self._error(mid, cmd, flags, errno.EIO, f"{type(exc).__name__}: {exc}")
            return None
        if not flags & protocol.FLAG_NO_REPLY:
            self._send_reply(protocol.reply(mid, cmd, payload), out_fds)
        return None

    def _send_reply(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send a reply. ``SO_SNDTIMEO`` bounds each ``send``; a reply larger than
        :data:`_ONE_SEND` may take several, and a client taking it slowly would restart that
        timeout each time: it gets ``message_timeout`` as a whole instead.

        :raises TransportError: the client did not take it in time, or went away.
        """
        deadline = time.monotonic() + self.message_timeout if len(data) > _ONE_SEND else None
        send_all(self.sock, data, fds, deadline=deadline)

    def _error(self, mid: int, cmd: int, flags: int, err: int, text: str) -> None:
        log.info("vfio-user: refusing %s (id %d): %s", protocol.COMMAND_NAMES.get(cmd, cmd), mid, text)
        if not flags & protocol.FLAG_NO_REPLY:
            self._send_reply(protocol.error_reply(mid, cmd, err))

    # -- dispatch -----------------------------------------------------------------------
    def dispatch(self, cmd: int, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        """Execute one command. Takes ownership of ``fds`` on success (closes what it
        does not keep); on an exception the caller closes them.

        :returns: the reply payload and the fds to send with it.
        :raises VfioUserError: (and pcidev errors) to refuse the command.
        """
        takes_fds = cmd in (protocol.DMA_MAP, protocol.DEVICE_SET_IRQS)
        if fds and not takes_fds:
            raise VfioUserError(errno.EINVAL, f"command {cmd} carries no file descriptors")
        handler = self._HANDLERS.get(cmd)
        if handler is None:
            raise VfioUserError(errno.ENOSYS, f"unsupported command {cmd}")
        return handler(self, body, fds)

    @staticmethod
    def _need(body: bytes, n: int, what: str) -> None:
        if len(body) < n:
            raise VfioUserError(errno.EINVAL, f"{what}: payload of {len(body)} bytes, need {n}")

    # VERSION ------------------------------------------------------------------------------
    def _version(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.VERSION_HDR.size, "VERSION")
        major, _minor = protocol.VERSION_HDR.unpack_from(body)
        if major != 0:
            raise VfioUserError(errno.ENOTSUP, f"VERSION: major {major} (this server speaks 0)")
        text = body[protocol.VERSION_HDR.size:]
        try:
            caps = protocol.parse_caps(text)
        except ValueError as exc:
            raise VfioUserError(errno.EINVAL, f"VERSION: {exc}") from None
        self.conn.client_caps = caps
        limits: dict[str, Any] = {"max_msg_fds": self.max_msg_fds, "max_data_xfer_size": self.max_data_xfer_size}
        full = dict(limits)
        theirs = caps.get("migration")
        if isinstance(theirs, dict):  # only what the client proposed: the reply's capabilities are a subset
            mig: dict[str, Any] = {"pgsize": protocol.MIGRATION_PGSIZE}
            if "max_bitmap_size" in theirs:  # a DMA_LOGGING_REPORT bitmap fits one reply
                mig["max_bitmap_size"] = self.max_data_xfer_size
            full["migration"] = mig
        for mine in (self._caps_json(full), self._caps_json(limits), b"{}\0", b""):
            if len(mine) <= len(text):  # never larger than the client's own request (its buffer)
                break
        return protocol.VERSION_HDR.pack(0, 0) + mine, []

    @staticmethod
    def _caps_json(caps: dict[str, Any]) -> bytes:
        return json.dumps({"capabilities": caps}, separators=(",", ":")).encode() + b"\0"

    # DMA ------------------------------------------------------------------------------------
    def _overlaps(self, addr: int, size: int) -> bool:
        """Whether ``[addr, addr + size)`` meets a map (``O(log n)`` on both tables)."""
        return (self.nofd_maps.overlapping(addr, size) is not None
                or self.endpoint.memory.overlapping(addr, size) is not None)

    def dma_map_count(self) -> int:
        """DMA maps of this connection: with an fd (guest-memory regions) and without."""
        return len(self.nofd_maps) + self.endpoint.memory.region_count()

    def _dma_map(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.DMA_MAP_S.size, "DMA_MAP")
        argsz, flags, offset, addr, size = protocol.DMA_MAP_S.unpack_from(body)
        if argsz < protocol.DMA_MAP_S.size:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: argsz {argsz}")
        if flags & ~0xF:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: unknown flags {flags:#x}")
        if size == 0 or addr + size > 1 << 64:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: bad range {addr:#x}+{size:#x}")
        if len(fds) > 1:
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: {len(fds)} fds (at most 1)")
        if self.dma_map_count() >= self.max_dma_maps:
            raise VfioUserError(errno.ENOSPC, f"DMA_MAP: {self.max_dma_maps} maps already (the limit)")
        if self._overlaps(addr, size):
            raise VfioUserError(errno.EEXIST, f"DMA_MAP: {addr:#x}+{size:#x} overlaps a mapped range")
        if not fds:
            self.nofd_maps[addr] = (size, flags)
            return b"", []
        if not self.allow_unsealed_dma and not shrink_sealed(fds[0]):
            self._refusal_log(
                "vfio-user: refusing DMA_MAP %#x+%#x: its fd has no F_SEAL_SHRINK seal, so the client could "
                "shrink the file under the device (SIGBUS); share guest RAM from a sealed memfd (QEMU: "
                "-object memory-backend-memfd with its default seal=on)", addr, size)
            raise VfioUserError(errno.EINVAL, f"DMA_MAP: {addr:#x}+{size:#x}: the fd is not sealed against "
                                              "shrinking (F_SEAL_SHRINK)")
        try:
            self.endpoint.dma_map(addr, size, fds[0], offset, writable=bool(flags & protocol.DMA_FLAG_WRITE),
                                  name=f"vfio-user-{addr:#x}", allow_unsealed=self.allow_unsealed_dma)
        finally:
            close_fds(fds)  # the guest memory keeps its own duplicate
            fds.clear()
        return b"", []

    def _dma_unmap(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.DMA_UNMAP_S.size, "DMA_UNMAP")
        argsz, flags, addr, size = protocol.DMA_UNMAP_S.unpack_from(body)
        if argsz < protocol.DMA_UNMAP_S.size:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: argsz {argsz}")
        echo = body[:protocol.DMA_UNMAP_S.size]
        if flags == protocol.DMA_UNMAP_FLAG_ALL:
            if addr or size:
                raise VfioUserError(errno.EINVAL, "DMA_UNMAP: ALL with a non-zero range")
            self.nofd_maps.clear()
            for r in self.endpoint.memory.regions():
                self.endpoint.dma_unmap(r.gpa, r.size)
            return echo, []
        if flags:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: unsupported flags {flags:#x}")
        if addr in self.nofd_maps:
            if self.nofd_maps[addr][0] != size:
                raise VfioUserError(errno.EINVAL, "DMA_UNMAP: size does not match the map")
            del self.nofd_maps[addr]
            return echo, []
        region = self.endpoint.memory.region_at(addr)
        if region is None or region.gpa != addr or region.size != size:
            raise VfioUserError(errno.EINVAL, f"DMA_UNMAP: no map {addr:#x}+{size:#x}")
        self.endpoint.dma_unmap(addr, size)
        return echo, []

    # device and region info ---------------------------------------------------------------
    def _device_info(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.DEVICE_INFO_S.size, "DEVICE_GET_INFO")
        argsz = protocol.DEVICE_INFO_S.unpack_from(body)[0]
        if argsz < protocol.DEVICE_INFO_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_INFO: argsz {argsz}")
        flags = protocol.DEVICE_FLAGS_RESET | protocol.DEVICE_FLAGS_PCI
        return protocol.DEVICE_INFO_S.pack(protocol.DEVICE_INFO_S.size, flags, protocol.NUM_REGIONS,
                                           protocol.NUM_IRQS), []

    def region_layout(self, index: int) -> tuple[int, int, RamBacking | None]:
        """``(size, flags, ram_backing_or_None)`` of region ``index``."""
        dev = self.device
        rw = protocol.REGION_FLAG_READ | protocol.REGION_FLAG_WRITE
        if 0 <= index <= 5:
            bar = dev.bars[index]
            if bar is None:
                return 0, 0, None
            ram = bar.handler if isinstance(bar.handler, RamBacking) else None
            flags = rw | (protocol.REGION_FLAG_MMAP | protocol.REGION_FLAG_CAPS if ram is not None else 0)
            return bar.size, flags, ram
        if index == protocol.ROM_REGION:
            return (dev.rom_size, protocol.REGION_FLAG_READ, None) if dev.rom is not None else (0, 0, None)
        if index == protocol.CONFIG_REGION:
            return dev.config.size, rw, None
        return 0, 0, None

    def _region_info(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.REGION_INFO_S.size, "DEVICE_GET_REGION_INFO")
        argsz, _flags, index, _cap, _size, _off = protocol.REGION_INFO_S.unpack_from(body)
        if argsz < protocol.REGION_INFO_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_REGION_INFO: argsz {argsz}")
        if index >= protocol.NUM_REGIONS:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_REGION_INFO: no region {index}")
        size, flags, ram = self.region_layout(index)
        caps = b""
        cap_offset = 0
        if ram is not None:
            cap_offset = protocol.REGION_INFO_S.size
            areas = b"".join(protocol.SPARSE_AREA_S.pack(o, s) for o, s in ram.sparse_areas)
            caps = (protocol.CAP_HDR_S.pack(protocol.REGION_CAP_SPARSE_MMAP, 1, 0)
                    + protocol.SPARSE_HDR_S.pack(len(ram.sparse_areas), 0) + areas)
        needed = protocol.REGION_INFO_S.size + len(caps)
        if needed > argsz:  # the client retries with a buffer this large; no CAPS flag without
            # the capabilities (QEMU refuses a reply with CAPS whose cap_offset is not inside it)
            return protocol.REGION_INFO_S.pack(needed, flags & ~protocol.REGION_FLAG_CAPS, index, 0, size, 0), []
        out = protocol.REGION_INFO_S.pack(needed, flags, index, cap_offset, size, 0) + caps
        return out, ([ram.export_fd()] if ram is not None else [])

    def _irq_info(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.IRQ_INFO_S.size, "DEVICE_GET_IRQ_INFO")
        argsz, _flags, index, _count = protocol.IRQ_INFO_S.unpack_from(body)
        if argsz < protocol.IRQ_INFO_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: argsz {argsz}")
        if index >= protocol.NUM_IRQS:
            raise VfioUserError(errno.EINVAL, f"DEVICE_GET_IRQ_INFO: no IRQ index {index}")
        flags = protocol.IRQ_INFO_EVENTFD
        if index == protocol.IRQ_INTX:
            flags |= protocol.IRQ_INFO_MASKABLE | protocol.IRQ_INFO_AUTOMASKED
        return protocol.IRQ_INFO_S.pack(protocol.IRQ_INFO_S.size, flags, index, self.irq_count(index)), []

    def irq_count(self, index: int) -> int:
        """Vectors of IRQ ``index`` (ERR and REQ: 0)."""
        dev = self.device
        if index == protocol.IRQ_INTX:
            return 1 if dev.interrupt_pin else 0
        if index == protocol.IRQ_MSI:
            msi = dev.caps.find(MsiCapability)
            return msi.nvectors if msi is not None else 0
        if index == protocol.IRQ_MSIX:
            msix = dev.caps.find(MsixCapability)
            return msix.nvectors if msix is not None else 0
        return 0

    # interrupts ------------------------------------------------------------------------------
    def _msix_mask(self, vector: int, masked: bool) -> None:
        """QEMU emulates the MSI-X table: mirror "has an eventfd" as the vector's mask bit."""
        msix = self.device.caps.find(MsixCapability)
        if msix is not None and vector < msix.nvectors:
            msix.table_write(vector * ENTRY_SIZE + ENTRY_CTRL, 4, 1 if masked else 0)

    def _assign(self, index: int, vector: int, fd: int | None) -> None:
        """Give (or with None take away) ``vector``'s eventfd; under the IRQ lock."""
        sink = self.endpoint.sink
        if index == protocol.IRQ_INTX:
            old = sink.intx_fd
            sink.intx_fd = fd
        else:
            old = sink.vector_fds.get(vector)
            sink.set_vector(vector, fd)
        if old is not None and old != fd:
            close_fds([old])
        if fd is None:
            self.irq_vectors[index].discard(vector)
        else:
            self.irq_vectors[index].add(vector)
        if index == protocol.IRQ_MSIX:
            self._msix_mask(vector, fd is None)

    def _set_irqs(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.SET_IRQS_S.size, "DEVICE_SET_IRQS")
        argsz, flags, index, start, count = protocol.SET_IRQS_S.unpack_from(body)
        if argsz < protocol.SET_IRQS_S.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: argsz {argsz}")
        if flags & ~(protocol.IRQ_SET_DATA_MASK | protocol.IRQ_SET_ACTION_MASK_ALL):
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: unknown flags {flags:#x}")
        data = flags & protocol.IRQ_SET_DATA_MASK
        action = flags & protocol.IRQ_SET_ACTION_MASK_ALL
        if data not in (protocol.IRQ_SET_DATA_NONE, protocol.IRQ_SET_DATA_BOOL, protocol.IRQ_SET_DATA_EVENTFD) \
                or action not in (protocol.IRQ_SET_ACTION_MASK, protocol.IRQ_SET_ACTION_UNMASK,
                                  protocol.IRQ_SET_ACTION_TRIGGER):
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: flags {flags:#x} need one data type and one action")
        if index >= protocol.NUM_IRQS:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: no IRQ index {index}")
        nvec = self.irq_count(index)
        if data == protocol.IRQ_SET_DATA_EVENTFD and fds and len(fds) != count:
            raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: count {count} but {len(fds)} fds")
        if data != protocol.IRQ_SET_DATA_EVENTFD and fds:
            raise VfioUserError(errno.EINVAL, "DEVICE_SET_IRQS: fds without DATA_EVENTFD")
        irq = self.device.irq
        if count == 0:
            if data == protocol.IRQ_SET_DATA_NONE and action == protocol.IRQ_SET_ACTION_TRIGGER:
                with irq.lock:  # disable the whole index
                    for v in sorted(self.irq_vectors[index]):
                        self._assign(index, v, None)
                return b"", []
            if start > nvec:
                raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: start {start} beyond {nvec} vectors")
            return b"", []
        if start + count > nvec:
            raise VfioUserError(errno.EINVAL,
                                f"DEVICE_SET_IRQS: vectors {start}+{count} beyond the {nvec} of index {index}")
        if data == protocol.IRQ_SET_DATA_BOOL:
            self._need(body, protocol.SET_IRQS_S.size + count, "DEVICE_SET_IRQS (bools)")
        if index == protocol.IRQ_INTX and action in (protocol.IRQ_SET_ACTION_MASK, protocol.IRQ_SET_ACTION_UNMASK):
            if data == protocol.IRQ_SET_DATA_EVENTFD:
                # the KVM resample fd: not needed (the line is re-signalled on unmask)
                close_fds(fds)
                fds.clear()
                return b"", []
            flag = bool(body[protocol.SET_IRQS_S.size]) if data == protocol.IRQ_SET_DATA_BOOL else True
            if flag:
                with irq.lock:
                    if action == protocol.IRQ_SET_ACTION_MASK:
                        self.conn.intx_masked = True
                    else:
                        self.conn.intx_masked = False
                        fd = self.endpoint.sink.intx_fd
                        if fd is not None and self.endpoint.intx_level and not signal_eventfd(fd):
                            self.endpoint.sink.saturated += 1  # still asserted: level-triggered
            return b"", []
        if action != protocol.IRQ_SET_ACTION_TRIGGER:
            # MSI/MSI-X masking is QEMU's job (it emulates the table); accept and ignore
            close_fds(fds)
            fds.clear()
            return b"", []
        if data == protocol.IRQ_SET_DATA_EVENTFD:
            for fd in fds:  # a pipe or a file could block the interrupt path forever
                if not is_eventfd(fd):
                    raise VfioUserError(errno.EINVAL, f"DEVICE_SET_IRQS: fd {fd} is not an eventfd")
            taken = list(fds)
            fds.clear()
            with irq.lock:
                for i in range(count):
                    self._assign(index, start + i, taken[i] if taken else None)
            return b"", []
        # DATA_NONE / DATA_BOOL with TRIGGER: fire the vectors now (loopback test)
        with irq.lock:
            for i in range(count):
                if data == protocol.IRQ_SET_DATA_BOOL and not body[protocol.SET_IRQS_S.size + i]:
                    continue
                v = start + i
                fd = self.endpoint.sink.intx_fd if index == protocol.IRQ_INTX else self.endpoint.sink.vector_fds.get(v)
                if fd is not None and not signal_eventfd(fd):
                    self.endpoint.sink.saturated += 1
        return b"", []

    # region accesses --------------------------------------------------------------------------
    def _region_check(self, region: int, offset: int, count: int) -> int:
        if region >= protocol.NUM_REGIONS:
            raise VfioUserError(errno.EINVAL, f"no region {region}")
        size, flags, _ram = self.region_layout(region)
        if count == 0 or count > self.max_data_xfer_size:
            raise VfioUserError(errno.EINVAL, f"access of {count} bytes")
        if offset + count > size:
            raise VfioUserError(errno.EINVAL, f"access {offset:#x}+{count} outside region {region} ({size:#x})")
        return flags

    def read_region(self, region: int, offset: int, count: int) -> bytes:
        """``count`` bytes of ``region`` at ``offset`` (validated)."""
        self._region_check(region, offset, count)
        ep = self.endpoint
        out = bytearray()
        if region == protocol.CONFIG_REGION:
            for pos, w in _chunks(offset, count, (4, 2, 1)):
                out += ep.config_read(pos, w).to_bytes(w, "little")
        elif region == protocol.ROM_REGION:
            rom = self.device.rom
            assert rom is not None  # without a ROM the region is 0 bytes: _region_check refused the access
            out += rom[offset:offset + count]
        else:
            for pos, w in _chunks(offset, count, (8, 4, 2, 1)):
                out += ep.bar_read(region, pos, w, False).to_bytes(w, "little")
        return bytes(out)

    def write_region(self, region: int, offset: int, data: bytes) -> None:
        """Write ``data`` to ``region`` at ``offset`` (validated)."""
        flags = self._region_check(region, offset, len(data))
        if not flags & protocol.REGION_FLAG_WRITE:
            raise VfioUserError(errno.EINVAL, f"region {region} is read-only")
        ep = self.endpoint
        if region == protocol.CONFIG_REGION:
            for pos, w in _chunks(offset, len(data), (4, 2, 1)):
                ep.config_write(pos, w, int.from_bytes(data[pos - offset:pos - offset + w], "little"))
        else:
            for pos, w in _chunks(offset, len(data), (8, 4, 2, 1)):
                ep.bar_write(region, pos, w, int.from_bytes(data[pos - offset:pos - offset + w], "little"), False)

    def _region_read(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.REGION_ACCESS_S.size, "REGION_READ")
        offset, region, count = protocol.REGION_ACCESS_S.unpack_from(body)
        if self.dormant and region <= protocol.BAR5_REGION:
            self._wake()
        data = self.read_region(region, offset, count)
        return protocol.REGION_ACCESS_S.pack(offset, region, len(data)) + data, []

    def _region_write(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.REGION_ACCESS_S.size, "REGION_WRITE")
        offset, region, count = protocol.REGION_ACCESS_S.unpack_from(body)
        data = body[protocol.REGION_ACCESS_S.size:]
        if len(data) != count:
            raise VfioUserError(errno.EINVAL, f"REGION_WRITE: count {count} but {len(data)} data bytes")
        if self.dormant and region <= protocol.BAR5_REGION:
            self._wake()
        self.write_region(region, offset, data)
        return protocol.REGION_ACCESS_S.pack(offset, region, count), []

    def _write_multi(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.WRITE_MULTI_HDR_S.size, "REGION_WRITE_MULTI")
        (n,) = protocol.WRITE_MULTI_HDR_S.unpack_from(body)
        if n > 200 or len(body) != protocol.WRITE_MULTI_HDR_S.size + n * protocol.WRITE_MULTI_ENTRY_S.size:
            raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI: {n} entries in {len(body)} bytes")
        entries = [protocol.WRITE_MULTI_ENTRY_S.unpack_from(body, protocol.WRITE_MULTI_HDR_S.size + i * 24)
                   for i in range(n)]
        for _off, _reg, count, _data in entries:
            if not 1 <= count <= 8:
                raise VfioUserError(errno.EINVAL, f"REGION_WRITE_MULTI: count {count}")
        if self.dormant and any(reg <= protocol.BAR5_REGION for _o, reg, _c, _d in entries):
            self._wake()
        for off, reg, count, data in entries:
            self.write_region(reg, off, data[:count])
        return protocol.WRITE_MULTI_HDR_S.pack(n), []

    def _reset(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        dev = self.device
        stopped = self.conn.mig_state != protocol.MIG_STATE_RUNNING or self.dormant
        self.migrated_out = False
        self.migration.device_reset()  # -> RUNNING (ERROR included) but PRE_COPY stays; dirty logging goes on
        with dev.lock:
            dev.reset(ResetKind.FLR)
            with dev.irq.lock:  # the table was masked by the reset; eventfds stay
                for v in self.irq_vectors[protocol.IRQ_MSIX]:
                    self._msix_mask(v, False)
        self.conn.intx_masked = False
        self.dormant = False
        if stopped and dev.quiesced:
            dev.resume()
        return b"", []

    # migration ------------------------------------------------------------------------------
    _FEATURE_OPS = {
        protocol.FEATURE_MIGRATION: protocol.FEATURE_GET,
        protocol.FEATURE_MIG_DEVICE_STATE: protocol.FEATURE_GET | protocol.FEATURE_SET,
        protocol.FEATURE_DMA_LOGGING_START: protocol.FEATURE_SET,
        protocol.FEATURE_DMA_LOGGING_STOP: protocol.FEATURE_SET,
        protocol.FEATURE_DMA_LOGGING_REPORT: protocol.FEATURE_GET,
    }

    def _device_feature(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        hdr = protocol.DEVICE_FEATURE_S
        self._need(body, hdr.size, "DEVICE_FEATURE")
        argsz, flags = hdr.unpack_from(body)
        if argsz < hdr.size:
            raise VfioUserError(errno.EINVAL, f"DEVICE_FEATURE: argsz {argsz}")
        ops = flags & (protocol.FEATURE_GET | protocol.FEATURE_SET | protocol.FEATURE_PROBE)
        if flags & ~(protocol.FEATURE_MASK | ops):
            raise VfioUserError(errno.EINVAL, f"DEVICE_FEATURE: unknown flags {flags:#x}")
        feature = flags & protocol.FEATURE_MASK
        supported = self._FEATURE_OPS.get(feature)
        if supported is None:
            raise VfioUserError(errno.EINVAL, f"DEVICE_FEATURE: feature {feature} is not supported")
        asked = ops & (protocol.FEATURE_GET | protocol.FEATURE_SET)
        if ops & protocol.FEATURE_PROBE:
            if asked & ~supported:
                raise VfioUserError(errno.EINVAL, f"DEVICE_FEATURE: feature {feature} lacks operation {asked:#x}")
            return bytes(body), []  # SET and PROBE: the reply repeats the request
        if asked not in (protocol.FEATURE_GET, protocol.FEATURE_SET) or not asked & supported:
            raise VfioUserError(errno.EINVAL, f"DEVICE_FEATURE: operation {asked:#x} on feature {feature}")
        data = body[hdr.size:]
        if asked == protocol.FEATURE_SET:
            if feature == protocol.FEATURE_MIG_DEVICE_STATE:
                self._need(data, protocol.MIG_STATE_S.size, "DEVICE_FEATURE MIG_DEVICE_STATE")
                target, _data_fd = protocol.MIG_STATE_S.unpack_from(data)
                self.migration.set_state(target)
            elif feature == protocol.FEATURE_DMA_LOGGING_START:
                self._logging_start(data)
            else:
                self.endpoint.memory.stop_dirty_log()
            return bytes(body), []
        # GET: the whole reply must fit the client's argsz, checked before anything is
        # done (a report clears what it reports: a refused one must clear nothing)
        if feature == protocol.FEATURE_DMA_LOGGING_REPORT:
            report = self._logging_report_check(data)
            room = protocol.LOGGING_REPORT_S.size + report[3]
        else:
            room = protocol.MIGRATION_S.size if feature == protocol.FEATURE_MIGRATION else protocol.MIG_STATE_S.size
        if hdr.size + room > argsz:
            raise VfioUserError(errno.EINVAL, f"DEVICE_FEATURE: a reply of {hdr.size + room} bytes, argsz {argsz}")
        if feature == protocol.FEATURE_MIGRATION:
            out = protocol.MIGRATION_S.pack(MIGRATION_FLAGS)
        elif feature == protocol.FEATURE_MIG_DEVICE_STATE:
            out = protocol.MIG_STATE_S.pack(self.migration.state, 0xFFFF_FFFF)
        else:
            iova, length, page_size, _size = report
            dirty = self.endpoint.memory.dirty
            if dirty is None:  # pragma: no cover - checked above, on this thread
                raise VfioUserError(errno.EINVAL, "DMA_LOGGING_REPORT: logging is off")
            out = protocol.LOGGING_REPORT_S.pack(iova, length, page_size) + dirty.report(iova, length, page_size)
        return hdr.pack(hdr.size + len(out), flags) + out, []

    def _logging_start(self, data: bytes) -> None:
        ctl = protocol.LOGGING_CONTROL_S
        self._need(data, ctl.size, "DMA_LOGGING_START")
        page_size, nranges, _rsvd = ctl.unpack_from(data)
        if page_size < protocol.MIGRATION_PGSIZE or page_size & (page_size - 1):
            raise VfioUserError(errno.EINVAL, f"DMA_LOGGING_START: page size {page_size:#x}")
        rng = protocol.LOGGING_RANGE_S
        if len(data) < ctl.size + nranges * rng.size:
            raise VfioUserError(errno.EINVAL, f"DMA_LOGGING_START: {nranges} ranges in {len(data)} bytes")
        memory = self.endpoint.memory
        if memory.dirty is not None:
            raise VfioUserError(errno.EBUSY, "DMA_LOGGING_START: logging is on already")
        ranges = [rng.unpack_from(data, ctl.size + i * rng.size) for i in range(nranges)]
        for iova, length in ranges:
            if iova % page_size or length % page_size:
                raise VfioUserError(errno.EINVAL, f"DMA_LOGGING_START: range {iova:#x}+{length:#x} is not "
                                                  f"whole pages of {page_size:#x}")
        # The log starts with the device quiesced: a write in flight (a backend read into
        # a writable view taken before the start, as NVMe's preadv) is drained first, so
        # every write that lands after the start goes through a view marked in the log.
        dev = self.device
        running = not dev.quiesced
        try:
            dev.quiesce()
        except MigrationError as exc:
            raise VfioUserError(errno.EBUSY, f"DMA_LOGGING_START: the device does not stop: {exc}") from exc
        try:
            memory.start_dirty_log(ranges if ranges else None)  # DmaError: EINVAL
        finally:
            if running:
                dev.resume()

    def _logging_report_check(self, data: bytes) -> tuple[int, int, int, int]:
        """Validate a DMA_LOGGING_REPORT request: ``(iova, length, page_size, bitmap bytes)``."""
        rep_s = protocol.LOGGING_REPORT_S
        self._need(data, rep_s.size, "DMA_LOGGING_REPORT")
        iova, length, page_size = rep_s.unpack_from(data)
        dirty = self.endpoint.memory.dirty
        if dirty is None:
            raise VfioUserError(errno.EINVAL, "DMA_LOGGING_REPORT: logging is off")
        if page_size < protocol.MIGRATION_PGSIZE or page_size & (page_size - 1) or length <= 0:
            raise VfioUserError(errno.EINVAL, f"DMA_LOGGING_REPORT: page size {page_size:#x}, length {length:#x}")
        size = dirty.bitmap_size(length, page_size)
        if size > self.max_data_xfer_size:
            raise VfioUserError(errno.E2BIG, f"DMA_LOGGING_REPORT: a bitmap of {size} bytes for {length:#x} bytes "
                                             f"at {page_size:#x} exceeds {self.max_data_xfer_size} bytes")
        return iova, length, page_size, size

    def _mig_data_read(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.MIG_DATA_S.size, "MIG_DATA_READ")
        argsz, size = protocol.MIG_DATA_S.unpack_from(body)
        if size > self.max_data_xfer_size:  # never shortened: a short reply means the end of the stream
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_READ: size {size} above max_data_xfer_size "
                                              f"{self.max_data_xfer_size}")
        if argsz < protocol.MIG_DATA_S.size + size:
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_READ: argsz {argsz} leaves no room for {size} bytes")
        data = self.migration.read(size)
        return protocol.MIG_DATA_S.pack(protocol.MIG_DATA_S.size + len(data), len(data)) + data, []

    def _mig_data_write(self, body: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        self._need(body, protocol.MIG_DATA_S.size, "MIG_DATA_WRITE")
        argsz, size = protocol.MIG_DATA_S.unpack_from(body)
        data = body[protocol.MIG_DATA_S.size:]
        if argsz < protocol.MIG_DATA_S.size or size != len(data):
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_WRITE: argsz {argsz}, size {size}, {len(data)} data bytes")
        self.migration.write(data)
        return b"", []

    _HANDLERS = {
        protocol.VERSION: _version, protocol.DMA_MAP: _dma_map, protocol.DMA_UNMAP: _dma_unmap,
        protocol.DEVICE_GET_INFO: _device_info,
        protocol.DEVICE_GET_REGION_INFO: _region_info, protocol.DEVICE_GET_IRQ_INFO: _irq_info,
        protocol.DEVICE_SET_IRQS: _set_irqs, protocol.REGION_READ: _region_read, protocol.REGION_WRITE: _region_write,
        protocol.REGION_WRITE_MULTI: _write_multi, protocol.DEVICE_RESET: _reset,
        protocol.DEVICE_FEATURE: _device_feature, protocol.MIG_DATA_READ: _mig_data_read,
        protocol.MIG_DATA_WRITE: _mig_data_write,
    }


class ExtraClientGuard:
    """While one client is served, accept and close every other connection (logged),
    so that a second client is told at once instead of waiting unaccepted. A connection
    that arrives after the served client hung up, or while it hangs up (within
    ``grace`` seconds of the accept: a client that connects anew and then closes its old
    connection), is its successor (a reconnect): it is kept in :attr:`next_client` for
    the accept loop.

    The listener's file status is never changed: its open file description is shared
    with a handover's new process (``O_NONBLOCK`` would be that process's too). The guard
    accepts only after ``poll`` saw a connection waiting, which cannot block while it is
    the only acceptor: the serving loop does not accept while a client is served, and
    :meth:`pause` stops the guard before a handover passes the listener on (:meth:`resume`
    after a rollback). The guard ends on the wake-up at the end of its ``with`` block, or
    when the listener fails (``POLLERR``/``POLLHUP``/``POLLNVAL``, an accept error).

    Use as a context manager around :meth:`VfioUserServer.serve`.

    :param listener: the listening socket.
    :param served: the served client's socket.
    :param grace: seconds a newcomer may wait for the served client to hang up before it
        is closed as a second client.
    """

    def __init__(self, listener: socket.socket, served: socket.socket, *, grace: float = 0.2) -> None:
        self.listener = listener
        self.grace = grace
        #: the connection that came after the served client left, if any (the caller's)
        self.next_client: socket.socket | None = None
        self._served_fd = os.dup(served.fileno())  # polled for a hang-up; never reused meanwhile
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._run, name="vfio-user-extra-clients", daemon=True)
        self._ended = False  # the listener failed or the successor came: no restart

    def __enter__(self) -> ExtraClientGuard:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.pause()
        close_fds([self._served_fd, self._wake_r, self._wake_w])

    def pause(self) -> None:
        """Stop accepting and wait for the guard's thread (a handover is about to pass the
        listener on). Idempotent."""
        if not self._thread.is_alive():
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        try:
            while os.read(self._wake_r, 64):
                pass
        except OSError:
            pass

    def resume(self) -> None:
        """Accept again after :meth:`pause` (a handover rolled back); nothing if the guard
        ended by itself."""
        if self._thread.is_alive() or self._ended:
            return
        self._thread = threading.Thread(target=self._run, name="vfio-user-extra-clients", daemon=True)
        self._thread.start()

    def _served_gone(self, wait: float) -> bool:
        """Whether the served client hung up, waiting up to ``wait`` seconds for it."""
        p = select.poll()
        p.register(self._served_fd, select.POLLRDHUP)
        gone = select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL
        return any(ev & gone for _fd, ev in p.poll(max(0, int(wait * 1000))))

    def _run(self) -> None:
        try:
            lfd = self.listener.fileno()
        except OSError:
            self._ended = True
            return
        poller = select.poll()
        poller.register(lfd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            if events.get(lfd, 0) & (select.POLLERR | select.POLLNVAL | select.POLLHUP):
                log.warning("vfio-user: the listening socket failed; no longer closing extra clients")
                self._ended = True
                return
            try:
                conn, _ = self.listener.accept()  # a connection waits (poll): does not block
            except InterruptedError:
                continue
            except OSError as exc:
                log.warning("vfio-user: accept failed (%s); no longer closing extra clients", exc)
                self._ended = True
                return
            conn.setblocking(True)
            if self._served_gone(self.grace):
                self.next_client = conn
                self._ended = True
                return
            log.warning("vfio-user: a second client connected while one is served; closing it")
            conn.close()
