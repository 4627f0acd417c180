"""The NVMe controller migrates between real processes (pcidev.transport.link.process, the
migration channel over UNIX sockets, the device link) while the host driver keeps
doing verified I/O on two queues at QD 32 over a memory namespace (its memfd travels
with the stream) and a file namespace (reopened by path); every block is checked by
its crc32c after each round and all of them at the end."""

from __future__ import annotations

import os
import random
import threading

import crc32c
import pytest

from pcidev.errors import MigrationBlockedError, MigrationError
from pcidev_nvme.testing.driver import WRITE

QD = 32
ROUNDS = 24


def _config(tmp_path) -> str:
    img = tmp_path / "x.img"
    with open(img, "wb") as f:
        f.truncate(4 << 20)
    return f"serial=XPROC,max_ioqpairs=4,msix_vectors=5,ns=mem:size=4M,ns=file:path={img},size=4M"


class Workload(threading.Thread):
    """QD 32 writes on each of two queues per round, then a read-back of every block written."""

    def __init__(self, machine, drv):
        super().__init__(daemon=True)
        self.machine, self.drv = machine, drv
        self.crc: dict[tuple[int, int], int] = {}
        self.rounds_done = threading.Semaphore(0)
        self.error = None
        self.mismatches = 0
        self.verified = 0
        self.commands = 0

    def run(self):
        try:
            drv, m = self.drv, self.machine
            rnd = random.Random(3)
            buf = m.alloc(2 * QD * 4096)
            for r in range(ROUNDS):
                free = {n: rnd.sample(range(0, info.nsze - 8, 8), 2 * QD) for n, info in drv.namespaces.items()}
                written = []
                for qid in (1, 2):
                    for k in range(QD):
                        nsid = rnd.choice(sorted(free))
                        slba = free[nsid].pop()
                        nlb = rnd.choice([1, 4, 8])
                        lbs = drv.lba_size(nsid)
                        data = os.urandom(nlb * lbs)
                        addr = buf + ((qid - 1) * QD + k) * 4096
                        m.write(addr, data)
                        drv.submit_rw(qid, WRITE, nsid=nsid, slba=slba, nlb=nlb, buf=addr)
                        written.append((nsid, slba, data))
                for qid in (1, 2):
                    got = drv.reap(qid, min_completions=QD, timeout=30)
                    assert len(got) == QD and all(c.ok for c in got), got
                self.commands += 2 * QD
                for nsid, slba, data in written:
                    lbs = drv.lba_size(nsid)
                    for i in range(len(data) // lbs):
                        self.crc[(nsid, slba + i)] = crc32c.crc32c(data[i * lbs:(i + 1) * lbs])
                for nsid, slba, data in written:  # read back through the other queue
                    back = drv.read(nsid, slba, len(data) // drv.lba_size(nsid), qid=1 + r % 2)
                    self.verified += 1
                    self.mismatches += back != data
                self.rounds_done.release()
        except BaseException as exc:
            self.error = exc
            self.rounds_done.release()

    def verify_everything(self) -> int:
        drv = self.drv
        bad = checked = 0
        for nsid, info in sorted(drv.namespaces.items()):
            lbs = info.lba_size
            zero = crc32c.crc32c(bytes(lbs))
            step = 65536 // lbs
            for slba in range(0, info.nsze, step):
                data = drv.read(nsid, slba, step)
                for i in range(step):
                    checked += 1
                    bad += crc32c.crc32c(data[i * lbs:(i + 1) * lbs]) != self.crc.get((nsid, slba + i), zero)
        assert bad == 0, f"{bad} blocks differ"
        return checked


def test_nvme_migrates_between_processes_during_verified_io(tmp_path, process_host):
    # (destinations start after the source has created the image's identity file (NGUID,
    # EUI-64, UUID: in the fingerprint); processes creating it at once would disagree)
    host = process_host(tmp_path, _config(tmp_path), io_queues=2, io_depth=64, aers=2)
    drv = host.drv
    d1, d2 = host.destination("b"), host.destination("c")
    assert set(drv.namespaces) == {1, 2}
    work = Workload(host.machine, drv)
    host.listening(d1)
    host.listening(d2)
    work.start()
    reports = []
    for when, dest in ((4, d1), (8, d2)):
        for _ in range(when):
            assert work.rounds_done.acquire(timeout=60)
            assert work.error is None, work.error
        reports.append(host.device.migrate(dest.incoming, timeout=20))
    work.join(120)
    assert work.error is None, work.error
    assert work.commands == ROUNDS * 2 * QD and work.mismatches == 0
    assert host.device.info["pid"] == d2.pid
    checked = work.verify_everything()
    assert checked == 2 * (4 << 20) // 512
    smart = drv.get_log(0x02, 512)
    writes = int.from_bytes(smart[80:96], "little")
    assert writes >= ROUNDS * 2 * QD  # SMART counters followed the controller
    host.close_machine()
    for report in reports:
        # RAM + the mem namespace's memfd + 5 MSI-X eventfds + INTx
        assert report["fds"] == 8, report
        assert 0 < report["downtime"] < 2.0
        print(f"nvme migration: state {report['state_size']} bytes, {report['fds']} fds, "
              f"downtime {report['downtime'] * 1e3:.2f} ms, host pause {report['host_pause'] * 1e3:.2f} ms")
    assert host.src.proc.wait(10) == 0 and host.src.wait_event("exit")["reason"] == "migrated"
    assert d1.proc.wait(10) == 0


def test_nvme_over_tcp_and_a_refusing_destination(tmp_path, process_host):
    """File namespaces only: TCP works (no descriptors; the host re-attaches RAM and
    eventfds). A destination configured with another namespace size refuses by
    fingerprint, in the pre-flight; the source keeps running and the I/O stays verified."""
    img = tmp_path / "t.img"
    with open(img, "wb") as f:
        f.truncate(2 << 20)
    good = f"serial=XTCP,max_ioqpairs=2,msix_vectors=3,ns=file:path={img},size=2M"
    other = tmp_path / "o.img"
    with open(other, "wb") as f:
        f.truncate(4 << 20)
    bad = f"serial=XTCP,max_ioqpairs=2,msix_vectors=3,ns=file:path={other},size=4M"
    host = process_host(tmp_path, good, ram=32 << 20, io_queues=2, io_depth=64, aers=1)
    drv, p = host.drv, host.pdev
    refuser = host.destination("r", options=bad)
    tcp = host.destination("t", "tcp")
    payload = {i: os.urandom(4096) for i in range(64)}
    for i, data in payload.items():
        drv.write(1, 8 * i, data, qid=1 + i % 2)
    host.listening(refuser)
    with pytest.raises(MigrationError) as info:
        p.device.migrate(refuser.incoming, timeout=10)
    # (in the pre-flight: nothing stopped)
    assert isinstance(info.value, MigrationBlockedError) and "configuration: nvme.namespaces" in str(info.value)
    assert p.device.info["pid"] == host.src.pid
    for i in range(64, 96):
        payload[i] = os.urandom(4096)
        drv.write(1, 8 * i, payload[i], qid=1 + i % 2)
    host.listening(tcp)
    report = p.device.migrate(tcp.incoming, timeout=10)
    assert report["fds"] == 0 and report["deferred"]
    assert p.device.info["pid"] == tcp.pid
    for i, data in payload.items():
        assert crc32c.crc32c(drv.read(1, 8 * i, 8, qid=2 - i % 2)) == crc32c.crc32c(data), i
    drv.write(1, 0, payload[1])
    assert drv.read(1, 0, 8) == payload[1]


def test_migrate_nvme_example_runs(capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
    try:
        import migrate_nvme
    finally:
        sys.path.pop(0)
    assert migrate_nvme.main(["--migrations", "1", "--rounds", "4", "--qd", "8", "--ns-size", str(1 << 20)]) == 0
    out = capsys.readouterr().out
    assert "migration 1: to process" in out and "0 CRC-32C mismatches" in out


def test_migrate_nvme_example_many_migrations_json(capsys):
    """More migrations than the default rounds (once refused), each destination started when
    needed; --json is one JSON object on stdout."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "examples"))
    try:
        import migrate_nvme
    finally:
        sys.path.pop(0)
    assert migrate_nvme.main(["--migrations", "25", "--qd", "4", "--queues", "1", "--ns-size", str(1 << 20),
                              "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["migrations"]) == 25 and out["mismatches"] == 0
    assert len({m["pid"] for m in out["migrations"]}) == 25 and out["blocks_checked"] == 2 * 2048
