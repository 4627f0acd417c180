"""The buffered vfio-user reader: whole messages in order, fds to the right message, exact pending bytes."""

from __future__ import annotations

import errno
import itertools
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.errors import TransportError
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.loop import ConnectionLoop
from pcidev.transport.vfio_user.reader import Message, MessageReader


def _msg(mid: int, body: bytes = b"", cmd: int = protocol.DMA_MAP) -> bytes:
    return protocol.HEADER.pack(mid, cmd, protocol.HEADER_SIZE + len(body), protocol.TYPE_COMMAND, 0) + body


def _reader(sock: socket.socket, **kw: int) -> MessageReader:
    return MessageReader(sock, max_msg_fds=kw.pop("max_msg_fds", 4), max_data_xfer_size=kw.pop("xfer", 4096), **kw)


def _drain(r: MessageReader) -> list[Message]:
    """Every message the socket holds now (non-blocking reads only)."""
    out = []
    while True:
        m = r.next()
        if m is not None:
            out.append(m)
            continue
        if r.fill() <= 0:
            return out


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        yield a, b


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r
    close_fds([r, w])


def test_a_header_split_across_reads_gives_one_whole_message(pair):
    a, b = pair
    r = _reader(b)
    raw = _msg(5, b"payload")
    a.sendall(raw[:7])
    assert r.fill() == 7 and r.next() is None and r.buffered() and not r.has_message()
    a.sendall(raw[7:20])
    assert r.fill() == 13 and r.next() is None
    a.sendall(raw[20:])
    r.fill()
    m = r.next()
    assert m is not None and (m.mid, m.cmd, m.body, m.fds) == (5, protocol.DMA_MAP, b"payload", [])
    assert not r.buffered()


def test_one_byte_at_a_time(pair):
    a, b = pair
    r = _reader(b)
    raw = _msg(1, b"abc") + _msg(2) + _msg(3, b"x" * 40)
    got = []
    for i in range(len(raw)):
        a.sendall(raw[i:i + 1])
        assert r.fill() == 1
        while (m := r.next()) is not None:
            got.append((m.mid, m.body))
    assert got == [(1, b"abc"), (2, b""), (3, b"x" * 40)]
    assert r.fill() == -1  # nothing waiting: a non-blocking read returns at once


def test_many_messages_come_from_one_read(pair):
    a, b = pair
    r = _reader(b)
    raw = b"".join(_msg(i, bytes([i & 0xFF]) * (i % 13)) for i in range(500))
    a.sendall(raw)
    assert r.fill() == len(raw)  # one system call for all of them
    got = []
    while (m := r.next()) is not None:
        got.append((m.mid, m.body))
    assert got == [(i, bytes([i & 0xFF]) * (i % 13)) for i in range(500)]


def test_a_message_larger_than_the_buffer_grows_it(pair):
    a, b = pair
    r = _reader(b, buffer_size=64, xfer=100_000)
    body = os.urandom(70_000)
    a.sendall(_msg(1) + _msg(2, body) + _msg(3))
    got = _drain(r)
    assert [(m.mid, m.body) for m in got] == [(1, b""), (2, body), (3, b"")]


def test_fds_belong_to_the_last_message_starting_in_a_read(pair, pipe):
    a, b = pair
    r = _reader(b)
    a.sendall(_msg(1, b"plain"))
    send_all(a, _msg(2, b"with fds"), [pipe, pipe])
    a.sendall(_msg(3))
    first = r.fill()
    # Linux ends the read after the segment that carried the fds
    assert first == len(_msg(1, b"plain")) + len(_msg(2, b"with fds"))
    m1, m2 = r.next(), r.next()
    assert m1 is not None and m1.fds == []
    assert m2 is not None and m2.body == b"with fds" and len(m2.fds) == 2
    assert all(_same_file(fd, pipe) for fd in m2.fds)
    close_fds(m2.fds)
    assert r.next() is None
    r.fill()
    m3 = r.next()
    assert m3 is not None and (m3.mid, m3.fds) == (3, [])


def test_fds_of_a_message_read_in_pieces(pair, pipe):
    """A small buffer splits the fd-carrying message: the fds still go to it, and the
    reader reads no byte of the next message before the owner is complete."""
    a, b = pair
    r = _reader(b, buffer_size=16)
    send_all(a, _msg(1, b"y" * 50), [pipe])
    send_all(a, _msg(2, b"z" * 5), [pipe])
    got = _drain(r)
    assert [(m.mid, len(m.fds)) for m in got] == [(1, 1), (2, 1)]
    for m in got:
        close_fds(m.fds)


def test_fds_in_the_middle_of_a_message_end_the_connection(pair, pipe):
    a, b = pair
    r = _reader(b)
    raw = _msg(1, b"q" * 30)
    a.sendall(raw[:20])
    assert r.fill() == 20
    send_all(a, raw[20:], [pipe])  # the fds come with bytes where no message starts
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(TransportError, match="middle of a message"):
        r.fill()
    assert set(os.listdir("/proc/self/fd")) <= before  # the received fds were closed


def test_the_loop_ends_cleanly_on_misplaced_fds(pair, pipe, caplog):
    a, b = pair
    seen: list[int] = []
    reader = _reader(b)
    loop = ConnectionLoop(lambda m: seen.append(m.mid), reader)
    raw = _msg(2, b"q" * 30)
    a.sendall(_msg(1) + raw[:17])
    assert reader.fill() == 33
    send_all(a, raw[17:], [pipe])
    a.shutdown(socket.SHUT_WR)  # (a wrong reader would see the end, not hang)
    with caplog.at_level("INFO"):
        reason = loop.run()
    loop.close()
    assert reason.startswith("transport:") and "middle of a message" in reason and seen == [1]
    assert "vfio-user connection ended" in caplog.text


def test_too_many_fds_for_one_message_are_refused(pair, pipe):
    """The message is returned with an EINVAL error (its fds closed) and the stream goes
    on: the next message and its own fds are read as usual (issue 12, finding 10)."""
    a, b = pair
    r = _reader(b, max_msg_fds=1)
    before = len(os.listdir("/proc/self/fd"))
    send_all(a, _msg(1, b"x" * 8), [pipe, pipe, pipe])
    send_all(a, _msg(2), [pipe])
    msgs = _drain(r)
    assert [m.mid for m in msgs] == [1, 2]
    assert msgs[0].error is not None and msgs[0].error[0] == errno.EINVAL and msgs[0].fds == []
    assert "file descriptors" in msgs[0].error[1] and not msgs[0].fatal
    assert msgs[1].error is None and len(msgs[1].fds) == 1
    close_fds(msgs[1].fds)
    assert len(os.listdir("/proc/self/fd")) == before


def test_pending_and_prepend_move_a_partial_message_and_its_fds(pair, pipe):
    a, b = pair
    r1 = _reader(b)
    a.sendall(_msg(1, b"one"))
    full = _msg(2, b"two" * 10)
    send_all(a, full[:21], [pipe])  # the fds travel with the header of message 2
    assert r1.fill() == len(_msg(1, b"one")) + 21
    m1 = r1.next()
    assert m1 is not None and m1.mid == 1 and r1.next() is None
    data, fds = r1.pending()
    assert data == full[:21] and len(fds) == 1 and not r1.buffered()
    # another reader (another process) continues exactly where the first stopped
    r2 = _reader(b)
    r2.prepend(data, fds)
    a.sendall(full[21:] + _msg(3))
    got = [r2.read(), r2.read()]
    assert [(m.mid, m.body, len(m.fds)) for m in got if m is not None] == [(2, b"two" * 10, 1), (3, b"", 0)]
    assert got[0] is not None and _same_file(got[0].fds[0], pipe)
    close_fds(got[0].fds)


def test_pending_whole_messages_keep_their_order_and_fds(pair, pipe):
    a, b = pair
    r1 = _reader(b)
    a.sendall(_msg(1) + _msg(2, b"b"))
    send_all(a, _msg(3, b"c"), [pipe])
    r1.fill()
    data, fds = r1.pending()  # three whole messages, nothing handed out
    r2 = _reader(b)
    r2.prepend(data, fds)
    got = [r2.read() for _ in range(3)]
    assert [(m.mid, len(m.fds)) for m in got if m is not None] == [(1, 0), (2, 0), (3, 1)]
    close_fds(got[2].fds if got[2] is not None else [])


def test_prepend_refuses_fds_without_a_message(pair, pipe):
    _a, b = pair
    fd = os.dup(pipe)
    with pytest.raises(TransportError):
        _reader(b).prepend(b"", [fd])
    with pytest.raises(OSError):
        os.fstat(fd)  # taken and closed


def test_closed_mid_message_is_an_error_and_between_messages_the_end(pair):
    a, b = pair
    r = _reader(b)
    a.sendall(_msg(1) + _msg(2, b"abc")[:10])
    a.shutdown(socket.SHUT_WR)
    m = r.read()
    assert m is not None and m.mid == 1
    with pytest.raises(TransportError, match="closed"):
        r.read()
    c, d = socket.socketpair()
    with c, d:
        c.sendall(_msg(9))
        c.close()
        r2 = _reader(d)
        m9 = r2.read()
        assert m9 is not None and m9.mid == 9 and r2.read() is None


def test_bad_sizes_give_error_messages(pair):
    """An oversized message and one whose size is below its header both lose the framing:
    each is a fatal error message, and nothing after it is parsed."""
    a, b = pair
    r = _reader(b, xfer=64)
    a.sendall(_msg(4) + protocol.HEADER.pack(5, 1, 16 + 64 + 4096 + 1, 0, 0) + _msg(6))
    got = _drain(r)
    assert [(m.mid, m.error is not None, m.fatal) for m in got] == [(4, False, False), (5, True, True)]
    a2, b2 = socket.socketpair()
    with a2, b2:
        r2 = _reader(b2, xfer=64)
        a2.sendall(protocol.HEADER.pack(3, 1, 10, 0, 0) + _msg(7))
        got = _drain(r2)
        assert [(m.mid, m.error is not None, m.fatal) for m in got] == [(3, True, True)]


def _exact_parse(stream: bytes, fd_owner: set[int]) -> list[tuple[int, int, bytes, int]]:
    """What an exact reader (header, then body) yields: (id, cmd, body, fds)."""
    out, pos = [], 0
    while pos < len(stream):
        mid, cmd, size, _flags, _err = protocol.HEADER.unpack_from(stream, pos)
        out.append((mid, cmd, stream[pos + 16:pos + size], 1 if len(out) in fd_owner else 0))
        pos += size
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bodies=st.lists(st.binary(max_size=90), min_size=1, max_size=25),
       with_fds=st.sets(st.integers(0, 24), max_size=6),
       cuts=st.sets(st.integers(1, 3000), max_size=60),
       buffer_size=st.sampled_from([16, 17, 40, 100, 4096]))
def test_any_chunking_reads_the_same_messages_as_an_exact_reader(pipe, bodies, with_fds, cuts, buffer_size):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        _check_chunking(a, b, pipe, bodies, with_fds, cuts, buffer_size)


def _check_chunking(a: socket.socket, b: socket.socket, pipe: int, bodies: list[bytes], with_fds: set[int],
                    cuts: set[int], buffer_size: int) -> None:
    fd_owner = {i for i in with_fds if i < len(bodies)}
    msgs = [_msg(i, body, cmd=protocol.REGION_WRITE + i % 3) for i, body in enumerate(bodies)]
    starts = [sum(map(len, msgs[:i])) for i in range(len(msgs) + 1)]
    stream = b"".join(msgs)
    # a client may split its writes anywhere, but each fd-carrying message is sent
    # with one sendmsg of its own (as QEMU and pcidev's client do): its fds ride on
    # the piece that starts with its header
    points = {c for c in cuts if c < len(stream)} | {starts[i] for i in fd_owner} | {starts[i + 1] for i in fd_owner}
    points |= {0, len(stream)}
    points -= {c for i in fd_owner for c in range(starts[i] + 1, starts[i + 1])}
    bounds = sorted(points)
    r = _reader(b, buffer_size=buffer_size, max_msg_fds=1)
    got: list[tuple[int, int, bytes, int]] = []
    for lo, hi in itertools.pairwise(bounds):
        piece_fds = [pipe] if any(lo <= starts[i] < hi for i in fd_owner) else []
        send_all(a, stream[lo:hi], piece_fds)
        for m in _drain(r):
            got.append((m.mid, m.cmd, m.body, len(m.fds)))
            close_fds(m.fds)
    for m in _drain(r):
        got.append((m.mid, m.cmd, m.body, len(m.fds)))
        close_fds(m.fds)
    assert got == _exact_parse(stream, fd_owner)
    assert not r.buffered()



def test_prepend_in_front_of_buffered_bytes_keeps_their_fds(pair, pipe):
    a, b = pair
    r = _reader(b)
    a.sendall(_msg(1))
    send_all(a, _msg(2, b"fd"), [pipe])
    r.fill()
    m1 = r.next()
    assert m1 is not None and m1.mid == 1  # message 2 (with its fd) stays buffered, not at the front
    r.prepend(_msg(0, b"earlier"), [])
    got = [r.next(), r.next()]
    assert [(m.mid, len(m.fds)) for m in got if m is not None] == [(0, 0), (2, 1)]
    close_fds(got[1].fds if got[1] is not None else [])
