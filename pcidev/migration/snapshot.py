"""Saving and loading one device: the framework section, the migratable registers'
section (:mod:`pcidev.migration.registers`), the layer's section (a device class built
on a layer such as a virtio-pci transport, see
:attr:`~pcidev.device.PciDevice.LAYER_VMSTATE`) and the device's section.

A saved device is a :class:`VMStateSnapshot` (in this process) or its encoding as
a vmstate stream (docs/vmstate-format.md). The device type contributes its state
through the author hooks of :class:`~pcidev.device.PciDevice`
(``get/check/set_device_state``, ``device_fingerprint``, ``vmstate_fd``...); this
module drives them::

    dev.quiesce()
    stream, fds = save_device_stream(dev)        # fds travel out of band
    ...
    res = load_device_stream(other, stream, fds)  # all or nothing
    other.resume()
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import attrs

from pcidev.device import PciDevice
from pcidev.dma import GuestMemory
from pcidev.errors import ConfigError, DeviceFailedError, MigrationBlockedError, VMStateError
from pcidev.memory_source import ContentDescriptors
from pcidev.migration.function_state import (
    FUNCTION_SECTION,
    FunctionState,
    LoadedResources,
    all_descriptors,
    apply_function_state,
    build_resources,
    check_function_state,
    commit_function_state,
    framework_fingerprint,
    save_function_state,
    undo_function_state,
)
from pcidev.migration.registers import (
    REGISTERS_SECTION,
    RegistersState,
    apply_registers,
    check_registers,
    migratable_maps,
    save_registers,
)
from pcidev.migration.virtual_functions import (
    SRIOV_SECTION,
    SriovState,
    check_vfs,
    has_virtual_functions,
    load_vfs,
    save_vfs,
)
from pcidev.vmstate import Section, check_state, description_of, fingerprint_differences, load, save
from pcidev.vmstate.codec import codec_for
from pcidev.vmstate.errors import ConfigMismatchError, StateError
from pcidev.vmstate.gcpause import gc_paused

__all__ = [
    "VMStateSnapshot",
    "vmstate_fingerprint",
    "vmstate_descriptions",
    "prepare_vmstate",
    "save_device",
    "save_device_stream",
    "load_device",
    "load_device_stream",
    "load_own_snapshot",
]


@attrs.frozen
class VMStateSnapshot:
    """A saved device: what :func:`save_device` returns.

    :ivar device_type: the stream's device type.
    :ivar fingerprint: the configuration fingerprint.
    :ivar sections: the framework section, then the ``pcidev/registers`` section if the
        device has migratable registers (:mod:`pcidev.migration.registers`), the layer's
        section if its class has a ``LAYER_VMSTATE``, and the device's section if it has
        a ``VMSTATE``.
    :ivar fds: the file descriptors the :class:`~pcidev.vmstate.FdRef` fields index
        (guest-memory regions, eventfds). They are *borrowed*: they belong to the
        device's memory and interrupt sink and stay valid while those do.
    """

    device_type: str
    fingerprint: dict[str, Any]
    sections: tuple[Section, ...]
    fds: tuple[int, ...] = ()

    def to_bytes(self) -> bytes:
        """Encode as a vmstate stream (docs/vmstate-format.md); fds travel apart.

        :returns: the stream.
        :raises StateError: a state object does not fit its description.
        """
        return save(self.device_type, self.fingerprint, self.sections)


@attrs.frozen
class _Part:
    """One section after the framework's and who owns it: ``get`` builds the state from
    the live device (a save, and the copy a failed load puts back), ``check`` refuses a
    loaded state before anything is applied, ``put`` applies a checked state."""

    name: str
    cls: type
    hook: str  # the author hook behind ``get``, for error messages
    get: Callable[[], Any]
    check: Callable[[Any], None]
    put: Callable[[Any], object]


def _parts(dev: PciDevice) -> list[_Part]:
    """The sections after the framework's, in stream order: migratable registers (owned
    by the register maps), the layer's (``LAYER_VMSTATE``), the device type's (``VMSTATE``)."""
    parts = []
    if migratable_maps(dev):
        parts.append(_Part(REGISTERS_SECTION, RegistersState, "save_registers", partial(save_registers, dev),
                           partial(check_registers, dev), partial(apply_registers, dev)))
    if dev.LAYER_VMSTATE is not None:
        parts.append(_Part(description_of(dev.LAYER_VMSTATE).name, dev.LAYER_VMSTATE, "get_layer_state",
                           dev.get_layer_state, dev.check_layer_state, dev.set_layer_state))
    if dev.VMSTATE is not None:
        parts.append(_Part(description_of(dev.VMSTATE).name, dev.VMSTATE, "get_device_state",
                           dev.get_device_state, dev.check_device_state, dev.set_device_state))
    if has_virtual_functions(dev):  # a PF's VFs, last: they are built on the PF's loaded state
        parts.append(_Part(SRIOV_SECTION, SriovState, "save_vfs", partial(save_vfs, dev, save_device_stream),
                           partial(check_vfs, dev), partial(load_vfs, dev, load_stream=load_device_stream)))
    return parts


def _no_vmstate(dev: PciDevice) -> MigrationBlockedError:
    return MigrationBlockedError([f"device type {dev.vmstate_device_type} has no vmstate description"])


def _migrates_nothing(dev: PciDevice) -> bool:
    """No ``VMSTATE``, no layer state and no migratable register: the type cannot migrate."""
    return dev.VMSTATE is None and dev.LAYER_VMSTATE is None and not migratable_maps(dev)


def _expected_sections(dev: PciDevice) -> dict[tuple[str, int], type]:
    """The sections of ``dev``'s streams, in stream order, and their state classes."""
    want: dict[tuple[str, int], type] = {(FUNCTION_SECTION, 0): FunctionState}
    for part in _parts(dev):
        want[(part.name, 0)] = part.cls
    return want


def vmstate_fingerprint(dev: PciDevice) -> dict[str, Any]:
    """The configuration fingerprint of ``dev``'s vmstate streams: the framework's
    items (``pci.*``), the layer's ``layer_fingerprint()`` and the device's
    ``device_fingerprint()``.

    :param dev: the device (realized here if it is not yet).
    :returns: the items.
    :raises ConfigError: the device's items use the reserved ``pci.`` prefix, or the
        device type's keys clash with its layer's.
    """
    dev.realize()
    fp = framework_fingerprint(dev)
    layer = dict(dev.layer_fingerprint())
    own = dict(dev.device_fingerprint())
    bad = sorted(k for k in (*layer, *own) if not isinstance(k, str) or k.startswith("pci."))
    if bad:
        raise ConfigError(f"fingerprint keys {bad} are reserved for the framework (pci.*)")
    clash = sorted(set(layer) & set(own))
    if clash:
        raise ConfigError(f"device_fingerprint() keys {clash} are the layer's (layer_fingerprint())")
    fp.update(layer)
    fp.update(own)
    return fp


def vmstate_descriptions(dev: PciDevice) -> list[type]:
    """The state classes of ``dev``'s streams, in stream order: the framework's, the
    registers section's if it has migratable registers, its ``LAYER_VMSTATE`` if any,
    then its ``VMSTATE``.

    :param dev: the device.
    :returns: the classes.
    """
    return list(_expected_sections(dev).values())


def prepare_vmstate(dev: PciDevice) -> None:
    """Generate the vmstate encoders and decoders of ``dev``'s descriptions now
    (they are otherwise generated on first use, which would then count in a
    migration's downtime). Transports call it when they start serving.

    :param dev: the device.
    """
    for cls in vmstate_descriptions(dev):
        codec_for(cls)


def save_device(dev: PciDevice) -> VMStateSnapshot:
    """Save ``dev``: the framework section, then the registers', the layer's and the
    device's sections that it has (see :class:`VMStateSnapshot`).

    Call it while quiesced. Nothing is changed.

    :param dev: the device.
    :returns: a snapshot whose ``fds`` (guest-memory regions, interrupt eventfds)
        are borrowed.
    :raises MigrationBlockedError: the type has no ``VMSTATE``, no ``LAYER_VMSTATE``
        and no migratable registers.
    :raises StateError: the device built a state that does not fit its description.
    """
    if _migrates_nothing(dev):
        raise _no_vmstate(dev)
    dev.realize()
    with gc_paused(), dev.lock:
        fstate, fds = save_function_state(dev, dev.memory)
        sections = [Section(FUNCTION_SECTION, 0, fstate)]
        dev.vmstate_save_fds = fds  # the device's own descriptors follow (vmstate_fd)
        try:
            for part in _parts(dev):
                state = part.get()
                if type(state) is not part.cls:
                    raise StateError(f"{part.hook}() returned {type(state).__name__}, expected {part.cls.__name__}",
                                     section=part.name, instance_id=0)
                sections.append(Section(part.name, 0, state))
        finally:
            dev.vmstate_save_fds = None
    return VMStateSnapshot(dev.vmstate_device_type, vmstate_fingerprint(dev), tuple(sections), tuple(fds))


def save_device_stream(dev: PciDevice) -> tuple[bytes, list[int]]:
    """:func:`save_device` encoded as a stream (docs/vmstate-format.md).

    :param dev: the device (quiesced).
    :returns: ``(stream, fds)``; the fds (borrowed) travel out of band.
    """
    with gc_paused():  # no cyclic-GC pass in the downtime (see pcidev.vmstate.gcpause)
        snap = save_device(dev)
        return snap.to_bytes(), list(snap.fds)


def load_device_stream(dev: PciDevice, data: bytes, fds: Sequence[int | None] | None = None) -> LoadedResources:
    """Load a stream saved by a device of the same type and configuration.

    All or nothing: the stream is decoded and checked completely (envelope,
    checksum, device type, fingerprint, every field, the framework state
    against this device, the registers, ``check_layer_state``,
    ``check_device_state``), guest memory is mapped, and only then is anything
    applied; if applying fails, the device is put back as it was. A failed load
    raises and leaves the device untouched.

    Call it while quiesced (or before the device ever ran).

    :param dev: the destination device.
    :param data: the stream.
    :param fds: the descriptors that arrived with it (``SCM_RIGHTS``), indexed by
        its FdRefs; the caller keeps ownership (the load duplicates what it
        keeps). ``None`` when the transport carries no descriptors (TCP): the
        device then keeps the guest memory and interrupt sink it has; if that
        memory has regions they must be the stream's (same addresses, sizes,
        access), and if it has none the host must map the stream's regions and
        install the eventfds before the device resumes. Over TCP with memory contents
        (:mod:`pcidev.migration.precopy`): a list whose streamed indexes are staging
        memfds and every other index None (guest memory and eventfds as without fds).
    :returns: the guest memory and interrupt sink created from ``fds`` (the
        device is attached to them; the caller owns them).
    :raises VMStateError: any problem, naming the section and field (the
        subclasses of :mod:`pcidev.vmstate.errors`).
    """
    if _migrates_nothing(dev):
        raise _no_vmstate(dev)
    expected = list(_expected_sections(dev))
    with gc_paused():  # no cyclic-GC pass in the downtime (see pcidev.vmstate.gcpause)
        sections = load(data, device_type=dev.vmstate_device_type, fingerprint=vmstate_fingerprint(dev),
                        descriptions=vmstate_descriptions(dev), expected=expected)
        return _apply_sections(dev, sections, fds)


def load_device(dev: PciDevice, snapshot: VMStateSnapshot, fds: Sequence[int | None] | None = None) -> LoadedResources:
    """Load a snapshot from :func:`save_device` (same process), with the same
    checks and all-or-nothing guarantee as :func:`load_device_stream`.

    :param dev: the destination device.
    :param snapshot: the saved state.
    :param fds: descriptors for its FdRefs; default: ``snapshot.fds``.
    :returns: see :func:`load_device_stream`.
    :raises VMStateError: see :func:`load_device_stream`.
    """
    if _migrates_nothing(dev):
        raise _no_vmstate(dev)
    if snapshot.device_type != dev.vmstate_device_type:
        raise ConfigMismatchError(f"stream is for device type {snapshot.device_type!r}, "
                                  f"this device is {dev.vmstate_device_type!r}")
    diffs = fingerprint_differences(_plain(snapshot.fingerprint), vmstate_fingerprint(dev))
    if diffs:
        raise ConfigMismatchError("device configuration differs from the stream's: " + "; ".join(diffs),
                                  differences=diffs)
    want = _expected_sections(dev)
    got = {(s.name, s.instance_id): s for s in snapshot.sections}
    if set(got) != set(want) or len(got) != len(snapshot.sections):
        raise StateError(f"expected sections {sorted(want)}, got {[s[:2] for s in snapshot.sections]}")
    for key, cls in want.items():
        if type(got[key].state) is not cls:
            raise StateError(f"expected a {cls.__name__}", section=key[0], instance_id=key[1])
        check_state(got[key].state, section=key[0], instance_id=key[1])  # as a stream's decoder does
    with gc_paused():
        return _apply_sections(dev, list(snapshot.sections), snapshot.fds if fds is None else fds)


def load_own_snapshot(dev: PciDevice, snapshot: VMStateSnapshot, fds: Sequence[int | None]) -> LoadedResources:
    """Put back a snapshot that :func:`save_device` made of this very device, in this
    process, and that nobody changed since (a fuzz target's saved world,
    :class:`~pcidev.testing.fuzz.restore.MachineTemplate`): the trusted path of
    :func:`load_device`, for the caller that made the snapshot itself.

    **Never give it a snapshot from anywhere else** (another process, another device, a
    stream from a peer): it trusts what the save already guarantees and does not check it
    again (the configuration fingerprint, each state's declared constraints), and the
    device's state is not saved first for a rollback. It does check what costs nothing:
    the device type and the set of sections (a snapshot of another kind of device is a
    :class:`~pcidev.errors.ConfigMismatchError` or a
    :class:`~pcidev.vmstate.errors.StateError`, not a crash). The checks of the function
    and of the device's own parts still run before anything is applied (a device whose
    guest deleted a configured namespace refuses it there, unchanged); a failure while
    applying leaves the device failed and raises
    :class:`~pcidev.errors.DeviceFailedError`, a different type from a refusal.

    :param dev: the device the snapshot was saved from.
    :param snapshot: its snapshot.
    :param fds: descriptors for its FdRefs.
    :returns: see :func:`load_device_stream`.
    :raises VMStateError: the device refused the state (another device type, other
        sections, a part's check); nothing was applied.
    :raises DeviceFailedError: applying it failed; the device is failed (close it).
    """
    if snapshot.device_type != dev.vmstate_device_type:
        raise ConfigMismatchError(f"the snapshot is of device type {snapshot.device_type!r}, "
                                  f"this device is {dev.vmstate_device_type!r}")
    want = [FUNCTION_SECTION, *(part.name for part in _parts(dev))]
    if [s.name for s in snapshot.sections] != want or any(s.instance_id != 0 for s in snapshot.sections):
        raise StateError(f"the snapshot's sections {[s.name for s in snapshot.sections]} are not this device's "
                         f"{want}")
    by_name = {s.name: s.state for s in snapshot.sections}
    fstate = by_name.pop(FUNCTION_SECTION)
    dev.realize()
    with gc_paused(), dev.lock:
        dev.vmstate_load_fds = list(fds)
        try:
            parts = [(part, by_name[part.name]) for part in _parts(dev)]
            _check_sections(dev, fstate, parts, fds, dev.memory)
            carried = all_descriptors(fds)
            res = build_resources(fstate, carried) if carried is not None else LoadedResources()
            old = None
            try:
                old = apply_function_state(dev, fstate, res, dev.memory, partial(setattr, dev, "memory"), fds)
                for part, state in parts:
                    part.put(state)
            except Exception as exc:
                res.close()
                if old is not None:  # the mappings the applied state replaced go with the failed device
                    commit_function_state(old)
                dev.fail(exc, "a trusted load of the device's own snapshot")
                raise DeviceFailedError(f"applying the device's own snapshot failed: {type(exc).__name__}: "
                                        f"{exc}") from exc
            commit_function_state(old)
            return res
        finally:
            dev.vmstate_load_fds = None


def _check_sections(dev: PciDevice, fstate: FunctionState, parts: list[tuple[_Part, Any]],
                    fds: Sequence[int | None] | None, memory: GuestMemory | None) -> None:
    """The checks every load runs before anything is applied: the function's state, then each
    part's own (an exception of a part's check other than a VMStateError is its refusal)."""
    check_function_state(dev, fstate, fds, memory)
    for part, state in parts:
        try:
            part.check(state)
        except VMStateError:
            raise
        except Exception as exc:
            raise StateError(f"the device refused the state: {type(exc).__name__}: {exc}",
                             section=part.name, instance_id=0) from exc


def _apply_sections(dev: PciDevice, sections: list[Section], fds: Sequence[int | None] | None) -> LoadedResources:
    by_name = {s.name: s.state for s in sections}
    fstate = by_name.pop(FUNCTION_SECTION)
    dev.realize()
    with dev.lock:
        # vmstate_load_fd(); memory contents stay marked as such (never a full descriptor list)
        dev.vmstate_load_fds = (None if fds is None else ContentDescriptors(list(fds), fds.names, fds.allocated)
                                if isinstance(fds, ContentDescriptors) else list(fds))
        try:
            parts = [(part, by_name[part.name]) for part in _parts(dev)]
            return _apply_sections_locked(dev, fstate, parts, fds)
        finally:
            dev.vmstate_load_fds = None


def _apply_sections_locked(dev: PciDevice, fstate: FunctionState, parts: list[tuple[_Part, Any]],
                           fds: Sequence[int | None] | None) -> LoadedResources:
    memory = dev.memory
    _check_sections(dev, fstate, parts, fds, memory)
    carried = all_descriptors(fds)
    res = build_resources(fstate, carried) if carried is not None else LoadedResources()
    try:
        before = [part.get() for part, _ in parts]
    except Exception:
        res.close()
        raise
    try:
        old = apply_function_state(dev, fstate, res, memory, partial(setattr, dev, "memory"), fds)
    except BaseException:
        res.close()
        raise
    done = 0
    try:
        for part, state in parts:
            part.put(state)
            done += 1
    except Exception as exc:
        undo_function_state(dev, old, partial(setattr, dev, "memory"))
        for (part, _), state in reversed(list(zip(parts, before, strict=True))[:done + 1]):
            try:
                part.put(state)
            except Exception as again:
                dev.fail(again, "rollback of a failed vmstate load")
        res.close()
        if isinstance(exc, VMStateError):
            raise
        raise StateError(f"applying the state failed: {type(exc).__name__}: {exc}",
                         section=parts[done][0].name, instance_id=0) from exc
    commit_function_state(old)
    return res


def _plain(value: Any) -> Any:
    """Tuples become lists, as after a trip through msgpack (fingerprint comparison)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
