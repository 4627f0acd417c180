"""Interrupt delivery: INTx, MSI and MSI-X to pluggable sinks.

A device raises interrupts through its :class:`InterruptController`
(``device.irq``). The controller knows which mode the guest enabled
(MSI-X, MSI, or legacy INTx), applies the masks the framework owns (MSI-X
function and vector masks, MSI per-vector masks, the command register's
INTx-disable and bus-master bits) and hands each message to an
:class:`InterruptSink`:

* :class:`CallbackSink` calls Python functions in this process (tests, the
  software host);
* :class:`EventfdSink` signals one eventfd per vector, for delivery to another
  process (vfio-user's SET_IRQS hands the server such eventfds).

An eventfd from another process is untrusted: :func:`is_eventfd` tells one from a
pipe or a file (which a write could block on forever), and :func:`signal_eventfd`
does not block on a saturated counter, even of a blocking eventfd; a peer that makes its
eventfd blocking and fills the counter between the poll and the write holds that one write
at most :data:`EVENTFD_STUCK_SECONDS` (a watchdog thread drains the counter).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import attrs

from pcidev.errors import IrqError
from pcidev.pci import ids
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.pci.config import ConfigSpace
from pcidev.ratelog import RateLimitedLog

__all__ = ["InterruptSink", "NullSink", "CallbackSink", "EventfdSink", "InterruptState", "InterruptController",
           "IrqError", "is_eventfd", "signal_eventfd", "EVENTFD_STUCK_SECONDS", "MAX_DRAINS",
           "eventfd_writes_unblocked"]

log = logging.getLogger(__name__)

_CMD_MASTER = int(ids.Command.MASTER)
_CMD_INTX_DISABLE = int(ids.Command.INTX_DISABLE)
_STATUS_INTERRUPT = int(ids.Status.INTERRUPT)


class InterruptSink(Protocol):
    """Where a device's interrupts go."""

    def msi(self, vector: int, address: int, data: int) -> None:
        """Deliver one MSI or MSI-X message for ``vector``."""

    def intx(self, level: bool) -> None:
        """Change the INTx line level."""


class NullSink:
    """Drops every interrupt (the sink of a device nobody attached)."""

    def msi(self, vector: int, address: int, data: int) -> None:
        pass

    def intx(self, level: bool) -> None:
        pass


class CallbackSink:
    """Calls ``on_msi(vector, address, data)`` and ``on_intx(level)`` in-process.

    :param on_msi: called for each MSI/MSI-X message (may be None).
    :param on_intx: called on each INTx level change (may be None).
    """

    def __init__(self, on_msi: Callable[[int, int, int], None] | None = None,
                 on_intx: Callable[[bool], None] | None = None) -> None:
        self._on_msi = on_msi
        self._on_intx = on_intx

    def msi(self, vector: int, address: int, data: int) -> None:
        if self._on_msi is not None:
            self._on_msi(vector, address, data)

    def intx(self, level: bool) -> None:
        if self._on_intx is not None:
            self._on_intx(level)


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (``/proc/self/fd/N`` reads ``anon_inode:[eventfd]``).

    :param fd: any file descriptor of this process.
    """
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


#: a write to an eventfd that has not returned after this many seconds is unblocked by the
#: watchdog (it drains the counter); the write then returns within about 1.25 times this
EVENTFD_STUCK_SECONDS = 1.0
#: how often the watchdog looks at the writes in progress
_WATCH_PERIOD = EVENTFD_STUCK_SECONDS / 4


#: drain threads that may be parked at once (a peer that empties its counter between a drain's
#: poll and read parks that thread until the eventfd's next signal); past it, stuck writes wait
#: for a free slot
MAX_DRAINS = 8


class _EventfdWatchdog:
    """Unblocks eventfd writes that a peer holds (the window :func:`signal_eventfd` cannot
    close by itself: the peer shares the open file description, so it may clear
    ``O_NONBLOCK`` and fill the counter between the poll and the write).

    The writer only records its fd under a fresh call number before the write and removes it
    after (no lock, no handoff: a counter step, a dict store and a delete). One daemon thread,
    started by the first write, looks every :data:`_WATCH_PERIOD`; a write seen in progress for
    :data:`EVENTFD_STUCK_SECONDS` is blocked on a saturated counter, and a short-lived thread
    reads the counter (the read resets it to 0, which lets the blocked write add its 1).

    **Never another file.** The drain works on a duplicate of the writer's descriptor, taken
    while that write is still in progress: the call number is looked up before and after the
    ``dup`` (a number is used once and its entry only ever removed), so the write, during which
    its caller keeps the descriptor open, spanned the ``dup``. A write that ended before the
    drain thread ran leaves the fd number alone, whatever file that number names by then.

    The reader sets ``O_NONBLOCK`` and polls first; it runs in its own thread (at most
    :data:`MAX_DRAINS`, one per held call) so that even a peer winning that race too (emptying
    the counter between the poll and the read) parks only that reader, until the eventfd's
    next signal, never the watchdog or a device thread.
    """

    def __init__(self) -> None:
        #: writes in progress: call number -> fd
        self.writing: dict[int, int] = {}
        self.calls = itertools.count()
        #: the watchdog thread runs (the writers' one check)
        self.started = False
        #: writes unblocked by a drain since the process started
        self.unblocked = 0
        self._start_lock = threading.Lock()
        #: call numbers whose drain thread runs
        self._draining: set[int] = set()
        self._log = RateLimitedLog(log)
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self.writing.clear()
        self.started = False
        self._start_lock = threading.Lock()
        self._draining = set()

    def start(self) -> None:
        """Start the watchdog thread (once)."""
        with self._start_lock:
            if not self.started:
                threading.Thread(target=self._run, name="pcidev-eventfd-watchdog", daemon=True).start()
                self.started = True

    def _run(self) -> None:
        first_seen: dict[tuple[int, int], float] = {}
        while True:
            time.sleep(_WATCH_PERIOD)
            now = time.monotonic()
            first_seen = {w: first_seen.get(w, now) for w in list(self.writing.items())}
            for (call, fd), since in first_seen.items():
                if (now - since >= EVENTFD_STUCK_SECONDS and call not in self._draining
                        and len(self._draining) < MAX_DRAINS):
                    self._draining.add(call)
                    threading.Thread(target=self.drain, args=(call, fd, now - since), name="pcidev-eventfd-drain",
                                     daemon=True).start()

    def held_descriptor(self, call: int, fd: int) -> int | None:
        """A duplicate of ``fd`` if the write ``call`` is still in progress (so ``fd`` still
        names its eventfd), else None.

        :param call: the write's call number.
        :param fd: the descriptor that write was given.
        """
        if self.writing.get(call) != fd:
            return None
        try:
            dup = os.dup(fd)
        except OSError:
            return None
        if self.writing.get(call) != fd:  # the write ended during the dup: the number may name another file
            os.close(dup)
            return None
        return dup

    def drain(self, call: int, fd: int, held: float) -> None:
        """Empty the counter of the eventfd that the write ``call`` is held on, if that write
        is still in progress (:meth:`held_descriptor`).

        :param call: the write's call number.
        :param fd: the descriptor it was given.
        :param held: how long it has been held (for the log line).
        """
        try:
            dup = self.held_descriptor(call, fd)
            if dup is None:
                return
            try:
                os.set_blocking(dup, False)
                p = select.poll()
                p.register(dup, select.POLLIN)
                if p.poll(0):
                    os.eventfd_read(dup)
                    self.unblocked += 1
                    self._log("an interrupt eventfd write was held %.1f s on a saturated blocking counter: "
                              "the counter was drained", held)
            except OSError:  # emptied by its owner meanwhile (the write went through)
                pass
            finally:
                os.close(dup)
        finally:
            self._draining.discard(call)


_WATCHDOG = _EventfdWatchdog()
_WRITING = _WATCHDOG.writing
_CALLS = _WATCHDOG.calls


def eventfd_writes_unblocked() -> int:
    """How many :func:`signal_eventfd` writes a peer held on a saturated counter and the
    watchdog unblocked (by draining the counter) since the process started."""
    return _WATCHDOG.unblocked


def signal_eventfd(fd: int) -> bool:
    """Add 1 to the counter of eventfd ``fd``; a peer cannot hold it more than about
    :data:`EVENTFD_STUCK_SECONDS`.

    A counter at its maximum (``2**64 - 2``) means the vector is signalled already and
    nobody reads it: the signal is dropped. A blocking eventfd (its ``O_NONBLOCK``
    is the owner's choice, shared with it) is polled first; a non-blocking one
    (QEMU's) is written at once. A peer that clears ``O_NONBLOCK`` and fills the counter
    between the poll and the write holds the write until a watchdog thread drains the
    counter (after :data:`EVENTFD_STUCK_SECONDS`; the signal then goes through). The
    caller keeps ``fd`` open during the call (as the vfio-user server does, under the
    device's ``irq.lock``).

    :param fd: an eventfd (:func:`is_eventfd`).
    :returns: ``True`` when the counter was incremented, ``False`` when it was saturated.
    :raises OSError: ``fd`` is closed or is not writable.
    """
    if os.get_blocking(fd):
        p = select.poll()
        p.register(fd, select.POLLOUT)
        if not p.poll(0):
            return False
    if not _WATCHDOG.started:
        _WATCHDOG.start()
    call = next(_CALLS)
    _WRITING[call] = fd
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        return False
    finally:
        del _WRITING[call]
    return True


class EventfdSink:
    """Signals eventfds: one per MSI/MSI-X vector, and one for INTx assertion.

    The eventfds may belong to another process (passed over a UNIX socket);
    each message adds 1 to the vector's counter. A vector without an eventfd is
    dropped and counted in ``dropped``, as a vfio device does when no
    trigger was set. A signal to an eventfd whose counter is saturated is dropped
    and counted in ``saturated`` (:func:`signal_eventfd`: a saturated counter is not waited for).

    :param vector_fds: vector number → eventfd.
    :param intx_fd: eventfd signalled when INTx is asserted.
    """

    def __init__(self, vector_fds: Mapping[int, int] | None = None, intx_fd: int | None = None) -> None:
        self.vector_fds: dict[int, int] = dict(vector_fds or {})
        self.intx_fd = intx_fd
        self.dropped = 0
        self.saturated = 0

    def set_vector(self, vector: int, fd: int | None) -> None:
        """Install (or with None remove) the eventfd of ``vector``."""
        if fd is None:
            self.vector_fds.pop(vector, None)
        else:
            self.vector_fds[vector] = fd

    def msi(self, vector: int, address: int, data: int) -> None:
        fd = self.vector_fds.get(vector)
        if fd is None:
            self.dropped += 1
            return
        if not signal_eventfd(fd):
            self.saturated += 1

    def intx(self, level: bool) -> None:
        if level and self.intx_fd is not None and not signal_eventfd(self.intx_fd):
            self.saturated += 1


@attrs.frozen
class InterruptState:
    """The INTx state of an :class:`InterruptController` (what a migration saves).

    :ivar intx_asserted: the device's INTx request.
    :ivar intx_line: the level the interrupt sink was last told.
    """

    intx_asserted: bool
    intx_line: bool


class InterruptController:
    """Owns the interrupt state of one device.

    Created by :class:`~pcidev.device.PciDevice`, which binds the function's MSI-X
    and MSI capabilities at realize (:meth:`bind`); devices call :meth:`notify`
    for message interrupts and :meth:`set_intx` for the legacy line.

    :param config: the function's configuration space (command register,
        interrupt pin, status).
    """

    def __init__(self, config: ConfigSpace) -> None:
        self.config = config
        self.sink: InterruptSink = NullSink()
        self.intx_asserted = False
        self._intx_out = False
        #: the function's MSI-X capability (set by :meth:`bind`), or None
        self.msix: MsixCapability | None = None
        #: the function's MSI capability (set by :meth:`bind`), or None
        self.msi: MsiCapability | None = None
        #: messages dropped because bus mastering was off
        self.blocked_by_bus_master = 0
        self.lock = threading.RLock()

    def bind(self, *, msix: MsixCapability | None, msi: MsiCapability | None) -> None:
        """Deliver message interrupts through these capabilities (called at realize).

        :param msix: the function's MSI-X capability, if it has one.
        :param msi: the function's MSI capability, if it has one.
        """
        self.msix = msix
        self.msi = msi

    @property
    def mode(self) -> str:
        """``"msix"``, ``"msi"`` or ``"intx"``: what the guest enabled."""
        msix = self.msix
        if msix is not None and msix.enabled:
            return "msix"
        msi = self.msi
        if msi is not None and msi.enabled:
            return "msi"
        return "intx"

    def vector_count(self) -> int:
        """How many message vectors the guest enabled (0 in INTx mode)."""
        msix = self.msix
        if msix is not None and msix.enabled:
            return msix.nvectors
        msi = self.msi
        if msi is not None and msi.enabled:
            return msi.enabled_vectors
        return 0

    def bus_master(self) -> bool:
        return bool(self.config.get16(ids.COMMAND) & _CMD_MASTER)

    def send(self, vector: int, address: int, data: int) -> None:
        """Deliver a message to the sink, if bus mastering allows (used by MSI/MSI-X)."""
        if not self.bus_master():
            self.blocked_by_bus_master += 1
            return
        self.sink.msi(vector, address, data)

    def notify(self, vector: int) -> bool:
        """Raise message interrupt ``vector`` in the enabled mode.

        :returns: True if MSI-X or MSI is enabled and took the vector (it may be
            latched as pending while masked); False in INTx mode, where the caller
            drives :meth:`set_intx` instead.
        :raises IrqError: if the vector does not exist in the enabled mode.
        """
        with self.lock:
            msix = self.msix
            if msix is not None and msix.enabled:
                msix.notify(vector)
                return True
            msi = self.msi
            if msi is not None and msi.enabled:
                msi.notify(vector)
                return True
            return False

    def notify_many(self, vectors: Iterable[int]) -> bool:
        """Raise several message interrupts under one acquisition of the interrupt lock
        (a device that completed a batch of work on several vectors).

        Each vector is raised once, in the order given, exactly as :meth:`notify`
        would; a vector that does not exist does not stop the others.

        :param vectors: the vectors to raise.
        :returns: True if MSI-X or MSI is enabled (see :meth:`notify`); False in INTx
            mode, where nothing is raised.
        :raises IrqError: after raising the valid vectors, if one of ``vectors`` does
            not exist in the enabled mode (the first such error).
        """
        first: IrqError | None = None
        with self.lock:
            msix = self.msix
            if msix is not None and msix.enabled:
                raise_one = msix.notify
            else:
                msi = self.msi
                if msi is None or not msi.enabled:
                    return False
                raise_one = msi.notify
            for vector in vectors:
                try:
                    raise_one(vector)
                except IrqError as exc:
                    if first is None:
                        first = exc
        if first is not None:
            raise first
        return True

    def set_intx(self, level: bool) -> None:
        """Assert (True) or deassert (False) the device's INTx line."""
        with self.lock:
            self.intx_asserted = bool(level)
            self.update_intx()

    def update_intx(self) -> None:
        """Recompute the line level seen by the sink (after INTx-disable changes)."""
        cfg = self.config
        if cfg.get8(ids.INTERRUPT_PIN) == 0:
            return
        if self.intx_asserted:
            cfg.set_bits(ids.STATUS, 2, _STATUS_INTERRUPT)
        else:
            cfg.clear_bits(ids.STATUS, 2, _STATUS_INTERRUPT)
        disabled = bool(cfg.get16(ids.COMMAND) & _CMD_INTX_DISABLE)
        out = self.intx_asserted and not disabled and self.mode == "intx"
        if out != self._intx_out:
            self._intx_out = out
            self.sink.intx(out)

    def reset(self) -> None:
        """Deassert INTx (part of every reset)."""
        self.intx_asserted = False
        self.update_intx()

    # -- migration ---------------------------------------------------------------------
    def snapshot(self) -> InterruptState:
        """The INTx request and the line level the sink was last told."""
        return InterruptState(intx_asserted=bool(self.intx_asserted), intx_line=bool(self._intx_out))

    def restore(self, state: InterruptState) -> None:
        """Put back a state from :meth:`snapshot`, without telling the sink (it was
        told on the side the state was saved, or is told again by the caller)."""
        self.intx_asserted = state.intx_asserted
        self._intx_out = state.intx_line
