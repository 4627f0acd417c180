"""fdpass.send_all's overall deadline (issue 12): a peer that reads a little at a time, or
nothing, cannot stretch a send past it, whatever the socket's own timeout (which applies
to each ``send`` only); the socket's timeout is restored afterwards."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from pcidev.errors import TransportError
from pcidev.transport.fdpass import send_all

SLACK = 2.0


@pytest.mark.parametrize("per_send", [None, 1.0, 0.0])
def test_a_slow_reader_cannot_stretch_a_send_past_its_deadline(per_send):
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    stop = threading.Event()

    def slow_reader() -> None:  # 4 KiB every 0.1 s: every single send makes progress
        while not stop.wait(0.1):
            try:
                if not b.recv(4096):
                    return
            except OSError:
                return

    t = threading.Thread(target=slow_reader, daemon=True)
    t.start()
    try:
        a.settimeout(per_send)
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="in time"):
            send_all(a, bytes(4 << 20), deadline=time.monotonic() + 0.5)  # 4 MiB at 40 KiB/s
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert a.gettimeout() == per_send
    finally:
        stop.set()
        a.close()
        t.join(5)
        b.close()


def test_a_reader_that_reads_nothing_is_cut_off_at_the_deadline():
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="in time"):
            send_all(a, bytes(8 << 20), deadline=time.monotonic() + 0.3)
        assert time.monotonic() - t0 < 0.3 + SLACK
        assert a.gettimeout() is None
    finally:
        a.close()
        b.close()


def test_a_send_within_its_deadline_goes_out_whole():
    a, b = socket.socketpair()
    try:
        data = bytes(range(256)) * 64
        send_all(a, data, deadline=time.monotonic() + 10)
        got = b""
        b.settimeout(5)
        while len(got) < len(data):
            got += b.recv(len(data))
        assert got == data
    finally:
        a.close()
        b.close()
