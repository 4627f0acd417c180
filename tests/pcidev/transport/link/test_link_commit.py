"""The commit of a deferred migration on the device link (TCP: the destination runs the
device only once the host re-attached it and sent RESUME).

The source keeps its stopped device after the destination's ACK until the host tells it
the destination runs (RELEASE: it gives the device up) or never ran it (TAKE_BACK: it
resumes, the host stays with it and nothing is lost). Each case below kills, hangs or
confuses one party at one point and checks where the device runs afterwards -- never on
both sides -- with the data verified block by block (crc32c) before and after and every
command's completion counted (exactly once).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import crc32c
import pytest
from raw_link import Raw

from pcidev.errors import ConnectionLostError, MigrationError, TransportError
from pcidev.host import Machine
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.process import DeviceProcess
from pcidev.transport.link.protocol import (
    ABANDON,
    HELLO,
    MIGRATE,
    RELEASE,
    RESUME,
    STATUS,
    TAKE_BACK,
)
from pcidev.transport.link.server import LinkServer
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

NS = 8 << 20
BLOCKS = NS // 4096
PROPS = f"serial=XCOMMIT,max_ioqpairs=1,msix_vectors=2,ns=mem:size={NS}"
WRITE = 0x01
#: commands left outstanding (submitted, not reaped) across a migration attempt
DEPTH = 32


class Source:
    """The source: an NVMe controller with a mem namespace served over the link in a thread,
    driven by a software host (the driver), every block's crc32c known."""

    def __init__(self, tmp_path) -> None:
        self.ctrl = NvmeController(PROPS)
        self.ep = DeviceEndpoint(self.ctrl)
        self.ep.start()
        self.listener = listen(f"unix:{tmp_path}/src.sock")
        self.address = str(self.listener.address)
        self.server = LinkServer(self.ep, self.listener.sock, io_timeout=2.0)
        self.exit: list[str] = []
        self.thread = threading.Thread(target=lambda: self.exit.append(self.server.serve_forever()), daemon=True)
        self.thread.start()
        self.machine = Machine(ram_size=32 << 20)
        self.pdev = self.machine.plug_remote(self.address, timeout=10)
        self.drv = NvmeDriver(self.machine, self.pdev, io_queues=1, aers=0)
        self.drv.probe()
        self.crcs: dict[int, int] = {}
        self.completions = 0
        self.submitted = 0

    @property
    def remote(self):
        return self.pdev.device

    def write(self, first: int, n: int) -> None:
        for page in range(first, first + n):
            data = os.urandom(4096)
            self.drv.write(1, page * 8, data)
            self.crcs[page] = crc32c.crc32c(data)
            self.submitted += 1
            self.completions += 1

    def submit_outstanding(self, first: int) -> list[int]:
        """DEPTH writes submitted and rung, not reaped: their completions are counted later."""
        cids = []
        for k in range(DEPTH):
            page = first + k
            data = os.urandom(4096)
            buf = self.machine.alloc(4096, 4096)
            self.machine.write(buf, data)
            cids.append(self.drv.submit(1, WRITE, nsid=1, cdw10=page * 8, cdw12=7, buf=buf, length=4096,
                                        ring=False))
            self.crcs[page] = crc32c.crc32c(data)
        self.drv.ring(1)
        self.submitted += DEPTH
        return cids

    def reap(self, cids: list[int]) -> None:
        got = self.drv.reap(1, min_completions=len(cids), timeout=30)
        assert sorted(c.cid for c in got) == sorted(cids), "a completion missing or duplicated"
        assert all(c.ok for c in got), [hex(c.status) for c in got if not c.ok]
        assert self.drv.poll(1) == []  # and nothing more
        self.completions += len(got)

    def verify(self, drv: NvmeDriver | None = None) -> None:
        drv = drv or self.drv
        zero = crc32c.crc32c(bytes(4096))
        bad = []
        for page0 in range(0, BLOCKS, 64):
            data = drv.read(1, page0 * 8, 512)
            bad += [page0 + i for i in range(64)
                    if crc32c.crc32c(data[i * 4096:(i + 1) * 4096]) != self.crcs.get(page0 + i, zero)]
        assert bad == [], f"{len(bad)} blocks differ, first {bad[:5]}"
        assert self.completions == self.submitted

    def close(self) -> None:
        try:
            self.drv.close()
        except Exception:  # the device may be gone with a destination the test killed
            pass
        self.machine.close()
        self.server.stop()
        self.thread.join(20)
        self.ep.close()


@pytest.fixture
def source(tmp_path):
    src = Source(tmp_path)
    src.write(0, 256)
    yield src
    src.close()


class Destination:
    """A destination in a thread: it receives the device over TCP, then serves it over the
    link with ``server_cls`` (a LinkServer that misbehaves on purpose)."""

    def __init__(self, tmp_path, name: str, server_cls: type[LinkServer] = LinkServer, *, commit: bool = True) -> None:
        self.incoming_listener = listen("tcp:127.0.0.1:0", backlog=1)
        self.incoming = str(self.incoming_listener.address)
        self.link_listener = listen(f"unix:{tmp_path}/{name}.sock")
        self.link = str(self.link_listener.address)
        self.endpoint = DeviceEndpoint(NvmeController(PROPS))
        if not commit:  # a process from before the commit messages
            real = self.endpoint.info
            self.endpoint.info = lambda: {k: v for k, v in real().items() if k != "commit"}  # type: ignore[method-assign]
        self.resumes: list[float] = []
        real_resume = self.endpoint.device.on_resume

        def on_resume() -> None:
            self.resumes.append(time.monotonic())
            real_resume()

        self.endpoint.device.on_resume = on_resume  # type: ignore[method-assign]
        self.server = server_cls(self.endpoint, self.link_listener.sock, io_timeout=2.0)
        self.error: BaseException | None = None
        self.exit: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.incoming_listener.sock.settimeout(30)
            conn, _ = self.incoming_listener.sock.accept()
            self.incoming_listener.close()
            try:
                self.endpoint.accept_incoming(conn, link=self.link, timeout=10)
            finally:
                conn.close()
            self.exit.append(self.server.serve_forever())
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.server.stop()
        self.thread.join(10)
        self.incoming_listener.close()
        self.link_listener.close()
        self.endpoint.close()


@pytest.fixture
def destination(tmp_path):
    """A factory of :class:`Destination` (its arguments after ``tmp_path``), each closed at
    teardown (before the ``source``: a test asks for that first)."""
    made: list[Destination] = []

    def make(name: str, server_cls: type[LinkServer] = LinkServer, *, commit: bool = True) -> Destination:
        made.append(Destination(tmp_path, name, server_cls, commit=commit))
        return made[-1]

    yield make
    for dest in reversed(made):
        dest.close()


def _spawn(tmp_path, name: str) -> tuple[DeviceProcess, str]:
    proc = DeviceProcess("nvme", f"unix:{tmp_path}/{name}.sock", options=PROPS, incoming="tcp:127.0.0.1:0")
    return proc, proc.wait_event("listening", timeout=60)["incoming"]


def _kill(proc: DeviceProcess) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.proc.wait(10)


def _migrate_to_a_healthy_process(src: Source, tmp_path) -> None:
    """Then the device still migrates (and the data is all there on the destination)."""
    proc, incoming = _spawn(tmp_path, "healthy")
    try:
        report = src.remote.migrate(incoming, timeout=30)
        assert report["awaiting_commit"] and report["released"], report
        assert src.ep.state == "migrated" and src.remote.info["pid"] == proc.pid
        src.thread.join(10)
        assert src.exit == ["migrated"]  # the source process would exit now
        src.write(300, 16)
        src.verify()  # every block, read at the destination
    finally:
        proc.stop()


# -------------------------------------------------------------------------------- the cases
def test_a_destination_killed_after_its_ack_gives_the_device_back_to_the_source(source, tmp_path):
    src = source
    proc, incoming = _spawn(tmp_path, "doomed")
    stopped = []
    try:
        cids = src.submit_outstanding(256)

        def kill(report: dict) -> None:  # after the ACK, before the host attaches and resumes it
            assert report["awaiting_commit"] and report["deferred"]
            assert src.ep.state == "awaiting-commit" and src.ctrl.quiesced
            stopped.append(report)
            _kill(proc)

        with pytest.raises(MigrationError, match="runs again on the source") as info:
            src.remote.migrate(incoming, timeout=30, before_follow=kill)
        assert not isinstance(info.value, ConnectionLostError)
        assert stopped and src.ep.state == "running" and not src.ctrl.quiesced
        assert not src.ctrl.migrated_out and src.ctrl.owns_state
        assert src.remote.info["pid"] == os.getpid() and src.remote.address == src.address
        assert not src.exit  # the source serves on
        src.reap(cids)  # each outstanding command completed exactly once
        src.verify()  # every block as written, on the source
        src.write(288, 8)  # and the host's I/O goes on there
        src.verify()
    finally:
        proc.stop()
    _migrate_to_a_healthy_process(src, tmp_path)


def test_a_destination_killed_after_resume_keeps_the_device(source, tmp_path):
    """Once the destination answered RESUME the source gives the device up: a destination
    that dies then takes it with it (as any crash of the process that runs a device)."""
    src = source
    proc, incoming = _spawn(tmp_path, "later-dead")
    try:
        report = src.remote.migrate(incoming, timeout=30)
        assert report["released"] and src.ep.state == "migrated"
        src.verify()
        _kill(proc)
        src.thread.join(10)
        assert src.exit == ["migrated"] and src.ctrl.quiesced and src.ctrl.migrated_out
        with pytest.raises(TransportError):
            src.remote.bar_read(0, 0x1C, 4)
    finally:
        proc.stop()


def test_a_destination_that_refuses_resume_gives_the_device_back(source, tmp_path):
    """An error reply to RESUME (here: the destination was abandoned first) means it did not
    run the device."""
    src = source
    dest = Destination(tmp_path, "refusing")
    try:
        def abandon(report: dict) -> None:
            raw = Raw(dest.link)
            try:
                assert raw.request(HELLO, {})["state"] == "awaiting-attach"
                assert raw.request(ABANDON, {"reason": "test"}) == {}
            finally:
                raw.close()

        with pytest.raises(MigrationError, match="runs again on the source"):
            src.remote.migrate(dest.incoming, timeout=30, before_follow=abandon)
        assert src.ep.state == "running" and dest.endpoint.state == "abandoned" and dest.resumes == []
        dest.thread.join(10)
        assert dest.exit == ["abandoned"]
        src.verify()
    finally:
        dest.close()
    _migrate_to_a_healthy_process(src, tmp_path)


class _DiesBeforeResume(LinkServer):
    """A destination that reads RESUME and ends the connection without a reply (and without
    resuming): a process killed right after it read the request."""

    def _resume(self, conn, mid, body, fds):
        return False


class _HangsInResume(LinkServer):
    """A destination that reads RESUME and neither answers nor resumes for a while."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    def _resume(self, conn, mid, body, fds):
        self.release.wait(30)
        return False


def test_resume_without_any_reply_proves_a_new_destination_never_ran_it(source, destination):
    src = source
    dest = destination("silent", _DiesBeforeResume)
    cids = src.submit_outstanding(256)
    with pytest.raises(MigrationError, match="runs again on the source"):
        src.remote.migrate(dest.incoming, timeout=30)
    assert src.ep.state == "running" and dest.resumes == []
    src.reap(cids)
    src.verify()


def test_resume_without_any_reply_from_an_old_destination_gives_the_device_up(source, destination):
    """A destination whose HELLO does not say ``commit`` may have resumed before it answered:
    the device is given up on the source (it runs on neither side rather than on both)."""
    src = source
    dest = destination("old-silent", _DiesBeforeResume, commit=False)
    with pytest.raises(ConnectionLostError, match="may have run the device"):
        src.remote.migrate(dest.incoming, timeout=30)
    src.thread.join(10)
    assert src.exit == ["migrated"] and src.ep.state == "migrated" and src.ctrl.quiesced


def test_a_destination_hanging_in_resume_is_given_the_device(source, tmp_path):
    """No reply to RESUME in time: the destination may run the device: the source gives it up."""
    src = source
    dest = Destination(tmp_path, "hang", _HangsInResume)
    try:
        src.remote.io_timeout = 1.0
        with pytest.raises(ConnectionLostError, match="may have run the device"):
            src.remote.migrate(dest.incoming, timeout=30)
        src.thread.join(10)
        assert src.exit == ["migrated"] and src.ctrl.quiesced and src.ctrl.migrated_out
    finally:
        dest.server.release.set()
        dest.close()


def _migrate_raw(src: Source, to: str, **extra) -> tuple[Raw, dict]:
    """MIGRATE sent by hand on a connection of its own (the host's proxy steps aside)."""
    raw = Raw(src.address)
    with src.remote._access:
        report = raw.request(MIGRATE, {"to": to, "timeout": 30.0, **extra})
    assert not isinstance(report, BaseException), report
    return raw, report


def test_a_host_that_vanishes_while_the_source_awaits_its_commit(source, destination):
    """The source cannot know whether the host resumed the destination: it gives the device
    up (never resumes it) and exits; the destination, never resumed, is abandoned."""
    src = source
    dest = destination("orphan")
    raw, report = _migrate_raw(src, dest.incoming, commit_timeout=60.0)
    assert report["awaiting_commit"] and src.ep.state == "awaiting-commit"
    # while it waits: accesses, a second MIGRATE, and RELEASE/TAKE_BACK from elsewhere are refused
    other = Raw(src.address)
    try:
        for kind, body, text in [(STATUS, {}, None), (MIGRATE, {"to": dest.incoming, "timeout": 1.0}, "commit"),
                                 (RELEASE, {}, "connection of its MIGRATE"),
                                 (TAKE_BACK, {}, "connection of its MIGRATE")]:
            got = other.request(kind, body)
            if text is None:
                assert got["state"] == "awaiting-commit"
            else:
                assert isinstance(got, MigrationError) and text in str(got), got
        with pytest.raises(MigrationError, match="awaits the host's commit"):
            src.ep.bar_read(0, 0x1C, 4)
    finally:
        other.close()
    raw.close()  # the host is gone
    src.thread.join(10)
    assert src.exit == ["migrated"] and src.ep.state == "migrated" and src.ctrl.quiesced
    link = Raw(dest.link)
    try:
        assert link.request(HELLO, {})["state"] == "awaiting-attach" and dest.resumes == []
        assert link.request(ABANDON, {}) == {}
    finally:
        link.close()
    dest.thread.join(10)
    assert dest.exit == ["abandoned"] and dest.endpoint.state == "abandoned"
    assert not dest.endpoint.device.owns_state


def test_a_source_that_hears_nothing_gives_the_device_up_after_the_commit_timeout(source, destination):
    src = source
    dest = destination("quiet")
    raw, report = _migrate_raw(src, dest.incoming, commit_timeout=0.5)
    assert report["awaiting_commit"]
    t0 = time.monotonic()
    src.thread.join(10)
    assert 0.3 < time.monotonic() - t0 < 8
    assert src.exit == ["migrated"] and src.ep.state == "migrated" and src.ctrl.quiesced
    raw.close()


def test_release_and_take_back_on_the_migrate_connection(source, destination):
    src = source
    dest = destination("twice")
    raw, report = _migrate_raw(src, dest.incoming, commit_timeout=60.0)
    assert report["awaiting_commit"]
    got = raw.request(TAKE_BACK, {"reason": "testing"})
    assert isinstance(got["resumed_at"], float) and src.ep.state == "running"
    for kind in (RELEASE, TAKE_BACK):  # nothing awaits a commit any more
        err = raw.request(kind, {})
        assert isinstance(err, MigrationError) and "no migration awaits" in str(err)
    raw.close()
    src.verify()


def test_an_older_host_without_commit_timeout_migrates_at_once(source, destination):
    src = source
    dest = destination("old-host")
    raw, report = _migrate_raw(src, dest.incoming)
    assert report["awaiting_commit"] is False and report["deferred"]
    src.thread.join(10)
    assert src.exit == ["migrated"] and src.ep.state == "migrated"
    raw.close()


@pytest.mark.parametrize(("value", "text"), [(0, "commit_timeout must be"), (-1.0, "commit_timeout must be"),
                                             (4000.0, "commit_timeout must be"), ("5", "commit_timeout must be"),
                                             (True, "commit_timeout must be")])
def test_bad_commit_timeouts_are_refused(source, value, text):
    raw = Raw(source.address)
    try:
        err = raw.request(MIGRATE, {"to": "tcp:127.0.0.1:1", "timeout": 1.0, "commit_timeout": value})
        assert isinstance(err, TransportError) and text in str(err), err
        assert source.ep.state == "running"
    finally:
        raw.close()
    source.verify()


def test_over_unix_the_destination_runs_at_once_and_nothing_awaits(source, tmp_path):
    """Over UNIX the destination runs the device right after its ACK (it has the memory and
    eventfds): the source gives the device up at the ACK, as before."""
    src = source
    proc = DeviceProcess("nvme", f"unix:{tmp_path}/u.sock", options=PROPS, incoming=f"unix:{tmp_path}/u-in.sock")
    try:
        proc.wait_event("listening", timeout=60)
        report = src.remote.migrate(f"unix:{tmp_path}/u-in.sock", timeout=30)
        assert report["awaiting_commit"] is False and report["released"] is False and not report["deferred"]
        assert src.ep.state == "migrated"
        src.verify()
    finally:
        proc.stop()


# ---------------------------------------------------------------------- the endpoint's part
@pytest.fixture
def awaiting(destination):
    """A source endpoint in this process whose device migrated to a :class:`Destination`
    (TCP, the commit awaited) that now awaits its host's attach; yields both."""
    dest = destination("unit")
    src = DeviceEndpoint(NvmeController(PROPS))
    src.start()
    try:
        src.migrate_to(dest.incoming, timeout=10, await_commit=True)
        assert src.state == "awaiting-commit"
        deadline = time.monotonic() + 10
        while dest.endpoint.state != "awaiting-attach" and time.monotonic() < deadline:
            time.sleep(0.01)
        yield src, dest
    finally:
        src.close()


def test_a_resume_whose_announcement_fails_never_runs_the_device(awaiting):
    src, dest = awaiting
    dest.server.stop()
    dest.thread.join(10)

    def fail(_at: float) -> None:
        raise TransportError("the host is gone")

    with pytest.raises(TransportError, match="the host is gone"):
        dest.endpoint.resume_after_attach(fail)
    assert dest.endpoint.state == "abandoned" and dest.resumes == []
    with pytest.raises(MigrationError, match="abandoned"):
        dest.endpoint.resume_after_attach()
    dest.endpoint.abandon()  # idempotent
    src.release()
    assert src.state == "migrated"
    with pytest.raises(MigrationError, match="has migrated"):
        src.take_back()


def test_a_running_destination_cannot_be_abandoned(awaiting):
    src, dest = awaiting
    raw = Raw(dest.link)
    try:
        assert raw.request(RESUME, {})["resumed_at"] > 0
        # (the reply goes out first, the device runs right after it)
        assert raw.request(HELLO, {})["state"] == "running" and len(dest.resumes) == 1
        err = raw.request(ABANDON, {})
        assert isinstance(err, MigrationError) and "runs here already" in str(err)
    finally:
        raw.close()
    src.release()
    assert src.state == "migrated"
