"""Features of work package C: Interrupt Vector Configuration for every vector the
controller has, Write Atomicity Normal, Timestamp and Host Behavior Support, the
features not advertised, and the Feature Identifiers Supported and Effects log
(LID 12h) listing exactly the supported ones."""

from __future__ import annotations

import struct
import time

import pytest
from _helpers import expect_status
from test_migration_nvme import Host

from pcidev_nvme.features import FID_NAMES
from pcidev_nvme.status import Status

GET, SET = 0x0A, 0x09


@pytest.fixture
def env(nvme_env):
    return nvme_env("msix_vectors=8,max_ioqpairs=4,ns=mem:size=4M", io_queues=2)


def _iv(iv: int, cd: bool) -> int:
    """Get Features 09h DW0: vector 0 (the admin completion queue's) always reports CD."""
    return iv | (int(cd or iv == 0) << 16)


def test_interrupt_vector_configuration_for_every_vector(env):
    drv, ctrl = env.drv, env.ctrl
    nvec = ctrl.cfg.msix_vectors
    for iv in range(nvec):
        assert drv.get_features(0x09, cdw11=iv).dw0 == _iv(iv, False)  # CD clear by default (but vector 0)
    for iv in range(nvec):
        drv.set_features(0x09, iv | ((iv % 2) << 16))
    for iv in range(nvec):
        assert drv.get_features(0x09, cdw11=iv).dw0 == _iv(iv, bool(iv % 2))
        assert drv.get_features(0x09, cdw11=iv, sel=1).dw0 == _iv(iv, False)  # default
        assert drv.get_features(0x09, cdw11=iv, sel=3).dw0 & 0b100  # changeable
        assert iv == 0 or ctrl.interrupts.vector_cd(iv) == bool(iv % 2)
    expect_status(drv, Status.INVALID_FIELD, GET, cdw10=0x09, cdw11=nvec, param=44)
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x09, cdw11=nvec | (1 << 16), param=44)
    drv.disable()  # a reset clears them
    drv.restart()
    assert all(drv.get_features(0x09, cdw11=iv).dw0 == _iv(iv, False) for iv in range(nvec))


def test_write_atomicity_normal(env):
    drv = env.drv
    assert drv.get_features(0x0A).dw0 == 0
    drv.set_features(0x0A, 1)
    assert drv.get_features(0x0A).dw0 == 1
    assert drv.get_features(0x0A, sel=1).dw0 == 0
    assert drv.get_features(0x0A, sel=3).dw0 == 0b100
    drv.set_features(0x0A, 0xFFFFFFFE)  # reserved bits are ignored, DN = 0
    assert drv.get_features(0x0A).dw0 == 0
    expect_status(drv, Status.FEATURE_NOT_PER_NS, SET, nsid=1, cdw10=0x0A, cdw11=1, param=4)


def test_timestamp_and_host_behavior(env):
    drv = env.drv
    drv.set_features(0x0E, data=struct.pack("<Q", 1_000_000))
    time.sleep(0.02)
    ts = struct.unpack("<Q", drv.get_features(0x0E, length=8).tag)[0]
    assert 1_000_010 <= ts & (2**48 - 1) < 1_010_000
    assert (ts >> 49) & 7 == 1  # timestamp origin: set by Set Features
    hbs = bytes([1, 1, 0]) + bytes(509)
    drv.set_features(0x16, data=hbs)
    assert drv.get_features(0x16, length=512).tag == hbs
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, bytes([2]) + bytes(511))
    expect_status(drv, Status.INVALID_FIELD, SET, cdw10=0x16, buf=buf, length=512)


@pytest.mark.parametrize("fid", [0x03, 0x0C, 0x0D, 0x10, 0x11, 0x12, 0x13, 0x15, 0x17, 0x1A, 0x7F, 0x80])
def test_features_not_advertised_are_invalid(env, fid):
    expect_status(env.drv, Status.INVALID_FIELD, GET, cdw10=fid, param=40)
    expect_status(env.drv, Status.INVALID_FIELD, SET, cdw10=fid, param=40)


def test_supported_features_log_lists_exactly_the_supported(env):
    page = env.drv.get_log(0x12, 1024)
    entries = struct.unpack("<256I", page)
    supported = {fid for fid, e in enumerate(entries) if e & 1}
    assert supported == set(FID_NAMES)
    assert entries[0x05] >> 20 & 1  # error recovery: namespace scope
    assert entries[0x0A] >> 21 & 1 and not entries[0x0A] >> 20 & 1  # controller scope
    assert entries[0x07] & (1 << 4)  # number of queues: CCC
    for fid in supported:  # and each works
        env.drv.get_features(fid, cdw11=1 if fid == 0x18 else 0, nsid=1 if fid == 0x05 else 0,  # 18h: ENDGID 1
                             length={0x0E: 8, 0x16: 512}.get(fid, 0))


def test_write_atomicity_and_vector_settings_migrate():
    host = Host("serial=featm,msix_vectors=4,max_ioqpairs=2,ns=mem:size=1M", io_queues=1, aers=0)
    try:
        drv = host.drv
        drv.write(1, 0, b"\x33" * 4096)
        drv.set_features(0x0A, 1)
        drv.set_features(0x09, 3 | (1 << 16))
        host.migrate()
        assert drv.get_features(0x0A).dw0 == 1
        assert drv.get_features(0x09, cdw11=3).dw0 == 3 | (1 << 16)
        assert drv.read(1, 0, 8) == b"\x33" * 4096
    finally:
        host.close()
