"""Directive Send (19h) / Directive Receive (1Ah): the Identify directive's Return
Parameters, and the specification's refusals (OACS bit 5)."""

from __future__ import annotations

import struct

import pytest
from _helpers import expect_status

from pcidev_nvme.directives import return_parameters
from pcidev_nvme.status import Status

SEND, RECEIVE = 0x19, 0x1A


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=4M,capacity=64M,max_namespaces=4", io_queues=1)


def _receive(drv, *, doper=1, dtype=0, nsid=1, length=4096, dspec=0):
    return drv.admin(RECEIVE, nsid=nsid, cdw10=length // 4 - 1, cdw11=doper | dtype << 8 | dspec << 16,
                     length=length, check=False)


def test_oacs_and_effects_advertise_directives(env):
    drv = env.drv
    assert struct.unpack_from("<H", drv.identify(0x01), 256)[0] & (1 << 5)
    effects = drv.get_log(0x05, 4096)
    for opc in (SEND, RECEIVE):
        assert struct.unpack_from("<I", effects, 4 * opc)[0] == 1  # supported, no side effects


def test_return_parameters(env):
    drv = env.drv
    comp = _receive(drv)
    assert comp.ok
    data = comp.tag
    assert data == return_parameters()
    supported, enabled, persistent = (struct.unpack_from("<8I", data, off) for off in (0, 32, 64))
    assert supported == enabled == persistent == (1, 0, 0, 0, 0, 0, 0, 0)  # Identify only, always on
    assert data[96:] == bytes(4096 - 96)
    assert _receive(drv, nsid=0xFFFFFFFF).tag == data  # every namespace: the same
    assert _receive(drv, length=64).tag == data[:64]  # NUMD truncates


def test_receive_refusals(env):
    drv = env.drv
    for dtype in (0x01, 0x02, 0xFF):  # Streams, Data Placement, reserved
        expect_status(drv, Status.INVALID_FIELD, RECEIVE, nsid=1, cdw10=1023, cdw11=1 | dtype << 8, length=4096,
                      param=45)
    for doper in (0x00, 0x02, 0xFF):
        expect_status(drv, Status.INVALID_FIELD, RECEIVE, nsid=1, cdw10=1023, cdw11=doper, length=4096, param=44)
    for nsid in (0, 2, 5):  # 2: valid NSID, no namespace
        expect_status(drv, Status.INVALID_NSID, RECEIVE, nsid=nsid, cdw10=1023, cdw11=1, length=4096, param=4)
    expect_status(drv, Status.INVALID_FIELD, RECEIVE, nsid=1, cdw10=(1 << 20) - 1, cdw11=1, length=4096)  # > MDTS


def test_send_refusals(env):
    drv = env.drv
    # Enable Directive: the Identify directive cannot be disabled (nor enabled again)
    for endir in (0, 1):
        expect_status(drv, Status.INVALID_FIELD, SEND, nsid=1, cdw11=1, cdw12=endir, param=49)
    for tdtype in (0x01, 0x02, 0x10):  # Streams, Data Placement, reserved: not supported
        expect_status(drv, Status.INVALID_FIELD, SEND, nsid=1, cdw11=1, cdw12=1 | tdtype << 8, param=49)
        expect_status(drv, Status.INVALID_FIELD, SEND, nsid=0xFFFFFFFF, cdw11=1, cdw12=tdtype << 8, param=49)
    for dtype in (0x01, 0x02):  # operations of directive types that are not supported
        expect_status(drv, Status.INVALID_FIELD, SEND, nsid=1, cdw11=1 | dtype << 8, param=45)
    expect_status(drv, Status.INVALID_FIELD, SEND, nsid=1, cdw11=0x02, param=44)
    expect_status(drv, Status.INVALID_NSID, SEND, nsid=3, cdw11=1, cdw12=1 << 8, param=4)
    assert _receive(drv).tag == return_parameters()  # nothing changed


def test_return_parameters_follow_namespace_attachment(env):
    drv = env.drv
    ns = bytearray(4096)
    struct.pack_into("<QQ", ns, 0, 1024, 1024)
    nsid = drv.admin(0x0D, cdw10=0, data=bytes(ns)).dw0
    assert _receive(drv, nsid=nsid).code == Status.INVALID_NSID  # allocated, not active
    drv.admin(0x15, nsid=nsid, cdw10=0, data=struct.pack("<HH", 1, 0))
    assert _receive(drv, nsid=nsid).tag == return_parameters()
