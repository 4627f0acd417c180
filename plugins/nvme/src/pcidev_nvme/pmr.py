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
NRDY's reset value is 0 (NVMe Base 2.0, PMRSTS; QEMU's PMRSTS reads 0 at power-on too): a
PMR the host never enabled, and one after a PCI reset, reads NRDY = 0 with PMRCTL.EN = 0;
only disabling it (EN 1 to 0) sets NRDY while it is disabled.

**Write barrier** (PMRWBM bit 1): a read of PMRSTS while the PMR is ready makes every
prior write to the PMR persistent: the controller calls ``msync`` on the file before
answering (not while it is disabled or not ready: nothing can have been written through
the controller then). A failed ``msync`` sets PMRSTS.ERR (01h), which stays set until
the next PCI reset (it does not migrate).

**Deviation: BAR4 is not gated by PMRCTL.EN or NRDY.** NVMe Base 2.0 8.2.4 says that
writes to the PMR while it is disabled or not ready do not update its memory. BAR4 is a
RAM BAR that a vfio-user client maps (sparse mmap, so that the guest's accesses never
trap), and an access through such a mapping cannot be refused or dropped by the server:
here, writes through BAR4 update the file whatever PMRCTL.EN and PMRSTS.NRDY say (and reads
return its contents). Hosts follow the spec's order (enable, wait for NRDY to clear,
then write), which behaves the same on both; only a host that writes a disabled PMR and
expects the write to vanish sees the difference. The controller's own data transfers
reach the PMR only while it is enabled (see below).

**Controller memory space** (PMRCAP.CMSS): while PMRMSCL.CMSE is 1 and the PMR is
enabled, addresses in ``[CBA, CBA + size)`` are PMR addresses for the controller's data
transfers (:mod:`pcidev_nvme.controller_memory`, with the CMB's mixing rule). The PMR
holds data only (PMRCAP: RDS and WDS): Create I/O Submission / Completion Queue with a
queue there fails with Invalid Use of Controller Memory Buffer (:meth:`PersistentMemoryRegion.refuse_queue`). CBA is
invalid when the range would pass 2**64 or overlaps the CMB's enabled controller memory
space; then PMRSTS.CBAI is set and the PMR has no controller memory space. Each PMRMSCL
or PMRMSCU write evaluates them again (CBAI is cleared when CMSE is 0 or CBA is valid);
PMRMSCL keeps what the host wrote. Write PMRMSCU before PMRMSCL (a PMRMSCU write while
CMSE is set moves the window).

**Reset and migration.** A PCI reset makes the contents persistent (when the PMR was
enabled), then clears PMRCTL, PMRMSCL/U and PMRSTS (the contents stay, in the file); a
controller reset does not touch the PMR. The contents are a file-backed RAM BAR, which
the framework migrates as its descriptor over UNIX sockets and in a handover (the
destination maps the source's file). Over TCP and in vfio-user migration data the
contents travel (a memory source: pre-copied while the controller runs, tracked by page
hashes once the window was mapped, the rest at the stop) and the destination writes them
into *its own* file (the configured path), which it maps as before: the PMR is small,
guest-visible memory, so streaming it is cheap and holds whether or not the destination
sees the source's file (shared storage or not), where a ``file`` namespace, too large to
stream, relies on shared storage and an ``fdatasync`` at the stop. The source's file
keeps every write too: its mapping is made persistent (``msync``) when the source
closes the PMR. The registers travel as the optional ``pmr`` subsection of the ``nvme``
section (:class:`PmrState`).

**Sparse files.** A file the controller creates is allocated in full
(``posix_fallocate``), so a write through the mapping cannot hit a hole on a full file
system (which would raise SIGBUS in the server or in QEMU). An existing file is used as
it is: make sure it is not sparse (``fallocate -l SIZE PATH``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import attrs

from pcidev.bar import Access, RamBacking, Register
from pcidev.vmstate import U32, Bool, vmstate
from pcidev_nvme.controller_memory import MemoryWindow, invalid_use, map_window, ranges_overlap

__all__ = ["PMR_BAR", "PmrState", "PersistentMemoryRegion", "READY_DELAY", "pmrcap_value", "PMRCTL_EN",
           "PMRSTS_NRDY", "PMRSTS_CBAI", "PMRSTS_ERR", "PMRMSC_CMSE", "PMRWBM_PMRSTS_READ"]

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
PMRSTS_ERR = 0x01
PMRSTS_NRDY = 1 << 8
PMRSTS_CBAI = 1 << 12
PMRMSC_CMSE = 1 << 1
_MSCL_MASK = 0xFFFFF000 | PMRMSC_CMSE

log = logging.getLogger(__name__)


def pmrcap_value() -> int:
    """PMRCAP: read and write data, BIR 4, 500 ms units, PMRSTS-read write barrier,
    timeout PMRTO, controller memory space supported."""
    return (PMRCAP_RDS | PMRCAP_WDS | (PMR_BAR << PMRCAP_BIR_SHIFT) | (0 << PMRCAP_PMRTU_SHIFT)
            | (PMRWBM_PMRSTS_READ << PMRCAP_PMRWBM_SHIFT) | (PMRTO << PMRCAP_PMRTO_SHIFT) | PMRCAP_CMSS)


@vmstate("nvme/pmr", version=1)
@attrs.frozen
class PmrState:
    """The PMR's registers: PMRCTL, PMRMSCL/U, PMRSTS.CBAI (evaluated again on restore),
    and whether it was ready (disabled: whether PMRSTS.NRDY was clear; a stream from before
    NRDY's reset value was 0 says False, NRDY set, as it read then)."""

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
    :param other: the range ``(start, end)`` of the CMB's enabled controller memory space,
        or None (a CBA overlapping it is invalid).
    :param lock: serializes changes of the controller's windows (one per controller).
    :raises ConfigError: the file cannot be used (another size, not a regular file...).
    """

    def __init__(self, path: str, size: int, name: str, changed: Callable[[], None], *,
                 other: Callable[[], tuple[int, int] | None] = lambda: None,
                 lock: threading.RLock | None = None) -> None:
        self._changed = changed
        self._other = other
        self._lock = lock if lock is not None else threading.RLock()
        self.path = path
        self.size = size
        self.ram = RamBacking(size, path=path, name=f"nvme-pmr[{name}]")
        self.ctl = Register("PMRCTL", 0xE04, 4, Access.RW, mask=PMRCTL_EN, on_write=self._ctl_written)
        self.mscl = Register("PMRMSCL", 0xE14, 4, Access.RW, mask=_MSCL_MASK, on_write=self._msc_written)
        self.mscu = Register("PMRMSCU", 0xE18, 4, Access.RW, on_write=self._msc_written)
        self.cbai = False
        #: PMRSTS.ERR: a write barrier failed (until the next PCI reset)
        self.error = False
        #: when the PMR becomes ready (monotonic seconds), None while disabled
        self.ready_at: float | None = None
        #: PMRSTS.NRDY while disabled: 0 from a reset, 1 once the host cleared PMRCTL.EN
        self.nrdy_disabled = False
        #: the PMR's addresses while its controller memory space is enabled, else None
        self.window: MemoryWindow | None = None
        self._window_key: tuple[int, tuple[int, int] | None] | None = None
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
        nrdy = not self.ready if self.enabled else self.nrdy_disabled or self.held()
        return (PMRSTS_ERR if self.error else 0) | (PMRSTS_NRDY if nrdy else 0) | (PMRSTS_CBAI if self.cbai else 0)

    @property
    def enabled_range(self) -> tuple[int, int] | None:
        """``(CBA, CBA + size)`` while controller memory space is enabled, else None."""
        w = self.window
        return (w.start, w.end) if w is not None else None

    def _sts_read(self, reg: Register) -> int:
        if self.ready and not self.error:  # PMRWBM bit 1: the read makes every prior write persistent
            self._barrier("a PMRSTS read")
        return self.pmrsts

    def _barrier(self, why: str) -> None:
        """Make the file durable (``msync``); a failure sets PMRSTS.ERR (never fails the controller)."""
        try:
            self.ram.flush()
        except (OSError, ValueError) as exc:
            log.error("PMR %s: the write barrier of %s failed: %s; PMRSTS.ERR set", self.path, why, exc)
            self.error = True

    def _ctl_written(self, reg: Register, new: int, old: int) -> None:
        with self._lock:
            if new & PMRCTL_EN and not old & PMRCTL_EN:
                self.ready_at = time.monotonic() + READY_DELAY
                self.on_enable()
            elif old & PMRCTL_EN and not new & PMRCTL_EN:
                self.ready_at = None
                self.nrdy_disabled = True
                self._barrier("disabling the PMR")
            self._evaluate()

    def _msc_written(self, reg: Register, new: int, old: int) -> None:
        with self._lock:
            self._evaluate()

    @property
    def _cba(self) -> int:
        return (self.mscu.value << 32) | (self.mscl.value & 0xFFFFF000)

    def _invalid(self) -> str | None:
        """Why the CBA is invalid, or None."""
        cba = self._cba
        if cba + self.size > 1 << 64:
            return f"CBA {cba:#x}: the PMR would pass 2**64"
        if ranges_overlap((cba, cba + self.size), self._other()):
            return f"CBA {cba:#x}: the PMR would overlap the CMB's controller memory space"
        return None

    def _evaluate(self, *, force: bool = False) -> None:
        """Derive PMRSTS.CBAI and :attr:`window` from PMRCTL.EN, PMRMSCL.CMSE and the CBA."""
        base: int | None = None
        self.cbai = False
        if self.mscl.value & PMRMSC_CMSE:
            if self._invalid() is not None:
                self.cbai = True
            elif self.enabled:
                base = self._cba
        # (the memory object too: a load may have adopted another one)
        key = (base, self.ram.identity) if base is not None else None
        if key == self._window_key and not force:
            return
        # the old window is only dropped: a thread may still use it (the GC unmaps it)
        self.window = map_window("PMR", base, self.size, self.ram) if base is not None else None
        self._window_key = key
        self._changed()

    def refuse_queue(self, base: int, nbytes: int, what: str) -> None:
        """Create I/O Submission / Completion Queue: queues in the PMR are not supported
        (PMRCAP reports data reads and writes only, RDS and WDS: no queue support as the
        CMB's CMBSZ.SQS / CQS would).

        :param base: the queue's address (PRP1).
        :param nbytes: its size.
        :param what: ``"submission"`` or ``"completion"`` (for the message).
        :raises NvmeStatusError: Invalid Use of Controller Memory Buffer.
        """
        w = self.window
        if w is not None and w.overlaps(base, nbytes):
            raise invalid_use(f"{what} queues in the persistent memory region are not supported "
                              f"(queue at {base:#x})")

    # -- lifecycle ----------------------------------------------------------------------------
    def reset(self) -> None:
        """A PCI reset: the contents made persistent (when enabled), then disabled,
        controller memory space off, PMRSTS.ERR cleared (the contents stay)."""
        with self._lock:
            if self.enabled:
                self._barrier("a PCI reset")
            self.ctl.value = self.mscl.value = self.mscu.value = 0
            self.error = False
            self.ready_at = None
            self.nrdy_disabled = False  # the reset value
            self._evaluate()

    def snapshot(self) -> PmrState:
        """The registers."""
        ready = self.ready if self.enabled else not self.nrdy_disabled  # (disabled: NRDY clear)
        return PmrState(pmrctl=self.ctl.value, pmrmscl=self.mscl.value, pmrmscu=self.mscu.value,
                        cbai=self.cbai, ready=ready)

    def state_range(self, st: PmrState) -> tuple[int, int] | None:
        """The controller memory space ``st`` enables (EN and CMSE set, CBAI clear, the
        range below 2**64), or None."""
        cba = (st.pmrmscu << 32) | (st.pmrmscl & 0xFFFFF000)
        if st.pmrctl & PMRCTL_EN and st.pmrmscl & PMRMSC_CMSE and not st.cbai and cba + self.size <= 1 << 64:
            return (cba, cba + self.size)
        return None

    def check(self, st: PmrState) -> str | None:
        """Why ``st`` cannot apply, or None."""
        if st.pmrctl & ~PMRCTL_EN:
            return f"PMRCTL {st.pmrctl:#x} sets reserved bits"
        if st.pmrmscl & ~_MSCL_MASK:
            return f"PMRMSCL {st.pmrmscl:#x} sets reserved bits"
        return None

    def restore(self, st: PmrState | None) -> None:
        """Take the registers of a checked state (None: reset values) and map the RAM BAR's
        current descriptor (the one a load adopted). A PMR that was enabled but not yet
        ready becomes ready :data:`READY_DELAY` from now."""
        with self._lock:
            self.ctl.value = st.pmrctl if st is not None else 0
            self.mscl.value = st.pmrmscl if st is not None else 0
            self.mscu.value = st.pmrmscu if st is not None else 0
            if not self.enabled:
                self.ready_at = None
                self.nrdy_disabled = st is not None and not st.ready
            else:
                assert st is not None  # enabled
                self.ready_at = time.monotonic() + (0.0 if st.ready else READY_DELAY)
            self._evaluate(force=True)

    def close(self) -> None:
        """Make the contents persistent, drop the window and close the file."""
        with self._lock:
            self.window, self._window_key = None, None
        if self.ram.identity is not None:  # (open)
            self._barrier("closing the PMR")
        self.ram.close()
