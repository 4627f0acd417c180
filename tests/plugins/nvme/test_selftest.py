"""Device Self-test (admin 14h, pcidev_nvme.selftest): short and extended tests, abort,
one at a time, the Device Self-test log byte by byte, a media failure on blocks marked
by Write Uncorrectable, resets, sanitize, and a test migrating while it runs."""

from __future__ import annotations

import os
import struct
import time

import crc32c
import pytest
from _helpers import expect_status
from test_migration_nvme import Host

from pcidev.host import Machine
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.selftest import edstt_minutes
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import NvmeDriver

SHORT, EXTENDED, ABORT = 1, 2, 0xF
ENTRY = struct.Struct("<BBBBQIQBB2x")


def entries(log: bytes) -> list[dict[str, int]]:
    out = []
    for i in range(20):
        dsts, seg, vdi, _r, poh, nsid, flba, sct, sc = ENTRY.unpack_from(log, 4 + 28 * i)
        out.append({"code": dsts >> 4, "result": dsts & 0xF, "seg": seg, "vdi": vdi, "poh": poh, "nsid": nsid,
                    "flba": flba, "sct": sct, "sc": sc})
    return out


def wait_idle(drv, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        log = drv.self_test_log()
        if log[0] == 0:
            return log
        assert time.monotonic() < deadline, "the self-test did not finish"
        time.sleep(0.01)


@pytest.fixture
def env(nvme_env):
    env = nvme_env("ns=mem:size=4M,ns=mem:size=4M", io_queues=1)
    fast(env.ctrl)
    return env


def fast(ctrl, short: float = 0.1, extended: float = 3.0) -> None:
    """Test durations (the real ones: 2 s and EDSTT minutes)."""
    st = ctrl.selftest
    st.time_scale = 1.0
    st.short_seconds = short
    st.extended_seconds = extended


def test_identify_fields(env):
    idc = env.drv.identify(1)
    oacs = struct.unpack_from("<H", idc, 256)[0]
    assert oacs & (1 << 4)
    edstt, dsto = struct.unpack_from("<HB", idc, 316)
    assert edstt == edstt_minutes(env.ctrl.total_capacity) >= 1 and dsto & 1
    fresh = NvmeController("ns=mem:size=4M")
    try:
        assert fresh.selftest.extended_seconds == 60.0 * edstt and fresh.selftest.short_seconds <= 120
    finally:
        fresh.close()


def test_empty_log(env):
    log = env.drv.self_test_log()
    assert len(log) == 564 and log[:4] == bytes(4)
    assert all(e["result"] == 0xF for e in entries(log))


def test_short_self_test(env):
    drv = env.drv
    drv.device_self_test(SHORT, nsid=0xFFFFFFFF)
    log = drv.self_test_log()
    assert log[0] == SHORT and log[1] < 100
    expect_status(drv, Status.SELF_TEST_IN_PROGRESS, 0x14, nsid=0xFFFFFFFF, cdw10=EXTENDED)
    log = wait_idle(drv)
    e = entries(log)
    assert e[0] == {"code": SHORT, "result": 0, "seg": 0, "vdi": 1, "poh": 0, "nsid": 0xFFFFFFFF, "flba": 0,
                    "sct": 0, "sc": 0}
    assert all(x["result"] == 0xF for x in e[1:])


def test_controller_only_and_one_namespace(env):
    drv = env.drv
    drv.device_self_test(SHORT, nsid=0)
    e = entries(wait_idle(drv))[0]
    assert e["result"] == 0 and e["vdi"] == 0 and e["nsid"] == 0
    drv.device_self_test(SHORT, nsid=2)
    e = entries(wait_idle(drv))
    assert e[0]["nsid"] == 2 and e[0]["vdi"] == 1 and e[1]["vdi"] == 0  # newest first


def test_statuses(env):
    drv = env.drv
    for stc in (0, 3, 0xE):
        expect_status(drv, Status.INVALID_FIELD, 0x14, cdw10=stc, param=40)
    expect_status(drv, Status.INVALID_NSID, 0x14, nsid=9, cdw10=SHORT, param=4)
    drv.device_self_test(ABORT)  # nothing to abort: success
    assert drv.self_test_log()[4] == 0xF


def test_abort(env):
    drv = env.drv
    drv.device_self_test(EXTENDED, nsid=1)
    time.sleep(0.1)
    assert drv.self_test_log()[0] == EXTENDED
    drv.device_self_test(ABORT)
    log = drv.self_test_log()
    assert log[0] == 0
    e = entries(log)[0]
    assert e["code"] == EXTENDED and e["result"] == 1 and e["nsid"] == 1


def test_extended_reports_marked_blocks(env):
    drv = env.drv
    drv.write(2, 0, b"\x5a" * 4096)
    drv.write_uncorrectable(2, 777, 3)
    drv.device_self_test(EXTENDED, nsid=0xFFFFFFFF)
    time.sleep(0.5)
    pct = drv.self_test_log()[1]
    assert 0 < pct < 100
    e = entries(wait_idle(drv))[0]
    assert e["code"] == EXTENDED and e["result"] == 7 and e["seg"] == 7
    assert e["vdi"] == 0xF and e["nsid"] == 2 and e["flba"] == 777 and (e["sct"], e["sc"]) == (2, 0x81)
    # rewritten: the next test passes
    drv.write(2, 777, bytes(3 * 512))
    drv.device_self_test(SHORT, nsid=2)
    assert entries(wait_idle(drv))[0]["result"] == 0


def test_short_is_aborted_by_a_reset_extended_goes_on(env):
    drv = env.drv
    fast(env.ctrl, short=30.0)
    drv.device_self_test(SHORT, nsid=1)
    drv.disable()
    drv.restart()
    log = drv.self_test_log()
    assert log[0] == 0 and entries(log)[0]["result"] == 2
    fast(env.ctrl)
    drv.device_self_test(EXTENDED, nsid=1)
    drv.disable()
    drv.restart()
    assert drv.self_test_log()[0] == EXTENDED
    assert entries(wait_idle(drv))[0]["result"] == 0


def test_sanitize_aborts_a_self_test(env):
    drv = env.drv
    drv.device_self_test(EXTENDED, nsid=1)
    drv.sanitize(2)
    deadline = time.monotonic() + 20  # log 06h is refused while the sanitize runs
    while drv.sanitize_log()["sstat"] & 7 == 2:
        assert time.monotonic() < deadline, "the sanitize did not finish"
        time.sleep(0.01)
    e = entries(drv.self_test_log())[0]
    assert e["result"] == 9 and e["code"] == EXTENDED


def test_twenty_results_newest_first(env):
    drv = env.drv
    fast(env.ctrl, short=0.002)
    for i in range(22):
        drv.device_self_test(SHORT, nsid=1 + i % 2)
        wait_idle(drv)
    e = entries(drv.self_test_log())
    assert [x["nsid"] for x in e] == [2 - i % 2 for i in range(20)]


def test_self_test_running_migrates():
    host = Host("serial=st1,ns=mem:size=4M", io_queues=1, aers=0)
    try:
        drv = host.drv
        data = bytes(range(256)) * 16
        drv.write(1, 0, data)
        drv.write_uncorrectable(1, 100, 1)
        fast(host.ctrl)
        drv.device_self_test(EXTENDED, nsid=1)
        time.sleep(0.4)
        pct = drv.self_test_log()[1]
        assert pct > 0
        dst = host.migrate()
        assert dst.selftest.extended_seconds > 3.0  # the destination's own default: the test carries its own
        log = drv.self_test_log()
        assert log[0] == EXTENDED and log[1] >= pct
        e = entries(wait_idle(drv))[0]
        assert e["result"] == 7 and e["flba"] == 100 and dst.selftest.results
        assert drv.read(1, 0, 8) == data
    finally:
        host.close()


def test_self_test_and_marks_migrate_between_processes(tmp_path, process_host):
    img = tmp_path / "x.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    # an extended self-test of 10 s (EDSTT 1 minute / 6): it starts once the destination
    # listens, so on a busy machine it is still running when the migration happens, however
    # slowly the destination process started (a 3 s test started before could end first)
    opts = (f"serial=STX,max_ioqpairs=2,msix_vectors=3,capacity=16M,selftest_speedup=6,ns=mem:size=4M,"
            f"ns=file:path={img},size=4M")
    host = process_host(tmp_path, opts, io_queues=1, aers=0)  # (the image's identity file first)
    dst = host.destination("b")
    drv, machine = host.drv, host.machine
    data = {n: os.urandom(64 * 512) for n in (1, 2)}
    for n, d in data.items():
        drv.write(n, 0, d)
        drv.write_uncorrectable(n, 10 * n, n)
    host.listening(dst)
    drv.device_self_test(EXTENDED, nsid=0xFFFFFFFF)
    time.sleep(0.3)
    pct = drv.self_test_log()[1]
    host.device.migrate(dst.incoming, timeout=20)
    assert host.device.info["pid"] == dst.pid
    log = drv.self_test_log()
    assert log[0] == EXTENDED and log[1] >= pct
    for n, d in data.items():
        comp = drv.io(1, 0x02, nsid=n, cdw10=10 * n, cdw12=0, buf=machine.alloc(4096, 4096), length=512,
                      check=False)
        assert comp.code == Status.UNRECOVERED_READ_ERROR
        lo, hi = 10 * n, 11 * n
        got = drv.read(n, 0, lo) + drv.read(n, hi, 64 - hi)
        want = d[:lo * 512] + d[hi * 512:]
        assert [crc32c.crc32c(got[i:i + 512]) for i in range(0, len(got), 512)] == \
            [crc32c.crc32c(want[i:i + 512]) for i in range(0, len(want), 512)]
    e = entries(wait_idle(drv, timeout=30))[0]
    assert e["code"] == EXTENDED and e["result"] == 7 and (e["nsid"], e["flba"]) == (1, 10)
    host.close_machine()
    assert host.src.proc.wait(10) == 0


def test_format_and_detach_abort_a_test_of_their_namespace(env):
    drv = env.drv
    drv.device_self_test(EXTENDED, nsid=2)
    drv.admin(0x80, nsid=1, cdw10=0)  # another namespace: the test goes on
    assert drv.self_test_log()[0] == EXTENDED
    drv.admin(0x80, nsid=2, cdw10=0)
    e = entries(drv.self_test_log())[0]
    assert e["result"] == 4 and e["nsid"] == 2
    drv.device_self_test(EXTENDED, nsid=0xFFFFFFFF)
    drv.admin(0x15, nsid=1, cdw10=1, data=struct.pack("<HH", 1, env.ctrl.cfg.cntlid))  # detach namespace 1
    e = entries(drv.self_test_log())[0]
    assert e["result"] == 3 and drv.self_test_log()[0] == 0


def test_an_inactive_namespace_is_an_invalid_field(env):
    drv = env.drv
    drv.admin(0x15, nsid=2, cdw10=1, data=struct.pack("<HH", 1, env.ctrl.cfg.cntlid))  # detach namespace 2
    expect_status(drv, Status.INVALID_FIELD, 0x14, nsid=2, cdw10=SHORT, param=4)
    expect_status(drv, Status.INVALID_NSID, 0x14, nsid=9, cdw10=SHORT, param=4)


def test_the_extended_duration_follows_edstt(nvme_env):
    """EDSTT follows the capacity (a namespace added grows TNVMCAP): so does the extended
    test's duration, read when a test starts."""
    from _helpers import attach_namespace

    from pcidev_nvme.backends.mem import MemoryBackend

    env = nvme_env("capacity=4M,ns=mem:size=4M", io_queues=1)
    st = env.ctrl.selftest

    def edstt() -> int:
        return struct.unpack_from("<H", env.drv.identify(1), 316)[0]

    assert st.extended_seconds == 60.0 * edstt()
    before = edstt()
    attach_namespace(env.ctrl, 2, MemoryBackend(16 << 30))
    assert edstt() > before and st.extended_seconds == 60.0 * edstt()


def test_results_and_an_extended_test_survive_a_power_cycle(tmp_path):
    """The state file keeps the self-test results; an extended test in progress at the
    power-off continues after it (a short one is aborted by it)."""
    cfg = f"serial=stp,state_dir={tmp_path},ns=mem:size=4M"

    def start():
        machine = Machine(ram_size=64 << 20)
        ctrl = NvmeController(cfg)
        fast(ctrl, short=0.05, extended=1.5)
        return machine, ctrl, NvmeDriver.attach(machine, ctrl, io_queues=1, aers=0)

    def stop(machine, ctrl, drv):
        drv.close()
        ctrl.close()
        machine.close()

    machine, ctrl, drv = start()
    try:
        drv.device_self_test(SHORT)
        wait_idle(drv)
        drv.device_self_test(EXTENDED)
        time.sleep(0.3)
        assert drv.self_test_log()[0] == EXTENDED
    finally:
        stop(machine, ctrl, drv)
    machine, ctrl, drv = start()
    try:
        assert drv.self_test_log()[0] == EXTENDED  # continues
        log = wait_idle(drv)
        e = entries(log)
        assert (e[0]["code"], e[0]["result"]) == (EXTENDED, 0) and (e[1]["code"], e[1]["result"]) == (SHORT, 0)
        drv.device_self_test(SHORT)
        time.sleep(0.01)
    finally:
        stop(machine, ctrl, drv)
    machine, ctrl, drv = start()
    try:
        e = entries(drv.self_test_log())
        assert [x["code"] for x in e[:3]] == [SHORT, EXTENDED, SHORT]
        assert e[0]["result"] in (0, 2)  # done before the power-off, or aborted by it
        assert drv.self_test_log()[0] == 0
    finally:
        stop(machine, ctrl, drv)
