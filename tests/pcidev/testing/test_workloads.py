"""pcidev.testing.standard_workload and the Workload hooks a standard workload uses:
edu's DmaCopies migrated between processes, before_migration / after_migration on every
path, the report, a kept migration stream, the pre-copy budget passed through."""

from __future__ import annotations

import inspect
import os
import time

import pytest

from pcidev.errors import MigrationError, PcidevError
from pcidev.host import Machine
from pcidev.testing import MigrationRecord, Workload, WorkloadContext, migrate_under_load, standard_workload
from pcidev.testing.edu import DmaCopies
from pcidev.transport.link.process import DeviceProcess
from pcidev.transport.link.remote import RemoteDevice
from pcidev.vmstate import dump_stream_json


class Recording(DmaCopies):
    """edu's standard workload, remembering the migration hooks' calls."""

    def __init__(self) -> None:
        super().__init__(batch=4, seed=5)
        self.calls: list[tuple[str, int | None]] = []

    def before_migration(self, ctx: WorkloadContext, index: int) -> None:
        self.calls.append(("before", index))

    def after_migration(self, ctx: WorkloadContext, record: MigrationRecord | None) -> None:
        self.calls.append(("after", None if record is None else record.index))


def test_edu_s_standard_workload_migrates_and_reports(tmp_path):
    work = standard_workload("edu", workdir=tmp_path, qd=4, seed=1)
    assert isinstance(work, DmaCopies) and work.probe and work.properties
    result = migrate_under_load("edu", work, count=3, every=2)
    assert len(result.migrations) == 3
    report = work.report()
    assert report["mismatches"] == 0 and report["lost_completions"] == 0
    assert report["duplicate_completions"] is None  # edu gives no way to see one
    assert report["copies"] == report["blocks_checked"] >= 4 * 7 and report["seed"] == 1
    assert all(m.summary == {} for m in result.migrations)  # no plugin summarises edu


def test_migration_hooks_run_around_every_migration():
    work = Recording()
    migrate_under_load("edu", work, count=2, every=2)
    assert work.calls == [("before", 1), ("after", 1), ("before", 2), ("after", 2)]


def test_after_migration_runs_with_none_when_the_migration_fails(tmp_path, monkeypatch):
    (tmp_path / "pcidev_other_edu2.py").write_text(
        "from pcidev import hookimpl\nfrom pcidev.devices.edu import EduDevice\n\n\n"
        "class OtherEdu(EduDevice):\n    TYPE_NAME = 'edu-other2'\n\n\n"
        "@hookimpl\ndef pcidev_register_devices(registry):\n    registry.add_device(OtherEdu)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    work = Recording()
    with pytest.raises(MigrationError):
        migrate_under_load("edu", work, count=2, every=1, destination_type="edu-other2",
                           plugin_specs=["pcidev_other_edu2"])
    assert work.calls == [("before", 1), ("after", None)]


def test_a_failing_before_migration_is_a_workload_error_and_releases():
    class Failing(Recording):
        def before_migration(self, ctx: WorkloadContext, index: int) -> None:
            super().before_migration(ctx, index)
            raise RuntimeError("cannot fill the queue")

    work = Failing()
    with pytest.raises(PcidevError, match=r"in before_migration\(\) of migration 1.*cannot fill the queue"):
        migrate_under_load("edu", work, count=1, every=1)
    assert work.calls == [("before", 1), ("after", None)]


def test_a_kept_stream_is_the_one_the_destination_loaded():
    result = migrate_under_load("edu", DmaCopies(batch=2), count=2, every=1, keep_stream=2)
    first, second = result.migrations
    assert first.stream is None and second.stream is not None
    assert len(second.stream) == second.state_size
    assert dump_stream_json(second.stream)["device_type"] == "edu"


def test_the_workload_s_configuration_is_the_default():
    class Tiny(Workload):
        properties = "engine=on,chunk=512"
        ram_size = 80 << 20

        def step(self, ctx: WorkloadContext) -> None:
            assert ctx.machine.ram_size == 80 << 20
            ctx.pdev.ioread32(0, 0)

    result = migrate_under_load("edu", Tiny(), count=1, every=1)
    assert result.iterations >= 2 and not result.errors
    Tiny.properties = "chunk=0"  # the device is built from the workload's properties: refused
    with pytest.raises(PcidevError, match="chunk must be positive"):
        migrate_under_load("edu", Tiny(), count=1, every=1)
    migrate_under_load("edu", Tiny(), count=1, every=1, properties="")  # unless the caller gives its own


def test_max_downtime_ms_is_passed_to_a_link_with_pre_copy(monkeypatch):
    original = RemoteDevice.migrate
    budgets = []

    def migrate(self, to, *, timeout=30.0, link=None, max_downtime_ms=None):
        budgets.append(max_downtime_ms)
        return original(self, to, timeout=timeout, link=link)

    monkeypatch.setattr(RemoteDevice, "migrate", migrate)
    migrate_under_load("edu", DmaCopies(batch=2), count=2, every=1, max_downtime_ms=7.5)
    assert budgets == [7.5, 7.5]


def test_max_downtime_ms_without_pre_copy_is_one_clear_line(monkeypatch):
    original = RemoteDevice.migrate

    def migrate(self, to, *, timeout=30.0, link=None):
        return original(self, to, timeout=timeout, link=link)

    monkeypatch.setattr(RemoteDevice, "migrate", migrate)
    assert "max_downtime_ms" not in inspect.signature(RemoteDevice.migrate).parameters
    with pytest.raises(PcidevError, match="max_downtime_ms needs pre-copy"):
        migrate_under_load("edu", DmaCopies(batch=2), count=1, max_downtime_ms=5)


@pytest.mark.parametrize(("device_type", "kwargs", "message"), [
    ("no-such-type", {}, "unknown device type 'no-such-type'"),
    ("edu", {"transport": "rdma"}, "transport must be one of unix, tcp"),
    ("edu", {"qd": 0}, "queues and qd must be >= 1"),
    ("edu", {"plugin_specs": ["no:builtin"]}, "unknown device type 'edu'"),
])
def test_standard_workload_refuses_with_one_line(tmp_path, device_type, kwargs, message):
    with pytest.raises(PcidevError, match=message):
        standard_workload(device_type, workdir=tmp_path, **kwargs)


def test_a_device_type_without_a_standard_workload(tmp_path, monkeypatch):
    (tmp_path / "pcidev_bare_edu.py").write_text(
        "from pcidev import hookimpl\nfrom pcidev.devices.edu import EduDevice\n\n\n"
        "class BareEdu(EduDevice):\n    TYPE_NAME = 'edu-bare'\n\n\n"
        "@hookimpl\ndef pcidev_register_devices(registry):\n    registry.add_device(BareEdu)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PcidevError, match="device type 'edu-bare' has no standard workload"):
        standard_workload("edu-bare", workdir=tmp_path, plugin_specs=["pcidev_bare_edu"])


def test_a_stream_copy_that_cannot_be_written_never_stops_the_destination(tmp_path):
    """--save-incoming is for inspection: the destination serves the device even when the
    copy cannot be written (the source gave the device up at the acknowledgement)."""
    source = DeviceProcess("edu", f"unix:{tmp_path}/src.sock")
    dest = DeviceProcess("edu", f"unix:{tmp_path}/dst.sock", incoming=f"unix:{tmp_path}/in.sock",
                         save_incoming=str(tmp_path / "no-such-dir" / "stream.bin"))
    try:
        source.wait_event("ready")
        address = str(dest.wait_event("listening")["incoming"])
        with Machine() as machine:
            pdev = machine.plug_remote(source.link)
            pdev.enable_device()
            pdev.iowrite32(0, 0x08, 5)  # FACTORIAL
            pdev.device.migrate(address, timeout=20)
            dest.wait_event("incoming")
            assert pdev.ioread32(0, 0x08) == 120 and pdev.device.info["pid"] == dest.pid
        # (the line is read from the process's stderr by a thread: it may come a little after
        # the event; CI on a loaded machine saw it missing at once)
        deadline = time.monotonic() + 10
        while not any("cannot write" in line and "stream.bin" in line for line in dest.stderr_lines) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any("cannot write" in line and "stream.bin" in line for line in dest.stderr_lines)
    finally:
        source.stop()
        dest.stop()
