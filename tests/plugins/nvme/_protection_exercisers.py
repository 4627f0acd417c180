"""Exercisers of the Identify bits metadata and protection information advertise, for
``test_identify_truth.py``'s walk (``EXERCISERS.update(PROTECTION_EXERCISERS)``): SGLS
bit 19 (metadata SGLs), MC bits 0 and 1 (extended LBAs, separate metadata buffers) and
DPC bits 0..4 (PI types 1, 2, 3; PI first or last in the metadata).

Each one formats namespace 1 to an LBA format with metadata (Format NVM erases it), does
PI-checked I/O through the host driver, and formats it back to LBA format 0."""

from __future__ import annotations

import os
from collections.abc import Callable

from pcidev_nvme.testing.driver import NvmeDriver

__all__ = ["PROTECTION_EXERCISERS"]

FORMAT_NVM, WRITE, READ = 0x80, 0x01, 0x02
PRACT, ALL = 8, 7


def _formatted(drv: NvmeDriver, lbaf: int, *, pi: int = 0, pil: int = 0, mset: int = 0) -> None:
    drv.admin(FORMAT_NVM, nsid=1, cdw10=lbaf | mset << 4 | pi << 5 | pil << 8)
    drv.scan_namespaces()


def _back(drv: NvmeDriver) -> None:
    _formatted(drv, 0)


def _pi_round_trip(drv: NvmeDriver, *, lbaf: int, pi: int, pil: int = 0, mset: int = 0,
                   meta_sgl: bool = False) -> None:
    """Write with PRACT, read back with every check the type allows, and check the data."""
    _formatted(drv, lbaf, pi=pi, pil=pil, mset=mset)
    try:
        info = drv.namespaces[1]
        assert (info.pi, info.pil, info.extended) == (pi, bool(pil), bool(mset))
        lbs, ms = info.lba_size, info.ms
        data = os.urandom(2 * lbs)
        ref = 4 if pi == 1 else 0x99
        checks = ALL if pi != 3 else ALL & ~1
        pis = 16 if lbaf in (4, 5, 8) else 8
        if mset:
            # with metadata larger than the PI it travels (the PI part is generated)
            host = data if ms == pis else data[:lbs] + bytes(ms) + data[lbs:] + bytes(ms)
            comp, _d, _m = drv.io_md(WRITE, 1, 4, 2, data=host, prinfo=PRACT, ref=ref, app=0x77)
            assert comp.ok, hex(comp.status)
            comp, buf, _m = drv.io_md(READ, 1, 4, 2, data_len=2 * (lbs + ms), prinfo=checks, ref=ref, app=0x77)
            assert comp.ok, hex(comp.status)
            assert buf[:lbs] == data[:lbs] and buf[lbs + ms:2 * lbs + ms] == data[lbs:]
        else:
            comp, _d, _m = drv.io_md(WRITE, 1, 4, 2, data=data, meta=bytes(2 * ms), prinfo=PRACT, ref=ref, app=0x77,
                                     meta_sgl=meta_sgl)
            assert comp.ok, hex(comp.status)
            comp, back, meta = drv.io_md(READ, 1, 4, 2, data_len=2 * lbs, meta_len=2 * ms, prinfo=checks, ref=ref,
                                         app=0x77, meta_sgl=meta_sgl)
            assert comp.ok and back == data, hex(comp.status)
            at = 0 if pil else ms - pis
            assert meta[at:at + 2] != b"\xff\xff"  # a generated Guard, not the deallocated one
    finally:
        _back(drv)


def _metadata_sgl(drv: NvmeDriver) -> None:  # SGLS bit 19: MPTR names an SGL descriptor (PSDT 10b)
    _pi_round_trip(drv, lbaf=3, pi=1, meta_sgl=True)


def _mc_extended(drv: NvmeDriver) -> None:  # MC bit 0: metadata at the end of each block's data
    _pi_round_trip(drv, lbaf=6, pi=2, mset=1)


def _mc_separate(drv: NvmeDriver) -> None:  # MC bit 1: metadata in a separate buffer (MPTR)
    _pi_round_trip(drv, lbaf=2, pi=1)


def _dpc_type(pi: int) -> Callable[[NvmeDriver], None]:
    def run(drv: NvmeDriver) -> None:  # DPC bits 0..2: PI types 1, 2, 3
        _pi_round_trip(drv, lbaf=4, pi=pi)
    return run


def _dpc_first(drv: NvmeDriver) -> None:  # DPC bit 3: PI in the first bytes of the metadata
    _pi_round_trip(drv, lbaf=8, pi=1, pil=1)


def _dpc_last(drv: NvmeDriver) -> None:  # DPC bit 4: PI in the last bytes of the metadata
    _pi_round_trip(drv, lbaf=7, pi=1, pil=0)


#: (field, bit) -> exerciser, the keys of test_identify_truth.EXERCISERS
PROTECTION_EXERCISERS: dict[tuple[str, int], Callable[[NvmeDriver], None]] = {
    ("sgls", 19): _metadata_sgl,
    ("mc", 0): _mc_extended, ("mc", 1): _mc_separate,
    ("dpc", 0): _dpc_type(1), ("dpc", 1): _dpc_type(2), ("dpc", 2): _dpc_type(3),
    ("dpc", 3): _dpc_first, ("dpc", 4): _dpc_last,
}
