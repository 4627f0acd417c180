"""What one peer of the device link can do to the others, and the edges of the two-phase
migration (review H): a pre-copy stuck connecting is cancelled with its connection and at
stop(); a trickled message is dropped after ``io_timeout`` while the host is served; a
MIGRATE after a pre-copy waits with its own timeout; a MIGRATE whose reply is lost still
ends the source's service (and the host asks what became of the device); a pre-copy
cancelled as it ended is a failure; addresses and error replies are bounded; connections
are capped and a failing accept() rests; a pre-copy thread that cannot start leaves
nothing behind. The device's data is verified (crc32c per block) where it moves."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import crc32c
import msgpack
import pytest
from hostile_peer import ServedLink, Trickler
from raw_link import Raw

from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationError, TransportError
from pcidev.host import Machine
from pcidev.migration.frames import (
    ACK,
    CHECK,
    FRAME_HEADER,
    MAGIC,
    STATE,
    VERDICT,
    boot_id,
    frame_meta,
    recv_frame,
    send_meta,
)
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint, PrecopySession
from pcidev.transport.fdpass import close_fds
from pcidev.transport.link.protocol import (
    FLAG_ERROR,
    HEADER,
    MAX_BODY,
    MIGRATE,
    PRECOPY,
    STATUS,
    encode_error,
    error_from_reply,
    read_message,
)
from pcidev.transport.link.protocol import (
    MAGIC as LINK_MAGIC,
)
from pcidev.transport.link.remote import LinkClient
from pcidev.transport.link.server import MAX_CONNECTIONS, LinkServer
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver


@pytest.fixture
def edu(tmp_path):
    s = ServedLink(tmp_path, EduDevice(), io_timeout=1.0)
    yield s
    s.close()


def _precopy(to: str, timeout: float = 20.0):
    return {"to": to, "timeout": timeout, "max_downtime_ms": 10.0, "max_iterations": 3}


def _status_ok(address: str) -> float:
    raw = Raw(address)
    try:
        t0 = time.monotonic()
        assert raw.request(STATUS, {}, timeout=30)["state"] == "running"
        return time.monotonic() - t0
    finally:
        raw.close()


# -- H1 ------------------------------------------------------------------------------------
def test_a_precopy_stuck_connecting_is_cancelled_with_its_connection_and_at_stop(tmp_path, edu):
    nobody = f"unix:{tmp_path}/nobody.sock"  # connect() retries while nobody listens
    first = Raw(edu.address)
    first.send(PRECOPY, _precopy(nobody, timeout=60.0))
    time.sleep(0.3)
    first.close()  # the host goes away: its pre-copy ends within a connect attempt
    other = Raw(edu.address)
    try:
        deadline = time.monotonic() + 5
        while True:  # another PRECOPY is refused for its own reason, not "already running"
            err = other.request(PRECOPY, _precopy(nobody, timeout=0.5))
            assert isinstance(err, MigrationError), err
            if "already running" not in str(err) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert "cannot reach the destination" in str(err), err
        other.send(PRECOPY, _precopy(nobody, timeout=60.0))
        time.sleep(0.3)
        t0 = time.monotonic()
        edu.server.stop()  # (SIGTERM) does not wait out the 60 s
        edu.thread.join(10)
        assert not edu.thread.is_alive() and time.monotonic() - t0 < 5
        assert edu.exit == ["stopped"] and edu.ep.state == "running"
    finally:
        other.close()


def test_a_precopy_to_a_destination_not_there_says_so_even_at_its_deadline(tmp_path, edu):
    raw = Raw(edu.address)
    try:
        err = raw.request(PRECOPY, _precopy(f"unix:{tmp_path}/nobody.sock", timeout=1.0))
        assert isinstance(err, MigrationError) and "cannot reach the destination" in str(err), err
    finally:
        raw.close()


# -- H2 ------------------------------------------------------------------------------------
def test_a_trickled_message_is_dropped_and_the_host_is_served_meanwhile(edu):
    trickler = edu.connect()
    with Trickler(trickler, HEADER.pack(LINK_MAGIC, STATUS, 0, 1, 1000) + bytes(1000), every=0.3, close=True):
        time.sleep(0.5)  # the trickler's header has started
        for _ in range(3):
            assert _status_ok(edu.address) < 2.5  # io_timeout 1 s: the loop is held at most that long
        trickler.settimeout(10)
        kind, flags, mid, body, _ = read_message(trickler, max_fds=0)  # dropped with an error reply
        assert flags & FLAG_ERROR and "in time" in str(error_from_reply(body))


def test_a_host_side_reply_that_trickles_times_out_as_a_whole(tmp_path):
    a, b = socket.socketpair()
    try:
        client = LinkClient(a, io_timeout=1.0)
        with Trickler(b, HEADER.pack(LINK_MAGIC, STATUS, 1, 1, 100) + bytes(100), every=0.3,
                      before=lambda: read_message(b, max_fds=0)):
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="in time"):
                client.request(STATUS, {})
            assert time.monotonic() - t0 < 3 and client.broken
    finally:
        a.close()
        b.close()


# -- H3 ------------------------------------------------------------------------------------
def test_a_migrate_after_a_precopy_waits_with_its_own_timeout(tmp_path):
    ctrl = NvmeController("serial=XLIMITS3,max_ioqpairs=1,msix_vectors=2,ns=mem:size=4M")
    s = ServedLink(tmp_path, ctrl, io_timeout=2.0)
    lst = socket.create_server(("127.0.0.1", 0))
    dest = f"tcp:127.0.0.1:{lst.getsockname()[1]}"

    def sink() -> None:  # lets the pre-flight pass, then reads everything, never answers
        conn, _ = lst.accept()
        with conn:
            _pass_preflight(conn)
            while conn.recv(1 << 20):
                pass

    threading.Thread(target=sink, daemon=True).start()
    with Machine(ram_size=16 << 20) as machine:
        p = machine.plug_remote(s.address, timeout=10)
        drv = NvmeDriver(machine, p, io_queues=1, aers=0)
        drv.probe()
        crcs = {}
        for page in range(64):
            data = os.urandom(4096)
            drv.write(1, page * 8, data)
            crcs[page] = crc32c.crc32c(data)
        side = Raw(s.address)
        try:
            rep = side.request(PRECOPY, _precopy(dest, timeout=30.0))
            assert not isinstance(rep, BaseException), rep
            t0 = time.monotonic()
            err = side.request(MIGRATE, {"to": dest, "timeout": 1.5}, timeout=60)
            assert isinstance(err, MigrationError) and "runs again on the source" in str(err), err
            assert time.monotonic() - t0 < 10, "the MIGRATE waited with the pre-copy's timeout"
        finally:
            side.close()
        assert s.ep.state == "running"
        for page in range(64):
            assert crc32c.crc32c(drv.read(1, page * 8, 8)) == crcs[page]
        drv.close()
    lst.close()
    s.close()


# -- H5 ------------------------------------------------------------------------------------
def _pass_preflight(conn: socket.socket) -> tuple[int, bytes, list[int]]:
    """Answer the source's pre-flight (CHECK) with a VERDICT ``ok``; the next frame."""
    kind, body, fds = recv_frame(conn, max_fds=253)
    if kind == CHECK:
        send_meta(conn, VERDICT, {"protocol": 3, "ok": True, "reasons": [], "features": [], "boot_id": ""})
        kind, body, fds = recv_frame(conn, max_fds=253)
    return kind, body, fds


def _late_acker(path: str, delay: float) -> threading.Thread:
    """A destination that takes the state and ACKs (deferred) only after ``delay``."""
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)

    def run() -> None:
        conn, _ = lst.accept()
        lst.close()
        with conn:
            kind, body, fds = _pass_preflight(conn)
            offer = frame_meta(kind, body, {"fds": int})
            while len(fds) < offer["fds"]:
                fds += recv_frame(conn, max_fds=253)[2]
            assert recv_frame(conn, max_len=256 << 20)[0] == STATE
            close_fds(fds)
            time.sleep(delay)
            meta = msgpack.packb({"link": "unix:/nowhere", "deferred": True, "boot_id": boot_id()})
            conn.sendall(FRAME_HEADER.pack(MAGIC, ACK, 0, len(meta)) + meta)
            conn.settimeout(10)
            try:
                conn.recv(1)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_migrate_whose_reply_is_lost_still_ends_the_source(tmp_path, edu):
    dest = _late_acker(f"{tmp_path}/dest.sock", 0.5)
    side = Raw(edu.address)
    side.send(MIGRATE, {"to": f"unix:{tmp_path}/dest.sock", "timeout": 5.0})
    time.sleep(0.1)
    side.close()  # the host gave up on the reply
    edu.thread.join(10)
    assert edu.exit == ["migrated"] and edu.ep.state == "migrated"
    dest.join(10)


def test_a_host_whose_migrate_reply_is_lost_asks_the_source(tmp_path, edu, monkeypatch):
    """The host's wait for the reply ends first (here: shortened); it asks the source on a
    connection of its own: the migration failed there, so the device runs on the source
    and the host's accesses go on."""
    with Machine(ram_size=16 << 20) as machine:
        p = machine.plug_remote(edu.address, timeout=10)
        p.enable_device()
        remote = p.device
        lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lst.bind(f"{tmp_path}/slow.sock")
        lst.listen(1)

        def refuse_late() -> None:  # takes the state, never answers, closes after 1.5 s
            conn, _ = lst.accept()
            time.sleep(1.5)
            conn.close()

        threading.Thread(target=refuse_late, daemon=True).start()
        real = LinkClient.request

        def short(self, kind, body=None, fds=(), *, timeout=None):
            return real(self, kind, body, fds, timeout=0.3 if kind == MIGRATE else timeout)

        monkeypatch.setattr(LinkClient, "request", short)
        with pytest.raises(MigrationError, match="got no reply .* the device runs on the source"):
            remote.migrate(f"unix:{tmp_path}/slow.sock", timeout=1.0, precopy=False)
        monkeypatch.undo()
        p.iowrite32(0, 0x04, 0x1234)  # edu's liveness register: ~value
        assert p.ioread32(0, 0x04) == 0xFFFFEDCB
        assert edu.ep.state == "running"
        lst.close()


# -- H7 ------------------------------------------------------------------------------------
def test_a_precopy_cancelled_as_it_ended_is_a_failure(tmp_path, monkeypatch):
    ctrl = NvmeController("serial=XLIMITS7,max_ioqpairs=1,msix_vectors=2,ns=mem:size=1M")
    s = ServedLink(tmp_path, ctrl, io_timeout=1.0)
    lst = socket.create_server(("127.0.0.1", 0))
    dest = f"tcp:127.0.0.1:{lst.getsockname()[1]}"

    def sink() -> None:
        conn, _ = lst.accept()
        with conn:
            while conn.recv(1 << 20):
                pass

    threading.Thread(target=sink, daemon=True).start()
    real_run = PrecopySession.run

    def slow_run(self) -> None:
        real_run(self)
        time.sleep(1.5)  # the deadline (1 s) passes between the end and the reply

    monkeypatch.setattr(PrecopySession, "run", slow_run)
    raw = Raw(s.address)
    try:
        err = raw.request(PRECOPY, _precopy(dest, timeout=1.0))
        assert isinstance(err, MigrationError) and "keeps running" in str(err), err
        assert s.ep.state == "running" and not ctrl.quiesced
    finally:
        raw.close()
        lst.close()
        s.close()


# -- H8 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [PRECOPY, MIGRATE])
def test_a_huge_address_gets_a_typed_error(edu, kind):
    raw = Raw(edu.address)
    try:
        body = {"to": "unix:/" + "x" * (MAX_BODY - 200), "timeout": 1.0, "max_downtime_ms": 10.0,
                "max_iterations": 1}
        err = raw.request(kind, body)
        assert isinstance(err, TransportError) and "characters long" in str(err), err
        err = raw.request(kind, {**body, "to": "tcp:no-port"})
        assert isinstance(err, TransportError) and "bad TCP address" in str(err), err
        assert raw.request(STATUS, {})["state"] == "running"
    finally:
        raw.close()


def test_an_error_reply_always_fits_a_message():
    body = encode_error(MigrationError("x" * (2 * MAX_BODY)))
    assert len(body) < MAX_BODY
    assert "[...]" in str(error_from_reply(body))


# -- H9 ------------------------------------------------------------------------------------
def test_connections_are_capped(edu):
    conns = [Raw(edu.address) for _ in range(MAX_CONNECTIONS)]
    try:
        for c in conns:  # all served
            assert c.request(STATUS, {})["state"] == "running"
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.connect(edu.address.removeprefix("unix:"))
        extra.settimeout(10)
        kind, flags, mid, body, _ = read_message(extra, max_fds=0)
        assert flags & FLAG_ERROR and "too many link connections" in str(error_from_reply(body))
        assert extra.recv(1) == b""  # and closed
        extra.close()
        conns.pop().close()
        time.sleep(0.3)  # a place is free again once the loop saw the end
        assert _status_ok(edu.address) < 5
    finally:
        for c in conns:
            c.close()


class _FlakyListener:
    """The server's listener, whose accept() fails with EMFILE a few times."""

    def __init__(self, sock: socket.socket, failures: int) -> None:
        self.sock, self.failures, self.calls = sock, failures, 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self):
        self.calls += 1
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return self.sock.accept()

    def close(self) -> None:
        self.sock.close()


def test_a_failing_accept_rests_instead_of_spinning(tmp_path):
    ep = DeviceEndpoint(EduDevice())
    ep.start()
    listener = listen(f"unix:{tmp_path}/flaky.sock")
    flaky = _FlakyListener(listener.sock, failures=3)
    server = LinkServer(ep, flaky)  # type: ignore[arg-type]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        assert _status_ok(str(listener.address)) < 10  # served after the failures
        assert flaky.calls == 4 and time.monotonic() - t0 >= 0.25  # three rests of 0.1 s, no spin
    finally:
        server.stop()
        t.join(10)
        ep.close()


# -- H10.1 ---------------------------------------------------------------------------------
def test_a_precopy_thread_that_cannot_start_leaves_nothing_behind(tmp_path, edu, monkeypatch):
    real_start = threading.Thread.start

    def failing_start(self) -> None:
        if self.name == "pcidev-link-precopy":
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    raw = Raw(edu.address)
    try:
        err = raw.request(PRECOPY, _precopy(f"unix:{tmp_path}/nobody.sock"))
        assert isinstance(err, MigrationError) and "cannot start" in str(err), err
        monkeypatch.undo()
        err = raw.request(PRECOPY, _precopy(f"unix:{tmp_path}/nobody.sock", timeout=0.5))
        assert isinstance(err, MigrationError) and "cannot reach" in str(err), err  # not "already running"
    finally:
        raw.close()
