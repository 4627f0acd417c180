"""Live migration of the NVMe controller: the ``nvme`` vmstate section.

What travels (section ``nvme`` version 1, see :class:`NvmeState`):

* controller registers (CC, CSTS, AQA, ASQ, ACQ, INTMS), the state machine
  (disabled / ready / failed), the shutdown flag, the memory page size;
* every SQ and CQ as an **array of pointers indexed by queue id** (null for an
  unused id): base, size, head, tail, phase, CQ vector and IEN, the SQ's CQ, and
  per CQ the completions **parked while it was full** (its backlog, in order);
* the outstanding Asynchronous Event Requests (their CIDs), the queued events,
  the masked event types (with the log page that unmasks each);
* features: arbitration, power management, volatile write cache, Number of
  Queues (and whether it was allocated), interrupt coalescing, per-vector
  Coalescing Disable, AEC, keep alive, temperature thresholds, the timestamp
  (its value at the save, counted on from the load), error recovery per
  namespace, host behavior support;
* the shadow doorbell buffer (DBS, EIS); per-queue shadow addresses follow from it;
* the Controller Memory Buffer's registers (optional subsection ``nvme/cmb``,
  :class:`~pcidev_nvme.cmb.CmbState`); its contents are a RAM BAR, which the framework
  migrates (the memfd travels over UNIX sockets; over TCP its contents, compared by page
  hashes since controller DMA writes it through a mapping of its own);
* the Persistent Memory Region's registers (optional subsection ``nvme/pmr``,
  :class:`~pcidev_nvme.pmr.PmrState`); its contents are in its file (a file-backed RAM
  BAR: the descriptor travels over UNIX sockets; over TCP its contents, written into the
  destination's own file);
* SMART counters (bytes, commands, busy time, power cycles, power-on time, unsafe
  shutdowns, media errors, temperature times), the temperature, injected and
  reported critical warnings; the Error Information log (count and entries);
  firmware slots, the active and next-reset slot, a partly downloaded image;
  the Changed Namespace List;
* per namespace: attached or not, the LBA format (Format NVM may have changed it)
  and, for a ``mem`` namespace, an :class:`~pcidev.vmstate.FdRef` to its memfd (for
  anonymous memory, a memfd copy of the pages written, made at the save:
  :meth:`~pcidev_nvme.backends.MemoryBackend.stream_fd`); for a
  namespace with metadata or protection information the optional subsection
  :class:`~pcidev_nvme.metadata.MetadataState` (PI type and location, extended LBAs and,
  for ``mem``, an ``FdRef`` to the metadata memfd; a ``file`` namespace's sidecar
  ``IMAGE.nvme-meta`` is reopened by path, or taken over as a descriptor in a handover);
* optional subsections, written only when there is something to carry (a stream
  from before them still loads): the Write Uncorrectable marks
  (:mod:`~pcidev_nvme.uncorrectable`), the aborts of commands not fetched yet
  (:mod:`~pcidev_nvme.abort`), the sanitize status and an operation in progress
  (:mod:`~pcidev_nvme.sanitize`: the destination continues it where the source
  stopped), the self-test results and a test in progress (:mod:`~pcidev_nvme.selftest`:
  it continues with its elapsed time), the per-namespace SMART counters
  (:mod:`~pcidev_nvme.ns_smart`; only the primary's stream carries them with SR-IOV),
  what Namespace Management created and deleted (:mod:`~pcidev_nvme.ns_records`: a
  creation record per created namespace, the deleted configured NSIDs; the primary's).

**Namespaces created or deleted by Namespace Management** migrate: the check phase
checks the records (:func:`namespace_plan`), the apply's first step builds the missing
namespaces as Namespace Management does (nothing in the tables yet), and the table then
becomes the source's (``_change_structure``: deleted namespaces stay open until the
load is committed, :class:`LoadUndo`; a rollback deletes what the load created and puts
back what it deleted).

**Namespace contents are not in the stream.** A ``file`` namespace is reopened by
the destination from its own configuration (the same path: the fingerprint has it),
except in a handover, whose new process takes the old one's descriptors of the image
(:func:`inheritable_fds`, :mod:`pcidev.inheritance`) and never opens the path;
a ``mem`` namespace's memfd travels with the stream (``SCM_RIGHTS``) and the
destination maps it instead of its own empty one; over TCP and in vfio-user migration
data (no descriptors) its contents travel instead (:func:`memory_sources`: copied while the controller serves
I/O, the rest at the stop, into a memfd of the destination's that it maps the same
way); ``null`` namespaces hold nothing. The fingerprint (:func:`fingerprint`) covers the configuration a
destination must match: serial, model, queue count, MQES, MDTS, MSI-X vectors,
AERL, ELPE, firmware slots, the LBA formats and every configured namespace (NSID,
backend kind, size, path, O_DIRECT, read-only, NGUID), as the configuration built it.

**Quiescing** (:func:`quiesce`): stop fetching (no SQ batch in progress), drain the
backend I/O in flight (:meth:`IoCommandSet.drain`) and the admin worker (Format,
shutdown), stop a sanitize operation at a chunk boundary and the self-test's clock,
so every command fetched so far has completed: its completion is in the
CQ or in the CQ's backlog (which travels). Only AERs stay outstanding, and they
travel. Pending coalesced interrupts are delivered and timers stopped. Nothing is
lost or duplicated: SQ entries between head and tail stay in guest memory and the
destination fetches them once. Every wait ends at the quiesce's deadline
(:attr:`pcidev.device.PciDevice.quiesce_deadline`): past it the quiesce fails with
:class:`~pcidev.errors.QuiesceTimeoutError` and the controller runs on, its commands in
flight completing there later (docs/migration.md §12 says why they are not carried to the
destination instead). For a migration (:attr:`~pcidev.device.PciDevice.quiesce_flush`)
the ``file`` images and sidecars written since their last ``fdatasync`` are then flushed
(:func:`flush_namespaces`).

Each component saves and restores its own state (``snapshot()`` / ``restore()`` of a
frozen class defined beside it: :mod:`~pcidev_nvme.queues`, :mod:`~pcidev_nvme.aer`,
:mod:`~pcidev_nvme.features`, :mod:`~pcidev_nvme.interrupts`, :mod:`~pcidev_nvme.logs`,
:mod:`~pcidev_nvme.namespace`, :mod:`~pcidev_nvme.doorbells` and the controller's
registers); :class:`NvmeState` composes them, and this module adds the checks that
span components, quiescing, blockers and the fingerprint.

**Loading** (:func:`check`, :func:`apply`): nothing changes until every check passed; the
apply maps the migrated memory and metadata first (what can fail), then each component takes
its part. What the load replaced (the destination's own namespace memory and metadata
stores) stays open until the load is committed (:class:`LoadUndo`): if a later part of the
load fails (an SR-IOV VF's stream), the framework's rollback puts it back.

An ``nbd`` namespace (:mod:`~pcidev_nvme.backends.nbd`) is reopened by the destination
from its own configuration, a new connection to the same export (also in a handover: no
descriptor is passed); the stop's flush sends ``NBD_CMD_FLUSH``, so every acknowledged
write is on the server before the destination reads, and the pre-flight checks that the
destination reaches the export with the namespace's size (:func:`preflight_problems`).

What blocks (allow-list, :data:`MIGRATABLE_FEATURES`): namespaces whose backend
is not ``mem`` (memfd or anonymous), ``file``, ``null`` or ``nbd`` (a plugin's backends), a
created namespace a record cannot carry
(:func:`~pcidev_nvme.ns_records.record_problem`: a ``file`` image its path no longer
leads to), and a controller reset still waiting for commands.
"""


from __future__ import annotations

import concurrent.futures
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, ClassVar, Protocol

import attrs

from pcidev.device import PciDevice
from pcidev.errors import ConfigError, MigrationError, QuiesceTimeoutError
from pcidev.memory_source import DirtyBitmap, MemorySource
from pcidev.migration.frames import boot_id
from pcidev.vmstate import U8, U32, U64, Bool, Bytes, Mask, Range, VarArray, vmstate
from pcidev.vmstate.errors import StateError
from pcidev_nvme import ns_records
from pcidev_nvme.abort import Aborts, AbortsState
from pcidev_nvme.admin import AdminWorker
from pcidev_nvme.aer import AerState, AsyncEvents, EventState
from pcidev_nvme.atomicity import fingerprint_entry
from pcidev_nvme.backends import BaseBackend, MemoryBackend, NbdBackend
from pcidev_nvme.backends.nbd import export_size
from pcidev_nvme.cmb import CMBSTS_CBAI, CmbState, ControllerMemoryBuffer
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller_memory import ranges_overlap
from pcidev_nvme.doorbells import ShadowDoorbells, ShadowDoorbellsState
from pcidev_nvme.endurance import EnduranceGroup, EnduranceState
from pcidev_nvme.features import Features, FeaturesState, TlerState
from pcidev_nvme.features import state_problem as features_state_problem
from pcidev_nvme.interrupts import Interrupts, InterruptsState, Timer
from pcidev_nvme.io import IoCommandSet
from pcidev_nvme.logs import (
    ChangedNamespaces,
    ChangedNsState,
    ErrorLog,
    ErrorLogState,
    FirmwareSlots,
    FirmwareState,
    FwChunk,
    SmartCounters,
    SmartState,
    error_log_problem,
)
from pcidev_nvme.metadata import MemMetadata, MetadataStore
from pcidev_nvme.namespace import (
    LBA_FORMATS,
    LBAF_TABLE,
    Namespace,
    NamespaceHolding,
    NamespaceState,
    remember_identity,
    stored_identifiers,
)
from pcidev_nvme.namespaces import RemovedNamespace
from pcidev_nvme.ns_records import CreatedNamespaceRecord, NamespaceChangesState, NamespacePlan
from pcidev_nvme.ns_smart import NamespaceSmart, NamespaceSmartState
from pcidev_nvme.pmr import PersistentMemoryRegion, PmrState
from pcidev_nvme.queues import CompletionQueue, CqeState, CqState, SqState, SubmissionQueue
from pcidev_nvme.registers import AQA_MASK, CC_MASK, CSTS_MASK, QUEUE_BASE_MASK, ControllerState
from pcidev_nvme.registers import state_problem as register_state_problem
from pcidev_nvme.sanitize import SANACT_BLOCK_ERASE, SANACT_CRYPTO_ERASE, Sanitizer, SanitizeState
from pcidev_nvme.selftest import SelfTest, SelfTestState
from pcidev_nvme.uncorrectable import Uncorrectable, UncorrectableState
from pcidev_nvme.virtualization import Virtualization, VirtualizationState


class MigrationHost(Protocol):
    """What this module uses of :class:`pcidev_nvme.controller.NvmeController` (which it
    cannot import: the controller imports this module)."""

    cfg: NvmeConfig
    io: IoCommandSet
    aer: AsyncEvents
    features: Features
    smart: SmartCounters
    error_log: ErrorLog
    firmware: FirmwareSlots
    changed_ns: ChangedNamespaces
    interrupts: Interrupts
    shadow: ShadowDoorbells
    state_lock: threading.RLock
    admin_worker: AdminWorker
    cmb: ControllerMemoryBuffer | None
    pmr: PersistentMemoryRegion | None
    uncorrectable: Uncorrectable
    aborts: Aborts
    sanitizer: Sanitizer
    selftest: SelfTest
    virtualization: Virtualization | None
    load_undo: LoadUndo
    vmstate_save_fds: list[int] | None
    owns_namespaces: bool
    endurance: EnduranceGroup
    ns_smart: NamespaceSmart
    quiesce_deadline: float | None
    quiesce_flush: bool
    quiesce_times: QuiesceTimes | None

    @property
    def allocated(self) -> Mapping[int, Namespace]: ...
    @property
    def namespaces(self) -> Mapping[int, Namespace]: ...
    @property
    def configured(self) -> Mapping[int, Namespace]: ...
    @property
    def state_dir(self) -> str | None: ...
    def set_attached(self, nsids: Iterable[int]) -> None: ...
    def make_namespace(self, nsid: int, spec: str, *, remember: bool = True) -> Namespace: ...
    def add_namespace(self, nsid: int, ns: Namespace, *, created_spec: str | None = None,
                      attached: bool = False) -> None: ...
    def remove_namespace(self, nsid: int) -> RemovedNamespace: ...
    @property
    def fsm_state(self) -> str: ...
    @property
    def running(self) -> bool: ...
    @property
    def submission_queues(self) -> list[Any]: ...
    @property
    def completion_queues(self) -> list[Any]: ...
    def snapshot(self) -> ControllerState: ...
    def restore(self, st: ControllerState) -> None: ...
    def install_queues(self, sqs: list[Any], cqs: list[Any]) -> None: ...
    def restore_parked_aers(self, cids: tuple[int, ...]) -> list[Any]: ...
    def finish_restore(self) -> None: ...
    def account_temperature(self) -> None: ...
    def pause(self) -> None: ...
    def unpause(self) -> bool: ...
    def fetch_idle(self) -> bool: ...
    def batches_idle(self) -> bool: ...
    def stop_timers(self) -> None: ...
    def restart_work(self) -> None: ...
    def vmstate_fd(self, fd: int) -> Any: ...
    def vmstate_load_fd(self, ref: Any) -> int | None: ...
    def vmstate_load_allocated(self, ref: Any) -> bytes | None: ...

__all__ = ["NvmeState", "SqState", "CqState", "CqeState", "AerState", "EventState", "FeaturesState", "TlerState",
           "SmartState", "FirmwareState", "FwChunk", "NamespaceState", "MIGRATABLE_FEATURES", "fingerprint",
           "features", "blockers", "inheritable_fds", "quiesce", "flush_namespaces", "DEFAULT_QUIESCE_TIMEOUT",
           "QuiesceTimes", "prepare_quiesce", "PREPARE_FLUSH_TIMEOUT", "PREFLIGHT_NBD_TIMEOUT",
           "PREFLIGHT_NBD_PROBES", "LOCAL_FILESYSTEMS", "SHARED_FILESYSTEMS",
           "resume", "save", "check", "apply", "LoadUndo", "namespace_plan", "MigrationMixin"]

log = logging.getLogger(__name__)

SECTION = "nvme"
MAX_QUEUES = 1025
MAX_NS = 1024

#: features the ``nvme`` section carries (anything else enabled blocks migration)
MIGRATABLE_FEATURES = frozenset({
    "nvme-queues", "nvme-aer", "nvme-dbbuf", "nvme-smart", "nvme-error-log", "nvme-firmware",
    "nvme-coalescing", "nvme-keep-alive", "nvme-multi-namespace",
    "nvme-backend:mem", "nvme-backend:file", "nvme-backend:file-direct", "nvme-backend:null",
    "nvme-backend:nbd",
})

#: seconds the destination's pre-flight waits to reach the NBD exports (one connection each,
#: all at once: one deadline for all of them)
PREFLIGHT_NBD_TIMEOUT = 5.0
#: NBD exports the pre-flight probes at the same time (threads)
PREFLIGHT_NBD_PROBES = 32
#: file systems of one machine's own disks or memory (named as such in the pre-flight's
#: sentence); any file system not in :data:`SHARED_FILESYSTEMS` counts as one
LOCAL_FILESYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "bcachefs", "zfs", "vfat", "exfat",
    "ntfs", "ntfs3", "tmpfs", "ramfs", "overlay",
})
#: network and cluster file systems (``/proc/self/mountinfo`` types): a ``file`` namespace's
#: image on one of them may be the file a destination on another machine opens at the same
#: path (checked by that path); on any other -- a local one, one of a type not listed, or one
#: the source could not tell -- it cannot, and a move to another machine is refused
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "fuse.ceph", "fuse.ceph-fuse", "glusterfs",
    "fuse.glusterfs", "gfs2", "ocfs2", "lustre", "beegfs", "gpfs", "afs", "orangefs", "pvfs2",
    "fuse.moosefs", "fuse.mfs", "fuse.lizardfs", "fuse.juicefs", "quobyte", "fuse.quobyte", "panfs",
})

_STATES = ("disabled", "ready", "failed")


def _registers_problem(st: NvmeState) -> tuple[str, str] | None:
    """The invariant of :class:`NvmeState` the decoder checks: the registers and the state
    machine agree as on a live controller (:func:`~pcidev_nvme.registers.state_problem`)."""
    return register_state_problem(_STATES[st.state], st.cc, st.csts, st.shutting_down, st.page_size)


@vmstate("nvme", version=1, check=_registers_problem)
@attrs.frozen
class NvmeState:
    """The NVMe controller's own state (the framework migrates config space and MSI-X).

    Each register field admits only the bits a guest (or the controller) can set, and
    :func:`_registers_problem` the combinations a live controller can be in; what depends on
    the configuration (queue sizes, vectors, namespaces, ...) is :func:`check`'s.
    """

    state: Annotated[U8, Range(0, len(_STATES) - 1)]  # index in ("disabled", "ready", "failed")
    cc: Annotated[U32, Mask(CC_MASK)]
    csts: Annotated[U32, Mask(CSTS_MASK)]
    aqa: Annotated[U32, Mask(AQA_MASK)]
    asq: Annotated[U64, Mask(QUEUE_BASE_MASK)]
    acq: Annotated[U64, Mask(QUEUE_BASE_MASK)]
    intms: U32
    shutting_down: Bool
    dirty: Bool
    page_size: U32
    sqs: VarArray[SqState | None, MAX_QUEUES]
    cqs: VarArray[CqState | None, MAX_QUEUES]
    aer: AerState
    features: FeaturesState
    smart: SmartState
    error_count: U64
    error_entries: VarArray[Bytes[64], 256]
    firmware: FirmwareState
    changed_ns: VarArray[U32, 1024]
    changed_ns_overflow: Bool
    namespaces: VarArray[NamespaceState, MAX_NS]
    dbbuf_dbs: U64 = 0
    dbbuf_eis: U64 = 0
    dbbuf: Bool = False
    cmb: CmbState | None = None
    pmr: PmrState | None = None
    uncorrectable: UncorrectableState | None = None
    aborts: AbortsState | None = None
    sanitize: SanitizeState | None = None
    self_test: SelfTestState | None = None
    #: SR-IOV: the primary controller's secondary controllers (pcidev_nvme.virtualization)
    virtualization: VirtualizationState | None = None
    #: the endurance group: feature 18h, its event aggregate log (pcidev_nvme.endurance)
    endurance: EnduranceState | None = None
    #: the per-namespace SMART counters (pcidev_nvme.ns_smart; the primary's with SR-IOV)
    ns_smart: NamespaceSmartState | None = None
    #: what Namespace Management created and deleted (pcidev_nvme.ns_records; the primary's)
    ns_management: NamespaceChangesState | None = None


# ----------------------------------------------------------------------------- configuration
def _backend_feature(ns: Any) -> str:
    b = ns.backend
    kind = getattr(b, "kind", type(b).__name__)  # (anonymous memory is "mem": it migrates as one)
    if kind == "file" and getattr(b, "direct", False):
        return "nvme-backend:file-direct"
    return f"nvme-backend:{kind}"


def features(ctrl: MigrationHost) -> set[str]:
    """The controller's features for the allow-list (see :data:`MIGRATABLE_FEATURES`)."""
    out = {"nvme-queues", "nvme-aer", "nvme-smart", "nvme-error-log", "nvme-firmware"}
    if ctrl.shadow.enabled:
        out.add("nvme-dbbuf")
    if ctrl.interrupts.coalescing_on:
        out.add("nvme-coalescing")
    if ctrl.features.kato_ms:
        out.add("nvme-keep-alive")
    if len(ctrl.allocated) > 1:
        out.add("nvme-multi-namespace")
    for ns in ctrl.allocated.values():
        feat = _backend_feature(ns)
        if feat in MIGRATABLE_FEATURES:  # (any other: blockers() names the namespace, once)
            out.add(feat)
    return out


def blockers(ctrl: MigrationHost) -> list[str]:
    """Reasons of the moment (the allow-list covers the configuration)."""
    out = []
    if ctrl.owns_namespaces:  # (created namespaces travel as records: pcidev_nvme.ns_records)
        for nsid in ns_records.changes(ctrl)[0]:
            why = ns_records.record_problem(ctrl.allocated[nsid])
            if why is not None:
                out.append(f"namespace {nsid} (created by Namespace Management): {why}")
    for ns in sorted(ctrl.allocated.values(), key=lambda n: n.nsid):
        feat = _backend_feature(ns)
        if feat not in MIGRATABLE_FEATURES:
            out.append(f"namespace {ns.nsid}: its backend ({feat.split(':', 1)[1]}) cannot follow the "
                       "controller to another process")
    if ctrl.fsm_state == "resetting":
        out.append("a controller reset is waiting for commands in flight")
    return out


#: what a ``mem`` namespace's memory sources stand in for (its memfd over UNIX sockets)
MEM_FD_FEATURE = "nvme-backend:mem"


def memory_sources(ctrl: MigrationHost) -> list[MemorySource]:
    """The memfds of the ``mem`` namespaces the controller has now (configured or created
    by Namespace Management; anonymous memory: its mapping, read in place,
    :meth:`~pcidev_nvme.backends.MemoryBackend.memory_source`) and of their metadata, as
    memory sources: over a channel
    without descriptors (TCP) their contents travel instead (pre-copy while the controller
    serves I/O, the rest at the stop). Each is tracked by the dirty bitmap its store marks
    on every write (:attr:`pcidev_nvme.backends.MemoryBackend.dirty`,
    :attr:`pcidev_nvme.metadata.MemMetadata.dirty`). A name carries the memfd's inode, so
    a store replaced while a pre-copy runs (Format NVM, a namespace deleted and created
    again) is a new source, sent whole at the stop. A secondary controller (SR-IOV) has
    none: its namespaces are the primary's."""
    if not ctrl.owns_namespaces:
        return []
    out = []
    for nsid, ns in sorted(list(ctrl.allocated.items())):  # a copy: namespaces may come and go meanwhile
        b, meta = ns.backend, ns.meta
        stores: list[tuple[str, int, int, DirtyBitmap | None]] = []
        if isinstance(b, MemoryBackend):  # (a memfd, or anonymous memory read in place)
            src = b.memory_source(f"nvme/ns{nsid}", covers=frozenset({MEM_FD_FEATURE}))
            if src is not None:
                out.append(src)
        if isinstance(meta, MemMetadata) and meta.mem_fd >= 0:
            stores.append((f"nvme/ns{nsid}/meta", meta.mem_fd, meta.nbytes, meta.dirty))
        for name, fd, size, bitmap in stores:
            try:
                ino = os.fstat(fd).st_ino
            except OSError:  # closed meanwhile: the namespace is gone
                continue
            out.append(MemorySource(name=f"{name}@{ino}", fd=fd, size=size, bitmap=bitmap,
                                    covers=frozenset({MEM_FD_FEATURE})))
    return out


def fingerprint(ctrl: MigrationHost) -> dict[str, Any]:
    """Configuration a destination must match exactly."""
    cfg = ctrl.cfg
    namespaces = []
    # the configured namespaces, as the configuration built them (also once Namespace
    # Management deleted them: what it changed travels in the stream, pcidev_nvme.ns_records)
    for nsid in range(1, len(cfg.namespaces) + 1):
        ns = ctrl.configured.get(nsid)
        if ns is None:  # (a controller that shares another's table before it is built)
            namespaces.append([nsid, "deleted"])
            continue
        b = ns.backend
        namespaces.append([nsid, str(getattr(b, "kind", type(b).__name__)), int(ns.size),
                           str(getattr(b, "path", "") or ""), bool(getattr(b, "direct", False)),
                           bool(ns.read_only), ns.nguid.hex()])
    return {
        "nvme.serial": cfg.serial, "nvme.model": cfg.model, "nvme.firmware": cfg.firmware,
        "nvme.cntlid": cfg.cntlid, "nvme.max_ioqpairs": cfg.max_ioqpairs, "nvme.mqes": cfg.mqes,
        "nvme.mdts": cfg.mdts, "nvme.msix_vectors": cfg.msix_vectors, "nvme.aerl": cfg.aerl,
        "nvme.elpe": cfg.elpe, "nvme.max_namespaces": cfg.max_namespaces, "nvme.fw_slots": cfg.fw_slots,
        "nvme.dbbuf": cfg.dbbuf, "nvme.capacity": cfg.capacity,
        # the formats without metadata, as every version has them (a namespace in a format with
        # metadata travels with a subsection an older destination refuses)
        "nvme.lba_formats": [[f.size, f.rp] for f in LBAF_TABLE if not f.ms],
        "nvme.namespaces": namespaces,
        **({"nvme.cmb_size": cfg.cmb_size} if cfg.cmb_size else {}),
        **({"nvme.ocp": True} if cfg.ocp else {}),
        **({"nvme.vsl": cfg.vsl} if cfg.vsl else {}),  # (Identify CNS 06h, the Verify limit)
        **({"nvme.aer_max_queued": cfg.aer_max_queued} if cfg.aer_max_queued != 64 else {}),
        **({"nvme.pmr": [os.path.abspath(cfg.pmr), int(cfg.pmr_size)]} if cfg.pmr is not None else {}),
        **({"nvme.sriov": [cfg.sriov_max_vfs, cfg.sriov_vq_flexible, cfg.sriov_vi_flexible,
                           cfg.sriov_max_vq_per_vf, cfg.sriov_max_vi_per_vf]} if cfg.sriov_max_vfs else {}),
        **fingerprint_entry(cfg.awun, cfg.awupf, cfg.atomic_dn,
                            [(nsid, ctrl.configured.get(nsid)) for nsid in range(1, len(cfg.namespaces) + 1)]),
    }


def preflight_facts(ctrl: MigrationHost) -> dict[str, Any]:
    """The facts a destination checks in the pre-flight, beyond the :func:`fingerprint`.

    The pre-flight runs before the source stops anything
    (:meth:`~pcidev.device.PciDevice.migration_facts`, :mod:`pcidev.migration.preflight`):

    * ``nvme.nsids``: the NSIDs the controller has now (those the stream will list);
    * ``nvme.images``: per ``file`` namespace ``[nsid, path, size, read_only, [st_dev, st_ino]]``
      (the identity of the file it has open, compared on the same machine: ``nvme.host``,
      the kernel boot id);
    * ``nvme.created`` / ``nvme.deleted``: when Namespace Management changed anything, its
      records as the stream carries them (``[nsid, kind, size, nguid, eui64, uuid, path]``
      per created namespace, :class:`~pcidev_nvme.ns_records.CreatedNamespaceRecord`);
    * ``nvme.nbd``: per ``nbd`` namespace ``[nsid, uri, size, read_only]`` (left out when
      there is none: an older destination sees the same facts);
    * ``nvme.image_fs``: per ``file`` namespace ``[nsid, type]`` (``/proc/self/mountinfo``'s
      type of the mount the open image is on: ``ext4``, ``nfs4``; ``unknown`` when no mount
      matches the file's device).

    A secondary controller (SR-IOV) has none: its namespaces are its primary's.

    :param ctrl: the running source controller.
    :returns: the facts (msgpack-able).
    """
    if not ctrl.owns_namespaces:
        return {}
    with ctrl.state_lock:
        namespaces = sorted(ctrl.allocated.items())
        records = ns_records.snapshot(ctrl)
    images: list[list[Any]] = []
    for nsid, ns in namespaces:
        b = ns.backend
        if getattr(b, "kind", None) != "file":
            continue
        try:
            st = os.fstat(getattr(b, "fd", -1))
            ident: list[int] | None = [st.st_dev, st.st_ino]
        except (OSError, TypeError, AttributeError):
            ident = None
        images.append([nsid, str(getattr(b, "path", "") or ""), int(ns.size), bool(ns.read_only), ident])
    exports = [[nsid, ns.backend.uri, int(ns.size), bool(ns.read_only)] for nsid, ns in namespaces
               if isinstance(ns.backend, NbdBackend)]
    held = [(nsid, getattr(ns.backend, "fd", -1)) for nsid, ns in namespaces
            if getattr(ns.backend, "kind", None) == "file"]
    filesystems = [[nsid, _filesystem_of(fd) or "unknown"] for nsid, fd in held]
    out: dict[str, Any] = {"nvme.host": boot_id(), "nvme.nsids": [nsid for nsid, _ in namespaces],
                           "nvme.images": images}
    if exports:
        out["nvme.nbd"] = exports
    if filesystems:
        out["nvme.image_fs"] = filesystems
    if records is not None:
        out["nvme.created"] = [[r.nsid, r.kind, r.size, r.nguid, r.eui64, r.uuid, r.path] for r in records.created]
        out["nvme.deleted"] = list(records.deleted)
    return out


def _fact(value: Any, kind: type, what: str) -> Any:
    """``value`` if it is a ``kind`` (never a bool for an int). :raises ValueError: else."""
    if type(value) is not kind:
        raise ValueError(f"{what} is {type(value).__name__}, not {kind.__name__}")
    return value


def _records(facts: Mapping[str, Any]) -> NamespaceChangesState | None:
    """The ``nvme/ns-management`` records the facts describe (None: nothing changed).
    :raises ValueError: malformed."""
    created, deleted = facts.get("nvme.created"), facts.get("nvme.deleted")
    if created is None and deleted is None:
        return None
    recs = []
    for j, r in enumerate(_fact(created, list, "nvme.created")):
        if type(r) is not list or len(r) != 7:
            raise ValueError(f"nvme.created[{j}] is not a record of 7 items")
        nsid, kind, size = _fact(r[0], int, "nsid"), _fact(r[1], str, "kind"), _fact(r[2], int, "size")
        ids = [_fact(v, bytes, "an identifier") for v in r[3:6]]
        if [len(v) for v in ids] != [16, 8, 16] or len(kind) > 16 or not 0 <= nsid < 1 << 32 or size < 0:
            raise ValueError(f"nvme.created[{j}] holds an identifier, kind, NSID or size out of range")
        recs.append(CreatedNamespaceRecord(nsid=nsid, kind=kind, size=size, nguid=ids[0], eui64=ids[1],
                                           uuid=ids[2], path=_fact(r[6], str, "path")))
    gone = [_fact(n, int, "a deleted NSID") for n in _fact(deleted, list, "nvme.deleted")]
    return NamespaceChangesState(created=tuple(recs), deleted=tuple(gone))


def _served_image_problem(ctrl: MigrationHost, nsid: int, path: str, size: int, read_only: bool,
                          ident: list[int] | None, same_host: bool) -> str | None:
    """Why the image of the source's ``file`` namespace ``nsid`` is not one this controller
    can serve (None: it is). On the same machine, a controller that has the very file open
    that the source writes serves it, whatever its path leads to now (a handover's new
    process holds the old one's descriptor; an image renamed after both opened it), and one
    that has another file open does not. Otherwise (another machine, or no image open here)
    by its path: reachable, a regular file of at least the namespace's size, readable (and
    writable unless read-only), the file this controller's namespace has open, and on the
    same machine the source's file."""
    where = f"namespace {nsid}: image {path}"
    ns = ctrl.allocated.get(nsid)
    fd = getattr(ns.backend, "fd", -1) if ns is not None and getattr(ns.backend, "kind", None) == "file" else -1
    held = None
    if fd >= 0:
        try:
            held = os.fstat(fd)
        except OSError:
            held = None
    if same_host and ident is not None and held is not None:
        if [held.st_dev, held.st_ino] == ident:
            return None
        return f"{where}: this controller has another file open than the one the source writes (the destination " \
               "must see the same file)"
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{where} cannot be reached here ({exc.strerror}): the destination must see the same file"
    if not stat.S_ISREG(st.st_mode):
        return f"{where} is not a regular file here"
    if st.st_size < size:
        return f"{where} has {st.st_size} bytes here, the namespace {size}"
    if not os.access(path, os.R_OK | (0 if read_only else os.W_OK)):
        return f"{where} cannot be opened for {'reading' if read_only else 'reading and writing'} here"
    if held is not None and (held.st_dev, held.st_ino) != (st.st_dev, st.st_ino):
        return f"{where} names another file now than the one this controller opened (renamed or replaced)"
    if same_host and ident is not None and [st.st_dev, st.st_ino] != ident:
        return f"{where} is another file here than the one the source writes: the destination must see the same file"
    return None


def preflight_problems(ctrl: MigrationHost, facts: Mapping[str, Any]) -> list[str]:
    """Every reason why this controller could not take the state of the source controller
    whose :func:`preflight_facts` are ``facts`` (empty: none), checked before the source
    stops anything (:meth:`~pcidev.device.PciDevice.check_migration_facts`); the load's
    checks stay the final guard. Nothing is changed and no file is opened: the Namespace
    Management records are planned as the load would (:func:`pcidev_nvme.ns_records.plan`:
    a created ``file`` namespace's image must be the one this controller's Namespace
    Management makes, reachable here), each ``file`` namespace's image is checked
    (:func:`_served_image_problem`; on another machine, one on any file system but a
    network or cluster one, :data:`SHARED_FILESYSTEMS`, is refused), and each ``nbd``
    namespace's export must be reachable here with its size (one new connection each, all
    at once, within :data:`PREFLIGHT_NBD_TIMEOUT` seconds in all).

    :param ctrl: the destination controller.
    :param facts: the source's facts (from the peer).
    :returns: one sentence per reason.
    :raises ValueError: malformed facts (the channel refuses the pre-flight as garbage).
    """
    if not ctrl.owns_namespaces or not facts:
        return []
    nsids = [_fact(n, int, "an NSID") for n in _fact(facts.get("nvme.nsids"), list, "nvme.nsids")]
    same_host = bool(facts.get("nvme.host")) and facts.get("nvme.host") == boot_id()
    out = []
    build: set[int] = set()
    try:
        build = {r.nsid for r in ns_records.plan(ctrl, _records(facts), nsids).build}
    except StateError as exc:
        out.append(str(exc))
    for j, entry in enumerate(_fact(facts.get("nvme.images"), list, "nvme.images")):
        if type(entry) is not list or len(entry) != 5:
            raise ValueError(f"nvme.images[{j}] is not a list of 5 items")
        nsid, path, size = _fact(entry[0], int, "nsid"), _fact(entry[1], str, "path"), _fact(entry[2], int, "size")
        ident = entry[4]
        if ident is not None and (type(ident) is not list or len(ident) != 2
                                  or not all(type(v) is int for v in ident)):
            raise ValueError(f"nvme.images[{j}] has a file identity that is not two integers")
        if nsid in build:
            continue  # (the plan checked the image a created namespace reopens)
        why = _served_image_problem(ctrl, nsid, path, size, _fact(entry[3], bool, "read_only"), ident, same_host)
        if why is not None:
            out.append(why)
    fs_facts = facts.get("nvme.image_fs")
    paths = {e[0]: e[1] for e in facts["nvme.images"]}
    for j, entry in enumerate(_fact(fs_facts, list, "nvme.image_fs") if fs_facts is not None else []):
        if type(entry) is not list or len(entry) != 2:
            raise ValueError(f"nvme.image_fs[{j}] is not a list of 2 items")
        nsid, fstype = _fact(entry[0], int, "nsid"), _fact(entry[1], str, "a file system type")
        if same_host or fstype in SHARED_FILESYSTEMS:
            continue
        what = (f"the source machine's own {fstype} file system" if fstype in LOCAL_FILESYSTEMS
                else f"a file system of type {fstype!r}, not known to be shared between machines")
        out.append(f"namespace {nsid}: image {paths.get(nsid, '?')} is on {what}: a destination on another "
                   "machine would open another file at that path (move it to shared storage -- NFS, a "
                   "cluster file system -- or to an nbd namespace)")
    exports = facts.get("nvme.nbd")
    probes: list[tuple[int, str, int, bool]] = []
    probed: set[int] = set()  # (one probe per namespace: a peer repeating one costs nothing more)
    for j, entry in enumerate(_fact(exports, list, "nvme.nbd") if exports is not None else []):
        if type(entry) is not list or len(entry) != 4:
            raise ValueError(f"nvme.nbd[{j}] is not a list of 4 items")
        if _fact(entry[0], int, "nsid") in probed:
            raise ValueError(f"nvme.nbd[{j}] names namespace {entry[0]} again")
        probed.add(entry[0])
        probes.append((_fact(entry[0], int, "nsid"), _fact(entry[1], str, "uri"),
                       _fact(entry[2], int, "size"), _fact(entry[3], bool, "read_only")))
    out += _export_problems(ctrl, probes, PREFLIGHT_NBD_TIMEOUT)
    return out


def _export_problems(ctrl: MigrationHost, probes: list[tuple[int, str, int, bool]], timeout: float) -> list[str]:
    """:func:`_served_export_problem` of each ``(nsid, uri, size, read_only)``, all probed at
    once (:data:`PREFLIGHT_NBD_PROBES` at a time) within one deadline ``timeout`` seconds
    away: several unreachable exports take the time of one. A probe not done by then is
    one sentence too (its connection ends on its own, within its timeout)."""
    if not probes:
        return []
    deadline = time.monotonic() + timeout

    def probe(nsid: int, uri: str, size: int, read_only: bool) -> str | None:
        return _served_export_problem(ctrl, nsid, uri, size, read_only,
                                      timeout=max(deadline - time.monotonic(), 0.001))

    pool = concurrent.futures.ThreadPoolExecutor(min(len(probes), PREFLIGHT_NBD_PROBES),
                                                 thread_name_prefix="nvme-preflight")
    try:
        futures = [pool.submit(probe, *p) for p in probes]
        done, _late = concurrent.futures.wait(futures, timeout=timeout + 1.0)
        out = []
        for (nsid, uri, _size, _ro), future in zip(probes, futures, strict=True):
            why = future.result() if future in done else (
                f"namespace {nsid} (NBD export {uri}) cannot be reached here within {timeout:g} s: "
                "the destination must reach the export")
            if why is not None:
                out.append(why)
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _filesystem_of(fd: int) -> str | None:
    """The type of the file system open file ``fd`` is on, from ``/proc/self/mountinfo``
    (the mount whose device is the file's; None: unknown)."""
    try:
        dev = os.fstat(fd).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except (OSError, TypeError):
        return None
    want = f"{os.major(dev)}:{os.minor(dev)}"
    for line in lines:
        fields, _sep, rest = line.partition(" - ")
        parts = fields.split()
        if len(parts) > 2 and parts[2] == want and rest.split():
            return rest.split()[0]
    return None


def _served_export_problem(ctrl: MigrationHost, nsid: int, uri: str, size: int, read_only: bool,
                           timeout: float = PREFLIGHT_NBD_TIMEOUT) -> str | None:
    """Why this controller cannot serve the source's ``nbd`` namespace ``nsid`` on export
    ``uri`` (None: it can). Its namespace ``nsid`` must be an ``nbd`` one (its own
    configuration names the export, by the same URI or another route to it: a socket path
    of this host), and a new connection to its URI must reach the export within
    ``timeout`` seconds with at least the namespace's size (a connection already open here
    does not prove the export is still reachable: the server may have gone since)."""
    where = f"namespace {nsid} (NBD export {uri})"
    ns = ctrl.allocated.get(nsid)
    if ns is None or not isinstance(ns.backend, NbdBackend):
        kind = "missing" if ns is None else str(getattr(ns.backend, "kind", type(ns.backend).__name__))
        return f"{where}: this controller's namespace {nsid} is {kind}, not on an NBD export"
    here = ns.backend.uri
    via = "" if here == uri else f" through {here}"
    if int(ns.size) != size:
        return f"{where}: this controller's namespace has {int(ns.size)} bytes, the source's {size}"
    if not read_only and ns.read_only:
        return f"{where}: this controller's namespace is read-only, the source's is writable"
    try:
        got = export_size(here, timeout)
    except OSError as exc:
        return f"{where} cannot be reached here{via} ({exc.strerror or exc}): the destination must reach the export"
    except ConfigError as exc:
        return f"{where} cannot be reached here: {exc}"
    if got < size:
        return f"{where} has {got} bytes here{via}, the namespace {size}: another export than the source's"
    return None


def inheritable_fds(ctrl: MigrationHost) -> dict[str, int]:
    """The namespaces' backend descriptors a handover's new process takes over (a
    ``file`` image: the new process never reopens its path, see :mod:`pcidev.inheritance`)."""
    out: dict[str, int] = {}
    # (asked from the handover's control thread while the device runs: a namespace that
    # Namespace Management changes meanwhile blocks the cut, so a stale answer is refused)
    with ctrl.state_lock:
        namespaces = list(ctrl.allocated.items())
        configured = set(ctrl.configured)
        created = set(ns_records.changes(ctrl)[0])
    for nsid, ns in namespaces:
        if nsid in created and nsid in configured:
            # created on the NSID of a deleted configured namespace: the new process builds
            # the configured one at power-on (as a restart does) and the load reopens this
            # image by its record's path -- checked before anything stops to still name the
            # file held here (ns_records.record_problem) -- so nothing is passed for it
            continue
        # optional in the Backend protocol: plugin backends without it pass nothing
        get = getattr(ns.backend, "inheritable_fds", None)
        if get is not None:
            out.update(get())
        out.update(ns.inheritable_fds())  # the metadata sidecar of a file namespace
    return out


# ----------------------------------------------------------------------------- a load's undo
class LoadUndo:
    """What a vmstate load replaced, kept until the load is committed (owned by the
    controller's migration part, :class:`MigrationMixin`).

    A load maps the source's namespace memory and metadata in place of the destination's
    own. A later part of the same load can still fail (the SR-IOV VFs' streams load after
    the ``nvme`` section), and the framework then puts the device back by applying the
    state it saved just before -- whose namespaces name no descriptor. So the replaced
    backends and metadata stores stay open (:meth:`retire`) until the load is committed
    (:meth:`commit`: the next quiesce, resume or load, or the close), and the state saved
    outside a save remembers what every namespace held (:meth:`keep`): applying that very
    state (:meth:`kept_for`) puts it back and closes what the failed load opened.
    """

    def __init__(self) -> None:
        self._kept: tuple[NvmeState, dict[int, NamespaceHolding]] | None = None
        #: replaced backends and stores, with whether a store is to be removed (a format
        #: without metadata) rather than closed
        self._retired: list[tuple[Any, bool]] = []
        #: the namespaces the load added to the table and those it took out (in order)
        self._added: list[int] = []
        self._removed: list[tuple[int, RemovedNamespace]] = []
        #: the namespaces loads created whose identity files are not written yet (nothing
        #: is written beside an image before the load is accepted)
        self._unremembered: dict[int, Namespace] = {}

    def keep(self, st: NvmeState, held: dict[int, NamespaceHolding]) -> None:
        """``st`` was saved outside a save (a load's rollback copy): what the namespaces held."""
        self._kept = (st, held)

    def kept_for(self, st: NvmeState) -> dict[int, NamespaceHolding] | None:
        """What the namespaces held when ``st`` was saved, if ``st`` is the rollback copy."""
        kept = self._kept
        if kept is None or kept[0] is not st:
            return None
        self._kept = None
        return kept[1]

    def retire(self, thing: Any, *, remove: bool = False) -> None:
        """A backend or metadata store a load replaced: closed (or removed) at :meth:`commit`."""
        self._retired.append((thing, remove))

    def added(self, nsid: int, ns: Namespace) -> None:
        """The load created namespace ``nsid`` (the rollback deletes and closes it; its
        identity file is written once the load is settled, :meth:`remember`)."""
        self._added.append(nsid)
        self._unremembered[nsid] = ns

    def removed(self, nsid: int, removed: RemovedNamespace) -> None:
        """The load deleted namespace ``nsid``: closed at :meth:`commit` (never its image:
        the source's), put back by the rollback."""
        self._removed.append((nsid, removed))
        self.retire(removed.ns)

    def take_structure(self) -> tuple[list[int], list[tuple[int, RemovedNamespace]]]:
        """(NSIDs the load added, what it removed), for the rollback to undo; forgotten here."""
        out = (self._added, self._removed)
        for nsid in self._added:
            self._unremembered.pop(nsid, None)
        self._added, self._removed = [], []
        return out

    def remember(self, allocated: Mapping[int, Namespace]) -> None:
        """The loads are accepted (the controller resumes or quiesces, or closes owning its
        state): write the identity files of the namespaces they created that are still in
        the table (``allocated``)."""
        pending, self._unremembered = self._unremembered, {}
        for nsid, ns in sorted(pending.items()):
            if allocated.get(nsid) is ns:
                remember_identity(ns)

    def settle(self) -> None:
        """A quiesce or resume: the load is committed, no rollback copy is current."""
        self._kept = None
        self.commit()

    def forget(self) -> None:
        """The rollback put the retired things back in use: nothing to close."""
        self._retired = []
        for nsid in self._added:
            self._unremembered.pop(nsid, None)
        self._added, self._removed = [], []

    def commit(self) -> None:
        """The load is committed: close what it replaced."""
        self._added, self._removed = [], []
        retired, self._retired = self._retired, []
        for thing, remove in retired:
            try:
                if remove and isinstance(thing, MetadataStore):
                    thing.remove()
                else:
                    thing.close()
            except Exception:
                log.exception("closing what a vmstate load replaced failed")


def _settle(ctrl: MigrationHost) -> None:
    """A quiesce or resume: the last load is committed; stores a load's checks opened for a
    load that never applied (a later section refused) are closed."""
    ctrl.load_undo.settle()
    # the loads are accepted: what they write beside the images (identity files, Write
    # Uncorrectable sidecars) is written now, never before
    ctrl.load_undo.remember(ctrl.allocated)
    ctrl.uncorrectable.release_deferred()
    with ctrl.state_lock:
        discard_prepared(ctrl)


def discard_prepared(ctrl: MigrationHost) -> None:
    """A check failed: close the metadata stores the checks opened for the apply (of the
    namespaces the controller owns: a secondary controller leaves its primary's alone)."""
    if ctrl.owns_namespaces:
        for ns in list(ctrl.allocated.values()):
            ns.drop_prepared()


# ----------------------------------------------------------------------------- quiesce / resume
#: seconds a quiesce waits for the work in flight when its caller gave no budget
#: (:attr:`pcidev.device.PciDevice.quiesce_deadline` None: a transport's own stop)
DEFAULT_QUIESCE_TIMEOUT = 30.0


def quiesce(ctrl: MigrationHost, deadline: float | None = None, *, flush: bool = False) -> None:
    """Bring the controller to a consistent point (see the module docstring).

    :param deadline: ``time.monotonic()`` by which every wait must be over (None:
        :data:`DEFAULT_QUIESCE_TIMEOUT` from now).
    :param flush: then make every namespace durable (:func:`flush_namespaces`).
    :raises QuiesceTimeoutError: something did not finish by the deadline (a stuck backend:
        the message names the namespaces and the oldest command's age); the caller runs
        the controller again (:meth:`pcidev.device.PciDevice.quiesce` calls
        :func:`resume`, which copes with a partial quiesce), the commands in flight
        complete later.
    :raises MigrationError: a flush failed (the message names the namespace); the caller
        runs the controller again.
    """
    t0 = time.monotonic()
    ctrl.quiesce_times = None
    ctrl.pause()
    _settle(ctrl)
    if deadline is None:
        deadline = time.monotonic() + DEFAULT_QUIESCE_TIMEOUT
    # (a failure leaves the resume to the caller: PciDevice.quiesce calls on_resume, which
    # copes with a partial quiesce)
    _drain(ctrl, deadline)
    drained = time.monotonic()
    if flush:
        flush_namespaces(ctrl, deadline)
    flushed = time.monotonic()
    ctrl.stop_timers()  # coalesced completions get their interrupt before the stop
    ctrl.quiesce_times = QuiesceTimes(drain=drained - t0, flush=flushed - drained)


@attrs.frozen
class QuiesceTimes:
    """How long the last successful :func:`quiesce` took, by part (seconds; the
    migration summary reports them: ``quiesce_drain_us``, ``quiesce_flush_us``).

    :ivar drain: from the pause of fetching until every command fetched had completed.
    :ivar flush: the ``fdatasync`` of the namespaces written since their last one (0
        without ``flush``).
    """

    drain: float
    flush: float


def _drain(ctrl: MigrationHost, deadline: float) -> None:
    """Every wait of :func:`quiesce`, each bounded by ``deadline``."""
    budget = max(deadline - time.monotonic(), 0.0)

    def late(what: str) -> QuiesceTimeoutError:
        return QuiesceTimeoutError(f"nvme: {what} did not finish within the quiesce budget ({budget:.3g} s); "
                                   "the controller keeps running")

    def wait(what: str, done: Callable[[], bool]) -> None:
        while not done():
            if time.monotonic() > deadline:
                raise late(what)
            time.sleep(0.0002)

    # fetch batches in progress (another thread's doorbell, a completion kicking a throttled SQ)
    wait("a fetch batch", ctrl.fetch_idle)
    try:
        ctrl.io.drain(deadline)
    except QuiesceTimeoutError as exc:
        raise QuiesceTimeoutError(f"{exc} (budget {budget:.3g} s); the controller keeps running") from None
    marker = ctrl.admin_worker.marker()
    if marker is not None:  # admin work in the background (Format NVM, shutdown): FIFO, one worker
        try:
            marker.result(max(deadline - time.monotonic(), 0.0))
        except concurrent.futures.TimeoutError:
            raise late("admin work in the background (Format NVM, a shutdown)") from None
    wait("a fetch batch", ctrl.batches_idle)  # kicks made by the last completions
    if not ctrl.sanitizer.pause(max(deadline - time.monotonic(), 0.0)):
        raise late("the sanitize operation's current chunk")
    ctrl.selftest.pause()
    # no sidecar write after the handover
    if not ctrl.uncorrectable.flush(max(deadline - time.monotonic(), 0.0)):
        raise late("writing the Write Uncorrectable sidecar")


def _has_work(store: Any, base: type) -> bool:
    """Whether flushing ``store`` (a backend or a metadata store) may have work to do: its
    ``unflushed`` flag if it keeps one (``file``), else whether it has a flush of its own
    (``mem`` and ``null`` inherit the base's, which does nothing)."""
    unflushed = getattr(store, "unflushed", None)
    if unflushed is not None:
        return bool(unflushed)
    return not (isinstance(store, base) and getattr(type(store), "flush", None) is getattr(base, "flush", None))


def flush_namespaces(ctrl: MigrationHost, deadline: float) -> None:
    """Make every namespace's acknowledged writes durable (a migration's stop, after the
    drain): ``fdatasync`` of each ``file`` image and metadata sidecar written since its last
    successful flush began, run in parallel on the I/O workers; a store with nothing to
    flush costs nothing. A store whose earlier ``fdatasync`` has not returned yet (an
    earlier stop's that timed out) takes no further worker: the stop waits for that call,
    then flushes again if it did not cover every write. The state file, the ``.nvme-ids``
    files and the Write Uncorrectable sidecars need nothing here: each is replaced whole
    (a temporary file, ``fsync``, ``rename``) when it changes.

    :param deadline: ``time.monotonic()`` by which every flush must be done.
    :raises QuiesceTimeoutError: a flush did not return by the deadline (it goes on).
    :raises MigrationError: a flush failed (the write-back error stays pending for the
        host's next Flush, see :meth:`pcidev_nvme.backends.FileBackend.flush_at_stop`).
    """
    _check_fences(ctrl, deadline)
    jobs, kept = _flush_jobs(ctrl)
    if not jobs:
        return
    t0 = time.monotonic()

    def left() -> float:
        return max(deadline - time.monotonic(), 0.0)

    # an fdatasync still in progress (an earlier stop's, stuck): wait for it, no new worker
    waiting = [job for job in jobs if getattr(job[1], "syncing", False)]
    futures = {ctrl.io.offload(fn): what for what, store, fn in jobs if not any(w[0] == what for w in waiting)}
    late = [what for what, store, _ in waiting if not store.wait_synced(left())]
    futures.update({ctrl.io.offload(fn): what for what, store, fn in waiting if what not in late and store.unflushed})
    done, pending = concurrent.futures.wait(futures, left())
    _raise_failed(futures, done, kept)
    if pending or late:
        raise QuiesceTimeoutError("nvme: flushing " + ", ".join(sorted([futures[f] for f in pending] + late))
                                  + f" did not finish within the quiesce budget (waited "
                                  f"{time.monotonic() - t0:.3f} s); the controller keeps running")
    log.debug("flushed %d store(s) at the stop in %.3f ms", len(jobs), (time.monotonic() - t0) * 1000)


def _check_fences(ctrl: MigrationHost, deadline: float) -> None:
    """Wait (until ``deadline``) for every ``nbd`` namespace's fences to go: writes sent on a
    lost connection that its server may still carry out (:meth:`NbdBackend.wait_unfenced
    <pcidev_nvme.backends.nbd.NbdBackend.wait_unfenced>`) would land after the destination's
    writes; the device does not move while any is left.

    :raises MigrationError: a namespace is still fenced at ``deadline``.
    """
    fenced = [ns.nsid for ns in sorted(list(ctrl.allocated.values()), key=lambda n: n.nsid)
              if isinstance(ns.backend, NbdBackend)
              and not ns.backend.wait_unfenced(max(deadline - time.monotonic(), 0.0))]
    if fenced:
        raise MigrationError(f"nvme: namespace(s) {', '.join(map(str, fenced))}: writes sent on a lost NBD "
                             "connection may still be carried out by the server (it has not closed that "
                             "connection): they could land after the destination's writes, so the device "
                             "stays here")


def _flush_jobs(ctrl: MigrationHost) -> tuple[list[tuple[str, Any, Callable[[], None]]], set[str]]:
    """What a flush of the namespaces has to do: (what, store, flush) for each store that
    may have work (:func:`_has_work`), and the ``what`` of those whose write-back error
    stays pending for the host's next Flush (they have ``flush_at_stop``)."""
    jobs: list[tuple[str, Any, Callable[[], None]]] = []
    kept = set()
    # (a copy: Namespace Management may change the table while the controller runs)
    for ns in sorted(list(ctrl.allocated.values()), key=lambda n: n.nsid):
        stores: list[tuple[str, Any, type]] = [(f"namespace {ns.nsid} ({_describe(ns.backend)})", ns.backend,
                                                BaseBackend)]
        meta = ns.meta
        if meta is not None:
            where = getattr(meta, "path", "")
            stores.append((f"namespace {ns.nsid}'s metadata{f' ({where})' if where else ''}", meta, MetadataStore))
        for what, store, base in stores:
            if not _has_work(store, base):
                continue
            at_stop = getattr(store, "flush_at_stop", None)
            if at_stop is not None:
                kept.add(what)
            jobs.append((what, store, at_stop if at_stop is not None else store.flush))
    return jobs, kept


def _raise_failed(futures: Mapping[concurrent.futures.Future[None], str],
                  done: Iterable[concurrent.futures.Future[None]], kept: set[str]) -> None:
    """Raise the flushes among ``done`` that failed, as one :class:`MigrationError`."""
    failed = []
    for fut in done:
        exc = fut.exception()
        if exc is not None:
            why = f"{exc.strerror} (errno {exc.errno})" if isinstance(exc, OSError) and exc.strerror else str(exc)
            failed.append(f"{futures[fut]}: flush failed: {why}")
    if failed:
        told = " (the host's next Flush reports the error)" if all(
            f.split(": flush failed")[0] in kept for f in failed) else ""
        raise MigrationError("nvme: " + "; ".join(sorted(failed)) + "; writes the host was told are done may "
                             f"not be on stable storage, so the device stays here{told}")


#: seconds :func:`prepare_quiesce` waits for its ``fdatasync`` calls; one still running
#: then goes on, and the stop waits for it within its own budget (:func:`flush_namespaces`)
PREPARE_FLUSH_TIMEOUT = 5.0


def prepare_quiesce(ctrl: MigrationHost, *, flush: bool, timeout: float = PREPARE_FLUSH_TIMEOUT) -> None:
    """Before a migration's stop, while the controller runs and the host's accesses go on
    (:meth:`pcidev.device.PciDevice.prepare_quiesce`): with ``flush``, ``fdatasync`` every
    ``file`` image and metadata sidecar written since its last one, on the I/O workers in
    parallel, so the stop's :func:`flush_namespaces` finds only what was written since
    (:class:`~pcidev_nvme.backends.durability.Durability` counts a write as durable only
    after an ``fdatasync`` that began after it returned: nothing is taken for granted here).
    A store whose ``fdatasync`` is already in progress is left to it. A flush still running
    after ``timeout`` goes on: the stop waits for it.

    :param flush: the migration flushes at its stop (else there is nothing to prepare).
    :param timeout: seconds to wait for the flushes.
    :raises MigrationError: a flush failed: the migration fails and the controller runs on;
        a ``file`` image's write-back error stays pending for the host's next Flush (and
        refuses every migration until then, as at the stop).
    """
    if not flush:
        return
    jobs, kept = _flush_jobs(ctrl)
    futures = {ctrl.io.offload(fn): what for what, store, fn in jobs if not getattr(store, "syncing", False)}
    if not futures:
        return
    t0 = time.monotonic()
    done, _pending = concurrent.futures.wait(futures, timeout)
    _raise_failed(futures, done, kept)
    log.debug("flushed %d store(s) before the stop in %.3f ms", len(done), (time.monotonic() - t0) * 1000)


def _describe(backend: Any) -> str:
    path = getattr(backend, "path", None) or getattr(backend, "uri", None)
    kind = getattr(backend, "kind", type(backend).__name__)
    return f"{kind} {path}" if path else str(kind)


def resume(ctrl: MigrationHost) -> None:
    """Run again: fetch what was submitted meanwhile, restart keep alive, deliver events."""
    _settle(ctrl)
    was = ctrl.unpause()
    ctrl.sanitizer.resume()
    ctrl.selftest.resume()
    if was and ctrl.running:
        ctrl.restart_work()


# ----------------------------------------------------------------------------- save
def save(ctrl: MigrationHost) -> NvmeState:
    """The state of a quiesced controller (nothing is changed)."""
    if ctrl.fsm_state not in _STATES:
        raise StateError(f"the controller is {ctrl.fsm_state}", section=SECTION, instance_id=0, path="state")
    fsm = ctrl.snapshot()
    sqs: list[SqState | None] = []
    for sq in ctrl.submission_queues:
        if sq is None or sq.gone:
            sqs.append(None)
            continue
        busy = [r for r in list(sq.inflight.values()) if not r.parked]
        if busy:
            raise StateError(f"SQ {sq.sqid} still has {len(busy)} command(s) in flight (not quiesced?)",
                             section=SECTION, instance_id=0, path=f"sqs[{sq.sqid}]")
        sqs.append(sq.snapshot())
    cqs = [None if cq is None or cq.gone else cq.snapshot() for cq in ctrl.completion_queues]
    irq = ctrl.interrupts.snapshot()
    ctrl.account_temperature()
    errors = ctrl.error_log.snapshot()
    changed = ctrl.changed_ns.snapshot()
    namespaces = []
    for nsid in sorted(ctrl.allocated):
        ns = ctrl.allocated[nsid]
        b = ns.backend
        ref = None
        if isinstance(b, MemoryBackend) and ctrl.vmstate_save_fds is not None:
            ref = ctrl.vmstate_fd(b.stream_fd())  # its memfd (anonymous memory: a copy made now)
        meta_ref = None
        if ns.meta is not None and ns.meta.mem_fd >= 0:
            meta_ref = ctrl.vmstate_fd(ns.meta.mem_fd)
        namespaces.append(ns.snapshot(attached=nsid in ctrl.namespaces, mem_fd=ref, meta_fd=meta_ref))
    db = ctrl.shadow.snapshot()
    st = NvmeState(
        state=_STATES.index(fsm.state), cc=fsm.cc, csts=fsm.csts, aqa=fsm.aqa, asq=fsm.asq, acq=fsm.acq,
        intms=irq.intms, shutting_down=fsm.shutting_down, dirty=fsm.dirty, page_size=fsm.page_size,
        sqs=tuple(sqs), cqs=tuple(cqs), aer=ctrl.aer.snapshot(),
        features=ctrl.features.snapshot(irq.vector_cd), smart=ctrl.smart.snapshot(),
        error_count=errors.count, error_entries=errors.entries, firmware=ctrl.firmware.snapshot(),
        changed_ns=changed.nsids, changed_ns_overflow=changed.overflow, namespaces=tuple(namespaces),
        dbbuf_dbs=db.dbs, dbbuf_eis=db.eis, dbbuf=db.enabled,
        cmb=ctrl.cmb.snapshot() if ctrl.cmb is not None else None,
        pmr=ctrl.pmr.snapshot() if ctrl.pmr is not None else None, uncorrectable=ctrl.uncorrectable.snapshot(),
        aborts=ctrl.aborts.snapshot(), sanitize=ctrl.sanitizer.snapshot(), self_test=ctrl.selftest.snapshot(),
        virtualization=ctrl.virtualization.snapshot() if ctrl.virtualization is not None else None,
        endurance=ctrl.endurance.snapshot(),
        ns_smart=ctrl.ns_smart.snapshot_if_any() if ctrl.owns_namespaces else None,
        ns_management=ns_records.snapshot(ctrl) if ctrl.owns_namespaces else None)
    if ctrl.vmstate_save_fds is None:  # not a save: a load's rollback copy (or a test's look)
        ctrl.load_undo.keep(st, {nsid: ns.holding() for nsid, ns in ctrl.allocated.items()})
    return st


# ----------------------------------------------------------------------------- check
def _fail(why: str, path: str) -> StateError:
    return StateError(why, section=SECTION, instance_id=0, path=path)


def check(ctrl: MigrationHost, st: NvmeState) -> None:
    """Refuse a state that cannot apply to this controller (nothing is changed: a metadata
    sidecar a namespace's check opened for the apply is closed again when a later check
    refuses the state)."""
    try:
        _check(ctrl, st)
    except BaseException:
        discard_prepared(ctrl)
        raise


def namespace_plan(ctrl: MigrationHost, st: NvmeState) -> NamespacePlan:
    """How loading ``st`` changes the namespace table (:func:`pcidev_nvme.ns_records.plan`;
    a secondary controller's table is its primary's, loaded before it: kept as it is).

    :raises StateError: the records do not fit this controller, or the namespace list
        differs from the one they make.
    """
    nsids = [n.nsid for n in st.namespaces]
    if ctrl.owns_namespaces:
        return ns_records.plan(ctrl, st.ns_management, nsids)
    want = sorted(ctrl.allocated)
    if nsids != want:
        raise _fail(f"namespaces {nsids}, this controller has {want}", "namespaces")
    return NamespacePlan(sizes={n: int(ns.size) for n, ns in ctrl.allocated.items()})


def _check(ctrl: MigrationHost, st: NvmeState) -> None:
    cfg = ctrl.cfg
    nq = cfg.max_ioqpairs + 1
    if st.state >= len(_STATES):  # (a state built in memory, not decoded: the decoder checked these)
        raise _fail(f"controller state {st.state} is unknown", "state")
    if (reg_problem := _registers_problem(st)) is not None:
        raise _fail(*reg_problem)
    ready = _STATES[st.state] != "disabled"  # a failed controller keeps its queues until the reset
    virt = ctrl.virtualization
    if (virt is None) != (st.virtualization is None):
        raise _fail("SR-IOV state " + ("missing" if virt is not None else "present for a controller without SR-IOV"),
                    "virtualization")
    if virt is not None and st.virtualization is not None:
        virt.check(st.virtualization, {n.nsid for n in st.namespaces})
    if len(st.sqs) != nq or len(st.cqs) != nq:
        raise _fail(f"{len(st.sqs)} SQ and {len(st.cqs)} CQ entries, this controller has {nq} queue ids",
                    "sqs" if len(st.sqs) != nq else "cqs")
    if not ready and (any(q is not None for q in st.sqs) or any(q is not None for q in st.cqs)):
        raise _fail("queues exist but the controller is disabled", "sqs")
    if ready and (st.sqs[0] is None or st.cqs[0] is None):
        raise _fail("an enabled controller without admin queues", "sqs[0]" if st.sqs[0] is None else "cqs[0]")
    mqes = cfg.mqes + 1
    for i, cq in enumerate(st.cqs):
        if cq is None:
            continue
        p = f"cqs[{i}]"
        if cq.cqid != i:
            raise _fail(f"CQ at index {i} says it is CQ {cq.cqid}", p + ".cqid")
        if not 2 <= cq.size <= (4096 if i == 0 else mqes):
            raise _fail(f"CQ size {cq.size} is out of range", p + ".size")
        if cq.head >= cq.size or cq.tail >= cq.size:
            raise _fail(f"head {cq.head} / tail {cq.tail} outside a queue of {cq.size}", p + ".head")
        if cq.phase > 1:
            raise _fail(f"phase {cq.phase}", p + ".phase")
        if cq.vector >= cfg.msix_vectors:
            raise _fail(f"vector {cq.vector} does not exist ({cfg.msix_vectors} vectors)", p + ".vector")
        if cq.base & 3:
            raise _fail(f"base {cq.base:#x} is not dword aligned", p + ".base")
        if cq.backlog and (cq.tail + 1) % cq.size != cq.head:
            raise _fail("completions wait in the backlog of a CQ that has room", p + ".backlog")
        for j, e in enumerate(cq.backlog):
            sq = st.sqs[e.sqid] if e.sqid < len(st.sqs) else None
            if sq is None or sq.cqid != i:
                raise _fail(f"a parked completion of SQ {e.sqid}, which does not post to CQ {i}",
                            f"{p}.backlog[{j}].sqid")
            if e.status > 0x7FFF:
                raise _fail(f"status field {e.status:#x} has more than 15 bits", f"{p}.backlog[{j}].status")
    for i, sq in enumerate(st.sqs):
        if sq is None:
            continue
        p = f"sqs[{i}]"
        if sq.sqid != i:
            raise _fail(f"SQ at index {i} says it is SQ {sq.sqid}", p + ".sqid")
        if sq.cqid >= nq or st.cqs[sq.cqid] is None:
            raise _fail(f"SQ {i} posts to CQ {sq.cqid}, which does not exist", p + ".cqid")
        if (i == 0) != (sq.cqid == 0):
            raise _fail(f"SQ {i} bound to CQ {sq.cqid}", p + ".cqid")
        if not 2 <= sq.size <= (4096 if i == 0 else mqes):
            raise _fail(f"SQ size {sq.size} is out of range", p + ".size")
        if sq.head >= sq.size or sq.tail >= sq.size:
            raise _fail(f"head {sq.head} / tail {sq.tail} outside a queue of {sq.size}", p + ".head")
        if sq.base & 63:
            raise _fail(f"base {sq.base:#x} is not 64-byte aligned", p + ".base")
    if len(st.aer.outstanding) > cfg.aerl + 1:
        raise _fail(f"{len(st.aer.outstanding)} outstanding AERs exceed AERL+1 = {cfg.aerl + 1}",
                    "aer.outstanding")
    if st.aer.outstanding and not ready:
        raise _fail("outstanding AERs on a disabled controller", "aer.outstanding")
    if len(st.aer.queued) > cfg.aer_max_queued:
        raise _fail(f"{len(st.aer.queued)} queued events exceed aer_max_queued = {cfg.aer_max_queued}",
                    "aer.queued")
    if len(set(st.aer.outstanding)) != len(st.aer.outstanding):
        raise _fail("two outstanding AERs share a command identifier", "aer.outstanding")
    if len(set(m.etype for m in st.aer.masked)) != len(st.aer.masked):
        raise _fail("an event type is masked twice", "aer.masked")
    for j, ev in enumerate((*st.aer.queued, *st.aer.masked)):
        if ev.etype > 7:
            raise _fail(f"event type {ev.etype}", f"aer.queued[{j}]")
    f = st.features
    if len(f.vector_cd) != cfg.msix_vectors:
        raise _fail(f"{len(f.vector_cd)} vector settings for {cfg.msix_vectors} vectors", "features.vector_cd")
    if not 1 <= f.nsq <= cfg.max_ioqpairs or not 1 <= f.ncq <= cfg.max_ioqpairs:
        raise _fail(f"Number of Queues {f.nsq}/{f.ncq} exceeds {cfg.max_ioqpairs}", "features.nsq")
    if f.timestamp >= 1 << 48:
        raise _fail("timestamp wider than 48 bits", "features.timestamp")
    if (hbs_problem := features_state_problem(f)) is not None:
        raise _fail(*hbs_problem)
    for name, queues, allocated in (("sqs", st.sqs, f.nsq), ("cqs", st.cqs, f.ncq)):
        for i in range(allocated + 1, len(queues)):
            if queues[i] is not None:  # (Create I/O queue refuses an ID above Number of Queues)
                raise _fail(f"queue {i} exists but Number of Queues allocated {allocated}", f"{name}[{i}]")
    plan = namespace_plan(ctrl, st)
    sizes = plan.sizes
    for j, t in enumerate(f.tler):
        if t.nsid not in sizes:
            raise _fail(f"error recovery setting for namespace {t.nsid}, which does not exist",
                        f"features.tler[{j}].nsid")
    for j, nsid in enumerate(f.dulbe.nsids if f.dulbe is not None else ()):
        if nsid not in sizes:
            raise _fail(f"DULBE set for namespace {nsid}, which does not exist", f"features.dulbe.nsids[{j}]")
    if (errlog_problem := error_log_problem(st.error_count, st.error_entries, ctrl.error_log.capacity)) is not None:
        raise _fail(*errlog_problem)
    fw = st.firmware
    if len(fw.revisions) != cfg.fw_slots:
        raise _fail(f"{len(fw.revisions)} firmware slots, this controller has {cfg.fw_slots}", "firmware.revisions")
    if fw.revisions[0] != ctrl.firmware.revisions[0]:
        raise _fail(f"slot 1 holds {fw.revisions[0]!r}, this controller's is {ctrl.firmware.revisions[0]!r}",
                    "firmware.revisions[0]")
    for j, rev in enumerate(fw.revisions):
        if not rev.isascii() or not rev.isprintable():
            raise _fail(f"firmware revision {rev!r}", f"firmware.revisions[{j}]")
    if not 1 <= fw.active <= cfg.fw_slots or not fw.revisions[fw.active - 1]:
        raise _fail(f"active firmware slot {fw.active} is empty or does not exist", "firmware.active")
    if fw.next_reset and (fw.next_reset > cfg.fw_slots or not fw.revisions[fw.next_reset - 1]):
        raise _fail(f"next-reset firmware slot {fw.next_reset} is empty or does not exist", "firmware.next_reset")
    if sum(len(c.data) for c in fw.staged) > 64 << 20:
        raise _fail("a staged firmware image over 64 MiB", "firmware.staged")
    for j, n in enumerate(st.namespaces):
        p = f"namespaces[{j}]"
        rec = plan.record(n.nsid)
        if rec is None:  # a namespace this controller has
            ns = ctrl.allocated[n.nsid]
            problem = ns.restore_problem(n)
            kind, nbytes = getattr(ns.backend, "kind", None), int(ns.size)
        else:  # one the load creates
            problem = ns_records.build_problem(rec, Namespace.wanted_format(n))
            kind, nbytes = rec.kind, rec.size
        if problem is not None:
            raise _fail(f"namespace {n.nsid}: {problem}", p + ".lbaf")
        m = n.metadata
        if m is not None and m.mem_fd is not None:
            if kind != "mem":
                raise _fail(f"namespace {n.nsid} is not a mem namespace here", p + ".metadata.mem_fd")
            mfd = ctrl.vmstate_load_fd(m.mem_fd)
            if mfd is None:
                raise _fail(f"the metadata of namespace {n.nsid} (fd {m.mem_fd.index}) did not arrive",
                            p + ".metadata.mem_fd")
            try:
                msize = os.fstat(mfd).st_size
            except OSError as exc:
                raise _fail(f"fd {m.mem_fd.index}: {exc.strerror}", p + ".metadata.mem_fd") from None
            want_meta = LBAF_TABLE[n.lbaf].ms * (nbytes >> (LBAF_TABLE[n.lbaf].size.bit_length() - 1))
            if msize != want_meta:
                raise _fail(f"namespace {n.nsid}'s metadata has {msize} bytes, not {want_meta}",
                            p + ".metadata.mem_fd")
        is_mem = kind == "mem"
        # (no reference: a state taken outside a save, e.g. the rollback copy; the namespace
        # keeps the memory it has)
        if n.mem_fd is not None:
            if not is_mem:
                raise _fail(f"namespace {n.nsid} is not a mem namespace here", p + ".mem_fd")
            fd = ctrl.vmstate_load_fd(n.mem_fd)
            if fd is None:
                raise _fail(f"the memory of namespace {n.nsid} (fd {n.mem_fd.index}) did not arrive: a mem "
                            "namespace migrates only with descriptors (UNIX socket)", p + ".mem_fd")
            try:
                size = os.fstat(fd).st_size
            except OSError as exc:
                raise _fail(f"fd {n.mem_fd.index}: {exc.strerror}", p + ".mem_fd") from None
            if size != nbytes:
                raise _fail(f"namespace {n.nsid}'s memory has {size} bytes, not {nbytes}", p + ".mem_fd")
    for j, nsid in enumerate(st.changed_ns):
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise _fail(f"NSID {nsid:#x}", f"changed_ns[{j}]")
    if st.dbbuf and not cfg.dbbuf:
        raise _fail("shadow doorbells on a controller without Doorbell Buffer Config", "dbbuf")
    if st.dbbuf and (st.dbbuf_dbs & 0xFFF or st.dbbuf_eis & 0xFFF):
        raise _fail("shadow doorbell buffers are not page aligned", "dbbuf_dbs")
    if st.cmb is not None:
        if ctrl.cmb is None:
            raise _fail("controller memory buffer registers for a controller without a CMB", "cmb")
        why = ctrl.cmb.check(st.cmb)
        if why is not None:
            raise _fail(why, "cmb")
    if st.pmr is not None:
        if ctrl.pmr is None:
            raise _fail("persistent memory region registers for a controller without a PMR", "pmr")
        why = ctrl.pmr.check(st.pmr)
        if why is not None:
            raise _fail(why, "pmr")
    if (ctrl.cmb is not None and ctrl.pmr is not None and st.cmb is not None and st.pmr is not None
            and ranges_overlap(ctrl.cmb.state_range(st.cmb), ctrl.pmr.state_range(st.pmr))):
        raise _fail("the CMB's and the PMR's controller memory spaces overlap", "pmr")
    _check_admin_features(ctrl, st, sizes)


def _check_admin_features(ctrl: MigrationHost, st: NvmeState, sizes: Mapping[int, int]) -> None:
    """The subsections of Write Uncorrectable, Abort, Sanitize and Device Self-test
    (``sizes``: the namespaces after the load, NSID -> bytes)."""
    lbafs = {n.nsid: n.lbaf for n in st.namespaces}
    if st.uncorrectable is not None:
        for j, r in enumerate(st.uncorrectable.ranges):
            size = sizes.get(r.nsid)
            if size is None:
                raise _fail(f"uncorrectable blocks of namespace {r.nsid}, which does not exist",
                            f"uncorrectable.ranges[{j}].nsid")
            nlbas = size // LBA_FORMATS[lbafs[r.nsid]][0]
            if r.nlb == 0 or r.slba + r.nlb > nlbas:
                raise _fail(f"uncorrectable blocks {r.slba}+{r.nlb} outside namespace {r.nsid} ({nlbas} blocks)",
                            f"uncorrectable.ranges[{j}]")
    if st.ns_smart is not None:
        why = ctrl.ns_smart.check(st.ns_smart, (n.nsid for n in st.namespaces))
        if why is not None:
            raise _fail(why, "ns_smart")
    if st.aborts is not None:
        for j, p in enumerate(st.aborts.pending):
            if p.sqid >= len(st.sqs) or st.sqs[p.sqid] is None:
                raise _fail(f"an abort for SQ {p.sqid}, which does not exist", f"aborts.pending[{j}].sqid")
    san = st.sanitize
    if san is not None:
        if san.sstat > 4 or san.failure_mode > 2:
            raise _fail(f"sanitize status {san.sstat} / failure mode {san.failure_mode}", "sanitize.sstat")
        if san.running:
            if not SANACT_BLOCK_ERASE <= san.action <= SANACT_CRYPTO_ERASE:
                raise _fail(f"sanitize action {san.action} in progress", "sanitize.action")
            nsids = sorted(sizes)
            if san.ns_index > len(nsids) or (san.ns_index < len(nsids)
                                              and san.offset > sizes[nsids[san.ns_index]]):
                raise _fail(f"sanitize position {san.ns_index}/{san.offset} is outside the namespaces",
                            "sanitize.offset")
            if san.offset % 4096:
                raise _fail(f"sanitize offset {san.offset} is not 4 KiB aligned", "sanitize.offset")
    test = st.self_test
    if test is not None:
        if test.current not in (0, 1, 2):
            raise _fail(f"self-test operation {test.current}", "self_test.current")
        if test.current and test.nsid not in (0, 0xFFFFFFFF) and test.nsid not in sizes:
            raise _fail(f"self-test of namespace {test.nsid}, which does not exist", "self_test.nsid")


# ----------------------------------------------------------------------------- apply
def apply(ctrl: MigrationHost, st: NvmeState) -> None:
    """Apply a checked state (the controller is quiesced or has never run).

    What a load replaces (namespace memory, metadata stores) stays open until the load is
    committed (:class:`LoadUndo`); applying the load's rollback copy puts it back.
    """
    undo = ctrl.load_undo
    held = undo.kept_for(st)
    swaps: dict[int, MemoryBackend] = {}
    plan = NamespacePlan(sizes={})
    built: dict[int, tuple[Namespace, str]] = {}
    if held is None:
        undo.commit()  # an earlier load's: committed by this one
        # 1. what can fail first, nothing changed yet: build the namespaces the source's
        # Namespace Management created, map the migrated namespace memory and metadata,
        # open the metadata stores the formats need
        plan = namespace_plan(ctrl, st)  # (as checked)
        built = _build_namespaces(ctrl, st, plan)
        try:
            swaps = _prepare_namespaces(ctrl, st, built)
        except BaseException:
            _close_built(ctrl, built)
            raise

    # 2. each component takes its part
    try:
        _apply_components(ctrl, st, held, swaps, plan, built)
    except BaseException:
        for b in swaps.values():  # mapped in step 1, not consumed by the namespace loop
            b.close()
        _close_built(ctrl, built)
        raise


def _build_namespaces(ctrl: MigrationHost, st: NvmeState, plan: NamespacePlan) -> dict[int, tuple[Namespace, str]]:
    """Step 1 of :func:`apply`: the namespaces the load creates, built as Namespace
    Management builds them (not in the tables yet), with the spec each is remembered by.

    :raises StateError: one cannot be built here, or is not what its record says (a
        ``file`` image whose identity file holds other identifiers); nothing stays open.
    """
    states = {n.nsid: n for n in st.namespaces}
    index = {r.nsid: j for j, r in enumerate(st.ns_management.created)} if st.ns_management is not None else {}
    built: dict[int, tuple[Namespace, str]] = {}
    for rec in plan.build:
        fmt = Namespace.wanted_format(states[rec.nsid])
        where = f"ns_management.created[{index.get(rec.nsid, 0)}]"
        try:
            # nothing is written beside the image before the load is committed (its
            # identity file: LoadUndo.remember)
            ns = ctrl.make_namespace(rec.nsid, ns_records.creation_spec(rec, fmt, build=True), remember=False)
        except (ConfigError, OSError) as exc:
            _close_built(ctrl, built)
            raise _fail(f"namespace {rec.nsid} cannot be created here: {exc}", where) from exc
        built[rec.nsid] = (ns, ns_records.creation_spec(rec, fmt))
        got = ns_records.record_of(ns)
        try:
            held = stored_identifiers(ns.backend)  # (the image's own, if it has an identity file)
        except ConfigError as exc:
            _close_built(ctrl, built)
            raise _fail(f"namespace {rec.nsid} cannot be created here: {exc}", where) from exc
        if held is not None:
            got = attrs.evolve(got, nguid=held[0], eui64=held[1], uuid=held[2].bytes)
        if got != rec:
            _close_built(ctrl, built)
            differ = [a.name for a in attrs.fields(type(rec)) if getattr(got, a.name) != getattr(rec, a.name)]
            raise _fail(f"namespace {rec.nsid} built here differs from the source's in {', '.join(differ)}", where)
    return built


def _close_built(ctrl: MigrationHost, built: Mapping[int, tuple[Namespace, str]]) -> None:
    """Close the namespaces a failed load built and did not add to the tables (those it
    added are the rollback's, :func:`_undo_structure`)."""
    for nsid, (ns, _spec) in built.items():
        if ctrl.allocated.get(nsid) is not ns:
            try:
                ns.close()
            except Exception:
                log.exception("closing namespace %d a failed vmstate load built failed", nsid)


def _change_structure(ctrl: MigrationHost, plan: NamespacePlan, built: Mapping[int, tuple[Namespace, str]]) -> None:
    """The namespace table becomes the source's: what it does not have is deleted (kept
    open until the load is committed), what it created is added (detached: the
    attachment follows the namespaces' states)."""
    undo = ctrl.load_undo
    for nsid in plan.remove:
        undo.removed(nsid, ctrl.remove_namespace(nsid))
    for nsid, (ns, spec) in sorted(built.items()):
        ctrl.add_namespace(nsid, ns, created_spec=spec)
        undo.added(nsid, ns)


def _undo_structure(ctrl: MigrationHost) -> None:
    """The rollback of a failed load: the namespaces it created are deleted and closed,
    the ones it deleted are back (with their attachment and creation spec)."""
    added, removed = ctrl.load_undo.take_structure()
    for nsid in reversed(added):
        ns = ctrl.remove_namespace(nsid).ns
        try:
            ns.close()
        except Exception:
            log.exception("closing namespace %d a failed vmstate load created failed", nsid)
    for nsid, r in reversed(removed):
        ctrl.add_namespace(nsid, r.ns, created_spec=r.created_spec, attached=r.was_attached)


def _apply_components(ctrl: MigrationHost, st: NvmeState, held: dict[int, NamespaceHolding] | None,
                      swaps: dict[int, MemoryBackend], plan: NamespacePlan,
                      built: Mapping[int, tuple[Namespace, str]]) -> None:
    """Step 2 of :func:`apply`: each component takes its part (``swaps``: the mapped
    memory step 1 prepared, popped as the namespaces take it; ``plan`` and ``built``: the
    namespaces the table loses and gains)."""
    undo = ctrl.load_undo
    with ctrl.state_lock:
        # the namespace table first: deleting a namespace resets what other components
        # keep of it (features, SMART counters), which they then take from the state
        if held is not None:
            _undo_structure(ctrl)
        else:
            _change_structure(ctrl, plan, built)
        ctrl.restore(ControllerState(state=_STATES[st.state], cc=st.cc, csts=st.csts, aqa=st.aqa, asq=st.asq,
                                     acq=st.acq, shutting_down=st.shutting_down, dirty=st.dirty,
                                     page_size=st.page_size))
        ctrl.features.restore(st.features)  # gives the interrupts feature 08h too
        shadow = ctrl.shadow
        shadow.restore(ShadowDoorbellsState(dbs=st.dbbuf_dbs, eis=st.dbbuf_eis, enabled=st.dbbuf))

        # queues: CQs first, then SQs bound to them, then the CQ backlogs (they name SQs)
        cqs: list[CompletionQueue | None] = [None] * len(st.cqs)
        for c in st.cqs:
            if c is not None:
                cqs[c.cqid] = new_cq = CompletionQueue.from_state(c)
                shadow.bind(new_cq)
        sqs: list[SubmissionQueue | None] = [None] * len(st.sqs)
        for s in st.sqs:
            if s is not None:
                cq = cqs[s.cqid]
                assert cq is not None  # checked
                sqs[s.sqid] = sq = SubmissionQueue.from_state(s, cq)
                shadow.bind(sq)
                cq.attach(sq)
        for c in st.cqs:
            if c is not None:
                cq = cqs[c.cqid]
                assert cq is not None  # made just above
                cq.restore(c, sqs)
        ctrl.install_queues(sqs, cqs)
        ctrl.aer.restore(st.aer, ctrl.restore_parked_aers(st.aer.outstanding))
        ctrl.interrupts.restore(InterruptsState(intms=st.intms, vector_cd=tuple(st.features.vector_cd)))
        ctrl.smart.restore(st.smart)
        ctrl.error_log.restore(ErrorLogState(count=st.error_count, entries=tuple(st.error_entries)))
        ctrl.firmware.restore(st.firmware)
        ctrl.changed_ns.restore(ChangedNsState(nsids=tuple(st.changed_ns), overflow=st.changed_ns_overflow))

        # namespaces: migrated memory, format, attachment
        if held is not None:
            _take_back(ctrl, held)
        else:
            for n in st.namespaces:
                ns = ctrl.allocated[n.nsid]
                new = n.nsid in built  # (what it replaces is its own, not the destination's before)
                if n.nsid in swaps:
                    replaced = ns.replace_backend(swaps.pop(n.nsid))
                    replaced.close() if new else undo.retire(replaced)
                old = ns.restore(n)
                if old is not None:
                    old.close() if new else undo.retire(old, remove=ns.meta is None)
        ctrl.set_attached([n.nsid for n in st.namespaces if n.attached])
        _restore_controller_memory(ctrl, st)
        ctrl.uncorrectable.defer_writes()  # (the sidecars: once the load is accepted, _settle)
        ctrl.uncorrectable.restore(st.uncorrectable)
        ctrl.aborts.restore(st.aborts)
        ctrl.sanitizer.restore(st.sanitize)
        ctrl.selftest.restore(st.self_test)
        if ctrl.virtualization is not None and st.virtualization is not None:
            ctrl.virtualization.restore(st.virtualization)
        ctrl.endurance.restore(st.endurance)
        if ctrl.owns_namespaces:  # (a secondary's namespaces, and their counters, are its primary's)
            ctrl.ns_smart.restore(st.ns_smart)
        ctrl.finish_restore()


def _prepare_namespaces(ctrl: MigrationHost, st: NvmeState,
                        built: Mapping[int, tuple[Namespace, str]]) -> dict[int, MemoryBackend]:
    """Step 1 of :func:`apply`: the migrated memory of the ``mem`` namespaces mapped (by
    NSID) and every metadata store the formats need opened (held by the namespaces until
    their restore; ``built``: the namespaces the load creates). On failure everything
    opened is closed again (but the built namespaces: the caller's) and nothing changed.

    :raises StateError: a descriptor cannot be mapped.
    """
    swaps: dict[int, MemoryBackend] = {}
    j = 0
    try:
        for j, n in enumerate(st.namespaces):  # noqa: B007 (j is read by the except clause)
            ns = built[n.nsid][0] if n.nsid in built else ctrl.allocated[n.nsid]
            fd = ctrl.vmstate_load_fd(n.mem_fd) if n.mem_fd is not None else None
            # check(): a mem namespace, whose backend has an fd (not in the Backend protocol;
            # without one, -1 makes sameopenfile raise OSError, handled below)
            if fd is not None and not (isinstance(ns.backend, MemoryBackend) and ns.backend.same_memory(fd)):
                # (else: already this memory); staged contents say which pages hold data
                swaps[n.nsid] = MemoryBackend.from_fd(fd, ns.size, allocated=ctrl.vmstate_load_allocated(n.mem_fd))
            m = n.metadata
            meta_fd = ctrl.vmstate_load_fd(m.mem_fd) if m is not None and m.mem_fd is not None else None
            if (meta_fd is not None and ns.meta is not None and ns.meta.mem_fd >= 0
                    and os.path.sameopenfile(meta_fd, ns.meta.mem_fd)):
                meta_fd = None  # already this memory (an in-process reload)
            ns.prepare_restore(n, meta_fd=meta_fd)
    except (ConfigError, OSError) as exc:
        for b in swaps.values():
            b.close()
        discard_prepared(ctrl)
        raise _fail(f"namespace {st.namespaces[j].nsid}: {exc}", f"namespaces[{j}]") from exc
    return swaps


def _take_back(ctrl: MigrationHost, held: dict[int, NamespaceHolding]) -> None:
    """The rollback of a failed load: every namespace holds again what it held before it,
    and what the load opened is closed."""
    for nsid, h in held.items():
        ns = ctrl.allocated.get(nsid)
        if ns is None:
            continue
        ns.drop_prepared()
        now = ns.reinstate(h)
        try:
            if now.backend is not h.backend:
                now.backend.close()
            if now.meta is not None and now.meta is not h.meta:
                now.meta.discard()
        except Exception:
            log.exception("closing what a failed vmstate load opened failed")
    ctrl.load_undo.forget()


def _restore_controller_memory(ctrl: MigrationHost, st: NvmeState) -> None:
    """The CMB's and PMR's registers and windows (after the framework adopted the source's
    CMB memfd and PMR file). Each derives CBAI from its registers and the other's window:
    both windows go first, and the one whose CBAI the source had set (an overlap with
    the other's window) comes back last, so that the same one is refused here."""
    cmb, pmr = ctrl.cmb, ctrl.pmr
    if cmb is not None and pmr is not None:
        cmb.restore(None)
        pmr.restore(None)
    cmb_last = st.cmb is not None and bool(st.cmb.cmbsts & CMBSTS_CBAI)
    for which in ("pmr", "cmb") if cmb_last else ("cmb", "pmr"):
        if which == "cmb" and cmb is not None:
            cmb.restore(st.cmb)
        elif which == "pmr" and pmr is not None:
            pmr.restore(st.pmr)


# ----------------------------------------------------------------------------- the controller's side
class MigrationMixin:
    """Live migration support of :class:`~pcidev_nvme.controller.NvmeController` (mixed
    into it): the device author's hooks of :class:`~pcidev.device.PciDevice` (which call
    this module's functions), and pausing and restarting the fetch loop around a quiesce
    or a restore. Owns the pause flag; the state machine reads it through :attr:`paused`.
    """

    #: the ``nvme`` vmstate section
    VMSTATE: ClassVar[type[Any] | None] = NvmeState  # as declared by PciDevice
    MIGRATABLE_FEATURES = MIGRATABLE_FEATURES
    # the memfd travels with SCM_RIGHTS; without descriptors (TCP, vfio-user migration data)
    # its contents travel instead (memory_sources(), which cover the feature)
    FD_FEATURES = frozenset({MEM_FD_FEATURE})

    _paused: bool
    _save_at_resume: bool
    state_lock: threading.RLock
    timer: Timer
    interrupts: Interrupts
    aer: AsyncEvents
    update_running: Callable[[], None]
    keep_alive: Callable[..., None]
    keep_alive_stop: Callable[[], None]
    keep_alive_restart: Callable[[], None]
    save_soon: Callable[[], None]
    kick_all: Callable[[], None]
    rearm_event_idx: Callable[[], None]

    def _init_migration(self) -> None:
        """Not paused, no state file write due."""
        #: quiesced for a migration (or restored and not resumed yet): nothing is fetched
        self._paused = False
        #: a restore happened: write the state file after the resume (outside the downtime)
        self._save_at_resume = False
        #: what a vmstate load replaced, until it is committed (or rolled back)
        self.load_undo = LoadUndo()
        #: how long the last successful quiesce's parts took (None before one, or after a failed one)
        self.quiesce_times: QuiesceTimes | None = None

    @property
    def paused(self) -> bool:
        """Fetching is stopped for a migration (:meth:`pause` ... :meth:`unpause`)."""
        return self._paused

    def pause(self) -> None:
        """Stop fetching (a quiesce, a restore); commands in flight go on."""
        with self.state_lock:
            self._paused = True
            self.update_running()

    def unpause(self) -> bool:
        """Fetch again; returns whether it was paused. A state file due since a restore
        is written by the next admin command (``maybe_save_state``)."""
        with self.state_lock:
            was = self._paused
            self._paused = False
            self.update_running()
        if self._save_at_resume:
            self._save_at_resume = False
            self.save_soon()
        return was

    def finish_restore(self) -> None:
        """After a restore: timers stopped, keep alive counted from now, the state file
        rewritten after the resume (outside the downtime)."""
        self.keep_alive()
        self.keep_alive_stop()
        self.timer.cancel_all()
        self.update_running()
        self._save_at_resume = True

    def stop_timers(self) -> None:
        """No keep-alive verdict, no coalescing deadline; aggregated interrupts delivered now."""
        self.keep_alive_stop()
        self.timer.cancel_all()
        self.interrupts.flush_coalesced()

    def restart_work(self) -> None:
        """After an unpause: keep alive counted from now, events delivered, every EventIdx
        published for this process's polling policy (the source's transport may have
        polled), every SQ fetched."""
        self.keep_alive_restart()
        self.aer.deliver()
        self.rearm_event_idx()
        self.kick_all()

    # -- PciDevice hooks ----------------------------------------------------------------
    # (enabled_features is NvmeController's: it extends PciDevice's, which this mixin cannot name)
    def device_migration_blockers(self: MigrationHost) -> list[str]:
        return blockers(self)

    def device_fingerprint(self: MigrationHost) -> dict[str, Any]:
        return fingerprint(self)

    def migration_facts(self: MigrationHost) -> dict[str, Any]:
        return preflight_facts(self)

    def check_migration_facts(self: MigrationHost, facts: dict[str, Any]) -> list[str]:
        return preflight_problems(self, facts)

    def memory_sources(self: MigrationHost) -> list[MemorySource]:
        """The RAM BARs' (the CMB: :meth:`PciDevice.memory_sources <pcidev.device.PciDevice.memory_sources>`)
        and the ``mem`` namespaces' (:func:`memory_sources`)."""
        assert isinstance(self, PciDevice)  # mixed into NvmeController, a PciDevice
        return [*PciDevice.memory_sources(self), *memory_sources(self)]

    def inheritable_fds(self: MigrationHost) -> dict[str, int]:
        return inheritable_fds(self)

    def prepare_quiesce(self: MigrationHost, *, flush: bool) -> None:
        prepare_quiesce(self, flush=flush)

    def on_quiesce(self: MigrationHost) -> None:
        quiesce(self, self.quiesce_deadline, flush=self.quiesce_flush)

    def on_resume(self: MigrationHost) -> None:
        resume(self)

    def get_device_state(self: MigrationHost) -> NvmeState:
        return save(self)

    def check_device_state(self: MigrationHost, state: NvmeState) -> None:
        check(self, state)

    def set_device_state(self: MigrationHost, state: NvmeState) -> None:
        apply(self, state)
