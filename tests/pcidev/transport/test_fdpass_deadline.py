"""The overall deadline of every send (issue 12: fdpass.send_buffers, under send_all and
frames.send_parts alike): a peer that reads a little at a time, or nothing, cannot stretch a
send past it, whatever the socket's own timeout (which applies to each ``send`` only); the
socket's timeout is restored afterwards."""

from __future__ import annotations

import array
import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

from pcidev.errors import TransportError
from pcidev.migration.frames import CHUNK, FRAME_HEADER, MAGIC, send_parts
from pcidev.transport.fdpass import close_fds, recv_exact, send_all, send_buffers

SLACK = 2.0

#: the senders that share the deadline: each sends ``n`` zero bytes (about) by ``deadline``
SENDERS: dict[str, Callable[[socket.socket, int, float], None]] = {
    "send_all": lambda s, n, deadline: send_all(s, bytes(n), deadline=deadline),
    "send_buffers": lambda s, n, deadline: send_buffers(s, [bytes(n // 2), memoryview(bytes(n // 2))],
                                                        deadline=deadline),
    "send_parts": lambda s, n, deadline: send_parts(s, CHUNK, [bytes(n // 2), bytearray(n // 2)], deadline=deadline),
}


@pytest.mark.parametrize("sender", sorted(SENDERS))
@pytest.mark.parametrize("per_send", [None, 1.0, 0.0])
def test_a_slow_reader_cannot_stretch_a_send_past_its_deadline(per_send, sender):
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
            SENDERS[sender](a, 4 << 20, time.monotonic() + 0.5)  # 4 MiB at 40 KiB/s
        assert time.monotonic() - t0 < 0.5 + SLACK
        assert a.gettimeout() == per_send
    finally:
        stop.set()
        a.close()
        t.join(5)
        b.close()


@pytest.mark.parametrize("sender", sorted(SENDERS))
def test_a_reader_that_reads_nothing_is_cut_off_at_the_deadline(sender):
    a, b = socket.socketpair()
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="in time"):
            SENDERS[sender](a, 8 << 20, time.monotonic() + 0.3)
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


def test_send_buffers_sends_every_buffer_in_order_with_the_fds_on_the_first_byte():
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        words = array.array("I", [1, 2, 3])  # a memoryview of another format goes out as its bytes
        send_buffers(a, [b"head", b"", memoryview(words), bytearray(b"tail")], [r, w])
        data, fds = recv_exact(b, 4 + 12 + 4, max_fds=2)
        try:
            assert data == b"head" + words.tobytes() + b"tail" and len(fds) == 2
            os.write(fds[1], b"!")
            assert os.read(r, 1) == b"!"  # the very pipe
        finally:
            close_fds(fds)
        with pytest.raises(TransportError, match="at least one byte"):
            send_buffers(a, [b"", b""], [r])
        send_parts(a, CHUNK, [b"ab", memoryview(b"cd")])
        assert recv_exact(b, FRAME_HEADER.size + 4)[0] == FRAME_HEADER.pack(MAGIC, CHUNK, 0, 4) + b"abcd"
    finally:
        close_fds([r, w])
        a.close()
        b.close()
