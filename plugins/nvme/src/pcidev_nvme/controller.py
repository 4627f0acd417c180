"""The NVMe controller: the PCI function (:meth:`NvmeController.describe`), the
enable/reset/shutdown state machine behind CC and CSTS, and the wiring of its parts.

The parts, each in its own module (``docs/nvme-contract.md`` has the table): BAR0
registers (:mod:`~pcidev_nvme.registers`), doorbells (:mod:`~pcidev_nvme.doorbells`),
the fetch loop (:mod:`~pcidev_nvme.fetch`), completions
(:mod:`~pcidev_nvme.completion`), queues (:mod:`~pcidev_nvme.queues`), interrupts
(:mod:`~pcidev_nvme.interrupts`), temperature and keep alive
(:mod:`~pcidev_nvme.health`), the state file (:mod:`~pcidev_nvme.persist`), the
command sets, and live migration (:mod:`~pcidev_nvme.migration`).

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

import concurrent.futures
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import attrs

from pcidev.bar import Register
from pcidev.device import PciDevice
from pcidev.errors import ConfigError, DmaError, PcidevError
from pcidev.pci import ids
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev.pci.config import ResetKind
from pcidev_nvme import aer as aer_mod
from pcidev_nvme import migration as _migration
from pcidev_nvme.admin import AdminCommandSet
from pcidev_nvme.aer import AsyncEvents
from pcidev_nvme.backends import BUILTIN_BACKENDS
from pcidev_nvme.completion import CompletionMixin
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.doorbells import DoorbellsMixin, ShadowDoorbells
from pcidev_nvme.features import Features
from pcidev_nvme.fetch import BatchState, FetchMixin
from pcidev_nvme.health import HealthMixin
from pcidev_nvme.interrupts import Interrupts, Timer
from pcidev_nvme.io import IoCommandSet
from pcidev_nvme.limits import SHUTDOWN_DRAIN_TIMEOUT
from pcidev_nvme.logs import ChangedNamespaces, ErrorLog, FirmwareSlots, SmartCounters
from pcidev_nvme.namespace import make_namespace, parse_spec
from pcidev_nvme.persist import PersistenceMixin
from pcidev_nvme.queues import CompletionQueue, QueueSetMixin, SubmissionQueue
from pcidev_nvme.registers import (
    CC_EN,
    CSS_ALL,
    CSS_NVM,
    CSTS_CFS,
    CSTS_RDY,
    CSTS_SHST_SHIFT,
    DOORBELL_BASE,
    MPSMAX,
    MPSMIN,
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
    build_register_map,
    cap_value,
)
from pcidev_nvme.request import SQE_SIZE, Request

__all__ = ["NvmeController"]

log = logging.getLogger(__name__)

_CMD_LO = ids.COMMAND
_MASTER = int(ids.Command.MASTER)
assert _MASTER < 0x100


def default_serial(cfg: NvmeConfig) -> str:
    """A serial number for a controller configured without one.

    Derived from the absolute paths of its file-backed namespace images (and the
    state location) when it has any, so it survives restarts with the images;
    random otherwise, so two controllers never share a serial (Linux refuses a
    second controller with the same subsystem NQN).
    """
    paths = []
    for spec in cfg.namespaces:
        try:
            _kind, options = parse_spec(spec)
        except PcidevError:
            continue
        path = options.get("path")
        if isinstance(path, str) and path:
            paths.append(os.path.abspath(path))
    if paths:
        key = "\0".join([*paths, str(cfg.state_dir or ""), str(cfg.state_file or "")])
        return "PD" + hashlib.sha256(key.encode()).hexdigest()[:18].upper()
    return "PD" + secrets.token_hex(9).upper()


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


def _pow2(v: int) -> int:
    return 1 << max(v - 1, 1).bit_length()


class NvmeController(CompletionMixin, DoorbellsMixin, FetchMixin, QueueSetMixin, HealthMixin, PersistenceMixin,
                     PciDevice):
    """An NVMe 2.0 controller (see the module docstring).

    :param config: an :class:`~pcidev_nvme.config.NvmeConfig`, a mapping, or a
        QEMU-style property string (``"serial=x,mdts=7,ns=mem:size=64M"``).
    :param name: device name in logs.
    :raises ConfigError: a bad configuration or namespace spec.

    The data path sees (``docs/nvme-contract.md``): :attr:`memory`,
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
    #: live migration (``pcidev_nvme.migration``)
    VMSTATE = _migration.NvmeState
    MIGRATABLE_FEATURES = _migration.MIGRATABLE_FEATURES

    def __init__(self, config: NvmeConfig | dict | str | None = None, *, name: str | None = None) -> None:
        if config is None:
            cfg = NvmeConfig()
        elif isinstance(config, NvmeConfig):
            cfg = config
        elif isinstance(config, str):
            cfg = NvmeConfig.parse(config)
        elif isinstance(config, dict):
            cfg = NvmeConfig.from_dict(config)
        else:
            raise ConfigError(f"nvme: configuration must be NvmeConfig, dict or str, not {type(config).__name__}")
        if cfg.msix_vectors < 1:
            raise ConfigError("nvme: at least one MSI-X vector is needed")
        if cfg.serial is None:
            cfg = attrs.evolve(cfg, serial=default_serial(cfg))
        self.cfg = cfg
        self._guest_memory = None
        self._closed = False
        super().__init__(name=name)
        self.vendor_id = cfg.vendor_id
        self.device_id = cfg.device_id
        self.subsystem_vendor_id = cfg.subsystem_vendor_id
        self.subsystem_id = cfg.subsystem_id

        #: serializes register writes, resets and state restores
        self.state_lock = threading.RLock()
        self._tls = BatchState()
        self._timer = Timer(f"nvme-timer[{self.name}]")
        self._admin_pool: concurrent.futures.ThreadPoolExecutor | None = None

        # controller state
        self._state = ST_DISABLED
        self._running = False
        #: quiesced for a migration: nothing is fetched (see pcidev_nvme.migration)
        self._paused = False
        #: doorbell/kick batches in progress on any thread
        self._batches = 0
        self._batch_lock = threading.Lock()
        self._csts = 0
        self._gen = 0
        self._shutting_down = False
        self._enable_pending = False
        self._draining: list[SubmissionQueue] = []
        self.shadow = ShadowDoorbells()
        self._formatting: set[int] = set()
        self._ka_last = time.monotonic()
        self._ka_token = 0
        self.page_size = 4096
        self.mdts_bytes: int | None = (4096 << cfg.mdts) if cfg.mdts else None
        nq = cfg.max_ioqpairs + 1
        self._sqs: list[SubmissionQueue | None] = [None] * nq
        self._cqs: list[CompletionQueue | None] = [None] * nq
        self.interrupts = Interrupts(self, self._cqs, self._timer, cfg.msix_vectors)

        # logs, counters, persistent state
        self.error_log = ErrorLog(cfg.elpe + 1)
        self.smart = SmartCounters(cfg.temperature)
        self.firmware = FirmwareSlots(cfg.fw_slots, cfg.firmware)
        self.changed_ns = ChangedNamespaces()
        self.features = Features(self)
        self.aer = AsyncEvents(self.complete, cfg.aerl + 1)

        # namespaces
        self.namespaces: dict[int, Any] = {}
        self.allocated: dict[int, Any] = {}
        #: file-backed namespaces created by Namespace Management (restored at power-on): nsid -> spec
        self.created: dict[int, str] = {}
        try:
            self._make_namespaces()
            self.state_file = self._open_state_file()
            self._dirty = False
            self._load_state()
            self.io = IoCommandSet(self)
            self.admin = AdminCommandSet(self)
        except BaseException:
            for ns in self.allocated.values():
                try:
                    ns.close()
                except Exception:
                    pass
            self._timer.close()
            raise
        self._last_save = time.monotonic()

    # ------------------------------------------------------------------ description
    def describe(self) -> None:
        cfg = self.cfg
        self._cap = cap_value(cfg.mqes)
        regs = build_register_map(f"nvme-bar0[{self.name}]", self._cap, intms=lambda r: self.interrupts.intms,
                                  on_intms=self._intms_written, on_intmc=self._intmc_written,
                                  on_cc=self._cc_written, csts=lambda r: self._csts)
        self.regs = regs
        nvec = cfg.msix_vectors
        db_end = DOORBELL_BASE + 8 * (cfg.max_ioqpairs + 1)
        if cfg.msix_bar == 0:
            table = _align(db_end, 4096)
            pba = _align(table + 16 * nvec, 4096)
            size = _pow2(pba + _align((nvec + 63) // 64 * 8, 4096))
            self._db_window = table
            self.add_mem_bar(0, size, Bar0(regs, self._doorbell_write, table), bits64=True)
            self.add_msix(nvec, bar=0, table_offset=table, pba_offset=pba)
        else:
            size = _pow2(_align(db_end, 4096))
            self._db_window = size
            self.add_mem_bar(0, size, Bar0(regs, self._doorbell_write, size), bits64=True)
            pba = _align(16 * nvec, 4096)
            self.add_mem_bar(4, _pow2(pba + _align((nvec + 63) // 64 * 8, 4096)), ZeroBar(), bits64=True)
            self.add_msix(nvec, bar=4, table_offset=0, pba_offset=pba)
        self.add_standard_pcie_caps(flr=True, aer=True)

    # ------------------------------------------------------------------ contract
    @property
    def memory(self):
        """Guest memory for DMA.

        :raises DmaError: if bus mastering is disabled or no memory is attached.
        """
        mem = self._guest_memory
        if mem is not None and self.config.data[_CMD_LO] & _MASTER:
            return mem
        if mem is None:
            raise DmaError("no guest memory attached")
        raise DmaError("bus mastering is disabled")

    @memory.setter
    def memory(self, value) -> None:
        self._guest_memory = value

    @property
    def dma(self):
        """Same as :attr:`memory` (the framework's name)."""
        return self.memory

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

    @property
    def total_capacity(self) -> int:
        return max(self.cfg.capacity, self.allocated_capacity)

    @property
    def allocated_capacity(self) -> int:
        return sum(int(ns.size) for ns in self.allocated.values())

    # ------------------------------------------------------------------ namespaces and state
    def backend_registry(self) -> Mapping[str, Any]:
        """The namespace backends by name: ``cfg.backends`` (what
        :meth:`~pcidev.registry.DeviceRegistry.create` resolved from the registry),
        else the built-ins. A controller never loads plugins itself."""
        return self.cfg.backends if self.cfg.backends is not None else BUILTIN_BACKENDS

    def make_namespace(self, nsid: int, spec: Any):
        """Build namespace ``nsid`` from a spec (see :func:`pcidev_nvme.namespace.make_namespace`)."""
        return make_namespace(nsid, spec, state_dir=self.cfg.state_dir, serial=self.cfg.serial,
                              backends=self.backend_registry())

    def _make_namespaces(self) -> None:
        for i, spec in enumerate(self.cfg.namespaces, start=1):
            ns = self.make_namespace(i, spec)
            self.allocated[i] = ns
            self.namespaces[i] = ns

    def close(self) -> None:
        """Power off: stop timers and workers, save the state file, close namespaces. Idempotent.

        A controller that was enabled and not shut down (CC.SHN) counts an
        unsafe shutdown at its next power-on.
        """
        if self._closed:
            return
        self._closed = True
        self._running = False
        self._timer.close()
        try:
            self.io.close()
        except Exception:
            log.exception("closing the I/O command set failed")
        if self._admin_pool is not None:
            self._admin_pool.shutdown(wait=True)
        self.save_state()
        for ns in self.allocated.values():
            try:
                ns.close()
            except Exception:
                log.exception("closing namespace %d failed", ns.nsid)

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
                    self._update_running()

    def _set_shst(self, shst: int) -> None:
        self._csts = (self._csts & ~(3 << CSTS_SHST_SHIFT)) | (shst << CSTS_SHST_SHIFT)

    def _update_running(self) -> None:
        self._running = (self._state == ST_READY and not self._shutting_down and not self._closed
                         and not self._paused)

    # ------------------------------------------------------------------ enable / reset / shutdown
    def _enable(self) -> None:
        """CC.EN 0→1: validate and bring up the admin queues (CSTS.RDY=1), or set CSTS.CFS."""
        if self._state == ST_RESETTING:
            self._enable_pending = True
            return
        if self._state == ST_FAILED or self._csts & CSTS_RDY:
            return
        regs = self.regs
        cc = regs["CC"].value
        aqa = regs["AQA"].value
        asq = regs["ASQ"].value
        acq = regs["ACQ"].value
        asqs = (aqa & 0xFFF) + 1
        acqs = ((aqa >> 16) & 0xFFF) + 1
        css = (cc >> 4) & 7
        mps = (cc >> 7) & 0xF
        ams = (cc >> 11) & 7
        problem = None
        if asqs < 2:
            problem = f"AQA.ASQS {asqs - 1} is too small"
        elif acqs < 2:
            problem = f"AQA.ACQS {acqs - 1} is too small"
        elif not MPSMIN <= mps <= MPSMAX:
            problem = f"CC.MPS {mps} outside MPSMIN..MPSMAX ({MPSMIN}..{MPSMAX})"
        elif css not in (CSS_NVM, CSS_ALL):
            problem = f"CC.CSS {css:#05b} is not supported"
        elif ams != 0:
            problem = f"CC.AMS {ams} is not supported (round robin only)"
        elif asq == 0 or acq == 0:
            problem = "ASQ or ACQ is zero"
        else:
            page = 4096 << mps
            if asq & (page - 1) or acq & (page - 1):
                problem = f"ASQ/ACQ not aligned to the {page}-byte memory page"
            else:
                mem = self._guest_memory  # bus mastering may still be off: only check the ranges
                if mem is not None:
                    try:
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
        asq_obj = SubmissionQueue(0, asq, asqs, acq_obj)
        acq_obj.attach(asq_obj)
        self._cqs[0] = acq_obj
        self._sqs[0] = asq_obj
        self._state = ST_READY
        self._csts = (self._csts & ~CSTS_CFS) | CSTS_RDY
        self._ka_last = time.monotonic()
        self._update_running()
        if not self._dirty:
            self._dirty = True
            self.save_state()

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
        self._update_running()
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
        self._clear_queues()
        self.features.reset()
        self.interrupts.reset()
        self.shadow.reset()
        self._formatting.clear()
        self.smart.clear_reported()
        self._ka_token += 1
        self._timer.cancel_all()
        self.irq.set_intx(False)
        if self.firmware.activate_pending():
            log.info("%s: firmware slot %d active after reset", self.name, self.firmware.active)
        self._state = ST_DISABLED
        self._csts &= ~(CSTS_RDY | CSTS_CFS)
        self.failed = None
        self._update_running()
        if self._enable_pending or self.regs["CC"].value & CC_EN:
            self._enable_pending = False
            self._enable()

    def _clear_queues(self) -> None:
        for i in range(len(self._sqs)):
            if self._sqs[i] is not None:
                self._sqs[i].gone = True
            if self._cqs[i] is not None:
                self._cqs[i].gone = True
            self._sqs[i] = None
            self._cqs[i] = None

    def _begin_shutdown(self, *, abrupt: bool) -> None:
        if self._state != ST_READY:
            self._set_shst(SHST_COMPLETE)
            self._dirty = False
            self.save_state()
            return
        self._shutting_down = True
        self._update_running()
        self._set_shst(SHST_PROCESSING)
        self.run_async(self._shutdown_work, abrupt)

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
                ns.backend.flush()
            except Exception as exc:
                log.warning("%s: flushing namespace %d at shutdown failed: %s", self.name, ns.nsid, exc)
        with self.state_lock:
            self._dirty = False
            self.save_state()
            if self._shutting_down:
                self._set_shst(SHST_COMPLETE)

    def on_reset(self, kind: ResetKind) -> None:
        """A PCI-level reset (conventional, FLR, power-on): the controller resets at once.

        Commands still in flight complete into nothing (their completions are
        dropped; bus mastering is off after the reset, so they cannot DMA either).
        """
        with self.state_lock:
            self._gen += 1
            self._drop_parked()
            self._state = ST_RESETTING
            self._draining = []
            self._shutting_down = False
            self._csts = 0
            self._enable_pending = False
            self._finish_reset()
            if kind is ResetKind.POWER_ON:
                self.smart.power_on(unsafe=self._dirty)
                self._dirty = False
                self.save_state()

    def on_failure(self, exc: BaseException) -> None:
        """A register handler raised: the controller is fatally failed (CSTS.CFS)."""
        self._fatal(f"internal error: {type(exc).__name__}: {exc}")

    def _fatal(self, why: str) -> None:
        log.error("%s: controller fatal status: %s", self.name, why)
        with self.state_lock:
            self._csts |= CSTS_CFS
            if self._state == ST_READY:
                self._state = ST_FAILED
            self._update_running()

    # ------------------------------------------------------------------ async work
    def run_async(self, fn, *args) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the controller's admin worker thread (slow admin work)."""
        if self._admin_pool is None:
            self._admin_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"nvme-admin[{self.name}]")
        return self._admin_pool.submit(self._guarded, fn, *args)

    def _guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("%s: background work %r failed", self.name, fn)
            self._fatal(f"background work failed: {exc}")

    # ------------------------------------------------------------------ interrupts
    @property
    def msix(self) -> MsixCapability | None:
        """The MSI-X capability (found once, after :meth:`describe`)."""
        cap = self.__dict__.get("_msix_cap")
        if cap is None:
            cap = self.caps.find(MsixCapability)
            self.__dict__["_msix_cap"] = cap
        return cap

    def coalescing_changed(self) -> None:
        """Feature 08h changed."""
        self.interrupts.set_coalescing(*self.features.coalescing)

    def vector_cd(self, iv: int) -> bool:
        """Coalescing Disable of vector ``iv`` (the admin vector is never coalesced)."""
        return self.interrupts.vector_cd(iv)

    def set_vector_cd(self, iv: int, cd: bool) -> None:
        self.interrupts.set_vector_cd(iv, cd)

    # ------------------------------------------------------------------ errors, SMART, AER sources
    # ------------------------------------------------------------------ namespace changes
    def begin_format(self, nsids: set[int]) -> list[int]:
        """Mark ``nsids`` as being formatted (I/O to them fails with Format In Progress);
        returns the ones already being formatted instead (then nothing is marked)."""
        with self.state_lock:
            busy = sorted(n for n in nsids if n in self._formatting)
            if not busy:
                self._formatting |= nsids
            return busy

    def end_format(self, nsids: set[int]) -> None:
        """A Format NVM of ``nsids`` finished."""
        with self.state_lock:
            self._formatting -= nsids

    def namespace_changed(self, nsid: int) -> None:
        """Record ``nsid`` in the Changed Namespace List and post the notice."""
        self.changed_ns.add(nsid)
        self.notice(aer_mod.INFO_NS_ATTR_CHANGED, 0x04)

    # ------------------------------------------------------------------ state for migration
    @property
    def fsm_state(self) -> str:
        """The state machine: "disabled", "ready", "resetting" or "failed"."""
        return self._state

    @property
    def running(self) -> bool:
        """Commands are fetched (ready, not shutting down, not paused, not closed)."""
        return self._running

    @property
    def submission_queues(self) -> list[SubmissionQueue | None]:
        """Submission queues by id (read only: queues change through admin commands)."""
        return self._sqs

    @property
    def completion_queues(self) -> list[CompletionQueue | None]:
        """Completion queues by id (read only)."""
        return self._cqs

    def snapshot(self) -> ControllerState:
        """The registers and the state machine."""
        regs = self.regs
        return ControllerState(state=self._state, cc=regs["CC"].value, csts=self._csts, aqa=regs["AQA"].value,
                               asq=regs["ASQ"].value, acq=regs["ACQ"].value, shutting_down=self._shutting_down,
                               dirty=bool(self._dirty), page_size=self.page_size)

    def restore(self, st: ControllerState) -> None:
        """Take the registers and state machine of a checked state (call with
        :attr:`state_lock` held). Every queue and parked request is dropped, fetching
        stays paused until :meth:`finish_restore` and the migration's resume."""
        self._paused = True
        self._gen += 1
        for req in self.aer.reset():
            req.done = True
        self._clear_queues()
        self._draining = []
        self._enable_pending = False
        self._formatting.clear()
        regs = self.regs
        regs["CC"].value = st.cc
        regs["AQA"].value = st.aqa
        regs["ASQ"].value = st.asq
        regs["ACQ"].value = st.acq
        self._csts = st.csts
        self._state = st.state
        self._shutting_down = st.shutting_down
        self._dirty = st.dirty
        self.page_size = st.page_size

    def install_queues(self, sqs: list[SubmissionQueue | None], cqs: list[CompletionQueue | None]) -> None:
        """Use restored queues (indexed by queue id, as many as this controller has)."""
        self._sqs[:] = sqs
        self._cqs[:] = cqs

    def restore_parked_aers(self, cids: tuple[int, ...]) -> list[Request]:
        """Parked Asynchronous Event Requests on the admin SQ with these CIDs (restored
        outstanding AERs); they are in flight on the admin SQ."""
        asq = self._sqs[0]
        out = []
        now = time.monotonic()
        for cid in cids:
            sqe = bytes([0x0C, 0]) + cid.to_bytes(2, "little") + bytes(SQE_SIZE - 4)
            req = Request(0, cid, 0x0C, 0, sqe, sq=asq, gen=self._gen, t_fetch=now, parked=True)
            asq.inflight[cid] = req
            out.append(req)
        return out

    def finish_restore(self) -> None:
        """After a restore: timers stopped, keep alive counted from now, the state file
        rewritten after the resume (outside the downtime)."""
        self._ka_last = time.monotonic()
        self._ka_token += 1
        self._timer.cancel_all()
        self._update_running()
        self._save_at_resume = True

    def pause(self) -> None:
        """Stop fetching (a quiesce); commands in flight go on."""
        with self.state_lock:
            self._paused = True
            self._update_running()

    def unpause(self) -> bool:
        """Fetch again; returns whether it was paused. A state file due since a restore
        is written by the next admin command (:meth:`maybe_save_state`)."""
        with self.state_lock:
            was = self._paused
            self._paused = False
            self._update_running()
        if self.__dict__.pop("_save_at_resume", False):
            self._last_save = float("-inf")
        return was

    def fetch_idle(self) -> bool:
        """No doorbell or kick batch in progress and no SQ being fetched."""
        return not self._batches and not any(sq is not None and sq.running for sq in list(self._sqs))

    def batches_idle(self) -> bool:
        """No doorbell or kick batch in progress on any thread."""
        return not self._batches

    def admin_work_marker(self) -> concurrent.futures.Future | None:
        """A future done once the admin work queued so far has run (None: no admin worker)."""
        pool = self._admin_pool
        return pool.submit(lambda: None) if pool is not None else None

    def stop_timers(self) -> None:
        """No keep-alive verdict, no coalescing deadline; aggregated interrupts delivered now."""
        self._ka_token += 1
        self._timer.cancel_all()
        self.interrupts.flush_coalesced()

    def restart_work(self) -> None:
        """After an unpause: keep alive counted from now, events delivered, every SQ fetched."""
        self._ka_last = time.monotonic()
        if self.features.kato_ms:
            self.keep_alive_changed()
        self.aer.deliver()
        for sq in list(self._sqs):
            if sq is not None and not sq.gone:
                self._kick(sq)

    # ------------------------------------------------------------------ migration
    def enabled_features(self) -> set[str]:
        return super().enabled_features() | _migration.features(self)

    def device_migration_blockers(self) -> list[str]:
        return _migration.blockers(self)

    def device_fingerprint(self) -> dict:
        return _migration.fingerprint(self)

    def on_quiesce(self) -> None:
        _migration.quiesce(self)

    def on_resume(self) -> None:
        _migration.resume(self)

    def get_device_state(self) -> _migration.NvmeState:
        return _migration.save(self)

    def check_device_state(self, state: _migration.NvmeState) -> None:
        _migration.check(self, state)

    def set_device_state(self, state: _migration.NvmeState) -> None:
        _migration.apply(self, state)

    # ------------------------------------------------------------------ misc
    def __repr__(self) -> str:
        return (f"<NvmeController {self.name!r} {self.vendor_id:04x}:{self.device_id:04x} "
                f"state={self._state} csts={self._csts:#x} ns={sorted(self.namespaces)}>")
