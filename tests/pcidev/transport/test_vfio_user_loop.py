"""The vfio-user reader and connection loop: messages whole and once, stops only at boundaries."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from pcidev.errors import StateError
from pcidev.transport.fdpass import send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.conn import ConnectionState
from pcidev.transport.vfio_user.loop import ConnectionLoop
from pcidev.transport.vfio_user.reader import Message, MessageReader


def _msg(mid: int, body: bytes = b"") -> bytes:
    return protocol.HEADER.pack(mid, protocol.REGION_WRITE, protocol.HEADER_SIZE + len(body),
                                protocol.TYPE_COMMAND | protocol.FLAG_NO_REPLY, 0) + body


def test_reader_returns_whole_messages_with_their_fds_and_refuses_oversized_ones():
    a, b = socket.socketpair()
    with a, b:
        r = MessageReader(b, max_msg_fds=2, max_data_xfer_size=64)
        rfd, wfd = os.pipe()
        send_all(a, _msg(1, b"x" * 10), [rfd])
        send_all(a, _msg(2))
        m1 = r.read()
        assert m1 is not None and (m1.mid, m1.body, len(m1.fds)) == (1, b"x" * 10, 1)
        os.close(m1.fds[0])
        m2 = r.read()
        assert m2 is not None and (m2.mid, m2.body, m2.fds) == (2, b"", [])
        a.sendall(protocol.HEADER.pack(4, 1, 16 + 64 + 4096 + 1, 0, 0))
        m4 = r.read()
        assert m4 is not None and m4.fatal
        a.close()
        assert r.read() is None
        os.close(rfd)
        os.close(wfd)


def test_pending_bytes_move_to_another_reader_and_are_read_exactly_once():
    a, b = socket.socketpair()
    with a, b:
        r1 = MessageReader(b, max_msg_fds=1, max_data_xfer_size=64)
        r1.prepend(_msg(7, b"abc")[:5], [])  # a partial message taken by an earlier reader
        data, fds = r1.pending()
        assert (data, fds) == (_msg(7, b"abc")[:5], []) and not r1.buffered()
        r2 = MessageReader(b, max_msg_fds=1, max_data_xfer_size=64)
        r2.prepend(data, fds)
        assert r2.buffered()
        a.sendall(_msg(7, b"abc")[5:] + _msg(8))
        got = [r2.read(), r2.read()]
        assert [(m.mid, m.body) for m in got if m is not None] == [(7, b"abc"), (8, b"")]


def test_loop_stops_only_between_messages_and_leaves_the_socket_readable():
    a, b = socket.socketpair()
    seen: list[int] = []
    with a, b:
        reader = MessageReader(b, max_msg_fds=1, max_data_xfer_size=64)
        loop: ConnectionLoop

        def handle(m: Message) -> None:
            seen.append(m.mid)
            if m.mid == 2:
                loop.wake()  # asked while message 3 is already queued

        loop = ConnectionLoop(handle, reader, on_wake=lambda: "handover")
        a.sendall(_msg(1) + _msg(2) + _msg(3))
        out: dict[str, str] = {}
        t = threading.Thread(target=lambda: out.setdefault("r", loop.run()))
        t.start()
        t.join(10)
        assert out == {"r": "handover"} and seen == [1, 2]
        loop.close()
        # message 3 was read but not handled: it moves to the next reader with the
        # reader's pending bytes, and the socket stays readable (no shutdown happened)
        data, fds = reader.pending()
        nxt_reader = MessageReader(b, max_msg_fds=1, max_data_xfer_size=64)
        nxt_reader.prepend(data, fds)
        a.sendall(_msg(4))
        got = [nxt_reader.read(), nxt_reader.read()]
        assert [m.mid for m in got if m is not None] == [3, 4]


def test_wake_without_hook_stops_and_idle_hook_runs():
    a, b = socket.socketpair()
    with a, b:
        idles = []

        def on_idle() -> bool:
            idles.append(1)
            if len(idles) == 3:
                loop.wake()
            return False

        loop = ConnectionLoop(lambda m: None, MessageReader(b, max_msg_fds=1, max_data_xfer_size=64),
                              on_idle=on_idle, idle_timeout=0.001)
        assert loop.run() == "stopped" and len(idles) == 3
        loop.close()


def test_connection_state_round_trips_and_refuses_garbage():
    st = ConnectionState(max_msg_fds=16, client_caps={"max_msg_fds": 4}, intx_masked=True)
    st.nofd_maps[0xC0000] = (0x1000, 1)
    st.irq_vectors[protocol.IRQ_MSIX] = {0, 3}
    st.counts["VERSION"] = 1
    assert ConnectionState.from_meta(st.to_meta()) == st
    for bad in (None, [], {"client_caps": 3}, {**st.to_meta(), "irq_vectors": {"99": [1]}}):
        with pytest.raises(StateError):
            ConnectionState.from_meta(bad)
