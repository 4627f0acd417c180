"""What one hostile peer of the device link can do to the others (issue 12): nothing
beyond a few milliseconds. The server reads every connection incrementally (a peer that
trickles a message, or sends half of one and stops, holds no one else up), and writes
its replies without blocking (a peer that never reads them is dropped once its one
pending reply has not drained within ``io_timeout``, and meanwhile holds no one up)."""

from __future__ import annotations

import array
import os
import socket
import threading
import time

import pytest
from hostile_peer import ServedLink, Trickler, trickle

from pcidev.dma import alloc_memfd
from pcidev.errors import PcidevError, TransportError
from pcidev.transport.link.protocol import (
    DMA_MAP,
    FLAG_ERROR,
    HEADER,
    LINK_MAX_FDS,
    MAGIC,
    SET_IRQS,
    STATUS,
    decode_body,
    encode_body,
    error_from_reply,
    read_message,
)
from pcidev.transport.link.remote import LinkClient

#: the server's per-message and per-reply deadline in these tests: long, so that a loop
#: held by one peer shows as a host request that takes seconds
IO_TIMEOUT = 8.0
#: what a host's STATUS may take while another peer misbehaves (a loaded machine: generous,
#: and still far below IO_TIMEOUT)
PROMPT = 1.5


@pytest.fixture
def served(tmp_path):
    s = ServedLink(tmp_path, io_timeout=IO_TIMEOUT)
    yield s
    s.close()


def test_a_connection_trickling_a_message_holds_no_other_connection_up(served):
    with Trickler(served.connect(), HEADER.pack(MAGIC, STATUS, 0, 1, 200) + bytes(200), close=True):
        time.sleep(0.5)  # the trickler's header has started
        took = [served.status_seconds() for _ in range(5)]
        assert max(took) < PROMPT, took


def test_half_a_message_holds_no_other_connection_up_and_is_dropped_at_its_deadline(tmp_path):
    served = ServedLink(tmp_path, io_timeout=2.0)
    half = served.connect()
    try:
        half.sendall(HEADER.pack(MAGIC, STATUS, 0, 1, 100) + bytes(50))  # and nothing more
        time.sleep(0.2)
        took = [served.status_seconds() for _ in range(5)]
        assert max(took) < PROMPT, took
        half.settimeout(15)
        t0 = time.monotonic()
        kind, flags, mid, body, _ = read_message(half, max_fds=0)  # dropped with an error reply
        assert flags & FLAG_ERROR and "in time" in str(error_from_reply(body))
        assert time.monotonic() - t0 < 10
        assert half.recv(1) == b""  # and closed
    finally:
        half.close()
        served.close()


def test_a_header_split_anywhere_is_read_whole(served):
    s = served.connect()
    try:
        s.settimeout(30)
        msg = HEADER.pack(MAGIC, STATUS, 0, 9, 1) + encode_body({})
        assert trickle(s, msg, threading.Event(), every=0.005) == len(msg)  # every split point
        kind, flags, mid, body, _ = read_message(s, max_fds=0)
        assert (kind, mid, flags) == (STATUS, 9, 1)
        # two messages in one send are two requests
        s.sendall(msg + HEADER.pack(MAGIC, STATUS, 0, 10, 1) + encode_body({}))
        assert read_message(s, max_fds=0)[2] == 9
        assert read_message(s, max_fds=0)[2] == 10
    finally:
        s.close()


def test_a_peer_that_never_reads_its_replies_holds_no_one_up_and_is_dropped(tmp_path):
    served = ServedLink(tmp_path, io_timeout=4.0)
    hog = served.connect()
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stop = threading.Event()
    sent = [0]

    def flood() -> None:
        # requests whose replies are never read: the server's send buffer fills up
        msg = HEADER.pack(MAGIC, STATUS, 0, 1, 1) + encode_body({})
        hog.settimeout(0.5)
        while not stop.is_set():
            try:
                hog.send(msg * 64)
                sent[0] += 64
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    try:
        time.sleep(1.0)
        assert sent[0] > 1000  # its replies stopped fitting long ago
        took = [served.status_seconds() for _ in range(5)]
        assert max(took) < PROMPT, took
        # its one pending reply did not drain within io_timeout: the connection is dropped
        deadline = time.monotonic() + 15
        while t.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not t.is_alive()
        assert served.status_seconds() < PROMPT
    finally:
        stop.set()
        hog.close()
        t.join(5)
        served.close()


def test_more_fds_than_a_message_may_carry_drop_only_that_connection(served):
    s = served.connect()
    try:
        s.settimeout(30)
        fds = [s.fileno()] * (LINK_MAX_FDS + 1)
        msg = HEADER.pack(MAGIC, STATUS, 0, 1, 1) + encode_body({})
        s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
        kind, flags, mid, body, _ = read_message(s, max_fds=0)
        assert flags & FLAG_ERROR and "descriptors" in str(error_from_reply(body))
        assert s.recv(1) == b""
        assert served.status_seconds() < PROMPT
    finally:
        s.close()


def test_the_client_request_is_bounded_as_a_whole_when_the_server_reads_slowly(tmp_path):
    a, b = socket.socketpair()
    stop = threading.Event()

    def slow_reader() -> None:  # 8 KiB every 0.2 s: each send makes progress within its timeout
        while not stop.wait(0.2):
            try:
                if not b.recv(8192):
                    return
            except OSError:
                return

    t = threading.Thread(target=slow_reader, daemon=True)
    t.start()
    try:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client = LinkClient(a, io_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            # a body far larger than the socket buffers: 900 KB at 40 KB/s would take 20 s
            client.request(STATUS, {"pad": bytes(900_000)})
        assert time.monotonic() - t0 < 4
        assert client.broken
    finally:
        stop.set()
        a.close()
        t.join(5)
        b.close()


def _request_with_fds(s: socket.socket, kind: int, body, fds: list[int]):
    msg_body = encode_body(body)
    msg = HEADER.pack(MAGIC, kind, 0, 5, len(msg_body)) + msg_body
    s.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    kind_, flags, mid, rbody, _ = read_message(s, max_fds=0)
    assert (kind_, mid) == (kind, 5)
    return error_from_reply(rbody) if flags & FLAG_ERROR else decode_body(rbody, "reply")


def test_guest_memory_that_can_shrink_and_interrupt_fds_that_are_not_eventfds_are_refused(served):
    """As over vfio-user: an unsealed memfd (a truncation under the mapping would kill the
    device process with SIGBUS) and a pipe as an interrupt "eventfd" (a write nobody
    reads would block the interrupt path) get an error reply; the connection and the
    device go on, and sealed memory and real eventfds are taken."""
    s = served.connect()
    unsealed = os.memfd_create("unsealed", os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, 4096)
    sealed = alloc_memfd(4096)
    r, w = os.pipe()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        s.settimeout(30)
        region = {"gpa": 1 << 32, "size": 4096, "fd_offset": 0, "writable": True, "name": "ram"}
        err = _request_with_fds(s, DMA_MAP, region, [unsealed])
        assert isinstance(err, PcidevError) and "F_SEAL_SHRINK" in str(err)
        assert served.ep.memory.region_count() == 0
        assert _request_with_fds(s, DMA_MAP, region, [sealed]) == {}
        err = _request_with_fds(s, SET_IRQS, {"vectors": [0], "intx": False}, [w])
        assert isinstance(err, PcidevError) and "not an eventfd" in str(err)
        assert 0 not in served.ep.sink.vector_fds
        assert _request_with_fds(s, SET_IRQS, {"vectors": [0], "intx": False}, [efd]) == {}
        assert served.status_seconds() < PROMPT
    finally:
        s.close()
        for fd in (unsealed, sealed, r, w, efd):
            os.close(fd)
