"""The NVMe controller in its own process survives destinations that die at the steps of
the migration protocol (tests/pcidev/migration/killpoints.py): a representative set of
kill points, each tried twice -- with the host idle, where a save of the source's state
taken just before and just after the attempt must be equal but for clock readings, and
with QD 32 writes in flight on two queues at the stop, where every command must complete
exactly once and every block read back by its CRC-32C -- then a migration to a healthy
destination process and all the data verified there."""

from __future__ import annotations

import importlib
import os
import random
import sys
import time
from pathlib import Path

import crc32c
import pytest

from pcidev.errors import MigrationError
from pcidev.host import Machine
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.transport.link.process import DeviceProcess
from pcidev_nvme.testing.driver import WRITE, NvmeDriver

HARNESS = Path(__file__).resolve().parents[2] / "pcidev" / "migration"
if str(HARNESS) not in sys.path:
    sys.path.insert(0, str(HARNESS))
killpoints = importlib.import_module("killpoints")  # the harness beside the framework's migration tests
DyingDestination, StateProbe, Zygote = killpoints.DyingDestination, killpoints.StateProbe, killpoints.Zygote
comparable, point_named = killpoints.comparable, killpoints.point_named

QD = 32
#: (point, death): every step before the ACK by SIGKILL, and the other deaths where they differ
CASES = {
    "unix": [("before-OFFER", "kill"), ("before-STATE", "kill"), ("mid-STATE", "kill"), ("before-ACK", "kill"),
             ("mid-STATE", "reset"), ("before-ACK", "hang")],
    "tcp": [("before-OFFER", "kill"), ("mid-STATE", "kill"), ("before-ACK", "kill"), ("mid-STATE", "reset"),
            ("before-ACK", "hang")],
}
TIMEOUTS = {"kill": 10.0, "reset": 10.0, "hang": 1.5}


def _config(tmp_path: Path, transport: str) -> str:
    img = tmp_path / "k.img"
    with open(img, "wb") as f:
        f.truncate(2 << 20)
    mem = ",ns=mem:size=2M" if transport == "unix" else ""  # (no memfd over TCP)
    return f"serial=XKILL,max_ioqpairs=2,msix_vectors=3,ns=file:path={img},size=2M{mem}"


class RoundIo:
    """Rounds of QD 32 random writes on each of two queues, every command's completion
    counted by (queue, CID), every block's CRC-32C remembered and read back."""

    def __init__(self, machine: Machine, drv: NvmeDriver) -> None:
        self.machine, self.drv = machine, drv
        self.buf = machine.alloc(2 * QD * 4096)
        self.crc: dict[tuple[int, int], int] = {}
        self.rng = random.Random(11)
        self.inflight: dict[tuple[int, int], tuple[int, int, bytes]] = {}
        self.completed = 0

    def submit(self) -> None:
        drv = self.drv
        slots = {n: self.rng.sample(range(0, info.nsze - 8, 8), 2 * QD) for n, info in drv.namespaces.items()}
        for qid in (1, 2):
            for k in range(QD):
                nsid = self.rng.choice(sorted(slots))
                slba, nlb = slots[nsid].pop(), self.rng.choice([1, 4, 8])
                data = os.urandom(nlb * drv.lba_size(nsid))
                addr = self.buf + ((qid - 1) * QD + k) * 4096
                self.machine.write(addr, data)
                cid = drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=addr)
                self.inflight[(qid, cid)] = (nsid, slba, data)

    def complete(self) -> None:
        """Every command submitted completes once, successfully; nothing more comes."""
        drv = self.drv
        seen: dict[tuple[int, int], int] = {}
        for qid in (1, 2):
            for c in drv.reap(qid, min_completions=QD, timeout=30):
                assert c.ok, c
                seen[(qid, c.cid)] = seen.get((qid, c.cid), 0) + 1
        for qid in (1, 2):  # a duplicate would come now, for a CID no longer pending
            for c in drv.poll(qid):
                seen[(qid, c.cid)] = seen.get((qid, c.cid), 0) + 1
        lost = sorted(set(self.inflight) - set(seen))
        duplicated = sorted(k for k, n in seen.items() if n > 1 or k not in self.inflight)
        assert (lost, duplicated) == ([], []), f"lost {lost}, duplicated {duplicated}"
        for nsid, slba, data in self.inflight.values():
            lbs = drv.lba_size(nsid)
            for i in range(len(data) // lbs):
                self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])
            assert drv.read(nsid, slba, len(data) // lbs, qid=1) == data
        self.completed += len(self.inflight)
        self.inflight = {}

    def verify_everything(self) -> None:
        drv = self.drv
        for nsid, info in sorted(drv.namespaces.items()):
            lbs, zero, step = info.lba_size, crc32c.crc32c(bytes(info.lba_size)), 65536 // info.lba_size
            for slba in range(0, info.nsze, step):
                data = drv.read(nsid, slba, step)
                for i in range(step):
                    got = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])
                    assert got == self.crc.get((nsid, slba + i), zero), f"ns {nsid} lba {slba + i}"


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def _state(pdev, address: str):
    """A save of the source's state, taken by a destination that refuses it."""
    probe = StateProbe(address)
    with pytest.raises(MigrationError, match="StateProbe"):
        pdev.device.migrate(probe.address, timeout=10)
    return comparable(probe.join())


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_nvme_keeps_running_when_the_destination_dies_before_the_ack(tmp_path, zygote, transport):
    opts = _config(tmp_path, transport)
    where = (lambda name: f"unix:{tmp_path}/{name}.sock") if transport == "unix" else (lambda name: "tcp:127.0.0.1:0")
    registry = load_registry(make_plugin_manager())
    src = DeviceProcess("nvme", f"unix:{tmp_path}/src.sock", options=opts)
    healthy = None
    try:
        src.wait_event("ready")
        with Machine(ram_size=32 << 20) as machine:
            pdev = machine.plug_remote(src.link, timeout=10)
            drv = NvmeDriver(machine, pdev, io_queues=2, io_depth=64, aers=2)
            drv.probe()
            io = RoundIo(machine, drv)
            io.submit()
            io.complete()
            for name, death in CASES[transport]:
                point = point_named(name)
                for busy in (False, True):
                    before = None if busy else _state(pdev, where("probe"))
                    if busy:
                        io.submit()  # 64 writes in flight at the stop
                    if death == "kill":
                        address = zygote.start(device="nvme", props=opts, address=where("dying"), point=point)
                        dying = None
                    else:
                        dying = DyingDestination(where("dying"), lambda: registry.create("nvme", opts), point, death)
                        address = dying.address
                    started = time.monotonic()
                    with pytest.raises(MigrationError, match="runs again on the source") as info:
                        pdev.device.migrate(address, timeout=TIMEOUTS[death])
                    assert time.monotonic() - started < 2 * TIMEOUTS[death] + 5.0  # the stop is bounded
                    if dying is None:
                        outcome = zygote.result()
                        assert outcome.get("reached") == name and outcome["status"] == -9, (name, outcome)
                    else:
                        dying.end()
                        assert dying.reached and not dying.ran, (name, dying.error, dying.trace)
                    assert pdev.device.info["pid"] == src.pid and pdev.device.status()["state"] == "running"
                    assert "\n" not in str(info.value)
                    if busy:
                        io.complete()
                    else:  # the source's state is untouched until the ACK
                        assert _state(pdev, where("probe")) == before, f"{name}/{death} changed the state"
            healthy = DeviceProcess("nvme", f"unix:{tmp_path}/healthy.sock", options=opts,
                                    incoming=where("healthy-in"))
            healthy.incoming = healthy.wait_event("listening")["incoming"]
            io.submit()
            report = pdev.device.migrate(healthy.incoming, timeout=20)
            assert report["deferred"] == (transport == "tcp")
            io.complete()
            assert pdev.device.info["pid"] == healthy.pid
            io.verify_everything()
            assert io.completed == 2 * QD * (2 + len(CASES[transport]))
        assert src.proc.wait(10) == 0 and src.wait_event("exit")["reason"] == "migrated"
    finally:
        src.stop()
        if healthy is not None:
            healthy.stop()
    assert sorted(p.name for p in tmp_path.glob("*.sock")) == []  # no socket file left behind
