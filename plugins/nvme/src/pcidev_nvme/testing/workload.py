"""The NVMe controller's standard verified workload for migration tests.

:class:`VerifiedIo` is what the NVMe plugin returns from
:func:`~pcidev.hookspecs.pcidev_migration_workload`: ``examples/migrate_between_processes.py``,
``examples/migrate_nvme.py`` and the soak tests run it on a controller while
:func:`pcidev.testing.migrate_under_load` moves it between processes.

Each step submits ``qd`` commands on each of ``queues`` I/O queues (default 8 x 32)
before ringing, a random mix of writes and reads on 4 KiB slots no two commands of
the step share (so no read races a write), then reaps everything:

* **data**, as fio's ``verify=crc32c``: every block written carries a header (its
  CRC-32C over the rest of the block, the namespace, the LBA and a write sequence
  number) and the host remembers each block's CRC-32C; every block read is checked
  against the header it carries and the CRC-32C last written there (zeros where
  nothing was). Half the reads read back blocks written by the step before, the
  rest land anywhere. :meth:`VerifiedIo.verify` reads every block of every
  namespace once more at the end;
* **completions**, per (SQ, CID): a completion for a CID that is not outstanding is
  a *duplicate*; an outstanding CID that never completes (within the step's timeout,
  or by the end) is *lost*; after the final check every queue is polled once more
  for strays;
* **a full completion queue**: I/O queue 1 has a CQ of ``qd // 2`` entries, so
  ``qd`` commands fill it and the controller parks the rest in the CQ's backlog
  (and stops fetching). Before every second migration
  (:meth:`VerifiedIo.before_migration`) the workload stops reaping with that CQ
  full until the migration is done, so the controller is stopped with a full CQ,
  parked completions and unfetched SQ entries (the migration's
  ``summary`` says so: ``cqs_full``, ``cq_backlog``, ``sq_unfetched``);
* **AERs**: ``aers`` (4) Asynchronous Event Requests stay outstanding the whole run
  (``aers_outstanding`` at every stop); at the end a Temperature Threshold below the
  current temperature must complete exactly one of them (an AER armed before the
  first migration and carried by every one).

:meth:`VerifiedIo.report` gives the figures (commands, blocks written and checked,
``mismatches``, ``lost_completions``, ``duplicate_completions``, holds, AER events).
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import crc32c

from pcidev.errors import PcidevError
from pcidev.testing import MigrationRecord, Workload, WorkloadContext
from pcidev_nvme.testing.driver import READ, WRITE, Completion, NvmeDriver, NvmeDriverError

__all__ = ["VerifiedIo", "BLOCK_HEADER", "MAX_QD"]

#: the header each written block starts with: CRC-32C of the rest of the block,
#: NSID, LBA, write sequence number
BLOCK_HEADER = struct.Struct("<IIQQ")
SLOT = 4096
#: the deepest queue depth: each SQ has ``2 * qd`` entries, at most the controller's
#: default MQES + 1 (2048)
MAX_QD = 1024
#: seconds a step waits for the completions it expects before counting them lost
STEP_TIMEOUT = 30.0
#: seconds :meth:`VerifiedIo.before_migration` waits for the workload to hold a full CQ
HOLD_WAIT = 20.0
#: seconds the workload holds at most (the migration normally releases it much earlier)
HOLD_LIMIT = 120.0
#: the namespace kinds the workload can give the controller (``namespaces`` option)
NS_KINDS = ("mem", "file")
#: the temperature threshold feature and SMART / Health log page
_FID_TEMP_THRESHOLD, _LID_SMART = 0x04, 0x02


def _preallocated(path: Path, size: int) -> None:
    """Create the ``file`` namespace's image fully written (zeros) and synced, as a production
    image is preallocated: a write then changes no file system metadata (no block allocated,
    no unwritten extent converted), so a migration's ``fdatasync`` syncs the data written and
    waits for no journal commit (which on ext4 would also write back other processes' data)."""
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        for off in range(0, size, len(chunk)):
            f.write(chunk[:min(len(chunk), size - off)])
        f.flush()
        os.fsync(f.fileno())


class VerifiedIo(Workload):
    """Random writes and reads at queue depth ``qd`` on ``queues`` I/O queues, every
    block checked by CRC-32C, every completion counted per (SQ, CID) (see the module).

    :param qd: commands in flight per queue (each step).
    :param queues: I/O queue pairs.
    :param aers: Asynchronous Event Requests kept outstanding (at most AERL + 1).
    :param hold_every: hold a full CQ at the stop of every ``hold_every``-th migration
        (0: never).
    :param seed: seed of the random choices (None: random).
    :param properties: the controller's properties (:meth:`from_options` builds them).
    """

    probe = False  # the NVMe driver probes the controller itself

    def __init__(self, qd: int = 32, queues: int = 8, *, aers: int = 4, hold_every: int = 2,
                 seed: int | None = None, properties: str = "") -> None:
        if qd < 1 or queues < 1:
            raise PcidevError(f"VerifiedIo: qd and queues must be >= 1, not {qd} and {queues}")
        self.qd, self.queues, self.aers, self.hold_every = qd, queues, aers, hold_every
        self.properties = properties
        self.ram_size = max(64 << 20, queues * qd * SLOT + (32 << 20))
        self.seed = seed if seed is not None else random.randrange(1 << 32)
        self.rnd = random.Random(self.seed)
        #: (nsid, lba) -> CRC-32C of the block last written there
        self.crc: dict[tuple[int, int], int] = {}
        #: (sqid, cid) -> the command outstanding under it: opcode, NSID, SLBA, NLB, the
        #: CRC-32C of each block written, its buffer, whether it reads back the step before's
        self.outstanding: dict[tuple[int, int], tuple[int, int, int, int, list[int], int, bool]] = {}
        self.commands = self.writes = self.reads = self.readbacks = 0
        self.blocks_written = self.blocks_read = self.blocks_checked = 0
        self.mismatches = self.lost = self.duplicates = self.errors = 0
        self.holds = self.holds_missed = self.aer_events = 0
        self.problems: list[str] = []
        self.seq = 0
        #: the fewest commands a queue had in flight when its doorbell rang
        self.qd_min = qd
        self.recent: list[tuple[int, int]] = []
        self._hold = threading.Condition()
        self._hold_state = "idle"  # idle -> asked -> holding -> released -> idle

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> VerifiedIo:
        """The standard workload and controller configuration for ``options`` (see
        :func:`~pcidev.hookspecs.pcidev_migration_workload`): a ``mem`` and a ``file``
        namespace (over TCP the ``mem`` one's contents travel: pre-copy), each
        ``ns_size`` bytes (default 4 MiB, or twice what one step's commands address),
        the file in ``workdir``; ``namespaces`` (``mem``, ``file`` or both, comma
        separated, in that order of NSIDs) keeps only the kinds named.

        :param options: ``queues`` (8), ``qd`` (32), ``transport`` (``unix``),
            ``workdir`` (required), ``seed``, ``ns_size``, ``namespaces`` (``mem,file``),
            ``aers``, ``hold_every``.
        :raises PcidevError: no ``workdir``, or a bad value.
        """
        queues, qd = int(options.get("queues") or 8), int(options.get("qd") or 32)
        transport = str(options.get("transport") or "unix")
        if transport not in ("unix", "tcp"):
            raise PcidevError(f"the NVMe workload's transport must be unix or tcp, not {transport!r}")
        size = int(options.get("ns_size") or max(4 << 20, 2 * queues * qd * SLOT))
        workdir = options.get("workdir")
        if not 1 <= qd <= MAX_QD:
            raise PcidevError(f"the NVMe workload's qd must be 1..{MAX_QD} (its SQs have 2 x qd entries, "
                              f"at most MQES + 1), not {qd}")
        if workdir is None:
            raise PcidevError("the NVMe workload needs a workdir for its file namespace")
        if size < 2 * queues * qd * SLOT:
            raise PcidevError(f"a {size}-byte namespace is too small for {queues} x {qd} commands of 4 KiB "
                              f"on distinct slots; give ns_size >= {2 * queues * qd * SLOT}")
        kinds = str(options.get("namespaces") or "mem,file").split(",")
        if not kinds or any(k not in NS_KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise PcidevError(f"the NVMe workload's namespaces must be {', '.join(NS_KINDS)} or both, "
                              f"comma separated, not {options.get('namespaces')!r}")
        nss = []
        for kind in kinds:  # (over TCP the mem one's contents travel)
            if kind == "mem":
                nss.append(f"ns=mem:size={size}")
            else:
                image = Path(workdir) / "nvme-ns.img"
                _preallocated(image, size)
                nss.append(f"ns=file:path={image},size={size}")
        props = f"serial=PCIDEVSOAK,max_ioqpairs={queues},msix_vectors={queues + 1}," + ",".join(nss)
        return cls(qd, queues, aers=int(options.get("aers", 4)), hold_every=int(options.get("hold_every", 2)),
                   seed=options.get("seed"), properties=props)

    # ------------------------------------------------------------------ set-up
    def setup(self, ctx: WorkloadContext) -> None:
        self.drv = drv = NvmeDriver(ctx.machine, ctx.pdev, io_queues=self.queues, io_depth=2 * self.qd,
                                    aers=self.aers)
        drv.probe()  # enable, MSI-X, admin and I/O queues, AERs, namespaces
        self.qids = list(range(1, drv.io_queue_count + 1))
        self.small_cq: int | None = None
        if self.qd >= 4:  # queue 1 gets a CQ that qd commands overflow
            self.small_cq = self.qd // 2
            drv.delete_io_queue_pair(1)
            drv.create_io_queue_pair(1, 2 * self.qd, cq_size=self.small_cq)
        self.buf = ctx.machine.alloc(len(self.qids) * self.qd * SLOT, SLOT)
        self.slots = {nsid: ns.nsze * ns.lba_size // SLOT for nsid, ns in drv.namespaces.items()}
        if not self.slots:
            raise AssertionError("the controller has no namespace")
        if sum(self.slots.values()) < 2 * len(self.qids) * self.qd:
            raise AssertionError(f"namespaces of {self.slots} 4 KiB slots are too small for "
                                 f"{len(self.qids)} x {self.qd} commands")

    # ------------------------------------------------------------------ one step
    def _block(self, nsid: int, lba: int, lbs: int) -> tuple[bytes, int]:
        self.seq += 1
        rest = BLOCK_HEADER.pack(0, nsid, lba, self.seq)[4:] + os.urandom(lbs - BLOCK_HEADER.size)
        block = struct.pack("<I", crc32c.crc32c(rest)) + rest
        return block, crc32c.crc32c(block)

    def _check_block(self, nsid: int, lba: int, block: bytes) -> str | None:
        """Why ``block`` read at (nsid, lba) is wrong, or None."""
        expected = self.crc.get((nsid, lba))
        if expected is None:
            return None if not any(block) else "data where nothing was written"
        crc, hns, hlba, _seq = BLOCK_HEADER.unpack_from(block)
        if crc != crc32c.crc32c(block[4:]):
            return "the block's own CRC-32C does not match it"
        if (hns, hlba) != (nsid, lba):
            return f"the block written for namespace {hns}, LBA {hlba}"
        if crc32c.crc32c(block) != expected:
            return "an older block (CRC-32C differs from the last write)"
        return None

    def _mismatch(self, what: str) -> None:
        self.mismatches += 1
        if len(self.problems) < 20:
            self.problems.append(what)

    def step(self, ctx: WorkloadContext) -> None:
        drv, m, rnd = self.drv, ctx.machine, self.rnd
        used: set[tuple[int, int]] = set()
        nsids = sorted(self.slots)
        written: list[tuple[int, int]] = []
        for qi, qid in enumerate(self.qids):
            for k in range(self.qd):
                addr = self.buf + (qi * self.qd + k) * SLOT
                readback = bool(self.recent) and rnd.random() < 0.25
                while True:  # a slot no other command of the step uses (at most half are taken)
                    if readback and self.recent:  # read back a slot the step before wrote
                        nsid, slot = self.recent.pop(rnd.randrange(len(self.recent)))
                        op = READ
                    else:
                        readback = False
                        nsid = rnd.choice(nsids)
                        slot = rnd.randrange(self.slots[nsid])
                        op = WRITE if rnd.random() < 0.5 else READ
                    if (nsid, slot) not in used:
                        break
                used.add((nsid, slot))
                lbs = drv.lba_size(nsid)
                per = SLOT // lbs
                nlb = rnd.choice(sorted({1, max(1, per // 2), per}))
                slba = slot * per
                crcs: list[int] = []
                if op == WRITE:
                    blocks = [self._block(nsid, slba + j, lbs) for j in range(nlb)]
                    m.write(addr, b"".join(b for b, _ in blocks))
                    crcs = [c for _, c in blocks]
                    written.append((nsid, slot))
                cid = drv.submit_rw(qid, op, nsid=nsid, slba=slba, nlb=nlb, buf=addr, ring=False)
                if (qid, cid) in self.outstanding:
                    raise AssertionError(f"the driver reused CID {cid} of SQ {qid} while outstanding")
                self.outstanding[(qid, cid)] = (op, nsid, slba, nlb, crcs, addr, readback)
                self.commands += 1
            # the commands in flight on the queue when its doorbell rings
            self.qd_min = min(self.qd_min, drv.queues[qid].outstanding)
            drv.ring(qid)
        self._maybe_hold()
        failed = []
        for qid in self.qids:
            failed += self._reap(ctx, qid)
        self.recent = written
        if failed:
            raise AssertionError("; ".join(failed))

    def _reap(self, ctx: WorkloadContext, qid: int) -> list[str]:
        """Reap until nothing of ``qid`` is outstanding; check every completion."""
        deadline = time.monotonic() + STEP_TIMEOUT
        mine = {cid for (sq, cid) in self.outstanding if sq == qid}
        problems: list[str] = []
        while mine:
            try:
                done = self.drv.reap(qid, min_completions=1, timeout=max(deadline - time.monotonic(), 0.0))
            except NvmeDriverError as exc:
                self._account(ctx, qid, getattr(exc, "partial", []), mine, problems)
                self.lost += len(mine)
                for cid in mine:
                    del self.outstanding[(qid, cid)]
                problems.append(f"SQ {qid}: {len(mine)} completions lost ({exc})")
                break
            self._account(ctx, qid, done, mine, problems)
        return problems

    def _account(self, ctx: WorkloadContext, qid: int, done: list[Completion], mine: set[int],
                 problems: list[str]) -> None:
        for c in done:
            cmd = self.outstanding.pop((c.sqid, c.cid), None)
            if cmd is None or c.sqid != qid:
                self.duplicates += 1
                problems.append(f"a completion for CID {c.cid} of SQ {c.sqid} that was not outstanding")
                continue
            mine.discard(c.cid)
            op, nsid, slba, nlb, crcs, addr, readback = cmd
            if not c.ok:
                self.errors += 1
                problems.append(f"SQ {qid} CID {c.cid}: status {c.status:#x}")
                continue
            lbs = self.drv.lba_size(nsid)
            if op == WRITE:
                for j, crc in enumerate(crcs):
                    self.crc[(nsid, slba + j)] = crc
                self.writes += 1
                self.blocks_written += nlb
                continue
            data = ctx.machine.read(addr, nlb * lbs)
            for j in range(nlb):
                why = self._check_block(nsid, slba + j, data[j * lbs:(j + 1) * lbs])
                if why is not None:
                    self._mismatch(f"namespace {nsid}, LBA {slba + j} read on SQ {qid}: {why}")
                    problems.append(f"namespace {nsid}, LBA {slba + j}: {why}")
            self.reads += 1
            self.readbacks += readback
            self.blocks_read += nlb

    def _maybe_hold(self) -> None:
        """With a hold asked for, keep the small CQ full until the migration is done."""
        with self._hold:
            if self._hold_state != "asked" or self.small_cq is None:
                return
        qid = self.qids[0]  # the commands of this step are in flight on it
        deadline = time.monotonic() + STEP_TIMEOUT
        while self.drv.cq_posted(qid) < self.small_cq - 1:  # one slot always stays empty
            if time.monotonic() > deadline:
                raise AssertionError(f"CQ {qid} did not fill up ({self.drv.cq_posted(qid)} of "
                                     f"{self.small_cq - 1} entries in {STEP_TIMEOUT} s)")
            time.sleep(0.0005)
        time.sleep(0.005)  # the rest of the commands fetched meanwhile go to the backlog
        with self._hold:
            if self._hold_state != "asked":  # the runner stopped waiting meanwhile
                return
            self._hold_state = "holding"
            self._hold.notify_all()
            released = self._hold.wait_for(lambda: self._hold_state != "holding", HOLD_LIMIT)
            self._hold_state = "idle"
            self._hold.notify_all()
        self.holds += 1
        if not released:
            raise AssertionError(f"held a full CQ for {HOLD_LIMIT} s: no migration came")

    # ------------------------------------------------------------------ migrations
    def before_migration(self, ctx: WorkloadContext, index: int) -> None:
        """At every ``hold_every``-th migration, wait (up to 20 s) until the workload
        holds queue 1's CQ full; the migration then stops the controller so."""
        if not self.hold_every or index % self.hold_every or self.small_cq is None:
            return
        deadline = time.monotonic() + HOLD_WAIT
        with self._hold:
            self._hold_state = "asked"
            while self._hold_state != "holding":
                left = deadline - time.monotonic()
                if left <= 0 or ctx.ended.is_set():  # the workload ended (or is stuck): no hold
                    self._hold_state = "idle"
                    self.holds_missed += 1
                    return
                self._hold.wait(min(left, 0.1))

    def after_migration(self, ctx: WorkloadContext, record: MigrationRecord | None) -> None:
        with self._hold:
            if self._hold_state in ("asked", "holding"):
                self._hold_state = "released" if self._hold_state == "holding" else "idle"
                self._hold.notify_all()

    # ------------------------------------------------------------------ the end
    def verify(self, ctx: WorkloadContext) -> None:
        drv = self.drv
        if self.outstanding:
            self.lost += len(self.outstanding)
            raise AssertionError(f"{len(self.outstanding)} commands never completed")
        for nsid, ns in sorted(drv.namespaces.items()):
            lbs, step = ns.lba_size, 65536 // ns.lba_size
            for slba in range(0, ns.nsze, step):
                data = drv.read(nsid, slba, min(step, ns.nsze - slba))
                for j in range(len(data) // lbs):
                    self.blocks_checked += 1
                    why = self._check_block(nsid, slba + j, data[j * lbs:(j + 1) * lbs])
                    if why is not None:
                        self._mismatch(f"namespace {nsid}, LBA {slba + j} at the end: {why}")
        self._check_aer(ctx)
        time.sleep(0.05)
        for qid in self.qids:  # nothing may come after everything completed
            for c in drv.poll(qid):
                self.duplicates += 1
                self.problems.append(f"a stray completion for CID {c.cid} of SQ {c.sqid} at the end")
        strays = [c for c in drv.stash.get(0, []) if c.opcode == -1]
        self.duplicates += len(strays)
        if self.mismatches or self.duplicates:
            raise AssertionError(f"{self.mismatches} mismatches, {self.duplicates} duplicated completions: "
                                 + "; ".join(self.problems[:5]))

    def _check_aer(self, ctx: WorkloadContext) -> None:
        """One event must complete exactly one of the AERs outstanding since the start."""
        drv = self.drv
        if not self.aers:
            return
        before = len(drv.events)
        temperature = struct.unpack_from("<H", drv.get_log(_LID_SMART, 512, rae=True), 1)[0]
        threshold = drv.get_features(_FID_TEMP_THRESHOLD).dw0
        drv.set_features(_FID_TEMP_THRESHOLD, temperature - 1)
        try:
            deadline = time.monotonic() + 10
            while len(drv.events) == before and time.monotonic() < deadline:
                drv.poll_events(timeout=0.05)
            drv.poll_events(timeout=0.1)  # a second completion would come now
        finally:
            drv.set_features(_FID_TEMP_THRESHOLD, threshold)
        new = drv.events[before:]
        self.aer_events += len(new)
        if len(new) != 1:
            raise AssertionError(f"a temperature threshold event completed {len(new)} AERs, not 1: {new}")

    def report(self) -> dict[str, Any]:
        return {"seed": self.seed, "queues": len(getattr(self, "qids", ())) or self.queues, "qd": self.qd_min,
                "commands": self.commands, "writes": self.writes, "reads": self.reads, "readbacks": self.readbacks,
                "blocks_written": self.blocks_written, "blocks_read": self.blocks_read,
                "blocks_checked": self.blocks_checked, "mismatches": self.mismatches,
                "lost_completions": self.lost, "duplicate_completions": self.duplicates,
                "error_completions": self.errors, "cq_full_holds": self.holds,
                "cq_full_holds_missed": self.holds_missed, "aer_events": self.aer_events,
                "problems": list(self.problems)}
