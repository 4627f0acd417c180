"""examples/bench_device_migration.py keeps working (a smoke run; the timing is not tested)."""

from __future__ import annotations

import json
import runpy
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
