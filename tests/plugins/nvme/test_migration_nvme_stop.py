"""What happens at a migration's stop (docs/migration.md §1 and §12): the quiesce has a
budget, so a backend command that never completes fails the migration cleanly (the
source runs on, the command completes later, exactly once, with its data), and ``file``
namespaces written since their last flush get ``fdatasync`` before the state goes out (a
failing one fails the migration, and the host's next Flush hears of it).

The stuck backend is ``_stop_backends.GatedFileBackend``: the ``file`` backend behind a
gate, registered through the plugin API (see that module for why not a FIFO or a
fault-injecting path). Every test verifies data by crc32c per block around each
migration and checks each command completed exactly once.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import _stop_backends
import crc32c
import pytest
import test_migration_nvme as migration_host
from _helpers import closed_at_teardown
from test_migration_nvme import Blocks

from pcidev.errors import MigrationError, QuiesceTimeoutError
from pcidev.migration import migrate_in, migrate_out
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import WRITE

BUDGET = 0.3  # seconds: the quiesce budget of the tests that hit it


# ----------------------------------------------------------------------------- an in-process host
class Host(migration_host.Host):
    """A machine, a controller made by ``make`` and a probed driver; :meth:`move` migrates
    the controller over the migration channel (a socket pair, the destination in a thread)
    to a fresh one made the same way, and re-points the host at it."""

    def __init__(self, make: Callable[[str], NvmeController], *, io_queues: int = 2) -> None:
        super().__init__(make, ram=64 << 20, io_queues=io_queues, io_depth=64, aers=1)
        self.make = make
        self.blocks = Blocks(self.drv)
        self.moves = 0

    def write(self, nsid: int, slba: int, data: bytes, *, qid: int = 1) -> None:
        """A verified write: recorded, then checked when read back."""
        self.drv.write(nsid, slba, data, qid=qid)
        self.blocks.record(nsid, slba, data)

    def move(self, *, quiesce_timeout: float | None = 5.0, commit: bool = False):
        """Migrate over the channel; on failure the destination is dropped, the host stays."""
        self.moves += 1
        dst = self.make(f"dst{self.moves}")
        a, b = socket.socketpair()
        got: dict[str, object] = {}

        def incoming() -> None:
            try:
                got["in"] = migrate_in(dst, b, timeout=10, commit=commit)
            except Exception as exc:  # (the source failed before the ACK: the channel ends)
                got["error"] = exc

        peer = threading.Thread(target=incoming, daemon=True)
        peer.start()
        try:
            result = migrate_out(self.ctrl, a, quiesce_timeout=quiesce_timeout, commit=commit,
                                 stall=lambda: None)
        except BaseException:
            a.close()
            peer.join(15)
            b.close()
            dst.close()
            assert "in" not in got, "the destination got a device the source did not give up"
            raise
        peer.join(15)
        a.close()
        b.close()
        self.resources.append(got["in"].resources)  # type: ignore[attr-defined]
        src = self.ctrl
        assert src.migrated_out and src.quiesced  # (it stays stopped: the destination owns it)
        self.repoint(dst)
        return result


@pytest.fixture
def host():
    yield from closed_at_teardown(Host)
    _stop_backends.GATES.clear()


def _gated_maker(config: str) -> Callable[[str], NvmeController]:
    registry = load_registry(make_plugin_manager(plugins=[_stop_backends]))
    return lambda name: registry.create("nvme", config, name=name)  # type: ignore[return-value]


def _fill(h: Host, nsid: int, count: int, *, first: int = 0, qid: int = 1) -> None:
    """``count`` verified 4 KiB writes from block ``first`` (8 blocks apart)."""
    for i in range(count):
        h.write(nsid, first + 8 * i, os.urandom(4096), qid=qid)


def _file(path: Path | int) -> tuple[int, int]:
    """A file's identity (device, inode), of a path or a descriptor (an image made by
    pcidev.images is linked into place: its descriptor's /proc name is the temporary one)."""
    st = os.fstat(path) if isinstance(path, int) else os.stat(path)
    return st.st_dev, st.st_ino


@pytest.fixture
def fdatasyncs(monkeypatch):
    """Every os.fdatasync of this process, as the identity of the file synced (:func:`_file`)."""
    calls: list[tuple[int, int]] = []
    real = os.fdatasync

    def record(fd: int) -> None:
        calls.append(_file(fd))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", record)
    return calls


# ----------------------------------------------------------------------------- the quiesce budget
def test_a_stuck_command_fails_the_migration_within_the_budget_then_completes_once(host, tmp_path):
    img = tmp_path / "stuck.img"
    h = host(_gated_maker(f"serial=STOP1,ns=gatedfile:path={img},size=4M,ns=mem:size=1M"))
    drv, m = h.drv, h.machine
    _fill(h, 1, 16)
    _fill(h, 2, 16)
    gate = _stop_backends.GATES[str(img)]
    gate.arm()
    data = os.urandom(4096)
    buf = m.alloc(4096)
    m.write(buf, data)
    cid = drv.submit_rw(1, WRITE, nsid=1, slba=512, nlb=8, buf=buf)
    assert gate.entered.wait(10)
    t0 = time.monotonic()
    with pytest.raises(QuiesceTimeoutError) as info:
        h.move(quiesce_timeout=BUDGET)
    spent = time.monotonic() - t0
    assert BUDGET <= spent < BUDGET + 5, spent  # the budget, not the stuck command, ended it
    why = str(info.value)
    assert "namespace(s) 1;" in why and "the oldest, a Write of namespace 1" in why, why
    assert f"(CID {cid} on SQ 1)" in why and "has waited" in why and "keeps running" in why, why
    waited = float(why.split("has waited ")[1].split(" s")[0])
    assert waited >= BUDGET

    # the source runs on: I/O on both namespaces (the stuck command's aside), verified
    src = h.ctrl
    assert not src.quiesced and not src.migrated_out and src.io.inflight == 1
    _fill(h, 1, 8, first=1024, qid=2)
    _fill(h, 2, 8, first=256, qid=2)
    assert all(c.cid != cid for c in drv.poll(1))  # still in the backend

    gate.open()  # the backend answers: the command completes, once, with its data
    done = drv.wait_for(1, cid, timeout=10)
    assert done.ok
    h.blocks.record(1, 512, data)
    time.sleep(0.05)
    assert all(c.cid != cid for c in drv.poll(1)), "the stuck command completed twice"
    h.blocks.verify_all()

    h.move()  # a second migration succeeds
    assert h.old[0].migrated_out
    _fill(h, 1, 4, first=2048)
    h.blocks.verify_all()
    assert all(c.cid != cid for c in drv.poll(1))


def test_the_quiesce_timeout_without_a_budget_falls_back_to_the_controllers(host, tmp_path):
    """``PciDevice.quiesce()`` without a timeout (a transport's own stop) still ends: the
    controller's own limit (``DEFAULT_QUIESCE_TIMEOUT``) applies; the error and the resume
    are the same."""
    from pcidev_nvme import migration

    img = tmp_path / "own.img"
    h = host(_gated_maker(f"serial=STOP2,ns=gatedfile:path={img},size=1M"), io_queues=1)
    _fill(h, 1, 4)
    gate = _stop_backends.GATES[str(img)]
    gate.arm()
    buf = h.machine.alloc(4096)
    data = os.urandom(4096)
    h.machine.write(buf, data)
    cid = h.drv.submit_rw(1, WRITE, nsid=1, slba=64, nlb=8, buf=buf)
    assert gate.entered.wait(10)
    old = migration.DEFAULT_QUIESCE_TIMEOUT
    migration.DEFAULT_QUIESCE_TIMEOUT = BUDGET
    try:
        with pytest.raises(QuiesceTimeoutError, match="backend I/O in flight"):
            h.ctrl.quiesce()
    finally:
        migration.DEFAULT_QUIESCE_TIMEOUT = old
    assert not h.ctrl.quiesced
    gate.open()
    assert h.drv.wait_for(1, cid, timeout=10).ok
    h.blocks.record(1, 64, data)
    h.ctrl.quiesce(5.0)  # drained now: within any budget
    h.ctrl.resume()
    h.blocks.verify_all()


def test_admin_work_gets_the_same_budget(host, tmp_path, monkeypatch):
    """Admin work in the background (Format NVM) that does not finish fails the quiesce the
    same way; the controller runs on and the work completes later."""
    h = host(lambda name: NvmeController("serial=STOP3,ns=mem:size=1M", name=name), io_queues=1)
    _fill(h, 1, 4)
    release = threading.Event()
    h.ctrl.admin_worker.submit(lambda: release.wait(30))
    with pytest.raises(QuiesceTimeoutError, match=r"admin work in the background .* quiesce budget \(0\.3 s\)"):
        h.move(quiesce_timeout=BUDGET)
    assert not h.ctrl.quiesced
    _fill(h, 1, 4, first=128)
    release.set()
    h.move()
    h.blocks.verify_all()


# ----------------------------------------------------------------------------- the flush at the stop
def test_the_stop_flushes_file_namespaces_written_since_their_last_flush(host, tmp_path, fdatasyncs):
    img = tmp_path / "f.img"
    h = host(lambda name: NvmeController(f"serial=STOP4,ns=file:path={img},size=4M,ns=mem:size=1M", name=name))
    _fill(h, 1, 32)
    _fill(h, 2, 8)
    before = len(fdatasyncs)
    h.move()
    assert fdatasyncs[before:] == [_file(img)]  # the image, once; the mem namespace needs none
    h.blocks.verify_all()

    # a fresh open does not know what an earlier writer left in the page cache: one call
    before = len(fdatasyncs)
    h.move()
    assert fdatasyncs[before:] == [_file(img)]

    def stop(**kw) -> list[tuple[int, int]]:
        """A stop with the flush and a resume in this process: the fdatasync calls it made."""
        n = len(fdatasyncs)
        h.ctrl.quiesce(5.0, **kw)
        h.ctrl.resume()
        return fdatasyncs[n:]

    assert stop(flush=True) == [_file(img)]  # (this controller's first)
    assert stop(flush=True) == []  # nothing written since: no system call at all
    h.drv.read(1, 0, 8)
    assert stop(flush=True) == []  # reads do not count
    _fill(h, 1, 4, first=4096)
    h.drv.flush(1)  # the host's own Flush: always the system call; the stop then has none to do
    assert stop(flush=True) == []
    _fill(h, 1, 4, first=5000)
    assert stop() == []  # a stop that is no migration's (a transport's, a snapshot's) never flushes
    assert stop(flush=True) == [_file(img)]
    _fill(h, 1, 4, first=6000, qid=2)
    before = len(fdatasyncs)
    h.move(commit=True)  # a handover's new process shares the page cache: no flush
    assert fdatasyncs[before:] == []
    h.move()
    assert fdatasyncs[before:] == [_file(img)]
    h.blocks.verify_all()


def test_a_file_namespace_written_by_deallocate_and_write_zeroes_is_flushed_too(host, tmp_path, fdatasyncs):
    img = tmp_path / "z.img"
    h = host(lambda name: NvmeController(f"serial=STOP5,ns=file:path={img},size=1M", name=name), io_queues=1)
    _fill(h, 1, 4)
    h.ctrl.quiesce(5.0, flush=True)
    h.ctrl.resume()
    backend = h.ctrl.namespaces[1].backend
    assert not backend.unflushed
    backend.deallocate(0, 4096)  # (what Dataset Management and Write Zeroes call)
    h.blocks.record(1, 0, bytes(4096))
    assert backend.unflushed
    before = len(fdatasyncs)
    h.ctrl.quiesce(5.0, flush=True)
    h.ctrl.resume()
    assert fdatasyncs[before:] == [_file(img)]
    backend.write_zeroes(8192, 4096)
    h.blocks.record(1, 16, bytes(4096))
    assert backend.unflushed
    h.move()
    assert fdatasyncs[before:] == [_file(img)] * 2
    h.blocks.verify_all()


def _metadata_host(host, img: Path, serial: str) -> tuple[Host, Path, Path]:
    """A host on a ``file`` namespace in LBA format 2 (512+8: its metadata sidecar beside
    the image): the host, the image and the sidecar."""
    h = host(lambda name: NvmeController(f"serial={serial},ns=file:path={img},size=1M,lbaf=2", name=name),
             io_queues=1)
    return h, img, Path(f"{img}.nvme-meta")


def test_the_metadata_sidecar_of_a_file_namespace_is_flushed_at_the_stop(host, tmp_path, fdatasyncs):
    h, img, sidecar = _metadata_host(host, tmp_path / "md.img", "STOP7")
    meta = os.urandom(8 * 4)
    h.ctrl.namespaces[1].meta.write(16, meta)  # (what a Write with metadata stores)
    h.ctrl.quiesce(5.0, flush=True)
    h.ctrl.resume()
    assert set(fdatasyncs) == {_file(img), _file(sidecar)}
    before = len(fdatasyncs)
    h.ctrl.namespaces[1].meta.write(20, meta)
    h.ctrl.quiesce(5.0, flush=True)  # only the sidecar was written since
    h.ctrl.resume()
    assert fdatasyncs[before:] == [_file(sidecar)]
    h.move()
    assert h.ctrl.namespaces[1].meta.read(16, 4) == meta and h.ctrl.namespaces[1].meta.read(20, 4) == meta


def test_a_failing_fdatasync_fails_the_migration_and_the_hosts_next_flush_hears_of_it(host, tmp_path, monkeypatch):
    img = tmp_path / "eio.img"
    h = host(lambda name: NvmeController(f"serial=STOP6,ns=mem:size=1M,ns=file:path={img},size=4M", name=name))
    _fill(h, 2, 16)
    _fill(h, 1, 4)
    real = os.fdatasync
    failing = {"on": True}

    def fdatasync(fd: int) -> None:
        if failing["on"] and _file(fd) == _file(img):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(MigrationError) as info:
        h.move()
    why = str(info.value)
    assert f"namespace 2 (file {img}): flush failed: Input/output error" in why, why
    assert not h.ctrl.quiesced and not h.ctrl.migrated_out  # the source runs on
    _fill(h, 2, 4, first=2048, qid=2)
    h.blocks.verify_all()

    failing["on"] = False  # the disk recovered; the host has not been told yet
    with pytest.raises(MigrationError, match="namespace 2 .*flush failed: Input/output error"):
        h.move()  # the device must not move before its host learns of the lost write-back
    cid = h.drv.submit(1, 0x00, nsid=2)  # Flush: reports it
    assert not h.drv.wait_for(1, cid, timeout=10).ok
    h.drv.flush(2)  # reported once
    h.move()
    h.blocks.verify_all()


def test_a_stop_whose_fdatasync_timed_out_flushes_again_and_takes_no_second_worker(host, tmp_path, monkeypatch):
    """Review G, finding 1: an fdatasync stuck past the budget does not make the image clean:
    a retried stop waits for that same call (no second blocked worker) and fails again
    until it returned; then nothing is left to do, or a new flush covers later writes."""
    img = tmp_path / "stuck-sync.img"
    h = host(lambda name: NvmeController(f"serial=STOP8,ns=file:path={img},size=1M", name=name), io_queues=1)
    _fill(h, 1, 4)
    gate = threading.Event()
    real = os.fdatasync
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if _file(fd) == _file(img):
            gate.wait(30)  # the storage does not answer
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        with pytest.raises(QuiesceTimeoutError, match="namespace 1"):
            h.ctrl.quiesce(BUDGET, flush=True)
        assert not h.ctrl.quiesced
        backend = h.ctrl.namespaces[1].backend
        assert backend.unflushed and backend.syncing  # the call began, it has not returned
        for _ in range(3):  # retries: each one fails again, none queues another fdatasync
            t0 = time.monotonic()
            with pytest.raises(QuiesceTimeoutError, match="namespace 1"):
                h.ctrl.quiesce(BUDGET, flush=True)
            assert time.monotonic() - t0 >= BUDGET * 0.9
        assert len(calls) == 1
        _fill(h, 1, 2, first=256)  # the controller runs on
    finally:
        gate.set()
    assert backend.wait_synced(10)
    assert backend.unflushed  # written after the stuck call began
    h.ctrl.quiesce(5.0, flush=True)
    h.ctrl.resume()
    assert len(calls) == 2 and not backend.unflushed
    h.ctrl.quiesce(5.0, flush=True)  # clean: no system call
    h.ctrl.resume()
    assert len(calls) == 2
    h.move()
    h.blocks.verify_all()


def test_a_stuck_sidecar_fdatasync_keeps_the_sidecar_unflushed(host, tmp_path, monkeypatch):
    """Review G, finding 1, the metadata sidecar: the same, the image being clean."""
    h, img, sidecar = _metadata_host(host, tmp_path / "stuck-meta.img", "STOP9")
    h.ctrl.quiesce(5.0, flush=True)
    h.ctrl.resume()
    meta = h.ctrl.namespaces[1].meta
    data = os.urandom(8 * 4)
    meta.write(16, data)
    gate = threading.Event()
    real = os.fdatasync
    calls: list[int] = []

    def fdatasync(fd: int) -> None:
        calls.append(fd)
        if _file(fd) == _file(sidecar):
            gate.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    try:
        for _ in range(2):
            with pytest.raises(QuiesceTimeoutError, match="namespace 1's metadata"):
                h.ctrl.quiesce(BUDGET, flush=True)
        assert meta.unflushed and meta.syncing and len(calls) == 1
    finally:
        gate.set()
    assert meta.wait_synced(10) and not meta.unflushed
    h.ctrl.quiesce(5.0, flush=True)
    h.ctrl.resume()
    assert len(calls) == 1
    h.move()
    assert h.ctrl.namespaces[1].meta.read(16, 4) == data


def test_a_sidecar_write_back_error_stays_pending_for_the_next_migration_and_flush(host, tmp_path, monkeypatch):
    """Review G, finding 2: an EIO the stop's fdatasync meets on the metadata sidecar is kept:
    the retried migration refuses, the host's next Flush of the namespace fails (once)."""
    h, img, sidecar = _metadata_host(host, tmp_path / "meta-eio.img", "STOPA")
    _fill(h, 1, 2)
    data = os.urandom(8 * 4)
    h.ctrl.namespaces[1].meta.write(16, data)
    real = os.fdatasync
    failing = {"left": 1}  # the kernel reports a write-back error once

    def fdatasync(fd: int) -> None:
        if failing["left"] and _file(fd) == _file(sidecar):
            failing["left"] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with pytest.raises(MigrationError, match="metadata .*flush failed: Input/output error.*next Flush"):
        h.move()
    assert not h.ctrl.quiesced
    with pytest.raises(MigrationError, match="metadata .*flush failed: Input/output error"):
        h.move()  # pending: the host has not been told
    cid = h.drv.submit(1, 0x00, nsid=1)  # Flush: reports it
    assert not h.drv.wait_for(1, cid, timeout=10).ok
    h.drv.flush(1)  # once
    h.move()
    h.blocks.verify_all()
    assert h.ctrl.namespaces[1].meta.read(16, 4) == data


def test_a_failed_quiesce_resumes_the_controller_once(host, tmp_path, monkeypatch):
    """Review G, finding 10: PciDevice.quiesce resumes a controller whose quiesce failed (its
    on_resume); the plugin does not resume it a second time itself."""
    img = tmp_path / "once.img"
    h = host(lambda name: NvmeController(f"serial=STOPB,ns=file:path={img},size=1M", name=name), io_queues=1)
    _fill(h, 1, 2)
    resumes: list[bool] = []
    real_unpause = h.ctrl.unpause

    def unpause() -> bool:
        was = real_unpause()
        resumes.append(was)
        return was

    monkeypatch.setattr(h.ctrl, "unpause", unpause)
    monkeypatch.setattr(os, "fdatasync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "EIO")))
    with pytest.raises(MigrationError):
        h.ctrl.quiesce(5.0, flush=True)
    assert resumes == [True]
    monkeypatch.undo()
    cid = h.drv.submit(1, 0x00, nsid=1)  # Flush: the pending error, reported
    assert not h.drv.wait_for(1, cid, timeout=10).ok
    _fill(h, 1, 2, first=64)
    h.blocks.verify_all()


# ----------------------------------------------------------------------------- between processes
def _plugin_env(monkeypatch, tmp_path: Path) -> tuple[Path, Path]:
    here = os.path.dirname(os.path.abspath(_stop_backends.__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, *sys.path]))
    gate = tmp_path / "gate"
    log = tmp_path / "fdatasync.log"
    monkeypatch.setenv("PCIDEV_STOP_GATE", str(gate))
    monkeypatch.setenv("PCIDEV_STOP_FDATASYNC_LOG", str(log))
    return gate, log


def _read_direct(path: Path, size: int) -> bytes:
    """The file's contents read with O_DIRECT (aligned buffer)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, size)
    try:
        n = os.preadv(fd, [buf], 0)
        assert n == size
        return bytes(buf)
    finally:
        buf.close()
        os.close(fd)


def test_between_processes_a_stuck_backend_fails_the_migrate_then_the_stop_flushes(tmp_path, monkeypatch,
                                                                                   process_host):
    """Through the device link: MIGRATE with ``quiesce_timeout_ms`` fails while a write is
    stuck (the source process runs on), succeeds once it completed; the source's
    fdatasync of the image comes before the ACK; SIGKILLed right after it, the image
    holds every acknowledged write (read with O_DIRECT, crc32c per block)."""
    gate, log = _plugin_env(monkeypatch, tmp_path)
    img = tmp_path / "p.img"
    size = 2 << 20
    opts = f"serial=STOPX,max_ioqpairs=2,msix_vectors=3,ns=gatedfile:path={img},size=2M"
    host = process_host(tmp_path, opts, ram=32 << 20, plugin_specs=["_stop_backends"], io_queues=2, io_depth=64,
                        aers=1)
    src, p, drv, machine = host.src, host.pdev, host.drv, host.machine
    d1, d2 = host.destination("b"), host.destination("c")
    expect: dict[int, bytes] = {}
    for i in range(32):
        expect[i] = os.urandom(4096)
        drv.write(1, 8 * i, expect[i], qid=1 + i % 2)
    gate.touch()
    stuck = os.urandom(4096)
    buf = machine.alloc(4096)
    machine.write(buf, stuck)
    cid = drv.submit_rw(1, WRITE, nsid=1, slba=8 * 100, nlb=8, buf=buf)
    time.sleep(0.05)
    host.listening(d1)
    with pytest.raises(QuiesceTimeoutError) as info:
        p.device.migrate(d1.incoming, timeout=10, quiesce_timeout_ms=BUDGET * 1000)
    assert "namespace(s) 1;" in str(info.value) and f"CID {cid} on SQ 1" in str(info.value)
    assert p.device.info["pid"] == src.pid
    for i in range(32):  # reads go on meanwhile (the gate holds writes only)
        assert crc32c.crc32c(drv.read(1, 8 * i, 8, qid=2)) == crc32c.crc32c(expect[i]), i
    gate.unlink()
    assert drv.wait_for(1, cid, timeout=10).ok
    expect[100] = stuck
    for i in range(32, 48):  # a write burst just before the stop
        expect[i] = os.urandom(4096)
        drv.write(1, 8 * i, expect[i], qid=1 + i % 2)
    host.listening(d2)
    report = p.device.migrate(d2.incoming, timeout=10)
    os.kill(src.pid, signal.SIGKILL)  # right after the ACK
    assert p.device.info["pid"] == d2.pid
    synced = [line.split() for line in log.read_text().splitlines()]
    image = "{}:{}".format(*_file(img))
    mine = [float(t) for pid, t, ident in synced if int(pid) == src.pid and ident == image]
    assert mine, synced
    assert mine[-1] <= report["acked_at"], (mine, report["acked_at"])  # (one clock: same host)
    on_disk = _read_direct(img, size)
    for i, data in expect.items():
        assert crc32c.crc32c(on_disk[8 * i * 512:(8 * i + 8) * 512]) == crc32c.crc32c(data), i
    for i, data in expect.items():  # and through the destination
        assert crc32c.crc32c(drv.read(1, 8 * i, 8, qid=1 + i % 2)) == crc32c.crc32c(data), i
    assert src.proc.wait(10) == -signal.SIGKILL
