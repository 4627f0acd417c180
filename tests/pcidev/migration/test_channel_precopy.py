"""The migration channel's protocol 2 (memory contents over TCP): every malformed frame a
destination can get is refused with one reason in a NACK, the destination untouched and
its staging memfds closed; a destination that dies at any point of the pre-copy (or the
stop) leaves the source running with its BAR unchanged; protocol 1 still works."""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time

import msgpack
import pytest
from hostile_peer import Trickler
from precopy_device import PrecopyDev, page_crcs, tcp_pair

from pcidev.devices.edu import EduDevice
from pcidev.errors import MigrationError, TransportError, VMStateError
from pcidev.irq import EventfdSink
from pcidev.migration import MAGIC, migrate_in, migrate_out, save_device_stream
from pcidev.migration.frames import CHUNK, MEMORY, OFFER, STATE, recv_frame
from pcidev.migration.precopy import MAX_CHUNK, MAX_SOURCES, Precopy, StagedMemory

HDR = struct.Struct("<8sHHI")
CHEAD = struct.Struct("<HQI")
SIZE = 64 * 1024


def _frame(kind, body):
    return HDR.pack(MAGIC, kind, 0, len(body)) + body


def _memory(sources=(("bar2", SIZE),), **over):
    meta = {"protocol": 2, "boot_id": "", "sources": [{"name": n, "size": s} for n, s in sources], **over}
    return _frame(MEMORY, msgpack.packb(meta))


def _chunk(name="bar2", off=0, data=b"\x01" * 4096, length=None, raw_name=None):
    head = raw_name if raw_name is not None else name.encode()
    n = len(data) if length is None else length
    return _frame(CHUNK, CHEAD.pack(len(head), off, n) + head + data)


def _offer(size, *, protocol=2, stream_fds=1, fd_sources=None, **over):
    meta = {"protocol": protocol, "device_type": "test-precopy", "stream_size": size, "fds": 0, "boot_id": "",
            **({"stream_fds": stream_fds, "fd_sources": {"0": "bar2"} if fd_sources is None else fd_sources}
               if protocol == 2 else {}), **over}
    return _frame(OFFER, msgpack.packb(meta))


@pytest.fixture(scope="module")
def stream():
    """A valid stream of a PrecopyDev whose only descriptor (index 0) is its RAM BAR."""
    src = PrecopyDev(SIZE)
    try:
        src.ram.mem[:] = random.Random(7).randbytes(SIZE)
        src.regs["X"].value = 9
        src.quiesce()
        data, fds = save_device_stream(src)
        assert len(fds) == 1
        return data, bytes(src.ram.mem)
    finally:
        src.close()


def _open_fds():
    return set(os.listdir("/proc/self/fd"))


def _target(fd: str) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:  # (closed since)
        return ""


def _feed(frames, *, unix=False, max_memory=None):
    """Send raw frames to a real destination; returns (error, NACK meta)."""
    a, b = socket.socketpair() if unix else tcp_pair()
    dest = PrecopyDev(SIZE)
    dest.realize()
    dest.ram.mem[:8] = b"original"
    before = (page_crcs(dest.ram), dest.regs["X"].value)
    fds_before = _open_fds()
    try:
        a.sendall(frames)
        a.shutdown(socket.SHUT_WR)
        kw = {} if max_memory is None else {"max_memory": max_memory}
        with pytest.raises((TransportError, VMStateError)) as info:
            migrate_in(dest, b, timeout=2.0, **kw)
        # the staging memfds are closed (an fd another thread opened meanwhile is not one of them)
        assert not [fd for fd in _open_fds() - fds_before if "pcidev-staging" in _target(fd)]
        a.settimeout(2.0)
        kind, body, _ = recv_frame(a)
        assert kind == 5  # NACK
        nack = msgpack.unpackb(body)
    finally:
        a.close()
        b.close()
    assert (page_crcs(dest.ram), dest.regs["X"].value) == before
    dest.close()
    return info.value, nack


BAD = [
    ("memory-protocol", _memory(protocol=3), "MEMORY of protocol 3"),
    ("no-sources", _memory(()), "announces 0 sources"),
    ("size-zero", _memory((("bar2", 0),)), "has size 0"),
    ("size-negative", _memory((("bar2", -4096),)), "has size -4096"),
    ("size-string", _memory((("bar2", "big"),)), "has size 'big'"),
    # the destination stages only its own memory objects, of their exact sizes (review G #5)
    ("too-big", _memory((("bar2", 8 << 30), ("b", 8 << 30), ("c", 4096))), "is not one of this device's memory"),
    ("foreign-16GiB", _memory((("x", 16 << 30),)), f"'x' of {16 << 30} bytes is not one of this device's"),
    ("own-name-other-size", _memory((("bar2", 2 * SIZE),)), f"'bar2' of {2 * SIZE} bytes is not one of"),
    # malformed names and indexes are one TransportError each, never a ValueError (review G #6)
    ("name-nul", _memory((("a\x00b", SIZE),)), "holds a character other than"),
    ("name-newline", _memory((("bar2\n", SIZE),)), "holds a character other than"),
    ("name-non-ascii", _memory((("bär2", SIZE),)), "holds a character other than"),
    ("fd-index-superscript", _memory() + _offer(10, fd_sources={"\u00b2": "bar2"}), "index '\u00b2' is not one of"),
    ("fd-index-arabic-digit", _memory() + _offer(10, fd_sources={"\u0660": "bar2"}), "is not one of the"),
    ("fd-index-leading-zero", _memory() + _offer(10, stream_fds=20, fd_sources={"01": "bar2"}), "index '01'"),
    ("fd-index-sign", _memory() + _offer(10, fd_sources={"+0": "bar2"}), "index '+0'"),
    ("fd-index-huge", _memory() + _offer(10, fd_sources={"9" * 400: "bar2"}), "is not one of the"),
    ("fd-index-int", _memory() + _offer(10, fd_sources={0: "bar2"}), "not allowed for map key"),
    # one staged source stands for one descriptor (review G #7)
    ("fd-name-twice", _memory() + _offer(10, stream_fds=2, fd_sources={"0": "bar2", "1": "bar2"}),
     "names 'bar2' for more than one descriptor"),
    ("name-long", _memory((("n" * 65, SIZE),)), "longer than 64 bytes"),
    ("name-empty", _memory((("", SIZE),)), "non-empty string"),
    ("name-int", _frame(MEMORY, msgpack.packb({"protocol": 2, "boot_id": "", "sources": [{"name": 5, "size": 1}]})),
     "non-empty string"),
    ("extra-key", _frame(MEMORY, msgpack.packb({"protocol": 2, "boot_id": "",
                                                "sources": [{"name": "a", "size": 1, "x": 1}]})), "not a map of"),
    ("duplicate", _memory((("bar2", SIZE), ("bar2", SIZE))), "announced twice"),
    ("duplicate-later", _memory() + _memory(), "announced twice"),
    ("too-many", _memory([(f"s{i}", 4096) for i in range(MAX_SOURCES + 1)]), "announces 65 sources"),
    ("memory-not-msgpack", _frame(MEMORY, b"\xc1"), "not msgpack"),
    ("chunk-first", _chunk(), "expected OFFER, got CHUNK"),
    ("chunk-unknown", _memory() + _chunk("bar3"), "unknown memory source 'bar3'"),
    ("chunk-outside", _memory() + _chunk(off=SIZE - 100), "outside memory source 'bar2'"),
    ("chunk-huge-offset", _memory() + _chunk(off=(1 << 64) - 4096), "outside memory source"),
    ("chunk-empty", _memory() + _chunk(data=b""), "CHUNK of 0 bytes"),
    ("chunk-too-long", _memory() + _chunk(data=b"", length=MAX_CHUNK + 1),
     f"CHUNK of {MAX_CHUNK + 1} bytes"),
    ("chunk-short-data", _memory() + _chunk(data=b"\x01" * 100, length=4096), "announces 4096 bytes and carries 100"),
    ("chunk-short-header", _memory() + _frame(CHUNK, b"\x01\x02"), "shorter than its header"),
    ("chunk-name-cut", _memory() + _frame(CHUNK, CHEAD.pack(40, 0, 1) + b"bar2"), "source name of 40 bytes"),
    ("chunk-name-long", _memory() + _chunk(raw_name=b"n" * 65), "source name of 65 bytes"),
    ("chunk-name-utf8", _memory() + _chunk(raw_name=b"\xff\xfe"), "not UTF-8"),
    ("chunk-frame-too-long", _memory() + HDR.pack(MAGIC, CHUNK, 0, 2 << 20), "frame of"),
    ("state-after-chunks", _memory() + _chunk() + _frame(STATE, b"x"), "expected OFFER, got STATE"),
    ("protocol-1-after-memory", _memory() + _offer(10, protocol=1), "protocol 1 OFFER after MEMORY"),
    ("protocol-2-without-memory", _offer(10), "protocol 2 OFFER without MEMORY"),
    ("protocol-9", _memory() + _offer(10, protocol=9), "protocol 9 is not 1 or 2"),
    ("no-stream-fds", _memory() + _offer(10, stream_fds="x"), "stream_fds 'x'"),
    ("stream-fds-negative", _memory() + _offer(10, stream_fds=-1), "stream_fds -1"),
    ("fd-sources-not-map", _memory() + _offer(10, fd_sources=[1]), "fd_sources is not a map"),
    ("fd-index-outside", _memory() + _offer(10, fd_sources={"1": "bar2"}), "index '1' is not one of"),
    ("fd-index-word", _memory() + _offer(10, fd_sources={"x": "bar2"}), "index 'x' is not one of"),
    ("fd-unknown-name", _memory() + _offer(10, fd_sources={"0": "bar9"}), "names 'bar9', which MEMORY"),
]


@pytest.mark.parametrize("frames, text", [pytest.param(f, t, id=i) for i, f, t in BAD])
def test_a_malformed_frame_is_refused_with_one_reason(frames, text):
    err, nack = _feed(frames)
    assert isinstance(err, TransportError) and text in str(err)
    assert nack["error"] == "TransportError" and text in nack["message"]


def test_memory_on_a_socket_that_carries_descriptors_is_refused():
    err, nack = _feed(_memory(), unix=True)
    assert "MEMORY on a socket that carries descriptors" in str(err) and nack["error"] == "TransportError"


def test_a_chunk_after_the_offer_is_refused(stream):
    data, _ = stream
    err, _ = _feed(_memory() + _offer(len(data)) + _chunk())
    assert isinstance(err, TransportError) and "expected a STATE" in str(err)


def test_a_stream_whose_ram_bar_did_not_travel_is_refused(stream):
    data, _ = stream
    err, nack = _feed(_memory() + _chunk() + _offer(len(data), fd_sources={}) + _frame(STATE, data))
    assert "did not travel with this migration" in str(err) and err.path == "ram_bars.bars[0].fd"
    assert nack["error"] == "StateError"


def test_a_source_smaller_than_the_bar_is_refused(stream):
    data, _ = stream
    err, _ = _feed(_memory((("bar2", 4096),)) + _offer(len(data)) + _frame(STATE, data))
    # refused at the announcement already: the destination knows its BAR's size (review G #5)
    assert "'bar2' of 4096 bytes is not one of this device's memory objects (bar2: 65536)" in str(err)


def test_hand_made_frames_load_with_holes_and_zero_chunks(stream):
    """The destination's side alone: chunks in any order, a chunk of zeros punches a hole."""
    data, contents = stream
    a, b = tcp_pair()
    dest = PrecopyDev(SIZE)
    frames = _memory() + _chunk(data=b"\xee" * SIZE) + _chunk(off=4096, data=b"", length=8192)
    frames += b"".join(_chunk(off=i, data=contents[i:i + 4096]) for i in range(SIZE - 4096, -1, -4096)
                       if contents[i:i + 4096].strip(b"\0"))
    frames += _offer(len(data)) + _frame(STATE, data)
    try:
        a.sendall(frames)
        res = migrate_in(dest, b, timeout=5)
        assert bytes(dest.ram.mem) == contents and dest.regs["X"].value == 9
        res.resources.close()
    finally:
        a.close()
        b.close()
        dest.close()


def test_without_expected_sources_the_cap_still_holds():
    """A caller that checks names itself (expected=None) still gets the documented cap."""
    staged = StagedMemory()
    try:
        with pytest.raises(TransportError, match=f"more than {16 << 30} bytes in all"):
            staged.announce(_memory((("a", 8 << 30), ("b", 8 << 30), ("c", 4096)))[HDR.size:])
    finally:
        staged.close()


def test_a_source_that_keeps_resending_is_cut_off_after_max_rounds():
    """Each pass may re-send what was dirtied (the incoming deadline grows with what was
    applied), but not without end: past ``max_rounds`` times the announced memory a
    CHUNK is refused, so the stream's time stays bounded."""
    staged = StagedMemory(max_rounds=3)
    try:
        staged.announce(_memory((("bar2", 8192),))[HDR.size:])
        one = _chunk(off=0, data=b"\x02" * 8192)[HDR.size:]
        for _ in range(3):
            staged.apply(one)
        assert staged.received == 3 * 8192
        with pytest.raises(TransportError, match="more than 3 times the 8192 it announced"):
            staged.apply(_chunk(off=0, data=b"\x03" * 4096)[HDR.size:])
    finally:
        staged.close()


def test_a_generation_suffix_names_the_same_object_and_nothing_else():
    """``name@generation`` (NVMe: the store's inode, which differs between processes) is
    matched by the part before the ``@``; another object or size is still refused."""
    staged = StagedMemory(expected={"nvme/ns1": 8192})
    try:
        staged.announce(_memory((("nvme/ns1@1234", 8192),))[HDR.size:])
        with pytest.raises(TransportError, match="not one of this device's memory objects"):
            staged.announce(_memory((("nvme/ns2@1234", 8192),))[HDR.size:])
        with pytest.raises(TransportError, match="not one of this device's memory objects"):
            staged.announce(_memory((("nvme/ns1@99", 4096),))[HDR.size:])
    finally:
        staged.close()


def _timed_destination(dest, sock, **kwargs):
    """migrate_in in a thread; returns (thread, out): ``out["err"]`` the TransportError it
    raised, ``out["t"]`` how long it took."""
    out = {}

    def destination():
        t0 = time.monotonic()
        try:
            migrate_in(dest, sock, **kwargs)
        except TransportError as exc:
            out["err"] = exc
        out["t"] = time.monotonic() - t0

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    return t, out


def test_a_peer_that_trickles_chunks_is_cut_off_by_the_overall_deadline():
    """Review G #5: one CHUNK just inside each per-frame timeout no longer keeps the
    destination in migrate_in: the whole stream has a deadline, then a NACK."""
    a, b = tcp_pair()
    dest = PrecopyDev(SIZE)
    t, out = _timed_destination(dest, b, timeout=0.5, total_timeout=1.5)
    try:
        a.sendall(_memory())
        t0 = time.monotonic()
        while t.is_alive() and time.monotonic() - t0 < 6:
            time.sleep(0.3)  # inside the per-frame timeout
            try:
                a.sendall(_chunk(off=0))
            except OSError:
                break
        t.join(10)
        assert not t.is_alive() and "overall deadline" in str(out["err"]) and out["t"] < 3.0
        a.settimeout(2.0)
        kind, body, _ = recv_frame(a)
        assert kind == 5 and "overall deadline" in msgpack.unpackb(body)["message"]  # NACK
    finally:
        a.close()
        b.close()
        dest.close()


def test_a_frame_trickled_byte_by_byte_is_cut_off_by_the_overall_deadline():
    a, b = tcp_pair()
    dest = PrecopyDev(SIZE)
    t, out = _timed_destination(dest, b, timeout=0.5, total_timeout=1.0)
    try:
        frames = _memory() + _chunk(off=0)
        a.sendall(frames[:-4000])
        with Trickler(a, frames[-4000:], every=0.2):
            t.join(10)
        assert not t.is_alive() and "overall deadline" in str(out["err"]) and out["t"] < 2.5
    finally:
        a.close()
        b.close()
        dest.close()


def test_the_default_deadline_follows_the_announced_bytes(stream):
    """Without total_timeout a real stream still loads (the default leaves room for it)."""
    data, contents = stream
    a, b = tcp_pair()
    dest = PrecopyDev(SIZE)
    try:
        a.sendall(_memory() + b"".join(_chunk(off=i, data=contents[i:i + 4096]) for i in range(0, SIZE, 4096))
                  + _offer(len(data)) + _frame(STATE, data))
        res = migrate_in(dest, b, timeout=5)
        assert bytes(dest.ram.mem) == contents and dest.regs["X"].value == 9
        res.resources.close()
    finally:
        a.close()
        b.close()
        dest.close()


def test_contents_can_never_stand_for_an_eventfd():
    """Review G #7: a peer's staging memfd at an eventfd's index is refused by the load
    (StateError in the NACK), and the RAM BAR's own index still needs its own name."""
    src = PrecopyDev(SIZE)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        src.attach(None, EventfdSink({}, intx_fd=efd))
        src.ram.mem[:4096] = b"\x07" * 4096
        src.quiesce()
        data, fds = save_device_stream(src)
        assert len(fds) == 2 and fds[0] == efd  # eventfd first, then the RAM BAR
    finally:
        src.close()
        os.close(efd)
    err, nack = _feed(_memory() + _chunk() + _offer(len(data), stream_fds=2, fd_sources={"0": "bar2"})
                      + _frame(STATE, data))
    assert "not a memory object's" in str(err) and err.path == "eventfds.intx"
    assert nack["error"] == "StateError"


def test_a_zero_chunk_punches_a_hole_in_the_staging_memfd():
    staged = StagedMemory()
    try:
        staged.announce(_memory((("m", 1 << 20),))[HDR.size:])
        staged.apply(_chunk("m", 0, b"\x05" * MAX_CHUNK)[HDR.size:])
        (fd,) = [f for f in staged.load_fds({"stream_fds": 1, "fd_sources": {"0": "m"}}) if f is not None]
        full = os.fstat(fd).st_blocks
        staged.apply(_chunk("m", 100, b"", length=(1 << 20) - 200)[HDR.size:])
        assert os.fstat(fd).st_blocks < full // 4  # pages given back
        got = os.pread(fd, 1 << 20, 0)
        assert got[:100] == b"\x05" * 100 and got[-100:] == b"\x05" * 100 and not got[100:-100].strip(b"\0")
        assert staged.received == MAX_CHUNK + (1 << 20) - 200
    finally:
        staged.close()


# --------------------------------------------------------- the destination goes away
def _dying_destination(sock, frames_before_close, *, at_offer=False):
    """Read frames and close after ``frames_before_close`` of them (or at the OFFER); it
    speaks the exchange without the pre-flight (the source is told ``preflight=False``;
    the real destination dying at each frame: test_kill_points.py)."""
    n = 0
    try:
        while n < frames_before_close:
            kind, _body, _ = recv_frame(sock, max_len=2 << 20)
            n += 1
            if at_offer and kind == OFFER:
                break
    except TransportError:
        pass
    finally:
        sock.close()


@pytest.mark.parametrize("point", [0, 1, 2, 5, 12, 17, "offer"])
def test_a_destination_dying_during_precopy_leaves_the_source_running_untouched(point):
    dev = PrecopyDev(16 << 20)
    try:
        dev.ram.mem[:] = random.Random(3).randbytes(16 << 20)
        dev.regs["X"].value = 5
        before = page_crcs(dev.ram)
        a, b = tcp_pair(buffers=64 << 10)
        at_offer = point == "offer"
        t = threading.Thread(target=_dying_destination, args=(b, 10**6 if at_offer else point),
                             kwargs={"at_offer": at_offer}, daemon=True)
        t.start()
        quiesces = []
        dev.on_quiesce = lambda: quiesces.append(1)  # type: ignore[method-assign]
        p = Precopy(dev, a, timeout=5, preflight=False)
        failed_in_precopy = False
        try:
            p.run()
        except MigrationError as exc:
            failed_in_precopy = True
            assert "keeps running on the source" in str(exc)
            assert not quiesces  # it never stopped
        if not failed_in_precopy:
            with pytest.raises(MigrationError, match="runs again on the source"):
                migrate_out(dev, a, precopy=p, timeout=5)
        t.join(10)
        a.close()
        # MEMORY and 16 chunks: before the 17th frame the pre-copy itself sees it; after the
        # last one it may (its check for a refusal saw the end) or the stop does
        if point == "offer":
            assert not failed_in_precopy
        elif point < 17:
            assert failed_in_precopy
        assert p.failed and not dev.ram.dirty.tracking
        assert not dev.quiesced and not dev.migrated_out and dev.owns_state
        assert page_crcs(dev.ram) == before and dev.regs["X"].value == 5
    finally:
        dev.close()


def test_a_refusal_during_precopy_reaches_the_source_with_its_reason():
    dev = PrecopyDev(4 << 20)
    dest = PrecopyDev(4 << 20)
    a, b = tcp_pair()
    got = {}

    def destination():
        try:
            migrate_in(dest, b, timeout=5, max_memory=1 << 20)
        except BaseException as exc:
            got["error"] = exc
        finally:
            b.close()  # as a serving process does: the rest is never read

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    try:
        dev.ram.mem[:] = random.Random(4).randbytes(4 << 20)
        p = Precopy(dev, a, timeout=5)
        with pytest.raises(MigrationError, match="more than 1048576 bytes in all"):
            p.run()
        t.join(5)
        assert isinstance(got["error"], TransportError)
        assert not dev.quiesced and not dev.ram.dirty.tracking
    finally:
        a.close()
        b.close()
        dev.close()
        dest.close()


def test_a_stalled_destination_times_the_precopy_out():
    dev = PrecopyDev(4 << 20)
    a, b = tcp_pair(buffers=64 << 10)
    try:
        dev.ram.mem[:] = random.Random(5).randbytes(4 << 20)
        p = Precopy(dev, a, timeout=0.3, preflight=False)  # (stalled with the pre-flight: test_preflight.py)
        with pytest.raises(MigrationError, match="keeps running"):
            p.run()  # nobody reads
        assert not dev.quiesced and p.failed
    finally:
        a.close()
        b.close()
        dev.close()


# --------------------------------------------------------------------- protocol 1
def test_protocol_1_over_tcp_without_memory_sources_is_still_accepted():
    src = EduDevice()
    src.realize()
    src.quiesce()
    data, _ = save_device_stream(src)
    a, b = tcp_pair()
    dest = EduDevice()
    try:
        meta = {"protocol": 1, "device_type": "edu", "stream_size": len(data), "fds": 0, "boot_id": ""}
        a.sendall(_frame(OFFER, msgpack.packb(meta)) + _frame(STATE, data))
        res = migrate_in(dest, b, timeout=5)
        assert res.running_at is None and dest.get_device_state() == src.get_device_state()
        kind, body, _ = recv_frame(a)
        assert kind == 4 and msgpack.unpackb(body)["deferred"]
    finally:
        a.close()
        b.close()
        src.close()
        dest.close()


def test_an_edu_over_tcp_sends_protocol_1_exactly_as_before():
    src = EduDevice()
    src.realize()
    a, b = tcp_pair()
    frames = []

    def destination():
        kind, body, _ = recv_frame(b)
        frames.append((kind, msgpack.unpackb(body)))
        b.close()

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    try:
        with pytest.raises(MigrationError):
            migrate_out(src, a, timeout=2, preflight=False)  # (as a source from before the pre-flight)
        t.join(5)
        ((kind, offer),) = frames
        assert kind == OFFER and offer["protocol"] == 1 and set(offer) == {
            "protocol", "device_type", "stream_size", "fds", "boot_id", "commit"}  # (commit: optional)
        assert not src.quiesced
    finally:
        a.close()
        src.close()
