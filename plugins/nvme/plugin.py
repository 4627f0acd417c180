"""Entry point of the NVMe plugin (``[project.entry-points.pcidev] nvme``).

pcidev finds this module only through its entry point, exactly as it finds a
third-party plugin, and registers it under the name ``nvme`` (block it with
``pcidev -p no:nvme`` or ``PCIDEV_BLOCKED_PLUGINS=nvme``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pcidev.hookspecs import hookimpl

if TYPE_CHECKING:
    import pluggy

    from pcidev.registry import DeviceRegistry


@hookimpl
def pcidev_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Publish the NVMe plugin's own hooks (namespace backends, see
    :mod:`pcidev_nvme.hookspecs`).

    :param pluginmanager: the plugin manager being set up.
    """
    from pcidev_nvme import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the NVMe controller device type.

    :param registry: the registry collecting device types.
    """
    # Imported here so that loading the plugin stays cheap and an error in the
    # controller module is reported as a registration failure of this plugin.
    from pcidev_nvme.controller import NvmeController

    registry.add_device(NvmeController)
    registry.add_component("bench", "nvme", run_bench)


def run_bench(argv: list[str]) -> int:
    """NVMe I/O benchmark through the software host: pcidev bench nvme [--json].

    :param argv: the benchmark's arguments (see :mod:`pcidev_nvme.bench`).
    :returns: the exit status.
    """
    from pcidev_nvme.bench import main

    return main(argv)
