"""The device link: a small protocol that lets a device live in another process
than the host driving it.

Two halves:

* :class:`LinkServer` runs in the device's process. It reads one message at a
  time from each connection, calls the transport-agnostic
  :class:`~pcidev.transport.endpoint.DeviceEndpoint`, and replies. A malformed
  message gets an error reply naming the problem; a connection whose framing is
  broken is closed; the server itself keeps running.
* :class:`RemoteDevice` runs in the host's process and has the surface the
  software host uses (``config_read``/``config_write``/``bar_read``/``bar_write``/
  ``rom_read``/``attach``), so ``Machine.plug_remote`` plugs it like a local
  device. It shares the host's guest RAM (the memfd passed with ``SCM_RIGHTS``),
  creates one eventfd per interrupt vector and delivers what they signal to the
  host's interrupt sink, and can follow the device to another process
  (:meth:`RemoteDevice.migrate`), holding the host's accesses meanwhile.

Wire format (UNIX stream socket; integers little-endian)::

    header = magic "PDLK" (4) | type u16 | flags u16 | id u32 | length u32    (16 bytes)
    body   = one msgpack value of ``length`` bytes (at most 1 MiB)

File descriptors ride with the header (``SCM_RIGHTS``, at most 64 per message).
A reply has the request's type and id and flag ``REPLY`` (1); an error reply also
has flag ``ERROR`` (2) and the body ``{"type": error class, "message": text, ...}``
(``reasons`` for a blocked migration; ``reason``/``section``/``instance_id``/``path``
for a vmstate error). Requests and their bodies:

=============  ===========================================  ===========================
type           request body (+ fds)                          reply body
=============  ===========================================  ===========================
1 HELLO        ``{}``                                        device info map
2 CONFIG_READ  ``[offset, size]``                            ``[value, intx]``
3 CONFIG_WRITE ``[offset, size, value]``                     ``[intx]``
4 BAR_READ     ``[bar, offset, size, check_decode]``         ``[value, intx]``
5 BAR_WRITE    ``[bar, offset, size, value, check_decode]``  ``[intx]``
6 ROM_READ     ``[offset, size]``                            ``[value]``
7 DMA_MAP      ``{gpa, size, fd_offset, writable, name}``    ``{}``
               + 1 fd
8 DMA_UNMAP    ``{gpa, size}``                               ``{}``
9 SET_IRQS     ``{vectors: [v, ...], intx: bool}`` + one     ``{}``
               eventfd per vector, then the INTx eventfd
10 STATUS      ``{}``                                        ``{intx, failed, state}``
11 MIGRATE     ``{to: address, timeout: seconds}``           migration report map
12 RESUME      ``{}``                                        ``{resumed_at}``
=============  ===========================================  ===========================

``intx`` in access replies is the device's INTx output level after the access;
the proxy forwards changes to the host's sink. Interrupt messages travel as
eventfd signals: the proxy delivers vector *v* as ``sink.msi(v, 0xFEE00000, v)``,
the route the software host programs (MSI-X entry *v* / MSI message *v* is host
vector *v*), as KVM's irqfd routing would.
"""

from __future__ import annotations

import logging
import os
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from pcidev import errors as _errors
from pcidev.dma import GuestMemory
from pcidev.errors import MigrationBlockedError, PcidevError, TransportError, VMStateError
from pcidev.irq import InterruptSink
from pcidev.transport.address import connect
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, recv_exact, send_all
from pcidev.vmstate import errors as vm_errors

__all__ = ["LinkServer", "LinkClient", "RemoteDevice", "MSI_ROUTE_ADDRESS", "MAX_BODY", "LINK_MAX_FDS"]

log = logging.getLogger(__name__)

MAGIC = b"PDLK"
HEADER = struct.Struct("<4sHHII")
FLAG_REPLY = 1
FLAG_ERROR = 2
#: largest message body
MAX_BODY = 1 << 20
#: most descriptors one message may carry
LINK_MAX_FDS = 64
HELLO, CONFIG_READ, CONFIG_WRITE, BAR_READ, BAR_WRITE, ROM_READ = 1, 2, 3, 4, 5, 6
DMA_MAP, DMA_UNMAP, SET_IRQS, STATUS, MIGRATE, RESUME = 7, 8, 9, 10, 11, 12
NAMES = {HELLO: "HELLO", CONFIG_READ: "CONFIG_READ", CONFIG_WRITE: "CONFIG_WRITE", BAR_READ: "BAR_READ",
         BAR_WRITE: "BAR_WRITE", ROM_READ: "ROM_READ", DMA_MAP: "DMA_MAP", DMA_UNMAP: "DMA_UNMAP",
         SET_IRQS: "SET_IRQS", STATUS: "STATUS", MIGRATE: "MIGRATE", RESUME: "RESUME"}
#: the MSI address the proxy uses when it delivers an eventfd signal
MSI_ROUTE_ADDRESS = 0xFEE0_0000
_U64 = (1 << 64) - 1


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _unpack(body: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise TransportError(f"{what}: body is not valid msgpack ({type(exc).__name__}: {exc})") from None


def read_message(sock: socket.socket, *, max_fds: int, eof_ok: bool = False
                 ) -> tuple[int, int, int, bytes, list[int]] | None:
    """Read one framed message: ``(type, flags, id, body, fds)``, or None at a clean EOF.

    :raises TransportError: bad magic, oversized body, truncation, too many fds
        (framing is lost: the connection must be closed).
    """
    head, fds = recv_exact(sock, HEADER.size, max_fds=max_fds, eof_ok=eof_ok)
    if not head:
        return None
    try:
        magic, kind, flags, mid, length = HEADER.unpack(head)
        if magic != MAGIC:
            raise TransportError(f"bad link message magic {magic!r}")
        if length > MAX_BODY:
            raise TransportError(f"link message of {length} bytes (at most {MAX_BODY})")
        body = recv_exact(sock, length)[0] if length else b""
    except BaseException:
        close_fds(fds)
        raise
    return kind, flags, mid, body, fds


def _send_message(sock: socket.socket, kind: int, flags: int, mid: int, body: bytes,
                  fds: Sequence[int] = ()) -> None:
    send_all(sock, HEADER.pack(MAGIC, kind, flags, mid, len(body)) + body, fds)


def _error_body(exc: BaseException) -> bytes:
    info: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, MigrationBlockedError):
        info["reasons"] = list(exc.reasons)
    if isinstance(exc, VMStateError):
        info.update(reason=exc.reason, section=exc.section, instance_id=exc.instance_id, path=exc.path)
    return _pack(info)


def _error_classes() -> dict[str, type[PcidevError]]:
    classes: dict[str, type[PcidevError]] = {}
    for module in (_errors, vm_errors):
        for name in dir(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, PcidevError):
                classes[name] = obj
    return classes


def error_from_reply(body: bytes) -> PcidevError:
    """Rebuild the typed error an error reply describes (TransportError if unknown)."""
    try:
        info = _unpack(body, "error reply")
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


# ===================================================================== server
def _ints(body: Any, n: int, what: str) -> list[int]:
    if not isinstance(body, list) or len(body) != n or any(type(v) is not int for v in body):
        raise TransportError(f"{what}: expected an array of {n} integers, got {body!r:.100}")
    if any(not 0 <= v <= _U64 for v in body):
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
        value = body.get(key)
        if type(value) is not tp and not (tp is float and type(value) is int):
            raise TransportError(f"{what}: field {key!r} missing or not {tp.__name__}")
        if tp is int and not 0 <= value <= _U64:
            raise TransportError(f"{what}: field {key!r} out of range")
    return body


class LinkServer:
    """Serves a :class:`~pcidev.transport.endpoint.DeviceEndpoint` over a listening
    UNIX socket, one message at a time (several connections may be open: a host
    that reconnects, a monitoring tool).

    :param endpoint: the device side.
    :param listener: a listening socket (see :func:`pcidev.transport.address.listen`).
    :param io_timeout: seconds a peer may take to finish sending a started message.
    """

    def __init__(self, endpoint: DeviceEndpoint, listener: socket.socket, *, io_timeout: float = 5.0) -> None:
        self.endpoint = endpoint
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
                        sel.register(conn, selectors.EVENT_READ, "conn")
                    elif key.data == "wake":
                        try:
                            os.read(self._wake_r, 64)
                        except OSError:
                            pass
                    elif not self.handle(key.fileobj):
                        sel.unregister(key.fileobj)
                        self._conns.discard(key.fileobj)
                        key.fileobj.close()
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
                _send_message(conn, 0, FLAG_REPLY | FLAG_ERROR, 0, _error_body(exc))
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
            reply, rflags = _pack(result), FLAG_REPLY
        except PcidevError as exc:
            reply, rflags = _error_body(exc), FLAG_REPLY | FLAG_ERROR
        except Exception as exc:  # a bug in a device or here: report it, keep serving
            log.exception("link: %s failed", NAMES.get(kind, kind))
            reply, rflags = _error_body(TransportError(f"internal error: {type(exc).__name__}: {exc}")), \
                FLAG_REPLY | FLAG_ERROR
        finally:
            close_fds(fds)
        try:
            _send_message(conn, kind, rflags, mid, reply)
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
        args = _unpack(body, what)
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
            mapping = dict(zip(vectors, fds))
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
            result = ep.migrate_to(m["to"], timeout=timeout).as_dict()
            self.migration = result
            return result
        if kind == RESUME:
            return {"resumed_at": ep.resume_after_attach()}
        raise TransportError(f"unhandled link message {what}")  # pragma: no cover


# ===================================================================== client
class LinkClient:
    """The host side of one link connection: request/reply, one at a time.

    :param sock: a connected UNIX stream socket.
    :param io_timeout: seconds to wait for a reply (MIGRATE passes its own).
    """

    def __init__(self, sock: socket.socket, *, io_timeout: float = 10.0) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self._next = 1
        self._lock = threading.Lock()
        self.closed = False

    def request(self, kind: int, body: Any = None, fds: Sequence[int] = (), *,
                timeout: float | None = None) -> Any:
        """Send a request and return the decoded reply body.

        :raises PcidevError: the error the device replied with (its own type).
        :raises TransportError: the connection broke or the reply is malformed.
        """
        with self._lock:
            if self.closed:
                raise TransportError("the link connection is closed")
            mid = self._next
            self._next = (self._next % 0xFFFF_FFFF) + 1
            self.sock.settimeout(self.io_timeout if timeout is None else timeout)
            _send_message(self.sock, kind, 0, mid, _pack({} if body is None else body), fds)
            msg = read_message(self.sock, max_fds=0)
            assert msg is not None
            rkind, rflags, rid, rbody, _ = msg
            if rflags & FLAG_ERROR and rid == 0:
                raise error_from_reply(rbody)
            if rkind != kind or rid != mid or not rflags & FLAG_REPLY:
                raise TransportError(f"link: reply {NAMES.get(rkind, rkind)}#{rid} does not match "
                                     f"request {NAMES.get(kind, kind)}#{mid}")
            if rflags & FLAG_ERROR:
                raise error_from_reply(rbody)
            return _unpack(rbody, f"{NAMES.get(kind, kind)} reply")

    def close(self) -> None:
        """Close the connection (never ``shutdown``: the socket may be shared)."""
        self.closed = True
        self.sock.close()


class RemoteDevice:
    """Host-side proxy for a device served by a :class:`LinkServer` in another process.

    It has the methods the software host calls on a device, so
    :meth:`pcidev.host.Machine.plug_remote` (or ``Machine.plug(RemoteDevice(...))``)
    drives it like a local one. All accesses go through one lock: while
    :meth:`migrate` or :meth:`retarget` runs, accesses from other threads wait and
    then continue on the new process.

    :param address: the link address (``unix:PATH``).
    :param timeout: seconds to wait for the server to accept.
    :param io_timeout: seconds to wait for each reply.
    """

    realized = True

    def __init__(self, address: str, *, timeout: float = 5.0, io_timeout: float = 10.0) -> None:
        self.address = address
        self.io_timeout = io_timeout
        self._client = LinkClient(connect(address, timeout=timeout), io_timeout=io_timeout)
        try:
            self.info: dict[str, Any] = self._client.request(HELLO)
        except BaseException:
            self._client.close()
            raise
        self._check_info(self.info)
        self.TYPE_NAME = self.info["device_type"]
        self.name = self.info["name"]
        self.vendor_id = self.info["vendor_id"]
        self.device_id = self.info["device_id"]
        self._access = threading.RLock()
        self._memory: GuestMemory | None = None
        self._sink: InterruptSink | None = None
        self._vector_fds: list[int] = []
        self._intx_fd: int | None = None
        self._intx = False
        self._irq_thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closing = False
        #: migrations this proxy followed, oldest first (the reports)
        self.migrations: list[dict[str, Any]] = []

    @staticmethod
    def _check_info(info: Any) -> None:
        need = {"device_type": str, "name": str, "vendor_id": int, "device_id": int, "msix_vectors": int,
                "msi_vectors": int, "interrupt_pin": int, "state": str, "boot_id": str}
        if not isinstance(info, dict) or any(type(info.get(k)) is not t for k, t in need.items()):
            raise TransportError(f"malformed HELLO reply {info!r:.200}")
        if not 0 <= info["msix_vectors"] <= 2048 or not 0 <= info["msi_vectors"] <= 32:
            raise TransportError("HELLO reply announces impossible vector counts")

    def __repr__(self) -> str:
        return f"<RemoteDevice {self.TYPE_NAME} {self.name!r} {self.vendor_id:04x}:{self.device_id:04x} " \
               f"at {self.address} (pid {self.info.get('pid')})>"

    # -- the device surface the host uses ---------------------------------------------
    def realize(self) -> None:
        """Nothing to do: the device was realized in its own process."""

    def _req(self, kind: int, body: Any) -> Any:
        with self._access:
            return self._client.request(kind, body)

    def _note_intx(self, level: Any) -> None:
        level = bool(level)
        if level != self._intx:
            self._intx = level
            if self._sink is not None:
                self._sink.intx(level)

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read in the device's process."""
        value, intx = self._req(CONFIG_READ, [offset, size])
        self._note_intx(intx)
        return value

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write in the device's process."""
        (intx,) = self._req(CONFIG_WRITE, [offset, size, value])
        self._note_intx(intx)

    def bar_read(self, index: int, offset: int, size: int, *, check_decode: bool = True) -> int:
        """A BAR read in the device's process."""
        value, intx = self._req(BAR_READ, [index, offset, size, check_decode])
        self._note_intx(intx)
        return value

    def bar_write(self, index: int, offset: int, size: int, value: int, *, check_decode: bool = True) -> None:
        """A BAR write in the device's process."""
        (intx,) = self._req(BAR_WRITE, [index, offset, size, value & _U64, check_decode])
        self._note_intx(intx)

    def rom_read(self, offset: int, size: int) -> int:
        """An expansion ROM read in the device's process."""
        return self._req(ROM_READ, [offset, size])[0]

    def status(self) -> dict[str, Any]:
        """``{intx, failed, state}`` of the device."""
        st = self._req(STATUS, {})
        self._note_intx(st.get("intx"))
        return st

    # -- attach: memory and interrupts ----------------------------------------------------
    def attach(self, memory: GuestMemory | None, sink: InterruptSink | None) -> None:
        """Share ``memory`` with the device (its regions' fds) and route the device's
        interrupts to ``sink`` through eventfds (one per MSI-X/MSI vector, and INTx)."""
        with self._access:
            self._memory = memory
            self._sink = sink
            if not self._vector_fds and self._intx_fd is None:
                nvec = max(self.info["msix_vectors"], self.info["msi_vectors"])
                flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
                self._vector_fds = [os.eventfd(0, flags) for _ in range(nvec)]
                self._intx_fd = os.eventfd(0, flags) if self.info["interrupt_pin"] else None
            self._attach_on(self._client)
        if self._irq_thread is None and sink is not None:
            self._irq_thread = threading.Thread(target=self._irq_loop, name=f"link-irq[{self.name}]",
                                                daemon=True)
            self._irq_thread.start()

    def _attach_on(self, client: LinkClient) -> None:
        if self._memory is not None:
            for region, fd in self._memory.fds():
                client.request(DMA_MAP, {"gpa": region.gpa, "size": region.size, "fd_offset": region.fd_offset,
                                         "writable": region.writable, "name": region.name[:64]}, [fd])
        vectors = list(range(len(self._vector_fds)))
        batch = LINK_MAX_FDS - 1
        for start in range(0, max(len(vectors), 1), batch):
            part = vectors[start:start + batch]
            last = start + batch >= len(vectors)
            with_intx = last and self._intx_fd is not None
            fds = [self._vector_fds[v] for v in part] + ([self._intx_fd] if with_intx else [])
            if fds:
                client.request(SET_IRQS, {"vectors": part, "intx": with_intx}, fds)

    def route(self, vector: int) -> tuple[int, int]:
        """The ``(address, data)`` delivered for ``vector`` (see the module docstring)."""
        return MSI_ROUTE_ADDRESS, vector

    def _irq_loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd_vector = {fd: v for v, fd in enumerate(self._vector_fds)}
        for fd in fd_vector:
            poller.register(fd, select.POLLIN)
        if self._intx_fd is not None:
            poller.register(self._intx_fd, select.POLLIN)
        while not self._closing:
            for fd, _ev in poller.poll(1000):
                if fd == self._wake_r:
                    continue
                try:
                    count = os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    continue
                sink = self._sink
                if sink is None:
                    continue
                if fd == self._intx_fd:
                    try:
                        self.status()
                    except PcidevError:
                        pass
                    continue
                vector = fd_vector[fd]
                address, data = self.route(vector)
                for _ in range(count):
                    sink.msi(vector, address, data)

    # -- following the device -------------------------------------------------------------------
    def _switch(self, link: str, timeout: float) -> tuple[dict[str, Any], float | None]:
        new = LinkClient(connect(link, timeout=timeout), io_timeout=self.io_timeout)
        try:
            info = new.request(HELLO)
            self._check_info(info)
            if info["device_type"] != self.TYPE_NAME:
                raise TransportError(f"{link} serves a {info['device_type']!r}, not a {self.TYPE_NAME!r}")
            resumed_at = info.get("resumed_at")
            if info["state"] == "awaiting-attach":
                self._attach_on(new)
                resumed_at = new.request(RESUME)["resumed_at"]
            elif info["state"] != "running":
                raise TransportError(f"the device at {link} is {info['state']}")
        except BaseException:
            new.close()
            raise
        old, self._client = self._client, new
        old.close()
        self.address = link
        self.info = info
        return info, resumed_at

    def retarget(self, address: str, *, timeout: float = 5.0) -> None:
        """Drive the device at ``address`` from now on (after it was moved by other
        means). Accesses wait meanwhile. A destination that awaits attachment gets
        the memory regions and eventfds again, then a RESUME.

        :raises TransportError: nobody serves a device of the same type there.
        """
        with self._access:
            self._switch(address, timeout)

    def migrate(self, to: str, *, timeout: float = 30.0, link: str | None = None) -> dict[str, Any]:
        """Ask the device's process to migrate it to the destination listening at
        ``to``, then follow it there. Accesses from other threads wait meanwhile and
        continue on the destination (or on the source if the migration failed).

        :param to: the destination's migration address.
        :param timeout: seconds for the migration.
        :param link: where the destination serves the device, if it does not say so itself.
        :returns: the report: ``state_size``, ``fds``, ``downtime`` (stop on the source
            to running on the destination, seconds; None if the clocks are not
            comparable), ``downtime_upper_bound``, ``host_pause`` (how long accesses
            were held here), ...
        :raises MigrationBlockedError: blockers (nothing was stopped).
        :raises MigrationError: the migration failed; the source device runs again.
        :raises TransportError: the source process went away (the device is lost).
        """
        with self._access:
            t0 = time.monotonic()
            report = dict(self._client.request(MIGRATE, {"to": to, "timeout": float(timeout)},
                                               timeout=timeout + 10.0))
            target = report.get("link") or link
            if not isinstance(target, str):
                raise TransportError("the migration succeeded but nobody said where the device is served now")
            info, resumed_at = self._switch(target, timeout)
            report["resumed_at"] = resumed_at
            if isinstance(resumed_at, (int, float)) and info.get("boot_id") == report.get("boot_id") \
                    and info.get("boot_id"):
                report["downtime"] = resumed_at - report["stopped_at"]
            report["host_pause"] = time.monotonic() - t0
            report["destination_pid"] = info.get("pid")
            self.migrations.append(report)
            return report

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop interrupt delivery, close the eventfds and the connection. Idempotent."""
        if self._closing:
            return
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._irq_thread is not None and self._irq_thread is not threading.current_thread():
            self._irq_thread.join(2.0)
        self._client.close()
        close_fds(self._vector_fds + ([self._intx_fd] if self._intx_fd is not None else []))
        self._vector_fds = []
        self._intx_fd = None
        close_fds([self._wake_r, self._wake_w])
