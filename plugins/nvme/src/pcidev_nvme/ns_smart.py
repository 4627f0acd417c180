"""Per-namespace SMART / Health counters (Identify Controller LPA bit 0).

Get Log Page 02h with the NSID of an attached namespace answers that namespace's
SMART / Health Information log: Data Units Read / Written and Host Read / Write
Commands count the commands on that namespace only; every other field (critical
warning, temperature, spare, busy time, power cycles and hours, unsafe shutdowns,
media errors, error log entries, temperature times) is the controller's, as QEMU
reports it. NSID FFFFFFFFh (or 0h) answers the controller's log; an NSID that is not
attached to the controller fails with Invalid Namespace or Format.

What counts is what the controller's counters count (:class:`~pcidev_nvme.logs.SmartCounters`):
Read, Compare and Verify as reads, Write and the destination of Copy as writes, each
command once, with its data bytes. The namespace counters are the NVM subsystem's: an
SR-IOV primary and its secondary controllers share the namespaces and one
:class:`NamespaceSmart` (the primary's), so a namespace's log counts the commands of
every controller it is attached to. So, counted from the same start, the sum of the
namespaces' counters equals the sum of the controllers' (with one controller: the
controller's log is the sum of its namespaces' logs); a namespace deleted by Namespace
Management takes its counters with it (the controllers' keep them).

:class:`NamespaceSmart` owns the counters; :meth:`NamespaceSmart.snapshot` /
:meth:`NamespaceSmart.restore` carry them (:class:`NamespaceSmartState`, the optional
``ns_smart`` subsection of the ``nvme`` vmstate section, and of the state file, which
keeps them across restarts as it keeps the controller's).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import attrs

from pcidev.vmstate import U32, U64, VarArray, vmstate

__all__ = ["LPA_SMART_PER_NS", "NamespaceSmart", "NamespaceSmartState", "NsSmartEntry", "MAX_ENTRIES"]

#: Identify Controller LPA bit 0: SMART / Health Information log page per namespace
LPA_SMART_PER_NS = 1 << 0
#: most namespaces a snapshot carries (the controller supports at most 1024 NSIDs)
MAX_ENTRIES = 1024


@vmstate("nvme/ns-smart-entry")
@attrs.frozen
class NsSmartEntry:
    """One namespace's counters (data as bytes, as the controller's)."""

    nsid: U32
    bytes_read: U64
    bytes_written: U64
    host_read_commands: U64
    host_write_commands: U64


@vmstate("nvme/ns-smart")
@attrs.frozen
class NamespaceSmartState:
    """The counters of every namespace that has counted something, by ascending NSID."""

    entries: VarArray[NsSmartEntry, MAX_ENTRIES] = ()


_MAX64 = 2**64 - 1


class NamespaceSmart:
    """The per-namespace SMART / Health counters (see the module docstring); thread-safe:
    the data path counts from any thread.

    Each namespace's counters are a list ``[bytes read, bytes written, read commands,
    write commands]``, made at its first count.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[int, list[int]] = {}

    # -- data path -------------------------------------------------------------------------
    def record_read(self, nsid: int, nbytes: int) -> None:
        """Count one read command of ``nbytes`` on namespace ``nsid``."""
        with self._lock:
            c = self._counts.get(nsid)
            if c is None:
                c = self._counts[nsid] = [0, 0, 0, 0]
            c[0] += nbytes
            c[2] += 1

    def record_write(self, nsid: int, nbytes: int) -> None:
        """Count one write command of ``nbytes`` on namespace ``nsid``."""
        with self._lock:
            c = self._counts.get(nsid)
            if c is None:
                c = self._counts[nsid] = [0, 0, 0, 0]
            c[1] += nbytes
            c[3] += 1

    def record_io(self, nsid: int, reads: int, read_bytes: int, writes: int, written_bytes: int) -> None:
        """Count a batch of commands on namespace ``nsid`` at once.

        :param nsid: the namespace.
        :param reads: read commands.
        :param read_bytes: bytes they transferred.
        :param writes: write commands.
        :param written_bytes: bytes they transferred.
        """
        with self._lock:
            c = self._counts.get(nsid)
            if c is None:
                c = self._counts[nsid] = [0, 0, 0, 0]
            c[0] += read_bytes
            c[1] += written_bytes
            c[2] += reads
            c[3] += writes

    # -- namespaces --------------------------------------------------------------------------
    def forget(self, nsid: int) -> None:
        """Namespace ``nsid`` was deleted: its counters go (a new namespace with that NSID
        starts from zero)."""
        with self._lock:
            self._counts.pop(nsid, None)

    def counters(self, nsid: int) -> tuple[int, int, int, int]:
        """(bytes read, bytes written, read commands, write commands) of namespace ``nsid``."""
        with self._lock:
            c = self._counts.get(nsid)
            return (c[0], c[1], c[2], c[3]) if c is not None else (0, 0, 0, 0)

    def totals(self) -> tuple[int, int, int, int]:
        """The sums over every namespace, in the order of :meth:`counters`."""
        with self._lock:
            rows = list(self._counts.values())
        return (sum(r[0] for r in rows), sum(r[1] for r in rows), sum(r[2] for r in rows),
                sum(r[3] for r in rows))

    # -- state -------------------------------------------------------------------------------
    def snapshot(self) -> NamespaceSmartState:
        """The counters now (namespaces that never counted are left out)."""
        with self._lock:
            items = sorted(self._counts.items())
        return NamespaceSmartState(entries=tuple(
            NsSmartEntry(nsid=nsid, bytes_read=min(c[0], _MAX64), bytes_written=min(c[1], _MAX64),
                         host_read_commands=min(c[2], _MAX64), host_write_commands=min(c[3], _MAX64))
            for nsid, c in items[:MAX_ENTRIES]))

    def snapshot_if_any(self) -> NamespaceSmartState | None:
        """:meth:`snapshot`, or None while no namespace has counted anything (the optional
        subsection is then left out of a stream)."""
        st = self.snapshot()
        return st if st.entries else None

    def restore(self, state: NamespaceSmartState | None, keep: Iterable[int] | None = None) -> None:
        """Take the counters of ``state`` (None: a stream or file from before per-namespace
        counting: every namespace starts from zero).

        :param keep: only the entries of these NSIDs (the namespaces that exist); None: all.
        """
        wanted = None if keep is None else set(keep)
        counts: dict[int, list[int]] = {}
        for e in state.entries if state is not None else ():
            if wanted is None or e.nsid in wanted:
                counts[e.nsid] = [e.bytes_read, e.bytes_written, e.host_read_commands, e.host_write_commands]
        with self._lock:
            self._counts = counts

    def check(self, state: NamespaceSmartState, nsids: Iterable[int]) -> str | None:
        """Why ``state`` cannot be taken by a controller whose namespaces are ``nsids``
        (an entry of a namespace that does not exist, an NSID twice), or None."""
        have = set(nsids)
        seen: set[int] = set()
        for e in state.entries:
            if e.nsid not in have:
                return f"SMART counters of namespace {e.nsid}, which does not exist"
            if e.nsid in seen:
                return f"SMART counters of namespace {e.nsid} twice"
            seen.add(e.nsid)
        return None
