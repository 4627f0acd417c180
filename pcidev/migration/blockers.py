"""Why a device cannot migrate now: the framework's checks, the device's own
reasons and every plugin's ``pcidev_migration_blockers``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pluggy

from pcidev.bar import RamBacking
from pcidev.device import PciDevice
from pcidev.memory_source import MemorySource
from pcidev.migration.registers import migratable_maps
from pcidev.plugins import hook_migration_blockers

__all__ = ["device_blockers", "collect_blockers", "descriptor_blockers"]


def device_blockers(device: PciDevice) -> list[str]:
    """Every reason ``device`` cannot migrate now, from the device itself:
    no :attr:`~pcidev.device.PciDevice.VMSTATE` and no migratable register
    (:mod:`pcidev.migration.registers`); each enabled feature
    (:meth:`~pcidev.device.PciDevice.enabled_features`) that is not in
    ``FRAMEWORK_FEATURES``, ``MIGRATABLE_FEATURES`` or the RAM BARs' ``bar<N>-ram``
    (:meth:`~pcidev.device.PciDevice.ram_bars`, migrated by the framework); and
    :meth:`~pcidev.device.PciDevice.device_migration_blockers` (a failure of that
    hook is itself a reason). Plugins add theirs through the
    ``pcidev_migration_blockers`` hook (:func:`collect_blockers` gathers both).

    :param device: the device.
    :returns: the reasons, all of them (empty: the device can migrate).
    """
    reasons = []
    if device.VMSTATE is None and device.LAYER_VMSTATE is None and not migratable_maps(device):
        reasons.append(f"device type {device.vmstate_device_type} has no vmstate description")
    allowed = device.FRAMEWORK_FEATURES | device.ram_bar_features() | frozenset(device.MIGRATABLE_FEATURES)
    for feature in sorted(device.enabled_features() - allowed):
        reasons.append(f"feature {feature!r} is enabled but device type {device.vmstate_device_type} "
                       "does not declare it migratable")
    try:
        reasons.extend(str(r) for r in device.device_migration_blockers())
    except Exception as exc:
        reasons.append(f"device_migration_blockers() failed: {type(exc).__name__}: {exc}")
    for k, vf in enumerate(device.virtual_functions):  # SR-IOV: a PF migrates with its VFs
        reasons.extend(f"VF {k}: {reason}" for reason in device_blockers(vf))
    return reasons


def collect_blockers(device: PciDevice, pm: pluggy.PluginManager | None = None) -> list[str]:
    """Every reason ``device`` cannot migrate now: the device's own
    (:func:`device_blockers`: no VMSTATE, undeclared features, its dynamic
    reasons) and every plugin's ``pcidev_migration_blockers``
    (:func:`pcidev.plugins.hook_migration_blockers`: a plugin whose hook fails
    or returns garbage contributes a reason naming it).

    :param device: the device.
    :param pm: the plugin manager (None: the device's reasons only).
    :returns: all reasons (empty: it may migrate).
    """
    reasons = device_blockers(device)
    if pm is not None:
        reasons.extend(hook_migration_blockers(pm, device))
    return reasons


def descriptor_blockers(device: PciDevice, carrier: str,
                        sources: Sequence[MemorySource] | None = None) -> list[str]:
    """Why ``device`` cannot migrate over a channel that carries no file descriptors
    (TCP, vfio-user migration data): each RAM BAR (its own and, for an SR-IOV PF, its
    live VFs') and each enabled feature in :attr:`~pcidev.device.PciDevice.FD_FEATURES`
    that no memory source covers (:meth:`~pcidev.device.PciDevice.memory_sources`: a
    source whose object is the BAR's, or whose ``covers`` names the feature, travels as
    its contents instead). With the device's own sources nothing configuration-based is
    left here: every RAM BAR (memfd or file) is a source; a reason means the channel
    streams no contents (``sources`` None) or the source list missed an object.

    :param device: the device.
    :param carrier: what carries the state, for the sentences ("a migration over TCP").
    :param sources: the memory sources whose contents the channel streams (None: it
        streams none).
    :returns: the reasons (empty: nothing needs a descriptor).
    """
    covered_files = set()
    covered_features: set[str] = set()
    for src in sources or ():
        covered_features |= src.covers
        ident = _file_id(src.fd)
        if ident is not None:
            covered_files.add(ident)
    reasons = []
    functions = [("", device), *((f"VF {k}: ", vf) for k, vf in enumerate(list(device.virtual_functions)))]
    for prefix, function in functions:
        for bar in function.ram_bars():
            ram = bar.handler
            assert isinstance(ram, RamBacking)  # ram_bars()
            if ram.identity in covered_files:
                continue
            what = "its memfd" if ram.path is None else "its file's"
            reasons.append(f"{prefix}RAM BAR{bar.index} (feature 'bar{bar.index}-ram') migrates only as a file "
                           f"descriptor ({what}), which {carrier} cannot carry")
    try:
        fd_bound = sorted((device.enabled_features() & device.FD_FEATURES) - covered_features)
    except Exception as exc:
        return [*reasons, f"enabled_features() failed: {type(exc).__name__}: {exc}"]
    reasons.extend(f"feature {f!r} migrates only as a file descriptor, which {carrier} cannot carry"
                   for f in fd_bound)
    return reasons


def _file_id(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``fd``, None if it is not open."""
    try:
        st = os.fstat(fd)
    except (OSError, TypeError):
        return None
    return st.st_dev, st.st_ino
