"""Guest memory remapped piecewise under a running driver (QEMU's vfio-user client unmaps
RAM and maps it back in pieces when the BIOS area changes; the endpoint quiesces and resumes
the device around each map): a request that meets a missing piece waits for the next map
instead of setting DEVICE_NEEDS_RESET, and a genuinely bad address still does."""

from __future__ import annotations

import struct
import time

from pcidev.host import Machine
from pcidev.testing import plugged
from pcidev_virtio import spec
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.rng import VirtioRng
from pcidev_virtio.testing.driver import VirtioDriver

RAM = 32 << 20


def _read_request(m, q, data: int) -> int:
    """A virtio-blk read of sector 0 into ``data``, made by hand (3 descriptors)."""
    hdr = m.alloc(16, 8)
    m.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    st = m.alloc(1, 8)
    d, d2, d3 = q.free.pop(), q.free.pop(), q.free.pop()
    q._write_desc(q.desc, d, hdr, 16, spec.VRING_DESC_F_NEXT, d2)
    q._write_desc(q.desc, d2, data, 4096, spec.VRING_DESC_F_NEXT | spec.VRING_DESC_F_WRITE, d3)
    q._write_desc(q.desc, d3, st, 1, spec.VRING_DESC_F_WRITE, 0)
    return d


def test_blk_request_whose_buffer_is_in_a_piece_mapped_later_waits() -> None:
    with Machine(ram_size=RAM) as m:
        dev = VirtioBlk(size=1 << 20)
        pdev = plugged(m, dev)
        drv = VirtioDriver(m, pdev)
        drv.init()
        q = drv.queues[0]
        head = _read_request(m, q, RAM - 0x10000)  # the data buffer is high in RAM
        dev.quiesce()
        m.memory.unmap(0)
        dev.resume()
        dev.quiesce()
        m.memory.map(0, RAM // 2, m.ram_fd, name="lo")  # the rings are back, the buffer is not
        m.memory.write_u16(q.avail + 4, head)
        m.memory.write_u16(q.avail + 2, 1)
        q.avail_idx = 1
        dev.resume()
        drv.notify(q)  # the firmware kicks in between
        assert not dev.status & spec.Status.DEVICE_NEEDS_RESET
        dev.quiesce()
        m.memory.map(RAM // 2, RAM // 2, m.ram_fd, RAM // 2, name="hi")
        dev.resume()
        assert not dev.status & spec.Status.DEVICE_NEEDS_RESET
        assert m.memory.read_u16(q.used + 2) == 1  # served once, after the map
        dev.close()


def test_a_bad_buffer_address_with_all_memory_mapped_still_needs_reset() -> None:
    with Machine(ram_size=RAM) as m:
        dev = VirtioBlk(size=1 << 20)
        pdev = plugged(m, dev)
        drv = VirtioDriver(m, pdev)
        drv.init()
        q = drv.queues[0]
        head = _read_request(m, q, RAM + 0x100000)  # past the end of RAM: the driver's fault
        m.memory.write_u16(q.avail + 4, head)
        m.memory.write_u16(q.avail + 2, 1)
        q.avail_idx = 1
        drv.notify(q)
        assert dev.status & spec.Status.DEVICE_NEEDS_RESET
        dev.close()


def test_rate_limited_rng_chains_survive_a_remap() -> None:
    with Machine(ram_size=RAM) as m:
        dev = VirtioRng({"max_bytes": 64, "period": 0.2})
        pdev = plugged(m, dev)
        drv = VirtioDriver(m, pdev)
        drv.init()
        q = drv.queues[0]
        old = q.avail_idx
        for _ in range(6):
            q.add(in_lens=[64])
        q.kick(old_idx=old)
        dev.quiesce()
        m.memory.unmap(0)
        dev.resume()
        time.sleep(0.5)  # the rate-limit worker runs while RAM is not mapped
        dev.quiesce()
        m.memory.map(0, RAM, m.ram_fd, name="ram")
        dev.resume()
        assert not dev.status & spec.Status.DEVICE_NEEDS_RESET
        assert len(q.wait(6, timeout=10)) == 6
        dev.close()
