"""Write Uncorrectable (NVM command set opcode 04h): blocks marked invalid.

:class:`Uncorrectable` owns the marks: per namespace, a sorted list of disjoint
ranges of logical blocks. A Write Uncorrectable command marks ``SLBA .. SLBA+NLB``;
until the blocks are written again (Write, Write Zeroes, the destination of a Copy)
or deallocated (Dataset Management, Write Zeroes with DEAC, Format NVM, Sanitize),
a command that reads them (Read, Compare, Verify, the sources of a Copy) fails with
Unrecovered Read Error (02h/81h) and the first marked LBA in its Error Information
entry; the data underneath is kept as it was (a rewrite of part of a marked range
clears only that part).

**Persistence.** The marks of a namespace whose backend is an image file live in a
small JSON sidecar beside it, ``IMAGE.nvme-wu`` (like the identity file
``IMAGE.nvme-ids``), written atomically each time the marks of that namespace
change and removed when none are left. A file at that path that this plugin did not
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
import threading
from collections.abc import Callable

import attrs

from pcidev.vmstate import U32, U64, VarArray, vmstate

__all__ = ["Uncorrectable", "UncorrectableState", "WuRange", "SIDECAR_SUFFIX", "MAX_RANGES"]

log = logging.getLogger(__name__)

#: suffix of the sidecar file beside an image
SIDECAR_SUFFIX = ".nvme-wu"
#: most marked ranges kept over all namespaces (a migration stream carries at most this)
MAX_RANGES = 65536
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
        #: sidecar paths found to be somebody else's file: never written
        self._foreign: set[str] = set()
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
        """Mark ``nlb`` blocks from ``slba``; returns False if the table is full (nothing marked)."""
        with self._lock:
            starts, ends = self._ranges.setdefault(nsid, ([], []))
            end = slba + nlb
            # ranges touching [slba, end) merge with it
            i = bisect.bisect_left(ends, slba)
            j = bisect.bisect_right(starts, end)
            if i < j:
                slba = min(slba, starts[i])
                end = max(end, ends[j - 1])
            elif sum(len(s) for s, _ in self._ranges.values()) >= MAX_RANGES:
                return False
            starts[i:j] = [slba]
            ends[i:j] = [end]
            self.active = True
        self._persist(nsid)
        return True

    def clear(self, nsid: int, slba: int, nlb: int) -> None:
        """The blocks were written or deallocated: unmark ``slba .. slba + nlb - 1``."""
        if not self.active:
            return
        with self._lock:
            if not self._clear_locked(nsid, slba, nlb):
                return
        self._persist(nsid)

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
        starts[i:j] = new_s
        ends[i:j] = new_e
        if not starts:
            del self._ranges[nsid]
        self.active = bool(self._ranges)
        return True

    def clear_namespace(self, nsid: int) -> None:
        """Every block of ``nsid`` was erased (Format NVM, Sanitize) or it is gone."""
        with self._lock:
            if self._ranges.pop(nsid, None) is None:
                return
            self.active = bool(self._ranges)
        self._persist(nsid)

    # -- persistence -----------------------------------------------------------------------------
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
        for item in data["ranges"]:
            if (isinstance(item, list) and len(item) == 2 and all(isinstance(v, int) and v >= 0 for v in item)
                    and item[1] > 0):
                self.mark(nsid, item[0], item[1])

    def _not_ours(self, path: str, why: str) -> None:
        self._foreign.add(path)
        log.warning("%s is not usable as a Write Uncorrectable sidecar (%s): it is left as it is and the marks "
                    "of its namespace are kept in memory only", path, why)

    def _persist(self, nsid: int) -> None:
        path = self._sidecar(nsid)
        if not path or path in self._foreign:
            return
        ranges = self.ranges(nsid)
        try:
            if not ranges:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                return
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": _FORMAT, "version": 1, "nsid": nsid, "ranges": [list(r) for r in ranges]}, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write the Write Uncorrectable sidecar %s: %s", path, exc)

    # -- state -------------------------------------------------------------------------------
    def snapshot(self) -> UncorrectableState | None:
        """The marks, or None when no block is marked (nothing to carry)."""
        with self._lock:
            out = [WuRange(nsid=n, slba=s, nlb=e - s) for n in sorted(self._ranges)
                   for s, e in zip(*self._ranges[n], strict=True)]
        return UncorrectableState(ranges=tuple(out)) if out else None

    def restore(self, state: UncorrectableState | None) -> None:
        """Take the marks of ``state`` (None: no block is marked); sidecars are rewritten."""
        with self._lock:
            old = set(self._ranges)
            self._ranges = {}
            self.active = False
        for r in () if state is None else state.ranges:
            self.mark(r.nsid, r.slba, r.nlb)
        for nsid in old - set(self._ranges):
            self._persist(nsid)
