"""What the preparation of the stop saves a vfio-user migration (docs/vfio-user-migration.md).

An NVMe controller with one ``file`` namespace, served in this process over a vfio-user
socket pair and driven through it by the software host. Each round the host writes
``--mib`` MiB (64 KiB at QD 32), then the client moves the device as a VMM migrating it
does: ``PRE_COPY``, ``--gap`` seconds (the VMM copies the guest's RAM meanwhile), one
pre-copy iteration read to its end, then ``STOP_COPY`` -- the arc that stops the device,
timed by the client -- and back to ``RUNNING`` (a migration abandoned after its stop:
the device runs on). Rounds alternate between the server as it is (the device prepares
its stop while it runs: :meth:`PciDevice.prepare_quiesce
<pcidev.device.PciDevice.prepare_quiesce>`) and with the preparation switched off (the
flush happens at the stop, as before). One JSON line per mode: medians and worst of the
STOP_COPY arc and of the stop's flush (``quiesce_times.flush``), milliseconds.

Use: ``python examples/bench_vfio_user_stop.py --dir /var/tmp --mib 16 --rounds 9``.
A report, not a test: figures depend on the disk and on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time

from pcidev.host import Machine
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.migration_client import mig_read, mig_read_all, set_mig_state
from pcidev.transport.vfio_user.protocol import MIG_STATE_PRE_COPY, MIG_STATE_RUNNING, MIG_STATE_STOP_COPY
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev.transport.vfio_user.server import VfioUserServer
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import WRITE, Completion, NvmeDriver

QD = 32
CHUNK = 64 << 10


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def measure(directory: str, *, mib: int, rounds: int, gap: float) -> list[dict[str, object]]:
    """``rounds`` stops of each mode of one controller with its image in ``directory``."""
    work = tempfile.mkdtemp(dir=directory, prefix="pcidev-vfio-user-stop-")
    size_mib = max(64, 2 * mib)
    ctrl = NvmeController(f"serial=VUSTOP,ns=file:path={work}/ns.img,size={size_mib}M", name="bench")
    endpoint = DeviceEndpoint(ctrl)
    endpoint.start()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = VfioUserServer(endpoint, a)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    client = VfioUserClient(b, timeout=60)
    client.version()
    prepare = ctrl.prepare_quiesce
    figures: dict[str, dict[str, list[float]]] = {m: {"arc": [], "flush": []} for m in ("prepared", "not-prepared")}
    try:
        with Machine(ram_size=64 << 20) as m:
            drv = NvmeDriver.attach(m, VfioUserDevice(client), io_queues=1, io_depth=QD + 1, aers=0)
            buf = m.alloc(QD * CHUNK)
            m.write(buf, os.urandom(QD * CHUNK))
            lbas = CHUNK // 512
            nblocks = size_mib << 11
            slba = 0
            for r in range(2 * rounds):
                mode = "prepared" if r % 2 == 0 else "not-prepared"
                if mode == "prepared":
                    ctrl.__dict__.pop("prepare_quiesce", None)
                else:
                    ctrl.prepare_quiesce = lambda *, flush: None  # type: ignore[method-assign]
                for _ in range(max(1, (mib << 20) // (QD * CHUNK))):
                    for j in range(QD):
                        drv.submit_rw(1, WRITE, nsid=1, slba=slba, nlb=lbas, buf=buf + j * CHUNK)
                        slba = (slba + lbas) % (nblocks - lbas)
                    got: list[Completion] = []
                    while len(got) < QD:
                        got += drv.reap(1, min_completions=QD - len(got), timeout=30.0)
                set_mig_state(client, MIG_STATE_PRE_COPY)
                time.sleep(gap)
                while len(mig_read(client, 1 << 16)) == 1 << 16:
                    pass
                t0 = time.perf_counter()
                set_mig_state(client, MIG_STATE_STOP_COPY)
                figures[mode]["arc"].append(time.perf_counter() - t0)
                assert ctrl.quiesce_times is not None
                figures[mode]["flush"].append(ctrl.quiesce_times.flush)
                mig_read_all(client)
                set_mig_state(client, MIG_STATE_RUNNING)
            drv.close()
    finally:
        ctrl.prepare_quiesce = prepare  # type: ignore[method-assign]
        client.close()
        thread.join(10)
        endpoint.close()
        shutil.rmtree(work, ignore_errors=True)
    out = []
    for mode, f in figures.items():
        out.append({"dir": directory, "mib_written": mib, "gap_s": gap, "mode": mode, "rounds": rounds,
                    "stop_copy_arc_ms": {"median": _ms(statistics.median(f["arc"])), "worst": _ms(max(f["arc"]))},
                    "stop_flush_ms": {"median": _ms(statistics.median(f["flush"])), "worst": _ms(max(f["flush"]))}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", action="append", help="where the image lives (repeatable; default /var/tmp)")
    ap.add_argument("--mib", type=int, default=16, help="MiB the host writes before each migration")
    ap.add_argument("--rounds", type=int, default=9, help="stops of each mode")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds in PRE_COPY before the iteration is read")
    args = ap.parse_args()
    for directory in args.dir or ["/var/tmp"]:
        for line in measure(directory, mib=args.mib, rounds=args.rounds, gap=args.gap):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
