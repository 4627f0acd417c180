"""The Persistent Memory Region (pcidev_nvme.pmr) through the software host: registers,
enable and ready timing, the PMRSTS-read write barrier (msync), contents that survive a
restart of the controller on the same file, the file rules, controller memory space
(data transfers to and from the PMR), resets, and migration (in process over UNIX
sockets and over TCP -- the contents streamed while the host reads into the PMR, written
into the destination's own file --, and a handover that passes the file instead of its
path)."""

from __future__ import annotations

import os
import random
import time

import crc32c
import pytest
from _tcp_host import ChannelHost

from pcidev.bar import RamBacking
from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.migration import descriptor_blockers
from pcidev.pci.config import ResetKind
from pcidev.testing import roundtrip, served
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.controller_memory import ControllerMemoryView
from pcidev_nvme.pmr import READY_DELAY
from pcidev_nvme.testing.driver import READ, WRITE, NvmeDriver

PMRCAP, PMRCTL, PMRSTS, PMREBS, PMRSWTP, PMRMSCL, PMRMSCU = 0xE00, 0xE04, 0xE08, 0xE0C, 0xE10, 0xE14, 0xE18
NRDY, CBAI = 1 << 8, 1 << 12
SIZE = 1 << 20
CLOCK_FIELDS = ("smart.power_on_us", "smart.busy_us", "features.timestamp")


def _config(path, extra: str = "") -> str:
    return f"pmr={path},pmr_size=1M,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M{extra}"


def _attach(machine: Machine, ctrl: NvmeController) -> NvmeDriver:
    return NvmeDriver.attach(machine, ctrl, io_queues=1, aers=0)


def _pmr_write(drv: NvmeDriver, off: int, data: bytes) -> None:
    for i in range(0, len(data), 8):
        drv.pdev.bar_write(4, off + i, 8, int.from_bytes(data[i:i + 8], "little"))


def _pmr_read(drv: NvmeDriver, off: int, n: int) -> bytes:
    return b"".join(drv.pdev.bar_read(4, off + i, 8).to_bytes(8, "little") for i in range(0, n, 8))


def _enable(drv: NvmeDriver) -> None:
    drv.write32(PMRCTL, 1)
    deadline = time.monotonic() + 1.0  # PMRTO = 2 units of 500 ms
    while drv.read32(PMRSTS) & NRDY:
        assert time.monotonic() < deadline, "the PMR did not become ready within PMRCAP.PMRTO"
        time.sleep(0.002)


def test_registers(tmp_path) -> None:
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(tmp_path / "pmr")) as ctrl:
        drv = _attach(machine, ctrl)
        assert (drv.cap >> 56) & 1 and not (drv.cap >> 57) & 1  # CAP.PMRS (no CMB)
        cap = drv.read32(PMRCAP)
        # RDS, WDS, BIR 4, PMRTU 500 ms, PMRWBM 0010b (a PMRSTS read is a barrier), PMRTO 2, CMSS
        assert (cap >> 3 & 1, cap >> 4 & 1, cap >> 5 & 7, cap >> 8 & 3, cap >> 10 & 0xF, cap >> 16 & 0xFF,
                cap >> 24 & 1) == (1, 1, 4, 0, 0b0010, 2, 1)
        bar4 = ctrl.bars[4]
        assert bar4 is not None and bar4.is_64bit and bar4.prefetchable and isinstance(bar4.handler, RamBacking)
        assert drv.pdev.size_bars()[4][0] == SIZE
        # PMRSTS.NRDY's reset value is 0 (it is set by disabling the PMR)
        assert (drv.read32(PMRCTL), drv.read32(PMRSTS), drv.read32(PMREBS), drv.read32(PMRSWTP)) == (0, 0, 0, 0)
        assert (drv.read32(PMRMSCL), drv.read32(PMRMSCU)) == (0, 0)
        drv.write32(PMRCTL, 0xFFFFFFFF)  # only EN is writable
        assert drv.read32(PMRCTL) == 1


def test_enable_and_ready_timing(tmp_path) -> None:
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(tmp_path / "pmr")) as ctrl:
        drv = _attach(machine, ctrl)
        t0 = time.monotonic()
        drv.write32(PMRCTL, 1)
        sts = drv.read32(PMRSTS)
        if time.monotonic() - t0 < READY_DELAY:  # (a very slow machine may already be past it)
            assert sts & NRDY
        _enable(drv)
        assert time.monotonic() - t0 >= READY_DELAY
        assert drv.read32(PMRSTS) == 0
        drv.write32(PMRCTL, 0)
        assert drv.read32(PMRSTS) & NRDY  # disabled: not ready
        # a controller reset does not touch the PMR; a PCI reset disables it
        _enable(drv)
        drv.disable()
        assert drv.read32(PMRCTL) == 1 and not drv.read32(PMRSTS) & NRDY
        ctrl.reset(ResetKind.FLR)
        assert ctrl.regs.read(PMRCTL, 4) == 0 and ctrl.pmr is not None and not ctrl.pmr.ready
        assert ctrl.regs.read(PMRSTS, 4) == 0  # NRDY back to its reset value


def test_nrdy_is_0_at_power_on_and_set_by_disabling_and_that_migrates(tmp_path) -> None:
    from pcidev.migration import load_device_stream, save_device_stream

    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(tmp_path / "pmr")) as ctrl:
        drv = _attach(machine, ctrl)
        assert drv.read32(PMRSTS) & NRDY == 0 and drv.read32(PMRCTL) == 0  # never enabled
        _enable(drv)
        drv.write32(PMRCTL, 0)
        assert drv.read32(PMRSTS) & NRDY  # disabled by the host
        for enabled_once in (True, False):
            ctrl.quiesce()
            data, fds = save_device_stream(ctrl)
            with NvmeController(ctrl.cfg, name="dst") as dst:
                res = load_device_stream(dst, data, fds)
                try:
                    assert dst.regs.read(PMRSTS, 4) & NRDY == (NRDY if enabled_once else 0)
                finally:
                    res.close()
            ctrl.resume()
            ctrl.reset(ResetKind.FLR)  # back to the reset value for the second round


def test_a_pmrsts_read_is_a_write_barrier(tmp_path, monkeypatch) -> None:
    path = tmp_path / "pmr"
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(path)) as ctrl:
        drv = _attach(machine, ctrl)
        _enable(drv)
        flushes = []
        real = RamBacking.flush

        def spy(self, offset=0, size=None):
            flushes.append((offset, size))
            real(self, offset, size)

        monkeypatch.setattr(RamBacking, "flush", spy)
        data = random.Random(1).randbytes(4096)
        _pmr_write(drv, 8192, data)
        assert flushes == []
        drv.read32(PMRSTS)
        assert flushes == [(0, None)]  # msync of the whole region before PMRSTS answers
        with open(path, "rb") as f:
            f.seek(8192)
            assert f.read(4096) == data


def test_contents_survive_a_restart_on_the_same_file(tmp_path) -> None:
    path = tmp_path / "pmr"
    data = random.Random(2).randbytes(64 * 1024)
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(path)) as ctrl:
        drv = _attach(machine, ctrl)
        assert os.path.getsize(path) == SIZE  # created at pmr_size
        _enable(drv)
        _pmr_write(drv, 0x10000, data)
        drv.read32(PMRSTS)
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(path)) as ctrl:
        drv = _attach(machine, ctrl)
        _enable(drv)
        got = _pmr_read(drv, 0x10000, len(data))
        assert [crc32c.crc32c(got[i:i + 512]) for i in range(0, len(got), 512)] == \
            [crc32c.crc32c(data[i:i + 512]) for i in range(0, len(data), 512)]


def test_the_file_rules(tmp_path) -> None:
    user = tmp_path / "user.bin"
    user.write_bytes(b"precious" * 1000)
    with pytest.raises(ConfigError) as info:
        NvmeController(_config(user))
    assert "has 8000 bytes, the BAR needs 1048576" in str(info.value) and "\n" not in str(info.value)
    assert user.read_bytes() == b"precious" * 1000  # never truncated
    with pytest.raises(ConfigError, match="msix_bar=4"):
        NvmeController(_config(tmp_path / "p", ",msix_bar=4"))
    with pytest.raises(ConfigError, match="not a power of two"):
        NvmeController(f"pmr={tmp_path / 'q'},pmr_size=12k")
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


def test_data_transfers_to_and_from_the_pmr(tmp_path) -> None:
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(tmp_path / "pmr")) as ctrl:
        drv = _attach(machine, ctrl)
        _enable(drv)
        base = drv.pdev.bar_address(4)
        drv.write32(PMRMSCU, base >> 32)
        drv.write32(PMRMSCL, (base & 0xFFFFF000) | 2)  # CMSE
        assert drv.read32(PMRSTS) & CBAI == 0 and isinstance(ctrl.dma, ControllerMemoryView)
        data = random.Random(3).randbytes(8192)
        _pmr_write(drv, 0, data)
        drv.io(1, WRITE, nsid=1, cdw10=10, cdw12=15, buf=base, length=8192)  # data from the PMR
        assert drv.read(1, 10, 16) == data
        drv.io(1, READ, nsid=1, cdw10=10, cdw12=15, buf=base + 0x4000, length=8192)  # data into the PMR
        assert _pmr_read(drv, 0x4000, 8192) == data
        # mixing the PMR and host memory in one data buffer is refused
        host = machine.alloc(4096, 4096)
        comp = drv.io(1, WRITE, nsid=1, cdw10=0, cdw12=15, prp1=base, prp2=host, check=False)
        assert comp.code == 0x12 and comp.dnr
        # a CBA whose range passes 2**64: CBAI, no controller memory space (PMRMSCL reads back as written)
        drv.write32(PMRMSCU, 0xFFFFFFFF)
        drv.write32(PMRMSCL, 0xFFFFF002)
        assert drv.read32(PMRSTS) & CBAI and drv.read32(PMRMSCL) == 0xFFFFF002
        assert ctrl.dma is machine.memory
        drv.write32(PMRMSCL, 0xFFFFF000)  # CMSE 0: CBAI cleared
        assert not drv.read32(PMRSTS) & CBAI


def test_migration_in_process_adopts_the_file(tmp_path) -> None:
    path = tmp_path / "pmr"
    with Machine(ram_size=32 << 20) as machine:
        ctrl = NvmeController(_config(path))
        drv = _attach(machine, ctrl)
        _enable(drv)
        data = random.Random(4).randbytes(4096)
        _pmr_write(drv, 0x2000, data)
        # without descriptors (TCP) its contents travel: a memory source, nothing blocks
        assert descriptor_blockers(ctrl, "TCP", ctrl.memory_sources()) == []
        assert "bar4" in {s.name for s in ctrl.memory_sources()}
        assert ctrl.pmr is not None
        regs = ctrl.pmr.snapshot()
        src_fd = os.dup(ctrl.pmr.ram.fd)
        try:
            dst = roundtrip(drv.pdev, ignore=CLOCK_FIELDS)
            assert isinstance(dst, NvmeController) and dst.pmr is not None
            assert os.path.sameopenfile(dst.pmr.ram.fd, src_fd)
            assert dst.pmr.snapshot() == regs and regs.ready
            assert _pmr_read(drv, 0x2000, 4096) == data and drv.read32(PMRSTS) == 0
        finally:
            os.close(src_fd)
            drv.close()
            dst.close()


def test_a_handover_passes_the_pmr_file_not_its_path(tmp_path) -> None:
    path = tmp_path / "pmr"
    props = f"pmr={path},pmr_size=1M,max_ioqpairs=1,msix_vectors=2,ns=mem:size=1M"
    with served("nvme", props, plugin_specs=()) as dev, Machine(ram_size=32 << 20) as machine, \
            VfioUserDevice.connect(dev.path) as remote:
        drv = NvmeDriver(machine, machine.plug(remote), io_queues=1, aers=0)
        drv.probe()
        _enable(drv)
        data = random.Random(5).randbytes(4096)
        _pmr_write(drv, 0, data)
        os.rename(path, str(path) + ".moved")  # the path now names nothing
        dev.handover()
        assert not path.exists()  # the new process took the old one's descriptor
        assert _pmr_read(drv, 0, 4096) == data and drv.read32(PMRSTS) == 0
        _pmr_write(drv, 4096, data)
        drv.read32(PMRSTS)
        with open(str(path) + ".moved", "rb") as f:
            assert f.read(8192) == data + data
        drv.close()


def test_pmrsts_barrier_failures_set_err_and_reads_while_not_ready_do_not_flush(tmp_path, monkeypatch) -> None:
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(tmp_path / "pmr")) as ctrl:
        drv = _attach(machine, ctrl)
        flushes = []

        def failing(self, offset=0, size=None):
            flushes.append(offset)
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(RamBacking, "flush", failing)
        for _ in range(5):  # disabled: polling PMRSTS does no msync
            assert drv.read32(PMRSTS) & 0xFF == 0  # (no ERR: no barrier ran)
        assert flushes == []
        monkeypatch.undo()
        _enable(drv)
        monkeypatch.setattr(RamBacking, "flush", failing)
        sts = drv.read32(PMRSTS)  # the barrier fails: PMRSTS.ERR, the controller carries on
        assert sts & 0xFF == 1 and flushes == [0] and not drv.csts & 2
        assert drv.read32(PMRSTS) & 0xFF == 1 and flushes == [0]  # sticky, no more barriers
        drv.identify(0x01)  # the controller still works
        monkeypatch.undo()
        ctrl.reset(ResetKind.FLR)  # until a function reset
        assert ctrl.pmr is not None and ctrl.pmr.pmrsts & 0xFF == 0


def test_a_pci_reset_makes_an_enabled_pmr_persistent(tmp_path, monkeypatch) -> None:
    with Machine(ram_size=32 << 20) as machine, NvmeController(_config(tmp_path / "pmr")) as ctrl:
        drv = _attach(machine, ctrl)
        _enable(drv)
        flushes = []
        real = RamBacking.flush

        def spy(self, offset=0, size=None):
            flushes.append(offset)
            real(self, offset, size)

        monkeypatch.setattr(RamBacking, "flush", spy)
        ctrl.reset(ResetKind.FLR)
        assert flushes == [0] and ctrl.regs.read(PMRCTL, 4) == 0


def test_migration_over_tcp_streams_the_contents_into_the_destinations_file(tmp_path) -> None:
    """Over TCP the PMR's contents travel as a memory source: pre-copied while the host
    writes blocks and reads them into the PMR (controller DMA through its window: tracked
    by page hashes) and writes the PMR through BAR4, the rest at the stop; the destination
    writes them into its file and maps its window again. Every PMR page and every block
    is checked by its CRC-32C."""
    h = ChannelHost(_config(tmp_path / "pmr", ",serial=XPMRTCP"))
    try:
        drv = h.drv
        _enable(drv)
        base = 0x8000_0000
        drv.write32(PMRMSCU, 0)
        drv.write32(PMRMSCL, base | 2)  # CMSE
        want = bytearray(SIZE)
        rng = random.Random(8)
        data = rng.randbytes(8192)
        _pmr_write(drv, 0x1000, data)
        want[0x1000:0x1000 + 8192] = data

        def io(stop) -> None:  # the host's reads into the PMR and writes through BAR4
            k = 0
            while not stop.is_set() or k < 4:
                slba = (k * 8) % 2040
                block = rng.randbytes(4096)
                h.write(1, slba, block, qid=1)
                off = 0x10000 + (k % 64) * 4096
                drv.io(1, READ, nsid=1, cdw10=slba, cdw12=7, buf=base + off, length=4096)
                want[off:off + 4096] = block
                word = rng.randbytes(8)
                woff = 0x80000 + 8 * (k % 0x10000)  # (inside the PMR however long the pre-copy runs)
                _pmr_write(drv, woff, word)
                want[woff:woff + 8] = word
                k += 1

        result = h.move(tcp=True, during=io)
        assert result.fds == 0 and result.precopy is not None and result.precopy.hashed_bytes > 0
        dst = h.ctrl
        assert dst.pmr is not None and dst.pmr.ram.path == str(tmp_path / "pmr")
        assert isinstance(dst.dma, ControllerMemoryView)  # its window, over its own file
        pages = [crc32c.crc32c(want[i:i + 4096]) for i in range(0, SIZE, 4096)]
        got = _pmr_read(drv, 0, SIZE)
        assert [crc32c.crc32c(got[i:i + 4096]) for i in range(0, SIZE, 4096)] == pages
        assert drv.read32(PMRSTS) == 0  # ready; the read is a write barrier (msync)
        raw = (tmp_path / "pmr").read_bytes()
        assert [crc32c.crc32c(raw[i:i + 4096]) for i in range(0, SIZE, 4096)] == pages
        assert h.verify(1, 2048) == 2048
        # the host's data transfers through the window go on on the destination
        drv.io(1, WRITE, nsid=1, cdw10=100, cdw12=7, buf=base + 0x10000, length=4096)
        assert drv.read(1, 100, 8) == bytes(want[0x10000:0x11000])
    finally:
        h.close()
