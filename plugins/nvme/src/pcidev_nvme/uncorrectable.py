"""Write Uncorrectable (NVM command set opcode 04h): blocks marked invalid.

:class:`Uncorrectable` owns the marks: per namespace, a sorted list of disjoint
ranges of logical blocks. A Write Uncorrectable command marks ``SLBA .. SLBA+NLB``;
until the blocks are written again (Write, Write Zeroes, the destination of a Copy)
or deallocated (Dataset Management, Write Zeroes with DEAC, Format NVM, Sanitize),
a command that reads them (Read, Compare, Verify, the sources of a Copy) fails with
Unrecovered Read Error (02h/81h) and the first marked LBA in its Error Information
entry; the data underneath is kept as it was (a rewrite of part of a marked range
clears only that part).

**Bound.** A migration stream carries at most :data:`MAX_RANGES` ranges, and a write
into the middle of a marked range splits it in two. So the marks are bounded by their
*potential*: a range of *n* blocks can split into at most ceil(*n*/2) ranges, a rewrite
or a deallocation never raises the sum of ceil(*n*/2) over all ranges, and a Write
Uncorrectable that would raise it above :data:`MAX_RANGES` fails with Capacity Exceeded
(nothing is marked). That allows at least 65,536 (up to 131,072) marked blocks.

**Persistence.** The marks of a namespace whose backend is an image file live in a
small JSON sidecar beside it, ``IMAGE.nvme-wu`` (like the identity file
``IMAGE.nvme-ids``), replaced atomically (a unique temporary file, fsync, rename) by
one background writer thread after the marks of that namespace change -- coalesced:
many changes make one write -- and removed when none are left. A Write Uncorrectable
waits for its mark to be on disk before it completes (:meth:`Uncorrectable.sync`);
the writes and deallocations that clear marks do not wait. :meth:`Uncorrectable.flush`
waits for every pending write (a quiesce, a close). A file at that path that this plugin did not
write is never overwritten (one warning; the marks are then kept in memory only),
and nothing is written beside a read-only image. Memory namespaces keep their marks
in memory (they lose their data at a restart anyway).

**Migration.** :meth:`Uncorrectable.snapshot` / :meth:`Uncorrectable.restore` carry
every mark (:class:`UncorrectableState`, the ``nvme/uncorrectable`` vmstate
description, an optional subsection of the ``nvme`` section: written only when some
block is marked).
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterable

import attrs

from pcidev.vmstate import U32, U64, VarArray, vmstate

__all__ = ["Uncorrectable", "UncorrectableState", "WuRange", "SIDECAR_SUFFIX", "MAX_RANGES"]

log = logging.getLogger(__name__)

#: suffix of the sidecar file beside an image
SIDECAR_SUFFIX = ".nvme-wu"
#: most marked ranges over all namespaces (a migration stream carries at most this); also
#: the bound of the ranges' potential (see the module docstring)
MAX_RANGES = 65536
#: seconds a Write Uncorrectable waits for its mark to reach the sidecar
SYNC_TIMEOUT = 30.0
_FORMAT = "pcidev-nvme-write-uncorrectable"


@vmstate("nvme/wu-range")
@attrs.frozen
class WuRange:
    """Blocks ``slba .. slba + nlb - 1`` of namespace ``nsid`` are marked uncorrectable."""

    nsid: U32
    slba: U64
    nlb: U64


@vmstate("nvme/uncorrectable")
@attrs.frozen
class UncorrectableState:
    """Every marked range, by namespace and LBA."""

    ranges: VarArray[WuRange, MAX_RANGES] = ()


def _potential(n: int) -> int:
    """The most ranges a range of ``n`` blocks can split into (every other block rewritten)."""
    return (n + 1) // 2


class _SidecarWriter:
    """One background thread that writes the sidecars of changed namespaces, coalesced.

    :param write: ``write(nsid)`` writes the current sidecar of ``nsid``.
    """

    def __init__(self, write: Callable[[int], None]) -> None:
        self._write = write
        self._cond = threading.Condition()
        self._dirty: set[int] = set()
        #: nsid -> changes asked for / changes on disk (a change's number)
        self._asked: dict[int, int] = {}
        self._written: dict[int, int] = {}
        self._thread: threading.Thread | None = None

    def changed(self, nsids: Iterable[int]) -> None:
        """The marks of ``nsids`` changed: write their sidecars soon."""
        with self._cond:
            for nsid in nsids:
                self._asked[nsid] = self._asked.get(nsid, 0) + 1
                self._dirty.add(nsid)
            if self._dirty and self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nvme-wu-sidecar", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._dirty:
                    self._thread = None
                    self._cond.notify_all()
                    return
                nsid = min(self._dirty)
                self._dirty.discard(nsid)
                seq = self._asked[nsid]
            try:
                self._write(nsid)
            except Exception:  # never lose the thread (and the waiters) to a bug
                log.exception("writing the Write Uncorrectable sidecar of namespace %d failed", nsid)
            with self._cond:
                self._written[nsid] = max(self._written.get(nsid, 0), seq)
                self._cond.notify_all()

    def wait(self, nsid: int | None = None, timeout: float = SYNC_TIMEOUT) -> bool:
        """Wait until the changes of ``nsid`` so far (None: of every namespace) are written."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if nsid is None:
                def done() -> bool:
                    return self._thread is None and not self._dirty
            else:
                want = self._asked.get(nsid, 0)

                def done() -> bool:
                    return self._written.get(nsid, 0) >= want
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True


class Uncorrectable:
    """The Write Uncorrectable marks of one controller's namespaces (see the module docstring).

    :param sidecar: ``sidecar(nsid)`` is the path of the sidecar file of namespace
        ``nsid`` (None: memory only).
    """

    def __init__(self, sidecar: Callable[[int], str | None] | None = None) -> None:
        self._sidecar = sidecar or (lambda nsid: None)
        self._lock = threading.Lock()
        #: nsid -> (starts, ends): disjoint [start, end) LBA ranges, sorted
        self._ranges: dict[int, tuple[list[int], list[int]]] = {}
        #: the sum of :func:`_potential` over every range (bounded by MAX_RANGES)
        self._potential = 0
        #: sidecar paths found to be somebody else's file: never written
        self._foreign: set[str] = set()
        #: NSIDs whose sidecars a load's restore changed, rewritten once it is accepted
        #: (while ``_deferring``: :meth:`defer_writes` ... :meth:`release_deferred`)
        self._deferred: set[int] = set()
        self._deferring = False
        self._writer = _SidecarWriter(self._write_sidecar)
        #: any block marked at all (the data path's one cheap test)
        self.active = False

    # -- queries --------------------------------------------------------------------------
    def first_marked(self, nsid: int, slba: int, nlb: int) -> int | None:
        """The first marked LBA in ``slba .. slba + nlb - 1`` of ``nsid``, or None."""
        if not self.active:
            return None
        with self._lock:
            r = self._ranges.get(nsid)
            if r is None:
                return None
            starts, ends = r
            end = slba + nlb
            i = bisect.bisect_right(ends, slba)
            if i < len(starts) and starts[i] < end:
                return max(starts[i], slba)
            return None

    def ranges(self, nsid: int) -> list[tuple[int, int]]:
        """The marked ranges of ``nsid`` as (SLBA, NLB), ascending."""
        with self._lock:
            r = self._ranges.get(nsid)
            return [] if r is None else [(s, e - s) for s, e in zip(*r, strict=True)]

    def count(self) -> int:
        """Marked ranges over all namespaces."""
        with self._lock:
            return sum(len(s) for s, _ in self._ranges.values())

    # -- changes -------------------------------------------------------------------------------
    def mark(self, nsid: int, slba: int, nlb: int) -> bool:
        """Mark ``nlb`` blocks from ``slba``; returns False (nothing marked) if the marks'
        potential would exceed :data:`MAX_RANGES` (see the module docstring)."""
        with self._lock:
            if not self._mark_locked(nsid, slba, nlb, bounded=True):
                return False
        self._writer.changed((nsid,))
        return True

    def _mark_locked(self, nsid: int, slba: int, nlb: int, *, bounded: bool) -> bool:
        starts, ends = self._ranges.setdefault(nsid, ([], []))
        end = slba + nlb
        # ranges touching [slba, end) merge with it
        i = bisect.bisect_left(ends, slba)
        j = bisect.bisect_right(starts, end)
        if i < j:
            slba = min(slba, starts[i])
            end = max(end, ends[j - 1])
        potential = (self._potential - sum(_potential(e - s) for s, e in zip(starts[i:j], ends[i:j], strict=True))
                     + _potential(end - slba))
        if bounded and potential > MAX_RANGES:
            if not starts:
                del self._ranges[nsid]
            return False
        starts[i:j] = [slba]
        ends[i:j] = [end]
        self._potential = potential
        self.active = True
        return True

    def clear(self, nsid: int, slba: int, nlb: int) -> None:
        """The blocks were written or deallocated: unmark ``slba .. slba + nlb - 1``."""
        if not self.active:
            return
        with self._lock:
            if not self._clear_locked(nsid, slba, nlb):
                return
        self._writer.changed((nsid,))

    def _clear_locked(self, nsid: int, slba: int, nlb: int) -> bool:
        r = self._ranges.get(nsid)
        if r is None:
            return False
        starts, ends = r
        end = slba + nlb
        i = bisect.bisect_right(ends, slba)
        j = bisect.bisect_left(starts, end)
        if i >= j:
            return False
        new_s: list[int] = []
        new_e: list[int] = []
        if starts[i] < slba:
            new_s.append(starts[i])
            new_e.append(slba)
        if ends[j - 1] > end:
            new_s.append(end)
            new_e.append(ends[j - 1])
        if len(new_s) - (j - i) + sum(len(s) for s, _ in self._ranges.values()) > MAX_RANGES:
            # (only after restoring marks whose potential was over the bound): the
            # range stays whole -- these blocks read as an error, never as stale data
            log.warning("namespace %d: too many uncorrectable ranges to unmark %d+%d", nsid, slba, nlb)
            return False
        self._potential += (sum(_potential(e - s) for s, e in zip(new_s, new_e, strict=True))
                            - sum(_potential(e - s) for s, e in zip(starts[i:j], ends[i:j], strict=True)))
        starts[i:j] = new_s
        ends[i:j] = new_e
        if not starts:
            del self._ranges[nsid]
        self.active = bool(self._ranges)
        return True

    def clear_namespace(self, nsid: int) -> None:
        """Every block of ``nsid`` was erased (Format NVM, Sanitize) or it is gone."""
        with self._lock:
            r = self._ranges.pop(nsid, None)
            if r is None:
                return
            self._potential -= sum(_potential(e - s) for s, e in zip(*r, strict=True))
            self.active = bool(self._ranges)
        self._writer.changed((nsid,))

    # -- persistence -----------------------------------------------------------------------------
    def sync(self, nsid: int) -> None:
        """Wait until the changes to the marks of ``nsid`` so far are in its sidecar (a
        namespace without one: at once)."""
        if self._sidecar(nsid) and not self._writer.wait(nsid):
            log.warning("the Write Uncorrectable sidecar of namespace %d was not written within %g s",
                        nsid, SYNC_TIMEOUT)

    def flush(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Wait until every sidecar write asked for is done; returns whether it finished."""
        return self._writer.wait(None, timeout)

    def load(self, nsid: int) -> None:
        """Take the marks the sidecar of ``nsid`` holds (at power-on). A sidecar that is
        not this plugin's is left alone and never written (one warning)."""
        path = self._sidecar(nsid)
        if not path:
            return
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            self._not_ours(path, str(exc))
            return
        if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("ranges"), list):
            self._not_ours(path, "not a Write Uncorrectable sidecar of this plugin")
            return
        dropped = 0
        with self._lock:  # one bulk insert; the file already holds what it says
            for item in data["ranges"]:
                if (isinstance(item, list) and len(item) == 2 and all(isinstance(v, int) and v >= 0 for v in item)
                        and item[1] > 0):
                    if not self._mark_locked(nsid, item[0], item[1], bounded=True):
                        dropped += 1
        if dropped:
            log.warning("%s: %d ranges beyond the bound of %d were not taken", path, dropped, MAX_RANGES)
            self._writer.changed((nsid,))

    def _not_ours(self, path: str, why: str) -> None:
        self._foreign.add(path)
        log.warning("%s is not usable as a Write Uncorrectable sidecar (%s): it is left as it is and the marks "
                    "of its namespace are kept in memory only", path, why)

    def _write_sidecar(self, nsid: int) -> None:
        """Replace the sidecar of ``nsid`` by the marks now (only the writer thread calls this)."""
        path = self._sidecar(nsid)
        if not path or path in self._foreign:
            return
        ranges = self.ranges(nsid)
        tmp: str | None = None
        try:
            if not ranges:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                return
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                                       dir=os.path.dirname(path) or ".")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"format": _FORMAT, "version": 1, "nsid": nsid, "ranges": [list(r) for r in ranges]}, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            tmp = None
        except OSError as exc:
            log.warning("cannot write the Write Uncorrectable sidecar %s: %s", path, exc)
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    # -- state -------------------------------------------------------------------------------
    def snapshot(self) -> UncorrectableState | None:
        """The marks, or None when no block is marked (nothing to carry)."""
        with self._lock:
            out = [WuRange(nsid=n, slba=s, nlb=e - s) for n in sorted(self._ranges)
                   for s, e in zip(*self._ranges[n], strict=True)]
        return UncorrectableState(ranges=tuple(out)) if out else None

    def restore(self, state: UncorrectableState | None) -> None:
        """Take the marks of ``state`` (None: no block is marked); the sidecars are
        rewritten in the background (after the restore, never inside it), or once the load
        is accepted after :meth:`defer_writes`."""
        with self._lock:
            old = set(self._ranges)
            self._ranges = {}
            self._potential = 0
            for r in () if state is None else state.ranges:  # (a valid source's marks: all taken)
                self._mark_locked(r.nsid, r.slba, r.nlb, bounded=False)
            self.active = bool(self._ranges)
            changed = old | set(self._ranges)
            if self._deferring:
                self._deferred |= changed
                return
        self._writer.changed(sorted(changed))

    def defer_writes(self) -> None:
        """A migration's load restores the marks: the sidecars its restores change are
        rewritten only once it is accepted (:meth:`release_deferred`), nothing is written
        beside the images before."""
        with self._lock:
            self._deferring = True

    def release_deferred(self) -> None:
        """The loads are accepted (the controller resumes): rewrite the sidecars their
        restores changed (in the background); restores write at once again."""
        with self._lock:
            pending, self._deferred = self._deferred, set()
            self._deferring = False
        if pending:
            self._writer.changed(sorted(pending))
