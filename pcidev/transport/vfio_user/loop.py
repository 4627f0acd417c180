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

The reader is buffered: one non-blocking read takes whatever the socket holds,
and the loop handles every complete message in it before it waits again. With a
:class:`~pcidev.transport.vfio_user.fastpath.FastPath`, a run of posted doorbell
writes at the front of the buffer is handled by it, in one device batch
(:meth:`FastPath.burst() <pcidev.transport.vfio_user.fastpath.FastPath.burst>`);
the other messages go to ``handle``.

**Adaptive polling.** When the device implements
:meth:`~pcidev.device.PciDevice.poll_work` (an NVMe controller with shadow
doorbells), the loop polls while the connection is hot: after a burst of doorbell
writes, or a poll that found work, it waits at most :data:`HOT_POLL` seconds for the
socket (a kernel sleep, not a spin) and then calls ``poll_work``; the device was
told (``set_polling(True)``) that it need not be notified meanwhile. After
:data:`HOT_WINDOW` seconds without work it calls ``set_polling(False)`` (the device
asks for notifications again), looks once more (work posted just before that
would otherwise wait for a notification that never comes) and blocks in ``poll``.

**Deadlines.** A message that started (some of its bytes are in the reader) must
arrive whole within ``message_timeout`` seconds, or the connection ends (reason
``transport: deadline ...``): a client that sends half a header or half a body and
stops does not hold the server. A client idle *between* messages waits as long as
it likes.

The loop never shuts the socket down (a shutdown acts on the kernel socket that
another process may be about to serve); it only stops reading it.
"""

from __future__ import annotations

import logging
import math
import os
import select
import threading
import time
from collections.abc import Callable

from pcidev.errors import TransportError
from pcidev.transport.vfio_user.fastpath import FastPath
from pcidev.transport.vfio_user.reader import Message, MessageReader

log = logging.getLogger(__name__)

__all__ = ["ConnectionLoop", "HOT_POLL", "HOT_WINDOW"]

#: seconds the loop waits for the socket between two ``poll_work`` calls while hot
HOT_POLL = 100e-6
#: seconds without work after which a hot loop stops polling and blocks
HOT_WINDOW = 500e-6
#: ``select`` handles descriptors below this (FD_SETSIZE); above, polling waits 1 ms
_FD_SETSIZE = 1024

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
    :param fast: handles posted doorbell writes and drives adaptive polling (None:
        every message goes to ``handle``).
    :param message_timeout: seconds a message that started may take to arrive whole
        (None: no deadline).
    """

    def __init__(self, handle: Handler, reader: MessageReader, *, on_wake: WakeHook | None = None,
                 on_idle: Callable[[], bool] | None = None, idle_timeout: float | None = None,
                 fast: FastPath | None = None, message_timeout: float | None = None) -> None:
        self.handle = handle
        self.message_timeout = message_timeout
        self.reader = reader
        self.on_wake = on_wake
        self.on_idle = on_idle
        self.idle_timeout = idle_timeout
        self.fast = fast
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
        try:
            return self._run()
        finally:
            self._stop_polling()

    def _stop_polling(self) -> None:
        fast = self.fast
        if fast is not None and fast.polling:
            try:
                fast.set_polling(False)
            except Exception:  # a device bug must not hide why the loop ended
                log.exception("vfio-user: set_polling(False) failed")

    def _hot_wait(self, sock_fd: int) -> bool:
        """Wait up to :data:`HOT_POLL` for the socket or the wake-up pipe. :returns: whether one is ready."""
        if sock_fd < _FD_SETSIZE and self._rfd < _FD_SETSIZE:
            ready, _w, _x = select.select((sock_fd, self._rfd), (), (), HOT_POLL)
            return bool(ready)
        p = select.poll()
        p.register(sock_fd, select.POLLIN)
        p.register(self._rfd, select.POLLIN)
        return bool(p.poll(1))

    def _run(self) -> str:
        poller = select.poll()
        sock_fd = self.reader.fileno()
        poller.register(sock_fd, select.POLLIN)
        poller.register(self._rfd, select.POLLIN)
        timeout_ms = None if self.idle_timeout is None else max(0, int(self.idle_timeout * 1000))
        reader = self.reader
        fast = self.fast
        polls = fast is not None and fast.polls
        flag = self._flag
        hot_until = 0.0
        limit = self.message_timeout
        started: float | None = None  # when the incomplete message in the reader was first seen
        while True:
            if flag.is_set():
                flag.clear()
                self._drain_wake()
                self._stop_polling()
                if self.on_wake is None:
                    return "stopped"
                reason = self.on_wake()
                if reason is not None:
                    return reason
                continue
            if not reader.has_message():
                wait_ms = timeout_ms
                if limit is not None and reader.buffered():  # a message started: it has a deadline
                    now = time.monotonic()
                    if started is None:
                        started = now
                    left = started + limit - now
                    if left <= 0:
                        log.info("vfio-user connection ended: a message did not arrive whole in %gs", limit)
                        return f"transport: deadline: a message did not arrive whole in {limit:g}s"
                    left_ms = math.ceil(left * 1000)
                    wait_ms = left_ms if timeout_ms is None else min(timeout_ms, left_ms)
                else:
                    started = None
                if polls and fast is not None and fast.polling:
                    if not self._hot_wait(sock_fd):
                        now = time.monotonic()
                        if not fast.active():
                            fast.set_polling(False)
                        elif fast.poll_work():
                            hot_until = now + HOT_WINDOW
                        elif now >= hot_until:
                            fast.set_polling(False)  # the device asks for notifications again,
                            if fast.poll_work():     # then one more look: nothing posted before is lost
                                fast.set_polling(True)
                                hot_until = now + HOT_WINDOW
                        continue
                else:
                    events = poller.poll(wait_ms)
                    if not events:
                        if self.on_idle is not None and wait_ms == timeout_ms:
                            self.on_idle()
                        continue
                    if not any(fd == sock_fd for fd, _ev in events):
                        continue  # only the wake-up pipe
                try:
                    n = reader.fill()
                except TransportError as exc:
                    log.info("vfio-user connection ended: %s", exc)
                    return f"transport: {exc}"
                if n == 0:
                    if reader.buffered():
                        log.info("vfio-user connection ended: the client closed it in the middle of a message")
                        return "transport: peer closed the connection in the middle of a message"
                    return "eof"
                continue
            started = None
            msg: Message | None
            if fast is not None and fast.active():
                n, msg = fast.burst(reader, flag)
                if n and polls:
                    hot_until = time.monotonic() + HOT_WINDOW
                    if not fast.polling:
                        fast.set_polling(True)
                if msg is None:
                    continue
            else:
                msg = reader.next()
                if msg is None:  # pragma: no cover - has_message() said a message is complete
                    continue
            try:
                reason = self.handle(msg)
            except TransportError as exc:  # the reply could not be sent
                log.info("vfio-user connection ended: %s", exc)
                return f"transport: {exc}"
            if reason is not None:
                return reason
