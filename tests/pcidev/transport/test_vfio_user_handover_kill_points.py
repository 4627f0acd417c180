"""A vfio-user handover's new process dying at the steps its fault switches do not reach
(those are in test_vfio_user_handover.py: dying just before its ACK, after COMMIT, hanging
after COMMIT, half a RUNNING): SIGKILLed at its start, after READY, after CONN, in the
middle of the state, after its ACK (before COMMIT), or hanging at its start, after READY
and in the middle of the state. The old process serves on each time, under verified I/O, and a
handover to a healthy process works afterwards; a new process that dies after its RUNNING
took the device (the old one is gone): the client's connection ends, never two servers.

The new process is ``killpoints.py handover`` (tests/pcidev/migration/killpoints.py) given
as the handover's ``exec``: ``python -m pcidev`` with its channel to the old process
watched by a tripwire.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pcidev.errors import MigrationError, TransportError

HERE = Path(__file__).resolve().parent
for where in (HERE, HERE.parent / "migration"):
    if str(where) not in sys.path:
        sys.path.insert(0, str(where))
killpoints = importlib.import_module("killpoints")
handover_tests = importlib.import_module("test_vfio_user_handover")
serving, nvme, VerifiedIo, alive = (handover_tests.serving, handover_tests.nvme, handover_tests.VerifiedIo,
                                    handover_tests._alive)

#: where the new process dies, and how: every step before COMMIT the fault switches miss
KEPT = [("before-READY", "kill"), ("before-CONN", "kill"), ("before-OFFER", "kill"), ("mid-STATE", "kill"),
        ("before-COMMIT", "kill"), ("before-READY", "hang"), ("before-CONN", "hang"), ("mid-STATE", "hang")]


def test_the_handover_protocol_has_these_points():
    names = [p.name for p in killpoints.points(commit=True, handover=True)]
    assert names[:6] == ["before-READY", "before-CONN", "before-CHECK", "before-VERDICT", "mid-VERDICT",
                         "before-OFFER"]
    assert names[-4:] == ["before-RUNNING", "mid-RUNNING", "before-SERVING", "after-SERVING"]
    assert {name for name, _ in KEPT} <= set(names)


def test_a_new_process_dying_before_commit_leaves_the_old_one_serving() -> None:
    where = tempfile.mkdtemp(prefix="pcidev-kp-")
    with serving("nvme,ns=mem:size=4M") as server, nvme(server.sock, io_queues=1) as drv:
        expect = {1024: os.urandom(4096)}  # beyond the blocks VerifiedIo writes
        drv.write(1, slba=1024, data=expect[1024])
        io = VerifiedIo(drv, slots=32)
        io.start()
        try:
            for name, death in KEPT:
                exe = killpoints.handover_exec(where, killpoints.point_named(name), death)
                started = time.monotonic()
                with pytest.raises(MigrationError, match="handover failed") as info:
                    # (a new process that never says READY is given up after the start's timeout)
                    server.handover(exec_path=exe, timeout=3.0 if name == "before-READY" else 30.0)
                assert "\n" not in str(info.value)
                assert time.monotonic() - started < 30
                assert alive(server.pid) and server.proc.poll() is None, (name, death)
                writes = io.writes
                deadline = time.monotonic() + 20
                while io.writes < writes + 8:  # the I/O goes on through the old process
                    assert not io.errors, io.errors
                    assert time.monotonic() < deadline, f"no I/O after {name}/{death}"
                    time.sleep(0.01)
        finally:
            io.halt.set()
            io.join(30)
        assert not io.errors, io.errors
        io.verify_all()
        assert drv.read(1, slba=1024, nlb=4096 // drv.lba_size(1)) == expect[1024]
        report = server.handover()  # and a healthy one works afterwards
        assert report["old_pid"] == server.proc.pid
        io.verify_all()
        assert drv.read(1, slba=1024, nlb=4096 // drv.lba_size(1)) == expect[1024]


@pytest.mark.parametrize("name", ["before-SERVING", "after-SERVING"])
def test_a_new_process_dying_after_running_ends_the_connection_never_two_servers(name: str) -> None:
    where = tempfile.mkdtemp(prefix="pcidev-kp-")
    with serving("nvme,ns=mem:size=4M") as server, nvme(server.sock, io_queues=1) as drv:
        data = os.urandom(4096)
        drv.write(1, slba=0, data=data)
        old = server.pid
        report = server.handover(exec_path=killpoints.handover_exec(where, killpoints.point_named(name), "kill"))
        assert report["old_pid"] == old  # it sent RUNNING: it took the device
        server.wait_gone(old)  # the old process gave it up for good and ended
        server.wait_gone(report["new_pid"])  # the new one died
        with pytest.raises(TransportError):
            drv.read(1, slba=0, nlb=4096 // drv.lba_size(1))
