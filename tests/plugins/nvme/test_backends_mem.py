"""Anonymous ``mem`` namespaces (``anon=on``: an anonymous private mapping, no memfd)
migrate by their contents (pcidev_nvme.backends.mem): over a UNIX socket a memfd copy of
the pages written is made at the stop and travels (the destination maps it: from then
on its namespace is memfd-backed), over TCP the mapping is a memory source read in place
(pre-copied while the host keeps writing, the rest at the stop). In process and between
processes, over UNIX and TCP, every block is checked by its CRC-32C before and after,
with verified I/O running across the migrations."""

from __future__ import annotations

import os
import random
import threading

import crc32c
import pytest
from _tcp_host import ChannelHost

from pcidev.host import Machine
from pcidev.migration import collect_blockers, descriptor_blockers
from pcidev_nvme.backends import MemoryBackend
from pcidev_nvme.testing.driver import WRITE, NvmeDriver

MiB = 1 << 20
NS_BLOCKS = (8 * MiB) // 512
CONFIG = "serial=XANON,max_ioqpairs=2,msix_vectors=3,ns=mem:size=8M,anon=on"


# ------------------------------------------------------------------------------ the backend
def test_anonymous_memory_is_a_source_read_in_place_and_copied_into_a_memfd_at_the_stop():
    b = MemoryBackend(MiB, anon=True)
    try:
        assert b.anonymous and b.fd < 0
        src = b.memory_source("nvme/ns1", covers=frozenset({"nvme-backend:mem"}))
        assert src is not None and src.buffer is not None and src.bitmap is b.dirty
        assert src.size == MiB and src.name == f"nvme/ns1@{os.fstat(src.fd).st_ino}"
        assert b.memory_source("nvme/ns1", covers=src.covers) == src  # the same export memfd each time
        data = random.Random(1).randbytes(3 * 4096)
        b.writev([memoryview(data)], 8192)
        fd = b.stream_fd()  # the save: the pages written, holes elsewhere
        assert fd == src.fd and b.same_memory(fd)
        assert os.pread(fd, 3 * 4096, 8192) == data and os.pread(fd, 8192, 0) == bytes(8192)
        assert os.fstat(fd).st_blocks * 512 <= 4 * 4096  # sparse
        b.deallocate(8192, 4096)  # a later save holds exactly what the memory holds now
        b.stream_fd()
        assert os.pread(fd, 4096, 8192) == bytes(4096) and os.pread(fd, 8192, 12288) == data[4096:]
        # the destination maps the memfd it gets: memfd-backed from then on
        moved = MemoryBackend.from_fd(fd, MiB)
        try:
            assert not moved.anonymous and moved.allocated_bytes() == 2 * 4096
            out = bytearray(3 * 4096)
            moved.readv([memoryview(out)], 8192)
            assert bytes(out) == bytes(4096) + data[4096:]
        finally:
            moved.close()
    finally:
        b.close()
    assert b.memory_source("nvme/ns1") is None


def test_an_anonymous_namespace_no_longer_blocks_any_channel():
    h = ChannelHost(CONFIG)
    try:
        assert collect_blockers(h.ctrl) == []
        sources = h.ctrl.memory_sources()
        assert [s.name.split("@")[0] for s in sources] == ["nvme/ns1"]
        assert descriptor_blockers(h.ctrl, "a migration over TCP", sources) == []
        assert "nvme-backend:mem-anonymous" not in h.ctrl.enabled_features()
    finally:
        h.close()


# ------------------------------------------------------------------------------ in process
def _fill(h: ChannelHost, seed: int, count: int = 64) -> None:
    rng = random.Random(seed)
    for slba in rng.sample(range(0, NS_BLOCKS - 8, 8), count):
        h.write(1, slba, rng.randbytes(8 * 512), qid=1 + slba % 2)


def _writer(h: ChannelHost, seed: int):
    """The host's verified writes while a pre-copy runs (until told to stop), paced: a
    writer in the destination's own interpreter that never sleeps takes the GIL from the
    receiving thread (the pre-copy then ends not converged, by its stalled passes)."""
    def run(stop: threading.Event) -> None:
        rng = random.Random(seed)
        while not stop.wait(0.001):
            slba = rng.randrange(0, NS_BLOCKS - 8)
            h.write(1, slba, rng.randbytes(8 * 512), qid=1)
    return run


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_an_anonymous_namespace_migrates_in_process_with_every_block(tcp):
    h = ChannelHost(CONFIG)
    try:
        _fill(h, 1)
        h.verify(1, NS_BLOCKS)
        before = h.writes
        result = h.move(tcp=tcp, during=_writer(h, 2))
        if tcp:
            assert h.writes > before  # the host wrote while the pre-copy ran
            assert result.fds == 0 and result.precopy is not None and result.precopy.iterations >= 1
            assert result.precopy.bytes_per_iteration[0] >= 64 * 8 * 512
        else:
            assert result.fds > 0
        assert h.verify(1, NS_BLOCKS) == NS_BLOCKS
        ns = h.ctrl.allocated[1].backend
        assert isinstance(ns, MemoryBackend) and not ns.anonymous  # memfd-backed on the destination
        _fill(h, 3)  # it serves on, and migrates again (now a plain memfd namespace)
        h.move(tcp=not tcp, during=_writer(h, 4))
        assert h.verify(1, NS_BLOCKS) == NS_BLOCKS
    finally:
        h.close()


# ------------------------------------------------------------------------------ between processes
class Workload(threading.Thread):
    """Rounds of 16 writes on queue 1 (random 8-block extents), each read back through
    queue 2 and checked; every block's CRC-32C recorded. Runs until :meth:`stop`."""

    def __init__(self, machine: Machine, drv: NvmeDriver) -> None:
        super().__init__(daemon=True)
        self.machine, self.drv = machine, drv
        self.crc: dict[int, int] = {}
        self.error: BaseException | None = None
        self.completed = self.mismatches = 0
        self.halt = threading.Event()
        self.progress = threading.Condition()

    def run(self) -> None:
        try:
            rng, drv, m = random.Random(5), self.drv, self.machine
            buf = m.alloc(16 * 4096)
            while not self.halt.is_set():
                written = []
                for k, slba in enumerate(rng.sample(range(0, NS_BLOCKS - 8, 8), 16)):
                    data = rng.randbytes(4096)
                    m.write(buf + k * 4096, data)
                    drv.submit_rw(1, WRITE, nsid=1, slba=slba, nlb=8, buf=buf + k * 4096)
                    written.append((slba, data))
                got = drv.reap(1, min_completions=16, timeout=60)
                assert len(got) == 16 and all(c.ok for c in got), got
                for slba, data in written:
                    for i in range(8):
                        self.crc[slba + i] = crc32c.crc32c(data[i * 512:(i + 1) * 512])
                    self.mismatches += drv.read(1, slba, 8, qid=2) != data
                with self.progress:
                    self.completed += 16
                    self.progress.notify_all()
        except BaseException as exc:
            self.error = exc
            with self.progress:
                self.progress.notify_all()

    def wait_completed(self, n: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: self.completed >= n or self.error is not None, 120)
        assert self.error is None, self.error

    def stop(self) -> None:
        self.halt.set()
        self.join(120)
        assert not self.is_alive() and self.error is None, self.error

    def verify_everything(self) -> None:
        zero, bad = crc32c.crc32c(bytes(512)), 0
        for slba in range(0, NS_BLOCKS, 64):
            data = self.drv.read(1, slba, 64, qid=1 + (slba // 64) % 2)
            bad += sum(crc32c.crc32c(data[i * 512:(i + 1) * 512]) != self.crc.get(slba + i, zero)
                       for i in range(64))
        assert bad == 0, f"{bad} blocks differ"


def test_an_anonymous_namespace_migrates_between_processes_over_tcp_and_unix(tmp_path, process_host):
    h = process_host(tmp_path, CONFIG, ram=32 << 20, io_queues=2, io_depth=64, aers=1)
    src, p, drv = h.src, h.pdev, h.drv
    tcp = h.destination("t", "tcp")
    unix = h.destination("u")
    work = Workload(h.machine, drv)
    work.start()
    work.wait_completed(64)
    h.listening(tcp)
    report = p.device.migrate(tcp.incoming, timeout=30)
    assert p.device.info["pid"] == tcp.pid
    assert report["fds"] == 0 and report["precopy"]["iterations"] >= 1, report
    work.wait_completed(work.completed + 64)
    h.listening(unix)
    report = p.device.migrate(unix.incoming, timeout=30)
    assert p.device.info["pid"] == unix.pid and report["fds"] > 0
    work.wait_completed(work.completed + 64)
    work.stop()
    assert work.mismatches == 0
    work.verify_everything()
    assert src.proc.wait(10) == 0 and src.wait_event("exit")["reason"] == "migrated"
    assert tcp.proc.wait(10) == 0 and tcp.wait_event("exit")["reason"] == "migrated"


def test_a_staged_page_map_gives_the_same_backend_as_a_scan_without_one():
    """MemoryBackend.from_fd(allocated=) -- the map the migration channel hands over beside a
    staged memfd -- builds the same written-page map (NUSE, the hole-reading shortcut) as the
    SEEK_DATA scan it replaces, and the same contents; a map of the wrong length is ignored."""
    size = 4 << 20
    fd = os.memfd_create("staged")
    try:
        os.ftruncate(fd, size)
        rng = random.Random(3)
        pages = bytearray(size // 4096)
        for _ in range(200):
            page = rng.randrange(len(pages))
            os.pwrite(fd, os.urandom(4096), page * 4096)
            pages[page] = 1
        scanned = MemoryBackend.from_fd(fd, size)
        given = MemoryBackend.from_fd(fd, size, allocated=bytes(p * 7 for p in pages))  # any nonzero byte
        wrong = MemoryBackend.from_fd(fd, size, allocated=bytes(10))
        try:
            assert given._written == scanned._written == wrong._written == pages
            assert given._unwritten == scanned._unwritten == pages.count(0)
            for page in range(0, len(pages), 37):
                assert bytes(given._mv[page * 4096:(page + 1) * 4096]) == os.pread(fd, 4096, page * 4096)
        finally:
            for b in (scanned, given, wrong):
                b.close()
    finally:
        os.close(fd)
