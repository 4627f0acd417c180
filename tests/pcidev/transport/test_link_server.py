"""The device link: a LinkServer (in a thread) serving an edu endpoint over a real UNIX
socket, driven by the software host through RemoteDevice; garbage messages get typed
error replies and never take the server down."""

from __future__ import annotations

import os
import socket
import struct
import threading

import crc32c
import msgpack
import pytest

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.errors import ConfigSpaceError, DmaError, MigrationError, MmioError, TransportError
from pcidev.host import Machine
from pcidev.transport.address import listen, parse_address
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import recv_exact, send_all
from pcidev.transport.link import LinkServer
from pcidev.transport.link.protocol import HEADER, MAGIC, error_from_reply
from pcidev.vmstate.errors import StateError


@pytest.fixture
def served(tmp_path):
    """An edu endpoint served in a thread; yields (address, endpoint, server)."""
    dev = EduDevice()
    ep = DeviceEndpoint(dev)
    ep.start()
    listener, addr = listen(f"unix:{tmp_path}/edu.sock")
    server = LinkServer(ep, listener, io_timeout=1.0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield str(addr), ep, server
    server.stop()
    t.join(5)
    ep.close()


@pytest.fixture
def machine():
    with Machine(ram_size=16 << 20) as m:
        yield m


def test_host_drives_a_remote_device(served, machine):
    address, ep, _ = served
    p = machine.plug_remote(address)
    assert p.device.TYPE_NAME == "edu" and "RemoteDevice" in repr(p.device)
    assert (p.vendor, p.device_id) == (0x1234, 0x11E8)
    p.enable_device()
    p.set_master()
    assert p.alloc_irq_vectors(1, 2) == 2
    assert ep.memory.regions()[0].size == 16 << 20  # the host's RAM, shared through its memfd
    assert p.ioread32(0, 0) == 0x010000ED
    p.iowrite32(0, 8, 10)
    assert p.ioread32(0, 8) == 3628800
    ring = machine.alloc(8 * 32)
    p.iowrite64(0, 0x100, ring)
    p.iowrite32(0, 0x108, 8)
    p.iowrite32(0, 0x114, 1)
    src, dst = machine.alloc(4096 * 4), machine.alloc(4096 * 4)
    data = os.urandom(4096 * 4)
    machine.write(src, data)
    for i in range(4):
        machine.memory.write_struct(DESC, ring + 32 * i, src + 4096 * i, dst + 4096 * i, 4096, int(i == 3), 0, 0)
    p.iowrite32(0, 0x10C, 4)
    assert p.wait_irq(0, 5.0)  # MSI-X through an eventfd
    assert machine.read(dst, len(data)) == data
    for i in range(4):
        st, crc = struct.unpack("<II", machine.read(ring + 32 * i + 0x18, 8))
        assert (st, crc) == (STATUS_DONE, crc32c.crc32c(data[4096 * i:4096 * (i + 1)]))
    assert p.save_config()[:4] == bytes.fromhex("3412e811")


def test_intx_level_follows_the_device(served, machine):
    address, _, _ = served
    p = machine.plug_remote(address)
    p.enable_device()
    assert p.alloc_irq_vectors(1, 1, 1) == 1  # INTx only
    p.iowrite32(0, 0x60, 1)
    assert p.recorder.wait_intx(True, 2.0)
    p.iowrite32(0, 0x64, 1)
    assert p.recorder.wait_intx(False, 2.0)


def test_device_errors_arrive_typed(served, machine):
    address, _, _ = served
    p = machine.plug_remote(address)
    dev = p.device
    with pytest.raises(MmioError, match="no BAR3"):
        dev.bar_read(3, 0, 4)
    with pytest.raises(MmioError, match="access size"):
        dev.bar_write(0, 0, 3, 1)
    with pytest.raises(ConfigSpaceError):
        dev.config_read(4095, 4)
    with pytest.raises(MmioError):
        dev.rom_read(0, 4)
    assert dev.config_read(0, 2) == 0x1234  # the connection is still fine


def test_migrating_to_nowhere_keeps_the_device(served, machine, tmp_path):
    address, ep, _ = served
    p = machine.plug_remote(address)
    p.enable_device()
    with pytest.raises(MigrationError, match="cannot reach the destination"):
        p.device.migrate(f"unix:{tmp_path}/nobody.sock", timeout=0.3)
    assert ep.state == "running" and not ep.device.quiesced
    assert p.ioread32(0, 0) == 0x010000ED


# ------------------------------------------------------------ garbage on the wire
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


def test_error_reply_decoding():
    assert isinstance(error_from_reply(b"\xc1"), TransportError)
    assert isinstance(error_from_reply(msgpack.packb({"type": "NoSuchError", "message": "x"})), TransportError)
    err = error_from_reply(msgpack.packb({"type": "StateError", "message": "m", "reason": "bad",
                                          "section": "edu", "instance_id": 0, "path": "ring_size"}))
    assert isinstance(err, StateError) and (err.section, err.path) == ("edu", "ring_size")
    blocked = error_from_reply(msgpack.packb({"type": "MigrationBlockedError", "message": "m",
                                              "reasons": ["a", "b"]}))
    assert blocked.reasons == ["a", "b"]


def test_retarget_switches_while_accesses_wait(tmp_path, machine):
    servers = []
    for name in ("a", "b"):
        ep = DeviceEndpoint(EduDevice(name=name))
        ep.start()
        listener, addr = listen(f"unix:{tmp_path}/{name}.sock")
        server = LinkServer(ep, listener)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((str(addr), ep, server, thread))
    try:
        p = machine.plug_remote(servers[0][0])
        p.enable_device()
        p.iowrite32(0, 4, 1)
        assert p.device.name == "a"
        reads = []
        with p.device._access:  # hold accesses as a migration would
            reader = threading.Thread(target=lambda: reads.append(p.device.status()["state"]))
            reader.start()
            reader.join(0.2)
            assert reader.is_alive() and reads == []  # waiting
            p.device.retarget(servers[1][0])
        reader.join(2)
        assert reads == ["running"]
        assert p.device.info["name"] == "b"
        # a running device is not re-attached: memory and eventfds travel with a migration
        assert not servers[1][1].memory.regions()
    finally:
        for _, ep, server, thread in servers:
            server.stop()
            thread.join(5)
            ep.close()
