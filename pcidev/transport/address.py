"""Socket addresses of pcidev transports: ``unix:PATH`` (or a bare path) and
``tcp:HOST:PORT``.

UNIX sockets carry file descriptors (``SCM_RIGHTS``); TCP sockets do not, which a
protocol running over them must take into account (docs/migration.md).
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import stat
import time

import attrs

from pcidev.errors import TransportError

__all__ = ["MAX_UNIX_PATH", "Address", "Listener", "SocketFile", "connect", "listen", "listen_unix", "parse_address"]


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


@attrs.frozen
class SocketFile:
    """The file-system entry of a UNIX socket this process bound: its path, device
    and inode, so that only that entry is ever removed (another server may have
    replaced it since).

    :ivar path: the socket path.
    :ivar dev: ``st_dev`` of the entry right after the bind.
    :ivar ino: ``st_ino`` of the entry right after the bind.
    """

    path: str
    dev: int
    ino: int

    def remove(self) -> None:
        """Remove the entry if it is still the socket this process bound."""
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino) and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
        except OSError:
            pass


@attrs.define
class Listener:
    """A listening socket and what it owns.

    :ivar sock: the listening socket.
    :ivar address: the address it listens on (the chosen port for ``tcp:HOST:0``).
    :ivar file: the socket file it bound (UNIX), removed by :meth:`close`.
    """

    sock: socket.socket
    address: Address
    file: SocketFile | None = None

    def close(self) -> None:
        """Close the socket and remove its socket file if it is still ours."""
        self.sock.close()
        if self.file is not None:
            self.file.remove()

    def detach(self) -> None:
        """Close this process's copy of the socket but leave its socket file: another
        process (a handover's new one) listens on the same socket now."""
        self.sock.close()
        self.file = None


def _someone_listens(path: str, what: str) -> bool:
    """Whether a server listens on the UNIX socket ``path`` (connect to find out).

    :raises TransportError: the socket may not be connected to (permissions).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise TransportError(f"{what} {path}: cannot check whether a server listens "
                                 f"on it: {exc.strerror}") from None
        return True  # EAGAIN (backlog full), a timeout...: somebody is there
    else:
        return True
    finally:
        probe.close()


def _remove_stale(path: str, what: str) -> None:
    """Remove the socket file at ``path`` if nobody listens on it; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise TransportError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a regular file" if stat.S_ISREG(st.st_mode)
                else "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket")
        raise TransportError(f"{what} {path}: the path exists and is {kind}; "
                             "refusing to replace it (choose another path or remove it)")
    if _someone_listens(path, what):
        raise TransportError(f"{what} {path}: another server is listening on it")
    try:
        again = os.lstat(path)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            raise TransportError(f"{what} {path}: the path changed while it was being checked; not replaced")
        os.unlink(path)  # a stale socket: its server is gone
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TransportError(f"{what} {path}: cannot remove the stale socket: {exc.strerror or exc}") from None


#: longest UNIX socket path a client can connect to (``sun_path`` holds 108 bytes with its NUL)
MAX_UNIX_PATH = 107


def _hidden_name(directory: str, base: str) -> str | None:
    """A fresh hidden name in ``directory`` that fits a socket address: named after the
    final one where it fits (what ``ss -x`` and /proc/net/unix show), else shorter;
    None when not even a short one fits (the final path is then within a few bytes of
    the limit)."""
    for name in (f".{base}.{secrets.token_hex(4)}", f".{secrets.token_hex(4)}", f".{secrets.token_hex(1)}"):
        hidden = os.path.join(directory, name)
        if len(os.fsencode(hidden)) <= MAX_UNIX_PATH:
            return hidden
    return None


def _bind_hidden(directory: str, path: str, what: str) -> tuple[socket.socket, str] | None:
    """A socket bound to a fresh hidden name in ``directory`` (where ``path`` will be),
    or None when no hidden name fits a socket address there."""
    base = os.path.basename(path)
    for _ in range(64):
        hidden = _hidden_name(directory, base)
        if hidden is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(hidden)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                continue  # that name is taken: draw another
            raise TransportError(f"{what} {path}: cannot listen there: {exc.strerror or exc}") from None
        return sock, hidden
    raise TransportError(f"{what} {path}: cannot find a free temporary name in {directory}")


def _listen_in_place(path: str, backlog: int, what: str, mode: int | None = None) -> Listener:
    """Bind at ``path`` itself, then listen (a client connecting in between is refused):
    for a path so close to the address limit that no hidden name fits beside it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise TransportError(f"{what} {path}: cannot listen there: {exc.strerror or exc}") from None
            _remove_stale(path, what)
            try:
                sock.bind(path)
            except OSError as exc2:
                raise TransportError(f"{what} {path}: cannot listen there: {exc2.strerror or exc2}") from None
        if mode is not None:
            os.chmod(path, mode)
        st = os.lstat(path)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, Address("unix", path=path), SocketFile(path, st.st_dev, st.st_ino))


def listen_unix(path: str, *, backlog: int = 8, what: str = "socket", mode: int | None = None) -> Listener:
    """Listen on the UNIX socket ``path``, replacing only a stale socket.

    The socket listens *before* it appears at ``path``: it is bound to a hidden name
    in the same directory (``.NAME.XXXXXXXX``, which is the name ``ss -x`` and
    ``/proc/net/unix`` show), listens, and is then hard-linked to ``path`` (a link
    never replaces an entry) and the hidden name removed. So a client that waits for the
    file to appear and connects at once is never refused. (A path within two or three
    bytes of the address limit leaves no room for a hidden name: it is bound in place
    and listens right after, as plain servers do.) Only when something is
    already at ``path`` is it looked at: a socket nobody listens on (its server died)
    is removed and the link retried; anything else (a regular file, a directory, a
    symbolic link, a socket another server listens on) is left alone and refused.
    :meth:`Listener.close` removes the socket file only if it is still the one bound
    here.

    :param path: the socket path.
    :param backlog: the listen backlog.
    :param what: how error messages name the socket (``vfio-user socket``...).
    :param mode: permissions of the socket file (e.g. ``0o600``: only its owner may
        connect), set before the file appears at ``path``.
    :returns: the listener.
    :raises TransportError: one line naming the cause (something else at ``path``,
        a read-only or missing directory, a path too long...).
    """
    if not path or "\0" in path:
        raise TransportError(f"{what} {path!r}: not a usable socket path")
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise TransportError(f"{what} {path}: the path is longer than the {MAX_UNIX_PATH} bytes "
                             "a UNIX socket address holds; choose a shorter one")
    directory = os.path.dirname(path) or "."
    bound = _bind_hidden(directory, path, what)
    if bound is None:
        return _listen_in_place(path, backlog, what, mode)
    sock, hidden = bound
    try:
        if mode is not None:
            os.chmod(hidden, mode)
        sock.listen(backlog)
        try:
            os.link(hidden, path)
        except FileExistsError:
            _remove_stale(path, what)
            try:
                os.link(hidden, path)
            except OSError as exc:
                raise TransportError(f"{what} {path}: cannot listen there: {exc.strerror or exc}") from None
        except OSError as exc:
            raise TransportError(f"{what} {path}: cannot listen there: {exc.strerror or exc}") from None
        st = os.lstat(path)
    except BaseException:
        sock.close()
        raise
    finally:
        try:
            os.unlink(hidden)
        except OSError:
            pass
    return Listener(sock, Address("unix", path=path), SocketFile(path, st.st_dev, st.st_ino))


def listen(address: str | Address, *, backlog: int = 8) -> Listener:
    """Listen on ``address`` (for UNIX sockets see :func:`listen_unix`: only a stale
    socket file is replaced).

    :returns: the listener (its address has the port chosen for ``tcp:HOST:0``).
    :raises TransportError: the address cannot be bound.
    """
    addr = parse_address(address)
    if addr.kind == "unix":
        return listen_unix(addr.path, backlog=backlog)
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"cannot listen on {addr}: {exc}") from exc
    return Listener(sock, Address("tcp", host=addr.host, port=sock.getsockname()[1]))
