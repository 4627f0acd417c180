"""Verified I/O: random writes, reads, write-zeroes and deallocates over several
namespaces (memory, sparse file, O_DIRECT file; 512 B and 4 KiB blocks) and several
queues at queue depth >= 32, every block checked by its crc32c: zero mismatches.

The workload runs against the I/O command set with a stand-in controller (each
"queue" is a thread keeping QD commands in flight); when the host-side driver is
available it also runs end to end through the software host (``test_*_driver``).
"""

from __future__ import annotations

import queue
import random
import struct
import threading

import crc32c
import pytest
from fakes import PAGE, FakeController, command

from pcidev_nvme.io import IoCommandSet, Opcode
from pcidev_nvme.namespace import make_namespace

QD = 32


class Model:
    """Expected crc32c of every block, and which blocks are busy (in flight)."""

    def __init__(self, geometry: dict[int, tuple[int, int]], seed: int) -> None:
        self.geometry = geometry  # nsid -> (nlbas, lba_size)
        self.crc = {nsid: {} for nsid in geometry}  # absent = zeros
        self.zero_crc = {nsid: crc32c.crc32c(bytes(size)) for nsid, (_n, size) in geometry.items()}
        self.busy: set[tuple[int, int]] = set()
        self.lock = threading.Lock()
        self.mismatches: list[str] = []
        self.counts = {"write": 0, "read": 0, "zeroes": 0, "dealloc": 0, "blocks_checked": 0}
        self.seed = seed

    def pick(self, rnd: random.Random, max_blocks: int) -> tuple[str, int, int, int] | None:
        """Choose an operation on a range nobody else is using; reserve it."""
        nsid = rnd.choice(list(self.geometry))
        nlbas, size = self.geometry[nsid]
        nlb = rnd.choice([1, 1, 2, 3, 8, max(1, max_blocks // 2), max_blocks])
        nlb = max(1, min(nlb, max_blocks, nlbas))
        slba = rnd.randrange(0, nlbas - nlb + 1)
        kind = rnd.choices(["write", "read", "zeroes", "dealloc"], [45, 45, 5, 5])[0]
        with self.lock:
            keys = [(nsid, lba) for lba in range(slba, slba + nlb)]
            if any(k in self.busy for k in keys):
                return None
            self.busy.update(keys)
        return kind, nsid, slba, nlb

    def release(self, nsid: int, slba: int, nlb: int) -> None:
        with self.lock:
            for lba in range(slba, slba + nlb):
                self.busy.discard((nsid, lba))

    @staticmethod
    def block_data(nsid: int, lba: int, version: int, size: int) -> bytes:
        rnd = random.Random(nsid * 1_000_003 + lba * 7919 + version)
        return rnd.randbytes(size)

    def written(self, nsid: int, slba: int, blocks: list[bytes]) -> None:
        with self.lock:
            for i, b in enumerate(blocks):
                self.crc[nsid][slba + i] = crc32c.crc32c(b)

    def zeroed(self, nsid: int, slba: int, nlb: int) -> None:
        with self.lock:
            for lba in range(slba, slba + nlb):
                self.crc[nsid].pop(lba, None)

    def check(self, nsid: int, slba: int, data: bytes) -> None:
        size = self.geometry[nsid][1]
        with self.lock:
            for i in range(len(data) // size):
                got = crc32c.crc32c(data[i * size : (i + 1) * size])
                want = self.crc[nsid].get(slba + i, self.zero_crc[nsid])
                self.counts["blocks_checked"] += 1
                if got != want:
                    self.mismatches.append(f"ns {nsid} lba {slba + i}: crc {got:#x} != {want:#x}")


def run_fake_queue(ctrl, ios, model: Model, qid: int, ops: int, max_blocks: int, errors: list) -> None:
    """One submission queue: QD slots, each with its own guest buffer."""
    rnd = random.Random(model.seed * 131 + qid)
    done: queue.Queue = queue.Queue()
    slot_bytes = max_blocks * 4096
    bufs = [ctrl.alloc(slot_bytes) for _ in range(QD)]
    lists = [ctrl.alloc(PAGE) for _ in range(QD)]
    free = list(range(QD))
    pending: dict[int, tuple] = {}
    version = 0
    submitted = completed = 0
    ctrl.callbacks[qid] = done.put

    def prp(slot: int, length: int) -> tuple[int, int]:
        buf = bufs[slot]
        if length <= PAGE:
            return buf, 0
        if length <= 2 * PAGE:
            return buf, buf + PAGE
        n = -(-length // PAGE) - 1
        ctrl.memory.write(lists[slot], struct.pack(f"<{n}Q", *[buf + PAGE * (i + 1) for i in range(n)]))
        return buf, lists[slot]

    while completed < ops:
        while free and submitted < ops:
            choice = model.pick(rnd, max_blocks)
            if choice is None:
                continue
            kind, nsid, slba, nlb = choice
            size = model.geometry[nsid][1]
            slot = free.pop()
            length = nlb * size
            cdw10, cdw11, cdw12 = slba & 0xFFFFFFFF, slba >> 32, nlb - 1
            blocks = None
            if kind == "write":
                version += 1
                blocks = [model.block_data(nsid, slba + i, version * 64 + qid, size) for i in range(nlb)]
                ctrl.memory.write(bufs[slot], b"".join(blocks))
                p1, p2 = prp(slot, length)
                req = command(Opcode.WRITE, nsid, cid=slot, prp1=p1, prp2=p2, cdw10=cdw10, cdw11=cdw11,
                              cdw12=cdw12 | (rnd.random() < 0.1) << 30, sqid=qid)
            elif kind == "read":
                ctrl.memory.fill(bufs[slot], length, 0xA5)
                p1, p2 = prp(slot, length)
                req = command(Opcode.READ, nsid, cid=slot, prp1=p1, prp2=p2, cdw10=cdw10, cdw11=cdw11,
                              cdw12=cdw12, sqid=qid)
            elif kind == "zeroes":
                req = command(Opcode.WRITE_ZEROES, nsid, cid=slot, cdw10=cdw10, cdw11=cdw11, cdw12=cdw12,
                              sqid=qid)
            else:
                ctrl.memory.write(bufs[slot], struct.pack("<IIQ", 0, nlb, slba))
                req = command(Opcode.DSM, nsid, cid=slot, prp1=bufs[slot], cdw10=0, cdw11=1 << 2, sqid=qid)
            pending[slot] = (kind, nsid, slba, nlb, blocks, length)
            submitted += 1
            ios.submit(req)
        req, status = done.get(timeout=10)
        slot = req.cid
        kind, nsid, slba, nlb, blocks, length = pending.pop(slot)
        completed += 1
        if status:
            errors.append(f"{kind} ns {nsid} lba {slba}+{nlb}: status {status:#x}")
        elif kind == "write":
            model.written(nsid, slba, blocks)
        elif kind in ("zeroes", "dealloc"):
            model.zeroed(nsid, slba, nlb)
        else:
            model.check(nsid, slba, ctrl.memory.read(bufs[slot], length))
        model.counts[kind] += 1
        model.release(nsid, slba, nlb)
        free.append(slot)


class RoutingController(FakeController):
    """Routes each completion to the callback of its queue (``req.sqid``)."""

    def __init__(self, **kw):
        super().__init__(ram=64 << 20, **kw)
        self.callbacks: dict = {}

    def complete(self, req, status=0, dw0=0, dw1=0, *, error=None):
        super().complete(req, status, dw0, dw1, error=error)
        self.callbacks[req.sqid]((req, status))


@pytest.mark.parametrize("seed", [1, 2])
def test_verified_io_several_namespaces_and_queues(tmp_path, seed):
    ctrl = RoutingController(mdts_bytes=128 * 1024)
    ctrl.namespaces[1] = make_namespace(1, "mem:size=4M")
    ctrl.namespaces[2] = make_namespace(2, f"file:path={tmp_path}/a.img,size=4M,lbaf=1")
    ctrl.namespaces[3] = make_namespace(3, f"file:path={tmp_path}/b.img,size=4M,direct=on")
    ios = IoCommandSet(ctrl)
    geometry = {nsid: (ns.nlbas, ns.lba_size) for nsid, ns in ctrl.namespaces.items()}
    model = Model(geometry, seed)
    errors: list[str] = []
    threads = [
        threading.Thread(target=run_fake_queue, args=(ctrl, ios, model, qid, 1500, 16, errors))
        for qid in (1, 2, 3)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
            assert not t.is_alive()
        ios.drain()
        assert not errors, errors[:5]
        assert not ctrl.double
        # A final full read-back of every namespace against the model.
        for nsid, ns in ctrl.namespaces.items():
            buf = bytearray(ns.size)
            ns.backend.readv([memoryview(buf)], 0)
            model.check(nsid, 0, bytes(buf))
        assert model.mismatches == []
        assert model.counts["read"] > 1000 and model.counts["write"] > 1000
        assert model.counts["blocks_checked"] > 20000
        # The check itself catches corruption: flip one byte of a written block.
        lba = next(iter(model.crc[1]))
        ns = ctrl.namespaces[1]
        one = bytearray(ns.lba_size)
        ns.backend.readv([memoryview(one)], lba * ns.lba_size)
        one[17] ^= 0x40
        ns.backend.writev([memoryview(one)], lba * ns.lba_size)
        model.check(1, lba, bytes(one))
        assert len(model.mismatches) == 1
    finally:
        ios.close()
        ctrl.close()


# ------------------------------------------------------------------------------ end to end


def run_driver_queue(drv, machine, model: Model, qid: int, ops: int, max_blocks: int, errors: list,
                     depth: dict | None = None) -> None:
    """One I/O queue of the host driver, QD commands in flight, one thread.

    ``depth[qid]`` gets the most commands this queue had outstanding at a doorbell write.
    """
    from pcidev_nvme.testing.driver import READ, WRITE

    rnd = random.Random(model.seed * 977 + qid)
    mem = machine.memory
    bufs = [machine.alloc(max_blocks * 4096, PAGE) for _ in range(QD)]
    free = list(range(QD))
    pending: dict[int, tuple] = {}
    submitted = completed = 0
    version = 0
    try:
        while completed < ops:
            while free and submitted < ops:
                choice = model.pick(rnd, max_blocks)
                if choice is None:
                    continue
                kind, nsid, slba, nlb = choice
                size = model.geometry[nsid][1]
                slot = free.pop()
                buf = bufs[slot]
                blocks = None
                if kind == "write":
                    version += 1
                    blocks = [model.block_data(nsid, slba + i, version * 64 + qid, size) for i in range(nlb)]
                    mem.write(buf, b"".join(blocks))
                    drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=buf, tag=slot, ring=False,
                                  fua=rnd.random() < 0.1, sgl=rnd.random() < 0.3)
                elif kind == "read":
                    mem.fill(buf, nlb * size, 0xA5)
                    drv.submit_rw(qid, READ, nsid=nsid, slba=slba, nlb=nlb, buf=buf, tag=slot, ring=False,
                                  sgl=rnd.random() < 0.3)
                elif kind == "zeroes":
                    drv.submit(qid, Opcode.WRITE_ZEROES, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                               cdw12=(nlb - 1) | (rnd.random() < 0.5) << 25, tag=slot, ring=False)
                else:
                    mem.write(buf, struct.pack("<IIQ", 0, nlb, slba))
                    drv.submit(qid, Opcode.DSM, nsid=nsid, cdw10=0, cdw11=1 << 2, buf=buf, length=16, tag=slot,
                               ring=False)
                pending[slot] = (kind, nsid, slba, nlb, blocks)
                submitted += 1
            if depth is not None:
                depth[qid] = max(depth.get(qid, 0), len(pending))
            drv.ring(qid)
            for c in drv.reap(qid, min_completions=1, timeout=20):
                slot = c.tag
                kind, nsid, slba, nlb, blocks = pending.pop(slot)
                completed += 1
                if c.status:
                    errors.append(f"{kind} ns {nsid} lba {slba}+{nlb}: status {c.status:#x}")
                elif kind == "write":
                    model.written(nsid, slba, blocks)
                elif kind in ("zeroes", "dealloc"):
                    model.zeroed(nsid, slba, nlb)
                else:
                    size = model.geometry[nsid][1]
                    model.check(nsid, slba, mem.read(bufs[slot], nlb * size))
                model.counts[kind] += 1
                model.release(nsid, slba, nlb)
                free.append(slot)
    except Exception as exc:  # report in the main thread
        errors.append(f"queue {qid}: {type(exc).__name__}: {exc}")
    finally:
        for b in bufs:
            machine.free(b)


def test_verified_io_through_the_software_host(tmp_path):
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    machine = Machine(ram_size=128 << 20)
    ctrl = NvmeController(
        f"mdts=5,ns=mem:size=4M,ns=file:path={tmp_path}/a.img,size=4M,lbaf=1,"
        f"ns=file:path={tmp_path}/b.img,size=4M,direct=on"
    )
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=3, io_depth=64)
    try:
        geometry = {nsid: (info.nsze, info.lba_size) for nsid, info in drv.namespaces.items()}
        assert sorted(geometry) == [1, 2, 3] and geometry[2][1] == 4096
        model = Model(geometry, 7)
        errors: list[str] = []
        depth: dict[int, int] = {}
        assert drv.irq_mode == "msix"
        vectors = {qid: drv.queues[qid].vector for qid in (1, 2, 3)}
        recorder = drv.pdev.recorder
        irqs0 = {qid: recorder.count(v) for qid, v in vectors.items()}
        smart = ctrl.smart
        reads0, writes0 = smart.host_read_commands, smart.host_write_commands
        threads = [
            threading.Thread(target=run_driver_queue, args=(drv, machine, model, qid, 1200, 16, errors, depth))
            for qid in (1, 2, 3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
            assert not t.is_alive()
        assert not errors, errors[:5]
        # It really went through the controller: QD 32 on each queue, each queue's own
        # MSI-X vector, and the controller counted every read and write.
        assert depth == {1: QD, 2: QD, 3: QD}
        assert len(set(vectors.values())) == 3
        for qid, v in vectors.items():
            assert recorder.count(v) > irqs0[qid], f"no MSI-X interrupt on queue {qid}'s vector {v}"
        assert smart.host_read_commands - reads0 == model.counts["read"]
        assert smart.host_write_commands - writes0 == model.counts["write"]
        # Read everything back through the controller, one namespace after another.
        for nsid, (nlbas, size) in geometry.items():
            step = 64 * 1024 // size
            for slba in range(0, nlbas, step):
                model.check(nsid, slba, drv.read(nsid, slba, min(step, nlbas - slba)))
        assert model.mismatches == []
        assert model.counts["read"] > 1000 and model.counts["write"] > 1000
        assert model.counts["blocks_checked"] > 20000
    finally:
        drv.close()
        ctrl.close()
        machine.close()
