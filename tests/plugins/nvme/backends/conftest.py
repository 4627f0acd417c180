"""Fixtures of the NBD backend tests: the Debian packages (installed by ``setup_nbd.sh``
when missing and we are root, as CI is), and NBD servers (qemu-nbd, nbdkit) listening on
UNIX sockets in the test's tmp directory, stopped when the test ends."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nbd_servers import NbdServer, ensure_tools


@pytest.fixture(scope="session")
def nbd_tools() -> None:
    """The Python bindings of libnbd, nbdkit, qemu-nbd, qemu-storage-daemon and psktool:
    installed when missing (root), else skip."""
    why = ensure_tools()
    if why is not None:
        if os.geteuid() != 0:
            pytest.skip(why)
        pytest.fail(why, pytrace=False)


@pytest.fixture
def nbd_server(nbd_tools: None, tmp_path: Path) -> Iterator[Callable[..., NbdServer]]:
    """``nbd_server("qemu", size=8 << 20, readonly=False, export="exp")`` (qemu-nbd on a raw
    image), ``nbd_server("qsd", ...)`` (qemu-storage-daemon exporting a raw image),
    ``nbd_server("nbdkit-file", size=...)`` (nbdkit's file plugin on an image) or
    ``nbd_server("nbdkit", size=..., extra=("--filter=delay",), params=("rdelay=1",))``
    (nbdkit's memory plugin; ``extra``: options before the plugin, ``params``: after it):
    a running server."""
    servers: list[NbdServer] = []

    def make(kind: str, *, size: int = 8 << 20, readonly: bool = False, export: str = "exp",
             extra: tuple[str, ...] = (), params: tuple[str, ...] = ()) -> NbdServer:
        n = len(servers)
        sock = tmp_path / f"nbd{n}.sock"
        image = None
        if kind == "qemu":
            image = tmp_path / f"nbd{n}.img"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(size)
            argv = ["qemu-nbd", "-t", "-k", str(sock), "-f", "raw", "-x", export, "--cache=writeback",
                    "--discard=unmap", *(["--read-only"] if readonly else []), *extra, str(image)]
        elif kind == "qsd":  # (many clients; the image is argv[-1]'s filename= too)
            image = tmp_path / f"nbd{n}.img"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(size)
            argv = ["qemu-storage-daemon",
                    "--blockdev", f"driver=file,node-name=file0,filename={image},discard=unmap",
                    "--blockdev", "driver=raw,node-name=disk0,file=file0,discard=unmap",
                    "--nbd-server", f"addr.type=unix,addr.path={sock}",
                    "--export", f"type=nbd,id=exp0,node-name=disk0,name={export},"
                                f"writable={'off' if readonly else 'on'}", *extra]
        elif kind == "nbdkit-file":  # (multi-conn, and the data outlives the process)
            image = tmp_path / f"nbd{n}.img"
            if not image.exists():
                with open(image, "wb") as f:
                    f.truncate(size)
            argv = ["nbdkit", "-f", "-U", str(sock), *(["-r"] if readonly else []), *extra, "file", str(image),
                    *params]
            export = ""
        elif kind == "nbdkit":
            argv = ["nbdkit", "-f", "-U", str(sock), *(["-r"] if readonly else []), *extra,
                    "memory", str(size), *params]
            export = ""
        else:
            raise ValueError(kind)
        server = NbdServer(argv, sock, export, image)
        servers.append(server)
        return server

    yield make
    for s in reversed(servers):
        s.kill()
