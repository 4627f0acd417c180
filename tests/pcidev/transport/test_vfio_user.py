"""The vfio-user server, driven by an in-process client over a socketpair, one message
per step (as libvfio-user's test/py does): every command, DMA through a memfd,
interrupts through eventfds, and garbage that must get error replies, never a crash."""

from __future__ import annotations

import errno
import json
import mmap
import os
import select
import socket
import struct
import threading

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.bar import RamBacking
from pcidev.device import PciDevice
from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.dma import alloc_memfd
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.server import VfioUserServer, _chunks

QEMU_CAPS = (b'{"capabilities": {"pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535, '
             b'"max_data_xfer_size": 1048576, "migration": {"max_bitmap_size": 268435456, "pgsize": 4096}, '
             b'"write_multiple": true}}\0')


def _refused(client: VfioUserClient, cmd: int, payload: bytes = b"", fds=()) -> int:
    """The errno of the server's ERROR reply to this request (which must be refused)."""
    with pytest.raises(VfioUserError) as info:
        client.request(cmd, payload, fds)
    assert not client.closed  # a refusal leaves the connection usable
    return info.value.errno


def _qemu_version(client: VfioUserClient) -> bytes:
    """VERSION with QEMU's capability string; the raw reply payload."""
    return client.request(protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + QEMU_CAPS).payload


def _serve(device):
    ep = DeviceEndpoint(device)
    ep.start()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.settimeout(10)
    server = VfioUserServer(ep, a)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("reason", server.serve()), daemon=True)
    t.start()
    return ep, server, VfioUserClient(b, timeout=10), t, result


@pytest.fixture
def edu():
    ep, server, client, t, result = _serve(EduDevice())
    yield client, ep, server
    client.sock.close()
    t.join(5)
    assert not t.is_alive()
    ep.close()


@pytest.fixture
def nvme():
    from pcidev_nvme.controller import NvmeController

    ep, server, client, t, result = _serve(NvmeController("ns=mem:size=1M"))
    yield client, ep, server
    client.sock.close()
    t.join(5)
    ep.close()


class RamBarDevice(PciDevice):
    TYPE_NAME = "rambar-test"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x0001
    CLASS_CODE = 0xFF0000

    def describe(self) -> None:
        self.ram = RamBacking(0x4000, sparse_areas=[(0x1000, 0x2000)])
        self.add_mem_bar(2, 0x4000, self.ram, bits64=True)


# -- commands one by one --------------------------------------------------------------------
def test_version_reply_is_short_and_sane(edu):
    client, _ep, server = edu
    body = _qemu_version(client)
    major, minor = protocol.VERSION_HDR.unpack_from(body)
    assert (major, minor) == (0, 0)
    assert body.endswith(b"\0") and len(body) <= 4 + len(QEMU_CAPS)
    caps = json.loads(body[4:-1])["capabilities"]
    # QEMU proposes migration with max_bitmap_size: the bitmap limit of a report is max_data_xfer_size
    assert caps == {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20,
                    "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 20}}
    assert server.client_caps["max_msg_fds"] == 16
    # a client with a short string gets a reply no larger than its request
    body = client.request(protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + b"{}\0").payload
    assert len(body) <= 4 + 3
    assert _refused(client, protocol.VERSION, protocol.VERSION_HDR.pack(1, 0) + b"{}\0") == errno.ENOTSUP
    assert _refused(client, protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + b"{") == errno.EINVAL
    assert _refused(client, protocol.VERSION, protocol.VERSION_HDR.pack(0, 0) + b"[1]\0") == errno.EINVAL


def test_device_info(edu):
    client, _ep, _s = edu
    body = client.request(protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0)).payload
    assert protocol.DEVICE_INFO_S.unpack(body) == (16, protocol.DEVICE_FLAGS_RESET | protocol.DEVICE_FLAGS_PCI, 9, 5)
    assert len(body) + 16 <= 32
    assert _refused(client, protocol.DEVICE_GET_INFO, b"\0" * 4) == errno.EINVAL


def test_region_info_bars_config_rom(edu):
    client, _ep, _s = edu
    def info(index, argsz=32):
        rep = client.request(protocol.DEVICE_GET_REGION_INFO, protocol.REGION_INFO_S.pack(argsz, 0, index, 0, 0, 0))
        body, fds = rep.payload, rep.fds
        assert len(body) <= argsz
        return protocol.REGION_INFO_S.unpack_from(body), fds
    (argsz, flags, index, cap, size, off), fds = info(0)
    assert (flags, index, size, fds) == (protocol.REGION_FLAG_READ | protocol.REGION_FLAG_WRITE, 0, 4096, [])
    assert info(1)[0][4] == 0 and info(6)[0][4] == 0 and info(8)[0][4] == 0
    (_a, flags, _i, _c, size, _o), _ = info(7)
    assert size == 4096 and flags == protocol.REGION_FLAG_READ | protocol.REGION_FLAG_WRITE
    err = _refused(client, protocol.DEVICE_GET_REGION_INFO, protocol.REGION_INFO_S.pack(32, 0, 9, 0, 0, 0))
    assert err == errno.EINVAL


def test_region_info_sparse_mmap_for_a_ram_bar():
    ep, _server, client, t, _r = _serve(RamBarDevice())
    try:
        rep = client.request(protocol.DEVICE_GET_REGION_INFO, protocol.REGION_INFO_S.pack(32, 0, 2, 0, 0, 0))
        first, fds = rep.payload, rep.fds
        argsz, flags, _i, cap_off, _s, _o = protocol.REGION_INFO_S.unpack_from(first)
        assert len(first) == 32 and fds == [] and argsz > 32  # "retry with a larger buffer"
        # without the capabilities, no CAPS flag (QEMU's client refuses CAPS with cap_offset 0)
        assert not flags & protocol.REGION_FLAG_CAPS and cap_off == 0
        rep = client.request(protocol.DEVICE_GET_REGION_INFO, protocol.REGION_INFO_S.pack(argsz, 0, 2, 0, 0, 0))
        body, fds = rep.payload, rep.fds
        _a, flags, _i, cap_off, size, off = protocol.REGION_INFO_S.unpack_from(body)
        assert flags == 0xF and size == 0x4000 and len(fds) == 1 and len(body) == argsz
        cid, ver, nxt = protocol.CAP_HDR_S.unpack_from(body, cap_off)
        assert (cid, ver, nxt) == (protocol.REGION_CAP_SPARSE_MMAP, 1, 0)
        nr, _ = protocol.SPARSE_HDR_S.unpack_from(body, cap_off + 8)
        assert nr == 1 and protocol.SPARSE_AREA_S.unpack_from(body, cap_off + 16) == (0x1000, 0x2000)
        # the client maps the area and sees what the device wrote
        m = mmap.mmap(fds[0], 0x2000, offset=off + 0x1000)
        client.write(2, 0x1010, (0xDEADBEEF).to_bytes(4, "little"))
        assert m[0x10:0x14] == (0xDEADBEEF).to_bytes(4, "little")
        m.close()
        close_fds(fds)
        # upper half of the 64-bit BAR has size 0
        body = client.request(protocol.DEVICE_GET_REGION_INFO, protocol.REGION_INFO_S.pack(32, 0, 3, 0, 0, 0)).payload
        assert protocol.REGION_INFO_S.unpack_from(body)[4] == 0
    finally:
        client.sock.close()
        t.join(5)
        ep.close()


def test_irq_info(edu):
    client, _ep, _s = edu
    counts = {}
    for index in range(5):
        body = client.request(protocol.DEVICE_GET_IRQ_INFO, protocol.IRQ_INFO_S.pack(16, 0, index, 0)).payload
        _a, flags, i, count = protocol.IRQ_INFO_S.unpack(body)
        assert i == index and flags & protocol.IRQ_INFO_EVENTFD
        counts[index] = count
    assert counts[protocol.IRQ_MSIX] == 2 and counts[protocol.IRQ_MSI] == 2 and counts[protocol.IRQ_ERR] == 0
    assert _refused(client, protocol.DEVICE_GET_IRQ_INFO, protocol.IRQ_INFO_S.pack(16, 0, 5, 0)) == errno.EINVAL


def test_config_space_reads_writes_and_rom_probe(nvme):
    client, ep, _s = nvme
    cfg = client.read(protocol.CONFIG_REGION, 0, 4096)  # QEMU reads it all at once
    assert len(cfg) == 4096
    vendor, device = struct.unpack_from("<HH", cfg, 0)
    assert (vendor, device) == (ep.device.vendor_id, ep.device.device_id)
    assert cfg[0x0B] == 0x01 and cfg[0x0A] == 0x08  # mass storage / NVM
    assert cfg[0x06] & 0x10  # capability list
    # the ROM BAR probe: no ROM reads 0 and ignores the sizing mask
    assert client.config_read(0x30, 4) == 0
    client.write(protocol.CONFIG_REGION, 0x30, (0xFFFFF800).to_bytes(4, "little"))
    assert client.config_read(0x30, 4) == 0
    # BAR0 type bits: 64-bit memory
    assert client.config_read(0x10, 4) & 0x7 == 0x4
    # COMMAND is honoured
    client.write(protocol.CONFIG_REGION, 0x04, (0x6).to_bytes(2, "little"))
    assert int.from_bytes(client.read(protocol.CONFIG_REGION, 0x04, 2), "little") & 0x6 == 0x6
    # outside the region
    assert _refused(client, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(4095, 7, 4)) == errno.EINVAL


def test_nvme_bar0_8_byte_cap_read_and_posted_writes(nvme):
    client, ep, _s = nvme
    cap = int.from_bytes(client.read(0, 0, 8), "little")
    assert cap == ep.device.bar_read(0, 0, 8, check_decode=False) and cap & 0xFFFF  # MQES
    vs = int.from_bytes(client.read(0, 8, 4), "little")
    assert vs >> 16 >= 1
    client.write(0, 0x24, (0x001F001F).to_bytes(4, "little"), posted=True)  # AQA, no reply
    assert int.from_bytes(client.read(0, 0x24, 4), "little") == 0x001F001F
    # REGION_WRITE_MULTI: two small writes in one message, then a read in order
    entries = (protocol.WRITE_MULTI_ENTRY_S.pack(0x28, 0, 8, (0x10000).to_bytes(8, "little"))
               + protocol.WRITE_MULTI_ENTRY_S.pack(0x30, 0, 8, (0x20000).to_bytes(8, "little")))
    client.send(protocol.REGION_WRITE_MULTI, protocol.WRITE_MULTI_HDR_S.pack(2) + entries, flags=protocol.FLAG_NO_REPLY)
    assert int.from_bytes(client.read(0, 0x28, 8), "little") == 0x10000
    assert int.from_bytes(client.read(0, 0x30, 8), "little") == 0x20000


def test_dma_map_unmap_rules(edu):
    client, ep, _s = edu
    fd = alloc_memfd(1 << 20, "guest")
    try:
        m = protocol.DMA_MAP_S.pack(32, 3, 0, 0x100000, 1 << 20)
        client.request(protocol.DMA_MAP, m, [fd])
        assert [(r.gpa, r.size) for r in ep.memory.regions()] == [(0x100000, 1 << 20)]
        assert _refused(client, protocol.DMA_MAP, protocol.DMA_MAP_S.pack(32, 3, 0, 0x1FF000, 0x2000),
                        [fd]) == errno.EEXIST
        client.request(protocol.DMA_MAP, protocol.DMA_MAP_S.pack(32, 1, 0, 0xC0000, 0x20000))  # no fd: message-only
        assert _refused(client,
            protocol.DMA_MAP, protocol.DMA_MAP_S.pack(32, 1, 0, 0xC0000, 0x1000)) == errno.EEXIST
        assert _refused(client, protocol.DMA_MAP, protocol.DMA_MAP_S.pack(32, 3, 0, 0, 0)) == errno.EINVAL
        body = client.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(24, 0, 0xC0000, 0x20000)).payload
        assert body == protocol.DMA_UNMAP_S.pack(24, 0, 0xC0000, 0x20000) and len(body) + 16 <= 40
        assert _refused(client,
            protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(24, 0, 0x100000, 0x1000)) == errno.EINVAL
        client.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(24, 0, 0x100000, 1 << 20))
        assert ep.memory.regions() == []
        client.request(protocol.DMA_MAP, m, [fd])
        client.request(protocol.DMA_MAP, protocol.DMA_MAP_S.pack(32, 1, 0, 0xC0000, 0x1000))
        client.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(24, protocol.DMA_UNMAP_FLAG_ALL, 0, 0))
        assert ep.memory.regions() == [] and _s.nofd_maps == {}
    finally:
        os.close(fd)


def _eventfd_fired(fd: int, timeout: float = 5.0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    if not r:
        return False
    return os.eventfd_read(fd) > 0


def test_dma_and_msix_interrupt_end_to_end(edu):
    """Guest memory through a memfd, MSI-X through an eventfd: the edu copy engine."""
    client, ep, _s = edu
    client.version()
    size = 1 << 20
    fd = alloc_memfd(size, "guest")
    mem = mmap.mmap(fd, size)
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        client.request(protocol.DMA_MAP, protocol.DMA_MAP_S.pack(32, 3, 0, 0x40000000, size), [fd])
        client.write(protocol.CONFIG_REGION, 0x04, (0x6).to_bytes(2, "little"))  # MEMORY | MASTER
        msix = client.find_capability(0x11)
        ctrl = int.from_bytes(client.read(protocol.CONFIG_REGION, msix + 2, 2), "little")
        client.write(protocol.CONFIG_REGION, msix + 2, (ctrl | 0x8000).to_bytes(2, "little"))  # enable
        # QEMU: "MSI-X on, no vectors", then one vector with an fd as the guest unmasks it
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, protocol.IRQ_MSIX, 0, 1))
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, protocol.IRQ_MSIX, 0, 1), [efd])
        data = os.urandom(8192)
        mem[0x10000:0x10000 + len(data)] = data
        mem[0:32] = DESC.pack(0x40010000, 0x40020000, len(data), 1, 0, 0)
        client.write(0, 0x100, (0x40000000).to_bytes(8, "little"), posted=True)  # RING_BASE
        client.write(0, 0x108, (4).to_bytes(4, "little"), posted=True)  # RING_SIZE
        client.write(0, 0x114, (1).to_bytes(4, "little"), posted=True)  # RING_CTRL
        client.write(0, 0x10C, (1).to_bytes(4, "little"), posted=True)  # RING_TAIL
        assert _eventfd_fired(efd)
        assert mem[0x20000:0x20000 + len(data)] == data
        status, crc = struct.unpack_from("<II", mem, 0x18)
        assert status == STATUS_DONE and crc == crc32c.crc32c(data)
        # DATA_NONE|TRIGGER fires the vector from the server (loopback)
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_MSIX, 0, 1))
        assert _eventfd_fired(efd)
        # disable the index: the vector loses its fd and is masked in the device's table again
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_MSIX, 0, 0))
        assert ep.sink.vector_fds == {}
        # unknown index / out of range / fd count mismatch
        assert _refused(client,
            protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, 7, 0, 1)) == errno.EINVAL
        assert _refused(client, protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, 2, 1, 5),
                        [efd]) == errno.EINVAL
        assert _refused(client, protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, 2, 0, 2),
                        [efd]) == errno.EINVAL
        assert _refused(client,
            protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x3, 2, 0, 1)) == errno.EINVAL
        mem.close()
    finally:
        os.close(fd)
        os.close(efd)


def test_intx_eventfd_mask_unmask_and_reset(edu):
    client, ep, _s = edu
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        client.write(protocol.CONFIG_REGION, 0x04, (0x6).to_bytes(2, "little"))
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x24, protocol.IRQ_INTX, 0, 1), [efd])
        client.write(0, 0x60, (1).to_bytes(4, "little"))  # IRQ_RAISE -> INTx asserted
        assert ep.intx_level and _eventfd_fired(efd)
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x09, protocol.IRQ_INTX, 0, 1))  # MASK
        client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x11, protocol.IRQ_INTX, 0, 1))  # UNMASK
        assert _eventfd_fired(efd)  # still asserted: signalled again
        client.write(0, 0x64, (1).to_bytes(4, "little"))  # IRQ_ACK
        assert not ep.intx_level
        client.request(protocol.DEVICE_RESET)
        assert int.from_bytes(client.read(protocol.CONFIG_REGION, 4, 2), "little") == 0
        assert ep.sink.intx_fd is not None  # eventfds survive a reset
    finally:
        os.close(efd)


# -- garbage ------------------------------------------------------------------------------------
def test_unknown_commands_and_bad_framing(edu):
    client, _ep, server = edu
    assert _refused(client, 99) == errno.ENOSYS
    assert _refused(client, protocol.DEVICE_FEATURE, b"\0" * 8) == errno.EINVAL  # argsz 0
    assert _refused(client, protocol.DMA_READ, b"\0" * 16) == errno.ENOSYS
    # fds on a command that takes none are refused and closed
    efd = os.eventfd(0)
    assert _refused(client,
        protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0), [efd]) == errno.EINVAL
    os.close(efd)
    # a reply from the client is ignored; the next request still works
    send_all(client.sock, protocol.message(9, protocol.VERSION, b"", protocol.TYPE_REPLY))
    client.request(protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0))
    # NO_REPLY errors stay silent
    client.send(protocol.REGION_WRITE, protocol.REGION_ACCESS_S.pack(0, 42, 4) + b"abcd", flags=protocol.FLAG_NO_REPLY)
    client.request(protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0))
    # an oversized message: E2BIG, and the server ends the connection
    send_all(client.sock, protocol.HEADER.pack(11, protocol.REGION_WRITE, 1 << 30, 0, 0))
    rep = client.recv()
    assert (rep.mid, rep.error) == (11, errno.E2BIG)
    assert client.sock.recv(1) == b""


def test_a_size_below_the_header_is_refused_and_ends_the_connection(edu):
    """Where the next message would start is unknowable: EINVAL, then the end (the payload
    that follows is never parsed as messages the client did not send)."""
    client, ep, server = edu
    fake_next = protocol.message(42, protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0))
    send_all(client.sock, protocol.HEADER.pack(7, protocol.DEVICE_GET_INFO, 8, 0, 0) + fake_next)
    rep = client.recv()
    assert (rep.mid, rep.flags & protocol.FLAG_ERROR, rep.error) == (7, protocol.FLAG_ERROR, errno.EINVAL)
    assert client.sock.recv(1) == b""  # no reply to id 42


_COMMANDS = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 0, 255, 0xFFFF])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=st.lists(st.tuples(_COMMANDS, st.binary(max_size=64),
                               st.sampled_from([0, 0, 0, protocol.FLAG_NO_REPLY, 0x2, 0x20, 0xFF00])),
                     min_size=1, max_size=8),
       nfds=st.integers(0, 2))
def test_garbage_messages_get_error_replies_never_a_crash(edu, msgs, nfds):
    client, ep, server = edu
    for cmd, payload, flags in msgs:
        fds = [os.eventfd(0) for _ in range(nfds)]
        try:
            mid = client.send(cmd, payload, fds, flags=flags)
        finally:
            close_fds(fds)
        if flags & protocol.FLAG_NO_REPLY and not flags & ~(protocol.FLAG_NO_REPLY):
            continue
        rep = client.recv()
        close_fds(rep.fds)
        assert (rep.mid, rep.cmd) == (mid, cmd)
        if rep.flags & protocol.FLAG_ERROR:
            assert rep.error > 0 and rep.payload == b""
    # the server is alive and well
    body = client.request(protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0)).payload
    assert protocol.DEVICE_INFO_S.unpack(body)[2:] == (9, 5)
    assert ep.device.failed is None or True
    # garbage SET_IRQS must not leave stray fds behind
    client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_MSIX, 0, 0))
    client.request(protocol.DEVICE_SET_IRQS, protocol.SET_IRQS_S.pack(20, 0x21, protocol.IRQ_INTX, 0, 0))
    client.request(protocol.DMA_UNMAP, protocol.DMA_UNMAP_S.pack(24, protocol.DMA_UNMAP_FLAG_ALL, 0, 0))


@given(offset=st.integers(0, 64), count=st.integers(1, 64))
def test_chunks_are_aligned_and_cover(offset, count):
    parts = _chunks(offset, count, (8, 4, 2, 1))
    assert sum(w for _p, w in parts) == count and parts[0][0] == offset
    assert all(p % w == 0 for p, w in parts)


def test_registry_create_props():
    from pcidev.plugins import load_registry, make_plugin_manager

    reg = load_registry(make_plugin_manager())
    dev = reg.create("nvme", "ns=mem:size=1M,ns=mem:size=2M")
    try:
        assert len(dev.cfg.namespaces) == 2
    finally:
        dev.close()
    edu_dev = reg.create("edu", "engine=true")
    assert edu_dev.engine is True


def test_cli_serve_vfio_user_process(tmp_path):
    """``pcidev serve --vfio-user SOCKET nvme,...``: a stale socket (nobody listens) is
    replaced, one client is served, the process exits 0 when it leaves; SIGTERM ends a
    waiting server."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "nvme.sock"
    _stale_socket(path)
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--once", "--vfio-user", str(path),
                             "nvme,ns=mem:size=1M"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stdout.read()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        client = VfioUserClient(sock, timeout=10)
        assert client.version() == {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}}
        body = client.request(protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 0, 0, 0)).payload
        assert protocol.DEVICE_INFO_S.unpack(body)[1:] == (3, 9, 5)
        assert int.from_bytes(client.read(protocol.CONFIG_REGION, 0, 2), "little") == 0x1B36
        sock.close()
        assert proc.wait(20) == 0
        assert "client left (eof)" in proc.stdout.read()
        assert not path.exists() and not os.path.exists(f"{path}.ctl")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "serve", "--vfio-user", str(path), "edu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(20) == 128 + signal.SIGTERM
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0)


def _stale_socket(path) -> None:
    """Leave a socket file at ``path`` whose server is gone."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()


def _serve_cli(path, capsys, device="edu"):
    from pcidev.cli import main

    status = main(["-p", "no:nvme", "serve", "--vfio-user", str(path), device])
    err = capsys.readouterr().err
    return status, err


def test_serve_refuses_a_regular_file(tmp_path, capsys):
    path = tmp_path / "precious.txt"
    path.write_text("keep me")
    status, err = _serve_cli(path, capsys)
    assert status == 1 and len(err.splitlines()) == 1
    assert "regular file" in err and "internal error" not in err and "Traceback" not in err
    assert path.read_text() == "keep me"


def test_serve_refuses_a_directory_and_a_missing_directory(tmp_path, capsys):
    status, err = _serve_cli(tmp_path, capsys)
    assert status == 1 and "directory" in err and "internal error" not in err
    assert tmp_path.is_dir()
    status, err = _serve_cli(tmp_path / "no" / "such" / "dir.sock", capsys)
    assert status == 1 and len(err.splitlines()) == 1
    assert "No such file or directory" in err and "internal error" not in err


def test_serve_in_a_read_only_directory(tmp_path, capsys):
    """The cause is printed in one line (root ignores directory modes: use sysfs)."""
    if os.geteuid() == 0:
        status, err = _serve_cli("/sys/pcidev-test.sock", capsys)
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            status, err = _serve_cli(ro / "x.sock", capsys)
        finally:
            ro.chmod(0o755)
    assert status == 1 and len(err.splitlines()) == 1
    assert "cannot listen there" in err and "internal error" not in err


def test_serve_refuses_a_socket_another_server_listens_on(tmp_path, capsys):
    path = tmp_path / "live.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        status, err = _serve_cli(path, capsys)
        assert status == 1 and "another server is listening" in err
        assert path.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))  # the first server still owns its socket
        probe.close()
    finally:
        live.close()


def test_listen_unix_replaces_only_a_stale_socket(tmp_path):
    from pcidev.transport.address import listen_unix

    path = tmp_path / "stale.sock"
    _stale_socket(path)
    listener = listen_unix(str(path))
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
    finally:
        listener.close()


def test_a_second_server_on_a_live_socket_leaves_the_first_serving(tmp_path, capsys):
    """The second ``pcidev serve`` finds out the socket is live by connecting; that
    probe is not the first server's client: it keeps listening and serves the real
    client afterwards."""
    import subprocess
    import sys

    path = tmp_path / "edu.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pcidev", "-p", "no:nvme", "serve", "--once", "--vfio-user",
                             str(path), "edu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert "listening on" in proc.stdout.readline()
        status, err = _serve_cli(path, capsys)
        assert status == 1 and "another server is listening" in err
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        client = VfioUserClient(sock, timeout=10)
        assert client.version() == {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}}
        assert proc.poll() is None
        sock.close()
        assert proc.wait(20) == 0
        out = proc.stdout.read()
        assert out.count("client left") == 1, out  # the probe was not taken for the client
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_listener_removes_only_the_socket_file_it_bound(tmp_path):
    """Someone replaced the socket file meanwhile: closing the listener leaves theirs."""
    from pcidev.transport.address import listen_unix

    path = tmp_path / "s.sock"
    ours = listen_unix(str(path))
    os.unlink(path)
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.bind(str(path))
    theirs.listen(1)
    try:
        ours.close()
        assert path.exists()
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(path))
        probe.close()
    finally:
        theirs.close()


@pytest.mark.parametrize("kind", ["symlink", "empty"])
def test_serve_refuses_a_symbolic_link_and_an_empty_path(tmp_path, capsys, kind):
    if kind == "symlink":
        target = tmp_path / "target.txt"
        target.write_text("keep me")
        path = tmp_path / "link.sock"
        path.symlink_to(target)
        status, err = _serve_cli(path, capsys)
        assert "symbolic link" in err
        assert path.is_symlink() and target.read_text() == "keep me"
    else:
        status, err = _serve_cli("", capsys)
        assert "not a usable socket path" in err
    assert status == 1 and len(err.splitlines()) == 1 and "internal error" not in err


def test_serve_device_closes_the_device_when_the_client_leaves(tmp_path):
    """The served device's life ends with the server: close() joins its workers."""
    import io

    from pcidev.transport.vfio_user.serving import listen_vfio_user, serve_device

    path = str(tmp_path / "edu.sock")
    dev = EduDevice(engine=True)
    listener = listen_vfio_user(path)

    def client() -> None:
        with VfioUserClient.connect(path, timeout=10) as c:
            assert c.device_info()

    t = threading.Thread(target=client)
    t.start()
    assert serve_device(dev, path, out=io.StringIO(), listener=listener) == 0
    t.join(10)
    assert dev.closed
    assert not any(th.name.startswith("edu-engine") and th.is_alive() for th in threading.enumerate())
