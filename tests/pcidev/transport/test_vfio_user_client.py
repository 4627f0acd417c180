"""The vfio-user client (:mod:`pcidev.transport.vfio_user.client`): against the real
server in a thread, against a fake server on a socketpair that misbehaves (silence,
wrong ids, short and oversized replies, garbage: one typed error, never a hang or a
leaked fd), and end to end against ``pcidev serve --vfio-user`` in another process."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
from hostile_peer import Trickler
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.bar import RamBacking
from pcidev.device import PciDevice
from pcidev.devices.edu import DESC, STATUS_DONE, VEC_DMA, VEC_FACT, EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import TransportError
from pcidev.host.machine import Machine
from pcidev.host.pci import PCI_IRQ_MSIX
from pcidev.testing import served
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import close_fds, send_all
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import RegionInfo, VfioUserClient, wait_eventfd
from pcidev.transport.vfio_user.protocol import VfioUserError
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev.transport.vfio_user.server import VfioUserServer

PCI_CAP_ID_MSIX = 0x11
CMD_MEMORY_MASTER = 0x6
MSIX_ENABLE = 0x8000


class RamBarDevice(PciDevice):
    """A device with a RAM-backed BAR2 whose middle page range may be mmapped."""

    TYPE_NAME = "rambar-client-test"
    VENDOR_ID = 0x1234
    DEVICE_ID = 0x0002
    CLASS_CODE = 0xFF0000

    def describe(self) -> None:
        self.ram = RamBacking(0x4000, sparse_areas=[(0x1000, 0x2000)])
        self.add_mem_bar(2, 0x4000, self.ram, bits64=True)


Served = tuple[VfioUserClient, DeviceEndpoint, VfioUserServer]


def _served(device: PciDevice, **server_args: Any) -> Iterator[Served]:
    ep = DeviceEndpoint(device)
    ep.start()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    server = VfioUserServer(ep, a, **server_args)
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    client = VfioUserClient(b, timeout=10)
    try:
        yield client, ep, server
    finally:
        client.close()
        t.join(5)
        assert not t.is_alive()
        ep.close()


@pytest.fixture
def edu() -> Iterator[Served]:
    yield from _served(EduDevice())


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- against the real server ------------------------------------------------------------------
def test_version_info_and_config_space(edu: Served) -> None:
    client, ep, _server = edu
    assert client.server_caps is None
    caps = client.version()
    assert caps == {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20,
                    "migration": {"pgsize": 4096}} == client.server_caps
    info = client.device_info()
    assert (info.flags, info.num_regions, info.num_irqs) == (
        protocol.DEVICE_FLAGS_RESET | protocol.DEVICE_FLAGS_PCI, protocol.NUM_REGIONS, protocol.NUM_IRQS)
    assert client.config_read(0x00, 2) == 0x1234 and client.config_read(0x02, 2) == 0x11E8
    cfg = client.read(protocol.CONFIG_REGION, 0, 4096)
    assert struct.unpack_from("<HH", cfg) == (0x1234, 0x11E8)
    msix = client.find_capability(PCI_CAP_ID_MSIX)
    assert msix is not None and cfg[msix] == PCI_CAP_ID_MSIX
    assert client.find_capability(0x7F) is None
    client.config_write(0x04, 2, CMD_MEMORY_MASTER)
    assert client.config_read(0x04, 2) & CMD_MEMORY_MASTER == CMD_MEMORY_MASTER
    assert client.irq_info(protocol.IRQ_MSIX).count == 2
    assert client.irq_info(protocol.IRQ_INTX).flags & protocol.IRQ_INFO_MASKABLE
    # BAR0 registers: ID, LIVENESS (reads back inverted), a posted write seen by the next read
    assert client.read_int(0, 0x00, 4) == 0x010000ED
    client.write_int(0, 0x04, 4, 0x12345678)
    assert client.read_int(0, 0x04, 4) == 0x12345678 ^ 0xFFFFFFFF
    client.write_int(0, 0x08, 4, 5, posted=True)
    assert client.read_int(0, 0x08, 4) == 120
    bar0 = client.region_info(0)
    assert (bar0.index, bar0.size, bar0.fd, bar0.sparse_areas) == (0, 4096, None, ())
    assert client.region_info(protocol.CONFIG_REGION).size == ep.device.config.size


def test_refusals_carry_the_errno_and_keep_the_connection(edu: Served) -> None:
    client, _ep, _server = edu
    with pytest.raises(VfioUserError) as info:
        client.read(protocol.CONFIG_REGION, 4095, 4)
    assert info.value.errno == errno.EINVAL and "REGION_READ" in str(info.value)
    with pytest.raises(VfioUserError) as info:
        client.region_info(42)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(VfioUserError) as info:
        client.request(99)
    assert info.value.errno == errno.ENOSYS
    with pytest.raises(VfioUserError) as info:
        client.dma_unmap(0x1000, 0x1000)
    assert info.value.errno == errno.EINVAL
    assert not client.closed
    assert client.device_info().num_regions == protocol.NUM_REGIONS


def test_accesses_larger_than_the_servers_limit_are_split() -> None:
    for client, _ep, server in _served(RamBarDevice(), max_data_xfer_size=256):
        client.version()
        assert client.max_data_xfer_size == 256
        data = bytes(range(256)) * 8
        client.write(2, 0x100, data)
        assert client.read(2, 0x100, len(data)) == data
        assert server.counts["REGION_WRITE"] == 8 and server.counts["REGION_READ"] == 8


def test_region_info_sparse_mmap_areas_and_fd() -> None:
    for client, _ep, _server in _served(RamBarDevice()):
        info = client.region_info(2)
        assert info.fd is not None
        try:
            assert info.flags & protocol.REGION_FLAG_MMAP and info.size == 0x4000
            assert info.sparse_areas == ((0x1000, 0x2000),)
            area_off, area_size = info.sparse_areas[0]
            m = mmap.mmap(info.fd, area_size, offset=info.offset + area_off)
            client.write_int(2, 0x1010, 4, 0xDEADBEEF)
            assert m[0x10:0x14] == (0xDEADBEEF).to_bytes(4, "little")
            m.close()
        finally:
            os.close(info.fd)
        assert client.region_info(3).size == 0  # the upper half of the 64-bit BAR


def test_dma_map_unmap_and_reset(edu: Served) -> None:
    client, ep, server = edu
    fd = alloc_memfd(1 << 20, "guest")
    try:
        client.dma_map(0x100000, 1 << 20, fd)
        assert [(r.gpa, r.size) for r in ep.memory.regions()] == [(0x100000, 1 << 20)]
        with pytest.raises(VfioUserError) as info:
            client.dma_map(0x1FF000, 0x2000, fd)
        assert info.value.errno == errno.EEXIST
        client.dma_map(0xC0000, 0x1000, None, writable=False)
        assert server.nofd_maps == {0xC0000: (0x1000, protocol.DMA_FLAG_READ)}
        client.dma_unmap(0x100000, 1 << 20)
        assert ep.memory.regions() == []
        client.dma_map(0x100000, 1 << 20, fd)
        client.dma_unmap_all()
        assert ep.memory.regions() == [] and server.nofd_maps == {}
    finally:
        os.close(fd)
    client.config_write(0x04, 2, CMD_MEMORY_MASTER)
    client.reset()
    assert client.config_read(0x04, 2) == 0


def test_msix_and_intx_eventfds(edu: Served) -> None:
    client, ep, _server = edu
    fds = [_eventfd(), _eventfd()]
    intx = _eventfd()
    try:
        msix = client.find_capability(PCI_CAP_ID_MSIX)
        assert msix is not None
        client.config_write(0x04, 2, CMD_MEMORY_MASTER)
        client.config_write(msix + 2, 2, client.config_read(msix + 2, 2) | MSIX_ENABLE)
        client.set_irq_eventfds(protocol.IRQ_MSIX, fds)
        assert sorted(ep.sink.vector_fds) == [0, 1]
        client.write_int(0, 0x60, 4, 1)  # IRQ_RAISE: vector 1
        assert wait_eventfd(fds[VEC_FACT], 5) == 1
        assert wait_eventfd(fds[VEC_DMA], 0) == 0
        client.trigger_irq(protocol.IRQ_MSIX, VEC_DMA)  # loopback from the server
        assert wait_eventfd(fds[VEC_DMA], 5) == 1
        client.disable_irqs(protocol.IRQ_MSIX)
        assert ep.sink.vector_fds == {}
        with pytest.raises(VfioUserError):
            client.set_irq_eventfds(protocol.IRQ_MSIX, fds, start=1)  # vectors 1..2 of 2
        # INTx: MSI-X off, the line is level-triggered and re-signalled on unmask
        client.config_write(msix + 2, 2, client.config_read(msix + 2, 2) & ~MSIX_ENABLE)
        client.set_irq_eventfds(protocol.IRQ_INTX, [intx])
        client.write_int(0, 0x60, 4, 1)
        assert wait_eventfd(intx, 5) == 1 and ep.intx_level
        client.mask_intx()
        client.mask_intx(False)
        assert wait_eventfd(intx, 5) == 1
        client.write_int(0, 0x64, 4, 1)  # IRQ_ACK
        assert not ep.intx_level
    finally:
        close_fds([*fds, intx])


def test_requests_from_several_threads_are_serialized(edu: Served) -> None:
    client, _ep, _server = edu
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                client.write_int(0, 0x04, 4, n << 8 | i)
                assert client.config_read(0x00, 2) == 0x1234
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and not client.closed


def test_context_manager_closes_and_a_closed_client_refuses(edu: Served) -> None:
    client, _ep, _server = edu
    with client as c:
        assert c is client and not c.closed
        c.device_info()
    assert client.closed
    with pytest.raises(TransportError, match="closed"):
        client.device_info()
    client.close()  # idempotent


def test_connect_to_nothing_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="nothing.sock"):
        VfioUserClient.connect(tmp_path / "nothing.sock", timeout=1)
    with pytest.raises(ValueError):
        VfioUserClient(socket.socket(socket.AF_UNIX), timeout=0)


# -- against a misbehaving server -------------------------------------------------------------
@pytest.fixture
def fake() -> Iterator[tuple[VfioUserClient, socket.socket]]:
    """A client whose server is the test itself, on the other end of a socketpair."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = VfioUserClient(b, timeout=0.3)
    yield client, a
    client.close()
    a.close()


def test_a_silent_server_times_out(fake: tuple[VfioUserClient, socket.socket]) -> None:
    client, _server = fake
    start = time.monotonic()
    with pytest.raises(TransportError, match="timed out"):
        client.device_info()
    assert time.monotonic() - start < 2 and client.closed


def test_a_trickling_server_cannot_stretch_the_deadline(fake: tuple[VfioUserClient, socket.socket]) -> None:
    client, server = fake
    reply = protocol.reply(1, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(0, 7, 64) + b"\0" * 64)
    with Trickler(server, reply, every=0.02):
        start = time.monotonic()
        with pytest.raises(TransportError, match="timed out"):
            client.read(protocol.CONFIG_REGION, 0, 64)
        assert time.monotonic() - start < 1.0


@pytest.mark.parametrize(("case", "message"), [
    ("wrong id", "does not answer request id 1"), ("wrong command", "does not answer request id 1"),
    ("a command", "type 0 does not answer"), ("short", "reply of 8 bytes, need 16"),
    ("oversized", "exceeds the maximum"), ("tiny size", "smaller than its header"),
    ("error without errno", "malformed error reply"), ("closed", "closed the connection")])
def test_a_malformed_reply_is_one_transport_error(fake: tuple[VfioUserClient, socket.socket], case: str,
                                                  message: str) -> None:
    client, server = fake
    good = protocol.DEVICE_INFO_S.pack(16, 3, 9, 5)
    raw = {
        "wrong id": protocol.reply(2, protocol.DEVICE_GET_INFO, good),
        "wrong command": protocol.reply(1, protocol.DEVICE_GET_IRQ_INFO, good),
        "a command": protocol.message(1, protocol.DEVICE_GET_INFO, good),
        "short": protocol.reply(1, protocol.DEVICE_GET_INFO, good[:8]),
        "oversized": protocol.HEADER.pack(1, protocol.DEVICE_GET_INFO, 0xFFFFFFFF, protocol.TYPE_REPLY, 0),
        "tiny size": protocol.HEADER.pack(1, protocol.DEVICE_GET_INFO, 4, protocol.TYPE_REPLY, 0),
        "error without errno": protocol.error_reply(1, protocol.DEVICE_GET_INFO, 0),
        "closed": protocol.reply(1, protocol.DEVICE_GET_INFO, good)[:10],
    }[case]
    server.sendall(raw)
    if case == "closed":
        server.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    with pytest.raises(TransportError, match=message) as info:
        client.device_info()
    assert not isinstance(info.value, VfioUserError)
    assert client.closed and time.monotonic() - start < 0.25  # at once, not by the timeout


def test_an_error_reply_is_a_vfio_user_error(fake: tuple[VfioUserClient, socket.socket]) -> None:
    client, server = fake
    server.sendall(protocol.error_reply(1, protocol.DEVICE_RESET, errno.EBUSY)
                   + protocol.reply(2, protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 3, 9, 5)))
    with pytest.raises(VfioUserError) as info:
        client.reset()
    assert info.value.errno == errno.EBUSY
    assert client.device_info().num_irqs == 5


def test_unexpected_fds_in_a_reply_are_closed(fake: tuple[VfioUserClient, socket.socket]) -> None:
    client, server = fake
    efd = os.eventfd(0)
    before = _open_fds()
    send_all(server, protocol.reply(1, protocol.DEVICE_GET_INFO, protocol.DEVICE_INFO_S.pack(16, 3, 9, 5)), [efd])
    os.close(efd)
    with pytest.raises(TransportError, match="file descriptors"):
        client.device_info()
    assert _open_fds() < before


_OPERATIONS: dict[str, Callable[[VfioUserClient], object]] = {
    "version": lambda c: c.version(),
    "device_info": lambda c: c.device_info(),
    "irq_info": lambda c: c.irq_info(protocol.IRQ_MSIX),
    "region_info": lambda c: c.region_info(2),
    "read": lambda c: c.read(0, 0, 8),
    "write": lambda c: c.write(0, 0, b"abcd"),
    "dma_unmap": lambda c: c.dma_unmap(0, 4096),
    "reset": lambda c: c.reset(),
}

_HEADER_FIELDS = st.tuples(st.sampled_from([1, 1, 1, 2, 0xFFFF]), st.sampled_from(list(range(0, 20)) + [0xFFFF]),
                           st.one_of(st.integers(0, 200), st.integers(0, 0xFFFFFFFF)),
                           st.sampled_from([protocol.TYPE_REPLY, protocol.TYPE_REPLY | protocol.FLAG_ERROR,
                                            0, 0xFF, protocol.TYPE_REPLY | 0x100]),
                           st.integers(0, 200))
_GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.tuples(_HEADER_FIELDS, st.binary(max_size=300)).map(lambda hb: protocol.HEADER.pack(*hb[0]) + hb[1]),
    st.tuples(_HEADER_FIELDS, st.binary(max_size=300)).map(
        lambda hb: protocol.HEADER.pack(hb[0][0], hb[0][1], 16 + len(hb[1]), *hb[0][3:]) + hb[1]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(op=st.sampled_from(sorted(_OPERATIONS)), garbage=_GARBAGE, nfds=st.integers(0, 2))
def test_garbage_from_the_server_is_a_typed_error_never_a_hang_or_a_leak(op: str, garbage: bytes,
                                                                        nfds: int) -> None:
    """Whatever comes back, the call returns or raises TransportError (VfioUserError
    included) within the timeout, and leaves no descriptor open."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = VfioUserClient(b, timeout=2)
    try:
        before = _open_fds()
        fds = [os.eventfd(0) for _ in range(nfds)] if garbage else []
        send_all(a, garbage, fds)
        close_fds(fds)
        a.shutdown(socket.SHUT_WR)  # the fake server says nothing more
        start = time.monotonic()
        try:
            result = _OPERATIONS[op](client)
        except TransportError:
            pass
        else:
            if isinstance(result, RegionInfo) and result.fd is not None:
                os.close(result.fd)
        assert time.monotonic() - start < 2
        assert _open_fds() <= before
    finally:
        client.close()
        a.close()


# -- end to end: pcidev serve in another process ----------------------------------------------
@pytest.fixture
def served_edu(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with served("edu", directory=tmp_path) as dev:
        yield dev.path, dev.proc


def test_end_to_end_guest_ram_dma_and_msix_against_pcidev_serve(
        served_edu: tuple[str, subprocess.Popen[str]]) -> None:
    """As QEMU would: guest RAM in a memfd, bus mastering, MSI-X through eventfds; the
    edu engine copies a buffer in guest RAM and signals vector 0, IRQ_RAISE vector 1."""
    path, proc = served_edu
    size = 1 << 20
    gpa = 0x40000000
    ram_fd = alloc_memfd(size, "guest-ram")
    ram = mmap.mmap(ram_fd, size)
    fds = [_eventfd(), _eventfd()]
    try:
        with VfioUserClient.connect(path, timeout=10) as dev:
            assert dev.server_caps is not None and dev.device_info().flags & protocol.DEVICE_FLAGS_PCI
            assert (dev.config_read(0x00, 2), dev.config_read(0x02, 2)) == (0x1234, 0x11E8)
            assert dev.read_int(0, 0x00, 4) == 0x010000ED
            dev.dma_map(gpa, size, ram_fd)
            dev.config_write(0x04, 2, CMD_MEMORY_MASTER)
            msix = dev.find_capability(PCI_CAP_ID_MSIX)
            assert msix is not None
            dev.config_write(msix + 2, 2, dev.config_read(msix + 2, 2) | MSIX_ENABLE)
            dev.set_irq_eventfds(protocol.IRQ_MSIX, fds)
            dev.write_int(0, 0x60, 4, 1)  # IRQ_RAISE
            assert wait_eventfd(fds[VEC_FACT], 10) == 1
            dev.write_int(0, 0x64, 4, 1)  # IRQ_ACK
            data = os.urandom(16384)
            ram[0x10000:0x10000 + len(data)] = data
            ram[0:32] = DESC.pack(gpa + 0x10000, gpa + 0x20000, len(data), 1, 0, 0)
            dev.write_int(0, 0x100, 8, gpa, posted=True)  # RING_BASE
            dev.write_int(0, 0x108, 4, 4, posted=True)  # RING_SIZE
            dev.write_int(0, 0x114, 4, 1, posted=True)  # RING_CTRL: enable
            dev.write_int(0, 0x10C, 4, 1, posted=True)  # RING_TAIL: doorbell
            assert wait_eventfd(fds[VEC_DMA], 10) == 1
            assert ram[0x20000:0x20000 + len(data)] == data
            assert struct.unpack_from("<II", ram, 0x18) == (STATUS_DONE, crc32c.crc32c(data))
            assert dev.read_int(0, 0x110, 4) == 1  # RING_HEAD
            dev.disable_irqs(protocol.IRQ_MSIX)
            dev.dma_unmap(gpa, size)
        assert proc.wait(20) == 0
        assert proc.stdout is not None and "client left (eof)" in proc.stdout.read()
    finally:
        ram.close()
        close_fds([ram_fd, *fds])


def test_the_software_host_drives_a_served_device_through_vfio_user(
        served_edu: tuple[str, subprocess.Popen[str]]) -> None:
    """``Machine.plug(VfioUserDevice.connect(path))``: the host's driver-side code
    (BAR assignment, bus mastering, MSI-X set-up) works on a device in another process;
    the machine's RAM is the device's DMA memory, its interrupts arrive as the MSI-X
    messages the host programmed."""
    path, proc = served_edu
    with Machine(ram_size=16 << 20) as machine:
        with VfioUserDevice.connect(path) as remote:
            assert (remote.vendor_id, remote.device_id, remote.msix_vectors) == (0x1234, 0x11E8, 2)
            pdev = machine.plug(remote)
            assert pdev.vendor == 0x1234
            pdev.enable_device()
            pdev.set_master()
            assert pdev.alloc_irq_vectors(1, 2, PCI_IRQ_MSIX) == 2
            assert pdev.ioread32(0, 0x00) == 0x010000ED
            pdev.iowrite32(0, 0x60, 1)  # IRQ_RAISE: vector 1
            assert pdev.wait_irq(VEC_FACT, 10)
            pdev.iowrite32(0, 0x64, 1)
            data = os.urandom(8192)
            ring, src, dst = machine.alloc(4096), machine.alloc(len(data)), machine.alloc(len(data))
            machine.write(src, data)
            machine.write(ring, DESC.pack(src, dst, len(data), 1, 0, 0))
            pdev.lo_hi_writeq(0, 0x100, ring)
            pdev.iowrite32(0, 0x108, 4)
            pdev.iowrite32(0, 0x114, 1)
            pdev.iowrite32(0, 0x10C, 1)
            assert pdev.wait_irq(VEC_DMA, 10)
            assert machine.read(dst, len(data)) == data
            assert struct.unpack("<II", machine.read(ring + 0x18, 8)) == (STATUS_DONE, crc32c.crc32c(data))
            assert pdev.recorder.stray == 0
    assert proc.wait(20) == 0


def test_too_many_fds_in_a_reply_is_a_transport_error_and_leaks_none(
        fake: tuple[VfioUserClient, socket.socket]) -> None:
    client, server = fake
    fds = [os.eventfd(0) for _ in range(12)]
    before = _open_fds()
    send_all(server, protocol.reply(1, protocol.DEVICE_GET_REGION_INFO, b"\0" * 32), fds)
    close_fds(fds)
    with pytest.raises(TransportError, match="file descriptors"):
        client.region_info(0)
    assert client.closed and _open_fds() < before


def test_the_client_announces_what_it_accepts(edu: Served) -> None:
    client, _ep, server = edu
    client.version()
    assert server.client_caps == {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}}


def test_eventfds_are_sent_at_most_max_msg_fds_per_message() -> None:
    """SET_IRQS with more eventfds than the server takes in one message is split (the server
    advertised ``max_msg_fds``; an NVMe controller has 65 MSI-X vectors)."""
    class ManyVectors(PciDevice):
        TYPE_NAME = "many-vectors-client-test"
        VENDOR_ID = 0x1234
        DEVICE_ID = 0x0003

        def describe(self) -> None:
            self.add_mem_bar(0, 0x4000, RamBacking(0x4000))
            self.add_msix(20, bar=0, table_offset=0x2000, pba_offset=0x3000)

    for client, _ep, server in _served(ManyVectors(), max_msg_fds=8):
        client.version()
        fds = [_eventfd() for _ in range(20)]
        try:
            client.set_irq_eventfds(protocol.IRQ_MSIX, fds)
            assert server.counts["DEVICE_SET_IRQS"] == 3  # 8 + 8 + 4
            assert client.device_info().num_irqs == protocol.NUM_IRQS  # the connection is fine
        finally:
            close_fds(fds)
