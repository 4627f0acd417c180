"""Live-migrate the NVMe controller between processes while the host driver keeps
doing verified I/O.

The controller runs in its own process (``python -m pcidev.transport.link.process
--device nvme``) with a memory namespace and a file namespace; the software host
plugs it, probes it with the host NVMe driver and keeps writing random blocks at
queue depth ``--qd`` on ``--queues`` queues, reading each back. Meanwhile the
controller moves to a new process ``--migrations`` times (quiesce: stop fetching,
drain the backend I/O; save; send with RAM, the namespace memfd and the eventfds
over a UNIX socket; load; resume). At the end every block of both namespaces is
read and checked against its CRC-32C. Prints each migration's downtime and state
size (exit status 1 on any mismatch or error).

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
import sys
import tempfile
import threading
from pathlib import Path

import crc32c

from pcidev.host import Machine
from pcidev.transport.link.process import DeviceProcess
from pcidev_nvme.testing.driver import WRITE, NvmeDriver


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pcidev-nvme-mig-"))
    img = tmp / "ns.img"
    with open(img, "wb") as f:
        f.truncate(args.ns_size)
    nss = ([] if args.tcp else [f"ns=mem:size={args.ns_size}"]) + [f"ns=file:path={img},size={args.ns_size}"]
    config = (f"serial=MIGDEMO,max_ioqpairs={args.queues},msix_vectors={args.queues + 1}," + ",".join(nss))
    opts = config
    procs = [DeviceProcess("nvme", f"unix:{tmp}/dev0.sock", options=opts, plugin_specs=args.plugin_specs)]
    # destinations start once the source has written the image's identity file (NGUID, EUI-64,
    # UUID are in the fingerprint: processes creating it at the same time would disagree)
    procs[0].wait_event("ready")
    for i in range(1, args.migrations + 1):
        incoming = "tcp:127.0.0.1:0" if args.tcp else f"unix:{tmp}/in{i}.sock"
        procs.append(DeviceProcess("nvme", f"unix:{tmp}/dev{i}.sock", options=opts, incoming=incoming,
                                   plugin_specs=args.plugin_specs))
    reports: list[dict] = []
    stats = {"commands": 0, "readbacks": 0, "mismatches": 0, "blocks_checked": 0, "errors": []}
    try:
        with Machine(ram_size=128 << 20) as machine:
            procs[0].wait_event("ready")
            pdev = machine.plug_remote(procs[0].link, timeout=10)
            drv = NvmeDriver(machine, pdev, io_queues=args.queues, io_depth=2 * args.qd, aers=1)
            drv.probe()
            crc: dict[tuple[int, int], int] = {}
            progress = threading.Semaphore(0)
            qids = list(range(1, drv.io_queue_count + 1))

            def workload() -> None:
                try:
                    rnd = random.Random(1)
                    buf = machine.alloc(len(qids) * args.qd * 4096)
                    for r in range(args.rounds):
                        free = {n: rnd.sample(range(0, i.nsze - 8, 8), len(qids) * args.qd)
                                for n, i in drv.namespaces.items()}
                        written = []
                        for qi, qid in enumerate(qids):
                            for k in range(args.qd):
                                nsid = rnd.choice(sorted(free))
                                slba, nlb = free[nsid].pop(), rnd.choice([1, 4, 8])
                                data = os.urandom(nlb * drv.lba_size(nsid))
                                addr = buf + (qi * args.qd + k) * 4096
                                machine.write(addr, data)
                                drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=addr)
                                written.append((nsid, slba, data))
                        for qid in qids:
                            got = drv.reap(qid, min_completions=args.qd, timeout=30)
                            if len(got) != args.qd or not all(c.ok for c in got):
                                raise RuntimeError(f"round {r}: queue {qid}: {got}")
                        stats["commands"] += len(written)
                        for nsid, slba, data in written:
                            lbs = drv.lba_size(nsid)
                            for j in range(len(data) // lbs):
                                crc[(nsid, slba + j)] = crc32c.crc32c(data[j * lbs:(j + 1) * lbs])
                            back = drv.read(nsid, slba, len(data) // lbs, qid=qids[r % len(qids)])
                            stats["readbacks"] += 1
                            stats["mismatches"] += back != data
                        progress.release()
                except BaseException as exc:
                    stats["errors"].append(f"{type(exc).__name__}: {exc}")
                    progress.release()

            worker = threading.Thread(target=workload, daemon=True)
            worker.start()
            every = max(1, args.rounds // (args.migrations + 1))
            for dest in procs[1:]:
                ev = dest.wait_event("listening")
                dest.incoming = ev.get("incoming", dest.incoming)
                for _ in range(every):
                    progress.acquire(timeout=60)
                if stats["errors"]:
                    break
                reports.append(dict(pdev.device.migrate(dest.incoming, timeout=20), pid=dest.pid))
            worker.join(300)
            for nsid, info in sorted(drv.namespaces.items()):
                lbs = info.lba_size
                zero = crc32c.crc32c(bytes(lbs))
                step = 65536 // lbs
                for slba in range(0, info.nsze, step):
                    data = drv.read(nsid, slba, step)
                    for j in range(step):
                        stats["blocks_checked"] += 1
                        got = crc32c.crc32c(data[j * lbs:(j + 1) * lbs])
                        stats["mismatches"] += got != crc.get((nsid, slba + j), zero)
    finally:
        for p in procs:
            p.stop()
    return {"migrations": reports, **stats}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--migrations", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=24, help="rounds of QD writes per queue, each read back")
    ap.add_argument("--qd", type=int, default=32, help="commands in flight per queue")
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--ns-size", type=int, default=4 << 20, help="bytes per namespace")
    ap.add_argument("--tcp", action="store_true", help="file namespace only, migrate over TCP")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                    help="plugin selection of the device processes, as pcidev -p; repeatable")
    args = ap.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for i, r in enumerate(result["migrations"], 1):
            print(f"migration {i}: to process {r['pid']}: downtime {r['downtime'] * 1e3:.2f} ms, "
                  f"host accesses held {r['host_pause'] * 1e3:.2f} ms, state {r['state_size']} bytes + "
                  f"{r['fds']} fds")
        print(f"{result['commands']} writes at QD {args.qd} x {args.queues} queues, {result['readbacks']} read "
              f"back, {result['blocks_checked']} blocks checked at the end: {result['mismatches']} CRC-32C mismatches")
        for e in result["errors"]:
            print("error:", e)
    ok = not result["errors"] and not result["mismatches"] and len(result["migrations"]) == args.migrations
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
