"""The device link's wire format: framing, bodies and error replies, over a socket pair."""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc

import msgpack
import pytest

from pcidev.errors import MigrationBlockedError, MmioError, TransportError
from pcidev.transport.link.protocol import (
    BAR_READ,
    FLAG_ERROR,
    FLAG_REPLY,
    HEADER,
    LINK_MAX_FDS,
    MAGIC,
    MAX_BODY,
    decode_body,
    encode_body,
    encode_error,
    error_from_reply,
    read_message,
    send_message,
)
from pcidev.vmstate.errors import StateError


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(2.0)
    b.settimeout(2.0)
    yield a, b
    a.close()
    b.close()


def test_a_message_and_its_fds_arrive_whole(pair):
    a, b = pair
    r, w = os.pipe()
    try:
        send_message(a, BAR_READ, 0, 42, encode_body([0, 8, 4, True]), [r])
        kind, flags, mid, body, fds = read_message(b, max_fds=LINK_MAX_FDS)
        assert (kind, flags, mid) == (BAR_READ, 0, 42)
        assert decode_body(body, "BAR_READ") == [0, 8, 4, True]
        assert len(fds) == 1
        os.close(fds[0])
    finally:
        os.close(r)
        os.close(w)


def test_clean_eof_is_none_only_when_allowed(pair):
    a, b = pair
    a.close()
    assert read_message(b, max_fds=0, eof_ok=True) is None


@pytest.mark.parametrize("head, text", [
    (b"JUNK" + bytes(12), "bad link message magic"),
    (HEADER.pack(MAGIC, BAR_READ, 0, 1, MAX_BODY + 1), "at most"),
])
def test_broken_framing_is_a_transport_error(pair, head, text):
    a, b = pair
    a.sendall(head)
    with pytest.raises(TransportError, match=text):
        read_message(b, max_fds=0)


def test_a_body_that_is_not_msgpack_names_the_message():
    with pytest.raises(TransportError, match="CONFIG_READ: body is not valid msgpack"):
        decode_body(b"\xc1", "CONFIG_READ")


def test_a_body_too_dear_to_decode_is_refused_before_decoding():
    """A full-size body of empty maps would decode to some 76 MB: refused by its estimate
    (MAX_DECODED_BODY), with little allocated; a full-size bin still decodes."""
    hostile = b"\xdd" + struct.pack(">I", MAX_BODY - 5) + b"\x80" * (MAX_BODY - 5)
    tracemalloc.start()
    try:
        with pytest.raises(TransportError, match=r"BAR_WRITE: body is too large: decoding it would take more "
                                                 r"than 16,777,216 bytes .*\(MAX_DECODED_BODY\)"):
            decode_body(hostile, "BAR_WRITE")
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    data = bytes(range(256)) * ((MAX_BODY - 16) // 256)
    assert decode_body(encode_body([0, data]), "BAR_WRITE") == [0, data]


@pytest.mark.parametrize("error", [
    MmioError("no BAR3"),
    MigrationBlockedError(["a reason", "another"]),
    StateError("ring too big", section="edu", instance_id=0, path="ring_size"),
    TransportError("gone"),
])
def test_an_error_survives_the_round_trip(error):
    back = error_from_reply(encode_error(error))
    assert type(back) is type(error) and str(back) == str(error)
    if isinstance(error, MigrationBlockedError):
        assert back.reasons == error.reasons
    if isinstance(error, StateError):
        assert (back.section, back.instance_id, back.path) == ("edu", 0, "ring_size")


def test_reply_flags_are_distinct():
    assert FLAG_REPLY | FLAG_ERROR == 3 and FLAG_REPLY & FLAG_ERROR == 0


def test_error_reply_decoding():
    assert isinstance(error_from_reply(b"\xc1"), TransportError)
    assert isinstance(error_from_reply(msgpack.packb({"type": "NoSuchError", "message": "x"})), TransportError)
    err = error_from_reply(msgpack.packb({"type": "StateError", "message": "m", "reason": "bad",
                                          "section": "edu", "instance_id": 0, "path": "ring_size"}))
    assert isinstance(err, StateError) and (err.section, err.path) == ("edu", "ring_size")
    blocked = error_from_reply(msgpack.packb({"type": "MigrationBlockedError", "message": "m",
                                              "reasons": ["a", "b"]}))
    assert blocked.reasons == ["a", "b"]
