"""An ``nbd`` namespace follows its controller to another process (pcidev_nvme.migration):
the destination opens its own connection to the same export, the source flushes at the
stop, and the pre-flight refuses a destination that cannot reach the export."""

from __future__ import annotations

import os
import time

import pytest
from _moves import refused_while_the_source_runs

from pcidev.testing import migrate_under_load
from pcidev.transport.link.process import DeviceProcess
from pcidev_nvme import migration
from pcidev_nvme.testing.workload import VerifiedIo

MiB = 1 << 20
#: qemu-nbd serves one client unless told more: the source, the destination and its pre-flight
SHARED = ("--shared=8",)
PROPS = "serial=NBDMOVE,max_ioqpairs=2,msix_vectors=3"


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_verified_io_across_migrations_of_an_nbd_namespace(nbd_server, transport):
    """Two migrations (UNIX: the new process opens its own connection, no descriptor passes;
    TCP) while the verified workload runs on a qemu-nbd namespace and a mem one: every block
    read checks its CRC-32C, zero mismatches, nothing lost."""
    q = nbd_server("qemu", size=4 * MiB, extra=SHARED)
    work = VerifiedIo(qd=8, queues=2, seed=13, properties=f"{PROPS},ns=nbd:uri={q.uri},ns=mem:size=1M")
    result = migrate_under_load("nvme", work, count=2, every=2, transport=transport, probe=False,
                                migration_timeout=60, start_timeout=60)
    assert len(result.migrations) == 2
    report = work.report()
    assert report["mismatches"] == 0 and report["lost_completions"] == 0 and report["duplicate_completions"] == 0
    assert report["blocks_written"] > 0 and report["blocks_checked"] > 4 * MiB // 4096
    assert all(m.fds == 0 for m in result.migrations) or transport == "unix"


def test_the_stop_flushes_the_nbd_namespace(nbd_server):
    """The quiesce of a migration sends NBD_CMD_FLUSH (the flush job names the export)."""
    from pcidev_nvme.controller import NvmeController

    q = nbd_server("qemu", size=1 * MiB, extra=SHARED)
    ctrl = NvmeController(f"ns=nbd:uri={q.uri}")
    try:
        backend = ctrl.namespaces[1].backend
        flushed = []
        real = backend.flush
        backend.flush = lambda: (flushed.append(1), real())[1]
        jobs, _kept = migration._flush_jobs(ctrl)
        assert [what for what, _s, _f in jobs] == [f"namespace 1 (nbd {q.uri})"]
        migration.flush_namespaces(ctrl, time.monotonic() + 30)
        assert flushed == [1]
    finally:
        ctrl.close()


def test_an_export_the_destination_cannot_reach_is_a_preflight_blocker(nbd_server, tmp_path):
    """The destination reaches the export through a symbolic link to the server's socket,
    removed once it started: the pre-flight's new connection fails, the migration is refused
    naming the namespace and the URI before anything stops, and the source runs on (its
    verified workload then reads every block back: zero mismatches)."""
    q = nbd_server("qemu", size=4 * MiB, extra=SHARED)
    link = tmp_path / "route.sock"
    os.symlink(q.sock, link)
    there = f"nbd+unix:///{q.export}?socket={link}"
    work = VerifiedIo(qd=8, queues=2, seed=5, properties=f"{PROPS},ns=nbd:uri={q.uri}")
    source = DeviceProcess("nvme", f"unix:{tmp_path}/src.sock", options=work.properties)
    dest = DeviceProcess("nvme", f"unix:{tmp_path}/dst.sock", options=f"{PROPS},ns=nbd:uri={there}",
                         incoming=f"unix:{tmp_path}/dst-in.sock")
    try:
        dest.wait_event("listening", timeout=60)
        link.unlink()  # the destination's route to the export is gone (its open connection stays)
        err = refused_while_the_source_runs(
            source, dest, work, match=r"migration blocked: the destination refuses: namespace 1 \(NBD export "
                                      r".*\) cannot be reached here through .*No such file")
        assert q.uri in str(err) and str(link) in str(err)
    finally:
        source.stop()
        dest.stop()


def test_a_destination_on_a_smaller_export_is_refused(nbd_server, tmp_path):
    """A destination whose namespace is on another, smaller export: the fingerprint's size
    check or the pre-flight refuses it; the source runs on."""
    q = nbd_server("qemu", size=4 * MiB, extra=SHARED)
    small = nbd_server("qemu", size=2 * MiB, extra=SHARED)
    work = VerifiedIo(qd=8, queues=2, seed=6, properties=f"{PROPS},ns=nbd:uri={q.uri}")
    source = DeviceProcess("nvme", f"unix:{tmp_path}/src.sock", options=work.properties)
    dest = DeviceProcess("nvme", f"unix:{tmp_path}/dst.sock", options=f"{PROPS},ns=nbd:uri={small.uri}",
                         incoming=f"unix:{tmp_path}/dst-in.sock")
    try:
        refused_while_the_source_runs(source, dest, work, match=r"namespace 1 \(NBD export .*\): this controller's "
                                                                 r"namespace has 2097152 bytes, the source's 4194304")
    finally:
        source.stop()
        dest.stop()


def test_preflight_problems_name_a_destination_namespace_that_is_not_nbd(nbd_server):
    from pcidev_nvme.controller import NvmeController

    q = nbd_server("qemu", size=1 * MiB, extra=SHARED)
    src = NvmeController(f"ns=nbd:uri={q.uri}")
    dst = NvmeController("ns=mem:size=1M")
    try:
        facts = migration.preflight_facts(src)
        assert facts["nvme.nbd"] == [[1, q.uri, 1 * MiB, False]]
        assert migration.preflight_problems(src, facts) == []  # (itself: reachable, same size)
        problems = migration.preflight_problems(dst, facts)
        assert problems == [f"namespace 1 (NBD export {q.uri}): this controller's namespace 1 is mem, "
                            "not on an NBD export"]
        with pytest.raises(ValueError, match="nvme.nbd"):
            migration.preflight_problems(src, {**facts, "nvme.nbd": [[1, q.uri]]})
        with pytest.raises(ValueError):
            migration.preflight_problems(src, {**facts, "nvme.nbd": [[1, 7, 1, False]]})
        # a peer repeating a namespace gets no second probe (each may take PREFLIGHT_NBD_TIMEOUT)
        with pytest.raises(ValueError, match="names namespace 1 again"):
            migration.preflight_problems(src, {**facts, "nvme.nbd": facts["nvme.nbd"] * 1000})
        # the destination connects to its own URI, never to one the peer names
        elsewhere = {**facts, "nvme.nbd": [[1, "nbd://192.0.2.1/x", 1 * MiB, False]]}
        assert migration.preflight_problems(src, elsewhere) == []
    finally:
        src.close()
        dst.close()


def test_verified_io_across_handovers_of_an_nbd_namespace(nbd_server):
    """A vfio-user handover (same machine): the new process opens its own connection to the
    export from its configuration (the nbd backend passes no descriptor); the verified
    workload runs across two handovers, zero mismatches."""
    from pcidev.host import Machine
    from pcidev.testing import WorkloadContext, served
    from pcidev.transport.vfio_user.remote import VfioUserDevice

    q = nbd_server("qemu", size=4 * MiB, extra=SHARED)
    work = VerifiedIo(qd=8, queues=2, seed=31, properties=f"{PROPS},ns=nbd:uri={q.uri}")
    with served("nvme", work.properties, plugin_specs=()) as dev, Machine(ram_size=work.ram_size) as machine, \
            VfioUserDevice.connect(dev.path) as remote:
        ctx = WorkloadContext(machine, machine.plug(remote))
        work.setup(ctx)
        pids = {dev.pid}
        for _ in range(2):
            for _ in range(2):
                work.step(ctx)
            report = dev.handover()
            pids.add(report["new_pid"])
        work.step(ctx)
        work.verify(ctx)
        work.drv.close()
    assert len(pids) == 3
    done = work.report()
    assert done["mismatches"] == 0 and done["lost_completions"] == 0 and done["blocks_checked"] > 4 * MiB // 4096


def test_unreachable_exports_are_probed_at_once_within_one_deadline(nbd_server, monkeypatch):
    """Four nbd namespaces whose servers stopped (SIGSTOP: the connection is accepted, the
    handshake never comes), ``PREFLIGHT_NBD_TIMEOUT`` 1.5 s: the pre-flight names all four
    in about 1.5 s, not 4 x 1.5 s, one probe after the other."""
    import signal

    from pcidev_nvme.controller import NvmeController

    servers = [nbd_server("nbdkit", size=1 * MiB) for _ in range(4)]
    ctrl = NvmeController(",".join(f"ns=nbd:uri={s.uri}" for s in servers))
    pids = [s.proc.pid for s in servers if s.proc is not None]
    try:
        facts = migration.preflight_facts(ctrl)
        assert migration.preflight_problems(ctrl, facts) == []
        monkeypatch.setattr(migration, "PREFLIGHT_NBD_TIMEOUT", 1.5)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        problems = migration.preflight_problems(ctrl, facts)
        took = time.monotonic() - t0
        assert [p.split(" (")[0] for p in problems] == [f"namespace {n}" for n in (1, 2, 3, 4)], problems
        assert all("cannot be reached here" in p for p in problems), problems
        assert 1.4 <= took < 4.5, took
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        ctrl.close()
