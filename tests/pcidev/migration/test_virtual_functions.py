"""The RAM BARs of an SR-IOV PF's virtual functions travel with the PF
(pcidev.migration.virtual_functions): over a UNIX socket as their memfds, over TCP as
memory sources of the PF (``"vf<k>/bar2"``: pre-copied while a thread keeps writing them
through MMIO, the rest at the stop), in process and to another process; every page is
checked by its CRC-32C on both sides."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time

import attrs
import crc32c
import pytest
from precopy_device import Incoming, tcp_pair

from pcidev.bar import RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.memory_source import ContentDescriptors
from pcidev.migration import descriptor_blockers, migrate_in, migrate_out
from pcidev.migration.precopy import Precopy, destination_sources
from pcidev.migration.virtual_functions import VfState, _vf_contents
from pcidev.pci.capabilities.sriov import CTRL, CTRL_VFE, NUM_VF
from pcidev.sriov import VfBar, VirtualFunction, add_sriov, vf_memory_objects
from pcidev.vmstate import U32, FdRef, vmstate
from pcidev.vmstate.errors import StateError

RAM = 0x8000
PAGE = 4096


@vmstate("test-ram-vf", version=1)
@attrs.frozen
class RamVfState:
    x: U32


class RamVf(VirtualFunction):
    """A VF with registers in BAR0 and RAM in BAR2."""

    TYPE_NAME = "test-ram-vf"
    VMSTATE = RamVfState

    def __init__(self, pf: PciDevice, k: int) -> None:
        super().__init__(name=f"{pf.name}-vf{k}")

    def describe(self) -> None:
        self.regs = RegisterMap(0x1000, [Register("X", 0)])
        self.add_mem_bar(0, 0x1000, self.regs)
        self.ram = RamBacking(RAM, name="test-vf-ram")
        self.add_mem_bar(2, RAM, self.ram, bits64=True)

    def get_device_state(self) -> RamVfState:
        return RamVfState(x=self.regs["X"].value)

    def set_device_state(self, state: RamVfState) -> None:
        self.regs["X"].value = state.x

    def on_close(self) -> None:
        self.ram.close()


@vmstate("test-ram-pf", version=1)
@attrs.frozen
class RamPfState:
    scratch: U32


class RamPf(PciDevice):
    TYPE_NAME = "test-ram-pf"
    VENDOR_ID, DEVICE_ID = 0x1B36, 0x00F2
    VMSTATE = RamPfState

    def describe(self) -> None:
        self.regs = RegisterMap(0x1000, [Register("SCRATCH", 0, 4)])
        self.add_mem_bar(0, 0x1000, self.regs)
        self.add_standard_pcie_caps()
        self.sriov = add_sriov(self, total_vfs=4, vf_device_id=0x00F3, factory=RamVf,
                               vf_bars=[VfBar(0, 0x1000), VfBar(2, RAM, bits64=True)])

    def get_device_state(self) -> RamPfState:
        return RamPfState(scratch=self.regs["SCRATCH"].value)

    def set_device_state(self, state: RamPfState) -> None:
        self.regs["SCRATCH"].value = state.scratch


def _pf_with_vfs(n: int, seed: int) -> RamPf:
    """A PF with ``n`` VFs, enabled through its SR-IOV capability (NumVFs, VF Enable)."""
    pf = RamPf(name="src")
    pf.realize()
    cap = pf.sriov.cap
    pf.config_write(cap.offset + NUM_VF, 2, n)
    pf.config_write(cap.offset + CTRL, 2, CTRL_VFE)
    assert len(pf.virtual_functions) == n
    rng = random.Random(seed)
    for k, vf in enumerate(pf.virtual_functions):
        assert isinstance(vf, RamVf)
        vf.ram.mem[:RAM // 2] = rng.randbytes(RAM // 2)  # the second half a hole
        vf.regs["X"].value = 100 + k
        vf.resume()
    pf.regs["SCRATCH"].value = 0x5A5A
    return pf


def _crcs(vf: PciDevice) -> list[int]:
    assert isinstance(vf, RamVf)
    with memoryview(vf.ram.mem) as mv:
        return [crc32c.crc32c(mv[i:i + PAGE]) for i in range(0, RAM, PAGE)]


class MmioWriter:
    """A thread writing the VFs' RAM through their MMIO path (8 bytes at a time)."""

    def __init__(self, pf: RamPf) -> None:
        self.pf = pf
        self.writes = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.rng = random.Random(7)

    def _run(self) -> None:
        while not self.stop.is_set():
            for vf in list(self.pf.virtual_functions):
                off = self.rng.randrange(0, RAM // 8) * 8
                with vf.lock:
                    vf.bar_write(2, off, 8, self.rng.getrandbits(64) | 1, check_decode=False)
                self.writes += 1
            time.sleep(0.001)

    def __enter__(self) -> MmioWriter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def test_the_vfs_ram_bars_are_sources_of_the_pf_and_nothing_blocks_over_tcp():
    pf = _pf_with_vfs(2, 1)
    try:
        names = sorted(s.name for s in pf.memory_sources())
        assert names == ["vf0/bar2", "vf1/bar2"]
        assert descriptor_blockers(pf, "a migration over TCP", pf.memory_sources()) == []
        # without the sources (a channel that streams none) each VF's BAR has its sentence
        assert descriptor_blockers(pf, "TCP") == [
            f"VF {k}: RAM BAR2 (feature 'bar2-ram') migrates only as a file descriptor (its memfd), "
            "which TCP cannot carry" for k in range(2)]
        # a destination PF has no VFs before the load: it accepts what its VFs could have
        dst = RamPf(name="dst")
        try:
            want = {f"vf{k}/bar{i}": size for k in range(4) for i, size in ((0, 0x1000), (2, RAM))}
            assert vf_memory_objects(dst, 64) == want and destination_sources(dst) == want
            assert vf_memory_objects(dst, 1) == {"vf0/bar0": 0x1000, "vf0/bar2": RAM}
        finally:
            dst.close()
    finally:
        pf.close()


def test_the_vf_ram_bars_migrate_over_tcp_while_mmio_writes_them():
    pf, dst = _pf_with_vfs(2, 2), RamPf(name="dst")
    try:
        with Incoming(dst, tcp_pair(), timeout=30) as incoming:
            p = Precopy(pf, incoming.sock, timeout=30)
            assert p.active
            with MmioWriter(pf) as w:
                time.sleep(0.05)
                p.run()
            assert w.writes > 0
            result = migrate_out(pf, incoming.sock, precopy=p, timeout=30)
        assert incoming.error is None, incoming.error
        assert result.fds == 0 and result.precopy is not None and result.precopy.iterations >= 1
        assert len(dst.virtual_functions) == 2
        for k, (old, new) in enumerate(zip(pf.virtual_functions, dst.virtual_functions, strict=True)):
            assert _crcs(new) == _crcs(old), f"VF {k}"  # every page as the source had it at the stop
            assert isinstance(new, RamVf) and new.regs["X"].value == 100 + k
            assert isinstance(old, RamVf) and new.ram.identity != old.ram.identity  # its own memory
        assert dst.regs["SCRATCH"].value == 0x5A5A
    finally:
        pf.close()
        dst.close()


def test_over_unix_the_vfs_memfds_travel():
    pf, dst = _pf_with_vfs(1, 3), RamPf(name="dst")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got: dict[str, object] = {}
    t = threading.Thread(target=lambda: got.setdefault("value", migrate_in(dst, b, timeout=30)), daemon=True)
    t.start()
    try:
        migrate_out(pf, a, timeout=30)
        t.join(30)
        (old,), (new,) = pf.virtual_functions, dst.virtual_functions
        assert isinstance(old, RamVf) and isinstance(new, RamVf)
        assert new.ram.identity == old.ram.identity and _crcs(new) == _crcs(old)
    finally:
        a.close()
        b.close()
        pf.close()
        dst.close()


def test_contents_named_for_another_vf_are_refused():
    fds = ContentDescriptors([None, 7], {1: "vf1/bar2"})
    entry = VfState(stream=b"", fds=(FdRef(0), FdRef(1)))
    got = _vf_contents(fds, entry, 1)
    assert list(got) == [None, 7] and got.names == {1: "bar2"}
    with pytest.raises(StateError, match="'vf1/bar2' were sent for a descriptor of VF 0"):
        _vf_contents(fds, entry, 0)


CHILD = textwrap.dedent("""
    import json, socket, sys
    sys.path.insert(0, sys.argv[2])
    from test_virtual_functions import RamPf, _crcs
    from pcidev.migration import migrate_in
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    dev = RamPf(name="child")
    migrate_in(dev, sock, timeout=30)
    print(json.dumps({"crcs": [_crcs(vf) for vf in dev.virtual_functions],
                      "x": [vf.regs["X"].value for vf in dev.virtual_functions]}))
    dev.close()
""")


def test_the_vf_ram_bars_migrate_to_another_process_over_tcp():
    pf = _pf_with_vfs(3, 4)
    lsock = socket.create_server(("127.0.0.1", 0))
    here = os.path.dirname(__file__)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(lsock.getsockname()[1]), here],
                             stdout=subprocess.PIPE, text=True)
    try:
        conn, _ = lsock.accept()
        p = Precopy(pf, conn, timeout=30)
        with MmioWriter(pf):
            p.run()
        result = migrate_out(pf, conn, precopy=p, timeout=30)
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0
        report = json.loads(out.strip().splitlines()[-1])
        assert result.fds == 0 and result.deferred
        assert report["crcs"] == [_crcs(vf) for vf in pf.virtual_functions]
        assert report["x"] == [100, 101, 102]
        conn.close()
    finally:
        child.kill()
        lsock.close()
        pf.close()
