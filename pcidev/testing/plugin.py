"""The pytest plugin of the toolkit: fixtures for a machine, a registry and plugged devices.

pcidev registers it with pytest through the ``pytest11`` entry point group, so it
is active in every project that installs pcidev (``pytest -p no:pcidev`` turns it
off). The fixtures:

* ``pcidev_machine``: a :class:`~pcidev.host.Machine` with 64 MiB of RAM, closed
  at teardown;
* ``pcidev_registry``: a :class:`~pcidev.registry.DeviceRegistry` loaded from the
  installed plugins (:func:`pcidev.plugins.make_plugin_manager`, which honours
  :envvar:`PCIDEV_DISABLE_PLUGIN_AUTOLOAD`);
* ``pcidev_device``: a factory, ``pcidev_device("edu", "engine=on")``, returning
  the host's handle on a device plugged into ``pcidev_machine`` and enabled
  (:func:`pcidev.testing.plugged`); every device it made is torn down
  (:func:`pcidev.testing.teardown_device`) before the machine is closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import pytest

from pcidev.device import PciDevice
from pcidev.host.machine import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.registry import DeviceRegistry
from pcidev.testing.harness import plugged, teardown_device

__all__ = ["DeviceFactory", "pcidev_device", "pcidev_machine", "pcidev_registry"]

#: guest RAM of the ``pcidev_machine`` fixture
RAM_SIZE = 64 << 20


class DeviceFactory(Protocol):
    """The ``pcidev_device`` fixture: the arguments of :func:`pcidev.testing.plugged`
    without the machine and the registry."""

    def __call__(self, device: str | PciDevice, props: str | Mapping[str, Any] = "", *,
                 vectors: int = 0) -> HostPciDevice: ...


@pytest.fixture
def pcidev_machine() -> Iterator[Machine]:
    """A software host with 64 MiB of guest RAM, closed at teardown."""
    with Machine(ram_size=RAM_SIZE) as machine:
        yield machine


@pytest.fixture
def pcidev_registry() -> DeviceRegistry:
    """The device types of the installed plugins."""
    return load_registry(make_plugin_manager())


@pytest.fixture
def pcidev_device(pcidev_machine: Machine, pcidev_registry: DeviceRegistry) -> Iterator[DeviceFactory]:
    """Plug devices into ``pcidev_machine``: ``pcidev_device(type_or_instance, props)``."""
    handles: list[HostPciDevice] = []

    def make(device: str | PciDevice, props: str | Mapping[str, Any] = "", *, vectors: int = 0) -> HostPciDevice:
        pdev = plugged(pcidev_machine, device, props, registry=pcidev_registry, vectors=vectors)
        handles.append(pdev)
        return pdev

    yield make
    for pdev in handles:  # the handle's current device: a round trip may have swapped it
        if isinstance(pdev.device, PciDevice):
            teardown_device(pdev.device)
