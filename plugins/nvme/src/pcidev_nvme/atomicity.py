"""Atomic operations (NVMe Base 2.0, "Atomic Operations"; NVM Command Set 1.0, "Atomic
Operations"): the atomic write units a controller and its namespaces report, the limits in
effect under Write Atomicity Normal (feature 0Ah), and the LBA-range locks that make them
hold.

What is configured
    The controller's AWUN and AWUPF (Identify Controller bytes 526 and 528, 0's based
    counts of logical blocks; ``atomic.awun`` / ``atomic.awupf`` as QEMU names them) apply to
    every namespace. A namespace may report its own (:class:`NamespaceAtomicity`):
    NAWUN and NAWUPF (Identify Namespace bytes 34 and 36, with NSFEAT bit 1, NSABP, set
    when either is non-zero; 0 in one of them means the controller's value applies),
    and atomic boundaries: NABSN and NABSPF (bytes 40 and 44, 0's based sizes, a power of
    two; 0 means no boundaries) starting at LBA NABO (byte 42). ACWU / NACWU stay 0: the
    controller has no fused Compare and Write.

What is in effect (:func:`effective_limits`)
    With Disable Normal (DN, feature 0Ah bit 0) clear, the unit is NAWUN + 1 (or AWUN + 1)
    logical blocks and the boundary NABSN + 1; with DN set the host has said it does not
    need AWUN / NAWUN, and only AWUPF / NAWUPF apply: the unit is NAWUPF + 1 (or AWUPF + 1)
    and the boundary NABSPF + 1. A write of at most the unit that does not cross a boundary
    is atomic (:meth:`AtomicLimits.atomic`).

How it holds (:class:`Atomicity`, :class:`BlockLocks`, :class:`RangeLockTable`)
    With AWUN 0 (the default) every single logical block write is still atomic, and commands
    do run at once (the threads ringing different queues' doorbells, the worker threads,
    the submitting thread's non-blocking page-cache reads). Commands on namespaces whose
    unit is one block keep the fast path and hold :class:`BlockLocks`: a writer the locks
    of the 128 KiB regions it touches (two overlapping writes never run at once: their
    blocks never mix), a reader nothing, re-reading when a writer overlapped it (its
    sequence counts changed): no read returns a block half written, and reads never wait
    for each other. On the submitting thread the locks are only tried; a busy one hands the
    command to a worker (:mod:`pcidev_nvme.io`). Namespaces with metadata hold their own
    :class:`~pcidev_nvme.protected_io.RangeLocks` instead (data and metadata together).

    On a namespace configured with a larger unit (AWUN, AWUPF, NAWUN or NAWUPF non-zero,
    whatever DN says: DN changes the limits reported, never the locking, since the
    namespaces and the lock table are shared by controllers with a DN each), every command that reads or
    changes user data holds a range lock on its blocks while it runs: Read, Compare and
    Verify shared, Write, Write Zeroes and Write Uncorrectable exclusive. Dataset Management
    and Copy, whose ranges are in host memory, claim once they have fetched and checked them
    (:meth:`Atomicity.hold_ranges`): Dataset Management the ranges it deallocates exclusive
    (nothing without AD), Copy each source namespace's ranges shared while it reads them,
    then its destination range exclusive while it writes it, never two claims at once. Overlapping
    commands therefore never run at the same time when one of them writes, so no command
    sees an atomic write half done and two overlapping writes never leave a mix of blocks;
    commands larger than the unit, or across a boundary, are not atomic by the spec but are
    serialised all the same (pcidev never tears one). Non-overlapping commands still run
    in parallel. Such namespaces leave the fast path and take no block locks (the range
    locks cover whole commands). A namespace is guarded by the range lock table or by the
    block locks, never both; a command on one namespace holds one of the two, and a Copy
    takes the block locks of all its block-locked namespaces first (in stripe order), then
    the range claims of the others one at a time, so no holder of a claim ever waits for a
    block lock; the metadata namespaces' range locks come innermost. None is held across a
    migration (a quiesce drains the workers, who hold them).

    Power-fail atomicity (AWUPF) is what the backend gives: the serialisation makes the
    unit atomic to other commands; a crash of the host under a ``file`` image keeps what the
    page cache wrote back, in pages of the file system's size.

Configuration is part of the controller's and the namespaces' identity: the migration
fingerprint carries it (:func:`fingerprint_entry`), and DN travels with the features
(:class:`~pcidev_nvme.features.WriteAtomicityState`), which give it back here
(:meth:`Atomicity.set_dn`) on a reset, a restore and a Set Features.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import attrs

__all__ = ["AtomicLimits", "Atomicity", "BlockLocks", "NamespaceAtomicity", "NO_ATOMICITY", "RangeLockTable",
           "controller_problem", "effective_limits", "fingerprint_entry", "namespace_problem", "NSFEAT_NSABP"]

#: Identify Namespace NSFEAT bit 1 (NSABP, libnvme ``NVME_NS_FEAT_NATOMIC``): NAWUN, NAWUPF and
#: NACWU are defined for this namespace
NSFEAT_NSABP = 1 << 1

#: the largest value of a 16-bit Identify field
_U16_MAX = 0xFFFF

# NVM command set opcodes (as :class:`pcidev_nvme.io.Opcode`, which imports this module)
_WRITE, _READ, _WRITE_UNCORRECTABLE, _COMPARE, _WRITE_ZEROES, _VERIFY = (0x01, 0x02, 0x04, 0x05, 0x08, 0x0C)
_SHARED = frozenset((_READ, _COMPARE, _VERIFY))
_EXCLUSIVE = frozenset((_WRITE, _WRITE_ZEROES, _WRITE_UNCORRECTABLE))


def _power_of_two(n: int) -> bool:
    return n > 0 and not n & (n - 1)


@attrs.frozen
class NamespaceAtomicity:
    """A namespace's own atomicity parameters, as Identify Namespace reports them (0's based
    counts of logical blocks; 0: the controller's value, or no boundary).

    :ivar nawun: Namespace Atomic Write Unit Normal.
    :ivar nawupf: Namespace Atomic Write Unit Power Fail.
    :ivar nabsn: Namespace Atomic Boundary Size Normal (boundary NABSN + 1, a power of two).
    :ivar nabo: Namespace Atomic Boundary Offset: the LBA of the first boundary.
    :ivar nabspf: Namespace Atomic Boundary Size Power Fail.
    """

    nawun: int = 0
    nawupf: int = 0
    nabsn: int = 0
    nabo: int = 0
    nabspf: int = 0

    @property
    def nsabp(self) -> bool:
        """Whether NSFEAT.NSABP is set: the namespace reports its own NAWUN or NAWUPF."""
        return bool(self.nawun or self.nawupf)

    @property
    def configured(self) -> bool:
        """Whether any parameter differs from the default."""
        return self != NO_ATOMICITY

    def identify_fields(self) -> tuple[int, int, int, int, int, int]:
        """NAWUN, NAWUPF, NACWU, NABSN, NABO, NABSPF (Identify Namespace bytes 34..45)."""
        return self.nawun, self.nawupf, 0, self.nabsn, self.nabo, self.nabspf

    def problem(self) -> str | None:
        """Why these parameters contradict each other (None: they do not).

        NAWUPF <= NAWUN; a boundary is a power of two (NABSN + 1, NABSPF + 1) no smaller
        than its unit; NABO is 0 without boundaries and below each boundary size.
        """
        for name in ("nawun", "nawupf", "nabsn", "nabo", "nabspf"):
            value = getattr(self, name)
            if not 0 <= value <= _U16_MAX:
                return f"atomic.{name}={value} must be 0 .. {_U16_MAX}"
        if self.nawun and self.nawupf > self.nawun:
            return f"atomic.nawupf={self.nawupf} exceeds atomic.nawun={self.nawun} (NAWUPF <= NAWUN)"
        for size, unit, what, unit_name in ((self.nabsn, self.nawun, "nabsn", "nawun"),
                                            (self.nabspf, self.nawupf, "nabspf", "nawupf")):
            if size and not _power_of_two(size + 1):
                return f"atomic.{what}={size}: the boundary ({size} + 1 blocks) is not a power of two"
            if size and size < unit:
                return f"atomic.{what}={size} is smaller than atomic.{unit_name}={unit} (a boundary holds the unit)"
        if self.nabo:
            if not (self.nabsn or self.nabspf):
                return f"atomic.nabo={self.nabo} needs a boundary (atomic.nabsn or atomic.nabspf)"
            for size, what in ((self.nabsn, "nabsn"), (self.nabspf, "nabspf")):
                if size and self.nabo > size:
                    return f"atomic.nabo={self.nabo} exceeds atomic.{what}={size}"
        return None


#: a namespace without parameters of its own
NO_ATOMICITY = NamespaceAtomicity()


@attrs.frozen
class AtomicLimits:
    """The atomicity in effect on one namespace.

    :ivar unit: logical blocks a write may have and be atomic (1: single blocks only).
    :ivar boundary: atomic boundary size in logical blocks (0: none).
    :ivar offset: LBA of the first boundary (NABO).
    """

    unit: int
    boundary: int = 0
    offset: int = 0

    def atomic(self, slba: int, nlb: int) -> bool:
        """Whether a write of ``nlb`` blocks at ``slba`` is atomic: at most :attr:`unit`
        blocks and, with boundaries, within one boundary (blocks before NABO are outside
        every boundary: a write there of more than one block is not atomic)."""
        if nlb > self.unit:
            return False
        if nlb <= 1 or not self.boundary:
            return True
        if slba < self.offset:
            return False
        first = (slba - self.offset) // self.boundary
        last = (slba + nlb - 1 - self.offset) // self.boundary
        return first == last


def effective_limits(awun: int, awupf: int, ns: NamespaceAtomicity, dn: bool) -> AtomicLimits:
    """The limits in effect: DN clear, the Normal values (NAWUN or AWUN, NABSN); DN set,
    only the Power Fail ones (NAWUPF or AWUPF, NABSPF).

    :param awun: the controller's AWUN (0's based).
    :param awupf: the controller's AWUPF (0's based).
    :param ns: the namespace's own parameters.
    :param dn: Write Atomicity Normal DN.
    """
    if dn:
        unit, size = (ns.nawupf or awupf), ns.nabspf
    else:
        unit, size = (ns.nawun or awun), ns.nabsn
    return AtomicLimits(unit + 1, size + 1 if size else 0, ns.nabo if size else 0)


def controller_problem(awun: int, awupf: int) -> str | None:
    """Why the controller's AWUN / AWUPF cannot be used (None: they can)."""
    for name, value in (("awun", awun), ("awupf", awupf)):
        if not 0 <= value <= _U16_MAX:
            return f"atomic.{name}={value} must be 0 .. {_U16_MAX}"
    if awupf > awun:
        return f"atomic.awupf={awupf} exceeds atomic.awun={awun} (AWUPF <= AWUN)"
    return None


def namespace_problem(awun: int, awupf: int, ns: NamespaceAtomicity, lba_size: int,
                      mdts_bytes: int | None) -> str | None:
    """Why a namespace's parameters do not fit the controller's (None: they fit).

    A namespace's own unit is no smaller than the controller's (the controller's values are
    the baseline every namespace keeps); the namespace's NAWUPF, or AWUPF, is no larger than
    its NAWUN, or AWUN; no unit is larger than MDTS lets a command transfer (with the
    namespace's block size).

    :param lba_size: the namespace's logical block size in bytes.
    :param mdts_bytes: the controller's largest transfer (None: unlimited).
    """
    problem = ns.problem()
    if problem is not None:
        return problem
    if ns.nawun and ns.nawun < awun:
        return f"atomic.nawun={ns.nawun} is smaller than the controller's atomic.awun={awun}"
    if ns.nawupf and ns.nawupf < awupf:
        return f"atomic.nawupf={ns.nawupf} is smaller than the controller's atomic.awupf={awupf}"
    normal, power_fail = ns.nawun or awun, ns.nawupf or awupf
    if power_fail > normal:
        return f"the power-fail unit ({power_fail} + 1 blocks) exceeds the normal unit ({normal} + 1 blocks)"
    for size, unit, what in ((ns.nabsn, normal, "nabsn"), (ns.nabspf, power_fail, "nabspf")):
        if size and size < unit:
            return f"atomic.{what}={size} is smaller than the atomic write unit in effect ({unit}, 0's based)"
    if mdts_bytes:
        for unit, what in ((normal, "awun/nawun"), (power_fail, "awupf/nawupf")):
            if (unit + 1) * lba_size > mdts_bytes:
                return (f"the atomic write unit {what}={unit} ({(unit + 1) * lba_size} bytes of "
                        f"{lba_size}-byte blocks) exceeds MDTS ({mdts_bytes} bytes)")
    return None


class AtomicNamespace(Protocol):
    """What :class:`Atomicity` reads of a namespace."""

    nsid: int
    atomic: NamespaceAtomicity


class _Claim:
    """Ranges of one namespace one command holds (shared or exclusive)."""

    __slots__ = ("nsid", "ranges", "write")

    def __init__(self, nsid: int, ranges: Sequence[tuple[int, int]], write: bool) -> None:
        self.nsid = nsid
        self.ranges = ranges  # (first LBA, end LBA) pairs
        self.write = write

    def conflicts(self, other: _Claim) -> bool:
        """Whether the two cannot be held at once: same namespace, overlapping ranges, a writer."""
        if self.nsid != other.nsid or not (self.write or other.write):
            return False
        return any(s1 < e2 and s2 < e1 for s1, e1 in self.ranges for s2, e2 in other.ranges)


class RangeLockTable:
    """Readers-writer locks over exact LBA ranges: a claim waits while a claim it overlaps
    is held (and one of them writes), or while an earlier waiting claim it overlaps waits
    (first come, first served: a stream of readers never starves a writer, and since a claim
    only ever waits for older ones, no two wait for each other).

    Shared by the controllers that share the namespaces (an SR-IOV primary and its
    secondaries).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._held: list[_Claim] = []
        self._waiting: list[_Claim] = []
        #: the block locks of the same namespaces (every namespace without a larger unit)
        self.blocks = BlockLocks()

    def acquire(self, nsid: int, ranges: Sequence[tuple[int, int]], *, write: bool) -> _Claim:
        """Take ``(start, end)`` LBA ranges of namespace ``nsid``, waiting as long as needed.

        :returns: the claim to give to :meth:`release`.
        """
        claim = _Claim(nsid, ranges, write)
        with self._cond:
            held, waiting = self._held, self._waiting
            if not waiting and not any(claim.conflicts(h) for h in held):
                held.append(claim)
                return claim
            waiting.append(claim)
            try:
                while True:
                    ahead = waiting[:waiting.index(claim)]
                    if not any(claim.conflicts(h) for h in held) and not any(claim.conflicts(w) for w in ahead):
                        break
                    self._cond.wait()
            finally:
                waiting.remove(claim)
            held.append(claim)
        return claim

    def release(self, claim: _Claim) -> None:
        """Give back what :meth:`acquire` took."""
        with self._cond:
            self._held.remove(claim)
            if self._waiting:
                self._cond.notify_all()

    @property
    def held(self) -> int:
        """Claims held now."""
        return len(self._held)


class BlockLocks:
    """What keeps every logical block whole on namespaces without a larger unit: striped
    writer locks with a sequence count per stripe (a seqlock), so writers exclude each
    other and readers never wait for one another.

    The bytes of a namespace fall in regions of ``1 << region_shift`` bytes (128 KiB: whole
    pages, so a backend that works on pages, a hole punch of the ``mem`` backend, never
    reaches past the regions it holds); region ``r`` of namespace ``nsid`` maps to stripe
    ``(salt(nsid) + r) & (stripes - 1)``. A stripe is a token (a one-item list in
    :attr:`tokens`: ``list.pop`` takes it, ``list.append`` gives it back, each one atomic
    and far cheaper than a :class:`threading.Lock` tried without blocking) and a count in
    :attr:`seqs`; who waits for a token waits on one condition, woken when a token comes
    back while someone waits for it (:attr:`waiting`).

    * A writer (Write, Write Zeroes, Dataset Management, Write Uncorrectable, Copy) holds
      the token of every stripe its blocks touch, taken in ascending index order
      (:meth:`write`; :meth:`try_write` takes all or none without waiting), so two
      writers never wait for each other in a cycle; it adds one to each count when it is
      done, before it gives the tokens back (:meth:`end_write`). Two overlapping writers
      share a stripe: they never run at the same time, so their blocks never mix.
    * A reader (Read, Compare, Verify) takes nothing: it notes the counts (:meth:`seq`:
      None while a token is out), reads, and checks again; if a token went out or a count
      changed, a writer overlapped it and it reads again. After :data:`READ_TRIES` failed
      tries it holds the tokens (:meth:`take`), which a writer then waits for: a stream of
      writers cannot starve a reader.

    A command spanning as many regions as there are stripes takes them all. Commands that
    only share a stripe (another region, or another namespace, mapping to it) wait for,
    or read again after, each other needlessly, never wrongly.

    Shared, like :class:`RangeLockTable`, by the controllers that share the namespaces.

    :param stripes: number of stripes (a power of two).
    :param region_shift: log2 of the bytes of a region.

    :ivar tokens: one list per stripe, holding one item while nobody holds the stripe (the
        I/O fast path indexes them itself).
    :ivar seqs: the sequence counts, one added by every writer when it is done.
    :ivar waiting: per stripe, the threads waiting for its token.
    :ivar mask: ``stripes - 1``.
    :ivar shift: ``region_shift``.
    """

    __slots__ = ("tokens", "seqs", "waiting", "mask", "shift", "_cond")

    def __init__(self, stripes: int = 256, region_shift: int = 17) -> None:
        if not _power_of_two(stripes):
            raise ValueError(f"stripes={stripes} is not a power of two")
        self.tokens: list[list[bool]] = [[True] for _ in range(stripes)]
        self.seqs = [0] * stripes
        self.waiting = [0] * stripes
        self.mask = stripes - 1
        self.shift = region_shift
        self._cond = threading.Condition(threading.Lock())

    @staticmethod
    def salt(nsid: int) -> int:
        """Where namespace ``nsid``'s regions start among the stripes (namespaces spread out)."""
        return (nsid * 0x9E3779B1) >> 8

    def indexes(self, spans: Iterable[tuple[int, int, int]]) -> list[int]:
        """The sorted stripe indexes of ``(nsid, byte offset, byte length)`` spans (empty
        spans have none)."""
        mask, shift = self.mask, self.shift
        out: set[int] = set()
        for nsid, offset, length in spans:
            if length <= 0:
                continue
            first, last = offset >> shift, (offset + length - 1) >> shift
            if last - first >= mask:
                return list(range(mask + 1))
            salt = self.salt(nsid)
            out.update((salt + r) & mask for r in range(first, last + 1))
        return sorted(out)

    def span(self, nsid: int, offset: int, length: int) -> list[int]:
        """The sorted stripe indexes of one span (as :meth:`indexes`, quicker: the regions of
        one span map to consecutive stripes, wrapping around at most once)."""
        if length <= 0:
            return []
        shift, mask = self.shift, self.mask
        first = offset >> shift
        n = ((offset + length - 1) >> shift) - first + 1
        base = (((nsid * 0x9E3779B1) >> 8) + first) & mask  # (salt(nsid), inline)
        if n == 1:
            return [base]
        if n > mask:
            return list(range(mask + 1))
        end = base + n
        if end <= mask + 1:
            return list(range(base, end))
        return [*range(end - mask - 1), *range(base, mask + 1)]

    def seq(self, indexes: Sequence[int]) -> list[int] | None:
        """The counts of ``indexes`` (a reader compares them before and after it reads), or
        None while a token of them is out (a writer at work)."""
        tokens, seqs = self.tokens, self.seqs
        for i in indexes:
            if not tokens[i]:
                return None
        return [seqs[i] for i in indexes]

    def try_write(self, indexes: Sequence[int]) -> bool:
        """Take the tokens of ``indexes`` for a writer without waiting, all or none: whether
        they were taken (then the writer changes data and calls :meth:`end_write`)."""
        tokens = self.tokens
        for k, i in enumerate(indexes):
            try:
                tokens[i].pop()
            except IndexError:
                self.give(indexes[:k])
                return False
        return True

    def write(self, indexes: Sequence[int]) -> None:
        """Take the tokens of ``indexes`` for a writer, waiting as long as needed."""
        self.take(indexes)

    def end_write(self, indexes: Sequence[int]) -> None:
        """The writer is done: one added to the counts, tokens given back."""
        seqs = self.seqs
        for i in indexes:
            seqs[i] += 1
        self.give(indexes)

    def take(self, indexes: Sequence[int]) -> None:
        """Hold the tokens of ``indexes`` (ascending), waiting as long as needed (a writer, or
        a reader that must not be overtaken again: it leaves the counts as they are)."""
        tokens = self.tokens
        for i in indexes:
            try:
                tokens[i].pop()
            except IndexError:
                self._wait(i)

    def _wait(self, i: int) -> None:
        """Wait for the token of stripe ``i`` and take it."""
        token = self.tokens[i]
        with self._cond:
            self.waiting[i] += 1
            try:
                while True:
                    try:
                        token.pop()
                        return
                    except IndexError:
                        self._cond.wait(0.05)  # (woken by give(); the timeout is a safety net)
            finally:
                self.waiting[i] -= 1

    def give(self, indexes: Sequence[int]) -> None:
        """Give back what :meth:`take` (or :meth:`try_write`) took, waking who waits."""
        tokens, waiting = self.tokens, self.waiting
        wake = False
        for i in indexes:
            tokens[i].append(True)
            if waiting[i]:
                wake = True
        if wake:
            self.wake()

    def wake(self) -> None:
        """Wake the threads waiting for a token (one came back)."""
        with self._cond:
            self._cond.notify_all()

    @property
    def held(self) -> int:
        """Stripes held now."""
        return sum(not token for token in self.tokens)


#: how often a reader reads again after a writer overlapped it before it holds the locks
READ_TRIES = 2


class Atomicity:
    """The atomic write limits of one controller and the serialisation that keeps them.

    Owns no migrated state: the configuration is the controller's and the namespaces'
    (the fingerprint compares it), DN belongs to the features, which push it here.

    :param awun: the controller's AWUN (0's based).
    :param awupf: the controller's AWUPF (0's based).
    :param locks: the range lock table (None: one of its own).

    :ivar locks: the :class:`RangeLockTable` commands hold.
    """

    def __init__(self, awun: int = 0, awupf: int = 0, *, locks: RangeLockTable | None = None) -> None:
        self.awun = awun
        self.awupf = awupf
        self.dn = False
        self.locks = locks if locks is not None else RangeLockTable()

    @property
    def blocks(self) -> BlockLocks:
        """The block locks of the lock table (:attr:`locks`), which commands on namespaces
        that do not serialise hold while they move data."""
        return self.locks.blocks

    def set_dn(self, dn: bool) -> None:
        """Write Atomicity Normal changed (Set Features, a reset, a restore): the limits in
        effect follow from now on."""
        self.dn = bool(dn)

    def limits(self, ns: AtomicNamespace) -> AtomicLimits:
        """The limits in effect on ``ns`` (:func:`effective_limits`)."""
        return effective_limits(self.awun, self.awupf, ns.atomic, self.dn)

    def serialises(self, ns: AtomicNamespace) -> bool:
        """Whether commands on ``ns`` hold range locks: a unit of more than one block is configured for it.

        Whatever DN says: DN is one host's statement about what *it* needs and changes only
        the limits Identify and Get Features report; the namespaces and the lock table are
        shared (an SR-IOV primary and its secondaries, each with a DN of its own), and a DN
        changing while commands run must not let locked and unlocked commands mix on one
        namespace. With AWUPF <= AWUN the DN-clear unit is the larger anyway.
        """
        p = ns.atomic
        return bool(p.nawun or self.awun or p.nawupf or self.awupf)

    @contextmanager
    def hold(self, opcode: int, nsid: int, slba: int, nlb: int) -> Iterator[None]:
        """Hold the range lock an I/O command needs while it runs (nothing for a command
        that neither reads nor changes user data).

        :param opcode: the NVM command's opcode.
        :param nsid: its namespace.
        :param slba: its first LBA (Read, Write, Compare, Verify, Write Zeroes, Write
            Uncorrectable).
        :param nlb: its number of blocks (1-based).

        Dataset Management and Copy take nothing here: they claim the ranges they name once
        they have fetched and checked them (:meth:`hold_ranges`).
        """
        if opcode in _SHARED or opcode in _EXCLUSIVE:
            claim = self.locks.acquire(nsid, ((slba, slba + max(nlb, 1)),), write=opcode in _EXCLUSIVE)
        else:
            yield
            return
        try:
            yield
        finally:
            self.locks.release(claim)

    @contextmanager
    def hold_ranges(self, ns: AtomicNamespace, ranges: Sequence[tuple[int, int]], *, write: bool) -> Iterator[None]:
        """Hold ``(first LBA, end LBA)`` ranges of ``ns`` as one claim (shared, or exclusive
        with ``write``) while the body runs: nothing on a namespace that does not serialise
        (:meth:`serialises`) or for no range. A caller holds one such claim at a time (so two
        commands never wait for each other).

        :param ns: the namespace.
        :param ranges: the ranges, in any order (they may overlap).
        :param write: whether the body changes the blocks.
        """
        if not ranges or not self.serialises(ns):
            yield
            return
        claim = self.locks.acquire(ns.nsid, tuple(ranges), write=write)
        try:
            yield
        finally:
            self.locks.release(claim)


def fingerprint_entry(awun: int, awupf: int, dn: bool, namespaces: Sequence[tuple[int, Any]]) -> dict[str, Any]:
    """The migration fingerprint's atomicity entry (empty when nothing is configured, so a
    controller without atomic parameters matches one from before they existed).

    :param namespaces: ``(nsid, namespace)`` of the configured namespaces (a namespace's
        ``atomic``, when it has one).
    """
    per_ns = [[nsid, *attrs.astuple(p)] for nsid, ns in namespaces
              if (p := getattr(ns, "atomic", NO_ATOMICITY)).configured]
    if not (awun or awupf or dn or per_ns):
        return {}
    return {"nvme.atomic": [awun, awupf, bool(dn), per_ns]}
