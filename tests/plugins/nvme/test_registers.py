"""registers.py on its own: the BAR layout and the register checks of CC.EN 0->1."""

from __future__ import annotations

import pytest

from pcidev_nvme.registers import DOORBELL_BASE, bar_layout, enable_problem

CC_VALID = (6 << 16) | (4 << 20) | (6 << 4)  # IOSQES 6, IOCQES 4, CSS all
AQA_VALID = (31 << 16) | 31


def test_bar_layout_msix_after_the_doorbells():
    lay = bar_layout(64, 65, 0)
    assert lay.msix_bar == 0 and lay.bar4_size == 0
    assert lay.table_offset == lay.doorbell_window >= DOORBELL_BASE + 8 * 65
    assert lay.table_offset % 4096 == 0 and lay.pba_offset % 4096 == 0
    assert lay.pba_offset >= lay.table_offset + 16 * 65
    assert lay.bar0_size & (lay.bar0_size - 1) == 0 and lay.bar0_size > lay.pba_offset


def test_bar_layout_msix_in_bar4_as_qemu():
    lay = bar_layout(2, 3, 4)
    assert (lay.msix_bar, lay.table_offset) == (4, 0)
    assert lay.doorbell_window == lay.bar0_size == 8192
    assert lay.pba_offset == 4096 and lay.bar4_size == 8192


def test_enable_problem_accepts_a_valid_setup():
    assert enable_problem(CC_VALID | 1, AQA_VALID, 0x10000, 0x20000) is None


@pytest.mark.parametrize("cc, aqa, asq, acq, why", [
    (CC_VALID, 31 << 16, 0x10000, 0x20000, "ASQS"),
    (CC_VALID, 31, 0x10000, 0x20000, "ACQS"),
    (CC_VALID | 5 << 7, AQA_VALID, 0x10000, 0x20000, "MPS"),
    (CC_VALID & ~(7 << 4) | 1 << 4, AQA_VALID, 0x10000, 0x20000, "CSS"),
    (CC_VALID | 1 << 11, AQA_VALID, 0x10000, 0x20000, "AMS"),
    (CC_VALID, AQA_VALID, 0, 0x20000, "zero"),
    (CC_VALID, AQA_VALID, 0x10800, 0x20000, "aligned"),
])
def test_enable_problem_names_the_field(cc, aqa, asq, acq, why):
    assert why in enable_problem(cc, aqa, asq, acq)
