"""examples/howto/drive_served.py (docs/howto/qemu.md): the commands that check a served
NVMe controller from Python before a guest boots."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "examples" / "howto" / "drive_served.py"


def test_the_published_commands(tmp_path: Path, wait_listening: Callable[..., None]) -> None:
    sock = tmp_path / "pcidev-nvme0.sock"
    pcidev = Path(sys.executable).with_name("pcidev")  # .venv/bin/pcidev
    server = subprocess.Popen([str(pcidev), "serve", "--once", "--vfio-user", str(sock),
                               "nvme,ns=mem:size=64M"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listening(sock, server)
        out = subprocess.run([sys.executable, str(SCRIPT), str(sock)], capture_output=True, text=True,
                             timeout=120, check=True).stdout
        assert out == "pcidev NVMe Ctrl: wrote 4096 bytes and read back 4096 bytes, the same\n"
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)
