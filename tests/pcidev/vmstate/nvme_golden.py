"""The NVMe controller state recorded in tests/pcidev/vmstate/device_data/nvme-v*.pcvm.

``build_nvme()`` brings a controller up through the software host (one I/O queue
pair, a CQ of 4 entries holding parked completions, two outstanding AERs, a queued
event, some I/O and an error) and returns it quiesced; ``EXPECTED_NVME_V1`` is what
a load of the golden stream must show. Written once by make_device_golden.py.
"""

from __future__ import annotations

from pcidev.host import Machine

RAM_SIZE = 4 << 20
NVME_CONFIG = "serial=GOLDEN1,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M,ns=null:size=1M,lbaf=1"

EXPECTED_NVME_V1 = {
    "state": 1, "sq_ids": [0, 1, 2], "cq2_size": 4, "cq2_backlog": 3, "aers": 2,
    "queued": [(1, 0x02, 0x02)], "masked": {1: 0x02}, "host_write_commands": 7, "error_count": 1,
    "namespaces": [(1, True, 0), (2, True, 1)],
}


def build_nvme():
    """The quiesced source controller with its machine (caller closes both)."""
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver

    machine = Machine(ram_size=RAM_SIZE)
    ctrl = NvmeController(NVME_CONFIG)
    pdev = machine.plug(ctrl)
    drv = NvmeDriver(machine, pdev, io_queues=2, io_depth=16, admin_depth=8, aers=2)
    drv.probe()
    drv.write(1, 0, b"golden!!" * 64)  # 1 write + 6 fetched below = 7 write commands
    drv.delete_io_queue_pair(2)
    drv.create_io_queue_pair(2, 16, cq_size=4)
    buf = machine.alloc(4096)
    for i in range(8):  # 3 posted (CQ full), 3 parked, 2 not fetched
        drv.submit_rw(2, WRITE, nsid=1, slba=8 + i, nlb=1, buf=buf)
    drv.io(1, READ, nsid=9, cdw12=0, check=False, buf=buf, length=512)  # an error entry
    drv.set_features(0x04, ctrl.temperature - 1)  # a SMART event (reported; SMART masked)
    drv.poll_events(0.5)
    ctrl.inject_critical_warning(1)  # queued while masked
    ctrl.quiesce()
    return ctrl, machine
