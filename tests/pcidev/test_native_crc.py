"""The CRCs of NVMe end-to-end data protection in pcidev.native: known answers, chaining,
and the C and pure-Python versions agreeing on arbitrary input."""

from __future__ import annotations

import os

import pytest

from pcidev import native

CHECK = b"123456789"
_IMPLS16 = [pytest.param(native.py_crc16_t10dif, id="python"), pytest.param(native.crc16_t10dif, id="selected")]
_IMPLS64 = [pytest.param(native.py_crc64_nvme, id="python"), pytest.param(native.crc64_nvme, id="selected")]


def test_the_extension_has_the_crcs():
    if native.BACKEND == "cffi":
        assert native.CRC_BACKEND == "cffi"


@pytest.mark.parametrize("crc16", _IMPLS16)
def test_crc16_t10dif_known_answers(crc16):
    assert crc16(CHECK) == 0xD0DB  # the catalogued check value of CRC-16/T10-DIF
    assert crc16(b"") == 0
    assert crc16(bytes(512)) == 0  # initial value 0, no final XOR: zeros give zero
    assert crc16(b"\xff" * 32) == crc16(memoryview(bytearray(b"\xff" * 32)))


@pytest.mark.parametrize("crc64", _IMPLS64)
def test_crc64_nvme_known_answers(crc64):
    assert crc64(CHECK) == 0xAE8B14860A799888  # the catalogued check value of CRC-64/NVME
    assert crc64(b"") == 0
    # NVMe NVM Command Set spec, 64b CRC test cases: 4 KiB of 00h and of FFh
    assert crc64(bytes(4096)) == 0x6482D367EB22B64E
    assert crc64(b"\xff" * 4096) == 0xC0DDBA7302ECA3AC


@pytest.mark.parametrize(("c", "py"), [(native.crc16_t10dif, native.py_crc16_t10dif),
                                       (native.crc64_nvme, native.py_crc64_nvme)])
def test_chaining_and_agreement(c, py):
    for n in (1, 7, 512, 4104):
        data = os.urandom(n)
        whole = c(data)
        assert whole == py(data)
        cut = n // 3
        assert c(data[cut:], c(data[:cut])) == whole
        assert py(memoryview(data)[cut:], py(memoryview(data)[:cut])) == whole
