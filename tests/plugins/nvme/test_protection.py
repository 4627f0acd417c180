"""pcidev_nvme.protection: the PI tuple layouts (big-endian fields, 16b and 64b Guard,
first or last in the metadata), generation, each check and its status, the escape values
and the command-level rules (Invalid Protection Information)."""

from __future__ import annotations

import logging
import os
import threading

import pytest

from pcidev import native
from pcidev_nvme import protection
from pcidev_nvme.protection import PIF_16B, PIF_64B, PRCHK_APP, PRCHK_GUARD, PRCHK_REF, PRINFO_PRACT, PiFormat
from pcidev_nvme.status import NvmeStatusError, Status

ALL = PRCHK_GUARD | PRCHK_APP | PRCHK_REF


def check(fmt, data, meta, n, **kw):
    kw.setdefault("slba", 0)
    kw.setdefault("cdw12", ALL)
    kw.setdefault("ref", 0)
    kw.setdefault("app", 0)
    kw.setdefault("app_mask", 0xFFFF)
    fmt.check(memoryview(data), memoryview(meta), n, **kw)


def status_of(fmt, data, meta, n, **kw):
    try:
        check(fmt, data, meta, n, **kw)
    except NvmeStatusError as exc:
        return exc.status, exc.lba
    return 0, None


def test_16b_guard_tuple_layout():
    fmt = PiFormat(1, PIF_16B, 8, 512, False)
    data = bytes(range(256)) * 2
    meta = bytearray(8)
    fmt.generate(memoryview(data), memoryview(meta), 1, 0x01020304, 0xBEEF)
    guard = native.py_crc16_t10dif(data)
    assert meta == guard.to_bytes(2, "big") + b"\xbe\xef" + b"\x01\x02\x03\x04"
    assert (fmt.size, fmt.offset, fmt.store_pattern) == (8, 0, b"\xff" * 8)


def test_64b_guard_tuple_layout_last_covers_the_metadata_before_it():
    fmt = PiFormat(2, PIF_64B, 64, 4096, False)
    data = os.urandom(4096)
    meta = bytearray(os.urandom(48)) + bytearray(16)
    fmt.generate(memoryview(data), memoryview(meta), 1, 0xAABB_CCDD_EEFF, 0x0102)
    guard = native.py_crc64_nvme(bytes(meta[:48]), native.py_crc64_nvme(data))
    assert meta[48:] == guard.to_bytes(8, "big") + b"\x01\x02" + bytes.fromhex("aabbccddeeff")
    assert fmt.offset == 48 and fmt.store_pattern == bytes(48) + b"\xff" * 16


def test_first_pi_guard_covers_only_the_data():
    fmt = PiFormat(1, PIF_16B, 16, 512, True)
    data = os.urandom(512)
    meta = bytearray(16)
    meta[8:] = os.urandom(8)
    fmt.generate(memoryview(data), memoryview(meta), 1, 7, 0)
    assert meta[:2] == native.py_crc16_t10dif(data).to_bytes(2, "big")


@pytest.mark.parametrize("pif", [PIF_16B, PIF_64B])
@pytest.mark.parametrize("pi_type", [1, 2, 3])
def test_each_check_and_its_status(pif, pi_type):
    ms = 16 if pif == PIF_64B else 8
    fmt = PiFormat(pi_type, pif, ms, 512, False)
    n = 4
    data = bytearray(os.urandom(512 * n))
    meta = bytearray(ms * n)
    fmt.generate(memoryview(data), memoryview(meta), n, 100, 0x1111)
    good = {"slba": 100, "ref": 100, "app": 0x1111}
    cdw12 = ALL if pi_type != 3 else PRCHK_GUARD | PRCHK_APP
    assert status_of(fmt, data, meta, n, cdw12=cdw12, **good) == (0, None)
    if pi_type == 3:  # the same tag in every block
        assert meta[ms - 4:ms] == meta[2 * ms - 4:2 * ms]
    bad = bytearray(data)
    bad[512 * 2 + 7] ^= 0x40
    assert status_of(fmt, bad, meta, n, cdw12=cdw12, **good) == (Status.GUARD_CHECK, 102)
    assert status_of(fmt, bad, meta, n, cdw12=cdw12 & ~PRCHK_GUARD, **good) == (0, None)
    assert status_of(fmt, data, meta, n, cdw12=cdw12, slba=100, ref=100, app=0x1112) == (Status.APP_TAG_CHECK, 100)
    assert status_of(fmt, data, meta, n, cdw12=cdw12, slba=100, ref=100, app=0x1112, app_mask=0xFF00) == (0, None)
    if pi_type != 3:
        assert status_of(fmt, data, meta, n, cdw12=ALL, slba=100, ref=99, app=0x1111) == (Status.REF_TAG_CHECK, 100)
    else:  # type 3: the Reference Tag is never checked
        assert status_of(fmt, data, meta, n, cdw12=ALL, slba=100, ref=99, app=0x1111) == (0, None)


@pytest.mark.parametrize("pif", [PIF_16B, PIF_64B])
def test_escape_values(pif):
    ms = 16 if pif == PIF_64B else 8
    app_at = 8 if pif == PIF_64B else 2
    data = os.urandom(512)
    junk = bytearray(ms)  # a Guard of 0 over random data: wrong
    junk[app_at:app_at + 2] = b"\xff\xff"
    for pi_type in (1, 2):
        assert status_of(PiFormat(pi_type, pif, ms, 512, False), data, junk, 1, ref=5) == (0, None)
    t3 = PiFormat(3, pif, ms, 512, False)
    assert status_of(t3, data, junk, 1, cdw12=PRCHK_GUARD)[0] == Status.GUARD_CHECK
    junk[app_at + 2:] = b"\xff" * (ms - app_at - 2)  # Reference Tag all ones too
    assert status_of(t3, data, junk, 1, cdw12=PRCHK_GUARD) == (0, None)


def test_reference_tags_wrap_in_their_width():
    for pif, ms, width in ((PIF_16B, 8, 32), (PIF_64B, 16, 48)):
        fmt = PiFormat(2, pif, ms, 512, True)
        data = bytes(1024)
        meta = bytearray(2 * ms)
        top = (1 << width) - 1
        fmt.generate(memoryview(data), memoryview(meta), 2, top, 0)
        at = 4 if pif == PIF_16B else 10
        assert int.from_bytes(meta[ms + at:2 * ms], "big") == 0
        check(fmt, data, meta, 2, ref=top)


def test_command_rules():
    t1 = PiFormat(1, PIF_16B, 8, 512, False)
    t1.check_command(0x1_0000_0005, PRCHK_REF, 5)  # the low 32 bits of the SLBA
    with pytest.raises(NvmeStatusError) as ei:
        t1.check_command(6, PRCHK_REF, 5)
    assert ei.value.status == Status.INVALID_PROT_INFO
    t1.check_command(6, PRCHK_GUARD | PRINFO_PRACT, 5)  # no reference tag check: any ILBRT
    PiFormat(2, PIF_16B, 8, 512, False).check_command(6, PRCHK_REF, 5)
    with pytest.raises(NvmeStatusError) as ei:
        PiFormat(3, PIF_16B, 8, 512, False).check_command(6, PRCHK_REF, 6)
    assert ei.value.status == Status.INVALID_PROT_INFO
    wide = PiFormat(1, PIF_64B, 16, 512, False)
    assert wide.initial_ref(0xFFFF_1234, 0x5678) == 0x1234_0000_5678
    assert t1.initial_ref(0xFFFF_1234, 0x5678) == 0x5678


@pytest.mark.parametrize(("pif", "ms", "first"), [(PIF_16B, 8, False), (PIF_16B, 64, False), (PIF_16B, 64, True),
                                                  (PIF_64B, 16, True), (PIF_64B, 64, False)])
@pytest.mark.parametrize("pi_type", [1, 2, 3])
def test_zero_blocks_metadata_is_generate_over_zeros(pif, ms, first, pi_type):
    fmt = PiFormat(pi_type, pif, ms, 512, first)
    top = fmt.ref_mask - 2  # the tags wrap inside the run
    want = bytearray(ms * 7)
    fmt.generate(memoryview(bytes(512 * 7)), memoryview(want), 7, top, 0xA55A)
    assert fmt.zero_blocks_metadata(7, top, 0xA55A) == want


def test_a_warning_when_pi_runs_on_the_pure_python_crcs(monkeypatch, caplog):
    monkeypatch.setattr(protection.native, "FALLBACK_REASON", None)
    assert not protection.warn_slow_crcs()
    monkeypatch.setattr(protection.native, "FALLBACK_REASON", "no extension")
    monkeypatch.setattr(protection, "_warned", threading.Event())
    with caplog.at_level(logging.WARNING, logger="pcidev_nvme.protection"):
        assert protection.warn_slow_crcs()
        assert protection.warn_slow_crcs()
    assert [r.getMessage() for r in caplog.records].count(
        "protection information uses the pure-Python CRCs (no extension): PI I/O is slow") == 1
