"""The NVMe controller: the PCI function (:meth:`NvmeController.describe`), the
enable/reset/shutdown state machine behind CC and CSTS, and the wiring of its parts.

The parts, each in its own module (``docs/nvme-contract.md`` has the table): BAR0
registers (:mod:`~pcidev_nvme.registers`), doorbells (:mod:`~pcidev_nvme.doorbells`),
the fetch loop (:mod:`~pcidev_nvme.fetch`), completions
(:mod:`~pcidev_nvme.completion`), queues (:mod:`~pcidev_nvme.queues`), interrupts
(:mod:`~pcidev_nvme.interrupts`), temperature and keep alive
(:mod:`~pcidev_nvme.health`), the namespaces (:mod:`~pcidev_nvme.namespaces`), the
state file (:mod:`~pcidev_nvme.persist`), the command sets, and live migration
(:mod:`~pcidev_nvme.migration`). Each mixin module initialises its own state in an
``_init_<concern>()`` called from :meth:`NvmeController.__init__`.

PCI identity: class 01:08:02 (NVM Express I/O controller), 1b36:0010 by default,
a 64-bit memory BAR0 with the registers, the doorbells and (by default) the
MSI-X table and PBA after them (``msix_bar=4`` puts them in BAR4 as QEMU does),
Power Management, PCI Express and AER capabilities, INTx as a fallback.

Threading: register accesses run on the caller's thread. A doorbell write
fetches the new entries of its queue in one batch and dispatches them on the
same thread; the I/O command set completes them inline (memory backends) or
from worker threads (files), so :meth:`NvmeController.complete` is
thread-safe. Completions posted during one doorbell write raise one interrupt
per completion queue at the end of the batch. Nothing a register access does
waits for backend I/O: a controller reset or shutdown that must wait for
commands in flight finishes in the background and CSTS says when.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from pcidev.bar import Register
from pcidev.device import PciDevice
from pcidev.dma import GuestMemory
from pcidev.errors import ConfigError, DmaError, VMStateError
from pcidev.migration import FunctionState
from pcidev.pci import ids
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.pci.config import ResetKind
from pcidev.sriov import VfBar, VirtualFunction, add_sriov
from pcidev.vmstate import load as load_sections
from pcidev.vmstate import peek_header
from pcidev.vmstate.errors import ConfigMismatchError, StateError
from pcidev_nvme.abort import Aborts
from pcidev_nvme.admin import AdminCommandSet, AdminWorker, Opcode
from pcidev_nvme.aer import AsyncEvents
from pcidev_nvme.atomicity import Atomicity
from pcidev_nvme.cmb import CMB_BAR, ControllerMemoryBuffer
from pcidev_nvme.completion import CompletionMixin
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller_memory import ControllerMemoryView
from pcidev_nvme.doorbells import DoorbellsMixin, ShadowDoorbells
from pcidev_nvme.endurance import EnduranceGroup, MediaTotals
from pcidev_nvme.features import Features
from pcidev_nvme.fetch import FetchMixin
from pcidev_nvme.health import HealthMixin
from pcidev_nvme.interrupts import Interrupts, Timer
from pcidev_nvme.io import IoCommandSet
from pcidev_nvme.limits import SHUTDOWN_DRAIN_TIMEOUT
from pcidev_nvme.logs import ChangedNamespaces, ErrorLog, FirmwareSlots, SmartCounters
from pcidev_nvme.migration import SECTION as NVME_SECTION
from pcidev_nvme.migration import MigrationMixin, NvmeState
from pcidev_nvme.migration import features as migration_features
from pcidev_nvme.namespace import Namespace, may_write_beside
from pcidev_nvme.namespaces import NamespaceSetMixin, RemovedNamespace
from pcidev_nvme.ns_smart import NamespaceSmart
from pcidev_nvme.persist import PersistenceMixin
from pcidev_nvme.pmr import PMR_BAR, PersistentMemoryRegion
from pcidev_nvme.queues import CompletionQueue, QueueSetMixin, SubmissionQueue
from pcidev_nvme.registers import (
    CAP_NSSRS,
    CC_EN,
    CSTS_CFS,
    CSTS_NSSRO,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DOORBELL_BASE,
    NSSR_MAGIC,
    SHST_COMPLETE,
    SHST_NORMAL,
    SHST_PROCESSING,
    ST_DISABLED,
    ST_FAILED,
    ST_READY,
    ST_RESETTING,
    Bar0,
    ControllerState,
    ZeroBar,
    bar_layout,
    build_register_map,
    cap_value,
    enable_problem,
)
from pcidev_nvme.request import SQE_SIZE
from pcidev_nvme.sanitize import SANITIZE_COMPLETED_EVENT, Sanitizer
from pcidev_nvme.selftest import RESULT_ABORTED_NS_REMOVED, RESULT_ABORTED_SANITIZE, SelfTest, edstt_minutes
from pcidev_nvme.status import Status
from pcidev_nvme.uncorrectable import SIDECAR_SUFFIX, Uncorrectable
from pcidev_nvme.virtualization import OACS_VMS, Virtualization, VirtualizationState, resources_of

__all__ = ["NvmeController", "NvmeVirtualFunction", "CMIC_MULTI_CTRL", "CMIC_SRIOV_VF"]

#: Identify Controller CMIC bit 1: the NVM subsystem may contain two or more controllers
CMIC_MULTI_CTRL = 1 << 1
#: CMIC bit 2: the controller is associated with an SR-IOV virtual function
CMIC_SRIOV_VF = 1 << 2
#: OACS bits a secondary controller clears: Format NVM (1), Firmware Commit/Download (2),
#: Namespace Management (3) -- they act on state shared with the primary and the other secondaries
_OACS_NOT_ON_SECONDARY = (1 << 1) | (1 << 2) | (1 << 3)
#: Identify Controller DSTO bit 0 (one device self-test in the NVM subsystem at a time):
#: cleared with SR-IOV, where every controller runs its own self-test (one per controller)
_DSTO_ONE_PER_SUBSYSTEM = 1 << 0
_OFF_DSTO = 318

log = logging.getLogger(__name__)

#: the framework's section of a PF's VFs (pcidev.migration.virtual_functions)
SRIOV_SECTION = "pcidev/sriov"

# the command register's low byte and its Bus Master bit (the dma property's hot path)
_COMMAND = ids.COMMAND
_MASTER = int(ids.Command.MASTER)


class NvmeController(CompletionMixin, DoorbellsMixin, FetchMixin, QueueSetMixin, NamespaceSetMixin, HealthMixin,
                     PersistenceMixin, MigrationMixin, PciDevice):
    """An NVMe 2.0 controller (see the module docstring).

    :param config: an :class:`~pcidev_nvme.config.NvmeConfig`, a mapping, or a
        QEMU-style property string (``"serial=x,mdts=7,ns=mem:size=64M"``).
    :param name: device name in logs.
    :raises ConfigError: a bad configuration or namespace spec.

    The data path sees (``docs/nvme-contract.md``): :attr:`dma`,
    :attr:`page_size`, :attr:`mdts_bytes`, :attr:`namespaces`, :attr:`smart`,
    :meth:`complete`.
    """

    TYPE_NAME = "nvme"
    VENDOR_ID = 0x1B36
    DEVICE_ID = 0x0010
    CLASS_CODE = 0x010802
    REVISION = 0x02
    SUBSYSTEM_VENDOR_ID = 0x1AF4
    SUBSYSTEM_ID = 0x1100
    INTERRUPT_PIN = 1
    #: the configuration class (for tools that build devices from properties)
    CONFIG_CLASS = NvmeConfig
    #: doorbells from 0x1000 of BAR0 (the fast vfio-user path clips the window to the
    #: BAR and the MSI-X table)
    DOORBELL_WINDOW = (0, DOORBELL_BASE, 1 << 64)

    def __init__(self, config: NvmeConfig | Mapping[str, Any] | str | None = None, *, name: str | None = None) -> None:
        self.cfg = cfg = NvmeConfig.coerce(config)
        self._closed = False
        res = resources_of(cfg)
        #: SR-IOV: the secondary controllers of this primary controller (None without SR-IOV)
        self.virtualization: Virtualization | None = None if res is None else Virtualization(
            cfg, res, offline=self._secondary_offline, attached_changed=self._secondary_attached_changed)
        super().__init__(name=name)
        self.vendor_id = cfg.vendor_id
        self.device_id = cfg.device_id
        self.subsystem_vendor_id = cfg.subsystem_vendor_id
        self.subsystem_id = cfg.subsystem_id

        #: serializes register writes, resets and state restores
        self.state_lock = threading.RLock()
        self.timer = Timer(f"nvme-timer[{self.name}]")
        #: slow admin work (Format NVM, flush, shutdown) in the background
        self.admin_worker = AdminWorker(f"nvme-admin[{self.name}]", self._fatal)

        # controller state
        self._state = ST_DISABLED
        self._running = False
        #: doorbell writes are taken: :attr:`running`, or paused for a migration (the value
        #: is recorded and fetched at the resume, never dropped)
        self._doorbells_open = False
        self._init_migration()
        self._init_fetch()
        self._init_completion()
        self._csts = 0
        self._gen = 0
        self._shutting_down = False
        self._enable_pending = False
        self._draining: list[SubmissionQueue] = []
        self.shadow = ShadowDoorbells()
        self._init_health()
        self.page_size = 4096
        self.mdts_bytes: int | None = (4096 << cfg.mdts) if cfg.mdts else None
        self._init_queues(cfg.max_ioqpairs + 1)
        self.interrupts = Interrupts(self, self._cqs, self.timer, cfg.msix_vectors)

        # logs, counters, persistent state
        self.error_log = ErrorLog(cfg.elpe + 1)
        self.smart = self._make_smart(cfg.temperature)
        #: per-namespace SMART counters (:mod:`pcidev_nvme.ns_smart`; with SR-IOV the primary's:
        #: the namespaces are the subsystem's)
        self.ns_smart = self._make_ns_smart()
        self.firmware = FirmwareSlots(cfg.fw_slots, cfg.firmware)
        self.changed_ns = ChangedNamespaces()
        #: atomic write limits and the range locks that keep them (:mod:`pcidev_nvme.atomicity`;
        #: DN comes from the features)
        self.atomicity = Atomicity(cfg.awun, cfg.awupf)
        self.features = Features(self)
        self.aer = AsyncEvents(self.complete, cfg.aerl + 1, cfg.aer_max_queued)
        #: endurance group 1 as this controller reports it (:mod:`pcidev_nvme.endurance`)
        self.endurance = EnduranceGroup(
            self.aer, lambda: [c.smart for c in self.subsystem_live_controllers()], self.endurance_totals,
            lambda: (self.total_capacity, self.unallocated_capacity),
            lambda: self.features.aec, changed=lambda: self.endurance_changed())
        #: Write Uncorrectable marks (:mod:`pcidev_nvme.uncorrectable`; with SR-IOV one object
        #: for the primary and its secondaries: the namespaces are shared)
        self.uncorrectable = self._make_uncorrectable()

        self._init_namespaces()
        try:
            self._make_namespaces()
            self._init_persist()
            for nsid in sorted(self.allocated):
                self.uncorrectable.load(nsid)
            self.io = self._make_io()
            #: Abort of outstanding commands (:mod:`pcidev_nvme.abort`)
            self.aborts = Aborts(self, self.io, self.aer)
            #: Device Self-test (:mod:`pcidev_nvme.selftest`)
            self.selftest = SelfTest(self, self.uncorrectable, lambda: self.smart.power_on_hours)
            self.selftest.edstt_seconds = lambda: 60.0 * edstt_minutes(self.total_capacity)  # (follows TNVMCAP)
            self.selftest.time_scale = 1.0 / cfg.selftest_speedup
            #: Sanitize (:mod:`pcidev_nvme.sanitize`)
            self.sanitizer = Sanitizer(self, self.uncorrectable, self._sanitize_event, self._sanitize_refuse,
                                       lambda: self.smart.host_write_commands, on_start=self._sanitize_started,
                                       pmr_enabled=lambda: self.pmr is not None and self.pmr.enabled)
            self.io.altered = self.sanitizer.data_written
            self.io.verify_limit = 4096 << cfg.vsl if cfg.vsl else 0  # (VSL: units of CAP.MPSMIN)
            self.io.copy_formats_enabled = lambda: self.features.copy_formats_enabled  # (HBS CDFE)
            self.io.claim_status = lambda nsid: self._formatting.get(nsid)  # (a Copy's source namespace)
            self.io.dulbe = self.features.dulbe_enabled  # (Error Recovery DULBE)
            self.restore_persisted_sanitize()  # a sanitize survives a restart (the state file)
            self.restore_persisted_self_test()  # and the self-test results, an extended test
            if cfg.smart_critical_warning:  # (QEMU's smart_critical_warning: set at start)
                self.smart.inject_warning(cfg.smart_critical_warning)
            if self.pmr is not None:  # NRDY while a sanitize runs or failed; enabling clears Global Data Erased
                self.pmr.held = lambda: bool(self.sanitizer.refuses())
                self.pmr.on_enable = self.sanitizer.data_written
            self.sanitizer.rate = float(cfg.sanitize_rate) or None
            self.admin = AdminCommandSet(self)
        except BaseException:
            self._close_namespaces()
            self.timer.close()
            if self.cmb is not None:
                self.cmb.close()
            if self.pmr is not None:
                self.pmr.close()
            raise

    # ------------------------------------------------------------------ description
    def describe(self) -> None:
        cfg = self.cfg
        #: the controller's DMA view while the CMB or PMR has controller memory space, else None
        self._ctrl_memory: ControllerMemoryView | None = None
        #: serializes changes of the CMB's and PMR's windows and the view composed of them
        self._windows_lock = threading.RLock()
        self.cmb: ControllerMemoryBuffer | None = None
        self.pmr: PersistentMemoryRegion | None = None
        try:
            #: the Controller Memory Buffer (BAR2), or None without ``cmb_size``
            self.cmb = (ControllerMemoryBuffer(cfg.cmb_size, self.name, self._windows_changed,
                                               other=self._pmr_range, lock=self._windows_lock,
                                               legacy=cfg.legacy_cmb, bar_base=self._cmb_bar_base)
                        if cfg.cmb_size else None)
            #: the Persistent Memory Region (BAR4), or None without ``pmr``
            self.pmr = (PersistentMemoryRegion(cfg.pmr, int(cfg.pmr_size), self.name, self._windows_changed,
                                               other=self._cmb_range, lock=self._windows_lock)
                        if cfg.pmr is not None else None)
            self._describe_bars()
        except BaseException:
            if self.cmb is not None:
                self.cmb.close()
            if self.pmr is not None:
                self.pmr.close()
            raise

    def _describe_bars(self) -> None:
        """BAR0's registers, BAR2 (CMB), BAR4 (PMR or MSI-X), MSI-X, the PCIe
        capabilities and SR-IOV (part of :meth:`describe`)."""
        cfg = self.cfg
        extra = [*(self.cmb.registers() if self.cmb is not None else ()),
                 *(self.pmr.registers() if self.pmr is not None else ())]
        # (a legacy CMB has no CMBMSC: CAP.CMBS clear)
        self._cap = cap_value(cfg.mqes, cmbs=self.cmb is not None and not cfg.legacy_cmb, pmrs=self.pmr is not None)
        regs = build_register_map(f"nvme-bar0[{self.name}]", self._cap, intms=lambda r: self.interrupts.intms,
                                  on_intms=self._intms_written, on_intmc=self._intmc_written,
                                  on_cc=self._cc_written, csts=lambda r: self._csts, extra=extra,
                                  on_csts=self._csts_written, on_nssr=self._nssr_written)
        self.regs = regs
        layout = bar_layout(cfg.max_ioqpairs, cfg.msix_vectors, cfg.msix_bar)
        self._db_window = layout.doorbell_window
        bar0 = Bar0(regs, self._doorbell_write, layout.doorbell_window, components=extra)
        self.add_mem_bar(0, layout.bar0_size, bar0, bits64=True)
        if self.cmb is not None:
            self.add_mem_bar(CMB_BAR, self.cmb.bar_size, self.cmb.ram, bits64=True, prefetchable=True)
            if cfg.legacy_cmb:  # the legacy CMB follows BAR2's address and memory decoding
                self.config.add_write_hook(ids.BASE_ADDRESS_0 + 4 * CMB_BAR, 8, self._cmb_bar_written)
                self.config.add_write_hook(ids.COMMAND, 2, self._cmb_bar_written)
        if self.pmr is not None:
            self.add_mem_bar(PMR_BAR, self.pmr.size, self.pmr.ram, bits64=True, prefetchable=True)
        if layout.bar4_size:
            self.add_mem_bar(4, layout.bar4_size, ZeroBar(), bits64=True)
        self.add_msix(cfg.msix_vectors, bar=layout.msix_bar, table_offset=layout.table_offset,
                      pba_offset=layout.pba_offset)
        self.add_standard_pcie_caps(flr=True, aer=True)
        virt = self.virtualization
        if virt is not None:  # SR-IOV: each VF a secondary controller with BAR0 sized for its maximum
            vf = bar_layout(virt.res.max_vq_per_vf - 1, virt.res.max_vi_per_vf, 0)
            self.sriov = add_sriov(self, total_vfs=virt.res.max_vfs, vf_device_id=cfg.device_id,
                                   factory=self._make_vf, vf_bars=[VfBar(0, vf.bar0_size, bits64=True)],
                                   layout=lambda num_vfs, ari: (1, 1))

    def enabled_features(self) -> set[str]:
        """PciDevice's features and the optional NVMe features this controller uses
        (:func:`pcidev_nvme.migration.features`)."""
        return super().enabled_features() | migration_features(self)

    # ------------------------------------------------------------------ SR-IOV (primary controller)
    def _make_vf(self, pf: PciDevice, k: int) -> NvmeVirtualFunction:
        return NvmeVirtualFunction(self, k)

    def subsystem_live_controllers(self) -> list[NvmeController]:
        """The NVM subsystem's controllers that exist now: this one and, on a primary
        controller, the secondaries whose VF is enabled (their SMART counters make up the
        endurance group's)."""
        return [self, *(vf for vf in self.virtual_functions if isinstance(vf, NvmeVirtualFunction))]

    def endurance_to_persist(self) -> MediaTotals:
        """Beyond this controller's SMART counters: the retired secondaries' and the live
        ones' (they have no state file: after a restart they count from zero, and what they
        did stays in the group's totals as retired)."""
        totals = self.endurance.retired
        for vf in self._secondaries():
            totals = totals + MediaTotals.of(vf.smart, vf.error_log.count)
        return totals

    def endurance_changed(self) -> None:
        """The group's warnings or feature 18h may have changed: every live controller of
        the subsystem checks (a warning appearing on one is the group's, in each one's
        Endurance Group Event Aggregate log)."""
        for c in self.subsystem_live_controllers():
            c.endurance.check(ready=c.fsm_state == "ready")

    def endurance_totals(self) -> MediaTotals:
        """The endurance group's counters: every live controller's, and those of the
        secondaries that are gone (kept by this primary's endurance group)."""
        totals = self.endurance.retired
        for c in self.subsystem_live_controllers():
            totals = totals + MediaTotals.of(c.smart, c.error_log.count)
        return totals

    def set_device_state(self, state: NvmeState) -> None:
        """Apply a checked state (a load). With SR-IOV the live secondaries are about to be
        replaced by the stream's (or, if the load fails, kept and resumed): their counters
        are in neither the loaded endurance group's nor, once closed, the destination's, so
        closing them now retires nothing (:meth:`NvmeVirtualFunction.close`)."""
        for vf in self._secondaries():
            vf.retires_counters = False
        super().set_device_state(state)

    def _secondary(self, k: int) -> NvmeVirtualFunction | None:
        """The live controller of secondary ``k`` (its VF is enabled), else None."""
        vfs = self.virtual_functions
        vf = vfs[k] if k < len(vfs) else None
        return vf if isinstance(vf, NvmeVirtualFunction) else None

    def _secondary_offline(self, k: int) -> None:
        vf = self._secondary(k)
        if vf is not None:
            vf.went_offline()

    def _secondary_attached_changed(self, k: int) -> None:
        vf = self._secondary(k)
        if vf is not None and self.virtualization is not None:
            vf.take_attached(self.virtualization.attached(k))

    def selftests_namespace_changed(self, nsid: int, result: int) -> None:
        """Namespace ``nsid`` was formatted or deleted: the device self-test of every
        controller of the subsystem covering it ends with ``result`` (this one's and, on a
        primary controller, its secondaries', which run their own: DSTO bit 0 clear)."""
        self.selftest.namespace_changed(nsid, result)
        for vf in self._secondaries():
            vf.selftest.namespace_changed(nsid, result)

    def remove_namespace(self, nsid: int) -> RemovedNamespace:
        """Delete namespace ``nsid`` (see :meth:`NamespaceSetMixin.remove_namespace`), also
        from every secondary controller it is attached to."""
        removed = super().remove_namespace(nsid)
        self.ns_smart.forget(nsid)
        self.features.forget_namespace(nsid)  # (a namespace created again starts at the defaults)
        if self.virtualization is not None:
            self.virtualization.namespace_deleted(nsid)
        return removed

    @property
    def io_queue_limit(self) -> int:
        """I/O queue pairs offered now: ``max_ioqpairs``, or with SR-IOV the private ones
        plus the flexible ones allocated to this primary."""
        virt = self.virtualization
        return self.cfg.max_ioqpairs if virt is None else virt.primary_io_queues

    @property
    def vector_limit(self) -> int:
        """Interrupt vectors offered now (``msix_vectors``, or the private plus flexible ones)."""
        virt = self.virtualization
        return self.cfg.msix_vectors if virt is None else virt.primary_vectors

    def adjust_oacs(self, oacs: int) -> int:
        """Identify Controller OACS: Virtualization Management on a primary controller."""
        return oacs | (OACS_VMS if self.virtualization is not None else 0)

    def adjust_identify(self, buf: bytearray) -> None:
        """The last word on Identify Controller (CNS 01h): with SR-IOV, CMIC bit 1 (the NVM
        subsystem may hold two or more controllers: the primary and its secondaries share
        the subsystem NQN, and Linux accepts a second controller only with this bit), and
        DSTO bit 0 clear (each controller runs its own device self-test)."""
        if self.virtualization is not None:
            buf[76] |= CMIC_MULTI_CTRL
            buf[_OFF_DSTO] &= ~_DSTO_ONE_PER_SUBSYSTEM

    # -- the subsystem's shared namespaces: the primary's Format NVM and Sanitize cover the
    # -- secondaries' I/O too (they share the namespace table)
    def _secondaries(self) -> list[NvmeVirtualFunction]:
        return [vf for vf in list(self.virtual_functions) if isinstance(vf, NvmeVirtualFunction)]

    def io_inflight_for(self, nsids: set[int]) -> bool:
        """Whether an I/O command for one of ``nsids`` is in flight on this controller or,
        for a primary, on one of its secondary controllers."""
        return (super().io_inflight_for(nsids) or self.io.copying_from(nsids)  # (Copy source namespaces too)
                or any(vf.io_inflight_for(nsids) for vf in self._secondaries()))

    def subsystem_controllers(self) -> list[int]:
        """The CNTLIDs of the NVM subsystem's controllers: this one and its secondaries (CNS 13h)."""
        virt = self.virtualization
        return virt.controller_ids() if virt is not None else [self.cfg.cntlid]

    def controllers_attached(self, nsid: int) -> list[int]:
        """The CNTLIDs of the controllers namespace ``nsid`` is attached to (CNS 12h)."""
        ids = [self.cfg.cntlid] if nsid in self.namespaces else []
        return ids + (self.virtualization.attached_to(nsid) if self.virtualization is not None else [])

    def add_namespace(self, nsid: int, ns: Namespace, *, created_spec: str | None = None,
                      attached: bool = False) -> None:
        """Allocate namespace ``nsid`` (see :meth:`NamespaceSetMixin.add_namespace`); with SR-IOV
        it may be attached to the secondary controllers too: Identify Namespace NMIC bit 0."""
        super().add_namespace(nsid, ns, created_spec=created_spec, attached=attached)
        if self.virtualization is not None:
            ns.shared = True

    def _make_smart(self, temperature: int) -> SmartCounters:
        """The SMART / Health counters (a secondary controller's also tell the primary's
        sanitize status of its writes)."""
        return SmartCounters(temperature)

    def _make_uncorrectable(self) -> Uncorrectable:
        """The Write Uncorrectable marks (a secondary controller uses its primary's)."""
        return Uncorrectable(self._wu_sidecar)

    def _make_ns_smart(self) -> NamespaceSmart:
        """The per-namespace SMART counters (a secondary controller uses its primary's)."""
        return NamespaceSmart()

    def enable_refusal(self) -> str | None:
        """Why CC.EN cannot make the controller ready beyond the register checks (None here;
        a secondary controller that is offline or lacks resources)."""
        return None

    def check_vf_streams(self, streams: Sequence[bytes]) -> None:
        """SR-IOV, the check phase of a load: each VF's stream decodes, and its secondary
        controller agrees with the primary's records this load brings (accepted by
        :meth:`check_device_state` just before): the namespaces attached to it, enabled only
        online and with resources, no queue beyond NVQ. So such a stream is refused before
        anything is applied, not when the VF loads after the primary's state was applied
        (each VF's own stream is checked in full then).

        :raises StateError: naming the VF and the field.
        """
        virt = self.virtualization
        records = virt.checked if virt is not None else None
        if virt is None or records is None:
            return
        for k, data in enumerate(streams[:virt.res.max_vfs]):
            where = f"vfs[{k}].stream"
            try:
                header = peek_header(data)
                cntlid = header.fingerprint.get("nvme.cntlid")
                if cntlid != virt.scid(k):  # (another VF's stream)
                    diff = f"nvme.cntlid: stream has {cntlid!r}, this device has {virt.scid(k)}"
                    raise ConfigMismatchError(f"VF {k}: device configuration differs from the stream's: {diff}",
                                              differences=[diff], section=SRIOV_SECTION, instance_id=0, path=where)
                sections = load_sections(data, device_type=header.device_type, fingerprint=header.fingerprint,
                                         descriptions=[FunctionState, NvmeState])
            except ConfigMismatchError:
                raise
            except VMStateError as exc:
                raise StateError(f"VF {k}: {exc}", section=SRIOV_SECTION, instance_id=0, path=where) from exc
            st = next((s.state for s in sections if s.name == NVME_SECTION), None)
            if not isinstance(st, NvmeState):
                raise StateError(f"VF {k}: the stream has no {NVME_SECTION} section", section=SRIOV_SECTION,
                                 instance_id=0, path=where)
            problem = secondary_problem(virt, k, st, set(self.allocated), records)
            if problem is not None:
                raise StateError(f"VF {k}: secondary controller {virt.scid(k)}: {problem[0]}", section=SRIOV_SECTION,
                                 instance_id=0, path=f"{where}:{NVME_SECTION}.{problem[1]}")

    # ------------------------------------------------------------------ contract
    @property
    def dma(self) -> GuestMemory:
        """Guest memory for DMA (see :attr:`pcidev.device.PciDevice.dma`); while the
        CMB's or PMR's controller memory space is enabled, the view that sends their
        addresses to them (:class:`~pcidev_nvme.controller_memory.ControllerMemoryView`)."""
        memory = self.memory
        if memory is not None and self.config.data[_COMMAND] & _MASTER:
            view = self._ctrl_memory
            return memory if view is None else view.over(memory)
        return super().dma  # raises DmaError

    def _windows_changed(self) -> None:
        """The CMB's or PMR's controller memory space changed: recompose the DMA view."""
        with self._windows_lock:
            windows = [w for w in (self.cmb.window if self.cmb is not None else None,
                                   self.pmr.window if self.pmr is not None else None) if w is not None]
            self._ctrl_memory = ControllerMemoryView(windows) if windows else None

    def _cmb_bar_base(self) -> int | None:
        """BAR2's bus address while it is assigned and memory decoding is on (the legacy CMB's
        place), else None."""
        if not self.command & ids.Command.MEMORY:
            return None
        return self.bar_address(CMB_BAR) or None

    def _cmb_bar_written(self, offset: int, size: int, old: int, value: int) -> None:
        if self.cmb is not None:
            self.cmb.bar_moved()

    def _cmb_range(self) -> tuple[int, int] | None:
        return self.cmb.enabled_range if self.cmb is not None else None

    def _pmr_range(self) -> tuple[int, int] | None:
        return self.pmr.enabled_range if self.pmr is not None else None

    @property
    def ready(self) -> bool:
        """CSTS.RDY."""
        return bool(self._csts & CSTS_RDY)

    @property
    def csts(self) -> int:
        return self._csts

    @property
    def volatile_write_cache(self) -> bool:
        """Feature 06h WCE: False means every write must be durable before it completes."""
        return self.features.write_cache

    def close(self) -> None:
        """Power off: stop timers and workers, save the state file, close namespaces. Idempotent.

        A controller that was enabled and not shut down (CC.SHN) counts an
        unsafe shutdown at its next power-on. A controller whose state is not its
        own (:attr:`~pcidev.device.PciDevice.owns_state` False: it migrated away,
        or it waited for a migration that never came) writes no state file: the
        process that runs the controller keeps it.
        """
        if self._closed:
            return
        self._closed = True
        self._running = False
        self.remove_virtual_functions()  # SR-IOV: the secondaries go first (they use the namespaces)
        self.timer.close()
        self.sanitizer.close()
        self.selftest.close()
        try:
            self.io.close()
        except Exception:
            log.exception("closing the I/O command set failed")
        self.admin_worker.shutdown()
        if self.owns_state:  # not after a migration out: the destination owns the state file
            self.save_state()
            self.uncorrectable.release_deferred()  # (a load's, never resumed: its sidecars)
        self.uncorrectable.flush()
        self.load_undo.commit()  # what a load replaced (never rolled back now)
        if self.owns_state:  # (a destination that never ran writes nothing beside the images)
            self.load_undo.remember(self.allocated)
        self._close_namespaces()
        if self.cmb is not None:
            self.cmb.close()
        if self.pmr is not None:
            self.pmr.close()
        super().close()

    def __enter__(self) -> NvmeController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ registers
    def _intms_written(self, reg: Register, new: int, old: int) -> None:
        reg.value = 0
        self.interrupts.mask(new)

    def _intmc_written(self, reg: Register, new: int, old: int) -> None:
        reg.value = 0
        self.interrupts.unmask(new)

    def _cc_written(self, reg: Register, new: int, old: int) -> None:
        with self.state_lock:
            en_old, en_new = old & CC_EN, new & CC_EN
            if en_old and en_new:
                # CSS, MPS and AMS may only change while disabled
                keep = 0x3FF0
                new = (new & ~keep) | (old & keep)
                reg.value = new
            if not en_old and en_new:
                self._enable()
            elif en_old and not en_new:
                self._begin_reset()
            shn_old, shn_new = (old >> 14) & 3, (new >> 14) & 3
            if shn_new != shn_old:
                if shn_new:
                    self._begin_shutdown(abrupt=shn_new == 2)
                else:
                    self._set_shst(SHST_NORMAL)
                    self._shutting_down = False
                    self.update_running()

    def _csts_written(self, reg: Register, new: int, old: int) -> None:
        """CSTS: NSSRO is write 1 to clear (the other fields are read-only)."""
        reg.value = 0
        if new & CSTS_NSSRO:
            with self.state_lock:
                self._csts &= ~CSTS_NSSRO

    def _nssr_written(self, reg: Register, new: int, old: int) -> None:
        """NSSR: writing 4E564D65h ("NVMe") resets the NVM subsystem; any other value is ignored.

        An NVM Subsystem Reset resets every controller of the subsystem -- this one and,
        on an SR-IOV primary, each live secondary controller (:meth:`subsystem_reset`; a
        secondary's CSTS.NSSRO stays clear: NSSRO is valid only with CAP.NSSRS, which a
        secondary controller clears).
        """
        reg.value = 0
        if new != NSSR_MAGIC:
            return
        log.info("%s: NVM Subsystem Reset", self.name)
        with self.state_lock:
            self.subsystem_reset()
        # the subsystem's other controllers reset too; their CSTS.NSSRO stays clear: the
        # field is valid only on a controller with CAP.NSSRS, which a secondary's is not
        for vf in self._secondaries():
            with vf.lock:  # (as its own register writes: a CC write never sees half of it)
                vf.subsystem_reset(nssro=False)

    def subsystem_reset(self, *, nssro: bool | None = None) -> bool:
        """This controller's part of an NVM Subsystem Reset: it resets at once (commands in
        flight complete into nothing), CC, AQA, ASQ and ACQ go back to their defaults (the
        host enables the controller again), and the Controller Memory Buffer (CMBMSC,
        CMBSTS) and the Persistent Memory Region (PMRCTL, PMRMSC; its contents stay) are
        disabled; CSTS.NSSRO is then set -- unless the reset activated a new firmware image
        (a slot committed with "activate at the next reset"). What survives a controller
        reset survives it too: a sanitize operation in progress continues, an extended
        self-test continues (a short one is aborted), a Format NVM in progress finishes.
        The PCI function (configuration space, BARs, MSI-X) is not reset: the link stays up.

        :param nssro: whether to set CSTS.NSSRO (False on a secondary controller); None:
            unless the reset activated another firmware slot.
        :returns: whether CSTS.NSSRO was set.
        """
        with self.state_lock:
            self._reset_memory_regions(ResetKind.CONVENTIONAL)
            firmware = self.firmware.active
            self._gen += 1
            self._drop_parked()
            self._state = ST_RESETTING
            self._draining = []
            self._shutting_down = False
            self._csts = 0
            self._enable_pending = False
            regs = self.regs
            for name in ("CC", "AQA", "ASQ", "ACQ"):
                regs[name].value = 0
            self._finish_reset()
            if nssro is None:
                nssro = self.firmware.active == firmware
            if nssro:
                self._csts |= CSTS_NSSRO
            return nssro

    def _reset_memory_regions(self, kind: ResetKind) -> None:
        """The PMR, then the CMB, back to their reset values for a reset of ``kind`` (a PCI
        reset; an NVM Subsystem Reset resets them as a conventional one: the PMR disabled,
        CMBMSC cleared; an FLR keeps CMBMSC)."""
        if self.pmr is not None:
            self.pmr.reset()
        if self.cmb is not None:
            self.cmb.reset(kind)

    def _sanitize_refuse(self, status: int) -> None:
        """What I/O completes with while a sanitize runs or failed (0: executed); a sanitize
        acts on the whole NVM subsystem: the secondary controllers' I/O reads this
        controller's value (:class:`_SecondaryIo`)."""
        self.io.refuse = status

    def _make_io(self) -> IoCommandSet:
        """The I/O command set (called once the namespaces and Write Uncorrectable marks exist)."""
        return IoCommandSet(self, uncorrectable=self.uncorrectable, atomicity=self.atomicity)

    def _sanitize_started(self) -> None:
        """A sanitize operation started: a device self-test in progress is aborted; the
        state file is written soon (a sanitize continues after a restart)."""
        self.selftest.abort(RESULT_ABORTED_SANITIZE)
        for vf in self._secondaries():  # a sanitize of the subsystem aborts their self-tests too
            vf.selftest.abort(RESULT_ABORTED_SANITIZE)
        self.aer.discard(*SANITIZE_COMPLETED_EVENT)  # one of an earlier operation, not reported yet
        self.save_soon()

    def _sanitize_event(self, etype: int, info: int, lid: int) -> None:
        """A sanitize operation ended: its event, and the state file written soon."""
        self.aer.post(etype, info, lid)
        self.save_soon()

    def _wu_sidecar(self, nsid: int) -> str | None:
        """The Write Uncorrectable sidecar of namespace ``nsid`` (beside its image), or None."""
        ns = self.allocated.get(nsid)
        if ns is None:
            return None
        path = getattr(ns.backend, "path", None)  # a file backend's image (not in the Backend protocol)
        if not isinstance(path, str) or not path or not may_write_beside(ns.backend):
            return None
        return path + SIDECAR_SUFFIX

    def _set_shst(self, shst: int) -> None:
        self._csts = (self._csts & ~(3 << CSTS_SHST_SHIFT)) | (shst << CSTS_SHST_SHIFT)

    def update_running(self) -> None:
        """Recompute :attr:`running` (after a change of state, shutdown, pause or close)."""
        ready = self._state == ST_READY and not self._shutting_down and not self._closed
        self._doorbells_open = ready
        self._running = ready and not self.paused

    # ------------------------------------------------------------------ enable / reset / shutdown
    def _enable(self) -> None:
        """CC.EN 0→1: validate and bring up the admin queues (CSTS.RDY=1), or set CSTS.CFS."""
        if self._state == ST_RESETTING:
            self._enable_pending = True
            return
        if self._state == ST_FAILED or self._csts & CSTS_RDY:
            return
        regs = self.regs
        aqa, asq, acq = regs["AQA"].value, regs["ASQ"].value, regs["ACQ"].value
        asqs, acqs = (aqa & 0xFFF) + 1, ((aqa >> 16) & 0xFFF) + 1
        mps = (regs["CC"].value >> 7) & 0xF
        problem = enable_problem(regs["CC"].value, aqa, asq, acq) or self.enable_refusal()
        mem = self.memory  # bus mastering may still be off: only check the ranges
        if problem is None and mem is not None:
            view = self._ctrl_memory  # (the admin SQ may be in the CMB: CMBSZ.SQS)
            cmb = self.cmb.window if self.cmb is not None else None
            try:
                if cmb is not None and cmb.overlaps(acq, acqs * 16):
                    raise DmaError("ACQ is in the controller memory buffer (CMBSZ.CQS is 0)")
                pmr = self.pmr.window if self.pmr is not None else None
                if pmr is not None and (pmr.overlaps(asq, asqs * SQE_SIZE) or pmr.overlaps(acq, acqs * 16)):
                    # (as I/O queues, pmr.refuse_queue: PMRCAP has no queue support)
                    raise DmaError("an admin queue is in the persistent memory region")
                if view is not None:
                    mem = view.over(mem)
                for v in mem.views(asq, asqs * SQE_SIZE) + mem.views(acq, acqs * 16, write=True):
                    v.release()
            except DmaError as exc:
                problem = f"admin queues are not in guest memory: {exc}"
        if problem is not None:
            log.warning("%s: refusing to enable: %s; CSTS.CFS set", self.name, problem)
            self._csts |= CSTS_CFS
            return
        self.page_size = 4096 << mps
        self.features.reset()
        acq_obj = CompletionQueue(0, acq, acqs, 0, True)
        self.add_cq(acq_obj)
        self.add_sq(SubmissionQueue(0, asq, asqs, acq_obj))
        self._state = ST_READY
        self._csts = (self._csts & ~CSTS_CFS) | CSTS_RDY
        self.keep_alive()
        self.update_running()
        self.mark_dirty()

    def _begin_reset(self) -> None:
        """CC.EN 1→0: stop fetching; the reset finishes when every command in flight has."""
        if self._state == ST_DISABLED:
            self._csts &= ~(CSTS_RDY | CSTS_CFS)
            self._enable_pending = False
            return
        if self._state == ST_RESETTING:
            return
        self._state = ST_RESETTING
        self._enable_pending = False
        self.update_running()
        self._gen += 1
        self._drop_parked()
        old = [sq for sq in self._sqs if sq is not None]
        for sq in old:
            sq.gone = True
        for cq in self._cqs:
            if cq is not None:
                cq.gone = True
        self._draining = old
        self._check_drained()

    def _drop_parked(self) -> None:
        for req in self.aer.reset():
            sq = req.sq
            if sq is not None:
                with sq.cq.lock:
                    if sq.inflight.get(req.cid) is req:
                        del sq.inflight[req.cid]
                    req.done = True

    def _stale_completed(self) -> None:
        if self._state == ST_RESETTING:
            self._check_drained()

    def _check_drained(self) -> None:
        with self.state_lock:
            if self._state != ST_RESETTING:
                return
            if any(sq.inflight for sq in self._draining):
                return
            self._finish_reset()

    def _finish_reset(self) -> None:
        """Everything in flight is done: delete all queues, reset features, CSTS.RDY=0."""
        self._draining = []
        self.clear_queues()
        self.features.reset()
        self.interrupts.reset()
        self.shadow.reset()
        # (not the namespaces being formatted: a Format NVM runs on in the admin worker,
        # whose end of format releases them -- until then their I/O is Format In Progress)
        self.smart.clear_reported()
        self.endurance.reset()
        self.keep_alive_stop()
        self.timer.cancel_all()
        self.irq.set_intx(False)
        if self.firmware.activate_pending():
            log.info("%s: firmware slot %d active after reset", self.name, self.firmware.active)
        self.selftest.controller_reset()
        self.aborts.forget_queue()
        self._state = ST_DISABLED
        self._csts &= ~(CSTS_RDY | CSTS_CFS)
        self.failed = None
        if self.virtualization is not None:  # the pending flexible allocation applies
            self.virtualization.primary_reset()
        self.update_running()
        if self._enable_pending or self.regs["CC"].value & CC_EN:
            self._enable_pending = False
            self._enable()

    def _begin_shutdown(self, *, abrupt: bool) -> None:
        if self._state != ST_READY:
            self._set_shst(SHST_COMPLETE)
            self.mark_clean()
            return
        self._shutting_down = True
        self.update_running()
        self._set_shst(SHST_PROCESSING)
        self.admin_worker.submit(self._shutdown_work, abrupt)

    def _shutdown_work(self, abrupt: bool) -> None:
        deadline = time.monotonic() + (0 if abrupt else SHUTDOWN_DRAIN_TIMEOUT)
        while time.monotonic() < deadline:
            busy = any(any(not r.parked for r in list(sq.inflight.values()))
                       for sq in list(self._sqs) if sq is not None)
            if not busy:
                break
            time.sleep(0.001)
        for ns in list(self.namespaces.values()):
            try:
                ns.flush()
            except Exception as exc:
                log.warning("%s: flushing namespace %d at shutdown failed: %s", self.name, ns.nsid, exc)
        with self.state_lock:
            self.mark_clean()
            if self._shutting_down:
                self._set_shst(SHST_COMPLETE)

    def on_reset(self, kind: ResetKind) -> None:
        """A PCI-level reset (conventional, FLR, power-on): the controller resets at once.

        Commands still in flight complete into nothing (their completions are
        dropped; bus mastering is off after the reset, so they cannot DMA either).
        """
        with self.state_lock:
            self._reset_memory_regions(kind)
            self._gen += 1
            self._drop_parked()
            self._state = ST_RESETTING
            self._draining = []
            self._shutting_down = False
            # NSSRO survives every reset but a power-on
            self._csts = 0 if kind is ResetKind.POWER_ON else self._csts & CSTS_NSSRO
            self._enable_pending = False
            self._finish_reset()
            if kind is ResetKind.POWER_ON:
                self.count_power_on()

    def on_failure(self, exc: BaseException) -> None:
        """A register handler raised: the controller is fatally failed (CSTS.CFS)."""
        self._fatal(f"internal error: {type(exc).__name__}: {exc}")

    def _fatal(self, why: str) -> None:
        log.error("%s: controller fatal status: %s", self.name, why)
        with self.state_lock:
            self._csts |= CSTS_CFS
            if self._state == ST_READY:
                self._state = ST_FAILED
            self.update_running()

    # ------------------------------------------------------------------ interrupts
    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write (see :meth:`pcidev.device.PciDevice.config_write`); when
        it turns MSI-X on or off while a transport polls, every EventIdx is published
        again: a lazy CQ EventIdx is only for MSI-X (with INTx or MSI the pin status
        needs prompt heads)."""
        msix = self.msix
        before = msix is not None and msix.enabled
        super().config_write(offset, size, value)
        if msix is not None and msix.enabled != before and self.shadow.polling:
            self.rearm_event_idx()

    @property
    def msix(self) -> MsixCapability | None:
        """The MSI-X capability (found once, after :meth:`describe`)."""
        cap = self.__dict__.get("_msix_cap")
        if cap is None:
            cap = self.caps.find(MsixCapability)
            self.__dict__["_msix_cap"] = cap
        return cap

    # ------------------------------------------------------------------ state for migration
    @property
    def fsm_state(self) -> str:
        """The state machine: "disabled", "ready", "resetting" or "failed"."""
        return self._state

    @property
    def running(self) -> bool:
        """Commands are fetched (ready, not shutting down, not paused, not closed)."""
        return self._running

    def snapshot(self) -> ControllerState:
        """The registers and the state machine."""
        regs = self.regs
        return ControllerState(state=self._state, cc=regs["CC"].value, csts=self._csts, aqa=regs["AQA"].value,
                               asq=regs["ASQ"].value, acq=regs["ACQ"].value, shutting_down=self._shutting_down,
                               dirty=self.dirty, page_size=self.page_size)

    def restore(self, st: ControllerState) -> None:
        """Take the registers and state machine of a checked state (call with
        :attr:`state_lock` held). Every queue and parked request is dropped, fetching
        stays paused until :meth:`finish_restore` and the migration's resume."""
        self.pause()
        self._gen += 1
        for req in self.aer.reset():
            req.done = True
        self.clear_queues()
        self._draining = []
        self._enable_pending = False
        self.formats_cleared()
        regs = self.regs
        regs["CC"].value = st.cc
        regs["AQA"].value = st.aqa
        regs["ASQ"].value = st.asq
        regs["ACQ"].value = st.acq
        self._csts = st.csts
        self._state = st.state
        self._shutting_down = st.shutting_down
        self.restore_dirty(st.dirty)
        self.page_size = st.page_size

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return (f"<NvmeController {self.name!r} {self.vendor_id:04x}:{self.device_id:04x} "
                f"state={self._state} csts={self._csts:#x} ns={sorted(self.namespaces)}>")


def secondary_problem(virt: Virtualization, k: int, state: NvmeState, allocated: set[int],
                      records: VirtualizationState | None = None) -> tuple[str, str] | None:
    """Why the saved state of secondary ``k``'s controller disagrees with the primary's
    records (:meth:`~pcidev_nvme.virtualization.Virtualization.secondary_problem`).

    :param records: the records a load brings (checked, not applied yet); None: the live ones.
    :returns: ``(reason, field path in the secondary's nvme section)``, or None.
    """
    return virt.secondary_problem(
        k, attached=[n.nsid for n in state.namespaces if n.attached], enabled=state.state != 0,
        nsq=state.features.nsq, ncq=state.features.ncq,
        queue_ids=[(name, i) for name, queues in (("sqs", state.sqs), ("cqs", state.cqs))
                   for i, q in enumerate(queues) if q is not None],
        allocated=allocated, records=records)


class _SecondarySmart(SmartCounters):
    """A secondary controller's SMART / Health counters: its host writes also alter the
    subsystem's data, so each counted write clears the primary's Global Data Erased.

    :param temperature: as :class:`~pcidev_nvme.logs.SmartCounters`.
    :param written: the primary sanitizer's ``data_written``.
    """

    def __init__(self, temperature: int, written: Callable[[], None]) -> None:
        super().__init__(temperature)
        self._written = written

    def record_write(self, nbytes: int) -> None:
        super().record_write(nbytes)
        self._written()

    def record_io(self, reads: int, read_bytes: int, writes: int, written_bytes: int) -> None:
        super().record_io(reads, read_bytes, writes, written_bytes)
        if writes:
            self._written()


class NvmeVirtualFunction(VirtualFunction, NvmeController):
    """A secondary controller: the NVMe controller of one VF of a primary controller.

    It shares the primary's namespaces (those attached to its CNTLID by Namespace
    Attachment), has its own queues, interrupts and registers, and its CNTLID is the
    primary's plus ``k + 1``. Its BAR0 is sized for ``sriov_max_vq_per_vf`` queues and
    ``sriov_max_vi_per_vf`` vectors; what it may use is what Virtualization Management
    assigned (NVQ - 1 I/O queue pairs, NVI vectors), and CC.EN sets CSTS.CFS while it is
    offline. It manages no namespaces (no Namespace Management or Attachment).

    :param primary: the primary controller.
    :param k: the VF's index (0-based).
    """

    TYPE_NAME = "nvme-vf"
    owns_namespaces = False  # the primary's (shared)

    def __init__(self, primary: NvmeController, k: int) -> None:
        virt = primary.virtualization
        if virt is None:
            raise ConfigError("nvme: the primary controller has no SR-IOV")
        res = virt.res
        # (no CMB or PMR: a VF has BAR0 only, and the PMR's file is the primary's)
        cfg = attrs.evolve(primary.cfg, max_ioqpairs=res.max_vq_per_vf - 1,
                           msix_vectors=res.max_vi_per_vf, msix_bar=0, cntlid=virt.scid(k), sriov_max_vfs=0,
                           sriov_vq_flexible=0, sriov_vi_flexible=0, sriov_max_vq_per_vf=0, sriov_max_vi_per_vf=0,
                           state_dir=None, state_file=None, cmb_size=0, legacy_cmb=False,
                           pmr=None)
        #: the primary controller and this secondary's index
        self.primary = primary
        self.secondary_index = k
        self._virt = virt
        super().__init__(cfg, name=f"{primary.name}-vf{k}")
        self.allocated = primary.allocated  # the primary's namespaces (one table, shared)
        self.created = primary.created
        self.configured = primary.configured
        self.set_attached(virt.attached(k) & set(self.allocated))
        # what acts on state beyond the I/O of its attached namespaces stays with the primary
        self.admin.remove_commands(Opcode.NS_MANAGEMENT, Opcode.NS_ATTACHMENT, Opcode.FORMAT_NVM,
                                   Opcode.SANITIZE, Opcode.FW_COMMIT, Opcode.FW_DOWNLOAD)
        self.atomicity.locks = primary.atomicity.locks  # one range lock table for the shared namespaces
        self.sanitizer.follow(primary.sanitizer)  # refusals, log 81h, Global Data Erased: the subsystem's
        self.endurance.follow(primary.endurance)  # feature 18h: the endurance group's (the primary's)
        #: whether closing this controller adds its counters to the primary's endurance group
        #: (:meth:`close`): from its first resume (its VF went live) until the primary applies
        #: a loaded state that replaces it (the loaded group's totals are the source's)
        self.retires_counters = False
        # a Format NVM of the primary covers this one too: the primary's set itself (never a
        # copy, which a format ending while the VF is built but not yet live would leave stale)
        self._formatting = primary._formatting

    def _make_io(self) -> IoCommandSet:
        """An I/O command set whose sanitize refusal is the primary's, read at each fetch
        (never a copy: a sanitize starting or ending while the VF is built but not yet live
        would leave it stale)."""
        return _SecondaryIo(self.primary.io, self, uncorrectable=self.uncorrectable, atomicity=self.atomicity)

    def begin_format(self, nsids: set[int], *, status: int = Status.FORMAT_IN_PROGRESS) -> list[int]:
        """Nothing: a secondary controller has no Format NVM, and its set of namespaces being
        formatted is the primary's (the primary marks them)."""
        return []

    def end_format(self, nsids: set[int]) -> None:
        """Nothing: the set is the primary's (see :meth:`begin_format`)."""

    def formats_cleared(self) -> None:
        """Nothing: a reset or restore of the secondary leaves the primary's Format NVM running."""

    def describe(self) -> None:
        """The controller's PCI function, without NVM Subsystem Reset (CAP.NSSRS clear: the
        subsystem is the primary's)."""
        super().describe()
        self._cap &= ~CAP_NSSRS
        cap = self.regs["CAP"]
        cap.reset = cap.value = self._cap

    def _nssr_written(self, reg: Register, new: int, old: int) -> None:
        """NSSR is reserved on a secondary controller (CAP.NSSRS clear): writes are ignored
        (the primary's NVM Subsystem Reset resets it, :meth:`subsystem_reset`)."""
        reg.value = 0

    def subsystem_controllers(self) -> list[int]:
        """The subsystem's controllers, as the primary knows them (CNS 13h)."""
        return self.primary.subsystem_controllers()

    def subsystem_live_controllers(self) -> list[NvmeController]:
        """The primary's view: one endurance group for the whole subsystem."""
        return self.primary.subsystem_live_controllers()

    def endurance_totals(self) -> MediaTotals:
        """The primary's: one endurance group for the whole subsystem."""
        return self.primary.endurance_totals()

    def on_resume(self) -> None:
        """Resume the controller; from now on its counters are the endurance group's
        (:attr:`retires_counters`)."""
        super().on_resume()
        self.retires_counters = True

    def close(self) -> None:
        """Close the secondary; when its VF is disabled (the primary stays), the primary's
        endurance group keeps counting what this controller read and wrote -- not when a
        load replaces it (:attr:`retires_counters`), nor for a VF a load built and discarded."""
        primary = self.primary
        # (also while the primary closes: it closes its VFs first, then saves the group's
        # counters in its state file, endurance_to_persist)
        if not self._closed and self.owns_state and self.retires_counters:
            primary.endurance.retire(MediaTotals.of(self.smart, self.error_log.count))
        super().close()

    def controllers_attached(self, nsid: int) -> list[int]:
        """The controllers namespace ``nsid`` is attached to, as the primary knows them (CNS 12h)."""
        return self.primary.controllers_attached(nsid)

    def _make_uncorrectable(self) -> Uncorrectable:
        """The primary's Write Uncorrectable marks: one object (and one sidecar writer) for
        the shared namespaces."""
        return self.primary.uncorrectable

    def _make_ns_smart(self) -> NamespaceSmart:
        """The primary's per-namespace counters: the namespaces are shared, their counters
        are the subsystem's."""
        return self.primary.ns_smart

    def _make_smart(self, temperature: int) -> SmartCounters:
        """This controller's counters, whose host writes clear the primary's Global Data
        Erased (the Sanitize Status is the NVM subsystem's)."""
        return _SecondarySmart(temperature, self.primary.sanitizer.data_written)

    def adjust_identify(self, buf: bytearray) -> None:
        """CMIC bits 1 and 2 (a controller of a multi-controller subsystem, on an SR-IOV VF);
        SANICAP 0 (no Sanitize on a secondary controller); DSTO bit 0 clear (a self-test per
        controller: the secondary's runs beside the primary's)."""
        buf[76] |= CMIC_MULTI_CTRL | CMIC_SRIOV_VF
        buf[328:332] = bytes(4)
        buf[_OFF_DSTO] &= ~_DSTO_ONE_PER_SUBSYSTEM

    @property
    def io_queue_limit(self) -> int:
        """I/O queue pairs: NVQ less the admin queue."""
        return max(min(self._virt.secondary(self.secondary_index)[1] - 1, self.cfg.max_ioqpairs), 1)

    @property
    def vector_limit(self) -> int:
        """Interrupt vectors: NVI."""
        return max(min(self._virt.secondary(self.secondary_index)[2], self.cfg.msix_vectors), 1)

    def adjust_oacs(self, oacs: int) -> int:
        """No Format NVM (bit 1), Firmware Commit/Download (bit 2) or Namespace Management
        (bit 3) on a secondary controller."""
        return oacs & ~_OACS_NOT_ON_SECONDARY

    def enable_refusal(self) -> str | None:
        """Offline, or without queue and interrupt resources: CC.EN sets CSTS.CFS."""
        return self._virt.enable_problem(self.secondary_index)

    def went_offline(self) -> None:
        """Virtualization Management took the secondary offline: a controller reset."""
        with self.lock, self.state_lock:
            if self._state != ST_DISABLED:
                self._begin_reset()
            self._csts &= ~CSTS_RDY

    def take_attached(self, nsids: set[int]) -> None:
        """The primary changed the namespaces attached to this secondary."""
        with self.state_lock:
            before = set(self.namespaces)
            self.set_attached(nsids & set(self.allocated))
            for nsid in sorted(before ^ set(self.namespaces)):
                if nsid not in self.namespaces:  # detached: a self-test covering it ends (3h)
                    self.selftest.namespace_changed(nsid, RESULT_ABORTED_NS_REMOVED)
                self.namespace_changed(nsid)

    # -- migration: a secondary's state loads inside its primary's stream ----------------------------------
    def check_device_state(self, state: NvmeState) -> None:
        """Refuse, beyond the controller's checks, a state that disagrees with the primary's
        records (loaded before the VFs): other attached namespaces, ready while offline or
        without resources, queues beyond NVQ.

        :raises StateError: naming the field.
        """
        super().check_device_state(state)
        k = self.secondary_index
        problem = secondary_problem(self._virt, k, state, set(self.allocated))
        if problem is not None:
            raise StateError(f"secondary controller {self._virt.scid(k)}: {problem[0]}", section=NVME_SECTION,
                             instance_id=0, path=problem[1])

    def set_device_state(self, state: NvmeState) -> None:
        """Apply a checked state; the shared namespaces' formats, memory and Write
        Uncorrectable marks stay as they are (they are the primary's, loaded with it)."""
        namespaces = tuple(self.allocated[n.nsid].snapshot(attached=n.attached) for n in state.namespaces)
        super().set_device_state(attrs.evolve(state, namespaces=namespaces,
                                              uncorrectable=self.uncorrectable.snapshot(), sanitize=None))
        # (a sanitize of the subsystem is the primary's, loaded before its VFs: its hold on I/O
        # applies here too, read from the primary by _SecondaryIo)

    def _make_namespaces(self) -> None:
        """The namespaces are the primary's (shared once built, see ``__init__``)."""

    def _close_namespaces(self) -> None:
        """The namespaces are the primary's: it closes them."""


class _SecondaryIo(IoCommandSet):
    """A secondary controller's I/O command set: what I/O completes with while the
    subsystem's sanitize runs or failed is the primary's :attr:`~IoCommandSet.refuse`, read
    when a batch is fetched.

    :param subsystem: the primary controller's I/O command set.
    :param args: as :class:`IoCommandSet`.
    :param kwargs: as :class:`IoCommandSet`.
    """

    def __init__(self, subsystem: IoCommandSet, *args: Any, **kwargs: Any) -> None:
        self._subsystem = subsystem
        super().__init__(*args, **kwargs)

    @property
    def refuse(self) -> int:
        """The primary's refusal (0: none)."""
        return self._subsystem.refuse

    @refuse.setter
    def refuse(self, status: int) -> None:
        """Ignored: the secondary never sanitizes by itself (its sanitizer follows the primary's)."""
