"""When a file's writes are durable: the ``fdatasync`` bookkeeping of the ``file`` image
(:class:`~pcidev_nvme.backends.file.FileBackend`) and of its metadata sidecar
(``pcidev_nvme.metadata.FileMetadata``).

A file counts as clean only once an ``fdatasync`` that *began after its last write* has
*returned* successfully: each write takes a new generation number, each ``fdatasync``
notes the generation it began at and, only when it returns without error, records it as
synced. A call that is still blocked (an NFS server gone away) or that failed leaves the
file unflushed, so a migration's retried stop flushes again instead of moving a device
whose acknowledged writes may not be on stable storage. The stop also asks whether an
``fdatasync`` is still in progress (``Durability.syncing``) and waits for it rather
than queueing another one behind it on a worker (``pcidev_nvme.migration.flush_namespaces``).

A write-back error met by a migration's stop stays pending (``Durability.pending_error``):
Linux reports it once per open file, to the first ``fdatasync`` after it, so the stop keeps
it for the host's next Flush and refuses every migration until the host has been told.
"""

from __future__ import annotations

import os
import threading

__all__ = ["Durability"]


class Durability:
    """The write and ``fdatasync`` generations of one open file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        #: the newest write's generation. 1 at first: what another process wrote (a
        #: handover's old one, an earlier run) may still be in the page cache only
        self._written = 1
        #: the newest generation an ``fdatasync`` that returned successfully covered
        self._synced = 0
        #: ``fdatasync`` calls in progress
        self._syncing = 0
        #: a write-back error a migration's stop met, not reported to the host yet
        self.pending_error: OSError | None = None

    def wrote(self) -> None:
        """Something was written (called after the write, also a failed one: it may have
        written a part)."""
        with self._lock:
            self._written += 1

    @property
    def unflushed(self) -> bool:
        """Written since the last successful ``fdatasync`` began (or none returned since the
        open), or a write-back error is pending: a flush has work to do."""
        return self._written != self._synced or self.pending_error is not None

    @property
    def syncing(self) -> bool:
        """An ``fdatasync`` began and has not returned yet."""
        return self._syncing > 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no ``fdatasync`` is in progress.

        :param timeout: seconds.
        :returns: False if one still is after ``timeout``.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._syncing == 0, max(timeout, 0.0))

    def sync(self, fd: int) -> None:
        """``fdatasync(fd)``; the writes made before the call count as durable only once it
        has returned successfully.

        :raises OSError: the system call failed (the writes stay unflushed).
        """
        with self._lock:
            gen = self._written
            self._syncing += 1
        ok = False
        try:
            os.fdatasync(fd)
            ok = True
        finally:
            with self._lock:
                self._syncing -= 1
                if ok:
                    self._synced = max(self._synced, gen)
                self._idle.notify_all()

    def flush(self, fd: int) -> None:
        """The host's Flush: a write-back error a migration's stop met is reported here
        once, else ``fdatasync`` (always the system call).

        :raises OSError: the pending error, or the system call's.
        """
        err, self.pending_error = self.pending_error, None
        if err is not None:
            raise err
        self.sync(fd)

    def flush_at_stop(self, fd: int) -> None:
        """A migration's stop: ``fdatasync`` only if :attr:`unflushed`; an error it meets
        stays pending for the host's next :meth:`flush`.

        :raises OSError: the error, or one met earlier that the host has not been told yet.
        """
        if self.pending_error is not None:
            raise self.pending_error
        if not self.unflushed:
            return
        try:
            self.sync(fd)
        except OSError as exc:
            self.pending_error = exc
            raise
