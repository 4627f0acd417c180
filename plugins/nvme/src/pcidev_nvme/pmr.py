"""The Persistent Memory Region (PMR): memory of the controller, in BAR4, whose contents
persist across power cycles: here a file (``pmr=PATH``, ``pmr_size=SIZE``) mapped
``MAP_SHARED`` (:class:`~pcidev.bar.RamBacking` over a file), so they survive a restart of
the server.

The file is created at ``pmr_size`` when missing; an existing file must have exactly that
size (it is never truncated or extended: :class:`~pcidev.errors.ConfigError`). BAR4 is a
64-bit prefetchable RAM BAR, offered for mmap to a vfio-user client; ``msix_bar=4``
cannot be combined with a PMR. CAP.PMRS is set. The registers (NVMe Base 2.0, 3.1.4.21 to
3.1.4.27; names as in libnvme ``types.h``)::

    E00h PMRCAP   RDS, WDS, BIR = 4, PMRTU = 0 (500 ms), PMRWBM = 0010b, PMRTO = 2, CMSS
    E04h PMRCTL   EN
    E08h PMRSTS   ERR = 0, NRDY, HSTS = 0 (normal), CBAI
    E0Ch PMREBS   0 (no elasticity buffer reported)
    E10h PMRSWTP  0 (no sustained write throughput reported)
    E14h PMRMSCL  CMSE (bit 1), CBA bits 31:12
    E18h PMRMSCU  CBA bits 63:32

**Enable and ready.** Setting PMRCTL.EN sets PMRSTS.NRDY, which clears once the region
is ready (:data:`READY_DELAY` later, within PMRCAP.PMRTO); clearing EN sets NRDY again.

**Write barrier** (PMRWBM bit 1): a read of PMRSTS makes every prior write to the PMR
persistent: the controller calls ``msync`` on the file before answering.

**Controller memory space** (PMRCAP.CMSS): while PMRMSCL.CMSE is 1 and the PMR is
enabled, addresses in ``[CBA, CBA + size)`` are PMR addresses for the controller's data
transfers (:mod:`pcidev_nvme.controller_memory`, with the CMB's mixing rule). A CBA whose
range would pass 2**64 is refused: PMRSTS.CBAI is set and CMSE stays 0. Write PMRMSCU
before PMRMSCL (a PMRMSCU write while CMSE is set moves the window).

**Reset and migration.** A PCI reset clears PMRCTL and PMRMSCL/U (the contents stay, in
the file); a controller reset does not touch the PMR. The contents are a file-backed RAM
BAR, which the framework migrates (its descriptor travels over UNIX sockets and in a
handover; over TCP the destination maps the same path); the registers travel as the
optional ``pmr`` subsection of the ``nvme`` section (:class:`PmrState`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import attrs

from pcidev.bar import Access, RamBacking, Register
from pcidev.vmstate import U32, Bool, vmstate
from pcidev_nvme.controller_memory import MemoryWindow, close_window, map_window

__all__ = ["PMR_BAR", "PmrState", "PersistentMemoryRegion", "READY_DELAY", "pmrcap_value", "PMRCTL_EN",
           "PMRSTS_NRDY", "PMRSTS_CBAI", "PMRMSC_CMSE", "PMRWBM_PMRSTS_READ"]

#: the BAR holding the PMR
PMR_BAR = 4
#: PMRCAP fields
PMRCAP_RDS = 1 << 3
PMRCAP_WDS = 1 << 4
PMRCAP_BIR_SHIFT = 5
PMRCAP_PMRTU_SHIFT = 8
PMRCAP_PMRWBM_SHIFT = 10
PMRCAP_PMRTO_SHIFT = 16
PMRCAP_CMSS = 1 << 24
#: PMRWBM bit 1: a read of PMRSTS makes prior writes persistent
PMRWBM_PMRSTS_READ = 1 << 1
#: PMRTO in PMRTU units (500 ms): the PMR is ready within 1 s of PMRCTL.EN
PMRTO = 2
#: how long the PMR takes to become ready after PMRCTL.EN (seconds, within PMRTO)
READY_DELAY = 0.02
#: PMRCTL.EN, PMRSTS fields, PMRMSCL.CMSE
PMRCTL_EN = 1 << 0
PMRSTS_NRDY = 1 << 8
PMRSTS_CBAI = 1 << 12
PMRMSC_CMSE = 1 << 1
_MSCL_MASK = 0xFFFFF000 | PMRMSC_CMSE


def pmrcap_value() -> int:
    """PMRCAP: read and write data, BIR 4, 500 ms units, PMRSTS-read write barrier,
    timeout PMRTO, controller memory space supported."""
    return (PMRCAP_RDS | PMRCAP_WDS | (PMR_BAR << PMRCAP_BIR_SHIFT) | (0 << PMRCAP_PMRTU_SHIFT)
            | (PMRWBM_PMRSTS_READ << PMRCAP_PMRWBM_SHIFT) | (PMRTO << PMRCAP_PMRTO_SHIFT) | PMRCAP_CMSS)


@vmstate("nvme/pmr", version=1)
@attrs.frozen
class PmrState:
    """The PMR's registers: PMRCTL, PMRMSCL/U, PMRSTS.CBAI, and whether it was ready."""

    pmrctl: U32
    pmrmscl: U32
    pmrmscu: U32
    cbai: Bool
    ready: Bool


class PersistentMemoryRegion:
    """The PMR of one controller (see the module docstring).

    :param path: the backing file.
    :param size: its size (a power of two, at least a page).
    :param name: the controller's name.
    :param changed: called when :attr:`window` changed (the controller recomposes its DMA view).
    :raises ConfigError: the file cannot be used (another size, not a regular file...).
    """

    def __init__(self, path: str, size: int, name: str, changed: Callable[[], None]) -> None:
        self._changed = changed
        self.path = path
        self.size = size
        self.ram = RamBacking(size, path=path, name=f"nvme-pmr[{name}]")
        self.ctl = Register("PMRCTL", 0xE04, 4, Access.RW, mask=PMRCTL_EN, on_write=self._ctl_written)
        self.mscl = Register("PMRMSCL", 0xE14, 4, Access.RW, mask=_MSCL_MASK, on_write=self._msc_written)
        self.mscu = Register("PMRMSCU", 0xE18, 4, Access.RW, on_write=self._msc_written)
        self.cbai = False
        #: when the PMR becomes ready (monotonic seconds), None while disabled
        self.ready_at: float | None = None
        #: write barriers done (a PMRSTS read: msync of the file)
        self.barriers = 0
        #: the PMR's addresses while its controller memory space is enabled, else None
        self.window: MemoryWindow | None = None
        self._window_key: tuple[int, int] | None = None
        #: while ``held()`` (a sanitize operation runs or failed) PMRSTS.NRDY stays set
        self.held: Callable[[], bool] = lambda: False
        #: called when the host sets PMRCTL.EN (user data may change: Global Data Erased clears)
        self.on_enable: Callable[[], None] = lambda: None

    # -- registers ---------------------------------------------------------------------------
    def registers(self) -> list[Register]:
        """PMRCAP, PMRCTL, PMRSTS, PMREBS, PMRSWTP, PMRMSCL and PMRMSCU for the BAR0 register map."""
        ro = Access.RO
        return [Register("PMRCAP", 0xE00, 4, ro, reset=pmrcap_value()), self.ctl,
                Register("PMRSTS", 0xE08, 4, ro, on_read=self._sts_read),
                Register("PMREBS", 0xE0C, 4, ro), Register("PMRSWTP", 0xE10, 4, ro), self.mscl, self.mscu]

    @property
    def enabled(self) -> bool:
        """PMRCTL.EN."""
        return bool(self.ctl.value & PMRCTL_EN)

    @property
    def ready(self) -> bool:
        """Enabled and ready (PMRSTS.NRDY clear)."""
        return self.ready_at is not None and time.monotonic() >= self.ready_at and not self.held()

    @property
    def pmrsts(self) -> int:
        """PMRSTS without the write barrier a guest read makes."""
        return (0 if self.ready else PMRSTS_NRDY) | (PMRSTS_CBAI if self.cbai else 0)

    def _sts_read(self, reg: Register) -> int:
        self.ram.flush()  # PMRWBM bit 1: the read makes every prior write persistent
        self.barriers += 1
        return self.pmrsts

    def _ctl_written(self, reg: Register, new: int, old: int) -> None:
        if new & PMRCTL_EN and not old & PMRCTL_EN:
            self.ready_at = time.monotonic() + READY_DELAY
            self.on_enable()
        elif old & PMRCTL_EN and not new & PMRCTL_EN:
            self.ready_at = None
            self.ram.flush()
        self._place()

    def _msc_written(self, reg: Register, new: int, old: int) -> None:
        if self.mscl.value & PMRMSC_CMSE:
            cba = self._cba
            if cba + self.size > 1 << 64:
                self.cbai = True
                self.mscl.value &= ~PMRMSC_CMSE
            else:
                self.cbai = False
        self._place()

    @property
    def _cba(self) -> int:
        return (self.mscu.value << 32) | (self.mscl.value & 0xFFFFF000)

    def _place(self, *, force: bool = False) -> None:
        """Make :attr:`window` follow PMRCTL.EN, PMRMSCL.CMSE and the CBA."""
        key = (self._cba, self.ram.fd) if self.enabled and self.mscl.value & PMRMSC_CMSE else None
        if key == self._window_key and not force:
            return
        old = self.window
        self.window = map_window("PMR", key[0], self.size, key[1]) if key is not None else None
        self._window_key = key
        self._changed()
        close_window(old)

    # -- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """A PCI reset: disabled, controller memory space off (the contents stay)."""
        if self.enabled:
            self.ram.flush()
        self.ctl.value = self.mscl.value = self.mscu.value = 0
        self.cbai = False
        self.ready_at = None
        self._place()

    def snapshot(self) -> PmrState:
        """The registers."""
        return PmrState(pmrctl=self.ctl.value, pmrmscl=self.mscl.value, pmrmscu=self.mscu.value,
                        cbai=self.cbai, ready=self.ready)

    def check(self, st: PmrState) -> str | None:
        """Why ``st`` cannot apply, or None."""
        if st.pmrctl & ~PMRCTL_EN:
            return f"PMRCTL {st.pmrctl:#x} sets reserved bits"
        if st.pmrmscl & ~_MSCL_MASK:
            return f"PMRMSCL {st.pmrmscl:#x} sets reserved bits"
        cba = (st.pmrmscu << 32) | (st.pmrmscl & 0xFFFFF000)
        if st.pmrmscl & PMRMSC_CMSE and cba + self.size > 1 << 64:
            return f"controller memory space enabled at an invalid CBA {cba:#x}"
        return None

    def restore(self, st: PmrState | None) -> None:
        """Take the registers of a checked state (None: reset values) and map the RAM BAR's
        current descriptor (the one a load adopted). A PMR that was enabled but not yet
        ready becomes ready :data:`READY_DELAY` from now."""
        self.ctl.value = st.pmrctl if st is not None else 0
        self.mscl.value = st.pmrmscl if st is not None else 0
        self.mscu.value = st.pmrmscu if st is not None else 0
        self.cbai = st.cbai if st is not None else False
        if not self.enabled:
            self.ready_at = None
        else:
            assert st is not None  # enabled
            self.ready_at = time.monotonic() + (0.0 if st.ready else READY_DELAY)
        self._place(force=True)

    def close(self) -> None:
        """Make the contents persistent, unmap the window and close the file."""
        old, self.window, self._window_key = self.window, None, None
        close_window(old)
        if self.ram.fd >= 0:
            self.ram.flush()
        self.ram.close()
