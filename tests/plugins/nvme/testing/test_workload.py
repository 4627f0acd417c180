"""The NVMe plugin's standard migration workload (pcidev_nvme.testing.workload.VerifiedIo),
in process: steps at QD >= 8 on two queues with every block checked, the final check
and the AER it completes; a corrupted block, a duplicated and a lost completion are
each found and counted; a hold keeps queue 1's CQ full with completions parked, as
the plugin's migration summary of the controller says."""

from __future__ import annotations

import os
import struct
import threading
import time

import crc32c
import pytest
from _helpers import wait_until

from pcidev.errors import PcidevError
from pcidev.testing import WorkloadContext, standard_workload
from pcidev_nvme import plugin
from pcidev_nvme.testing import workload as workload_module
from pcidev_nvme.testing.workload import BLOCK_HEADER, VerifiedIo

CONFIG = "max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M,ns=mem:size=1M,lbaf=1"


@pytest.fixture
def run(nvme_env):
    """A controller plugged into a machine, and a VerifiedIo set up on it (2 queues x QD 8)."""
    env = nvme_env(CONFIG, probe=False)

    def make(**kwargs) -> tuple[VerifiedIo, WorkloadContext]:
        work = VerifiedIo(qd=kwargs.pop("qd", 8), queues=2, seed=7, **kwargs)
        ctx = WorkloadContext(env.machine, env.pdev)
        work.setup(ctx)
        return work, ctx

    make.env = env
    return make


def test_steps_verify_and_report(run):
    work, ctx = run()
    assert work.drv.queues[1].cq_size == 4 and work.drv.queues[2].cq_size == 16  # queue 1's CQ overflows
    for _ in range(6):
        work.step(ctx)
    work.verify(ctx)
    r = work.report()
    assert r["commands"] == r["writes"] + r["reads"] > 6 * 8 and r["writes"] and r["readbacks"]
    assert r["blocks_read"] >= r["reads"]
    assert (r["mismatches"], r["lost_completions"], r["duplicate_completions"], r["error_completions"]) == (0, 0, 0, 0)
    assert r["blocks_checked"] == 2048 + 256  # every block of both namespaces (512 B and 4 KiB LBAs)
    assert r["aer_events"] == 1 and r["seed"] == 7
    # what the workload wrote carries fio-like headers: CRC-32C of the rest, NSID, LBA
    (nsid, lba), crc = next(iter(work.crc.items()))
    block = work.drv.read(nsid, lba, 1)
    own, hns, hlba, _seq = BLOCK_HEADER.unpack_from(block)
    assert (hns, hlba) == (nsid, lba) and own == crc32c.crc32c(block[4:]) and crc32c.crc32c(block) == crc


def test_a_corrupted_block_is_a_mismatch(run):
    work, ctx = run()
    work.step(ctx)
    nsid, lba = next(iter(work.crc))
    lbs = work.drv.lba_size(nsid)
    work.drv.write(nsid, lba, os.urandom(lbs))  # behind the workload's back
    with pytest.raises(AssertionError, match=rf"namespace {nsid}, LBA {lba} at the end"):
        work.verify(ctx)
    assert work.report()["mismatches"] == 1


def test_a_completion_for_a_cid_not_outstanding_is_a_duplicate(run):
    work, ctx = run()
    work.step(ctx)
    drv = work.drv
    q = drv.queues[2]
    cid = q.free_cids[0]  # the CID the workload's next command on queue 2 gets...
    sqe = struct.pack("<BBHI", 0x00, 0, cid, 1) + bytes(56)  # ...completes once more: a Flush under it
    drv.submit_raw(2, sqe)
    q.free_cids.appendleft(cid)
    del q.pending[cid]
    with pytest.raises(AssertionError, match=f"CID {cid} of SQ 2"):
        work.step(ctx)
    assert work.report()["duplicate_completions"] >= 1


def test_a_command_that_never_completes_is_lost(run, monkeypatch):
    work, ctx = run()
    monkeypatch.setattr(workload_module, "STEP_TIMEOUT", 0.5)
    ring = work.drv.ring
    monkeypatch.setattr(work.drv, "ring", lambda qid: None if qid == 2 else ring(qid))  # queue 2's doorbell is lost
    before = work.commands
    with pytest.raises(AssertionError, match="completions lost"):
        work.step(ctx)
    lost = work.report()["lost_completions"]
    assert 0 < lost < work.commands - before and not any(sq == 2 for sq, _ in work.outstanding)


def test_a_hold_keeps_queue_1_s_cq_full_with_completions_parked(run):
    work, ctx = run(qd=16)
    ctrl = run.env.ctrl
    work.step(ctx)
    errors: list[BaseException] = []

    def steps() -> None:
        try:
            deadline = time.monotonic() + 30
            while not work.holds and time.monotonic() < deadline:  # until a step held the CQ full
                work.step(ctx)
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=steps)
    thread.start()
    try:
        work.before_migration(ctx, 2)  # returns once the workload holds
        assert work._hold_state == "holding"
        cq = ctrl.completion_queues[1]
        assert work.drv.cq_posted(1) == cq.size - 1 == 7
        wait_until(lambda: len(cq.backlog) > 0, timeout=5, what="parked completions")
        summary = plugin.pcidev_migration_summary(ctrl)
        assert summary["cqs_full"] == 1 and summary["cq_backlog"] == len(cq.backlog) > 0
        assert summary["aers_outstanding"] == 4
    finally:
        work.after_migration(ctx, None)
        thread.join(30)
    assert not errors and not thread.is_alive()
    work.verify(ctx)
    assert work.report()["cq_full_holds"] == 1 and work.report()["mismatches"] == 0


def test_odd_migrations_do_not_hold_and_a_missed_hold_is_counted(run, monkeypatch):
    work, ctx = run()
    work.before_migration(ctx, 1)
    assert work._hold_state == "idle" and work.holds_missed == 0
    monkeypatch.setattr(workload_module, "HOLD_WAIT", 0.2)
    work.before_migration(ctx, 2)  # nobody steps: the wait gives up
    assert work._hold_state == "idle" and work.holds_missed == 1


def test_the_summary_is_for_nvme_controllers_only():
    assert plugin.pcidev_migration_summary(object()) is None


def test_from_options_has_a_mem_and_a_file_namespace_on_either_transport(tmp_path):
    unix = VerifiedIo.from_options({"workdir": tmp_path, "queues": 2, "qd": 32})
    assert "ns=mem:" in unix.properties and "ns=file:" in unix.properties and "max_ioqpairs=2" in unix.properties
    tcp = VerifiedIo.from_options({"workdir": tmp_path, "transport": "tcp"})
    # over TCP too: the mem namespace's contents travel (pre-copy)
    assert "ns=mem:" in tcp.properties and f"path={tmp_path}/nvme-ns.img" in tcp.properties
    assert (tmp_path / "nvme-ns.img").stat().st_size == 4 << 20
    assert not unix.probe and unix.ram_size >= 64 << 20


def test_namespaces_chooses_the_kinds_and_the_image_is_preallocated(tmp_path):
    mem = VerifiedIo.from_options({"workdir": tmp_path, "namespaces": "mem", "ns_size": 8 << 20})
    assert mem.properties.count("ns=") == 1 and "ns=mem:size=8388608" in mem.properties
    assert not (tmp_path / "nvme-ns.img").exists()
    file = VerifiedIo.from_options({"workdir": tmp_path, "namespaces": "file", "ns_size": 3 << 20})
    assert file.properties.count("ns=") == 1 and f"ns=file:path={tmp_path}/nvme-ns.img" in file.properties
    st = (tmp_path / "nvme-ns.img").stat()
    # written whole (no hole: a write allocates nothing, the stop's fdatasync waits for no journal)
    assert st.st_size == 3 << 20 and st.st_blocks * 512 >= st.st_size
    assert (tmp_path / "nvme-ns.img").read_bytes() == bytes(3 << 20)


@pytest.mark.parametrize(("options", "message"), [
    ({}, "needs a workdir"),
    ({"workdir": "WORKDIR", "transport": "rdma"}, "transport must be unix or tcp"),
    ({"workdir": "WORKDIR", "ns_size": 1 << 20}, "too small for 8 x 32 commands"),
    ({"workdir": "WORKDIR", "namespaces": "mem,nbd"}, "namespaces must be mem, file or both"),
    ({"workdir": "WORKDIR", "namespaces": "file,file"}, "namespaces must be mem, file or both"),
])
def test_from_options_refuses_with_one_line(tmp_path, options, message):
    options = {k: (tmp_path if v == "WORKDIR" else v) for k, v in options.items()}
    with pytest.raises(PcidevError, match=message):
        VerifiedIo.from_options(options)


def test_the_plugin_provides_it_through_the_toolkit(tmp_path):
    work = standard_workload("nvme", workdir=tmp_path, queues=3, qd=16, seed=2)
    assert isinstance(work, VerifiedIo) and (work.queues, work.qd, work.seed) == (3, 16, 2)
