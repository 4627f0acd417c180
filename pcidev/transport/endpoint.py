"""The device side of a transport, independent of any wire protocol.

A :class:`DeviceEndpoint` wraps one device and gives a transport server (the
device link today, vfio-user later) everything it needs, as plain method calls:

* guest accesses (:meth:`~DeviceEndpoint.config_read`, :meth:`~DeviceEndpoint.bar_write`, ...), serialized with the
  device's background work through :attr:`PciDevice.lock
  <pcidev.device.PciDevice.lock>`;
* guest memory (:meth:`~DeviceEndpoint.dma_map`/:meth:`~DeviceEndpoint.dma_unmap`, done while the device is
  quiesced, the vfio-user rule) and interrupt eventfds (:meth:`~DeviceEndpoint.set_irqs`), whose
  file descriptors the endpoint owns;
* the lifecycle: :meth:`~DeviceEndpoint.start`, :meth:`~DeviceEndpoint.migrate_to` (source) and
  :meth:`~DeviceEndpoint.accept_incoming` (destination), :meth:`~DeviceEndpoint.resume_after_attach`,
  :meth:`~DeviceEndpoint.close`; the commit of a migration the destination runs only once
  its host re-attached it (TCP): :meth:`~DeviceEndpoint.release` or
  :meth:`~DeviceEndpoint.take_back` on the source, :meth:`~DeviceEndpoint.abandon` on a
  destination that will never run it.

A transport server reads a message, calls one method, and replies with the result
or the :class:`~pcidev.errors.PcidevError` it raised. It calls :meth:`~DeviceEndpoint.migrate_to`
from its message loop, so no other message is read while the device moves: the
device is quiesced at a message boundary, after every request read so far has
been answered.

A migration may have a phase before that one, while the device keeps serving the
host: :meth:`~DeviceEndpoint.open_precopy` connects to the destination and returns a
:class:`PrecopySession`, whose :meth:`~PrecopySession.run` (on a thread of the
server's) copies the device's large state (:class:`~pcidev.migration.precopy.Precopy`:
memory sources over a channel without descriptors) while the server's loop keeps
serving guest accesses; :meth:`~DeviceEndpoint.migrate_to` then takes the session and
sends only what is left inside the downtime. A session that is not used is closed
(:meth:`PrecopySession.close`): the destination sees the channel end and discards
what it received, the device here is untouched.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pluggy

from pcidev.device import PciDevice
from pcidev.dma import GuestMemory, shrink_sealed
from pcidev.errors import (
    ConnectionLostError,
    DmaError,
    IrqError,
    MigrationBlockedError,
    MigrationError,
    PcidevError,
    TransportError,
)
from pcidev.irq import is_eventfd
from pcidev.migration import (
    IncomingResult,
    LoadedResources,
    MigrationResult,
    OwnedEventfdSink,
    Precopy,
    PrecopyReport,
    boot_id,
    collect_blockers,
    descriptor_blockers,
    migrate_in,
    migrate_out,
    prepare_vmstate,
)
from pcidev.pci.capabilities.msi import MsiCapability
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.transport.address import connect
from pcidev.transport.fdpass import close_fds, is_unix

__all__ = ["DeviceEndpoint", "PrecopySession", "NEW", "RUNNING", "AWAITING_ATTACH", "AWAITING_COMMIT", "MIGRATED",
           "ABANDONED", "CLOSED", "CONNECT_SLICE"]

#: created, not started yet
NEW = "new"
#: serving the guest
RUNNING = "running"
#: loaded from a migration without descriptors (TCP): waits for memory, eventfds
#: and a resume from the host
AWAITING_ATTACH = "awaiting-attach"
#: source of a migration the destination acknowledged but runs only once its host re-attached
#: it (TCP): the device is stopped, its state as at the stop, until :meth:`DeviceEndpoint.release`
#: (it moved) or :meth:`DeviceEndpoint.take_back` (it runs here again)
AWAITING_COMMIT = "awaiting-commit"
#: the device moved to another process; this endpoint refuses everything
MIGRATED = "migrated"
#: a destination told that it will never run the device it loaded (its source kept it)
ABANDONED = "abandoned"
#: closed
CLOSED = "closed"


#: the longest one attempt to connect to a pre-copy's destination blocks (a cancel is seen between two)
CONNECT_SLICE = 0.25


def _connect_cancellable(address: str, timeout: float, cancelled: threading.Event | None) -> socket.socket:
    """Connect to ``address`` within ``timeout``, in attempts of at most :data:`CONNECT_SLICE`
    seconds, giving up once ``cancelled`` is set.

    :raises MigrationError: nobody accepted in time, or cancelled.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            return connect(address, timeout=max(min(left, CONNECT_SLICE), 0.01))
        except TransportError as exc:
            if cancelled is not None and cancelled.is_set():
                raise MigrationError(f"cannot reach the destination: {exc} (cancelled); "
                                     "the device keeps running here") from exc
            if time.monotonic() >= deadline:
                raise MigrationError(f"cannot reach the destination: {exc}; "
                                     "the device keeps running here") from exc
        if cancelled is not None and cancelled.wait(0.01):
            raise MigrationError(f"cannot reach the destination {address!r:.200}: cancelled; "
                                 "the device keeps running here")


class PrecopySession:
    """An open migration channel on which the device's large state is copied while the
    device keeps running (made by :meth:`DeviceEndpoint.open_precopy`, consumed by
    :meth:`DeviceEndpoint.migrate_to`).

    :param address: the destination's address.
    :param sock: the connected migration channel (owned from now on).
    :param precopy: the pre-copy engine on it.
    :param timeout: seconds the whole pre-copy may take (:meth:`run` is cancelled after).
    """

    def __init__(self, address: str, sock: socket.socket, precopy: Precopy, *, timeout: float) -> None:
        self.address = address
        self.sock = sock
        self.precopy = precopy
        self.timeout = timeout
        #: set to stop :meth:`run` early (see :meth:`cancel`)
        self.cancelled = threading.Event()
        #: ``CLOCK_MONOTONIC`` when :meth:`run` started and ended (None before)
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def report(self) -> PrecopyReport:
        """The pre-copy's figures so far (iterations, bytes per iteration, ...)."""
        return self.precopy.report

    def run(self) -> None:
        """Copy while the device runs, until the remainder fits the downtime budget or the
        iteration limit, then let the device prepare its stop
        (:meth:`~pcidev.device.PciDevice.prepare_quiesce`; thread-safe against the running
        device).

        :raises MigrationError: the pre-copy failed or was cancelled; the device runs on
            untouched (the session must then be closed).
        """
        self.started_at = time.monotonic()
        try:
            self.precopy.run(self.cancelled)
            if not self.cancelled.is_set():  # what the stop would do, ahead (the fdatasync of NVMe's files)
                self.precopy.device.prepare_quiesce(flush=True)
        except MigrationError:
            raise
        except Exception as exc:  # the channel broke (TransportError, OSError) or the engine failed
            raise MigrationError(f"pre-copy to {self.address} failed ({type(exc).__name__}: {exc}); "
                                 "the device keeps running here") from exc
        finally:
            self.ended_at = time.monotonic()
        if self.cancelled.is_set():
            raise MigrationError(f"pre-copy to {self.address} was cancelled; the device keeps running here")

    def cancel(self) -> None:
        """Make :meth:`run` return soon from any thread: its loop stops at the next chunk,
        and a send blocked on a stuck destination fails at once (the channel is shut down)."""
        self.cancelled.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        """Give the session up: the pre-copy's tracking stops, the channel closes (the
        destination discards what it received). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.precopy.abort()
        finally:
            self.sock.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed


class DeviceEndpoint:
    """Serves one device to one host over any transport.

    :param device: the device (realized here).
    :param pm: plugin manager whose ``pcidev_migration_blockers`` hook is consulted.
    :param max_regions: cap on guest-memory regions.
    """

    def __init__(self, device: PciDevice, *, pm: pluggy.PluginManager | None = None,
                 max_regions: int = 1024) -> None:
        device.realize()
        prepare_vmstate(device)
        self.device = device
        self.pm = pm
        self.memory = GuestMemory(max_regions=max_regions)
        self.sink = OwnedEventfdSink()
        device.attach(self.memory, self.sink)
        self.state = NEW
        #: ``CLOCK_MONOTONIC`` of the last resume (destination: the end of the downtime)
        self.resumed_at: float | None = None
        #: where the device went (after :meth:`migrate_to`)
        self.moved_to: str | None = None
        self._state_lock = threading.Lock()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start the device (its background work) for a fresh session."""
        self._check_state(NEW)
        self.device.resume()
        self.state = RUNNING
        self.resumed_at = time.monotonic()

    def _check_state(self, *allowed: str) -> None:
        if self.state in allowed:
            return
        if self.state == MIGRATED:
            raise MigrationError(f"the device has migrated to {self.moved_to or 'another process'}")
        if self.state == AWAITING_COMMIT:
            raise MigrationError(f"the device is stopped: its migration to {self.moved_to or 'another process'} "
                                 "awaits the host's commit")
        if self.state == ABANDONED:
            raise MigrationError("the device was abandoned here: its source kept it")
        raise TransportError(f"the device endpoint is {self.state}; expected {' or '.join(allowed)}")

    def _live(self) -> None:
        if self.state not in (RUNNING, NEW, AWAITING_ATTACH):
            self._check_state(RUNNING)

    def info(self) -> dict[str, Any]:
        """Identity and layout of the device (what a host needs to drive it)."""
        dev = self.device
        msix = dev.caps.find(MsixCapability)
        msi = dev.caps.find(MsiCapability)
        return {
            "device_type": dev.vmstate_device_type, "name": dev.name, "vendor_id": dev.vendor_id,
            "device_id": dev.device_id, "class_code": dev.class_code, "revision": dev.revision,
            "subsystem_vendor_id": dev.subsystem_vendor_id, "subsystem_id": dev.subsystem_id,
            "interrupt_pin": dev.interrupt_pin, "config_size": dev.config.size,
            "msix_vectors": msix.nvectors if msix is not None else 0,
            "msi_vectors": msi.nvectors if msi is not None else 0,
            "state": self.state, "resumed_at": self.resumed_at, "boot_id": boot_id(), "pid": os.getpid(),
            "precopy": True,  # open_precopy() is available (the link's PRECOPY)
            "commit": True,  # release/take_back/abandon, and a RESUME announced before the device runs
        }

    # -- guest accesses -----------------------------------------------------------------
    @property
    def intx_level(self) -> bool:
        """The INTx level the device last signalled."""
        return bool(getattr(self.device.irq, "_intx_out", False))

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read. :raises ConfigSpaceError: on a malformed access."""
        self._live()
        with self.device.lock:
            return self.device.config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write. :raises ConfigSpaceError: on a malformed access."""
        self._live()
        with self.device.lock:
            self.device.config_write(offset, size, value)

    def bar_read(self, index: int, offset: int, size: int, check_decode: bool = True) -> int:
        """A BAR read. :raises MmioError: on a malformed access."""
        self._live()
        with self.device.lock:
            return self.device.bar_read(index, offset, size, check_decode=check_decode)

    def bar_write(self, index: int, offset: int, size: int, value: int, check_decode: bool = True) -> None:
        """A BAR write. :raises MmioError: on a malformed access."""
        self._live()
        with self.device.lock:
            self.device.bar_write(index, offset, size, value, check_decode=check_decode)

    def rom_read(self, offset: int, size: int) -> int:
        """An expansion ROM read. :raises MmioError: on a malformed access."""
        self._live()
        with self.device.lock:
            return self.device.rom_read(offset, size)

    # -- guest memory and interrupts ----------------------------------------------------
    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        was_running = not self.device.quiesced and self.state == RUNNING
        self.device.quiesce()
        try:
            yield
        finally:
            if was_running:
                self.device.resume()

    def dma_map(self, gpa: int, size: int, fd: int, fd_offset: int = 0, *, writable: bool = True,
                name: str = "", allow_unsealed: bool = False) -> None:
        """Map guest memory (the device is quiesced meanwhile). The caller keeps ``fd``.

        :param allow_unsealed: map ``fd`` even without ``F_SEAL_SHRINK``
            (:func:`~pcidev.dma.shrink_sealed`): only for a trusted peer, since a truncation
            of the file under the mapping kills this process with ``SIGBUS``.
        :raises DmaError: bad or overlapping region, an fd that can shrink, or the kernel refused.
        """
        if not allow_unsealed and not shrink_sealed(fd):
            raise DmaError(f"guest memory at {gpa:#x}: its fd is not sealed against shrinking (F_SEAL_SHRINK); "
                           "a memfd from memory-backend-memfd (seal=on) or pcidev.dma.alloc_memfd is")
        self._live()
        with self._paused():
            self.memory.map(gpa, size, fd, fd_offset, writable=writable, name=name)

    def dma_unmap(self, gpa: int, size: int | None = None) -> None:
        """Unmap the region starting at ``gpa`` (the device is quiesced meanwhile).

        :raises DmaError: no such region, or views of it are alive.
        """
        self._live()
        with self._paused():
            self.memory.unmap(gpa, size)

    def set_irqs(self, vectors: Mapping[int, int], intx_fd: int | None = None) -> None:
        """Install interrupt eventfds, taking ownership of them (replaced ones are
        closed). A vector may appear once; vectors not mentioned keep theirs.

        :param vectors: vector number → eventfd.
        :param intx_fd: eventfd for INTx assertion, or None to keep the current one.
        :raises IrqError: a vector beyond the device's 2048, or an fd that is not an
            eventfd (a pipe nobody reads would block the interrupt path); all of them are
            closed then.
        """
        given = list(vectors.values()) + ([intx_fd] if intx_fd is not None else [])
        bad = [v for v in vectors if not 0 <= v < 2048]
        if bad:
            close_fds(given)
            raise IrqError(f"interrupt vector(s) {bad} out of range 0..2047")
        if not all(is_eventfd(fd) for fd in given):
            close_fds(given)
            raise IrqError("an interrupt fd is not an eventfd")
        try:
            self._live()
        except PcidevError:
            close_fds(list(vectors.values()) + ([intx_fd] if intx_fd is not None else []))
            raise
        with self.device.irq.lock:
            sink = self.sink
            for vector, fd in vectors.items():
                old = sink.vector_fds.get(vector)
                sink.set_vector(vector, fd)
                if old is not None and old != fd:
                    close_fds([old])
            if intx_fd is not None:
                old = sink.intx_fd
                sink.intx_fd = intx_fd
                if old is not None and old != intx_fd:
                    close_fds([old])

    def resume_after_attach(self, announce: Callable[[float], None] | None = None) -> float:
        """Resume a device loaded without descriptors once the host attached its
        memory and eventfds (see :data:`AWAITING_ATTACH`).

        :param announce: called with the resume's time *before* the device runs (a
            transport sends its reply there): the host then learns of every resume, and
            a request left without any answer proves the device never ran here. If it
            raises, the device never runs here (:data:`ABANDONED`: the host may have
            given it back to its source) and the error propagates.
        :returns: ``CLOCK_MONOTONIC`` of the resume.
        :raises TransportError: the endpoint is not awaiting attachment.
        """
        with self._state_lock:
            self._check_state(AWAITING_ATTACH)
            resumed_at = time.monotonic()
            if announce is not None:
                try:
                    announce(resumed_at)
                except BaseException:
                    self._abandoned()
                    raise
            self.device.resume()
            self.state = RUNNING
            self.resumed_at = resumed_at
        return resumed_at

    def abandon(self) -> None:
        """Give up a device loaded without descriptors that never ran here: its source
        kept it (the host could not attach it here). RESUME is refused from then on, and
        closing the endpoint persists nothing over the source's state.

        :raises MigrationError: the device runs here already (it cannot be given up).
        :raises TransportError: the endpoint is neither awaiting attachment nor abandoned.
        """
        with self._state_lock:
            if self.state == ABANDONED:
                return
            if self.state == RUNNING:
                raise MigrationError("the device runs here already; it cannot be abandoned")
            self._check_state(AWAITING_ATTACH)
            self._abandoned()

    def _abandoned(self) -> None:
        self.state = ABANDONED
        self.device.owns_state = False

    # -- migration ------------------------------------------------------------------------
    def open_precopy(self, address: str, *, timeout: float = 10.0, max_downtime_ms: float = 10.0,
                     max_iterations: int = 30, cancelled: threading.Event | None = None) -> PrecopySession:
        """Connect to the destination listening at ``address`` for a migration in two
        phases: the returned session's :meth:`~PrecopySession.run` copies while the device
        keeps running, then :meth:`migrate_to` with ``session=`` finishes it.

        Blockers are checked first (the descriptor-bound ones over a channel without
        descriptors, once connected); nothing is stopped.

        :param address: the destination's migration address.
        :param timeout: seconds for each step, and for the whole pre-copy.
        :param max_downtime_ms: the downtime budget: the pre-copy ends when what is left
            would take no longer to send at the measured bandwidth.
        :param max_iterations: the most pre-copy passes (0: everything at the stop).
        :param cancelled: once set, connecting gives up within :data:`~pcidev.transport.endpoint.CONNECT_SLICE` seconds
            (a destination that does not answer cannot hold the caller for ``timeout``).
        :raises MigrationBlockedError: blockers (nothing was stopped, nothing connected).
        :raises MigrationError: the destination cannot be reached (or ``cancelled`` was set).
        """
        self._check_state(RUNNING)
        reasons = collect_blockers(self.device, self.pm)
        if reasons:
            raise MigrationBlockedError(reasons)
        sock = _connect_cancellable(address, timeout, cancelled)
        try:
            sock.settimeout(timeout)
            precopy = Precopy(self.device, sock, max_downtime_ms=max_downtime_ms,
                              max_iterations=max_iterations, timeout=timeout)
            if not is_unix(sock):
                reasons = descriptor_blockers(self.device, "a migration over TCP",
                                              precopy.sources() if precopy.active else [])
                if reasons:
                    raise MigrationBlockedError(reasons)
        except BaseException:
            sock.close()
            raise
        return PrecopySession(str(address), sock, precopy, timeout=timeout)

    def migrate_to(self, address: str, *, timeout: float = 10.0, session: PrecopySession | None = None,
                   quiesce_timeout: float | None = 5.0, await_commit: bool = False) -> MigrationResult:
        """Migrate the device to the destination listening at ``address``.

        Blockers are checked before anything else (and before connecting). On
        success the endpoint is :data:`MIGRATED` and refuses further work; on
        failure the device runs here again.

        With ``await_commit``, a migration the destination acknowledged *deferred* (it runs
        the device only once its host re-attached it: TCP) leaves the endpoint
        :data:`AWAITING_COMMIT` instead: the device stays stopped here, its state as at the
        stop, until :meth:`release` (the destination runs it) or :meth:`take_back` (it
        never did: the device runs here again). A destination that runs the device at once
        (UNIX) makes it :data:`MIGRATED` as without.

        :param session: a pre-copy to ``address`` that ran (:meth:`open_precopy`): its
            channel is used and only the remainder is copied at the stop. It is closed
            when this returns or raises.
        :param quiesce_timeout: seconds the device may take to quiesce (see
            :func:`~pcidev.migration.channel.migrate_out`).
        :param await_commit: keep a deferred migration's device for :meth:`release` or
            :meth:`take_back` (see above).
        :raises MigrationBlockedError: blockers (nothing was stopped).
        :raises MigrationError: the migration failed; the device runs here again.
        """
        try:
            self._check_state(RUNNING)
            if session is not None and session.address != str(address):
                raise MigrationError(f"the pre-copy went to {session.address}, not to {address}; "
                                     "the device keeps running here")
            if session is not None and session.closed:
                raise MigrationError("the pre-copy's channel is closed; the device keeps running here")
            if session is not None and session.cancelled.is_set():
                raise MigrationError("the pre-copy was cancelled; the device keeps running here")
            reasons = collect_blockers(self.device, self.pm)
            if reasons:
                raise MigrationBlockedError(reasons)
            if session is not None:
                sock = session.sock
                session.precopy.timeout = timeout  # the stop's sends and reads: this call's timeout
            else:
                try:
                    sock = connect(address, timeout=timeout)
                except TransportError as exc:
                    raise MigrationError(f"cannot reach the destination: {exc}; "
                                         "the device keeps running here") from exc
            try:
                result = migrate_out(self.device, sock, pm=self.pm, timeout=timeout,
                                     precopy=session.precopy if session is not None else None,
                                     quiesce_timeout=quiesce_timeout)
            finally:
                sock.close()
        finally:
            if session is not None:
                session.close()
        self.moved_to = result.link or str(address)
        self.state = AWAITING_COMMIT if await_commit and result.deferred else MIGRATED
        return result

    def release(self) -> None:
        """The destination of the migration this endpoint awaits the commit of runs the
        device: give it up for good (:data:`MIGRATED`; the device was marked migrated out
        at the ACK, so closing it persists nothing over the destination's state).

        :raises TransportError: no migration awaits its commit here.
        """
        with self._state_lock:
            self._check_state(AWAITING_COMMIT)
            self.state = MIGRATED

    def take_back(self) -> float:
        """The destination of the migration this endpoint awaits the commit of never ran
        the device (it died, or its host could not attach it): resume the device here, its
        state as it was at the stop (nothing touched it since; the destination's copy is
        never run).

        :returns: ``CLOCK_MONOTONIC`` of the resume.
        :raises TransportError: no migration awaits its commit here.
        """
        with self._state_lock:
            self._check_state(AWAITING_COMMIT)
            self.device.migrated_out = False  # (set at the ACK): the state is this process's again
            self.device.owns_state = True
            self.moved_to = None
            self.state = RUNNING
            self.device.resume()
            self.resumed_at = time.monotonic()
            return self.resumed_at

    def accept_incoming(self, sock: socket.socket, *, link: str | None = None,
                        timeout: float = 10.0) -> IncomingResult:
        """Receive the device from a source over the accepted connection ``sock``.

        :param link: the address this process serves the device on (told to the source).
        :raises VMStateError: the state was refused (the device is untouched).
        :raises TransportError: the channel broke.
        :raises MigrationError: the acknowledgement could not be sent.
        """
        self._check_state(NEW)
        result = migrate_in(self.device, sock, timeout=timeout, link=link, adopt=self._adopt)
        if result.running_at is None:
            self.state = AWAITING_ATTACH
        else:
            self.state = RUNNING
            self.resumed_at = result.running_at
        return result

    def hand_over(self, sock: socket.socket, *, timeout: float = 10.0, running_timeout: float = 5.0,
                  stall: Callable[[], None]) -> MigrationResult:
        """Send the device to a handover's new process at the other end of ``sock``
        and commit (:func:`~pcidev.migration.channel.migrate_out` with ``commit``).

        The caller has stopped reading the guest's socket at a message boundary. On
        success (the new process confirmed it runs) the endpoint is :data:`MIGRATED`;
        on failure the device runs here again.

        :param sock: the connected channel to the new process.
        :param timeout: seconds to wait for the acknowledgement.
        :param running_timeout: seconds to wait for RUNNING after COMMIT.
        :param stall: ends the new process when RUNNING does not come (kill and reap).
        :raises MigrationBlockedError: blockers (nothing was stopped).
        :raises ConnectionLostError: the new process may have run the device and was killed:
            it runs nowhere, and this endpoint is :data:`MIGRATED` (it refuses every access).
        :raises MigrationError: the handover failed; the device runs here again.
        """
        self._check_state(RUNNING)
        try:
            result = migrate_out(self.device, sock, pm=self.pm, timeout=timeout, running_timeout=running_timeout,
                                 commit=True, stall=stall)
        except ConnectionLostError:
            # the new process may have run the device: it is nobody's here any more
            self.state = MIGRATED
            self.moved_to = "a new process that may have run it (killed: the connection is lost)"
            raise
        self.state = MIGRATED
        self.moved_to = f"pid {result.link}" if result.link else "a new process"
        return result

    def accept_handover(self, sock: socket.socket, *, timeout: float = 10.0,
                        before_ack: Callable[[], None] | None = None,
                        committed: Callable[[], None] | None = None, resume: bool = True) -> IncomingResult:
        """Receive the device from the process that served it (a handover) and run
        it once the source committed (:func:`~pcidev.migration.channel.migrate_in`
        with ``commit``): RUNNING goes out before this returns, and before anything
        reads the guest's socket here.

        :param sock: the channel from the old process.
        :param timeout: seconds to wait for each part of the stream and for COMMIT.
        :param before_ack: called after the load, before the acknowledgement (an
            exception refuses the state with a NACK).
        :param committed: called after COMMIT, before RUNNING.
        :param resume: resume the device after RUNNING (False: it was quiesced at the
            source, as a device whose client left: it stays quiesced).
        :raises VMStateError: the state was refused (the device is untouched).
        :raises TransportError: the channel broke.
        :raises MigrationError: no COMMIT (ABORT or the end): the device must not run here.
        """
        self._check_state(NEW)

        def adopt(res: LoadedResources) -> None:
            self._adopt(res)
            if before_ack is not None:
                before_ack()

        result = migrate_in(self.device, sock, timeout=timeout, link=str(os.getpid()), adopt=adopt,
                            commit=True, committed=committed, resume=resume)
        self.state = RUNNING
        self.resumed_at = result.running_at
        return result

    def _adopt(self, res: LoadedResources) -> None:
        if res.memory is not None:
            old, self.memory = self.memory, res.memory
            old.close()
        if res.sink is not None:
            old_sink, self.sink = self.sink, res.sink
            old_sink.close()

    # -- teardown -------------------------------------------------------------------------
    def close(self) -> None:
        """End the device's life: quiesce it, close it (:meth:`PciDevice.close
        <pcidev.device.PciDevice.close>`: workers joined, ``on_close``, exactly once),
        then release memory mappings and eventfds. Idempotent.

        After a migration out the device is closed too; it no longer
        :attr:`~pcidev.device.PciDevice.owns_state`, so its ``on_close`` persists
        nothing over the state the destination now owns. Neither does a device
        that never ran here (still :data:`NEW`: a migration destination that
        received nothing): its state belongs to whoever runs the device.
        """
        if self.state == CLOSED:
            return
        self.device.quiesce()
        if self.state == NEW:
            self.device.owns_state = False
        self.state = CLOSED
        self.device.close()
        self.sink.close()
        try:
            self.memory.close()
        except PcidevError:
            pass
