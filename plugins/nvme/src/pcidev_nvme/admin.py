"""The admin command set.

======  ==================================  ==============================================
Opcode  Command                             Statuses besides Success
======  ==================================  ==============================================
00h     Delete I/O Submission Queue         Invalid Queue Identifier
01h     Create I/O Submission Queue         Invalid Queue Identifier, Invalid Queue Size,
                                            Completion Queue Invalid, Invalid Field (PC=0),
                                            PRP Offset Invalid, Data Transfer Error
02h     Get Log Page                        Invalid Log Page, Invalid Field (a bad offset,
                                            an endurance group but 1 in LSI for 09h)
04h     Delete I/O Completion Queue         Invalid Queue Identifier, Invalid Queue Deletion
05h     Create I/O Completion Queue         Invalid Queue Identifier, Invalid Queue Size,
                                            Invalid Interrupt Vector, Invalid Field, PRP
                                            Offset Invalid, Data Transfer Error
06h     Identify                            Invalid Field (CNS/CSI), Invalid Namespace
08h     Abort                               DW0 bit 0 = 1: not aborted (see
                                            :mod:`pcidev_nvme.abort`)
09h     Set Features                        see :mod:`pcidev_nvme.features`
0Ah     Get Features                        see :mod:`pcidev_nvme.features`
0Ch     Asynchronous Event Request          Asynchronous Event Request Limit Exceeded
0Dh     Namespace Management                Invalid Field, Invalid Format, Namespace
                                            Insufficient Capacity, Namespace Identifier
                                            Unavailable, Thin Provisioning Not Supported
10h     Firmware Commit                     Invalid Firmware Slot, Invalid Firmware Image
11h     Firmware Image Download             Invalid Field, Overlapping Range
14h     Device Self-test                    Invalid Field, Invalid Namespace, Device
                                            Self-test In Progress (:mod:`pcidev_nvme.selftest`)
15h     Namespace Attachment                Namespace Already Attached, Namespace Not
                                            Attached, Controller List Invalid
18h     Keep Alive
19h     Directive Send                      Invalid Field, Invalid Namespace
                                            (:mod:`pcidev_nvme.directives`)
1Ah     Directive Receive                   Invalid Field, Invalid Namespace
7Ch     Doorbell Buffer Config              Invalid Field
80h     Format NVM                          Invalid Format, Invalid Field, Invalid Namespace
84h     Sanitize                            Invalid Field, Sanitize In Progress, Command
                                            Sequence Error (:mod:`pcidev_nvme.sanitize`)
86h     Get LBA Status                      Invalid Namespace, LBA Out of Range, Invalid
                                            Field (:mod:`pcidev_nvme.lba_status`)
======  ==================================  ==============================================

While a sanitize operation runs, the commands it does not allow complete with
Sanitize In Progress (after a failed one, Sanitize Failed) before anything else is
checked (:meth:`pcidev_nvme.sanitize.Sanitizer.check_admin`).

Every command: unknown opcode → Invalid Opcode; fused or SGL (PSDT ≠ 0) → Invalid
Field; a data pointer outside guest memory → Data Transfer Error. Each failure
gets an Error Information entry whose parameter location names the SQE byte of
the offending field.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pcidev.bar import RegisterMap
from pcidev.errors import ConfigError, DmaError, PcidevError
from pcidev.pci.capabilities.msix import MsixCapability
from pcidev_nvme import identify as idfy
from pcidev_nvme import limits
from pcidev_nvme import logs as nlogs
from pcidev_nvme.abort import Aborts
from pcidev_nvme.aer import INFO_FW_ACTIVATION, AsyncEvents
from pcidev_nvme.cmb import ControllerMemoryBuffer
from pcidev_nvme.config import NamespaceSpec, NvmeConfig
from pcidev_nvme.directives import directive_receive, directive_send
from pcidev_nvme.endurance import (
    ENDGID,
    LID_EG_EVENT_AGGREGATE,
    LID_ENDURANCE_GROUP,
    EnduranceGroup,
    endurance_group_list,
)
from pcidev_nvme.features import Features
from pcidev_nvme.lba_status import get_lba_status
from pcidev_nvme.metadata import SIDECAR_SUFFIX
from pcidev_nvme.namespace import (
    LBA_FORMATS,
    LBAF_TABLE,
    Namespace,
    format_problem,
    identify_capabilities,
    identify_elbaf,
)
from pcidev_nvme.namespaces import RemovedNamespace, persists
from pcidev_nvme.pmr import PersistentMemoryRegion
from pcidev_nvme.protection import pi_size
from pcidev_nvme.prp import prp_segments
from pcidev_nvme.queues import CompletionQueue, SubmissionQueue
from pcidev_nvme.request import ControllerPort, Request
from pcidev_nvme.sanitize import LID_SANITIZE, Sanitizer
from pcidev_nvme.selftest import LID_SELF_TEST, RESULT_ABORTED_FORMAT, RESULT_ABORTED_NS_REMOVED, SelfTest
from pcidev_nvme.status import NvmeStatusError, Status
from pcidev_nvme.uncorrectable import Uncorrectable
from pcidev_nvme.virtualization import Virtualization


class AdminHost(ControllerPort, Protocol):
    """What the admin command set uses of the controller, beyond the data path's
    :class:`~pcidev_nvme.request.ControllerPort`."""

    cfg: NvmeConfig
    regs: RegisterMap
    aer: AsyncEvents
    features: Features
    firmware: nlogs.FirmwareSlots
    error_log: nlogs.ErrorLog
    changed_ns: nlogs.ChangedNamespaces
    cmb: ControllerMemoryBuffer | None
    pmr: PersistentMemoryRegion | None
    aborts: Aborts
    sanitizer: Sanitizer
    selftest: SelfTest
    uncorrectable: Uncorrectable
    smart: nlogs.SmartCounters
    endurance: EnduranceGroup
    state_lock: threading.RLock

    @property
    def allocated(self) -> Mapping[int, Namespace]: ...
    @property
    def created(self) -> Mapping[int, str]: ...
    @property
    def msix(self) -> MsixCapability | None: ...
    @property
    def state_dir(self) -> str | None: ...
    @property
    def total_capacity(self) -> int: ...
    @property
    def allocated_capacity(self) -> int: ...
    @property
    def unallocated_capacity(self) -> int: ...
    @property
    def created_mem_bytes(self) -> int: ...
    def sq(self, qid: int) -> SubmissionQueue | None: ...
    def cq(self, qid: int) -> CompletionQueue | None: ...
    def add_sq(self, sq: SubmissionQueue) -> None: ...
    def add_cq(self, cq: CompletionQueue) -> None: ...
    def delete_sq(self, sq: SubmissionQueue, req: Request) -> bool: ...
    def delete_cq(self, cq: CompletionQueue) -> None: ...
    def park(self, req: Request) -> None: ...
    def unpark(self, req: Request) -> None: ...
    def set_doorbell_buffer(self, dbs: int, eis: int) -> None: ...
    def keep_alive(self) -> None: ...
    def notice(self, info: int, lid: int) -> None: ...
    def namespace_changed(self, nsid: int) -> None: ...
    def selftests_namespace_changed(self, nsid: int, result: int) -> None: ...
    def smart_page(self, nsid: int | None = None) -> bytes: ...
    def io_inflight_for(self, nsids: set[int]) -> bool: ...
    def begin_format(self, nsids: set[int], *, status: int = ...) -> list[int]: ...
    def end_format(self, nsids: set[int]) -> None: ...
    def claim_status(self, nsid: int) -> int | None: ...
    def make_namespace(self, nsid: int, spec: NamespaceSpec) -> Namespace: ...
    def add_namespace(self, nsid: int, ns: Namespace, *, created_spec: str | None = None,
                      attached: bool = False) -> None: ...
    def remove_namespace(self, nsid: int) -> RemovedNamespace: ...
    def attach_namespace(self, nsid: int) -> None: ...
    def detach_namespace(self, nsid: int) -> None: ...
    admin_worker: AdminWorker
    @property
    def vector_limit(self) -> int:
        """Interrupt vectors the controller offers now (SR-IOV resources)."""
    def adjust_oacs(self, oacs: int) -> int:
        """The OACS bits of this controller (SR-IOV)."""
    def adjust_identify(self, buf: bytearray) -> None:
        """Change the finished Identify Controller data (SR-IOV: CMIC, SANICAP)."""
    def subsystem_controllers(self) -> list[int]:
        """The CNTLIDs of the NVM subsystem's controllers (Identify CNS 13h)."""
    def controllers_attached(self, nsid: int) -> list[int]:
        """The CNTLIDs of the controllers namespace ``nsid`` is attached to (CNS 12h)."""
    #: SR-IOV: the primary controller's secondary controllers, else None
    virtualization: Virtualization | None
    def save_state(self) -> None: ...
    def maybe_save_state(self) -> None: ...

__all__ = ["AdminCommandSet", "AdminWorker", "Opcode"]

log = logging.getLogger(__name__)


class AdminWorker:
    """One background thread for slow admin work (Format NVM, a flush before a
    completion, a shutdown), first in first out; started on first use.

    :param name: thread name prefix.
    :param on_failure: called with a message when work raises (the controller's
        fatal status); the exception is logged.
    """

    def __init__(self, name: str, on_failure: Callable[[str], None]) -> None:
        self._name = name
        self._on_failure = on_failure
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., None], *args: Any) -> concurrent.futures.Future[None]:
        """Run ``fn(*args)`` on the worker thread."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self._name)
        return self._pool.submit(self._guarded, fn, *args)

    def marker(self) -> concurrent.futures.Future[None] | None:
        """A future done once the work queued so far has run (None: nothing ever ran)."""
        return self._pool.submit(lambda: None) if self._pool is not None else None

    def shutdown(self) -> None:
        """Wait for the queued work and stop the thread."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            log.exception("%s: background work %r failed", self._name, fn)
            self._on_failure(f"background work failed: {exc}")


class Opcode:
    """Admin opcodes."""

    DELETE_SQ = 0x00
    CREATE_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_CQ = 0x04
    CREATE_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT = 0x0C
    NS_MANAGEMENT = 0x0D
    FW_COMMIT = 0x10
    FW_DOWNLOAD = 0x11
    NS_ATTACHMENT = 0x15
    DEVICE_SELF_TEST = 0x14
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    VIRT_MGMT = 0x1C
    DBBUF_CONFIG = 0x7C
    FORMAT_NVM = 0x80
    SANITIZE = 0x84
    GET_LBA_STATUS = 0x86


# SQE byte offsets (Error Information parameter location)
OFF_OPCODE, OFF_FLAGS, OFF_NSID, OFF_DPTR = 0, 1, 4, 24
OFF_PRP2 = 32
OFF_CDW10, OFF_CDW11, OFF_CDW12, OFF_CDW13, OFF_CDW14 = 40, 44, 48, 52, 56

BROADCAST = 0xFFFFFFFF
#: largest firmware image accepted
FW_MAX_IMAGE = 16 << 20
#: seconds a Format NVM or a Namespace Management delete waits for the I/O in flight on its
#: namespaces to finish before it fails (having changed nothing)
IO_DRAIN_TIMEOUT = 30.0

_E = nlogs.CMD_EFFECTS
#: Feature Identifiers Supported and Effects
LID_FEATURES_SUPPORTED = 0x12


def _err(status: int, msg: str, off: int | None = None) -> NvmeStatusError:
    return NvmeStatusError(status, msg, param_offset=off)


def _without_lbas(page: bytes) -> bytes:
    """An Error Information log page with the LBA field (bytes 16..23) of each 64-byte
    entry cleared (what it reports while a sanitize operation is in progress)."""
    out = bytearray(page)
    for off in range(16, len(out) - 7, 64):
        out[off:off + 8] = bytes(8)
    return bytes(out)


class AdminCommandSet:
    """Executes admin commands for one controller.

    :param ctrl: the controller.
    """

    def __init__(self, ctrl: AdminHost) -> None:
        self.ctrl = ctrl
        self._handlers = {
            Opcode.DELETE_SQ: self._delete_sq,
            Opcode.CREATE_SQ: self._create_sq,
            Opcode.GET_LOG_PAGE: self._get_log_page,
            Opcode.DELETE_CQ: self._delete_cq,
            Opcode.CREATE_CQ: self._create_cq,
            Opcode.IDENTIFY: self._identify,
            Opcode.ABORT: self._abort,
            Opcode.SET_FEATURES: self._set_features,
            Opcode.GET_FEATURES: self._get_features,
            Opcode.ASYNC_EVENT: self._async_event,
            Opcode.NS_MANAGEMENT: self._ns_management,
            Opcode.FW_COMMIT: self._fw_commit,
            Opcode.FW_DOWNLOAD: self._fw_download,
            Opcode.NS_ATTACHMENT: self._ns_attachment,
            Opcode.KEEP_ALIVE: self._keep_alive,
            Opcode.DIRECTIVE_SEND: self._directive_send,
            Opcode.DIRECTIVE_RECEIVE: self._directive_receive,
            Opcode.FORMAT_NVM: self._format,
            Opcode.DEVICE_SELF_TEST: self._device_self_test,
            Opcode.SANITIZE: self._sanitize,
            Opcode.GET_LBA_STATUS: self._get_lba_status,
        }
        if ctrl.cfg.dbbuf:
            self._handlers[Opcode.DBBUF_CONFIG] = self._dbbuf_config
        if ctrl.virtualization is not None:
            self._handlers[Opcode.VIRT_MGMT] = self._virt_mgmt

    def remove_commands(self, *opcodes: int) -> None:
        """Stop supporting ``opcodes`` (a secondary controller manages no namespaces)."""
        for opcode in opcodes:
            self._handlers.pop(opcode, None)

    # -- dispatch ------------------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Execute ``req`` and complete it exactly once (now, or later for AER, Format,
        Delete SQ with commands in flight). Never raises for what the host wrote."""
        ctrl = self.ctrl
        try:
            handler = self._handlers.get(req.opcode)
            if handler is None:
                raise _err(Status.INVALID_OPCODE, f"admin opcode {req.opcode:#04x} is not supported", OFF_OPCODE)
            if req.flags & 0x3:
                raise _err(Status.INVALID_FIELD, "fused admin commands are not supported", OFF_FLAGS)
            if req.flags & 0xC0:
                raise _err(Status.INVALID_FIELD, "admin commands use PRPs (PSDT must be 0)", OFF_FLAGS)
            ctrl.sanitizer.check_admin(req.opcode, req.cdw10 & 0xFF)
            dw0 = handler(req)
        except NvmeStatusError as exc:
            ctrl.complete(req, exc.status, error=exc)
        except DmaError as exc:
            ctrl.complete(req, Status.DATA_TRANSFER_ERROR,
                          error=_err(Status.DATA_TRANSFER_ERROR, str(exc), OFF_DPTR))
        except Exception as exc:
            log.exception("admin command %r failed unexpectedly", req)
            ctrl.complete(req, Status.INTERNAL, error=_err(Status.INTERNAL, f"{type(exc).__name__}: {exc}"))
        else:
            if dw0 is not None:
                ctrl.complete(req, 0, dw0)
        ctrl.maybe_save_state()

    # -- data transfer ---------------------------------------------------------------------------
    def to_host(self, req: Request, data: bytes) -> None:
        """Copy ``data`` to the host buffer the command's PRPs describe."""
        if not data:
            return
        ctrl = self.ctrl
        mem = ctrl.dma
        segs = prp_segments(mem, req.prp1, req.prp2, len(data), ctrl.page_size)
        mv = memoryview(data)
        with mem.access(segs, write=True) as views:
            pos = 0
            for v in views:
                n = len(v)
                v[:] = mv[pos:pos + n]
                pos += n

    def from_host(self, req: Request, length: int) -> bytes:
        """Read ``length`` bytes from the host buffer the command's PRPs describe."""
        if not length:
            return b""
        ctrl = self.ctrl
        mem = ctrl.dma
        segs = prp_segments(mem, req.prp1, req.prp2, length, ctrl.page_size)
        with mem.access(segs) as views:
            return b"".join(bytes(v) for v in views)

    # -- queues ----------------------------------------------------------------------------------
    def _queue_memory(self, base: int, nbytes: int, *, write: bool) -> None:
        ctrl = self.ctrl
        if base & (ctrl.page_size - 1):
            raise _err(Status.PRP_OFFSET_INVALID, f"queue base {base:#x} is not page aligned", OFF_DPTR)
        try:
            for v in ctrl.dma.views(base, nbytes, write=write):
                v.release()
        except NvmeStatusError:  # (Invalid Use of Controller Memory Buffer)
            raise
        except DmaError as exc:
            raise _err(Status.DATA_TRANSFER_ERROR, f"queue memory: {exc}", OFF_DPTR) from None

    def _qsize(self, cdw10: int) -> int:
        qsize = (cdw10 >> 16) + 1
        if qsize < 2 or qsize > self.ctrl.cfg.mqes + 1:
            raise _err(Status.QUEUE_SIZE, f"queue size {qsize} outside 2..{self.ctrl.cfg.mqes + 1}", OFF_CDW10 + 2)
        return qsize

    def _create_cq(self, req: Request) -> int:
        ctrl = self.ctrl
        qid = req.cdw10 & 0xFFFF
        if not 1 <= qid <= ctrl.features.ncq or ctrl.cq(qid) is not None:
            raise _err(Status.QID_INVALID, f"completion queue id {qid} is invalid or in use", OFF_CDW10)
        qsize = self._qsize(req.cdw10)
        if (ctrl.regs["CC"].value >> 20) & 0xF != 4:
            raise _err(Status.QUEUE_SIZE, "CC.IOCQES is not 4 (16-byte entries)", OFF_CDW10 + 2)
        flags = req.cdw11 & 0xFFFF
        if not flags & 1:
            raise _err(Status.INVALID_FIELD, "physically non-contiguous queues are not supported", OFF_CDW11)
        ien = bool(flags & 2)
        iv = req.cdw11 >> 16
        msix = ctrl.msix
        if iv >= ctrl.vector_limit or (iv and not (msix is not None and msix.enabled)):
            raise _err(Status.INVALID_INTERRUPT_VECTOR, f"interrupt vector {iv} is invalid", OFF_CDW11 + 2)
        if ctrl.cmb is not None:  # CQs in the CMB are not supported (CMBSZ.CQS = 0)
            ctrl.cmb.refuse_cq(req.prp1, qsize * 16)
        if ctrl.pmr is not None:  # nor queues in the PMR (it holds data only)
            ctrl.pmr.refuse_queue(req.prp1, qsize * 16, "completion")
        self._queue_memory(req.prp1, qsize * 16, write=True)
        ctrl.add_cq(CompletionQueue(qid, req.prp1, qsize, iv, ien))
        return 0

    def _create_sq(self, req: Request) -> int:
        ctrl = self.ctrl
        qid = req.cdw10 & 0xFFFF
        if not 1 <= qid <= ctrl.features.nsq or ctrl.sq(qid) is not None:
            raise _err(Status.QID_INVALID, f"submission queue id {qid} is invalid or in use", OFF_CDW10)
        qsize = self._qsize(req.cdw10)
        if (ctrl.regs["CC"].value >> 16) & 0xF != 6:
            raise _err(Status.QUEUE_SIZE, "CC.IOSQES is not 6 (64-byte entries)", OFF_CDW10 + 2)
        cqid = req.cdw11 >> 16
        cq = ctrl.cq(cqid) if cqid else None
        if cq is None:
            raise _err(Status.CQ_INVALID, f"completion queue {cqid} does not exist", OFF_CDW11 + 2)
        if not req.cdw11 & 1:
            raise _err(Status.INVALID_FIELD, "physically non-contiguous queues are not supported", OFF_CDW11)
        if ctrl.pmr is not None:  # queues in the PMR are not supported (it holds data only)
            ctrl.pmr.refuse_queue(req.prp1, qsize * 64, "submission")
        self._queue_memory(req.prp1, qsize * 64, write=False)
        ctrl.add_sq(SubmissionQueue(qid, req.prp1, qsize, cq, (req.cdw11 >> 1) & 3))
        return 0

    def _delete_sq(self, req: Request) -> int | None:
        ctrl = self.ctrl
        qid = req.cdw10 & 0xFFFF
        sq = ctrl.sq(qid) if qid else None
        if sq is None or sq.deleting:
            raise _err(Status.QID_INVALID, f"submission queue {qid} does not exist", OFF_CDW10)
        done = ctrl.delete_sq(sq, req)
        ctrl.aborts.forget_queue(qid)  # its entries are never fetched: their aborts go with it
        return 0 if done else None

    def _delete_cq(self, req: Request) -> int:
        ctrl = self.ctrl
        qid = req.cdw10 & 0xFFFF
        cq = ctrl.cq(qid) if qid else None
        if cq is None:
            raise _err(Status.QID_INVALID, f"completion queue {qid} does not exist", OFF_CDW10)
        if cq.sqs:
            raise _err(Status.INVALID_QUEUE_DELETION,
                       f"submission queue(s) {[s.sqid for s in cq.sqs]} still use completion queue {qid}", OFF_CDW10)
        ctrl.delete_cq(cq)
        return 0

    # -- identify ----------------------------------------------------------------------------------
    def _nsid_valid(self, nsid: int) -> bool:
        return 1 <= nsid <= self.ctrl.cfg.max_namespaces

    def _identify(self, req: Request) -> int:
        ctrl = self.ctrl
        cns = req.cdw10 & 0xFF
        cntid = req.cdw10 >> 16
        csi = req.cdw11 >> 24
        nsid = req.nsid
        zero = bytes(idfy.IDENTIFY_SIZE)
        if cns in (0x00, 0x05, 0x08, 0x11, 0x1B, 0x1F):
            if cns in (0x05, 0x1B) and csi != 0:
                raise _err(Status.INVALID_FIELD, f"I/O command set {csi} is not supported", OFF_CDW11 + 3)
            if nsid == BROADCAST and cns in (0x00, 0x05, 0x11):
                data = self._common_ns(csi_nvm=cns == 0x05)
            elif not self._nsid_valid(nsid):
                raise _err(Status.INVALID_NSID, f"namespace {nsid:#x} is not valid", OFF_NSID)
            else:
                # 11h / 1Bh / 1Fh: any allocated namespace, attached or not
                table = ctrl.allocated if cns in (0x11, 0x1B, 0x1F) else ctrl.namespaces
                ns = table.get(nsid)
                if ns is None:
                    data = zero
                elif cns in (0x05, 0x1B):
                    data = ns.identify_csi_nvm()
                elif cns in (0x08, 0x1F):
                    data = idfy.identify_ns_independent(ns, attached=nsid in ctrl.namespaces)
                else:
                    data = ns.identify()
        elif cns == 0x01:
            data = idfy.identify_controller(ctrl)
        elif cns in (0x02, 0x07, 0x10, 0x1A):
            if cns in (0x07, 0x1A) and csi != 0:
                raise _err(Status.INVALID_FIELD, f"I/O command set {csi} is not supported", OFF_CDW11 + 3)
            if nsid >= 0xFFFFFFFE:
                raise _err(Status.INVALID_NSID, f"NSID {nsid:#x} cannot start a list", OFF_NSID)
            data = idfy.nsid_list(ctrl.allocated if cns in (0x10, 0x1A) else ctrl.namespaces, nsid)
        elif cns == 0x03:
            ns = ctrl.namespaces.get(nsid)
            if ns is None:
                raise _err(Status.INVALID_NSID, f"namespace {nsid:#x} is not active", OFF_NSID)
            data = ns.id_descriptors()
        elif cns == 0x06:
            if csi != 0:
                raise _err(Status.INVALID_FIELD, f"I/O command set {csi} is not supported", OFF_CDW11 + 3)
            data = idfy.identify_ctrl_csi_nvm(ctrl.cfg.vsl)
        elif cns == 0x12:
            if not self._nsid_valid(nsid):
                raise _err(Status.INVALID_NSID, f"namespace {nsid:#x} is not valid", OFF_NSID)
            data = idfy.controller_list(ctrl.controllers_attached(nsid), cntid)
        elif cns == 0x13:
            data = idfy.controller_list(ctrl.subsystem_controllers(), cntid)
        elif cns == 0x1C:
            data = idfy.io_command_set_vector()
        elif cns == 0x19:
            data = endurance_group_list(req.cdw11 & 0xFFFF)
        elif cns in (0x14, 0x15) and ctrl.virtualization is not None:
            virt = ctrl.virtualization
            data = virt.primary_capabilities() if cns == 0x14 else virt.secondary_list(cntid)
        else:
            raise _err(Status.INVALID_FIELD, f"CNS {cns:#04x} is not supported", OFF_CDW10)
        self.to_host(req, data)
        return 0

    def _common_ns(self, *, csi_nvm: bool = False) -> bytes:
        """Identify Namespace for NSID FFFFFFFFh: capabilities common to all namespaces
        (LBA formats with metadata, MC and DPC only if every namespace can keep metadata);
        with ``csi_nvm`` the NVM command set specific structure (CNS 05h: the ELBAF table)."""
        # (a snapshot: a Namespace Management delete changes the table on the admin worker)
        metadata = all(ns.metadata_capable for ns in list(self.ctrl.allocated.values()))
        if csi_nvm:
            return identify_elbaf(metadata)
        buf = bytearray(idfy.IDENTIFY_SIZE)
        identify_capabilities(buf, metadata)
        return bytes(buf)

    # -- logs ----------------------------------------------------------------------------------------
    def _get_log_page(self, req: Request) -> int:
        ctrl = self.ctrl
        lid = req.cdw10 & 0xFF
        rae = bool(req.cdw10 & (1 << 15))
        numd = ((req.cdw11 & 0xFFFF) << 16 | (req.cdw10 >> 16)) + 1
        length = numd * 4
        offset = req.cdw12 | (req.cdw13 << 32)
        csi = req.cdw14 >> 24
        if offset & 3:
            raise _err(Status.INVALID_FIELD, f"log page offset {offset:#x} is not dword aligned", OFF_CDW12)
        if req.cdw14 & (1 << 23):
            raise _err(Status.INVALID_FIELD, "index offsets (OT) are not supported", OFF_CDW14 + 2)
        mdts = ctrl.mdts_bytes
        if mdts and length > mdts:
            raise _err(Status.INVALID_FIELD, f"{length} bytes exceed MDTS", OFF_CDW10 + 2)
        if lid == nlogs.LID_ERROR:
            page = ctrl.error_log.page()
            if ctrl.sanitizer.busy:  # while a sanitize runs the LBA of every entry reads 0
                page = _without_lbas(page)
        elif lid == nlogs.LID_SMART:
            if req.nsid in (0, BROADCAST):
                page = ctrl.smart_page()
            elif req.nsid in ctrl.namespaces:  # LPA bit 0: the namespace's counters (pcidev_nvme.ns_smart)
                page = ctrl.smart_page(req.nsid)
            else:
                raise _err(Status.INVALID_NSID, f"namespace {req.nsid:#x} is not active", OFF_NSID)
        elif lid == nlogs.LID_FW_SLOT:
            page = ctrl.firmware.page()
        elif lid == nlogs.LID_CHANGED_NS:
            page, ns_token = ctrl.changed_ns.read()  # (cleared below of what it holds only)
        elif lid == nlogs.LID_EFFECTS:
            if csi != 0:
                raise _err(Status.INVALID_FIELD, f"I/O command set {csi} is not supported", OFF_CDW14 + 3)
            page = nlogs.effects_log(self.admin_effects(), self.io_effects())
        elif lid == LID_SELF_TEST:
            if req.nsid not in (0, BROADCAST):
                raise _err(Status.INVALID_FIELD, "the Device Self-test log is kept per controller", OFF_NSID)
            page = ctrl.selftest.log_page()
        elif lid == LID_SANITIZE:
            page = ctrl.sanitizer.log_page()
        elif lid == LID_FEATURES_SUPPORTED:
            page = ctrl.features.supported_log()
        elif lid == nlogs.LID_SUPPORTED:
            page = nlogs.supported_logs_page(self.log_pages())
        elif lid == nlogs.LID_MI_EFFECTS:
            page = bytes(4096)  # no NVMe-MI commands
        elif lid == LID_ENDURANCE_GROUP:
            page = ctrl.endurance.information_page(req.cdw11 >> 16)  # LSI: the endurance group
        elif lid == LID_EG_EVENT_AGGREGATE:
            page, eg_token = ctrl.endurance.aggregate_read()  # (cleared below of what it holds only)
        elif lid == nlogs.LID_OCP_SMART and ctrl.cfg.ocp:
            if req.nsid not in (0, BROADCAST):
                raise _err(Status.INVALID_FIELD, "the OCP SMART log is kept per controller", OFF_NSID)
            page = nlogs.ocp_smart_page(ctrl.smart)
        else:
            raise _err(Status.INVALID_LOG_PAGE, f"log page {lid:#04x} is not supported", OFF_CDW10)
        if offset > len(page):
            raise _err(Status.INVALID_FIELD, f"offset {offset} is beyond the {len(page)}-byte log", OFF_CDW12)
        self.to_host(req, page[offset:offset + length])
        if lid == nlogs.LID_CHANGED_NS and not rae:
            ctrl.changed_ns.clear(ns_token)
        elif lid == LID_EG_EVENT_AGGREGATE and not rae:
            ctrl.endurance.aggregate_clear(eg_token)
        ctrl.aer.log_read(lid, rae)
        return 0

    def log_pages(self) -> list[int]:
        """The log identifiers Get Log Page answers (the Supported Log Pages log, LID 00h)."""
        lids = [nlogs.LID_SUPPORTED, nlogs.LID_ERROR, nlogs.LID_SMART, nlogs.LID_FW_SLOT, nlogs.LID_CHANGED_NS,
                nlogs.LID_EFFECTS, LID_SELF_TEST, LID_FEATURES_SUPPORTED, nlogs.LID_MI_EFFECTS, LID_SANITIZE,
                LID_ENDURANCE_GROUP, LID_EG_EVENT_AGGREGATE]
        if self.ctrl.cfg.ocp:
            lids.append(nlogs.LID_OCP_SMART)
        return lids

    def admin_effects(self) -> dict[int, int]:
        """Commands Supported and Effects of the admin commands."""
        eff = {opc: 0 for opc in self._handlers}
        eff[Opcode.NS_MANAGEMENT] = _E["nic"] | _E["ncc"]
        eff[Opcode.NS_ATTACHMENT] = _E["nic"] | _E["ncc"]
        eff[Opcode.FW_COMMIT] = _E["ccc"]
        eff[Opcode.FORMAT_NVM] = _E["lbcc"] | _E["ncc"] | _E["cse_ns"]
        eff[Opcode.SANITIZE] = _E["lbcc"]
        return {opc: e for opc, e in eff.items() if opc in self._handlers}  # (a secondary has fewer)

    @staticmethod
    def io_effects() -> dict[int, int]:
        """Commands Supported and Effects of the NVM command set, from the I/O command set's ONCS."""
        oncs = limits.ONCS
        eff = {0x00: 0, 0x01: _E["lbcc"], 0x02: 0}
        for bit, opc, e in ((0, 0x05, 0), (1, 0x04, _E["lbcc"]), (2, 0x09, _E["lbcc"]), (3, 0x08, _E["lbcc"]),
                            (7, 0x0C, 0), (8, 0x19, _E["lbcc"])):
            if oncs & (1 << bit):
                eff[opc] = e
        return eff

    # -- features ------------------------------------------------------------------------------------
    def _get_features(self, req: Request) -> int:
        dw0, data = self.ctrl.features.get(req)
        if data is not None:
            self.to_host(req, data)
        return dw0

    def _set_features(self, req: Request) -> int | None:
        ctrl = self.ctrl
        fid = req.cdw10 & 0xFF
        n = Features.data_length(fid)
        data = self.from_host(req, n) if n and fid in (0x0E, 0x16) else None
        disabling_cache = fid == 0x06 and ctrl.features.write_cache and not req.cdw11 & 1
        dw0 = ctrl.features.set(req, data)
        if disabling_cache:
            ctrl.admin_worker.submit(self._flush_then_complete, req, dw0)
            return None
        return dw0

    def _flush_then_complete(self, req: Request, dw0: int) -> None:
        status = 0
        for ns in list(self.ctrl.namespaces.values()):
            try:
                ns.flush()
            except OSError as exc:
                log.warning("flush of namespace %d failed: %s", ns.nsid, exc)
                status = Status.INTERNAL
        self.ctrl.complete(req, status, dw0)

    # -- misc ----------------------------------------------------------------------------------------
    def _abort(self, req: Request) -> int:
        return self.ctrl.aborts.abort(req.cdw10 & 0xFFFF, req.cdw10 >> 16)

    # -- sanitize, self-test, LBA status ----------------------------------------------------------
    def _sanitize(self, req: Request) -> int:
        marker = self.ctrl.admin_worker.marker()  # a Format NVM still running: the erase waits for it
        self.ctrl.sanitizer.command(req.cdw10, req.cdw11, before=marker.done if marker is not None else None)
        return 0

    def _device_self_test(self, req: Request) -> int:
        self.ctrl.selftest.command(req.nsid, req.cdw10)
        return 0

    def _get_lba_status(self, req: Request) -> int:
        ctrl = self.ctrl
        ns = ctrl.namespaces.get(req.nsid)
        if ns is None:
            raise _err(Status.INVALID_NSID, f"namespace {req.nsid:#x} is not attached", OFF_NSID)
        self.to_host(req, get_lba_status(ns, ctrl.uncorrectable, req.cdw10, req.cdw11, req.cdw12, req.cdw13))
        return 0

    def _async_event(self, req: Request) -> int | None:
        ctrl = self.ctrl
        aer = ctrl.aer
        if len(aer.outstanding) >= aer.limit:
            raise _err(Status.AER_LIMIT, f"{aer.limit} asynchronous event requests are already outstanding")
        ctrl.park(req)
        if not aer.add_request(req):  # lost a race with another thread
            ctrl.unpark(req)
            raise _err(Status.AER_LIMIT, "asynchronous event request limit exceeded")
        return None

    def _directive_send(self, req: Request) -> int:
        directive_send(req.cdw11, req.cdw12, req.nsid, self.ctrl.namespaces)
        return 0  # pragma: no cover (every operation is refused)

    def _directive_receive(self, req: Request) -> int:
        length = (req.cdw10 + 1) * 4
        mdts = self.ctrl.mdts_bytes
        if mdts and length > mdts:
            raise _err(Status.INVALID_FIELD, f"{length} bytes exceed MDTS", OFF_CDW10)
        self.to_host(req, directive_receive(req.cdw10, req.cdw11, req.nsid, self.ctrl.namespaces))
        return 0

    def _keep_alive(self, req: Request) -> int:
        self.ctrl.keep_alive()
        return 0

    def _dbbuf_config(self, req: Request) -> int:
        ctrl = self.ctrl
        dbs, eis = req.prp1, req.prp2
        page = ctrl.page_size
        for addr, off in ((dbs, OFF_DPTR), (eis, OFF_PRP2)):
            if addr == 0 or addr & (page - 1):
                raise _err(Status.INVALID_FIELD, f"doorbell buffer {addr:#x} is not a page-aligned address", off)
            try:
                for v in ctrl.dma.views(addr, 8 * (ctrl.cfg.max_ioqpairs + 1), write=True):
                    v.release()
            except DmaError as exc:
                raise _err(Status.INVALID_FIELD, f"doorbell buffer: {exc}", off) from None
        ctrl.set_doorbell_buffer(dbs, eis)
        return 0

    # -- firmware -------------------------------------------------------------------------------------
    def _fw_download(self, req: Request) -> int:
        fw = self.ctrl.firmware
        numd = req.cdw10 + 1
        ofst = req.cdw11
        if numd * 4 + ofst * 4 > FW_MAX_IMAGE:
            raise _err(Status.INVALID_FIELD, f"firmware images are limited to {FW_MAX_IMAGE} bytes", OFF_CDW10)
        mdts = self.ctrl.mdts_bytes
        if mdts and numd * 4 > mdts:
            raise _err(Status.INVALID_FIELD, "firmware download piece exceeds MDTS", OFF_CDW10)
        start, end = ofst * 4, (ofst + numd) * 4
        if fw.overlaps(start, end):
            raise _err(Status.OVERLAPPING_RANGE, f"bytes {start}..{end} overlap an earlier download", OFF_CDW11)
        fw.stage(start, self.from_host(req, numd * 4))
        return 0

    def _fw_commit(self, req: Request) -> int:
        ctrl = self.ctrl
        fw = ctrl.firmware
        fs = req.cdw10 & 7
        ca = (req.cdw10 >> 3) & 7
        if ca > 3:
            raise _err(Status.INVALID_FIELD, f"commit action {ca} is not supported", OFF_CDW10)
        if fs > fw.nslots:
            raise _err(Status.INVALID_FW_SLOT, f"firmware slot {fs} does not exist", OFF_CDW10)
        if ca in (0, 1, 3):
            if fs == 0:
                empty = [s for s in range(2, fw.nslots + 1) if not fw.revisions[s - 1]]
                fs = empty[0] if empty else (2 if fw.nslots > 1 else 1)
            if fs == 1:
                raise _err(Status.INVALID_FW_SLOT, "firmware slot 1 is read-only", OFF_CDW10)
            image = fw.take_staged_image()
            revision = nlogs.parse_firmware_image(image) if image is not None else None
            if revision is None:
                raise _err(Status.INVALID_FW_IMAGE, "no valid firmware image was downloaded", OFF_CDW10)
            fw.install(fs, revision)
        else:
            if fs == 0 or not fw.revisions[fs - 1]:
                raise _err(Status.INVALID_FW_IMAGE, f"firmware slot {fs} holds no image", OFF_CDW10)
        if ca in (1, 2):
            fw.activate(fs, at_reset=True)
        elif ca == 3:
            fw.activate(fs, at_reset=False)
            ctrl.notice(INFO_FW_ACTIVATION, nlogs.LID_FW_SLOT)
        ctrl.save_state()
        return 0

    # -- namespace management and attachment --------------------------------------------------------------
    def _ns_management(self, req: Request) -> int | None:
        sel = req.cdw10 & 0xF
        if sel == 0:
            return self._ns_create(req)
        if sel == 1:
            self._ns_delete(req)
            return None  # (completed by the admin worker: :meth:`_ns_delete_work`)
        raise _err(Status.INVALID_FIELD, f"namespace management select {sel} is reserved", OFF_CDW10)

    def _ns_create(self, req: Request) -> int:
        ctrl = self.ctrl
        if req.cdw11 >> 24:
            raise _err(Status.INVALID_FIELD, f"I/O command set {req.cdw11 >> 24} is not supported", OFF_CDW11 + 3)
        data = self.from_host(req, 4096)
        nsze, ncap = struct.unpack_from("<QQ", data, 0)
        flbas, dps, nmic = data[26], data[29], data[30]
        anagrpid = struct.unpack_from("<I", data, 92)[0]
        nvmsetid, endgid = struct.unpack_from("<HH", data, 100)
        lbaf = (flbas & 0xF) | ((flbas >> 5) & 3) << 4
        if lbaf >= len(LBA_FORMATS):
            raise _err(Status.INVALID_FORMAT, f"LBA format {lbaf} is not supported")
        if nsze == 0 or ncap == 0 or ncap > nsze:
            raise _err(Status.INVALID_FIELD, f"NSZE {nsze} / NCAP {ncap} are invalid")
        if ncap < nsze:
            raise _err(Status.THIN_PROVISIONING_NOT_SUPPORTED, "NCAP must equal NSZE")
        pi, pil, mset = dps & 7, dps >> 3 & 1, flbas >> 4 & 1
        if pi > 3 or dps >> 4:
            raise _err(Status.INVALID_FIELD, f"DPS {dps:#x} is invalid")
        if pi and LBAF_TABLE[lbaf].ms < pi_size(LBAF_TABLE[lbaf].pif):
            raise _err(Status.INVALID_FORMAT, f"LBA format {lbaf} has no room for protection information")
        if nmic > 1:
            raise _err(Status.INVALID_FIELD, f"NMIC {nmic:#x} is invalid")
        if anagrpid:
            raise _err(Status.ANA_GROUP_ID_INVALID, "ANA is not supported")
        if nvmsetid:
            raise _err(Status.INVALID_FIELD, "NVM sets are not supported")
        if endgid not in (0, ENDGID):
            raise _err(Status.INVALID_FIELD, f"endurance group {endgid} does not exist (only {ENDGID})")
        size = nsze * LBA_FORMATS[lbaf][0]
        if size % 4096:
            raise _err(Status.INVALID_FIELD, f"namespace size {size} is not a multiple of 4 KiB")
        if ctrl.allocated_capacity + size > ctrl.total_capacity:
            raise _err(Status.NS_INSUFFICIENT_CAPACITY, f"{size} bytes exceed the unallocated capacity")
        free = [n for n in range(1, ctrl.cfg.max_namespaces + 1) if n not in ctrl.allocated]
        if not free:
            raise _err(Status.NS_ID_UNAVAILABLE, "every namespace identifier is in use")
        nsid = free[0]
        spec = self._create_spec(nsid, size, lbaf)
        if spec.startswith("mem:"):
            held = ctrl.created_mem_bytes
            if held + size > ctrl.cfg.mem_create_limit:
                raise _err(Status.NS_INSUFFICIENT_CAPACITY,
                           f"{size} bytes of namespace memory exceed mem_create_limit "
                           f"({ctrl.cfg.mem_create_limit}; {held} held)")
        if pi or pil or mset:
            spec += f",pi={pi},pil={pil},mset={mset}"
        try:
            ns = ctrl.make_namespace(nsid, spec)
        except (ConfigError, PcidevError, OSError) as exc:
            raise _err(Status.NS_INSUFFICIENT_CAPACITY, f"cannot create the namespace: {exc}") from None
        ctrl.add_namespace(nsid, ns, created_spec=spec)  # (its creation record migrates: pcidev_nvme.ns_records)
        if persists(spec):
            ctrl.save_state()
        return nsid

    def _create_spec(self, nsid: int, size: int, lbaf: int) -> str:
        ctrl = self.ctrl
        kind = ctrl.cfg.ns_create
        if kind == "file" and ctrl.state_dir:
            path = os.path.join(ctrl.state_dir, f"nvme-{ctrl.cfg.serial}-ns{nsid}.img".replace("/", "_"))
            for stale in (path, path + ".nvme-ids", path + SIDECAR_SUFFIX):
                try:
                    os.unlink(stale)
                except FileNotFoundError:
                    pass
            escaped = path.replace(",", ",,")  # the spec grammar: a literal comma is ",,"
            return f"file:path={escaped},size={size},lbaf={lbaf}"
        if kind == "null":
            return f"null:size={size},lbaf={lbaf}"
        return f"mem:size={size},lbaf={lbaf}"

    def _ns_delete(self, req: Request) -> None:
        ctrl = self.ctrl
        nsid = req.nsid
        if nsid == BROADCAST:
            targets = list(ctrl.allocated)
        elif nsid in ctrl.allocated:
            targets = [nsid]
        else:
            raise _err(Status.INVALID_NSID, f"namespace {nsid:#x} is not allocated", OFF_NSID)
        # claimed as a Format NVM claims them: no new I/O starts on them (it completes with
        # Namespace Not Ready, DNR set: the namespace will not become ready, it goes away), and
        # the admin worker waits for the I/O already in flight before closing them (a backend
        # closed under an I/O fails it, and a file backend's closed fd number may be reused)
        ids = set(targets)
        busy = ctrl.begin_format(ids, status=Status.NS_NOT_READY)
        if busy:
            if any(ctrl.claim_status(n) == Status.NS_NOT_READY for n in busy):
                raise _err(Status.INVALID_NSID, f"namespace(s) {busy} are being deleted", OFF_NSID)
            # a running Format NVM holds them: the delete may succeed once it ends (no DNR)
            raise NvmeStatusError(Status.FORMAT_IN_PROGRESS, f"namespace(s) {busy} are being formatted",
                                  param_offset=OFF_NSID, dnr=False)
        ctrl.admin_worker.submit(self._ns_delete_work, req, targets)

    def _run_claimed(self, req: Request, ids: set[int], done: str, work: Callable[[], None]) -> bool:
        """On the admin worker: once no I/O to the namespaces ``ids`` (claimed by
        ``begin_format``) is in flight, run ``work``; then release the claim and complete
        ``req``. If some I/O is still in flight after :data:`IO_DRAIN_TIMEOUT` seconds,
        nothing is done and ``req`` completes with Command Interrupted, DNR clear (the host
        should retry it; a stuck write must not land after a format or a delete). A status
        ``work`` raises completes ``req``; anything else is logged and Internal Error.

        :param done: what ``work`` does to them, for the messages ("formatted", "deleted").
        :returns: whether ``work`` ran to its end.
        """
        ctrl = self.ctrl
        try:
            deadline = time.monotonic() + IO_DRAIN_TIMEOUT
            while ctrl.io_inflight_for(ids):  # (every controller's: the secondaries' too)
                if time.monotonic() > deadline:
                    raise NvmeStatusError(Status.CMD_INTERRUPTED,
                                          f"I/O to namespace(s) {sorted(ids)} did not finish within "
                                          f"{IO_DRAIN_TIMEOUT:g} s; nothing was {done}", dnr=False)
                time.sleep(0.001)
            work()
        except NvmeStatusError as exc:
            ctrl.end_format(ids)
            ctrl.complete(req, exc.status, error=exc)
            return False
        except Exception as exc:
            log.exception("namespace(s) %s could not be %s", sorted(ids), done)
            ctrl.end_format(ids)
            ctrl.complete(req, Status.INTERNAL, error=_err(Status.INTERNAL, str(exc)))
            return False
        ctrl.end_format(ids)  # (after the work: new I/O to them finds the namespace as it left them)
        ctrl.complete(req, 0)
        return True

    def _ns_delete_work(self, req: Request, targets: list[int]) -> None:
        """Delete ``targets`` (claimed by :meth:`_ns_delete`) once no I/O on them is in flight,
        then complete ``req`` (:meth:`_run_claimed`)."""
        def remove() -> None:
            with self.ctrl.state_lock:
                self._ns_remove(targets)

        if self._run_claimed(req, set(targets), "deleted", remove):
            self.ctrl.maybe_save_state()

    def _ns_remove(self, targets: list[int]) -> None:
        ctrl = self.ctrl
        for n in targets:
            ctrl.uncorrectable.clear_namespace(n)
            ctrl.selftests_namespace_changed(n, RESULT_ABORTED_NS_REMOVED)  # (the secondaries' too)
            ns, was_attached, created_spec = ctrl.remove_namespace(n)
            if was_attached:
                ctrl.namespace_changed(n)
            try:
                ns.close()
            except Exception:
                log.exception("closing deleted namespace %d failed", n)
            if created_spec is not None and persists(created_spec):
                path = getattr(ns.backend, "path", None)
                meta_path = getattr(ns.meta, "path", None)
                for victim in (path, getattr(ns.backend, "identity_path", None), meta_path):
                    if victim:
                        try:
                            os.unlink(victim)
                        except OSError:
                            pass
                ctrl.save_state()

    def _ns_attachment(self, req: Request) -> int:
        ctrl = self.ctrl
        sel = req.cdw10 & 0xF
        if sel > 1:
            raise _err(Status.INVALID_FIELD, f"namespace attachment select {sel} is reserved", OFF_CDW10)
        nsid = req.nsid
        if nsid not in ctrl.allocated:
            raise _err(Status.INVALID_NSID, f"namespace {nsid:#x} is not allocated", OFF_NSID)
        if ctrl.claim_status(nsid) == Status.NS_NOT_READY:  # (as Format NVM: it is going away)
            raise _err(Status.INVALID_NSID, f"namespace {nsid} is being deleted", OFF_NSID)
        data = self.from_host(req, 4096)
        (count,) = struct.unpack_from("<H", data)
        if count == 0 or count > 2047:
            raise _err(Status.CONTROLLER_LIST_INVALID, f"controller list of {count} entries")
        ids = struct.unpack_from(f"<{count}H", data, 2)
        virt = ctrl.virtualization
        known = set(virt.controller_ids()) if virt is not None else {ctrl.cfg.cntlid}
        if len(set(ids)) != count or any(i not in known for i in ids):
            raise _err(Status.CONTROLLER_LIST_INVALID, f"controller list {list(ids)} names unknown controllers")
        for cntlid in ids:  # every entry is checked before any is applied (no partial attachment)
            k = virt.index_of(cntlid) if virt is not None and cntlid != ctrl.cfg.cntlid else None
            has = nsid in ctrl.namespaces if k is None or virt is None else nsid in virt.attached(k)
            if sel == 0 and has:
                raise _err(Status.NS_ALREADY_ATTACHED, f"namespace {nsid} is already attached to {cntlid}")
            if sel == 1 and not has:
                raise _err(Status.NS_NOT_ATTACHED, f"namespace {nsid} is not attached to {cntlid}")
        for cntlid in ids:
            if cntlid == ctrl.cfg.cntlid:
                if sel == 0:
                    ctrl.attach_namespace(nsid)
                else:
                    ctrl.detach_namespace(nsid)
                    ctrl.selftest.namespace_changed(nsid, RESULT_ABORTED_NS_REMOVED)
                ctrl.namespace_changed(nsid)
            elif virt is not None:  # a secondary controller (its VF, if enabled, takes the change)
                if sel == 0:
                    virt.attach(cntlid, nsid)
                else:
                    virt.detach(cntlid, nsid)
        if persists(ctrl.created.get(nsid, "")):
            ctrl.save_state()
        return 0

    # -- virtualization ------------------------------------------------------------------------------------
    def _virt_mgmt(self, req: Request) -> int:
        virt = self.ctrl.virtualization
        assert virt is not None  # the handler exists only then
        return virt.manage(req.cdw10, req.cdw11)

    # -- format --------------------------------------------------------------------------------------------
    def _format(self, req: Request) -> int | None:
        ctrl = self.ctrl
        c = req.cdw10
        lbaf = (c & 0xF) | ((c >> 12) & 3) << 4
        mset = (c >> 4) & 1
        pi = (c >> 5) & 7
        pil = (c >> 8) & 1
        ses = (c >> 9) & 7
        nsid = req.nsid
        if nsid == BROADCAST:
            targets = list(ctrl.namespaces.values())
        else:
            ns = ctrl.namespaces.get(nsid)
            if ns is None:
                raise _err(Status.INVALID_NSID, f"namespace {nsid:#x} is not attached", OFF_NSID)
            targets = [ns]
        if lbaf >= len(LBA_FORMATS):
            raise _err(Status.INVALID_FORMAT, f"LBA format {lbaf} is not supported", OFF_CDW10)
        if pi > 3:
            raise _err(Status.INVALID_FORMAT, f"protection information type {pi} is reserved", OFF_CDW10)
        for ns in targets:
            problem = format_problem(lbaf, pi, pil, mset, ns.backend)
            if problem is not None:
                raise _err(Status.INVALID_FORMAT, f"namespace {ns.nsid}: {problem}", OFF_CDW10)
        if ses > 1:
            raise _err(Status.INVALID_FIELD, f"secure erase setting {ses} is not supported", OFF_CDW10 + 1)
        busy = ctrl.begin_format({ns.nsid for ns in targets})
        if busy:
            if any(ctrl.claim_status(n) == Status.NS_NOT_READY for n in busy):
                raise _err(Status.INVALID_NSID, f"namespace(s) {busy} are being deleted", OFF_NSID)
            raise NvmeStatusError(Status.FORMAT_IN_PROGRESS, f"namespace(s) {busy} are being formatted",
                                  dnr=False)  # (it ends: retry)
        ctrl.admin_worker.submit(self._format_work, req, targets, lbaf, ses, pi, pil, mset)
        return None

    def _format_work(self, req: Request, targets: list[Namespace], lbaf: int, ses: int, pi: int = 0, pil: int = 0,
                     mset: int = 0) -> None:
        ctrl = self.ctrl

        def format_all() -> None:
            for ns in targets:
                ctrl.selftests_namespace_changed(ns.nsid, RESULT_ABORTED_FORMAT)  # (the secondaries' too)
                ns.format(lbaf, ses, pi, pil, mset)
                ctrl.uncorrectable.clear_namespace(ns.nsid)

        self._run_claimed(req, {ns.nsid for ns in targets}, "formatted", format_all)

