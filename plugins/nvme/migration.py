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
* SMART counters (bytes, commands, busy time, power cycles, power-on time, unsafe
  shutdowns, media errors, temperature times), the temperature, injected and
  reported critical warnings; the Error Information log (count and entries);
  firmware slots, the active and next-reset slot, a partly downloaded image;
  the Changed Namespace List;
* per namespace: attached or not, the LBA format (Format NVM may have changed it)
  and, for a ``mem`` namespace, an :class:`~pcidev.vmstate.FdRef` to its memfd.

**Namespace contents are not in the stream.** A ``file`` namespace is reopened by
the destination from its own configuration (the same path: the fingerprint has it);
a ``mem`` namespace's memfd travels with the stream (``SCM_RIGHTS``) and the
destination maps it instead of its own empty one, so a migration over TCP (no
descriptors) refuses a controller with ``mem`` namespaces; ``null`` namespaces hold
nothing. The fingerprint (:func:`fingerprint`) covers the configuration a
destination must match: serial, model, queue count, MQES, MDTS, MSI-X vectors,
AERL, ELPE, firmware slots, the LBA formats and every namespace (NSID, backend
kind, size, path, O_DIRECT, read-only, NGUID).

**Quiescing** (:func:`quiesce`): stop fetching (no SQ batch in progress), drain the
backend I/O in flight (:meth:`IoCommandSet.drain`) and the admin worker (Format,
shutdown), so every command fetched so far has completed: its completion is in the
CQ or in the CQ's backlog (which travels). Only AERs stay outstanding, and they
travel. Pending coalesced interrupts are delivered and timers stopped. Nothing is
lost or duplicated: SQ entries between head and tail stay in guest memory and the
destination fetches them once.

What blocks (allow-list, :data:`MIGRATABLE_FEATURES`): namespaces whose backend
is not ``mem`` (memfd), ``file`` or ``null`` (plugin backends, anonymous
memory), namespaces created or deleted by Namespace Management (the destination builds
its namespaces from its configuration), and a controller reset still waiting for commands.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

import attrs

from pcidev.errors import ConfigError
from pcidev.vmstate import U8, U16, U32, U64, Bool, Bytes, FdRef, Str, VarArray, vmstate
from pcidev.vmstate.errors import StateError

if TYPE_CHECKING:
    from pcidev_nvme.controller import NvmeController

__all__ = ["NvmeState", "SqState", "CqState", "CqeState", "MIGRATABLE_FEATURES", "fingerprint", "features",
           "blockers", "quiesce", "resume", "save", "check", "apply"]

SECTION = "nvme"
MAX_QUEUES = 1025
MAX_BACKLOG = 65536
MAX_NS = 1024

#: features the ``nvme`` section carries (anything else enabled blocks migration)
MIGRATABLE_FEATURES = frozenset({
    "nvme-queues", "nvme-aer", "nvme-dbbuf", "nvme-smart", "nvme-error-log", "nvme-firmware",
    "nvme-coalescing", "nvme-keep-alive", "nvme-multi-namespace",
    "nvme-backend:mem", "nvme-backend:file", "nvme-backend:file-direct", "nvme-backend:null",
})

_STATES = ("disabled", "ready", "failed")


@vmstate("nvme/cqe")
@attrs.frozen
class CqeState:
    """A completion parked in a full CQ's backlog (posted in order once the host frees slots)."""

    sqid: U16
    cid: U16
    status: U16  # the 15-bit status field
    dw0: U32
    dw1: U32


@vmstate("nvme/cq")
@attrs.frozen
class CqState:
    cqid: U16
    base: U64
    size: U32
    vector: U16
    ien: Bool
    head: U32
    tail: U32
    phase: U8
    backlog: VarArray[CqeState, MAX_BACKLOG] = ()


@vmstate("nvme/sq")
@attrs.frozen
class SqState:
    sqid: U16
    cqid: U16
    base: U64
    size: U32
    head: U32
    tail: U32
    qprio: U8 = 0


@vmstate("nvme/event")
@attrs.frozen
class EventState:
    etype: U8
    info: U8
    lid: U8


@vmstate("nvme/aer")
@attrs.frozen
class AerState:
    """Asynchronous events: outstanding AER commands (CIDs on the admin SQ), queued
    events, and the masked types with the log page whose read unmasks each."""

    outstanding: VarArray[U16, 256] = ()
    queued: VarArray[EventState, 256] = ()
    masked: VarArray[EventState, 8] = ()  # etype, info unused (0), lid


@vmstate("nvme/tler")
@attrs.frozen
class TlerState:
    nsid: U32
    value: U16


@vmstate("nvme/features")
@attrs.frozen
class FeaturesState:
    arbitration: U32
    power_mgmt: U32
    vwc: U32
    num_queues: U32
    coalescing: U32
    aec: U32
    kato: U32
    temp_over: U16
    temp_under: U16
    nsq: U16
    ncq: U16
    nq_allocated: Bool
    timestamp: U64  # ms value at the save
    timestamp_origin: U8
    host_behavior: Bytes[512]
    tler: VarArray[TlerState, MAX_NS] = ()
    vector_cd: VarArray[Bool, 2048] = ()


@vmstate("nvme/smart")
@attrs.frozen
class SmartState:
    """SMART counters; times in microseconds."""

    bytes_read: U64
    bytes_written: U64
    host_read_commands: U64
    host_write_commands: U64
    busy_us: U64
    power_cycles: U64
    power_on_us: U64
    unsafe_shutdowns: U64
    media_errors: U64
    warning_temp_us: U64
    critical_temp_us: U64
    temperature: U16
    injected_warning: U8
    reported_warning: U8


@vmstate("nvme/fw-chunk")
@attrs.frozen
class FwChunk:
    offset: U32
    data: bytes


@vmstate("nvme/firmware")
@attrs.frozen
class FirmwareState:
    revisions: VarArray[Str[8], 7]
    active: U8
    next_reset: U8
    staged: VarArray[FwChunk, 4096] = ()


@vmstate("nvme/namespace")
@attrs.frozen
class NamespaceState:
    nsid: U32
    attached: Bool
    lbaf: U8
    mem_fd: Optional[FdRef] = None


@vmstate("nvme", version=1)
@attrs.frozen
class NvmeState:
    """The NVMe controller's own state (the framework migrates config space and MSI-X)."""

    state: U8  # index in ("disabled", "ready", "failed")
    cc: U32
    csts: U32
    aqa: U32
    asq: U64
    acq: U64
    intms: U32
    shutting_down: Bool
    dirty: Bool
    page_size: U32
    sqs: VarArray[Optional[SqState], MAX_QUEUES]
    cqs: VarArray[Optional[CqState], MAX_QUEUES]
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


# ----------------------------------------------------------------------------- configuration
def _backend_feature(ns: Any) -> str:
    b = ns.backend
    kind = getattr(b, "kind", type(b).__name__)
    if kind == "mem" and getattr(b, "fd", -1) < 0:
        return "nvme-backend:mem-anonymous"
    if kind == "file" and getattr(b, "direct", False):
        return "nvme-backend:file-direct"
    return f"nvme-backend:{kind}"


def _runtime_namespace_changes(ctrl: NvmeController) -> tuple[list[int], list[int]]:
    """(NSIDs created by Namespace Management, configured NSIDs it deleted)."""
    configured = set(range(1, len(ctrl.cfg.namespaces) + 1))
    created = sorted(set(ctrl.allocated) - configured)
    deleted = sorted(configured - set(ctrl.allocated))
    return created, deleted


def features(ctrl: NvmeController) -> set[str]:
    """The controller's features for the allow-list (see :data:`MIGRATABLE_FEATURES`)."""
    out = {"nvme-queues", "nvme-aer", "nvme-smart", "nvme-error-log", "nvme-firmware"}
    if ctrl._dbbuf is not None:
        out.add("nvme-dbbuf")
    if ctrl._coalesce_on:
        out.add("nvme-coalescing")
    if ctrl.features.kato_ms:
        out.add("nvme-keep-alive")
    if len(ctrl.allocated) > 1:
        out.add("nvme-multi-namespace")
    for ns in ctrl.allocated.values():
        out.add(_backend_feature(ns))
    created, deleted = _runtime_namespace_changes(ctrl)
    if created or deleted:
        out.add("nvme-namespace-management-changes")
    return out


def blockers(ctrl: NvmeController) -> list[str]:
    """Reasons of the moment (the allow-list covers the configuration)."""
    out = []
    created, deleted = _runtime_namespace_changes(ctrl)
    for nsid in created:
        out.append(f"namespace {nsid} was created by Namespace Management; the destination's "
                   "configuration does not have it")
    for nsid in deleted:
        out.append(f"namespace {nsid} of the configuration was deleted by Namespace Management")
    for ns in sorted(ctrl.allocated.values(), key=lambda n: n.nsid):
        feat = _backend_feature(ns)
        if feat not in MIGRATABLE_FEATURES:
            out.append(f"namespace {ns.nsid}: its backend ({feat.split(':', 1)[1]}) cannot follow the "
                       "controller to another process")
    if ctrl._state == "resetting":
        out.append("a controller reset is waiting for commands in flight")
    return out


def fingerprint(ctrl: NvmeController) -> dict[str, Any]:
    """Configuration a destination must match exactly."""
    from pcidev_nvme.namespace import LBA_FORMATS

    cfg = ctrl.cfg
    namespaces = []
    for nsid in range(1, len(cfg.namespaces) + 1):  # the configured ones (changes are blockers)
        ns = ctrl.allocated.get(nsid)
        if ns is None:
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
        "nvme.lba_formats": [list(f) for f in LBA_FORMATS],
        "nvme.namespaces": namespaces,
    }


# ----------------------------------------------------------------------------- quiesce / resume
def quiesce(ctrl: NvmeController, timeout: float = 30.0) -> None:
    """Bring the controller to a consistent point (see the module docstring).

    :raises MigrationError: something did not finish within ``timeout`` seconds (a
        stuck backend); the controller runs again.
    """
    from pcidev.errors import MigrationError

    with ctrl._state_lock:
        ctrl._paused = True
        ctrl._update_running()
    deadline = time.monotonic() + timeout

    def wait(what: str, done) -> None:
        while not done():
            if time.monotonic() > deadline:
                resume(ctrl)
                raise MigrationError(f"nvme: {what} did not finish within {timeout:g} s; "
                                     "the controller keeps running")
            time.sleep(0.0002)

    # fetch batches in progress (another thread's doorbell, a completion kicking a throttled SQ)
    wait("a fetch batch", lambda: not ctrl._batches and not any(
        sq is not None and sq.running for sq in list(ctrl._sqs)))
    wait("backend I/O in flight", lambda: not ctrl.io.inflight)
    ctrl.io.drain()
    pool = ctrl._admin_pool
    if pool is not None:  # admin work in the background (Format NVM, shutdown): FIFO, one worker
        marker = pool.submit(lambda: None)
        wait("admin work (Format NVM, shutdown)", marker.done)
    wait("a fetch batch", lambda: not ctrl._batches)  # kicks made by the last completions
    ctrl._ka_token += 1  # no keep-alive verdict while stopped
    ctrl._timer.cancel_all()
    with ctrl._coal_lock:
        due = [v for v in ctrl._vectors if v.count]
        for v in ctrl._vectors:
            v.count = 0
            v.armed = False
    msix = ctrl._msix
    for v in due:  # coalesced completions get their interrupt before the stop
        if msix is not None and msix.enabled:
            try:
                ctrl.irq.notify(v.index)
            except Exception:
                pass


def resume(ctrl: NvmeController) -> None:
    """Run again: fetch what was submitted meanwhile, restart keep alive, deliver events."""
    with ctrl._state_lock:
        was = ctrl._paused
        ctrl._paused = False
        ctrl._update_running()
    if ctrl.__dict__.pop("_save_state_at_resume", False):
        # written by the next admin command (maybe_save_state): the JSON and fsync (~0.7 ms)
        # stay out of the downtime
        ctrl._last_save = float("-inf")
    if not was or not ctrl._running:
        return
    ctrl._ka_last = time.monotonic()
    if ctrl.features.kato_ms:
        ctrl.keep_alive_changed()
    ctrl.aer._deliver()
    for sq in list(ctrl._sqs):
        if sq is not None and not sq.gone:
            ctrl._kick(sq)


# ----------------------------------------------------------------------------- save
def _us(seconds: float) -> int:
    return max(0, int(seconds * 1e6))


def save(ctrl: NvmeController) -> NvmeState:
    """The state of a quiesced controller (nothing is changed)."""
    if ctrl._state not in _STATES:
        raise StateError(f"the controller is {ctrl._state}", section=SECTION, instance_id=0, path="state")
    regs = ctrl.regs
    sqs: list[SqState | None] = []
    for sq in ctrl._sqs:
        if sq is None or sq.gone:
            sqs.append(None)
            continue
        busy = [r for r in sq.inflight.values() if not r.parked]
        if busy:
            raise StateError(f"SQ {sq.sqid} still has {len(busy)} command(s) in flight (not quiesced?)",
                             section=SECTION, instance_id=0, path=f"sqs[{sq.sqid}]")
        sqs.append(SqState(sqid=sq.sqid, cqid=sq.cq.cqid, base=sq.base, size=sq.size, head=sq.head,
                           tail=sq.tail, qprio=sq.qprio))
    cqs: list[CqState | None] = []
    for cq in ctrl._cqs:
        if cq is None or cq.gone:
            cqs.append(None)
            continue
        with cq.lock:
            backlog = tuple(CqeState(sqid=s.sqid, cid=cid, status=sf, dw0=dw0, dw1=dw1)
                            for s, cid, sf, dw0, dw1 in cq.backlog)
            cqs.append(CqState(cqid=cq.cqid, base=cq.base, size=cq.size, vector=cq.vector, ien=bool(cq.ien),
                               head=cq.head, tail=cq.tail, phase=cq.phase, backlog=backlog))
    aer = ctrl.aer
    with aer._lock:
        aer_state = AerState(outstanding=tuple(r.cid for r in aer.outstanding),
                             queued=tuple(EventState(*ev) for ev in aer.queued),
                             masked=tuple(EventState(t, 0, lid) for t, lid in sorted(aer.masked.items())))
    f = ctrl.features
    from pcidev_nvme import features as fmod

    feat = FeaturesState(
        arbitration=f.values[fmod.FID_ARBITRATION], power_mgmt=f.values[fmod.FID_POWER_MGMT],
        vwc=f.values[fmod.FID_VWC], num_queues=f.values[fmod.FID_NUM_QUEUES],
        coalescing=f.values[fmod.FID_IRQ_COALESCING], aec=f.values[fmod.FID_ASYNC_EVENT],
        kato=f.values[fmod.FID_KATO], temp_over=f.temp_over, temp_under=f.temp_under, nsq=f.nsq, ncq=f.ncq,
        nq_allocated=f.nq_allocated, timestamp=f.timestamp_now(), timestamp_origin=f.timestamp_origin,
        host_behavior=bytes(f.host_behavior),
        tler=tuple(TlerState(n, v) for n, v in sorted(f.tler.items())),
        vector_cd=tuple(v.cd for v in ctrl._vectors))
    ctrl._account_temperature()
    sm = ctrl.smart
    with sm._lock:
        smart = SmartState(
            bytes_read=sm.bytes_read, bytes_written=sm.bytes_written, host_read_commands=sm.host_read_commands,
            host_write_commands=sm.host_write_commands, busy_us=_us(sm.busy_seconds),
            power_cycles=sm.power_cycles, power_on_us=_us(sm.power_on_total),
            unsafe_shutdowns=sm.unsafe_shutdowns, media_errors=sm.media_errors,
            warning_temp_us=_us(sm.warning_temp_seconds), critical_temp_us=_us(sm.critical_temp_seconds),
            temperature=ctrl.temperature, injected_warning=ctrl._injected_warning,
            reported_warning=ctrl._reported_warning)
    el = ctrl.error_log
    with el._lock:
        error_count, entries = el.count, tuple(el._ring)
    fw = ctrl.firmware
    firmware = FirmwareState(revisions=tuple(fw.revisions), active=fw.active, next_reset=fw.next_reset,
                             staged=tuple(FwChunk(o, bytes(d)) for o, d in sorted(fw.staged.items())))
    cn = ctrl.changed_ns
    with cn._lock:
        changed, overflow = tuple(cn._nsids), cn._overflow
    namespaces = []
    for nsid in sorted(ctrl.allocated):
        ns = ctrl.allocated[nsid]
        b = ns.backend
        ref = None
        if getattr(b, "kind", None) == "mem" and getattr(b, "fd", -1) >= 0:
            ref = ctrl.vmstate_fd(b.fd)
        namespaces.append(NamespaceState(nsid=nsid, attached=nsid in ctrl.namespaces, lbaf=ns.lbaf, mem_fd=ref))
    dbs, eis = ctrl._dbbuf if ctrl._dbbuf is not None else (0, 0)
    return NvmeState(
        state=_STATES.index(ctrl._state), cc=regs["CC"].value, csts=ctrl._csts, aqa=regs["AQA"].value,
        asq=regs["ASQ"].value, acq=regs["ACQ"].value, intms=ctrl._intms, shutting_down=ctrl._shutting_down,
        dirty=bool(ctrl._dirty), page_size=ctrl.page_size, sqs=tuple(sqs), cqs=tuple(cqs), aer=aer_state,
        features=feat, smart=smart, error_count=error_count, error_entries=entries, firmware=firmware,
        changed_ns=changed, changed_ns_overflow=overflow, namespaces=tuple(namespaces),
        dbbuf_dbs=dbs, dbbuf_eis=eis, dbbuf=ctrl._dbbuf is not None)


# ----------------------------------------------------------------------------- check
def _fail(why: str, path: str) -> StateError:
    return StateError(why, section=SECTION, instance_id=0, path=path)


def check(ctrl: NvmeController, st: NvmeState) -> None:
    """Refuse a state that cannot apply to this controller (nothing is changed)."""
    cfg = ctrl.cfg
    nq = cfg.max_ioqpairs + 1
    if st.state >= len(_STATES):
        raise _fail(f"controller state {st.state} is unknown", "state")
    ready = _STATES[st.state] != "disabled"  # a failed controller keeps its queues until the reset
    page = st.page_size
    if page < 4096 or page > 65536 or page & (page - 1):
        raise _fail(f"memory page size {page} is not 4 KiB..64 KiB", "page_size")
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
    for j, t in enumerate(f.tler):
        if t.nsid not in ctrl.allocated:
            raise _fail(f"error recovery setting for namespace {t.nsid}, which does not exist",
                        f"features.tler[{j}].nsid")
    if len(st.error_entries) > ctrl.error_log.capacity:
        raise _fail(f"{len(st.error_entries)} error entries, the log keeps {ctrl.error_log.capacity}",
                    "error_entries")
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
    want = sorted(ctrl.allocated)
    got = [n.nsid for n in st.namespaces]
    if got != want:
        raise _fail(f"namespaces {got}, this controller has {want}", "namespaces")
    from pcidev_nvme.namespace import LBA_FORMATS

    for j, n in enumerate(st.namespaces):
        ns = ctrl.allocated[n.nsid]
        p = f"namespaces[{j}]"
        if n.lbaf >= len(LBA_FORMATS) or LBA_FORMATS[n.lbaf][0] < getattr(ns.backend, "min_block", 512):
            raise _fail(f"LBA format {n.lbaf} is not usable for namespace {n.nsid}", p + ".lbaf")
        is_mem = getattr(ns.backend, "kind", None) == "mem"
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
            if size != ns.size:
                raise _fail(f"namespace {n.nsid}'s memory has {size} bytes, not {ns.size}", p + ".mem_fd")
    for j, nsid in enumerate(st.changed_ns):
        if not 1 <= nsid <= 0xFFFFFFFE:
            raise _fail(f"NSID {nsid:#x}", f"changed_ns[{j}]")
    if st.dbbuf and not cfg.dbbuf:
        raise _fail("shadow doorbells on a controller without Doorbell Buffer Config", "dbbuf")
    if st.dbbuf and (st.dbbuf_dbs & 0xFFF or st.dbbuf_eis & 0xFFF):
        raise _fail("shadow doorbell buffers are not page aligned", "dbbuf_dbs")


# ----------------------------------------------------------------------------- apply
def apply(ctrl: NvmeController, st: NvmeState) -> None:
    """Apply a checked state (the controller is quiesced or has never run)."""
    from pcidev_nvme import features as fmod
    from pcidev_nvme.backends import MemoryBackend
    from pcidev_nvme.queues import CompletionQueue, SubmissionQueue
    from pcidev_nvme.request import SQE_SIZE, Request

    # 1. what can fail first: map the migrated namespace memory (nothing changed yet)
    swaps: dict[int, Any] = {}
    try:
        for n in st.namespaces:
            fd = ctrl.vmstate_load_fd(n.mem_fd) if n.mem_fd is not None else None
            if fd is None:
                continue
            ns = ctrl.allocated[n.nsid]
            if os.path.sameopenfile(fd, ns.backend.fd):
                continue  # already this memory (an in-process reload)
            swaps[n.nsid] = MemoryBackend.from_fd(fd, ns.size)
    except (ConfigError, OSError):
        for b in swaps.values():
            b.close()
        raise

    # 2. controller
    with ctrl._state_lock:
        ctrl._paused = True
        ctrl._gen += 1
        for req in ctrl.aer.reset():
            req.done = True
        ctrl._clear_queues()
        ctrl._draining = []
        ctrl._enable_pending = False
        ctrl._formatting.clear()
        regs = ctrl.regs
        regs["CC"].value = st.cc
        regs["AQA"].value = st.aqa
        regs["ASQ"].value = st.asq
        regs["ACQ"].value = st.acq
        ctrl._csts = st.csts
        ctrl._intms = st.intms
        ctrl._state = _STATES[st.state]
        ctrl._shutting_down = st.shutting_down
        ctrl._dirty = st.dirty
        ctrl.page_size = st.page_size

        # features (before the queues: shadow doorbells, coalescing)
        f = ctrl.features
        fs = st.features
        f.reset()
        f.values[fmod.FID_ARBITRATION] = fs.arbitration
        f.values[fmod.FID_POWER_MGMT] = fs.power_mgmt
        f.values[fmod.FID_VWC] = fs.vwc
        f.values[fmod.FID_NUM_QUEUES] = fs.num_queues
        f.values[fmod.FID_IRQ_COALESCING] = fs.coalescing
        f.values[fmod.FID_ASYNC_EVENT] = fs.aec
        f.values[fmod.FID_KATO] = fs.kato
        f.temp_over, f.temp_under = fs.temp_over, fs.temp_under
        f.nsq, f.ncq, f.nq_allocated = fs.nsq, fs.ncq, fs.nq_allocated
        f.timestamp_base = fs.timestamp
        f.timestamp_set_at = time.monotonic()
        f.timestamp_origin = fs.timestamp_origin
        f.host_behavior = bytes(fs.host_behavior)
        f.tler = {t.nsid: t.value for t in fs.tler}
        for v, cd in zip(ctrl._vectors, fs.vector_cd):
            v.cd = cd
            v.count = 0
            v.armed = False
            v.masked_pending = False
        ctrl._coalesce_on = bool(fs.coalescing & 0xFFFF)
        ctrl._dbbuf = (st.dbbuf_dbs, st.dbbuf_eis) if st.dbbuf else None

        # queues: CQs first, then SQs bound to them
        cqs: list[CompletionQueue | None] = [None] * len(ctrl._cqs)
        for c in st.cqs:
            if c is None:
                continue
            cq = CompletionQueue(c.cqid, c.base, c.size, c.vector, c.ien)
            cq.head, cq.tail, cq.phase = c.head, c.tail, c.phase
            if ctrl._dbbuf is not None:
                dbs, eis = ctrl._dbbuf
                cq.db_addr, cq.ei_addr = dbs + 4 * (2 * c.cqid + 1), eis + 4 * (2 * c.cqid + 1)
            cqs[c.cqid] = cq
        sqs: list[SubmissionQueue | None] = [None] * len(ctrl._sqs)
        for s in st.sqs:
            if s is None:
                continue
            cq = cqs[s.cqid]
            sq = SubmissionQueue(s.sqid, s.base, s.size, cq, s.qprio)
            sq.head, sq.tail = s.head, s.tail
            if ctrl._dbbuf is not None:
                dbs, eis = ctrl._dbbuf
                sq.db_addr, sq.ei_addr = dbs + 4 * (2 * s.sqid), eis + 4 * (2 * s.sqid)
            cq.sqs.append(sq)
            sqs[s.sqid] = sq
        for c in st.cqs:
            if c is None:
                continue
            cq = cqs[c.cqid]
            for e in c.backlog:
                cq.backlog.append((sqs[e.sqid], e.cid, e.status, e.dw0, e.dw1))
            cq.reserved = len(c.backlog)  # parked completions stay reserved until posted
        ctrl._sqs[:] = sqs
        ctrl._cqs[:] = cqs

        # outstanding AERs: parked requests on the admin SQ
        aer = ctrl.aer
        gen = ctrl._gen
        asq = sqs[0]
        for cid in st.aer.outstanding:
            sqe = bytes([0x0C, 0]) + cid.to_bytes(2, "little") + bytes(SQE_SIZE - 4)
            req = Request(0, cid, 0x0C, 0, sqe, sq=asq, gen=gen, t_fetch=time.monotonic(), parked=True)
            asq.inflight[cid] = req
            aer.outstanding.append(req)
        aer.queued.extend((e.etype, e.info, e.lid) for e in st.aer.queued)
        aer.masked.update({m.etype: m.lid for m in st.aer.masked})

        # SMART, temperature, logs, firmware, changed namespaces
        sm = ctrl.smart
        ss = st.smart
        with sm._lock:
            sm.bytes_read, sm.bytes_written = ss.bytes_read, ss.bytes_written
            sm.host_read_commands, sm.host_write_commands = ss.host_read_commands, ss.host_write_commands
            sm.busy_seconds = ss.busy_us / 1e6
            sm.power_cycles = ss.power_cycles
            sm.power_on_seconds = ss.power_on_us / 1e6
            sm._powered_at = time.monotonic()
            sm.unsafe_shutdowns = ss.unsafe_shutdowns
            sm.media_errors = ss.media_errors
            sm.warning_temp_seconds = ss.warning_temp_us / 1e6
            sm.critical_temp_seconds = ss.critical_temp_us / 1e6
        ctrl.temperature = ss.temperature
        ctrl._temp_since = time.monotonic()
        ctrl._injected_warning = ss.injected_warning
        ctrl._reported_warning = ss.reported_warning
        el = ctrl.error_log
        with el._lock:
            el.count = st.error_count
            el._ring = list(st.error_entries)
        fw = ctrl.firmware
        fw.revisions = list(st.firmware.revisions)
        fw.active = st.firmware.active
        fw.next_reset = st.firmware.next_reset
        fw.staged = {c.offset: bytes(c.data) for c in st.firmware.staged}
        cn = ctrl.changed_ns
        with cn._lock:
            cn._nsids = list(st.changed_ns)
            cn._overflow = st.changed_ns_overflow

        # namespaces: attachment, format, migrated memory
        attached = {}
        for n in st.namespaces:
            ns = ctrl.allocated[n.nsid]
            if n.nsid in swaps:
                old, ns.backend = ns.backend, swaps.pop(n.nsid)
                try:
                    old.close()
                except Exception:
                    pass
            if ns.lbaf != n.lbaf:
                ns._set_format(n.lbaf)
            if n.attached:
                attached[n.nsid] = ns
        ctrl.namespaces.clear()
        ctrl.namespaces.update(attached)
        ctrl._ka_last = time.monotonic()
        ctrl._ka_token += 1
        ctrl._timer.cancel_all()
        status = 0
        for cq in cqs:  # pin-based interrupt status, without signalling (the framework restored INTx)
            if cq is not None and cq.ien and cq.head != cq.tail:
                status |= 1 << (cq.vector & 31)
        ctrl._irq_status = status
        ctrl._update_running()
    # the state file follows the controller (written after the resume, outside the downtime)
    ctrl._save_state_at_resume = True
