"""Hostile peers for the deadline tests (issue 12): a peer that trickles a message a byte
at a time, or sends part of one and stops, and the devices they are set on: one served
over vfio-user on a socketpair, one served over the device link on a UNIX socket.

Imported as ``from hostile_peer import ...`` (``tests/`` is on ``sys.path``: the root
``conftest.py`` lives there).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from pcidev.devices.edu import EduDevice
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.protocol import FLAG_ERROR, STATUS, decode_body, encode_body, read_message, send_message
from pcidev.transport.link.server import LinkServer
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.server import VfioUserServer


def trickle(sock: socket.socket, data: bytes, stop: threading.Event, every: float = 0.2) -> int:
    """Send ``data`` one byte every ``every`` seconds (the wait comes first) until all went
    out, ``stop`` is set or the socket fails (the peer gave up): each byte arrives well
    inside a per-read timeout, so only an overall deadline ends the message.

    :returns: the bytes sent.
    """
    for i in range(len(data)):
        if stop.wait(every):
            return i
        try:
            sock.send(data[i:i + 1])
        except OSError:
            return i
    return len(data)


class Trickler:
    """:func:`trickle` on a daemon thread, started at once; use it as a context manager
    (or call :meth:`stop`): the thread stops and is joined on the way out.

    :param sock: where the bytes go (the caller owns it; ``close=True`` closes it in :meth:`stop`).
    :param data: what is trickled.
    :param every: seconds between two bytes.
    :param close: close ``sock`` in :meth:`stop`.
    :param before: called on the thread first (a peer reads the frames before it, say).
    """

    def __init__(self, sock: socket.socket, data: bytes | Callable[[], bytes], *, every: float = 0.2,
                 close: bool = False, before: Callable[[], object] | None = None) -> None:
        self.sock = sock
        self.every = every
        self.close = close
        self.stopped = threading.Event()
        #: bytes sent so far (when the thread ended: all it sent)
        self.sent = 0
        #: what ``before`` raised, if anything
        self.error: BaseException | None = None
        self._data = data
        self._before = before
        self.thread = threading.Thread(target=self._run, name="trickler", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self._before is not None:
                self._before()
            data = self._data() if callable(self._data) else self._data
        except BaseException as exc:  # (reported to the test)
            self.error = exc
            return
        self.sent = trickle(self.sock, data, self.stopped, self.every)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop trickling, close the socket if asked, and join the thread."""
        self.stopped.set()
        if self.close:
            self.sock.close()
        self.thread.join(timeout)

    def __enter__(self) -> Trickler:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Served:
    """A served device as a context manager: :meth:`close` on the way out."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class ServedVfioUser(_Served):
    """A device served by a :class:`~pcidev.transport.vfio_user.server.VfioUserServer` on
    one end of a socketpair, its loop (:meth:`serve`) on a thread; the test holds the
    client end. A context manager: :meth:`close` closes the client's end, joins the
    thread (it must have ended) and closes the endpoint.

    :param device: the device (default a fresh edu).
    :param loop: run :meth:`~pcidev.transport.vfio_user.server.VfioUserServer.serve` on a
        thread (False: the test drives the server itself).
    :param kwargs: the server's keyword arguments (``message_timeout``...).
    :ivar ep: the endpoint; :ivar server: the server; :ivar client: a
        :class:`~pcidev.transport.vfio_user.client.VfioUserClient` on the other end
        (10 s timeout); :ivar thread: the serve thread (None without ``loop``);
        :ivar result: ``{"reason": ...}`` once the loop ended.
    """

    def __init__(self, device: Any = None, *, loop: bool = True, **kwargs: Any) -> None:
        self.ep = DeviceEndpoint(device if device is not None else EduDevice())
        self.ep.start()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.settimeout(10)
        self.server = VfioUserServer(self.ep, a, **kwargs)
        self.client = VfioUserClient(b, timeout=10)
        self.result: dict[str, str] = {}
        self.thread: threading.Thread | None = None
        if loop:
            self.thread = threading.Thread(target=lambda: self.result.setdefault("reason", self.server.serve()),
                                           daemon=True)
            self.thread.start()

    def close(self) -> None:
        """Close the client's end, join the serve thread (it must have ended), close the endpoint."""
        self.client.sock.close()
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive()
        else:
            self.server.sock.close()
        self.ep.close()



class ServedLink(_Served):
    """A device served by a :class:`~pcidev.transport.link.server.LinkServer` on
    ``tmp_path/link.sock``, its loop on a thread. A context manager (:meth:`close`).

    :param tmp_path: where the socket goes.
    :param device: the device (default a fresh edu).
    :param io_timeout: the server's per-message and per-reply deadline.
    :ivar address: ``"unix:PATH"``; :ivar ep: the endpoint; :ivar server: the server;
        :ivar thread: the serve thread; :ivar exit: why ``serve_forever`` returned, once it did.
    """

    def __init__(self, tmp_path: Path, device: Any = None, *, io_timeout: float = 5.0) -> None:
        self.ep = DeviceEndpoint(device if device is not None else EduDevice())
        self.ep.start()
        self.listener = listen(f"unix:{tmp_path}/link.sock")
        self.address = str(self.listener.address)
        self.server = LinkServer(self.ep, self.listener.sock, io_timeout=io_timeout)
        self.exit: list[str] = []
        self.thread = threading.Thread(target=lambda: self.exit.append(self.server.serve_forever()), daemon=True)
        self.thread.start()

    def connect(self) -> socket.socket:
        """A new raw connection to the server."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.address.removeprefix("unix:"))
        return s

    def status_seconds(self) -> float:
        """One STATUS round trip on a connection of its own (the device must be running)."""
        s = self.connect()
        try:
            s.settimeout(30)
            t0 = time.monotonic()
            send_message(s, STATUS, 0, 7, encode_body({}))
            kind, flags, mid, body, _ = read_message(s, max_fds=0)
            took = time.monotonic() - t0
            assert (kind, mid, flags & FLAG_ERROR) == (STATUS, 7, 0)
            assert decode_body(body, "STATUS")["state"] == "running"
            return took
        finally:
            s.close()

    def close(self) -> None:
        """Stop the server, join its thread and close the endpoint."""
        self.server.stop()
        self.thread.join(20)
        self.ep.close()

