"""Deadlines of the migration channel against a hostile peer (issue 12), and the source's
last steps (issue 11 leftovers H10.2, H10.3).

Every blocking exchange, in both directions, is bounded by an overall deadline: a peer
that answers a byte every 0.2 s, or reads what it is sent that slowly, or stops reading,
cannot keep the source's device stopped (or a destination waiting) past its timeout. A
release of the pre-copy that fails after the handover does not turn the migration into an
error; an exception of any kind (KeyboardInterrupt too) between the stop and the ACK
resumes the source's device.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import msgpack
import pytest
from hostile_peer import trickle
from precopy_device import PrecopyDev

from pcidev.devices.edu import DESC, EduDevice
from pcidev.errors import MigrationError, TransportError
from pcidev.host import Machine
from pcidev.migration import MAGIC, migrate_in, migrate_out
from pcidev.migration import channel as channel_module
from pcidev.migration.frames import CHECK, COMMIT, MEMORY, OFFER, STATE, SYNC, VERDICT, boot_id, recv_frame
from pcidev.migration.preflight import FEATURES, request
from pcidev.transport.fdpass import close_fds, send_all

HDR = struct.Struct("<8sHHI")
#: the slack a loaded machine adds to a deadline (2 cores shared by several test runs)
SLACK = 2.0
SIZE = 64 * 1024


class CountingEdu(EduDevice):
    def __init__(self, **kw):
        self.resumes = 0
        self.quiesces = 0
        super().__init__(**kw)

    def on_resume(self):
        self.resumes += 1
        super().on_resume()

    def on_quiesce(self):
        self.quiesces += 1
        super().on_quiesce()


@pytest.fixture
def source():
    with Machine(ram_size=16 << 20) as machine:
        p = machine.plug(CountingEdu(autorun=False, chunk=512))
        p.enable_device()
        p.set_master()
        p.alloc_irq_vectors(1, 2)
        ring = machine.alloc(8 * 32)
        p.iowrite64(0, 0x100, ring)
        p.iowrite32(0, 0x108, 8)
        p.iowrite32(0, 0x114, 1)
        src, dst = machine.alloc(4096), machine.alloc(4096)
        machine.write(src, os.urandom(4096))
        machine.memory.write_struct(DESC, ring, src, dst, 4096, 1, 0, 0)
        p.iowrite32(0, 0x10C, 1)
        p.device.resume()
        p.device._step(512)  # a descriptor in flight
        yield p


def _frame(kind: int, meta: dict) -> bytes:
    body = msgpack.packb(meta, use_bin_type=True)
    return HDR.pack(MAGIC, kind, 0, len(body)) + body


def _peer(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # (reported to the test)
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def _verdict() -> bytes:
    return _frame(VERDICT, {"protocol": 3, "ok": True, "reasons": [], "features": list(FEATURES),
                            "boot_id": boot_id()})


def _ack() -> bytes:
    return _frame(4, {"link": None, "deferred": False, "boot_id": boot_id(), "commit": True})


# ------------------------------------------------------------------- source
def test_a_verdict_trickled_a_byte_at_a_time_is_cut_off_at_the_timeout(source):
    a, b = socket.socketpair()
    stop = threading.Event()

    def dest() -> None:
        kind, _body, fds = recv_frame(b, deadline=time.monotonic() + 10)
        close_fds(fds)
        assert kind == CHECK
        trickle(b, _verdict(), stop)

    t, _ = _peer(dest)
    try:
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match="pre-flight"):
            migrate_out(source.device, a, timeout=1.0)
        assert time.monotonic() - t0 < 1.0 + SLACK
        assert source.device.quiesces == 0  # nothing stopped
    finally:
        stop.set()
        a.close()
        b.close()
        t.join(5)


@pytest.mark.parametrize("what", ["ack", "reads-slowly", "stops-reading"])
def test_a_destination_that_stalls_after_the_stop_holds_the_device_at_most_timeout(source, what):
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stop = threading.Event()

    def dest() -> None:
        b.settimeout(10)
        kind, _body, fds = recv_frame(b, max_fds=8, deadline=time.monotonic() + 10)
        close_fds(fds)
        assert kind == OFFER
        if what == "reads-slowly":  # 64 bytes every 0.2 s: each send of the state progresses
            while not stop.wait(0.2):
                try:
                    if not b.recv(64):
                        return
                except OSError:
                    return
        elif what == "stops-reading":
            stop.wait(10)
        else:
            kind, _body, fds = recv_frame(b, max_len=1 << 24, deadline=time.monotonic() + 10)
            close_fds(fds)
            assert kind == STATE
            trickle(b, _ack(), stop)

    t, _ = _peer(dest)
    dev = source.device
    try:
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match="runs again on the source"):
            migrate_out(dev, a, timeout=1.0, preflight=False)
        assert time.monotonic() - t0 < 1.0 + SLACK
        assert not dev.quiesced and dev.resumes == 2 and not dev.migrated_out
        assert dev.process() == 1  # and it keeps working
    finally:
        stop.set()
        a.close()
        b.close()
        t.join(5)


def test_a_running_trickled_after_commit_waits_running_timeout_at_most(source):
    a, b = socket.socketpair()
    stop = threading.Event()

    def dest() -> None:
        b.settimeout(10)
        for want in (OFFER, STATE):
            kind, _body, fds = recv_frame(b, max_fds=8, max_len=1 << 24, deadline=time.monotonic() + 10)
            close_fds(fds)
            assert kind == want
        b.sendall(_ack())
        kind, _body, _fds = recv_frame(b, deadline=time.monotonic() + 10)
        assert kind == COMMIT
        trickle(b, _frame(6, {"running_at": time.monotonic(), "boot_id": boot_id()}), stop)

    t, _ = _peer(dest)
    try:
        t0 = time.monotonic()
        result = migrate_out(source.device, a, timeout=5.0, running_timeout=1.0, preflight=False)
        assert time.monotonic() - t0 < 1.0 + SLACK
        assert result.committed_at is not None and result.running_at is None  # (it came too slowly)
        assert source.device.migrated_out
    finally:
        stop.set()
        a.close()
        b.close()
        t.join(5)


# ---------------------------------------------------------------- destination
def test_a_source_that_never_reads_the_synceds_cannot_stretch_the_destinations_deadline():
    """A source sends SYNC after SYNC and reads none of the answers: once the destination's
    socket is full, its SYNCED sends are bounded by the incoming deadline (``total_timeout``),
    not by ``timeout`` per send."""
    src, dst = PrecopyDev(SIZE), PrecopyDev(SIZE)
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.socket()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.connect(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stop = threading.Event()

    def source() -> None:
        send_all(a, _frame(CHECK, request(src)))
        a.settimeout(10)
        kind, _body, _fds = recv_frame(a, deadline=time.monotonic() + 10)
        assert kind == VERDICT
        send_all(a, _frame(MEMORY, {"protocol": 2, "boot_id": "", "sources": [{"name": "bar2", "size": SIZE}]}))
        seq = 0
        a.settimeout(0.2)
        while not stop.is_set():  # and never reads again
            seq += 1
            try:
                a.send(_frame(SYNC, {"seq": seq, "sent": 0}))
            except TimeoutError:
                continue
            except OSError:
                return

    t, _ = _peer(source)
    t0 = time.monotonic()
    try:
        with pytest.raises(TransportError):
            migrate_in(dst, b, timeout=8.0, total_timeout=1.5)
        assert time.monotonic() - t0 < 1.5 + SLACK
    finally:
        stop.set()
        a.close()
        b.close()
        t.join(5)
        src.close()
        dst.close()


# ------------------------------------------------------------ H10.2 / H10.3
class _Precopy:
    """A pre-copy that ran with nothing to copy, whose release fails (fault injection)."""

    active = False
    failed = False
    verdict = None
    report = None

    def __init__(self) -> None:
        self.aborted = 0
        self.released = 0

    def abort(self) -> None:
        self.aborted += 1

    def release(self) -> None:
        self.released += 1
        raise OSError("munmap failed (injected)")


def test_a_failed_release_after_the_handover_is_not_an_error(source):
    a, b = socket.socketpair()
    dest = CountingEdu(autorun=False, chunk=512)
    t, got = _peer(lambda: migrate_in(dest, b))
    pre = _Precopy()
    dev = source.device
    try:
        result = migrate_out(dev, a, precopy=pre, preflight=False)  # type: ignore[arg-type]
    finally:
        t.join(5)
        a.close()
        b.close()
    assert pre.released == 1 and pre.aborted == 0
    assert result.committed_at is not None
    assert dev.migrated_out and not dev.owns_state and dev.quiesced and dev.resumes == 1
    assert got["value"].running_at is not None and dest.resumes == 1
    got["value"].resources.close()
    dest.close()


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("where", ["save", "send"])
def test_any_exception_between_the_stop_and_the_ack_resumes_the_source(source, monkeypatch, exc, where):
    a, b = socket.socketpair()
    stop = threading.Event()
    dev = source.device
    if where == "save":
        def boom(device):
            raise exc("injected")
        monkeypatch.setattr(channel_module, "save_device_stream", boom)
    else:
        real = channel_module.send_frame

        def boom_send(sock, kind, *args, **kwargs):
            if kind == STATE:
                raise exc("injected")
            return real(sock, kind, *args, **kwargs)
        monkeypatch.setattr(channel_module, "send_frame", boom_send)

    def dest() -> None:
        b.settimeout(10)
        try:
            while not stop.is_set() and b.recv(65536):
                pass
        except OSError:
            pass

    t, _ = _peer(dest)
    pre = _Precopy()
    try:
        with pytest.raises(exc, match="injected"):
            migrate_out(dev, a, precopy=pre, preflight=False)  # type: ignore[arg-type]
        assert not dev.quiesced and dev.resumes == 2 and not dev.migrated_out and dev.owns_state
        assert pre.aborted == 1
        assert dev.process() == 1
        t.join(5)
        assert not t.is_alive()  # the channel was shut down: the destination saw its end
    finally:
        stop.set()
        a.close()
        b.close()
        t.join(5)
