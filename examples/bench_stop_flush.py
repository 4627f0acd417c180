"""What the flush at a migration's stop costs (docs/migration.md §12).

An NVMe controller in this process with one ``file`` namespace; the software host writes
64 KiB at QD 32 without pause, and every ``--interval`` seconds the controller is stopped
the way a migration stops it, with the host's accesses held meanwhile (the transport's
message boundary): ``quiesce(timeout, flush=True)``, then ``resume()``. Stops without the
flush alternate with them, for comparison. Also measured: a stop after a write burst of
``--burst`` MiB with the host idle, and a flushing stop with nothing written since the last
one (no system call). Run for each directory (``--dir``, repeatable: tmpfs and a disk) and
namespace size (``--size``, MiB, repeatable). One JSON line per configuration.

Use: ``python examples/bench_stop_flush.py --dir /dev/shm --dir /var/tmp --size 4 --size 256``.
A report, not a test: figures depend on the disk and on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import threading
import time

from pcidev.host import Machine
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import WRITE, NvmeDriver

QD = 32
CHUNK = 64 << 10


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def measure(directory: str, size_mib: int, *, reps: int, interval: float, burst_mib: int) -> dict[str, object]:
    """Stops of one controller with a ``size_mib`` MiB image in ``directory``."""
    work = tempfile.mkdtemp(dir=directory, prefix="pcidev-stop-")
    img = os.path.join(work, "ns.img")
    ctrl = NvmeController(f"serial=STOPBENCH,ns=file:path={img},size={size_mib}M", name="bench")
    nblocks = size_mib << 11
    access = threading.Lock()  # held by the host around each access, and around each stop
    try:
        with Machine(ram_size=64 << 20) as m:
            drv = NvmeDriver.attach(m, ctrl, io_queues=1, io_depth=QD + 1, aers=0)
            buf = m.alloc(QD * CHUNK)
            m.write(buf, os.urandom(QD * CHUNK))
            lbas = CHUNK // 512

            def one_round(i: int) -> None:
                with access:
                    for j in range(QD):
                        slba = ((i * QD + j) * lbas) % (nblocks - lbas)
                        drv.submit_rw(1, WRITE, nsid=1, slba=slba, nlb=lbas, buf=buf + j * CHUNK)
                got: list = []
                while len(got) < QD:
                    with access:
                        got += drv.poll(1)
                    if len(got) < QD:
                        time.sleep(0.0001)
                assert all(c.ok for c in got), got

            def stop(flush: bool) -> float:
                with access:
                    t0 = time.perf_counter()
                    ctrl.quiesce(60.0, flush=flush)
                    took = time.perf_counter() - t0
                    ctrl.resume()
                return took

            # a burst with the host idle, then the stop
            burst, clean = [], []
            for r in range(reps):
                for i in range(burst_mib * (1 << 20) // (QD * CHUNK)):
                    one_round(r * 1000 + i)
                burst.append(stop(True))
                clean.append(stop(True))  # nothing written since: no system call
            # the host writing all along
            running = threading.Event()
            running.set()
            written = [0]

            def writer() -> None:
                i = 0
                while running.is_set():
                    one_round(i)
                    written[0] += QD * CHUNK
                    i += 1

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            flushing, plain = [], []
            t0 = time.monotonic()
            for _ in range(reps):
                time.sleep(interval)
                plain.append(stop(False))
                time.sleep(interval)
                flushing.append(stop(True))
            running.clear()
            t.join(60)
            rate = written[0] / (1 << 20) / (time.monotonic() - t0)
            drv.close()
    finally:
        ctrl.close()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "dir": directory, "size_mib": size_mib, "reps": reps,
        "burst_mib": burst_mib, "stop_after_burst_ms": _ms(statistics.median(burst)),
        "stop_after_burst_max_ms": _ms(max(burst)), "stop_clean_ms": _ms(statistics.median(clean)),
        "writing_mib_s": round(rate), "interval_s": interval,
        "stop_flush_ms": _ms(statistics.median(flushing)), "stop_flush_max_ms": _ms(max(flushing)),
        "stop_no_flush_ms": _ms(statistics.median(plain)), "stop_no_flush_max_ms": _ms(max(plain)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", action="append", help="where the image lives (repeatable; default /dev/shm and /var/tmp)")
    ap.add_argument("--size", action="append", type=int, help="namespace size in MiB (repeatable; default 4 and 256)")
    ap.add_argument("--reps", type=int, default=9, help="stops of each kind")
    ap.add_argument("--interval", type=float, default=0.3, help="seconds of writing before each stop")
    ap.add_argument("--burst", type=int, default=16, help="MiB written just before a stop with the host idle")
    args = ap.parse_args()
    for directory in args.dir or ["/dev/shm", "/var/tmp"]:
        for size in args.size or [4, 256]:
            print(json.dumps(measure(directory, size, reps=args.reps, interval=args.interval,
                                     burst_mib=min(args.burst, size))), flush=True)


if __name__ == "__main__":
    main()
