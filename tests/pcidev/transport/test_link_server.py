"""The device side of the device link: a LinkServer (in a thread, the ``served``
fixture) gets garbage messages on a real UNIX socket; they get typed error replies
and never take the server down."""

from __future__ import annotations

import os
import socket

import msgpack
import pytest

from pcidev.errors import DmaError, TransportError
from pcidev.transport.address import parse_address
from pcidev.transport.fdpass import recv_exact, send_all
from pcidev.transport.link.protocol import HEADER, MAGIC, error_from_reply


def _raw(address):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(parse_address(address).path)
    sock.settimeout(2.0)
    return sock


def _request(sock, kind, body, *, raw=None, fds=(), mid=7):
    payload = raw if raw is not None else msgpack.packb(body)
    send_all(sock, HEADER.pack(MAGIC, kind, 0, mid, len(payload)) + payload, fds)
    head, _ = recv_exact(sock, HEADER.size)
    magic, rkind, flags, rid, n = HEADER.unpack(head)
    reply = recv_exact(sock, n)[0] if n else b""
    return rkind, flags, rid, reply


@pytest.mark.parametrize("kind, body, raw, text", [
    (99, {}, None, "unknown link message type 99"),
    (4, None, b"\xc1\xc1", "not valid msgpack"),
    (4, ["0", 0, 4, True], None, "expected an array of 3 integers"),
    (4, [0, 0, 4], None, "3 integers and a bool"),
    (2, [0, -1], None, "values must be in"),
    (5, [0, 0, 4, -5, True], None, "values must be in"),
    (7, {"gpa": 0, "size": 4096, "fd_offset": 0, "writable": True, "name": "x"}, None, "exactly one fd"),
    (9, {"vectors": [0, 0], "intx": False}, None, "distinct"),
    (9, {"vectors": [0], "intx": False}, None, "1 eventfds announced, 0 sent"),
    (11, {"to": 5, "timeout": 1}, None, "field 'to'"),
    (11, {"to": "unix:/x", "timeout": 0}, None, "timeout must be"),
    (11, {"to": "unix:/x", "timeout": 1, "quiesce_timeout_ms": 0}, None, "quiesce_timeout_ms must be"),
    (11, {"to": "unix:/x", "timeout": 1, "quiesce_timeout_ms": "5"}, None, "quiesce_timeout_ms must be"),
    (11, {"to": "unix:/x", "timeout": 1, "quiesce_timeout_ms": True}, None, "quiesce_timeout_ms must be"),
    (12, {}, None, "expected awaiting-attach"),
])
def test_bad_messages_get_error_replies(served, kind, body, raw, text):
    address, _, _ = served
    sock = _raw(address)
    try:
        rkind, flags, rid, reply = _request(sock, kind, body, raw=raw)
        assert (rkind, flags, rid) == (kind, 3, 7)
        err = error_from_reply(reply)
        assert text in str(err)
        # the connection still works afterwards
        rkind, flags, _, reply = _request(sock, 2, [0, 2])
        assert flags == 1 and msgpack.unpackb(reply)[0] == 0x1234
    finally:
        sock.close()


def test_fds_on_a_message_without_fds_are_closed(served):
    address, _, _ = served
    sock = _raw(address)
    r, w = os.pipe()
    try:
        _, flags, _, reply = _request(sock, 2, [0, 2], fds=[r])
        assert flags == 3 and "carries no file descriptors" in str(error_from_reply(reply))
    finally:
        os.close(r)
        os.close(w)
        sock.close()


def test_dma_map_of_a_bad_fd_is_a_dma_error(served):
    address, _, _ = served
    sock = _raw(address)
    r, w = os.pipe()
    try:
        _, flags, _, reply = _request(sock, 7, {"gpa": 0, "size": 4096, "fd_offset": 0, "writable": True,
                                                "name": "pipe"}, fds=[r])
        assert flags == 3 and isinstance(error_from_reply(reply), DmaError)
    finally:
        os.close(r)
        os.close(w)
        sock.close()


def _closed_by_peer(sock) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our unread bytes in its buffer
        return True


@pytest.mark.parametrize("garbage", [
    b"GARBAGE!" * 4,                                          # bad magic
    HEADER.pack(MAGIC, 2, 0, 1, 1 << 30),                     # absurd length
    HEADER.pack(MAGIC, 2, 0, 1, 100) + b"short",              # truncated body (peer stalls)
])
def test_broken_framing_drops_only_that_connection(served, garbage):
    address, ep, _ = served
    bad = _raw(address)
    good = _raw(address)
    try:
        bad.sendall(garbage)
        head, _ = recv_exact(bad, HEADER.size)
        _, _, flags, rid, n = HEADER.unpack(head)
        assert (flags, rid) == (3, 0)
        assert isinstance(error_from_reply(recv_exact(bad, n)[0]), TransportError)
        assert _closed_by_peer(bad)
        _, flags, _, reply = _request(good, 2, [0, 2])
        assert flags == 1
    finally:
        bad.close()
        good.close()


def test_too_many_fds_drop_the_connection(served):
    address, _, _ = served
    bad = _raw(address)
    fds = [os.eventfd(0) for _ in range(70)]
    try:
        payload = msgpack.packb({"vectors": list(range(70)), "intx": False})
        send_all(bad, HEADER.pack(MAGIC, 9, 0, 1, len(payload)) + payload, fds)
        head, _ = recv_exact(bad, HEADER.size)
        _, _, flags, _, n = HEADER.unpack(head)
        assert flags == 3
        assert "more file descriptors" in str(error_from_reply(recv_exact(bad, n)[0]))
    finally:
        for fd in fds:
            os.close(fd)
        bad.close()
