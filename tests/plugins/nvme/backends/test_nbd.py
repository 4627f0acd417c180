"""The ``nbd`` namespace backend against real NBD servers (qemu-nbd on a raw image, nbdkit's
memory plugin) on UNIX sockets: data, FUA, flush, deallocation and zeroing, block status,
sizes and refusals, commands in flight, multi-conn, verified random I/O through the
controller and the software host, and a server that goes away and comes back (or not)."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest
from nbd_servers import NbdServer
from test_verified_io import QD, Model, run_driver_queue

from pcidev.errors import ConfigError
from pcidev_nvme.backends import create_backend
from pcidev_nvme.backends.nbd import NbdBackend, load_nbd
from pcidev_nvme.status import Status

MiB = 1 << 20


def backend(server: NbdServer, **options: object) -> NbdBackend:
    b = create_backend("nbd", {"uri": server.uri, **{k: str(v) for k, v in options.items()}})
    assert isinstance(b, NbdBackend)
    return b


def read(b: NbdBackend, offset: int, length: int) -> bytes:
    buf = bytearray(length)
    b.readv([memoryview(buf)], offset)
    return bytes(buf)


@pytest.mark.parametrize("kind", ["qemu", "qsd", "nbdkit"])
def test_vectored_write_read_fua_and_flush(nbd_server, kind):
    server = nbd_server(kind, size=8 * MiB)
    b = backend(server)
    try:
        assert b.size == 8 * MiB and not b.read_only and b.can_fua and b.can_flush
        rnd = random.Random(1)
        data = rnd.randbytes(3 * 4096 + 512)
        buf = bytearray(data)
        views = [memoryview(buf)[:512], memoryview(buf)[512:4096], memoryview(buf)[4096:]]
        b.writev(views, 1 * MiB)
        assert read(b, 1 * MiB, len(data)) == data
        out = bytearray(len(data))  # a vectored read fills each view in order
        parts = [memoryview(out)[:1000], memoryview(out)[1000:9000], memoryview(out)[9000:]]
        b.readv(parts, 1 * MiB)
        assert bytes(out) == data
        b.writev([memoryview(bytearray(b"F" * 4096))], 2 * MiB, fua=True)
        b.flush()
        assert read(b, 2 * MiB, 4096) == b"F" * 4096
        assert read(b, 4 * MiB, 4096) == bytes(4096)  # never written
    finally:
        b.close()
    if server.image is not None:  # what qemu-nbd or qemu-storage-daemon stored is in its image
        with open(server.image, "rb") as f:
            f.seek(1 * MiB)
            assert f.read(len(data)) == data


def test_a_request_larger_than_the_servers_maximum_is_split(nbd_server):
    b = backend(nbd_server("nbdkit", size=8 * MiB))
    try:
        b.max_request = 64 * 1024  # (as a server advertising a 64 KiB maximum block size)
        data = random.Random(2).randbytes(5 * 64 * 1024 + 4096)
        b.writev([memoryview(bytearray(data))], 4096)
        assert read(b, 4096, len(data)) == data
    finally:
        b.close()


@pytest.mark.parametrize("kind", ["qemu", "qsd"])
def test_deallocate_and_write_zeroes_read_zeros_and_block_status_tells_the_holes(nbd_server, kind):
    server = nbd_server(kind, size=8 * MiB)
    b = backend(server)
    try:
        assert b.holes and b.can_zero
        assert b.allocated_ranges(0, b.size) == []  # a fresh sparse image: all holes
        b.writev([memoryview(bytearray(b"x" * (256 * 1024)))], 1 * MiB)
        assert b.allocated_ranges(0, b.size) == [(1 * MiB, 256 * 1024)]
        assert b.allocated_bytes() == 256 * 1024
        b.deallocate(1 * MiB, 128 * 1024)  # reads as zeros, and the server punched a hole
        assert read(b, 1 * MiB, 256 * 1024) == bytes(128 * 1024) + b"x" * (128 * 1024)
        assert b.allocated_ranges(0, b.size) == [(1 * MiB + 128 * 1024, 128 * 1024)]
        b.write_zeroes(1 * MiB + 128 * 1024, 64 * 1024)  # zeros, still allocated (NO_HOLE)
        assert read(b, 1 * MiB + 128 * 1024, 128 * 1024) == bytes(64 * 1024) + b"x" * (64 * 1024)
        assert b.allocated_ranges(0, b.size) == [(1 * MiB + 128 * 1024, 128 * 1024)]
        # part of the namespace only
        assert b.allocated_ranges(1 * MiB + 192 * 1024, 4096) == [(1 * MiB + 192 * 1024, 4096)]
        assert b.allocated_ranges(0, 4096) == []
    finally:
        b.close()


def test_zeroing_on_nbdkit_memory(nbd_server):
    b = backend(nbd_server("nbdkit", size=4 * MiB))
    try:
        b.writev([memoryview(bytearray(b"y" * 65536))], 0)
        b.write_zeroes(4096, 4096)
        b.deallocate(8192, 8192)
        assert read(b, 0, 65536) == b"y" * 4096 + bytes(12288) + b"y" * (65536 - 16384)
    finally:
        b.close()


def test_size_from_the_export_smaller_allowed_larger_refused(nbd_server):
    server = nbd_server("qemu", size=8 * MiB)
    b = backend(server, size="4M")
    assert b.size == 4 * MiB and b.export_size == 8 * MiB
    b.close()
    with pytest.raises(ConfigError) as e:
        backend(server, size="16M")
    assert str(e.value) == (f"nbd backend: the export {server.uri} has {8 * MiB} bytes, fewer than the "
                            f"size={16 * MiB} given")


def test_an_export_too_small_for_one_block_is_refused(nbd_server):
    server = nbd_server("nbdkit", size=2048)
    with pytest.raises(ConfigError, match="has 2048 bytes, fewer than 4096"):
        backend(server)


def test_a_missing_export_or_server_is_one_clear_error(nbd_server, tmp_path):
    server = nbd_server("qemu", size=MiB, export="exp")
    with pytest.raises(ConfigError) as e:
        create_backend("nbd", {"uri": f"nbd+unix:///nosuch?socket={server.sock}"})
    msg = str(e.value)
    assert msg.startswith("nbd backend: cannot open nbd+unix:///nosuch") and "\n" not in msg
    with pytest.raises(ConfigError, match="cannot open .*No such file"):
        create_backend("nbd", {"uri": f"nbd+unix:///?socket={tmp_path}/none.sock"})
    with pytest.raises(ConfigError, match="needs uri="):
        create_backend("nbd", {})
    with pytest.raises(ConfigError, match="connections=0"):
        create_backend("nbd", {"uri": server.uri, "connections": "0"})


def test_a_read_only_export_makes_a_write_protected_namespace(nbd_server):
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    server = nbd_server("qemu", size=4 * MiB, readonly=True)
    b = backend(server)
    try:
        assert b.read_only
        with pytest.raises(OSError) as e:
            b.writev([memoryview(bytearray(4096))], 0)
        assert e.value.errno == errno.EROFS
        assert read(b, 0, 4096) == bytes(4096)
    finally:
        b.close()
    machine = Machine(ram_size=32 * MiB)
    ctrl = NvmeController(f"ns=nbd:uri={server.uri}")
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=1, io_depth=8)
    try:
        lbs = drv.namespaces[1].lba_size
        assert drv.read(1, 0, 1) == bytes(lbs)
        with pytest.raises(driver.NvmeCommandError) as ce:
            drv.write(1, 0, b"z" * lbs)
        assert ce.value.status == Status.NS_WRITE_PROTECTED
    finally:
        drv.close()
        ctrl.close()


def test_the_queue_depth_reaches_the_connection(nbd_server):
    """Reads of a slow server (nbdkit's delay filter: 1 s each) overlap on one connection:
    the I/O command set grows its pool to the backend's queue_depth."""
    from fakes import FakeController, command, prp_for

    from pcidev_nvme.io import IoCommandSet, Opcode
    from pcidev_nvme.namespace import make_namespace

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",), params=("rdelay=1",))
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"nbd:uri={server.uri},queue_depth=16")
    ios = IoCommandSet(ctrl)
    b = ctrl.namespaces[1].backend
    try:
        reqs = []
        for i in range(16):
            addr = ctrl.alloc(4096)
            prp1, prp2 = prp_for(ctrl, addr, 4096)
            reqs.append(command(Opcode.READ, 1, prp1=prp1, prp2=prp2, cdw10=i * 8, cdw12=7))
        t0 = time.monotonic()
        for req in reqs:
            ios.submit(req)
        for req in reqs:
            assert ctrl.wait(req, timeout=120)[0] == 0
        took = time.monotonic() - t0
        assert b.max_inflight >= 8, (b.max_inflight, took)  # (4 workers before: at most 4)
    finally:
        ios.close()
        ctrl.close()


def test_multi_conn_is_used_only_when_the_server_offers_it(nbd_server):
    b = backend(nbd_server("nbdkit", size=4 * MiB), connections=3)  # nbdkit memory: multi-conn
    try:
        assert b.connections == 3 and len(b._conns) == 3
        for i in range(6):  # round robin, each connection sees what the others wrote
            b.writev([memoryview(bytearray(bytes([i + 1]) * 4096))], i * 4096)
        for i in range(6):
            assert read(b, i * 4096, 4096) == bytes([i + 1]) * 4096
        b.flush()
    finally:
        b.close()
    # qemu-nbd shares an image with one client at a time (-e 1) and offers no multi-conn
    b = backend(nbd_server("qemu", size=4 * MiB), connections=3)
    try:
        assert b.connections == 1
    finally:
        b.close()


@pytest.mark.parametrize("kind", ["qemu", "qsd"])
def test_verified_random_io_through_the_controller_over_nbd(nbd_server, kind):
    """Namespace 1 on qemu-nbd or qemu-storage-daemon (an image), namespace 2 on nbdkit's
    memory plugin (two connections, 4 KiB blocks)."""
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    q = nbd_server(kind, size=4 * MiB)
    k = nbd_server("nbdkit", size=4 * MiB)
    machine = Machine(ram_size=128 << 20)
    ctrl = NvmeController(f"mdts=5,ns=nbd:uri={q.uri},ns=nbd:uri={k.uri},lbaf=1,connections=2")
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=2, io_depth=64)
    try:
        geometry = {nsid: (info.nsze, info.lba_size) for nsid, info in drv.namespaces.items()}
        assert sorted(geometry) == [1, 2] and geometry[2][1] == 4096
        model = Model(geometry, 11)
        errors: list[str] = []
        depth: dict[int, int] = {}
        threads = [threading.Thread(target=run_driver_queue, args=(drv, machine, model, qid, 400, 16, errors, depth))
                   for qid in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive()
        assert not errors, errors[:5]
        assert depth == {1: QD, 2: QD}
        for nsid, (nlbas, size) in geometry.items():
            step = 64 * 1024 // size
            for slba in range(0, nlbas, step):
                model.check(nsid, slba, drv.read(nsid, slba, min(step, nlbas - slba)))
        assert model.mismatches == []
        assert model.counts["read"] > 200 and model.counts["write"] > 200
        assert ctrl.namespaces[1].backend.max_inflight > 4  # more than the default 4 workers
    finally:
        drv.close()
        ctrl.close()


@pytest.mark.parametrize("kind,connections", [("qemu", 1), ("qsd", 1), ("nbdkit-file", 2)])
def test_a_server_restarted_mid_workload_loses_nothing(nbd_server, kind, connections):
    """The server (qemu-nbd; nbdkit's file plugin with two connections) killed (SIGKILL) twice
    during a verified workload and started again on the same socket: the commands wait, are
    sent again, and every block checks out."""
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    server = nbd_server(kind, size=4 * MiB)
    machine = Machine(ram_size=128 << 20)
    ctrl = NvmeController(f"mdts=5,ns=nbd:uri={server.uri},reconnect_timeout=60,connections={connections}")
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=2, io_depth=64)
    b = ctrl.namespaces[1].backend
    try:
        geometry = {nsid: (info.nsze, info.lba_size) for nsid, info in drv.namespaces.items()}
        model = Model(geometry, 5)
        errors: list[str] = []
        threads = [threading.Thread(target=run_driver_queue, args=(drv, machine, model, qid, 600, 16, errors))
                   for qid in (1, 2)]
        for t in threads:
            t.start()
        for _ in range(2):
            before = model.counts["write"] + model.counts["read"]
            deadline = time.monotonic() + 60
            while model.counts["write"] + model.counts["read"] < before + 100 and time.monotonic() < deadline:
                time.sleep(0.01)
            server.kill()
            time.sleep(0.3)  # (commands wait meanwhile)
            server.start()
        for t in threads:
            t.join(300)
            assert not t.is_alive()
        assert not errors, errors[:5]
        assert b.connections == connections and b.reconnects >= 2
        for nsid, (nlbas, size) in geometry.items():
            step = 64 * 1024 // size
            for slba in range(0, nlbas, step):
                model.check(nsid, slba, drv.read(nsid, slba, min(step, nlbas - slba)))
        assert model.mismatches == []
        assert model.counts["write"] > 300
    finally:
        drv.close()
        ctrl.close()


def test_a_server_that_does_not_come_back_fails_the_commands_with_an_error_log_entry(nbd_server):
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    server = nbd_server("qemu", size=4 * MiB)
    machine = Machine(ram_size=32 * MiB)
    ctrl = NvmeController(f"ns=nbd:uri={server.uri},reconnect_timeout=0.5")
    drv = driver.NvmeDriver.attach(machine, ctrl, io_queues=1, io_depth=8)
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 8, b"w" * lbs)
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(driver.NvmeCommandError) as e:
            drv.write(1, 16, b"v" * lbs)
        assert e.value.status == Status.WRITE_FAULT
        assert time.monotonic() - t0 >= 0.4  # it waited for the server first
        with pytest.raises(driver.NvmeCommandError) as e:  # later: one attempt, then the error
            drv.read(1, 8, 1)
        assert e.value.status == Status.UNRECOVERED_READ_ERROR
        log = drv.get_log(0x01, 64)  # Error Information: the newest entry names the read
        assert int.from_bytes(log[0:8], "little") >= 2
        assert (int.from_bytes(log[12:14], "little") >> 1) & 0x7FF == Status.UNRECOVERED_READ_ERROR  # (SCT, SC)
        server.start()  # back: the next command reconnects
        assert drv.read(1, 8, 1) == b"w" * lbs
    finally:
        drv.close()
        ctrl.close()


def test_load_nbd_imports_only_the_nbd_module(nbd_tools):
    """The venv does not see the system's dist-packages: ``nbd`` (and its extension) come
    from there, and nothing else of it is importable afterwards."""
    import sys

    nbd = load_nbd()
    assert nbd.__name__ == "nbd" and hasattr(nbd, "NBD")
    assert os.path.dirname(nbd.__file__) == "/usr/lib/python3/dist-packages" or "dist-packages" not in nbd.__file__
    assert "/usr/lib/python3/dist-packages" not in sys.path
    with pytest.raises(ImportError):
        __import__("nbdsh")  # (Debian's python3-libnbd module next to it, not loaded)


def test_a_server_that_stops_answering_fails_the_command_after_timeout(nbd_server):
    """A server (nbdkit) holding every read for 60 s (delay filter) while the connection stays open: the
    read fails with EIO after ``timeout``, its connection is dropped, and writes (not
    delayed) go on over a new one."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",), params=("rdelay=60",))
    b = backend(server, timeout=0.5, reconnect_timeout=10)
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            read(b, 0, 4096)
        assert e.value.errno == errno.EIO and "timeout=0.5" in str(e.value)
        assert 0.4 <= time.monotonic() - t0 < 30
        b.writev([memoryview(bytearray(b"t" * 4096))], 8192)
        assert b.reconnects == 1
    finally:
        b.close()


def test_a_server_that_never_answers_the_handshake_is_refused_after_timeout(nbd_tools, tmp_path):
    """A socket that accepts connections into its backlog and never speaks: the start fails
    with one line after ``timeout`` instead of hanging."""
    import socket

    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen(4)
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=r"cannot open .*no NBD handshake within 0.5 s"):
            create_backend("nbd", {"uri": f"nbd+unix:///?socket={path}", "timeout": "0.5"})
        assert time.monotonic() - t0 < 30


def test_identify_does_not_wait_for_a_lost_server(nbd_server):
    """NUSE (allocated_bytes) while the server is away: the last value known at once (the
    whole size before one is known), not a wait of reconnect_timeout on the admin path."""
    server = nbd_server("qemu", size=4 * MiB)
    b = backend(server, reconnect_timeout=60)
    try:
        b.writev([memoryview(bytearray(b"n" * 4096))], 0)
        assert b.allocated_bytes() == 4096
        server.kill()
        deadline = time.monotonic() + 30
        while not b._conns[0].dead:  # the dispatcher sees the socket close
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        assert b.allocated_bytes() == 4096
        assert time.monotonic() - t0 < 5
        b._nuse_known = None  # (none known yet: all of it)
        assert b.allocated_bytes() == b.size
        server.start()
        assert read(b, 0, 4096) == b"n" * 4096  # (reconnects)
        assert b.allocated_bytes() == 4096
    finally:
        b.close()


def _requests(logfile) -> list[str]:
    """The requests nbdkit's log filter recorded: ``Write fua=1``, ``Zero trim=0 fast=1``..."""
    out = []
    for line in logfile.read_text().splitlines():
        words = line.split()
        if len(words) > 4 and words[2].startswith("connection=") and not words[3].startswith("...") \
                and words[3] in ("Read", "Write", "Flush", "Zero", "Trim", "Extents"):
            keep = [w for w in words[4:] if w.split("=")[0] in ("fua", "trim", "fast")]
            out.append(" ".join([words[3], *keep]))
    return out


def test_the_nbd_requests_each_nvme_operation_becomes(nbd_server, tmp_path):
    log = tmp_path / "requests.log"
    b = backend(nbd_server("nbdkit", size=4 * MiB, extra=("--filter=log",), params=(f"logfile={log}",)))
    try:
        buf = memoryview(bytearray(b"q" * 4096))
        b.writev([buf], 0)
        b.writev([buf], 0, fua=True)
        b.can_fua = False  # (a server without FUA: the write, then a flush)
        b.writev([buf], 0, fua=True)
        b.write_zeroes(0, 4096)
        b.deallocate(4096, 8192)
        b.flush()
        b.allocated_ranges(0, MiB)
        read(b, 0, 4096)
    finally:
        b.close()
    assert _requests(log) == [
        "Write fua=0", "Write fua=1", "Write fua=0", "Flush",
        "Zero trim=0 fua=0 fast=1",  # Write Zeroes: keep allocated, fast zero offered
        "Zero trim=1 fua=0 fast=0",  # deallocate: zeros, the server may punch a hole
        "Flush", "Extents", "Read",
    ]


def test_a_server_without_write_zeroes_gets_writes_of_zeros(nbd_server, tmp_path):
    """A server (nbdkit) with ``nozero`` (no WRITE_ZEROES) and ``noextents`` (every block is data)."""
    log = tmp_path / "requests.log"
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=log", "--filter=nozero", "--filter=noextents"),
                        params=(f"logfile={log}",))
    b = backend(server)
    try:
        assert not b.can_zero
        b.writev([memoryview(bytearray(b"r" * 16384))], 0)
        b.write_zeroes(0, 4096)
        b.deallocate(8192, 4096)
        assert read(b, 0, 16384) == bytes(4096) + b"r" * 4096 + bytes(4096) + b"r" * 4096
        assert b.allocated_ranges(0, MiB) == [(0, MiB)]
    finally:
        b.close()
    requests = _requests(log)  # (whether nbdkit still offers base:allocation here varies)
    assert requests[:4] == ["Write fua=0"] * 3 + ["Read"] and requests[4:] in ([], ["Extents"])


def test_commands_waiting_for_a_reconnection_that_gives_up_fail_with_it(nbd_server):
    """Eight reads wait while one thread reconnects to a socket that never answers (a mute
    listener where the server was): when it gives up they all fail, rather than each trying
    its own reconnection after it (which took a second each, one after another)."""
    import socket

    server = nbd_server("qemu", size=4 * MiB)
    b = backend(server, reconnect_timeout=0.3, timeout=5)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.kill()
        server.sock.unlink()
        mute.bind(str(server.sock))
        mute.listen(64)
        errors: list[int] = []

        def one() -> None:
            try:
                read(b, 0, 4096)
            except OSError as exc:
                errors.append(exc.errno)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
            assert not t.is_alive()
        assert errors == [errno.EIO] * 8
        mute.setblocking(False)
        attempts = 0
        while True:  # the connections the mute listener got (accepted only now)
            try:
                conn, _ = mute.accept()
            except BlockingIOError:
                break
            conn.close()
            attempts += 1
        assert 1 <= attempts <= 4, attempts  # (8 before: one each)
    finally:
        mute.close()
        b.close()


def test_the_loader_takes_only_an_extension_built_for_this_python(tmp_path, monkeypatch):
    """A directory holding a libnbd built for another Python (or nothing): one ConfigError line
    saying what to install, and nothing is imported."""
    from pcidev_nvme.backends import nbd as nbd_backend

    other = "libnbdmod.cpython-39-x86_64-linux-gnu.so"  # (not this interpreter's suffix)
    (tmp_path / other).write_bytes(b"\x7fELF not really")
    (tmp_path / "nbd.py").write_text("raise AssertionError('must not be imported')\n")
    monkeypatch.setattr(nbd_backend, "_nbd", None)
    monkeypatch.setattr(nbd_backend, "SYSTEM_DIST_PACKAGES", str(tmp_path))
    monkeypatch.setattr(nbd_backend.importlib, "import_module", _no_module)
    with pytest.raises(ConfigError) as e:
        nbd_backend.load_nbd()
    msg = str(e.value)
    assert "install python3-libnbd" in msg and "no libnbd Python module for Python 3." in msg
    assert "\n" not in msg


def _no_module(name: str):
    raise ImportError(f"No module named {name!r}")


def test_fast_path_reads_and_writes_complete_without_a_worker_thread(nbd_server):
    """A Read or Write with PRPs on an NBD namespace starts on the submitting thread and is
    completed by the connection's dispatcher (``submit_readv`` / ``submit_writev``): no I/O
    worker is started, many are in flight at once, data and the FUA flag go through.

    The commands are 128 KiB apart: writes to one block-lock stripe go one at a time.
    """
    from fakes import FakeController, command, prp_for

    from pcidev_nvme.io import IoCommandSet, Opcode
    from pcidev_nvme.namespace import make_namespace

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",), params=("rdelay=1", "wdelay=1"))
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"nbd:uri={server.uri},queue_depth=16")
    ios = IoCommandSet(ctrl)
    b = ctrl.namespaces[1].backend
    try:
        bufs = []
        writes = []
        for i in range(16):
            addr = ctrl.alloc(4096)
            ctrl.dma.write(addr, bytes([i + 1]) * 4096)
            bufs.append(addr)
            prp1, prp2 = prp_for(ctrl, addr, 4096)
            fua = (1 << 30) if i % 2 else 0
            writes.append(command(Opcode.WRITE, 1, prp1=prp1, prp2=prp2, cdw10=i * 256, cdw12=7 | fua))
        for req in writes:
            ios.submit(req)
        for req in writes:
            assert ctrl.wait(req, timeout=120)[0] == 0
        assert b.max_inflight >= 8
        reads = []
        for i in range(16):
            ctrl.dma.write(bufs[i], bytes(4096))
            prp1, prp2 = prp_for(ctrl, bufs[i], 4096)
            reads.append(command(Opcode.READ, 1, prp1=prp1, prp2=prp2, cdw10=i * 256, cdw12=7))
        for req in reads:
            ios.submit(req)
        for i, req in enumerate(reads):
            assert ctrl.wait(req, timeout=120)[0] == 0
            assert ctrl.dma.read(bufs[i], 4096) == bytes([i + 1]) * 4096
        assert ios._pool is None  # (before: one worker thread per command in flight)
        assert ios.inflight == 0
    finally:
        ios.close()
        ctrl.close()


def test_a_fast_path_read_the_server_never_answers_fails_after_timeout(nbd_server):
    """The asynchronous path's timeout: a Read the server holds for 60 s (delay filter) fails
    with Unrecovered Read Error and its error (the dispatcher drops the connection at the
    command's deadline); a Write after it goes over a new connection; each completes once."""
    from fakes import FakeController, command, prp_for

    from pcidev_nvme.io import IoCommandSet, Opcode
    from pcidev_nvme.namespace import make_namespace

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",), params=("rdelay=60",))
    ctrl = FakeController()
    ctrl.namespaces[1] = make_namespace(1, f"nbd:uri={server.uri},timeout=0.5,reconnect_timeout=10")
    ios = IoCommandSet(ctrl)
    b = ctrl.namespaces[1].backend
    try:
        addr = ctrl.alloc(4096)
        prp1, prp2 = prp_for(ctrl, addr, 4096)
        t0 = time.monotonic()
        req = command(Opcode.READ, 1, prp1=prp1, prp2=prp2, cdw10=0, cdw12=7)
        ios.submit(req)
        status, _dw0, error = ctrl.wait(req, timeout=60)
        assert status == Status.UNRECOVERED_READ_ERROR and error is not None
        assert 0.4 <= time.monotonic() - t0 < 30
        assert ios._pool is None  # (it was the asynchronous path)
        ctrl.dma.write(addr, b"w" * 4096)
        req = command(Opcode.WRITE, 1, prp1=prp1, prp2=prp2, cdw10=64, cdw12=7)
        ios.submit(req)
        assert ctrl.wait(req, timeout=60)[0] == 0
        assert b.reconnects == 1
        assert not ctrl.double and ios.inflight == 0
    finally:
        ios.close()
        ctrl.close()


def _dispatchers() -> int:
    return sum(t.name == "nbd-dispatch" for t in threading.enumerate())


@pytest.mark.parametrize("size", [1000, 8 * MiB, 4096 + 512])
def test_a_refused_configuration_leaves_no_thread_or_descriptor(nbd_server, size):
    """A start refused after the first connection opened (a size check_size refuses, a size
    larger than the export) closes it: no dispatcher thread, socket or wake-up pipe left."""
    server = nbd_server("nbdkit", size=4 * MiB)
    threads, fds = _dispatchers(), len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ConfigError):
            NbdBackend(server.uri, size)
    deadline = time.monotonic() + 10
    while _dispatchers() > threads and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _dispatchers() == threads
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_server_taking_requests_smaller_than_a_block_is_refused(nbd_server):
    """The blocksize-policy filter of nbdkit advertising a 512-byte maximum request: one 2 MiB read
    would become 4096 requests; the start is refused with one line."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=blocksize-policy",),
                        params=("blocksize-minimum=512", "blocksize-preferred=512", "blocksize-maximum=512"))
    with pytest.raises(ConfigError) as e:
        create_backend("nbd", {"uri": server.uri})
    assert str(e.value) == (f"nbd backend: the export {server.uri} takes requests of at most 512 bytes "
                            f"(at least 4096 needed)")


def test_a_hole_not_said_to_read_as_zeros_counts_as_written(nbd_tools, tmp_path):
    """A server (nbdkit's sh plugin) reporting 1 MiB ``HOLE`` (no ``ZERO``: NBD does not promise
    it reads as zeros), 1 MiB ``HOLE|ZERO`` and 2 MiB data: only the ``HOLE|ZERO`` extent is
    deallocated (Get LBA Status and DULBE must not call blocks of unknown content unwritten)."""
    script = tmp_path / "extents.sh"
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        "  get_size) echo 4194304 ;;\n"
        "  pread) dd if=/dev/zero bs=$3 count=1 2>/dev/null ;;\n"
        "  can_extents) exit 0 ;;\n"
        '  extents) echo 0 1048576 1; echo 1048576 1048576 3; echo 2097152 2097152 0 ;;\n'
        "  *) exit 2 ;;\n"
        "esac\n")
    script.chmod(0o755)
    sock = tmp_path / "sh.sock"
    server = NbdServer(["nbdkit", "-f", "-U", str(sock), "-r", "sh", str(script)], sock)
    try:
        b = create_backend("nbd", {"uri": server.uri})
        try:
            assert b.holes
            assert b.allocated_ranges(0, 4 * MiB) == [(0, MiB), (2 * MiB, 2 * MiB)]
            assert b.allocated_bytes() == 3 * MiB
        finally:
            b.close()
    finally:
        server.kill()


def test_a_failed_wake_up_pipe_leaves_no_descriptor(nbd_server, monkeypatch):
    """``pipe2`` failing (EMFILE) after the connection was made: the start is refused and
    neither the socket's duplicate nor libnbd's socket stays open, even while the error (and
    its traceback) is kept."""
    server = nbd_server("nbdkit", size=4 * MiB)
    real = os.pipe2

    def no_pipe(flags: int) -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    fds = len(os.listdir("/proc/self/fd"))
    kept = []
    monkeypatch.setattr(os, "pipe2", no_pipe)
    try:
        for _ in range(3):
            with pytest.raises(ConfigError) as e:
                NbdBackend(server.uri)
            kept.append(e)
    finally:
        monkeypatch.setattr(os, "pipe2", real)
    assert "Too many open files" in str(kept[0].value)
    assert len(os.listdir("/proc/self/fd")) == fds


def _controller(*props: str):
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    machine = Machine(ram_size=64 * MiB)
    ctrl = NvmeController(",".join(props))
    return machine, ctrl, driver.NvmeDriver.attach(machine, ctrl, io_queues=1, io_depth=16)


def test_identify_and_get_lba_status_do_not_wait_for_a_stopped_server(nbd_server):
    """A server stopped (SIGSTOP: the connection stays, nothing is answered), timeout=60:
    Identify Namespace answers within ADMIN_WAIT with the last NUSE known (1 block written),
    and Get LBA Status (allocated ranges) completes with Namespace Not Ready, DNR clear,
    instead of holding the admin queue for the command timeout; both work again once the
    server goes on."""
    import signal

    from pcidev_nvme.backends.nbd import ADMIN_WAIT

    server = nbd_server("qemu", size=4 * MiB)
    _machine, ctrl, drv = _controller(f"ns=nbd:uri={server.uri},timeout=60,lbaf=1")
    assert server.proc is not None
    pid = server.proc.pid
    try:
        drv.write(1, 3, b"u" * 4096)
        nuse = lambda: int.from_bytes(drv.identify(0x00, nsid=1)[16:24], "little")  # noqa: E731
        assert nuse() == 1
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        assert nuse() == 1  # (the last value known)
        comp = drv.get_lba_status(1, 0, atype=0x02, check=False)
        took = time.monotonic() - t0
        assert comp.status & 0x7FF == Status.NS_NOT_READY and not comp.status & (1 << 14)
        assert took < 2 * ADMIN_WAIT + 8, took
        assert took >= ADMIN_WAIT  # (each waited for the server, within its bound)
    finally:
        os.kill(pid, signal.SIGCONT)
    try:
        deadline = time.monotonic() + 60
        while True:  # (the job still running on the stopped server ends first)
            comp = drv.get_lba_status(1, 0, atype=0x02, check=False)
            if comp.ok or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert comp.ok
        data = comp.tag
        assert int.from_bytes(data[0:4], "little") == 1  # one descriptor: block 3
        assert int.from_bytes(data[8:16], "little") == 3 and int.from_bytes(data[16:20], "little") == 1
        drv.write(1, 7, b"v" * 4096)
        assert nuse() == 2
    finally:
        drv.close()
        ctrl.close()
