"""Plug a device into the software host and round-trip it through save and load.

::

    with Machine(ram_size=32 << 20) as machine:
        pdev = plugged(machine, "edu", "chunk=1k")
        ...                               # drive it through pdev's registers
        dev2 = roundtrip(pdev)            # pdev now drives the loaded copy
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, cast

import attrs

from pcidev.device import PciDevice
from pcidev.errors import IrqError, MigrationError, PcidevError
from pcidev.host.machine import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.migration.registers import save_registers
from pcidev.migration.snapshot import load_device_stream, save_device_stream
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.registry import DeviceRegistry

__all__ = ["RoundtripError", "plugged", "probe", "roundtrip", "state_differences", "teardown_device"]


class RoundtripError(MigrationError):
    """A round trip loaded a device that differs from the one saved."""


def plugged(machine: Machine, device: str | PciDevice, props: str | Mapping[str, Any] = "", *,
            registry: DeviceRegistry | None = None, vectors: int = 0) -> HostPciDevice:
    """Build a device, plug it into ``machine`` and enable it as a driver's probe does:
    BARs assigned, memory and I/O decoding on, bus mastering on, and interrupt vectors.

    :param machine: the software host.
    :param device: a registered device type name, or a device instance (not yet plugged).
    :param props: the type's properties (``"key=value,..."`` or a mapping); only
        with a type name.
    :param registry: the registry to build from; by default one loaded from the
        installed plugins (:func:`pcidev.plugins.make_plugin_manager`).
    :param vectors: interrupt vectors to allocate (MSI-X, else MSI, else INTx,
        :meth:`~pcidev.host.pci.HostPciDevice.alloc_irq_vectors`); 0 (the default)
        asks for as many as the device offers, up to 32.
    :returns: the host's handle; ``handle.device`` is the device.
    :raises PluginError: unknown device type.
    :raises ConfigError: bad properties, or properties given with an instance.
    """
    if isinstance(device, str):
        if registry is None:
            registry = load_registry(make_plugin_manager())
        dev = registry.create(device, props)
    else:
        if props:
            raise PcidevError("plugged(): properties go with a type name, not with a device instance")
        dev = device
    pdev = machine.plug(dev)
    probe(pdev, vectors)
    return pdev


def probe(pdev: HostPciDevice, vectors: int = 0) -> None:
    """Enable a plugged device as a driver's probe does: memory and I/O decoding, bus
    mastering, and interrupt vectors (MSI-X, else MSI, else INTx).

    :param pdev: the host's handle on the device.
    :param vectors: exactly this many vectors (an :class:`~pcidev.errors.IrqError` if
        not available); 0: up to 32, whatever the device offers.
    """
    pdev.enable_device()
    pdev.set_master()
    try:
        pdev.alloc_irq_vectors(vectors or 1, vectors or 32)
    except IrqError:
        if vectors:
            raise  # asked for, not available


def teardown_device(device: PciDevice) -> None:
    """Stop a device for good: :meth:`~pcidev.device.PciDevice.close` (its workers joined,
    its ``on_close()`` run). Idempotent.

    :param device: the device.
    """
    device.close()


def _fresh_copy(device: PciDevice) -> PciDevice:
    """A new device of ``device``'s class and configuration (an attribute holding an
    instance of its ``CONFIG_CLASS``), not realized or attached."""
    cls = type(device)
    config_cls = cls.CONFIG_CLASS
    if config_cls is None:
        return cls(name=device.name)
    configs = [v for v in vars(device).values() if isinstance(v, config_cls)]
    if not configs:
        raise PcidevError(f"roundtrip(): {cls.__name__} keeps no {config_cls.__name__} attribute; "
                          "pass make= to build the destination device")
    build = cast(Callable[..., PciDevice], cls)  # a CONFIG_CLASS type is built as cls(config, name=...)
    return build(configs[0], name=device.name)


def state_differences(a: Any, b: Any, *, ignore: Collection[str] = (), path: str = "") -> list[str]:
    """Where two device states differ, as dotted field paths (``smart.power_on_us``,
    ``queues[1].head``), attrs classes, sequences and mappings compared field by field.

    :param a: a state (what :meth:`~pcidev.device.PciDevice.get_device_state` returns).
    :param b: the other state.
    :param ignore: paths not compared (clock readings, for instance).
    :param path: the path of ``a`` and ``b`` themselves (for the recursion).
    :returns: the paths that differ, each with both values.
    """
    if path in ignore:
        return []
    if type(a) is not type(b):
        return [f"{path or 'state'}: {a!r} != {b!r}"]
    if attrs.has(type(a)):
        return [d for f in attrs.fields(type(a))
                for d in state_differences(getattr(a, f.name), getattr(b, f.name), ignore=ignore,
                                           path=f"{path}.{f.name}" if path else f.name)]
    if isinstance(a, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in state_differences(x, y, ignore=ignore, path=f"{path}[{i}]")]
    if isinstance(a, dict) and a.keys() == b.keys():
        return [d for k in a for d in state_differences(a[k], b[k], ignore=ignore, path=f"{path}[{k!r}]")]
    return [] if a == b else [f"{path or 'state'}: {a!r} != {b!r}"]


def _resume_if(device: PciDevice, was_running: bool) -> None:
    """A failed round trip leaves the source as it found it, as a failed migration does."""
    if was_running:
        device.resume()


def roundtrip(target: PciDevice | HostPciDevice, *, make: Callable[[], PciDevice] | None = None,
              ignore: Collection[str] = (), resume: bool = True) -> PciDevice:
    """Save a device and load the stream into a fresh device, in this process, as a
    migration does (the file descriptors travel with the stream).

    The source is quiesced and saved with
    :func:`~pcidev.migration.save_device_stream`; the destination, built by ``make``
    (default: the source's class with the source's configuration object), is loaded
    with :func:`~pcidev.migration.load_device_stream`; then the round trip checks
    that nothing is half-loaded: the destination's configuration space, its
    migratable registers (:mod:`pcidev.migration.registers`), a layer's
    :meth:`~pcidev.device.PciDevice.get_layer_state` and
    :meth:`~pcidev.device.PciDevice.get_device_state` equal the source's (but for
    the fields in ``ignore``, see :func:`state_differences`), and it has not
    failed. The destination then uses the source's guest memory and interrupt
    sink (the host's), and the source is torn down (:func:`teardown_device`).

    :param target: the device, or the host's handle on it; a handle is switched
        to the loaded device, so a test keeps driving it through the same handle.
    :param make: builds the destination device (same type and configuration).
    :param ignore: fields of the device state that may differ (clock readings such
        as NVMe's ``smart.power_on_us``), as paths of :func:`state_differences`.
    :param resume: resume the loaded device (start its background work) as a
        migration destination does.
    :returns: the loaded device.
    :raises VMStateError: the destination refused the stream (it is torn down;
        the source is resumed if it was running, as after a failed migration).
    :raises RoundtripError: the loaded device differs from the source (likewise).
    """
    pdev = target if isinstance(target, HostPciDevice) else None
    src = target.device if isinstance(target, HostPciDevice) else target
    if not isinstance(src, PciDevice):
        raise PcidevError(f"roundtrip(): {src!r} is not an in-process device")
    was_running = not src.quiesced
    src.quiesce()
    try:
        stream, fds = save_device_stream(src)
        dest = make() if make is not None else _fresh_copy(src)
    except BaseException:
        _resume_if(src, was_running)
        raise
    try:
        res = load_device_stream(dest, stream, fds)
    except BaseException:
        dest.owns_state = False  # a refused destination persists nothing over the source's
        teardown_device(dest)
        _resume_if(src, was_running)
        raise
    # The host keeps owning guest memory and interrupts: the loaded mapping of the
    # same memfd and the eventfd duplicates are released.
    if src.memory is not None:
        dest.attach(src.memory, src.irq.sink)
        res.close()
    problems = []
    if dest.failed is not None:
        problems.append(f"the loaded device failed: {dest.failed!r}")
    if bytes(dest.config.data) != bytes(src.config.data):
        problems.append("configuration space differs")
    diffs = state_differences(save_registers(src), save_registers(dest), ignore=ignore, path="registers")
    if diffs:
        problems.append("migratable registers differ: " + "; ".join(diffs))
    if src.LAYER_VMSTATE is not None:  # a layer's section (pcidev.device.PciDevice.LAYER_VMSTATE)
        diffs = state_differences(src.get_layer_state(), dest.get_layer_state(), ignore=ignore, path="layer")
        if diffs:
            problems.append("layer state differs: " + "; ".join(diffs))
    if src.VMSTATE is not None:
        diffs = state_differences(src.get_device_state(), dest.get_device_state(), ignore=ignore)
        if diffs:
            problems.append("device state differs: " + "; ".join(diffs))
    if problems:
        dest.owns_state = False
        teardown_device(dest)
        _resume_if(src, was_running)
        raise RoundtripError(f"round trip of {src!r}: " + "; ".join(problems))
    # as after a migration out: the destination owns the state now (a state file...)
    src.migrated_out = True
    src.owns_state = False
    teardown_device(src)
    if pdev is not None:
        pdev.device = dest
    if resume:
        dest.resume()
    return dest
