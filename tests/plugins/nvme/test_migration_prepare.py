"""``PciDevice.prepare_quiesce`` for NVMe (``pcidev_nvme.migration.prepare_quiesce``):
before a migration's stop, while the controller serves I/O, the ``file`` images and
metadata sidecars written since their last ``fdatasync`` are synced, so the stop's flush
has only what was written since (nothing, when nothing was); a write-back error met there
fails the migration cleanly (the controller runs on, the host's next Flush hears of it,
and no migration goes before it has). Through the device link, the pre-copy phase calls
it (over UNIX sockets too), and a failing one leaves the device running on its source.
Data is verified by crc32c per block around every stop and migration.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
from test_migration_nvme import Blocks

from pcidev.errors import MigrationError
from pcidev.host import Machine
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.process import DeviceProcess
from pcidev.transport.link.server import LinkServer
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.migration import QuiesceTimes
from pcidev_nvme.testing.driver import NvmeDriver


def _file(fd_or_path: Path | int) -> tuple[int, int]:
    st = os.fstat(fd_or_path) if isinstance(fd_or_path, int) else os.stat(fd_or_path)
    return st.st_dev, st.st_ino


@pytest.fixture
def fdatasyncs(monkeypatch):
    """Every os.fdatasync of this process (the identity of the file synced); files named in
    ``failing`` get EIO instead."""
    calls: list[tuple[int, int]] = []
    failing: set[tuple[int, int]] = set()
    real = os.fdatasync

    def record(fd: int) -> None:
        ident = _file(fd)
        calls.append(ident)
        if ident in failing:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fdatasync", record)
    return calls, failing


class Local:
    """A controller with a 4 MiB file namespace (``props`` adds to it) and a 1 MiB mem one,
    probed by a driver."""

    def __init__(self, img: Path, props: str = "") -> None:
        self.img = img
        self.ctrl = NvmeController(f"serial=PREP1,ns=file:path={img},size=4M{props},ns=mem:size=1M")
        self.machine = Machine(ram_size=32 << 20)
        self.pdev = self.machine.plug(self.ctrl)
        self.drv = NvmeDriver(self.machine, self.pdev, io_queues=2, io_depth=64, aers=1)
        self.drv.probe()
        self.blocks = Blocks(self.drv)

    def write(self, nsid: int, count: int, first: int = 0) -> None:
        for i in range(count):
            data = os.urandom(4096)
            self.drv.write(nsid, first + 8 * i, data, qid=1 + i % 2)
            self.blocks.record(nsid, first + 8 * i, data)

    def stop(self) -> None:
        """A migration's stop (with its flush) and the resume of a failed one."""
        self.ctrl.quiesce(5.0, flush=True)
        self.ctrl.resume()

    def close(self) -> None:
        self.drv.close()
        self.ctrl.close()
        self.machine.close()


@pytest.fixture
def local(tmp_path):
    made: list[Local] = []

    def make(props: str = "") -> Local:
        made.append(Local(tmp_path / "p.img", props))
        return made[-1]

    yield make
    for m in made:
        m.close()


def test_prepare_syncs_what_was_written_so_the_stop_has_nothing_left(local, fdatasyncs):
    calls, _ = fdatasyncs
    h = local()
    h.write(1, 32)
    h.write(2, 8)
    image = _file(h.img)
    h.ctrl.prepare_quiesce(flush=False)  # a stop that will not flush: nothing to prepare
    assert calls == [] and h.ctrl.allocated[1].backend.unflushed
    h.ctrl.prepare_quiesce(flush=True)
    assert calls == [image]  # the image once; the mem namespace needs none
    assert not h.ctrl.allocated[1].backend.unflushed
    assert not h.ctrl.quiesced  # it ran all along
    h.stop()
    assert calls == [image]  # the stop found nothing left: no system call at all
    times = h.ctrl.quiesce_times
    assert isinstance(times, QuiesceTimes) and times.flush >= 0 and times.drain >= 0
    h.blocks.verify_all()

    h.ctrl.prepare_quiesce(flush=True)  # nothing written since: nothing to do
    assert calls == [image]
    h.write(1, 4, first=4096)
    h.ctrl.prepare_quiesce(flush=True)
    h.write(1, 1, first=6000)  # after the prepare, before the stop: the stop syncs it
    assert h.ctrl.allocated[1].backend.unflushed
    h.stop()
    assert calls == [image] * 3
    assert not h.ctrl.allocated[1].backend.unflushed
    h.blocks.verify_all()


def test_prepare_syncs_the_metadata_sidecar_too(local, fdatasyncs):
    calls, _ = fdatasyncs
    h = local(",lbaf=2")
    meta = os.urandom(32)
    h.ctrl.allocated[1].meta.write(16, meta)  # (what a Write with metadata stores)
    h.ctrl.prepare_quiesce(flush=True)
    assert set(calls) == {_file(h.img), _file(Path(f"{h.img}.nvme-meta"))}
    n = len(calls)
    h.stop()
    assert len(calls) == n
    assert h.ctrl.allocated[1].meta.read(16, 4) == meta


def test_a_write_back_error_in_prepare_fails_cleanly_and_the_hosts_next_flush_hears_of_it(local, fdatasyncs):
    calls, failing = fdatasyncs
    h = local()
    h.write(1, 16)
    failing.add(_file(h.img))
    with pytest.raises(MigrationError, match=r"namespace 1 \(file .*\): flush failed: Input/output error") as info:
        h.ctrl.prepare_quiesce(flush=True)
    assert "the device stays here" in str(info.value)
    assert not h.ctrl.quiesced  # it runs on: I/O goes on, verified
    h.write(1, 4, first=2048)
    h.write(2, 4)
    h.blocks.verify_all()
    failing.clear()  # the disk recovered, but the host has not been told
    with pytest.raises(MigrationError, match="flush failed: Input/output error"):
        h.ctrl.prepare_quiesce(flush=True)
    with pytest.raises(MigrationError, match="flush failed: Input/output error"):
        h.ctrl.quiesce(5.0, flush=True)  # nor does the stop let it move
    assert not h.ctrl.quiesced
    cid = h.drv.submit(1, 0x00, nsid=1)  # the host's Flush: reports it, once
    assert not h.drv.wait_for(1, cid, timeout=10).ok
    h.drv.flush(1)
    h.write(1, 2, first=3000)
    h.ctrl.prepare_quiesce(flush=True)
    h.stop()
    h.blocks.verify_all()


# ----------------------------------------------------------------------------- through the device link
@pytest.fixture
def served(tmp_path, fdatasyncs):
    """The controller served over the device link in this process (so its fdatasync can
    fail), a host driving it, and destinations in processes of their own."""
    img = tmp_path / "l.img"
    opts = f"serial=PREPLINK,max_ioqpairs=2,msix_vectors=3,ns=file:path={img},size=2M,ns=mem:size=1M"
    ctrl = NvmeController(opts)  # (creates the image's identity file the destinations read)
    ep = DeviceEndpoint(ctrl)
    ep.start()
    listener = listen(f"unix:{tmp_path}/src.sock")
    server = LinkServer(ep, listener.sock, io_timeout=5.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    machine = Machine(ram_size=32 << 20)
    p = machine.plug_remote(str(listener.address), timeout=10)
    drv = NvmeDriver(machine, p, io_queues=2, io_depth=64, aers=1)
    drv.probe()
    procs: list[DeviceProcess] = []

    def destination(k: int) -> DeviceProcess:
        procs.append(DeviceProcess("nvme", f"unix:{tmp_path}/d{k}.sock", options=opts,
                                   incoming=f"unix:{tmp_path}/d{k}-in.sock"))
        procs[-1].wait_event("listening")
        return procs[-1]

    yield img, ep, p, drv, destination, fdatasyncs
    drv.close()
    machine.close()
    server.stop()
    thread.join(20)
    ep.close()
    for proc in procs:
        proc.stop()


def test_through_the_link_the_precopy_phase_prepares_and_a_failing_prepare_leaves_the_device_running(served):
    img, ep, p, drv, destination, (calls, failing) = served
    blocks = Blocks(drv)

    def write(count: int, first: int) -> None:
        for i in range(count):
            data = os.urandom(4096)
            drv.write(1, first + 8 * i, data, qid=1 + i % 2)
            blocks.record(1, first + 8 * i, data)

    write(16, 0)
    failing.add(_file(img))
    d1 = destination(1)
    with pytest.raises(MigrationError, match="flush failed: Input/output error"):
        p.device.migrate(d1.incoming, timeout=10)
    assert calls == [_file(img)]  # the pre-copy phase's: the device was never stopped
    assert not ep.device.quiesced and p.device.info["pid"] == os.getpid()
    write(4, 1024)  # it runs on here, data intact
    blocks.verify_all()
    failing.clear()  # the disk recovered; the host has not been told yet: the next migration is refused
    with pytest.raises(MigrationError, match="flush failed: Input/output error"):
        p.device.migrate(destination(2).incoming, timeout=10)
    assert not ep.device.quiesced
    cid = drv.submit(1, 0x00, nsid=1)  # the host's Flush hears of it
    assert not drv.wait_for(1, cid, timeout=10).ok
    write(4, 2048)
    d3 = destination(3)
    report = p.device.migrate(d3.incoming, timeout=10)
    assert p.device.info["pid"] == d3.pid
    assert report["precopy_seconds"] is not None  # two phases over a UNIX socket
    times = ep.device.quiesce_times  # (the migration summary reports them: no plugin manager here)
    assert isinstance(times, QuiesceTimes) and times.drain >= 0 and times.flush >= 0
    phases = report["phases"]
    assert phases["stopped"] <= phases["quiesced"] <= phases["saved"] <= phases["sent"] <= phases["acked"]
    assert phases["received"] <= phases["loaded"] <= report["running_at"]
    assert report["held_at"] <= phases["stopped"]
    blocks.verify_all()
