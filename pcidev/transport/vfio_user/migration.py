"""The vfio-user migration state machine of a served device, and its data buffer.

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
  (checking that it matches the stream's map). A memfd-backed RAM BAR travels as its
  contents: the data is then the frames of :func:`~pcidev.migration.precopy.pack_memory`
  (MEMORY, CHUNKs, OFFER, STATE; all copied in STOP_COPY, when the client's vCPUs no
  longer write the BAR through its mapping), and the destination copies the contents
  into the BAR its client maps. Other state that travels only as a descriptor (an NVMe
  ``mem`` namespace: :attr:`PciDevice.FD_FEATURES <pcidev.device.PciDevice.FD_FEATURES>`,
  a file-backed RAM BAR) blocks: ``EBUSY`` before anything stops.
* ``RESUMING`` to ``STOP`` loads the received stream, all or nothing; a stream the
  device refuses fails the arc with ``EINVAL`` and leaves the state machine in
  ``ERROR``, which only a ``DEVICE_RESET`` leaves (:meth:`MigrationStateMachine.reset`).
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import pluggy

from pcidev.device import PciDevice
from pcidev.errors import MigrationError, PcidevError
from pcidev.memory_source import MemorySource
from pcidev.migration import (
    MAX_STREAM_SIZE,
    collect_blockers,
    descriptor_blockers,
    load_device_stream,
    save_device_stream,
)
from pcidev.migration.frames import MAGIC
from pcidev.migration.precopy import destination_sources, pack_memory, unpack_memory
from pcidev.sriov import VirtualFunction
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.conn import ConnectionState
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

__all__ = ["MIGRATION_FLAGS", "MAX_RAM_BAR_DATA", "MigrationStateMachine", "migration_blockers", "migration_path",
           "ram_bar_sources"]

#: the most bytes of RAM BAR contents the migration data carries (beside the stream)
MAX_RAM_BAR_DATA = 256 << 20
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
    :func:`~pcidev.migration.collect_blockers`, and each enabled feature in the
    device's :attr:`~pcidev.device.PciDevice.FD_FEATURES` and each file-backed RAM BAR
    (:func:`~pcidev.migration.blockers.descriptor_blockers`: the migration data carries
    no file descriptors; a memfd RAM BAR's contents go with it, at most
    :data:`MAX_RAM_BAR_DATA` bytes in all).

    :param device: the device.
    :param pm: the plugin manager (its plugins' blockers).
    :returns: the reasons (empty: it may migrate).
    """
    reasons = collect_blockers(device, pm)
    try:
        sources = ram_bar_sources(device)
    except Exception as exc:
        return [*reasons, f"memory_sources() failed: {type(exc).__name__}: {exc}"]
    total = sum(s.size for s in sources)
    if total > MAX_RAM_BAR_DATA:
        reasons.append(f"its RAM BARs hold {total} bytes; vfio-user migration data carries at most "
                       f"{MAX_RAM_BAR_DATA}")
    return [*reasons, *descriptor_blockers(device, "vfio-user migration data", sources)]


def ram_bar_sources(device: PciDevice) -> list[MemorySource]:
    """The device's memory sources that are its memfd RAM BARs (their contents go into the
    migration data; see the module docstring).

    :param device: the device.
    :returns: the sources, in the device's order.
    """
    bars = {getattr(bar.handler, "identity", None) for bar in device.ram_bars()}  # (RamBacking.identity)
    out = []
    for src in device.memory_sources():
        try:
            st = os.fstat(src.fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in bars:
            out.append(src)
    return out


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
        #: the stream being read (PRE_COPY: empty; STOP_COPY: the saved state) or written (RESUMING)
        self._buffer = bytearray()
        self._cursor = 0

    @property
    def state(self) -> int:
        """The current state (``protocol.MIG_STATE_*``)."""
        return self.conn.mig_state

    @property
    def pending_bytes(self) -> int:
        """Bytes of the saved state not read yet (STOP_COPY), or received so far (RESUMING)."""
        if self.state == _RES:
            return len(self._buffer)
        return len(self._buffer) - self._cursor

    def reset(self) -> None:
        """Back to RUNNING with no buffer (DEVICE_RESET, or the client left). The caller
        resets or resumes the device."""
        self._buffer = bytearray()
        self._cursor = 0
        self.conn.mig_state = _RUN

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

    def _quiesce(self) -> None:
        try:
            self.device.quiesce(flush=True)  # (as QEMU flushes its block devices at a VM stop)
        except MigrationError as exc:
            raise VfioUserError(errno.EBUSY, f"the device does not stop: {exc}") from exc
        if self._settle is not None:
            self._settle()

    def _save(self) -> None:
        try:
            stream, fds = save_device_stream(self.device)  # the descriptors stay here (see the module)
            sources = ram_bar_sources(self.device)
            if sources:  # their contents instead
                stream = pack_memory(self.device.vmstate_device_type, sources, stream, fds)
        except (PcidevError, VMStateError, OSError) as exc:
            raise VfioUserError(errno.EBUSY, f"the device state cannot be saved: {exc}") from exc
        self._buffer = bytearray(stream)
        self._cursor = 0

    def _step(self, cur: int, nxt: int) -> None:
        if cur == _RUN and nxt == _STOP:
            self._quiesce()
        elif cur == _STOP and nxt == _RUN:
            self.device.resume()
        elif cur == _RUN and nxt == _PC:
            self._buffer, self._cursor = bytearray(), 0  # nothing to send before the stop
        elif cur == _PC and nxt == _RUN:
            self._buffer, self._cursor = bytearray(), 0
        elif cur == _PC and nxt == _SC:
            self._quiesce()
            try:
                self._save()
            except VfioUserError:
                self.device.resume()  # still PRE_COPY: running
                raise
        elif cur == _STOP and nxt == _SC:
            self._save()
        elif cur == _SC and nxt == _STOP:
            self._buffer, self._cursor = bytearray(), 0
        elif cur == _STOP and nxt == _RES:
            self.device.quiesce()  # it is (STOP); a device never run here too
            self._buffer, self._cursor = bytearray(), 0
        elif cur == _RES and nxt == _STOP:
            # the loader takes bytes: one copy, then the buffer is freed before the load
            data = bytes(self._buffer)
            self._buffer, self._cursor = bytearray(), 0
            try:
                if data.startswith(MAGIC):  # RAM BAR contents beside the stream
                    stream, fds, staged = unpack_memory(data, max_memory=MAX_RAM_BAR_DATA,
                                                        expected=destination_sources(self.device))
                    try:
                        load_device_stream(self.device, stream, fds)
                    finally:
                        staged.close()
                else:
                    load_device_stream(self.device, data, None)
            except (VMStateError, PcidevError) as exc:
                self.conn.mig_state = _ERR
                raise VfioUserError(errno.EINVAL, f"the migration data was refused: {exc}") from exc
            if self._loaded is not None:
                self._loaded()
        else:  # pragma: no cover - migration_path only yields the arcs above
            raise VfioUserError(errno.EINVAL, f"no migration arc {_name(cur)} -> {_name(nxt)}")

    # -- data ---------------------------------------------------------------------------
    def read(self, size: int) -> bytes:
        """MIG_DATA_READ: up to ``size`` bytes of the state (fewer: the end).

        :raises VfioUserError: ``EINVAL`` outside PRE_COPY and STOP_COPY.
        """
        if self.state not in (_PC, _SC):
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_READ in migration state {_name(self.state)}")
        chunk = bytes(self._buffer[self._cursor:self._cursor + size])
        self._cursor += len(chunk)
        return chunk

    def write(self, data: bytes) -> None:
        """MIG_DATA_WRITE: append ``data`` to the state being received.

        :raises VfioUserError: ``EINVAL`` outside RESUMING; ``EFBIG`` beyond the largest stream.
        """
        if self.state != _RES:
            raise VfioUserError(errno.EINVAL, f"MIG_DATA_WRITE in migration state {_name(self.state)}")
        if len(self._buffer) + len(data) > MAX_STREAM_SIZE + MAX_RAM_BAR_DATA:
            raise VfioUserError(errno.EFBIG, f"migration data beyond {MAX_STREAM_SIZE + MAX_RAM_BAR_DATA} bytes")
        self._buffer += data
