"""Helpers of the how-to tests (docs/howto/): waiting for ``pcidev serve`` to listen."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

#: ``__SO_ACCEPTCON`` in the flags column of /proc/net/unix: the socket listens.
_ACCEPTCON = 0x10000


def listening(path: Path) -> bool:
    """Whether a UNIX socket is *listening* at ``path`` (its file appears at ``bind``, before
    ``listen``: a client connecting in between is refused)."""
    with open("/proc/net/unix", encoding="utf-8") as table:
        next(table)
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & _ACCEPTCON:
                return True
    return False


@pytest.fixture
def wait_listening() -> Callable[[Path, subprocess.Popen[str] | subprocess.Popen[bytes]], None]:
    """``wait_listening(path, server)``: wait up to 30 s until ``server`` listens at ``path``."""
    def wait(path: Path, server: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + 30
        while not listening(path):
            assert server.poll() is None, f"the server exited with status {server.returncode}"
            assert time.monotonic() < deadline, f"nothing listens at {path}"
            time.sleep(0.05)
    return wait
