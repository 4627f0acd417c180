"""examples/howto/migrate.sh and migrate.py (docs/howto/migrate.md): a device moved
between two processes, from the command line and from Python."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HOWTO = ROOT / "examples" / "howto"
if str(HOWTO) not in sys.path:
    sys.path.insert(0, str(HOWTO))
migrate = importlib.import_module("migrate")


def test_the_shell_script_moves_the_device() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["sh", str(HOWTO / "migrate.sh")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.fullmatch(r"moved: \d+ bytes of state and 2 fds, downtime [\d.]+ ms\n", proc.stdout), proc.stdout


def test_python_starts_the_processes_and_moves_the_device(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(HOWTO))
    report = migrate.move_between_new_processes(tmp_path)
    assert report["fds"] == 2 and isinstance(report["state_size"], int)
