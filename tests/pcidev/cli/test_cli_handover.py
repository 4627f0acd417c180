"""``pcidev handover --vfio-user SOCKET`` and the ``serve`` options it goes with, as a user
(or the VM tier) runs them: real processes, exit status, the one output line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pcidev.errors import MigrationError, TransportError
from pcidev.migration.channel import HANDOVER, frame_meta, recv_frame, send_meta
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.handover import request_handover

PCIDEV = [sys.executable, "-m", "pcidev"]
EDU_ID = 0x010000ED


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def edu_server(*serve_args: str) -> Iterator[tuple[str, subprocess.Popen[bytes], list[int]]]:
    """``pcidev -p no:nvme serve --vfio-user SOCK [ARGS] edu``; yields (socket, process, pids
    to stop at the end: append the new ones)."""
    where = tempfile.mkdtemp(prefix="pcidev-cli-ho-")
    sock = os.path.join(where, "edu.sock")
    with open(os.path.join(where, "log"), "wb") as log:
        proc = subprocess.Popen([*PCIDEV, "-p", "no:nvme", "serve", "--vfio-user", sock, *serve_args, "edu"],
                                stdout=log, stderr=subprocess.STDOUT)
    pids = [proc.pid]
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock + ".ctl"):
            assert proc.poll() is None and time.monotonic() < deadline, Path(where, "log").read_text()
            time.sleep(0.02)
        yield sock, proc, pids
    finally:
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        proc.wait(20)
        deadline = time.monotonic() + 20
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        shutil.rmtree(where, ignore_errors=True)


def handover(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PCIDEV, "handover", *args], capture_output=True, text=True, timeout=120)


def test_handover_prints_one_line_and_json_with_the_documented_keys() -> None:
    with edu_server() as (sock, proc, pids):
        with VfioUserClient.connect(sock) as client:
            run = handover("--vfio-user", sock)
            assert run.returncode == 0, run.stderr
            m = re.fullmatch(r"pcidev: handover (\d+) -> (\d+): downtime [\d.]+ ms, state [\d.]+ KiB, (\d+) fds\n",
                             run.stdout)
            assert m, run.stdout
            assert int(m.group(1)) == proc.pid and run.stderr == ""
            pids.append(int(m.group(2)))
            assert proc.wait(20) == 0  # the old process ends by itself, status 0
            started = time.monotonic()
            run = handover("--vfio-user", sock, "--json")
            assert run.returncode == 0, run.stderr
            report = json.loads(run.stdout)
            pids.append(report["new_pid"])
            # the cut on this host's monotonic clock: after the command started, before it returned
            assert started < report["cut_at"] < time.monotonic()
            assert {"downtime_ms", "state_bytes", "fds", "old_pid", "new_pid", "spawn_ms", "host_ms"} <= set(report)
            assert report["old_pid"] == pids[1] and report["fds"] >= 3 and report["state_bytes"] > 0
            assert client.read_int(0, 0, 4) == EDU_ID  # the same connection, served by the third process
        assert os.path.exists(sock) and os.path.exists(sock + ".ctl")
        os.kill(pids[-1], signal.SIGTERM)  # the last process removes the socket files it took over
        deadline = time.monotonic() + 20
        while _alive(pids[-1]):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not os.path.exists(sock) and not os.path.exists(sock + ".ctl")


def test_a_fault_before_the_confirmation_exits_1_with_one_line_and_the_server_stays() -> None:
    with edu_server() as (sock, proc, pids):
        with VfioUserClient.connect(sock) as client:
            for fault in ("die-before-ack", "nack", "die-after-commit"):
                run = handover("--vfio-user", sock, "--fault", fault, "--json")
                assert run.returncode == 1 and run.stdout == ""
                assert run.stderr.startswith("pcidev: error: handover failed: ") and run.stderr.count("\n") == 1
                assert proc.poll() is None
                client.write_int(0, 0x04, 4, 0x1234)  # LIVENESS: still served, by the same process
                assert client.read_int(0, 0x04, 4) == ~0x1234 & 0xFFFFFFFF


def test_a_wrong_socket_path_is_one_line(tmp_path: Path) -> None:
    run = handover("--vfio-user", str(tmp_path / "nobody.sock"))
    assert run.returncode == 1
    assert run.stderr == f"pcidev: error: no handover control socket at {tmp_path}/nobody.sock.ctl (is 'pcidev " \
                         "serve --vfio-user' running on that socket?)\n"


def test_a_control_path_that_is_not_a_server_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.ctl"
    junk.write_text("")
    run = handover("--vfio-user", "x", "--control", str(junk))
    assert run.returncode == 1 and run.stderr.startswith("pcidev: error: handover control socket ")
    assert run.stderr.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--inherit-fd", "5:k"], "--inherit-fd is for a handover's new process (with --adopt)"),
    (["--adopt", "7", "--inherit-fd", "999:k"], "--inherit-fd '999:k': descriptor 999 is not open"),
    (["--adopt", "7", "--inherit-fd", "k"], "--inherit-fd 'k': expected FD:KEY with FD 3 or more"),
])
def test_inherited_descriptors_given_by_hand_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    """``--adopt`` and ``--inherit-fd`` are a handover's; a user who tries them gets one line."""
    run = subprocess.run([*PCIDEV, "-p", "no:nvme", "serve", "--vfio-user", str(tmp_path / "s.sock"), *args, "edu"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.startswith(f"pcidev: error: {message}")
    assert run.stderr.count("\n") == 1 and os.listdir(tmp_path) == []


def test_serve_persists_by_default_and_once_exits_after_the_first_client() -> None:
    with edu_server() as (sock, proc, _pids):
        for _ in range(2):
            with VfioUserClient.connect(sock) as client:
                assert client.read_int(0, 0, 4) == EDU_ID
        time.sleep(0.2)
        assert proc.poll() is None
    with edu_server("--once") as (sock, proc, _pids):
        with VfioUserClient.connect(sock) as client:
            assert client.read_int(0, 0, 4) == EDU_ID
        assert proc.wait(20) == 0
        assert not os.path.exists(sock) and not os.path.exists(sock + ".ctl")


def test_sigterm_while_the_new_process_starts_aborts_the_handover(tmp_path: Path) -> None:
    """Before the cut a signal is not deferred: the handover is aborted (the new process
    killed), the requester hears why, and the server ends as the signal asked."""
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 2\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    with edu_server() as (sock, proc, _pids):
        with VfioUserClient.connect(sock) as client:
            assert client.read_int(0, 0, 4) == EDU_ID
            errors: list[BaseException] = []

            def ask() -> None:
                try:
                    request_handover(sock + ".ctl", exec_path=str(slow))
                except MigrationError as exc:
                    errors.append(exc)

            t = threading.Thread(target=ask)
            t.start()
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGTERM)
            t.join(120)
            assert len(errors) == 1 and "stopping" in str(errors[0])
            assert proc.wait(20) == 128 + signal.SIGTERM


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused() -> None:
    with edu_server() as (sock, proc, _pids):
        os.chmod(os.path.dirname(sock), 0o755)
        os.chmod(sock + ".ctl", 0o666)  # past the file mode: SO_PEERCRED still refuses
        rfd, wfd = os.pipe()
        child = os.fork()
        if child == 0:  # pragma: no cover - the child
            try:
                os.close(rfd)
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(10)
                    s.connect(sock + ".ctl")
                    try:
                        send_meta(s, HANDOVER, {"protocol": 1, "timeout": 5.0})
                    except TransportError:
                        pass  # refused before it was read: the REPORT is there
                    kind, body, _fds = recv_frame(s)
                    os.write(wfd, frame_meta(kind, body, {"reason": str})["reason"].encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            reason = r.read().decode()
        os.waitpid(child, 0)
        assert reason.startswith("permission denied: uid 65534 may not hand over a device served by uid 0")
        assert proc.poll() is None
