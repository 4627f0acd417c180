"""The device link's wire protocol: framing, message kinds, bodies and error replies.

Wire format (UNIX stream socket; integers little-endian)::

    header = magic "PDLK" (4) | type u16 | flags u16 | id u32 | length u32    (16 bytes)
    body   = one msgpack value of ``length`` bytes (at most 1 MiB)

File descriptors ride with the header (``SCM_RIGHTS``, at most 64 per message).
A reply has the request's type and id and flag ``REPLY`` (1); an error reply also
has flag ``ERROR`` (2) and the body ``{"type": error class, "message": text, ...}``
(``reasons`` for a blocked migration; ``reason``/``section``/``instance_id``/``path``
for a vmstate error). Requests and their bodies:

==============  ============================================  =========================
type            request body (+ fds)                          reply body
==============  ============================================  =========================
1 HELLO         ``{}``                                        device info map
2 CONFIG_READ   ``[offset, size]``                            ``[value, intx]``
3 CONFIG_WRITE  ``[offset, size, value]``                     ``[intx]``
4 BAR_READ      ``[bar, offset, size, check_decode]``         ``[value, intx]``
5 BAR_WRITE     ``[bar, offset, size, value, check_decode]``  ``[intx]``
6 ROM_READ      ``[offset, size]``                            ``[value]``
7 DMA_MAP       ``{gpa, size, fd_offset, writable, name}``    ``{}``
                + 1 fd
8 DMA_UNMAP     ``{gpa, size}``                               ``{}``
9 SET_IRQS      ``{vectors: [v, ...], intx: bool}`` + one     ``{}``
                eventfd per vector, then the INTx eventfd
10 STATUS       ``{}``                                        ``{intx, failed, state}``
11 MIGRATE      ``{to: address, timeout: seconds,             migration report map
                [quiesce_timeout_ms], [commit_timeout]}``
12 RESUME       ``{}``                                        ``{resumed_at}``
13 PRECOPY      ``{to, timeout, max_downtime_ms,              pre-copy report map
                max_iterations}``
14 RELEASE      ``{}`` (source, awaiting commit)              ``{}``
15 TAKE_BACK    ``{reason: text}`` (source, awaiting commit)  ``{resumed_at}``
16 ABANDON      ``{reason: text}`` (destination, awaiting     ``{}``
                attach)
==============  ============================================  =========================

**Commit of a deferred migration.** Over a channel without descriptors (TCP) the
destination acknowledges the state but runs the device only once the host re-attached
it and sent RESUME. A MIGRATE with ``commit_timeout`` makes the source keep its stopped
device after that ACK (the reply says ``awaiting_commit: true``) until the host, on the
same connection, sends RELEASE (the destination runs: the source gives the device up and
exits) or TAKE_BACK (the destination never ran it: the source resumes it, its state as
at the stop). Without either within ``commit_timeout``, or when that connection ends,
the source gives the device up (it never resumes a device a destination may run). A
destination answers RESUME *before* it resumes the device, so a RESUME with no reply at
all proves it never ran; one whose reply cannot be sent gives the device up (state
``abandoned``). ABANDON tells a destination still awaiting attachment that it will never
run the device (it refuses RESUME from then on and exits). A HELLO reply says
``commit: true`` when the process knows these messages.

**Migration in two phases.** A host that wants the device to keep serving it while
the large state is copied (pre-copy: a ``mem`` namespace or a RAM BAR over TCP) first
sends PRECOPY *on a connection of its own* without holding its accesses: the server
connects to the destination, runs the pre-copy in a thread while its loop keeps
serving every connection, and replies once it converged (the remainder fits
``max_downtime_ms``) or reached ``max_iterations``. The host then holds its
accesses and sends MIGRATE on that same connection: the migration goes on over the
open channel, and what is left is copied inside the downtime. One pre-copy at a time
(a second PRECOPY is refused with :class:`~pcidev.errors.MigrationError`); it is
cancelled (its channel closed, the device untouched) when its connection ends, when
it runs longer than ``timeout``, or when no MIGRATE follows within ``timeout``. A
MIGRATE without a PRECOPY before it migrates in one go, as before (a server's HELLO
reply says ``precopy: true`` when it knows PRECOPY; a host talking to an older one
sends MIGRATE alone).

``intx`` in access replies is the device's INTx output level after the access;
the proxy forwards changes to the host's sink. Interrupt messages travel as
eventfd signals: the proxy delivers vector *v* as ``sink.msi(v, 0xFEE00000, v)``
(:data:`MSI_ROUTE_ADDRESS`), the route the software host programs (MSI-X entry
*v* / MSI message *v* is host vector *v*), as KVM's irqfd routing would.

The server half is :mod:`pcidev.transport.link.server`, the host half
:mod:`pcidev.transport.link.remote`.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from pcidev import errors
from pcidev.errors import MigrationBlockedError, PcidevError, TransportError, VMStateError
from pcidev.native import MsgpackWalk
from pcidev.transport.fdpass import close_fds, recv_exact, recv_some, send_all
from pcidev.vmstate import errors as vmstate_errors
from pcidev.vmstate.budget import estimate

__all__ = [
    "MAGIC", "HEADER", "FLAG_REPLY", "FLAG_ERROR", "MAX_BODY", "MAX_DECODED_BODY", "LINK_MAX_FDS", "U64_MAX",
    "HELLO", "CONFIG_READ", "CONFIG_WRITE", "BAR_READ", "BAR_WRITE", "ROM_READ",
    "DMA_MAP", "DMA_UNMAP", "SET_IRQS", "STATUS", "MIGRATE", "RESUME", "PRECOPY", "RELEASE", "TAKE_BACK",
    "ABANDON", "NAMES", "MSI_ROUTE_ADDRESS",
    "encode_body", "decode_body", "read_message", "send_message", "encode_message", "MessageReader",
    "encode_error", "error_from_reply",
]

#: The 4 bytes every message header starts with.
MAGIC = b"PDLK"
#: The 16-byte message header: magic, type u16, flags u16, id u32, body length u32.
HEADER = struct.Struct("<4sHHII")
#: Header flag: this message is the reply to the request with the same type and id.
FLAG_REPLY = 1
#: Header flag (with :data:`FLAG_REPLY`): the request failed; the body names the error (:func:`encode_error`).
FLAG_ERROR = 2
#: largest message body
MAX_BODY = 1 << 20
#: most a body's decoding may be estimated to cost (:mod:`pcidev.vmstate.budget`): 16 MiB,
#: so a 1 MiB body of empty maps (some 76 MB decoded) is refused before it is decoded
MAX_DECODED_BODY = 16 << 20
#: most descriptors one message may carry
LINK_MAX_FDS = 64
#: longest error message an error reply carries (longer ones are cut)
MAX_ERROR_MESSAGE = 16 * 1024
#: Request type: the device's identity and layout (the reply is the device info map).
HELLO = 1
#: Request type: a configuration-space read, ``[offset, size]``.
CONFIG_READ = 2
#: Request type: a configuration-space write, ``[offset, size, value]``.
CONFIG_WRITE = 3
#: Request type: a BAR read, ``[bar, offset, size, check_decode]``.
BAR_READ = 4
#: Request type: a BAR write, ``[bar, offset, size, value, check_decode]``.
BAR_WRITE = 5
#: Request type: an expansion ROM read, ``[offset, size]``.
ROM_READ = 6
#: Request type: map guest memory from the file descriptor passed along.
DMA_MAP = 7
#: Request type: unmap a guest-memory range mapped by :data:`DMA_MAP`.
DMA_UNMAP = 8
#: Request type: the eventfds to signal for each interrupt vector and for INTx.
SET_IRQS = 9
#: Request type: the device's INTx level, failure and run state.
STATUS = 10
#: Request type: migrate the device to the destination listening at ``to`` (reply: the migration report).
MIGRATE = 11
#: Request type: resume a migrated-in device once the host attached its memory and eventfds.
RESUME = 12
#: Request type: start copying the device's large state to the destination at ``to`` while it
#: keeps running (reply: the pre-copy report, once it converged or reached its limit).
PRECOPY = 13
#: Request type (to a source awaiting commit, on the MIGRATE's connection): the destination
#: runs the device; give it up for good (the source exits).
RELEASE = 14
#: Request type (to a source awaiting commit, on the MIGRATE's connection): the destination
#: never ran the device; resume it here (reply ``{resumed_at}``).
TAKE_BACK = 15
#: Request type (to a destination awaiting attachment): it will never run the device
#: (RESUME is refused from then on; the process exits).
ABANDON = 16
#: The name of each request type (for logs and error messages).
NAMES = {HELLO: "HELLO", CONFIG_READ: "CONFIG_READ", CONFIG_WRITE: "CONFIG_WRITE", BAR_READ: "BAR_READ",
         BAR_WRITE: "BAR_WRITE", ROM_READ: "ROM_READ", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP",
         SET_IRQS: "SET_IRQS", STATUS: "STATUS", MIGRATE: "MIGRATE", RESUME: "RESUME", PRECOPY: "PRECOPY",
         RELEASE: "RELEASE", TAKE_BACK: "TAKE_BACK", ABANDON: "ABANDON"}
#: the MSI address the proxy uses when it delivers an eventfd signal
MSI_ROUTE_ADDRESS = 0xFEE0_0000
#: largest integer a message field carries (values are u64)
U64_MAX = (1 << 64) - 1


#: msgpack ships no type hints: its packer, typed once here
_packb: Callable[..., bytes] = msgpack.packb


def encode_body(value: Any) -> bytes:
    """A message body: ``value`` as msgpack.

    :param value: the body (maps, arrays, integers, strings, bools, floats).
    :returns: the encoded bytes.
    """
    return _packb(value, use_bin_type=True)


def decode_body(body: bytes, what: str) -> Any:
    """The value a message body holds.

    :param body: the body's bytes.
    :param what: the message, for the error.
    :raises TransportError: the body is not valid msgpack, or its decoding would cost more
        than :data:`MAX_DECODED_BODY`.
    """
    est = estimate(body, MAX_DECODED_BODY)
    problem = est.problem()
    if problem is not None:
        if est.walk is MsgpackWalk.OVER:
            raise TransportError(f"{what}: body is too large: {problem} (MAX_DECODED_BODY)")
        raise TransportError(f"{what}: body is not valid msgpack: {problem}")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise TransportError(f"{what}: body is not valid msgpack ({type(exc).__name__}: {exc})") from None


def read_message(sock: socket.socket, *, max_fds: int, eof_ok: bool = False, deadline: float | None = None
                 ) -> tuple[int, int, int, bytes, list[int]] | None:
    """Read one framed message: ``(type, flags, id, body, fds)``, or None at a clean EOF.

    :param sock: the connection.
    :param max_fds: most descriptors the message may carry.
    :param eof_ok: a clean EOF before the header returns None instead of raising.
    :param deadline: ``CLOCK_MONOTONIC`` time by which the whole message must have come
        (a peer that trickles it is dropped then; None: only the socket's timeout per read).
    :raises TransportError: bad magic, oversized body, truncation, too many fds, the
        deadline passed (framing is lost: the connection must be closed).
    """
    head, fds = recv_exact(sock, HEADER.size, max_fds=max_fds, eof_ok=eof_ok, deadline=deadline)
    if not head:
        return None
    try:
        magic, kind, flags, mid, length = HEADER.unpack(head)
        if magic != MAGIC:
            raise TransportError(f"bad link message magic {magic!r}")
        if length > MAX_BODY:
            raise TransportError(f"link message of {length} bytes (at most {MAX_BODY})")
        body = recv_exact(sock, length, deadline=deadline)[0] if length else b""
    except BaseException:
        close_fds(fds)
        raise
    return kind, flags, mid, body, fds


def encode_message(kind: int, flags: int, mid: int, body: bytes) -> bytes:
    """One framed message without descriptors: header and ``body`` (for a non-blocking writer).

    :param kind: the message type.
    :param flags: ``FLAG_REPLY``, ``FLAG_ERROR`` (0 for a request).
    :param mid: the message id.
    :param body: the encoded body (:func:`encode_body`).
    """
    return HEADER.pack(MAGIC, kind, flags, mid, len(body)) + body


def send_message(sock: socket.socket, kind: int, flags: int, mid: int, body: bytes,
                 fds: Sequence[int] = (), *, deadline: float | None = None) -> None:
    """Send one framed message.

    :param sock: the connection.
    :param kind: the message type.
    :param flags: ``FLAG_REPLY``, ``FLAG_ERROR`` (0 for a request).
    :param mid: the message id (a reply repeats its request's).
    :param body: the encoded body (:func:`encode_body`).
    :param fds: descriptors to pass with the header.
    :param deadline: ``CLOCK_MONOTONIC`` time by which the whole message must have gone
        out (a peer that reads slowly cannot stretch it; None: the socket's timeout per send).
    :raises TransportError: the connection broke or the deadline passed.
    """
    send_all(sock, encode_message(kind, flags, mid, body), fds, deadline=deadline)


class MessageReader:
    """Reads one connection's messages incrementally, without ever blocking: each
    :meth:`read` takes what the socket holds of the current message (never a byte of the
    next one) and returns the message once it is whole. What it holds is bounded by one
    message: a header, a body of at most :data:`MAX_BODY` bytes, and at most
    :data:`LINK_MAX_FDS` descriptors (which must ride with the header).

    :param sock: a connected ``AF_UNIX`` stream socket.
    :param max_fds: most descriptors one message may carry.
    """

    def __init__(self, sock: socket.socket, *, max_fds: int = LINK_MAX_FDS) -> None:
        self.sock = sock
        self.max_fds = max_fds
        self._head = bytearray(HEADER.size)
        self._got = 0  # bytes of the current message read (header, then body)
        self._body: bytearray | None = None
        self._fds: list[int] = []
        #: ``CLOCK_MONOTONIC`` when the current message's first byte came (None: between messages)
        self.started: float | None = None

    def read(self) -> tuple[int, int, int, bytes, list[int]] | None | bool:
        """One non-blocking read.

        :returns: the whole message ``(type, flags, id, body, fds)`` (the caller owns the
            fds); None: not whole yet (or nothing waited); False: a clean end of the
            connection between messages.
        :raises TransportError: bad magic, an oversized body, too many descriptors or
            descriptors with the body, the end of the connection mid-message, or the
            socket failed (framing is lost: the connection must be closed). What it held
            is released.
        """
        try:
            if self._body is None:
                view = memoryview(self._head)[self._got:]
                n, fds = recv_some(self.sock, view, max_fds=self.max_fds - len(self._fds))
            else:
                view = memoryview(self._body)[self._got - HEADER.size:]
                n, fds = recv_some(self.sock, view, max_fds=0)  # (more than none raises)
            self._fds += fds
            if n < 0:
                return None
            if n == 0:
                if self._got == 0 and not self._fds:
                    return False
                raise TransportError(f"peer closed the connection mid-message ({self._got} bytes of it read)")
            if self.started is None:
                self.started = time.monotonic()
            self._got += n
            if self._body is None:
                if self._got < HEADER.size:
                    return None
                magic, _kind, _flags, _mid, length = HEADER.unpack(self._head)
                if magic != MAGIC:
                    raise TransportError(f"bad link message magic {bytes(magic)!r}")
                if length > MAX_BODY:
                    raise TransportError(f"link message of {length} bytes (at most {MAX_BODY})")
                self._body = bytearray(length)
            if self._got < HEADER.size + len(self._body):
                return None
        except BaseException:
            self.discard()
            raise
        _magic, kind, flags, mid, _length = HEADER.unpack(self._head)
        body, fds = bytes(self._body), self._fds
        self._got, self._body, self._fds, self.started = 0, None, [], None
        return kind, flags, mid, body, fds

    def discard(self) -> None:
        """Drop the message half read (closing its descriptors)."""
        close_fds(self._fds)
        self._got, self._body, self._fds, self.started = 0, None, [], None


def encode_error(exc: BaseException) -> bytes:
    """The body of an error reply describing ``exc`` (see :func:`error_from_reply`).

    :param exc: the error.
    :returns: the encoded body.
    """
    text = str(exc)
    if len(text) > MAX_ERROR_MESSAGE:  # a reply always fits MAX_BODY
        text = text[:MAX_ERROR_MESSAGE] + " [...]"
    info: dict[str, Any] = {"type": type(exc).__name__, "message": text}
    if isinstance(exc, MigrationBlockedError):
        info["reasons"] = [str(r)[:4096] for r in exc.reasons[:256]]
    if isinstance(exc, VMStateError):
        info.update(reason=exc.reason, section=exc.section, instance_id=exc.instance_id, path=exc.path)
    return encode_body(info)


def _error_classes() -> dict[str, type[PcidevError]]:
    classes: dict[str, type[PcidevError]] = {}
    for module in (errors, vmstate_errors):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, PcidevError):
                classes[name] = obj
    return classes


def error_from_reply(body: bytes) -> PcidevError:
    """Rebuild the typed error an error reply describes (TransportError if unknown).

    :param body: the error reply's body.
    :returns: the error, never raises.
    """
    try:
        info = decode_body(body, "error reply")
    except TransportError as exc:
        return exc
    if not isinstance(info, dict) or not isinstance(info.get("type"), str):
        return TransportError(f"malformed error reply {info!r:.200}")
    name, message = info["type"], str(info.get("message", ""))
    cls = _error_classes().get(name)
    if cls is None:
        return TransportError(f"peer failed with {name}: {message}")
    try:
        if issubclass(cls, MigrationBlockedError):
            return cls([str(r) for r in info.get("reasons") or [message]])
        if issubclass(cls, VMStateError):
            iid = info.get("instance_id")
            return cls(str(info.get("reason", message)), section=info.get("section"),
                       instance_id=iid if isinstance(iid, int) else None, path=str(info.get("path") or ""))
        return cls(message)
    except Exception:
        return TransportError(f"peer failed with {name}: {message}")
