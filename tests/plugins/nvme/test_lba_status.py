"""Get LBA Status (admin 86h, pcidev_nvme.lba_status): allocated ranges from the
backend's extents (memory page map, SEEK_DATA/SEEK_HOLE on image files), the
Potentially Unrecoverable LBAs (Write Uncorrectable marks), MNDW / RL limits, the
descriptor format byte by byte, and the statuses."""

from __future__ import annotations

import struct

import pytest
from _helpers import expect_status

from pcidev_nvme.lba_status import CMPC_MNDW, CMPC_RANGE, LBARS_ALLOCATED, LBARS_ERR
from pcidev_nvme.status import Status

SIZE = 4 << 20
NLB = SIZE // 512


def decode(data: bytes) -> tuple[int, list[tuple[int, int, int]]]:
    nlsd, cmpc = struct.unpack_from("<IB", data)
    descs = []
    for i in range(nlsd):
        dslba, nlb, rsvd, status, rsvd2 = struct.unpack_from("<QIBBH", data, 8 + 16 * i)
        assert rsvd == rsvd2 == 0
        descs.append((dslba, nlb, status))
    return cmpc, descs


@pytest.fixture(params=["mem", "file"])
def env(request, nvme_env, tmp_path):
    spec = f"ns=mem:size={SIZE}" if request.param == "mem" else f"ns=file:path={tmp_path}/img,size={SIZE}"
    return nvme_env(spec)


def test_oacs_advertises_get_lba_status(env):
    assert struct.unpack_from("<H", env.drv.identify(1), 256)[0] & (1 << 9)


def test_allocated_ranges_follow_the_holes(env):
    drv = env.drv
    assert decode(drv.get_lba_status(1, 0, atype=0x02).tag) == (CMPC_RANGE, [])
    drv.write(1, 8, b"\x01" * 4096)  # blocks 8..15: one 4 KiB page
    drv.write(1, 1024, b"\x02" * 8192)  # 1024..1039
    cmpc, descs = decode(drv.get_lba_status(1, 0, atype=0x02).tag)
    assert cmpc == CMPC_RANGE
    assert descs == [(8, 8, LBARS_ALLOCATED), (1024, 16, LBARS_ALLOCATED)]
    # RL limits the range; SLBA in the middle of an extent clips it
    assert decode(drv.get_lba_status(1, 12, rl=100, atype=0x02).tag)[1] == [(12, 4, LBARS_ALLOCATED)]
    assert decode(drv.get_lba_status(1, 1030, atype=0x02).tag)[1] == [(1030, 10, LBARS_ALLOCATED)]
    # a deallocation makes a hole again
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, struct.pack("<IIQ", 0, 16, 1024))
    drv.io(1, 0x09, nsid=1, cdw10=0, cdw11=1 << 2, buf=buf, length=16)
    assert decode(drv.get_lba_status(1, 0, atype=0x02).tag)[1] == [(8, 8, LBARS_ALLOCATED)]


def test_potentially_unrecoverable_lbas(env):
    drv = env.drv
    drv.write_uncorrectable(1, 100, 10)
    drv.write_uncorrectable(1, 5000, 1)
    for atype in (0x10, 0x11):
        comp = drv.get_lba_status(1, 0, atype=atype)
        assert comp.tag[:40] == (struct.pack("<IB3x", 2, CMPC_RANGE) + struct.pack("<QIxB2x", 100, 10, LBARS_ERR)
                                 + struct.pack("<QIxB2x", 5000, 1, LBARS_ERR))
    assert decode(drv.get_lba_status(1, 105, rl=2).tag)[1] == [(105, 2, LBARS_ERR)]
    assert decode(drv.get_lba_status(1, 200, rl=100).tag)[1] == []
    drv.write(1, 100, bytes(5120))
    assert decode(drv.get_lba_status(1, 0).tag)[1] == [(5000, 1, LBARS_ERR)]


def test_mndw_cuts_the_list(env):
    drv = env.drv
    for i in range(5):
        drv.write_uncorrectable(1, 10 * i, 1)
    cmpc, descs = decode(drv.get_lba_status(1, 0, mndw=(8 + 2 * 16) // 4 - 1).tag)
    assert cmpc == CMPC_MNDW and descs == [(0, 1, LBARS_ERR), (10, 1, LBARS_ERR)]
    cmpc, descs = decode(drv.get_lba_status(1, 11, mndw=(8 + 2 * 16) // 4 - 1).tag)  # ask on from the last one
    assert cmpc == CMPC_MNDW and [d[0] for d in descs] == [20, 30]
    assert decode(drv.get_lba_status(1, 0, mndw=1).tag) == (CMPC_MNDW, [])  # the header only


def test_statuses(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_NSID, 0x86, nsid=5, cdw13=0x11 << 24, buf=drv.machine.alloc(4096, 4096),
                  length=64, param=4)
    expect_status(drv, Status.LBA_RANGE, 0x86, nsid=1, cdw10=NLB, cdw12=15, cdw13=0x11 << 24,
                  buf=drv.machine.alloc(4096, 4096), length=64, param=40)
    for atype in (0, 1, 3, 0x12, 0xFF):
        expect_status(drv, Status.INVALID_FIELD, 0x86, nsid=1, cdw12=15, cdw13=atype << 24,
                      buf=drv.machine.alloc(4096, 4096), length=64, param=55)


def test_rl_0_stops_once_mndw_is_full(nvme_env, monkeypatch):
    """RL = 0 (to the end of the namespace) with a small MNDW: the backend is asked about
    the front only, not about the whole namespace, and the answer is cut at MNDW."""
    env = nvme_env("ns=mem:size=1G")
    drv = env.drv
    for slba in range(0, 4096, 16):  # 256 allocated extents in the first 2 MiB
        drv.write(1, slba, b"\x01" * 512)
    backend = env.ctrl.namespaces[1].backend
    asked: list[int] = []
    real = backend.allocated_ranges

    def counting(offset, length):
        asked.append(length)
        return real(offset, length)

    monkeypatch.setattr(backend, "allocated_ranges", counting)
    cmpc, descs = decode(drv.get_lba_status(1, 0, mndw=(8 + 2 * 16) // 4 - 1, atype=0x02).tag)
    assert cmpc == CMPC_MNDW and [d[0] for d in descs] == [0, 16]
    assert sum(asked) <= 64 << 20  # one window of the 1 GiB namespace
    # the whole list when it fits: every extent, across the windows
    asked.clear()
    cmpc, descs = decode(drv.get_lba_status(1, 0, mndw=(8 + 300 * 16) // 4 - 1, atype=0x02).tag)
    assert cmpc == CMPC_RANGE and [d[0] for d in descs] == list(range(0, 4096, 16))
    assert sum(asked) == 1 << 30
