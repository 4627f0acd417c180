"""Live-migrate the NVMe controller between processes while the host driver keeps
doing verified I/O, with :func:`pcidev.testing.migrate_under_load`.

The controller runs in its own process with a memory namespace and a file
namespace; the runner plugs it into the software host and moves it to a new
process ``--migrations`` times (quiesce: stop fetching, drain the backend I/O;
save; send with RAM, the namespace memfd and the eventfds; load; resume). The
workload probes it with the host NVMe driver (:mod:`pcidev_nvme.testing.driver`)
and, each step, writes random blocks at queue depth ``--qd`` on ``--queues``
queues, then reads every one back and compares its CRC-32C; at the end every
block of both namespaces is read and checked against the CRC-32C last written
there (zeros where nothing was). Prints each migration's downtime and state size
(exit status 1 on any mismatch or error).

Run::

    .venv/bin/python examples/migrate_nvme.py [--migrations N] [--rounds N] [--qd N]
        [--queues N] [--ns-size BYTES] [--tcp] [--json] [-p no:NAME | -p MODULE]...

With ``--tcp`` the controller has only the file namespace (a memory namespace
cannot follow without descriptors) and migrates over TCP; the host re-attaches RAM
and eventfds. Details: docs/migration.md section 12.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import crc32c

from pcidev.errors import PcidevError
from pcidev.testing import MigrationRunResult, Workload, WorkloadContext, migrate_under_load
from pcidev_nvme.testing.driver import WRITE, NvmeDriver


# [example: nvme workload]
class VerifiedIo(Workload):
    """Random writes at queue depth ``qd`` on every I/O queue, each block read back
    and checked by its CRC-32C; :meth:`verify` checks every block of every namespace."""

    def __init__(self, qd: int, queues: int) -> None:
        self.qd, self.queues = qd, queues
        self.crc: dict[tuple[int, int], int] = {}  # (nsid, lba) -> CRC-32C last written
        self.commands = self.readbacks = self.blocks_checked = 0
        self.rnd = random.Random(1)

    def setup(self, ctx: WorkloadContext) -> None:
        self.drv = NvmeDriver(ctx.machine, ctx.pdev, io_queues=self.queues, io_depth=2 * self.qd, aers=1)
        self.drv.probe()  # enable, MSI-X, admin and I/O queues, namespaces
        self.qids = list(range(1, self.drv.io_queue_count + 1))
        self.buf = ctx.machine.alloc(len(self.qids) * self.qd * 4096)

    def step(self, ctx: WorkloadContext) -> None:
        drv, m, rnd = self.drv, ctx.machine, self.rnd
        free = {n: rnd.sample(range(0, ns.nsze - 8, 8), len(self.qids) * self.qd) for n, ns in drv.namespaces.items()}
        written = []
        for qi, qid in enumerate(self.qids):  # qd commands in flight on each queue
            for k in range(self.qd):
                nsid = rnd.choice(sorted(free))
                slba, nlb = free[nsid].pop(), rnd.choice([1, 4, 8])
                data = os.urandom(nlb * drv.lba_size(nsid))
                addr = self.buf + (qi * self.qd + k) * 4096
                m.write(addr, data)
                drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=addr)
                written.append((nsid, slba, data))
        for qid in self.qids:
            done = drv.reap(qid, min_completions=self.qd, timeout=30)
            if len(done) != self.qd or not all(c.ok for c in done):
                raise AssertionError(f"queue {qid}: {done}")
        self.commands += len(written)
        for nsid, slba, data in written:
            lbs = drv.lba_size(nsid)
            crcs = [crc32c.crc32c(data[j:j + lbs]) for j in range(0, len(data), lbs)]
            back = drv.read(nsid, slba, len(crcs), qid=self.qids[ctx.iteration % len(self.qids)])
            if [crc32c.crc32c(back[j:j + lbs]) for j in range(0, len(back), lbs)] != crcs:
                raise AssertionError(f"namespace {nsid}, LBA {slba}: read back differs (CRC-32C)")
            self.readbacks += 1
            for j, crc in enumerate(crcs):
                self.crc[(nsid, slba + j)] = crc

    def verify(self, ctx: WorkloadContext) -> None:
        drv = self.drv
        for nsid, ns in sorted(drv.namespaces.items()):
            lbs, step = ns.lba_size, 65536 // ns.lba_size
            zero = crc32c.crc32c(bytes(lbs))
            for slba in range(0, ns.nsze, step):
                data = drv.read(nsid, slba, step)
                for j in range(step):
                    self.blocks_checked += 1
                    if crc32c.crc32c(data[j * lbs:(j + 1) * lbs]) != self.crc.get((nsid, slba + j), zero):
                        raise AssertionError(f"namespace {nsid}, LBA {slba + j}: CRC-32C differs at the end")
# [end example]


def run(args: argparse.Namespace) -> tuple[VerifiedIo, MigrationRunResult]:
    """Run the migrations under load; returns the workload and the runner's result."""
    tmp = Path(tempfile.mkdtemp(prefix="pcidev-nvme-mig-"))
    try:
        img = tmp / "ns.img"
        with open(img, "wb") as f:
            f.truncate(args.ns_size)
        nss = ([] if args.tcp else [f"ns=mem:size={args.ns_size}"]) + [f"ns=file:path={img},size={args.ns_size}"]
        config = f"serial=MIGDEMO,max_ioqpairs={args.queues},msix_vectors={args.queues + 1}," + ",".join(nss)
        workload = VerifiedIo(args.qd, args.queues)
        # [example: run nvme]
        rounds = args.rounds if args.rounds is not None else max(24, 2 * (args.migrations + 1))
        result = migrate_under_load("nvme", workload, count=args.migrations, iterations=rounds,
                                    properties=config, transport="tcp" if args.tcp else "unix",
                                    plugin_specs=args.plugin_specs, ram_size=128 << 20,
                                    probe=False)  # the NVMe driver probes the controller itself
        # [end example]
        return workload, result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run, report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of QD writes per queue, each read back (default: 24, or two per migration)")
    ap.add_argument("--qd", type=int, default=32, help="commands in flight per queue")
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--ns-size", type=int, default=4 << 20, help="bytes per namespace")
    ap.add_argument("--tcp", action="store_true", help="file namespace only, migrate over TCP")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                    help="plugin selection of the device processes, as pcidev -p; repeatable")
    args = ap.parse_args(argv)
    try:
        workload, result = run(args)
    except PcidevError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    migrations = result.migrations
    if args.json:
        print(json.dumps({"migrations": [dict(m.report, pid=m.destination_pid) for m in migrations],
                          "commands": workload.commands, "readbacks": workload.readbacks,
                          "blocks_checked": workload.blocks_checked, "mismatches": 0}, indent=1, default=str))
    else:
        for m in migrations:
            down = f"{m.downtime * 1e3:.2f} ms" if m.downtime is not None else "n/a"
            print(f"migration {m.index}: to process {m.destination_pid}: downtime {down}, "
                  f"host accesses held {m.host_pause * 1e3:.2f} ms, state {m.state_size} bytes + {m.fds} fds")
        print(f"{workload.commands} writes at QD {args.qd} x {args.queues} queues, {workload.readbacks} read "
              f"back, {workload.blocks_checked} blocks checked at the end: 0 CRC-32C mismatches")
    return 0 if len(migrations) == args.migrations else 1


if __name__ == "__main__":
    sys.exit(main())
