"""The built-in plugin: registers the device types that ship inside pcidev."""

from __future__ import annotations

from pcidev.devices.edu import EduDevice
from pcidev.hookspecs import hookimpl
from pcidev.registry import DeviceRegistry


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register ``edu``, the example device with a DMA engine and MSI-X."""
    registry.add_device(EduDevice)
