"""Metadata and protection information on the I/O commands, end to end through the
software host: extended LBAs and separate metadata buffers (MPTR, metadata SGL), PI types
1, 2 and 3 with the 16b and 64b Guard, first or last in the metadata, PRACT and every
PRCHK check with its status, the escape values, Write Zeroes, Dataset Management,
Compare, Verify, Copy, Format NVM and the Identify fields that describe it all.

The expected PI is computed here from the spec (big-endian Guard / Application Tag /
Reference Tag, the Guard over the data and the metadata before the PI) with the
pure-Python CRCs, independently of the controller's code path."""

from __future__ import annotations

import os
import struct
import threading
import time

import pytest
from _helpers import error_entries, expect_status, make_env
from _protection_exercisers import PROTECTION_EXERCISERS

from pcidev import native
from pcidev_nvme.namespace import LBAF_TABLE
from pcidev_nvme.protected_io import RangeLocks
from pcidev_nvme.prp import SGL_DATA_BLOCK, sgl_descriptor
from pcidev_nvme.status import Status

READ, WRITE, COMPARE, WRITE_ZEROES, DSM, VERIFY, COPY = 0x02, 0x01, 0x05, 0x08, 0x09, 0x0C, 0x19
PRACT, GUARD, APP, REF = 8, 4, 2, 1
ALL = GUARD | APP | REF
FORMAT_NVM = 0x80


def pi_size(lbaf: int) -> int:
    return 16 if LBAF_TABLE[lbaf].pif == 2 else 8


def expected_pi(lbaf: int, data: bytes, meta_before: bytes, app: int, ref: int) -> bytes:
    """The PI of one block as the spec defines it."""
    if pi_size(lbaf) == 16:
        guard = native.py_crc64_nvme(meta_before, native.py_crc64_nvme(data)) if meta_before else \
            native.py_crc64_nvme(data)
        return guard.to_bytes(8, "big") + app.to_bytes(2, "big") + (ref & 0xFFFF_FFFF_FFFF).to_bytes(6, "big")
    guard = native.py_crc16_t10dif(meta_before, native.py_crc16_t10dif(data)) if meta_before else \
        native.py_crc16_t10dif(data)
    return guard.to_bytes(2, "big") + app.to_bytes(2, "big") + (ref & 0xFFFF_FFFF).to_bytes(4, "big")


class Layout:
    """How one namespace lays out data, metadata and PI."""

    def __init__(self, lbaf: int, pi: int, pil: int, mset: int) -> None:
        f = LBAF_TABLE[lbaf]
        self.lbaf, self.pi, self.pil, self.mset = lbaf, pi, pil, mset
        self.lbs, self.ms = f.size, f.ms
        self.pis = pi_size(lbaf)
        self.off = 0 if pil else self.ms - self.pis

    def with_pi(self, data: bytes, meta: bytes, nlb: int, app: int, ref: int, *, step: int = 1) -> bytes:
        """``meta`` with each block's PI replaced by the correct one."""
        out = bytearray(meta)
        for i in range(nlb):
            m = i * self.ms
            before = bytes(out[m:m + self.off]) if not self.pil else b""
            out[m + self.off:m + self.off + self.pis] = expected_pi(
                self.lbaf, data[i * self.lbs:(i + 1) * self.lbs], before, app, ref + i * step)
        return bytes(out)

    def pi_of(self, meta: bytes, i: int) -> bytes:
        return meta[i * self.ms + self.off:i * self.ms + self.off + self.pis]

    def host(self, data: bytes, meta: bytes, nlb: int) -> tuple[bytes, bytes]:
        """(data buffer, metadata buffer) as the host passes them."""
        if not self.mset:
            return data, meta
        out = b"".join(data[i * self.lbs:(i + 1) * self.lbs] + meta[i * self.ms:(i + 1) * self.ms]
                       for i in range(nlb))
        return out, b""

    def split(self, buf: bytes, mbuf: bytes, nlb: int) -> tuple[bytes, bytes]:
        if not self.mset:
            return buf, mbuf
        step = self.lbs + self.ms
        return (b"".join(buf[i * step:i * step + self.lbs] for i in range(nlb)),
                b"".join(buf[i * step + self.lbs:(i + 1) * step] for i in range(nlb)))


def make(nvme_env, lbaf: int, pi: int, pil: int = 0, mset: int = 0, kind: str = "mem", tmp_path=None):
    if kind == "mem":
        spec = f"mem:size=1M,lbaf={lbaf},pi={pi},pil={pil},mset={mset}"
    else:
        spec = f"file:path={tmp_path}/pi.img,size=1M,lbaf={lbaf},pi={pi},pil={pil},mset={mset}"
    env = nvme_env(f"ns={spec}")
    return env, env.drv, Layout(lbaf, pi, pil, mset)


def rw(drv, lay: Layout, opcode: int, slba: int, nlb: int, data: bytes = b"", meta: bytes = b"", **kw):
    """A command carrying data and metadata the way the namespace wants them."""
    strip = kw.get("prinfo", 0) & PRACT and lay.ms == lay.pis and lay.pi
    if opcode in (READ, VERIFY):
        dlen = nlb * lay.lbs + (nlb * lay.ms if lay.mset and not strip else 0)
        if opcode == VERIFY:
            dlen = 0
        mlen = 0 if lay.mset or strip or opcode == VERIFY else nlb * lay.ms
        comp, buf, mbuf = drv.io_md(opcode, 1, slba, nlb, data_len=dlen, meta_len=mlen, **kw)
        if strip:
            return comp, buf, b""
        if opcode == VERIFY:
            return comp, b"", b""
        d, m = lay.split(buf, mbuf, nlb)
        return comp, d, m
    if strip:
        comp, _b, _m = drv.io_md(opcode, 1, slba, nlb, data=data, **kw)
    else:
        hd, hm = lay.host(data, meta, nlb)
        comp, _b, _m = drv.io_md(opcode, 1, slba, nlb, data=hd, meta=hm or None, **kw)
    return comp, b"", b""


COMBOS = [(lbaf, pi, pil, mset) for lbaf in (2, 3, 4, 5, 6, 8) for pi in (1, 2, 3) for pil in (0, 1)
          for mset in (0, 1)]


@pytest.mark.parametrize(("lbaf", "pi", "pil", "mset"), COMBOS,
                         ids=[f"lbaf{a}-type{b}-{'first' if c else 'last'}-{'ext' if d else 'sep'}"
                              for a, b, c, d in COMBOS])
def test_pract_write_then_checked_read(nvme_env, lbaf, pi, pil, mset):
    _env, drv, lay = make(nvme_env, lbaf, pi, pil, mset)
    nlb, slba = 3, 5
    ref = slba if pi == 1 else 0xABC000 + 7
    data = os.urandom(nlb * lay.lbs)
    meta = os.urandom(nlb * lay.ms)  # (only travels when it is larger than the PI)
    comp, _, _ = rw(drv, lay, WRITE, slba, nlb, data, meta, prinfo=PRACT, ref=ref, app=0x1234)
    assert comp.code == 0
    checks = GUARD | APP | (0 if pi == 3 else REF)
    comp, d, m = rw(drv, lay, READ, slba, nlb, prinfo=checks, ref=ref, app=0x1234)
    assert comp.code == 0
    assert d == data
    step = 0 if pi == 3 else 1
    if lay.ms > lay.pis:  # the rest of the metadata is what the host sent; the PI was inserted
        want = lay.with_pi(data, meta, nlb, 0x1234, ref, step=step)
    else:
        want = lay.with_pi(data, bytes(nlb * lay.ms), nlb, 0x1234, ref, step=step)
    assert m == want
    # PRACT on the read: checked, and stripped when the metadata is only the PI
    comp, d, m = rw(drv, lay, READ, slba, nlb, prinfo=PRACT | checks, ref=ref, app=0x1234)
    assert comp.code == 0 and d == data
    assert m == (b"" if lay.ms == lay.pis else want)
    # Verify checks the same without moving anything
    comp, _, _ = rw(drv, lay, VERIFY, slba, nlb, prinfo=checks, ref=ref, app=0x1234)
    assert comp.code == 0


@pytest.mark.parametrize("lbaf", [2, 4, 6, 8])
@pytest.mark.parametrize("pi", [1, 2])
def test_host_supplied_pi_is_checked_on_write(nvme_env, lbaf, pi):
    _env, drv, lay = make(nvme_env, lbaf, pi)
    nlb, slba = 4, 16
    ref = slba if pi == 1 else 0x77
    data = os.urandom(nlb * lay.lbs)
    good = lay.with_pi(data, os.urandom(nlb * lay.ms), nlb, 0x00AA, ref)
    assert rw(drv, lay, WRITE, slba, nlb, data, good, prinfo=ALL, ref=ref, app=0x00AA)[0].code == 0
    comp, d, m = rw(drv, lay, READ, slba, nlb, prinfo=ALL, ref=ref, app=0x00AA)
    assert (comp.code, d, m) == (0, data, good)

    other = os.urandom(nlb * lay.lbs)
    for field, status in ((0, Status.GUARD_CHECK), (1, Status.APP_TAG_CHECK), (2, Status.REF_TAG_CHECK)):
        bad = bytearray(lay.with_pi(other, os.urandom(nlb * lay.ms), nlb, 0x00AA, ref))
        at = 2 * lay.ms + lay.off + {0: 0, 1: lay.pis // 2 - (2 if lay.pis == 16 else 0), 2: lay.pis - 1}[field]
        if lay.pis == 16 and field == 1:
            at = 2 * lay.ms + lay.off + 8
        elif lay.pis == 8 and field == 1:
            at = 2 * lay.ms + lay.off + 2
        bad[at] ^= 0x01
        comp = rw(drv, lay, WRITE, slba, nlb, other, bytes(bad), prinfo=ALL, ref=ref, app=0x00AA)[0]
        assert comp.code == status, field
        assert error_entries(drv.device)[0]["lba"] == slba + 2
        # nothing was stored: the blocks hold the first write
        comp, d, m = rw(drv, lay, READ, slba, nlb, prinfo=ALL, ref=ref, app=0x00AA)
        assert (comp.code, d, m) == (0, data, good)
    # the same bad PI is accepted when the check is off
    bad = bytearray(good)
    bad[lay.off] ^= 0xFF  # block 0's Guard
    assert rw(drv, lay, WRITE, slba, nlb, data, bytes(bad), prinfo=APP | REF, ref=ref, app=0x00AA)[0].code == 0
    assert rw(drv, lay, READ, slba, nlb, prinfo=GUARD, ref=ref)[0].code == Status.GUARD_CHECK
    assert rw(drv, lay, VERIFY, slba, nlb, prinfo=GUARD, ref=ref)[0].code == Status.GUARD_CHECK
    assert rw(drv, lay, READ, slba, nlb, prinfo=APP | REF, ref=ref, app=0x00AA)[0].code == 0


def test_application_tag_mask(nvme_env):
    _env, drv, lay = make(nvme_env, 2, 1)
    data = os.urandom(512)
    assert rw(drv, lay, WRITE, 0, 1, data, prinfo=PRACT, ref=0, app=0x12AB)[0].code == 0
    assert rw(drv, lay, READ, 0, 1, prinfo=APP, app=0x99AB, app_mask=0x00FF)[0].code == 0
    assert rw(drv, lay, READ, 0, 1, prinfo=APP, app=0x99AB, app_mask=0xFF00)[0].code == Status.APP_TAG_CHECK
    assert rw(drv, lay, READ, 0, 1, prinfo=APP, app=0x99AB, app_mask=0)[0].code == 0


def test_reference_tag_rules_per_type(nvme_env):
    # type 1: ILBRT must be the SLBA's low bits when the reference tag is checked
    _env, drv, lay = make(nvme_env, 2, 1)
    assert rw(drv, lay, WRITE, 9, 1, os.urandom(512), prinfo=PRACT | REF, ref=8)[0].code == Status.INVALID_PROT_INFO
    assert rw(drv, lay, READ, 9, 1, prinfo=REF, ref=8)[0].code == Status.INVALID_PROT_INFO
    assert rw(drv, lay, WRITE, 9, 2, os.urandom(1024), prinfo=PRACT, ref=9)[0].code == 0
    assert rw(drv, lay, READ, 9, 2, prinfo=REF, ref=9)[0].code == 0
    assert rw(drv, lay, READ, 10, 1, prinfo=REF, ref=10)[0].code == 0  # incremented per block
    # type 2: any initial tag, incremented per block
    _env, drv, lay = make(nvme_env, 3, 2)
    assert rw(drv, lay, WRITE, 4, 3, os.urandom(3 * 4096), prinfo=PRACT, ref=0xFFFFFFFE)[0].code == 0
    assert rw(drv, lay, READ, 4, 3, prinfo=REF, ref=0xFFFFFFFE)[0].code == 0  # wraps to 0
    assert rw(drv, lay, READ, 5, 1, prinfo=REF, ref=0xFFFFFFFF)[0].code == 0
    assert rw(drv, lay, READ, 5, 1, prinfo=REF, ref=0xFFFFFFFE)[0].code == Status.REF_TAG_CHECK
    _c, _d, m = rw(drv, lay, READ, 4, 3)
    assert [int.from_bytes(lay.pi_of(m, i)[4:], "big") for i in range(3)] == [0xFFFFFFFE, 0xFFFFFFFF, 0]
    # type 3: no reference tag to check; PRACT writes the ILBRT unchanged
    _env, drv, lay = make(nvme_env, 5, 3)
    assert rw(drv, lay, READ, 0, 1, prinfo=REF)[0].code == Status.INVALID_PROT_INFO
    ref48 = 0x1234_5678_9ABC
    assert rw(drv, lay, WRITE, 0, 2, os.urandom(8192), prinfo=PRACT, ref=ref48, app=5)[0].code == 0
    _c, _d, m = rw(drv, lay, READ, 0, 2, prinfo=GUARD | APP, app=5)
    assert _c.code == 0
    assert [int.from_bytes(lay.pi_of(m, i)[10:], "big") for i in range(2)] == [ref48, ref48]


def test_48_bit_reference_tags_use_cdw3(nvme_env):
    _env, drv, lay = make(nvme_env, 4, 2)  # 512+16, 64b Guard
    ref = 0xBEEF_0000_0001
    data = os.urandom(2 * 512)
    assert rw(drv, lay, WRITE, 0, 2, data, prinfo=PRACT, ref=ref)[0].code == 0
    assert rw(drv, lay, READ, 0, 2, prinfo=ALL, ref=ref)[0].code == 0
    assert rw(drv, lay, READ, 0, 2, prinfo=ALL, ref=ref & 0xFFFFFFFF)[0].code == Status.REF_TAG_CHECK
    _c, _d, m = rw(drv, lay, READ, 0, 2)
    assert m == lay.with_pi(data, bytes(32), 2, 0, ref)


def test_escape_values(nvme_env):
    # types 1 and 2: Application Tag FFFFh disables every check of the block
    _env, drv, lay = make(nvme_env, 2, 1)
    data = os.urandom(512)
    junk = bytes.fromhex("0000ffff00000000")  # wrong Guard, wrong Reference Tag, escape
    assert rw(drv, lay, WRITE, 3, 1, data, junk, prinfo=ALL, ref=3)[0].code == 0
    assert rw(drv, lay, READ, 3, 1, prinfo=ALL, ref=3)[0].code == 0
    # type 3: only Application Tag FFFFh with Reference Tag all ones
    _env, drv, lay = make(nvme_env, 2, 3)
    assert rw(drv, lay, WRITE, 3, 1, data, bytes.fromhex("0000ffffffffffff"), prinfo=GUARD | APP)[0].code == 0
    comp = rw(drv, lay, WRITE, 3, 1, data, bytes.fromhex("0000ffff00000000"), prinfo=GUARD | APP)[0]
    assert comp.code == Status.GUARD_CHECK


@pytest.mark.parametrize("lbaf", [2, 5])
def test_blocks_never_written_read_as_escaped(nvme_env, lbaf):
    _env, drv, lay = make(nvme_env, lbaf, 1)
    comp, d, m = rw(drv, lay, READ, 40, 2, prinfo=ALL, ref=40, app=7)
    assert comp.code == 0
    assert d == bytes(2 * lay.lbs)
    assert m == b"\xff" * (2 * lay.ms)  # PI all ones (DLFEAT bit 4 cleared: Guard FFFFh)


def test_write_zeroes_and_deallocate(nvme_env):
    _env, drv, lay = make(nvme_env, 6, 1, pil=1)  # 512+64, PI first
    data = os.urandom(4 * 512)
    assert rw(drv, lay, WRITE, 8, 4, data, os.urandom(4 * 64), prinfo=PRACT, ref=8, app=1)[0].code == 0
    # Write Zeroes with PRACT: valid PI over the zeroes
    drv.io(1, WRITE_ZEROES, nsid=1, cdw10=8, cdw12=1 | PRACT << 26, cdw14=8, cdw15=0x42)
    comp, d, m = rw(drv, lay, READ, 8, 2, prinfo=ALL, ref=8, app=0x42)
    assert comp.code == 0 and d == bytes(1024)
    assert m == lay.with_pi(bytes(1024), bytes(128), 2, 0x42, 8)
    # without PRACT the metadata reads as never written
    drv.io(1, WRITE_ZEROES, nsid=1, cdw10=10, cdw12=0)
    comp, d, m = rw(drv, lay, READ, 10, 1, prinfo=ALL, ref=10, app=0x42)
    assert comp.code == 0 and m == b"\xff" * 8 + bytes(56)
    # Dataset Management deallocation forgets the metadata too
    rng = drv.machine.alloc(4096)
    try:
        drv.mem.write(rng, struct.pack("<IIQ", 0, 1, 11))
        drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, buf=rng, length=16)
    finally:
        drv.machine.free(rng)
    comp, d, m = rw(drv, lay, READ, 11, 1, prinfo=ALL, ref=11)
    assert comp.code == 0 and d == bytes(512) and m == b"\xff" * 8 + bytes(56)


def test_compare_with_metadata(nvme_env):
    _env, drv, lay = make(nvme_env, 6, 2)  # 512+64: metadata travels with PRACT too
    data = os.urandom(2 * 512)
    meta = lay.with_pi(data, os.urandom(128), 2, 3, 100)
    assert rw(drv, lay, WRITE, 0, 2, data, meta, prinfo=ALL, ref=100, app=3)[0].code == 0
    assert rw(drv, lay, COMPARE, 0, 2, data, meta, prinfo=ALL, ref=100, app=3)[0].code == 0
    other = bytearray(meta)
    other[64 + 5] ^= 1  # block 1's metadata (not its PI) differs
    comp = rw(drv, lay, COMPARE, 0, 2, data, bytes(other), prinfo=ALL, ref=100, app=3)[0]
    assert comp.code == Status.COMPARE_FAILURE
    assert error_entries(drv.device)[0]["lba"] == 1
    assert rw(drv, lay, COMPARE, 0, 2, data, meta, prinfo=APP, ref=100, app=4)[0].code == Status.APP_TAG_CHECK


def test_copy_moves_metadata_and_remaps_pi(nvme_env):
    _env, drv, lay = make(nvme_env, 2, 1)
    data = os.urandom(4 * 512)
    assert rw(drv, lay, WRITE, 0, 4, data, prinfo=PRACT, ref=0, app=9)[0].code == 0
    desc = drv.machine.alloc(4096)
    try:
        # one range: LBAs 1..2 (EILBRT 1, ELBAT 9, ELBATM FFFFh), read checks all; write with PRACT at 20
        # (PRINFOR.PRACT and PRINFOW.PRACT must be equal)
        drv.mem.write(desc, struct.pack("<8xQH6xIHH", 1, 1, 1, 9, 0xFFFF))
        drv.io(1, COPY, nsid=1, cdw10=20, cdw12=0 | ((ALL | PRACT) << 12) | (PRACT << 26), cdw14=20, cdw15=9,
               buf=desc, length=32)
        comp, d, m = rw(drv, lay, READ, 20, 2, prinfo=ALL, ref=20, app=9)
        assert comp.code == 0 and d == data[512:1536]
        # a source whose PI fails the read check is not copied
        drv.mem.write(desc, struct.pack("<8xQH6xIHH", 1, 1, 1, 8, 0xFFFF))
        comp = drv.io(1, COPY, nsid=1, check=False, cdw10=30, cdw12=0 | ((APP | PRACT) << 12) | (PRACT << 26),
                      cdw14=30, buf=desc, length=32)
        assert comp.code == Status.APP_TAG_CHECK
        # without PRACT on the write side the source PI is checked against the destination's tags
        drv.mem.write(desc, struct.pack("<8xQH6xIHH", 1, 0, 1, 9, 0xFFFF))
        comp = drv.io(1, COPY, nsid=1, check=False, cdw10=30, cdw12=0 | (REF << 26), cdw14=30, buf=desc,
                      length=32)
        assert comp.code == Status.REF_TAG_CHECK
    finally:
        drv.machine.free(desc)


def test_separate_metadata_with_sgls(nvme_env):
    _env, drv, lay = make(nvme_env, 3, 1)  # 4096+8, separate buffer
    data = os.urandom(2 * 4096)
    meta = lay.with_pi(data, bytes(16), 2, 1, 6)
    # data SGL, MPTR a plain address (PSDT 01b)
    assert drv.io_md(WRITE, 1, 6, 2, data=data, meta=meta, prinfo=ALL, ref=6, app=1, sgl=True)[0].code == 0
    # data and metadata SGLs (PSDT 10b: MPTR names an SGL Data Block descriptor)
    comp, d, m = drv.io_md(READ, 1, 6, 2, data_len=8192, meta_len=16, prinfo=ALL, ref=6, app=1, meta_sgl=True)
    assert (comp.code, d, m) == (0, data, meta)
    assert drv.io_md(WRITE, 1, 6, 2, data=data, meta=meta, meta_sgl=True, prinfo=ALL, ref=6, app=1)[0].code == 0
    # a metadata SGL describing fewer bytes than the metadata
    mbuf = drv.machine.alloc(4096)
    desc = drv.machine.alloc(4096)
    dbuf = drv.machine.alloc(8192)
    try:
        drv.mem.write(desc, sgl_descriptor(mbuf, 8, SGL_DATA_BLOCK))
        # is Metadata SGL Length Invalid (not the data's status), located at MPTR (SQE byte 16)
        expect_status(drv, Status.MD_SGL_LEN_INVALID, READ, qid=1, param=16, nsid=1, cdw10=6, cdw12=1,
                      flags=0x80, prp1=dbuf, prp2=8192, mptr=desc)
        expect_status(drv, Status.MD_SGL_LEN_INVALID, WRITE, qid=1, param=16, nsid=1, cdw10=6, cdw12=1,
                      flags=0x80, prp1=dbuf, prp2=8192, mptr=desc)
        # a data SGL of the wrong length keeps the data's status and location
        drv.mem.write(desc, sgl_descriptor(mbuf, 16, SGL_DATA_BLOCK))
        expect_status(drv, Status.DATA_SGL_LEN_INVALID, READ, qid=1, param=24, nsid=1, cdw10=6, cdw12=1,
                      flags=0x80, prp1=dbuf, prp2=4096, mptr=desc)
        # the metadata pointer outside guest memory: Data Transfer Error at MPTR, read or write
        for opcode in (READ, WRITE):
            expect_status(drv, Status.DATA_TRANSFER_ERROR, opcode, qid=1, param=16, nsid=1, cdw10=6, cdw12=1,
                          buf=dbuf, length=8192, mptr=1 << 50)
        # a metadata SGL descriptor naming memory outside the guest
        drv.mem.write(desc, sgl_descriptor(1 << 50, 16, SGL_DATA_BLOCK))
        for opcode in (READ, WRITE):
            expect_status(drv, Status.DATA_TRANSFER_ERROR, opcode, qid=1, param=16, nsid=1, cdw10=6, cdw12=1,
                          flags=0x80, prp1=dbuf, prp2=8192, mptr=desc)
    finally:
        for a in (mbuf, desc, dbuf):
            drv.machine.free(a)


def test_metadata_without_pi(nvme_env):
    _env, drv, lay = make(nvme_env, 7, 0, mset=1)  # 4096+64, extended, no PI
    data = os.urandom(2 * 4096)
    meta = os.urandom(128)
    assert rw(drv, lay, WRITE, 1, 2, data, meta, prinfo=ALL | PRACT)[0].code == 0  # PRINFO ignored
    comp, d, m = rw(drv, lay, READ, 1, 2)
    assert (comp.code, d, m) == (0, data, meta)
    comp, d, m = rw(drv, lay, READ, 3, 1)
    assert m == bytes(64)  # never written: zeros


def test_identify_reports_the_format(nvme_env):
    _env, drv, _lay = make(nvme_env, 6, 2, pil=1, mset=1)
    idns = drv.identify(0x00, nsid=1)
    assert idns[26] == 6 | 0x10  # FLBAS: format 6, extended LBAs
    assert idns[27] == 0x3 and idns[28] == 0x1F
    assert idns[29] == 2 | 0x8  # DPS: type 2, PI first
    assert struct.unpack_from("<I", idns, 128 + 4 * 6)[0] & 0xFFFF == 64
    nvm = drv.identify(0x05, nsid=1, csi=0)
    assert [struct.unpack_from("<I", nvm, 12 + 4 * i)[0] >> 7 & 3 for i in range(9)] == [0, 0, 0, 0, 2, 2, 0, 0, 2]
    info = drv.namespaces[1]
    assert (info.ms, info.extended, info.pi, info.pil) == (64, True, 2, True)
    ctrl_id = drv.identify(0x01)
    assert struct.unpack_from("<I", ctrl_id, 536)[0] & (1 << 19)  # MSDS: metadata SGLs
    assert struct.unpack_from("<I", ctrl_id, 96)[0] & (1 << 15)  # CTRATT ELBAS: CNS 05h has ELBAF


@pytest.mark.parametrize("kind", ["mem", "file"])
def test_format_nvm_to_pi_and_back(nvme_env, tmp_path, kind):
    spec = "mem:size=1M" if kind == "mem" else f"file:path={tmp_path}/f.img,size=1M"
    env = nvme_env(f"ns={spec}")
    drv = env.drv
    drv.write(1, 0, os.urandom(512))
    # LBAF 5 (4096+16, 64b Guard), MSET 1, PI type 1, PIL first
    drv.admin(FORMAT_NVM, nsid=1, cdw10=5 | 1 << 4 | 1 << 5 | 1 << 8)
    drv.scan_namespaces()
    info = drv.namespaces[1]
    assert (info.lba_size, info.ms, info.extended, info.pi, info.pil) == (4096, 16, True, 1, True)
    if kind == "file":
        assert os.path.exists(f"{tmp_path}/f.img.nvme-meta")
    lay = Layout(5, 1, 1, 1)
    data = os.urandom(4096)
    assert rw(drv, lay, WRITE, 2, 1, data, prinfo=PRACT, ref=2)[0].code == 0
    comp, d, m = rw(drv, lay, READ, 2, 1, prinfo=ALL, ref=2)
    assert comp.code == 0 and d == data
    assert rw(drv, lay, READ, 0, 1, prinfo=ALL, ref=0)[0].code == 0  # erased: escaped
    # combinations the format refuses
    for cdw10 in (0 | 1 << 5, 2 | 4 << 5, 15):  # PI without metadata, PI type 4, an unknown format
        assert drv.admin(FORMAT_NVM, nsid=1, cdw10=cdw10, check=False).code == Status.INVALID_FORMAT
    drv.admin(FORMAT_NVM, nsid=1, cdw10=0)
    drv.scan_namespaces()
    assert (drv.namespaces[1].ms, drv.namespaces[1].pi) == (0, 0)
    assert drv.read(1, 0, 1) == bytes(512)
    if kind == "file":
        assert not os.path.exists(f"{tmp_path}/f.img.nvme-meta")


def test_file_namespace_keeps_metadata_and_setting_across_restarts(nvme_env, tmp_path):
    env = make_env(f"ns=file:path={tmp_path}/p.img,size=1M,lbaf=3,pi=1", aers=0)
    lay = Layout(3, 1, 0, 0)
    data = os.urandom(2 * 4096)
    try:
        assert rw(env.drv, lay, WRITE, 7, 2, data, prinfo=PRACT, ref=7, app=3)[0].code == 0
        env.drv.flush(1)
    finally:
        env.close()
    env2 = nvme_env(f"ns=file:path={tmp_path}/p.img")  # format and PI from the identity file
    assert (env2.drv.namespaces[1].ms, env2.drv.namespaces[1].pi) == (8, 1)
    comp, d, m = rw(env2.drv, lay, READ, 7, 2, prinfo=ALL, ref=7, app=3)
    assert comp.code == 0 and d == data
    assert m == lay.with_pi(data, bytes(16), 2, 3, 7)


def test_flush_reaches_the_metadata(nvme_env, tmp_path):
    env, drv, _lay = make(nvme_env, 2, 1, kind="file", tmp_path=tmp_path)
    meta = env.ctrl.allocated[1].meta
    calls = []
    real = meta.flush
    meta.flush = lambda: (calls.append(1), real())[1]
    drv.flush(1)
    drv.io(1, 0x00, nsid=0xFFFFFFFF)  # the broadcast Flush too
    assert len(calls) == 2


def test_the_identify_truth_exercisers_of_protection_pass(nvme_env):
    """test_identify_truth.py's walk takes these exercisers; each one runs here as well."""
    env = nvme_env("ns=mem:size=16M", io_queues=1)
    idc, idns = env.drv.identify(0x01), env.drv.identify(0x00, nsid=1)
    advertised = {("sgls", b) for b in range(32) if struct.unpack_from("<I", idc, 536)[0] >> b & 1}
    advertised |= {("mc", b) for b in range(8) if idns[27] >> b & 1}
    advertised |= {("dpc", b) for b in range(8) if idns[28] >> b & 1}
    assert {k for k in advertised if k[0] != "sgls" or k[1] == 19} == set(PROTECTION_EXERCISERS)
    for exercise in PROTECTION_EXERCISERS.values():
        exercise(env.drv)
    assert env.drv.namespaces[1].ms == 0  # formatted back


def test_compare_and_verify_refuse_pract(nvme_env):
    """Compare and Verify with PRACT on a PI namespace: Invalid Protection Information (the
    controller has no PI to insert or strip there). 512+64 type 1: a Compare with PRACT
    used to compare PI bytes the host never sent and fail."""
    _env, drv, lay = make(nvme_env, 6, 1)
    data = os.urandom(2 * 512)
    meta = os.urandom(2 * 64)
    assert rw(drv, lay, WRITE, 4, 2, data, meta, prinfo=PRACT, ref=4, app=7)[0].code == 0
    comp = rw(drv, lay, COMPARE, 4, 2, data, meta, prinfo=PRACT | ALL, ref=4, app=7)[0]
    assert comp.code == Status.INVALID_PROT_INFO and comp.dnr
    assert rw(drv, lay, VERIFY, 4, 2, prinfo=PRACT | GUARD, ref=4)[0].code == Status.INVALID_PROT_INFO
    # without PRACT both work on what the PRACT write stored
    _c, _d, stored = rw(drv, lay, READ, 4, 2, prinfo=ALL, ref=4, app=7)
    assert rw(drv, lay, COMPARE, 4, 2, data, stored, prinfo=ALL, ref=4, app=7)[0].code == 0
    assert rw(drv, lay, VERIFY, 4, 2, prinfo=ALL, ref=4, app=7)[0].code == 0


def test_copy_on_64b_guard_namespaces_and_unequal_pract(nvme_env):
    """Copy descriptor format 0 carries 32-bit tags: refused (Invalid Format) on a 64b Guard
    namespace, which takes format 1 (test_copy.py); PRINFOR.PRACT unlike PRINFOW.PRACT is
    Invalid Field."""
    _env, drv, lay = make(nvme_env, 4, 1)  # 512+16, 64b Guard
    data = os.urandom(2 * 512)
    assert rw(drv, lay, WRITE, 0, 2, data, prinfo=PRACT, ref=0, app=1)[0].code == 0
    desc = drv.machine.alloc(4096)
    try:
        drv.mem.write(desc, struct.pack("<8xQH6xIHH", 0, 1, 0, 1, 0xFFFF))
        expect_status(drv, Status.INVALID_FORMAT, COPY, qid=1, param=49, nsid=1, cdw10=8, cdw14=8,
                      cdw12=(PRACT << 12) | (PRACT << 26), buf=desc, length=32)
        _e2, drv2, lay2 = make(nvme_env, 2, 1)  # 512+8, 16b Guard
        assert rw(drv2, lay2, WRITE, 0, 2, data, prinfo=PRACT, ref=0, app=1)[0].code == 0
        desc2 = drv2.machine.alloc(4096)
        drv2.mem.write(desc2, struct.pack("<8xQH6xIHH", 0, 1, 0, 1, 0xFFFF))
        expect_status(drv2, Status.INVALID_FIELD, COPY, qid=1, param=49, nsid=1, cdw10=8, cdw14=8,
                      cdw12=(ALL << 12) | (PRACT << 26), buf=desc2, length=32)
        expect_status(drv2, Status.INVALID_FIELD, COPY, qid=1, param=49, nsid=1, cdw10=8, cdw14=8,
                      cdw12=(PRACT << 12), buf=desc2, length=32)
        expect_status(drv2, 0, COPY, qid=1, nsid=1, cdw10=8, cdw14=8, cdw12=((ALL | PRACT) << 12) | (PRACT << 26),
                      buf=desc2, length=32)
        comp, d, _m = rw(drv2, lay2, READ, 8, 2, prinfo=ALL, ref=8, app=0)
        assert comp.code == 0 and d == data
    finally:
        drv.machine.free(desc)


def test_discard_of_a_whole_file_namespace_punches_the_sidecar(nvme_env, tmp_path):
    """Dataset Management over every block of a file namespace with metadata: the sidecar
    gets a hole (no zeros written, no buffer of the range), the PI reads as escaped."""
    env = nvme_env(f"ns=file:path={tmp_path}/d.img,size=256M,lbaf=2,pi=1", io_queues=1)
    drv, lay = env.drv, Layout(2, 1, 0, 0)
    nlbas = (256 << 20) // 512
    data = os.urandom(64 * 512)
    for slba in (0, nlbas - 64):
        assert rw(drv, lay, WRITE, slba, 64, data, prinfo=PRACT, ref=slba & 0xFFFFFFFF)[0].code == 0
    sidecar = f"{tmp_path}/d.img.nvme-meta"
    dsm = drv.machine.alloc(4096)
    try:
        drv.mem.write(dsm, struct.pack("<IIQ", 0, nlbas, 0))
        drv.io(1, DSM, nsid=1, cdw10=0, cdw11=1 << 2, buf=dsm, length=4096)
    finally:
        drv.machine.free(dsm)
    assert os.stat(sidecar).st_blocks * 512 <= 64 << 10
    comp, d, m = rw(drv, lay, READ, nlbas - 64, 64, prinfo=ALL, ref=(nlbas - 64) & 0xFFFFFFFF)
    assert comp.code == 0 and d == bytes(len(d)) and m == b"\xff" * len(m)


def test_a_read_never_sees_new_data_under_old_pi(nvme_env, tmp_path):
    """A file namespace runs commands on the worker pool: a read of a block being written
    waits for the write's data and metadata together (it used to see the new data with
    the old PI: Guard Check Error)."""
    env = nvme_env(f"ns=file:path={tmp_path}/c.img,size=1M,lbaf=2,pi=1", io_queues=2)
    drv = env.drv
    lay = Layout(2, 1, 0, 0)
    old, new = os.urandom(512), os.urandom(512)
    assert rw(drv, lay, WRITE, 3, 1, old, prinfo=PRACT, ref=3)[0].code == 0
    store = env.ctrl.namespaces[1].meta
    entered, go = threading.Event(), threading.Event()
    real_write = store.write

    def slow_write(lba, data, *, fua=False):
        entered.set()
        go.wait(5)
        real_write(lba, data, fua=fua)

    store.write = slow_write
    wbuf, rbuf = drv.machine.alloc(4096), drv.machine.alloc(4096)
    try:
        drv.mem.write(wbuf, new)
        cid_w = drv.submit(1, WRITE, nsid=1, cdw10=3, cdw12=PRACT << 26, cdw14=3, buf=wbuf, length=512)
        assert entered.wait(5)  # the new data is stored, its PI not yet
        cid_r = drv.submit(2, READ, nsid=1, cdw10=3, cdw12=(PRACT | ALL) << 26, cdw14=3, buf=rbuf, length=512)
        time.sleep(0.3)
        go.set()
        comp_r = drv.wait_for(2, cid_r)
        assert drv.wait_for(1, cid_w).ok
        assert comp_r.ok, f"status {comp_r.code:#x}"
        assert drv.mem.read(rbuf, 512) == new
    finally:
        go.set()
        store.write = real_write
        drv.machine.free(wbuf)
        drv.machine.free(rbuf)


def test_write_zeroes_without_pract_checks_nothing(nvme_env):
    """Write Zeroes without PRACT stores no PI (the blocks read escaped): its PRCHK bits are
    not checked, so type 3 with the Reference Tag check is no error."""
    _env, drv, lay = make(nvme_env, 2, 3)
    comp = drv.io(1, WRITE_ZEROES, check=False, nsid=1, cdw10=0, cdw12=3 | (REF << 26))
    assert comp.code == 0
    comp = drv.io(1, WRITE_ZEROES, check=False, nsid=1, cdw10=0, cdw12=3 | ((PRACT | REF) << 26))
    assert comp.code == Status.INVALID_PROT_INFO


def _plugin_like(ns):
    """A backend of a kind that keeps no metadata, over ``ns``'s own memory."""
    real = ns.backend

    class Plugin:
        kind = "plugin"
        size = real.size
        min_block = 512
        read_only = False

        def __getattr__(self, name):
            return getattr(real, name)

    return Plugin()


def test_identify_offers_only_what_each_namespace_can_use(nvme_env):
    """Identify lists LBA formats with metadata, MC and DPC only for a namespace whose
    backend keeps metadata; NSID FFFFFFFFh reports what all namespaces share, for CNS 00h
    and (the ELBAF table) CNS 05h."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv = env.drv
    idns = drv.identify(0x00, nsid=1)
    common = drv.identify(0x00, nsid=0xFFFFFFFF)
    for s in (idns, common):
        assert (s[25], s[27], s[28]) == (len(LBAF_TABLE) - 1, 3, 0x1F)
    assert common[128:128 + 4 * len(LBAF_TABLE)] == idns[128:128 + 4 * len(LBAF_TABLE)]
    elbaf = drv.identify(0x05, nsid=1)
    assert drv.identify(0x05, nsid=0xFFFFFFFF) == elbaf
    assert struct.unpack_from("<I", elbaf, 12 + 4 * 4)[0] >> 7 & 3 == 2  # LBAF 4: 64b Guard
    ns = env.ctrl.allocated[1]
    old = ns.replace_backend(_plugin_like(ns))
    try:
        for nsid in (1, 0xFFFFFFFF):
            s = drv.identify(0x00, nsid=nsid)
            assert (s[25], s[27], s[28]) == (1, 0, 0)
            assert s[128 + 8:128 + 4 * len(LBAF_TABLE)] == bytes(4 * (len(LBAF_TABLE) - 2))
            assert drv.identify(0x05, nsid=nsid)[12 + 8:12 + 4 * len(LBAF_TABLE)] == bytes(4 * (len(LBAF_TABLE) - 2))
        comp = drv.admin(FORMAT_NVM, check=False, nsid=1, cdw10=2)
        assert comp.code == Status.INVALID_FORMAT
    finally:
        ns.replace_backend(old)


def test_no_metadata_subsection_without_metadata(nvme_env):
    """Format NVM with MSET=1 to an LBA format without metadata: the namespace's state has
    no metadata subsection (which an older destination would refuse for nothing)."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    assert env.drv.admin(FORMAT_NVM, nsid=1, cdw10=0 | 1 << 4).ok
    ns = env.ctrl.allocated[1]
    assert ns.mset == 1
    assert ns.snapshot(attached=True).metadata is None
    assert env.drv.identify(0x00, nsid=1)[26] & 0x10 == 0  # FLBAS: no extended LBAs


def test_a_bad_data_pointer_is_reported_before_the_stored_pi(nvme_env):
    """A Read's data pointer errors come before the backend read and the PI check: a bad
    PRP over a block whose PI fails the Guard check is PRP Offset Invalid, not 282h."""
    _env, drv, lay = make(nvme_env, 2, 1)
    data = os.urandom(512)
    bad = b"\x00\x00" + bytes(2) + (5).to_bytes(4, "big")  # a Guard that is not the CRC
    assert rw(drv, lay, WRITE, 5, 1, data, bad, prinfo=0)[0].code == 0
    assert rw(drv, lay, READ, 5, 1, prinfo=GUARD, ref=5)[0].code == Status.GUARD_CHECK
    dbuf, mbuf = drv.machine.alloc(4096), drv.machine.alloc(4096)
    try:
        expect_status(drv, Status.PRP_OFFSET_INVALID, READ, qid=1, param=24, nsid=1, cdw10=5,
                      cdw12=GUARD << 26, cdw14=5, prp1=dbuf + 1, mptr=mbuf)
    finally:
        drv.machine.free(dbuf)
        drv.machine.free(mbuf)


def test_lba_range_comes_before_uncorrectable_marks(nvme_env):
    """On a namespace with metadata, a range running past the end that covers a marked
    block is LBA Out of Range, as without metadata (not Unrecovered Read Error)."""
    _env, drv, lay = make(nvme_env, 2, 1)
    last = (1 << 20) // 512 - 1
    assert drv.write_uncorrectable(1, last, 1).ok
    for opcode in (READ, VERIFY):
        assert rw(drv, lay, opcode, last, 2, prinfo=0)[0].code == Status.LBA_RANGE
    assert rw(drv, lay, READ, last, 1, prinfo=0)[0].code == Status.UNRECOVERED_READ_ERROR


def test_range_locks_share_reads_and_exclude_writes():
    locks = RangeLocks(stripes=8, region_shift=4)
    inside = threading.Barrier(2, timeout=5)
    order: list[str] = []

    def reader():
        with locks.hold(1, [(0, 4)], write=False):
            inside.wait()  # both readers inside at once
            order.append("r")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert order == ["r", "r"]
    held = threading.Event()
    done = threading.Event()

    def writer():
        with locks.hold(1, [(2, 1)], write=True):
            held.set()
            time.sleep(0.2)
            order.append("w")

    def late_reader():
        held.wait(5)
        with locks.hold(1, [(0, 40)], write=False):  # overlaps the writer's region
            order.append("r2")
        done.set()

    w, r = threading.Thread(target=writer), threading.Thread(target=late_reader)
    w.start()
    r.start()
    w.join(5)
    r.join(5)
    assert done.is_set() and order[2:] == ["w", "r2"]
    with locks.hold(1, [(0, 1 << 40)], write=True):  # a huge range takes every stripe, once each
        pass
