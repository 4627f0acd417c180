"""``howto-vcap``: the device of the how-to "Add a capability".

It carries a vendor-specific capability (capability ID 09h) in the standard list::

    +0  ID (09h)   +1  next   +2  length (8)   +3  layout version (1, read-only)
    +4  CONTROL (16 bits): bit 0 INVERT (RW), bits 15:1 reserved (read as 0)
    +6  STATUS  (16 bits): how many times the guest changed CONTROL (RO)

and a BAR0 with one register, ECHO (offset 0): reads return the last value written,
bit-inverted while CONTROL.INVERT is set.  Config space is migrated by the framework, so
the capability's registers move with the device once its feature is declared migratable.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from pcidev import hookimpl
from pcidev.bar import Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.pci.capabilities.base import Capability
from pcidev.registry import DeviceRegistry
from pcidev.vmstate import U32, vmstate


# [capability]
class EchoControlCapability(Capability):
    """A vendor-specific capability with a CONTROL and a STATUS register."""

    CAP_ID: ClassVar[int] = 0x09  # vendor specific
    SIZE: ClassVar[int] = 8
    CONTROL, STATUS = 4, 6
    INVERT = 0x0001

    def setup(self) -> None:
        """Write the registers and say which bits the guest may change."""
        self.set(2, 1, self.SIZE)              # vendor-specific: byte 2 is the length
        self.set(3, 1, 1)                       # our layout version, read-only
        self.writable(self.CONTROL, 2, self.INVERT)
        self.on_write(self.CONTROL, 2, self._control_written)

    def _control_written(self, offset: int, size: int, old: int, value: int) -> None:
        """After a guest write reaching CONTROL: count it in STATUS."""
        self.set(self.STATUS, 2, (self.get(self.STATUS, 2) + 1) & 0xFFFF)

    @property
    def invert(self) -> bool:
        """CONTROL.INVERT as the guest set it."""
        return bool(self.get(self.CONTROL, 2) & self.INVERT)
# [end capability]


# [device]
@vmstate("howto-vcap", version=1)
@attrs.frozen
class EchoState:
    """The device's own state: ECHO (the capability is in config space, saved by the framework)."""

    echo: U32


class EchoDevice(PciDevice):
    """ECHO in BAR0, inverted while the capability's INVERT bit is set."""

    TYPE_NAME = "howto-vcap"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0xEC40
    # the capability's state is all in config space, which the framework migrates
    MIGRATABLE_FEATURES = frozenset({"cap:EchoControlCapability"})
    VMSTATE = EchoState

    def describe(self) -> None:
        """BAR0, the vendor capability and the standard PCIe capabilities."""
        regs = RegisterMap(4096, name="echo-bar0")
        regs.add(Register("ECHO", 0x00, 4, on_read=self._echo))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)
        self.control = self.add_capability(EchoControlCapability())
        self.add_standard_pcie_caps()

    def _echo(self, reg: Register) -> int:
        return reg.value ^ 0xFFFFFFFF if self.control.invert else reg.value

    def get_device_state(self) -> EchoState:
        """ECHO's stored value."""
        return EchoState(echo=self.regs["ECHO"].value)

    def set_device_state(self, state: EchoState) -> None:
        """Put a migrated ECHO back."""
        self.regs["ECHO"].value = state.echo
# [end device]


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register ``howto-vcap`` when this module is loaded as a plugin (``-p vendor_capability``)."""
    registry.add_device(EchoDevice)
