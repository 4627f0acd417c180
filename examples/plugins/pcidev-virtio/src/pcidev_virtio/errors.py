"""Exceptions of the virtio plugin (all :class:`pcidev.PcidevError`)."""

from __future__ import annotations

from pcidev import PcidevError

__all__ = ["VirtioError", "VirtqueueError", "DriverError"]


class VirtioError(PcidevError):
    """Base class of the virtio plugin's errors."""


class VirtqueueError(VirtioError):
    """The driver made a virtqueue the device cannot use (a descriptor loop, a chain
    longer than the queue, indirect-in-indirect, a buffer outside guest memory...).

    The transport answers it by setting ``DEVICE_NEEDS_RESET`` (spec 2.1.2) and
    stopping the queue; it never reaches the driver as anything else.

    :param message: what was wrong.
    :param queue: the queue's index.
    """

    def __init__(self, message: str, *, queue: int) -> None:
        super().__init__(f"virtqueue {queue}: {message}")
        self.queue = queue


class DriverError(VirtioError):
    """The host-side test driver (:mod:`pcidev_virtio.testing.driver`) found the device
    misbehaving or refusing (features not accepted, a timeout, a malformed used entry)."""
