"""Host-side tooling for tests of virtio devices: :mod:`pcidev_virtio.testing.driver`."""

from __future__ import annotations

from pcidev_virtio.testing.driver import Completion, DriverQueue, VirtioCap, VirtioDriver

__all__ = ["Completion", "DriverQueue", "VirtioCap", "VirtioDriver"]
