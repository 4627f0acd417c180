"""A device type's standard workload, from the plugin that provides the device.

:func:`standard_workload` asks the plugins
(:func:`~pcidev.hookspecs.pcidev_migration_workload`) for the verified workload of a
device type, with the device configuration it needs; pass it to
:func:`~pcidev.testing.migrate_under_load`::

    work = standard_workload("nvme", workdir=tmp, queues=8, qd=32)
    result = migrate_under_load("nvme", work, count=10)
    assert work.report()["mismatches"] == 0

pcidev's built-in plugin provides one for ``edu`` (:class:`pcidev.testing.edu.DmaCopies`),
the NVMe plugin one for ``nvme`` (:class:`pcidev_nvme.testing.workload.VerifiedIo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcidev.errors import PcidevError
from pcidev.plugins import hook_migration_workload, load_registry, make_plugin_manager, parse_plugin_specs
from pcidev.testing.migration import TRANSPORTS, Workload

__all__ = ["standard_workload"]


def standard_workload(device_type: str, *, workdir: str | Path, queues: int = 8, qd: int = 32,
                      transport: str = "unix", seed: int | None = None, plugin_specs: Sequence[str] = (),
                      **options: Any) -> Workload:
    """The standard verified workload the plugins provide for ``device_type``.

    :param device_type: a registered device type.
    :param workdir: a directory the workload may create backing files in (the caller
        removes it after the run).
    :param queues: queues to drive (for devices that have several).
    :param qd: commands in flight per queue.
    :param transport: ``unix`` or ``tcp``: the workload picks a configuration that can
        migrate over it.
    :param seed: seed of the workload's random choices (None: random; the report says which).
    :param plugin_specs: the plugin selection (``-p`` options), as for the device processes.
    :param options: more options for the plugin (the NVMe workload takes ``ns_size``,
        ``aers``, ``hold_every``).
    :returns: the workload, with :attr:`~pcidev.testing.Workload.properties` to create the
        device with.
    :raises PcidevError: an unknown device type, one no plugin provides a workload for, a
        bad option, or a plugin that failed (:class:`~pcidev.errors.PluginError`).
    """
    if transport not in TRANSPORTS:
        raise PcidevError(f"transport must be one of {', '.join(TRANSPORTS)}, not {transport!r}")
    if queues < 1 or qd < 1:
        raise PcidevError(f"queues and qd must be >= 1, not {queues} and {qd}")
    blocked, extra = parse_plugin_specs(plugin_specs)
    pm = make_plugin_manager(blocked=blocked, plugins=extra)
    registry = load_registry(pm)
    if device_type not in registry:
        raise PcidevError(f"unknown device type {device_type!r} (known: {', '.join(sorted(registry))})")
    wishes = {"queues": queues, "qd": qd, "transport": transport, "workdir": str(workdir), "seed": seed,
              **options}
    work = hook_migration_workload(pm, device_type, wishes, Workload)
    if work is None:
        raise PcidevError(f"device type {device_type!r} has no standard workload: no plugin implements "
                          "pcidev_migration_workload for it")
    return work
