"""vfio-user migration (VFIO migration v2 over the socket), server side, driven by
pcidev's client: the full migration of an NVMe controller between two ``pcidev serve``
processes with verified I/O, every state arc, a refused stream, blockers, DMA dirty
logging against a snapshot diff, and hostile DEVICE_FEATURE bodies."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nvme_blocks import BLOCK, Pattern, host_writes

from pcidev.device import PciDevice
from pcidev.devices.edu import EduDevice
from pcidev.dma import alloc_memfd
from pcidev.errors import MigrationError
from pcidev.host.machine import Machine
from pcidev.testing import served
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.conn import ConnectionState
from pcidev.transport.vfio_user.migration import migration_path
from pcidev.transport.vfio_user.migration_client import (
    dirty_pages,
    feature,
    feature_probe,
    logging_report,
    logging_start,
    logging_stop,
    mig_read_all,
    mig_state,
    mig_write_all,
    migrate,
    migration_flags,
    set_mig_state,
)
from pcidev.transport.vfio_user.protocol import (
    MIG_STATE_ERROR,
    MIG_STATE_PRE_COPY,
    MIG_STATE_RESUMING,
    MIG_STATE_RUNNING,
    MIG_STATE_STOP,
    MIG_STATE_STOP_COPY,
    VfioUserError,
)
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev.transport.vfio_user.server import VfioUserServer
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import NvmeDriver

STATES = (MIG_STATE_STOP, MIG_STATE_RUNNING, MIG_STATE_STOP_COPY, MIG_STATE_RESUMING, MIG_STATE_PRE_COPY)


class InProcess:
    """A device served by a VfioUserServer in a thread, over a socketpair."""

    def __init__(self, device: PciDevice | None = None, *, endpoint: DeviceEndpoint | None = None) -> None:
        if endpoint is None:  # a new device; else the next client of a served one
            assert device is not None
            endpoint = DeviceEndpoint(device)
            endpoint.start()
        self.endpoint = endpoint
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server = VfioUserServer(self.endpoint, a)
        self.result: dict[str, str] = {}
        self.thread = threading.Thread(target=lambda: self.result.setdefault("reason", self.server.serve()),
                                       daemon=True)
        self.thread.start()
        self.client = VfioUserClient(b, timeout=20)
        self.client.version()

    def close(self, *, keep_device: bool = False) -> None:
        self.client.close()
        self.thread.join(10)
        assert not self.thread.is_alive()
        if not keep_device:
            self.endpoint.close()


@pytest.fixture
def edu() -> Iterator[InProcess]:
    srv = InProcess(EduDevice())
    yield srv
    srv.close()


def refused(fn: Any, *args: Any) -> int:
    with pytest.raises(VfioUserError) as info:
        fn(*args)
    return info.value.errno


# -- the full migration ---------------------------------------------------------------------------
def test_an_nvme_controller_migrates_between_two_pcidev_serve_processes(tmp_path: Path) -> None:
    img = tmp_path / "ns.img"
    spec = f"ns=file:path={img},size=4M,aerl=3"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with served("nvme", spec, plugin_specs=(), directory=tmp_path / "a") as src, \
            served("nvme", spec, plugin_specs=(), directory=tmp_path / "b") as dst, \
            Machine(ram_size=64 << 20) as machine:
        remote = VfioUserDevice.connect(src.path)
        try:
            drv = NvmeDriver.attach(machine, remote, io_queues=2, io_depth=32, aers=2)
            assert migration_flags(remote.client) == protocol.MIGRATION_STOP_COPY | protocol.MIGRATION_PRE_COPY
            assert feature_probe(remote.client, protocol.FEATURE_MIG_DEVICE_STATE,
                                 protocol.FEATURE_GET | protocol.FEATURE_SET)
            pattern = Pattern()
            for i in range(24):
                pattern.write(drv, i * 8, qid=1 + i % 2)
            pattern.verify(drv)
            writes = host_writes(drv)

            dst_client = VfioUserClient.connect(dst.path, timeout=20)
            outcome = migrate(remote, dst_client, path=dst.path)
            assert remote.client is dst_client and remote.path == dst.path
            assert outcome.state_bytes > 0 and outcome.downtime >= 0
            assert src.wait(20) == 0  # its client left (migrate closed it)

            assert mig_state(remote.client) == MIG_STATE_RUNNING
            assert drv.csts & 1  # CSTS.RDY on the destination
            pattern.verify(drv)  # both queues exist there, the data reads back
            for i in range(24, 30):
                pattern.write(drv, i * 8, qid=1 + i % 2)
            pattern.verify(drv, qids=(2, 1))
            assert host_writes(drv) == writes + 6  # SMART carried and counting on
            # the AERs outstanding on the source complete on the destination
            remote.bar_write(0, 0x1000 + 8 * 9, 4, 1)  # a doorbell of an SQ that does not exist
            assert drv.poll_events(2.0) == [(0, 0x00, 0x01)]
            drv.close()
        finally:
            remote.close()
        assert dst.wait(20) == 0


# -- the state machine -----------------------------------------------------------------------------
def _expected(cur: int, target: int) -> int | None:
    """The spec's answer, written out by hand: the final state, or None for EINVAL."""
    if cur == MIG_STATE_ERROR or target not in STATES:
        return None
    if cur == MIG_STATE_STOP_COPY and target == MIG_STATE_PRE_COPY:
        return None
    return target


def _goto(srv: InProcess, state: int, stream: bytes) -> None:
    c = srv.client
    if state == MIG_STATE_ERROR:
        set_mig_state(c, MIG_STATE_RESUMING)
        mig_write_all(c, b"garbage")
        assert refused(set_mig_state, c, MIG_STATE_STOP) == errno.EINVAL
    else:
        set_mig_state(c, state)
        if state == MIG_STATE_RESUMING:
            mig_write_all(c, stream)
    assert mig_state(c) == state


def _reset(c: VfioUserClient) -> None:
    """DEVICE_RESET, back to RUNNING (a reset in PRE_COPY keeps PRE_COPY: libvfio-user #853)."""
    if mig_state(c) == MIG_STATE_PRE_COPY:
        set_mig_state(c, MIG_STATE_RUNNING)
    c.reset()


@pytest.mark.parametrize("cur", (*STATES, MIG_STATE_ERROR))
def test_every_arc_is_taken_or_refused_as_the_spec_says(edu: InProcess, cur: int) -> None:
    c = edu.client
    set_mig_state(c, MIG_STATE_STOP_COPY)
    stream = mig_read_all(c)
    assert stream and mig_read_all(c) == b""  # a short read ended it; nothing more
    set_mig_state(c, MIG_STATE_RUNNING)
    for target in range(10):
        _reset(c)
        assert mig_state(c) == MIG_STATE_RUNNING
        _goto(edu, cur, stream)
        want = _expected(cur, target)
        if want is None:
            assert refused(set_mig_state, c, target) == errno.EINVAL, (cur, target)
            assert mig_state(c) == cur  # unchanged
        else:
            assert set_mig_state(c, target) == want, (cur, target)
            assert mig_state(c) == want
            running = want in (MIG_STATE_RUNNING, MIG_STATE_PRE_COPY)
            assert edu.endpoint.device.quiesced is not running
    _reset(c)
    assert mig_state(c) == MIG_STATE_RUNNING and not edu.endpoint.device.quiesced


def test_the_arcs_are_single_steps_of_the_spec() -> None:
    S, R, SC, RS, PC = STATES
    assert migration_path(R, SC) == [S, SC]
    assert migration_path(PC, SC) == [SC]
    assert migration_path(S, PC) == [R, PC]
    assert migration_path(RS, R) == [S, R]
    assert migration_path(RS, PC) == [S, R, PC]
    assert migration_path(SC, RS) == [S, RS]
    assert migration_path(PC, S) == [R, S]


def test_data_moves_only_in_its_states(edu: InProcess) -> None:
    c = edu.client
    assert refused(mig_read_all, c) == errno.EINVAL  # RUNNING
    assert refused(mig_write_all, c, b"x") == errno.EINVAL
    set_mig_state(c, MIG_STATE_PRE_COPY)
    assert mig_read_all(c) == b""  # no early data: everything comes at the stop
    set_mig_state(c, MIG_STATE_STOP_COPY)
    stream = mig_read_all(c, 100)  # small chunks
    assert refused(mig_write_all, c, b"x") == errno.EINVAL
    set_mig_state(c, MIG_STATE_RESUMING)
    mig_write_all(c, stream, 33)
    set_mig_state(c, MIG_STATE_RUNNING)  # RESUMING -> STOP (load) -> RUNNING
    assert not edu.endpoint.device.quiesced


def test_a_corrupted_stream_fails_resuming_to_stop_and_only_reset_leaves_error(edu: InProcess) -> None:
    c = edu.client
    dev = edu.endpoint.device
    set_mig_state(c, MIG_STATE_STOP_COPY)
    stream = bytearray(mig_read_all(c))
    set_mig_state(c, MIG_STATE_STOP)
    before = bytes(dev.config.data)
    stream[len(stream) // 2] ^= 0x40
    set_mig_state(c, MIG_STATE_RESUMING)
    mig_write_all(c, bytes(stream))
    assert refused(set_mig_state, c, MIG_STATE_STOP) == errno.EINVAL
    assert mig_state(c) == MIG_STATE_ERROR
    assert bytes(dev.config.data) == before  # the load is all or nothing
    for target in STATES:
        assert refused(set_mig_state, c, target) == errno.EINVAL
        assert mig_state(c) == MIG_STATE_ERROR
    c.reset()
    assert mig_state(c) == MIG_STATE_RUNNING and not dev.quiesced
    assert c.config_read(0, 2) == 0x1234  # still served


class BlockedEdu(EduDevice):
    """An edu device with a reason of the moment not to migrate."""

    def device_migration_blockers(self) -> list[str]:
        return ["a test says no"]


def test_a_blocker_blocks_before_anything_stops() -> None:
    """A reason of the moment blocks (a ``mem`` namespace, the example here before, now migrates)."""
    srv = InProcess(BlockedEdu())
    try:
        c = srv.client
        for target in (MIG_STATE_PRE_COPY, MIG_STATE_STOP_COPY):
            with pytest.raises(VfioUserError) as info:
                set_mig_state(c, target)
            assert info.value.errno == errno.EBUSY
            assert mig_state(c) == MIG_STATE_RUNNING and not srv.endpoint.device.quiesced
        set_mig_state(c, MIG_STATE_STOP)  # stopping is fine; saving is not
        assert refused(set_mig_state, c, MIG_STATE_STOP_COPY) == errno.EBUSY
        assert mig_state(c) == MIG_STATE_STOP
        set_mig_state(c, MIG_STATE_RUNNING)
    finally:
        srv.close()


def test_the_server_drops_a_migration_and_logging_when_its_client_leaves(edu: InProcess) -> None:
    c = edu.client
    logging_start(c, [(0, 1 << 20)])
    set_mig_state(c, MIG_STATE_STOP_COPY)
    assert edu.server.migration_busy() == "migration state STOP_COPY"
    c.close()
    edu.thread.join(10)
    assert edu.result["reason"] == "eof"
    # logging off; the device reached STOP_COPY: it migrated out, and stays stopped
    assert edu.server.migration_busy() == "migration state STOP" and edu.server.migrated_out
    assert edu.endpoint.memory.dirty is None
    assert edu.server.dormant and edu.endpoint.device.quiesced  # kept for the next client


# -- dirty logging ---------------------------------------------------------------------------------
def test_reported_dirty_pages_cover_every_page_the_device_wrote(tmp_path: Path) -> None:
    ram = 16 << 20
    srv = InProcess(NvmeController(f"ns=file:path={tmp_path}/ns.img,size=2M"))
    try:
        with Machine(ram_size=ram) as machine:
            remote = VfioUserDevice(srv.client)
            drv = NvmeDriver.attach(machine, remote, io_queues=1, io_depth=16, aers=1)
            pattern = Pattern()
            pattern.write(drv, 0, qid=1)
            c = srv.client
            landing = [machine.alloc(4096) for _ in range(8)]  # read buffers the host never writes
            before = os.pread(machine.ram_fd, ram, 0)
            host = machine.memory.start_dirty_log()  # what the host itself writes (SQEs, write data)
            logging_start(c)  # all mapped memory
            reported: set[int] = set()
            for i in range(1, 12):
                pattern.write(drv, i * 8, qid=1)
                if i % 4 == 0:
                    reported |= set(dirty_pages(logging_report(c, 0, ram), 0))
                drv.identify(0x01)
                pattern.verify(drv, qids=(1,))
                if i < len(landing):  # the device writes these pages only
                    drv.io(1, 0x02, nsid=1, cdw10=i * 8, cdw12=7, buf=landing[i], length=4096)
                    data = machine.memory.read(landing[i], 4096)
                    assert crc32c.crc32c(data[:BLOCK]) == pattern.crcs[i * 8]
            drv.get_log(0x02, 512)
            set_mig_state(c, MIG_STATE_STOP)  # quiescent: every write through a view is done
            reported |= set(dirty_pages(logging_report(c, 0, ram), 0))
            after = os.pread(machine.ram_fd, ram, 0)
            host_pages = set(dirty_pages(host.report(0, ram, 4096), 0))
            machine.memory.stop_dirty_log()
            changed = {p for p in range(0, ram, 4096) if before[p:p + 4096] != after[p:p + 4096]}
            by_device = changed - host_pages
            assert set(landing[1:]) <= by_device and len(by_device) >= 9  # + the CQs
            assert by_device <= reported, sorted(by_device - reported)
            assert logging_report(c, 0, ram) == bytes(ram // 4096 // 8)  # reported and cleared
            # the bitmap is too large for one reply at 4 KiB pages beyond max_data_xfer_size
            set_mig_state(c, MIG_STATE_RUNNING)
            logging_stop(c)
            assert refused(logging_report, c, 0, ram) == errno.EINVAL  # logging is off
            pattern.verify(drv, qids=(1,))
            drv.close()
    finally:
        srv.close()


def test_logging_requests_are_checked(edu: InProcess) -> None:
    c = edu.client
    edu.server.conn.max_data_xfer_size = 4096
    logging_start(c, [(0, 1 << 30)])
    assert refused(logging_start, c) == errno.EBUSY  # already on
    assert refused(logging_report, c, 0, 1 << 30) == errno.E2BIG  # 32 KiB of bitmap > 4 KiB
    assert len(logging_report(c, 0, 1 << 27)) == 4096
    assert refused(logging_report, c, 0x1000, 0x1000, 8192) == errno.EINVAL  # not whole pages
    assert refused(logging_report, c, 1 << 30, 4096) == errno.EINVAL  # not logged
    logging_stop(c)
    assert refused(logging_start, c, [(0x800, 0x1000)]) == errno.EINVAL
    assert refused(logging_start, c, [(0, 4096)], 1000) == errno.EINVAL


# -- hostile requests ------------------------------------------------------------------------------
def test_unsupported_features_and_operations_are_einval(edu: InProcess) -> None:
    c = edu.client
    G, S = protocol.FEATURE_GET, protocol.FEATURE_SET
    assert refused(feature, c, 3 | G) == errno.EINVAL  # no such feature here
    assert refused(feature, c, protocol.FEATURE_MIGRATION | S, b"\0" * 8) == errno.EINVAL
    assert refused(feature, c, protocol.FEATURE_MIG_DEVICE_STATE | G | S) == errno.EINVAL
    assert refused(feature, c, protocol.FEATURE_MIG_DEVICE_STATE) == errno.EINVAL  # neither GET nor SET
    assert not feature_probe(c, protocol.FEATURE_MIGRATION, S)
    assert feature_probe(c, protocol.FEATURE_MIGRATION, G)
    assert feature_probe(c, protocol.FEATURE_DMA_LOGGING_REPORT, G)
    assert not feature_probe(c, protocol.FEATURE_DMA_LOGGING_START, G)
    assert refused(feature, c, protocol.FEATURE_MIGRATION | G | (1 << 20)) == errno.EINVAL


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmd=st.sampled_from([protocol.DEVICE_FEATURE, protocol.MIG_DATA_READ, protocol.MIG_DATA_WRITE]),
       argsz=st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),
       feat=st.one_of(st.sampled_from([1, 2, 6, 7, 8]), st.integers(0, 0xFFFF)),
       ops=st.integers(0, 15),
       data=st.one_of(st.binary(max_size=96),
                      st.builds(lambda n, rs: struct.pack("<QII", 4096, n, 0) + b"".join(
                          struct.pack("<QQ", a, ln) for a, ln in rs),
                          st.integers(0, 8), st.lists(st.tuples(st.integers(0, 2**64 - 1),
                                                                st.integers(0, 2**64 - 1)), max_size=4))))
def test_hostile_feature_and_data_bodies_get_a_reply_never_an_exception(
        edu: InProcess, cmd: int, argsz: int, feat: int, ops: int, data: bytes) -> None:
    c = edu.client
    flags = feat | (ops & 7) << 16 | (ops >> 3) << 24
    body = struct.pack("<II", argsz, flags) + data
    try:
        c.request(cmd, body)
    except VfioUserError as exc:
        assert exc.errno != errno.EIO  # EIO is the server's answer to an exception it did not expect
    assert not c.closed and edu.thread.is_alive()
    # whatever it did, the server answers and can be brought back to RUNNING, logging off
    c.reset()
    logging_stop(c)
    assert mig_state(c) == MIG_STATE_RUNNING and c.config_read(0, 2) == 0x1234


def test_the_destination_keeps_its_own_memory_and_it_must_match_the_streams() -> None:
    fd = alloc_memfd(2 << 20)
    src, good, bad = InProcess(EduDevice()), InProcess(EduDevice()), InProcess(EduDevice())
    try:
        src.client.dma_map(0x100000, 1 << 20, fd)
        set_mig_state(src.client, MIG_STATE_STOP_COPY)
        stream = mig_read_all(src.client)
        good.client.dma_map(0x100000, 1 << 20, fd, 0)  # the same map, its own fd
        bad.client.dma_map(0x200000, 1 << 20, fd)      # elsewhere
        for dst, ok in ((good, True), (bad, False)):
            set_mig_state(dst.client, MIG_STATE_RESUMING)
            mig_write_all(dst.client, stream)
            if ok:
                assert set_mig_state(dst.client, MIG_STATE_RUNNING) == MIG_STATE_RUNNING
                assert [(r.gpa, r.size) for r in dst.endpoint.memory.regions()] == [(0x100000, 1 << 20)]
            else:
                assert refused(set_mig_state, dst.client, MIG_STATE_STOP) == errno.EINVAL
                assert mig_state(dst.client) == MIG_STATE_ERROR
    finally:
        for s in (src, good, bad):
            s.close()
        os.close(fd)


def test_version_advertises_migration_only_if_the_reply_fits(edu: InProcess) -> None:
    c = edu.client
    assert c.version() == {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}}
    # a client whose own string is shorter gets what fits: the limits, then nothing
    assert c.version({"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}) == {
        "max_msg_fds": 8, "max_data_xfer_size": 1 << 20}
    assert c.version({"a": 1}) == {}


def test_version_adds_migration_only_if_the_client_proposed_it(edu: InProcess) -> None:
    c = edu.client
    limits = {"max_msg_fds": 8, "max_data_xfer_size": 1 << 20}
    assert c.version({**limits, "padding": "x" * 64}) == limits  # room enough, but not proposed
    assert c.version({**limits, "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 28}}) == {
        **limits, "migration": {"pgsize": 4096, "max_bitmap_size": 1 << 20}}  # the bitmap limit of a report
    assert c.version({**limits, "migration": "yes"}) == limits  # not an object: not proposed


def test_a_restored_connection_state_carries_the_migration_state(edu: InProcess) -> None:
    """A handover's destination replaces the server's ConnectionState as a whole."""
    meta = edu.server.conn.to_meta()
    meta["mig_state"] = MIG_STATE_STOP
    edu.server.conn = ConnectionState.from_meta(meta)
    assert edu.server.migration.state == MIG_STATE_STOP == mig_state(edu.client)
    assert edu.server.migration_busy() == "migration state STOP"


def test_a_refused_migration_leaves_the_source_running(tmp_path: Path) -> None:
    """The destination's configuration differs (another serial): its load fails, migrate()
    raises, and the host goes on with the device at the source."""
    src = InProcess(NvmeController(f"serial=SRC,ns=file:path={tmp_path}/a.img,size=2M"))
    dst = InProcess(NvmeController(f"serial=DST,ns=file:path={tmp_path}/b.img,size=2M"))
    try:
        with Machine(ram_size=16 << 20) as machine:
            remote = VfioUserDevice(src.client)
            drv = NvmeDriver.attach(machine, remote, io_queues=2, io_depth=16, aers=1)
            pattern = Pattern()
            for i in range(4):
                pattern.write(drv, i * 8, qid=1 + i % 2)
            with pytest.raises(MigrationError, match="after the source stopped.*the source runs"):
                migrate(remote, dst.client)
            assert remote.client is src.client
            assert mig_state(src.client) == MIG_STATE_RUNNING and src.server.migration_busy() is None
            assert mig_state(dst.client) == MIG_STATE_ERROR
            pattern.verify(drv)
            pattern.write(drv, 40, qid=2)
            pattern.verify(drv)
            drv.close()
    finally:
        src.close()
        dst.close()


# -- review regressions ----------------------------------------------------------------------------
RAM = 0x100000


def _report_raw(c: VfioUserClient, room: int) -> None:
    feature(c, protocol.FEATURE_DMA_LOGGING_REPORT | protocol.FEATURE_GET,
            protocol.LOGGING_REPORT_S.pack(RAM, 1 << 20, 4096), reply_room=room)


def test_a_report_refused_for_its_argsz_clears_nothing(edu: InProcess) -> None:
    fd = alloc_memfd(1 << 20)
    try:
        edu.client.dma_map(RAM, 1 << 20, fd)
        logging_start(edu.client)
        edu.endpoint.memory.write(RAM + 0x3000, b"x")  # a device write
        full = protocol.LOGGING_REPORT_S.size + 32  # 256 pages: 4 words
        for room in (0, full - 1):
            assert refused(_report_raw, edu.client, room) == errno.EINVAL
        assert dirty_pages(logging_report(edu.client, RAM, 1 << 20), RAM) == [RAM + 0x3000]
        assert dirty_pages(logging_report(edu.client, RAM, 1 << 20), RAM) == []  # reported, then cleared
    finally:
        os.close(fd)


def _read_raw(c: VfioUserClient, argsz: int, size: int) -> bytes:
    rep = c.request(protocol.MIG_DATA_READ, protocol.MIG_DATA_S.pack(argsz, size))
    return bytes(rep.payload[protocol.MIG_DATA_S.size:])


def test_mig_data_read_beyond_the_limit_or_argsz_is_refused_not_shortened(edu: InProcess) -> None:
    c = edu.client
    set_mig_state(c, MIG_STATE_STOP_COPY)
    stream = mig_read_all(c, 100)
    set_mig_state(c, MIG_STATE_STOP)
    set_mig_state(c, MIG_STATE_STOP_COPY)
    limit = edu.server.max_data_xfer_size
    assert refused(_read_raw, c, 8 + limit + 1, limit + 1) == errno.EINVAL  # a short reply would end the stream
    assert refused(_read_raw, c, 8, 100) == errno.EINVAL  # the reply would not fit argsz
    assert refused(_read_raw, c, 8 + 99, 100) == errno.EINVAL
    assert _read_raw(c, 8 + 100, 100) == stream[:100]  # nothing was consumed by the refusals
    # a server whose limit is below the chunk asked for: the client caps its requests
    edu.server.conn.max_data_xfer_size = c.max_data_xfer_size = 1024
    assert len(stream) > 2048
    assert stream[:100] + mig_read_all(c, 4096) == stream
    set_mig_state(c, MIG_STATE_RESUMING)
    mig_write_all(c, stream, 4096)
    set_mig_state(c, MIG_STATE_RUNNING)  # the stream read in capped pieces loads


def test_device_reset_keeps_dirty_logging_on(edu: InProcess) -> None:
    fd = alloc_memfd(1 << 20)
    try:
        edu.client.dma_map(RAM, 1 << 20, fd)
        logging_start(edu.client)
        edu.client.reset()
        assert edu.endpoint.memory.dirty is not None
        edu.endpoint.memory.write_u32(RAM + 0x5000, 7)  # a device write after the reset
        assert dirty_pages(logging_report(edu.client, RAM, 1 << 20), RAM) == [RAM + 0x5000]
        logging_stop(edu.client)
        assert edu.endpoint.memory.dirty is None
    finally:
        os.close(fd)


def test_feature_set_and_probe_replies_repeat_the_request(edu: InProcess) -> None:
    c = edu.client
    G, S, P = protocol.FEATURE_GET, protocol.FEATURE_SET, protocol.FEATURE_PROBE
    ctl = protocol.LOGGING_CONTROL_S.pack(4096, 0, 0)
    for flags, data in ((protocol.FEATURE_MIGRATION | G | P, b""),
                        (protocol.FEATURE_MIG_DEVICE_STATE | S | P, b""),
                        (protocol.FEATURE_DMA_LOGGING_REPORT | G | P, bytes(24)),
                        (protocol.FEATURE_MIG_DEVICE_STATE | S, protocol.MIG_STATE_S.pack(MIG_STATE_STOP, 0xFFFF_FFFF)),
                        (protocol.FEATURE_MIG_DEVICE_STATE | S,
                         protocol.MIG_STATE_S.pack(MIG_STATE_RUNNING, 0xFFFF_FFFF)),
                        (protocol.FEATURE_DMA_LOGGING_START | S, ctl),
                        (protocol.FEATURE_DMA_LOGGING_STOP | S, ctl)):
        body = protocol.DEVICE_FEATURE_S.pack(8 + len(data), flags) + data
        assert bytes(c.request(protocol.DEVICE_FEATURE, body).payload) == body, hex(flags)
    assert mig_state(c) == MIG_STATE_RUNNING and edu.endpoint.memory.dirty is None


class InFlightRead(EduDevice):
    """An edu with a backend read in flight: a writable view of guest memory taken
    before logging starts and written when the backend answers (as an NVMe ``file``
    namespace's ``preadv``); quiescing drains it."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = threading.Event()
        self.quiescing = threading.Event()
        self.landed = False
        self._backend: threading.Thread | None = None

    def begin_read(self, gpa: int) -> None:
        assert self.memory is not None
        views = self.memory.views(gpa, 4096, write=True)

        def backend() -> None:
            self.answer.wait(30)
            views[0][:4] = b"DATA"  # the read lands in guest memory
            views[0].release()
            self.landed = True

        self._backend = threading.Thread(target=backend, daemon=True)
        self._backend.start()

    def drain(self) -> None:
        if self._backend is not None:
            self._backend.join(30)

    def on_quiesce(self) -> None:
        self.quiescing.set()
        super().on_quiesce()
        self.drain()


def test_a_write_in_flight_when_logging_starts_is_drained_or_logged() -> None:
    dev = InFlightRead()
    srv = InProcess(dev)
    fd = alloc_memfd(1 << 20)
    try:
        c = srv.client
        c.dma_map(RAM, 1 << 20, fd)
        dev.begin_read(RAM + 0x5000)
        dev.quiescing.clear()  # (the map quiesced it)
        started = threading.Event()
        starter = threading.Thread(target=lambda: (logging_start(c), started.set()), daemon=True)
        starter.start()
        while not (started.is_set() or dev.quiescing.is_set()):  # START answered, or draining the device
            starter.join(0.01)
        start_returned_first = started.is_set()
        dev.answer.set()  # the backend answers: the read lands now
        starter.join(30)
        dev.drain()
        assert started.is_set() and dev.landed
        pages = dirty_pages(logging_report(c, RAM, 1 << 20), RAM)
        if start_returned_first:  # the write landed while logging was on: it must be reported
            assert RAM + 0x5000 in pages
        assert dev.quiescing.is_set(), "START did not drain the device's in-flight write"
        assert not dev.quiesced  # running again
        assert os.pread(fd, 4, 0x5000) == b"DATA"
    finally:
        srv.close()
        os.close(fd)


def test_a_source_that_migrated_out_stays_stopped_for_the_next_client_until_reset(edu: InProcess) -> None:
    c = edu.client
    dev = edu.endpoint.device
    set_mig_state(c, MIG_STATE_STOP_COPY)
    stream = mig_read_all(c)
    set_mig_state(c, MIG_STATE_STOP)  # as migrate() leaves a source
    edu.close(keep_device=True)
    assert edu.result["reason"] == "eof" and dev.quiesced
    nxt = InProcess(endpoint=edu.endpoint)
    try:
        assert mig_state(nxt.client) == MIG_STATE_STOP  # it says so
        assert nxt.client.read_int(0, 0, 4) == 0x010000ED  # a BAR access is served...
        nxt.client.write_int(0, 4, 4, 1)
        assert dev.quiesced and nxt.server.migrated_out  # ...and does not resume it
        nxt.client.reset()
        assert not dev.quiesced and not nxt.server.migrated_out
        assert mig_state(nxt.client) == MIG_STATE_RUNNING
    finally:
        nxt.close(keep_device=True)
    # an aborted migration (the client took it back to RUNNING) is not a migration out
    again = InProcess(endpoint=edu.endpoint)
    try:
        assert mig_state(again.client) == MIG_STATE_RUNNING
        set_mig_state(again.client, MIG_STATE_STOP_COPY)
        assert mig_read_all(again.client) != b"" and again.server.migrated_out
        set_mig_state(again.client, MIG_STATE_RUNNING)
        assert not again.server.migrated_out and not dev.quiesced
        # a destination that loaded a stream did not migrate out
        set_mig_state(again.client, MIG_STATE_RESUMING)
        mig_write_all(again.client, stream)
        set_mig_state(again.client, MIG_STATE_STOP)
        assert not again.server.migrated_out
        set_mig_state(again.client, MIG_STATE_RUNNING)
    finally:
        again.close()


def test_disconnect_never_raises_and_a_stuck_view_does_not_block_the_next_map(edu: InProcess,
                                                                             caplog: pytest.LogCaptureFixture) -> None:
    fd = alloc_memfd(1 << 20)
    dev = edu.endpoint.device
    try:
        edu.client.dma_map(RAM, 1 << 20, fd)
        stuck = edu.endpoint.memory.views(RAM + 0x2000, 64, write=True)  # a write that never finished

        def broken_quiesce() -> None:
            raise RuntimeError("the device is wedged")

        dev.quiesce = broken_quiesce  # type: ignore[method-assign]
        edu.close(keep_device=True)
        assert edu.result["reason"] == "eof"  # serve() returned: disconnect() did not raise
        del dev.quiesce
        assert edu.endpoint.memory.regions() == []
        assert "quiescing the device failed: RuntimeError: the device is wedged" in caplog.text
        nxt = InProcess(endpoint=edu.endpoint)
        try:
            nxt.client.dma_map(RAM, 1 << 20, fd)  # the range is free: no EEXIST
            stuck[0][:4] = b"late"
            assert edu.endpoint.memory.read(RAM + 0x2000, 4) == b"late"  # the same memfd
            stuck[0].release()
        finally:
            nxt.close(keep_device=True)
    finally:
        edu.endpoint.close()
        os.close(fd)


def test_logging_without_ranges_covers_memory_mapped_after_the_start(edu: InProcess) -> None:
    fd = alloc_memfd(2 << 20)
    try:
        c = edu.client
        c.dma_map(RAM, 1 << 20, fd)
        logging_start(c)  # no ranges: all mapped memory, now and later
        c.dma_map(4 << 20, 1 << 20, fd, 1 << 20)
        edu.endpoint.memory.write_u64(4 << 20 | 0x7000, 1)
        assert dirty_pages(logging_report(c, 4 << 20, 1 << 20), 4 << 20) == [4 << 20 | 0x7000]
        # a region beyond what the log can track is refused, not left unlogged
        assert refused(c.dma_map, 1 << 40, 1 << 37, fd) == errno.EINVAL
        assert edu.endpoint.memory.region_at(1 << 40) is None
    finally:
        os.close(fd)
