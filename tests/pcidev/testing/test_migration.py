"""pcidev.testing.migrate_under_load: edu moved between processes while a workload
verifies itself; a failing workload, a refusing destination and a KeyboardInterrupt
stop the run cleanly (no child process, descriptor or socket file left behind)."""

from __future__ import annotations

import _thread
import gc
import os
import struct
import tempfile
import time
from pathlib import Path

import crc32c
import pytest

from pcidev.devices.edu import DESC, STATUS_DONE
from pcidev.errors import MigrationBlockedError, MigrationError, PcidevError
from pcidev.testing import (
    MigrationRecord,
    MigrationRunResult,
    Workload,
    WorkloadContext,
    WorkloadError,
    migrate_under_load,
)

EDU = {"engine": True, "chunk": 4096, "delay": 0.0002}
BLOCK = 32768


# [example: an edu workload]
class EduCopies(Workload):
    """Each step: a factorial, then one DMA copy of fresh random bytes, both checked."""

    def setup(self, ctx: WorkloadContext) -> None:
        m, p = ctx.machine, ctx.pdev
        self.ring, self.src, self.dst = m.alloc(8 * 32), m.alloc(BLOCK), m.alloc(BLOCK)
        p.iowrite64(0, 0x100, self.ring)  # RING_BASE
        p.iowrite32(0, 0x108, 8)  # RING_SIZE
        p.iowrite32(0, 0x114, 1)  # RING_CTRL: enable
        self.tail = 0

    def step(self, ctx: WorkloadContext) -> None:
        m, p = ctx.machine, ctx.pdev
        n = ctx.iteration % 13
        p.iowrite32(0, 0x08, n)  # FACTORIAL
        assert p.ioread32(0, 0x08) == _factorial(n), f"{n}! is wrong"
        data = os.urandom(BLOCK)
        m.write(self.src, data)
        slot = self.tail
        m.memory.write_struct(DESC, self.ring + 32 * slot, self.src, self.dst, BLOCK, 1, 0, 0)
        before = p.irq_count(0)
        self.tail = (self.tail + 1) % 8
        p.iowrite32(0, 0x10C, self.tail)  # RING_TAIL: the doorbell
        assert p.recorder.wait(0, above=before, timeout=10), "no DMA completion interrupt"
        status, crc = struct.unpack("<II", m.read(self.ring + 32 * slot + 0x18, 8))
        assert status == STATUS_DONE and crc == crc32c.crc32c(data), "the device's CRC is wrong"
        assert m.read(self.dst, BLOCK) == data, "the copy differs"
# [end example]


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out = out * i & 0xFFFFFFFF
    return out


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _children() -> set[int]:
    out: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            out |= {int(p) for p in Path(f"/proc/self/task/{task}/children").read_text().split()}
        except OSError:
            pass
    return out


def _state(pid: int) -> str | None:
    """A process's state letter (R, S, Z, ...), None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _workdirs() -> set[str]:
    """This process's runner directories (another pytest run on the machine has its own)."""
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith(f"pcidev-migrate-{os.getpid()}-")}


@pytest.fixture
def clean():
    """Checks that the test leaves no child process, descriptor or socket directory behind."""
    fds, children, dirs = _fds(), _children(), _workdirs()
    yield
    assert _children() <= children, "a device process was not reaped"
    assert _workdirs() <= dirs, "a socket directory was left behind"
    # what the run left open stays open; a descriptor some other thread of the test
    # process (a previous test's, ending) opens for a moment goes away
    deadline = time.monotonic() + 3.0
    while True:
        gc.collect()
        leaked = {}
        for fd in _fds() - fds:
            try:
                leaked[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass  # closed meanwhile
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not leaked, leaked


def _gone(result_pids) -> bool:
    return all(not os.path.exists(f"/proc/{pid}") for pid in result_pids)


def test_edu_migrates_five_times_while_the_workload_verifies(clean):
    seen = []
    result = migrate_under_load("edu", EduCopies(), count=5, every=3, properties=EDU,
                                on_migration=lambda rec, ctx: seen.append((rec.index, ctx.pid)))
    assert isinstance(result, MigrationRunResult)
    assert [m.index for m in result.migrations] == [1, 2, 3, 4, 5]
    assert result.iterations >= 6 * 3 and not result.errors
    assert len(set(result.pids)) == 6 and _gone(result.pids)
    for rec, (index, pid) in zip(result.migrations, seen, strict=True):
        assert rec.index == index and rec.destination_pid == pid
        assert rec.fds == 4 and 0 < rec.state_size < 8192  # RAM + 2 MSI-X vectors + INTx
        assert rec.downtime is not None and 0 < rec.downtime < 2.0
        assert rec.sections[-1]["name"] == "edu"
    for earlier, later in zip(result.migrations, result.migrations[1:], strict=False):
        assert later.source_pid == earlier.destination_pid and later.iteration >= earlier.iteration
    text = str(result)
    assert "edu: 5 migrations over unix" in text and "migration 5: process" in text
    assert repr(result).startswith("<MigrationRunResult edu x5 over unix, max downtime")


def test_destinations_start_one_at_a_time_when_needed(clean):
    """Each destination starts after the migration before it: at any migration the run has
    at most the device's process and the next destination waiting (50 destinations
    started up front used to time out waiting for their turn on a busy machine)."""
    waiting: list[int] = []

    def count(rec: MigrationRecord, ctx: WorkloadContext) -> None:
        live = {k for k in _children() if _state(k) not in ("Z", "X", None)}  # earlier sources have exited
        waiting.append(len(live - {rec.destination_pid, rec.source_pid}))

    result = migrate_under_load("edu", EduCopies(), count=6, every=1, properties=EDU, on_migration=count)
    assert [m.index for m in result.migrations] == [1, 2, 3, 4, 5, 6]
    assert waiting[:-1] == [1] * 5 and waiting[-1] == 0  # the next destination, none after the last
    assert len(set(result.pids)) == 7 and _gone(result.pids)


def test_over_tcp_with_a_step_function(clean):
    def factorial(ctx: WorkloadContext) -> None:
        ctx.pdev.iowrite32(0, 0x08, 10)
        assert ctx.pdev.ioread32(0, 0x08) == 3628800

    result = migrate_under_load("edu", factorial, count=2, iterations=15, transport="tcp")  # every 5
    assert [(m.fds, m.report["deferred"]) for m in result.migrations] == [(0, True), (0, True)]
    assert result.iterations == 15


def test_a_failing_workload_stops_the_run_with_context(clean):
    class Breaks(EduCopies):
        def step(self, ctx: WorkloadContext) -> None:
            super().step(ctx)
            if ctx.migrations == 1:
                raise AssertionError("block 7 differs")

    with pytest.raises(WorkloadError) as info:
        migrate_under_load("edu", Breaks(), count=3, every=2, properties=EDU)
    err = info.value
    assert isinstance(err.__cause__, AssertionError)
    assert err.migrations == 1 and err.iteration >= 3
    assert "after 1 of 3 migrations" in str(err) and "AssertionError: block 7 differs" in str(err)
    assert err.result is not None and err.result.errors == ("AssertionError: block 7 differs",)
    assert _gone(err.result.pids)


def test_a_failing_final_verification_is_a_workload_error(clean):
    class Unhappy(Workload):
        def step(self, ctx: WorkloadContext) -> None:
            ctx.pdev.ioread32(0, 0)

        def verify(self, ctx: WorkloadContext) -> None:
            raise ValueError("3 blocks lost")

    with pytest.raises(WorkloadError, match=r"in verify\(\), after 1 of 1 migrations.*3 blocks lost"):
        migrate_under_load("edu", Unhappy(), count=1, every=2)


OTHER_PLUGIN = """
from pcidev import hookimpl
from pcidev.devices.edu import EduDevice


class OtherEdu(EduDevice):
    TYPE_NAME = "edu-other"


@hookimpl
def pcidev_register_devices(registry):
    registry.add_device(OtherEdu)
"""


def test_a_refusing_destination_reaches_the_caller_typed(clean, tmp_path, monkeypatch):
    """Destinations of another device type (from a plugin the device processes load
    through plugin_specs) refuse in the pre-flight, before anything stops; the refusal
    reason reaches the caller typed."""
    (tmp_path / "pcidev_other_edu.py").write_text(OTHER_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(MigrationError) as info:
        migrate_under_load("edu", EduCopies(), count=2, every=2, properties=EDU, destination_type="edu-other",
                           plugin_specs=["pcidev_other_edu"])
    text = str(info.value)
    assert isinstance(info.value, MigrationBlockedError), text
    assert "the destination refuses: the source is a device of type 'edu', this one is 'edu-other'" in text, text
    assert "Broken pipe" not in text
    assert any("migration 1 of 2 of edu" in note for note in info.value.__notes__)


def test_a_device_type_nobody_registered(clean):
    with pytest.raises(PcidevError, match="unknown device type 'no-such-device'"):
        migrate_under_load("no-such-device", EduCopies(), count=1)


def test_keyboard_interrupt_cleans_up(clean):
    def interrupted(ctx: WorkloadContext) -> None:
        ctx.pdev.ioread32(0, 0)
        if ctx.iteration == 3:
            _thread.interrupt_main()  # Ctrl-C, as the main thread sees it
            # (and no step more until the run stops: on a busy machine the main thread could
            # otherwise see the interrupt only after 200 more steps, in the migration)
            ctx.stopping.wait(60)

    with pytest.raises(KeyboardInterrupt):  # (a start timeout for a busy machine)
        migrate_under_load("edu", interrupted, count=3, every=200, start_timeout=120)


def test_keyboard_interrupt_during_a_callback_cleans_up(clean):
    def ctrl_c(rec, ctx):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        migrate_under_load("edu", EduCopies(), count=2, every=1, properties=EDU, on_migration=ctrl_c)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"transport": "rdma"}, "transport must be one of unix, tcp"),
    ({"count": -1}, "count must be >= 0"),
    ({"every": 0}, "every must be >= 1"),
    ({"count": 5, "every": 4, "iterations": 20}, "would run without load"),
])
def test_bad_options_are_one_clear_line(clean, kwargs, message):
    with pytest.raises(PcidevError, match=message):
        migrate_under_load("edu", EduCopies(), **kwargs)
