"""Fixtures of the NBD backend tests: the Debian packages (installed by ``setup_nbd.sh``
when missing and we are root, as CI is), and NBD servers (qemu-nbd, nbdkit) listening on
UNIX sockets in the test's tmp directory, stopped when the test ends."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SETUP = Path(__file__).with_name("setup_nbd.sh")
DIST = "/usr/lib/python3/dist-packages/nbd.py"


def _present() -> bool:
    return os.path.exists(DIST) and shutil.which("nbdkit") is not None and shutil.which("qemu-nbd") is not None


@pytest.fixture(scope="session")
def nbd_tools() -> None:
    """The Python bindings of libnbd, nbdkit and qemu-nbd: installed when missing (root), else skip."""
    if _present():
        return
    if os.geteuid() != 0:
        pytest.skip("the NBD tests need python3-libnbd, nbdkit and qemu-utils (root installs them: "
                    "tests/plugins/nvme/backends/setup_nbd.sh)")
    run = subprocess.run(["sh", str(SETUP)], capture_output=True, text=True, timeout=900, check=False)
    if run.returncode != 0 or not _present():
        pytest.fail(f"setup_nbd.sh failed ({run.returncode}): {run.stderr[-2000:]}", pytrace=False)


class NbdServer:
    """One NBD server process on a UNIX socket (``uri``); :meth:`restart` starts it again on
    the same socket, :meth:`kill` stops it at once."""

    def __init__(self, argv: list[str], sock: Path, export: str = "") -> None:
        self.argv, self.sock, self.export = argv, sock, export
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


@pytest.fixture
def nbd_server(nbd_tools: None, tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    """``nbd_server("qemu", size=8 << 20, readonly=False, export="exp")`` or
    ``nbd_server("nbdkit", size=..., extra=("--filter=delay",), params=("rdelay=1",))``
    (nbdkit's memory plugin; ``extra``: options before the plugin, ``params``: after it):
    a running server."""
    servers: list[NbdServer] = []

    def make(kind: str, *, size: int = 8 << 20, readonly: bool = False, export: str = "exp",
             extra: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> NbdServer:
        n = len(servers)
        sock = tmp_path / f"nbd{n}.sock"
        if kind == "qemu":
            image = tmp_path / f"nbd{n}.img"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(size)
            argv = ["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "-x", export, "--cache=writeback",
                    "--discard=unmap", *(["--read-only"] if readonly else []), *extra, str(image)]
        elif kind == "nbdkit":
            argv = ["nbdkit", "-f", "-U", str(sock), *(["-r"] if readonly else []), *extra,
                    "memory", str(size), *params]
            export = ""
        else:
            raise ValueError(kind)
        server = NbdServer(argv, sock, export)
        servers.append(server)
        return server

    yield make
    for s in reversed(servers):
        s.kill()
