"""Socket addresses of pcidev transports: ``unix:PATH`` (or a bare path) and
``tcp:HOST:PORT``.

UNIX sockets carry file descriptors (``SCM_RIGHTS``); TCP sockets do not, which a
protocol running over them must take into account (docs/migration.md).
"""

from __future__ import annotations

import os
import socket
import stat
import time

import attrs

from pcidev.errors import TransportError

__all__ = ["Address", "parse_address", "connect", "listen"]


@attrs.frozen
class Address:
    """A parsed transport address.

    :ivar kind: ``"unix"`` or ``"tcp"``.
    :ivar path: the socket path (UNIX).
    :ivar host: host name or IP (TCP).
    :ivar port: port number (TCP; 0 when listening means "any free port").
    """

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"

    @property
    def carries_fds(self) -> bool:
        """Whether file descriptors can travel over this kind of socket."""
        return self.kind == "unix"


def parse_address(text: str | Address) -> Address:
    """Parse ``unix:PATH``, ``PATH`` (containing no ``:`` prefix) or ``tcp:HOST:PORT``.

    :raises TransportError: on anything else.
    """
    if isinstance(text, Address):
        return text
    if not isinstance(text, str) or not text:
        raise TransportError(f"bad transport address {text!r}")
    if text.startswith("tcp:"):
        host, sep, port = text[4:].rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise TransportError(f"bad TCP address {text!r} (expected tcp:HOST:PORT)")
        return Address("tcp", host=host.strip("[]"), port=int(port))
    path = text[5:] if text.startswith("unix:") else text
    if not path or "\0" in path:
        raise TransportError(f"bad UNIX socket address {text!r}")
    return Address("unix", path=path)


def connect(address: str | Address, *, timeout: float = 5.0) -> socket.socket:
    """Connect to ``address``, retrying until ``timeout`` while nobody listens yet
    (a freshly started server process).

    :returns: a connected, blocking stream socket.
    :raises TransportError: nobody accepted within ``timeout``.
    """
    addr = parse_address(address)
    deadline = time.monotonic() + timeout
    last: OSError | None = None
    while True:
        if addr.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[str, int] = addr.path
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            target = (addr.host, addr.port)
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            sock.connect(target)
            sock.settimeout(None)
            if addr.kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            last = exc
        except OSError as exc:
            sock.close()
            raise TransportError(f"cannot connect to {addr}: {exc}") from exc
        if time.monotonic() >= deadline:
            raise TransportError(f"cannot connect to {addr}: {last}")
        time.sleep(0.01)


def listen(address: str | Address, *, backlog: int = 8) -> tuple[socket.socket, Address]:
    """Listen on ``address`` (a stale UNIX socket file is replaced).

    :returns: the listening socket and the actual address (the port chosen for
        ``tcp:HOST:0``).
    :raises TransportError: the address cannot be bound.
    """
    addr = parse_address(address)
    try:
        if addr.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(addr.path):
                    if stat.S_ISSOCK(os.stat(addr.path).st_mode):
                        os.unlink(addr.path)
                sock.bind(addr.path)
            except OSError:
                sock.close()
                raise
        else:
            family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((addr.host, addr.port))
            except OSError:
                sock.close()
                raise
            addr = Address("tcp", host=addr.host, port=sock.getsockname()[1])
        sock.listen(backlog)
        return sock, addr
    except OSError as exc:
        raise TransportError(f"cannot listen on {addr}: {exc}") from exc
