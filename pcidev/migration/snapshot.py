"""Saving and loading one device: the framework section, the layer's section (a device
class built on a layer such as a virtio-pci transport, see
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
    :ivar sections: the framework section, the layer's section if the device has a
        layer, then the device's section.
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


def vmstate_fingerprint(dev: PciDevice) -> dict[str, Any]:
    """The configuration fingerprint of ``dev``'s vmstate streams: the framework's
    items (``pci.*``) and the device's ``device_fingerprint()``.

    :param dev: the device (realized here if it is not yet).
    :returns: the items.
    :raises ConfigError: the device's items use the reserved ``pci.`` prefix.
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
    """The state classes of ``dev``'s streams: the framework's, its ``LAYER_VMSTATE`` if
    any, then its ``VMSTATE``.

    :param dev: the device.
    :returns: the classes.
    """
    return [FunctionState, *(c for c in (dev.LAYER_VMSTATE, dev.VMSTATE) if c is not None)]


def _expected_sections(dev: PciDevice) -> list[tuple[str, int]]:
    """The (name, instance) of each section of ``dev``'s streams, in stream order."""
    return [(FUNCTION_SECTION, 0), *((description_of(c).name, 0) for c in vmstate_descriptions(dev)[1:])]


def prepare_vmstate(dev: PciDevice) -> None:
    """Generate the vmstate encoders and decoders of ``dev``'s descriptions now
    (they are otherwise generated on first use, which would then count in a
    migration's downtime). Transports call it when they start serving.

    :param dev: the device.
    """
    for cls in vmstate_descriptions(dev):
        codec_for(cls)


def save_device(dev: PciDevice) -> VMStateSnapshot:
    """Save ``dev``: the framework section, the layer's section (if any) and the device's section.

    Call it while quiesced. Nothing is changed.

    :param dev: the device.
    :returns: a snapshot whose ``fds`` (guest-memory regions, interrupt eventfds)
        are borrowed.
    :raises MigrationBlockedError: the type has no ``VMSTATE``.
    :raises StateError: the device built a state that does not fit its description.
    """
    if dev.VMSTATE is None:
        raise _no_vmstate(dev)
    dev.realize()
    with gc_paused(), dev.lock:
        fstate, fds = save_function_state(dev, dev.memory)
        dev.vmstate_save_fds = fds  # the device's own descriptors follow (vmstate_fd)
        try:
            lstate = dev.get_layer_state() if dev.LAYER_VMSTATE is not None else None
            dstate = dev.get_device_state()
        finally:
            dev.vmstate_save_fds = None
    sections = [Section(FUNCTION_SECTION, 0, fstate)]
    for cls, state, hook in ((dev.LAYER_VMSTATE, lstate, "get_layer_state"),
                             (dev.VMSTATE, dstate, "get_device_state")):
        if cls is None:
            continue
        name = description_of(cls).name
        if type(state) is not cls:
            raise StateError(f"{hook}() returned {type(state).__name__}, expected {cls.__name__}",
                             section=name, instance_id=0)
        sections.append(Section(name, 0, state))
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
    if dev.VMSTATE is None:
        raise _no_vmstate(dev)
    expected = _expected_sections(dev)
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
    if dev.VMSTATE is None:
        raise _no_vmstate(dev)
    if snapshot.device_type != dev.vmstate_device_type:
        raise ConfigMismatchError(f"stream is for device type {snapshot.device_type!r}, "
                                  f"this device is {dev.vmstate_device_type!r}")
    diffs = fingerprint_differences(_plain(snapshot.fingerprint), vmstate_fingerprint(dev))
    if diffs:
        raise ConfigMismatchError("device configuration differs from the stream's: " + "; ".join(diffs),
                                  differences=diffs)
    want: dict[tuple[str, int], type] = dict(zip(_expected_sections(dev), vmstate_descriptions(dev),
                                                 strict=True))
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
    lname = description_of(dev.LAYER_VMSTATE).name if dev.LAYER_VMSTATE is not None else None
    layer = (lname, by_name.pop(lname)) if lname is not None else None
    (dname, dstate), = by_name.items()
    dev.realize()
    with dev.lock:
        dev.vmstate_load_fds = list(fds) if fds is not None else None  # vmstate_load_fd()
        try:
            return _apply_sections_locked(dev, fstate, layer, dname, dstate, fds)
        finally:
            dev.vmstate_load_fds = None


def _check(check: Callable[[Any], None], state: Any, name: str) -> None:
    try:
        check(state)
    except VMStateError:
        raise
    except Exception as exc:
        raise StateError(f"the device refused the state: {type(exc).__name__}: {exc}",
                         section=name, instance_id=0) from exc


def _apply_sections_locked(dev: PciDevice, fstate: FunctionState, layer: tuple[str, Any] | None, dname: str,
                           dstate: Any, fds: Sequence[int] | None) -> LoadedResources:
    memory = dev.memory
    check_function_state(dev, fstate, fds, memory)
    if layer is not None:
        _check(dev.check_layer_state, layer[1], layer[0])
    _check(dev.check_device_state, dstate, dname)
    res = build_resources(fstate, fds) if fds is not None else LoadedResources()
    try:
        before_layer = dev.get_layer_state() if layer is not None else None
        before = dev.get_device_state()
    except Exception:
        res.close()
        raise
    old = apply_function_state(dev, fstate, res, memory, partial(setattr, dev, "memory"))
    name = dname
    try:
        if layer is not None:
            name = layer[0]
            dev.set_layer_state(layer[1])
            name = dname
        dev.set_device_state(dstate)
    except Exception as exc:
        undo_function_state(dev, old, partial(setattr, dev, "memory"))
        try:
            if layer is not None:
                dev.set_layer_state(before_layer)
            dev.set_device_state(before)
        except Exception as again:
            dev.fail(again, "rollback of a failed vmstate load")
        res.close()
        if isinstance(exc, VMStateError):
            raise
        raise StateError(f"applying the state failed: {type(exc).__name__}: {exc}",
                         section=name, instance_id=0) from exc
    return res


def _plain(value: Any) -> Any:
    """Tuples become lists, as after a trip through msgpack (fingerprint comparison)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
