"""Entry point of the virtio plugin (``[project.entry-points.pcidev] virtio``).

pcidev finds this module through its entry point, as it finds any third-party
plugin, and registers it under the name ``virtio`` (block it with
``pcidev -p no:virtio``).
"""

from __future__ import annotations

from pcidev import hookimpl
from pcidev.registry import DeviceRegistry
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.rng import VirtioRng


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the virtio device types: ``virtio-rng`` and ``virtio-blk``.

    :param registry: the registry collecting device types.
    """
    registry.add_device(VirtioRng)
    registry.add_device(VirtioBlk)
