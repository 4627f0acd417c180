"""The fuzz target ``vfio-user``: messages, with and without file descriptors, against
the vfio-user server.

Each input runs against a fresh :class:`~pcidev.transport.vfio_user.server.VfioUserServer`
serving a fresh ``edu`` device over a socketpair, its loop on the target's server thread
(:mod:`pcidev.testing.fuzz.peer_session`, which this target shares with ``link``). The input is
decoded into messages: a command (a known one, mostly, or any number), flags, a payload
shaped for the command (VERSION with capabilities, DMA_MAP of a memfd, region accesses,
SET_IRQS with eventfds) or raw bytes, sometimes a wrong size field, and zero to three
file descriptors (memfds, eventfds). A final DEVICE_GET_INFO checks the connection is
still answered.

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* every message gets a reply with its message id (an ERROR reply is fine), or the server
  closes the connection cleanly; a reply that is not a reply, or has another id, breaks it;
* each reply comes within :data:`REPLY_SECONDS`, and the server thread ends within it once
  the client closes;
* ``serve()`` returns a reason: no exception escapes it, and no traceback is logged;
* once the server is gone and the endpoint closed, the process has no more file
  descriptors open than before the input.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import ClassVar

from pcidev.devices.edu import EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import TransportError
from pcidev.testing.fuzz.peer_session import PeerSession, PeerTarget
from pcidev.testing.fuzz.target import FuzzFinding, FuzzInput
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, recv_exact, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.server import VfioUserServer

__all__ = ["REPLY_SECONDS", "VfioUserTarget"]

#: longest the server may take to answer one message (generous: the machine is shared)
REPLY_SECONDS = 5.0
_CAPS = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
         b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, '
         b'"write_multiple": true}}\0')
_COMMANDS = tuple(range(1, 19))
_PAGE = 4096


class VfioUserTarget(PeerTarget):
    """``vfio-user``: messages with and without fds against the server (see the module)."""

    name: ClassVar[str] = "vfio-user"
    summary: ClassVar[str] = "vfio-user server: messages with and without fds over a socketpair (edu device)"
    invariants: ClassVar[tuple[str, ...]] = (
        "a reply with the message's id or a clean close", "bounded reply time", "no escaped exception",
        "fd count unchanged")

    def make_session(self, inp: FuzzInput) -> PeerSession:
        """A session against a fresh ``edu`` device and server."""
        return _Session(inp, REPLY_SECONDS)

    def seeds(self) -> Iterator[bytes]:
        """A session that maps memory, reads config space and the BAR, and sets interrupts."""
        def msg(cmd_index: int, kind: int, extra: bytes = b"") -> bytes:
            return bytes([cmd_index, 0, kind]) + extra

        yield b"\x01"  # VERSION only
        yield b"\x01" + msg(3, 0) + msg(4, 0, b"\x07\x00\x00\x00" + struct.pack("<I", 0))  # info, region 7
        yield b"\x01" + msg(1, 0, b"\x01") + msg(8, 0, b"\x00\x00\x10\x00\x04\x00\x00\x00")  # map, read BAR0
        yield b"\x01" + msg(9, 0, b"\x00\x04\x00\x00\x00\x04\x00\x00\x00\x78\x56\x34\x12")  # write BAR0
        yield b"\x01" + msg(7, 0, b"\x02\x24\x00\x00\x02")  # SET_IRQS MSI-X with eventfds
        yield b"\x01" + msg(12, 0) + msg(2, 0, b"\x01")  # reset, unmap


class _Session(PeerSession):
    """One input against one fresh server on a socketpair."""

    serving: ClassVar[str] = "VfioUserServer.serve"

    def __init__(self, inp: FuzzInput, reply_seconds: float) -> None:
        super().__init__(inp, reply_seconds)
        self.msg_id = 0
        self.ep: DeviceEndpoint | None = None
        self.server_end: socket.socket | None = None

    def open(self) -> tuple[Callable[[], object], socket.socket]:
        ep = self.ep = DeviceEndpoint(EduDevice())
        ep.start()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server_end = a
        b.settimeout(self.reply_seconds)
        return lambda: VfioUserServer(ep, a).serve(), b

    def release(self) -> None:
        if self.server_end is not None:
            self.server_end.close()  # serve() closes it, unless it raised
        if self.ep is not None:
            self.ep.close()

    def greet(self, sock: socket.socket) -> bool:
        if self.inp.u8() & 1:
            return self._exchange(sock, protocol.VERSION, 0, protocol.VERSION_HDR.pack(0, 0) + _CAPS, [])
        return True

    def message(self, sock: socket.socket) -> bool:
        cmd, flags, payload, fds, size = self._message()
        return self._exchange(sock, cmd, flags, payload, fds, size=size)

    def probe(self, sock: socket.socket) -> None:
        self._exchange(sock, protocol.DEVICE_GET_INFO, 0, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0), [])

    def _message(self) -> tuple[int, int, bytes, list[int], int | None]:
        inp = self.inp
        pick = inp.u8()
        cmd = _COMMANDS[pick % len(_COMMANDS)] if pick < 240 else inp.u16()
        fl = inp.u8()
        flags = 0 if fl < 200 else fl & 0xF0  # NO_REPLY / ERROR bits now and then
        kind = inp.u8() % 4
        fds: list[int] = []
        if kind == 0:
            payload = self._shaped(cmd, fds)
        elif kind == 1:
            payload = inp.blob(512)
        else:
            payload = self._shaped(cmd, fds)
            cut = inp.u8()
            payload = payload[:cut] if cut < len(payload) else payload + inp.take(cut % 16)
        if inp.u8() >= 230:
            fds.append(os.eventfd(0, os.EFD_CLOEXEC) if inp.u8() & 1 else alloc_memfd(_PAGE))
        size = None if inp.u8() < 245 else inp.u32() % (1 << 20)
        return cmd, flags, payload, fds, size

    def _shaped(self, cmd: int, fds: list[int]) -> bytes:
        """A payload of the right shape for ``cmd`` with fuzzed fields."""
        inp = self.inp
        if cmd == protocol.VERSION:
            return protocol.VERSION_HDR.pack(inp.u8() % 2, inp.u8() % 3) + inp.blob(64) + b"\0"
        if cmd == protocol.DMA_MAP:
            with_fd = inp.u8() & 1
            if with_fd:
                fds.append(alloc_memfd(4 * _PAGE))
            return protocol.DMA_MAP_S.pack(protocol.DMA_MAP_S.size, inp.u8() & 3, inp.u8() * _PAGE,
                                           _PAGE * (1 + inp.u8() % 8) if inp.u8() < 240 else inp.u64(),
                                           inp.u8() * _PAGE if inp.u8() < 240 else inp.u64())
        if cmd == protocol.DMA_UNMAP:
            return protocol.DMA_UNMAP_S.pack(protocol.DMA_UNMAP_S.size, inp.u8() & 3, inp.u8() * _PAGE,
                                             _PAGE * (1 + inp.u8() % 8))
        if cmd in (protocol.DEVICE_GET_REGION_INFO, protocol.DEVICE_GET_REGION_IO_FDS):
            return protocol.REGION_INFO_S.pack(inp.u8() * 8, 0, inp.u8() % 10, 0, 0, 0)
        if cmd == protocol.DEVICE_GET_IRQ_INFO:
            return protocol.IRQ_INFO_S.pack(protocol.IRQ_INFO_S.size, 0, inp.u8() % 6, 0)
        if cmd == protocol.DEVICE_SET_IRQS:
            index, action, start, count = inp.u8() % 6, inp.u8(), inp.u8() % 40, inp.u8() % 8
            flags = (protocol.IRQ_SET_DATA_EVENTFD | protocol.IRQ_SET_ACTION_TRIGGER) if action < 128 else action
            if flags & protocol.IRQ_SET_DATA_EVENTFD:
                fds.extend(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(min(count, 3)))
            data = bytes(count) if flags & protocol.IRQ_SET_DATA_BOOL else b""
            return protocol.SET_IRQS_S.pack(protocol.SET_IRQS_S.size + len(data), flags, index, start, count) + data
        if cmd in (protocol.REGION_READ, protocol.REGION_WRITE):
            region, off, count = inp.u8() % 10, inp.u16() if inp.u8() < 200 else inp.u64(), inp.pick((1, 2, 4, 8, 0,
                                                                                                    4096, 3))
            head = protocol.REGION_ACCESS_S.pack(off, region, count)
            return head + (inp.take(count) if cmd == protocol.REGION_WRITE else b"")
        if cmd == protocol.REGION_WRITE_MULTI:
            n = inp.u8() % 4
            entries = b"".join(protocol.WRITE_MULTI_ENTRY_S.pack(inp.u16(), inp.u8() % 10, inp.pick((1, 2, 4, 8, 9)),
                                                                 inp.take(8)) for _ in range(n))
            return protocol.WRITE_MULTI_HDR_S.pack(n if inp.u8() < 240 else inp.u64()) + entries
        if cmd == protocol.DEVICE_FEATURE:
            return protocol.DEVICE_FEATURE_S.pack(protocol.DEVICE_FEATURE_S.size + 8, inp.u32()) + inp.take(8)
        return inp.blob(64)

    def _exchange(self, sock: socket.socket, cmd: int, flags: int, payload: bytes, fds: list[int], *,
                  size: int | None = None) -> bool:
        """Send one message; True if the server answered it and the session goes on."""
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        msg_id = self.msg_id
        header = protocol.HEADER.pack(msg_id, cmd & 0xFFFF, protocol.HEADER_SIZE + len(payload) if size is None
                                      else size, flags, 0)
        try:
            send_all(sock, header + payload, fds)
        except OSError:
            return False  # the server closed first: a clean close
        finally:
            close_fds(fds)
        wants_reply = not flags & protocol.FLAG_NO_REPLY and not flags & protocol.TYPE_MASK
        if size is not None and size != protocol.HEADER_SIZE + len(payload):
            wants_reply = False  # the framing is broken on purpose: a close or any reply will do
        if not wants_reply:
            # no reply owed: the session ends here. Half-close, so the server reaches the end
            # of the stream at once, and check whatever it still sends (an ERROR reply may
            # come) until it closes: no fixed wait
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                return False
        deadline = time.monotonic() + self.reply_seconds
        while True:
            try:
                head, got = recv_exact(sock, protocol.HEADER_SIZE, max_fds=16, eof_ok=True, deadline=deadline)
            except TransportError as exc:
                if "timed out" in str(exc) or time.monotonic() >= deadline:
                    if not wants_reply:
                        raise FuzzFinding("hang", f"the server did not close within {self.reply_seconds} s of "
                                          f"the client's half-close (after command {cmd})", where="serve") from exc
                    raise FuzzFinding("no-reply", f"no reply to command {cmd} within {self.reply_seconds} s",
                                      where=f"cmd{cmd}") from exc
                return False  # reset by the server: a close
            close_fds(got)
            if not head:
                return False  # a clean close
            r_id, r_cmd, r_size, r_flags, r_err = protocol.HEADER.unpack(head)
            body = b""
            if r_size > protocol.HEADER_SIZE:
                body, got = recv_exact(sock, r_size - protocol.HEADER_SIZE, max_fds=16, deadline=deadline)
                close_fds(got)
            self.transcript.append((r_id, r_cmd, r_flags, r_err, len(body),
                                    body if r_cmd == protocol.REGION_READ else b""))
            if r_flags & protocol.TYPE_MASK != protocol.TYPE_REPLY:
                raise FuzzFinding("bad-reply", f"command {cmd}: the server sent type {r_flags & 0xF}, not a reply",
                                  where=f"cmd{cmd}")
            if not wants_reply:
                continue  # half-closed: read on until the server closes
            if r_id == msg_id:
                return True
            if wants_reply:
                raise FuzzFinding("bad-reply", f"command {cmd} (id {msg_id}): reply with id {r_id} ({r_cmd})",
                                  where=f"cmd{cmd}")
