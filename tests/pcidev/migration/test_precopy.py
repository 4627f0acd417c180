"""Pre-copy of memory contents over TCP (pcidev.migration.precopy): dirty bitmaps, the
default memory sources of RAM BARs, and whole migrations between two threads while a
third keeps writing the BAR (through MMIO, or through a direct mapping tracked by page
hashes), with every page verified (CRC-32C) at the stop."""

from __future__ import annotations

import mmap
import os
import random
import socket
import threading
import time

import attrs
import crc32c
import pytest
from precopy_device import Incoming, PrecopyDev, page_crcs, tcp_pair

from pcidev.bar import RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError, MigrationBlockedError, MigrationError, TransportError, VMStateError
from pcidev.memory_source import ALLOCATION_PAGE, DirtyBitmap, MemorySource
from pcidev.migration import descriptor_blockers, migrate_out
from pcidev.migration.frames import FRAME_HEADER, MAGIC, NACK
from pcidev.migration.precopy import Precopy, PrecopyReport, _Staged
from pcidev.vmstate import FdRef, vmstate

MiB = 1 << 20


# ------------------------------------------------------------------------- DirtyBitmap
def test_a_bitmap_records_only_while_tracking_and_merges_runs():
    bm = DirtyBitmap(10 * 65536 + 100)
    bm.mark(0, 10)
    assert not bm.tracking and bm.take() == [] and bm.dirty_bytes() == 0
    bm.start()
    assert bm.tracking and bm.take() == [(0, 10 * 65536 + 100)]  # everything, cut to the size
    assert bm.take() == []
    bm.mark(65536 * 2 + 5, 1)
    bm.mark(65536 * 3 - 1, 2)  # straddles granules 2 and 3
    bm.mark(65536 * 10, 50)  # the last, partial granule
    bm.mark(-5, 1)  # outside: ignored
    bm.mark(10 * 65536 + 100, 8)
    bm.mark(65536 * 7, 0)
    assert bm.dirty_bytes() == 3 * 65536
    assert bm.take() == [(2 * 65536, 2 * 65536), (10 * 65536, 100)]
    assert bm.dirty_bytes() == 0
    bm.stop()
    bm.mark(0, 1)
    assert not bm.tracking and bm.take() == []


@pytest.mark.parametrize("size, granule", [(0, 65536), (4096, 1000), (4096, 2048), (4096, 3 * 4096)])
def test_a_bad_bitmap_is_refused(size, granule):
    with pytest.raises(ConfigError):
        DirtyBitmap(size, granule)


def test_no_mark_is_lost_when_take_races_with_writers():
    """Writers store a value then mark; a reader takes and reads: every final value is
    seen by some read after its mark (the rule of DirtyBitmap)."""
    size = 256 * 4096
    mem = bytearray(size)
    bm = DirtyBitmap(size, 4096)
    bm.start()
    copy = bytearray(size)
    stop = threading.Event()

    def writer(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            off = rng.randrange(0, size // 8) * 8
            mem[off:off + 8] = rng.randbytes(8)
            bm.mark(off, 8)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        for off, n in bm.take():
            copy[off:off + n] = mem[off:off + n]
    stop.set()
    for t in threads:
        t.join()
    for off, n in bm.take():
        copy[off:off + n] = mem[off:off + n]
    assert copy == mem


# ------------------------------------------------------------------- memory sources
def test_the_default_sources_are_the_memfd_ram_bars(tmp_path):
    dev = PrecopyDev(64 * 1024)
    try:
        (src,) = dev.memory_sources()
        assert (src.name, src.fd, src.size, src.bitmap) == ("bar2", dev.ram.fd, 64 * 1024, dev.ram.dirty)
        assert descriptor_blockers(dev, "a migration over TCP", [src]) == []
        # the MMIO path marks it
        dev.realize()
        src.bitmap.start()
        src.bitmap.take()
        dev.bar_write(2, 0x1008, 8, 0x1122334455667788, check_decode=False)
        assert src.bitmap.take() == [(0, 64 * 1024)]
        src.bitmap.stop()
        # handed out (a vfio-user client maps it): tracked by hashes
        assert dev.ram.export_fd() == dev.ram.fd
        (src,) = dev.memory_sources()
        assert src.bitmap is None
    finally:
        dev.close()

    class FileBar(PrecopyDev):
        def describe(self):
            super().describe()
            self.ram.close()
            self.ram = RamBacking(self.size, path=str(tmp_path / "bar.img"))
            self.bars[2].handler = self.ram

    dev = FileBar(64 * 1024)
    try:  # a file-backed BAR is a source too (the destination copies into its own file)
        (src,) = dev.memory_sources()
        assert src.name == "bar2" and src.size == 64 * 1024 and src.bitmap is dev.ram.dirty
        assert (os.fstat(src.fd).st_dev, os.fstat(src.fd).st_ino) == dev.ram.identity
    finally:
        dev.close()


def test_fd_features_block_unless_a_source_covers_them():
    class FdDev(PrecopyDev):
        FD_FEATURES = frozenset({"blob", "other"})
        MIGRATABLE_FEATURES = frozenset({"blob", "other"})

        def enabled_features(self):
            return super().enabled_features() | {"blob", "other"}

    dev = FdDev(64 * 1024)
    try:
        blob = MemorySource(name="blob", fd=dev.ram.fd, size=4096, covers=frozenset({"blob"}))
        # (its descriptor is the BAR's memfd: it covers the BAR too)
        assert descriptor_blockers(dev, "TCP", [blob]) == [
            "feature 'other' migrates only as a file descriptor, which TCP cannot carry"]
        assert len(descriptor_blockers(dev, "TCP")) == 3  # the BAR and both features
    finally:
        dev.close()


# ----------------------------------------------------------------- whole migrations
class Writer:
    """A thread writing the source's BAR2 through MMIO (8 bytes at a time) until stopped."""

    def __init__(self, dev, *, pause: float = 0.0, seed: int = 1, mapped: mmap.mmap | None = None,
                 sweep: bool = False):
        self.dev = dev
        self.pause = pause
        self.sweep = sweep  # one write per 64 KiB granule in turn: a few writes dirty everything
        self.rng = random.Random(seed)
        self.mapped = mapped
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        size = self.dev.size
        while not self.stop.is_set():
            if self.sweep:
                off = (self.writes * 65536 + self.rng.randrange(0, 8192) * 8) % size
            else:
                off = self.rng.randrange(0, size // 8) * 8
            value = self.rng.getrandbits(64) | 1
            if self.mapped is not None:
                self.mapped[off:off + 8] = value.to_bytes(8, "little")
            else:
                with self.dev.lock:
                    self.dev.bar_write(2, off, 8, value, check_decode=False)
            self.writes += 1
            if self.pause:
                time.sleep(self.pause)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def _fill(dev, seed):
    """Data in the first half of the BAR, the second half left a hole."""
    rng = random.Random(seed)
    dev.ram.mem[:dev.size // 2] = rng.randbytes(dev.size // 2)


def _migrate(src, dst, *, writer_kw=None, before_stop=None, **precopy_kw):
    """Pre-copy while a writer writes, stop the writer, migrate; returns (result, incoming, report)."""
    with Incoming(dst, tcp_pair(), timeout=30) as inc:
        p = Precopy(src, inc.sock, timeout=30, **precopy_kw)
        assert p.active
        with Writer(src, **(writer_kw or {})) as w:
            time.sleep(0.05)
            p.run()
        assert w.writes > 0
        if before_stop is not None:
            before_stop()
        result = migrate_out(src, inc.sock, precopy=p, timeout=30)
    assert inc.error is None, inc.error
    return result, inc.result, p


def test_a_ram_bar_migrates_over_tcp_while_mmio_writes_it():
    src, dst = PrecopyDev(4 * MiB), PrecopyDev(4 * MiB)
    try:
        src.realize()
        _fill(src, 1)
        src.regs["X"].value = 42
        result, incoming, p = _migrate(src, dst, writer_kw={"pause": 0.005})
        assert src.quiesced and src.migrated_out
        assert page_crcs(dst.ram) == page_crcs(src.ram)  # every page, as the source had it at the stop
        assert dst.regs["X"].value == 42
        rep = result.precopy
        assert isinstance(rep, PrecopyReport) and rep == p.report
        assert rep.converged and 1 <= rep.iterations <= 30
        assert 2 * MiB <= rep.bytes_per_iteration[0] < 3 * MiB  # most of the hole was skipped
        assert rep.bandwidth > 0 and rep.remainder_bytes < 4 * MiB
        assert result.as_dict()["precopy"]["iterations"] == rep.iterations
        assert result.deferred and result.fds == 0
        assert not src.ram.dirty.tracking  # released
        # the destination's BAR is its own memfd (the staging one it adopted), not shared
        assert not os.path.sameopenfile(dst.ram.fd, src.ram.fd)
        incoming.resources.close()
    finally:
        src.close()
        dst.close()


def test_a_low_bandwidth_and_a_fast_writer_do_not_converge_but_migrate():
    src, dst = PrecopyDev(MiB), PrecopyDev(MiB)
    try:
        src.realize()
        _fill(src, 2)
        result, incoming, _p = _migrate(src, dst, writer_kw={"sweep": True}, max_bandwidth=2 * MiB,
                                        max_iterations=3)
        rep = result.precopy
        assert not rep.converged and rep.iterations == 3 and rep.ended == "max-iterations"
        assert rep.estimated_downtime_ms > 10
        assert 0 < rep.bandwidth <= 2.5 * MiB  # throttled
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        incoming.resources.close()
    finally:
        src.close()
        dst.close()


def test_passes_that_stop_shrinking_end_the_precopy_before_max_iterations():
    """A writer that dirties everything each pass: the remainder never shrinks, so after
    ``max_stalled_passes`` passes no smaller than the best one the pre-copy gives up
    (not converged) instead of making all ``max_iterations`` passes; the stop copies
    the rest and every page arrives."""
    src, dst = PrecopyDev(MiB), PrecopyDev(MiB)
    try:
        src.realize()
        _fill(src, 3)
        result, incoming, _p = _migrate(src, dst, writer_kw={"sweep": True}, max_bandwidth=8 * MiB,
                                        max_iterations=30, max_stalled_passes=2)
        rep = result.precopy
        assert rep.ended == "not-converging" and not rep.converged
        later = rep.bytes_per_iteration[1:]
        assert 3 <= rep.iterations < 30 and min(later[-2:]) >= min(later[:-2])
        assert result.as_dict()["precopy"]["ended"] == "not-converging"
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        incoming.resources.close()
    finally:
        src.close()
        dst.close()


def test_writes_through_a_direct_mapping_are_caught_by_page_hashes():
    src, dst = PrecopyDev(2 * MiB), PrecopyDev(2 * MiB)
    peer = None
    try:
        src.realize()
        _fill(src, 3)
        fd = src.ram.export_fd()  # a peer maps it: writes never pass through RamBacking.write
        peer = mmap.mmap(fd, src.size)
        assert src.memory_sources()[0].bitmap is None
        with Incoming(dst, tcp_pair(), timeout=30) as inc:
            p = Precopy(src, inc.sock, timeout=30)
            with Writer(src, mapped=peer, pause=0.0002) as w:
                time.sleep(0.05)
                p.run()
            assert w.writes > 0
            # and a last write after the pre-copy, before the stop: only the hash at the stop sees it
            peer[src.size - 8:] = b"lastword"
            result = migrate_out(src, inc.sock, precopy=p, timeout=30)
        rep = result.precopy
        assert rep.hashed_bytes >= 2 * src.size and rep.hash_seconds > 0 and rep.remainder_bytes >= 4096
        assert bytes(dst.ram.mem[-8:]) == b"lastword"
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        inc.result.resources.close()
    finally:
        if peer is not None:
            peer.close()
        src.close()
        dst.close()


def test_without_a_precopy_everything_is_copied_at_the_stop():
    src, dst = PrecopyDev(MiB), PrecopyDev(MiB)
    try:
        _fill(src, 4)
        with Incoming(dst, tcp_pair()) as inc:
            result = migrate_out(src, inc.sock)
        assert result.precopy.iterations == 0 and result.precopy.remainder_bytes == MiB // 2
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        inc.result.resources.close()
    finally:
        src.close()
        dst.close()


def test_over_unix_nothing_is_streamed_and_the_memfd_travels():
    src, dst = PrecopyDev(MiB), PrecopyDev(MiB)
    try:
        _fill(src, 5)
        with Incoming(dst, socket.socketpair()) as inc:
            p = Precopy(src, inc.sock)
            assert not p.active
            p.run()  # (only the pre-flight)
            assert p.verdict is not None and p.verdict.ok
            result = migrate_out(src, inc.sock, precopy=p)
        assert result.precopy is None and result.as_dict()["precopy"] is None and result.fds == 1
        assert os.path.sameopenfile(dst.ram.fd, src.ram.fd)
        inc.result.resources.close()
    finally:
        src.close()
        dst.close()


def test_a_precopy_runs_once_and_a_failed_one_blocks_the_migration():
    src = PrecopyDev(64 * 1024)
    a, b = tcp_pair()
    try:
        p = Precopy(src, a, timeout=1)
        b.close()
        with pytest.raises(MigrationError, match="keeps running on the source"):
            for _ in range(50):  # the first sends may still land in the socket buffer
                p = Precopy(src, a, timeout=1)
                src.ram.mem[:8] = os.urandom(8)
                p.run()
        assert p.failed and not src.ram.dirty.tracking
        with pytest.raises(MigrationError, match="cannot run"):
            p.run()
        with pytest.raises(MigrationBlockedError, match="its pre-copy failed"):
            migrate_out(src, a, precopy=p)
        assert not src.quiesced
    finally:
        a.close()
        src.close()


def test_bad_sources_are_refused_before_anything_starts():
    class Twice(PrecopyDev):
        def memory_sources(self):
            return super().memory_sources() * 2

    class Broken(PrecopyDev):
        def memory_sources(self):
            raise RuntimeError("no")

    for cls, text in [(Twice, "appears twice"), (Broken, "memory_sources\\(\\) failed")]:
        dev = cls(64 * 1024)
        a, b = tcp_pair()
        try:
            with pytest.raises(MigrationError, match=text):
                Precopy(dev, a)
            with pytest.raises(MigrationBlockedError, match=text):
                migrate_out(dev, a)
            assert not dev.quiesced
        finally:
            a.close()
            b.close()
            dev.close()


# ------------------------------------------------- a device's own memfd, and late sources
@vmstate("test/precopy-blob-device")
@attrs.frozen
class BlobState:
    blob: FdRef | None = None


class BlobDev(PciDevice):
    """A device whose state names a memfd of its own (as an NVMe ``mem`` namespace does):
    a memory source only once ``offered`` (so one can appear between pre-copy and stop)."""

    TYPE_NAME = "test-precopy-blob"
    CLASS_CODE = 0xFF0000
    VMSTATE = BlobState
    FD_FEATURES = frozenset({"blob"})
    MIGRATABLE_FEATURES = frozenset({"blob"})
    SIZE = 3 * MiB + 4096

    def __init__(self) -> None:
        self.fd = os.memfd_create("blob", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.SIZE)
        self.offered = True
        super().__init__()

    def describe(self):
        self.add_mem_bar(0, 4096, RegisterMap(4096, [Register("X", 0)]))
        self.ram = RamBacking(65536)  # a source from the start: the pre-copy is active
        self.add_mem_bar(2, 65536, self.ram)

    def enabled_features(self):
        return super().enabled_features() | {"blob"}

    def memory_sources(self):
        mine = [MemorySource(name="blob", fd=self.fd, size=self.SIZE, covers=frozenset({"blob"}))]
        return super().memory_sources() + (mine if self.offered else [])

    def get_device_state(self):
        return BlobState(blob=self.vmstate_fd(self.fd))

    def check_device_state(self, state):
        fd = self.vmstate_load_fd(state.blob)
        if fd is None or os.fstat(fd).st_size != self.SIZE:
            raise ValueError("no blob of the right size")

    def set_device_state(self, state):
        fd = self.vmstate_load_fd(state.blob)
        os.close(self.fd)
        self.fd = os.dup(fd)

    def on_close(self):
        os.close(self.fd)
        self.ram.close()


def _blob_crcs(fd, size):
    return [crc32c.crc32c(os.pread(fd, PAGE_SIZE, i)) for i in range(0, size, PAGE_SIZE)]


PAGE_SIZE = 4096


@pytest.mark.parametrize("late", [False, True])
def test_a_devices_own_memfd_travels_by_its_contents_even_when_it_appears_at_the_stop(late):
    src, dst = BlobDev(), BlobDev()
    try:
        os.pwrite(src.fd, random.Random(8).randbytes(MiB), 0)
        os.pwrite(src.fd, b"tail" * 1024, BlobDev.SIZE - 4096)  # a hole between
        src.offered = not late
        with Incoming(dst, tcp_pair(), timeout=10) as inc:
            p = Precopy(src, inc.sock, timeout=10)
            assert [s.name for s in p.sources()] == (["bar2"] if late else ["bar2", "blob"])
            p.run()
            src.offered = True  # late: announced by a second MEMORY at the stop, sent whole
            result = migrate_out(src, inc.sock, precopy=p, timeout=10)
        assert result.precopy.remainder_bytes == (MiB + 4096 if late else 0)
        assert _blob_crcs(dst.fd, BlobDev.SIZE) == _blob_crcs(src.fd, BlobDev.SIZE)
        assert not os.path.sameopenfile(dst.fd, src.fd)
        inc.result.resources.close()
    finally:
        src.close()
        dst.close()


def test_a_source_that_became_another_object_fails_the_stop_and_the_device_runs_on():
    src, dst = BlobDev(), BlobDev()
    try:
        with Incoming(dst, tcp_pair(), timeout=5) as inc:
            p = Precopy(src, inc.sock, timeout=5)
            p.run()
            os.close(src.fd)
            src.fd = os.memfd_create("other")
            os.ftruncate(src.fd, BlobDev.SIZE)
            with pytest.raises(MigrationError, match="'blob' is another object"):
                migrate_out(src, inc.sock, precopy=p, timeout=5)
            assert not src.quiesced and p.failed
        assert isinstance(inc.error, (TransportError, VMStateError))  # the channel ended before any OFFER
    finally:
        src.close()
        dst.close()


def test_a_cancelled_precopy_leaves_the_device_running():
    src = PrecopyDev(16 * MiB)
    a, b = tcp_pair(buffers=64 << 10)
    cancel = threading.Event()
    try:
        src.ram.mem[:] = random.Random(9).randbytes(16 * MiB)
        before = page_crcs(src.ram)
        p = Precopy(src, a, timeout=10, preflight=False)  # (nobody answers: a reader drains the channel)
        threading.Timer(0.05, cancel.set).start()
        drain = threading.Thread(target=lambda: _drain(b), daemon=True)
        drain.start()
        with pytest.raises(MigrationError, match="cancelled"):
            p.run(cancel)
        assert p.failed and not src.ram.dirty.tracking and not src.quiesced
        assert page_crcs(src.ram) == before
    finally:
        a.close()
        b.close()
        src.close()


def _drain(sock):
    """Read slowly (so that the pre-copy is still sending when it is cancelled)."""
    try:
        while sock.recv(4096):
            time.sleep(0.001)
    except OSError:
        pass


@pytest.mark.parametrize("refuse", [False, True])
def test_a_destination_bar_a_peer_maps_gets_the_contents_copied_in(refuse):
    """The destination's BAR memfd was handed to a client (vfio-user's sparse mmap): the
    contents are copied into it, so the client's mapping sees them; a refused load puts
    its own contents back."""

    class Refusing(PrecopyDev):
        def set_device_state(self, state):
            if refuse:
                raise RuntimeError("refused on purpose")
            super().set_device_state(state)

    src, dst = PrecopyDev(MiB), Refusing(MiB)
    peer = None
    try:
        _fill(src, 10)
        dst.ram.mem[:] = b"\x77" * MiB
        own = page_crcs(dst.ram)
        peer = mmap.mmap(dst.ram.export_fd(), MiB)
        fd_before = dst.ram.fd
        with Incoming(dst, tcp_pair(), timeout=10) as inc:
            if refuse:
                with pytest.raises(MigrationError, match="refused on purpose"):
                    migrate_out(src, inc.sock, timeout=10)
            else:
                migrate_out(src, inc.sock, timeout=10)
        assert isinstance(inc.error, VMStateError) if refuse else inc.error is None
        assert dst.ram.fd == fd_before  # its own memfd, the one the peer maps
        if refuse:
            assert page_crcs(dst.ram) == own and peer[:MiB] == b"\x77" * MiB
            assert not src.quiesced
        else:
            assert page_crcs(dst.ram) == page_crcs(src.ram) and peer[:MiB] == bytes(src.ram.mem)
            inc.result.resources.close()
    finally:
        if peer is not None:
            peer.close()
        src.close()
        dst.close()


def test_a_second_mapping_in_this_process_switches_to_hashes_even_after_the_precopy():
    """A device's own window on its RAM BAR (as a controller's DMA view of its memory
    buffer) writes past RamBacking.write: the BAR is then tracked by hashes, and if the
    window appeared after the pre-copy started the whole BAR is sent again at the stop."""
    src, dst = PrecopyDev(MiB), PrecopyDev(MiB)
    window = None
    try:
        _fill(src, 11)
        assert src.memory_sources()[0].bitmap is src.ram.dirty
        with Incoming(dst, tcp_pair(), timeout=10) as inc:
            p = Precopy(src, inc.sock, timeout=10)
            p.run()
            window = mmap.mmap(src.ram.fd, MiB)  # not through export_fd
            assert src.memory_sources()[0].bitmap is None
            window[:4096] = b"\x00" * 4096  # zeros where data was: sent as a hole
            window[MiB - 4096:] = b"\x42" * 4096
            result = migrate_out(src, inc.sock, precopy=p, timeout=10)
        assert result.precopy.remainder_bytes == MiB
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        inc.result.resources.close()
    finally:
        if window is not None:
            window.close()
        src.close()
        dst.close()


def test_a_window_mapped_and_dropped_during_the_precopy_still_sends_the_bar_whole():
    """Review G #4: a second mapping that exists only between the announcement and the stop
    (a CMB/PMR window enabled, DMA-written, disabled) leaves one mapping in
    /proc/self/maps at the stop; the loss of exact tracking is sticky for the session, so
    the BAR is sent whole and the write is not lost."""
    src, dst = PrecopyDev(MiB), PrecopyDev(MiB)
    try:
        src.ram.mem[:MiB // 2] = b"\x11" * (MiB // 2)
        with Incoming(dst, tcp_pair(), timeout=10) as inc:
            p = Precopy(src, inc.sock, timeout=10)
            p.run()
            window = mmap.mmap(src.ram.fd, MiB)  # the device's own window appears...
            window[MiB - 4096:] = b"\x42" * 4096  # ...DMA writes through it (no mark)...
            window.close()  # ...and the window is gone again before the stop
            assert src.memory_sources()[0].bitmap is None  # sticky
            result = migrate_out(src, inc.sock, precopy=p, timeout=10)
        assert result.precopy.remainder_bytes == MiB
        assert page_crcs(dst.ram) == page_crcs(src.ram)
        assert bytes(dst.ram.mem[MiB - 4096:]) == b"\x42" * 4096
        inc.result.resources.close()
        # a new tracking session starts exact again (nothing maps the BAR any more)
        assert src.memory_sources()[0].bitmap is src.ram.dirty
    finally:
        src.close()
        dst.close()


def test_a_window_created_between_the_check_and_the_start_is_not_missed():
    """The descriptor read after the last check that found one mapping (before tracking
    starts) counts too: the window may have been made with it."""
    dev = PrecopyDev(MiB)
    try:
        assert dev.memory_sources()[0].bitmap is dev.ram.dirty  # the check before the session
        window = mmap.mmap(dev.ram.fd, MiB)
        dev.ram.dirty.start()
        window[:8] = b"unseen!!"
        window.close()
        assert dev.memory_sources()[0].bitmap is None
        dev.ram.dirty.stop()
    finally:
        dev.close()


def test_abort_from_another_thread_waits_for_run_and_stops_the_tracking():
    """Review G #11: abort() while run() is mid-way (even inside the announcement) closes
    nothing under it, and the tracking is off when both returned; run() raises and the
    state stays aborted."""
    for where in ("announce", "pass"):
        src = PrecopyDev(4 * MiB)
        a, b = tcp_pair(buffers=64 * 1024)
        drain = None
        if where == "announce":  # a destination that reads everything: run() could complete
            def reader(sock=b):
                try:
                    while sock.recv(1 << 20):
                        pass
                except OSError:
                    pass
            drain = threading.Thread(target=reader, daemon=True)
            drain.start()
        # (else nobody reads b: the first pass blocks in a send)
        try:
            _fill(src, 5)
            p = Precopy(src, a, timeout=2.0, max_bandwidth=None, preflight=False)  # (no destination answers)
            errors = []
            if where == "announce":
                real = p._announce
                entered = threading.Event()

                def slow_announce(sources, real=real, entered=entered):
                    entered.set()
                    time.sleep(0.3)  # abort() arrives in here
                    real(sources)

                p._announce = slow_announce
            t = threading.Thread(target=lambda e=errors, run=p.run: e.append(_raises(run)), daemon=True)
            t.start()
            if where == "announce":
                assert entered.wait(5)
            else:
                deadline = time.monotonic() + 5
                while not src.ram.dirty.tracking and time.monotonic() < deadline:
                    time.sleep(0.001)
                time.sleep(0.05)  # blocked in a send of the first pass
            p.abort()
            assert not t.is_alive()  # abort() returned only after run() ended
            assert isinstance(errors[0], MigrationError)
            assert p.failed and not src.ram.dirty.tracking
            assert all(tr.fd == -1 for tr in p._tracked.values())
            with pytest.raises(MigrationError):
                p.finish()
        finally:
            a.close()
            b.close()
            if drain is not None:
                drain.join(5)
            src.close()


def _raises(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    return None


# ---------------------------------------------------------------- the staging's page map
def _seek_pages(fd: int, size: int) -> bytes:
    """Which pages of ``fd`` hold data, as SEEK_DATA/SEEK_HOLE tell it (the truth the map stands for)."""
    pages = bytearray(-(-size // ALLOCATION_PAGE))
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        a, b = start // ALLOCATION_PAGE, -(-end // ALLOCATION_PAGE)
        pages[a:b] = b"\x01" * (b - a)
        pos = end
    return bytes(pages)


def test_the_staging_knows_which_pages_hold_data_as_the_kernel_does():
    """The page map a load gets beside a staged memfd (ContentDescriptors.allocated) is what a
    SEEK_DATA scan of it finds, after scattered writes, punched holes and unaligned zeros."""
    size = 8 << 20
    rng = random.Random(7)
    staged = _Staged("nvme/ns1@1", size)
    try:
        for _ in range(400):
            off = rng.randrange(size - 20000)
            if rng.random() < 0.7:
                staged.write(off, memoryview(os.urandom(rng.randrange(1, 20000))))
            else:
                staged.zero(off, rng.randrange(1, 200000) if off + 200000 < size else 1)
        assert bytes(staged.pages) == _seek_pages(staged.fd, size)
        assert 0 < bytes(staged.pages).count(1) < len(staged.pages)  # both kinds of page
    finally:
        staged.close()


def test_a_destination_reading_slowly_cannot_hold_a_precopy_send():
    """Each frame of the pre-copy has ``timeout`` to go out as a whole: a destination that
    takes 32 KiB every 0.3 s (so that every single ``send`` makes progress inside the
    socket's own timeout) fails the pre-copy after about ``timeout``, not after minutes
    per MiB; the device keeps running."""
    src = PrecopyDev(4 * MiB)
    a, b = tcp_pair(buffers=65536)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.is_set():
            try:
                if not b.recv(32768):
                    return
            except OSError:
                return
            time.sleep(0.3)

    reader = threading.Thread(target=trickle, daemon=True)
    try:
        src.realize()
        _fill(src, 4)
        reader.start()
        p = Precopy(src, a, timeout=1.0, preflight=False)
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match="in time"):
            p.run()
        assert time.monotonic() - t0 < 6.0
        assert not src.quiesced and p.failed
    finally:
        stop.set()
        a.close()
        b.close()
        reader.join(5)
        src.close()


def test_a_refusal_trickled_a_byte_at_a_time_cannot_hold_the_precopy():
    """The pre-copy looks for a refusal between chunks; a destination that announces a
    64 KiB NACK and trickles it a byte every 30 ms (each read inside the socket's timeout)
    is cut off by one deadline for the whole frame: the pre-copy fails within seconds, not
    the hour the NACK would take, and the device keeps running."""
    src = PrecopyDev(16 * MiB)
    a, b = tcp_pair()
    stop = threading.Event()

    def destination() -> None:
        taken = 0
        b.settimeout(0.01)
        nack = FRAME_HEADER.pack(MAGIC, NACK, 0, 64 << 10)
        sent_header = False
        while not stop.is_set():
            try:
                got = b.recv(1 << 20)
                if not got:
                    return
                taken += len(got)
            except TimeoutError:
                pass
            except OSError:
                return
            try:
                if taken > (2 << 20) and not sent_header:
                    b.sendall(nack)
                    sent_header = True
                elif sent_header:
                    b.send(b"\x80")
                    time.sleep(0.02)
            except OSError:
                return

    t = threading.Thread(target=destination, daemon=True)
    try:
        src.realize()
        src.ram.mem[:] = random.Random(6).randbytes(16 * MiB)
        t.start()
        p = Precopy(src, a, timeout=1.0, preflight=False)
        t0 = time.monotonic()
        with pytest.raises(MigrationError):
            p.run()
        assert time.monotonic() - t0 < 10.0
        assert not src.quiesced and p.failed
    finally:
        stop.set()
        a.close()
        b.close()
        t.join(5)
        src.close()
