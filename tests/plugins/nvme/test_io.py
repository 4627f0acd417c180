"""The NVM I/O command set (pcidev_nvme.io) against a stand-in controller: every
command, every status, PRP and SGL data pointers, worker completions."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time

import pytest
from fakes import PAGE, FakeController, command, prp_for, rw

from pcidev_nvme.backends import BaseBackend
from pcidev_nvme.io import COPY_LIMITS, DMRL, DMRSL, MAX_DSM_RANGES, ONCS, SGLS, WZSL, IoCommandSet, Opcode
from pcidev_nvme.namespace import Namespace, make_namespace
from pcidev_nvme.prp import SGL_BIT_BUCKET, SGL_DATA_BLOCK, SGL_LAST_SEGMENT, sgl_descriptor
from pcidev_nvme.status import NvmeStatusError, Status

MiB = 1 << 20


@pytest.fixture(params=["mem", "file", "file-direct"])
def kind(request):
    return request.param


def spec_for(kind: str, tmp_path, name: str = "ns", size: str = "8M", extra: str = "") -> str:
    if kind == "mem":
        return f"mem:size={size}{extra}"
    if kind == "null":
        return f"null:size={size}{extra}"
    direct = ",direct=on" if kind == "file-direct" else ""
    return f"file:path={tmp_path}/{name}.img,size={size}{direct}{extra}"


@pytest.fixture
def env(kind, tmp_path):
    ctrl = FakeController(mdts_bytes=512 * 1024)
    ctrl.namespaces[1] = make_namespace(1, spec_for(kind, tmp_path))
    ios = IoCommandSet(ctrl)
    yield ctrl, ios
    ios.close()
    assert not ctrl.double, "a request was completed twice"
    ctrl.close()


def run(ctrl, ios, req):
    ios.submit(req)
    return ctrl.wait(req)


def ok(ctrl, ios, req):
    status, dw0, err = run(ctrl, ios, req)
    assert status == 0, err
    return dw0


def fails(ctrl, ios, req, expected):
    status, _dw0, err = run(ctrl, ios, req)
    assert status == expected, f"{Status(status).name if status in Status._value2member_map_ else status} ({err})"
    assert isinstance(err, NvmeStatusError)
    return err


def pattern(n: int, seed: int) -> bytes:
    return bytes(((i * 131 + seed * 7) >> 3) & 0xFF for i in range(n))


def write_blocks(ctrl, ios, slba: int, data: bytes, *, ns=1, fua=False):
    lba = ctrl.namespaces[ns].lba_size
    buf = ctrl.alloc(len(data))
    ctrl.memory.write(buf, data)
    p1, p2 = prp_for(ctrl, buf, len(data))
    ok(ctrl, ios, rw(Opcode.WRITE, slba, len(data) // lba, nsid=ns, prp1=p1, prp2=p2, fua=fua))


def read_blocks(ctrl, ios, slba: int, nlb: int, *, ns=1) -> bytes:
    n = nlb * ctrl.namespaces[ns].lba_size
    buf = ctrl.alloc(n)
    p1, p2 = prp_for(ctrl, buf, n)
    ok(ctrl, ios, rw(Opcode.READ, slba, nlb, nsid=ns, prp1=p1, prp2=p2))
    return ctrl.memory.read(buf, n)


# ------------------------------------------------------------------------------ constants


def test_exported_limits():
    assert ONCS & 0b1_1000_1111 == ONCS  # compare, write uncorrectable, DSM, write zeroes, verify, copy
    assert SGLS & 0x3 == 1 and SGLS & (1 << 16)
    mssrl, mcl, msrc = COPY_LIMITS
    assert mssrl <= mcl and msrc < 256
    assert DMRL == DMRSL == WZSL == 0  # "no limit" in CNS 06h
    assert MAX_DSM_RANGES == 256


# ------------------------------------------------------------------------------ read / write


@pytest.mark.parametrize("nlb", [1, 8, 9, 64, 1024])
def test_write_read_roundtrip_prp(env, nlb):
    ctrl, ios = env
    data = pattern(nlb * 512, nlb)
    write_blocks(ctrl, ios, 100, data)
    assert read_blocks(ctrl, ios, 100, nlb) == data
    # neighbours untouched
    assert read_blocks(ctrl, ios, 99, 1) == bytes(512)
    assert read_blocks(ctrl, ios, 100 + nlb, 1) == bytes(512)


def test_prp1_with_offset(env):
    ctrl, ios = env
    data = pattern(3 * 512, 3)
    buf = ctrl.alloc(2 * PAGE) + PAGE - 512  # straddles a page boundary
    ctrl.memory.write(buf, data)
    p2 = (buf + 512) & ~(PAGE - 1)
    ok(ctrl, ios, rw(Opcode.WRITE, 7, 3, prp1=buf, prp2=p2))
    assert read_blocks(ctrl, ios, 7, 3) == data


def test_read_write_with_sgl(env):
    ctrl, ios = env
    data = pattern(4096, 11)
    a, b = ctrl.alloc(PAGE), ctrl.alloc(PAGE)
    ctrl.memory.write(a + 100, data[:1000])
    ctrl.memory.write(b + 3, data[1000:])
    seg = ctrl.alloc(64)
    ctrl.memory.write(
        seg, sgl_descriptor(a + 100, 1000, SGL_DATA_BLOCK) + sgl_descriptor(b + 3, 3096, SGL_DATA_BLOCK)
    )
    last = sgl_descriptor(seg, 32, SGL_LAST_SEGMENT)
    ok(ctrl, ios, rw(Opcode.WRITE, 40, 8, flags=1 << 6, dptr=last))
    assert read_blocks(ctrl, ios, 40, 8) == data
    # Read back through an SGL with a bit bucket in the middle.
    out = ctrl.alloc(PAGE)
    ctrl.memory.fill(out, PAGE, 0xEE)
    ctrl.memory.write(
        seg,
        sgl_descriptor(out, 1024, SGL_DATA_BLOCK)
        + sgl_descriptor(0, 2048, SGL_BIT_BUCKET)
        + sgl_descriptor(out + 1024, 1024, SGL_DATA_BLOCK),
    )
    ok(ctrl, ios, rw(Opcode.READ, 40, 8, flags=2 << 6, dptr=sgl_descriptor(seg, 48, SGL_LAST_SEGMENT)))
    got = ctrl.memory.read(out, PAGE)
    assert got[:1024] == data[:1024]
    assert got[1024:2048] == data[3072:]
    assert got[2048:] == b"\xee" * 2048


def test_sgl_bit_bucket_refused_for_write(env):
    ctrl, ios = env
    fails(ctrl, ios, rw(Opcode.WRITE, 0, 1, flags=1 << 6, dptr=sgl_descriptor(0, 512, SGL_BIT_BUCKET)),
          Status.SGL_DESCR_TYPE_INVALID)


def test_fua_write(env):
    ctrl, ios = env
    data = pattern(4096, 5)
    write_blocks(ctrl, ios, 8, data, fua=True)
    assert read_blocks(ctrl, ios, 8, 8) == data


def _record_durability(monkeypatch):
    """Record pwritev flags and fdatasync calls (the file backend's two ways to be durable)."""
    calls = []
    real_fdatasync, real_pwritev = os.fdatasync, os.pwritev

    def pwritev(fd, bufs, offset, flags=0):
        calls.append(("pwritev", flags))
        return real_pwritev(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(("fdatasync", 0)), real_fdatasync(fd))[1])
    monkeypatch.setattr(os, "pwritev", pwritev)
    return calls


def test_fua_write_reaches_stable_storage_through_the_command_set(tmp_path, monkeypatch):
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"file:path={tmp_path}/fua.img,size=1M")
    ios = IoCommandSet(ctrl)
    calls = _record_durability(monkeypatch)
    try:
        write_blocks(ctrl, ios, 8, pattern(4096, 5), fua=True)
        assert calls == [("pwritev", os.RWF_DSYNC)]
        calls.clear()
        write_blocks(ctrl, ios, 8, pattern(4096, 6))
        # the volatile write cache is on: no sync (tried without waiting first, maybe
        # finished by a worker)
        assert calls and all(c == "pwritev" and not f & os.RWF_DSYNC for c, f in calls)
    finally:
        ios.close()
        ctrl.close()


def test_write_cache_disabled_makes_every_write_durable(tmp_path, monkeypatch):
    """Feature 06h with WCE cleared (the controller's ``volatile_write_cache`` is False):
    Write, Write Zeroes, Dataset Management deallocate and Copy reach stable storage
    before they complete, FUA or not."""
    ctrl = FakeController()
    ctrl.volatile_write_cache = False
    ctrl.namespaces[1] = make_namespace(1, f"file:path={tmp_path}/wt.img,size=1M")
    ios = IoCommandSet(ctrl)
    calls = _record_durability(monkeypatch)
    try:
        write_blocks(ctrl, ios, 0, pattern(8192, 1))
        assert calls == [("pwritev", os.RWF_DSYNC)]
        calls.clear()
        ok(ctrl, ios, rw(Opcode.WRITE_ZEROES, 0, 2))
        assert calls and calls[-1] == ("fdatasync", 0)
        calls.clear()
        ok(ctrl, ios, dsm(ctrl, [(4, 4)]))
        assert calls and calls[-1] == ("fdatasync", 0)
        calls.clear()
        ok(ctrl, ios, copy_cmd(ctrl, 100, [(8, 4)]))
        assert calls == [("pwritev", os.RWF_DSYNC)]
        assert read_blocks(ctrl, ios, 100, 4) == pattern(8192, 1)[8 * 512 : 12 * 512]
        # Cache back on: ordinary writes are not synced.
        ctrl.volatile_write_cache = True
        calls.clear()
        write_blocks(ctrl, ios, 0, pattern(512, 2))
        assert calls and all(c == "pwritev" and not f & os.RWF_DSYNC for c, f in calls)
    finally:
        ios.close()
        ctrl.close()


def test_write_cache_feature_through_the_software_host(tmp_path, monkeypatch):
    """End to end: Set Features 06h WCE=0 through the driver, then a plain Write is durable."""
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing.driver import NvmeDriver

    machine = Machine(ram_size=32 << 20)
    ctrl = NvmeController(f"ns=file:path={tmp_path}/e2e.img,size=1M")
    drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
    try:
        calls = _record_durability(monkeypatch)
        drv.write(1, 0, pattern(4096, 3))
        assert calls and all(c == "pwritev" and not f & os.RWF_DSYNC for c, f in calls)
        drv.set_features(0x06, 0)
        calls.clear()
        drv.write(1, 8, pattern(4096, 4))
        assert ("pwritev", os.RWF_DSYNC) in calls
        assert drv.read(1, 8, 8) == pattern(4096, 4)
    finally:
        drv.close()
        ctrl.close()
        machine.close()


def test_lba_range(env):
    ctrl, ios = env
    nlbas = ctrl.namespaces[1].nlbas
    buf = ctrl.alloc(PAGE)
    for slba, nlb in [(nlbas, 1), (nlbas - 1, 2), ((1 << 64) - 1, 1), (nlbas - 8, 9)]:
        for op in (Opcode.READ, Opcode.WRITE, Opcode.COMPARE, Opcode.VERIFY, Opcode.WRITE_ZEROES):
            err = fails(ctrl, ios, rw(op, slba, nlb, prp1=buf), Status.LBA_RANGE)
            assert err.lba == slba and err.param_offset == 40
    ok(ctrl, ios, rw(Opcode.READ, nlbas - 8, 8, prp1=buf))  # the last blocks are fine


def test_mdts(env):
    ctrl, ios = env
    buf = ctrl.alloc(2 * MiB)
    p1, p2 = prp_for(ctrl, buf, 512 * 1024 + 512)
    err = fails(ctrl, ios, rw(Opcode.READ, 0, 1025, prp1=p1, prp2=p2), Status.INVALID_FIELD)
    assert err.param_offset == 48
    p1, p2 = prp_for(ctrl, buf, 512 * 1024)
    ok(ctrl, ios, rw(Opcode.READ, 0, 1024, prp1=p1, prp2=p2))


@pytest.mark.parametrize("nsid", [0, 2, 0xFFFFFFFE, 0xFFFFFFFF])
def test_invalid_namespace(env, nsid):
    ctrl, ios = env
    for op in (Opcode.READ, Opcode.WRITE, Opcode.DSM, Opcode.COPY, Opcode.VERIFY):
        err = fails(ctrl, ios, rw(op, 0, 1, nsid=nsid, prp1=ctrl.alloc(PAGE)), Status.INVALID_NSID)
        assert err.param_offset == 4


@pytest.mark.parametrize("opcode", [0x03, 0x06, 0x0D, 0x11, 0x7F, 0x80, 0xFF])
def test_invalid_opcode(env, opcode):
    ctrl, ios = env
    err = fails(ctrl, ios, command(opcode), Status.INVALID_OPCODE)
    assert err.param_offset == 0


def test_fused_and_reserved_psdt(env):
    ctrl, ios = env
    buf = ctrl.alloc(PAGE)
    for flags in (1, 2, 3 << 6):
        fails(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf, flags=flags), Status.INVALID_FIELD)


def test_data_pointer_outside_memory(env):
    ctrl, ios = env
    write_blocks(ctrl, ios, 0, pattern(1024, 1))
    for p1, p2 in ((ctrl.ram, 0), (ctrl.ram - 512, ctrl.ram), (1 << 62, 0), (ctrl.ram - 512, 1 << 63)):
        err = fails(ctrl, ios, rw(Opcode.READ, 0, 2, prp1=p1, prp2=p2), Status.DATA_TRANSFER_ERROR)
        assert err.param_offset == 24
        fails(ctrl, ios, rw(Opcode.WRITE, 0, 2, prp1=p1, prp2=p2), Status.DATA_TRANSFER_ERROR)
    # A write whose second page is outside memory changes nothing.
    first = ctrl.alloc(PAGE)
    ctrl.memory.fill(first, PAGE, 0x55)
    fails(ctrl, ios, rw(Opcode.WRITE, 0, 16, prp1=first, prp2=ctrl.ram), Status.DATA_TRANSFER_ERROR)
    assert read_blocks(ctrl, ios, 0, 2) == pattern(1024, 1)


def test_bus_mastering_off(env):
    ctrl, ios = env
    buf = ctrl.alloc(PAGE)
    ctrl.bus_master = False
    fails(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf), Status.DATA_TRANSFER_ERROR)
    fails(ctrl, ios, rw(Opcode.WRITE, 0, 1, prp1=buf), Status.DATA_TRANSFER_ERROR)
    ctrl.bus_master = True


def test_prp_offset_invalid(env):
    ctrl, ios = env
    buf = ctrl.alloc(3 * PAGE)
    fails(ctrl, ios, rw(Opcode.READ, 0, 16, prp1=buf, prp2=buf + PAGE + 8), Status.PRP_OFFSET_INVALID)
    fails(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf + 2), Status.PRP_OFFSET_INVALID)


def test_smart_counters(env):
    ctrl, ios = env
    smart = ctrl.smart
    r0, w0 = smart.host_read_commands, smart.host_write_commands
    write_blocks(ctrl, ios, 0, pattern(4096, 2))
    read_blocks(ctrl, ios, 0, 8)
    read_blocks(ctrl, ios, 0, 1)
    assert smart.host_write_commands == w0 + 1
    assert smart.host_read_commands == r0 + 2
    assert smart.bytes_written >= 4096 and smart.bytes_read >= 4608
    fails(ctrl, ios, rw(Opcode.READ, 1 << 40, 1, prp1=ctrl.alloc(PAGE)), Status.LBA_RANGE)
    assert smart.host_read_commands == r0 + 2  # failed commands do not count


# ------------------------------------------------------------------------------ flush


def test_flush_and_broadcast(env, monkeypatch):
    ctrl, ios = env
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    write_blocks(ctrl, ios, 0, pattern(512, 9))
    ok(ctrl, ios, command(Opcode.FLUSH, 1))
    ok(ctrl, ios, command(Opcode.FLUSH, 0xFFFFFFFF))
    if getattr(ctrl.namespaces[1].backend, "fd", -1) >= 0 and ctrl.namespaces[1].backend.kind == "file":
        assert len(calls) == 2
    fails(ctrl, ios, command(Opcode.FLUSH, 0), Status.INVALID_NSID)
    fails(ctrl, ios, command(Opcode.FLUSH, 7), Status.INVALID_NSID)


# ------------------------------------------------------------------------------ write zeroes


def test_write_zeroes(env):
    ctrl, ios = env
    ns = ctrl.namespaces[1]
    write_blocks(ctrl, ios, 0, pattern(64 * 1024, 4))
    used = ns.nuse()
    ok(ctrl, ios, rw(Opcode.WRITE_ZEROES, 8, 8))
    got = read_blocks(ctrl, ios, 0, 128)
    assert got[: 8 * 512] == pattern(64 * 1024, 4)[: 8 * 512]
    assert got[8 * 512 : 16 * 512] == bytes(4096)
    assert got[16 * 512 :] == pattern(64 * 1024, 4)[16 * 512 :]
    # DEAC: deallocated, reads zeros, NUSE drops
    ok(ctrl, ios, rw(Opcode.WRITE_ZEROES, 64, 64, cdw12_extra=1 << 25))
    assert read_blocks(ctrl, ios, 64, 64) == bytes(64 * 512)
    assert ns.nuse() <= used - 64
    # Write Zeroes is not limited by MDTS (4 MiB > 512 KiB)
    ok(ctrl, ios, rw(Opcode.WRITE_ZEROES, 0, 8192, fua=True))
    assert read_blocks(ctrl, ios, 0, 8) == bytes(4096)


# ------------------------------------------------------------------------------ dataset management


def dsm(ctrl, ranges, *, ad=True, nsid=1):
    buf = ctrl.alloc(16 * len(ranges))
    ctrl.memory.write(buf, b"".join(struct.pack("<IIQ", 0, nlb, slba) for slba, nlb in ranges))
    p1, p2 = prp_for(ctrl, buf, 16 * len(ranges))
    return command(Opcode.DSM, nsid, prp1=p1, prp2=p2, cdw10=len(ranges) - 1, cdw11=(1 << 2) if ad else 0)


def test_dsm_deallocate(env, kind):
    ctrl, ios = env
    ns = ctrl.namespaces[1]
    data = pattern(256 * 1024, 6)
    write_blocks(ctrl, ios, 0, data)
    used = ns.nuse()
    ok(ctrl, ios, dsm(ctrl, [(0, 8), (64, 64), (500, 0)]))
    got = read_blocks(ctrl, ios, 0, 512)
    assert got[:4096] == bytes(4096)
    assert got[4096 : 64 * 512] == data[4096 : 64 * 512]
    assert got[64 * 512 : 128 * 512] == bytes(64 * 512)
    assert got[128 * 512 :] == data[128 * 512 :]
    assert ns.nuse() == used - 72
    if kind.startswith("file"):
        fd = ns.backend.fd
        assert os.lseek(fd, 64 * 512, os.SEEK_HOLE) == 64 * 512  # a real hole in the file
    # Without AD it is only a hint: nothing changes.
    ok(ctrl, ios, dsm(ctrl, [(8, 8)], ad=False))
    assert read_blocks(ctrl, ios, 8, 8) == data[4096:8192]


def test_dsm_range_checks(env):
    ctrl, ios = env
    ns = ctrl.namespaces[1]
    data = pattern(4096, 8)
    write_blocks(ctrl, ios, 0, data)
    err = fails(ctrl, ios, dsm(ctrl, [(0, 8), (ns.nlbas - 1, 2)]), Status.LBA_RANGE)
    assert err.lba == ns.nlbas - 1
    assert read_blocks(ctrl, ios, 0, 8) == data  # validated before anything was deallocated
    ok(ctrl, ios, dsm(ctrl, [(i, 1) for i in range(MAX_DSM_RANGES)]))  # NR = 255, the maximum
    fails(ctrl, ios, command(Opcode.DSM, 1, prp1=ctrl.ram, cdw10=0, cdw11=4), Status.DATA_TRANSFER_ERROR)


# ------------------------------------------------------------------------------ compare / verify


def test_compare(env):
    ctrl, ios = env
    data = pattern(8192, 12)
    write_blocks(ctrl, ios, 32, data)
    buf = ctrl.alloc(8192)
    ctrl.memory.write(buf, data)
    p1, p2 = prp_for(ctrl, buf, 8192)
    ok(ctrl, ios, rw(Opcode.COMPARE, 32, 16, prp1=p1, prp2=p2))
    ctrl.memory.write(buf + 5 * 512 + 17, b"\x00" if data[5 * 512 + 17] else b"\x01")
    err = fails(ctrl, ios, rw(Opcode.COMPARE, 32, 16, prp1=p1, prp2=p2), Status.COMPARE_FAILURE)
    assert err.lba == 37


def test_verify(env):
    ctrl, ios = env
    ok(ctrl, ios, rw(Opcode.VERIFY, 0, 65536 if ctrl.namespaces[1].nlbas >= 65536 else 8))
    ok(ctrl, ios, rw(Opcode.VERIFY, ctrl.namespaces[1].nlbas - 1, 1))


# ------------------------------------------------------------------------------ copy


def copy_cmd(ctrl, sdlba, ranges, *, desfmt=0, nsid=1, fua=False):
    buf = ctrl.alloc(32 * len(ranges))
    ctrl.memory.write(buf, b"".join(struct.pack("<8xQH14x", slba, nlb - 1) for slba, nlb in ranges))
    p1, p2 = prp_for(ctrl, buf, 32 * len(ranges))
    cdw12 = (len(ranges) - 1) | desfmt << 8 | ((1 << 30) if fua else 0)
    return command(Opcode.COPY, nsid, prp1=p1, prp2=p2, cdw10=sdlba & 0xFFFFFFFF, cdw11=sdlba >> 32,
                   cdw12=cdw12)


def test_copy(env):
    ctrl, ios = env
    data = pattern(32 * 512, 13)
    write_blocks(ctrl, ios, 0, data)
    ok(ctrl, ios, copy_cmd(ctrl, 1000, [(0, 4), (20, 8), (4, 1)], fua=True))
    want = data[: 4 * 512] + data[20 * 512 : 28 * 512] + data[4 * 512 : 5 * 512]
    assert read_blocks(ctrl, ios, 1000, 13) == want
    # Overlapping source and destination: the source is read first.
    ok(ctrl, ios, copy_cmd(ctrl, 2, [(0, 8)]))
    assert read_blocks(ctrl, ios, 2, 8) == data[: 8 * 512]


def test_copy_limits_and_errors(env):
    ctrl, ios = env
    ns = ctrl.namespaces[1]
    mssrl, mcl, msrc = COPY_LIMITS
    fails(ctrl, ios, copy_cmd(ctrl, 0, [(0, 1)] * (msrc + 2)), Status.CMD_SIZE_LIMIT_EXCEEDED)
    fails(ctrl, ios, copy_cmd(ctrl, 0, [(0, mssrl + 1)]), Status.CMD_SIZE_LIMIT_EXCEEDED)
    fails(ctrl, ios, copy_cmd(ctrl, 0, [(0, mssrl)] * (mcl // mssrl + 1)), Status.CMD_SIZE_LIMIT_EXCEEDED)
    fails(ctrl, ios, copy_cmd(ctrl, 0, [(0, 1)], desfmt=4), Status.INVALID_FIELD)  # not in OCFS
    fails(ctrl, ios, copy_cmd(ctrl, 0, [(0, 1)], desfmt=2), Status.INVALID_FIELD)  # not enabled (CDFE)
    fails(ctrl, ios, copy_cmd(ctrl, 0, [(0, 1)], desfmt=1), Status.INVALID_FORMAT)  # the 64b Guard's format
    err = fails(ctrl, ios, copy_cmd(ctrl, ns.nlbas - 2, [(0, 4)]), Status.LBA_RANGE)
    assert err.lba == ns.nlbas - 2
    err = fails(ctrl, ios, copy_cmd(ctrl, 0, [(ns.nlbas, 1)]), Status.LBA_RANGE)
    assert err.lba == ns.nlbas
    ok(ctrl, ios, copy_cmd(ctrl, 0, [(0, mssrl)] * (mcl // mssrl)))


# ------------------------------------------------------------------------------ read-only


def test_read_only_namespace(tmp_path):
    make_namespace(1, f"file:path={tmp_path}/ro.img,size=1M").close()
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"file:path={tmp_path}/ro.img,readonly=on")
    ios = IoCommandSet(ctrl)
    try:
        buf = ctrl.alloc(PAGE)
        for req in (
            rw(Opcode.WRITE, 0, 1, prp1=buf),
            rw(Opcode.WRITE_ZEROES, 0, 1),
            dsm(ctrl, [(0, 1)]),
            copy_cmd(ctrl, 8, [(0, 1)]),
        ):
            fails(ctrl, ios, req, Status.NS_WRITE_PROTECTED)
        ok(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf))
        ok(ctrl, ios, dsm(ctrl, [(0, 1)], ad=False))
    finally:
        ios.close()
        ctrl.close()


# ------------------------------------------------------------------------------ backends that fail


class FailingBackend(BaseBackend):
    kind = "failing"

    def __init__(self, exc, inline=False):
        super().__init__(1 * MiB)
        self.exc = exc
        self.inline = inline

    def readv(self, views, offset):
        raise self.exc

    def writev(self, views, offset, *, fua=False):
        raise self.exc


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize(
    ("exc", "read_status", "write_status", "media"),
    [
        (OSError(errno.EIO, "bad sector"), Status.UNRECOVERED_READ_ERROR, Status.WRITE_FAULT, True),
        (OSError(errno.ENOSPC, "full"), Status.CAP_EXCEEDED, Status.CAP_EXCEEDED, False),
        (RuntimeError("plugin bug"), Status.INTERNAL, Status.INTERNAL, False),
        (OSError(errno.EINVAL, "odd"), Status.INTERNAL, Status.INTERNAL, False),
        # (an NBD server refusing a write: the export went read-only)
        (OSError(errno.EPERM, "not permitted"), Status.INTERNAL, Status.NS_WRITE_PROTECTED, False),
    ],
)
def test_backend_failures_become_statuses(inline, exc, read_status, write_status, media):
    ctrl = FakeController()
    ctrl.namespaces[1] = Namespace(1, FailingBackend(exc, inline))
    ios = IoCommandSet(ctrl)
    try:
        buf = ctrl.alloc(PAGE)
        before = ctrl.smart.media_errors
        fails(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf), read_status)
        fails(ctrl, ios, rw(Opcode.WRITE, 0, 1, prp1=buf), write_status)
        assert ctrl.smart.media_errors == before + (2 if media else 0)
        ok(ctrl, ios, command(Opcode.FLUSH, 1))  # the controller keeps working
    finally:
        ios.close()
        ctrl.close()


class FailingFlushBackend(BaseBackend):
    kind = "failing-flush"

    def __init__(self, exc):
        super().__init__(1 * MiB)
        self.exc = exc

    def readv(self, views, offset):
        for v in views:
            v[:] = bytes(len(v))

    def writev(self, views, offset, *, fua=False):
        pass

    def flush(self):
        raise self.exc


@pytest.mark.parametrize("err", [errno.EPERM, errno.EROFS])
def test_a_flush_refused_as_not_permitted_is_a_write_fault(err):
    """A Flush the backend refuses with EPERM/EROFS did not make earlier writes durable: Write
    Fault, not Namespace is Write Protected (which only commands a write-protected namespace
    prohibits get; Flush is not one of them). Before: Namespace is Write Protected."""
    ctrl = FakeController()
    ctrl.namespaces[1] = Namespace(1, FailingFlushBackend(OSError(err, "refused")))
    ios = IoCommandSet(ctrl)
    try:
        fails(ctrl, ios, command(Opcode.FLUSH, 1), Status.WRITE_FAULT)
    finally:
        ios.close()
        ctrl.close()


# ------------------------------------------------------------------------------ workers


class GatedBackend(BaseBackend):
    """Reads of LBA 0 wait for a gate; everything else is immediate."""

    kind = "gated"
    inline = False

    def __init__(self):
        super().__init__(1 * MiB)
        self.gate = threading.Event()

    def readv(self, views, offset):
        if offset == 0:
            assert self.gate.wait(5)
        for v in views:
            v[:] = bytes(len(v))

    def writev(self, views, offset, *, fua=False):
        pass


def test_slow_backend_completes_out_of_order_without_blocking_submit():
    ctrl = FakeController()
    backend = GatedBackend()
    ctrl.namespaces[1] = Namespace(1, backend)
    ios = IoCommandSet(ctrl)
    try:
        buf = ctrl.alloc(PAGE)
        slow = rw(Opcode.READ, 0, 1, prp1=buf, cid=1)
        fast = rw(Opcode.READ, 8, 1, prp1=buf, cid=2)
        t0 = time.monotonic()
        ios.submit(slow)
        ios.submit(fast)
        assert time.monotonic() - t0 < 0.5  # submit never waits for the backend
        assert ctrl.wait(fast)[0] == 0
        assert id(slow) not in ctrl.results
        # (the worker leaves the in-flight set just after it posted: CI caught the gap)
        deadline = time.monotonic() + 5
        while ios.inflight != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert ios.inflight == 1
        backend.gate.set()
        assert ctrl.wait(slow)[0] == 0
        ios.drain()
        assert ios.inflight == 0
        assert ctrl.order[-2:] == [2, 1]
    finally:
        backend.gate.set()
        ios.close()
        ctrl.close()


def test_drain_with_a_deadline_names_the_namespaces_and_the_oldest_command():
    """A command stuck in the backend: the drain gives up at its deadline (the command goes
    on), naming its namespace, the oldest command and how long it has waited."""
    from pcidev.errors import QuiesceTimeoutError

    ctrl = FakeController()
    backend = GatedBackend()
    ctrl.namespaces[1] = Namespace(1, backend)
    ctrl.namespaces[2] = Namespace(2, GatedBackend())
    ios = IoCommandSet(ctrl)
    try:
        buf = ctrl.alloc(PAGE)
        oldest = rw(Opcode.READ, 0, 1, prp1=buf, cid=7)
        oldest.sqid = 3
        ios.submit(oldest)
        time.sleep(0.05)
        ios.submit(rw(Opcode.READ, 0, 1, prp1=buf, cid=8, nsid=2))
        assert ios.describe_busy().startswith("2 command(s) on namespace(s) 1, 2; the oldest, a Read of namespace 1 "
                                              "(CID 7 on SQ 3), has waited ")
        t0 = time.monotonic()
        with pytest.raises(QuiesceTimeoutError, match=r"backend I/O in flight .* namespace\(s\) 1, 2") as info:
            ios.drain(time.monotonic() + 0.2)
        assert 0.2 <= time.monotonic() - t0 < 3
        waited = float(str(info.value).split("has waited ")[1].split(" s")[0])
        assert waited >= 0.25  # (submitted 0.05 s before the 0.2 s drain began)
        assert ios.inflight == 2  # they go on
        backend.gate.set()
        ctrl.namespaces[2].backend.gate.set()
        ios.drain(time.monotonic() + 5)
        assert ios.inflight == 0 and ios.describe_busy() == ""
        assert ctrl.wait(oldest)[0] == 0
    finally:
        backend.gate.set()
        ctrl.namespaces[2].backend.gate.set()
        ios.close()
        ctrl.close()


def test_close_then_submit_fails_cleanly(tmp_path):
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"file:path={tmp_path}/c.img,size=1M")
    ios = IoCommandSet(ctrl)
    buf = ctrl.alloc(PAGE)
    ok(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf))
    ios.close()
    fails(ctrl, ios, rw(Opcode.READ, 0, 1, prp1=buf), Status.INTERNAL)
    ios.close()  # idempotent
    ctrl.close()


def test_null_namespace_reads_zeros():
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, "null:size=1G")
    ios = IoCommandSet(ctrl)
    try:
        buf = ctrl.alloc(PAGE)
        ctrl.memory.fill(buf, PAGE, 0xAA)
        ok(ctrl, ios, rw(Opcode.WRITE, 5, 8, prp1=buf))
        ok(ctrl, ios, rw(Opcode.READ, 5, 8, prp1=buf))
        assert ctrl.memory.read(buf, PAGE) == bytes(PAGE)
        ok(ctrl, ios, rw(Opcode.WRITE_ZEROES, 0, 8, cdw12_extra=1 << 25))
        ok(ctrl, ios, command(Opcode.FLUSH, 1))
    finally:
        ios.close()
        ctrl.close()


def test_4k_format_and_several_namespaces(tmp_path):
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, "mem:size=4M,lbaf=1")
    ctrl.namespaces[2] = make_namespace(2, f"file:path={tmp_path}/two.img,size=4M")
    ios = IoCommandSet(ctrl)
    try:
        a, b = pattern(8192, 1), pattern(8192, 2)
        write_blocks(ctrl, ios, 3, a, ns=1)  # two 4 KiB blocks
        write_blocks(ctrl, ios, 3, b, ns=2)  # sixteen 512 B blocks
        assert read_blocks(ctrl, ios, 3, 2, ns=1) == a
        assert read_blocks(ctrl, ios, 3, 16, ns=2) == b
        buf = ctrl.alloc(PAGE)
        fails(ctrl, ios, rw(Opcode.READ, 1024, 1, nsid=1, prp1=buf), Status.LBA_RANGE)  # 4M / 4K = 1024
        ok(ctrl, ios, command(Opcode.FLUSH, 0xFFFFFFFF))
    finally:
        ios.close()
        ctrl.close()


# ------------------------------------------------------------------------------ fuzz

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pcidev_nvme.request import SQE, decode_sqe  # noqa: E402

_FUZZ_OPCODES = [0x00, 0x01, 0x02, 0x05, 0x08, 0x09, 0x0C, 0x19, 0x04, 0x7F]


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    ctrl = FakeController(ram=4 << 20, mdts_bytes=256 * 1024)
    ctrl.namespaces[1] = make_namespace(1, "mem:size=1M")
    ctrl.namespaces[2] = make_namespace(2, f"file:path={tmp_path_factory.mktemp('fz')}/f.img,size=1M,lbaf=1")
    ios = IoCommandSet(ctrl)
    yield ctrl, ios
    ios.close()
    ctrl.close()


def _addr():
    return st.one_of(
        st.integers(0, (4 << 20) - 1),
        st.integers(0, (4 << 20) // PAGE).map(lambda x: x * PAGE),
        st.integers(0, 2**64 - 1),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    opcode=st.sampled_from(_FUZZ_OPCODES),
    flags=st.integers(0, 255),
    nsid=st.sampled_from([0, 1, 2, 3, 0xFFFFFFFF]),
    prp1=_addr(),
    prp2=_addr(),
    cdw10=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
    cdw11=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
    cdw12=st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
    scribble=st.binary(min_size=0, max_size=256),
)
def test_garbage_commands_complete_exactly_once(fuzz_env, opcode, flags, nsid, prp1, prp2, cdw10, cdw11,
                                                cdw12, scribble):
    ctrl, ios = fuzz_env
    # Random bytes where PRP lists, SGL segments, DSM ranges or Copy descriptors may be read.
    if scribble and prp2 + len(scribble) <= ctrl.ram:
        ctrl.memory.write(prp2, scribble)
    req = decode_sqe(1, SQE.pack(opcode, flags, 7, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, 0, 0, 0))
    ios.submit(req)
    status, _dw0, err = ctrl.wait(req, timeout=10)
    assert status == 0 or isinstance(err, NvmeStatusError)
    assert status != Status.INTERNAL, err  # every malformed command has a specific status
    assert not ctrl.double


# ------------------------------------------------------------------------------ end to end


def test_slow_plugin_backend_does_not_block_registers():
    """Through the software host: a command stuck in a (plugin-contributed) slow backend
    leaves register access and other namespaces working, and completes later."""
    from pcidev import hookimpl
    from pcidev.host import Machine
    from pcidev.plugins import load_registry, make_plugin_manager
    from pcidev_nvme.backends import add_backend
    from pcidev_nvme.testing.driver import READ, NvmeDriver

    gate_backend = GatedBackend()

    class GatePlugin:
        __name__ = "gate-plugin"

        @hookimpl
        def pcidev_register_devices(self, registry):
            add_backend(registry, "gated", lambda options: (options.clear(), gate_backend)[1])

    registry = load_registry(make_plugin_manager(plugins=[GatePlugin()]))
    machine = Machine(ram_size=64 << 20)
    ctrl = registry.create("nvme", "ns=gated:x=1,ns=mem:size=1M")
    drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
    try:
        buf = machine.alloc(PAGE)
        t0 = time.monotonic()
        slow = drv.submit_rw(1, READ, nsid=1, slba=0, nlb=1, buf=buf)
        assert time.monotonic() - t0 < 0.5
        assert drv.read32(0x1C) & 1  # CSTS.RDY reads at once
        assert drv.read(2, 0, 1) == bytes(512)  # another namespace keeps working
        assert all(c.cid != slow for c in drv.poll(1))  # still in the backend
        gate_backend.gate.set()
        comp = drv.wait_for(1, slow, timeout=5)
        assert comp.ok
    finally:
        gate_backend.gate.set()
        drv.close()
        ctrl.close()
        machine.close()


def test_submit_many_completes_each_command_on_its_own(tmp_path):
    """The fetch loop's way in: commands of several namespaces in one call, failures
    among them; each completes exactly once with its own status and data."""
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, "mem:size=1M")
    path = f"{tmp_path}/ro.img"
    with open(path, "wb") as f:
        f.write(pattern(4096, 3) + bytes((1 << 20) - 4096))
    ctrl.namespaces[2] = make_namespace(2, f"file:path={path},readonly=on")
    ios = IoCommandSet(ctrl)
    try:
        data = pattern(4096, 4)
        src = ctrl.alloc(4096)
        ctrl.memory.write(src, data)
        dst = [ctrl.alloc(4096) for _ in range(3)]
        reqs = [
            rw(Opcode.WRITE, 8, 8, prp1=src),                    # ok
            rw(Opcode.READ, 8, 8, prp1=dst[0]),                  # ok: reads the write before it
            rw(Opcode.WRITE, 0, 8, nsid=2, prp1=src),            # read-only namespace
            rw(Opcode.READ, 0, 8, nsid=2, prp1=dst[1]),          # ok (the file, maybe by a worker)
            rw(Opcode.READ, (1 << 20) // 512, 1, prp1=dst[2]),   # beyond the namespace
            rw(Opcode.READ, 0, 8, nsid=9, prp1=dst[2]),          # no such namespace
            rw(Opcode.FLUSH, 0, 1),                               # the general path
            rw(Opcode.READ, 0, 8, prp1=0xFFFF_F000_0000),         # outside guest memory
        ]
        ios.submit_many(reqs)
        got = [ctrl.wait(r)[0] for r in reqs]
        assert got == [0, 0, Status.NS_WRITE_PROTECTED, 0, Status.LBA_RANGE, Status.INVALID_NSID, 0,
                       Status.DATA_TRANSFER_ERROR]
        assert ctrl.memory.read(dst[0], 4096) == data
        assert ctrl.memory.read(dst[1], 4096) == pattern(4096, 3)
        assert not ctrl.double
    finally:
        ios.close()
        ctrl.close()


def test_the_fast_path_reads_the_write_cache_and_write_protection_anew_for_each_batch():
    """The inline Write path reads ``volatile_write_cache`` and the namespace's write
    protection once per batch (submit_many), never longer: a change between batches (a
    Set Features 06h, a namespace becoming read-only) applies to the next command."""
    ctrl = FakeController()
    ctrl.namespaces[1] = ns = make_namespace(1, "mem:size=1M")
    ios = IoCommandSet(ctrl)
    b = ns.backend
    fuas: list[bool] = []
    real = b.writev

    def writev(views, offset, *, fua=False):
        fuas.append(fua)
        return real(views, offset, fua=fua)

    b.writev = writev
    try:
        write_blocks(ctrl, ios, 0, pattern(512, 1))
        ctrl.volatile_write_cache = False
        write_blocks(ctrl, ios, 1, pattern(512, 2))
        ctrl.volatile_write_cache = True
        write_blocks(ctrl, ios, 2, pattern(512, 3))
        assert fuas == [False, True, False]
        b.read_only = True
        buf = ctrl.alloc(512)
        fails(ctrl, ios, rw(Opcode.WRITE, 3, 1, prp1=buf), Status.NS_WRITE_PROTECTED)
        b.read_only = False
        write_blocks(ctrl, ios, 3, pattern(512, 4))
        assert read_blocks(ctrl, ios, 0, 4) == b"".join(pattern(512, k) for k in (1, 2, 3, 4))
    finally:
        ios.close()
        ctrl.close()


def test_offload_racing_a_pool_growth_is_not_lost(monkeypatch):
    """``offload()`` submitting to the worker pool while a command for a backend with a larger
    ``queue_depth`` grows the pool (a new pool; the old one shut down): the offloaded call
    runs, and the command completes -- no RuntimeError "cannot schedule new futures after
    shutdown" from the old pool (the offloading thread is held inside ``submit`` until the
    growth happened, or for 1 s at most)."""
    import concurrent.futures

    import pcidev_nvme.io as io_module

    entered, grown = threading.Event(), threading.Event()

    class HeldPool(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            if threading.current_thread().name == "offloader":
                entered.set()
                grown.wait(1.0)
            return super().submit(fn, *args, **kwargs)

    monkeypatch.setattr(io_module, "ThreadPoolExecutor", HeldPool)
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, "mem:size=8M")
    backend = ctrl.namespaces[1].backend
    backend.inline = False  # (through the workers)
    ios = IoCommandSet(ctrl)
    try:
        buf = ctrl.alloc(4096)
        ok(ctrl, ios, rw(Opcode.READ, 0, 8, prp1=buf))  # (the pool exists, 4 workers)
        backend.queue_depth = 32
        result: list[object] = []

        def offload() -> None:
            try:
                result.append(ios.offload(lambda: 7).result(30))
            except Exception as exc:
                result.append(repr(exc))

        t = threading.Thread(target=offload, name="offloader")
        t.start()
        assert entered.wait(30)
        req = rw(Opcode.READ, 0, 8, prp1=buf)
        ios.submit(req)  # (grows the pool to 32 workers)
        grown.set()
        t.join(30)
        assert result == [7]
        assert ctrl.wait(req)[0] == 0
    finally:
        ios.close()
        ctrl.close()
