"""pcidev: emulated PCIe devices as Python plugins.

The device-author surface is importable from here (``from pcidev import
PciDevice, Register, RegisterMap, Access, hookimpl, vmstate``):
:class:`PciDevice` is the function model; :class:`Register`,
:class:`RegisterMap`, :class:`Access` and :class:`RamBacking` answer BAR
accesses; :class:`ResetKind` is what :meth:`PciDevice.on_reset` receives;
:data:`hookimpl` marks plugin hook implementations; :mod:`pcidev.vmstate`
describes a device's migrated state; the exception classes are those of
:mod:`pcidev.errors` and :mod:`pcidev.vmstate.errors`.
"""

from __future__ import annotations

from pcidev import _version, vmstate
from pcidev.bar import Access, RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import (
    ConfigError,
    ConfigSpaceError,
    DeviceFailedError,
    DmaError,
    IrqError,
    MigrationBlockedError,
    MigrationError,
    MmioError,
    PcidevError,
    PluginError,
    TransportError,
    VMStateError,
)
from pcidev.hookspecs import hookimpl
from pcidev.pci.config import ResetKind
from pcidev.vmstate.errors import (
    ChecksumError,
    ConfigMismatchError,
    StateError,
    StreamError,
    VersionError,
)
from pcidev.worker import Worker

#: The version of pcidev (a PEP 440 string such as ``"0.1.0"``), also the distribution's version.
__version__ = _version.__version__

__all__ = [
    "__version__",
    "Access",
    "ChecksumError",
    "ConfigError",
    "ConfigMismatchError",
    "ConfigSpaceError",
    "DeviceFailedError",
    "DmaError",
    "IrqError",
    "MigrationBlockedError",
    "MigrationError",
    "MmioError",
    "PciDevice",
    "PcidevError",
    "PluginError",
    "RamBacking",
    "Register",
    "RegisterMap",
    "ResetKind",
    "StateError",
    "StreamError",
    "TransportError",
    "VMStateError",
    "VersionError",
    "Worker",
    "hookimpl",
    "vmstate",
]
