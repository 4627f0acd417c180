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
        [--queues N] [--ns-size BYTES] [--tcp [--mem]] [--fill] [--max-downtime-ms MS]
        [--json] [-p no:NAME | -p MODULE]...

With ``--tcp`` the controller migrates over TCP (no descriptors travel; the host
re-attaches RAM and eventfds) with only the file namespace, or with ``--mem`` with
the memory namespace too: its contents are copied while the workload keeps running
(pre-copy, until what is left fits ``--max-downtime-ms``) and the rest at the stop;
each migration's line shows the pre-copy's passes and bytes. ``--fill`` writes every
block of the memory namespace before the workload starts (so that there is
something to copy). Details: docs/migration.md sections 7 and 12.
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

    def __init__(self, qd: int, queues: int, fill: int | None = None) -> None:
        self.qd, self.queues, self.fill = qd, queues, fill  # fill: a namespace to write whole first
        self.crc: dict[tuple[int, int], int] = {}  # (nsid, lba) -> CRC-32C last written
        self.commands = self.readbacks = self.blocks_checked = 0
        self.rnd = random.Random(1)

    def setup(self, ctx: WorkloadContext) -> None:
        self.drv = NvmeDriver(ctx.machine, ctx.pdev, io_queues=self.queues, io_depth=2 * self.qd, aers=1)
        self.drv.probe()  # enable, MSI-X, admin and I/O queues, namespaces
        self.qids = list(range(1, self.drv.io_queue_count + 1))
        self.buf = ctx.machine.alloc(len(self.qids) * self.qd * 4096)
        if self.fill is not None:
            self._fill(self.fill)

    def _fill(self, nsid: int) -> None:
        """Write every block of ``nsid`` with random data (128 KiB a command)."""
        drv, lbs, chunk = self.drv, self.drv.lba_size(nsid), 128 << 10
        for off in range(0, drv.namespaces[nsid].nsze * lbs, chunk):
            data = self.rnd.randbytes(chunk)
            drv.write(nsid, off // lbs, data, qid=self.qids[(off // chunk) % len(self.qids)])
            for j in range(0, chunk, lbs):
                self.crc[(nsid, (off + j) // lbs)] = crc32c.crc32c(data[j:j + lbs])

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
        mem = not args.tcp or args.mem
        nss = ([f"ns=mem:size={args.ns_size}"] if mem else []) + [f"ns=file:path={img},size={args.ns_size}"]
        config = f"serial=MIGDEMO,max_ioqpairs={args.queues},msix_vectors={args.queues + 1}," + ",".join(nss)
        workload = VerifiedIo(args.qd, args.queues, fill=1 if mem and args.fill else None)
        # [example: run nvme]
        rounds = args.rounds if args.rounds is not None else max(24, 2 * (args.migrations + 1))
        result = migrate_under_load("nvme", workload, count=args.migrations, iterations=rounds,
                                    properties=config, transport="tcp" if args.tcp else "unix",
                                    plugin_specs=args.plugin_specs, ram_size=128 << 20,
                                    max_downtime_ms=args.max_downtime_ms, migration_timeout=120.0,
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
    ap.add_argument("--tcp", action="store_true", help="migrate over TCP (file namespace only, unless --mem)")
    ap.add_argument("--mem", action="store_true",
                    help="with --tcp: keep the memory namespace, whose contents travel (pre-copy)")
    ap.add_argument("--fill", action="store_true", help="write every block of the memory namespace first")
    ap.add_argument("--max-downtime-ms", type=float, default=10.0,
                    help="the pre-copy's downtime budget (over TCP with --mem)")
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
            pre = m.report.get("precopy")
            if pre:
                passes = ", ".join(f"{n / 2**20:.1f}" for n in pre["bytes_per_iteration"]) or "none"
                took = m.report.get("precopy_seconds") or 0.0
                print(f"  pre-copy: {pre['iterations']} passes ({passes} MiB) in {took:.2f} s while the I/O "
                      f"went on, {'converged' if pre['converged'] else 'did not converge'}; "
                      f"{pre['remainder_bytes'] / 2**10:.0f} KiB at the stop")
        print(f"{workload.commands} writes at QD {args.qd} x {args.queues} queues, {workload.readbacks} read "
              f"back, {workload.blocks_checked} blocks checked at the end: 0 CRC-32C mismatches")
    return 0 if len(migrations) == args.migrations else 1


if __name__ == "__main__":
    sys.exit(main())
