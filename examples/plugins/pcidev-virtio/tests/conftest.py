"""Fixtures of the virtio plugin's tests: a machine with a plugged virtio-rng and its driver."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pcidev.host import HostPciDevice, Machine
from pcidev.testing import plugged
from pcidev_virtio.rng import VirtioRng
from pcidev_virtio.testing.driver import VirtioDriver


@pytest.fixture
def machine() -> Iterator[Machine]:
    with Machine(ram_size=32 << 20) as m:
        yield m


@pytest.fixture
def rng(machine: Machine) -> Iterator[tuple[HostPciDevice, VirtioDriver]]:
    """A virtio-rng plugged with MSI-X on, and a driver (not yet initialised)."""
    dev = VirtioRng()
    pdev = plugged(machine, dev)
    yield pdev, VirtioDriver(machine, pdev)
    pdev.device.close()
