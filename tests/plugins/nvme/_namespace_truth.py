"""What each namespace's Identify Namespace says, exercised in the namespace's own format
(``test_identify_truth.test_every_namespace_does_what_it_says``): the current LBA format
(FLBAS, LBAF: data and metadata size, extended LBAs or a separate buffer), the protection
settings (DPS: type, PI first or last, 16b or 64b Guard) and what MC and DPC allow for
them, with protected I/O through the host driver -- and, when the controller has a
Controller Memory Buffer, with the data and metadata in it.

Unlike the exercisers of ``_protection_exercisers`` nothing is formatted: the namespaces
keep the format they were configured with (a ``file`` image with PI, a ``mem`` one, ...),
so a feature that breaks another in one controller shows here.
"""

from __future__ import annotations

import os
import struct

from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

__all__ = ["check_namespace", "check_namespace_via_cmb"]

READ, WRITE = 0x02, 0x01
PRACT = 8
#: LBA formats whose PI has the 64b Guard (16 bytes): ELBAF's PIF 10b
_PIF_64B = 2


def _u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def _format(drv: NvmeDriver, nsid: int) -> tuple[int, int, int, int, bool, int]:
    """(lba size, metadata size, PI type, PI size, PI first, extended) from Identify."""
    idns = drv.identify(0x00, nsid=nsid)
    flbas, mc, dpc, dps = idns[26], idns[27], idns[28], idns[29]
    lbaf = (flbas & 0xF) | (flbas >> 5 & 3) << 4
    entry = _u32(idns, 128 + 4 * lbaf)
    lbs, ms = 1 << (entry >> 16 & 0xFF), entry & 0xFFFF
    extended = bool(flbas & 0x10)
    pi, pil = dps & 7, bool(dps & 8)
    elbaf = _u32(drv.identify(0x05, nsid=nsid, csi=0), 12 + 4 * lbaf)  # CNS 05h: ELBAF
    pis = 16 if elbaf >> 7 & 3 == _PIF_64B else 8
    if ms:
        assert mc & (1 if extended else 2), f"namespace {nsid}: MC does not allow its own metadata setting"
    if pi:
        assert ms >= pis, f"namespace {nsid}: PI type {pi} in {ms} bytes of metadata"
        assert dpc >> (pi - 1) & 1, f"namespace {nsid}: DPC does not allow its own PI type {pi}"
        assert dpc >> (3 if pil else 4) & 1, f"namespace {nsid}: DPC does not allow its PI location"
    info = drv.namespaces[nsid]
    assert (info.lba_size, info.ms, info.pi, info.pil, info.extended) == (lbs, ms, pi, pil, extended)
    return lbs, ms, pi, pis, pil, extended


def check_namespace(drv: NvmeDriver, nsid: int, slba: int = 100) -> None:
    """Write two blocks with PRACT (the controller generates the PI), read them back with
    every check the PI type allows, then a wrong reference tag (types 1, 2) and a wrong
    application tag are caught with the spec's status."""
    lbs, ms, pi, pis, _pil, extended = _format(drv, nsid)
    nlb = 2
    data = os.urandom(nlb * lbs)
    checks = 0 if not pi else (7 if pi != 3 else 6)
    prinfo = PRACT if pi else 0
    if extended:
        # with PRACT and metadata that is only the PI, the buffer holds the data alone
        alone = pi and ms == pis
        host = data if alone else b"".join(data[i * lbs:(i + 1) * lbs] + bytes(ms) for i in range(nlb))
        comp, _d, _m = drv.io_md(WRITE, nsid, slba, nlb, data=host, prinfo=prinfo, ref=slba, app=0x4242)
        assert comp.ok, (nsid, hex(comp.status))
        comp, buf, _m = drv.io_md(READ, nsid, slba, nlb, data_len=nlb * (lbs + ms), prinfo=checks, ref=slba,
                                  app=0x4242)
        assert comp.ok, (nsid, hex(comp.status))
        assert b"".join(buf[i * (lbs + ms):i * (lbs + ms) + lbs] for i in range(nlb)) == data
    else:
        comp, _d, _m = drv.io_md(WRITE, nsid, slba, nlb, data=data, meta=bytes(nlb * ms), prinfo=prinfo, ref=slba,
                                 app=0x4242)
        assert comp.ok, (nsid, hex(comp.status))
        comp, back, _m = drv.io_md(READ, nsid, slba, nlb, data_len=nlb * lbs, meta_len=nlb * ms, prinfo=checks,
                                   ref=slba, app=0x4242)
        assert comp.ok and back == data, (nsid, hex(comp.status))
    if not pi:
        return
    dlen = nlb * (lbs + ms) if extended else nlb * lbs
    mlen = 0 if extended else nlb * ms
    if pi != 3:
        comp, _d, _m = drv.io_md(READ, nsid, slba, nlb, data_len=dlen, meta_len=mlen, prinfo=1, ref=slba + 7,
                                 app=0x4242)
        # type 1: the reference tag is the LBA, an ILBRT that is not is refused; type 2: it is
        # whatever the write gave, a read expecting another fails the check
        expect = Status.INVALID_PROT_INFO if pi == 1 else Status.REF_TAG_CHECK
        assert comp.code == expect, (nsid, hex(comp.status))
    comp, _d, _m = drv.io_md(READ, nsid, slba, nlb, data_len=dlen, meta_len=mlen, prinfo=2, ref=slba, app=0x4243)
    assert comp.code == Status.APP_TAG_CHECK, (nsid, hex(comp.status))


def check_namespace_via_cmb(drv: NvmeDriver, nsid: int, slba: int = 200) -> None:
    """A protected Write from data (and a separate metadata buffer) in the Controller
    Memory Buffer, read back with every check into the CMB and into host memory."""
    lbs, ms, pi, pis, _pil, extended = _format(drv, nsid)
    if drv.cmb is None:
        drv.cmb_enable()
    per = lbs + ms if extended and not (pi and ms == pis) else lbs
    data = os.urandom(lbs)
    host = data + bytes(per - lbs)
    dbuf, mbuf = drv.cmb_alloc(8192), drv.cmb_alloc(4096)
    drv.cmb_write(dbuf, host)
    drv.cmb_write(mbuf, bytes(max(ms, 8)))
    prinfo = PRACT if pi else 0
    mptr = mbuf if ms and not extended else 0
    comp = drv.io(1, WRITE, nsid=nsid, cdw10=slba, cdw12=prinfo << 26, prp1=dbuf, mptr=mptr, cdw14=slba,
                  cdw15=0x4242, check=False)
    assert comp.ok, (nsid, hex(comp.status))
    checks = 0 if not pi else (7 if pi != 3 else 6)
    drv.cmb_write(dbuf, bytes(lbs + ms))
    comp = drv.io(1, READ, nsid=nsid, cdw10=slba, cdw12=checks << 26, prp1=dbuf, mptr=mptr, cdw14=slba,
                  cdw15=0xFFFF << 16 | 0x4242, check=False)
    assert comp.ok, (nsid, hex(comp.status))
    assert drv.cmb_read(dbuf, lbs) == data
    dlen = lbs + ms if extended else lbs
    comp, buf, _m = drv.io_md(READ, nsid, slba, 1, data_len=dlen, meta_len=0 if extended else ms,
                              prinfo=checks, ref=slba, app=0x4242)
    assert comp.ok and buf[:lbs] == data, (nsid, hex(comp.status))
