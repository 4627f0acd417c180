"""``howto-counter``: the device of the how-to "Add a vmstate field without breaking old streams".

BAR0 (4 KiB)::

    0x00  COUNT  RW  the counter
    0x04  STEP   RW  bits 15:0: what TICK adds (new in version 2 of the device state; 1 after reset)
    0x08  TICK   WO  any write adds STEP to COUNT

Version 1 of this device had no STEP register (TICK added 1) and migrated only ``count``.
Version 2 adds the ``step`` field with ``since=2`` and a default, so a stream saved by
version 1 still loads: its devices get ``step=1``, which is what they did. The stream
``data/howto-counter-v1.pcvm`` was saved by version 1 and a test loads it
(``tests/examples/howto/test_counter.py``).
"""

from __future__ import annotations

import attrs

from pcidev import hookimpl
from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.registry import DeviceRegistry
from pcidev.vmstate import U32, vmfield, vmstate
from pcidev.vmstate.errors import StateError


# [state v2]
@vmstate("howto-counter", version=2, min_version=1)
@attrs.frozen
class CounterState:
    """What a counter migrates. Version 1 had only ``count``."""

    count: U32
    step: U32 = vmfield(default=1, since=2)  # absent from version-1 streams: they get 1
# [end state v2]


class CounterDevice(PciDevice):
    """A counter that adds STEP on every TICK (registers in the module docstring)."""

    TYPE_NAME = "howto-counter"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0xC047
    VMSTATE = CounterState

    def describe(self) -> None:
        """BAR0 with COUNT, STEP and TICK."""
        regs = RegisterMap(4096, name="counter-bar0")
        regs.add(Register("COUNT", 0x00, 4))
        regs.add(Register("STEP", 0x04, 4, reset=1, mask=0xFFFF))
        regs.add(Register("TICK", 0x08, 4, Access.WO, on_write=self._tick))
        self.regs = regs
        self.add_mem_bar(0, 4096, regs)

    def _tick(self, reg: Register, new: int, old: int) -> None:
        count = self.regs["COUNT"]
        count.value = (count.value + self.regs["STEP"].value) & 0xFFFFFFFF

    # [migration v2]
    def get_device_state(self) -> CounterState:
        """Both registers (a version-2 stream)."""
        return CounterState(count=self.regs["COUNT"].value, step=self.regs["STEP"].value)

    def check_device_state(self, state: CounterState) -> None:
        """Refuse a step the 16-bit register cannot hold (a corrupt or foreign stream)."""
        if state.step > 0xFFFF:
            raise StateError(f"step {state.step:#x} does not fit the 16-bit STEP register",
                             section="howto-counter", instance_id=0, path="step")

    def set_device_state(self, state: CounterState) -> None:
        """Apply a loaded state; a version-1 stream arrives here with ``step=1``."""
        self.regs["COUNT"].value = state.count
        self.regs["STEP"].value = state.step
    # [end migration v2]


@hookimpl
def pcidev_register_devices(registry: DeviceRegistry) -> None:
    """Register ``howto-counter`` when this module is loaded as a plugin (``-p counter``)."""
    registry.add_device(CounterDevice)
