"""pcidev-virtio: virtio 1.x devices over the modern PCI transport, as a pcidev plugin.

Shipped the way a third party ships a device family: its own distribution, found by
pcidev through the ``pcidev`` entry-point group (:mod:`pcidev_virtio.plugin`), built only
on pcidev's public API.

* :mod:`pcidev_virtio.device`: :class:`~pcidev_virtio.device.VirtioPciDevice`, the
  virtio-pci transport every device type subclasses;
* :mod:`pcidev_virtio.virtqueue`: the split virtqueue;
* :mod:`pcidev_virtio.rng`: ``virtio-rng``;
* :mod:`pcidev_virtio.testing.driver`: a host-side driver for tests.
"""

from __future__ import annotations

__all__: list[str] = []
