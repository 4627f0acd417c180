"""The host side of the device link: the software host drives an edu endpoint served
in a thread (the ``served`` fixture) through RemoteDevice, over a real UNIX socket:
accesses, DMA, MSI-X and INTx through eventfds, typed errors, following a device
to another server."""

from __future__ import annotations

import os
import struct
import threading

import crc32c
import pytest

from pcidev.devices.edu import DESC, STATUS_DONE, EduDevice
from pcidev.errors import ConfigSpaceError, MigrationError, MmioError
from pcidev.host import Machine
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.link.server import LinkServer


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


def test_retarget_switches_while_accesses_wait(tmp_path, machine):
    servers = []
    for name in ("a", "b"):
        ep = DeviceEndpoint(EduDevice(name=name))
        ep.start()
        listener = listen(f"unix:{tmp_path}/{name}.sock")
        addr = listener.address
        server = LinkServer(ep, listener.sock)
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
