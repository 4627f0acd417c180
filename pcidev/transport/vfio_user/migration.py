"""The vfio-user migration state machine of a served device, and its data.

VFIO migration v2 over the vfio-user socket (QEMU ``docs/interop/vfio-user.rst``,
``VFIO_USER_DEVICE_FEATURE`` and ``VFIO_USER_MIG_DATA_READ/WRITE``; Linux's
``include/uapi/linux/vfio.h``): the client moves the device between the states
``RUNNING``, ``STOP``, ``PRE_COPY``, ``STOP_COPY``, ``RESUMING`` and ``ERROR``
with the ``MIG_DEVICE_STATE`` feature, reads the device's state in ``STOP_COPY``
and writes it into another device in ``RESUMING``.

:class:`MigrationStateMachine` owns the steps and the buffer; the current state is
stored in the connection's :attr:`ConnectionState.mig_state
<pcidev.transport.vfio_user.conn.ConnectionState.mig_state>` (it travels in a
handover, which refuses unless it is ``RUNNING``).

* A requested state is reached by single arcs, chosen as Linux's
  ``vfio_mig_get_next_state`` (drivers/vfio/vfio_main.c) chooses them, skipping the
  P2P states that pcidev does not offer (:func:`migration_path`). An arc that does not
  exist (``STOP_COPY`` to ``PRE_COPY``, anything from ``ERROR``, to ``ERROR`` or to a
  P2P state) is refused with ``EINVAL`` and the state is unchanged.
* The data is the device's vmstate stream (docs/vmstate-format.md) **without file
  descriptors**: the destination re-establishes guest memory and interrupts with its
  own ``DMA_MAP`` and ``DEVICE_SET_IRQS``, and the load keeps the memory attached there
  (checking that it matches the stream's map). The contents of the device's memory
  sources (:meth:`PciDevice.memory_sources <pcidev.device.PciDevice.memory_sources>`: a
  RAM BAR, memfd- or file-backed, an NVMe ``mem`` namespace and its metadata) travel instead of their
  descriptors: the data is then frames (MEMORY, CHUNKs, OFFER, STATE;
  :mod:`~pcidev.transport.vfio_user.migration_data`), copied iteratively with dirty
  tracking in ``PRE_COPY`` (each run of reads up to a short read is one iteration) and
  the rest in ``STOP_COPY``; the destination stages them as they arrive, with the
  checks of the TCP channel, and the load adopts them (a RAM BAR's contents go into the
  BAR its client maps, a file-backed one's into its own file). What travels only as a
  descriptor and no source covers blocks: ``EBUSY`` before anything stops.
* ``RESUMING`` to ``STOP`` loads the received data, all or nothing; a malformed frame
  fails the ``MIG_DATA_WRITE`` that completes it, a truncated or refused stream fails
  the arc, both with ``EINVAL``, and leave the state machine in ``ERROR``, which only a
  ``DEVICE_RESET`` leaves (:meth:`MigrationStateMachine.reset`).
* The device prepares its stop while it runs (:meth:`PciDevice.prepare_quiesce
  <pcidev.device.PciDevice.prepare_quiesce>`, ``flush=True``: NVMe calls ``fdatasync`` on the
  files written, so the stop's flush has little left): in a thread started when the
  device enters ``PRE_COPY`` (a VMM copies the guest's RAM meanwhile) and again at the end
  of each ``PRE_COPY`` iteration (the short ``MIG_DATA_READ``) unless one still runs; the
  arc to ``STOP_COPY`` waits for the last (at most :data:`PREPARE_WAIT` seconds) before
  it stops the device, and ``RUNNING`` to ``STOP`` prepares first, in the arc. A failed
  or late preparation refuses the arc with ``EBUSY``: the device runs on, the state is
  unchanged. ``PRE_COPY`` to ``RUNNING`` and a client that leaves wait for a preparation
  still running (at most :data:`PREPARE_WAIT`; one still running then is kept: no second
  one starts beside it, and the next stop waits for it).
* A ``DEVICE_RESET`` in ``PRE_COPY`` resets the device but keeps the state and the
  pre-copy (:meth:`MigrationStateMachine.device_reset`; libvfio-user #853: a client
  that still expects ``PRE_COPY`` would otherwise take arcs that do not exist).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

import pluggy

from pcidev.device import PciDevice
from pcidev.errors import MigrationError, PcidevError, TransportError
from pcidev.migration import collect_blockers, descriptor_blockers, load_device_stream, save_device_stream
from pcidev.migration.precopy import destination_sources
from pcidev.sriov import VirtualFunction
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.conn import ConnectionState
from pcidev.transport.vfio_user.migration_data import DataTooLarge, InboundData, OutboundData, checked_sources
from pcidev.transport.vfio_user.protocol import (
    MIG_STATE_ERROR,
    MIG_STATE_NAMES,
    MIG_STATE_PRE_COPY,
    MIG_STATE_PRE_COPY_P2P,
    MIG_STATE_RESUMING,
    MIG_STATE_RUNNING,
    MIG_STATE_RUNNING_P2P,
    MIG_STATE_STOP,
    MIG_STATE_STOP_COPY,
    VfioUserError,
)
from pcidev.vmstate.errors import VMStateError

log = logging.getLogger(__name__)

__all__ = ["MIGRATION_FLAGS", "PREPARE_WAIT", "MigrationStateMachine", "migration_blockers", "migration_path"]

#: seconds the arc from PRE_COPY to STOP_COPY waits for the device's preparation of its
#: stop started in PRE_COPY (still running then: the arc is refused with ``EBUSY``, the
#: device runs on), and PRE_COPY to RUNNING or a client that leaves waits for it to end
PREPARE_WAIT = 10.0

#: what the MIGRATION feature reports: STOP_COPY and PRE_COPY (no P2P)
MIGRATION_FLAGS = protocol.MIGRATION_STOP_COPY | protocol.MIGRATION_PRE_COPY

_ERR, _STOP, _RUN, _SC, _RES, _RP2P, _PC, _PP2P = (
    MIG_STATE_ERROR, MIG_STATE_STOP, MIG_STATE_RUNNING, MIG_STATE_STOP_COPY, MIG_STATE_RESUMING,
    MIG_STATE_RUNNING_P2P, MIG_STATE_PRE_COPY, MIG_STATE_PRE_COPY_P2P)

# The next state on the way from a state (outer key) to a requested one (inner key), for a
# device with every optional state; the same choices as Linux's vfio_mig_get_next_state()
# table (drivers/vfio/vfio_main.c), written out here. States the device does not offer
# (the P2P ones) are skipped by looking up the next step from them (migration_path).
_NEXT: dict[int, dict[int, int]] = {
    _STOP: {_STOP: _STOP, _RUN: _RP2P, _SC: _SC, _RES: _RES, _RP2P: _RP2P, _PC: _RP2P, _PP2P: _RP2P},
    _RUN: {_STOP: _RP2P, _RUN: _RUN, _SC: _RP2P, _RES: _RP2P, _RP2P: _RP2P, _PC: _PC, _PP2P: _RP2P},
    _SC: {_STOP: _STOP, _RUN: _STOP, _SC: _SC, _RES: _STOP, _RP2P: _STOP, _PC: _ERR, _PP2P: _ERR},
    _RES: {_STOP: _STOP, _RUN: _STOP, _SC: _STOP, _RES: _RES, _RP2P: _STOP, _PC: _STOP, _PP2P: _STOP},
    _RP2P: {_STOP: _STOP, _RUN: _RUN, _SC: _STOP, _RES: _STOP, _RP2P: _RP2P, _PC: _RUN, _PP2P: _PP2P},
    _PC: {_STOP: _RUN, _RUN: _RUN, _SC: _PP2P, _RES: _RUN, _RP2P: _RUN, _PC: _PC, _PP2P: _PP2P},
    _PP2P: {_STOP: _RP2P, _RUN: _RP2P, _SC: _SC, _RES: _RP2P, _RP2P: _RP2P, _PC: _PC, _PP2P: _PP2P},
}
#: states pcidev offers (no P2P)
_OFFERED = frozenset({_STOP, _RUN, _SC, _RES, _PC})


def _name(state: int) -> str:
    return MIG_STATE_NAMES.get(state, str(state))


def migration_path(current: int, target: int) -> list[int]:
    """The states passed through on the way from ``current`` to ``target``, one arc each.

    :param current: the state now.
    :param target: the requested state.
    :returns: the states after each arc (empty when ``target`` is ``current``).
    :raises VfioUserError: ``EINVAL``: no such state, a state not offered (P2P), ``ERROR``
        on either end, or an arc that does not exist (``STOP_COPY`` to ``PRE_COPY``).
    """
    if target not in _OFFERED:
        raise VfioUserError(errno.EINVAL, f"migration state {_name(target)} is not offered")
    if current not in _OFFERED:
        raise VfioUserError(errno.EINVAL, f"the device is in migration state {_name(current)} "
                                          "(only DEVICE_RESET leaves ERROR)")
    path: list[int] = []
    state = current
    while state != target:
        step = _NEXT[state][target]
        while step not in _OFFERED and step != _ERR:
            step = _NEXT[step][target]
        if step == _ERR:
            raise VfioUserError(errno.EINVAL, f"no migration arc from {_name(current)} to {_name(target)}")
        path.append(step)
        state = step
    return path


def migration_blockers(device: PciDevice, pm: pluggy.PluginManager | None = None) -> list[str]:
    """Why ``device`` cannot migrate over vfio-user now: every reason of
    :func:`~pcidev.migration.collect_blockers`, memory sources that are unusable or hold
    more than :data:`~pcidev.migration.precopy.MAX_MEMORY_SIZE` bytes, and each RAM BAR
    and enabled feature in the device's :attr:`~pcidev.device.PciDevice.FD_FEATURES` that
    no memory source covers (:func:`~pcidev.migration.blockers.descriptor_blockers`: the
    migration data carries no file descriptors, only the contents of the sources, such
    as a RAM BAR, memfd- or file-backed, an NVMe ``mem`` namespace and its metadata).

    :param device: the device.
    :param pm: the plugin manager (its plugins' blockers).
    :returns: the reasons (empty: it may migrate).
    """
    reasons = collect_blockers(device, pm)
    try:
        sources = checked_sources(device)
    except MigrationError as exc:
        return [*reasons, str(exc)]
    return [*reasons, *descriptor_blockers(device, "vfio-user migration data", sources)]


class MigrationStateMachine:
    """The migration states of one served device (see the module docstring).

    :param device: the served device.
    :param conn: the connection state holding :attr:`~pcidev.transport.vfio_user.conn.ConnectionState.mig_state`.
    :param pm: the plugin manager (its migration blockers).
    :param settle: called after the device is quiesced by an arc (the dirty-page log
        settles: the writes through views the device took are done).
    :param loaded: called after a successful load (the server re-mirrors the MSI-X mask
        bits of the vectors that have an eventfd on this connection).
    :param arc: called with ``(from, to)`` after each arc applied (the server remembers a
        device that migrated out).
    """

    def __init__(self, device: PciDevice, conn: ConnectionState, *, pm: pluggy.PluginManager | None = None,
                 settle: Callable[[], None] | None = None, loaded: Callable[[], None] | None = None,
                 arc: Callable[[int, int], None] | None = None) -> None:
        self.device = device
        self.conn = conn
        self.pm = pm
        self._settle = settle
        self._loaded = loaded
        self._arc = arc
        #: the data being read (PRE_COPY, STOP_COPY): a bare stream, or memory sources' frames
        self._out: OutboundData | None = None
        self._bare = b""
        self._cursor = 0
        #: the data being written (RESUMING)
        self._in: InboundData | None = None
        #: the device's preparation of its stop, started in PRE_COPY (its start, the end of
        #: each iteration), and what it raised
        self._prepare: threading.Thread | None = None
        self._prepare_error: Exception | None = None

    @property
    def state(self) -> int:
        """The current state (``protocol.MIG_STATE_*``)."""
        return self.conn.mig_state

    @property
    def pending_bytes(self) -> int:
        """Bytes framed and not read yet (PRE_COPY, STOP_COPY), or held in memory while
        received (RESUMING: a partial frame or the bare stream so far)."""
        if self._in is not None:
            return self._in.pending_bytes
        if self._out is not None:
            return self._out.pending_bytes
        return len(self._bare) - self._cursor

    @property
    def precopy_iterations(self) -> list[int]:
        """Bytes of memory contents sent in each PRE_COPY iteration read to its end so far
        (empty: none, or the device has no memory sources)."""
        return list(self._out.iterations) if self._out is not None else []

    def _drop(self) -> None:
        """Forget the data (read or written) and release what it held."""
        if self._out is not None:
            self._out.close()
            self._out = None
        if self._in is not None:
            self._in.close()
            self._in = None
        self._bare, self._cursor = b"", 0

    def reset(self) -> None:
        """Back to RUNNING with no data (the client left, or a DEVICE_RESET outside
        PRE_COPY). The caller resets or resumes the device."""
        self._join_prepare()
        self._drop()
        self.conn.mig_state = _RUN

    def device_reset(self) -> None:
        """A ``DEVICE_RESET``: outside PRE_COPY as :meth:`reset`; in PRE_COPY the state and
        the pre-copy stay (a client in the middle of a migration still expects PRE_COPY,
        and the memory contents already sent stay right: the tracking records what the
        reset writes; the device's state is saved at STOP_COPY, after the reset). The
        caller resets the device."""
        if self.state == _PC:
            log.debug("vfio-user migration: DEVICE_RESET in PRE_COPY; the pre-copy goes on")
            return
        self.reset()

    # -- arcs -------------------------------------------------------------------------
    def set_state(self, target: int) -> int:
        """Go to ``target`` arc by arc, each applied fully.

        :param target: the requested state.
        :returns: the new state.
        :raises VfioUserError: ``EINVAL`` for a refused arc (state unchanged) or a refused
            stream (state ERROR); ``EBUSY`` when the device cannot migrate now (state
            unchanged) or does not stop (the state reached so far).
        """
        path = migration_path(self.state, target)
        if _RES in path and isinstance(self.device, VirtualFunction) and self.device.standalone:
            # (a VF's state loads only inside its PF's, checked against the PF's records)
            raise VfioUserError(errno.EBUSY, f"VF {self.device.vf_index} migrates only with its PF: "
                                "its socket takes no migration data")
        if any(s in (_PC, _SC) for s in path) and self.state not in (_PC, _SC):
            reasons = migration_blockers(self.device, self.pm)
            if reasons:
                raise VfioUserError(errno.EBUSY, "the device cannot migrate: " + "; ".join(reasons))
        for step in path:
            cur = self.state
            self._step(cur, step)
            log.debug("vfio-user migration: %s -> %s", _name(cur), _name(step))
            self.conn.mig_state = step
            if self._arc is not None:
                self._arc(cur, step)
        return self.state

    # -- the preparation of the stop ----------------------------------------------------
    def _prepare_in_background(self) -> None:
        """PRE_COPY began, or one of its iterations ended: let the device prepare its stop
        while it runs (unless a preparation still runs: it covers what was written before
        it began, and the next iteration's end starts another)."""
        if self._prepare is not None and self._prepare.is_alive():
            return
        self._prepare_error = None
        self._prepare = threading.Thread(target=self._run_prepare, name="pcidev-vfio-user-prepare", daemon=True)
        self._prepare.start()

    def _run_prepare(self) -> None:
        try:
            self.device.prepare_quiesce(flush=True)
        except Exception as exc:  # (a device's bug too: the arc that waits reports it)
            self._prepare_error = exc

    def _join_prepare(self) -> None:
        """Forget the preparation (the migration ended here), once it has ended: nothing of
        it runs on under a reset, a handover or the device's close (at most
        :data:`PREPARE_WAIT` seconds; what it raised does not matter any more). One still
        running after that is kept: :meth:`_prepare_in_background` starts no other beside
        it, and the next stop waits for it again."""
        thread, self._prepare = self._prepare, None
        if thread is not None:
            thread.join(PREPARE_WAIT)
            if thread.is_alive():  # still running: kept, so that no second one starts beside it
                self._prepare = thread
                log.warning("vfio-user: the device's preparation of its stop still runs after %s s", PREPARE_WAIT)
        self._prepare_error = None

    def _prepared(self) -> None:
        """Before a stop: wait for the last preparation started in PRE_COPY, or prepare now
        (the device runs until this returns).

        :raises VfioUserError: ``EBUSY``: the preparation failed or is still running.
        """
        thread, self._prepare = self._prepare, None
        if thread is None:
            self._run_prepare()
        else:
            thread.join(PREPARE_WAIT)
            if thread.is_alive():
                self._prepare = thread  # (waited for again by the next stop, or a reset)
                raise VfioUserError(errno.EBUSY, f"the device's preparation of its stop did not finish within "
                                                 f"{PREPARE_WAIT} s; the device runs")
        error, self._prepare_error = self._prepare_error, None
        if error is not None:
            raise VfioUserError(errno.EBUSY, f"the device cannot prepare its stop ({type(error).__name__}: "
                                             f"{error}); the device runs") from error

    def _quiesce(self) -> None:
        self._prepared()
        try:
            self.device.quiesce(flush=True)  # (as QEMU flushes its block devices at a VM stop)
        except MigrationError as exc:
            raise VfioUserError(errno.EBUSY, f"the device does not stop: {exc}") from exc
        if self._settle is not None:
            self._settle()

    def _start_precopy(self) -> None:
        """RUNNING -> PRE_COPY: track the memory sources (none: nothing before the stop)."""
        self._drop()
        try:
            sources = checked_sources(self.device)
            if sources:
                out = OutboundData(self.device, sources)
                out.start()
                self._out = out
        except MigrationError as exc:
            raise VfioUserError(errno.EBUSY, f"the device cannot migrate: {exc}") from exc

    def _save(self) -> None:
        """Save the state for STOP_COPY. A failure from PRE_COPY keeps the pre-copy as it was
        (the client may go on reading it and try again); from STOP it drops the data."""
        try:
            stream, fds = save_device_stream(self.device)  # the descriptors stay here (see the module)
            if self._out is None:
                sources = checked_sources(self.device)
                if sources:
                    out = OutboundData(self.device, sources)
                    out.start()
                    self._out = out
            if self._out is not None:  # the sources' contents instead of their descriptors
                self._out.stop_copy(stream, fds)
            else:
                self._bare, self._cursor = stream, 0
        except (PcidevError, VMStateError, OSError) as exc:
            if self.state != _PC:
                self._drop()
            raise VfioUserError(errno.EBUSY, f"the device state cannot be saved: {exc}") from exc

    def _step(self, cur: int, nxt: int) -> None:
        if cur == _RUN and nxt == _STOP:
            self._quiesce()
        elif cur == _STOP and nxt == _RUN:
            self.device.resume()
        elif cur == _RUN and nxt == _PC:
            self._start_precopy()
            self._prepare_in_background()
        elif cur == _PC and nxt == _RUN:
            self._join_prepare()
            self._drop()
        elif cur == _PC and nxt == _SC:
            self._quiesce()
            try:
                self._save()
            except VfioUserError:
                self.device.resume()  # still PRE_COPY: running (the pre-copy is dropped)
                raise
        elif cur == _STOP and nxt == _SC:
            self._save()
        elif cur == _SC and nxt == _STOP:
            self._drop()
        elif cur == _STOP and nxt == _RES:
            self.device.quiesce()  # it is (STOP); a device never run here too
            self._drop()
            self._in = InboundData(lambda: self._destination_sources())
        elif cur == _RES and nxt == _STOP:
            self._load()
        else:  # pragma: no cover - migration_path only yields the arcs above
            raise VfioUserError(errno.EINVAL, f"no migration arc {_name(cur)} -> {_name(nxt)}")

    def _destination_sources(self) -> dict[str, int]:
        return destination_sources(self.device)

    def _load(self) -> None:
        """RESUMING -> STOP: load what was received, all or nothing."""
        inbound, self._in = self._in, None
        try:
            if inbound is None:  # pragma: no cover - RESUMING always has one
                raise TransportError("no migration data")
            stream, fds = inbound.finish()
            load_device_stream(self.device, stream, fds)
        except (VMStateError, PcidevError) as exc:
            self.conn.mig_state = _ERR
            raise VfioUserError(errno.EINVAL, f"the migration data was refused: {exc}") from exc
        finally:
            if inbound is not None:
                inbound.close()
        if self._loaded is not None:
            self._loaded()

    # -- data ---------------------------------------------------------------------------
    def read(self, size: int) -> bytes:
        """MIG_DATA_READ: up to ``size`` bytes (fewer: the end of a PRE_COPY iteration, or
        of the data in STOP_COPY; see :mod:`~pcidev.transport.vfio_user.migration_data`).

        :raises VfioUserError: ``EINVAL`` outside PRE_COPY and STOP_COPY; ``EIO`` when a
            memory source cannot be read (the client fails the migration).
        """
        if self.state not in (_PC, _SC):
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_READ in migration state {_name(self.state)}")
        if self._out is not None:
            try:
                data = self._out.read(size)
            except (PcidevError, OSError) as exc:
                raise VfioUserError(errno.EIO, f"MIG_DATA_READ: {exc}") from exc
        else:
            data = self._bare[self._cursor:self._cursor + size]
            self._cursor += len(data)
        if len(data) < size and self.state == _PC:
            self._prepare_in_background()
        return data

    def write(self, data: bytes) -> None:
        """MIG_DATA_WRITE: the next bytes of the data being received.

        :raises VfioUserError: ``EINVAL`` outside RESUMING, or for a malformed frame (the
            state is then ERROR: only a DEVICE_RESET leaves it); ``EFBIG`` for a bare
            stream beyond the largest one (ERROR too).
        """
        if self.state != _RES or self._in is None:
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_WRITE in migration state {_name(self.state)}")
        try:
            self._in.write(data)
        except TransportError as exc:
            self._in = None  # (it released what it held)
            self.conn.mig_state = _ERR
            code = errno.EFBIG if isinstance(exc, DataTooLarge) else errno.EINVAL
            raise VfioUserError(code, f"the migration data was refused: {exc}") from exc
