"""NBD server processes for the backend tests (``conftest.nbd_server`` makes them)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


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
