"""Admin: Namespace Management (create, delete), Namespace Attachment, Format NVM (512 B
and 4 KiB LBA formats), with their statuses."""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from typing import Any

import attrs
import pytest
from _helpers import GatedBackend, attach_namespace, expect_status, make_env, wait_until

from pcidev_nvme import admin as admin_mod
from pcidev_nvme.backends.mem import MemoryBackend
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ, WRITE

NS_MGMT, NS_ATTACH, FORMAT = 0x0D, 0x15, 0x80
CTRL_LIST = struct.pack("<HH", 1, 0)


def ns_data(nsze, ncap=None, flbas=0, dps=0, nmic=0):
    buf = bytearray(4096)
    struct.pack_into("<QQ", buf, 0, nsze, nsze if ncap is None else ncap)
    buf[26], buf[29], buf[30] = flbas, dps, nmic
    return bytes(buf)


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=4M,capacity=64M,max_namespaces=4", io_queues=1)


def create(drv, nsze, **kw):
    return drv.admin(NS_MGMT, cdw10=0, data=ns_data(nsze, **kw)).dw0


def test_create_attach_use_detach_delete(env):
    drv, ctrl = env.drv, env.ctrl
    nsid = create(drv, 2048, flbas=1)  # 2048 x 4 KiB
    assert nsid == 2
    assert 2 in ctrl.allocated and 2 not in ctrl.namespaces
    assert struct.unpack("<1024I", drv.identify(0x10))[:3] == (1, 2, 0)
    assert struct.unpack("<1024I", drv.identify(0x02))[:2] == (1, 0)
    assert drv.identify(0x00, nsid=2) == bytes(4096)  # allocated, not active
    assert drv.identify(0x11, nsid=2)[:8] == struct.pack("<Q", 2048)
    unvmcap = int.from_bytes(drv.identify(0x01)[296:312], "little")
    assert unvmcap == (64 << 20) - (4 << 20) - (8 << 20)
    drv.admin(NS_ATTACH, nsid=2, cdw10=0, data=CTRL_LIST)
    drv.scan_namespaces()
    assert drv.namespaces[2].lba_size == 4096 and drv.namespaces[2].nsze == 2048
    drv.write(2, 2047, b"n" * 4096)
    assert drv.read(2, 2047, 1) == b"n" * 4096
    drv.admin(NS_ATTACH, nsid=2, cdw10=1, data=CTRL_LIST)
    expect_status(drv, Status.INVALID_NSID, READ, qid=1, nsid=2, buf=env.machine.alloc(4096), length=4096)
    drv.admin(NS_MGMT, nsid=2, cdw10=1)
    assert 2 not in ctrl.allocated
    assert int.from_bytes(drv.identify(0x01)[296:312], "little") == (64 << 20) - (4 << 20)


def test_create_with_metadata_and_protection(env):
    drv, ctrl = env.drv, env.ctrl
    nsid = create(drv, 2048, flbas=0x12, dps=0x9)  # LBAF 2 (512+8), extended LBAs, PI type 1 first
    drv.admin(NS_ATTACH, nsid=nsid, cdw10=0, data=CTRL_LIST)
    drv.scan_namespaces()
    info = drv.namespaces[nsid]
    assert (info.lba_size, info.ms, info.extended, info.pi, info.pil) == (512, 8, True, 1, True)
    assert ctrl.allocated[nsid].meta is not None
    data = b"m" * 512
    comp, _b, _m = drv.io_md(0x01, nsid, 3, 1, data=data, prinfo=8, ref=3)  # PRACT: the host sends data only
    assert comp.ok
    comp, buf, _m = drv.io_md(0x02, nsid, 3, 1, data_len=520, prinfo=7, ref=3)
    assert comp.ok and buf[:512] == data
    drv.admin(NS_ATTACH, nsid=nsid, cdw10=1, data=CTRL_LIST)
    drv.admin(NS_MGMT, nsid=nsid, cdw10=1)


def test_create_errors(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_FIELD, NS_MGMT, cdw10=0, data=ns_data(0))
    expect_status(drv, Status.INVALID_FIELD, NS_MGMT, cdw10=0, data=ns_data(8, ncap=16))
    expect_status(drv, Status.THIN_PROVISIONING_NOT_SUPPORTED, NS_MGMT, cdw10=0, data=ns_data(16, ncap=8))
    expect_status(drv, Status.INVALID_FORMAT, NS_MGMT, cdw10=0, data=ns_data(16, flbas=15))
    expect_status(drv, Status.INVALID_FORMAT, NS_MGMT, cdw10=0, data=ns_data(16, dps=1))  # PI, no metadata
    expect_status(drv, Status.INVALID_FIELD, NS_MGMT, cdw10=0, data=ns_data(16, flbas=2, dps=4))  # type 4
    expect_status(drv, Status.INVALID_FIELD, NS_MGMT, cdw10=0, data=ns_data(9))  # 4.5 KiB
    expect_status(drv, Status.NS_INSUFFICIENT_CAPACITY, NS_MGMT, cdw10=0, data=ns_data(1 << 20, flbas=1))
    expect_status(drv, Status.INVALID_FIELD, NS_MGMT, cdw10=0, cdw11=2 << 24, data=ns_data(16))
    expect_status(drv, Status.INVALID_FIELD, NS_MGMT, cdw10=3, data=ns_data(16))
    for _ in range(3):
        create(drv, 16)
    expect_status(drv, Status.NS_ID_UNAVAILABLE, NS_MGMT, cdw10=0, data=ns_data(16))
    expect_status(drv, Status.INVALID_NSID, NS_MGMT, nsid=9, cdw10=1)
    expect_status(drv, Status.INVALID_NSID, NS_MGMT, nsid=0, cdw10=1)
    drv.admin(NS_MGMT, nsid=0xFFFFFFFF, cdw10=1)  # delete them all
    assert not env.ctrl.allocated and not env.ctrl.namespaces


def test_attachment_errors(env):
    drv = env.drv
    expect_status(drv, Status.NS_ALREADY_ATTACHED, NS_ATTACH, nsid=1, cdw10=0, data=CTRL_LIST)
    expect_status(drv, Status.INVALID_NSID, NS_ATTACH, nsid=3, cdw10=0, data=CTRL_LIST)
    expect_status(drv, Status.CONTROLLER_LIST_INVALID, NS_ATTACH, nsid=1, cdw10=1, data=struct.pack("<H", 0))
    expect_status(drv, Status.CONTROLLER_LIST_INVALID, NS_ATTACH, nsid=1, cdw10=1, data=struct.pack("<HH", 1, 5))
    expect_status(drv, Status.INVALID_FIELD, NS_ATTACH, nsid=1, cdw10=2, data=CTRL_LIST)
    drv.admin(NS_ATTACH, nsid=1, cdw10=1, data=CTRL_LIST)
    expect_status(drv, Status.NS_NOT_ATTACHED, NS_ATTACH, nsid=1, cdw10=1, data=CTRL_LIST)


def test_created_file_namespace(nvme_env, tmp_path):
    env = nvme_env(f"state_dir={tmp_path},ns_create=file,capacity=16M", io_queues=1)
    drv = env.drv
    nsid = create(drv, 4096)  # 2 MiB of 512-byte blocks
    images = list(tmp_path.glob("*.img"))
    assert len(images) == 1 and images[0].stat().st_size == 2 << 20
    drv.admin(NS_ATTACH, nsid=nsid, cdw10=0, data=CTRL_LIST)
    drv.scan_namespaces()
    drv.write(nsid, 7, b"f" * 512)
    assert images[0].read_bytes()[7 * 512:8 * 512] == b"f" * 512


def test_created_file_namespace_survives_restart(tmp_path):
    cfg = f"serial=nsp,state_dir={tmp_path},ns_create=file,capacity=16M,ns=mem:size=1M"
    env = make_env(cfg, io_queues=1)
    try:
        nsid = create(env.drv, 2048)
        env.drv.admin(NS_ATTACH, nsid=nsid, cdw10=0, data=CTRL_LIST)
        other = create(env.drv, 1024)  # allocated, not attached
        env.drv.scan_namespaces()
        env.drv.write(nsid, 3, b"r" * 512)
        ids = env.drv.identify(0x03, nsid=nsid)
    finally:
        env.close()
    env = make_env(cfg, io_queues=1)
    try:
        drv = env.drv
        assert set(env.ctrl.allocated) == {1, nsid, other}
        assert set(drv.namespaces) == {1, nsid}
        assert drv.read(nsid, 3, 1) == b"r" * 512
        assert drv.identify(0x03, nsid=nsid) == ids  # EUI-64, NGUID, UUID are stable
        drv.admin(NS_MGMT, nsid=other, cdw10=1)
        drv.admin(NS_MGMT, nsid=nsid, cdw10=1)
        assert not list(tmp_path.glob("*.img"))
    finally:
        env.close()
    env = make_env(cfg, io_queues=1)
    try:
        assert set(env.ctrl.allocated) == {1}
    finally:
        env.close()


def test_format_switches_lba_size_and_erases(env):
    drv, ctrl = env.drv, env.ctrl
    drv.write(1, 0, b"d" * 4096)
    drv.admin(FORMAT, nsid=1, cdw10=1 | (0 << 9))  # LBAF 1 (4 KiB), no erase
    drv.scan_namespaces()
    assert drv.namespaces[1].lba_size == 4096 and drv.namespaces[1].nsze == 1024
    assert drv.read(1, 0, 1) == bytes(4096)  # no previous user data after a format
    drv.write(1, 0, b"d" * 4096)
    drv.admin(FORMAT, nsid=1, cdw10=0 | (1 << 9))  # back to 512 B, user data erase
    drv.scan_namespaces()
    assert drv.namespaces[1].lba_size == 512
    assert drv.read(1, 0, 8) == bytes(4096)
    drv.admin(FORMAT, nsid=0xFFFFFFFF, cdw10=1)  # every namespace
    assert ctrl.namespaces[1].lba_size == 4096


def test_format_errors(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_FORMAT, FORMAT, nsid=1, cdw10=15, param=40)
    expect_status(drv, Status.INVALID_FORMAT, FORMAT, nsid=1, cdw10=1 << 5)  # protection information
    expect_status(drv, Status.INVALID_FIELD, FORMAT, nsid=1, cdw10=2 << 9)  # crypto erase
    expect_status(drv, Status.INVALID_NSID, FORMAT, nsid=2, cdw10=0)
    expect_status(drv, Status.INVALID_NSID, FORMAT, nsid=0, cdw10=0)


@pytest.mark.parametrize("nsid", [2, 0xFFFFFFFF], ids=["that-namespace", "every-namespace"])
def test_a_namespace_being_formatted_is_not_deleted(nvme_env, nsid):
    """Namespace Management delete of a namespace whose Format NVM is still running fails
    with Format In Progress and deletes nothing (found by the nvme-guest fuzz target: the
    delete closed the namespace under the format, which then failed on its closed memory
    and left the metadata store it opened for a namespace nobody holds: two fds)."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend()
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    buf = env.machine.alloc(4096)
    gated.hold()
    rcid = drv.submit(1, READ, nsid=2, buf=buf, length=512, tag="before")
    wait_until(lambda: gated.waiting == 1)
    fcid = drv.submit(0, FORMAT, nsid=2, cdw10=0)  # waits for the read in flight
    time.sleep(0.02)
    comp = drv.admin(NS_MGMT, nsid=nsid, cdw10=1, check=False)
    assert comp.code == Status.FORMAT_IN_PROGRESS
    assert not comp.dnr  # (the delete succeeds once the format ends: retry it)
    assert set(ctrl.allocated) == {1, 2}
    gated.release()
    assert drv.wait_for(1, rcid).ok and drv.wait_for(0, fcid).ok
    drv.admin(NS_MGMT, nsid=2, cdw10=1)  # once the format is done
    assert set(ctrl.allocated) == {1}


def test_io_during_format_is_refused(nvme_env):
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    gated = GatedBackend()
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    buf = env.machine.alloc(4096)
    gated.hold()
    drv.submit(1, READ, nsid=2, buf=buf, length=512, tag="before")
    wait_until(lambda: gated.waiting == 1)
    fcid = drv.submit(0, FORMAT, nsid=2, cdw10=0)
    time.sleep(0.02)
    comp = drv.io(1, READ, nsid=2, buf=buf, length=512, check=False)
    assert comp.code == Status.FORMAT_IN_PROGRESS
    assert not comp.dnr  # (the spec: retry once the format is done)
    assert drv.poll(0) == []  # the format waits for the read in flight
    gated.release()
    assert drv.wait_for(0, fcid).ok
    assert [c.tag for c in drv.stash.get(1, [])] + [c.tag for c in drv.poll(1)] == ["before"]
    assert drv.io(1, READ, nsid=2, buf=buf, length=512).ok


class GatedMemory(MemoryBackend):
    """A memory backend (a memfd and its mapping: closing it really closes them) whose I/O
    runs on the controller's workers and waits at a gate; ``events`` records, in order,
    each I/O that finished and the close."""

    inline = False

    def __init__(self, size: int = 1 << 20) -> None:
        super().__init__(size)
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = 0
        self.events: list[str] = []

    def _wait(self) -> None:
        if not self.gate.is_set():
            self.waiting += 1
            self.gate.wait(10)

    def readv(self, views, offset):
        self._wait()
        super().readv(views, offset)
        self.events.append("read")

    def writev(self, views, offset, *, fua=False):
        self._wait()
        super().writev(views, offset, fua=fua)
        self.events.append("write")

    def close(self):
        self.events.append("close")
        super().close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@attrs.define
class _Held:
    """A controller with namespace 2 on a :class:`GatedMemory` and one I/O to it held in
    flight at the gate (:func:`_hold_io`)."""

    env: Any
    gated: GatedMemory
    buf: int
    cid: int

    @property
    def drv(self) -> Any:
        return self.env.drv

    @property
    def ctrl(self) -> Any:
        return self.env.ctrl


def _hold_io(nvme_env: Any, opcode: int = READ, *, before: bytes = b"", tag: Any = None) -> _Held:
    """Namespace 2 on a gated memory backend, ``before`` written at its LBA 8 (if given),
    then one ``opcode`` command of 512 bytes at LBA 0 submitted and waiting at the gate."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    gated = GatedMemory()
    attach_namespace(env.ctrl, 2, gated)
    env.drv.scan_namespaces()
    buf = env.machine.alloc(4096)
    if before:
        env.machine.write(buf, before)
        assert env.drv.io(1, WRITE, nsid=2, cdw10=8, buf=buf, length=512).ok
    gated.gate.clear()
    cid = env.drv.submit(1, opcode, nsid=2, buf=buf, length=512, tag=tag)
    wait_until(lambda: gated.waiting == 1)
    return _Held(env, gated, buf, cid)


@pytest.mark.parametrize("nsid", [2, 0xFFFFFFFF], ids=["that-namespace", "every-namespace"])
@pytest.mark.parametrize("opcode", [READ, WRITE], ids=["read", "write"])
def test_delete_waits_for_the_io_in_flight(nvme_env, caplog, nsid, opcode):
    """Namespace Management delete of a namespace with an I/O command in flight: the I/O
    (started before the delete) completes successfully on the still-open backend, new I/O
    to the namespace completes with Namespace Not Ready (DNR: it will not become ready),
    and the delete closes the namespace and completes only after the I/O (it closed the
    backend under the I/O: a logged "ValueError: mmap closed or invalid" and an internal
    error status)."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    buf = env.machine.alloc(4096)
    env.machine.write(buf, b"\x5a" * 512)
    fds = _open_fds()
    gated = GatedMemory()
    attach_namespace(ctrl, 2, gated)
    drv.scan_namespaces()
    gated.gate.clear()
    iocid = drv.submit(1, opcode, nsid=2, buf=buf, length=512, tag="before")
    wait_until(lambda: gated.waiting == 1)
    dcid = drv.submit(0, NS_MGMT, nsid=nsid, cdw10=1)
    time.sleep(0.05)
    assert drv.cq_posted(0) == 0  # the delete waits for the I/O in flight
    assert 2 in ctrl.allocated and gated.events == []
    late = drv.io(1, READ, nsid=2, buf=env.machine.alloc(4096), length=512, check=False)
    assert late.code == Status.NS_NOT_READY and late.dnr
    gated.gate.set()
    assert drv.wait_for(1, iocid).ok
    assert drv.wait_for(0, dcid).ok
    assert gated.events == ["read" if opcode == READ else "write", "close"]
    assert 2 not in ctrl.allocated and ctrl.claim_status(2) is None
    if nsid == 2:
        assert drv.io(1, READ, nsid=1, buf=buf, length=512).ok
    expect_status(drv, Status.INVALID_NSID, READ, qid=1, nsid=2, buf=buf, length=512)
    if nsid == 2:
        assert _open_fds() == fds  # (the deleted namespace's memfd is closed)
    else:  # (namespace 1's are closed too)
        assert _open_fds() < fds
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert ctrl.failed is None


class _FlushRecording(GatedMemory):
    def flush(self):
        self._wait()
        super().flush()
        self.events.append("flush")


def test_delete_waits_for_a_broadcast_flush_in_flight(nvme_env):
    """A Flush of every namespace (NSID FFFFFFFFh) in flight counts as I/O to each: a delete
    of namespace 2 waits for it, and the Flush does not flush namespace 2 once it is being
    deleted (it flushed a closed backend: a logged ValueError and Internal Error; with a
    file, fdatasync on a closed or reused descriptor -- review S25)."""
    env = nvme_env("ns=mem:size=1M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    first, second = _FlushRecording(), _FlushRecording()
    ctrl.namespaces.pop(1)
    ctrl.allocated.pop(1).close()
    attach_namespace(ctrl, 1, first)
    attach_namespace(ctrl, 2, second)
    drv.scan_namespaces()
    first.gate.clear()
    fcid = drv.submit(1, 0x00, nsid=0xFFFFFFFF)  # Flush, every namespace
    wait_until(lambda: first.waiting == 1)
    assert ctrl.io_inflight_for({2})
    dcid = drv.submit(0, NS_MGMT, nsid=2, cdw10=1)
    wait_until(lambda: ctrl.claim_status(2) == Status.NS_NOT_READY)
    time.sleep(0.05)
    assert drv.cq_posted(0) == 0 and second.events == []  # the delete waits for the Flush
    first.gate.set()
    assert drv.wait_for(1, fcid).ok
    assert drv.wait_for(0, dcid).ok
    assert first.events == ["flush"] and second.events == ["close"]  # (not flushed: being deleted)
    assert ctrl.failed is None


@pytest.mark.parametrize("claim", ["format", "delete"])
def test_io_to_a_detached_namespace_under_a_claim_is_invalid_namespace(nvme_env, claim):
    """A namespace detached while a Format NVM or a delete holds it: I/O to it is Invalid
    Namespace (it is not attached here), not the claim's Format In Progress or Namespace
    Not Ready (review S25)."""
    held = _hold_io(nvme_env)
    env, drv, ctrl, gated, rcid = held.env, held.drv, held.ctrl, held.gated, held.cid
    if claim == "format":
        acid = drv.submit(0, FORMAT, nsid=2, cdw10=0)
        wait_until(lambda: ctrl.claim_status(2) == Status.FORMAT_IN_PROGRESS)
        drv.admin(NS_ATTACH, nsid=2, cdw10=1, data=CTRL_LIST)  # detach, during the format
    else:
        drv.admin(NS_ATTACH, nsid=2, cdw10=1, data=CTRL_LIST)  # detach, then delete
        acid = drv.submit(0, NS_MGMT, nsid=2, cdw10=1)
        wait_until(lambda: ctrl.claim_status(2) == Status.NS_NOT_READY)
    late = drv.io(1, READ, nsid=2, buf=env.machine.alloc(4096), length=512, check=False)
    assert late.code == Status.INVALID_NSID
    gated.gate.set()
    assert drv.wait_for(1, rcid).ok and drv.wait_for(0, acid).ok


def test_a_namespace_being_deleted_is_not_formatted_or_deleted_again(nvme_env):
    held = _hold_io(nvme_env)
    drv, ctrl, gated, rcid = held.drv, held.ctrl, held.gated, held.cid
    dcid = drv.submit(0, NS_MGMT, nsid=2, cdw10=1)
    wait_until(lambda: ctrl.claim_status(2) == Status.NS_NOT_READY)
    comp = drv.admin(FORMAT, nsid=2, cdw10=0, check=False)
    assert comp.code == Status.INVALID_NSID and comp.dnr
    comp = drv.admin(NS_MGMT, nsid=0xFFFFFFFF, cdw10=1, check=False)
    assert comp.code == Status.INVALID_NSID and comp.dnr
    for sel in (0, 1):  # Namespace Attachment (attach, detach): it is going away
        expect_status(drv, Status.INVALID_NSID, NS_ATTACH, nsid=2, cdw10=sel, data=CTRL_LIST)
    assert set(ctrl.allocated) == {1, 2} and 2 in ctrl.namespaces
    gated.gate.set()
    assert drv.wait_for(1, rcid).ok and drv.wait_for(0, dcid).ok
    assert set(ctrl.allocated) == {1}


@pytest.mark.parametrize("claim", ["delete", "format"])
def test_a_delete_or_format_whose_io_never_drains_fails_and_does_nothing(nvme_env, monkeypatch, claim):
    """A delete or a Format NVM waits at most IO_DRAIN_TIMEOUT seconds for the I/O in
    flight; then it completes with Command Interrupted (DNR clear: the host should retry),
    deletes or formats nothing and releases the namespace; a retry after the I/O finished
    does it (a format completed with Internal Error until session 25)."""
    held = _hold_io(nvme_env, before=b"\x5a" * 512)
    env, drv, ctrl, gated, buf, rcid = held.env, held.drv, held.ctrl, held.gated, held.buf, held.cid
    monkeypatch.setattr(admin_mod, "IO_DRAIN_TIMEOUT", 0.05)
    op, cdw10 = (NS_MGMT, 1) if claim == "delete" else (FORMAT, 0)
    comp = drv.admin(op, nsid=2, cdw10=cdw10, check=False)
    assert comp.code == Status.CMD_INTERRUPTED and not comp.dnr
    assert set(ctrl.allocated) == {1, 2} and ctrl.claim_status(2) is None
    gated.gate.set()
    assert drv.wait_for(1, rcid).ok
    assert drv.io(1, READ, nsid=2, cdw10=8, buf=buf, length=512).ok
    assert env.machine.read(buf, 512) == b"\x5a" * 512  # (not formatted)
    assert gated.events == ["write", "read", "read"]
    drv.admin(op, nsid=2, cdw10=cdw10)
    if claim == "delete":
        assert set(ctrl.allocated) == {1} and gated.events[-1] == "close"
    else:
        assert drv.io(1, READ, nsid=2, cdw10=8, buf=buf, length=512).ok
        assert env.machine.read(buf, 512) == bytes(512)


