"""The fuzz target ``link``: device-link messages against the
:class:`~pcidev.transport.link.server.LinkServer`.

Each input runs against a fresh server (a fresh ``edu`` endpoint, a UNIX listener in the
target's private directory, the server's loop on the target's server thread:
:mod:`pcidev.testing.fuzz.peer_session`, shared with ``vfio-user``). The input is decoded
into up to 16 messages: a type (the known ones, mostly), a body shaped for it (offsets and
sizes as integer arrays, DMA and IRQ maps, MIGRATE/PRECOPY to an address nobody listens on) or
raw bytes, now and then flags or a length that lie, and eventfds/memfds.

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* every request gets a reply with its type and id (an error reply is fine), or the
  server closes the connection; a reply within :data:`REPLY_SECONDS`;
* no exception escapes the server: no ``internal error`` reply, no traceback logged,
  ``serve_forever`` returns after :meth:`~pcidev.transport.link.server.LinkServer.stop`;
* the process has no more file descriptors open after the input than before it.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import msgpack

from pcidev.devices.edu import EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import TransportError
from pcidev.testing.fuzz.peer_session import PeerSession, PeerTarget
from pcidev.testing.fuzz.target import FuzzFinding, FuzzInput
from pcidev.transport.address import Listener, listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.link import protocol
from pcidev.transport.link.server import LinkServer

__all__ = ["REPLY_SECONDS", "LinkTarget"]

#: longest the server may take to answer one request
REPLY_SECONDS = 5.0
#: a MIGRATE/PRECOPY's connect timeout: valid ones short (nobody listens, so the server
#: retries for all of it: 1-2 s per request made the target crawl; at 50 and 100 ms they
#: were still three quarters of its time, measured), invalid ones as before
_MIGRATE_TIMEOUTS = (0.001, 0, -1, 0.02)
#: a MIGRATE/PRECOPY's destination, chosen by the same byte as the timeout: one whose
#: connect fails at once (ENOTDIR: a MIGRATE gives up at once, a PRECOPY retries every
#: 10 ms until its timeout) or a path nobody listens on in the private directory (ENOENT:
#: both retry every 10 ms until the timeout)
_NOT_A_DIRECTORY = "unix:/dev/null/nobody.sock"
_INTS = (0, 1, 2, 4, 8, 0x10, 0x3C, 0x100, 0xFFF, 0x1000, 0xFFFFFFFF, 1 << 32, -1, (1 << 64) - 1)


class LinkTarget(PeerTarget):
    """``link``: device-link messages with and without fds against the server (see the module)."""

    name: ClassVar[str] = "link"
    summary: ClassVar[str] = "device-link server: framed msgpack requests with and without fds (edu device)"
    invariants: ClassVar[tuple[str, ...]] = (
        "a reply with the request's type and id or a close", "bounded reply time", "no escaped exception",
        "fd count unchanged")

    def __init__(self) -> None:
        super().__init__()
        self._where: tempfile.TemporaryDirectory[str] | None = None

    def setup(self) -> None:
        """Start the server thread and make the private directory the sockets live in."""
        super().setup()
        if self._where is None:
            self._where = tempfile.TemporaryDirectory(prefix="pcidev-fuzz-link-")

    def make_session(self, inp: FuzzInput) -> PeerSession:
        """A session against a fresh ``edu`` device, server and listener."""
        assert self._where is not None
        return _LinkSession(inp, REPLY_SECONDS, self._where.name)

    def close(self) -> None:
        """End the server thread and remove the private directory."""
        super().close()
        if self._where is not None:
            self._where.cleanup()
            self._where = None

    def seeds(self) -> Iterator[bytes]:
        """HELLO, config and BAR accesses, STATUS, a DMA map and unmap, SET_IRQS."""
        yield bytes([0, 0])  # HELLO
        yield bytes([0, 0, 1, 0, 0, 2]) + bytes([3, 0, 3, 1, 2, 3]) + bytes([9, 0])  # CONFIG_READ, BAR_READ
        yield bytes([4, 0, 0, 0, 2, 5, 1]) + bytes([6, 0, 0]) + bytes([7, 0, 0])  # BAR_WRITE, DMA_MAP/UNMAP
        yield bytes([8, 0, 2, 1]) + bytes([9, 0])  # SET_IRQS, STATUS


class _LinkSession(PeerSession):
    """One input against a fresh server listening in ``where``."""

    serving: ClassVar[str] = "LinkServer.serve_forever"

    def __init__(self, inp: FuzzInput, reply_seconds: float, where: str) -> None:
        super().__init__(inp, reply_seconds)
        self.where = where
        self.mid = 0
        self.ep: DeviceEndpoint | None = None
        self.listener: Listener | None = None
        self.server: LinkServer | None = None

    def open(self) -> tuple[Callable[[], object], socket.socket]:
        ep = self.ep = DeviceEndpoint(EduDevice())
        ep.start()
        listener = self.listener = listen(f"unix:{self.where}/link.sock")
        server = self.server = LinkServer(ep, listener.sock, io_timeout=1.0)
        return server.serve_forever, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def greet(self, sock: socket.socket) -> bool:
        sock.connect(f"{self.where}/link.sock")
        sock.settimeout(self.reply_seconds)
        return True

    def message(self, sock: socket.socket) -> bool:
        return self._request(sock)

    def probe(self, sock: socket.socket) -> None:
        self._request(sock, kind=protocol.STATUS, body=b"\x80")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def release(self) -> None:
        if self.listener is not None:
            self.listener.close()  # (serve_forever closed the socket: this removes its file)
        if self.ep is not None:
            self.ep.close()

    def _body(self, kind: int, fds: list[int]) -> Any:
        inp = self.inp
        def num() -> int:
            return inp.pick(_INTS) if inp.u8() < 200 else inp.u32()
        if kind in (protocol.CONFIG_READ, protocol.ROM_READ):
            return [num(), inp.pick((1, 2, 4, 8, 3))]
        if kind == protocol.CONFIG_WRITE:
            return [num(), inp.pick((1, 2, 4, 8)), num()]
        if kind == protocol.BAR_READ:
            return [inp.u8() % 7, num(), inp.pick((1, 2, 4, 8)), bool(inp.u8() & 1)]
        if kind == protocol.BAR_WRITE:
            return [inp.u8() % 7, num(), inp.pick((1, 2, 4, 8)), num(), bool(inp.u8() & 1)]
        if kind == protocol.DMA_MAP:
            if inp.u8() < 220:
                fds.append(alloc_memfd(4096 * 4))
            return {"gpa": (num() * 4096) & ((1 << 64) - 1), "size": 4096 * (1 + inp.u8() % 8), "fd_offset": num(),
                    "writable": bool(inp.u8() & 1), "name": "fuzz"}
        if kind == protocol.DMA_UNMAP:
            return {"gpa": (num() * 4096) & ((1 << 64) - 1), "size": 4096 * (1 + inp.u8() % 8)}
        if kind == protocol.SET_IRQS:
            vectors = [inp.u8() % 4 for _ in range(inp.u8() % 4)]
            intx = bool(inp.u8() & 1)
            fds.extend(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(len(vectors) + intx - (inp.u8() >= 230)))
            return {"vectors": vectors, "intx": intx}
        if kind in (protocol.MIGRATE, protocol.PRECOPY):
            pick = inp.u8()
            timeout = _MIGRATE_TIMEOUTS[pick % len(_MIGRATE_TIMEOUTS)]
            to = f"unix:{self.where}/nobody.sock" if pick & 4 else _NOT_A_DIRECTORY
            return {"to": to, "timeout": timeout,
                    "max_downtime_ms": num(), "max_iterations": inp.u8(), "quiesce_timeout_ms": inp.pick((50, 0, 1))}
        if kind in (protocol.TAKE_BACK, protocol.ABANDON):
            return {"reason": "fuzz"}
        return {}

    def _request(self, sock: socket.socket, *, kind: int | None = None, body: bytes | None = None) -> bool:
        inp = self.inp
        fds: list[int] = []
        flags = 0
        if kind is None:
            pick = inp.u8()
            kind = 1 + pick % 16 if pick < 245 else inp.u16()
            shape = inp.u8()
            if shape < 200:
                body = msgpack.packb(self._body(kind, fds), use_bin_type=True)
            else:
                body = inp.blob(128)
            if inp.u8() >= 245:
                flags = inp.u16()
        assert body is not None
        self.mid = (self.mid + 1) & 0xFFFFFFFF
        try:
            send_all(sock, protocol.HEADER.pack(protocol.MAGIC, kind & 0xFFFF, flags, self.mid, len(body)) + body,
                     fds)
        except (OSError, TransportError):
            return False
        finally:
            close_fds(fds)
        deadline = time.monotonic() + self.reply_seconds + 1.0  # a MIGRATE may use its one-second timeout
        try:
            msg = protocol.read_message(sock, max_fds=protocol.LINK_MAX_FDS, eof_ok=True, deadline=deadline)
        except TransportError as exc:
            if time.monotonic() >= deadline:
                raise FuzzFinding("no-reply", f"no reply to link request {kind} within {self.reply_seconds} s",
                                  where=f"kind{kind}") from exc
            return False  # a reset: a close
        if msg is None:
            return False
        r_kind, r_flags, r_mid, r_body, r_fds = msg
        close_fds(r_fds)
        self.transcript.append((r_kind, r_flags, r_mid, len(r_fds),
                                r_body if r_kind in (protocol.CONFIG_READ, protocol.BAR_READ) else b""))
        if r_flags & protocol.FLAG_ERROR and b"internal error" in r_body:
            raise FuzzFinding("internal-error", f"link request {kind}: {r_body[:200]!r}", where=f"kind{kind}")
        if r_kind == 0 and r_flags & protocol.FLAG_ERROR:
            return False  # the server's last word before it drops the connection
        if (r_kind, r_mid) != (kind & 0xFFFF, self.mid) or not r_flags & protocol.FLAG_REPLY:
            raise FuzzFinding("bad-reply", f"link request {kind} id {self.mid}: reply type {r_kind} id {r_mid} "
                              f"flags {r_flags:#x}", where=f"kind{kind}")
        return True
