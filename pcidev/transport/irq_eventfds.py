"""Interrupts of a device served in another process, as eventfds.

A host-side proxy (the device link's :class:`~pcidev.transport.link.remote.RemoteDevice`,
vfio-user's :class:`~pcidev.transport.vfio_user.remote.VfioUserDevice`) hands the serving
process one eventfd per vector and one for INTx; :class:`InterruptEventfds` owns them and the
thread that turns their counts into calls of the proxy's delivery callbacks.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable

from pcidev.transport.fdpass import close_fds

__all__ = ["InterruptEventfds"]

_EVENTFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


class InterruptEventfds:
    """One eventfd per interrupt vector (and one for INTx) and the thread that reads them.

    :param nvectors: vectors (MSI-X or MSI) to make eventfds for.
    :param intx: make an eventfd for INTx too.
    :param name: the name of the delivery thread.
    """

    def __init__(self, nvectors: int, intx: bool, *, name: str) -> None:
        self.name = name
        #: the eventfd of each vector, by vector number
        self.vector_fds: list[int] = [os.eventfd(0, _EVENTFD_FLAGS) for _ in range(nvectors)]
        #: the eventfd of INTx, if any
        self.intx_fd: int | None = os.eventfd(0, _EVENTFD_FLAGS) if intx else None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread: threading.Thread | None = None
        self._closing = False

    def start(self, on_vector: Callable[[int, int], None], on_intx: Callable[[], None]) -> None:
        """Start delivering (once; later calls do nothing).

        :param on_vector: called with ``(vector, count)`` when a vector's eventfd fires.
        :param on_intx: called when the INTx eventfd fires.
        """
        if self._thread is not None or self._closing:
            return
        self._thread = threading.Thread(target=self._loop, args=(on_vector, on_intx), name=self.name, daemon=True)
        self._thread.start()

    def _loop(self, on_vector: Callable[[int, int], None], on_intx: Callable[[], None]) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd_vector = {fd: v for v, fd in enumerate(self.vector_fds)}
        for fd in fd_vector:
            poller.register(fd, select.POLLIN)
        if self.intx_fd is not None:
            poller.register(self.intx_fd, select.POLLIN)
        while not self._closing:
            for fd, _ev in poller.poll(1000):
                if fd == self._wake_r:
                    continue
                try:
                    count = os.eventfd_read(fd)
                except OSError:  # BlockingIOError included: another reader was first
                    continue
                if fd == self.intx_fd:
                    on_intx()
                else:
                    on_vector(fd_vector[fd], count)

    def close(self) -> None:
        """Stop the thread (joined unless called from it) and close every fd. Idempotent."""
        if self._closing:
            return
        self._closing = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        close_fds(self.vector_fds + ([self.intx_fd] if self.intx_fd is not None else []))
        self.vector_fds = []
        self.intx_fd = None
        close_fds([self._wake_r, self._wake_w])
