"""A handover of a served NVMe controller whose CMB the client has mapped (vfio-user sparse
mmap of BAR2, as QEMU maps it): the new process adopts the same memfd, so what the client
wrote through its mapping before the handover is what the controller reads after it (an
SQ in the CMB, data in the CMB), and what the new process writes appears in the client's
old mapping. Every block is verified by its crc32c."""

from __future__ import annotations

import mmap
import os
import random

import crc32c

from pcidev.host import Machine
from pcidev.testing import served
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver


def test_the_new_process_serves_the_cmb_the_client_mapped() -> None:
    with served("nvme", "cmb_size=1,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M", plugin_specs=()) as dev, \
            Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(dev.path) as remote:
        drv = NvmeDriver(machine, machine.plug(remote), io_queues=2, io_depth=32, aers=0)
        drv.probe()
        base, size = drv.cmb_enable()
        drv.delete_io_queue_pair(2)
        drv.create_io_queue_pair(2, 32, sq_in_cmb=True)
        info = remote.client.region_info(2)
        assert info.fd is not None and info.sparse_areas == ((0, size),)
        try:
            cmb = mmap.mmap(info.fd, size, offset=info.offset)
        finally:
            os.close(info.fd)
        with cmb:
            rnd = random.Random(5)
            crcs: dict[int, int] = {}
            # 8 write buffers filled through the client's own mapping (no message to the device)
            bufs = [drv.cmb_alloc(4096) for _ in range(8)]
            payload = {}
            for k, b in enumerate(bufs):
                payload[k] = rnd.randbytes(4096)
                cmb[b - base:b - base + 4096] = payload[k]
            # commands placed in the CMB SQ before the handover, rung after it
            for k, b in enumerate(bufs):
                drv.submit_rw(2, WRITE, nsid=1, slba=8 * k, nlb=8, buf=b, ring=False)
            old = dev.pid
            report = dev.handover()
            assert report["new_pid"] != old
            drv.ring(2)
            got = drv.reap(2, min_completions=8)
            assert len(got) == 8 and all(c.ok for c in got)
            for k, data in payload.items():
                for i in range(8):
                    crcs[8 * k + i] = crc32c.crc32c(data[i * 512:(i + 1) * 512])
            # the new process reads into the CMB: the data shows in the mapping made before
            rbuf = drv.cmb_alloc(8 * 4096)
            drv.io(2, READ, nsid=1, cdw10=0, cdw12=63, buf=rbuf, length=8 * 4096)
            back = cmb[rbuf - base:rbuf - base + 8 * 4096]
            assert [crc32c.crc32c(back[i * 512:(i + 1) * 512]) for i in range(64)] == [crcs[i] for i in range(64)]
            # and every block through host memory and the host SQ
            data = drv.read(1, 0, 64, qid=1)
            assert [crc32c.crc32c(data[i * 512:(i + 1) * 512]) for i in range(64)] == [crcs[i] for i in range(64)]
            # trapped accesses of the new process and the client's mapping are the same memory
            cmb[size - 8:size] = b"mapped!!"
            assert drv.cmb_read(base + size - 8, 8) == b"mapped!!"
        drv.close()
