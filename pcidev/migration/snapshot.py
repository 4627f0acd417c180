"""Saving and loading one device: the framework section and the device's section.

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

from collections.abc import Sequence
from functools import partial
from typing import Any

import attrs

from pcidev.device import PciDevice
from pcidev.errors import ConfigError, MigrationBlockedError, VMStateError
from pcidev.migration.function_state import (
    FUNCTION_SECTION,
    FunctionState,
    LoadedResources,
    apply_function_state,
    build_resources,
    check_function_state,
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
from pcidev.vmstate import Section, description_of, fingerprint_differences, load, save
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
]


@attrs.frozen
class VMStateSnapshot:
    """A saved device: what :func:`save_device` returns.

    :ivar device_type: the stream's device type.
    :ivar fingerprint: the configuration fingerprint.
    :ivar sections: the framework section, the ``pcidev/registers`` section if the
        device has migratable registers (:mod:`pcidev.migration.registers`), then the
        device's section if it has a ``VMSTATE``.
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


def _no_vmstate(dev: PciDevice) -> MigrationBlockedError:
    return MigrationBlockedError([f"device type {dev.vmstate_device_type} has no vmstate description"])


def _migrates_nothing(dev: PciDevice) -> bool:
    """No ``VMSTATE`` and no migratable register: the type cannot migrate."""
    return dev.VMSTATE is None and not migratable_maps(dev)


def _expected_sections(dev: PciDevice) -> dict[tuple[str, int], type]:
    """The sections of ``dev``'s streams, in stream order, and their state classes."""
    want: dict[tuple[str, int], type] = {(FUNCTION_SECTION, 0): FunctionState}
    if migratable_maps(dev):
        want[(REGISTERS_SECTION, 0)] = RegistersState
    if dev.VMSTATE is not None:
        want[(description_of(dev.VMSTATE).name, 0)] = dev.VMSTATE
    return want


def vmstate_fingerprint(dev: PciDevice) -> dict[str, Any]:
    """The configuration fingerprint of ``dev``'s vmstate streams: the framework's
    items (``pci.*``) and the device's ``device_fingerprint()``.

    :param dev: the device (realized here if it is not yet).
    :returns: the items.
    :raises ConfigError: the device's items use the reserved ``pci.`` prefix.
    """
    dev.realize()
    fp = framework_fingerprint(dev)
    own = dict(dev.device_fingerprint())
    bad = sorted(k for k in own if not isinstance(k, str) or k.startswith("pci."))
    if bad:
        raise ConfigError(f"device_fingerprint() keys {bad} are reserved for the framework (pci.*)")
    fp.update(own)
    return fp


def vmstate_descriptions(dev: PciDevice) -> list[type]:
    """The state classes of ``dev``'s streams: the framework's, the registers section's
    if it has migratable registers, then its ``VMSTATE``.

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
    """Save ``dev``: the framework section and the device's section.

    Call it while quiesced. Nothing is changed.

    :param dev: the device.
    :returns: a snapshot whose ``fds`` (guest-memory regions, interrupt eventfds)
        are borrowed.
    :raises MigrationBlockedError: the type has neither a ``VMSTATE`` nor migratable registers.
    :raises StateError: the device built a state that does not fit its description.
    """
    if _migrates_nothing(dev):
        raise _no_vmstate(dev)
    dev.realize()
    sections: list[Section] = []
    with gc_paused(), dev.lock:
        fstate, fds = save_function_state(dev, dev.memory)
        sections.append(Section(FUNCTION_SECTION, 0, fstate))
        registers = save_registers(dev)
        if registers is not None:
            sections.append(Section(REGISTERS_SECTION, 0, registers))
        if dev.VMSTATE is not None:
            dev.vmstate_save_fds = fds  # the device's own descriptors follow (vmstate_fd)
            try:
                dstate = dev.get_device_state()
            finally:
                dev.vmstate_save_fds = None
            name = description_of(dev.VMSTATE).name
            if type(dstate) is not dev.VMSTATE:
                raise StateError(f"get_device_state() returned {type(dstate).__name__}, "
                                 f"expected {dev.VMSTATE.__name__}", section=name, instance_id=0)
            sections.append(Section(name, 0, dstate))
    return VMStateSnapshot(dev.vmstate_device_type, vmstate_fingerprint(dev), tuple(sections), tuple(fds))


def save_device_stream(dev: PciDevice) -> tuple[bytes, list[int]]:
    """:func:`save_device` encoded as a stream (docs/vmstate-format.md).

    :param dev: the device (quiesced).
    :returns: ``(stream, fds)``; the fds (borrowed) travel out of band.
    """
    with gc_paused():  # no cyclic-GC pass in the downtime (see pcidev.vmstate.gcpause)
        snap = save_device(dev)
        return snap.to_bytes(), list(snap.fds)


def load_device_stream(dev: PciDevice, data: bytes, fds: Sequence[int] | None = None) -> LoadedResources:
    """Load a stream saved by a device of the same type and configuration.

    All or nothing: the stream is decoded and checked completely (envelope,
    checksum, device type, fingerprint, every field, the framework state
    against this device, ``check_device_state``), guest memory is mapped, and
    only then is anything applied; if applying fails, the device is put back as
    it was. A failed load raises and leaves the device untouched.

    Call it while quiesced (or before the device ever ran).

    :param dev: the destination device.
    :param data: the stream.
    :param fds: the descriptors that arrived with it (``SCM_RIGHTS``), indexed by
        its FdRefs; the caller keeps ownership (the load duplicates what it
        keeps). ``None`` when the transport carries no descriptors (TCP): the
        device then keeps the guest memory and interrupt sink it has; if that
        memory has regions they must be the stream's (same addresses, sizes,
        access), and if it has none the host must map the stream's regions and
        install the eventfds before the device resumes.
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


def load_device(dev: PciDevice, snapshot: VMStateSnapshot, fds: Sequence[int] | None = None) -> LoadedResources:
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
    with gc_paused():
        return _apply_sections(dev, list(snapshot.sections), snapshot.fds if fds is None else fds)


def _apply_sections(dev: PciDevice, sections: list[Section], fds: Sequence[int] | None) -> LoadedResources:
    by_name = {s.name: s.state for s in sections}
    fstate = by_name.pop(FUNCTION_SECTION)
    registers = by_name.pop(REGISTERS_SECTION, None)
    device_section = next(iter(by_name.items()), None)
    dev.realize()
    with dev.lock:
        dev.vmstate_load_fds = list(fds) if fds is not None else None  # vmstate_load_fd()
        try:
            return _apply_sections_locked(dev, fstate, registers, device_section, fds)
        finally:
            dev.vmstate_load_fds = None


def _apply_sections_locked(dev: PciDevice, fstate: FunctionState, registers: RegistersState | None,
                           device_section: tuple[str, Any] | None, fds: Sequence[int] | None) -> LoadedResources:
    memory = dev.memory
    check_function_state(dev, fstate, fds, memory)
    if registers is not None:
        check_registers(dev, registers)
    dname, dstate = device_section if device_section is not None else ("", None)
    if device_section is not None:
        try:
            dev.check_device_state(dstate)
        except VMStateError:
            raise
        except Exception as exc:
            raise StateError(f"the device refused the state: {type(exc).__name__}: {exc}",
                             section=dname, instance_id=0) from exc
    res = build_resources(fstate, fds) if fds is not None else LoadedResources()
    try:
        before = dev.get_device_state() if device_section is not None else None
    except Exception:
        res.close()
        raise
    old = apply_function_state(dev, fstate, res, memory, partial(setattr, dev, "memory"))
    old_registers = apply_registers(dev, registers) if registers is not None else None
    try:
        if device_section is not None:
            dev.set_device_state(dstate)
    except Exception as exc:
        undo_function_state(dev, old, partial(setattr, dev, "memory"))
        if old_registers is not None:
            apply_registers(dev, old_registers)
        try:
            dev.set_device_state(before)
        except Exception as again:
            dev.fail(again, "rollback of a failed vmstate load")
        res.close()
        if isinstance(exc, VMStateError):
            raise
        raise StateError(f"applying the state failed: {type(exc).__name__}: {exc}",
                         section=dname, instance_id=0) from exc
    return res


def _plain(value: Any) -> Any:
    """Tuples become lists, as after a trip through msgpack (fingerprint comparison)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
