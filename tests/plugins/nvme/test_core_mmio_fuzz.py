"""Garbage MMIO and config-space traffic to the NVMe controller (hypothesis).

A guest may write anything anywhere in BAR0 — CC with reserved or invalid
fields, AQA/ASQ/ACQ pointing outside memory, doorbells for queues that do not
exist or with values past the queue size, partial and straddling accesses. The
controller must never let an exception escape, never hang, and must still come
up cleanly for a real driver after a reset.
"""

from __future__ import annotations

import tempfile
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.host import Machine
from pcidev.pci.config import ResetKind
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

# registers first, then the doorbells of the admin queue and a few I/O queues
_hot = st.sampled_from([0x00, 0x04, 0x08, 0x0C, 0x0E, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34,
                        0x38, 0x3C, 0x1000, 0x1004, 0x1008, 0x100C, 0x1010, 0x1014, 0x1100, 0x1F00])
_offset = st.one_of(_hot, st.integers(0, 0x1FF8))
_size = st.sampled_from([1, 2, 4, 8])
_value = st.one_of(st.sampled_from([0, 1, 0xFFFFFFFF, 0x460001, 0x460061, 0x4000, 0xC000, 0x00460000,
                                    0x001F001F, 2**64 - 1]),
                   st.integers(0, 2**64 - 1))
_access = st.tuples(st.booleans(), _offset, _size, _value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_access, min_size=1, max_size=60))
def test_garbage_mmio_never_escapes_and_controller_recovers(accesses) -> None:
    with Machine(ram_size=16 << 20) as machine:
        ctrl = NvmeController("ns=mem:size=1M")
        try:
            pdev = machine.plug(ctrl)
            pdev.enable_device()
            pdev.set_master()
            pdev.alloc_irq_vectors(1, 4)
            for is_write, off, size, value in accesses:
                off -= off % size  # the BAR refuses misaligned 8-byte accesses past its end only
                if is_write:
                    ctrl.bar_write(0, off, size, value & ((1 << (8 * size)) - 1))
                else:
                    ctrl.bar_read(0, off, size)
            # no handler raised: a garbage access is answered by the model, not by an exception
            assert ctrl.failed is None, repr(ctrl.failed)
            # whatever state the garbage left, a function reset and a normal probe work
            ctrl.reset(ResetKind.FLR)
            deadline = time.monotonic() + 5
            while ctrl.bar_read(0, 0x1C, 4, check_decode=False) & 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            drv = NvmeDriver(machine, pdev, io_queues=1, aers=0, timeout=5.0)
            drv.probe()
            drv.write(1, 0, b"\xA5" * 512)
            assert drv.read(1, 0, 1) == b"\xA5" * 512
            drv.close()
        finally:
            ctrl.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4095), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
                max_size=80))
def test_garbage_config_writes_never_escape(writes) -> None:
    ctrl = NvmeController("ns=null:size=1M")
    try:
        ctrl.realize()
        for off, size, value in writes:
            if off + size > 4096:
                continue
            ctrl.config_write(off, size, value)
            ctrl.config_read(off, size)
        assert ctrl.config_read(0, 4) == 0x00101B36
        assert ctrl.config_read(0x08, 4) >> 8 == 0x010802
    finally:
        ctrl.close()


# with the optional register blocks on: CMB (38h..63h, BAR2), PMR (E00h..E1Bh, BAR4), and
# NSSR; the same promise: no exception escapes, and a reset brings the controller back
_opt_hot = st.sampled_from([0x20, 0x38, 0x3C, 0x50, 0x54, 0x58, 0x5C, 0x60, 0xE00, 0xE04, 0xE08, 0xE0C, 0xE10,
                            0xE14, 0xE18, 0x14, 0x1C])
_opt_access = st.tuples(st.booleans(), st.one_of(_opt_hot, st.integers(0, 0xFF8)), _size,
                        st.one_of(st.sampled_from([0, 1, 3, 0x4E564D65, 0xFFFFFFFF, 2**64 - 1]),
                                  st.integers(0, 2**64 - 1)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_opt_access, min_size=1, max_size=40))
def test_garbage_to_the_cmb_pmr_and_nssr_registers_never_escapes(accesses) -> None:
    with tempfile.TemporaryDirectory() as where, Machine(ram_size=16 << 20) as machine:
        ctrl = NvmeController(f"ns=mem:size=1M,cmb_size=2,pmr={where}/pmr.img,pmr_size=1M")
        try:
            pdev = machine.plug(ctrl)
            pdev.enable_device()
            pdev.set_master()
            pdev.alloc_irq_vectors(1, 4)
            for is_write, off, size, value in accesses:
                off -= off % size
                if is_write:
                    ctrl.bar_write(0, off, size, value & ((1 << (8 * size)) - 1))
                else:
                    ctrl.bar_read(0, off, size)
            assert ctrl.failed is None, repr(ctrl.failed)
            ctrl.reset(ResetKind.CONVENTIONAL)
            deadline = time.monotonic() + 5
            while ctrl.bar_read(0, 0x1C, 4, check_decode=False) & 1 and time.monotonic() < deadline:
                time.sleep(0.001)
            drv = NvmeDriver(machine, pdev, io_queues=1, aers=0, timeout=5.0)
            drv.probe()
            drv.write(1, 0, b"\xA5" * 512)
            assert drv.read(1, 0, 1) == b"\xA5" * 512
            drv.close()
        finally:
            ctrl.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0x100, 4095), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1)),
                max_size=80))
def test_garbage_config_writes_to_an_sriov_primary_never_escape(writes) -> None:
    """The extended capabilities (SR-IOV: NumVFs, VF Enable, VF BARs, page size) take
    anything; enabled VFs are built and removed without an exception escaping."""
    ctrl = NvmeController("ns=null:size=1M,sriov_max_vfs=2,sriov_vq_flexible=4,sriov_vi_flexible=2")
    try:
        ctrl.realize()
        for off, size, value in writes:
            if off + size > 4096:
                continue
            ctrl.config_write(off, size, value)
            ctrl.config_read(off, size)
        assert ctrl.failed is None, repr(ctrl.failed)
        assert ctrl.config_read(0, 4) == 0x00101B36
        assert len(ctrl.virtual_functions) <= 2
    finally:
        ctrl.close()
