"""The per-connection loop of the vfio-user server.

:class:`ConnectionLoop` waits (``poll``) on the client socket and on a wake-up
pipe. When the socket is readable it reads messages with a
:class:`~pcidev.transport.vfio_user.reader.MessageReader` and hands each to its
``handle`` callable (the server's
:meth:`~pcidev.transport.vfio_user.server.VfioUserServer.handle_message`), whose
reply has gone out when it returns. Only between messages does it look at the wake-up
flag: :meth:`ConnectionLoop.wake` makes the loop call its ``on_wake`` hook
there, at a message boundary, which is where a connection can stop or move to
another process (the handover) without a message being handled twice or not at
all.

The loop never shuts the socket down (a shutdown acts on the kernel socket that
another process may be about to serve); it only stops reading it.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from pcidev.errors import TransportError
from pcidev.transport.vfio_user.reader import Message, MessageReader

log = logging.getLogger(__name__)

__all__ = ["ConnectionLoop"]

#: ``on_wake`` hook: called at a message boundary after :meth:`ConnectionLoop.wake`;
#: returns a reason to end the loop, or None to go on serving.
WakeHook = Callable[[], "str | None"]
#: handles one message, its reply sent; returns a reason to end the connection, or None.
Handler = Callable[[Message], "str | None"]


class ConnectionLoop:
    """Serves one connection until the client leaves or a hook ends it.

    :param handle: handles one message and sends its reply (the server's ``handle_message``).
    :param reader: reads messages from the client socket.
    :param on_wake: called at a message boundary after :meth:`wake`; its return value
        (a reason) ends the loop, None continues. Without a hook, :meth:`wake` stops the loop.
    :param on_idle: called when ``idle_timeout`` passes without a message; returns
        whether it found work (a polling transport keeps its short timeout while it does).
    :param idle_timeout: seconds to wait before ``on_idle`` (None: wait for the socket).
    """

    def __init__(self, handle: Handler, reader: MessageReader, *, on_wake: WakeHook | None = None,
                 on_idle: Callable[[], bool] | None = None, idle_timeout: float | None = None) -> None:
        self.handle = handle
        self.reader = reader
        self.on_wake = on_wake
        self.on_idle = on_idle
        self.idle_timeout = idle_timeout
        self._flag = threading.Event()
        self._rfd, self._wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def wake(self) -> None:
        """Ask the loop to call ``on_wake`` at the next message boundary (any thread)."""
        self._flag.set()
        try:
            os.write(self._wfd, b"w")
        except (BlockingIOError, OSError):
            pass  # the pipe is full or closed: the flag alone is enough

    def _drain_wake(self) -> None:
        try:
            while os.read(self._rfd, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        """Close the wake-up pipe (not the client socket)."""
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    def run(self) -> str:
        """Serve until the client leaves or a hook returns a reason. :returns: the reason."""
        poller = select.poll()
        sock_fd = self.reader.fileno()
        poller.register(sock_fd, select.POLLIN)
        poller.register(self._rfd, select.POLLIN)
        timeout_ms = None if self.idle_timeout is None else max(0, int(self.idle_timeout * 1000))
        while True:
            if self._flag.is_set():
                self._flag.clear()
                self._drain_wake()
                if self.on_wake is None:
                    return "stopped"
                reason = self.on_wake()
                if reason is not None:
                    return reason
                continue
            if not self.reader.buffered():
                events = poller.poll(timeout_ms)
                if not events:
                    if self.on_idle is not None:
                        self.on_idle()
                    continue
                if not any(fd == sock_fd for fd, _ev in events):
                    continue  # only the wake-up pipe
            try:
                msg = self.reader.read()
            except TransportError as exc:
                log.info("vfio-user connection ended: %s", exc)
                return f"transport: {exc}"
            if msg is None:
                return "eof"
            try:
                reason = self.handle(msg)
            except TransportError as exc:  # the reply could not be sent
                log.info("vfio-user connection ended: %s", exc)
                return f"transport: {exc}"
            if reason is not None:
                return reason
