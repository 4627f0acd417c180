"""Helpers of the how-to tests (docs/howto/): waiting for ``pcidev serve`` to listen."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def listening(path: Path) -> bool:
    """Whether a UNIX socket is listening at ``path``: pcidev's listeners listen before
    their file appears (:func:`pcidev.transport.address.listen_unix`), so its presence is
    the signal a script waits for, as the how-tos' own scripts do."""
    return path.is_socket()


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
