"""The built-in plugin: registers the device types that ship inside pcidev."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pcidev.devices.edu import EduDevice
from pcidev.hookspecs import hookimpl
from pcidev.registry import DeviceRegistry

if TYPE_CHECKING:
    from pcidev.testing.migration import Workload


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register ``edu``, the example device with a DMA engine and MSI-X."""
    registry.add_device(EduDevice)


@hookimpl
def pcidev_migration_workload(device_type: str, options: Mapping[str, Any]) -> Workload | None:
    """``edu``'s standard workload: :class:`pcidev.testing.edu.DmaCopies`."""
    if device_type != EduDevice.TYPE_NAME:
        return None
    # imported here: a device process never needs the host-side toolkit
    from pcidev.testing.edu import DmaCopies
    return DmaCopies.from_options(options)
