"""SR-IOV through the software host (pcidev.sriov, pcidev.host): VFs appear when VF Enable is
set and go when it is cleared (or the PF is reset), at the routing IDs offset/stride give, with
their BARs placed from the PF's VF BARs, decoding while VF MSE is set, with their own MSI-X;
a PF with VFs migrates (in process, and between processes through the migration channel) and
every VF's data is verified by its crc32c across it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import attrs
import crc32c
import pytest

from pcidev.bar import Access, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.host import Machine
from pcidev.migration import load_device_stream, migrate_in, migrate_out, save_device_stream
from pcidev.migration.blockers import device_blockers
from pcidev.migration.virtual_functions import SriovState, check_vfs
from pcidev.migration.virtual_functions import VfState as Entry
from pcidev.pci import ids
from pcidev.pci.capabilities import sriov as sr
from pcidev.sriov import VfBar, VirtualFunction, add_sriov, functions_of
from pcidev.vmstate import U32, VarBytes, vmstate
from pcidev.vmstate.errors import StateError

VF_BAR_SIZE = 0x4000
BLOCK = 512


@vmstate("test-vf", version=1)
@attrs.frozen
class VfState:
    data: VarBytes[1 << 20]


class BlockVf(VirtualFunction):
    """A VF with a small RAM disk: BAR0 registers ADDR (guest buffer), LBA, and CMD
    (1 = read a block into ADDR, 2 = write a block from ADDR; raises MSI-X vector 0)."""

    TYPE_NAME = "test-vf"
    VMSTATE = VfState

    def __init__(self, pf: PciDevice, k: int) -> None:
        self.disk = bytearray(64 * BLOCK)
        super().__init__(name=f"{pf.name}-vf{k}")

    def describe(self) -> None:
        self.regs = RegisterMap(0x1000, [
            Register("ADDR", 0x00, 8), Register("LBA", 0x08, 4),
            Register("CMD", 0x0C, 4, access=Access.WO, on_write=self._cmd)], migratable=True)
        self.add_mem_bar(0, VF_BAR_SIZE, self.regs, bits64=True)
        self.add_msix(2, bar=0, table_offset=0x2000, pba_offset=0x3000)

    def _cmd(self, reg: Register, new: int, old: int) -> None:
        addr, lba = self.regs["ADDR"].value, self.regs["LBA"].value
        off = lba * BLOCK
        if new == 1:
            self.dma.write(addr, bytes(self.disk[off:off + BLOCK]))
        elif new == 2:
            self.disk[off:off + BLOCK] = self.dma.read(addr, BLOCK)
        self.irq.notify(0)

    def get_device_state(self) -> VfState:
        return VfState(data=bytes(self.disk))

    def set_device_state(self, state: VfState) -> None:
        self.disk[:] = state.data


@vmstate("test-pf", version=1)
@attrs.frozen
class PfState:
    scratch: U32


class SriovPf(PciDevice):
    TYPE_NAME = "test-pf"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F0
    VMSTATE = PfState

    def describe(self) -> None:
        self.regs = RegisterMap(0x1000, [Register("SCRATCH", 0, 4)])
        self.add_mem_bar(0, 0x1000, self.regs)
        self.add_standard_pcie_caps()
        self.sriov = add_sriov(self, total_vfs=4, vf_device_id=0x00F1, factory=BlockVf,
                               vf_bars=[VfBar(0, VF_BAR_SIZE, bits64=True)])

    def get_device_state(self) -> PfState:
        return PfState(scratch=self.regs["SCRATCH"].value)

    def set_device_state(self, state: PfState) -> None:
        self.regs["SCRATCH"].value = state.scratch


@pytest.fixture
def machine():
    with Machine(ram_size=16 << 20) as m:
        yield m


def _io(m: Machine, vf, op: int, lba: int, buf: int) -> None:
    vf.iowrite64(0, 0x00, buf)
    vf.iowrite32(0, 0x08, lba)
    vf.iowrite32(0, 0x0C, op)
    assert vf.wait_irq(0, timeout=2)


def _write_blocks(m: Machine, vfs, seed: int) -> dict[tuple[int, int], int]:
    buf = m.alloc(BLOCK)
    crcs = {}
    for k, vf in enumerate(vfs):
        for lba in range(0, 64, 3):
            data = os.urandom(BLOCK)
            m.write(buf, data)
            _io(m, vf, 2, lba, buf)
            crcs[(k, lba)] = crc32c.crc32c(data)
    m.free(buf)
    return crcs


def _verify(m: Machine, vfs, crcs: dict[tuple[int, int], int]) -> None:
    buf = m.alloc(BLOCK)
    for k, vf in enumerate(vfs):
        for lba in range(64):
            _io(m, vf, 1, lba, buf)
            assert crc32c.crc32c(m.read(buf, BLOCK)) == crcs.get((k, lba), crc32c.crc32c(bytes(BLOCK))), (k, lba)
    m.free(buf)


def _probe_vf(vf) -> None:
    vf.set_master()
    assert vf.alloc_irq_vectors(1, 2) == 2


def test_vfs_appear_with_routing_ids_bars_and_msix(machine):
    pf = SriovPf(name="pf")
    p = machine.plug(pf)
    p.enable_device()
    pos = p.find_ext_capability(ids.ExtCapId.SRIOV)
    assert pos and p.config_read16(pos + sr.TOTAL_VF) == 4 and p.config_read16(pos + sr.VF_DID) == 0xF1
    vfs = p.enable_sriov(3)
    assert len(vfs) == 3 == len(pf.virtual_functions)
    # without ARI: next bus, stride 1
    assert [v.routing_id for v in vfs] == [0x100, 0x101, 0x102]
    base = pf.caps.find(sr.SriovCapability).vf_bar_base(0)
    assert base and [v.bar_address(0) for v in vfs] == [base + k * VF_BAR_SIZE for k in range(3)]
    assert [v.device.bar_address(0) for v in vfs] == [base + k * VF_BAR_SIZE for k in range(3)]
    for v in vfs:
        # VF rules: ids read FFFF (the host takes the PF's vendor and the VF Device ID), no BARs
        assert v.config_read16(ids.VENDOR_ID) == 0xFFFF and v.config_read16(ids.DEVICE_ID) == 0xFFFF
        assert (v.vendor, v.device_id) == (0x1B36, 0xF1)
        assert v.size_bars() == {}
        assert v.config_read8(ids.INTERRUPT_PIN) == 0
        v.config_write16(ids.COMMAND, ids.Command.MEMORY | ids.Command.IO)
        assert v.config_read16(ids.COMMAND) & (ids.Command.MEMORY | ids.Command.IO) == 0
        _probe_vf(v)
    crcs = _write_blocks(machine, vfs, 1)
    _verify(machine, vfs, crcs)
    # each VF interrupts on its own recorder only
    assert all(v.irq_count(0) == v.recorder.count(0) > 0 for v in vfs)
    assert p.recorder.counts == {}
    # VF MSE off: the VFs stop decoding (reads all ones)
    ctrl = p.config_read16(pos + sr.CTRL)
    p.config_write16(pos + sr.CTRL, ctrl & ~sr.CTRL_MSE)
    assert vfs[0].ioread32(0, 0x08) == 0xFFFFFFFF
    p.config_write16(pos + sr.CTRL, ctrl)
    assert vfs[0].ioread32(0, 0x08) != 0xFFFFFFFF
    old = list(pf.virtual_functions)
    p.disable_sriov()
    assert p.virtfns == [] and pf.virtual_functions == [] and all(v.closed for v in old)
    with pytest.raises(Exception, match="no device decodes"):
        machine.mmio_read(base, 4)


def test_ari_changes_offset_and_reset_removes_vfs(machine):
    pf = SriovPf(name="pf")
    p = machine.plug(pf, slot=2)
    p.enable_device()
    pos = p.find_ext_capability(ids.ExtCapId.SRIOV)
    p.config_write16(pos + sr.CTRL, sr.CTRL_ARI)
    assert p.config_read16(pos + sr.VF_OFFSET) == 1 and p.config_read16(pos + sr.VF_STRIDE) == 1
    vfs = p.enable_sriov(2)
    assert [v.routing_id for v in vfs] == [0x11, 0x12]
    # ARI and NumVFs are read-only while VF Enable is set
    p.config_write16(pos + sr.CTRL, sr.CTRL_VFE | sr.CTRL_MSE)
    assert p.config_read16(pos + sr.CTRL) & sr.CTRL_ARI
    p.config_write16(pos + sr.NUM_VF, 4)
    assert p.config_read16(pos + sr.NUM_VF) == 2
    p.flr()  # a reset of the PF clears VF Enable: the VFs go
    assert pf.virtual_functions == [] and p.virtfns == []
    assert p.config_read16(pos + sr.CTRL) == 0


def test_a_factory_that_builds_no_vf_fails_the_pf(machine):
    class Bad(SriovPf):
        def describe(self) -> None:
            super().describe()
            self.sriov.factory = lambda pf, k: SriovPf(name="notvf")

    pf = Bad(name="pf")
    p = machine.plug(pf)
    p.enable_device()
    with pytest.raises(Exception, match="0 VFs appeared"):
        p.enable_sriov(1)
    assert pf.failed is not None and pf.virtual_functions == []


def test_vf_bars_must_match_the_pf_declaration():
    class WrongVf(BlockVf):
        def describe(self) -> None:
            self.regs = RegisterMap(0x1000, [])
            self.add_mem_bar(0, 0x1000, self.regs)

    pf = SriovPf(name="pf")
    pf.realize()
    with pytest.raises(ConfigError, match="differ"):
        WrongVf(pf, 0).bind_physfn(pf, pf.sriov.cap, 0)


def test_pf_with_two_vfs_migrates_in_process(machine):
    pf = SriovPf(name="src")
    p = machine.plug(pf)
    p.enable_device()
    p.iowrite32(0, 0, 0x5A5A)
    vfs = p.enable_sriov(2)
    for v in vfs:
        _probe_vf(v)
    crcs = _write_blocks(machine, vfs, 2)
    pf.quiesce()
    assert all(v.quiesced for v in pf.virtual_functions)
    data, fds = save_device_stream(pf)
    dst = SriovPf(name="dst")
    res = load_device_stream(dst, data, fds)
    assert len(dst.virtual_functions) == 2
    assert functions_of(dst).cap.num_vfs == 2 and functions_of(dst).cap.vf_enable
    dst.irq.sink = p.recorder
    p.device = dst  # the VF handles follow the new PF's VFs
    assert [h.device for h in p.virtfns] == dst.virtual_functions
    dst.resume()
    pf.close()
    assert p.ioread32(0, 0) == 0x5A5A
    _verify(machine, p.virtfns, crcs)
    more = _write_blocks(machine, p.virtfns, 3)
    _verify(machine, p.virtfns, more)
    p.disable_sriov()
    assert dst.virtual_functions == []
    dst.close()
    res.close()


def test_a_stream_with_more_vfs_than_total_is_refused(machine):
    pf = SriovPf(name="pf")
    pf.realize()
    with pytest.raises(StateError, match="TotalVFs is 4"):
        check_vfs(pf, SriovState(vfs=tuple(Entry(stream=b"", fds=()) for _ in range(5))))


def test_the_pf_checks_its_vf_streams_before_anything_is_applied(machine):
    """check_vfs hands the VFs' streams to the PF's check_vf_streams hook; a refusal there
    comes before any section is applied (the PF's own state stays, no VF is built)."""
    seen: list[list[bytes]] = []

    class Picky(SriovPf):
        def check_vf_streams(self, streams):
            seen.append(list(streams))
            if len(streams) > 1:
                raise StateError("two VFs are one too many", section="pcidev/sriov", path="vfs[1]")

    pf = Picky(name="src")
    p = machine.plug(pf)
    p.enable_device()
    p.iowrite32(0, 0, 0x77)
    vfs = p.enable_sriov(2)
    for v in vfs:
        _probe_vf(v)
    pf.quiesce()
    data, fds = save_device_stream(pf)
    pf.resume()
    dst = Picky(name="dst")
    try:
        with pytest.raises(StateError, match="one too many"):
            load_device_stream(dst, data, fds)
        assert len(seen) == 1 and len(seen[0]) == 2 and all(seen[0])
        assert dst.regs["SCRATCH"].value == 0 and dst.virtual_functions == []
    finally:
        dst.close()
        pf.close()


CHILD = textwrap.dedent("""
    import socket, sys
    sys.path.insert(0, sys.argv[2])
    from test_sriov import SriovPf
    from pcidev.migration import migrate_in, migrate_out
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(sys.argv[1])
    dev = SriovPf(name="child")
    migrate_in(dev, sock)
    assert len(dev.virtual_functions) == 2, dev.virtual_functions
    dev.quiesce()
    migrate_out(dev, sock)
""")


def test_pf_with_two_vfs_migrates_to_another_process_and_back(machine, tmp_path):
    pf = SriovPf(name="src")
    p = machine.plug(pf)
    p.enable_device()
    vfs = p.enable_sriov(2)
    for v in vfs:
        _probe_vf(v)
    crcs = _write_blocks(machine, vfs, 4)
    path = str(tmp_path / "mig.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, os.path.dirname(__file__)])
    try:
        conn, _ = srv.accept()
        pf.quiesce()
        migrate_out(pf, conn)
        back = SriovPf(name="back")
        res = migrate_in(back, conn)
        assert child.wait(30) == 0
    finally:
        child.kill()
        srv.close()
    back.irq.sink = p.recorder
    p.device = back
    back.resume()
    assert len(p.virtfns) == 2
    _verify(machine, p.virtfns, crcs)
    back.close()
    pf.close()
    del res


def test_a_standalone_vf_shows_what_vfio_pci_shows(machine):
    pf = SriovPf(name="pf")
    p = machine.plug(pf)
    p.enable_device()
    vf = p.enable_sriov(1)[0].device
    assert vf.config_read(ids.VENDOR_ID, 4) == 0xFFFFFFFF
    vf.standalone = True  # served alone (vfio-user): the PF's vendor, the VF Device ID, BARs that size
    assert vf.config_read(ids.VENDOR_ID, 4) == 0x00F1_1B36
    assert vf.config_read(ids.DEVICE_ID, 1) == 0xF1
    bar = ids.BASE_ADDRESS_0
    assert vf.config_read(bar, 4) == 0x4  # 64-bit memory
    vf.config_write(bar, 4, 0xFFFFFFFF)
    vf.config_write(bar + 4, 4, 0xFFFFFFFF)
    assert vf.config_read(bar, 4) == (~(VF_BAR_SIZE - 1) & 0xFFFFFFF0) | 0x4
    assert vf.config_read(bar + 4, 4) == 0xFFFFFFFF
    vf.config_write(bar, 2, 0x1234)  # a partial write keeps the other bytes
    assert vf.config_read(bar, 4) == (~(VF_BAR_SIZE - 1) & 0xFFFF0000) | 0x0004
    assert vf.config_read(bar + 8, 4) == 0  # no BAR2
    assert vf.config.get32(bar) == 0  # the VF's own registers stay read-only zero
    assert vf.config_read(ids.COMMAND, 2) == vf.config.get16(ids.COMMAND)


def test_a_standalone_vf_blocks_its_own_and_its_pf_migration(machine):
    pf = SriovPf(name="pf")
    pdev = machine.plug(pf)
    try:
        vfs = pdev.enable_sriov(2)
        assert device_blockers(pf) == []
        vfs[1].device.standalone = True  # served on a socket of its own (pcidev serve)
        assert any("VF 1 is served on a socket of its own" in r for r in device_blockers(vfs[1].device))
        assert any(r.startswith("VF 1: VF 1 is served on a socket of its own") for r in device_blockers(pf))
    finally:
        pf.close()


def test_the_pf_quiesces_and_resumes_only_the_vfs_without_a_transport_of_their_own(machine):
    pf = SriovPf(name="pf")
    pdev = machine.plug(pf)
    try:
        vfs = pdev.enable_sriov(2)
        vfs[0].device.standalone = True  # its own client: its transport quiesces and resumes it
        pf.quiesce()
        assert pf.quiesced and vfs[1].device.quiesced and not vfs[0].device.quiesced
        vfs[0].device.quiesce()
        pf.resume()
        assert not pf.quiesced and not vfs[1].device.quiesced and vfs[0].device.quiesced
    finally:
        pf.close()


def test_closing_the_pf_ends_its_vfs_through_the_watchers(machine):
    pf = SriovPf(name="pf")
    pdev = machine.plug(pf)
    vfs = [h.device for h in pdev.enable_sriov(2)]
    pf.close()
    assert pdev.virtfns == []  # the host was told (no stale handles)
    assert pf.virtual_functions == [] and all(vf.closed for vf in vfs)


def test_system_page_size_is_read_only_while_vf_enable_is_set(machine):
    pf = SriovPf(name="pf")
    pdev = machine.plug(pf)
    try:
        vfs = pdev.enable_sriov(2)
        pos = pdev.find_ext_capability(ids.ExtCapId.SRIOV)
        where = [v.resources[0] for v in vfs]
        pdev.config_write32(pos + sr.SYS_PGSIZE, 2)  # 8 KiB would move and resize live VF BARs
        assert pdev.config_read32(pos + sr.SYS_PGSIZE) == 1
        assert pf.sriov.cap.vf_bar_address(1, 0) == where[1][0]
        pdev.disable_sriov()
        pdev.config_write32(pos + sr.SYS_PGSIZE, 2)
        assert pdev.config_read32(pos + sr.SYS_PGSIZE) == 2
    finally:
        pf.close()


def test_a_vf_routing_id_beyond_ffffh_is_refused_not_wrapped(machine):
    pf = SriovPf(name="pf")
    machine.plug(pf)
    try:
        cap = pf.sriov.cap
        assert cap.vf_routing_id(0xFE00, 0) == 0xFE00 + cap.first_vf_offset == 0xFF00
        with pytest.raises(ConfigError, match="beyond FFFFh"):
            cap.vf_routing_id(0xFFFF, 0)
    finally:
        pf.close()


def test_a_vf_command_register_has_no_decode_or_interrupt_disable_bits(machine):
    pf = SriovPf(name="pf")
    pdev = machine.plug(pf)
    try:
        vf = pdev.enable_sriov(1)[0]
        vf.config_write16(ids.COMMAND, 0xFFFF)
        cmd = vf.config_read16(ids.COMMAND)
        assert cmd & int(ids.Command.MASTER) and not cmd & int(ids.Command.IO | ids.Command.MEMORY
                                                             | ids.Command.INTX_DISABLE)
    finally:
        pf.close()
