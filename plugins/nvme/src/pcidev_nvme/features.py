"""Get Features / Set Features (admin opcodes 0Ah / 09h).

Supported feature identifiers:

=====  ==============================  ===================================================
FID    Feature                          Notes
=====  ==============================  ===================================================
01h    Arbitration                      stored (round robin is the only mechanism)
02h    Power Management                 one power state: PS must be 0
04h    Temperature Threshold            composite sensor, over/under; may raise a SMART AEN
05h    Error Recovery                   per namespace: TLER (15:0, kept, no effect: no
                                        command retries) and DULBE (bit 16): Read,
                                        Compare, Verify and Copy sources touching a
                                        deallocated or unwritten block fail with
                                        Deallocated or Unwritten Logical Block (02h/87h,
                                        the LBA in the error entry); only on a namespace
                                        with NSFEAT.DAE (else Invalid Field; a broadcast
                                        sets it on those only)
06h    Volatile Write Cache             WCE; disabling flushes every namespace
07h    Number of Queues                 allocates up to ``max_ioqpairs``; only before
                                        the first I/O queue is created; a later
                                        request before the next reset gets the
                                        same allocation
08h    Interrupt Coalescing             THR / TIME, applied to I/O completion queues
09h    Interrupt Vector Configuration   per vector (every vector the controller has,
                                        IV in CDW11 15:0): Coalescing Disable; vector 0
                                        (the admin completion queue's, which coalescing
                                        never applies to) always reports CD set, and a
                                        Set of it changes nothing
0Ah    Write Atomicity Normal           DN (bit 0): set, only AWUPF / NAWUPF apply
                                        (default: ``atomic.dn``); the limits in effect
                                        are :mod:`pcidev_nvme.atomicity`'s
0Bh    Asynchronous Event Configuration SMART critical warnings, NS attribute and
                                        firmware activation notices
0Eh    Timestamp                        8-byte data buffer
0Fh    Keep Alive Timer                 KATO in ms (rounded up to 100 ms)
16h    Host Behavior Support            512-byte data buffer; ACRE, ETDAS, LBAFEE 0 or 1;
                                        CDFE (bytes 5:4) enables Copy descriptor formats
                                        2h/3h (bits 2, 3; others reserved: Invalid Field)
18h    Endurance Group Event            per endurance group (ENDGID, CDW11 15:0; only group
       Configuration                    1, else Invalid Field): EGCW (CDW11 23:16), kept
                                        by :class:`~pcidev_nvme.endurance.EnduranceGroup`
19h    I/O Command Set Profile          IOCSCI (CDW11 8:0): only combination 0 (NVM, the
                                        one Identify CNS 1Ch reports); any other index
                                        → I/O Command Set Combination Rejected
=====  ==============================  ===================================================

:meth:`Features.snapshot` / :meth:`Features.restore` carry every current value
(:class:`FeaturesState`, the ``nvme/features`` vmstate description; its per-vector
Coalescing Disable bits belong to :mod:`pcidev_nvme.interrupts` and are filled in by
the controller's migration). A non-zero CDFE also travels in the ``copy_formats``
subsection (:class:`CopyFormatsState`): a destination from before Copy formats 2h/3h
does not know it and refuses the stream, instead of taking the Host Behavior data and
failing the guest's next cross-namespace Copy; :func:`state_problem` refuses a CDFE with
a reserved bit, or one the subsection does not repeat.

Select (CDW10 10:8) supports current, default, saved (= default: nothing is
saveable) and supported capabilities. Set with Save (CDW10 bit 31) fails with
Feature Identifier Not Saveable.

Not supported (Invalid Field, and not in the Feature Identifiers Supported and Effects
log, LID 12h, :meth:`Features.supported_log`): Sanitize Config (17h: SANICAP.NDI is
clear), LBA Status Information Attributes (15h) and every other identifier.
"""

from __future__ import annotations

import struct
import time
from typing import Annotated, Protocol

import attrs

from pcidev.vmstate import U8, U16, U32, U64, Bool, Bytes, Check, Mask, Range, VarArray, vmstate
from pcidev_nvme.atomicity import Atomicity
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.endurance import AEC_EG_EVENT, FID_EG_EVENT_CONFIG, EnduranceGroup
from pcidev_nvme.interrupts import Interrupts
from pcidev_nvme.limits import OCFS
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.request import Request
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["CopyFormatsState", "Features", "FeaturesState", "TlerState", "DulbeState", "WriteAtomicityState",
           "FID_NAMES", "CDFE_SUPPORTED", "ERR_REC_DULBE", "state_problem"]

#: most namespaces with an error recovery setting in a migration stream
MAX_NS = 1024

FID_ARBITRATION = 0x01
FID_POWER_MGMT = 0x02
FID_TEMP_THRESHOLD = 0x04
FID_ERROR_RECOVERY = 0x05
FID_VWC = 0x06
FID_NUM_QUEUES = 0x07
FID_IRQ_COALESCING = 0x08
FID_IRQ_CONFIG = 0x09
FID_ASYNC_EVENT = 0x0B
FID_TIMESTAMP = 0x0E
FID_KATO = 0x0F
FID_HOST_BEHAVIOR = 0x16
FID_WRITE_ATOMICITY = 0x0A
FID_IOCS_PROFILE = 0x19

FID_NAMES = {
    FID_ARBITRATION: "arbitration", FID_POWER_MGMT: "power management",
    FID_TEMP_THRESHOLD: "temperature threshold", FID_ERROR_RECOVERY: "error recovery",
    FID_VWC: "volatile write cache", FID_NUM_QUEUES: "number of queues",
    FID_IRQ_COALESCING: "interrupt coalescing", FID_IRQ_CONFIG: "interrupt vector configuration",
    FID_WRITE_ATOMICITY: "write atomicity normal",
    FID_ASYNC_EVENT: "asynchronous event configuration", FID_TIMESTAMP: "timestamp",
    FID_KATO: "keep alive timer", FID_HOST_BEHAVIOR: "host behavior support",
    FID_IOCS_PROFILE: "i/o command set profile",
    FID_EG_EVENT_CONFIG: "endurance group event configuration",
}

#: Host Behavior Support CDFE (Copy Descriptor Formats Enable, bytes 5:4 of the data)
_CDFE = struct.Struct("<H")
#: the CDFE bits the controller honours: formats 2h and 3h where OCFS offers them (bits 2 and
#: 3); the rest are reserved
CDFE_SUPPORTED = OCFS & ((1 << 2) | (1 << 3))

_PER_NS = {FID_ERROR_RECOVERY}
#: Error Recovery (05h) CDW11: TLER (15:0) and DULBE (bit 16)
ERR_REC_TLER = 0xFFFF
ERR_REC_DULBE = 1 << 16
#: AEC bits the controller honours: critical warnings 0..4, NS attribute (8), FW activation (9),
#: Endurance Group Event Aggregate Log Change (14)
AEC_SUPPORTED = 0x1F | (1 << 8) | (1 << 9) | AEC_EG_EVENT
#: features scoped to an endurance group (Feature Identifiers Supported and Effects: FSP bit 3)
_PER_ENDGRP = {FID_EG_EVENT_CONFIG}

SEL_CURRENT, SEL_DEFAULT, SEL_SAVED, SEL_CAPS = 0, 1, 2, 3
CAP_SAVEABLE, CAP_NS, CAP_CHANGEABLE = 1, 2, 4

#: the interrupt vector of the admin completion queue (never coalesced)
ADMIN_VECTOR = 0

_OFF_CDW10 = 40
_OFF_CDW11 = 44
_OFF_NSID = 4
_BROADCAST = 0xFFFFFFFF


@vmstate("nvme/tler")
@attrs.frozen
class TlerState:
    """Error Recovery (feature 05h) of one namespace."""

    nsid: Annotated[U32, Range(1, 0xFFFFFFFE)]
    value: U16


@vmstate("nvme/write-atomicity")
@attrs.frozen
class WriteAtomicityState:
    """Write Atomicity Normal (feature 0Ah): Disable Normal."""

    dn: Bool


@vmstate("nvme/dulbe")
@attrs.frozen
class DulbeState:
    """Error Recovery DULBE (feature 05h bit 16): the namespaces that have it set."""

    nsids: VarArray[U32, MAX_NS]


@vmstate("nvme/copy-formats")
@attrs.frozen
class CopyFormatsState:
    """Host Behavior Support CDFE (feature 16h, bytes 5:4 of the data), when non-zero: the
    same value as in ``host_behavior``, in a subsection so that a destination that has no
    Copy formats 2h/3h (and would drop them silently) refuses the stream."""

    cdfe: U16


def _kato_problem(kato: int) -> str | None:
    return None if kato % 100 == 0 else f"keep alive timeout {kato} ms is not a multiple of 100 ms (KAS)"


def _host_behavior_problem(data: bytes) -> str | None:
    if data[0] > 1 or data[1] > 1 or data[2] > 1:
        return "ACRE, ETDAS and LBAFEE are 0 or 1"
    return None


def _values_problem(st: FeaturesState) -> tuple[str, str] | None:
    """The invariant of :class:`FeaturesState`: Number of Queues reads what it allocated."""
    if st.num_queues != (st.nsq - 1) | (st.ncq - 1) << 16:
        return (f"Number of Queues {st.num_queues:#x} is not the allocation {st.nsq}/{st.ncq}",
                "num_queues")
    return None


@vmstate("nvme/features", check=_values_problem)
@attrs.frozen
class FeaturesState:
    """The current feature values (``vector_cd``: feature 09h, owned by the interrupts)."""

    arbitration: Annotated[U32, Mask(0xFFFFFF07)]
    power_mgmt: Annotated[U32, Mask(0xE0)]  # (power state 0, the only one)
    vwc: Annotated[U32, Mask(1)]
    num_queues: U32
    coalescing: Annotated[U32, Mask(0xFFFF)]
    aec: Annotated[U32, Mask(AEC_SUPPORTED)]
    kato: Annotated[U32, Check(_kato_problem)]
    temp_over: U16
    temp_under: U16
    nsq: Annotated[U16, Range(1, 0xFFFF)]
    ncq: Annotated[U16, Range(1, 0xFFFF)]
    nq_allocated: Bool
    timestamp: Annotated[U64, Range(0, 2**48 - 1)]  # ms value at the save
    timestamp_origin: Annotated[U8, Range(0, 1)]
    host_behavior: Annotated[Bytes[512], Check(_host_behavior_problem)]
    tler: VarArray[TlerState, MAX_NS] = ()
    vector_cd: VarArray[Bool, 2048] = ()
    write_atomicity: WriteAtomicityState | None = None
    #: None: DULBE is clear on every namespace (a stream from before it existed)
    dulbe: DulbeState | None = None
    #: Host Behavior Support CDFE, when non-zero (None: zero, or a stream from before it)
    copy_formats: CopyFormatsState | None = None


def state_problem(state: FeaturesState) -> tuple[str, str] | None:
    """Why ``state`` cannot be restored, as (reason, field path), or None: Host Behavior
    Support CDFE with a reserved bit (one Set Features refuses), or a CDFE that differs from
    the ``copy_formats`` subsection's (which a source writes whenever CDFE is non-zero).

    :param state: the features of a migration stream.
    """
    (cdfe,) = _CDFE.unpack_from(state.host_behavior, 4)
    if cdfe & ~CDFE_SUPPORTED:
        return (f"Host Behavior Support CDFE {cdfe:#06x} enables a Copy descriptor format this controller "
                f"does not have (only {CDFE_SUPPORTED:#x})", "features.host_behavior")
    carried = state.copy_formats.cdfe if state.copy_formats is not None else 0
    if carried != cdfe:
        return (f"Host Behavior Support CDFE {cdfe:#06x} differs from the copy_formats subsection's "
                f"{carried:#06x}", "features.copy_formats")
    return None


class FeaturesHost(Protocol):
    """What :class:`Features` uses of the controller."""

    cfg: NvmeConfig
    namespaces: dict[int, Namespace]
    #: coalescing (08h) and Coalescing Disable (09h)
    interrupts: Interrupts
    #: the atomic write limits Write Atomicity Normal (0Ah) selects
    atomicity: Atomicity
    #: Endurance Group Event Configuration (18h)
    endurance: EnduranceGroup

    @property
    def io_queue_limit(self) -> int:
        """I/O queue pairs the controller offers now (SR-IOV resources)."""
    @property
    def vector_limit(self) -> int:
        """Interrupt vectors the controller offers now (SR-IOV resources)."""

    def check_temperature(self) -> None: ...
    def io_queues_exist(self) -> bool: ...
    def keep_alive_changed(self) -> None: ...


class Features:
    """Current feature values of one controller (reset to defaults at every controller reset).

    :param ctrl: the controller (for queue counts, vectors, temperature, namespaces).
    """

    def __init__(self, ctrl: FeaturesHost) -> None:
        self.ctrl = ctrl
        self.reset()

    # -- state -------------------------------------------------------------------------
    def defaults(self) -> dict[int, int]:
        nq = self.ctrl.io_queue_limit - 1
        return {
            FID_ARBITRATION: 0x7,  # AB = no limit
            FID_POWER_MGMT: 0,
            FID_VWC: 1,
            FID_NUM_QUEUES: nq | (nq << 16),
            FID_IRQ_COALESCING: 0,
            FID_ASYNC_EVENT: 0,
            FID_KATO: 0,
            FID_WRITE_ATOMICITY: int(self.ctrl.cfg.atomic_dn),
            FID_IOCS_PROFILE: 0,  # the only combination: nothing to keep or migrate
        }

    def reset(self) -> None:
        """Controller reset: every feature back to its default."""
        cfg = self.ctrl.cfg
        self.values = self.defaults()
        #: [over, under] per sensor (0 = composite)
        self.temp_over = cfg.warning_temp
        self.temp_under = 0
        self.tler: dict[int, int] = {}
        #: the namespaces with Error Recovery DULBE set (read by the I/O command set)
        self.dulbe: set[int] = set()
        self.host_behavior = bytes(512)
        self.timestamp_base = 0  # ms at the moment of setting
        self.timestamp_set_at = time.monotonic()
        self.timestamp_origin = 0
        #: what Number of Queues allocated, 1-based counts
        self.nsq = self.ctrl.io_queue_limit
        self.ncq = self.ctrl.io_queue_limit
        #: Number of Queues was set since the last reset (the allocation is then fixed)
        self.nq_allocated = False
        self._push_coalescing()
        self._push_dn()

    # -- state -------------------------------------------------------------------------------
    def snapshot(self, vector_cd: tuple[bool, ...] = ()) -> FeaturesState:
        """The current values (the timestamp as it reads now).

        :param vector_cd: Coalescing Disable per vector (owned by the interrupts), carried
            in the same description.
        """
        v = self.values
        return FeaturesState(
            arbitration=v[FID_ARBITRATION], power_mgmt=v[FID_POWER_MGMT], vwc=v[FID_VWC],
            num_queues=v[FID_NUM_QUEUES], coalescing=v[FID_IRQ_COALESCING], aec=v[FID_ASYNC_EVENT],
            kato=v[FID_KATO], temp_over=self.temp_over, temp_under=self.temp_under, nsq=self.nsq,
            ncq=self.ncq, nq_allocated=self.nq_allocated, timestamp=self.timestamp_now(),
            timestamp_origin=self.timestamp_origin, host_behavior=bytes(self.host_behavior),
            tler=tuple(TlerState(n, t) for n, t in sorted(self.tler.items())), vector_cd=vector_cd,
            write_atomicity=WriteAtomicityState(True) if v[FID_WRITE_ATOMICITY] & 1 else None,
            dulbe=DulbeState(tuple(sorted(self.dulbe))) if self.dulbe else None,
            copy_formats=CopyFormatsState(cdfe) if (cdfe := self.copy_formats_enabled) else None)

    def restore(self, state: FeaturesState) -> None:
        """Take the values of a checked ``state`` (the timestamp counts on from now)."""
        self.reset()
        v = self.values
        v[FID_ARBITRATION] = state.arbitration
        v[FID_POWER_MGMT] = state.power_mgmt
        v[FID_VWC] = state.vwc
        v[FID_NUM_QUEUES] = state.num_queues
        v[FID_IRQ_COALESCING] = state.coalescing
        v[FID_ASYNC_EVENT] = state.aec
        v[FID_KATO] = state.kato
        v[FID_WRITE_ATOMICITY] = int(state.write_atomicity is not None and state.write_atomicity.dn)
        self.temp_over, self.temp_under = state.temp_over, state.temp_under
        self.nsq, self.ncq, self.nq_allocated = state.nsq, state.ncq, state.nq_allocated
        self.timestamp_base = state.timestamp
        self.timestamp_set_at = time.monotonic()
        self.timestamp_origin = state.timestamp_origin
        self.host_behavior = bytes(state.host_behavior)
        self.tler = {t.nsid: t.value for t in state.tler}
        self.dulbe = set(state.dulbe.nsids) if state.dulbe is not None else set()
        self._push_coalescing()
        self._push_dn()

    # -- helpers for the controller --------------------------------------------------------
    @property
    def coalescing(self) -> tuple[int, int]:
        """(THR, TIME) of feature 08h."""
        v = self.values[FID_IRQ_COALESCING]
        return v & 0xFF, (v >> 8) & 0xFF

    def _push_coalescing(self) -> None:
        """Give the interrupts the current feature 08h. This class owns the value; the
        interrupts keep a copy for their per-completion path, and this is the only
        place that writes it (called by :meth:`reset`, :meth:`restore` and Set Features)."""
        self.ctrl.interrupts.set_coalescing(*self.coalescing)

    def _push_dn(self) -> None:
        """Give the atomicity the current DN (feature 0Ah), as :meth:`_push_coalescing` does."""
        self.ctrl.atomicity.set_dn(bool(self.values[FID_WRITE_ATOMICITY] & 1))

    def forget_namespace(self, nsid: int) -> None:
        """Namespace ``nsid`` was deleted: its Error Recovery setting (TLER, DULBE) goes, so a
        namespace created with the same NSID starts at the defaults.

        :param nsid: the namespace identifier.
        """
        self.tler.pop(nsid, None)
        self.dulbe.discard(nsid)

    def dulbe_enabled(self, nsid: int) -> bool:
        """Whether Error Recovery DULBE is set for namespace ``nsid`` (the I/O command set
        asks once per namespace lookup).

        :param nsid: the namespace identifier.
        """
        return nsid in self.dulbe

    @property
    def aec(self) -> int:
        return self.values[FID_ASYNC_EVENT]

    @property
    def copy_formats_enabled(self) -> int:
        """Host Behavior Support CDFE (bytes 5:4): bit n set enables Copy descriptor format
        n (only 2h and 3h need enabling)."""
        return int(_CDFE.unpack_from(self.host_behavior, 4)[0])

    @property
    def write_cache(self) -> bool:
        return bool(self.values[FID_VWC] & 1)

    @property
    def kato_ms(self) -> int:
        return self.values[FID_KATO]

    def timestamp_now(self) -> int:
        return (self.timestamp_base + int((time.monotonic() - self.timestamp_set_at) * 1000)) & (2**48 - 1)

    # -- Get Features --------------------------------------------------------------------------
    def get(self, req: Request) -> tuple[int, bytes | None]:
        """Execute Get Features; returns (DW0, data to return to the host or None).

        :raises NvmeStatusError: for an unsupported FID, a bad select or field.
        """
        fid = req.cdw10 & 0xFF
        sel = (req.cdw10 >> 8) & 0x7
        if fid not in FID_NAMES:
            raise NvmeStatusError(Status.INVALID_FIELD, f"feature {fid:#x} is not supported",
                                  param_offset=_OFF_CDW10)
        if sel > SEL_CAPS:
            raise NvmeStatusError(Status.INVALID_FIELD, f"select {sel} is reserved", param_offset=_OFF_CDW10 + 1)
        if fid in _PER_NS:
            self._check_ns(req, allow_broadcast=False)
        if fid == FID_EG_EVENT_CONFIG:
            self.ctrl.endurance.check_id(req.cdw11 & 0xFFFF)
        if sel == SEL_CAPS:
            caps = CAP_CHANGEABLE | (CAP_NS if fid in _PER_NS else 0)
            return caps, None
        default = sel != SEL_CURRENT
        ctrl = self.ctrl
        if fid == FID_TEMP_THRESHOLD:
            tmpsel, thsel = self._temp_select(req.cdw11, setting=False)
            if default:
                return (ctrl.cfg.warning_temp if thsel == 0 else 0), None
            return (self.temp_over if thsel == 0 else self.temp_under), None
        if fid == FID_ERROR_RECOVERY:
            if default:
                return 0, None
            return self.tler.get(req.nsid, 0) | (ERR_REC_DULBE if req.nsid in self.dulbe else 0), None
        if fid == FID_IRQ_CONFIG:
            iv = req.cdw11 & 0xFFFF
            self._check_vector(iv)
            # vector 0 is the admin completion queue's, which coalescing never applies to
            # (the interrupts never aggregate it): CD reads 1 there, whatever was set
            cd = iv == ADMIN_VECTOR or (not default and ctrl.interrupts.vector_cd(iv))
            return iv | (int(cd) << 16), None
        if fid == FID_TIMESTAMP:
            if default:
                return 0, bytes(8)
            ts = self.timestamp_now()
            attrs = (self.timestamp_origin & 7) << 1  # Synch = 0: counted continuously
            return 0, struct.pack("<Q", ts | (attrs << 48))
        if fid == FID_HOST_BEHAVIOR:
            return 0, bytes(512) if default else self.host_behavior
        if fid == FID_EG_EVENT_CONFIG:
            return ctrl.endurance.get_feature(req.cdw11, default=default), None
        values = self.defaults() if default else self.values
        return values[fid], None

    # -- Set Features ---------------------------------------------------------------------------
    def set(self, req: Request, data: bytes | None = None) -> int:
        """Execute Set Features; ``data`` is the host buffer for 0Eh / 16h (read by the caller).

        :returns: DW0 of the completion.
        :raises NvmeStatusError: as the spec says for each feature.
        """
        fid = req.cdw10 & 0xFF
        if fid not in FID_NAMES:
            raise NvmeStatusError(Status.INVALID_FIELD, f"feature {fid:#x} is not supported",
                                  param_offset=_OFF_CDW10)
        if req.cdw10 & (1 << 31):
            raise NvmeStatusError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x} is not saveable",
                                  param_offset=_OFF_CDW10 + 3)
        if fid in _PER_NS:
            nsids = self._check_ns(req, allow_broadcast=True)
        elif req.nsid not in (0, _BROADCAST):
            raise NvmeStatusError(Status.FEATURE_NOT_PER_NS, f"feature {fid:#x} is not namespace specific",
                                  param_offset=_OFF_NSID)
        ctrl = self.ctrl
        v = req.cdw11
        if fid == FID_ARBITRATION:
            self.values[fid] = v & 0xFFFFFF07
            return 0
        if fid == FID_POWER_MGMT:
            if v & 0x1F:
                raise NvmeStatusError(Status.INVALID_FIELD, f"power state {v & 0x1F} does not exist",
                                      param_offset=_OFF_CDW11)
            self.values[fid] = v & 0xE0
            return 0
        if fid == FID_TEMP_THRESHOLD:
            tmpsel, thsel = self._temp_select(v, setting=True)
            if thsel == 0:
                self.temp_over = v & 0xFFFF
            else:
                self.temp_under = v & 0xFFFF
            ctrl.check_temperature()
            return 0
        if fid == FID_ERROR_RECOVERY:
            dulbe = bool(v & ERR_REC_DULBE)
            if dulbe and req.nsid != _BROADCAST and not ctrl.namespaces[req.nsid].dae:
                raise NvmeStatusError(Status.INVALID_FIELD,
                                      f"DULBE: namespace {req.nsid} cannot tell unwritten blocks (NSFEAT.DAE is clear)",
                                      param_offset=_OFF_CDW11 + 2)
            for nsid in nsids:
                self.tler[nsid] = v & ERR_REC_TLER
                if dulbe and ctrl.namespaces[nsid].dae:
                    self.dulbe.add(nsid)
                else:
                    self.dulbe.discard(nsid)
            return 0
        if fid == FID_VWC:
            self.values[fid] = v & 1
            return 0
        if fid == FID_WRITE_ATOMICITY:
            self.values[fid] = v & 1
            self._push_dn()
            return 0
        if fid == FID_NUM_QUEUES:
            nsqr, ncqr = v & 0xFFFF, v >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                raise NvmeStatusError(Status.INVALID_FIELD, "65536 queues cannot be requested",
                                      param_offset=_OFF_CDW11)
            if ctrl.io_queues_exist():
                raise NvmeStatusError(Status.CMD_SEQ_ERROR, "I/O queues already exist")
            if self.nq_allocated:  # "the value allocated shall not change between resets"
                return self.values[fid]
            self.nq_allocated = True
            maxq = ctrl.io_queue_limit
            self.nsq = min(nsqr + 1, maxq)
            self.ncq = min(ncqr + 1, maxq)
            val = (self.nsq - 1) | ((self.ncq - 1) << 16)
            self.values[fid] = val
            return val
        if fid == FID_IRQ_COALESCING:
            self.values[fid] = v & 0xFFFF
            self._push_coalescing()
            return 0
        if fid == FID_IRQ_CONFIG:
            iv = v & 0xFFFF
            self._check_vector(iv)
            if iv != ADMIN_VECTOR:  # (the admin vector's CD is fixed at 1: nothing to keep)
                ctrl.interrupts.set_vector_cd(iv, bool(v & (1 << 16)))
            return 0
        if fid == FID_ASYNC_EVENT:
            self.values[fid] = v & AEC_SUPPORTED
            ctrl.check_temperature()
            return 0
        if fid == FID_TIMESTAMP:
            assert data is not None
            (ts,) = struct.unpack_from("<Q", data)
            self.timestamp_base = ts & (2**48 - 1)
            self.timestamp_set_at = time.monotonic()
            self.timestamp_origin = 1
            return 0
        if fid == FID_KATO:
            kato = v
            if kato % 100:
                kato += 100 - kato % 100  # KAS granularity
            if kato > 0xFFFFFFFF:  # rounding up would not fit: the largest multiple that does
                kato = 0xFFFFFFFF // 100 * 100
            self.values[fid] = kato
            ctrl.keep_alive_changed()
            return 0
        if fid == FID_IOCS_PROFILE:
            if v & 0x1FF:
                raise NvmeStatusError(Status.IOCS_COMBINATION_REJECTED,
                                      f"I/O command set combination {v & 0x1FF} does not exist (CNS 1Ch lists 0)",
                                      param_offset=_OFF_CDW11)
            return 0
        if fid == FID_EG_EVENT_CONFIG:
            ctrl.endurance.set_feature(v)
            return 0
        if fid == FID_HOST_BEHAVIOR:
            assert data is not None
            acre, etdas, lbafee = data[0], data[1], data[2]
            if acre > 1 or etdas > 1 or lbafee > 1:
                raise NvmeStatusError(Status.INVALID_FIELD, "host behavior support: a field is out of range")
            (cdfe,) = _CDFE.unpack_from(data, 4)
            if cdfe & ~CDFE_SUPPORTED:
                raise NvmeStatusError(Status.INVALID_FIELD,
                                      f"host behavior support: CDFE {cdfe:#06x} enables no Copy descriptor format "
                                      f"the controller has (only {CDFE_SUPPORTED:#x})")
            self.host_behavior = bytes(data[:512])
            return 0
        raise NvmeStatusError(Status.INVALID_FIELD, f"feature {fid:#x} is not changeable")  # pragma: no cover

    @staticmethod
    def supported_log() -> bytes:
        """The Feature Identifiers Supported and Effects log page (LID 12h): FSUPP and the
        scope of every supported feature, UDCC for none, CCC for Number of Queues."""
        page = bytearray(1024)
        for fid in FID_NAMES:
            # namespace / endurance group / controller scope
            scope = (1 << 20) if fid in _PER_NS else (1 << 23) if fid in _PER_ENDGRP else (1 << 21)
            ccc = (1 << 4) if fid == FID_NUM_QUEUES else 0
            struct.pack_into("<I", page, 4 * fid, 1 | ccc | scope)
        return bytes(page)

    @staticmethod
    def data_length(fid: int) -> int:
        """Bytes of host data a Set/Get of ``fid`` transfers (0: none)."""
        return {FID_TIMESTAMP: 8, FID_HOST_BEHAVIOR: 512}.get(fid, 0)

    # -- checks --------------------------------------------------------------------------------
    def _check_ns(self, req: Request, *, allow_broadcast: bool) -> list[int]:
        nsid = req.nsid
        ctrl = self.ctrl
        if nsid == _BROADCAST and allow_broadcast:
            return list(ctrl.namespaces)
        if nsid not in ctrl.namespaces:
            raise NvmeStatusError(Status.INVALID_NSID, f"namespace {nsid:#x} is not attached",
                                  param_offset=_OFF_NSID)
        return [nsid]

    def _check_vector(self, iv: int) -> None:
        if iv >= self.ctrl.vector_limit:
            raise NvmeStatusError(Status.INVALID_FIELD, f"interrupt vector {iv} does not exist",
                                  param_offset=_OFF_CDW11)

    @staticmethod
    def _temp_select(v: int, *, setting: bool) -> tuple[int, int]:
        tmpsel = (v >> 16) & 0xF
        thsel = (v >> 20) & 0x3
        if thsel > 1:
            raise NvmeStatusError(Status.INVALID_FIELD, f"threshold type {thsel} is reserved",
                                  param_offset=_OFF_CDW11 + 2)
        if tmpsel not in (0, 0xF) or (tmpsel == 0xF and not setting):
            raise NvmeStatusError(Status.INVALID_FIELD, f"temperature sensor {tmpsel} does not exist",
                                  param_offset=_OFF_CDW11 + 2)
        return tmpsel, thsel
