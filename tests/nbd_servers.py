"""NBD server processes for the tests: the backend tests (``conftest.nbd_server`` in
tests/plugins/nvme/backends makes them) and the VM tier's NBD test; and the Debian packages
they need (:func:`ensure_tools`).

Imported as ``from nbd_servers import ...`` (``tests/`` is on ``sys.path``: the root
``conftest.py`` lives there).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

#: installs the Debian packages (python3-libnbd, nbdkit, qemu-utils, qemu-system-common, gnutls-bin)
SETUP = Path(__file__).parent / "plugins" / "nvme" / "backends" / "setup_nbd.sh"
DIST = "/usr/lib/python3/dist-packages/nbd.py"


def tools_present() -> bool:
    """The Python bindings of libnbd, nbdkit, qemu-nbd, qemu-storage-daemon, psktool and certtool are installed."""
    tools = ("nbdkit", "qemu-nbd", "qemu-storage-daemon", "psktool", "certtool")
    return os.path.exists(DIST) and all(shutil.which(tool) is not None for tool in tools)


def ensure_tools() -> str | None:
    """Install the NBD tools when missing and we are root (as CI is). Returns None when they
    are present, else why not (a reason to skip when not root, or the set-up's failure)."""
    if tools_present():
        return None
    if os.geteuid() != 0:
        return ("the NBD tests need python3-libnbd, nbdkit, qemu-utils, qemu-system-common and gnutls-bin "
                f"(root installs them: {SETUP.relative_to(Path(__file__).parent.parent)})")
    run = subprocess.run(["sh", str(SETUP)], capture_output=True, text=True, timeout=900, check=False)
    if run.returncode != 0 or not tools_present():
        return f"setup_nbd.sh failed ({run.returncode}): {run.stderr[-2000:]}"
    return None


class NbdServer:
    """One NBD server process on a UNIX socket (``uri``); :meth:`restart` starts it again on
    the same socket, :meth:`kill` stops it at once. ``image``: the file it serves, if any."""

    def __init__(self, argv: list[str], sock: Path, export: str = "", image: Path | None = None) -> None:
        self.argv, self.sock, self.export, self.image = argv, sock, export, image
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self._listening():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"{self.argv[0]} exited with {self.proc.returncode}: {err}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.argv[0]} did not create {self.sock}")
            time.sleep(0.02)

    def _listening(self) -> bool:
        """The socket accepts connections (it exists a moment before the server listens)."""
        if not self.sock.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(self.sock))
            except OSError:
                return False
        return True

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def restart(self) -> None:
        self.kill()
        self.start()
