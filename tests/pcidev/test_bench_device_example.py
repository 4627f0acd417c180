"""examples/bench_device_migration.py keeps working (a smoke run; the timing is not tested)."""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "bench_device_migration.py"


def test_device_benchmark_script_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--runs", "2", "--json"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    result = json.loads(capsys.readouterr().out)
    assert (result["queues"], result["requests"]) == (64, 1000)
    assert result["stream_bytes"] < 256 * 1024
    assert result["fds"] == 1 + 65 + 1  # guest RAM, one eventfd per MSI-X vector, INTx


def test_compare_checkouts_runs_both_benchmarks_side_by_side():
    """examples/compare_checkouts.py (a smoke run of this checkout against itself: every
    figure is reported for both sides, the stream size is the same on both)."""
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "examples/compare_checkouts.py", "--before", ".", "--after", ".",
                           "--rounds", "1", "--seconds", "0.2", "--runs", "5", "--json"],
                          cwd=root, capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout)
    assert {"randread_4k_qd32_iops_per_cpu_s", "migration_save_load_ms", "migration_stream_bytes"} <= set(result)
    assert result["migration_stream_bytes"]["ratio"] == 1.0
    assert all(r["before"] > 0 and r["after"] > 0 for r in result.values())
