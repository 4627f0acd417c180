"""Controller memory rules (pcidev_nvme.controller_memory, pcidev_nvme.pmr): a command's
data and separate metadata buffers are both in the CMB or both outside it (CMBLOC.CDMMMS
clear), and I/O queues cannot be placed in the PMR (it holds data only)."""

from __future__ import annotations

import os
import struct

from _helpers import make_env

from pcidev_nvme.status import Status

WRITE, READ = 0x01, 0x02
PMRCTL, PMRSTS, PMRMSCL, PMRMSCU = 0xE04, 0xE08, 0xE14, 0xE18


def test_cmbloc_does_not_advertise_data_metadata_mixing():
    env = make_env("ns=mem:size=1M,cmb_size=2", io_queues=1)
    try:
        env.drv.cmb_enable()
        assert not env.drv.read32(0x38) >> 7 & 1  # CMBLOC.CDMMMS clear
    finally:
        env.close()


def test_data_and_metadata_in_different_memories_are_refused():
    # LBA format 2: 512 + 8 bytes, metadata in a separate buffer (MSET 0), no PI
    env = make_env("ns=mem:size=1M,lbaf=2,cmb_size=2", io_queues=1)
    try:
        drv = env.drv
        drv.cmb_enable()
        data, meta = os.urandom(2 * 512), os.urandom(2 * 8)
        cmb_data, cmb_meta = drv.cmb_alloc(4096), drv.cmb_alloc(4096)
        host_data, host_meta = drv.machine.alloc(4096, 4096), drv.machine.alloc(4096, 4096)
        drv.cmb_write(cmb_data, data)
        drv.cmb_write(cmb_meta, meta)
        drv.mem.write(host_data, data)
        drv.mem.write(host_meta, meta)
        for opc in (WRITE, READ):
            for d, m in ((cmb_data, host_meta), (host_data, cmb_meta)):
                comp = drv.io(1, opc, nsid=1, cdw10=4, cdw12=1, prp1=d, mptr=m, check=False)
                assert (comp.code, comp.dnr) == (Status.INVALID_USE_OF_CMB, True), (opc, hex(d), hex(m))
        assert drv.read(1, 4, 2) == bytes(1024)  # nothing was written
        # both in the CMB, or both in host memory: fine
        drv.io(1, WRITE, nsid=1, cdw10=4, cdw12=1, prp1=cmb_data, mptr=cmb_meta)
        drv.io(1, READ, nsid=1, cdw10=4, cdw12=1, prp1=host_data + 0, mptr=host_meta)
        assert drv.mem.read(host_data, 1024) == data and drv.mem.read(host_meta, 16) == meta
        drv.io(1, WRITE, nsid=1, cdw10=8, cdw12=1, prp1=host_data, mptr=host_meta)
        drv.io(1, READ, nsid=1, cdw10=8, cdw12=1, prp1=cmb_data, mptr=cmb_meta)
        assert drv.cmb_read(cmb_data, 1024) == data and drv.cmb_read(cmb_meta, 16) == meta
    finally:
        env.close()


def test_io_queues_in_the_pmr_are_refused(tmp_path):
    env = make_env(f"pmr={tmp_path}/pmr.img,pmr_size=1M,max_ioqpairs=3,ns=mem:size=1M", io_queues=1)
    try:
        drv = env.drv
        drv.write32(PMRCTL, 1)
        while drv.read32(PMRSTS) & 1 << 8:
            pass
        base = drv.pdev.bar_address(4)
        drv.write32(PMRMSCU, base >> 32)
        drv.write32(PMRMSCL, (base & 0xFFFFF000) | 2)  # CMSE
        drv.delete_io_queue_pair(1)  # (Number of Queues allocated one pair: make room)
        comp = drv.admin(0x05, cdw10=1 | 15 << 16, cdw11=1, prp1=base, check=False)  # CQ 1 in the PMR
        assert (comp.code, comp.dnr) == (Status.INVALID_USE_OF_CMB, True)
        host_cq = drv.machine.alloc(4096, 4096)
        drv.admin(0x05, cdw10=1 | 15 << 16, cdw11=1, prp1=host_cq)  # CQ 1 in host memory: fine
        comp = drv.admin(0x01, cdw10=1 | 15 << 16, cdw11=1 | 1 << 16, prp1=base + 0x1000, check=False)  # SQ 1
        assert (comp.code, comp.dnr) == (Status.INVALID_USE_OF_CMB, True)
        assert env.ctrl.sq(1) is None and env.ctrl.cq(1) is not None
        drv.admin(0x04, cdw10=1)  # delete CQ 1; the pair again, in host memory: verified I/O
        drv.create_io_queue_pair(1, drv.io_depth)
        data = os.urandom(4096)
        drv.write(1, 0, data)
        assert drv.read(1, 0, 8) == data
        assert struct.unpack("<16H", drv.mem.read(host_cq, 32)) == (0,) * 16  # the refused pair's CQ: untouched
    finally:
        env.close()


def test_admin_queues_in_the_pmr_are_refused_at_enable(tmp_path):
    """CC.EN with ASQ or ACQ in the PMR's controller memory space: CSTS.CFS (no queue
    support in the PMR, as ACQ in the CMB), nothing served from the PMR file (review F11);
    the admin queues back in host memory: the controller comes up, verified I/O."""
    env = make_env(f"pmr={tmp_path}/pmr.img,pmr_size=1M,max_ioqpairs=3,ns=mem:size=1M", io_queues=1)
    try:
        drv = env.drv
        drv.write32(PMRCTL, 1)
        while drv.read32(PMRSTS) & 1 << 8:
            pass
        base = drv.pdev.bar_address(4)
        drv.write32(PMRMSCU, base >> 32)
        drv.write32(PMRMSCL, (base & 0xFFFFF000) | 2)  # CMSE
        host = drv.machine.alloc(8192, 4096)
        for asq, acq in ((base, host), (host, base + 0x1000), (base, base + 0x1000)):
            drv.disable()
            drv.write32(0x24, 7 << 16 | 7)  # AQA: 8 entries each
            for off, addr in ((0x28, asq), (0x30, acq)):
                drv.write32(off, addr & 0xFFFFFFFF)
                drv.write32(off + 4, addr >> 32)
            drv.write32(0x14, drv.read32(0x14) | 1)
            csts = drv.read32(0x1C)
            assert csts & 2 and not csts & 1, (hex(asq), hex(acq), hex(csts))  # CFS, not ready
            assert env.ctrl.sq(0) is None
        drv.restart()  # the driver's own admin queues, in host memory
        data = os.urandom(4096)
        drv.write(1, 0, data)
        assert drv.read(1, 0, 8) == data
    finally:
        env.close()
