"""Endurance Groups: the controller's NVM is one endurance group, identifier 1.

What the controller reports of it (NVMe Base 2.0, 3.2.3 and the figures named below):

* Identify Controller CTRATT bit 4 (Endurance Groups supported) and ENDGIDMAX = 1;
  Identify Namespace ENDGID = 1 for every namespace (:data:`ENDGID`);
* Identify CNS 19h, the Endurance Group List (:func:`endurance_group_list`): group 1 when
  CDW11 ENDGID is 0 or 1, an empty list above;
* Get Log Page 09h, Endurance Group Information (LSI = the group's identifier; any other
  identifier: Invalid Field in Command), built by :meth:`EnduranceGroup.information_page`
  from the SMART / Health counters of the NVM subsystem's controllers
  (:class:`~pcidev_nvme.logs.SmartCounters`, summed by :class:`MediaTotals`; those of a
  secondary controller whose VF was disabled stay counted, :meth:`EnduranceGroup.retire`):
  Data Units Read / Written and Media Units Written count bytes in billions (a value of 1
  is 1,000,000,000 bytes), rounded up -- unlike the SMART log's Data Units (thousands of
  512-byte units); Media Units Written equals Data Units Written (the media is written as
  the host writes); with one controller, Host Read / Write Commands and Media and Data
  Integrity Errors equal the SMART log's; Available Spare, its threshold and Percentage
  Used are the SMART log's (100, 10, 0); Total / Unallocated Endurance Group Capacity
  are TNVMCAP / UNVMCAP; the critical
  warning is the SMART critical warning's bits 0, 2 and 3 (spare, reliability, read-only),
  which the SMART log's Endurance Group Critical Warning Summary (byte 6) repeats;
* Set / Get Features 18h, Endurance Group Event Configuration (CDW11 15:0 ENDGID, 23:16
  EGCW; any ENDGID but 1: Invalid Field in Command): the critical warnings that add the
  group to the Endurance Group Event Aggregate log;
* Get Log Page 0Fh, Endurance Group Event Aggregate (:meth:`EnduranceGroup.aggregate_page`):
  the number of entries (u64) and the groups (u16 each) with a critical warning enabled
  by feature 18h that appeared since the log was last read with RAE cleared; a
  Notice (type 2h, information 06h, log page 0Fh) asynchronous event is posted for it
  when the Asynchronous Event Configuration enables it (bit 14; OAES bit 14).

A warning is reported once and again only after it cleared (as the SMART critical
warnings are). Feature 18h has Endurance Group scope: with SR-IOV the secondary
controllers read and set the primary's value (:meth:`EnduranceGroup.follow`), and a
warning appearing on any controller of the subsystem is checked by every live one
(each keeps its own aggregate log and posts its own notice). A reset of the primary
controller sets it back to its default (no warning enabled; none is saveable), a
secondary's reset leaves it.

:class:`EnduranceGroup` owns the feature value, the aggregate log's contents and the
warnings reported, and the counters of the secondary controllers that are gone;
:meth:`EnduranceGroup.snapshot` / :meth:`EnduranceGroup.restore` carry them
(:class:`EnduranceState`, the optional ``endurance`` subsection of the ``nvme`` vmstate
section). The live controllers' counters are their SMART logs' and migrate with them.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterable

import attrs

from pcidev.vmstate import U8, U64, Bool, vmstate
from pcidev_nvme.aer import AER_NOTICE, AsyncEvents
from pcidev_nvme.logs import SmartCounters
from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["ENDGID", "ENDGIDMAX", "CTRATT_EGS", "OAES_EG_EVENT", "AEC_EG_EVENT", "LID_ENDURANCE_GROUP",
           "LID_EG_EVENT_AGGREGATE", "FID_EG_EVENT_CONFIG", "INFO_EG_EVENT", "EG_WARNINGS", "EnduranceState",
           "EnduranceGroup", "MediaTotals", "endurance_group_list"]

#: the one endurance group's identifier (Identify Namespace ENDGID of every namespace)
ENDGID = 1
#: Identify Controller ENDGIDMAX
ENDGIDMAX = 1
#: Identify Controller CTRATT bit 4: Endurance Groups supported
CTRATT_EGS = 1 << 4
#: OAES / AEC bit 14: Endurance Group Event Aggregate Log Change notices
OAES_EG_EVENT = 1 << 14
AEC_EG_EVENT = 1 << 14
#: Endurance Group Information log page
LID_ENDURANCE_GROUP = 0x09
#: Endurance Group Event Aggregate log page
LID_EG_EVENT_AGGREGATE = 0x0F
#: Endurance Group Event Configuration feature
FID_EG_EVENT_CONFIG = 0x18
#: Notice information: Endurance Group Event Aggregate Log Page Change
INFO_EG_EVENT = 0x06
#: critical warning bits an endurance group has (``nvme_eg_critical_warning_flags``):
#: available spare below threshold (0), reliability degraded (2), read-only (3)
EG_WARNINGS = (1 << 0) | (1 << 2) | (1 << 3)

_INFO_SIZE = 512
_AGGREGATE_SIZE = 512
_OFF_CDW11 = 44


def _units(nbytes: int) -> int:
    """Billions of bytes, rounded up (log 09h's Data and Media Units: the Endurance Group
    Information log page figure; not the SMART log's unit)."""
    return -(-nbytes // 1_000_000_000)


def endurance_group_list(above: int) -> bytes:
    """Identify CNS 19h: the Endurance Group List of the identifiers greater than or equal
    to ``above`` (CDW11 15:0): a count (u16), then the identifiers (u16), 4096 bytes."""
    ids = [ENDGID] if above <= ENDGID else []
    return struct.pack(f"<H{len(ids)}H", len(ids), *ids).ljust(4096, b"\0")


@vmstate("nvme/media-totals")
@attrs.frozen
class MediaTotals:
    """What the endurance group's counters are made of: bytes read and written, host read
    and write commands, media and data integrity errors, Error Information log entries."""

    bytes_read: U64 = 0
    bytes_written: U64 = 0
    host_reads: U64 = 0
    host_writes: U64 = 0
    media_errors: U64 = 0
    error_entries: U64 = 0

    def __add__(self, other: MediaTotals) -> MediaTotals:
        return MediaTotals(*(min(a + b, 2**64 - 1) for a, b in zip(attrs.astuple(self), attrs.astuple(other),
                                                                   strict=True)))

    @classmethod
    def of(cls, smart: SmartCounters, error_entries: int) -> MediaTotals:
        """The totals of one controller: its SMART counters and its error count."""
        written, read, media_errors, _unsafe = smart.media_totals()
        return cls(read, written, smart.host_read_commands, smart.host_write_commands, media_errors, error_entries)


class _EventConfig:
    """Feature 18h's value, one cell shared by the subsystem's controllers."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@vmstate("nvme/endurance")
@attrs.frozen
class EnduranceState:
    """Feature 18h of group 1 (EGCW), whether group 1 is in the Endurance Group Event
    Aggregate log, the critical warnings already reported, and the counters of secondary
    controllers that are gone (their VF was disabled)."""

    event_config: U8
    pending: Bool
    reported: U8
    retired: MediaTotals


class EnduranceGroup:
    """The endurance group as one controller reports it (see the module docstring).

    :param aer: the controller's asynchronous events.
    :param counters: the SMART counters of the NVM subsystem's controllers (their injected
        critical warnings are the group's).
    :param totals: the group's :class:`MediaTotals` (the subsystem's controllers', and
        those retired, :meth:`retire`, on the primary controller).
    :param capacity: (total, unallocated) NVM capacity in bytes.
    :param aec: the current Asynchronous Event Configuration (feature 0Bh).
    """

    def __init__(self, aer: AsyncEvents, counters: Callable[[], Iterable[SmartCounters]],
                 totals: Callable[[], MediaTotals], capacity: Callable[[], tuple[int, int]],
                 aec: Callable[[], int], changed: Callable[[], None] | None = None) -> None:
        self._aer = aer
        #: after a Set Features 18h: every controller of the subsystem checks (default: this one)
        self._changed = changed if changed is not None else self.check
        self._counters = counters
        self._totals = totals
        self._capacity = capacity
        self._aec = aec
        self._lock = threading.Lock()
        #: feature 18h (the group's: shared with the secondaries, :meth:`follow`)
        self._config = _EventConfig()
        #: a secondary controller's: the primary's group (:meth:`follow`)
        self._subsystem: EnduranceGroup | None = None
        #: the group is in the Endurance Group Event Aggregate log
        self.pending = False
        #: critical warnings reported (again only after they cleared)
        self.reported = 0
        #: the counters of secondary controllers that are gone (their VF was disabled)
        self.retired = MediaTotals()
        #: how many times the group was added to the aggregate log (:meth:`aggregate_clear`)
        self._added = 0

    def follow(self, subsystem: EnduranceGroup) -> None:
        """Make this the group of a secondary controller: feature 18h is ``subsystem``'s
        (Endurance Group scope); the aggregate log and the warnings reported stay this
        controller's own."""
        self._subsystem = subsystem
        self._config = subsystem._config

    @property
    def event_config(self) -> int:
        """Feature 18h: the critical warnings that add the group to the aggregate log."""
        return self._config.value

    @event_config.setter
    def event_config(self, value: int) -> None:
        self._config.value = value

    # -- what the group reports ----------------------------------------------------------------
    def critical_warning(self) -> int:
        """The group's critical warning: bits 0, 2, 3 of the controllers' SMART warnings."""
        cw = 0
        for smart in self._counters():
            cw |= smart.injected_warning
        return cw & EG_WARNINGS

    @staticmethod
    def check_id(endgid: int, *, offset: int = _OFF_CDW11) -> None:
        """Refuse an identifier that is not the group's.

        :param endgid: the identifier the command names.
        :param offset: byte offset of the field in the SQE (Error Information).
        :raises NvmeStatusError: Invalid Field in Command.
        """
        if endgid != ENDGID:
            raise NvmeStatusError(Status.INVALID_FIELD, f"endurance group {endgid} does not exist (only {ENDGID})",
                                  param_offset=offset)

    def information_page(self, endgid: int) -> bytes:
        """The 512-byte Endurance Group Information log page (LID 09h) of group ``endgid``.

        :raises NvmeStatusError: Invalid Field in Command for any group but 1.
        """
        self.check_id(endgid, offset=_OFF_CDW11 + 2)
        t = self._totals()
        total, unallocated = self._capacity()
        buf = bytearray(_INFO_SIZE)
        buf[0] = self.critical_warning()
        buf[3] = 100  # Available Spare (the SMART log's)
        buf[4] = 10  # Available Spare Threshold
        buf[5] = 0  # Percentage Used

        def u128(off: int, v: int) -> None:
            v = min(int(v), 2**128 - 1)
            struct.pack_into("<QQ", buf, off, v & (2**64 - 1), v >> 64)

        # 32: Endurance Estimate 0 (not reported)
        u128(48, _units(t.bytes_read))
        u128(64, _units(t.bytes_written))
        u128(80, _units(t.bytes_written))  # Media Units Written
        u128(96, t.host_reads)
        u128(112, t.host_writes)
        u128(128, t.media_errors)
        u128(144, t.error_entries)
        u128(160, total)
        u128(176, unallocated)
        return bytes(buf)

    def aggregate_page(self, *, clear: bool) -> bytes:
        """The Endurance Group Event Aggregate log page (LID 0Fh), 512 bytes; ``clear``
        (RAE cleared) empties it."""
        page, token = self.aggregate_read()
        if clear:
            self.aggregate_clear(token)
        return page

    def aggregate_read(self) -> tuple[bytes, int]:
        """The Endurance Group Event Aggregate log page and a token naming what it holds:
        :meth:`aggregate_clear` with that token (once the page reached the host, RAE
        cleared) empties the log only of what the host was given."""
        with self._lock:
            ids = [ENDGID] if self.pending else []
            token = self._added
        return struct.pack(f"<Q{len(ids)}H", len(ids), *ids).ljust(_AGGREGATE_SIZE, b"\0"), token

    def aggregate_clear(self, token: int) -> None:
        """Empty the aggregate log read with ``token`` (:meth:`aggregate_read`), unless an
        entry was added since: that one stays for the next read (its notice was posted)."""
        with self._lock:
            if self._added == token:
                self.pending = False

    # -- feature 18h ------------------------------------------------------------------------------
    def get_feature(self, cdw11: int, *, default: bool) -> int:
        """Get Features 18h: DW0 = ENDGID (15:0) | EGCW (23:16).

        :raises NvmeStatusError: Invalid Field in Command for any group but 1.
        """
        endgid = cdw11 & 0xFFFF
        self.check_id(endgid)
        return endgid | ((0 if default else self.event_config) << 16)

    def set_feature(self, cdw11: int) -> None:
        """Set Features 18h: the critical warnings (EGCW, 23:16) that raise an event;
        bits the group does not have are ignored. A warning present and not reported yet
        is reported now.

        :raises NvmeStatusError: Invalid Field in Command for any group but 1.
        """
        self.check_id(cdw11 & 0xFFFF)
        with self._lock:
            self.event_config = (cdw11 >> 16) & EG_WARNINGS
        self._changed()

    # -- events --------------------------------------------------------------------------------------
    def check(self, *, ready: bool = True) -> None:
        """Add the group to the aggregate log (and post a notice if AEC bit 14 is set) for
        each warning that is present, enabled by feature 18h and not reported since it
        last cleared.

        :param ready: whether the controller is ready (events wait until it is).
        """
        cw = self.critical_warning()
        with self._lock:
            self.reported &= cw
            new = cw & ~self.reported & self.event_config if ready else 0
            if not new:
                return
            self.reported |= new
            self.pending = True
            self._added += 1
        if self._aec() & AEC_EG_EVENT:
            self._aer.post(AER_NOTICE, INFO_EG_EVENT, LID_EG_EVENT_AGGREGATE)

    def retire(self, totals: MediaTotals) -> None:
        """Keep counting ``totals`` (a secondary controller's, its VF being disabled)."""
        with self._lock:
            self.retired = self.retired + totals

    def reset(self) -> None:
        """Controller reset: feature 18h back to its default (not by a secondary's reset:
        the value is the group's, the primary's); the warnings present are reported again
        once enabled (the aggregate log keeps its entry until read)."""
        with self._lock:
            if self._subsystem is None:
                self.event_config = 0
            self.reported = 0

    # -- state ------------------------------------------------------------------------------------------
    def snapshot(self) -> EnduranceState | None:
        """The state, or None while it is the default (the stream then has no subsection,
        as before endurance groups)."""
        with self._lock:
            if not (self.event_config or self.pending or self.reported or self.retired != MediaTotals()):
                return None
            return EnduranceState(event_config=self.event_config, pending=self.pending, reported=self.reported,
                                  retired=self.retired)

    def restore(self, state: EnduranceState | None) -> None:
        """Take ``state`` (None, a stream from before endurance groups: the defaults)."""
        with self._lock:
            own = self._subsystem is None  # (a secondary's feature 18h is the primary's, loaded before it)
            if state is None:
                self.pending, self.reported, self.retired = False, 0, MediaTotals()
                if own:
                    self.event_config = 0
                return
            if own:
                self.event_config = state.event_config & EG_WARNINGS
            self.pending = state.pending
            self.reported = state.reported & EG_WARNINGS
            self.retired = state.retired
