"""Admin: Identify (CNS 00h, 01h, 02h, 03h, 05h, 06h, 07h, 08h, 10h-13h, 1Ch), and the
generic admin checks (opcode, fused, PSDT, data pointer) with their statuses."""

from __future__ import annotations

import struct

import pytest
from _helpers import expect_status

from pcidev_nvme import io as nvme_io
from pcidev_nvme.status import Status

IDENTIFY = 0x06


@pytest.fixture
def env(nvme_env):
    return nvme_env("serial=SN123,model=Test Model,mdts=5,ns=mem:size=8M,ns=mem:size=4M,lbaf=1,max_namespaces=32")


def ident(env, cns, nsid=0, csi=0, cntid=0):
    return env.drv.identify(cns, nsid=nsid, csi=csi, cntid=cntid)


def test_identify_controller(env):
    d = ident(env, 0x01)
    vid, ssvid = struct.unpack_from("<HH", d, 0)
    assert (vid, ssvid) == (0x1B36, 0x1AF4)
    assert d[4:24] == b"SN123".ljust(20)
    assert d[24:64] == b"Test Model".ljust(40)
    assert d[64:72] == b"1.0".ljust(8)
    assert d[77] == 5  # MDTS
    assert struct.unpack_from("<I", d, 80)[0] == 0x00020000  # VER
    # RTD3E covers the whole normal shutdown (drain of commands in flight, then the flush):
    # Linux waits max(RTD3E, 5 s) for CSTS.SHST before it calls the shutdown incomplete
    from pcidev_nvme.limits import SHUTDOWN_DRAIN_TIMEOUT

    assert struct.unpack_from("<I", d, 88)[0] > SHUTDOWN_DRAIN_TIMEOUT * 1_000_000
    assert d[111] == 1  # CNTRLTYPE: I/O controller
    oacs = struct.unpack_from("<H", d, 256)[0]
    assert oacs & 0b1110 == 0b1110 and oacs & (1 << 8)  # format, firmware, ns mgmt, dbbuf
    assert d[259] == 3  # AERL
    assert d[261] & 0b110 == 0b110  # LPA: effects, extended data
    assert d[262] == 63  # ELPE
    assert d[512] == 0x66 and d[513] == 0x44  # SQES CQES
    assert struct.unpack_from("<I", d, 516)[0] == 32  # NN
    oncs = struct.unpack_from("<H", d, 520)[0]
    assert oncs & nvme_io.ONCS == nvme_io.ONCS and oncs & (1 << 6)  # + timestamp
    assert d[525] & 1  # VWC present
    assert struct.unpack_from("<I", d, 536)[0] == nvme_io.SGLS
    assert d[768:768 + 32].startswith(b"nqn.")
    wctemp, cctemp = struct.unpack_from("<HH", d, 266)
    assert 0 < wctemp < cctemp
    tnvmcap = int.from_bytes(d[280:296], "little")
    unvmcap = int.from_bytes(d[296:312], "little")
    # 12 MiB allocated of 1 TiB; Namespace Management creates mem namespaces, of which the
    # default mem_create_limit (4 GiB) lets it create that much: UNVMCAP says what a create can take
    assert (tnvmcap, unvmcap) == (1 << 40, 4 << 30)


def test_identify_namespace_and_lists(env):
    ctrl = env.ctrl
    assert ident(env, 0x00, nsid=1) == ctrl.namespaces[1].identify()
    assert ident(env, 0x00, nsid=2) == ctrl.namespaces[2].identify()
    assert ident(env, 0x00, nsid=3) == bytes(4096)  # valid, inactive
    common = ident(env, 0x00, nsid=0xFFFFFFFF)
    assert common[25] >= 1 and struct.unpack_from("<Q", common, 0)[0] == 0
    lst = struct.unpack("<1024I", ident(env, 0x02))
    assert lst[:3] == (1, 2, 0)
    assert struct.unpack("<1024I", ident(env, 0x02, nsid=1))[:2] == (2, 0)
    assert struct.unpack("<1024I", ident(env, 0x07, csi=0))[:3] == (1, 2, 0)
    assert struct.unpack("<1024I", ident(env, 0x10))[:3] == (1, 2, 0)
    assert ident(env, 0x11, nsid=2) == ctrl.namespaces[2].identify()
    assert ident(env, 0x03, nsid=1) == ctrl.namespaces[1].id_descriptors()
    assert ident(env, 0x05, nsid=1, csi=0) == ctrl.namespaces[1].identify_csi_nvm()
    ind = ident(env, 0x08, nsid=1)
    assert ind[14] == 1  # NSTAT: ready
    ctl = ident(env, 0x06, csi=0)
    assert ctl[3] == min(nvme_io.DMRL, 255)
    assert struct.unpack_from("<I", ctl, 4)[0] == nvme_io.DMRSL
    assert struct.unpack_from("<H2H", ident(env, 0x12, nsid=1), 0)[:2] == (1, 0)
    assert struct.unpack_from("<H", ident(env, 0x12, nsid=3), 0)[0] == 0
    assert struct.unpack_from("<HH", ident(env, 0x13), 0) == (1, 0)
    assert struct.unpack_from("<H", ident(env, 0x13, cntid=1), 0)[0] == 0
    assert struct.unpack_from("<Q", ident(env, 0x1C), 0)[0] == 1


@pytest.mark.parametrize("cns, nsid, csi, status, param", [
    (0x00, 0, 0, Status.INVALID_NSID, 4),
    (0x00, 33, 0, Status.INVALID_NSID, 4),
    (0x02, 0xFFFFFFFE, 0, Status.INVALID_NSID, 4),
    (0x02, 0xFFFFFFFF, 0, Status.INVALID_NSID, 4),
    (0x03, 3, 0, Status.INVALID_NSID, 4),
    (0x03, 0, 0, Status.INVALID_NSID, 4),
    (0x05, 1, 2, Status.INVALID_FIELD, 47),
    (0x06, 0, 2, Status.INVALID_FIELD, 47),
    (0x07, 0, 1, Status.INVALID_FIELD, 47),
    (0x08, 0, 0, Status.INVALID_NSID, 4),
    (0x04, 0, 0, Status.INVALID_FIELD, 40),
    (0x1D, 0, 0, Status.INVALID_FIELD, 40),
    (0x1F, 0, 0, Status.INVALID_NSID, 4),
    (0x1B, 1, 2, Status.INVALID_FIELD, 47),
    (0x1A, 0, 1, Status.INVALID_FIELD, 47),
    (0xFF, 0, 0, Status.INVALID_FIELD, 40),
])
def test_identify_errors(env, cns, nsid, csi, status, param):
    buf = env.machine.alloc(4096)
    expect_status(env.drv, status, IDENTIFY, param=param, nsid=nsid, cdw10=cns, cdw11=csi << 24, buf=buf,
                  length=4096)


def test_generic_admin_errors(env):
    drv = env.drv
    buf = env.machine.alloc(8192)
    expect_status(drv, Status.INVALID_OPCODE, 0x03, param=0)
    expect_status(drv, Status.INVALID_OPCODE, 0xC1, param=0)
    expect_status(drv, Status.INVALID_FIELD, IDENTIFY, param=1, cdw10=1, flags=0x1, buf=buf, length=4096)
    expect_status(drv, Status.INVALID_FIELD, IDENTIFY, param=1, cdw10=1, flags=0x40, buf=buf, length=4096)
    # data pointer outside guest memory
    expect_status(drv, Status.DATA_TRANSFER_ERROR, IDENTIFY, cdw10=1, prp1=0x7F00_0000_0000)
    # PRP1 not dword aligned / PRP2 with an offset
    expect_status(drv, Status.PRP_OFFSET_INVALID, IDENTIFY, cdw10=1, prp1=buf + 2)
    expect_status(drv, Status.PRP_OFFSET_INVALID, IDENTIFY, cdw10=1, prp1=buf + 2048, prp2=buf + 4096 + 8)
    # a buffer that straddles a page boundary with a good PRP2 works
    before = env.machine.read(buf + 6144, 2048)
    drv.admin(IDENTIFY, cdw10=1, prp1=buf + 2048, prp2=buf + 4096)
    assert env.machine.read(buf + 2048, 20)[4:20] == b"SN123".ljust(16)
    assert env.machine.read(buf + 6144, 2048) == before  # nothing beyond 4096 bytes
    assert env.ctrl.csts & 0x3 == 0x1
