"""examples/bench_vmstate.py keeps working (a smoke run; the timing is not tested)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "examples" / "bench_vmstate.py"


def test_benchmark_script_runs(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--runs", "2"])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    assert "64 SQ + 64 CQ, 1000 in-flight requests" in out
    size = int(out.split("stream")[1].split("bytes")[0])
    assert size < 256 * 1024
