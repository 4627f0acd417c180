"""Faults injected by the NBD server, seen through the NVMe controller: nbdkit's ``error``
filter (a request answered with ``EIO`` or ``ENOSPC``, switched on and off by a file) and
its ``delay`` filter (latency below ``timeout``; a delay above it). The failed command gets
its NVMe status and an Error Information log entry; the other commands, the other namespace's
verified workload and the data already written (CRC-32C per block) are unaffected."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import crc32c
import pytest
from nbd_servers import NbdServer
from test_verified_io import Model, run_driver_queue

from pcidev_nvme.status import Status

MiB = 1 << 20


def _attach(*props: str, ram: int = 64 * MiB):
    from pcidev.host import Machine
    from pcidev_nvme.controller import NvmeController
    from pcidev_nvme.testing import driver

    machine = Machine(ram_size=ram)
    ctrl = NvmeController(",".join(props))
    return machine, ctrl, driver.NvmeDriver.attach(machine, ctrl, io_queues=2, io_depth=64)


def _status(call) -> int:
    from pcidev_nvme.testing import driver

    with pytest.raises(driver.NvmeCommandError) as e:
        call()
    return int(e.value.status)


def _newest_error(drv) -> tuple[int, int, int]:
    """(error count, status (SCT << 8 | SC), NSID) of the newest Error Information entry."""
    entry = drv.get_log(0x01, 64)
    return (int.from_bytes(entry[0:8], "little"), (int.from_bytes(entry[12:14], "little") >> 1) & 0x7FF,
            int.from_bytes(entry[24:28], "little"))


def _media_errors(drv) -> int:
    return int.from_bytes(drv.get_log(0x02, 512)[160:176], "little")


def test_server_io_errors_become_media_errors_and_nothing_else_is_touched(nbd_server, tmp_path: Path):
    """The server (nbdkit's error filter) fails every read while ``inject-read`` exists, every write and
    zeroing while ``inject-write`` exists (EIO). Reads then complete with Unrecovered Read
    Error, writes with Write Fault, each with an Error Information entry naming namespace 1
    and a SMART media error; meanwhile writes (or reads), Flush and the admin commands work,
    a verified workload on namespace 2 (another server) sees no error, and every block of
    namespace 1 reads back with its CRC-32C once the injection stops."""
    inject_read, inject_write = tmp_path / "inject-read", tmp_path / "inject-write"
    faulty = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error",), params=(
        "error-pread=EIO", "error-pread-rate=100%", f"error-pread-file={inject_read}",
        "error-pwrite=EIO", "error-pwrite-rate=100%", f"error-pwrite-file={inject_write}",
        "error-zero=EIO", "error-zero-rate=100%", f"error-zero-file={inject_write}"))
    clean = nbd_server("nbdkit", size=4 * MiB)
    machine, ctrl, drv = _attach("mdts=5", f"ns=nbd:uri={faulty.uri},lbaf=1", f"ns=nbd:uri={clean.uri},lbaf=1")
    try:
        lbs = drv.namespaces[1].lba_size
        assert lbs == 4096
        rnd = random.Random(13)
        blocks = {lba: rnd.randbytes(lbs) for lba in range(0, 256, 3)}
        for lba, data in blocks.items():
            drv.write(1, lba, data)
        crcs = {lba: crc32c.crc32c(data) for lba, data in blocks.items()}

        model = Model({2: (drv.namespaces[2].nsze, lbs)}, 17)
        errors: list[str] = []
        other = threading.Thread(target=run_driver_queue, args=(drv, machine, model, 2, 600, 8, errors))
        other.start()

        inject_read.touch()
        count0 = _newest_error(drv)[0]
        media0 = _media_errors(drv)
        for lba in (0, 3, 255):
            assert _status(lambda lba=lba: drv.read(1, lba, 1)) == Status.UNRECOVERED_READ_ERROR
        count, status, nsid = _newest_error(drv)
        assert (count - count0, status, nsid) == (3, Status.UNRECOVERED_READ_ERROR, 1)
        assert _media_errors(drv) == media0 + 3
        drv.write(1, 300, b"W" * lbs)  # writes, Flush and the admin path go on
        drv.flush(1)
        assert len(drv.identify(0x00, nsid=1)) == 4096
        inject_read.unlink()
        assert drv.read(1, 300, 1) == b"W" * lbs

        inject_write.touch()
        assert _status(lambda: drv.write(1, 0, b"X" * lbs)) == Status.WRITE_FAULT
        assert _status(lambda: drv.io(1, 0x08, nsid=1, cdw10=3, what="write zeroes")) == Status.WRITE_FAULT
        count, status, nsid = _newest_error(drv)
        assert (count - count0, status, nsid) == (5, Status.WRITE_FAULT, 1)
        assert _media_errors(drv) == media0 + 5
        for lba in (0, 3):  # the failed writes reached nothing
            assert crc32c.crc32c(drv.read(1, lba, 1)) == crcs[lba]
        inject_write.unlink()

        other.join(300)
        assert not other.is_alive()
        assert not errors, errors[:5]
        for lba, crc in crcs.items():
            assert crc32c.crc32c(drv.read(1, lba, 1)) == crc, lba
        for slba in range(0, model.geometry[2][0], 16):
            model.check(2, slba, drv.read(2, slba, 16))
        assert model.mismatches == [] and model.counts["write"] > 100
        assert ctrl.namespaces[1].backend.reconnects == 0  # an error reply is not a lost connection
    finally:
        drv.close()
        ctrl.close()


def test_a_full_server_gives_capacity_exceeded(nbd_server, tmp_path: Path):
    """A write the server refuses with ENOSPC completes with Capacity Exceeded (01h/81h), not a
    media error; reads go on."""
    full = tmp_path / "full"
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error",), params=(
        "error-pwrite=ENOSPC", "error-pwrite-rate=100%", f"error-pwrite-file={full}"))
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri}")
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 0, b"a" * lbs)
        full.touch()
        media0 = _media_errors(drv)
        assert _status(lambda: drv.write(1, 1, b"b" * lbs)) == Status.CAP_EXCEEDED
        assert _media_errors(drv) == media0
        assert drv.read(1, 0, 2) == b"a" * lbs + bytes(lbs)
        full.unlink()
        drv.write(1, 1, b"b" * lbs)
        assert drv.read(1, 1, 1) == b"b" * lbs
    finally:
        drv.close()
        ctrl.close()


def test_random_server_errors_fail_only_their_own_commands(nbd_server):
    """One request in ten of the server's answers is EIO (nbdkit ``error-rate=10%``) during a
    queue-depth-16 workload: the commands that got an error fail with a media error status;
    every other read checks its CRC-32C, and no command is lost (each completes once)."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error",), params=("error-rate=10%",))
    machine, ctrl, drv = _attach("mdts=5", f"ns=nbd:uri={server.uri},lbaf=1")
    try:
        lbs = drv.namespaces[1].lba_size
        model = Model({1: (drv.namespaces[1].nsze, lbs)}, 29)
        errors: list[str] = []
        run_driver_queue(drv, machine, model, 1, 400, 4, errors)
        failed = [e for e in errors if "status" in e]
        assert failed and len(failed) == len(errors), errors[:5]  # (no exception, no timeout)
        media = {Status.UNRECOVERED_READ_ERROR, Status.WRITE_FAULT}
        for line in failed:
            kind = line.split()[0]
            status = int(line.rsplit(" ", 1)[1], 16) & 0x7FF  # (without DNR)
            assert status in media and (status == Status.UNRECOVERED_READ_ERROR) == (kind == "read"), line
        assert model.mismatches == []
        assert 10 <= len(failed) <= 150, len(failed)  # (about 40 of 400)
        assert sum(model.counts[k] for k in ("write", "read", "zeroes", "dealloc")) == 400  # (each completed once)
    finally:
        drv.close()
        ctrl.close()


def test_delays_below_timeout_are_latency_not_errors(nbd_server):
    """Every read and write held 0.2 s by the server (delay filter), timeout 30 s: the
    commands take that long and succeed, on the one connection (no reconnection)."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",),
                        params=("delay-read=200ms", "delay-write=200ms"))
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri},timeout=30")
    try:
        lbs = drv.namespaces[1].lba_size
        t0 = time.monotonic()
        drv.write(1, 5, b"d" * lbs)
        assert drv.read(1, 5, 1) == b"d" * lbs
        assert time.monotonic() - t0 >= 0.4
        drv.flush(1)
        assert ctrl.namespaces[1].backend.reconnects == 0
        count, _status_, _nsid = _newest_error(drv)
        assert count == 0
    finally:
        drv.close()
        ctrl.close()


def test_a_delay_above_timeout_fails_the_command_and_the_rest_goes_on(nbd_server):
    """Reads held 60 s by the server, timeout 0.5 s: the read completes with Unrecovered Read
    Error and an Error Information entry after about 0.5 s (the connection is dropped and
    reopened); writes (not delayed) and Flush work on the new connection, and what they wrote
    is there once the delay is gone from the path (another server on the same data: nbdkit's
    file plugin on the same image)."""
    server = nbd_server("nbdkit-file", size=4 * MiB, extra=("--filter=delay",), params=("delay-read=60",))
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri},timeout=0.5,reconnect_timeout=10")
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 7, b"e" * lbs)
        t0 = time.monotonic()
        assert _status(lambda: drv.read(1, 7, 1)) == Status.UNRECOVERED_READ_ERROR
        assert 0.4 <= time.monotonic() - t0 < 30
        count, status, nsid = _newest_error(drv)
        assert (count, status, nsid) == (1, Status.UNRECOVERED_READ_ERROR, 1)
        drv.write(1, 8, b"f" * lbs)
        drv.flush(1)
        assert ctrl.namespaces[1].backend.reconnects >= 1
    finally:
        drv.close()
        ctrl.close()
    assert server.image is not None
    with open(server.image, "rb") as f:
        f.seek(7 * lbs)
        assert f.read(2 * lbs) == b"e" * lbs + b"f" * lbs


#: an nbdkit ``sh`` plugin script: a 4 MiB image (``img`` beside it) whose next read, and next
#: write, sleep 4 s first (a write: the seconds in ``slow-seconds`` if it exists) while a marker
#: file exists (``read-held`` / ``write-held`` say they started); the sleep goes on when the
#: client drops the connection, as a real server's I/O in flight does, and ``slow-write-done``
#: says the slow write reached the image
SLOW_ONCE = r"""#!/bin/sh
dir=$(dirname "$0")
case "$1" in
    thread_model) echo parallel ;;
    get_size) echo 4194304 ;;
    can_write) exit 0 ;;
    pread)
        if [ -e "$dir/slow-read" ]; then rm -f "$dir/slow-read"; touch "$dir/read-held"; sleep 4; fi
        dd if="$dir/img" skip="$4" count="$3" iflag=skip_bytes,count_bytes status=none ;;
    pwrite)
        if [ -e "$dir/slow-write" ]; then
            rm -f "$dir/slow-write"; touch "$dir/write-held"; sleep "$(cat "$dir/slow-seconds" 2>/dev/null || echo 4)"
            slow=1
        fi
        dd of="$dir/img" seek="$4" conv=notrunc oflag=seek_bytes status=none
        if [ -n "${slow:-}" ]; then touch "$dir/slow-write-done"; fi ;;
    *) exit 2 ;;
esac
"""


def _wait_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.02)


def test_a_write_resent_after_a_dropped_connection_does_not_undo_a_later_write(nbd_tools, tmp_path: Path):
    """The read (qid 2) and then write A (qid 1) are both held by the server; the read times
    out (1.5 s), its connection is dropped, write A is sent again on a new connection and
    succeeds; write B to the same block succeeds. Once the server finished the first copy of
    A, the block must still read B."""
    script = tmp_path / "slow-once.sh"
    script.write_text(SLOW_ONCE)
    script.chmod(0o755)
    with open(tmp_path / "img", "wb") as f:
        f.truncate(4 * MiB)
    server = NbdServer(["nbdkit", "-f", "-U", str(tmp_path / "slow.sock"), "sh", str(script)], tmp_path / "slow.sock")
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri},timeout=1.5,reconnect_timeout=10")
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 0, b"0" * lbs)
        (tmp_path / "slow-read").touch()
        (tmp_path / "slow-write").touch()
        failed: list[int] = []
        done: list[str] = []
        reader = threading.Thread(target=lambda: failed.append(_status(lambda: drv.read(1, 64, 1, qid=2))))
        writer = threading.Thread(target=lambda: (drv.write(1, 0, b"A" * lbs), done.append("A")))
        reader.start()
        _wait_file(tmp_path / "read-held")
        time.sleep(0.5)  # (write A's own deadline well after the read's)
        writer.start()
        _wait_file(tmp_path / "write-held")  # write A is in the server ...
        assert reader.is_alive()  # ... before the read times out
        reader.join(60)
        writer.join(60)  # held, then sent again after the drop: succeeds
        assert failed == [Status.UNRECOVERED_READ_ERROR] and done == ["A"]
        assert ctrl.namespaces[1].backend.reconnects >= 1
        drv.write(1, 0, b"B" * lbs)
        assert drv.read(1, 0, 1) == b"B" * lbs
        _wait_file(tmp_path / "slow-write-done")  # the server finished the first copy of A
        assert drv.read(1, 0, 1) == b"B" * lbs  # (reads A: B, acknowledged, was lost)
    finally:
        drv.close()
        ctrl.close()
        server.kill()


def _slow_server(tmp_path: Path) -> NbdServer:
    script = tmp_path / "slow-once.sh"
    script.write_text(SLOW_ONCE)
    script.chmod(0o755)
    with open(tmp_path / "img", "wb") as f:
        f.truncate(4 * MiB)
    return NbdServer(["nbdkit", "-f", "-U", str(tmp_path / "slow.sock"), "sh", str(script)], tmp_path / "slow.sock")


def test_a_write_after_a_timed_out_write_waits_for_its_late_copy(nbd_tools, tmp_path: Path):
    """Write A is held 4 s by the server, timeout 1.5 s: it fails with Write Fault (the server
    still carries it out later). Write B to the same block, sent right after, is applied only
    once the server finished A and closed that connection (B completes after A reached the
    image), so the block reads B then and afterwards -- not A."""
    server = _slow_server(tmp_path)
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri},timeout=1.5,reconnect_timeout=20")
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 0, b"0" * lbs)
        (tmp_path / "slow-write").touch()
        assert _status(lambda: drv.write(1, 0, b"A" * lbs)) == Status.WRITE_FAULT
        assert not (tmp_path / "slow-write-done").exists()  # (A is still in the server)
        drv.write(1, 0, b"B" * lbs)
        assert (tmp_path / "slow-write-done").exists()  # B waited for the late copy of A
        assert drv.read(1, 0, 1) == b"B" * lbs
        time.sleep(0.5)
        assert drv.read(1, 0, 1) == b"B" * lbs
        drv.write(1, 1, b"C" * lbs)  # (nothing fenced any more)
        assert not ctrl.namespaces[1].backend.fenced(0, 2 * lbs)
    finally:
        drv.close()
        ctrl.close()
        server.kill()
    with open(tmp_path / "img", "rb") as f:
        assert f.read(2 * 4096)[:2 * lbs] == b"B" * lbs + b"C" * lbs


def test_blocks_still_fenced_at_reconnect_timeout_fail_and_the_rest_goes_on(nbd_tools, tmp_path: Path):
    """Write A is held 8 s by the server, timeout 1.5 s, reconnect_timeout 3 s: A fails; a write
    B to the same block waits until 3 s after the loss, then fails with Write Fault and an
    Error Information entry (the server may still carry A out); a write elsewhere and a
    read elsewhere work meanwhile. Once the server finished A and closed that connection, B
    is accepted and the block reads B."""
    server = _slow_server(tmp_path)
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri},timeout=1.5,reconnect_timeout=3")
    try:
        lbs = drv.namespaces[1].lba_size
        (tmp_path / "slow-seconds").write_text("8")
        (tmp_path / "slow-write").touch()
        assert _status(lambda: drv.write(1, 0, b"A" * lbs)) == Status.WRITE_FAULT
        count0 = _newest_error(drv)[0]
        drv.write(1, 16, b"D" * lbs)  # (elsewhere: not fenced)
        assert drv.read(1, 16, 1) == b"D" * lbs
        assert _status(lambda: drv.write(1, 0, b"B" * lbs)) == Status.WRITE_FAULT
        assert not (tmp_path / "slow-write-done").exists()  # (refused before A landed)
        count, status, nsid = _newest_error(drv)
        assert (count - count0, status, nsid) == (1, Status.WRITE_FAULT, 1)
        _wait_file(tmp_path / "slow-write-done")
        backend = ctrl.namespaces[1].backend
        deadline = time.monotonic() + 30
        while backend.fenced(0, lbs):  # (until the server closed that connection)
            assert time.monotonic() < deadline
            time.sleep(0.05)
        drv.write(1, 0, b"B" * lbs)
        assert drv.read(1, 0, 1) == b"B" * lbs
    finally:
        drv.close()
        ctrl.close()
        server.kill()


def test_a_migration_stop_waits_for_the_fences_and_refuses_while_one_is_left(nbd_tools, tmp_path: Path):
    """The stop's flush of the namespaces (``migration.flush_namespaces``) while write A, timed
    out, may still be carried out by the server: within a short deadline it refuses (the
    destination would not know the fence) with one MigrationError naming the namespace; with
    a deadline past the server's close it waits and succeeds."""
    from pcidev.errors import MigrationError
    from pcidev_nvme import migration

    server = _slow_server(tmp_path)
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri},timeout=1,reconnect_timeout=20")
    try:
        lbs = drv.namespaces[1].lba_size
        (tmp_path / "slow-write").touch()
        assert _status(lambda: drv.write(1, 0, b"A" * lbs)) == Status.WRITE_FAULT
        with pytest.raises(MigrationError, match=r"namespace\(s\) 1: writes sent on a lost NBD connection"):
            migration.flush_namespaces(ctrl, time.monotonic() + 0.3)
        migration.flush_namespaces(ctrl, time.monotonic() + 30)
        assert (tmp_path / "slow-write-done").exists()
    finally:
        drv.close()
        ctrl.close()
        server.kill()


def test_a_server_answering_eshutdown_forever_fails_the_command_within_reconnect_timeout(nbd_server):
    """The server (nbdkit) answers every read with ESHUTDOWN ("shutting down", but it keeps
    accepting connections), ``reconnect_timeout=0.5``, ``timeout=10``: the read must fail with
    EIO within about reconnect_timeout, after a few reconnections with backoff (today it is
    resent until ``timeout``; with ``timeout=0`` it never ends)."""
    import errno

    from pcidev_nvme.backends import create_backend

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error",),
                        params=("error-pread=ESHUTDOWN", "error-pread-rate=100%"))
    b = create_backend("nbd", {"uri": server.uri, "timeout": "10", "reconnect_timeout": "0.5"})
    result: list[object] = []

    def read() -> None:
        try:
            b.readv([memoryview(bytearray(4096))], 0)
            result.append("read")
        except OSError as exc:
            result.append(exc.errno)
        except Exception as exc:  # (after the close below, racing it: recorded, not raised in the thread)
            result.append(repr(exc))

    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), f"still resending after 5 s ({b.reconnects} reconnections)"
        assert result == [errno.EIO]
        assert b.reconnects <= 20
    finally:
        b.close()  # (the loop ends at the latest at timeout=10)


def test_a_server_answering_eshutdown_forever_fails_the_command_without_timeout(nbd_server):
    """As above with ``timeout=0`` (no limit per command): the command is sent again at most
    ``MAX_RESENDS`` times (each time on a new connection, after a growing pause), then fails."""
    import errno

    from pcidev_nvme.backends import create_backend
    from pcidev_nvme.backends.nbd import MAX_RESENDS

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error",),
                        params=("error-pread=ESHUTDOWN", "error-pread-rate=100%"))
    b = create_backend("nbd", {"uri": server.uri, "timeout": "0", "reconnect_timeout": "30"})
    result: list[object] = []

    def read() -> None:
        try:
            b.readv([memoryview(bytearray(4096))], 0)
            result.append("read")
        except OSError as exc:
            result.append(exc.errno)

    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), f"still resending after 10 s ({b.reconnects} reconnections)"
        assert result == [errno.EIO]
        assert b.reconnects == MAX_RESENDS
    finally:
        b.close()


def test_close_ends_a_command_in_flight(nbd_server):
    """A read held 30 s by the server (delay filter), ``timeout=0``: closing the backend must
    end the waiting read with an error within a few seconds, not leave its thread blocked."""
    from pcidev_nvme.backends import create_backend

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=delay",), params=("delay-read=30",))
    b = create_backend("nbd", {"uri": server.uri, "timeout": "0"})
    result: list[object] = []

    def read() -> None:
        try:
            b.readv([memoryview(bytearray(4096))], 0)
            result.append("read")
        except Exception as exc:
            result.append(type(exc).__name__)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while b.inflight == 0:  # the read is on the wire
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.3)  # (counted just before it is issued)
    b.close()
    reader.join(3)
    assert not reader.is_alive(), "the read still waits 3 s after close()"
    assert result == ["OSError"]


def test_kick_after_close_writes_to_no_descriptor(nbd_server):
    """A closed connection's wake-up pipe is gone; its numbers are reused by the next files
    opened (here a pipe): a late ``kick()`` (a command's issuer racing the close) must not
    write into them."""
    import os

    from pcidev_nvme.backends import create_backend

    server = nbd_server("nbdkit", size=4 * MiB)
    b = create_backend("nbd", {"uri": server.uri})
    conn = b._conns[0]
    b.close()
    assert not conn.thread.is_alive()
    r, w = os.pipe2(os.O_NONBLOCK)
    try:
        conn.kick()
        conn.abort()
        with pytest.raises(BlockingIOError):
            os.read(r, 16)
    finally:
        os.close(r)
        os.close(w)


def test_a_connection_closed_under_other_commands_resends_them(nbd_server):
    """Writes answered ESHUTDOWN make the backend drop their connection while a read (held
    2 s by the server) is in flight on it: the read is retired by the close and sent again on
    a new connection (it succeeds), instead of waiting for its whole timeout."""
    from pcidev_nvme.backends import create_backend

    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error", "--filter=delay"),
                        params=("delay-read=2", "error-pwrite=ESHUTDOWN", "error-pwrite-rate=100%"))
    b = create_backend("nbd", {"uri": server.uri, "timeout": "8", "reconnect_timeout": "1"})
    result: dict[str, object] = {}

    def read() -> None:
        try:
            b.readv([memoryview(bytearray(4096))], 0)
            result["read"] = time.monotonic()
        except Exception as exc:
            result["read"] = repr(exc)

    reader = threading.Thread(target=read, daemon=True)
    try:
        start = time.monotonic()
        reader.start()
        deadline = time.monotonic() + 30
        while b.inflight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        with pytest.raises(OSError):
            b.writev([memoryview(b"x" * 4096)], 8192)
        reader.join(30)
        assert not reader.is_alive()
        assert isinstance(result["read"], float) and result["read"] - start < 20
    finally:
        b.close()


def test_a_write_the_server_answers_eperm_is_write_protected(nbd_server):
    """A server refusing a write with ``EPERM`` (it went read-only under the namespace): the
    write completes with Namespace is Write Protected, not Internal Error; reads go on."""
    server = nbd_server("nbdkit", size=4 * MiB, extra=("--filter=error",),
                        params=("error-pwrite=EPERM", "error-pwrite-rate=100%"))
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri}")
    try:
        lbs = drv.namespaces[1].lba_size
        assert _status(lambda: drv.write(1, 0, b"x" * lbs)) == Status.NS_WRITE_PROTECTED
        assert drv.read(1, 0, 1) == bytes(lbs)
    finally:
        drv.close()
        ctrl.close()


def test_a_flush_the_server_answers_eperm_is_a_write_fault(nbd_tools, tmp_path: Path):
    """A server refusing Flush with ``EPERM`` (nbdkit's ``eval`` plugin on an image; the error
    filter cannot fail flushes): the Flush completes with Write Fault (the writes may not be
    durable) and an Error Information entry, not Namespace is Write Protected (a Flush changes
    no block); writes and reads go on."""
    img = tmp_path / "img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)
    sock = tmp_path / "eperm.sock"
    server = NbdServer(["nbdkit", "-f", "-U", str(sock), "eval", "thread_model=echo parallel",
                        f"get_size=echo {4 * MiB}", "can_write=exit 0", "can_flush=exit 0",
                        "flush=echo EPERM refused >&2; exit 1",
                        f"pread=dd if={img} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
                        f"pwrite=dd of={img} seek=$4 oflag=seek_bytes conv=notrunc status=none"], sock)
    _machine, ctrl, drv = _attach(f"ns=nbd:uri={server.uri}")
    try:
        lbs = drv.namespaces[1].lba_size
        drv.write(1, 0, b"x" * lbs)
        assert _status(lambda: drv.flush(1)) == Status.WRITE_FAULT
        count, status, nsid = _newest_error(drv)
        assert (count, status, nsid) == (1, Status.WRITE_FAULT, 1)
        drv.write(1, 1, b"y" * lbs)
        assert drv.read(1, 0, 2) == b"x" * lbs + b"y" * lbs
    finally:
        drv.close()
        ctrl.close()
        server.kill()


@pytest.mark.parametrize("lack", ["read-only", "zero", "multi-conn"])
def test_a_server_that_comes_back_weaker_is_not_used(nbd_server, caplog, lack):
    """The file plugin of nbdkit (FUA, write zeroes, multi-conn), restarted read-only (then also
    without FUA and write zeroes), without write zeroes (the nozero filter) or without
    multi-conn (the multi-conn filter) while two connections are open:
    every reconnection counts as failed (one warning naming what is missing), so the commands
    fail with EIO after reconnect_timeout -- not EPERM (Internal Error) on writes, nor writes
    silently less durable. Back with all of it, the namespace works again."""
    import errno

    from pcidev_nvme.backends import create_backend

    server = nbd_server("nbdkit-file", size=4 * MiB)
    b = create_backend("nbd", {"uri": server.uri, "reconnect_timeout": "0.5", "connections": "2"})
    try:
        assert b.can_fua and b.connections == 2 and not b.read_only
        b.writev([memoryview(b"a" * 4096)], 0, fua=True)
        argv = list(server.argv)
        plugin = argv.index("file")
        weaker = {"read-only": ["-r"], "zero": ["--filter=nozero"], "multi-conn": ["--filter=multi-conn"]}[lack]
        params = {"multi-conn": ["multi-conn-mode=disable"]}.get(lack, [])
        server.kill()
        server.argv = argv[:plugin] + weaker + argv[plugin:] + params
        server.start()
        for _ in range(2):  # (both connections)
            with pytest.raises(OSError) as e:
                b.writev([memoryview(b"b" * 4096)], 0, fua=True)
            assert e.value.errno == errno.EIO
        said = {"read-only": "no longer offers fua, zero, writes (read-only now)",
                "zero": "no longer offers zero:", "multi-conn": "no longer offers multi-conn:"}[lack]
        assert said in caplog.text
        server.kill()
        server.argv = argv
        server.start()
        b.writev([memoryview(b"c" * 4096)], 0, fua=True)
        buf = bytearray(4096)
        b.readv([memoryview(buf)], 0)
        assert buf == b"c" * 4096
    finally:
        b.close()
