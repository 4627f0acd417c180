"""Power Management capability (ID 01h), version 3.

Layout::

    00  id | next | PMC (16): bits 2:0 version, bit 9 D1, bit 10 D2, 15:11 PME support
    04  PMCSR (16): bits 1:0 power state, bit 3 No_Soft_Reset, bit 8 PME_En, bit 15 PME_Status
    06  bridge extensions (8), data (8)

Only D0 and D3hot are supported; a write of D1 or D2 leaves the state unchanged
(the spec lets a function ignore writes of unsupported states). A function in
D3hot answers configuration accesses only: its BARs are gated by the device.
"""

from __future__ import annotations

from pcidev.pci import ids
from pcidev.pci.capabilities.base import Capability
from pcidev.pci.config import ResetKind

__all__ = [
    "PMC", "PMCSR", "STATE_MASK", "NO_SOFT_RESET", "PME_ENABLE", "PME_STATUS", "D0", "D3HOT",
    "PowerManagementCapability",
]

#: Power Management Capabilities register offset in the PM capability (PCI_PM_PMC)
PMC = 2
#: Power Management Control/Status register offset in the PM capability (PCI_PM_CTRL)
PMCSR = 4
#: PMCSR mask of the PowerState field (PCI_PM_CTRL_STATE_MASK)
STATE_MASK = 0x0003
#: PMCSR bit: No_Soft_Reset, state kept over D3hot to D0 (PCI_PM_CTRL_NO_SOFT_RESET)
NO_SOFT_RESET = 0x0008
#: PMCSR bit: PME_En (PCI_PM_CTRL_PME_ENABLE)
PME_ENABLE = 0x0100
#: PMCSR bit: PME_Status, RW1C (PCI_PM_CTRL_PME_STATUS)
PME_STATUS = 0x8000
#: PowerState value of D0, fully on (PCI_D0 in include/linux/pci.h)
D0 = 0
#: PowerState value of D3hot (PCI_D3hot in include/linux/pci.h)
D3HOT = 3


class PowerManagementCapability(Capability):
    """PCI Power Management, D0 and D3hot.

    :param no_soft_reset: advertise No_Soft_Reset (state kept over D3hot→D0).
    """

    CAP_ID = ids.CapId.PM
    SIZE = 8

    def __init__(self, *, no_soft_reset: bool = True, offset: int | None = None) -> None:
        super().__init__(offset=offset)
        self.no_soft_reset = no_soft_reset

    def setup(self) -> None:
        self.set(PMC, 2, 0x0003)
        self.set(PMCSR, 2, NO_SOFT_RESET if self.no_soft_reset else 0)
        self.writable(PMCSR, 2, STATE_MASK | PME_ENABLE)
        self.w1c(PMCSR, 2, PME_STATUS)
        self.on_write(PMCSR, 2, self._written)
        self._state = D0

    @property
    def power_state(self) -> int:
        """0 for D0 … 3 for D3hot."""
        return self.get(PMCSR, 2) & STATE_MASK

    def _written(self, off: int, size: int, old: int, value: int) -> None:
        state = self.power_state
        if state not in (D0, D3HOT):
            self.set(PMCSR, 2, (self.get(PMCSR, 2) & ~STATE_MASK) | self._state)
            return
        prev, self._state = self._state, state
        if prev == D3HOT and state == D0 and not self.no_soft_reset:
            assert self.device is not None  # the hook is added by setup(), after install
            self.device.request_reset(ResetKind.CONVENTIONAL)

    def reset(self, kind: ResetKind) -> None:
        self._state = self.power_state

    def config_loaded(self) -> None:
        # the power state the function is in (the one a later write moves away from)
        self._state = self.power_state
