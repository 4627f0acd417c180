"""examples/migrate_between_processes.py: the README's main job. One JSON object with
--json, a progress bar and a table without; --save-stream never replaces a file unless
--force; every error is one line on standard error and exit status 1."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pcidev.vmstate import dump_stream_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
try:
    import migrate_between_processes as example
finally:
    sys.path.pop(0)

SMALL = ["--queues", "2", "--qd", "8"]


def test_json_is_one_object_with_the_figures(capsys, tmp_path):
    stream = tmp_path / "mig.vmstate"
    assert example.main(["--migrations", "2", *SMALL, "--json", "--save-stream", str(stream)]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert captured.err == ""
    assert out["migrations"] == out["requested"] == 2 and out["device"] == "nvme" and out["transport"] == "unix"
    assert (out["mismatches"], out["lost_completions"], out["duplicate_completions"]) == (0, 0, 0)
    assert 0 < out["downtime_ms_median"] <= out["downtime_ms_max"] and out["downtime_measured"]
    assert out["state_bytes"] > 0 and out["fds"] > 0
    assert out["cq_full_stops"] >= 1 and out["cq_backlog_stops"] >= 1  # migration 2 stops with queue 1's CQ full
    assert out["aer_stops"] == 2
    assert [m["index"] for m in out["per_migration"]] == [1, 2]
    held = out["per_migration"][1]["summary"]
    assert held["cqs_full"] >= 1 and held["cq_backlog"] > 0 and held["aers_outstanding"] == 4
    work = out["workload"]
    assert work["blocks_checked"] == 2 * 8192 and work["aer_events"] == 1 and work["cq_full_holds"] == 1
    assert out["stream_saved"] == str(stream) and out["error"] is None
    dumped = dump_stream_json(stream.read_bytes())
    assert dumped["device_type"] == "nvme" and dumped["size"] == out["per_migration"][1]["state_bytes"]


def test_a_progress_bar_then_a_table(capsys):
    assert example.main(["--migrations", "1", *SMALL, "--tcp"]) == 0
    out = capsys.readouterr().out
    assert "migrating nvme" in out and "1/1" in out
    for row in ("downtime median / max", "state size", "mismatches", "lost completions",
                "duplicated completions", "stops with a full CQ", "stops with AERs outstanding"):
        assert row in out, row
    assert "nvme: 1 migrations over tcp" in out and "+ 0 fds" in out


def test_edu_has_a_standard_workload_too(capsys):
    assert example.main(["--device", "edu", "--migrations", "2", "--qd", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["migrations"] == 2 and out["mismatches"] == 0 and out["lost_completions"] == 0
    assert out["duplicate_completions"] is None and out["cq_full_stops"] == out["aer_stops"] == 0


def test_save_stream_never_replaces_a_file_without_force(capsys, tmp_path):
    stream = tmp_path / "mine.bin"
    stream.write_bytes(b"keep me")
    assert example.main(["--migrations", "1", *SMALL, "--save-stream", str(stream)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: --save-stream: {stream} exists; give --force to replace it\n"
    assert captured.out == "" and stream.read_bytes() == b"keep me"
    assert example.main(["--migrations", "1", *SMALL, "--save-stream", str(stream), "--force", "--json"]) == 0
    capsys.readouterr()
    assert dump_stream_json(stream.read_bytes())["device_type"] == "nvme"


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "no-such-device"], "error: unknown device type 'no-such-device'"),
    (["--migrations", "0"], "error: --migrations must be >= 1, not 0"),
    (["--qd", "0"], "error: --qd must be >= 1, not 0"),
    (["--force"], "error: --force only goes with --save-stream"),
    (["--save-stream", "/no/such/dir/x.bin"], "error: --save-stream: directory /no/such/dir does not exist"),
    (["--max-downtime-ms", "-1"], "error: --max-downtime-ms must be > 0"),
    (["--qd", "5000"], "error: plugin 'nvme' failed in pcidev_migration_workload: the NVMe workload's qd must be"),
    (["--queues", "5000"], "error: device process"),
    (["--ns-size", "lots"], "error: --ns-size: "),
    (["--ns-size", "1000"], "error: --ns-size must be a positive multiple of 4 KiB, not 1000"),
    (["--ns-size", "64K"],
     "error: plugin 'nvme' failed in pcidev_migration_workload: a 65536-byte namespace is too small"),
])
def test_errors_are_one_line_and_status_1(capsys, argv, message):
    assert example.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err


def _out(*summaries):
    return {"migrations": len(summaries), "per_migration": [{"summary": s} for s in summaries],
            "cq_full_stops": sum(s.get("cqs_full", 0) > 0 for s in summaries),
            "aer_stops": sum(s.get("aers_outstanding", 0) > 0 for s in summaries)}


def test_a_run_without_the_stops_the_issue_asks_for_fails():
    none = {"cqs_full": 0, "cq_backlog": 0, "aers_outstanding": 0}
    full = {"cqs_full": 1, "cq_backlog": 3, "aers_outstanding": 4}
    assert example.missing_stops(_out(none, none)) == \
        "no migration stopped the device with a full CQ or AERs outstanding"
    assert example.missing_stops(_out(dict(none, aers_outstanding=4), dict(none, aers_outstanding=4))) == \
        "no migration stopped the device with a full CQ"
    assert example.missing_stops(_out(dict(none, aers_outstanding=4), full)) is None
    assert example.missing_stops(_out(dict(none, aers_outstanding=4))) is None  # one migration: no hold yet
    assert example.missing_stops(_out({}, {})) is None  # a device that reports nothing (edu)


def test_where_the_downtime_went_and_a_file_namespace_alone(capsys):
    assert example.main(["--migrations", "2", *SMALL, "--ns-kind", "file", "--ns-size", "2M", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["error"] is None and out["mismatches"] == 0 and out["lost_completions"] == 0
    assert (out["ns_kind"], out["ns_size"]) == ("file", 2 << 20)
    assert out["workload"]["blocks_checked"] == 4096  # one 2 MiB namespace of 512-byte blocks
    assert list(out["breakdown_ms_median"]) == list(example.PHASES)
    for m in out["per_migration"]:
        parts = m["breakdown_ms"]
        assert set(parts) == set(example.PHASES)
        assert m["summary"]["quiesce_drain_us"] >= 0 and m["summary"]["quiesce_flush_us"] >= 0
        assert parts["drain"] == pytest.approx(m["summary"]["quiesce_drain_us"] / 1e3, abs=1e-6)
        # the steps add up to the host's pause, and from the drain to the resume to the downtime
        assert sum(parts.values()) == pytest.approx(m["host_pause_ms"], abs=0.01)
        stop = sum(v for k, v in parts.items() if k not in ("hold", "follow"))
        assert stop == pytest.approx(m["downtime_ms"], abs=0.01)
        assert m["precopy"] is None and m["precopy_seconds"] > 0  # a first phase over UNIX, nothing to copy
    assert out["precopy_iterations_median"] is None and out["total_seconds_median"] > 0


def test_a_mem_namespace_over_tcp_is_precopied_and_the_table_says_so(capsys):
    assert example.main(["--migrations", "2", *SMALL, "--tcp", "--ns-kind", "mem", "--ns-size", "8M"]) == 0
    out = capsys.readouterr().out
    assert "pre-copy: passes / copied / rest" in out and "where the time went (median ms)" in out
    assert "migration total (median / max)" in out
    assert example.main(["--migrations", "2", *SMALL, "--tcp", "--ns-kind", "mem", "--ns-size", "8M",
                         "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["error"] is None and got["mismatches"] == 0 and got["transport"] == "tcp" and got["fds"] == 0
    assert got["workload"]["blocks_checked"] == 16384
    assert got["precopy_iterations_median"] >= 1 and got["precopy_bytes_median"] > 0
    assert got["precopy_seconds_median"] > 0 and got["total_seconds_median"] >= got["precopy_seconds_median"]
    for m in got["per_migration"]:
        assert m["precopy"]["iterations"] >= 1 and sum(m["precopy"]["bytes_per_iteration"]) > 0
        assert m["breakdown_ms"]["remainder"] == pytest.approx(m["precopy"]["finish_seconds"] * 1e3)


def test_the_breakdown_of_one_report():
    report = {"held_at": 10.0, "host_pause": 0.010, "running_at": 10.008, "same_clock": True,
              "phases": {"stopped": 10.001, "quiesced": 10.003, "saved": 10.0045, "sent": 10.005,
                         "acked": 10.0075, "received": 10.0052, "loaded": 10.007},
              "summary": {"quiesce_drain_us": 500, "quiesce_flush_us": 1000},
              "precopy": {"finish_seconds": 0.0005}}
    got = example.breakdown(report)
    want = {"hold": 1.0, "drain": 0.5, "flush": 1.0, "quiesce_other": 0.5, "remainder": 0.5, "save": 1.0,
            "send": 0.5, "receive": 0.2, "load": 1.8, "ack_resume": 1.0, "follow": 2.0}
    assert got is not None and got.keys() == want.keys()
    assert all(got[k] == pytest.approx(v) for k, v in want.items()), got
    assert example.breakdown({**report, "same_clock": False}) is None  # the destination's clock is another
    assert example.breakdown({k: v for k, v in report.items() if k != "phases"}) is None  # an older source
