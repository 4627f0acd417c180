"""Live-migrate the NVMe controller between processes while the host driver keeps
doing verified I/O, with :func:`pcidev.testing.migrate_under_load`.

The controller runs in its own process with a memory namespace and a file
namespace; the runner plugs it into the software host and moves it to a new
process ``--migrations`` times (quiesce: stop fetching, drain the backend I/O;
save; send with RAM, the namespace memfd and the eventfds; load; resume). The
workload probes it with the host NVMe driver (:mod:`pcidev_nvme.testing.driver`)
and runs the NVMe plugin's standard workload (:mod:`pcidev_nvme.testing.workload`):
each step, random writes and reads at queue depth ``--qd`` on ``--queues`` queues,
every block read checked by its CRC-32C; at the end every block of both namespaces
is read and checked against the CRC-32C last written there (zeros where nothing was).
Prints each migration's downtime and state size (exit status 1 on any mismatch or error).

Run::

    .venv/bin/python examples/migrate_nvme.py [--migrations N] [--rounds N] [--qd N]
        [--queues N] [--ns-size BYTES] [--tcp [--mem [--fill]] [--max-downtime-ms MS]] [--json]
        [-p no:NAME | -p MODULE]...

With ``--tcp`` it migrates over TCP (the host re-attaches RAM and eventfds) with the
file namespace only, or with ``--mem`` the memory namespace too: its contents travel
(pre-copy while the I/O goes on, the rest at the stop; ``--fill`` writes it whole
first). Details: docs/migration.md sections 6 and 12.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from pcidev.errors import PcidevError
from pcidev.testing import MigrationRunResult, WorkloadContext, migrate_under_load
from pcidev_nvme.testing.workload import VerifiedIo  # the NVMe plugin's standard workload


class FilledIo(VerifiedIo):
    """The standard workload, with one namespace written whole before it starts (so that
    a pre-copy has all of it to send), every block recorded for the checks."""

    def __init__(self, qd: int, queues: int, fill: int) -> None:
        super().__init__(qd, queues, seed=1)
        self.fill = fill

    def setup(self, ctx: WorkloadContext) -> None:
        super().setup(ctx)
        drv, nsid, chunk = self.drv, self.fill, 128 << 10
        lbs = drv.lba_size(nsid)
        for n, off in enumerate(range(0, drv.namespaces[nsid].nsze * lbs, chunk)):
            blocks = [self._block(nsid, (off + j) // lbs, lbs) for j in range(0, chunk, lbs)]
            drv.write(nsid, off // lbs, b"".join(b for b, _ in blocks), qid=self.qids[n % len(self.qids)])
            for j, (_, crc) in enumerate(blocks):
                self.crc[(nsid, off // lbs + j)] = crc


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
        workload = (FilledIo(args.qd, args.queues, fill=1) if mem and args.fill
                    else VerifiedIo(args.qd, args.queues, seed=1))
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
                          "blocks_checked": workload.blocks_checked, "mismatches": workload.mismatches},
                         indent=1, default=str))
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
        print(f"{workload.commands} commands ({workload.writes} writes) at QD {args.qd} x {args.queues} queues, "
              f"{workload.readbacks} read back, {workload.blocks_checked} blocks checked at the end: "
              f"{workload.mismatches} CRC-32C mismatches")
    return 0 if len(migrations) == args.migrations else 1


if __name__ == "__main__":
    sys.exit(main())
