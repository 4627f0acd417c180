"""A device's background worker: one daemon thread running a step function.

A device with background work (a DMA engine, a completion thread) gives a
*step* callable that does a bounded piece of work and returns whether it found
any. :class:`Worker` owns the thread and does the rest:

* each step runs under ``device.lock``, so a guest access never sees it halfway;
* when a step finds no work, the thread sleeps until :meth:`Worker.kick` (or
  ``idle_poll`` seconds, for work that appears without a kick);
* :meth:`Worker.quiesce` returns only when no step is in progress, and no step
  runs until :meth:`Worker.resume`;
* an exception in a step puts the device in its failed state
  (``device.fail(exc, where)``) and stops the worker until it is resumed;
* :meth:`Worker.close` stops and joins the thread, for good.

A worker made by :meth:`pcidev.device.PciDevice.add_worker` is quiesced,
resumed and closed with its device::

    def describe(self):
        ...
        self.engine = self.add_worker(self._engine_step, name="engine")

    def _engine_step(self) -> bool:      # called with self.lock held
        if not self.pending:
            return False
        self._copy_one_chunk()
        return True

    def _doorbell(self, reg, new, old):
        self.engine.kick()
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

__all__ = ["Worker", "WorkerHost"]

log = logging.getLogger(__name__)


class WorkerHost(Protocol):
    """What a :class:`Worker` needs of its device (a :class:`~pcidev.device.PciDevice` has it)."""

    #: the device's name (for thread names and logs)
    name: str

    @property
    def lock(self) -> AbstractContextManager[object]:
        """The device's lock, held around each step."""
        ...

    def fail(self, exc: BaseException, where: str) -> None:
        """Put the device in its failed state."""
        ...


class Worker:
    """One daemon thread that runs ``step`` while the device is running.

    The worker is created stopped: :meth:`start` (or :meth:`resume`) starts it.

    :param device: the device the worker belongs to (its ``lock`` is held around
        each step, its ``fail`` is called when a step raises).
    :param step: does a bounded piece of work with ``device.lock`` held and returns
        True if it found work (the next step follows at once), False if idle.
    :param name: the worker's name (the thread is named ``NAME[DEVICE]``).
    :param delay: seconds to sleep, without the lock, after each step that found work.
    :param idle_poll: seconds an idle worker waits for a :meth:`kick` before
        stepping again anyway.
    :param join_timeout: seconds :meth:`stop` and :meth:`close` wait for the thread.
    """

    def __init__(self, device: WorkerHost, step: Callable[[], bool], *, name: str = "worker",
                 delay: float = 0.0, idle_poll: float = 0.05, join_timeout: float = 5.0) -> None:
        self.device = device
        self.step = step
        self.name = name
        self.delay = delay
        self.idle_poll = idle_poll
        self.join_timeout = join_timeout
        self._wake = threading.Event()
        self._stop = threading.Event()
        #: True while steps must not run (created stopped; quiesce; after a failure)
        self._paused = True
        self._closed = False
        self._thread: threading.Thread | None = None
        self._state_lock = threading.Lock()

    # -- state -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the worker may step (started or resumed, not quiesced, closed or failed)."""
        return not self._paused and not self._closed

    @property
    def closed(self) -> bool:
        """True after :meth:`close`."""
        return self._closed

    @property
    def thread(self) -> threading.Thread | None:
        """The worker's thread, if one was started and not yet joined."""
        return self._thread

    # -- control -----------------------------------------------------------------------
    def start(self) -> None:
        """Start stepping (the same as :meth:`resume`)."""
        self.resume()

    def resume(self) -> None:
        """Start or restart stepping; start the thread if it is not running.
        Does nothing after :meth:`close`."""
        with self._state_lock:
            if self._closed:
                return
            self._paused = False
            self._stop.clear()
            thread = self._thread
            if thread is None or not thread.is_alive():
                thread = threading.Thread(target=self._run, name=f"{self.name}[{self.device.name}]",
                                          daemon=True)
                self._thread = thread
                thread.start()
        self._wake.set()

    def quiesce(self) -> None:
        """Stop stepping. Returns when no step is in progress; no step runs until
        :meth:`resume`. Safe to call from any thread, the worker's own included."""
        self._paused = True
        with self.device.lock:  # wait out the step in progress: the next one sees _paused
            pass

    def kick(self) -> None:
        """Wake an idle worker: there may be work."""
        self._wake.set()

    def stop(self) -> None:
        """Quiesce and end the thread (waits up to ``join_timeout`` seconds, never
        from the worker thread itself). :meth:`resume` starts a new thread."""
        self.quiesce()
        self._stop.set()
        self._wake.set()
        with self._state_lock:
            thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(self.join_timeout)
        if thread.is_alive():
            log.warning("worker %s did not stop within %.1f s", thread.name, self.join_timeout)
        else:
            with self._state_lock:
                if self._thread is thread:
                    self._thread = None

    def close(self) -> None:
        """Stop the worker for good and join its thread. Idempotent."""
        with self._state_lock:
            self._closed = True
        self.stop()

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        dev = self.device
        while not self._stop.is_set():
            if self._paused:
                self._wake.wait(self.idle_poll)
                self._wake.clear()
                continue
            with dev.lock:
                if self._paused or self._stop.is_set():
                    continue
                try:
                    busy = self.step()
                except Exception as exc:  # never let the worker die silently
                    self._paused = True
                    dev.fail(exc, f"{self.name} step")
                    return
            if busy:
                if self.delay:
                    self._stop.wait(self.delay)
            else:
                self._wake.wait(self.idle_poll)
                self._wake.clear()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if not self._paused else "paused"
        return f"<Worker {self.name!r} of {self.device.name!r} {state}>"
