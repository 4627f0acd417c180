"""Copy (I/O opcode 19h) with source range descriptor formats 0h..3h, end to end through the
software host: the data each format copies (checked block by block), cross-namespace copies
(formats 2h and 3h) with and without metadata and protection information (16b and 64b
Guard), Host Behavior Support CDFE, every refusal and its status, the Format NVM hold on a
source namespace and copies running in opposite directions at once.

Descriptors are built from the NVM Command Set layouts in ``_copy_exercisers``; the
expected PI is computed from the spec in ``test_protected_io``'s way (big-endian fields, CRC
over the data)."""

from __future__ import annotations

import os
import struct
import threading
import time

import attrs
import crc32c
import pytest
from _copy_exercisers import copy, f0, f1, f2, f3, set_cdfe
from _helpers import GatedBackend, expect_status, wait_until

from pcidev import native
from pcidev.host import Machine
from pcidev.migration import load_device, load_device_stream, save_device, save_device_stream
from pcidev.vmstate import Section
from pcidev.vmstate.errors import StateError
from pcidev_nvme.atomicity import NamespaceAtomicity
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.features import CopyFormatsState
from pcidev_nvme.limits import COPY_LIMITS, OCFS
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.sanitize import CHUNK
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

READ, WRITE, COPY, FORMAT_NVM, NS_MGMT = 0x02, 0x01, 0x19, 0x80, 0x0D
PRACT, GUARD, APP, REF = 8, 4, 2, 1
ALL = GUARD | APP | REF
CDFE_2, CDFE_3 = 1 << 2, 1 << 3


def block(nsid: int, lba: int, bs: int, seed: int = 0) -> bytes:
    """A block that names where it was written (a misplaced block shows at once)."""
    head = struct.pack("<IQI", nsid, lba, seed)
    body = bytes(((i * 131 + lba * 7 + nsid * 13 + seed) >> 2) & 0xFF for i in range(bs - len(head)))
    return head + body


def fill(drv, nsid: int, slba: int, nlb: int, seed: int = 0) -> list[bytes]:
    bs = drv.lba_size(nsid)
    blocks = [block(nsid, slba + i, bs, seed) for i in range(nlb)]
    drv.write(nsid, slba, b"".join(blocks))
    return blocks


def blocks_at(drv, nsid: int, slba: int, nlb: int) -> list[bytes]:
    bs = drv.lba_size(nsid)
    raw = drv.read(nsid, slba, nlb)
    return [raw[i * bs:(i + 1) * bs] for i in range(nlb)]


def two(nvme_env, first: str = "mem:size=1M", second: str = "mem:size=1M", **kw):
    env = nvme_env(f"ns={first},ns={second}", **kw)
    env.drv.scan_namespaces()
    return env, env.drv


# ------------------------------------------------------------------------------ formats and data


def test_ocfs_advertises_the_four_formats(nvme_env):
    env = nvme_env("ns=mem:size=1M")
    assert struct.unpack_from("<H", env.drv.identify(0x01), 534)[0] == OCFS == 0xF


def test_formats_0_and_2_copy_the_right_blocks_within_and_across_namespaces(nvme_env):
    _env, drv = two(nvme_env)
    a = fill(drv, 1, 0, 16, seed=1)
    b = fill(drv, 2, 0, 16, seed=2)
    assert copy(drv, 1, 100, [f0(3, 2), f0(10, 4), f0(0, 1)], 0).ok
    assert blocks_at(drv, 1, 100, 7) == a[3:5] + a[10:14] + a[0:1]
    set_cdfe(drv, CDFE_2)
    # ranges from namespace 2 and 1 into namespace 1, and from 1 into 2
    comp = copy(drv, 1, 200, [f2(2, 5, 3), f2(1, 8, 2), f2(2, 0, 1)], 2)
    assert comp.ok, hex(comp.status)
    assert blocks_at(drv, 1, 200, 6) == b[5:8] + a[8:10] + b[0:1]
    comp = copy(drv, 2, 300, [f2(1, 12, 4)], 2)
    assert comp.ok, hex(comp.status)
    assert blocks_at(drv, 2, 300, 4) == a[12:16]
    assert blocks_at(drv, 2, 0, 16) == b  # the sources are untouched
    assert blocks_at(drv, 1, 0, 16) == a


def test_cdfe_enables_formats_2_and_3_and_rejects_reserved_bits(nvme_env):
    _env, drv = two(nvme_env)
    fill(drv, 2, 0, 2)
    # disabled: Invalid Field at CDW12 byte 1 (the format)
    expect_status(drv, Status.INVALID_FIELD, COPY, qid=1, param=49, **_fields(drv, 1, 0, [f2(2, 0, 1)], 2))
    for reserved in (1 << 0, 1 << 1, 1 << 4, 1 << 15, CDFE_2 | 1 << 8):
        comp = set_cdfe(drv, reserved, check=False)
        assert comp.code == Status.INVALID_FIELD and comp.dnr, hex(reserved)
    set_cdfe(drv, CDFE_2 | CDFE_3)
    hbs = drv.get_features(0x16, length=512).tag
    assert struct.unpack_from("<H", hbs, 4)[0] == CDFE_2 | CDFE_3
    assert copy(drv, 1, 10, [f2(2, 0, 1)], 2).ok
    # format 3 is enabled too, but carries the 64b Guard's tags: not for this namespace
    assert copy(drv, 1, 10, [f3(2, 0, 1)], 3).code == Status.INVALID_FORMAT
    set_cdfe(drv, CDFE_3)  # format 2 alone disabled again
    assert copy(drv, 1, 10, [f2(2, 0, 1)], 2).code == Status.INVALID_FIELD
    # a controller reset brings every feature back to its default: CDFE 0
    set_cdfe(drv, CDFE_2)
    drv.restart()
    assert copy(drv, 1, 10, [f2(2, 0, 1)], 2).code == Status.INVALID_FIELD


def _fields(drv, nsid, sdlba, entries, desfmt):
    """Fields for expect_status (the descriptor buffer stays allocated: tests are short)."""
    raw = b"".join(entries)
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, raw)
    return {"nsid": nsid, "cdw10": sdlba, "cdw12": (len(entries) - 1) | desfmt << 8, "buf": buf, "length": len(raw)}


@pytest.mark.parametrize("desfmt", [4, 5, 0xF])
def test_formats_the_controller_does_not_offer_are_invalid_field(nvme_env, desfmt):
    env = nvme_env("ns=mem:size=1M")
    set_cdfe(env.drv, CDFE_2 | CDFE_3)
    expect_status(env.drv, Status.INVALID_FIELD, COPY, qid=1, param=49, **_fields(env.drv, 1, 8, [f0(0, 1)], desfmt))


# ------------------------------------------------------------------------------ refusals


def test_source_namespace_refusals(nvme_env):
    env = nvme_env("ns=mem:size=1M,ns=mem:size=64K,max_namespaces=8", io_queues=1)
    drv = env.drv
    drv.scan_namespaces()
    set_cdfe(drv, CDFE_2)
    small = drv.namespaces[2].nsze
    for snsid in (0, 0xFFFFFFFF, 3, 7):  # 0, broadcast, not allocated
        assert copy(drv, 1, 0, [f2(snsid, 0, 1)], 2).code == Status.INVALID_NSID, snsid
    # an allocated namespace that is detached from this controller
    ctrl_list = struct.pack("<HH", 1, struct.unpack_from("<H", drv.identify(0x01), 78)[0]).ljust(4096, b"\0")
    drv.admin(0x15, nsid=2, cdw10=1, data=ctrl_list)
    assert copy(drv, 1, 0, [f2(2, 0, 1)], 2).code == Status.INVALID_NSID
    drv.admin(0x15, nsid=2, cdw10=0, data=ctrl_list)
    # LBAs beyond the SOURCE namespace (the destination has room): LBA Out of Range, its LBA
    before = env.ctrl.error_log.count
    assert copy(drv, 1, 0, [f2(2, small - 1, 2)], 2).code == Status.LBA_RANGE
    entry = env.ctrl.error_log.entries()[0]
    assert env.ctrl.error_log.count == before + 1 and entry["lba"] == small - 1
    assert entry["nsid"] == 2  # the LBA is the source namespace's: so is the entry
    assert copy(drv, 1, 0, [f2(2, small - 2, 2)], 2).ok
    # the destination range is checked against the destination
    assert copy(drv, 2, small - 1, [f2(1, 0, 2)], 2).code == Status.LBA_RANGE
    assert env.ctrl.error_log.entries()[0]["nsid"] == 2
    assert copy(drv, 1, drv.namespaces[1].nsze - 1, [f2(2, 0, 2)], 2).code == Status.LBA_RANGE
    assert env.ctrl.error_log.entries()[0]["nsid"] == 1  # (the command's own namespace)
    # Fast Copy Only: no copy here is a fast one
    assert copy(drv, 1, 0, [f2(2, 0, 1, sopt=1 << 15)], 2).code == Status.FAST_COPY_NOT_POSSIBLE
    # a command extension (CETYPE, byte 18 bits 3:0; CEV bytes 21:20): none is supported
    for desfmt, entry in ((0, f0(0, 1)), (2, f2(2, 0, 1))):
        with_cev = bytearray(entry)
        with_cev[20:22] = b"\x34\x12"  # CEV alone (CETYPE 0) is ignored, as the reserved bits
        with_cev[18] = 0xF0
        assert copy(drv, 1, 20, [bytes(with_cev)], desfmt).ok
        with_cetype = bytearray(entry)
        with_cetype[18] = 1
        assert copy(drv, 1, 20, [entry, bytes(with_cetype)], desfmt).code == Status.INVALID_FIELD
    # a source range overlapping the destination in the same namespace (2h, 3h)
    assert copy(drv, 1, 4, [f2(1, 0, 8)], 2).code == Status.OVERLAPPING_IO_RANGE
    assert copy(drv, 1, 4, [f2(1, 5, 2)], 2).code == Status.OVERLAPPING_IO_RANGE  # (4..5 and 5..6)
    assert copy(drv, 1, 4, [f2(1, 2, 2)], 2).ok  # adjacent on either side is not overlapping
    assert copy(drv, 1, 4, [f2(1, 6, 2)], 2).ok
    assert copy(drv, 1, 4, [f2(1, 0, 2), f2(1, 6, 1)], 2).code == Status.OVERLAPPING_IO_RANGE  # (4..6)
    assert copy(drv, 1, 4, [f2(2, 4, 4)], 2).ok  # the same LBAs of another namespace are not either


def test_limits_apply_to_every_format(nvme_env):
    _env, drv = two(nvme_env)
    set_cdfe(drv, CDFE_2)
    mssrl, mcl, msrc = COPY_LIMITS
    for desfmt, entry in ((0, lambda s, n: f0(s, n)), (2, lambda s, n: f2(2, s, n))):
        assert copy(drv, 1, 0, [entry(0, 1)] * (msrc + 2), desfmt).code == Status.CMD_SIZE_LIMIT_EXCEEDED
        assert copy(drv, 1, 0, [entry(0, mssrl + 1)], desfmt).code == Status.CMD_SIZE_LIMIT_EXCEEDED
        over = [entry(0, mssrl)] * (mcl // mssrl + 1)
        assert copy(drv, 1, 0, over, desfmt).code == Status.CMD_SIZE_LIMIT_EXCEEDED
        assert copy(drv, 1, 0, [entry(0, mssrl)] * (mcl // mssrl), desfmt).ok


def test_read_only_destination_and_source(nvme_env, tmp_path):
    img = tmp_path / "ro.img"
    img.write_bytes(bytes(range(256)) * 4096)
    _env, drv = two(nvme_env, f"file:path={img},readonly=on", "mem:size=1M")
    set_cdfe(drv, CDFE_2)
    assert copy(drv, 1, 0, [f2(2, 0, 1)], 2).code == Status.NS_WRITE_PROTECTED
    assert copy(drv, 1, 0, [f0(8, 1)], 0).code == Status.NS_WRITE_PROTECTED
    assert copy(drv, 2, 10, [f2(1, 3, 2)], 2).ok  # a read-only source is fine
    assert drv.read(2, 10, 2) == img.read_bytes()[3 * 512:5 * 512]


def test_uncorrectable_source_blocks_fail_the_copy(nvme_env):
    env, drv = two(nvme_env)
    set_cdfe(drv, CDFE_2)
    fill(drv, 2, 0, 8)
    drv.write_uncorrectable(2, 5, 1)
    before = env.ctrl.error_log.count
    assert copy(drv, 1, 0, [f2(2, 0, 4), f2(2, 4, 3)], 2).code == Status.UNRECOVERED_READ_ERROR
    entry = env.ctrl.error_log.entries()[0]
    assert entry["lba"] == 5 and env.ctrl.error_log.count == before + 1
    assert entry["nsid"] == 2  # the source namespace's LBA 5, not the destination's
    assert drv.read(1, 0, 4) == bytes(4 * 512)  # nothing was written
    # marks on the destination go when the copy rewrites the blocks
    drv.write_uncorrectable(1, 2, 1)
    assert copy(drv, 1, 0, [f2(2, 0, 4)], 2).ok
    assert drv.read(1, 2, 1) == block(2, 2, 512)


def test_a_sanitize_in_progress_refuses_copies(nvme_env):
    env, drv = two(nvme_env, "mem:size=4M", "mem:size=4M")
    set_cdfe(drv, CDFE_2)
    env.ctrl.sanitizer.rate = CHUNK * 4  # slow enough to watch
    drv.sanitize(2)  # block erase
    try:
        assert copy(drv, 1, 0, [f2(2, 0, 1)], 2).code == Status.SANITIZE_IN_PROGRESS
    finally:
        env.ctrl.sanitizer.rate = None
        wait_until(lambda: drv.sanitize_log()["sstat"] & 0x7 != 2, 30, "the sanitize to end")


# ------------------------------------------------------------------------------ metadata and PI across namespaces


def _pi(lbaf: int, data: bytes, app: int, ref: int) -> bytes:
    if lbaf in (4, 5, 8):
        guard = native.py_crc64_nvme(data)
        return guard.to_bytes(8, "big") + app.to_bytes(2, "big") + (ref & 0xFFFF_FFFF_FFFF).to_bytes(6, "big")
    return native.py_crc16_t10dif(data).to_bytes(2, "big") + app.to_bytes(2, "big") + \
        (ref & 0xFFFF_FFFF).to_bytes(4, "big")


def _write_pi(drv, nsid, slba, data, *, app, ref):
    comp, _d, _m = drv.io_md(WRITE, nsid, slba, len(data) // 512, data=data, prinfo=PRACT, ref=ref, app=app)
    assert comp.ok, hex(comp.status)


def _read_pi(drv, nsid, slba, nlb, ms, *, prinfo=ALL, app=0, ref=0):
    comp, data, meta = drv.io_md(READ, nsid, slba, nlb, data_len=nlb * 512, meta_len=nlb * ms, prinfo=prinfo,
                                 ref=ref, app=app)
    return comp, data, meta


def test_cross_namespace_copy_with_16b_guard_pi(nvme_env):
    _env, drv = two(nvme_env, "mem:size=1M,lbaf=2,pi=2", "mem:size=1M,lbaf=2,pi=2")
    set_cdfe(drv, CDFE_2)
    data = os.urandom(4 * 512)
    _write_pi(drv, 2, 8, data, app=0x1234, ref=0x5000)
    # PRACT both ways: the source PI is checked (expected tags from the entry) and the
    # destination's generated from the command's ILBRT / LBAT
    comp = copy(drv, 1, 40, [f2(2, 8, 4, 0x5000, 0x1234, 0xFFFF)], 2, prinfor=ALL | PRACT, prinfow=PRACT,
                ref=0x900, app=0x4321)
    assert comp.ok, hex(comp.status)
    comp, back, meta = _read_pi(drv, 1, 40, 4, 8, app=0x4321, ref=0x900)
    assert comp.ok and back == data
    assert meta == b"".join(_pi(2, data[i * 512:(i + 1) * 512], 0x4321, 0x900 + i) for i in range(4))
    # without PRACT the PI travels as stored: the destination checks it against ILBRT
    comp = copy(drv, 1, 60, [f2(2, 8, 4, 0x5000, 0x1234, 0xFFFF)], 2, prinfor=ALL, prinfow=ALL, ref=0x5000,
                app=0x1234)
    assert comp.ok, hex(comp.status)
    comp, back, meta = _read_pi(drv, 1, 60, 4, 8, app=0x1234, ref=0x5000)
    assert comp.ok and back == data
    # PRCHK failures on the source: the status of the check, the source LBA, nothing written
    cases = [(f2(2, 8, 4, 0x5000, 0x1235, 0xFFFF), APP, Status.APP_TAG_CHECK, 8),
             (f2(2, 8, 4, 0x5001, 0x1234, 0xFFFF), REF, Status.REF_TAG_CHECK, 8)]
    for entry, chk, status, lba in cases:
        comp = copy(drv, 1, 80, [entry], 2, prinfor=chk | PRACT, prinfow=PRACT, ref=80)
        assert comp.code == status, hex(comp.code)
        assert _env.ctrl.error_log.entries()[0]["lba"] == lba
    # a block whose Guard does not match its data (written without checks)
    bad = bytearray(_pi(2, data[:512], 0x1234, 0x5000))
    bad[0] ^= 0xFF
    comp, _d, _m = drv.io_md(WRITE, 2, 20, 1, data=data[:512], meta=bytes(bad), prinfo=0)
    assert comp.ok
    comp = copy(drv, 1, 80, [f2(2, 20, 1, 0x5000, 0x1234, 0xFFFF)], 2, prinfor=GUARD | PRACT, prinfow=PRACT,
                ref=80)
    assert comp.code == Status.GUARD_CHECK
    comp, back, _m = _read_pi(drv, 1, 80, 1, 8, prinfo=0)
    assert back == bytes(512)


def test_copy_between_namespaces_with_and_without_pi(nvme_env):
    """PI generated into a PI namespace from one without metadata (PRINFOW.PRACT), and
    stripped from a PI namespace into one without (PRINFOR.PRACT); without PRACT each is
    Incompatible Namespace or Format."""
    env = nvme_env("ns=mem:size=1M,ns=mem:size=1M,lbaf=2,pi=1")
    drv = env.drv
    drv.scan_namespaces()
    set_cdfe(drv, CDFE_2)
    plain = fill(drv, 1, 0, 4)
    assert copy(drv, 2, 16, [f2(1, 0, 4)], 2, prinfow=PRACT, ref=16, app=5).ok
    comp, back, meta = _read_pi(drv, 2, 16, 4, 8, app=5, ref=16)
    assert comp.ok and back == b"".join(plain)
    assert meta == b"".join(_pi(2, plain[i], 5, 16 + i) for i in range(4))
    assert copy(drv, 2, 16, [f2(1, 0, 4)], 2, prinfow=ALL, ref=16).code == Status.INCOMPATIBLE_NS
    # and back: the PI checked (type 1: EILBRT is the source LBA) and stripped
    assert copy(drv, 1, 100, [f2(2, 16, 4, 16, 5, 0xFFFF)], 2, prinfor=ALL | PRACT).ok
    assert blocks_at(drv, 1, 100, 4) == plain
    assert copy(drv, 1, 100, [f2(2, 16, 4, 16, 5, 0xFFFF)], 2, prinfor=ALL).code == Status.INCOMPATIBLE_NS
    assert copy(drv, 1, 100, [f2(2, 16, 4, 17, 5, 0xFFFF)], 2, prinfor=REF | PRACT).code == Status.INVALID_PROT_INFO


@pytest.mark.parametrize(("first", "second"), [
    ("mem:size=1M", "mem:size=1M,lbaf=1"),  # block sizes differ
    ("mem:size=1M,lbaf=2", "mem:size=1M"),  # metadata (no PI) on one side only
    ("mem:size=1M,lbaf=2,pi=1", "mem:size=1M,lbaf=2,pi=2"),  # PI types differ
    ("mem:size=1M,lbaf=2,pi=1", "mem:size=1M,lbaf=2,pi=1,pil=1"),  # PI first vs last
    ("mem:size=1M,lbaf=2,pi=1", "mem:size=1M,lbaf=6,pi=1"),  # metadata sizes differ
    ("mem:size=1M,lbaf=6,pi=1", "mem:size=1M"),  # the PI is not the whole metadata: no PRACT insertion
    ("mem:size=1M", "mem:size=1M,lbaf=6,pi=1"),  # nor stripping
])
def test_incompatible_namespaces(nvme_env, first, second):
    _env, drv = two(nvme_env, first, second)
    set_cdfe(drv, CDFE_2)
    for prinfo in (0, PRACT):
        comp = copy(drv, 1, 0, [f2(2, 0, 1)], 2, prinfor=prinfo, prinfow=prinfo)
        assert comp.code == Status.INCOMPATIBLE_NS and comp.dnr, (prinfo, hex(comp.code))
    # within one namespace a PI format mismatch between PRACTs is Invalid Field instead
    if "pi=" in first:
        assert copy(drv, 1, 8, [f2(1, 0, 1)], 2, prinfor=PRACT).code == Status.INVALID_FIELD


def test_pract_must_agree_across_pi_namespaces(nvme_env):
    _env, drv = two(nvme_env, "mem:size=1M,lbaf=2,pi=1", "mem:size=1M,lbaf=2,pi=1")
    set_cdfe(drv, CDFE_2)
    assert copy(drv, 1, 0, [f2(2, 0, 1)], 2, prinfor=PRACT).code == Status.INCOMPATIBLE_NS
    assert copy(drv, 1, 0, [f2(2, 0, 1)], 2, prinfow=PRACT).code == Status.INCOMPATIBLE_NS


# ------------------------------------------------------------------------------ the 64b Guard


def test_format_1_checks_and_regenerates_48_bit_tags(nvme_env):
    env = nvme_env("ns=mem:size=1M,lbaf=4,pi=2")
    drv = env.drv
    drv.scan_namespaces()
    data = os.urandom(3 * 512)
    big = 0x1234_5678_9A00  # a reference tag beyond 32 bits
    _write_pi(drv, 1, 4, data, app=0x42, ref=big)
    comp = copy(drv, 1, 50, [f1(4, 3, big, 0x42, 0xFFFF)], 1, prinfor=ALL | PRACT, prinfow=PRACT,
                ref=0xABCD_0000_0010, app=0x43)
    assert comp.ok, hex(comp.status)
    comp, back, meta = _read_pi(drv, 1, 50, 3, 16, app=0x43, ref=0xABCD_0000_0010)
    assert comp.ok and back == data
    assert meta == b"".join(_pi(4, data[i * 512:(i + 1) * 512], 0x43, 0xABCD_0000_0010 + i) for i in range(3))
    # only the low 48 bits of ELBT are the reference tag: one off in bit 40 fails the check
    comp = copy(drv, 1, 70, [f1(4, 3, big ^ 1 << 40, 0x42, 0xFFFF)], 1, prinfor=REF | PRACT, prinfow=PRACT,
                ref=70)
    assert comp.code == Status.REF_TAG_CHECK
    # without PRACT the stored PI goes along and the write side checks it with the 48-bit ILBRT
    comp = copy(drv, 1, 80, [f1(4, 3, big, 0x42, 0xFFFF)], 1, prinfor=ALL, prinfow=ALL, ref=big, app=0x42)
    assert comp.ok, hex(comp.status)
    comp, back, _m = _read_pi(drv, 1, 80, 3, 16, app=0x42, ref=big)
    assert comp.ok and back == data
    comp = copy(drv, 1, 90, [f1(4, 3, big, 0x42, 0xFFFF)], 1, prinfor=ALL, prinfow=REF, ref=big + 1)
    assert comp.code == Status.REF_TAG_CHECK


def test_format_0_on_64b_guard_and_format_1_on_16b_guard_are_invalid_format(nvme_env):
    env64 = nvme_env("ns=mem:size=1M,lbaf=4,pi=1")
    expect_status(env64.drv, Status.INVALID_FORMAT, COPY, qid=1, param=49,
                  **_fields(env64.drv, 1, 8, [f0(0, 1)], 0))
    set_cdfe(env64.drv, CDFE_2 | CDFE_3)
    expect_status(env64.drv, Status.INVALID_FORMAT, COPY, qid=1, param=49,
                  **_fields(env64.drv, 1, 8, [f2(1, 0, 1)], 2))
    env16 = nvme_env("ns=mem:size=1M,lbaf=2,pi=1")
    expect_status(env16.drv, Status.INVALID_FORMAT, COPY, qid=1, param=49,
                  **_fields(env16.drv, 1, 8, [f1(0, 1)], 1))
    envno = nvme_env("ns=mem:size=1M")  # no PI: the 16b formats
    expect_status(envno.drv, Status.INVALID_FORMAT, COPY, qid=1, param=49,
                  **_fields(envno.drv, 1, 8, [f1(0, 1)], 1))


def test_format_3_across_64b_guard_namespaces(nvme_env):
    _env, drv = two(nvme_env, "mem:size=1M,lbaf=5,pi=1", "mem:size=1M,lbaf=5,pi=1")
    set_cdfe(drv, CDFE_3)
    data = os.urandom(2 * 4096)
    comp, _d, _m = drv.io_md(WRITE, 2, 7, 2, data=data, prinfo=PRACT, ref=7, app=9)
    assert comp.ok
    comp = copy(drv, 1, 30, [f3(2, 7, 2, 7, 9, 0xFFFF)], 3, prinfor=ALL | PRACT, prinfow=PRACT, ref=30, app=9)
    assert comp.ok, hex(comp.status)
    comp, back, meta = drv.io_md(READ, 1, 30, 2, data_len=8192, meta_len=32, prinfo=ALL, ref=30, app=9)
    assert comp.ok and back == data
    assert meta == b"".join(_pi(5, data[i * 4096:(i + 1) * 4096], 9, 30 + i) for i in range(2))
    # format 2 (the 16b Guard's tags) is Invalid Format here even when enabled
    set_cdfe(drv, CDFE_2 | CDFE_3)
    assert copy(drv, 1, 30, [f2(2, 7, 2)], 2, prinfor=PRACT, prinfow=PRACT).code == Status.INVALID_FORMAT
    # a type 1 source with the wrong expected reference tag (not its LBA): Invalid PI
    comp = copy(drv, 1, 30, [f3(2, 7, 2, 8, 9, 0xFFFF)], 3, prinfor=REF | PRACT, prinfow=PRACT, ref=30)
    assert comp.code == Status.INVALID_PROT_INFO


# ------------------------------------------------------------------------------ holds and locks


@pytest.mark.parametrize("claim", ["format", "delete"])
def test_a_claim_of_the_source_namespace_waits_for_the_copy_and_refuses_new_ones(nvme_env, tmp_path, claim):
    """A Format NVM (or a Namespace Management delete) of a Copy's source namespace, issued
    while the copy reads it, completes only after the copy, which copied the data from
    before; meanwhile a new Copy reading that namespace completes as I/O to it does: Format
    In Progress with DNR clear (retry after the format), or Namespace Not Ready with DNR set
    (a deleted namespace does not come back; it was Format In Progress until session 25)."""
    env, drv = two(nvme_env, f"file:path={tmp_path}/d.img,size=1M", "mem:size=1M", io_queues=2)
    set_cdfe(drv, CDFE_2)
    src = fill(drv, 2, 0, 4)
    sns = env.ctrl.namespaces[2]
    entered, go = threading.Event(), threading.Event()
    real = sns.backend.readv

    def slow_readv(views, offset):
        entered.set()
        go.wait(10)
        return real(views, offset)

    status = Status.FORMAT_IN_PROGRESS if claim == "format" else Status.NS_NOT_READY
    sns.backend.readv = slow_readv
    buf = drv.machine.alloc(4096, 4096)
    try:
        drv.mem.write(buf, f2(2, 0, 4))
        cid = drv.submit(1, COPY, nsid=1, cdw10=10, cdw12=2 << 8, buf=buf, length=32)
        assert entered.wait(10)
        assert env.ctrl.io_inflight_for({2})
        if claim == "format":
            acid = drv.submit(0, FORMAT_NVM, nsid=2, cdw10=0)  # a real format of the source
        else:
            acid = drv.submit(0, NS_MGMT, nsid=2, cdw10=1)  # delete namespace 2
        wait_until(lambda: env.ctrl.io.claim_status(2) == status, 5, f"the {claim} to start")
        time.sleep(0.1)
        assert env.ctrl.io.claim_status(2) == status and drv.cq_posted(0) == 0  # it waits for the copy
        refused = copy(drv, 1, 0, [f2(2, 0, 1)], 2, qid=2)
        assert refused.code == status and refused.dnr == (claim == "delete")
        assert copy(drv, 1, 1024, [f2(1, 1500, 1)], 2, qid=2).ok  # its own namespace is fine
        go.set()
        assert drv.wait_for(1, cid).ok
        assert drv.wait_for(0, acid, 10).ok
    finally:
        sns.backend.readv = real
        go.set()
        drv.machine.free(buf)
    assert not env.ctrl.io_inflight_for({2}) and env.ctrl.io.claim_status(2) is None
    assert blocks_at(drv, 1, 10, 4) == src  # what namespace 2 held before the format or delete
    if claim == "format":
        assert drv.read(2, 0, 4) == bytes(4 * 512)  # which then formatted it
        assert copy(drv, 1, 0, [f2(2, 0, 1)], 2).ok
    else:
        assert 2 not in env.ctrl.allocated
        assert copy(drv, 1, 0, [f2(2, 0, 1)], 2).code == Status.INVALID_NSID


def test_a_copy_from_a_file_namespace_into_a_memory_one_reads_on_a_worker(nvme_env, tmp_path):
    """The submitting thread never waits for a file: a Copy 2h into a memory namespace
    (whose commands run on the submitting thread) from a file namespace runs on a worker,
    and while its source read is held, the memory namespace still answers at once."""
    env, drv = two(nvme_env, "mem:size=1M", f"file:path={tmp_path}/s.img,size=1M", io_queues=2)
    set_cdfe(drv, CDFE_2)
    src = fill(drv, 2, 0, 4)
    mine = fill(drv, 1, 50, 1)
    sns = env.ctrl.namespaces[2]
    readers: list[threading.Thread] = []
    entered, go = threading.Event(), threading.Event()
    real = sns.backend.readv

    def slow_readv(views, offset):
        readers.append(threading.current_thread())
        entered.set()
        go.wait(2)  # (on the submitting thread, this would hold up the submission)
        return real(views, offset)

    sns.backend.readv = slow_readv
    buf = drv.machine.alloc(4096, 4096)
    try:
        drv.mem.write(buf, f2(2, 0, 4))
        cid = drv.submit(2, COPY, nsid=1, cdw10=10, cdw12=2 << 8, buf=buf, length=32)
        assert entered.wait(10)
        assert threading.current_thread() not in readers
        assert not go.is_set() and blocks_at(drv, 1, 50, 1) == mine
        go.set()
        assert drv.wait_for(2, cid).ok
    finally:
        sns.backend.readv = real
        go.set()
        drv.machine.free(buf)
    assert blocks_at(drv, 1, 10, 4) == src


class _HalfWayBackend(GatedBackend):
    """Reads go straight through; a write puts its first half in place, then waits at the
    gate before the rest: a write held half done, as a slow disk may leave it."""

    def readv(self, views, offset):
        for v in views:
            v[:] = self.data[offset:offset + len(v)]
            offset += len(v)

    def writev(self, views, offset, *, fua=False):
        data = b"".join(bytes(v) for v in views)
        half = len(data) // 2
        self.data[offset:offset + half] = data[:half]
        self._wait()
        self.data[offset + half:offset + len(data)] = data[half:]


def _serialised(nvme_env, nawun: int = 7):
    """Namespace 1 in memory, namespace 2 over a :class:`_HalfWayBackend` with atomic
    writes of ``nawun + 1`` blocks; CDFE enables format 2h."""
    env = nvme_env("ns=mem:size=1M", io_queues=2)
    drv, ctrl = env.drv, env.ctrl
    backend = _HalfWayBackend(1 << 20)
    ns = Namespace(2, backend)
    ns.atomic = NamespaceAtomicity(nawun=nawun)
    ctrl.add_namespace(2, ns, attached=True)
    drv.scan_namespaces()
    set_cdfe(drv, CDFE_2)
    assert ctrl.atomicity.serialises(ns) and not ctrl.atomicity.serialises(ctrl.namespaces[1])
    return env, drv, backend


@pytest.mark.parametrize("dst", [1, 2])
def test_a_copy_never_reads_an_atomic_write_of_its_source_half_done(nvme_env, dst):
    """An 8-block atomic Write to namespace 2 held half done in the backend: a Copy 2h of
    those blocks (two ranges), into another namespace or elsewhere in namespace 2, waits for
    it and copies the whole new data."""
    env, drv, backend = _serialised(nvme_env)
    fill(drv, 2, 0, 8, seed=1)
    new = [block(2, i, 512, seed=2) for i in range(8)]
    wbuf = drv.machine.alloc(4096, 4096)
    cbuf = drv.machine.alloc(4096, 4096)
    try:
        drv.mem.write(wbuf, b"".join(new))
        drv.mem.write(cbuf, f2(2, 0, 4) + f2(2, 4, 4))
        backend.hold()
        wcid = drv.submit(1, WRITE, nsid=2, cdw10=0, cdw12=7, buf=wbuf, length=4096)
        wait_until(lambda: backend.waiting == 1, what="the write to be half done")
        assert bytes(backend.data[:4 * 512]) == b"".join(new[:4])
        ccid = drv.submit(2, COPY, nsid=dst, cdw10=100, cdw12=1 | 2 << 8, buf=cbuf, length=64)
        time.sleep(0.1)
        backend.release()
        assert drv.wait_for(1, wcid).ok
        assert drv.wait_for(2, ccid).ok
    finally:
        backend.release()
        drv.machine.free(wbuf)
        drv.machine.free(cbuf)
    assert blocks_at(drv, dst, 100, 8) == new
    assert env.ctrl.atomicity.locks.held == 0


def test_copy_claims_only_its_ranges_and_only_after_its_checks(nvme_env):
    """With a Write held half done at blocks 0..7 of serialised namespace 2: a Copy that
    is refused answers at once, one that neither reads nor writes blocks 0..7 runs, one
    whose destination overlaps them waits; the claims are each source namespace's ranges
    shared, then the destination range exclusive, never two held by one copy at once."""
    env, drv, backend = _serialised(nvme_env)
    locks = env.ctrl.atomicity.locks
    claims: list[tuple[int, tuple, bool, int]] = []
    real_acquire = locks.acquire

    def spy(nsid, ranges, *, write):
        claims.append((nsid, tuple(ranges), write, locks.held))
        return real_acquire(nsid, ranges, write=write)

    locks.acquire = spy
    old = fill(drv, 2, 0, 8, seed=1)
    far = fill(drv, 2, 200, 4, seed=3)
    new = [block(2, i, 512, seed=2) for i in range(8)]
    bufs = [drv.machine.alloc(4096, 4096) for _ in range(3)]
    try:
        drv.mem.write(bufs[0], b"".join(new))
        backend.hold()
        wcid = drv.submit(1, WRITE, nsid=2, cdw10=0, cdw12=7, buf=bufs[0], length=4096)
        wait_until(lambda: backend.waiting == 1, what="the write to be half done")
        claims.clear()
        # refused (DESFMT 4, NR above MSRC): no claim, no wait
        assert copy(drv, 2, 100, [f2(2, 200, 1)], 4, qid=2).code == Status.INVALID_FIELD
        assert copy(drv, 2, 100, [f0(200, 1)] * (COPY_LIMITS[2] + 2), 0, qid=2).code == \
            Status.CMD_SIZE_LIMIT_EXCEEDED
        assert copy(drv, 2, 100, [f2(9, 0, 1)], 2, qid=2).code == Status.INVALID_NSID
        assert claims == []
        # blocks 200..203 of 2 and 60 of 1 into 100..104 of 2: its write reaches the backend
        drv.mem.write(bufs[1], f2(2, 200, 2) + f2(1, 60, 1) + f2(2, 202, 2))
        c1 = drv.submit(2, COPY, nsid=2, cdw10=100, cdw12=2 | 2 << 8, buf=bufs[1], length=96)
        wait_until(lambda: backend.waiting == 2, what="the copy's write to reach the backend")
        assert claims == [(2, ((200, 202), (202, 204)), False, 1), (2, ((100, 105),), True, 1)]
        # into 4..7 of 2: waits for the write's claim
        drv.mem.write(bufs[2], f2(2, 200, 4))
        c2 = drv.submit(2, COPY, nsid=2, cdw10=4, cdw12=2 << 8, buf=bufs[2], length=32)
        wait_until(lambda: len(claims) == 4, what="the second copy's claims")
        time.sleep(0.1)
        assert backend.waiting == 2 and claims[3][:3] == (2, ((4, 8),), True)
        backend.release()
        assert drv.wait_for(1, wcid).ok and drv.wait_for(2, c1).ok and drv.wait_for(2, c2).ok
    finally:
        locks.acquire = real_acquire
        backend.release()
        for buf in bufs:
            drv.machine.free(buf)
    assert old != new
    assert blocks_at(drv, 2, 0, 8) == new[:4] + far  # the second copy landed after the write
    assert blocks_at(drv, 2, 100, 5) == far[:2] + [bytes(512)] + far[2:]
    assert locks.held == 0


@pytest.mark.parametrize(("pi", "atomic"), [(False, False), (True, False), (False, True), (True, True)])
def test_copies_in_opposite_directions_at_once(nvme_env, tmp_path, pi, atomic):
    """Copies 1 <- 2 and 2 <- 1 on two queues, many at once on the worker threads (file
    namespaces; with PI, under the metadata's range locks; with atomic writes of 16 blocks,
    under the atomicity claims, next to Writes of the same blocks): no deadlock, every
    block where it belongs."""
    spec = (",lbaf=2,pi=1" if pi else "") + (",atomic.nawun=15" if atomic else "")
    env, drv = two(nvme_env, f"file:path={tmp_path}/a.img,size=1M{spec}",
                   f"file:path={tmp_path}/b.img,size=1M{spec}", io_queues=2)
    set_cdfe(drv, CDFE_2)
    locks = env.ctrl.atomicity.locks
    taken = []
    real_acquire = locks.acquire

    def spy(nsid, ranges, *, write):
        taken.append(nsid)
        return real_acquire(nsid, ranges, write=write)

    locks.acquire = spy

    def write(nsid, seed):
        blocks = [block(nsid, i, 512, seed) for i in range(64)]
        if pi:
            _write_pi(drv, nsid, 0, b"".join(blocks), app=0, ref=0)
        else:
            drv.write(nsid, 0, b"".join(blocks))
        return blocks

    def read(nsid, slba):
        if pi:
            comp, data, _m = _read_pi(drv, nsid, slba, 64, 8, ref=slba)
            assert comp.ok, hex(comp.status)
        else:
            data = drv.read(nsid, slba, 64)
        return [data[i * 512:(i + 1) * 512] for i in range(64)]

    a, b = write(1, 1), write(2, 2)
    prinfo = (ALL | PRACT) << 12 | PRACT << 26 if pi else 0
    bufs, cids = [], []
    try:
        for i in range(16):
            for qid, dst, src in ((1, 1, 2), (2, 2, 1)):
                buf = drv.machine.alloc(4096, 4096)
                bufs.append(buf)
                drv.mem.write(buf, f2(src, 4 * i, 4, 4 * i, 0, 0))
                sdlba = 100 + 4 * i
                cids.append((qid, drv.submit(qid, COPY, nsid=dst, cdw10=sdlba, cdw14=sdlba, cdw12=2 << 8 | prinfo,
                                             buf=buf, length=32)))
                if atomic:  # a Write of the source blocks the copy reads: the same data again
                    wbuf = drv.machine.alloc(4096, 4096)
                    bufs.append(wbuf)
                    again = b"".join((a if src == 1 else b)[4 * i:4 * i + 4])
                    drv.mem.write(wbuf, again)
                    cids.append((3 - qid, drv.submit(3 - qid, WRITE, nsid=src, cdw10=4 * i, cdw12=3 | PRACT << 26,
                                                     cdw14=4 * i, buf=wbuf, length=2048)))
        for qid, cid in cids:
            comp = drv.wait_for(qid, cid, 30)
            assert comp.ok, hex(comp.status)
    finally:
        locks.acquire = real_acquire
        for buf in bufs:
            drv.machine.free(buf)
    assert read(1, 100) == b and read(2, 100) == a
    assert read(1, 0) == a and read(2, 0) == b
    assert bool(taken) == atomic and set(taken) == ({1, 2} if atomic else set())
    assert locks.held == 0


# ------------------------------------------------------------------------------ migration


def test_cdfe_and_copied_data_survive_a_migration():
    """CDFE travels with the features (the Host Behavior Support data): after an in-process
    migration the destination takes format 2h copies; every block checked by crc32c."""
    machine = Machine(ram_size=64 << 20)
    src = NvmeController("ns=mem:size=1M,ns=mem:size=1M,lbaf=2,pi=1", name="src")
    pdev = machine.plug(src)
    drv = NvmeDriver(machine, pdev, io_queues=1, aers=0)
    dst = res = None
    try:
        drv.probe()
        drv.scan_namespaces()
        set_cdfe(drv, CDFE_2)
        a = fill(drv, 1, 0, 8)
        assert copy(drv, 2, 0, [f2(1, 0, 8)], 2, prinfow=PRACT, ref=0).ok
        src.quiesce()
        data, fds = save_device_stream(src)
        dst = NvmeController(src.cfg, name="dst")
        res = load_device_stream(dst, data, fds)
        dst.irq.sink = pdev.recorder
        pdev.device = dst
        drv.device, drv._bar_write, drv._bar_read = dst, dst.bar_write, dst.bar_read
        dst.resume()
        assert dst.features.copy_formats_enabled == CDFE_2
        comp, back, _m = _read_pi(drv, 2, 0, 8, 8, ref=0)
        assert comp.ok and [crc32c.crc32c(back[i * 512:(i + 1) * 512]) for i in range(8)] == \
            [crc32c.crc32c(b) for b in a]
        assert copy(drv, 1, 100, [f2(2, 0, 8, 0, 0, 0)], 2, prinfor=ALL | PRACT).ok
        assert [crc32c.crc32c(b) for b in blocks_at(drv, 1, 100, 8)] == [crc32c.crc32c(b) for b in a]
    finally:
        drv.close()
        for c in (dst, src):
            if c is not None:
                c.close()
        if res is not None:
            res.close()
        machine.close()


def test_cdfe_travels_in_a_subsection_and_a_stream_with_a_bad_one_is_refused(nvme_env):
    """A non-zero CDFE is carried twice: in the Host Behavior Support data and in the
    ``copy_formats`` subsection, which a destination without formats 2h/3h does not know
    and refuses (a zero CDFE writes no subsection: such a stream loads anywhere). A stream
    whose CDFE has a reserved bit, or that the subsection does not repeat, is refused."""
    env = nvme_env("ns=mem:size=1M,ns=mem:size=1M")
    drv, ctrl = env.drv, env.ctrl
    drv.scan_namespaces()
    set_cdfe(drv, CDFE_2 | CDFE_3)
    ctrl.quiesce()
    snap = save_device(ctrl)
    fs, nvme = snap.sections
    st = nvme.state
    assert st.features.copy_formats == CopyFormatsState(CDFE_2 | CDFE_3)
    assert struct.unpack_from("<H", st.features.host_behavior, 4)[0] == CDFE_2 | CDFE_3

    def with_features(**changes):
        return attrs.evolve(snap, sections=(fs, Section("nvme", 0, attrs.evolve(
            st, features=attrs.evolve(st.features, **changes)))))

    def hbs(cdfe):
        return bytes(4) + struct.pack("<H", cdfe) + bytes(506)

    dst = NvmeController(ctrl.cfg, name="dst")
    try:
        for bad, path in (
            (with_features(host_behavior=hbs(1 | CDFE_2), copy_formats=CopyFormatsState(1 | CDFE_2)),
             "features.host_behavior"),  # bit 0 is reserved, as Set Features says
            (with_features(host_behavior=hbs(1 << 4), copy_formats=CopyFormatsState(1 << 4)),
             "features.host_behavior"),
            (with_features(copy_formats=None), "features.copy_formats"),  # CDFE without its subsection
            (with_features(copy_formats=CopyFormatsState(CDFE_2)), "features.copy_formats"),
            (with_features(host_behavior=hbs(0)), "features.copy_formats"),
        ):
            with pytest.raises(StateError) as info:
                load_device(dst, bad)
            assert info.value.path == path, str(info.value)
        load_device(dst, snap).close()
        assert dst.features.copy_formats_enabled == CDFE_2 | CDFE_3
    finally:
        dst.close()
        ctrl.resume()
    set_cdfe(drv, 0)
    ctrl.quiesce()
    try:
        assert save_device(ctrl).sections[1].state.features.copy_formats is None
    finally:
        ctrl.resume()
