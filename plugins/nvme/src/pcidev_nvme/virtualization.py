"""NVMe virtualization (SR-IOV): the primary controller's view of its secondary controllers.

With ``sriov_max_vfs`` > 0 the controller is a *primary controller* (the PF) with an SR-IOV
capability whose TotalVFs is ``sriov_max_vfs``; each VF is a *secondary controller* (an
:class:`~pcidev_nvme.controller.NvmeVirtualFunction`, an NVMe controller in secondary mode
that shares the primary's namespaces and has its own queues, interrupts and CNTLID).

Resources (NVMe Base 2.0, 8.26 Virtualization Enhancements), like QEMU's properties:

* ``sriov_vq_flexible`` queue resources (VQ; one is a secondary's admin queue, each other
  one an I/O queue pair) and ``sriov_vi_flexible`` interrupt resources (VI, MSI-X vectors)
  are *flexible*: the host assigns them to secondary controllers (or to the primary, taking
  effect at its next controller reset);
* the primary keeps ``max_ioqpairs - sriov_vq_flexible`` private I/O queue pairs (VQPRT
  counts its admin queue too) and ``msix_vectors - sriov_vi_flexible`` private vectors;
* a secondary takes at most ``sriov_max_vq_per_vf`` / ``sriov_max_vi_per_vf`` resources
  (default: the flexible count divided by ``sriov_max_vfs``), which also size its BAR0.

:class:`Virtualization` owns the secondary controllers' states (online, NVQ, NVI), the
flexible allocation of the primary and which namespaces are attached to each secondary
(by Namespace Attachment naming its CNTLID). It answers Identify CNS 14h (Primary
Controller Capabilities) and 15h (Secondary Controller List) and executes Virtualization
Management (admin 1Ch). A secondary controller refuses to become ready (CSTS.CFS) while
it is offline or lacks resources (:meth:`Virtualization.enable_problem`).

Its state travels as the optional ``virtualization`` subsection of the ``nvme`` section
(:class:`VirtualizationState`); the VFs' own controllers travel in the framework's
``pcidev/sriov`` section (:mod:`pcidev.migration.virtual_functions`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs

from pcidev.errors import ConfigError
from pcidev.vmstate import U16, VarArray, vmstate
from pcidev.vmstate.errors import StateError
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["OACS_VMS", "ACT_PRIMARY_FLEXIBLE", "ACT_SECONDARY_OFFLINE", "ACT_SECONDARY_ASSIGN",
           "ACT_SECONDARY_ONLINE", "RT_VQ", "RT_VI", "MAX_VFS", "SecondaryState", "VirtualizationState",
           "Resources", "resources_of", "Virtualization"]

#: Identify Controller OACS bit 7: Virtualization Management supported
OACS_VMS = 1 << 7
#: Virtualization Management actions (CDW10 bits 3:0; ``NVME_VIRT_MNGMT_ACTION_*``)
ACT_PRIMARY_FLEXIBLE = 0x1
ACT_SECONDARY_OFFLINE = 0x7
ACT_SECONDARY_ASSIGN = 0x8
ACT_SECONDARY_ONLINE = 0x9
#: resource types (CDW10 bits 10:8): VQ (queues) and VI (interrupts)
RT_VQ = 0
RT_VI = 1
#: the most secondary controllers (the Secondary Controller List holds 127 entries)
MAX_VFS = 127
#: Primary Controller Capabilities CRT: VQ and VI resources supported
_CRT = 0x3
#: a secondary needs an admin queue and one I/O queue pair, and one vector, to go online
_MIN_VQ, _MIN_VI = 2, 1


@vmstate("nvme/secondary-controller")
@attrs.frozen
class SecondaryState:
    """One secondary controller: online, its queue (NVQ) and interrupt (NVI) resources and
    the NSIDs attached to it."""

    online: bool
    nvq: U16
    nvi: U16
    attached: VarArray[U16, 1024] = ()


@vmstate("nvme/virtualization")
@attrs.frozen
class VirtualizationState:
    """The primary's flexible resources (current and at the next reset) and its secondaries."""

    vqfa: U16
    vifa: U16
    vqfa_next: U16
    vifa_next: U16
    secondaries: VarArray[SecondaryState, MAX_VFS]


@attrs.frozen
class Resources:
    """The SR-IOV resource counts a configuration gives (see the module docstring)."""

    max_vfs: int
    vq_flexible: int
    vi_flexible: int
    max_vq_per_vf: int
    max_vi_per_vf: int
    vq_private: int  # VQPRT: the primary's admin queue and private I/O queue pairs
    vi_private: int  # VIPRT


def resources_of(cfg: NvmeConfig) -> Resources | None:
    """Check the SR-IOV properties of ``cfg``; None without SR-IOV.

    :raises ConfigError: the counts do not fit together.
    """
    n = cfg.sriov_max_vfs
    if n == 0:
        return None
    vqf, vif = cfg.sriov_vq_flexible, cfg.sriov_vi_flexible
    vq_vf = cfg.sriov_max_vq_per_vf or (vqf // n)
    vi_vf = cfg.sriov_max_vi_per_vf or (vif // n)
    if vq_vf < _MIN_VQ or vi_vf < _MIN_VI:
        raise ConfigError(f"nvme: a secondary controller needs at least {_MIN_VQ} queue and {_MIN_VI} interrupt "
                          f"resources (sriov_max_vq_per_vf={vq_vf}, sriov_max_vi_per_vf={vi_vf}; "
                          "raise sriov_vq_flexible/sriov_vi_flexible)")
    if vq_vf > vqf or vi_vf > vif:
        raise ConfigError("nvme: sriov_max_vq_per_vf/sriov_max_vi_per_vf exceed the flexible resources")
    if vq_vf - 1 > 1024 or vi_vf > 2048:
        raise ConfigError("nvme: a secondary controller takes at most 1025 queue and 2048 interrupt resources")
    if cfg.max_ioqpairs - vqf < 1 or cfg.msix_vectors - vif < 1:
        raise ConfigError(f"nvme: the primary keeps max_ioqpairs - sriov_vq_flexible = {cfg.max_ioqpairs - vqf} "
                          f"I/O queue pairs and msix_vectors - sriov_vi_flexible = {cfg.msix_vectors - vif} "
                          "vectors: both must be at least 1")
    if cfg.cntlid + n > 0xFFEF:
        raise ConfigError(f"nvme: CNTLIDs {cfg.cntlid + 1}..{cfg.cntlid + n} of the secondaries exceed FFEFh")
    return Resources(max_vfs=n, vq_flexible=vqf, vi_flexible=vif, max_vq_per_vf=vq_vf, max_vi_per_vf=vi_vf,
                     vq_private=cfg.max_ioqpairs - vqf + 1, vi_private=cfg.msix_vectors - vif)


@attrs.define
class _Secondary:
    online: bool = False
    nvq: int = 0
    nvi: int = 0
    attached: set[int] = attrs.field(factory=set)


def _err(status: int, msg: str) -> NvmeStatusError:
    return NvmeStatusError(status, msg, param_offset=40)  # CDW10


class Virtualization:
    """The primary controller's secondary controllers and flexible resources.

    :param cfg: the primary's configuration (checked by :func:`resources_of`).
    :param res: its resource counts.
    :param offline: called with a secondary's index when it goes offline (its live
        controller, if its VF is enabled, resets).
    :param attached_changed: called with a secondary's index after its attached
        namespaces changed (its live controller takes them).
    """

    def __init__(self, cfg: NvmeConfig, res: Resources, *, offline: Callable[[int], None] = lambda k: None,
                 attached_changed: Callable[[int], None] = lambda k: None) -> None:
        self.cfg = cfg
        self.res = res
        self._offline = offline
        self._attached_changed = attached_changed
        self.secondaries = [_Secondary() for _ in range(res.max_vfs)]
        #: flexible resources allocated to the primary now (VQRFAP/VIRFAP) and at its next reset
        self.vqfa = self.vifa = 0
        self.vqfa_next = self.vifa_next = 0
        #: the state the check of a load accepted last (:meth:`check`): what the VFs' streams
        #: of that load must agree with before anything is applied
        self.checked: VirtualizationState | None = None

    # -- identities -------------------------------------------------------------------------
    @property
    def primary_cntlid(self) -> int:
        return self.cfg.cntlid

    def scid(self, k: int) -> int:
        """The CNTLID of secondary controller ``k`` (VF ``k + 1``)."""
        return self.cfg.cntlid + 1 + k

    def index_of(self, cntlid: int) -> int | None:
        """The secondary index of ``cntlid``, or None if no secondary has it."""
        k = cntlid - self.cfg.cntlid - 1
        return k if 0 <= k < self.res.max_vfs else None

    def controller_ids(self) -> list[int]:
        """Every controller of the subsystem: the primary's and the secondaries' CNTLIDs."""
        return [self.primary_cntlid] + [self.scid(k) for k in range(self.res.max_vfs)]

    # -- what the primary uses ----------------------------------------------------------------
    @property
    def primary_io_queues(self) -> int:
        """I/O queue pairs the primary offers: its private ones and its flexible allocation."""
        return self.res.vq_private - 1 + self.vqfa

    @property
    def primary_vectors(self) -> int:
        """Interrupt vectors the primary offers: its private ones and its flexible allocation."""
        return self.res.vi_private + self.vifa

    def primary_reset(self) -> None:
        """A controller level reset of the primary: its pending flexible allocation applies."""
        self.vqfa, self.vifa = self.vqfa_next, self.vifa_next

    # -- what a secondary uses ----------------------------------------------------------------
    def secondary(self, k: int) -> tuple[bool, int, int]:
        """``(online, nvq, nvi)`` of secondary ``k``."""
        s = self.secondaries[k]
        return s.online, s.nvq, s.nvi

    def attached(self, k: int) -> set[int]:
        """The NSIDs attached to secondary ``k``."""
        return set(self.secondaries[k].attached)

    def enable_problem(self, k: int) -> str | None:
        """Why secondary ``k`` cannot become ready (CC.EN), or None."""
        s = self.secondaries[k]
        if not s.online:
            return f"secondary controller {self.scid(k)} is offline"
        if s.nvq < _MIN_VQ or s.nvi < _MIN_VI:
            return f"secondary controller {self.scid(k)} has too few resources (NVQ {s.nvq}, NVI {s.nvi})"
        return None

    # -- namespaces ---------------------------------------------------------------------------------
    def attach(self, cntlid: int, nsid: int) -> None:
        """Attach ``nsid`` to secondary ``cntlid``.

        :raises NvmeStatusError: Namespace Already Attached.
        """
        k = self.index_of(cntlid)
        assert k is not None
        s = self.secondaries[k]
        if nsid in s.attached:
            raise NvmeStatusError(Status.NS_ALREADY_ATTACHED, f"namespace {nsid} is already attached to {cntlid}")
        s.attached.add(nsid)
        self._attached_changed(k)

    def detach(self, cntlid: int, nsid: int) -> None:
        """Detach ``nsid`` from secondary ``cntlid``.

        :raises NvmeStatusError: Namespace Not Attached.
        """
        k = self.index_of(cntlid)
        assert k is not None
        s = self.secondaries[k]
        if nsid not in s.attached:
            raise NvmeStatusError(Status.NS_NOT_ATTACHED, f"namespace {nsid} is not attached to {cntlid}")
        s.attached.discard(nsid)
        self._attached_changed(k)

    def namespace_deleted(self, nsid: int) -> None:
        """Namespace ``nsid`` was deleted: it is attached to no secondary any more."""
        for k, s in enumerate(self.secondaries):
            if nsid in s.attached:
                s.attached.discard(nsid)
                self._attached_changed(k)

    def attached_to(self, nsid: int) -> list[int]:
        """The secondaries' CNTLIDs ``nsid`` is attached to."""
        return [self.scid(k) for k, s in enumerate(self.secondaries) if nsid in s.attached]

    # -- Identify ---------------------------------------------------------------------------------
    def primary_capabilities(self) -> bytes:
        """Identify CNS 14h: the Primary Controller Capabilities data structure."""
        res = self.res
        buf = bytearray(4096)
        struct.pack_into("<HHB", buf, 0, self.primary_cntlid, 0, _CRT)  # CNTLID PORTID CRT
        vqrfa = sum(s.nvq for s in self.secondaries)
        virfa = sum(s.nvi for s in self.secondaries)
        # VQFRT VQRFA VQRFAP VQPRT VQFRSM VQGRAN
        struct.pack_into("<IIHHHH", buf, 32, res.vq_flexible, vqrfa, self.vqfa, res.vq_private,
                         res.max_vq_per_vf, 1)
        # VIFRT VIRFA VIRFAP VIPRT VIFRSM VIGRAN
        struct.pack_into("<IIHHHH", buf, 64, res.vi_flexible, virfa, self.vifa, res.vi_private,
                         res.max_vi_per_vf, 1)
        return bytes(buf)

    def secondary_list(self, above: int) -> bytes:
        """Identify CNS 15h: the Secondary Controller List, entries with SCID >= ``above``."""
        buf = bytearray(4096)
        entries = [k for k in range(self.res.max_vfs) if self.scid(k) >= above][:MAX_VFS]
        buf[0] = len(entries)
        for i, k in enumerate(entries):
            s = self.secondaries[k]
            # SCID PCID SCS (3 reserved) VFN NVQ NVI
            struct.pack_into("<HHB3xHHH", buf, 32 + 32 * i, self.scid(k), self.primary_cntlid, int(s.online),
                             k + 1, s.nvq, s.nvi)
        return bytes(buf)

    # -- Virtualization Management (admin 1Ch) ---------------------------------------------------------
    def manage(self, cdw10: int, cdw11: int) -> int:
        """Execute Virtualization Management.

        :returns: Dword 0 of the completion (the number of resources allocated or assigned).
        :raises NvmeStatusError: Invalid Field (an action not supported), Invalid Controller
            Identifier, Invalid Secondary Controller State, Invalid Number of Controller
            Resources, Invalid Resource Identifier.
        """
        act, rt, cntlid, nr = cdw10 & 0xF, (cdw10 >> 8) & 0x7, cdw10 >> 16, cdw11 & 0xFFFF
        if act == ACT_PRIMARY_FLEXIBLE:
            if cntlid != self.primary_cntlid:
                raise _err(Status.INVALID_CTRL_ID, f"CNTLID {cntlid} is not the primary controller")
            self._check_rt(rt)
            return self._allocate_primary(rt, nr)
        if act not in (ACT_SECONDARY_OFFLINE, ACT_SECONDARY_ASSIGN, ACT_SECONDARY_ONLINE):
            raise _err(Status.INVALID_FIELD, f"virtualization management action {act:#x} is not supported")
        k = self.index_of(cntlid)
        if k is None:
            raise _err(Status.INVALID_CTRL_ID, f"CNTLID {cntlid} is not a secondary controller")
        s = self.secondaries[k]
        if act == ACT_SECONDARY_OFFLINE:
            if s.online:
                s.online = False
                self._offline(k)
            return 0
        if act == ACT_SECONDARY_ONLINE:
            if s.nvq < _MIN_VQ or s.nvi < _MIN_VI:
                raise _err(Status.SEC_CTRL_STATE_INVALID,
                           f"secondary controller {cntlid} has NVQ {s.nvq} and NVI {s.nvi}: it needs at least "
                           f"{_MIN_VQ} and {_MIN_VI} to go online")
            s.online = True
            return 0
        # assign
        self._check_rt(rt)
        if s.online:
            raise _err(Status.SEC_CTRL_STATE_INVALID, f"secondary controller {cntlid} is online")
        if rt == RT_VQ:
            limit, others = self.res.max_vq_per_vf, sum(o.nvq for o in self.secondaries if o is not s)
            pool = self.res.vq_flexible - max(self.vqfa, self.vqfa_next)
        else:
            limit, others = self.res.max_vi_per_vf, sum(o.nvi for o in self.secondaries if o is not s)
            pool = self.res.vi_flexible - max(self.vifa, self.vifa_next)
        if nr > limit or others + nr > pool:
            raise _err(Status.INVALID_NUM_CTRL_RESOURCES,
                       f"{nr} resources for secondary {cntlid}: at most {min(limit, pool - others)}")
        if rt == RT_VQ:
            s.nvq = nr
        else:
            s.nvi = nr
        return nr

    @staticmethod
    def _check_rt(rt: int) -> None:
        if rt not in (RT_VQ, RT_VI):
            raise _err(Status.INVALID_RESOURCE_ID, f"resource type {rt} is neither VQ (0) nor VI (1)")

    def _allocate_primary(self, rt: int, nr: int) -> int:
        if rt == RT_VQ:
            free = self.res.vq_flexible - sum(s.nvq for s in self.secondaries)
        else:
            free = self.res.vi_flexible - sum(s.nvi for s in self.secondaries)
        if nr > free:
            raise _err(Status.INVALID_NUM_CTRL_RESOURCES, f"{nr} flexible resources for the primary: {free} are free")
        if rt == RT_VQ:
            self.vqfa_next = nr
        else:
            self.vifa_next = nr
        return nr

    # -- migration --------------------------------------------------------------------------------
    def snapshot(self) -> VirtualizationState:
        """The state to migrate."""
        return VirtualizationState(
            vqfa=self.vqfa, vifa=self.vifa, vqfa_next=self.vqfa_next, vifa_next=self.vifa_next,
            secondaries=tuple(SecondaryState(online=s.online, nvq=s.nvq, nvi=s.nvi, attached=tuple(sorted(s.attached)))
                              for s in self.secondaries))

    def check(self, st: VirtualizationState, allocated: set[int]) -> None:
        """Refuse a state that does not fit this configuration (before anything is applied).

        :param allocated: the NSIDs that exist.
        :raises StateError: naming the field.
        """
        def fail(why: str, path: str) -> StateError:
            return StateError(why, section="nvme", instance_id=0, path=f"virtualization.{path}")

        res = self.res
        if len(st.secondaries) != res.max_vfs:
            raise fail(f"{len(st.secondaries)} secondary controllers, this controller has {res.max_vfs}",
                       "secondaries")
        for i, s in enumerate(st.secondaries):
            if s.nvq > res.max_vq_per_vf or s.nvi > res.max_vi_per_vf:
                raise fail(f"NVQ {s.nvq} / NVI {s.nvi} exceed the per-VF maximum", f"secondaries[{i}]")
            if s.online and (s.nvq < _MIN_VQ or s.nvi < _MIN_VI):
                raise fail("online without resources", f"secondaries[{i}].online")
            if not set(s.attached) <= allocated:
                raise fail(f"attached NSIDs {sorted(set(s.attached) - allocated)} do not exist",
                           f"secondaries[{i}].attached")
        if sum(s.nvq for s in st.secondaries) + max(st.vqfa, st.vqfa_next) > res.vq_flexible:
            raise fail("more queue resources allocated than there are flexible ones", "vqfa")
        if sum(s.nvi for s in st.secondaries) + max(st.vifa, st.vifa_next) > res.vi_flexible:
            raise fail("more interrupt resources allocated than there are flexible ones", "vifa")
        self.checked = st

    def secondary_problem(self, k: int, *, attached: list[int], enabled: bool, nsq: int, ncq: int,
                          queue_ids: list[tuple[str, int]], allocated: set[int],
                          records: VirtualizationState | None = None) -> tuple[str, str] | None:
        """Why the saved state of secondary ``k``'s controller disagrees with the primary's
        records: other attached namespaces, enabled while offline or without resources,
        queues beyond NVQ.

        :param attached: the NSIDs the saved state has attached.
        :param enabled: it is enabled (not disabled).
        :param nsq: its Number of Queues (submission queues).
        :param ncq: its Number of Queues (completion queues).
        :param queue_ids: ``("sqs" or "cqs", queue id)`` of every queue it has.
        :param allocated: the NSIDs that exist.
        :param records: the primary's records a load brings (checked, not applied yet);
            None: the live ones.
        :returns: ``(reason, field path in the secondary's nvme section)``, or None.
        """
        if records is None:
            s = self.secondaries[k]
            online, nvq, nvi, mine = s.online, s.nvq, s.nvi, set(s.attached)
        else:
            r = records.secondaries[k]
            online, nvq, nvi, mine = r.online, r.nvq, r.nvi, set(r.attached)
        want = sorted(mine & allocated)
        if sorted(attached) != want:
            return f"namespaces {sorted(attached)} attached, the primary controller attached {want}", "namespaces"
        if enabled and not online:
            return f"enabled, but secondary controller {self.scid(k)} is offline", "state"
        if enabled and (nvq < _MIN_VQ or nvi < _MIN_VI):
            return (f"enabled, but secondary controller {self.scid(k)} has too few resources (NVQ {nvq}, NVI {nvi})",
                    "state")
        limit = max(min(nvq - 1, self.res.max_vq_per_vf - 1), 1)  # (its io_queue_limit)
        if enabled and max(nsq, ncq) > limit:  # (enabling set them within NVQ - 1)
            return f"Number of Queues {nsq}/{ncq} beyond the {limit} it was assigned (NVQ)", "features.nsq"
        for name, qid in queue_ids:
            if qid > limit:
                return f"I/O queue {qid} beyond the {limit} it was assigned (NVQ)", f"{name}[{qid}]"
        return None

    def restore(self, st: VirtualizationState) -> None:
        """Take a checked state."""
        self.vqfa, self.vifa, self.vqfa_next, self.vifa_next = st.vqfa, st.vifa, st.vqfa_next, st.vifa_next
        self.secondaries = [_Secondary(online=s.online, nvq=s.nvq, nvi=s.nvi, attached=set(s.attached))
                            for s in st.secondaries]
