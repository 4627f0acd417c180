"""Live handover of a served device and its client connection (pcidev.transport.vfio_user.handover).

Real ``pcidev serve`` processes, pcidev's own vfio-user client and NVMe test driver (no
QEMU): the client keeps one connection open while the device moves between processes,
and every byte it reads back is checked.
"""

from __future__ import annotations

import mmap
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import crc32c
import pytest

from pcidev.dma import alloc_memfd
from pcidev.errors import MigrationError, TransportError
from pcidev.host import Machine
from pcidev.migration.channel import HANDOVER, REPORT, frame_meta, recv_frame, send_meta
from pcidev.transport.fdpass import close_fds
from pcidev.transport.vfio_user import protocol
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.handover import control_path, request_handover
from pcidev.transport.vfio_user.migration_client import set_mig_state
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.testing.driver import NvmeDriver

PCIDEV = [sys.executable, "-m", "pcidev"]
SMART = 0x02


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """A ``pcidev serve`` process, followed from process to process across handovers."""

    def __init__(self, sock: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.sock = sock
        self.proc = proc
        self.log = log
        self.pids = [proc.pid]

    @property
    def pid(self) -> int:
        """The process serving now."""
        return self.pids[-1]

    def handover(self, **kwargs: Any) -> dict[str, Any]:
        report = request_handover(control_path(self.sock), **kwargs)
        assert report["old_pid"] == self.pid
        self.pids.append(report["new_pid"])
        return report

    def wait_gone(self, pid: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if pid == self.proc.pid:
                self.proc.poll()
            assert time.monotonic() < deadline, f"pid {pid} did not end"
            time.sleep(0.02)


@contextmanager
def serving(spec: str, *plugins: str, extra: tuple[str, ...] = (),
            env: dict[str, str] | None = None) -> Iterator[Server]:
    where = tempfile.mkdtemp(prefix="pcidev-ho-")
    sock = os.path.join(where, "d.sock")
    log = Path(where) / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*PCIDEV, *plugins, "serve", "--vfio-user", sock, *extra, spec],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(sock, proc, log)
    try:
        deadline = time.monotonic() + 60
        while not (os.path.exists(sock) and os.path.exists(control_path(sock))):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not listen"
            time.sleep(0.02)
        yield server
    finally:
        for pid in server.pids:
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        proc.wait(20)
        for pid in server.pids:
            server.wait_gone(pid)
        print(log.read_text())
        shutil.rmtree(where, ignore_errors=True)


@contextmanager
def nvme(sock: str, *, io_queues: int = 2) -> Iterator[NvmeDriver]:
    with Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(sock) as remote:
        drv = NvmeDriver(machine, machine.plug(remote), io_queues=io_queues)
        drv.probe()
        try:
            yield drv
        finally:
            drv.close()


def smart(drv: NvmeDriver) -> dict[str, int]:
    log = drv.get_log(SMART, 512)

    def u128(off: int) -> int:
        return int.from_bytes(log[off:off + 16], "little")

    return {"host_reads": u128(64), "host_writes": u128(80), "power_cycles": u128(112),
            "unsafe_shutdowns": u128(144)}


class VerifiedIo(threading.Thread):
    """Random 4 KiB writes and reads on two queues; every read checked by crc32c."""

    def __init__(self, drv: NvmeDriver, slots: int) -> None:
        super().__init__(name="verified-io", daemon=True)
        self.drv = drv
        self.slots = slots
        self.blocks = 4096 // drv.lba_size(1)
        self.expect: dict[int, int] = {}
        self.writes = self.reads = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        rng = random.Random(9)
        try:
            while not self.halt.is_set():
                slot = rng.randrange(self.slots)
                qid = 1 + slot % self.drv.io_queue_count
                if slot not in self.expect or rng.random() < 0.5:
                    data = struct.pack("<II", slot, self.writes) + rng.randbytes(4088)
                    self.drv.write(1, slba=slot * self.blocks, data=data, qid=qid)
                    self.expect[slot] = crc32c.crc32c(data)
                    self.writes += 1
                else:
                    got = self.drv.read(1, slba=slot * self.blocks, nlb=self.blocks, qid=qid)
                    self.reads += 1
                    if crc32c.crc32c(got) != self.expect[slot]:
                        self.errors.append(f"slot {slot}: crc mismatch after {self.writes} writes")
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")

    def verify_all(self) -> None:
        for slot, crc in sorted(self.expect.items()):
            got = self.drv.read(1, slba=slot * self.blocks, nlb=self.blocks)
            assert crc32c.crc32c(got) == crc, f"slot {slot}"


def test_twenty_handovers_under_verified_nvme_io() -> None:
    """The device moves 20 times while a thread does verified I/O on one connection:
    no I/O error, no mismatch, SMART counters continue across the processes."""
    with serving("nvme,ns=mem:size=8M") as server, nvme(server.sock) as drv:
        before = smart(drv)
        io = VerifiedIo(drv, slots=256)
        io.start()
        reports = []
        try:
            for _ in range(20):
                time.sleep(0.05)
                reports.append(server.handover())
                assert not io.errors, io.errors
                server.wait_gone(server.pids[-2])  # the old process exited
        finally:
            io.halt.set()
            io.join(30)
        assert not io.errors, io.errors
        assert io.writes > 20 and io.reads > 20
        after = smart(drv)
        io.verify_all()
        assert after["host_writes"] - before["host_writes"] == io.writes
        assert after["host_reads"] - before["host_reads"] == io.reads
        assert (after["power_cycles"], after["unsafe_shutdowns"]) == (before["power_cycles"],
                                                                      before["unsafe_shutdowns"])
        assert len(set(server.pids)) == 21
        downtimes = [r["downtime_ms"] for r in reports]
        assert all(0 < d < 2000 for d in downtimes)
        assert all(r["same_clock"] and r["state_bytes"] > 0 and r["fds"] > 3 for r in reports)
        # the downtime ends at the new process's first poll of the client socket, after RUNNING
        assert all(r["serving_reported"] and 0 < r["running_ms"] <= r["downtime_ms"] for r in reports)
        print(f"\nhandover downtime over {len(downtimes)}: median {statistics.median(downtimes):.2f} ms, "
              f"worst {max(downtimes):.2f} ms (to RUNNING: median "
              f"{statistics.median(r['running_ms'] for r in reports):.2f} ms); spawn median "
              f"{statistics.median(r['spawn_ms'] for r in reports):.0f} ms")


def test_a_file_namespace_keeps_its_data_across_handovers(tmp_path: Path) -> None:
    """A file namespace and a state file: the data, and the SMART power-on counts (the new
    process neither counts a power cycle nor an unsafe shutdown), carry over."""
    img = tmp_path / "disk.img"
    with serving(f"nvme,ns=file:path={img},size=4M,state_dir={tmp_path}") as server, nvme(server.sock) as drv:
        before = smart(drv)
        io = VerifiedIo(drv, slots=64)
        io.start()
        try:
            for _ in range(3):
                time.sleep(0.1)
                server.handover()
        finally:
            io.halt.set()
            io.join(30)
        assert not io.errors and io.writes > 0
        io.verify_all()
        after = smart(drv)
        assert after["host_writes"] - before["host_writes"] == io.writes
        assert (after["power_cycles"], after["unsafe_shutdowns"]) == (before["power_cycles"],
                                                                      before["unsafe_shutdowns"])


def _open_files(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file ``pid`` holds open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        out.add((st.st_dev, st.st_ino))
    return out


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def test_the_image_moves_as_a_descriptor_never_reopened_by_path(tmp_path: Path) -> None:
    """The new process takes the old one's image descriptor: a path renamed and replaced
    by another file, then the image unlinked, change nothing the guest sees."""
    img = tmp_path / "disk.img"
    with serving(f"nvme,ns=file:path={img},size=4M") as server, nvme(server.sock) as drv:
        io = VerifiedIo(drv, slots=64)
        io.start()
        try:
            time.sleep(0.2)
            moved = tmp_path / "renamed.img"
            os.rename(img, moved)
            img.write_bytes(b"\xee" * (4 << 20))  # a decoy of the same size at the path
            disk = _inode(moved)
            server.handover()
            assert disk in _open_files(server.pid) and _inode(img) not in _open_files(server.pid)
            time.sleep(0.2)
            os.unlink(moved)  # the guest's disk has no name left at all
            server.handover()
            assert disk in _open_files(server.pid)
            time.sleep(0.2)
        finally:
            io.halt.set()
            io.join(30)
        assert not io.errors and io.writes > 0 and io.reads > 0, io.errors
        io.verify_all()
    assert img.read_bytes() == b"\xee" * (4 << 20)  # the decoy was never written
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".state"))  # (the controller's)
    assert left == ["disk.img", "disk.img.nvme-ids"]  # no image was created at the path


# -- exactly once at the cut ---------------------------------------------------------------
EDU_LIVENESS, EDU_FACTORIAL, EDU_IRQ_RAISE, EDU_IRQ_ACK = 0x04, 0x08, 0x60, 0x64
VEC_FACT = 1


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out = out * i & 0xFFFFFFFF
    return out


def _enable_msix(client: VfioUserClient) -> None:
    pos = client.find_capability(0x11)
    assert pos is not None
    ctrl = client.config_read(pos + 2, 2)
    client.config_write(pos + 2, 2, ctrl | 0x8000)
    client.config_write(0x04, 2, client.config_read(0x04, 2) | 0x6)  # memory space, bus master


def _drain(efd: int, timeout: float) -> int:
    total = 0
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([efd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return total
        total += os.eventfd_read(efd)
        deadline = time.monotonic() + 0.3  # until it stays quiet


def test_posted_writes_and_reads_queued_at_the_cut_are_handled_exactly_once() -> None:
    """A stream of posted writes (each IRQ_RAISE fires one interrupt: the eventfd counts
    them) with REGION_READs in flight keeps flowing while the device moves: every write
    has its effect once, every read is answered once, in order."""
    with serving("edu", "-p", "no:nvme") as server:
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        client = VfioUserClient.connect(server.sock)
        try:
            _enable_msix(client)
            client.set_irq_eventfds(protocol.IRQ_MSIX, [efd], start=VEC_FACT)
            done = threading.Event()
            reports: list[dict[str, Any]] = []
            errors: list[BaseException] = []

            def move() -> None:
                try:
                    for _ in range(3):
                        reports.append(server.handover())
                except BaseException as exc:
                    errors.append(exc)
                finally:
                    done.set()

            mover = threading.Thread(target=move)
            mover.start()
            raised = rounds = 0
            while not done.is_set() or rounds < 5:
                rounds += 1
                mids = []
                for i in range(40):  # pipelined: posted writes, and reads not waited for
                    client.write_int(0, EDU_IRQ_RAISE, 4, 1, posted=True)
                    raised += 1
                    n = (rounds + i) % 13
                    client.write_int(0, EDU_FACTORIAL, 4, n, posted=True)
                    body = protocol.REGION_ACCESS_S.pack(EDU_FACTORIAL, 0, 4)
                    mids.append((client.send(protocol.REGION_READ, body), _factorial(n)))
                for mid, want in mids:
                    rep = client.recv(10.0)
                    assert (rep.mid, rep.cmd) == (mid, protocol.REGION_READ) and not rep.error
                    assert int.from_bytes(rep.payload[-4:], "little") == want
            mover.join(60)
            assert not errors, errors
            assert len(reports) == 3
            assert client.read_int(0, EDU_LIVENESS, 4) == 0xFFFFFFFF  # the stream is still in step
            assert _drain(efd, 5.0) == raised
        finally:
            client.close()
            os.close(efd)


def test_a_message_half_sent_at_the_cut_is_answered_once() -> None:
    """The client has sent half a REGION_READ when the handover is asked for: the
    message is answered once, by whichever process reads its end, and the stream stays
    in step."""
    with serving("edu", "-p", "no:nvme") as server:
        client = VfioUserClient.connect(server.sock)
        try:
            client.write_int(0, EDU_FACTORIAL, 4, 5)
            msg = protocol.message(0x4242, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(EDU_FACTORIAL, 0, 4))
            client.sock.sendall(msg[:20])  # the header and part of the body
            reports: list[dict[str, Any]] = []
            mover = threading.Thread(target=lambda: reports.append(server.handover()))
            mover.start()
            time.sleep(1.5)  # the new process is (nearly) ready; the old one waits for the message's end
            client.sock.sendall(msg[20:])
            rep = client.recv(20.0)
            assert (rep.mid, rep.cmd, rep.error) == (0x4242, protocol.REGION_READ, 0)
            assert int.from_bytes(rep.payload[-4:], "little") == 120
            mover.join(60)
            assert len(reports) == 1
            assert client.read_int(0, EDU_FACTORIAL, 4) == 120  # no second reply was waiting
        finally:
            client.close()


def test_a_message_left_half_sent_never_blocks_the_server() -> None:
    """The client stops in the middle of a message and stays there: the handover either
    carries the partial message over (a buffering reader) or gives up after its boundary
    timeout with one line and leaves the old process serving; either way the message is
    answered once when it is complete."""
    with serving("edu", "-p", "no:nvme") as server:
        client = VfioUserClient.connect(server.sock)
        try:
            client.write_int(0, EDU_FACTORIAL, 4, 6)
            msg = protocol.message(0x4343, protocol.REGION_READ, protocol.REGION_ACCESS_S.pack(EDU_FACTORIAL, 0, 4))
            client.sock.sendall(msg[:10])  # not even the whole header
            try:
                report = server.handover()
                assert report["new_pid"] == server.pid
            except MigrationError as exc:
                assert "did not reach a message boundary" in str(exc) and "\n" not in str(exc)
                assert server.pid == server.proc.pid and server.proc.poll() is None
            client.sock.sendall(msg[10:])
            rep = client.recv(20.0)
            assert (rep.mid, rep.error, int.from_bytes(rep.payload[-4:], "little")) == (0x4343, 0, 720)
            assert client.read_int(0, EDU_FACTORIAL, 4) == 720
        finally:
            client.close()


# -- more than 253 DMA regions ----------------------------------------------------------------
DESC = struct.Struct("<QQII II")


def test_more_than_253_dma_regions_move_in_batches() -> None:
    regions = 300
    gpa = [0x100000 + i * 0x10000 for i in range(regions)]
    fds = []
    maps = []
    with serving("edu", "-p", "no:nvme") as server:
        client = VfioUserClient.connect(server.sock)
        try:
            for i in range(regions):
                fd = alloc_memfd(4096, f"r{i}")  # sealed: the server refuses memory that can shrink
                fds.append(fd)
                maps.append(mmap.mmap(fd, 4096))
                client.dma_map(gpa[i], 4096, fd)
            report = server.handover()
            assert report["fds"] > regions
            _enable_msix(client)
            # the edu engine copies between regions on both sides of fd 253: the new
            # process has mapped every one of them
            ring = 0
            pairs = [(1, 299), (252, 253), (254, 10), (298, 150)]
            for slot, (src, dst) in enumerate(pairs):
                data = os.urandom(512)
                maps[src][:512] = data
                maps[ring][slot * 32:(slot + 1) * 32] = DESC.pack(gpa[src], gpa[dst], 512, 0, 0, 0)
            client.write_int(0, 0x100, 8, gpa[ring])  # RING_BASE
            client.write_int(0, 0x108, 4, 8)  # RING_SIZE
            client.write_int(0, 0x114, 4, 1)  # RING_CTRL: enable
            client.write_int(0, 0x10C, 4, len(pairs))  # RING_TAIL
            deadline = time.monotonic() + 10
            while client.read_int(0, 0x110, 4) != len(pairs):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            for slot, (src, dst) in enumerate(pairs):
                assert maps[dst][:512] == maps[src][:512]
                status, crc = struct.unpack_from("<II", maps[ring], slot * 32 + 0x18)
                assert (status, crc) == (1, crc32c.crc32c(maps[src][:512]))
        finally:
            client.close()
            for m in maps:
                m.close()
            close_fds(fds)


# -- refusals and rollback ----------------------------------------------------------------------
def _still_serves(drv: NvmeDriver, expect: dict[int, bytes]) -> None:
    for slba, data in expect.items():
        assert drv.read(1, slba=slba, nlb=len(data) // drv.lba_size(1)) == data


@pytest.mark.parametrize("fault", ["die-before-ack", "nack", "die-after-commit", "hang-after-commit"])
def test_a_failing_new_process_leaves_the_old_one_serving(fault: str) -> None:
    """Every failure before the new process could have read the client's socket (a new
    process silent after COMMIT is killed at once): the old one serves on, with the
    verified I/O going on."""
    with serving("nvme,ns=mem:size=4M") as server, nvme(server.sock, io_queues=1) as drv:
        expect = {1024: os.urandom(4096)}  # beyond the blocks VerifiedIo writes
        drv.write(1, slba=1024, data=expect[1024])
        io = VerifiedIo(drv, slots=32)
        io.start()
        try:
            with pytest.raises(MigrationError, match="handover failed") as info:
                server.handover(fault=fault)
            assert "\n" not in str(info.value)
        finally:
            io.halt.set()
            io.join(30)
        assert not io.errors, io.errors
        assert _alive(server.pid) and server.proc.poll() is None
        _still_serves(drv, expect)
        io.verify_all()
        report = server.handover()  # and a real one works afterwards
        assert report["old_pid"] == server.proc.pid
        _still_serves(drv, expect)


def test_a_new_process_that_may_have_served_loses_the_connection_and_never_two_readers() -> None:
    """After COMMIT the new process sends half a RUNNING and hangs: it may have read the
    client's socket, so the old process kills it and must not resume either. The client's
    connection is closed, the CLI hears why, the old process exits 1 (never two readers)."""
    with serving("nvme,ns=mem:size=4M") as server, nvme(server.sock, io_queues=1) as drv:
        drv.write(1, slba=0, data=os.urandom(4096))
        started = time.monotonic()
        with pytest.raises(MigrationError, match="connection is lost") as info:
            server.handover(fault="half-running")
        assert "\n" not in str(info.value)
        assert time.monotonic() - started < 10
        assert server.proc.wait(20) == 1
        with pytest.raises(TransportError):
            drv.read(1, slba=0, nlb=4096 // drv.lba_size(1))
        assert "connection is lost" in server.log.read_text()


def test_the_pause_fits_in_the_clients_message_timeout() -> None:
    """A new process silent after COMMIT: the whole pause (boundary to rollback) stays well
    under QEMU's 5 s x-msg-timeout; a vCPU read during it is answered by the old process."""
    with serving("edu", "-p", "no:nvme") as server, VfioUserClient.connect(server.sock) as client:
        worst: list[float] = [0.0]
        halt = threading.Event()

        def probe() -> None:  # a vCPU reading a register again and again
            while not halt.is_set():
                t = time.monotonic()
                assert client.read_int(0, 0, 4) == 0x010000ED
                worst[0] = max(worst[0], time.monotonic() - t)
                time.sleep(0.005)

        t = threading.Thread(target=probe)
        t.start()
        try:
            with pytest.raises(MigrationError, match="runs again on the source"):
                server.handover(fault="hang-after-commit")
        finally:
            halt.set()
            t.join(30)
        assert 0.5 < worst[0] < 4.0, worst  # it did wait out the RUNNING timeout, within the budget


def test_a_dormant_device_stays_dormant_in_the_new_process() -> None:
    """A client left without shutting the controller down (queues live): the device is
    quiesced until the next client. The handover keeps it so; the next client finds its data."""
    with serving("nvme,ns=mem:size=4M") as server:
        data = os.urandom(4096)
        machine = Machine(ram_size=32 << 20)
        remote = VfioUserDevice.connect(server.sock)
        drv = NvmeDriver(machine, machine.plug(remote), io_queues=1)
        drv.probe()
        drv.write(1, slba=8, data=data)
        remote.close()  # gone, controller still enabled
        machine.close()
        deadline = time.monotonic() + 10
        while "client left" not in server.log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        report = server.handover()
        assert report["device_running"] is False
        server.wait_gone(server.proc.pid)
        assert "(dormant: the device waits" in server.log.read_text()
        with Machine(ram_size=32 << 20) as m2, VfioUserDevice.connect(server.sock) as r2:
            d2 = NvmeDriver(m2, m2.plug(r2), io_queues=1)
            d2.probe()
            assert d2.read(1, slba=8, nlb=4096 // d2.lba_size(1)) == data
            d2.close()


def test_a_device_that_migrated_out_is_not_handed_over() -> None:
    """After the vfio-user migration reached STOP_COPY the device's state lives at the
    destination: a handover is refused, with its client connected or after it left."""
    with serving("edu", "-p", "no:nvme") as server:
        with VfioUserClient.connect(server.sock) as client:
            set_mig_state(client, protocol.MIG_STATE_STOP_COPY)
            with pytest.raises(MigrationError, match="handover refused"):
                server.handover()
        deadline = time.monotonic() + 10
        while "client left" not in server.log.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(MigrationError, match="migrated out") as info:
            server.handover()
        assert "\n" not in str(info.value)
        assert server.proc.poll() is None


def _gated_python(tmp_path: Path) -> tuple[Path, Path]:
    """An interpreter for the new process that writes its pid and waits until never (the
    test ends the handover meanwhile): ``(the script, the pid file)``."""
    gate, pidfile, script = tmp_path / "gate", tmp_path / "child.pid", tmp_path / "gated-python"
    os.mkfifo(gate)
    script.write_text(f"#!/bin/sh\necho $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}\nread x < {gate}\n"
                      f"exec {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return script, pidfile


def _spawned(pidfile: Path) -> int:
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert time.monotonic() < deadline, "the new process did not start"
        time.sleep(0.02)
    return int(pidfile.read_text())


def test_an_idle_control_connection_neither_blocks_handovers_nor_signals() -> None:
    """A control connection that sends nothing: a real request still gets its handover, the
    idle one is answered within the request deadline, and SIGTERM is not deferred by it."""
    with serving("edu", "-p", "no:nvme") as server, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
        idle.connect(control_path(server.sock))
        idle.settimeout(10)
        report = server.handover()
        assert report["old_pid"] == server.proc.pid
        kind, body, _fds = recv_frame(idle)
        answer = frame_meta(kind, body, {"ok": bool, "reason": str})
        assert not answer["ok"] and "no whole request" in answer["reason"]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle2:
            idle2.connect(control_path(server.sock))
            time.sleep(0.2)
            os.kill(server.pid, signal.SIGTERM)
            server.wait_gone(server.pid, timeout=5)


def test_sigterm_while_the_new_process_starts_kills_it_and_ends(tmp_path: Path) -> None:
    script, pidfile = _gated_python(tmp_path)
    with serving("edu", "-p", "no:nvme") as server:
        got: list[BaseException] = []

        def ask() -> None:
            try:
                server.handover(exec_path=str(script))
            except BaseException as exc:  # the failure is the point
                got.append(exc)

        t = threading.Thread(target=ask)
        t.start()
        child = _spawned(pidfile)
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(10) == 128 + signal.SIGTERM
        t.join(10)
        assert not _alive(child)
        assert len(got) == 1 and isinstance(got[0], MigrationError) and "stopping" in str(got[0])


def test_sigterm_during_the_cut_is_deferred_until_it_ends() -> None:
    """SIGTERM while the device is paused (the new process hangs after COMMIT): the old
    process finishes the cut (rolls back here), answers the requester, then ends."""
    with serving("edu", "-p", "no:nvme") as server:
        got: list[BaseException] = []

        def ask() -> None:
            try:
                server.handover(fault="hang-after-commit")
            except BaseException as exc:  # the failure is the point
                got.append(exc)

        t = threading.Thread(target=ask)
        t.start()
        deadline = time.monotonic() + 30
        while "hang-after-commit" not in server.log.read_text():  # the new process is past COMMIT
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(server.proc.pid, signal.SIGTERM)
        t.join(30)
        assert len(got) == 1 and "runs again on the source" in str(got[0])
        assert server.proc.wait(20) == 128 + signal.SIGTERM
        assert "deferred" in server.log.read_text()


def test_with_once_a_client_leaving_aborts_a_pending_handover(tmp_path: Path) -> None:
    script, pidfile = _gated_python(tmp_path)
    with serving("edu", "-p", "no:nvme", extra=("--once",)) as server:
        client = VfioUserClient.connect(server.sock)
        assert client.read_int(0, 0, 4) == 0x010000ED
        got: list[BaseException] = []

        def ask() -> None:
            try:
                server.handover(exec_path=str(script))
            except BaseException as exc:  # the failure is the point
                got.append(exc)

        t = threading.Thread(target=ask)
        t.start()
        child = _spawned(pidfile)
        client.close()
        assert server.proc.wait(10) == 0
        t.join(10)
        assert not _alive(child)
        assert len(got) == 1 and isinstance(got[0], MigrationError) and "client left" in str(got[0])


def test_a_second_concurrent_handover_is_refused(tmp_path: Path) -> None:
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 1.5\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    with serving("edu", "-p", "no:nvme") as server:
        first: list[Any] = []
        t = threading.Thread(target=lambda: first.append(server.handover(exec_path=str(slow))))
        t.start()
        time.sleep(0.5)
        with pytest.raises(MigrationError, match="already in progress"):
            request_handover(control_path(server.sock))
        t.join(60)
        assert len(first) == 1 and first[0]["new_pid"] != server.proc.pid


def test_a_bad_control_request_gets_one_clear_refusal() -> None:
    with serving("edu", "-p", "no:nvme") as server:
        for junk in (b"GET / HTTP/1.0\r\n\r\n", None):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(control_path(server.sock))
                if junk is None:
                    send_meta(s, HANDOVER, {"protocol": 99, "timeout": 5.0})
                else:
                    s.sendall(junk)
                kind, body, _fds = recv_frame(s)
                assert kind == REPORT
                report = frame_meta(kind, body, {"ok": bool, "reason": str})
                assert not report["ok"] and report["reason"].startswith("bad request:")
                assert "\n" not in report["reason"]
        assert server.handover()["old_pid"] == server.proc.pid  # still able


def test_the_control_endpoint_is_private() -> None:
    with serving("edu", "-p", "no:nvme") as server:
        assert os.stat(control_path(server.sock)).st_mode & 0o777 == 0o600


def test_no_server_at_the_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="no handover control socket at") as info:
        request_handover(str(tmp_path / "nobody.sock.ctl"))
    assert "\n" not in str(info.value)


def test_a_handover_without_a_client_moves_the_listener() -> None:
    """Between clients the device and the listening socket move; the next client is
    served by the new process."""
    with serving("edu", "-p", "no:nvme") as server:
        report = server.handover()
        server.wait_gone(server.proc.pid)
        with VfioUserClient.connect(server.sock) as client:
            assert client.read_int(0, 0, 4) == 0x010000ED
        assert report["new_pid"] == server.pid and _alive(server.pid)


def test_systemd_hears_the_new_main_pid() -> None:
    """With ``NOTIFY_SOCKET`` set (a systemd service), the old process (the main PID, the
    only one the default ``NotifyAccess=main`` hears) announces the new main PID."""
    where = tempfile.mkdtemp(prefix="pcidev-notify-")
    path = os.path.join(where, "notify")
    heard: list[tuple[int, bytes]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        notify.bind(path)
        notify.settimeout(2)
        with serving("edu", "-p", "no:nvme", env={**os.environ, "NOTIFY_SOCKET": path}) as server:
            report = server.handover()
            try:
                while len(heard) < 2:
                    data, anc, _flags, _addr = notify.recvmsg(256, socket.CMSG_SPACE(12))
                    pid = next(struct.unpack("@iII", d)[0] for lvl, typ, d in anc
                               if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS)
                    heard.append((pid, data))
            except TimeoutError:
                pass
    shutil.rmtree(where, ignore_errors=True)
    assert (report["old_pid"], f"MAINPID={report['new_pid']}\n".encode()) in heard, heard


def test_a_full_completion_queue_moves_with_its_backlog() -> None:
    """The host stops reaping: a 4-entry CQ is full and the device holds the rest of 16
    writes. After the handover every write completes exactly once and its data is there."""
    with serving("nvme,ns=mem:size=4M") as server, nvme(server.sock, io_queues=1) as drv:
        drv.delete_io_queue_pair(1)
        drv.create_io_queue_pair(1, 32, cq_size=4)
        machine = drv.machine
        blocks = 4096 // drv.lba_size(1)
        data = {i: os.urandom(4096) for i in range(16)}
        bufs = []
        cids = set()
        for i, payload in data.items():
            buf = machine.alloc(4096, 4096)
            machine.write(buf, payload)
            bufs.append(buf)
            cids.add(drv.submit_rw(1, 0x01, nsid=1, slba=i * blocks, nlb=blocks, buf=buf))
        time.sleep(0.3)  # the device fills the CQ and keeps the rest
        server.handover()
        got = drv.reap(1, min_completions=16, timeout=20)
        assert sorted(c.cid for c in got) == sorted(cids) and all(c.ok for c in got)
        time.sleep(0.2)
        assert drv.poll(1) == []  # nothing twice
        for buf in bufs:
            machine.free(buf)
        for i, payload in data.items():
            assert drv.read(1, slba=i * blocks, nlb=blocks) == payload
