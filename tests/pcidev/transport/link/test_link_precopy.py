"""The device link's migration in two phases (PRECOPY, then MIGRATE on the same
connection) against an NVMe controller with a ``mem`` namespace served in process: the
server keeps serving guest accesses while its pre-copy thread is stuck on a destination
that does not read; one pre-copy at a time (a second one, and a MIGRATE from another
connection, are refused cleanly); a host that goes away cancels its pre-copy (the channel
closes, the next pre-copy is accepted); a pre-copy that outlives its timeout, and one
that no MIGRATE follows, are given up; malformed requests get error replies. Every
block written before and during the pre-copies reads back with its crc32c at the end."""

from __future__ import annotations

import os
import socket
import threading
import time

import crc32c
import pytest
from raw_link import Raw

from pcidev.errors import MigrationError, TransportError
from pcidev.host import Machine
from pcidev.migration.frames import CHECK, VERDICT, recv_frame, send_meta
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.protocol import (
    HELLO,
    MIGRATE,
    PRECOPY,
)
from pcidev.transport.link.server import LinkServer
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

NS = 32 << 20
FILLED = 24 << 20  # more than the sockets buffer: a destination that does not read stalls the pre-copy


class Sink:
    """A TCP 'destination' that accepts one channel, answers the pre-flight, and reads the
    rest only when told to."""

    def __init__(self, *, read: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.address = f"tcp:127.0.0.1:{self.listener.getsockname()[1]}"
        self.received = 0
        self.accepted = threading.Event()
        self.reading = threading.Event()
        self.eof = threading.Event()
        if read:
            self.reading.set()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        self.accepted.set()
        with conn:
            conn.settimeout(10)
            kind, _body, _fds = recv_frame(conn)  # it lets the pre-flight pass (no SYNC), then streams
            if kind == CHECK:
                send_meta(conn, VERDICT, {"protocol": 3, "ok": True, "reasons": [], "features": [], "boot_id": ""})
            conn.settimeout(None)
            self.reading.wait()
            while True:
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    break
                if not data:
                    break
                self.received += len(data)
        self.eof.set()

    def close(self) -> None:
        self.reading.set()
        self.listener.close()


def _precopy(to: str, timeout: float = 20.0, **kw):
    return {"to": to, "timeout": timeout, "max_downtime_ms": 10.0, "max_iterations": 30, **kw}


@pytest.fixture
def link(tmp_path):
    """An NVMe controller with a filled mem namespace, served in a thread; the host's driver on it."""
    ctrl = NvmeController(f"serial=XLINKPRE,max_ioqpairs=1,msix_vectors=2,ns=mem:size={NS}")
    ep = DeviceEndpoint(ctrl)
    ep.start()
    backend = ctrl.allocated[1].backend
    crcs = {}
    for off in range(0, FILLED, 1 << 20):
        data = os.urandom(1 << 20)
        backend.writev([memoryview(data)], off)
        crcs.update({(off + i) // 4096: crc32c.crc32c(data[i:i + 4096]) for i in range(0, 1 << 20, 4096)})
    listener = listen(f"unix:{tmp_path}/n.sock")
    server = LinkServer(ep, listener.sock, io_timeout=2.0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    machine = Machine(ram_size=32 << 20)
    p = machine.plug_remote(str(listener.address), timeout=10)
    drv = NvmeDriver(machine, p, io_queues=1, aers=0)
    drv.probe()
    yield str(listener.address), ep, drv, crcs
    drv.close()
    machine.close()
    server.stop()
    thread.join(20)
    ep.close()


def _write_some(drv: NvmeDriver, crcs: dict, n: int, first: int) -> None:
    for k in range(n):
        page = FILLED // 4096 + first + k
        data = os.urandom(4096)
        drv.write(1, page * 8, data)
        crcs[page] = crc32c.crc32c(data)


def _verify(drv: NvmeDriver, crcs: dict) -> None:
    zero = crc32c.crc32c(bytes(4096))
    bad = 0
    for page0 in range(0, NS // 4096, 64):
        data = drv.read(1, page0 * 8, 512)
        bad += sum(crc32c.crc32c(data[i * 4096:(i + 1) * 4096]) != crcs.get(page0 + i, zero) for i in range(64))
    assert bad == 0, f"{bad} pages differ"


def test_the_server_says_it_knows_precopy(link):
    address, _ep, _drv, _crcs = link
    raw = Raw(address)
    try:
        assert raw.request(HELLO, {})["precopy"] is True
    finally:
        raw.close()


def test_one_precopy_at_a_time_and_a_vanished_host_cancels_it(link):
    address, ep, drv, crcs = link
    stuck, later = Sink(read=False), Sink(read=True)
    first, other = Raw(address), Raw(address)
    try:
        first.send(PRECOPY, _precopy(stuck.address))
        assert stuck.accepted.wait(10)
        # the server keeps serving guest accesses while its pre-copy is stuck in a send
        _write_some(drv, crcs, 64, 0)
        # a second pre-copy, and a MIGRATE from another connection, are refused cleanly
        err = other.request(PRECOPY, _precopy(later.address))
        assert isinstance(err, MigrationError) and "already running" in str(err)
        err = other.request(MIGRATE, {"to": stuck.address, "timeout": 5.0})
        assert isinstance(err, MigrationError) and "another connection" in str(err)
        # on its own connection, a MIGRATE before the pre-copy replied is refused too
        mid = first.send(MIGRATE, {"to": stuck.address, "timeout": 5.0})
        kind, rid, err = first.reply()
        assert (kind, rid) == (MIGRATE, mid) and isinstance(err, MigrationError) and "still running" in str(err)
        assert ep.state == "running" and not ep.device.quiesced
        # the host goes away: its pre-copy is cancelled (the channel closes unfinished)
        first.close()
        stuck.reading.set()
        assert stuck.eof.wait(20)
        assert stuck.received < FILLED
        # and the next pre-copy is accepted (it copies everything to a destination that reads)
        deadline = time.monotonic() + 10
        while True:
            report = other.request(PRECOPY, _precopy(later.address))
            if not isinstance(report, MigrationError) or time.monotonic() > deadline:
                break
            time.sleep(0.05)  # the cancelled one may still be closing its channel
        assert not isinstance(report, BaseException), report
        assert report["iterations"] >= 1 and report["bytes_per_iteration"][0] >= FILLED, report
        assert report["seconds"] > 0
        other.close()  # no MIGRATE: the session is given up with the connection
        assert later.eof.wait(20)
        _write_some(drv, crcs, 16, 64)
        _verify(drv, crcs)
        assert ep.state == "running"
    finally:
        first.close()
        other.close()
        stuck.close()
        later.close()


def test_a_precopy_past_its_timeout_and_one_no_migrate_follows_are_given_up(link):
    address, ep, drv, crcs = link
    stuck, idle = Sink(read=False), Sink(read=True)
    raw = Raw(address)
    try:
        t0 = time.monotonic()
        err = raw.request(PRECOPY, _precopy(stuck.address, timeout=1.0))
        # the server's deadline or the stuck send's own timeout, whichever comes first
        assert isinstance(err, MigrationError) and "keeps running" in str(err), err
        assert "did not end within 1 s" in str(err) or "timed out" in str(err), err
        assert time.monotonic() - t0 < 15
        stuck.reading.set()
        assert stuck.eof.wait(20)
        _write_some(drv, crcs, 8, 0)
        report = raw.request(PRECOPY, _precopy(idle.address, timeout=3.0))
        assert not isinstance(report, BaseException), report
        assert report["bytes_per_iteration"][0] >= FILLED, report
        assert idle.eof.wait(20), "the session was not given up without a MIGRATE"
        # the pre-copy is gone: a MIGRATE on its connection is refused with the reason (not
        # silently a migration in one go, which would copy everything inside the downtime)
        err = raw.request(MIGRATE, {"to": idle.address, "timeout": 2.0})
        assert isinstance(err, MigrationError) and "was given up (no MIGRATE came within 3 s" in str(err), err
        assert not ep.device.quiesced
        # asked again, knowingly, it is a migration in one go (to nobody here)
        err = raw.request(MIGRATE, {"to": idle.address, "timeout": 2.0})
        assert isinstance(err, MigrationError) and "keeps running on the source" in str(err), err
        assert ep.state == "running"
        _verify(drv, crcs)
    finally:
        raw.close()
        stuck.close()
        idle.close()


def test_a_migrate_to_another_address_than_the_precopy_is_refused(link):
    address, ep, drv, crcs = link
    sink = Sink(read=True)
    raw = Raw(address)
    try:
        report = raw.request(PRECOPY, _precopy(sink.address))
        assert report["iterations"] >= 1
        err = raw.request(MIGRATE, {"to": "tcp:127.0.0.1:9", "timeout": 2.0})
        assert isinstance(err, MigrationError) and f"went to {sink.address}" in str(err), err
        assert sink.eof.wait(20)  # the session was closed
        assert ep.state == "running" and not ep.device.quiesced
        _verify(drv, crcs)
    finally:
        raw.close()
        sink.close()


@pytest.mark.parametrize("body, why", [
    ({"to": "tcp:127.0.0.1:9", "timeout": 0.0, "max_downtime_ms": 10.0, "max_iterations": 3}, "timeout"),
    ({"to": "tcp:127.0.0.1:9", "timeout": 5.0, "max_downtime_ms": 0.0, "max_iterations": 3}, "max_downtime_ms"),
    ({"to": "tcp:127.0.0.1:9", "timeout": 5.0, "max_downtime_ms": 10.0, "max_iterations": 5000}, "max_iterations"),
    ({"to": "tcp:127.0.0.1:9", "timeout": 5.0, "max_downtime_ms": 10.0}, "max_iterations"),
    ({"to": 7, "timeout": 5.0, "max_downtime_ms": 10.0, "max_iterations": 3}, "'to'"),
    ([1, 2, 3], "expected a map"),
])
def test_malformed_precopy_requests_get_error_replies(link, body, why):
    address, ep, drv, crcs = link
    raw = Raw(address)
    try:
        err = raw.request(PRECOPY, body)
        assert isinstance(err, TransportError) and why in str(err), err
        assert raw.request(HELLO, {})["state"] == "running"  # the connection is still fine
        _write_some(drv, crcs, 1, 0)
    finally:
        raw.close()


def test_a_precopy_to_nowhere_fails_and_the_device_runs_on(link, tmp_path):
    address, ep, drv, crcs = link
    raw = Raw(address)
    try:
        err = raw.request(PRECOPY, _precopy(f"unix:{tmp_path}/nobody.sock", timeout=1.0))
        assert isinstance(err, MigrationError) and "cannot reach the destination" in str(err), err
        with pytest.raises(MigrationError, match="cannot reach the destination"):
            drv.pdev.device.migrate(f"unix:{tmp_path}/nobody.sock", timeout=1.0)
        _write_some(drv, crcs, 4, 0)
        _verify(drv, crcs)
        assert ep.state == "running"
    finally:
        raw.close()


def test_a_host_migrates_a_device_of_an_older_server_with_migrate_alone(link, tmp_path, monkeypatch):
    """A server whose HELLO does not say ``precopy`` (before this protocol) gets MIGRATE
    alone; over TCP the namespace's contents then all go at the stop."""
    from pcidev.transport.link.process import DeviceProcess
    from pcidev.transport.link.remote import RemoteDevice

    address, ep, drv, crcs = link
    real_info = ep.info
    monkeypatch.setattr(ep, "info", lambda: {k: v for k, v in real_info().items() if k != "precopy"})
    old = RemoteDevice(address)
    sent = []
    real_request = old._client.request

    def spy(kind, body=None, fds=(), *, timeout=None):
        sent.append(kind)
        return real_request(kind, body, fds, timeout=timeout)

    old._client.request = spy
    dest = DeviceProcess("nvme", f"unix:{tmp_path}/d.sock", options=f"serial=XLINKPRE,max_ioqpairs=1,"
                         f"msix_vectors=2,ns=mem:size={NS}", incoming="tcp:127.0.0.1:0")
    try:
        incoming = dest.wait_event("listening", timeout=60)["incoming"]
        _write_some(drv, crcs, 8, 0)
        drv.pdev.device.close()  # the host's own proxy steps aside: 'old' drives the migration
        report = old.migrate(incoming, timeout=30)
        assert PRECOPY not in sent and MIGRATE in sent
        assert report["precopy_seconds"] is None
        assert report["precopy"]["iterations"] == 0 and report["precopy"]["remainder_bytes"] >= FILLED
        assert ep.state == "migrated" and old.info["pid"] == dest.pid
        # the destination holds every block (read through a fresh host)
        with Machine(ram_size=32 << 20) as machine:
            p = machine.plug_remote(old.address, timeout=10)
            fresh = NvmeDriver(machine, p, io_queues=1, aers=0)
            fresh.probe()
            _verify(fresh, crcs)
            fresh.close()
    finally:
        old.close()
        dest.stop()
