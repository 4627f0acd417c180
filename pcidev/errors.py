"""Typed exceptions raised by pcidev.

Every error pcidev raises on purpose derives from :class:`PcidevError`, so a
transport or a CLI can catch the whole family in one place and turn it into a
protocol error, a device status or a one-line message.
"""

from __future__ import annotations


class PcidevError(Exception):
    """Base class of every error pcidev raises deliberately."""


class ConfigError(PcidevError):
    """A device, capability or BAR was described inconsistently (a programming error
    in a device model, raised at describe/realize time)."""


class ConfigSpaceError(PcidevError):
    """An access to PCI configuration space was malformed (offset or size out of range)."""


class MmioError(PcidevError):
    """A BAR access was malformed: unknown BAR, bad size, or outside the BAR."""


class DmaError(PcidevError):
    """A guest-memory access fell outside mapped memory, overflowed, or was refused.

    Devices turn it into their own error status (for NVMe: Data Transfer Error)."""


class IrqError(PcidevError):
    """An interrupt was requested that the device does not have or has not enabled."""


class PluginError(PcidevError):
    """A plugin or device registration is invalid (duplicate name, missing hook, ...)."""


class DeviceFailedError(PcidevError):
    """The device entered its failed state after a handler raised; it refuses work
    until reset."""
