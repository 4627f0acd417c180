"""Sanitize (admin 84h, pcidev_nvme.sanitize): block erase, overwrite, crypto erase,
with and without No-Deallocate After Sanitize; the Sanitize Status log byte by byte;
the commands refused while it runs; a controller reset or an NVM Subsystem Reset in
the middle; the failure modes; the completion event; migration of an operation in
progress (the destination finishes it)."""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import time

import crc32c
import pytest
from _helpers import GatedBackend, attach_namespace, expect_status
from test_migration_nvme import Host

from pcidev.host import Machine
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.sanitize import CHUNK, SANICAP
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

BLOCK_ERASE, OVERWRITE, CRYPTO, EXIT = 2, 3, 4, 1
SIZE = 4 << 20
NLB = SIZE // 512


def fill(drv, nsid: int = 1) -> list[int]:
    """Write a distinct pattern to every block; returns the crc32c of each."""
    crcs = []
    for slba in range(0, NLB, 256):
        data = b"".join(struct.pack("<IQ", nsid, slba + i) * 42 + bytes(8) for i in range(256))
        drv.write(nsid, slba, data)
        crcs += [crc32c.crc32c(data[i * 512:(i + 1) * 512]) for i in range(256)]
    return crcs


def blocks(drv, nsid: int = 1) -> list[bytes]:
    out = []
    for slba in range(0, NLB, 256):
        data = drv.read(nsid, slba, 256)
        out += [data[i * 512:(i + 1) * 512] for i in range(256)]
    return out


def wait_done(drv, timeout: float = 20.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        log = drv.sanitize_log()
        if log["sstat"] & 7 != 2:
            return log
        assert time.monotonic() < deadline, "the sanitize did not finish"
        time.sleep(0.01)


def completion_events(drv, timeout: float = 2.0) -> int:
    """How many Sanitize Operation Completed events the host got (waits for the first)."""
    ev = (6, 0x01, 0x81)  # I/O command specific status, sanitize operation completed, log 81h
    deadline = time.monotonic() + timeout
    while ev not in drv.events and time.monotonic() < deadline:
        drv.poll_events(0.05)
    return drv.events.count(ev)


def nuse(drv, nsid: int = 1) -> int:
    return struct.unpack_from("<Q", drv.identify(0, nsid=nsid), 16)[0]


@pytest.fixture
def env(nvme_env):
    return nvme_env(f"ns=mem:size={SIZE}", io_queues=1, aers=1)


def test_sanicap_in_identify(env):
    idc = env.drv.identify(1)
    assert struct.unpack_from("<I", idc, 328)[0] == SANICAP
    assert SANICAP & 0x7 == 0x7 and not SANICAP & (1 << 29) and SANICAP >> 30 == 1


def test_log_before_any_sanitize(env):
    raw = env.drv.get_log(0x81, 512)
    sprog, sstat, scdw10 = struct.unpack_from("<HHI", raw)
    assert (sprog, sstat, scdw10) == (0xFFFF, 0, 0)
    eto, etbe, etce, etond, etbend, etcend = struct.unpack_from("<6I", raw, 8)
    assert 0 < etbe <= eto and etce == etbe and etond == etbend == etcend >= etbe
    assert raw[32:] == bytes(480)


def test_block_erase(env):
    drv = env.drv
    before = fill(drv)
    assert nuse(drv) == NLB
    drv.sanitize(BLOCK_ERASE)
    log = wait_done(drv)
    assert log["sstat"] == 1 | (1 << 8)  # completed, global data erased
    assert log["sprog"] == 0xFFFF and log["scdw10"] == BLOCK_ERASE
    after = blocks(drv)
    assert all(b == bytes(512) for b in after)
    assert [crc32c.crc32c(b) for b in after] != before
    assert nuse(drv) == 0  # deallocated
    assert completion_events(drv) == 1
    drv.write(1, 0, b"\x01" * 512)  # user data written: no longer globally erased
    assert drv.sanitize_log()["sstat"] == 1


def test_block_erase_no_deallocate(env):
    drv = env.drv
    fill(drv)
    drv.sanitize(BLOCK_ERASE, ndas=True)
    log = wait_done(drv)
    assert log["sstat"] & 7 == 1 and log["scdw10"] == BLOCK_ERASE | (1 << 9)
    assert all(b == bytes(512) for b in blocks(drv))
    assert nuse(drv) == NLB  # zeroes written, still allocated (NODMMAS = 01b: nothing more happens)


@pytest.mark.parametrize("owpass,oipbp,ndas", [(1, False, True), (2, True, True), (3, True, True),
                                                 (0, False, True), (2, False, False)])
def test_overwrite(env, owpass, oipbp, ndas):
    drv = env.drv
    fill(drv)
    pat = 0xA5C3_0F12
    drv.sanitize(OVERWRITE, owpass=owpass, oipbp=oipbp, ndas=ndas, ovrpat=pat)
    log = wait_done(drv)
    passes = owpass or 16
    assert log["sstat"] & 7 == 1 and (log["sstat"] >> 3) & 0x1F == passes & 0x1F
    if not ndas:
        expect = bytes(512)
    else:
        last = pat ^ 0xFFFFFFFF if oipbp and passes % 2 == 0 else pat
        expect = struct.pack("<I", last) * 128
    assert all(b == expect for b in blocks(drv))


def test_crypto_erase(env):
    drv, ctrl = env.drv, env.ctrl
    before = fill(drv)
    drv.sanitize(CRYPTO, ndas=True)
    assert wait_done(drv)["sstat"] & 7 == 1
    after = blocks(drv)
    key = ctrl.sanitizer.keys[1]
    for lba in (0, 1, NLB - 1):
        digest = hashlib.blake2b(struct.pack("<Q", lba), key=key).digest()
        assert after[lba] == digest * 8
    assert len(set(after)) == NLB  # every block differs
    assert all(crc32c.crc32c(b) != c for b, c in zip(after, before, strict=True))
    drv.sanitize(CRYPTO, ndas=True)  # a new key: unrelated to the last time too
    assert wait_done(drv)["sstat"] & 7 == 1
    again = blocks(drv)
    assert all(a != b for a, b in zip(after, again, strict=True))
    drv.sanitize(CRYPTO)
    assert wait_done(drv)["sstat"] & 7 == 1
    assert all(b == bytes(512) for b in blocks(drv)) and nuse(drv) == 0


def test_invalid_actions(env):
    drv = env.drv
    for cdw10 in (0, 5, 6, 7, BLOCK_ERASE | (1 << 10)):
        expect_status(drv, Status.INVALID_FIELD, 0x84, cdw10=cdw10)
    drv.sanitize(EXIT)  # not in failure mode: nothing to do
    assert drv.sanitize_log()["sstat"] == 0


def test_refusals_while_sanitizing(env):
    drv, ctrl = env.drv, env.ctrl
    fill(drv)
    ctrl.sanitizer.rate = CHUNK * 4  # a second for the namespace
    drv.sanitize(BLOCK_ERASE, ndas=True)
    log = drv.sanitize_log()
    assert log["sstat"] & 7 == 2 and log["sprog"] < 0xFFFF
    buf = drv.machine.alloc(4096, 4096)
    expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x02, qid=1, nsid=1, cdw10=0, cdw12=0, buf=buf, length=512)
    expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x01, qid=1, nsid=1, cdw10=0, cdw12=0, buf=buf, length=512)
    expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x08, qid=1, nsid=1, cdw10=0, cdw12=0)
    drv.flush(1)  # allowed
    for opc, kw in ((0x80, {"nsid": 1}), (0x84, {"cdw10": BLOCK_ERASE}), (0x14, {"cdw10": 1}),
                    (0x86, {"nsid": 1, "cdw13": 0x11 << 24}), (0x10, {"cdw10": 1 << 3}), (0x0D, {})):
        expect_status(drv, Status.SANITIZE_IN_PROGRESS, opc, **kw)
    expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x02, cdw10=(127 << 16) | 0x07, buf=buf, length=512)
    # allowed admin commands
    drv.identify(1)
    drv.get_features(0x07)
    drv.get_log(0x02, 512)
    drv.get_log(0x01, 64)
    prog = [drv.sanitize_log()["sprog"]]
    while drv.sanitize_log()["sstat"] & 7 == 2:
        prog.append(drv.sanitize_log()["sprog"])
        time.sleep(0.05)
    progress = [p for p in prog if p != 0xFFFF]
    assert progress == sorted(progress) and len(set(progress)) > 1
    drv.write(1, 0, b"\x07" * 512)  # accepted again
    assert drv.read(1, 0, 2) == b"\x07" * 512 + bytes(512)


@pytest.mark.parametrize("how", ["controller-reset", "subsystem-reset"])
def test_sanitize_continues_across_resets(env, how):
    drv, ctrl = env.drv, env.ctrl
    fill(drv)
    ctrl.sanitizer.rate = CHUNK * 4
    drv.sanitize(OVERWRITE, owpass=1, ndas=True, ovrpat=0x11223344)
    time.sleep(0.3)
    if how == "controller-reset":
        drv.disable()
    else:
        drv.subsystem_reset()
    drv.restart()
    log = drv.sanitize_log()
    assert log["sstat"] & 7 == 2 and 0 < log["sprog"] < 0xFFFF
    expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x02, qid=1, nsid=1, cdw10=0, cdw12=0,
                  buf=drv.machine.alloc(4096, 4096), length=512)
    assert wait_done(drv)["sstat"] & 7 == 1
    assert completion_events(drv) == 1
    assert all(b == struct.pack("<I", 0x11223344) * 128 for b in blocks(drv))


class FailingBackend(GatedBackend):
    """Memory whose deallocation fails while ``broken`` is set."""

    broken = True

    def deallocate(self, offset, length):
        if self.broken:
            raise OSError(errno.EIO, "injected media failure")
        super().deallocate(offset, length)


@pytest.mark.parametrize("ause", [True, False])
def test_failure_modes(nvme_env, ause):
    env = nvme_env(f"ns=mem:size={SIZE}", io_queues=1, aers=1)
    drv = env.drv
    backend = FailingBackend(1 << 20)
    attach_namespace(env.ctrl, 2, backend)
    drv.scan_namespaces()
    drv.sanitize(BLOCK_ERASE, ause=ause)
    log = wait_done(drv)
    assert log["sstat"] & 7 == 3  # failed
    buf = drv.machine.alloc(4096, 4096)
    expect_status(drv, Status.SANITIZE_FAILED, 0x02, qid=1, nsid=1, cdw10=0, cdw12=0, buf=buf, length=512)
    expect_status(drv, Status.SANITIZE_FAILED, 0x80, nsid=1)
    drv.identify(1)
    if ause:
        drv.sanitize(EXIT)  # unrestricted: exit the failure mode
    else:
        expect_status(drv, Status.CMD_SEQ_ERROR, 0x84, cdw10=EXIT)
        backend.broken = False
        drv.sanitize(BLOCK_ERASE)  # restricted: only a new sanitize recovers
        assert wait_done(drv)["sstat"] & 7 == 1
    drv.write(1, 0, b"\x42" * 512)
    assert drv.read(1, 0, 1) == b"\x42" * 512


def test_sanitize_in_progress_migrates_and_finishes_at_the_destination():
    host = Host(f"serial=san1,ns=mem:size={SIZE}", io_queues=1, aers=1)
    try:
        drv = host.drv
        before = fill(drv)
        host.ctrl.sanitizer.rate = CHUNK * 2
        drv.sanitize(OVERWRITE, owpass=2, oipbp=True, ndas=True, ovrpat=0xDEADBEEF)
        time.sleep(0.6)
        src_prog = drv.sanitize_log()["sprog"]
        assert 0 < src_prog < 0xFFFF
        src = host.ctrl
        dst = host.migrate()
        assert src.sanitizer.running and src.sanitizer.progress() >= src_prog  # stopped where it was
        assert dst.sanitizer.ever
        assert wait_done(drv)["sstat"] == 1 | (2 << 3) | (1 << 8)
        after = blocks(drv)
        assert all(b == struct.pack("<I", 0xDEADBEEF ^ 0xFFFFFFFF) * 128 for b in after)
        assert [crc32c.crc32c(b) for b in after] != before
        assert completion_events(drv) == 1
        time.sleep(0.1)
        assert src.sanitizer.running  # the source never went on (the destination owns the operation)
    finally:
        host.close()


def test_sanitize_in_progress_migrates_between_processes(tmp_path, process_host):
    host = process_host(tmp_path, f"serial=SANX,max_ioqpairs=2,msix_vectors=3,sanitize_rate=4M,ns=mem:size={SIZE}",
                        io_queues=1, aers=1)
    # the destination listens before the sanitize starts: on a busy machine it may take
    # longer to start than the sanitize takes
    dst = host.destination("b", listening=True)
    drv = host.drv
    before = fill(drv)
    drv.sanitize(OVERWRITE, owpass=1, ndas=True, ovrpat=0x0BADF00D)
    time.sleep(0.3)
    prog = drv.sanitize_log()["sprog"]
    assert 0 < prog < 0xFFFF
    host.device.migrate(dst.incoming, timeout=20)
    assert host.device.info["pid"] == dst.pid
    log = drv.sanitize_log()
    assert log["sstat"] & 7 == 2 and prog <= log["sprog"] < 0xFFFF  # it goes on from there
    comp = drv.io(1, 0x02, nsid=1, cdw10=0, cdw12=0, buf=host.machine.alloc(4096, 4096), length=512, check=False)
    assert comp.code == Status.SANITIZE_IN_PROGRESS
    assert wait_done(drv)["sstat"] & 7 == 1
    after = blocks(drv)
    assert all(b == struct.pack("<I", 0x0BADF00D) * 128 for b in after)
    assert all(crc32c.crc32c(b) != c for b, c in zip(after, before, strict=True))
    assert completion_events(drv) == 1
    host.close_machine()
    assert host.src.proc.wait(10) == 0


@pytest.mark.parametrize("ndas", [False, True])
def test_sanitize_erases_the_protection_information_too(nvme_env, ndas):
    """A PI type 1 namespace: after a block erase the metadata reads as never written (the
    escape values), so every block passes every PI check and reads zeroes."""
    drv = nvme_env("ns=mem:size=1M,lbaf=2,pi=1", io_queues=1, aers=0).drv
    data = bytes(range(256)) * 16
    comp, _, _ = drv.io_md(0x01, 1, 0, 8, data=data, prinfo=8)  # PRACT: the controller adds the PI
    assert comp.ok
    drv.sanitize(2, ndas=ndas)  # block erase
    wait_done(drv)
    comp, got, _ = drv.io_md(0x02, 1, 0, 8, data_len=len(data), prinfo=8 | 7)  # strip, check all
    assert comp.ok, hex(comp.code)
    assert got == bytes(len(data))


def test_sanitize_punches_the_metadata_sidecar_and_flushes_it(nvme_env, tmp_path):
    """A file namespace with PI: the sanitize deallocates the sidecar's metadata as a hole
    (not written zeros) and its end flushes the metadata as well as the data."""
    env = nvme_env(f"ns=file:path={tmp_path}/s.img,size=8M,lbaf=2,pi=1", io_queues=1, aers=0)
    drv = env.drv
    data = bytes(range(256)) * 256  # 128 blocks
    for slba in range(0, 16384, 128):
        assert drv.io_md(0x01, 1, slba, 128, data=data, prinfo=8, ref=slba)[0].ok
    sidecar = f"{tmp_path}/s.img.nvme-meta"
    assert os.stat(sidecar).st_blocks * 512 >= 16384 * 8
    store = env.ctrl.allocated[1].meta
    flushed = []
    real_flush = store.flush
    store.flush = lambda: (flushed.append(1), real_flush())[1]
    try:
        drv.sanitize(2)  # block erase
        wait_done(drv)
    finally:
        store.flush = real_flush
    assert flushed, "the sanitize did not flush the metadata"
    assert os.stat(sidecar).st_blocks * 512 <= 64 << 10
    comp, got, _ = drv.io_md(0x02, 1, 16000, 8, data_len=8 * 512, prinfo=8 | 7, ref=16000)
    assert comp.ok and got == bytes(8 * 512)


def test_refused_with_a_write_protected_namespace(nvme_env, tmp_path):
    """A read-only image: the Sanitize is refused with Namespace is Write Protected and
    nothing changes (before the fix it started, failed and left the controller in the
    restricted failure mode until a restart)."""
    img = tmp_path / "ro.img"
    img.write_bytes(b"\x5a" * SIZE)
    env = nvme_env(f"ns=mem:size={SIZE},ns=file:path={img},size={SIZE},readonly=on", io_queues=1, aers=1)
    drv = env.drv
    comp = expect_status(drv, Status.NS_WRITE_PROTECTED, 0x84, cdw10=BLOCK_ERASE)
    assert comp.dnr
    assert drv.sanitize_log()["sstat"] == 0  # never sanitized
    assert drv.read(2, 0, 1) == b"\x5a" * 512
    drv.write(1, 0, b"\x01" * 512)
    assert drv.read(1, 0, 1) == b"\x01" * 512


def _pmr_enable(drv) -> None:
    drv.write32(0xE04, 1)  # PMRCTL.EN
    deadline = time.monotonic() + 2.0
    while drv.read32(0xE08) & (1 << 8):  # PMRSTS.NRDY
        assert time.monotonic() < deadline, "the PMR did not become ready"
        time.sleep(0.002)


def test_the_persistent_memory_region_and_sanitize(nvme_env, tmp_path):
    """Sanitize while the PMR is enabled: Sanitize Prohibited While Persistent Memory
    Region is Enabled (01h/23h). Enabling the PMR while a sanitize runs keeps NRDY set
    until it ends; enabling it clears Global Data Erased."""
    env = nvme_env(f"pmr={tmp_path}/pmr,pmr_size=1M,ns=mem:size={SIZE}", io_queues=1, aers=1)
    drv, ctrl = env.drv, env.ctrl
    fill(drv)
    _pmr_enable(drv)
    comp = expect_status(drv, Status.PMR_SAN_PROHIBITED, 0x84, cdw10=BLOCK_ERASE)
    assert comp.code == 0x123  # SCT 1, SC 23h
    assert drv.sanitize_log()["sstat"] == 0 and drv.read(1, 0, 1) != bytes(512)
    drv.write32(0xE04, 0)  # disabled: allowed
    ctrl.sanitizer.rate = CHUNK * 4
    drv.sanitize(BLOCK_ERASE)
    drv.write32(0xE04, 1)  # enabled while the sanitize runs: not ready until it ends
    time.sleep(0.1)
    assert drv.read32(0xE08) & (1 << 8)
    assert wait_done(drv)["sstat"] == 1 | (1 << 8)
    assert not drv.read32(0xE08) & (1 << 8)
    drv.write32(0xE04, 0)
    assert drv.sanitize_log()["sstat"] == 1 | (1 << 8)
    drv.write32(0xE04, 1)  # the PMR's contents are user data: no longer globally erased
    assert drv.sanitize_log()["sstat"] == 1


def test_global_data_erased_clears_on_write_zeroes_and_write_uncorrectable(env):
    drv = env.drv
    for opcode in (0x08, 0x04):  # Write Zeroes, Write Uncorrectable
        drv.sanitize(BLOCK_ERASE)
        assert wait_done(drv)["sstat"] == 1 | (1 << 8)
        drv.io(1, opcode, nsid=1, cdw10=3, cdw12=0)
        assert drv.sanitize_log()["sstat"] == 1, hex(opcode)


def test_restricted_failure_mode_needs_ause_0(nvme_env):
    env = nvme_env(f"ns=mem:size={SIZE}", io_queues=1, aers=1)
    drv = env.drv
    backend = FailingBackend(1 << 20)
    attach_namespace(env.ctrl, 2, backend)
    drv.scan_namespaces()
    drv.sanitize(BLOCK_ERASE, ause=False)
    assert wait_done(drv)["sstat"] & 7 == 3
    expect_status(drv, Status.SANITIZE_FAILED, 0x84, cdw10=BLOCK_ERASE | (1 << 3))  # AUSE=1: refused
    assert drv.sanitize_log()["sstat"] & 7 == 3
    backend.broken = False
    drv.sanitize(BLOCK_ERASE, ause=False)
    assert wait_done(drv)["sstat"] & 7 == 1


def test_log_estimates(env):
    """ETO covers 16 overwrite passes; the No-Deallocate Media Modification estimates are
    not reported (FFFFFFFFh: NODMMAS = 01b)."""
    env.ctrl.sanitizer.rate = float(SIZE)  # a second per pass
    log = env.drv.sanitize_log()
    assert log["eto"] >= 16 and log["etbe"] >= 1 and log["etce"] == log["etbe"]
    assert log["etond"] == log["etbend"] == log["etcend"] == 0xFFFFFFFF


def test_logs_refused_while_sanitizing(env):
    drv, ctrl = env.drv, env.ctrl
    ctrl.sanitizer.rate = CHUNK * 2
    drv.sanitize(BLOCK_ERASE, ndas=True)
    buf = drv.machine.alloc(4096, 4096)
    for lid in (0x03, 0x06, 0x12):
        expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x02, cdw10=(127 << 16) | lid, buf=buf, length=512)
    for lid in (0x01, 0x02, 0x04, 0x05, 0x81):
        drv.get_log(lid, 512)
    ctrl.sanitizer.rate = None
    assert wait_done(drv)["sstat"] & 7 == 1


def test_the_completion_event_is_in_the_snapshot_of_a_quiesce_during_finish(nvme_env, monkeypatch):
    """A quiesce that comes while the worker finishes waits until the completion event is
    queued: the snapshot holds the completed status and the event together."""
    import threading

    from pcidev_nvme.migration import save

    env = nvme_env(f"ns=mem:size={SIZE}", io_queues=1, aers=0)  # no AER outstanding: the event queues
    ctrl = env.ctrl
    san = ctrl.sanitizer
    posting = threading.Event()
    post = san._post_event

    def slow_post(*args):
        posting.set()
        time.sleep(0.3)  # a quiesce arrives meanwhile
        post(*args)

    monkeypatch.setattr(san, "_post_event", slow_post)
    env.drv.sanitize(BLOCK_ERASE)
    assert posting.wait(5)
    ctrl.quiesce()
    try:
        st = save(ctrl)
    finally:
        ctrl.resume()
    assert st.sanitize.sstat == 1 and not st.sanitize.running
    assert (6, 0x01, 0x81) in [(e.etype, e.info, e.lid) for e in st.aer.queued]


def test_a_sanitize_continues_after_a_restart(tmp_path):
    """The sanitize state lives in the state file: a controller restarted in the middle
    of an overwrite reports it in progress, refuses I/O, and finishes it once it runs;
    a failure mode is remembered across a restart too."""
    img = tmp_path / "disk.img"
    # (the rate as a property: the restarted controller must not finish before it is looked at)
    cfg = f"serial=sanp,state_dir={tmp_path},ns=file:path={img},size={SIZE},sanitize_rate={CHUNK * 2}"

    def start():
        machine = Machine(ram_size=64 << 20)
        ctrl = NvmeController(cfg)
        return machine, ctrl, NvmeDriver.attach(machine, ctrl, io_queues=1, aers=1)

    machine, ctrl, drv = start()
    try:
        fill(drv)
        drv.sanitize(OVERWRITE, owpass=1, ndas=True, ovrpat=0x0BADF00D)  # about two seconds
        time.sleep(0.3)
        assert drv.sanitize_log()["sstat"] & 7 == 2
    finally:
        drv.close()
        ctrl.close()  # power off in the middle
        machine.close()
    machine, ctrl, drv = start()
    try:
        log = drv.sanitize_log()
        assert log["sstat"] & 7 == 2 and log["scdw10"] & 7 == OVERWRITE
        expect_status(drv, Status.SANITIZE_IN_PROGRESS, 0x02, qid=1, nsid=1, cdw10=0, cdw12=0,
                      buf=drv.machine.alloc(4096, 4096), length=512)
        assert wait_done(drv)["sstat"] & 7 == 1
        assert completion_events(drv) == 1
        assert all(b == struct.pack("<I", 0x0BADF00D) * 128 for b in blocks(drv))
    finally:
        drv.close()
        ctrl.close()
        machine.close()
    machine, ctrl, drv = start()
    try:
        assert drv.sanitize_log()["sstat"] & 7 == 1  # the log is kept across power cycles
        drv.write(1, 0, b"\x42" * 512)
        assert drv.read(1, 0, 1) == b"\x42" * 512
    finally:
        drv.close()
        ctrl.close()
        machine.close()


def test_the_sanitize_waits_for_a_stuck_write_without_a_limit(nvme_env, monkeypatch):
    """A write stuck in the backend when the Sanitize comes: the operation waits for it
    however long it takes (the clock jumping far ahead changes nothing), so the write can
    never land on media the sanitize already erased."""
    import pcidev_nvme.sanitize as sanitize_mod

    env = nvme_env(f"ns=mem:size={SIZE}", io_queues=1, aers=1)
    drv, ctrl = env.drv, env.ctrl
    backend = GatedBackend(1 << 20)
    attach_namespace(ctrl, 2, backend)
    drv.scan_namespaces()
    backend.hold()
    buf = drv.machine.alloc(4096, 4096)
    drv.mem.write(buf, b"\xee" * 512)
    cid = drv.submit(1, 0x01, nsid=2, cdw10=0, cdw12=0, buf=buf, length=512)
    deadline = time.monotonic() + 5
    while backend.waiting != 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    drv.sanitize(BLOCK_ERASE)
    real = time.monotonic

    class Clock:  # the sanitize's clock only: far in the future
        @staticmethod
        def monotonic() -> float:
            return real() + 3600

        sleep = staticmethod(time.sleep)

    monkeypatch.setattr(sanitize_mod, "time", Clock)
    time.sleep(0.3)
    assert ctrl.sanitizer.running and ctrl.sanitizer.ns_index == 0 and ctrl.sanitizer.offset == 0
    backend.release()
    assert drv.wait_for(1, cid).ok
    assert wait_done(drv)["sstat"] & 7 == 1
    assert bytes(backend.data[:512]) == bytes(512)  # the write landed before the erase


def test_error_log_lbas_read_0_while_sanitizing(env):
    drv, ctrl = env.drv, env.ctrl
    expect_status(drv, Status.LBA_RANGE, 0x02, qid=1, nsid=1, cdw10=NLB + 5, cdw12=0,
                  buf=drv.machine.alloc(4096, 4096), length=512)
    lba = struct.unpack_from("<Q", drv.get_log(0x01, 64), 16)[0]
    assert lba == NLB + 5
    ctrl.sanitizer.rate = CHUNK * 2
    drv.sanitize(BLOCK_ERASE)
    assert struct.unpack_from("<Q", drv.get_log(0x01, 64), 16)[0] == 0
    ctrl.sanitizer.rate = None
    wait_done(drv)
    assert struct.unpack_from("<Q", drv.get_log(0x01, 64), 16)[0] == NLB + 5


def test_an_unreported_completion_event_of_an_earlier_sanitize_is_dropped(nvme_env):
    env = nvme_env(f"ns=mem:size={SIZE}", io_queues=1, aers=0)  # no AER: events stay queued
    drv, ctrl = env.drv, env.ctrl
    ev = (6, 0x01, 0x81)
    drv.sanitize(BLOCK_ERASE)
    wait_done(drv)
    assert list(ctrl.aer.queued) == [ev]
    ctrl.sanitizer.rate = CHUNK * 2
    drv.sanitize(BLOCK_ERASE)
    assert drv.sanitize_log()["sstat"] & 7 == 2
    assert ev not in ctrl.aer.queued  # it would tell the host the new one is done
    ctrl.sanitizer.rate = None
    wait_done(drv)
    assert list(ctrl.aer.queued) == [ev]
