"""The frames of the migration channel (``PCIDMIGR``, docs/migration.md §6): their
types, the header, and sending and receiving one frame. :mod:`pcidev.migration.channel`
(the exchange) and :mod:`pcidev.migration.precopy` (memory contents) build on it."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import msgpack

from pcidev.errors import TransportError
from pcidev.transport.fdpass import close_fds, fd_headroom, recv_exact, send_all, send_buffers

__all__ = [
    "PROTOCOL_VERSION",
    "PROTOCOL_MEMORY",
    "MAGIC",
    "FRAME_HEADER",
    "MAX_STREAM_SIZE",
    "MAX_OFFER_FDS",
    "OFFER",
    "FDS",
    "STATE",
    "ACK",
    "NACK",
    "RUNNING",
    "COMMIT",
    "READY",
    "CONN",
    "ABORT",
    "HANDOVER",
    "REPORT",
    "SERVING",
    "MEMORY",
    "CHUNK",
    "CHECK",
    "VERDICT",
    "SYNC",
    "SYNCED",
    "PROTOCOL_PREFLIGHT",
    "FEATURE_SYNC",
    "boot_id",
    "check_offer_fds",
    "frame_name",
    "send_frame",
    "send_parts",
    "send_meta",
    "recv_frame",
    "frame_meta",
    "peer_data",
]

#: Version of the migration channel protocol, sent in OFFER; a destination refuses another.
PROTOCOL_VERSION = 1
#: The protocol of a migration whose memory contents travel as frames (MEMORY, CHUNK):
#: a channel without descriptors and a device with memory sources (pcidev.migration.precopy).
PROTOCOL_MEMORY = 2
#: The version of the pre-flight exchange (CHECK, VERDICT) and of what it negotiates (SYNC):
#: sent in CHECK and VERDICT; OFFER keeps :data:`PROTOCOL_VERSION` / :data:`PROTOCOL_MEMORY`.
PROTOCOL_PREFLIGHT = 3
#: a feature a destination names in its VERDICT: it answers SYNC with SYNCED
FEATURE_SYNC = "sync"
#: The 8 bytes every migration channel frame starts with.
MAGIC = b"PCIDMIGR"
#: the header of every frame: magic, type, flags, body length
FRAME_HEADER = struct.Struct("<8sHHI")
_HEADER = FRAME_HEADER
#: the largest state stream a destination accepts (a garbage length must not make
#: it allocate gigabytes)
MAX_STREAM_SIZE = 256 << 20
#: the most descriptors an OFFER may announce (a device's memory regions, eventfds and
#: backend files; a handover's too): checked with the process's own room for them
#: (:func:`check_offer_fds`) before a single FDS frame is received
MAX_OFFER_FDS = 65536
_MAX_META = 64 << 10
#: frame type: the source offers a state (its size, descriptors, protocol)
OFFER = 1
#: frame type: the next batch of descriptors (UNIX sockets)
FDS = 2
#: frame type: the vmstate stream
STATE = 3
#: frame type: the destination loaded the state
ACK = 4
#: frame type: the destination refuses (``error``, ``message``)
NACK = 5
#: frame type: the destination runs the device (``running_at``)
RUNNING = 6
#: frame type: the source gives the device up for good (after ACK, with ``commit=True``)
COMMIT = 7
#: frame type: a handover's new process is built and waits for the state
READY = 8
#: frame type: a handover's connection state and the sockets that move with it
CONN = 9
#: frame type: the source keeps the device; the destination must not run it
ABORT = 10
#: frame type: a request for a handover (``pcidev handover`` to the serving process)
HANDOVER = 11
#: frame type: the answer to HANDOVER (``ok``, ``reason`` and the figures)
REPORT = 12
#: frame type: a handover's new process polls the client's socket now (after RUNNING)
SERVING = 13
#: frame type: the memory sources whose contents follow (protocol 2, see pcidev.migration.precopy)
MEMORY = 14
#: frame type: a piece of a memory source's contents (protocol 2)
CHUNK = 15
#: frame type: the source's pre-flight, before anything stops (what the destination needs to decide)
CHECK = 16
#: frame type: the destination's answer to CHECK (``ok``, every reason, its features)
VERDICT = 17
#: frame type: the source asks which memory contents were applied (pre-copy, negotiated)
SYNC = 18
#: frame type: the destination's answer to SYNC, once everything before it is applied
SYNCED = 19
_NAMES = {OFFER: "OFFER", FDS: "FDS", STATE: "STATE", ACK: "ACK", NACK: "NACK", RUNNING: "RUNNING",
          COMMIT: "COMMIT", READY: "READY", CONN: "CONN", ABORT: "ABORT", HANDOVER: "HANDOVER",
          REPORT: "REPORT", SERVING: "SERVING", MEMORY: "MEMORY", CHUNK: "CHUNK",
          CHECK: "CHECK", VERDICT: "VERDICT", SYNC: "SYNC", SYNCED: "SYNCED"}


def boot_id() -> str:
    """This machine's kernel boot id ('' if unknown): equal boot ids mean the
    ``CLOCK_MONOTONIC`` readings of two processes are comparable."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def check_offer_fds(want: int) -> None:
    """Refuse an OFFER that announces ``want`` descriptors before receiving any: more than
    :data:`MAX_OFFER_FDS`, or more than this process may open now
    (``pcidev.transport.fdpass.fd_headroom``: the soft ``RLIMIT_NOFILE`` less the
    descriptors open), which would otherwise fail half-way through the FDS frames.

    :raises TransportError: one line naming the limit.
    """
    if not 0 <= want <= MAX_OFFER_FDS:
        raise TransportError(f"migration channel: OFFER announces {want} fds (0 to {MAX_OFFER_FDS})")
    if want:
        room = fd_headroom()
        if want > room:
            raise TransportError(f"migration channel: OFFER announces {want} fds; this process may open only "
                                 f"{room} more (RLIMIT_NOFILE: raise it with ulimit -n or LimitNOFILE=)")


def _send(sock: socket.socket, kind: int, body: bytes = b"", fds: Sequence[int] = (),
          deadline: float | None = None) -> None:
    send_all(sock, _HEADER.pack(MAGIC, kind, 0, len(body)) + body, fds, deadline=deadline)


def _send_meta(sock: socket.socket, kind: int, meta: dict[str, Any], fds: Sequence[int] = (),
               deadline: float | None = None) -> None:
    _send(sock, kind, msgpack.packb(meta, use_bin_type=True), fds, deadline=deadline)


def _recv(sock: socket.socket, *, max_fds: int = 0, max_len: int = _MAX_META,
          deadline: float | None = None) -> tuple[int, bytes, list[int]]:
    head, fds = recv_exact(sock, _HEADER.size, max_fds=max_fds, deadline=deadline)
    try:
        magic, kind, flags, length = _HEADER.unpack(head)
        if magic != MAGIC:
            raise TransportError(f"migration channel: bad magic {magic!r}")
        if kind not in _NAMES or flags:
            raise TransportError(f"migration channel: unknown frame type {kind} / flags {flags:#x}")
        if length > max_len:
            raise TransportError(f"migration channel: {_NAMES[kind]} frame of {length} bytes "
                                 f"(at most {max_len})")
        body = recv_exact(sock, length, deadline=deadline)[0] if length else b""
    except BaseException:
        close_fds(fds)
        raise
    return kind, body, fds


def _meta(kind: int, body: bytes, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    try:
        meta = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise TransportError(f"migration channel: {_NAMES[kind]} body is not msgpack: {exc}") from None
    if not isinstance(meta, dict):
        raise TransportError(f"migration channel: {_NAMES[kind]} body is not a map")
    for key, types in keys.items():
        allowed = types if isinstance(types, tuple) else (types,)
        value = meta.get(key)
        # (a key must be there even when nil is allowed: a missing one is not read as nil)
        if key not in meta or (type(value) not in allowed and not (float in allowed and type(value) is int)):
            raise TransportError(f"migration channel: {_NAMES[kind]} field {key!r} missing or of the wrong type")
    return meta


def send_frame(sock: socket.socket, kind: int, body: bytes = b"", fds: Sequence[int] = (), *,
               deadline: float | None = None) -> None:
    """Send one frame of the migration channel (the caller keeps its ``fds``).

    :param sock: the connected channel.
    :param kind: the frame type (:data:`COMMIT`, :data:`CONN`...).
    :param body: the body.
    :param fds: descriptors to attach (at most 253, Linux's ``SCM_MAX_FD``).
    :param deadline: a ``time.monotonic()`` by which the whole frame must have gone out
        (a peer that reads slowly or not at all cannot stretch it); None: only the
        socket's timeout, per ``send``.
    :raises TransportError: the peer went away, or the deadline passed.
    """
    _send(sock, kind, body, fds, deadline=deadline)


def send_parts(sock: socket.socket, kind: int, parts: Sequence[bytes | memoryview], *,
               deadline: float | None = None) -> None:
    """Send one frame whose body is ``parts`` joined, without joining them (``sendmsg``
    of the header and the parts: a large body is not copied;
    ``pcidev.transport.fdpass.send_buffers``). No descriptors.

    :param deadline: ``CLOCK_MONOTONIC`` time by which the whole frame must have gone out
        (None: the socket's own timeout for each ``sendmsg``): a peer reading a byte at a
        time cannot stretch it.
    :raises TransportError: the peer went away or the send timed out.
    """
    header = _HEADER.pack(MAGIC, kind, 0, sum(memoryview(p).nbytes for p in parts))
    send_buffers(sock, (header, *parts), deadline=deadline)


def send_meta(sock: socket.socket, kind: int, meta: dict[str, Any], fds: Sequence[int] = (), *,
              deadline: float | None = None) -> None:
    """Send one frame whose body is ``meta`` as msgpack (see :func:`send_frame`).

    :raises TransportError: the peer went away, or the deadline passed.
    """
    _send_meta(sock, kind, meta, fds, deadline)


def recv_frame(sock: socket.socket, *, max_fds: int = 0, max_len: int = _MAX_META,
               deadline: float | None = None) -> tuple[int, bytes, list[int]]:
    """Receive one frame: ``(type, body, fds)``; the caller owns the fds.

    :param max_fds: the most descriptors it may carry.
    :param max_len: the longest body accepted.
    :param deadline: a ``time.monotonic()`` by which the whole frame must have arrived
        (each read still waits at most the socket's timeout; the 16-byte header is read
        with the timeout cut to the deadline); None: only the socket's timeout.
    :raises TransportError: the peer closed, timed out, missed the deadline or sent
        garbage (bad magic, an unknown type, a body too long, too many fds).
    """
    return _recv(sock, max_fds=max_fds, max_len=max_len, deadline=deadline)


def frame_meta(kind: int, body: bytes, keys: dict[str, type | tuple[type, ...]]) -> dict[str, Any]:
    """The msgpack map of a frame's body, with ``keys`` checked (name → allowed types).

    :raises TransportError: not a msgpack map, or a key missing or of the wrong type.
    """
    return _meta(kind, body, keys)


def frame_name(kind: int) -> str:
    """The name of frame type ``kind`` (``"OFFER"``...), or its number."""
    return _NAMES.get(kind, str(kind))


@contextmanager
def peer_data(what: str) -> Iterator[None]:
    """Turn anything but a :class:`~pcidev.errors.TransportError` raised while reading
    ``what`` from the peer into one (the channel NACKs with it): malformed peer data is
    never an undocumented exception.

    :param what: what is read (``"CHUNK"``, ``"CHECK facts"``...), for the message.
    """
    try:
        yield
    except TransportError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeError, struct.error) as exc:
        raise TransportError(f"migration channel: malformed {what} ({type(exc).__name__}: {exc})") from None
