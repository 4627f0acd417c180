"""Admin: Get Log Page (Error Information, SMART / Health, Firmware Slot, Changed
Namespace List, Commands Supported and Effects), its statuses, error entries for failed
commands, and SMART counters that persist across controller restarts."""

from __future__ import annotations

import struct

import attrs
import pytest
from _helpers import expect_status, make_env, smart

from pcidev_nvme.logs import ChangedNamespaces, SmartCounters, decode_error_entry
from pcidev_nvme.persist import StateFile
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ, WRITE

GET_LOG = 0x02


def log_args(lid, length, *, offset=0, nsid=0xFFFFFFFF, rae=False, csi=0):
    numd = length // 4 - 1
    return dict(nsid=nsid, cdw10=((numd & 0xFFFF) << 16) | (int(rae) << 15) | lid, cdw11=numd >> 16,
                cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, cdw14=csi << 24, length=length)


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=4M", io_queues=1)


def test_log_page_errors(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_LOG_PAGE, GET_LOG, param=40, **log_args(0x07, 512))
    expect_status(drv, Status.INVALID_LOG_PAGE, GET_LOG, **log_args(0xC0, 512))
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, param=48, **log_args(0x02, 64, offset=2))
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, param=48, **log_args(0x02, 64, offset=516))
    # (per namespace, LPA bit 0: an NSID that is not active is refused, see test_ns_smart.py)
    expect_status(drv, Status.INVALID_NSID, GET_LOG, param=4, **log_args(0x02, 512, nsid=7))
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, **log_args(0x05, 4096, csi=2))
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, **log_args(0x02, 1 << 20))  # beyond MDTS
    expect_status(drv, Status.DATA_TRANSFER_ERROR, GET_LOG, prp1=0x7F00_0000_0000,
                  **{k: v for k, v in log_args(0x02, 512).items() if k != "length"})


def test_partial_reads_with_offset(env):
    drv = env.drv
    full = drv.get_log(0x05, 4096)
    assert drv.get_log(0x05, 64, offset=1024) == full[1024:1088]
    assert drv.get_log(0x03, 512, offset=8)[:8] == drv.get_log(0x03, 512)[8:16]
    # reading past the end returns what exists; the rest of the buffer is untouched
    buf = env.machine.alloc(8192)
    env.machine.write(buf, b"\xAA" * 1024)
    drv.admin(GET_LOG, prp1=buf, **{k: v for k, v in log_args(0x02, 1024).items() if k != "length"})
    data = env.machine.read(buf, 1024)
    assert data[:32] == drv.get_log(0x02, 512)[:32]
    assert data[512:] == b"\xAA" * 512


def test_error_information_entries(env):
    drv = env.drv
    assert drv.get_log(0x01, 4096) == bytes(4096)
    c1 = expect_status(drv, Status.INVALID_OPCODE, 0x7E)
    buf = env.machine.alloc(4096)
    c2 = expect_status(drv, Status.LBA_RANGE, READ, qid=1, nsid=1, cdw10=8192, cdw12=0, buf=buf, length=512)
    c3 = expect_status(drv, Status.INVALID_NSID, WRITE, qid=1, nsid=7, buf=buf, length=512)
    page = drv.get_log(0x01, 64 * 4)
    e = [decode_error_entry(page[i:i + 64]) for i in range(0, 256, 64)]
    assert [x["error_count"] for x in e] == [3, 2, 1, 0]  # newest first
    assert (e[0]["sqid"], e[0]["cid"], e[0]["status"], e[0]["nsid"]) == (1, c3.cid, Status.INVALID_NSID | 0x4000, 7)
    assert (e[1]["sqid"], e[1]["cid"], e[1]["lba"], e[1]["nsid"]) == (1, c2.cid, 8192, 1)
    assert e[1]["param_error_location"] & 0xFF == 40
    assert (e[2]["sqid"], e[2]["cid"], e[2]["status"] & 0x7FF) == (0, c1.cid, Status.INVALID_OPCODE)
    assert e[2]["param_error_location"] == 0
    assert smart(drv)["error_entries"] == 3
    # the log keeps ELPE + 1 entries
    for _ in range(70):
        drv.admin(0x7E, check=False)
    page = drv.get_log(0x01, 64 * 64)
    counts = [decode_error_entry(page[i:i + 64])["error_count"] for i in range(0, 64 * 64, 64)]
    assert counts == list(range(73, 9, -1))
    assert smart(drv)["error_entries"] == 73


def test_smart_counters(env):
    drv, ctrl = env.drv, env.ctrl
    s0 = smart(drv)
    assert s0["temperature"] == ctrl.cfg.temperature and s0["available_spare"] == 100
    assert s0["power_cycles"] >= 1
    drv.write(1, 0, b"x" * 4096)
    for _ in range(3):
        drv.read(1, 0, 8)
    s1 = smart(drv)
    assert s1["host_write_commands"] - s0["host_write_commands"] == 1
    assert s1["host_read_commands"] - s0["host_read_commands"] == 3
    assert s1["data_units_written"] == 1  # 8 units of 512 B, rounded up to one thousand
    assert s1["data_units_read"] == 1
    assert ctrl.smart.bytes_read == 3 * 4096
    ctrl.set_temperature(330)
    assert smart(drv)["temperature"] == 330
    ctrl.inject_critical_warning(0x4)
    assert smart(drv)["critical_warning"] == 0x4


def test_data_units_rounding():
    s = SmartCounters()
    assert s.data_units_read == 0
    s.record_read(1)
    assert s.data_units_read == 1
    s.record_read(512 * 1000 - 1)
    assert s.data_units_read == 1
    s.record_read(1)
    assert s.data_units_read == 2


def test_smart_persists_across_restarts(tmp_path):
    img = tmp_path / "disk.img"
    cfg = f"serial=persist1,ns=file:path={img},size=1M"
    env = make_env(cfg, io_queues=1)
    try:
        drv = env.drv
        s0 = smart(drv)
        assert s0["power_cycles"] == 1 and s0["unsafe_shutdowns"] == 0
        drv.write(1, 0, b"p" * 4096)
        drv.read(1, 0, 8)
        drv.admin(0x7E, check=False)  # one error
        drv.shutdown()  # clean
    finally:
        env.close()
    state = tmp_path / "nvme-persist1.state"  # next to the image
    assert StateFile(state).load().dirty is False

    env = make_env(cfg, io_queues=1)
    try:
        drv = env.drv
        s1 = smart(drv)
        assert s1["power_cycles"] == 2
        assert s1["unsafe_shutdowns"] == 0
        assert s1["host_write_commands"] == 1 and s1["host_read_commands"] == 1
        assert s1["data_units_written"] == 1
        assert s1["error_entries"] == 1
        drv.write(1, 0, b"q" * 512)
    finally:
        env.close()  # powered off without CC.SHN: unsafe

    env = make_env(cfg, io_queues=1)
    try:
        s2 = smart(env.drv)
        assert s2["power_cycles"] == 3
        assert s2["unsafe_shutdowns"] == 1
        assert s2["host_write_commands"] == 2
        assert env.ctrl.error_log.count == 1  # the count continues
        assert env.ctrl.smart.power_on_total >= env.ctrl.smart.power_on_seconds
    finally:
        env.close()


def test_state_file_location_and_corruption(tmp_path):
    state = tmp_path / "custom.json"
    env = make_env(f"serial=loc,state_file={state},ns=mem:size=1M", io_queues=0)
    env.close()
    assert StateFile(state).load().smart.power_cycles == 1
    state.write_text("{not json")
    env = make_env(f"serial=loc,state_file={state},ns=mem:size=1M", io_queues=0)
    try:
        assert smart(env.drv)["power_cycles"] == 1  # started from zero
    finally:
        env.close()
    d = tmp_path / "sd"
    d.mkdir()
    env = make_env(f"serial=dir,state_dir={d},ns=mem:size=1M", io_queues=0)
    env.close()
    assert (d / "nvme-dir.state").exists()


def test_power_on_hours_accumulate(tmp_path):
    state = tmp_path / "s.json"
    env = make_env(f"state_file={state}", io_queues=0)
    env.close()
    f = StateFile(state)
    st = f.load()
    f.save(attrs.evolve(st, smart=attrs.evolve(st.smart, power_on_us=(3 * 3600 + 10) * 10**6)))
    env = make_env(f"state_file={state}", io_queues=0)
    try:
        assert smart(env.drv)["power_on_hours"] == 3
    finally:
        env.close()


def test_commands_supported_and_effects(env):
    page = env.drv.get_log(0x05, 4096)
    acs = struct.unpack_from("<256I", page, 0)
    iocs = struct.unpack_from("<256I", page, 1024)
    for opc in (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x0D, 0x10, 0x11, 0x14, 0x15, 0x18, 0x19,
                0x1A, 0x7C, 0x80, 0x84, 0x86):
        assert acs[opc] & 1, hex(opc)
    assert not acs[0x03] & 1 and not acs[0x1B] & 1
    assert acs[0x84] & 0b10  # sanitize changes LBA content
    assert acs[0x80] & 0b10  # format changes LBA content
    assert acs[0x15] & 0b1000  # attachment changes the namespace inventory
    for opc in (0x00, 0x01, 0x02, 0x04, 0x05, 0x08, 0x09, 0x0C, 0x19):
        assert iocs[opc] & 1, hex(opc)
    assert iocs[0x01] & 0b10 and not iocs[0x02] & 0b10


def test_firmware_slot_log_initial(env):
    page = env.drv.get_log(0x03, 512)
    assert page[0] & 7 == 1
    assert page[8:16] == b"1.0     "
    assert page[16:24] == bytes(8)


def test_log_page_hostile_offsets_and_lengths(nvme_env):
    env = nvme_env("ns=mem:size=1M,mdts=0", io_queues=0)  # no MDTS: any NUMD is acceptable
    drv = env.drv
    buf = env.machine.alloc(8192)
    guard = env.machine.alloc(4096)
    env.machine.write(guard, b"\x5A" * 4096)

    def args(lid, numd, offset, **kw):
        return dict(nsid=0xFFFFFFFF, cdw10=((numd & 0xFFFF) << 16) | lid, cdw11=numd >> 16,
                    cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, prp1=buf, prp2=buf + 4096, **kw)

    # offsets beyond the log, up to the largest dword-aligned 64-bit value
    for off in (516, 4096, 1 << 32, 2**64 - 4):
        expect_status(drv, Status.INVALID_FIELD, GET_LOG, param=48, **args(0x02, 127, off))
    expect_status(drv, Status.INVALID_FIELD, GET_LOG, param=48, **args(0x02, 127, 2**64 - 1))  # not aligned
    # NUMD FFFFFFFFh (16 GiB): only the log's 512 bytes are transferred, nothing beyond
    env.machine.write(buf, b"\xEE" * 8192)
    drv.admin(GET_LOG, **args(0x02, 0xFFFFFFFF, 0))
    data = env.machine.read(buf, 8192)
    assert data[:32] == drv.get_log(0x02, 512)[:32]  # the SMART log (its counters move on)
    assert data[512:] == b"\xEE" * (8192 - 512)
    # an offset equal to the size transfers nothing and is not an error
    env.machine.write(buf, b"\xEE" * 8192)
    drv.admin(GET_LOG, **args(0x02, 127, 512))
    assert env.machine.read(buf, 8192) == b"\xEE" * 8192
    assert env.machine.read(guard, 4096) == b"\x5A" * 4096
    assert env.ctrl.csts & 0x3 == 0x1


def test_changed_namespace_list_clear_keeps_what_changed_after_the_read():
    """Get Log Page 04h with RAE clear reads the list, moves it to the host, then clears:
    a namespace that changed in between stays for the next read (it was cleared unseen)."""
    log = ChangedNamespaces()
    log.add(3)
    page, token = log.read()
    assert struct.unpack_from("<2I", page) == (3, 0)
    log.add(5)  # while the page travels to the host
    log.clear(token)
    assert struct.unpack_from("<2I", log.page(clear=True)) == (5, 0)
    assert struct.unpack_from("<I", log.page(clear=False)) == (0,)
    # an overflowed list (FFFFFFFFh: rescan everything) is cleared only if nothing came since
    for n in range(1, ChangedNamespaces.LIMIT + 2):
        log.add(n)
    page, token = log.read()
    assert struct.unpack_from("<2I", page) == (0xFFFFFFFF, 0)
    log.add(7)
    log.clear(token)
    assert struct.unpack_from("<I", log.page(clear=False)) == (0xFFFFFFFF,)
    page, token = log.read()
    log.clear(token)
    assert struct.unpack_from("<I", log.page(clear=False)) == (0,)
