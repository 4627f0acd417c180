"""``scratchpad``: the tutorial's device, a few read/write registers and one doorbell.

BAR0 (4 KiB; MSI-X table at 0x800, PBA at 0xC00)::

    0x00  MAGIC     RO   the ``magic`` property
    0x04  SCRATCH0  RW   any value
    0x08  SCRATCH1  RW   any value
    0x0C  DOORBELL  WO   counts the write in RINGS and raises MSI-X vector 0
    0x10  RINGS     RO   doorbell writes since reset

The registers are the device's whole state: the map declares them migratable, so
the framework saves and restores their values and the device has no ``VMSTATE``
and no ``get_device_state``/``set_device_state`` of its own.

This is an example, not an installed plugin: tests build it directly, and
``PYTHONPATH=examples/tutorial pcidev -p scratchpad ...`` loads this module as a
plugin through :func:`pcidev_register_devices` below (see ``docs/tutorial.md``).
"""

from __future__ import annotations

from typing import Any

import attrs

from pcidev import hookimpl
from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.properties import structure_config
from pcidev.registry import DeviceRegistry


# [step: properties]
@attrs.define(kw_only=True)
class ScratchpadConfig:
    """Properties of a scratchpad (``pcidev describe scratchpad``)."""

    magic: int = attrs.field(default=0x5C7A7C4D, metadata={
        "help": "the value the MAGIC register reads back"})
# [end step]


# [step: device class]
class ScratchpadDevice(PciDevice):
    """The tutorial's scratchpad device (registers in the module docstring).

    :param config: a :class:`ScratchpadConfig`, a property string (``"magic=7"``),
        a mapping, or ``None`` for the defaults.
    :param name: device name in logs.
    """

    TYPE_NAME = "scratchpad"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x5C7A
    CLASS_CODE = 0x00FF00
    CONFIG_CLASS = ScratchpadConfig

    def __init__(self, config: ScratchpadConfig | str | dict[str, Any] | None = None, *,
                 name: str | None = None) -> None:
        self.cfg = structure_config(ScratchpadConfig, config, what="scratchpad")
        super().__init__(name=name)  # calls describe()
# [end step]

    # [step: registers]
    def describe(self) -> None:
        """Declare BAR0's registers, MSI-X and the standard PCIe capabilities."""
        regs = RegisterMap(4096, name="scratchpad-bar0", migratable=True)  # values migrate with the device
        regs.add(Register("MAGIC", 0x00, 4, Access.RO, reset=self.cfg.magic & 0xFFFFFFFF,
                          migrate=False))  # a constant of the properties: nothing to carry
        regs.add(Register("SCRATCH0", 0x04, 4))
        regs.add(Register("SCRATCH1", 0x08, 4))
        regs.add(Register("DOORBELL", 0x0C, 4, Access.WO, on_write=self._doorbell))
        regs.add(Register("RINGS", 0x10, 4, Access.RO))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)
        self.add_msix(1, bar=0, table_offset=0x800, pba_offset=0xC00)
        self.add_standard_pcie_caps()
    # [end step]

    # [step: fingerprint]
    def device_fingerprint(self) -> dict[str, Any]:
        """The configuration a destination must share: MAGIC is not carried (each side
        takes it from its properties), so a destination with another ``magic`` refuses."""
        return {"magic": self.cfg.magic}
    # [end step]

    # [step: interrupt]
    def _doorbell(self, reg: Register, new: int, old: int) -> None:
        """A guest wrote DOORBELL: count it and raise MSI-X vector 0 (INTx without MSI-X)."""
        rings = self.regs["RINGS"]
        rings.value = (rings.value + 1) & 0xFFFFFFFF
        if not self.irq.notify(0):
            self.irq.set_intx(True)
    # [end step]


# [step: plugin]
@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register the scratchpad when this module is loaded as a plugin (``-p MODULE``)."""
    registry.add_device(ScratchpadDevice)
# [end step]
