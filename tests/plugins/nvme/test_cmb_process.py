"""An NVMe controller with a Controller Memory Buffer migrates between processes (the
device link, pcidev.transport.link.process) while the host keeps writing through an SQ in
the CMB, with data buffers in the CMB and in host memory: the CMB's memfd travels with the
stream and the destination adopts it. Every block is checked by its crc32c after each
round and all of them at the end. Over TCP the CMB's contents travel instead of its memfd
(a memory source tracked by page hashes: controller DMA writes it through a mapping of
its own), then over a UNIX socket its memfd. A PMR (a file) migrates over TCP (its
contents, written into the destination's file) and over UNIX sockets (its descriptor)."""

from __future__ import annotations

import random
import threading
import time

import crc32c

from pcidev.host import Machine
from pcidev.transport.link.process import DeviceProcess
from pcidev_nvme.testing.driver import WRITE, NvmeDriver

QD = 16
ROUNDS = 9
NS_BLOCKS = (2 << 20) // 512
OPTS = "serial=XCMBPROC,cmb_size=1,max_ioqpairs=2,msix_vectors=3,ns=mem:size=2M"


class Workload(threading.Thread):
    """Per round: QD writes through the CMB SQ (queue 2), half of them with their data in
    the CMB, then a read-back of each through the host SQ (queue 1)."""

    def __init__(self, machine: Machine, drv: NvmeDriver) -> None:
        super().__init__(daemon=True)
        self.machine, self.drv = machine, drv
        self.crc: dict[int, int] = {}
        self.rounds_done = threading.Semaphore(0)
        self.error: BaseException | None = None
        self.mismatches = 0
        self.commands = 0

    def run(self) -> None:
        try:
            drv, m = self.drv, self.machine
            rnd = random.Random(11)
            host = m.alloc(QD * 4096)
            cmb = [drv.cmb_alloc(1024) for _ in range(QD)]
            for _r in range(ROUNDS):
                written = []
                for k, slba in enumerate(rnd.sample(range(0, NS_BLOCKS - 2, 2), QD)):
                    data = rnd.randbytes(1024)
                    if k % 2:
                        drv.cmb_write(cmb[k], data)
                        buf = cmb[k]
                    else:
                        buf = host + k * 4096
                        m.write(buf, data)
                    drv.submit_rw(2, WRITE, nsid=1, slba=slba, nlb=2, buf=buf, ring=False)
                    written.append((slba, data))
                drv.ring(2)
                got = drv.reap(2, min_completions=QD, timeout=30)
                assert len(got) == QD and all(c.ok for c in got), got
                self.commands += QD
                for slba, data in written:
                    self.crc[slba] = crc32c.crc32c(data[:512])
                    self.crc[slba + 1] = crc32c.crc32c(data[512:])
                    self.mismatches += drv.read(1, slba, 2, qid=1) != data
                self.rounds_done.release()
        except BaseException as exc:
            self.error = exc
            self.rounds_done.release()


def test_cmb_sqs_and_data_migrate_between_processes(tmp_path, process_host) -> None:
    h = process_host(tmp_path, OPTS, ram=32 << 20, io_queues=2, io_depth=64, aers=1)
    src, p, drv = h.src, h.pdev, h.drv
    dst = h.destination("b")
    tcp = h.destination("t", "tcp")
    drv.cmb_enable()
    drv.delete_io_queue_pair(2)
    drv.create_io_queue_pair(2, 64, sq_in_cmb=True)
    work = Workload(h.machine, drv)
    h.listening(dst)
    h.listening(tcp)
    work.start()
    for _ in range(3):
        assert work.rounds_done.acquire(timeout=120)
        assert work.error is None, work.error
    # over TCP the CMB's contents travel (pre-copy, the rest at the stop)
    tcp_report = p.device.migrate(tcp.incoming, timeout=20)
    assert p.device.info["pid"] == tcp.pid
    assert tcp_report["fds"] == 0 and tcp_report["precopy"]["hashed_bytes"] > 0
    for _ in range(3):
        assert work.rounds_done.acquire(timeout=120)
        assert work.error is None, work.error
    report = p.device.migrate(dst.incoming, timeout=20)
    assert p.device.info["pid"] == dst.pid
    work.join(300)
    assert not work.is_alive() and work.error is None, work.error
    assert work.commands == ROUNDS * QD and work.mismatches == 0
    # every block, through the host SQ and through the CMB SQ
    zero = crc32c.crc32c(bytes(512))
    bad = 0
    for slba in range(0, NS_BLOCKS, 64):
        data = drv.read(1, slba, 64, qid=1 + (slba // 64) % 2)
        bad += sum(crc32c.crc32c(data[i * 512:(i + 1) * 512]) != work.crc.get(slba + i, zero)
                   for i in range(64))
    assert bad == 0, f"{bad} blocks differ"
    # RAM + the mem namespace + the CMB's memfd + 3 MSI-X eventfds + INTx
    assert report["fds"] == 7, report
    assert src.proc.wait(10) == 0 and src.wait_event("exit")["reason"] == "migrated"
    assert tcp.proc.wait(10) == 0 and tcp.wait_event("exit")["reason"] == "migrated"


def test_a_pmr_migrates_over_tcp_then_unix(tmp_path) -> None:
    """The PMR is a file-backed RAM BAR: over TCP its contents travel (a memory source) and
    the destination writes them into its file; then over a UNIX socket the destination
    adopts the source's descriptor of the file. The host writes the PMR through BAR4 and
    blocks of the namespace around each migration; everything is checked after each."""
    img = tmp_path / "ns.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    opts = f"serial=XPMRPROC,pmr={tmp_path / 'pmr'},pmr_size=1M,max_ioqpairs=1,msix_vectors=2," \
           f"ns=file:path={img},size=1M"
    src = DeviceProcess("nvme", f"unix:{tmp_path}/a.sock", options=opts)
    src.wait_event("ready")  # the image's identity file first (in the fingerprint)
    dst = DeviceProcess("nvme", f"unix:{tmp_path}/b.sock", options=opts, incoming=f"unix:{tmp_path}/b-in.sock")
    tcp = DeviceProcess("nvme", f"unix:{tmp_path}/t.sock", options=opts, incoming="tcp:127.0.0.1:0")
    procs = [src, dst, tcp]
    try:
        with Machine(ram_size=32 << 20) as machine:
            p = machine.plug_remote(src.link, timeout=10)
            drv = NvmeDriver(machine, p, io_queues=1, aers=0)
            drv.probe()
            drv.write32(0xE04, 1)  # PMRCTL.EN
            rnd = random.Random(3)
            words: dict[int, int] = {}
            blocks: dict[int, bytes] = {}

            def host_io(n: int) -> None:
                for _ in range(n):
                    i = rnd.randrange(0, 2048)
                    words[i] = rnd.getrandbits(32)
                    p.bar_write(4, 8 * i, 4, words[i])
                    slba = rnd.randrange(0, 2040)
                    data = rnd.randbytes(1024)
                    drv.write(1, slba, data)
                    blocks[slba], blocks[slba + 1] = data[:512], data[512:]

            def check() -> None:
                assert all(p.bar_read(4, 8 * i, 4) == w for i, w in words.items())
                assert all(crc32c.crc32c(drv.read(1, slba, 1)) == crc32c.crc32c(b) for slba, b in blocks.items())

            host_io(256)
            tcp.incoming = tcp.wait_event("listening")["incoming"]
            report = p.device.migrate(tcp.incoming, timeout=20)
            assert p.device.info["pid"] == tcp.pid and report["fds"] == 0 and report["precopy"] is not None
            check()
            host_io(256)
            dst.wait_event("listening")
            p.device.migrate(dst.incoming, timeout=20)
            assert p.device.info["pid"] == dst.pid
            check()
            assert drv.read32(0xE04) == 1  # PMRCTL.EN travelled
            deadline = time.monotonic() + 1.0
            while drv.read32(0xE08) & (1 << 8):  # and it is ready within PMRTO
                assert time.monotonic() < deadline
            with open(tmp_path / "pmr", "rb") as f:  # (a PMRSTS read made it persistent)
                raw = f.read(8 * 2048)
            assert all(int.from_bytes(raw[8 * i:8 * i + 4], "little") == w for i, w in words.items())
        assert tcp.proc.wait(10) == 0 and tcp.wait_event("exit")["reason"] == "migrated"
    finally:
        for proc in procs:
            proc.stop()
