"""vfio-user migration: the device prepares its stop while it runs
(:meth:`PciDevice.prepare_quiesce <pcidev.device.PciDevice.prepare_quiesce>`), as the
device link's pre-copy lets it: in a thread started when it enters PRE_COPY and at the
end of each PRE_COPY iteration (the short MIG_DATA_READ), which the arc to STOP_COPY
waits for before it stops the device; RUNNING -> STOP prepares in the arc. A failed or late
preparation refuses the arc (EBUSY) and the device runs on. With an NVMe ``file``
namespace written through the connection, the image is synced before the stop and not
during it."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest
from nvme_blocks import Pattern
from test_vfio_user_migration import InProcess, refused

from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationError
from pcidev.host.machine import Machine
from pcidev.transport.vfio_user import migration
from pcidev.transport.vfio_user.migration_client import mig_read, mig_read_all, mig_state, set_mig_state
from pcidev.transport.vfio_user.protocol import (
    MIG_STATE_PRE_COPY,
    MIG_STATE_RUNNING,
    MIG_STATE_STOP,
    MIG_STATE_STOP_COPY,
)
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

#: seconds a test waits for a background preparation (generous: a loaded machine)
WAIT = 20.0


class SpyEdu(EduDevice):
    """An edu device that records its preparations and stops, in order: ``("prepare",
    flush, quiesced then, thread name)`` and ``("quiesce",)``. ``fail`` makes the
    preparation raise; ``gate``, when set, makes it wait for the gate first."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[object, ...]] = []
        self.fail = False
        self.gate: threading.Event | None = None

    def prepare_quiesce(self, *, flush: bool) -> None:
        if self.gate is not None:
            self.gate.wait(WAIT)
        self.events.append(("prepare", flush, self.quiesced, threading.current_thread().name))
        if self.fail:
            raise MigrationError("a write-back error (the test's)")

    def on_quiesce(self) -> None:
        self.events.append(("quiesce",))
        super().on_quiesce()


@pytest.fixture
def spy() -> tuple[InProcess, SpyEdu]:
    dev = SpyEdu()
    srv = InProcess(dev)
    yield srv, dev
    srv.close()


def _end_iteration(srv: InProcess) -> None:
    """Read a PRE_COPY iteration to its end (the short read)."""
    while len(mig_read(srv.client, 4096)) == 4096:
        pass


def _wait_for(dev: SpyEdu, n: int) -> None:
    """Until ``dev`` recorded ``n`` events and the background preparation has ended."""
    deadline = time.monotonic() + WAIT
    while len(dev.events) < n or any(t.name == "pcidev-vfio-user-prepare" for t in threading.enumerate()):
        assert time.monotonic() < deadline, dev.events
        time.sleep(0.005)


def test_pre_copy_prepares_the_stop_while_the_device_runs(spy) -> None:
    srv, dev = spy
    c = srv.client
    set_mig_state(c, MIG_STATE_PRE_COPY)
    _wait_for(dev, 1)  # entering PRE_COPY: the VMM copies the guest's RAM meanwhile
    _end_iteration(srv)
    _wait_for(dev, 2)  # and the end of an iteration
    assert dev.events == [("prepare", True, False, "pcidev-vfio-user-prepare")] * 2  # running, in the background
    assert mig_state(c) == MIG_STATE_PRE_COPY
    set_mig_state(c, MIG_STATE_STOP_COPY)
    assert dev.events[2:] == [("quiesce",)]  # the arc waited for it and did not prepare again
    assert mig_read_all(c)  # the state
    set_mig_state(c, MIG_STATE_RUNNING)
    assert not dev.quiesced


def test_every_iteration_end_prepares_once_more_and_the_stop_waits_for_the_last(spy) -> None:
    srv, dev = spy
    set_mig_state(srv.client, MIG_STATE_PRE_COPY)
    _wait_for(dev, 1)
    for n in (2, 3, 4):
        _end_iteration(srv)
        _wait_for(dev, n)
    set_mig_state(srv.client, MIG_STATE_STOP_COPY)
    assert [e[0] for e in dev.events] == ["prepare"] * 4 + ["quiesce"]
    set_mig_state(srv.client, MIG_STATE_RUNNING)


def test_running_to_stop_prepares_first_in_the_arc(spy) -> None:
    srv, dev = spy
    c = srv.client
    set_mig_state(c, MIG_STATE_STOP)  # RUNNING -> STOP
    assert [e[:3] for e in dev.events] == [("prepare", True, False), ("quiesce",)]
    assert dev.events[0][3] != "pcidev-vfio-user-prepare"  # the arc's own thread
    set_mig_state(c, MIG_STATE_RUNNING)
    dev.events.clear()
    set_mig_state(c, MIG_STATE_PRE_COPY)
    set_mig_state(c, MIG_STATE_STOP_COPY)  # no iteration read: the one of PRE_COPY's start
    assert dev.events == [("prepare", True, False, "pcidev-vfio-user-prepare"), ("quiesce",)]
    set_mig_state(c, MIG_STATE_RUNNING)


def test_a_failed_preparation_refuses_the_stop_and_the_device_runs(spy) -> None:
    srv, dev = spy
    c = srv.client
    dev.fail = True
    set_mig_state(c, MIG_STATE_PRE_COPY)
    _wait_for(dev, 1)
    _end_iteration(srv)
    _wait_for(dev, 2)
    assert refused(set_mig_state, c, MIG_STATE_STOP_COPY) == errno.EBUSY
    assert mig_state(c) == MIG_STATE_PRE_COPY and not dev.quiesced
    assert refused(set_mig_state, c, MIG_STATE_STOP_COPY) == errno.EBUSY  # prepared again in the arc: fails
    set_mig_state(c, MIG_STATE_RUNNING)
    assert refused(set_mig_state, c, MIG_STATE_STOP) == errno.EBUSY
    assert mig_state(c) == MIG_STATE_RUNNING and not dev.quiesced
    assert ("quiesce",) not in dev.events
    dev.fail = False
    set_mig_state(c, MIG_STATE_PRE_COPY)
    set_mig_state(c, MIG_STATE_STOP_COPY)  # the next try goes through
    assert dev.events[-1] == ("quiesce",) and dev.quiesced
    set_mig_state(c, MIG_STATE_RUNNING)


def test_a_preparation_still_running_refuses_the_stop_until_it_ends(spy, monkeypatch) -> None:
    srv, dev = spy
    c = srv.client
    monkeypatch.setattr(migration, "PREPARE_WAIT", 0.2)
    dev.gate = threading.Event()
    set_mig_state(c, MIG_STATE_PRE_COPY)
    _end_iteration(srv)  # (the preparation of PRE_COPY's start still runs: no second one)
    assert refused(set_mig_state, c, MIG_STATE_STOP_COPY) == errno.EBUSY
    assert mig_state(c) == MIG_STATE_PRE_COPY and not dev.quiesced and dev.events == []
    dev.gate.set()
    monkeypatch.setattr(migration, "PREPARE_WAIT", WAIT)
    set_mig_state(c, MIG_STATE_STOP_COPY)  # waits for the same preparation: not a second one
    assert [e[0] for e in dev.events] == ["prepare", "quiesce"]
    set_mig_state(c, MIG_STATE_RUNNING)


def test_an_nvme_file_namespace_is_synced_before_the_stop_not_during_it(tmp_path: Path, monkeypatch) -> None:
    img = tmp_path / "ns.img"
    ctrl = NvmeController(f"ns=file:path={img},size=4M")
    srv = InProcess(ctrl)
    image = (os.stat(img).st_dev, os.stat(img).st_ino)
    syncs: list[bool] = []  # for each fdatasync of the image: inside the stop (on_quiesce)
    stopping = [False]
    real_sync, real_quiesce = os.fdatasync, ctrl.on_quiesce

    def record(fd: int) -> None:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == image:
            syncs.append(stopping[0])
        real_sync(fd)

    def on_quiesce() -> None:
        stopping[0] = True
        try:
            real_quiesce()
        finally:
            stopping[0] = False

    try:
        with Machine(ram_size=16 << 20) as machine:
            drv = NvmeDriver.attach(machine, VfioUserDevice(srv.client), io_queues=1, io_depth=16, aers=1)
            pattern = Pattern()
            for i in range(16):
                pattern.write(drv, i * 8, qid=1)
            monkeypatch.setattr(os, "fdatasync", record)
            monkeypatch.setattr(ctrl, "on_quiesce", on_quiesce)
            c = srv.client
            set_mig_state(c, MIG_STATE_PRE_COPY)
            assert mig_read(c, 4096) == b""  # no memory sources: an empty iteration
            set_mig_state(c, MIG_STATE_STOP_COPY)
            assert syncs == [False]  # while it ran; the stop found nothing left
            assert ctrl.quiesce_times is not None
            assert mig_read_all(c)
            set_mig_state(c, MIG_STATE_RUNNING)  # (a failed migration: it runs on)
            pattern.write(drv, 200, qid=1)
            set_mig_state(c, MIG_STATE_STOP)  # RUNNING -> STOP prepares too
            assert syncs == [False, False]
            set_mig_state(c, MIG_STATE_RUNNING)
            pattern.verify(drv, qids=(1,))
            drv.close()
    finally:
        srv.close()


def test_leaving_pre_copy_waits_for_the_preparation_so_none_outlives_the_migration(spy) -> None:
    srv, dev = spy
    c = srv.client
    dev.gate = threading.Event()
    set_mig_state(c, MIG_STATE_PRE_COPY)
    opener = threading.Timer(0.3, dev.gate.set)
    opener.start()
    try:
        set_mig_state(c, MIG_STATE_RUNNING)  # PRE_COPY -> RUNNING: the migration is off
        assert [e[0] for e in dev.events] == ["prepare"]  # it had ended before the reply
        assert not any(t.name == "pcidev-vfio-user-prepare" for t in threading.enumerate())
        assert mig_state(c) == MIG_STATE_RUNNING and not dev.quiesced
    finally:
        opener.cancel()
        dev.gate.set()


class SlowEdu(EduDevice):
    """A preparation that outlasts ``PREPARE_WAIT`` (a slow fdatasync)."""

    def __init__(self) -> None:
        super().__init__()
        self.running = 0
        self.most = 0
        self._lock = threading.Lock()

    def prepare_quiesce(self, *, flush: bool) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(1.0)
        finally:
            with self._lock:
                self.running -= 1


def test_a_preparation_longer_than_the_wait_is_kept_and_never_doubled(monkeypatch: pytest.MonkeyPatch) -> None:
    """PRE_COPY -> RUNNING waits PREPARE_WAIT for the preparation; one still running then is
    kept, so the next PRE_COPY starts none beside it: never two at once, however often the
    client goes in and out of PRE_COPY."""
    monkeypatch.setattr(migration, "PREPARE_WAIT", 0.1)
    dev = SlowEdu()
    srv = InProcess(dev)
    try:
        for _ in range(4):
            set_mig_state(srv.client, MIG_STATE_PRE_COPY)
            set_mig_state(srv.client, MIG_STATE_RUNNING)
        assert dev.most == 1
    finally:
        srv.close(keep_device=True)
        deadline = time.monotonic() + 10
        while dev.running and time.monotonic() < deadline:
            time.sleep(0.05)
        dev.close()
