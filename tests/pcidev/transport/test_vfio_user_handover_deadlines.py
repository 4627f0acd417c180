"""Every receive of a handover has an overall deadline (issue 12): a peer (the old or the
new process, the CLI, the serving process's control socket) that trickles a frame a byte
at a time, or sends part of one and stops, cannot stretch a step past its timeout."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import msgpack
import pytest
from hostile_peer import Trickler

from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationError, TransportError
from pcidev.migration.frames import CONN, FRAME_HEADER, HANDOVER, MAGIC, READY, REPORT, SERVING, recv_frame
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.vfio_user import handover
from pcidev.transport.vfio_user.handover import HandoverControl, adopt, listen_control, request_handover

#: what a loaded machine may add to a deadline (generous: the tests assert the cut-off, not speed)
SLACK = 4.0


def _frame(kind: int, meta: dict) -> bytes:
    body = msgpack.packb(meta, use_bin_type=True)
    return FRAME_HEADER.pack(MAGIC, kind, 0, len(body)) + body


def _conn_frame() -> bytes:
    return _frame(CONN, {"protocol": 1, "pending": b"", "pending_fds": 0, "conn": None, "old_pid": os.getpid(),
                         "running": True, "listener": None, "control": None, "padding": "x" * 40})


@pytest.mark.parametrize("how", ["trickled", "half-header"])
def test_the_new_process_gives_up_on_a_conn_that_does_not_come_whole(how):
    """adopt(): the old process's CONN trickled a byte every 0.2 s (each read well inside the
    timeout), or half its header and then nothing: TransportError at ``timeout``."""
    ep = DeviceEndpoint(EduDevice())
    old, new = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    old.settimeout(10)

    def read_ready() -> None:
        kind, _body, _fds = recv_frame(old, deadline=time.monotonic() + 10)
        assert kind == READY

    frame = _conn_frame() if how == "trickled" else _conn_frame()[:FRAME_HEADER.size // 2]
    try:
        with Trickler(old, frame, every=0.2 if how == "trickled" else 0.0, before=read_ready) as peer:
            t0 = time.monotonic()
            with pytest.raises(TransportError):
                adopt(new.detach(), ep, timeout=1.0)
            took = time.monotonic() - t0
        assert peer.error is None
        assert took < 1.0 + SLACK, took
        if how == "trickled":
            assert peer.sent < len(frame)  # cut off before the frame was whole
    finally:
        old.close()
        ep.close()


def test_a_serving_report_trickled_is_not_waited_for_past_its_second():
    """The old process's wait for SERVING (at most a second) is one deadline, not a
    timeout per read."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    frame = _frame(SERVING, {"serving_at": time.monotonic(), "padding": "x" * 60})
    try:
        with Trickler(b, frame, every=0.1) as peer:
            t0 = time.monotonic()
            assert handover._await_serving(a) is None
            took = time.monotonic() - t0
        assert took < 1.0 + SLACK, took
        assert peer.sent < len(frame)
    finally:
        a.close()
        b.close()


FAKE_NEW_PROCESS = """\
#!{python}
# a "new process" that trickles its READY a byte every 0.2 s, then waits to be killed
import os, sys, time
import msgpack
from pcidev.migration.frames import FRAME_HEADER, MAGIC, READY
fd = int(sys.argv[sys.argv.index("--adopt") + 1])
body = msgpack.packb({{"pid": os.getpid(), "version": "0", "device_type": "x" * 60}}, use_bin_type=True)
for b in FRAME_HEADER.pack(MAGIC, READY, 0, len(body)) + body:
    time.sleep(0.2)
    try:
        os.write(fd, bytes([b]))
    except OSError:
        break
time.sleep(60)
"""


@pytest.fixture
def control(tmp_path: Path):
    """A HandoverControl on ``tmp_path/dev.sock.ctl`` for an edu endpoint no serve thread
    cuts (the tests end before a cut)."""
    ep = DeviceEndpoint(EduDevice())
    ep.start()
    path = str(tmp_path / "dev.sock.ctl")
    ctl = HandoverControl(listen_control(path), child_args=["serve"], endpoint=ep, wake=lambda: None,
                          precheck=lambda: None)
    ctl.start()
    yield path
    ctl.stop()
    ctl.listener.close()
    ep.close()


def test_a_new_process_trickling_its_ready_is_given_up_at_the_timeout(tmp_path, control):
    script = tmp_path / "fake-python"
    script.write_text(FAKE_NEW_PROCESS.format(python=sys.executable))
    script.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(MigrationError, match="not ready in time"):
        request_handover(control, exec_path=str(script), timeout=1.0)
    took = time.monotonic() - t0
    assert took < 1.0 + 1.0 + SLACK, took  # the timeout, then a second for the kill


def test_a_control_request_trickled_is_refused_at_its_deadline(control):
    """The control connection's request has 2 s as a whole (the reads are recv_exact's)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(control)
    sock.settimeout(30)
    request = _frame(HANDOVER, {"protocol": 1, "timeout": 5.0, "exec": None, "fault": None, "padding": "x" * 60})
    try:
        with Trickler(sock, request, every=0.1) as peer:
            t0 = time.monotonic()
            kind, body, _fds = recv_frame(sock, deadline=time.monotonic() + 30)
            took = time.monotonic() - t0
        assert kind == REPORT
        report = msgpack.unpackb(body)
        assert report["ok"] is False and report["reason"] == "bad request: no whole request within 2 s"
        assert took < 2.0 + SLACK and peer.sent < len(request)
    finally:
        sock.close()


def test_the_cli_gives_up_on_a_report_trickled_past_its_wait(tmp_path, monkeypatch):
    """request_handover() waits for the whole REPORT by one deadline (the wait is made short
    here: timeout + _SERVER_SLACK + 15 s)."""
    monkeypatch.setattr(handover, "_SERVER_SLACK", -15.0)
    path = str(tmp_path / "fake.ctl")
    listener = listen_control(path)
    report = _frame(REPORT, {"ok": True, "reason": "", "padding": "x" * 60})
    peers: list[Trickler] = []

    def serve() -> None:
        conn, _ = listener.sock.accept()
        recv_frame(conn, deadline=time.monotonic() + 10)
        peers.append(Trickler(conn, report, every=0.1, close=True))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="did not answer within 1 s"):
            request_handover(path, timeout=1.0)
        assert time.monotonic() - t0 < 1.0 + SLACK
    finally:
        t.join(10)
        for p in peers:
            p.stop()
        listener.close()
