"""The plugin's example scripts run as documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_migrate_blk_runs_and_verifies() -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / "migrate_blk.py"), "--migrations", "2", "--steps", "30"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 migrations: downtime median" in out.stdout and "0 CRC-32C mismatches" in out.stdout
