"""The device side of the device link: :class:`LinkServer` runs in the device's
process. It reads one message at a time from each connection, calls the
transport-agnostic :class:`~pcidev.transport.endpoint.DeviceEndpoint`, and
replies (:mod:`pcidev.transport.link.protocol`). A malformed message gets an
error reply naming the problem; a connection whose framing is broken is closed;
the server itself keeps running.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
from typing import Any

from pcidev.errors import PcidevError, TransportError
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds
from pcidev.transport.link.protocol import (
    BAR_READ,
    BAR_WRITE,
    CONFIG_READ,
    CONFIG_WRITE,
    DMA_MAP,
    DMA_UNMAP,
    FLAG_ERROR,
    FLAG_REPLY,
    HELLO,
    LINK_MAX_FDS,
    MIGRATE,
    NAMES,
    RESUME,
    ROM_READ,
    SET_IRQS,
    STATUS,
    U64_MAX,
    decode_body,
    encode_body,
    encode_error,
    read_message,
    send_message,
)

__all__ = ["LinkServer"]

log = logging.getLogger(__name__)


def _ints(body: Any, n: int, what: str) -> list[int]:
    if not isinstance(body, list) or len(body) != n or any(type(v) is not int for v in body):
        raise TransportError(f"{what}: expected an array of {n} integers, got {body!r:.100}")
    if any(not 0 <= v <= U64_MAX for v in body):
        raise TransportError(f"{what}: values must be in 0..2**64-1")
    return body


def _access(body: Any, n: int, what: str) -> tuple[list[int], bool]:
    if not isinstance(body, list) or len(body) != n + 1 or type(body[-1]) is not bool:
        raise TransportError(f"{what}: expected {n} integers and a bool, got {body!r:.100}")
    return _ints(body[:-1], n, what), body[-1]


def _map(body: Any, keys: dict[str, type], what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise TransportError(f"{what}: expected a map, got {body!r:.100}")
    for key, tp in keys.items():
        value: Any = body.get(key)
        if type(value) is not tp and not (tp is float and type(value) is int):
            raise TransportError(f"{what}: field {key!r} missing or not {tp.__name__}")
        if tp is int and not 0 <= body[key] <= U64_MAX:
            raise TransportError(f"{what}: field {key!r} out of range")
    return body


class LinkServer:
    """Serves a :class:`~pcidev.transport.endpoint.DeviceEndpoint` over a listening
    UNIX socket, one message at a time (several connections may be open: a host
    that reconnects, a monitoring tool).

    :param endpoint: the device side.
    :param listener: a listening socket (see :func:`pcidev.transport.address.listen`).
    :param io_timeout: seconds a peer may take to finish sending a started message.
    :param quiesce_timeout_ms: the quiesce budget of a MIGRATE that gives none.
    """

    def __init__(self, endpoint: DeviceEndpoint, listener: socket.socket, *, io_timeout: float = 5.0,
                 quiesce_timeout_ms: float = 5000.0) -> None:
        self.endpoint = endpoint
        self.quiesce_timeout_ms = quiesce_timeout_ms
        self.listener = listener
        self.io_timeout = io_timeout
        self._stop = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._conns: set[socket.socket] = set()
        #: why :meth:`serve_forever` returned
        self.exit_reason = ""
        #: the last migration report (source side)
        self.migration: dict[str, Any] | None = None

    def stop(self) -> None:
        """Make :meth:`serve_forever` return (thread- and signal-safe)."""
        self._stop = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def serve_forever(self) -> str:
        """Serve until :meth:`stop` or until the device migrated away.

        :returns: ``"migrated"`` or ``"stopped"``.
        """
        sel = selectors.DefaultSelector()
        sel.register(self.listener, selectors.EVENT_READ, "accept")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop:
                for key, _events in sel.select():
                    if self._stop:
                        break
                    if key.data == "accept":
                        try:
                            conn, _ = self.listener.accept()
                        except OSError:
                            continue
                        conn.settimeout(self.io_timeout)
                        self._conns.add(conn)
                        sel.register(conn, selectors.EVENT_READ, conn)  # data: the connection itself
                    elif key.data == "wake":
                        try:
                            os.read(self._wake_r, 64)
                        except OSError:
                            pass
                    else:
                        client: socket.socket = key.data
                        if not self.handle(client):
                            sel.unregister(client)
                            self._conns.discard(client)
                            client.close()
        finally:
            sel.close()
            for conn in self._conns:
                conn.close()
            self._conns.clear()
            self.listener.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
        if not self.exit_reason:
            self.exit_reason = "stopped"
        return self.exit_reason

    def handle(self, conn: socket.socket) -> bool:
        """Read one message from ``conn``, execute it and reply.

        :returns: False when the connection must be closed (EOF, broken framing).
        """
        try:
            msg = read_message(conn, max_fds=LINK_MAX_FDS, eof_ok=True)
        except TransportError as exc:
            log.warning("link: dropping a connection: %s", exc)
            try:
                send_message(conn, 0, FLAG_REPLY | FLAG_ERROR, 0, encode_error(exc))
            except TransportError:
                pass
            return False
        if msg is None:
            return False
        kind, flags, mid, body, fds = msg
        try:
            if flags:
                raise TransportError(f"unexpected flags {flags:#x} on a request")
            result = self.dispatch(kind, body, fds)
            fds = []
            reply, rflags = encode_body(result), FLAG_REPLY
        except PcidevError as exc:
            reply, rflags = encode_error(exc), FLAG_REPLY | FLAG_ERROR
        except Exception as exc:  # a bug in a device or here: report it, keep serving
            log.exception("link: %s failed", NAMES.get(kind, kind))
            reply, rflags = encode_error(TransportError(f"internal error: {type(exc).__name__}: {exc}")), \
                FLAG_REPLY | FLAG_ERROR
        finally:
            close_fds(fds)
        try:
            send_message(conn, kind, rflags, mid, reply)
        except TransportError:
            return False
        if kind == MIGRATE and rflags == FLAG_REPLY:
            self.exit_reason = "migrated"
            self.stop()
        return True

    def dispatch(self, kind: int, body: bytes, fds: list[int]) -> Any:
        """Execute one request; takes ownership of ``fds`` (closes what it does not keep)."""
        ep = self.endpoint
        what = NAMES.get(kind)
        if what is None:
            raise TransportError(f"unknown link message type {kind}")
        args = decode_body(body, what)
        if kind not in (DMA_MAP, SET_IRQS) and fds:
            raise TransportError(f"{what} carries no file descriptors, got {len(fds)}")
        if kind == BAR_READ:
            (bar, off, size), decode = _access(args, 3, what)
            return [ep.bar_read(bar, off, size, decode), ep.intx_level]
        if kind == BAR_WRITE:
            (bar, off, size, value), decode = _access(args, 4, what)
            ep.bar_write(bar, off, size, value, decode)
            return [ep.intx_level]
        if kind == CONFIG_READ:
            off, size = _ints(args, 2, what)
            return [ep.config_read(off, size), ep.intx_level]
        if kind == CONFIG_WRITE:
            off, size, value = _ints(args, 3, what)
            ep.config_write(off, size, value)
            return [ep.intx_level]
        if kind == ROM_READ:
            off, size = _ints(args, 2, what)
            return [ep.rom_read(off, size)]
        if kind == HELLO:
            return ep.info()
        if kind == STATUS:
            return {"intx": ep.intx_level, "failed": ep.device.failed is not None, "state": ep.state}
        if kind == DMA_MAP:
            m = _map(args, {"gpa": int, "size": int, "fd_offset": int, "writable": bool, "name": str}, what)
            if len(fds) != 1:
                raise TransportError(f"DMA_MAP needs exactly one fd, got {len(fds)}")
            ep.dma_map(m["gpa"], m["size"], fds[0], m["fd_offset"], writable=m["writable"], name=m["name"][:64])
            close_fds(fds)  # the guest memory keeps its own duplicate
            return {}
        if kind == DMA_UNMAP:
            m = _map(args, {"gpa": int, "size": int}, what)
            ep.dma_unmap(m["gpa"], m["size"])
            return {}
        if kind == SET_IRQS:
            m = _map(args, {"vectors": list, "intx": bool}, what)
            vectors = m["vectors"]
            if any(type(v) is not int for v in vectors) or len(set(vectors)) != len(vectors):
                raise TransportError("SET_IRQS: vectors must be distinct integers")
            if len(fds) != len(vectors) + m["intx"]:
                raise TransportError(f"SET_IRQS: {len(vectors) + m['intx']} eventfds announced, {len(fds)} sent")
            mapping = dict(zip(vectors, fds, strict=False))  # the INTx eventfd, if any, is last
            intx_fd = fds[-1] if m["intx"] else None
            taken = list(fds)
            fds.clear()  # set_irqs owns them now (closes them on error)
            del taken
            ep.set_irqs(mapping, intx_fd)
            return {}
        if kind == MIGRATE:
            m = _map(args, {"to": str, "timeout": float}, what)
            timeout = float(m["timeout"])
            if not 0 < timeout <= 3600:
                raise TransportError("MIGRATE: timeout must be in (0, 3600] seconds")
            qt = m.get("quiesce_timeout_ms", self.quiesce_timeout_ms)
            if type(qt) not in (int, float) or not 0 < qt <= 3_600_000:
                raise TransportError("MIGRATE: quiesce_timeout_ms must be in (0, 3600000]")
            result = ep.migrate_to(m["to"], timeout=timeout, quiesce_timeout=qt / 1000).as_dict()
            self.migration = result
            return result
        if kind == RESUME:
            return {"resumed_at": ep.resume_after_attach()}
        raise TransportError(f"unhandled link message {what}")  # pragma: no cover
