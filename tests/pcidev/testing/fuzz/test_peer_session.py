"""The session loop the ``vfio-user`` and ``link`` targets share
(:mod:`pcidev.testing.fuzz.peer_session`): an input replays the same way alone and after
another input (nothing of one input's device, maps or interrupts reaches the next), and a
server loop that hangs does not stall the inputs after it."""

from __future__ import annotations

import random
import threading

import pytest

from pcidev.testing.fuzz import FuzzFinding, vfio_user_target
from pcidev.testing.fuzz.link_target import LinkTarget
from pcidev.testing.fuzz.peer_session import ServerThread
from pcidev.testing.fuzz.vfio_user_target import VfioUserTarget

# link: BAR_READ of edu's liveness register (BAR0 + 4: reads back the inverse of what was
# written), and a BAR_WRITE of 0x12345678 to it (decoded by link_target._LinkSession._request)
LINK_READ = bytes([3, 0, 0, 0, 3, 2, 0, 0])
LINK_WRITE = bytes([4, 0, 0, 0, 3, 2, 200, 0x78, 0x56, 0x34, 0x12, 0, 0])
# vfio-user: VERSION, then REGION_READ / REGION_WRITE of 4 bytes at BAR0 + 4
VFIO_READ = bytes([1, 8, 0, 0, 0, 0, 4, 0, 2, 0, 0])
VFIO_WRITE = bytes([1, 9, 0, 0, 0, 0, 4, 0, 2, 0x78, 0x56, 0x34, 0x12, 0, 0])


def _transcript(target, data: bytes) -> list[tuple]:
    target.run(data)
    return list(target.transcript)


@pytest.mark.parametrize("make, read, write", [(LinkTarget, LINK_READ, LINK_WRITE),
                                               (VfioUserTarget, VFIO_READ, VFIO_WRITE)], ids=["link", "vfio-user"])
def test_an_input_replays_the_same_after_another_that_changed_the_device(make, read, write):
    target = make()
    try:
        first = _transcript(target, read)
        assert any(b"\xff\xff\xff\xff" in entry[-1] for entry in first)  # ~0: nothing written yet
        # the write, then the read in one input: the device does change (the check below can fail)
        both = _transcript(target, write + read[1:] if make is VfioUserTarget else write + read)
        assert any(b"\x87\xa9\xcb\xed" in entry[-1] or b"\xed\xcb\xa9\x87" in entry[-1] for entry in both)
        _transcript(target, write)
        assert _transcript(target, read) == first  # X, Y, X: the same answers
    finally:
        target.close()


@pytest.mark.parametrize("make", [LinkTarget, VfioUserTarget], ids=["link", "vfio-user"])
def test_seeds_and_random_inputs_answer_alike_alone_and_in_sequence(make):
    target = make()
    rnd = random.Random(12)
    inputs = list(target.seeds()) + [rnd.randbytes(rnd.randrange(1, 120)) for _ in range(12)]
    try:
        alone = []
        for data in inputs:
            fresh = make()
            try:
                alone.append(_transcript(fresh, data))
            finally:
                fresh.close()
        in_sequence = [_transcript(target, data) for data in inputs]
        again = [_transcript(target, data) for data in reversed(inputs)][::-1]
    finally:
        target.close()
    assert in_sequence == alone
    assert again == alone


def test_a_hung_server_loop_is_a_finding_and_the_next_input_gets_a_fresh_thread(monkeypatch):
    release = threading.Event()
    real = vfio_user_target.VfioUserServer.serve

    def stuck(self):
        release.wait(30)  # ignores the client's close
        return real(self)

    monkeypatch.setattr(vfio_user_target.VfioUserServer, "serve", stuck)
    monkeypatch.setattr(vfio_user_target, "REPLY_SECONDS", 0.3)
    target = VfioUserTarget()
    try:
        with pytest.raises(FuzzFinding) as info:
            target.run(b"\x00")
        assert info.value.invariant in ("hang", "no-reply")
        monkeypatch.setattr(vfio_user_target.VfioUserServer, "serve", real)
        target.run(b"\x01")  # served by a new thread while the old one is still stuck
        assert target.transcript and target.transcript[0][1] == 1  # VERSION answered
    finally:
        release.set()
        target.close()


def test_server_thread_runs_loops_in_turn_and_records_what_escaped():
    server = ServerThread("test-server-thread")
    try:
        ok = server.submit(lambda: "done")
        assert ok.wait(5) and ok.result == "done" and ok.exc is None
        names: list[str] = []
        bad = server.submit(lambda: names.append(threading.current_thread().name) or 1 / 0)
        assert bad.wait(5) and isinstance(bad.exc, ZeroDivisionError)
        assert names == ["test-server-thread"]
    finally:
        server.close()
