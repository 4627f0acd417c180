"""Identify CNS 1Ah / 1Bh / 1Fh: the I/O command set specific allocated NSID list, the
I/O command set specific and the command set independent Identify Namespace of an
allocated namespace (attached or not), and CNS 1Ch with Set/Get Features 19h (I/O
Command Set Profile)."""

from __future__ import annotations

import struct

import pytest
from _helpers import expect_status

from pcidev_nvme.status import Status

IDENTIFY = 0x06
NS_MGMT, NS_ATTACH = 0x0D, 0x15
CTRL_LIST = struct.pack("<HH", 1, 0)


def _ns_data(nsze: int, flbas: int = 0) -> bytes:
    buf = bytearray(4096)
    struct.pack_into("<QQ", buf, 0, nsze, nsze)
    buf[26] = flbas
    return bytes(buf)


@pytest.fixture
def env(nvme_env):
    e = nvme_env("ns=mem:size=4M,capacity=64M,max_namespaces=4", io_queues=1)
    nsid = e.drv.admin(NS_MGMT, cdw10=0, data=_ns_data(2048, flbas=1)).dw0  # allocated, not attached
    assert nsid == 2
    return e


def _ids(page: bytes) -> list[int]:
    return [n for n in struct.unpack("<1024I", page) if n]


def test_allocated_nsid_list_for_the_nvm_command_set(env):
    drv = env.drv
    assert _ids(drv.identify(0x1A, csi=0)) == [1, 2]
    assert _ids(drv.identify(0x1A, nsid=1, csi=0)) == [2]  # NSIDs above CDW1.NSID
    assert _ids(drv.identify(0x1A, nsid=2, csi=0)) == []
    assert drv.identify(0x1A, csi=0) == drv.identify(0x10)
    assert _ids(drv.identify(0x07, csi=0)) == [1]  # the active list does not have it
    expect_status(drv, Status.INVALID_FIELD, IDENTIFY, cdw10=0x1A, cdw11=2 << 24, length=4096)  # zoned: no
    expect_status(drv, Status.INVALID_NSID, IDENTIFY, nsid=0xFFFFFFFE, cdw10=0x1A, length=4096)


def test_csi_identify_namespace_of_an_allocated_namespace(env):
    drv = env.drv
    assert drv.identify(0x05, nsid=2, csi=0) == bytes(4096)  # CNS 05h: active namespaces only
    nvm = drv.identify(0x1B, nsid=2, csi=0)
    assert nvm != bytes(4096)
    assert drv.identify(0x1B, nsid=3, csi=0) == bytes(4096)  # valid, not allocated
    expect_status(drv, Status.INVALID_FIELD, IDENTIFY, nsid=2, cdw10=0x1B, cdw11=2 << 24, length=4096)
    expect_status(drv, Status.INVALID_NSID, IDENTIFY, nsid=5, cdw10=0x1B, length=4096)
    drv.admin(NS_ATTACH, nsid=2, cdw10=0, data=CTRL_LIST)
    assert drv.identify(0x05, nsid=2, csi=0) == nvm  # the same structure once attached


def test_independent_identify_namespace_of_an_allocated_namespace(env):
    drv = env.drv
    assert drv.identify(0x08, nsid=2) == bytes(4096)
    idns = drv.identify(0x11, nsid=2)
    ind = drv.identify(0x1F, nsid=2)
    assert ind[0] == idns[24] and ind[1] == idns[30] and ind[3] == idns[32]  # NSFEAT NMIC FPI
    assert ind[14] & 1 == 0  # NSTAT: not attached, not ready
    assert drv.identify(0x1F, nsid=1)[14] & 1 == 1
    assert drv.identify(0x1F, nsid=1) == drv.identify(0x08, nsid=1)
    assert drv.identify(0x1F, nsid=4) == bytes(4096)
    expect_status(drv, Status.INVALID_NSID, IDENTIFY, nsid=0, cdw10=0x1F, length=4096)
    drv.admin(NS_ATTACH, nsid=2, cdw10=0, data=CTRL_LIST)
    assert drv.identify(0x1F, nsid=2)[14] & 1 == 1
    assert drv.identify(0x1F, nsid=2) == drv.identify(0x08, nsid=2)
    drv.admin(NS_ATTACH, nsid=2, cdw10=1, data=CTRL_LIST)
    drv.admin(NS_MGMT, nsid=2, cdw10=1)
    assert drv.identify(0x1F, nsid=2) == bytes(4096)
    assert drv.identify(0x1B, nsid=2, csi=0) == bytes(4096)


def test_command_set_profile_matches_the_io_command_set_vector(env):
    drv = env.drv
    vectors = struct.unpack("<512Q", drv.identify(0x1C))
    assert vectors[0] == 1 and not any(vectors[1:])  # combination 0: NVM only
    assert drv.get_features(0x19).dw0 & 0x1FF == 0
    assert drv.set_features(0x19, 0) == 0
    assert drv.get_features(0x19).dw0 & 0x1FF == 0
    assert drv.get_features(0x19, sel=1).dw0 == 0  # default
    assert drv.get_features(0x19, sel=3).dw0 & 0x4  # changeable
    expect_status(drv, Status.IOCS_COMBINATION_REJECTED, 0x09, cdw10=0x19, cdw11=1)
    expect_status(drv, Status.IOCS_COMBINATION_REJECTED, 0x09, cdw10=0x19, cdw11=0x1FF)
    expect_status(drv, Status.FEATURE_NOT_SAVEABLE, 0x09, cdw10=0x19 | 1 << 31)
    assert drv.get_features(0x19).dw0 & 0x1FF == 0
    fsupp = struct.unpack_from("<I", drv.get_log(0x12, 1024), 4 * 0x19)[0]
    assert fsupp & 1 and fsupp & (1 << 21)  # supported, controller scope
