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
from pcidev_virtio.testing.fuzz import VirtioGuestTarget


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the virtio device types, ``virtio-rng`` and ``virtio-blk``, and the fuzz
    target ``fuzz-target/virtio-guest``
    (:class:`~pcidev_virtio.testing.fuzz.VirtioGuestTarget`, run by ``pcidev fuzz virtio-guest``).

    :param registry: the registry collecting device types.
    """
    registry.add_device(VirtioRng)
    registry.add_device(VirtioBlk)
    registry.add_component("fuzz-target", VirtioGuestTarget.name, VirtioGuestTarget)
