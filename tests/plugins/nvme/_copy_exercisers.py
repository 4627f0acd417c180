"""Copy (I/O opcode 19h) helpers for the NVMe tests: source range entries of descriptor
formats 0h..3h built from the NVM Command Set layouts (independently of the controller's
code), a Copy command through the host driver, Host Behavior Support CDFE, and the
exercisers of Identify Controller OCFS bits 1..3 for ``test_identify_truth.py``'s walk
(:data:`COPY_EXERCISERS`; :data:`COPY_FORMATTING` lists the ones that format namespace 1,
which a secondary controller runs through its primary)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from pcidev_nvme.testing.driver import Completion, NvmeDriver

__all__ = ["COPY", "COPY_EXERCISERS", "COPY_FORMATTING", "copy", "f0", "f1", "f2", "f3", "set_cdfe"]

COPY, WRITE, READ, FORMAT_NVM, HBS = 0x19, 0x01, 0x02, 0x80, 0x16
PRACT, ALL = 8, 7


def f0(slba: int, nlb: int, ref: int = 0, app: int = 0, mask: int = 0) -> bytes:
    """Format 0h (32 bytes): SLBA 15:08, NLB 17:16 (0's based), EILBRT 27:24, ELBAT 29:28,
    ELBATM 31:30."""
    return struct.pack("<8xQH6xIHH", slba, nlb - 1, ref, app, mask)


def _elbt(ref: int) -> bytes:
    # Expected Logical Block Tags: 80 bits, most significant byte first; with no storage
    # tag (STS 0) the reference tag is the low 48 bits
    return ref.to_bytes(10, "big")


def f1(slba: int, nlb: int, ref: int = 0, app: int = 0, mask: int = 0) -> bytes:
    """Format 1h (40 bytes): SLBA, NLB, ELBT 35:26, ELBAT 37:36, ELBATM 39:38."""
    return bytes(8) + struct.pack("<QH", slba, nlb - 1) + bytes(8) + _elbt(ref) + struct.pack("<HH", app, mask)


def f2(snsid: int, slba: int, nlb: int, ref: int = 0, app: int = 0, mask: int = 0, sopt: int = 0) -> bytes:
    """Format 2h (32 bytes): SNSID 03:00, SLBA, NLB, SOPT 23:22, EILBRT, ELBAT, ELBATM."""
    return struct.pack("<I4xQH4xHIHH", snsid, slba, nlb - 1, sopt, ref, app, mask)


def f3(snsid: int, slba: int, nlb: int, ref: int = 0, app: int = 0, mask: int = 0, sopt: int = 0) -> bytes:
    """Format 3h (40 bytes): SNSID, SLBA, NLB, SOPT 23:22, ELBT 35:26, ELBAT, ELBATM."""
    return (struct.pack("<I4xQH4xH2x", snsid, slba, nlb - 1, sopt) + _elbt(ref)
            + struct.pack("<HH", app, mask))


def copy(drv: NvmeDriver, nsid: int, sdlba: int, entries: list[bytes], desfmt: int, *, prinfor: int = 0,
         prinfow: int = 0, ref: int = 0, app: int = 0, mask: int = 0xFFFF, qid: int = 1) -> Completion:
    """One Copy into ``nsid`` at ``sdlba`` (ILBRT ``ref``: CDW14, CDW3 above 32 bits;
    LBAT/LBATM in CDW15); the completion, whatever its status."""
    raw = b"".join(entries)
    buf = drv.machine.alloc(4096 * (1 + len(raw) // 4096), 4096)
    try:
        drv.mem.write(buf, raw)
        cdw12 = (len(entries) - 1) | desfmt << 8 | (prinfor & 0xF) << 12 | (prinfow & 0xF) << 26
        return drv.io(qid, COPY, check=False, nsid=nsid, cdw10=sdlba & 0xFFFFFFFF, cdw11=sdlba >> 32, cdw12=cdw12,
                      cdw3=ref >> 32 & 0xFFFF, cdw14=ref & 0xFFFFFFFF, cdw15=app | mask << 16, buf=buf,
                      length=max(len(raw), 1))
    finally:
        drv.machine.free(buf)


def set_cdfe(drv: NvmeDriver, cdfe: int, *, check: bool = True) -> Completion:
    """Set Features Host Behavior Support with CDFE (bytes 5:4) = ``cdfe``, the rest 0."""
    data = bytes(4) + struct.pack("<H", cdfe) + bytes(506)
    return drv.admin(0x09, cdw10=HBS, data=data, check=check)


def _formatted(drv: NvmeDriver, lbaf: int, pi: int = 0) -> None:
    drv.admin(FORMAT_NVM, nsid=1, cdw10=lbaf | pi << 5)
    drv.scan_namespaces()


def _copy_with_pi(drv: NvmeDriver, desfmt: int) -> None:
    """Namespace 1 as 512+16 bytes with type 1 PI and the 64b Guard: two blocks written with
    PRACT, copied with every PRINFOR check and PRACT, read back PI-checked."""
    _formatted(drv, 4, pi=1)
    try:
        data = os.urandom(1024)
        comp, _d, _m = drv.io_md(WRITE, 1, 4, 2, data=data, prinfo=PRACT, ref=4, app=0x77)
        assert comp.ok, hex(comp.status)
        entry = f1(4, 2, 4, 0x77, 0xFFFF) if desfmt == 1 else f3(1, 4, 2, 4, 0x77, 0xFFFF)
        comp = copy(drv, 1, 40, [entry], desfmt, prinfor=ALL | PRACT, prinfow=PRACT, ref=40, app=0x77)
        assert comp.ok, hex(comp.status)
        comp, back, _m = drv.io_md(READ, 1, 40, 2, data_len=1024, meta_len=32, prinfo=ALL, ref=40, app=0x77)
        assert comp.ok and back == data, hex(comp.status)
    finally:
        _formatted(drv, 0)


def _ocfs1(drv: NvmeDriver) -> None:  # OCFS bit 1: format 1h (64b Guard: 48-bit reference tags)
    _copy_with_pi(drv, 1)


def _ocfs2(drv: NvmeDriver) -> None:  # OCFS bit 2: format 2h once CDFE enables it (SNSID 1, within namespace 1)
    bs = drv.lba_size(1)
    data = os.urandom(bs)
    drv.write(1, slba=50, data=data)
    set_cdfe(drv, 1 << 2)
    try:
        comp = copy(drv, 1, 51, [f2(1, 50, 1)], 2)
        assert comp.ok, hex(comp.status)
    finally:
        set_cdfe(drv, 0)
    assert drv.read(1, slba=51, nlb=1) == data


def _ocfs3(drv: NvmeDriver) -> None:  # OCFS bit 3: format 3h (64b Guard, source namespaces) once CDFE enables it
    set_cdfe(drv, 1 << 3)
    try:
        _copy_with_pi(drv, 3)
    finally:
        set_cdfe(drv, 0)


COPY_EXERCISERS: dict[tuple[str, int], Callable[[NvmeDriver], None]] = {
    ("ocfs", 1): _ocfs1, ("ocfs", 2): _ocfs2, ("ocfs", 3): _ocfs3,
}

#: the exercisers that format namespace 1 (a secondary controller cannot)
COPY_FORMATTING = {("ocfs", 1), ("ocfs", 3)}
