"""virtio-blk migration: in process (pcidev.testing.roundtrip) and between processes over the
device link, with requests waiting in the ring, every block verified by its CRC-32C before
and after.

virtio-blk processes synchronously (under ``device.lock``, inside the notification), so at
a quiesce no request is ever taken and unfinished; what can be pending is a request the
driver made available without the device having taken it (not kicked yet, or the kick
lost while stopped). Those must be carried out exactly once, by the destination. Chains
a transport does report in flight (taken, not returned) go through ``resubmit()``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import crc32c
import pytest

from pcidev.errors import MigrationError
from pcidev.host import Machine
from pcidev.migration import load_device_stream, save_device_stream
from pcidev.testing import plugged, probe, roundtrip
from pcidev.transport.link.process import DeviceProcess
from pcidev.vmstate.errors import ConfigMismatchError
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.blk_driver import BlkDriver, status_of
from pcidev_virtio.blk_spec import WRITEBACK_OFFSET, BlkStatus
from pcidev_virtio.testing.driver import DriverQueue, VirtioDriver

BS = 512


def crcs(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i:i + BS]) for i in range(0, len(data), BS)]


class Shadow:
    """What the disk must hold: the CRC-32C of every block written so far."""

    def __init__(self, blocks: int) -> None:
        self.crc = [crc32c.crc32c(bytes(BS))] * blocks

    def wrote(self, sector: int, data: bytes) -> None:
        for i, c in enumerate(crcs(data)):
            self.crc[sector + i] = c

    def verify(self, blk: BlkDriver, chunk: int = 64) -> None:
        for start in range(0, len(self.crc), chunk):
            status, data = blk.read(start, chunk)
            assert status == BlkStatus.OK
            bad = [start + i for i, c in enumerate(crcs(data)) if c != self.crc[start + i]]
            assert not bad, f"blocks {bad[:8]} differ"


def add_writes(blk: BlkDriver, shadow: Shadow, first: int, n: int, blocks: int = 8) -> list[int]:
    """Place ``n`` writes of ``blocks`` random blocks each (not kicked)."""
    heads = []
    for i in range(n):
        sector = first + i * blocks
        data = os.urandom(blocks * BS)
        heads.append(blk.add_write(sector, data, split=[100 + i]))
        shadow.wrote(sector, data)
    return heads


def all_ok(q: DriverQueue, n: int) -> None:
    done = q.wait(n, timeout=20)
    assert len(done) == n and [status_of(d) for d in done] == [BlkStatus.OK] * n
    assert q.poll() == []  # nothing more: no request ran twice


@pytest.mark.parametrize("props", ["size=2M", "file={tmp}/disk.img,size=2M"])
def test_roundtrip_carries_requests_left_in_the_ring(machine: Machine, tmp_path: Path, props: str) -> None:
    src = VirtioBlk(props.format(tmp=tmp_path))
    pdev = plugged(machine, src)
    drv = VirtioDriver(machine, pdev)
    drv.init()
    drv.write_config(WRITEBACK_OFFSET, 1, 0)  # the cache mode migrates too
    q = drv.queues[0]
    blk = BlkDriver(q)
    shadow = Shadow(4096)
    for i in range(8):
        data = os.urandom(32 * BS)
        assert blk.write(i * 32, data) == BlkStatus.OK
        shadow.wrote(i * 32, data)
    add_writes(blk, shadow, 1000, 12)  # made available, never kicked
    assert src.queues[0].last_avail_idx != q.avail_idx
    dest = roundtrip(pdev)
    try:
        assert isinstance(dest, VirtioBlk) and dest is not src and not dest.engine.writeback
        all_ok(q, 12)  # the destination took them when it resumed
        shadow.verify(blk)
        data = os.urandom(16 * BS)
        assert blk.write(3000, data) == BlkStatus.OK and blk.flush() == BlkStatus.OK
        shadow.wrote(3000, data)
        shadow.verify(blk)
    finally:
        dest.close()


def test_chains_in_flight_at_the_source_are_resubmitted(machine: Machine) -> None:
    src = VirtioBlk("size=1M")
    pdev = plugged(machine, src)
    drv = VirtioDriver(machine, pdev)
    drv.init()
    q = drv.queues[0]
    blk = BlkDriver(q)
    shadow = Shadow(2048)
    add_writes(blk, shadow, 0, 6)
    with src.lock:  # as an asynchronous engine would: taken from the ring, not yet done
        taken = [src.queues[0].pop() for _ in range(4)]
    assert all(e is not None for e in taken) and len(src.queues[0].inflight()) == 4
    for elem in taken:
        assert elem is not None
        elem.release()
    dest = roundtrip(pdev)
    try:
        all_ok(q, 6)  # 4 resubmitted, 2 taken from the ring at resume
        assert dest.queues[0].inflight() == ()
        shadow.verify(blk)
    finally:
        dest.close()


def test_a_memory_disk_does_not_migrate_without_descriptors(tmp_path: Path) -> None:
    src = DeviceProcess("virtio-blk", f"unix:{tmp_path}/a.sock", options="size=1M")
    dest = DeviceProcess("virtio-blk", f"unix:{tmp_path}/b.sock", options="size=1M", incoming="tcp:127.0.0.1:0")
    try:
        with Machine(ram_size=16 << 20) as machine:
            src.wait_event("ready")
            pdev = machine.plug_remote(src.link, timeout=10)
            probe(pdev, 2)
            drv = VirtioDriver(machine, pdev)
            drv.init()
            blk = BlkDriver(drv.queues[0])
            data = os.urandom(8 * BS)
            assert blk.write(0, data) == BlkStatus.OK
            dest.incoming = dest.wait_event("listening")["incoming"]
            with pytest.raises(MigrationError, match="memory disk migrates only with file descriptors"):
                pdev.device.migrate(dest.incoming, timeout=10)
            status, got = blk.read(0, 8)  # the source runs again
            assert status == BlkStatus.OK and got == data
    finally:
        src.stop()
        dest.stop()


@pytest.mark.parametrize("disk", ["file", "mem"])
def test_virtio_blk_migrates_between_processes_with_requests_pending(tmp_path: Path, disk: str) -> None:
    props = f"file={tmp_path}/disk.img,size=8M" if disk == "file" else "size=8M"
    second = "tcp:127.0.0.1:0" if disk == "file" else f"unix:{tmp_path}/c-in.sock"  # memory needs fds
    src = DeviceProcess("virtio-blk", f"unix:{tmp_path}/a.sock", options=props)
    d1 = DeviceProcess("virtio-blk", f"unix:{tmp_path}/b.sock", options=props, incoming=f"unix:{tmp_path}/b-in.sock")
    d2 = DeviceProcess("virtio-blk", f"unix:{tmp_path}/c.sock", options=props, incoming=second)
    procs = [src, d1, d2]
    try:
        with Machine(ram_size=64 << 20) as machine:
            src.wait_event("ready")
            pdev = machine.plug_remote(src.link, timeout=10)
            probe(pdev, 2)
            drv = VirtioDriver(machine, pdev)
            drv.init()
            q = drv.queues[0]
            blk = BlkDriver(q)
            shadow = Shadow(16384)
            d2.incoming = d2.wait_event("listening")["incoming"]
            d1.wait_event("listening")
            sector = 0
            for dest in (d1, d2):
                old = q.avail_idx
                add_writes(blk, shadow, sector, 24)  # kicked: done before the migration
                q.kick(old_idx=old)
                all_ok(q, 24)
                add_writes(blk, shadow, sector + 24 * 8, 16)  # left in the ring
                sector += 40 * 8
                assert q.used_idx() == q.last_used  # nothing of them done yet
                pdev.device.migrate(dest.incoming, timeout=20)
                all_ok(q, 16)  # carried out once, by the destination
                shadow.verify(blk)
            assert pdev.device.info["pid"] == d2.pid
            assert blk.flush() == BlkStatus.OK
            status, ident = blk.get_id()
            assert status == BlkStatus.OK and ident == bytes(20)
        assert src.proc.wait(10) == 0 and src.wait_event("exit")["reason"] == "migrated"
    finally:
        for proc in procs:
            proc.stop()


@pytest.mark.parametrize("dest_props, item", [("size=2M", "virtio-blk.capacity"),
                                              ("file={tmp}/other.img,size=1M", "virtio-blk.backend"),
                                              ("size=1M,readonly=on", "virtio-blk.readonly"),
                                              ("size=1M,serial=other", "virtio-blk.serial")])
def test_a_destination_configured_differently_refuses_naming_the_item(machine: Machine, tmp_path: Path,
                                                                      dest_props: str, item: str) -> None:
    src = VirtioBlk("size=1M")
    pdev = plugged(machine, src)
    VirtioDriver(machine, pdev).init()
    src.quiesce()
    stream, fds = save_device_stream(src)
    dest = VirtioBlk(dest_props.format(tmp=tmp_path))
    try:
        with pytest.raises(ConfigMismatchError, match=item):
            load_device_stream(dest, stream, fds)
    finally:
        dest.close()
        src.resume()
        src.close()


def test_migrations_between_processes_under_a_running_workload(tmp_path: Path) -> None:
    """A workload thread keeps four writes in flight and reads back what it wrote while the
    main thread migrates the disk three times; every block is checked at the end."""
    props = f"file={tmp_path}/disk.img,size=4M"
    procs = [DeviceProcess("virtio-blk", f"unix:{tmp_path}/p0.sock", options=props)]
    procs += [DeviceProcess("virtio-blk", f"unix:{tmp_path}/p{i}.sock", options=props,
                            incoming=f"unix:{tmp_path}/p{i}-in.sock") for i in (1, 2, 3)]
    stop = threading.Event()
    errors: list[BaseException] = []
    counts = {"writes": 0, "reads": 0}
    shadow = Shadow(8192)
    try:
        with Machine(ram_size=64 << 20) as machine:
            procs[0].wait_event("ready")
            pdev = machine.plug_remote(procs[0].link, timeout=10)
            probe(pdev, 2)
            drv = VirtioDriver(machine, pdev)
            drv.init()
            q = drv.queues[0]
            blk = BlkDriver(q, timeout=20)
            rnd = random.Random(8)

            def workload() -> None:
                try:
                    while not stop.is_set():
                        old = q.avail_idx
                        sectors = rnd.sample(range(0, 8192, 8), 4)
                        for s in sectors:
                            add_writes(blk, shadow, s, 1)
                        q.kick(old_idx=old)
                        all_ok(q, 4)
                        counts["writes"] += 4
                        s = rnd.choice(sectors)
                        status, data = blk.read(s, 8)
                        assert status == BlkStatus.OK and crcs(data) == shadow.crc[s:s + 8]
                        counts["reads"] += 1
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            worker = threading.Thread(target=workload)
            worker.start()
            for dest in procs[1:]:
                dest.wait_event("listening")
                before = counts["writes"]
                while counts["writes"] < before + 40 and not errors:
                    time.sleep(0.01)
                pdev.device.migrate(dest.incoming, timeout=20)
            before = counts["writes"]
            while counts["writes"] < before + 40 and not errors:
                time.sleep(0.01)
            stop.set()
            worker.join(30)
            assert not worker.is_alive()
            assert not errors, repr(errors[0])
            assert pdev.device.info["pid"] == procs[3].pid
            shadow.verify(blk)
            assert counts["writes"] >= 160 and counts["reads"] >= 40
    finally:
        stop.set()
        for proc in procs:
            proc.stop()
