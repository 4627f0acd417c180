"""Device state descriptions as released: committed schema snapshots (framework section
and every registered device type with a VMSTATE), golden streams of each released
version loaded by the current code, and the ``pcidev vmstate`` commands."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pcidev.cli import main as cli_main
from pcidev.devices.edu import EduDevice, EduInflight
from pcidev.dma import alloc_memfd
from pcidev.migration import FunctionState, load_device_stream
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.transport.fdpass import close_fds
from pcidev.vmstate import peek_header
from pcidev.vmstate.testing import assert_schema_matches

HERE = Path(__file__).resolve().parent
SCHEMA = HERE / "schema"
DATA = HERE / "device_data"
sys.path.insert(0, str(HERE))
from device_golden import EXPECTED_EDU_V1, RAM_SIZE  # noqa: E402


def _device_types_with_state():
    """The device types of pcidev and the NVMe plugin (other installed plugins, such as the example
    virtio plugin, keep their schema snapshots with their own tests)."""
    registry = load_registry(make_plugin_manager())
    return [(e.name, e.cls) for e in registry.devices() if getattr(e.cls, "VMSTATE", None) is not None
            and e.cls.__module__.split(".")[0] in ("pcidev", "pcidev_nvme")]


def test_framework_schema_matches_the_snapshot():
    assert_schema_matches(FunctionState, SCHEMA / "pcidev-function.json")


@pytest.mark.parametrize("type_name, cls", _device_types_with_state(), ids=lambda v: v if isinstance(v, str) else "")
def test_device_schema_matches_the_snapshot(type_name, cls):
    """Every device type that can migrate has a committed schema of its VMSTATE:
    changing it without a version bump (or a new subsection) fails here."""
    assert_schema_matches(cls.VMSTATE, SCHEMA / f"{type_name}.json")


def test_edu_is_among_the_checked_types():
    assert "edu" in dict(_device_types_with_state())


@pytest.mark.parametrize("golden", ["edu-v1.pcvm"])
def test_golden_edu_streams_load(golden):
    data = (DATA / golden).read_bytes()
    header = peek_header(data)
    assert header.device_type == "edu"
    assert [s.name for s in header.sections] == ["pcidev/function", "edu"]
    memfd = alloc_memfd(RAM_SIZE)
    efds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    dev = EduDevice(autorun=False)
    res = load_device_stream(dev, data, [memfd, *efds])
    try:
        want = EXPECTED_EDU_V1
        assert dev.bar_address(0) == want["bar0"]
        state = dev.get_device_state()
        for field in ("ring_base", "ring_size", "ring_tail", "ring_head", "completed", "irq_status", "liveness",
                      "factorial"):
            assert getattr(state, field) == want[field], field
        assert dev.inflight == EduInflight(*want["inflight"], crc=dev.inflight.crc)
        assert dev.irq.msix.is_pending(1) == want["pending_vector_1"]
        assert dev.irq.mode == "msix"
        assert [r.size for r in res.memory.regions()] == [RAM_SIZE]
        assert sorted(res.sink.vector_fds) == [0, 1] and res.sink.intx_fd is not None
    finally:
        res.close()
        close_fds([memfd, *efds])


# ------------------------------------------------------------ pcidev vmstate
def test_cli_dump_prints_json(capsys):
    assert cli_main(["-p", "no:nvme", "vmstate", "dump", str(DATA / "edu-v1.pcvm")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["device_type"] == "edu" and doc["fingerprint"]["pci.msix_vectors"] == 2
    assert doc["sections"][1]["subsections"]["edu/inflight"]["fields"]["done"] == 1000


@pytest.mark.parametrize("mutate", [
    lambda d: d[:100],
    lambda d: d[:30] + bytes([d[30] ^ 0xFF]) + d[31:],
    lambda d: b"NOTAVMST" + d[8:],
    lambda d: b"",
])
def test_cli_dump_of_an_invalid_stream_is_one_line(tmp_path, capsys, mutate):
    bad = tmp_path / "bad.pcvm"
    bad.write_bytes(mutate((DATA / "edu-v1.pcvm").read_bytes()))
    assert cli_main(["-p", "no:nvme", "vmstate", "dump", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pcidev: error: {bad}: ")
    assert "Traceback" not in captured.err


def test_cli_dump_of_a_missing_file(tmp_path, capsys):
    assert cli_main(["vmstate", "dump", str(tmp_path / "nope")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli_schema(capsys):
    assert cli_main(["-p", "no:nvme", "vmstate", "schema", "edu"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["framework"]["name"] == "pcidev/function"
    assert doc["device"]["name"] == "edu" and doc["device"]["version"] == 1
    assert [s["name"] for s in doc["sections"]] == ["pcidev/function", "edu"]
    assert "background-engine" in doc["migratable_features"] and doc["static_blockers"] == []
    assert cli_main(["-p", "no:nvme", "vmstate", "schema", "nope"]) == 1
    assert "unknown device type" in capsys.readouterr().err


def test_an_edu_change_without_version_bump_is_caught(tmp_path, monkeypatch):
    """The snapshot test is what stops an unversioned layout change of edu."""
    import attrs

    from pcidev.vmstate import U32, U64, vmstate

    @vmstate("edu", version=1)
    @attrs.frozen
    class ChangedEdu:
        liveness: U32
        factorial: U32
        status: U32
        irq_status: U32
        ring_base: U64
        ring_size: U32
        ring_tail: U32
        ring_head: U32
        ring_ctrl: U32
        errors: U32
        completed: U32  # narrowed from U64
        inflight: EduInflight | None = None

    monkeypatch.delenv("PCIDEV_UPDATE_SCHEMAS", raising=False)
    with pytest.raises(AssertionError, match="completed"):
        assert_schema_matches(ChangedEdu, SCHEMA / "edu.json")


# ---------------------------------------------------------- saved streams stay identical
def _time_fields_zeroed(doc):
    """The dump of a stream with the values that depend on the wall clock (timer
    readings of the NVMe controller, and so size and checksum) set to 0."""
    if isinstance(doc, dict):
        return {k: (0 if k in _CLOCK_FIELDS else _time_fields_zeroed(v)) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_time_fields_zeroed(v) for v in doc]
    return doc


#: optional subsections of the ``nvme`` section added after the golden stream was recorded
#: that its scenario fills (the per-namespace SMART counters of its I/O); the rest must match
_ADDED_SUBSECTIONS = ("nvme/ns-smart",)

_CLOCK_FIELDS = frozenset({"size", "checksum", "timestamp", "busy_us", "power_on_us"})


def test_a_fresh_edu_save_is_byte_identical_to_the_golden_stream():
    """Refactoring must not change the stream: the golden edu state saved by today's
    code is the committed file, byte for byte."""
    import make_device_golden

    assert make_device_golden._edu_v1() == (DATA / "edu-v1.pcvm").read_bytes()


def test_a_fresh_nvme_save_matches_the_golden_stream_but_for_clock_readings():
    """The golden NVMe state saved by today's code decodes to exactly the committed
    stream's fields and values, except the readings of the controller's clock."""
    import make_device_golden

    from pcidev.vmstate.dump import dump_stream_json

    fresh = dump_stream_json(make_device_golden._nvme_v1())
    golden = dump_stream_json((DATA / "nvme-v1.pcvm").read_bytes())
    for name in _ADDED_SUBSECTIONS:  # (filled by the golden's scenario since the stream was recorded)
        fresh["sections"][1]["subsections"].pop(name, None)
    assert _time_fields_zeroed(fresh) == _time_fields_zeroed(golden)
