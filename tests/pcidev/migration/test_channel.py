"""The migration channel in one process: migrate_out/migrate_in over socket pairs
(threads play the two sides), source resuming on every failure, and malformed
input to the destination."""

from __future__ import annotations

import os
import resource
import select
import socket
import struct
import threading
import time

import msgpack
import pytest
from precopy_device import in_thread

from pcidev.devices.edu import DESC, EduDevice
from pcidev.errors import ConnectionLostError, MigrationError, TransportError, VMStateError
from pcidev.host import Machine
from pcidev.migration import MAGIC, migrate_in, migrate_out, save_device_stream
from pcidev.migration.frames import MAX_OFFER_FDS
from pcidev.vmstate.errors import ChecksumError, ConfigMismatchError, StreamError

HDR = struct.Struct("<8sHHI")


class CountingEdu(EduDevice):
    def __init__(self, **kw):
        self.resumes = 0
        self.quiesces = 0
        super().__init__(**kw)

    def on_resume(self):
        self.resumes += 1
        super().on_resume()

    def on_quiesce(self):
        self.quiesces += 1
        super().on_quiesce()


@pytest.fixture
def machine():
    with Machine(ram_size=16 << 20) as m:
        yield m


@pytest.fixture
def source(machine):
    p = machine.plug(CountingEdu(autorun=False, chunk=512))
    p.enable_device()
    p.set_master()
    p.alloc_irq_vectors(1, 2)
    ring = machine.alloc(8 * 32)
    p.iowrite64(0, 0x100, ring)
    p.iowrite32(0, 0x108, 8)
    p.iowrite32(0, 0x114, 1)
    src, dst = machine.alloc(4096), machine.alloc(4096)
    machine.write(src, os.urandom(4096))
    machine.memory.write_struct(DESC, ring, src, dst, 4096, 1, 0, 0)
    p.iowrite32(0, 0x10C, 1)
    p.device.resume()
    p.device._step(512)  # a descriptor in flight
    return p


def test_migration_over_a_unix_socket_pair(source):
    a, b = socket.socketpair()
    dest = CountingEdu(autorun=False, chunk=512)
    t, got = in_thread(lambda: migrate_in(dest, b, link="unix:/x"))
    try:
        result = migrate_out(source.device, a)
    finally:
        t.join(5)
        a.close()
        b.close()
    incoming = got["value"]
    assert result.fds == 1 and incoming.fds == 1
    assert result.state_size == len(incoming.stream)
    assert result.link == "unix:/x" and not result.deferred
    assert result.same_clock and result.downtime is not None and 0 <= result.downtime < 5
    assert result.downtime_upper_bound >= 0
    assert source.device.quiesced and source.device.resumes == 1  # never resumed after the ACK
    assert dest.inflight == source.device.inflight and dest.inflight.done == 512
    assert not dest.quiesced and dest.resumes == 1
    incoming.resources.close()


def test_migration_over_tcp_defers_the_resume(source):
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    dest = CountingEdu(autorun=False)
    t, got = in_thread(lambda: migrate_in(dest, b))
    try:
        result = migrate_out(source.device, a)
    finally:
        t.join(5)
        a.close()
        b.close()
    assert result.fds == 0 and result.deferred and result.running_at is None
    incoming = got["value"]
    assert incoming.running_at is None and incoming.resources.memory is None
    assert dest.resumes == 0  # waits for its host to attach memory
    assert dest.get_device_state() == source.device.get_device_state()


# ------------------------------------------------------------ source resumes
def _fake_destination(behaviour):
    """A destination that reads the whole offer and stream, then misbehaves (it speaks the
    exchange without the pre-flight: the source is called with ``preflight=False``)."""

    def run(sock):
        head = sock.recv(HDR.size)
        _, _, _, n = HDR.unpack(head)
        _recv_all(sock, n)
        head = _recv_all(sock, HDR.size)
        _, kind, _, n = HDR.unpack(head)
        _recv_all(sock, n)
        behaviour(sock)

    return run


def _recv_all(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _ack_frame(kind=4, body=None):
    body = msgpack.packb(body if body is not None else {"link": None, "deferred": False, "boot_id": ""})
    return HDR.pack(MAGIC, kind, 0, len(body)) + body


@pytest.mark.parametrize("behaviour, message", [
    (lambda s: s.close(), "peer closed"),
    (lambda s: s.sendall(b"this is not a frame at all"), "bad magic"),
    (lambda s: s.sendall(HDR.pack(MAGIC, 99, 0, 0)), "unknown frame type"),
    (lambda s: s.sendall(_ack_frame(body={"deferred": "yes"})), "wrong type"),
    (lambda s: s.sendall(_ack_frame(kind=5, body={"error": "StateError", "message": "nope"})), "refused"),
    (lambda s: s.sendall(HDR.pack(MAGIC, 4, 0, 1 << 30)), "at most"),
    (lambda s: None, "timed out"),
])
def test_source_resumes_when_the_destination_fails(source, behaviour, message):
    a, b = socket.socketpair()
    peer = _fake_destination(behaviour)
    t, _ = in_thread(lambda: peer(b))
    before = source.device.get_device_state()
    try:
        with pytest.raises(MigrationError, match=message) as info:
            migrate_out(source.device, a, timeout=0.5, preflight=False)
        assert "runs again on the source" in str(info.value)
    finally:
        t.join(5)
        a.close()
        b.close()
    dev = source.device
    assert not dev.quiesced and dev.resumes == 2 and dev.quiesces == 1
    assert dev.get_device_state() == before
    assert dev.process() == 1  # and it keeps working


def test_destination_refusing_the_configuration_nacks(source):
    """Without the pre-flight (a destination from before it), the load refuses the
    configuration and NACKs after the stop (with it: tests/pcidev/migration/test_preflight.py)."""
    class Other(EduDevice):
        def device_fingerprint(self):
            return {"edu.max_transfer": 1}

    a, b = socket.socketpair()
    dest = Other()
    t, got = in_thread(lambda: migrate_in(dest, b))
    try:
        with pytest.raises(MigrationError, match="ConfigMismatchError: .*edu.max_transfer"):
            migrate_out(source.device, a, preflight=False)
    finally:
        t.join(5)
        a.close()
        b.close()
    assert isinstance(got["error"], ConfigMismatchError)
    assert not source.device.quiesced and source.device.quiesces == 1


def test_destination_failing_to_adopt_nacks_and_releases(source):
    """If the destination's adopt step fails, the source is told at once (no timeout)
    and resumes; what the load created on the destination is released."""
    a, b = socket.socketpair()
    dest = CountingEdu(autorun=False)
    adopted = []

    def adopt(res):
        adopted.append(res)
        raise RuntimeError("no room for it here")

    t, got = in_thread(lambda: migrate_in(dest, b, adopt=adopt))
    try:
        with pytest.raises(MigrationError, match="adopt failed: no room"):
            migrate_out(source.device, a, timeout=30.0)
    finally:
        t.join(5)
        a.close()
        b.close()
    assert isinstance(got["error"], MigrationError)
    assert not source.device.quiesced and source.device.resumes == 2
    res = adopted[0]
    assert res.memory is not None and res.memory.closed


def _nack_frame(message):
    body = msgpack.packb({"error": "ConfigMismatchError", "message": message})
    return HDR.pack(MAGIC, 5, 0, len(body)) + body



def test_refusal_sent_before_the_stream_is_read_reaches_the_source(source):
    """The destination refuses at the first message and closes without reading
    the rest: the source's send fails (EPIPE), yet its caller gets the refusal
    reason, never the broken pipe, every time; the source device runs again."""
    dev = source.device
    for i in range(50):
        a, b = socket.socketpair()
        try:
            b.sendall(_nack_frame("stream is for device type 'edu', this device is 'nvme'"))
            b.close()  # before the source sent anything: its first send fails
            with pytest.raises(MigrationError) as info:
                migrate_out(dev, a, timeout=2.0, preflight=False)
        finally:
            a.close()
        text = str(info.value)
        assert "refused the state: ConfigMismatchError: stream is for device type 'edu'" in text, text
        assert "Broken pipe" not in text and "runs again on the source" in text
        assert not dev.quiesced and dev.resumes == 2 + i
    assert dev.process() == 1  # and it keeps working


def _small_buffer_pair(family):
    """A connected pair whose buffers are the kernel's minimum (smaller than an edu stream)."""
    if family == "unix":
        a, b = socket.socketpair()
    else:
        lsock = socket.create_server(("127.0.0.1", 0))
        a = socket.socket()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
        a.connect(lsock.getsockname())
        b, _ = lsock.accept()
        lsock.close()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    return a, b


@pytest.mark.parametrize("family", ["unix", "tcp"])
def test_refusal_at_the_offer_wins_over_the_blocked_stream(source, family):
    """A real destination of another device type refuses after the OFFER while the
    source is still sending a stream larger than the socket buffers: the source
    reports the refusal (50 times in a row), not the failed send."""

    class Other(EduDevice):
        TYPE_NAME = "other"

    dev = source.device
    for i in range(50):
        a, b = _small_buffer_pair(family)

        def destination(b=b):
            try:
                return migrate_in(Other(), b)
            finally:
                b.close()  # unread stream left behind: the source's send breaks

        t, got = in_thread(destination)
        try:
            with pytest.raises(MigrationError, match="refused the state: ConfigMismatchError: .*"
                                                     "stream is for device type 'edu'") as info:
                migrate_out(dev, a, timeout=5.0, preflight=False)
        finally:
            t.join(5)
            a.close()
        assert "Broken pipe" not in str(info.value)
        assert isinstance(got["error"], ConfigMismatchError)
        assert not dev.quiesced and dev.resumes == 2 + i
    assert dev.process() == 1


def test_a_send_failure_without_a_reply_is_reported_as_such(source):
    """The destination closes without a word: the transport error is what the
    source's caller sees."""
    a, b = socket.socketpair()
    b.close()
    try:
        with pytest.raises(MigrationError, match="peer closed the connection") as info:
            migrate_out(source.device, a, timeout=2.0, preflight=False)
    finally:
        a.close()
    assert "refused" not in str(info.value)
    assert not source.device.quiesced and source.device.resumes == 2


# ------------------------------------------------------------ malformed input to the destination
def _offer(size, nfds=0, **over):
    meta = {"protocol": 1, "device_type": "edu", "stream_size": size, "fds": nfds, "boot_id": "", **over}
    body = msgpack.packb(meta)
    return HDR.pack(MAGIC, 1, 0, len(body)) + body


def _state(data):
    return HDR.pack(MAGIC, 3, 0, len(data)) + data


def _valid_stream(machine):
    p = machine.plug(EduDevice())
    p.enable_device()
    return save_device_stream(p.device)


def _feed(frames, fds=()):
    """Send raw bytes to a destination; returns (error raised by migrate_in, reply bytes)."""
    a, b = socket.socketpair()
    dest = EduDevice()
    dest.realize()
    before = (bytes(dest.config.data), dest.get_device_state())
    try:
        if fds:
            socket.send_fds(a, [frames[:1]], list(fds))
            a.sendall(frames[1:])
        else:
            a.sendall(frames)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises((TransportError, VMStateError)) as info:
            migrate_in(dest, b, timeout=1.0)
        a.settimeout(1.0)
        reply = _recv_all(a, HDR.size)  # every refusal is answered with a NACK
        reply += _recv_all(a, HDR.unpack(reply)[3])
    finally:
        a.close()
        b.close()
    assert (bytes(dest.config.data), dest.get_device_state()) == before
    return info.value, reply


def _nack(reply):
    magic, kind, _, n = HDR.unpack(reply[:HDR.size])
    assert (magic, kind) == (MAGIC, 5)
    return msgpack.unpackb(reply[HDR.size:HDR.size + n])


def test_garbage_bytes(machine):
    err, reply = _feed(b"\x00" * 64)
    assert isinstance(err, TransportError) and "bad magic" in str(err)
    assert _nack(reply)["error"] == "TransportError"


def test_truncated_offer(machine):
    err, _ = _feed(_offer(100)[:10])
    assert isinstance(err, TransportError) and "closed" in str(err)


@pytest.mark.parametrize("over, text", [
    ({"protocol": 2}, "protocol 2"),
    ({"stream_size": 1 << 40}, "announces"),
    ({"stream_size": "big"}, "wrong type"),
    ({"fds": -1}, "announces"),
])
def test_bad_offers(machine, over, text):
    err, reply = _feed(_offer(10, **over))
    assert text in str(err)
    assert _nack(reply)["error"] == "TransportError"


def test_an_offer_of_more_fds_than_the_cap_is_refused_before_any_is_received(machine):
    err, reply = _feed(_offer(10, nfds=MAX_OFFER_FDS + 1))
    assert isinstance(err, TransportError)
    assert str(err) == f"migration channel: OFFER announces {MAX_OFFER_FDS + 1} fds (0 to {MAX_OFFER_FDS})"
    assert _nack(reply)["error"] == "TransportError"


def test_an_offer_of_more_fds_than_this_process_may_open_is_refused_before_any_is_received(machine):
    """Below the cap, RLIMIT_NOFILE: 200 fds announced to a process that may open fewer
    are refused at the OFFER (not half-way through the FDS frames, with a truncated batch)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 100, hard))
    try:
        err, reply = _feed(_offer(10, nfds=200))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert isinstance(err, TransportError) and "RLIMIT_NOFILE" in str(err), err
    assert "announces 200 fds; this process may open only" in str(err)
    assert _nack(reply)["error"] == "TransportError"


def test_wrong_device_type(machine):
    err, reply = _feed(_offer(10, device_type="nvme"))
    assert isinstance(err, ConfigMismatchError)
    assert _nack(reply)["error"] == "ConfigMismatchError"


def test_corrupted_stream_is_refused_with_its_error(machine):
    data, _ = _valid_stream(machine)
    bad = bytearray(data)
    bad[30] ^= 1
    err, reply = _feed(_offer(len(bad)) + _state(bytes(bad)))
    assert isinstance(err, ChecksumError)
    assert _nack(reply)["error"] == "ChecksumError"
    err, _ = _feed(_offer(len(data)) + _state(data[:50]))
    assert isinstance(err, TransportError)
    err, _ = _feed(_offer(20) + _state(b"PCIDEVVM" + b"\0" * 12))
    assert isinstance(err, StreamError)


def test_missing_fds_are_refused(machine):
    data, fds = _valid_stream(machine)
    assert fds
    err, _ = _feed(_offer(len(data), nfds=0) + _state(data))
    assert err.path == "dma[0].fd"


def test_unannounced_fds_are_closed_and_refused(machine):
    data, _ = _valid_stream(machine)
    r, w = os.pipe()
    try:
        frames = _offer(len(data)) + _state(data)
        # the OFFER may carry up to 253 fds; announcing 0 and sending 1 is refused
        err, _ = _feed(frames, fds=[r])
        assert "fds arrived" in str(err) or "announced" in str(err)
    finally:
        os.close(r)
        os.close(w)


# ------------------------------------------------------------ commit (handover)
def _committed_pair(source, committed, stall):
    """migrate_out/migrate_in with commit; ``committed`` runs in the destination after COMMIT."""
    a, b = socket.socketpair()
    dest = CountingEdu(autorun=False, chunk=512)
    t, got = in_thread(lambda: migrate_in(dest, b, commit=True, committed=lambda: committed(b)))
    try:
        with pytest.raises(MigrationError) as info:
            migrate_out(source.device, a, commit=True, timeout=5.0, running_timeout=0.3, stall=lambda: stall(a))
    finally:
        t.join(5)
        a.close()
        b.close()
    return info.value, dest, got


def test_a_running_that_comes_after_the_timeout_loses_the_connection(source):
    """RUNNING arrives between the source's timeout and the kill: the destination may have
    served the client, so the source never resumes (no two readers on one socket)."""
    late = threading.Event()

    def committed(_b):
        late.wait(5)  # RUNNING goes out only once the source gave up waiting

    def stall(a):  # the kill comes just after the destination's RUNNING got out
        late.set()
        assert select.select([a], [], [], 5)[0]

    resumes = source.device.resumes
    err, dest, got = _committed_pair(source, committed, stall)
    assert isinstance(err, ConnectionLostError) and "lost" in str(err)
    assert source.device.resumes == resumes and source.device.quiesced
    assert source.device.migrated_out and not source.device.owns_state


def test_a_destination_silent_after_commit_is_killed_and_the_source_resumes(source):
    killed = []
    resumes = source.device.resumes
    err, dest, got = _committed_pair(source, lambda b: b.shutdown(socket.SHUT_WR), lambda a: killed.append(1))
    assert not isinstance(err, ConnectionLostError) and "runs again on the source" in str(err)
    assert killed == [1] and source.device.resumes == resumes + 1 and not source.device.quiesced
    # the destination could not send RUNNING: it must not run the device either
    assert isinstance(got["error"], MigrationError) and dest.resumes == 0


def test_half_a_running_frame_loses_the_connection(source):
    def committed(b):
        b.sendall(MAGIC[:4])
        time.sleep(1.0)
        raise RuntimeError("dies mid-frame")

    resumes = source.device.resumes
    err, _dest, _got = _committed_pair(source, committed, lambda a: None)
    assert isinstance(err, ConnectionLostError)
    assert source.device.resumes == resumes and source.device.quiesced
