"""Sending and receiving file descriptors over UNIX stream sockets (``SCM_RIGHTS``).

Every pcidev socket protocol (the device link, the migration channel, later
vfio-user) frames its messages with a fixed-size header and sends the
descriptors a message carries *with the header*: on a stream socket the kernel
attaches ancillary data to the first byte of a ``sendmsg``, so reading exactly one
header with :func:`recv_exact` returns exactly that message's descriptors.

Why not :func:`socket.recv_fds`: it ignores its ``flags`` (so received fds are
inheritable: ``MSG_CMSG_CLOEXEC`` cannot be passed) and silently drops the
descriptors beyond ``maxfds`` (python/cpython#128881). :func:`recv_exact` calls
``recvmsg`` with ``MSG_CMSG_CLOEXEC``, treats ``MSG_CTRUNC`` as a protocol error,
closes every descriptor it received before raising, and never returns more than
``max_fds``.

Linux accepts at most :data:`SCM_MAX_FD` (253) descriptors per message; callers
send more in batches.
"""

from __future__ import annotations

import array
import os
import resource
import socket
import sys
import time
from collections.abc import Iterable, Sequence

from pcidev.errors import TransportError

__all__ = ["SCM_MAX_FD", "TooManyFds", "close_fds", "fd_headroom", "recv_exact", "recv_some", "send_all",
           "send_buffers", "is_unix"]


class TooManyFds(TransportError):
    """:func:`recv_some` received more descriptors than allowed (all closed); the bytes
    of the read are in the buffer all the same.

    :param message: what happened.
    :param nbytes: bytes the read delivered.
    """

    def __init__(self, message: str, nbytes: int) -> None:
        super().__init__(message)
        self.nbytes = nbytes

#: Linux's limit on descriptors in one ``SCM_RIGHTS`` message (include/net/scm.h).
SCM_MAX_FD = 253
_INT_SIZE = array.array("i").itemsize
# plain ints: an ``enum.IntFlag`` operation costs more than the rest of a small read
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_CLOEXEC_DONTWAIT = int(socket.MSG_CMSG_CLOEXEC) | int(socket.MSG_DONTWAIT)
_CTRUNC = int(socket.MSG_CTRUNC)
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd in ``fds``, ignoring errors (cleanup paths)."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def fd_headroom() -> int:
    """How many more descriptors this process may open now: the soft ``RLIMIT_NOFILE``
    less the descriptors open (counted in ``/proc/self/fd``; without it, the limit alone).

    A peer that announces more descriptors than this would make a receive fail half-way
    (the kernel truncates the ``SCM_RIGHTS`` message: ``MSG_CTRUNC``); a receiver refuses
    such an announcement before it receives anything.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    try:
        used = len(os.listdir("/proc/self/fd")) - 1  # (less the listing's own descriptor)
    except OSError:
        used = 0
    return max(0, soft - used)


def is_unix(sock: socket.socket) -> bool:
    """Whether ``sock`` is an ``AF_UNIX`` socket (the only kind that carries fds)."""
    return sock.family == socket.AF_UNIX


def send_all(sock: socket.socket, data: bytes, fds: Sequence[int] = (), *, deadline: float | None = None) -> None:
    """Send ``data`` completely, with ``fds`` attached to its first byte (:func:`send_buffers`
    of one buffer).

    :param sock: a connected stream socket (``AF_UNIX`` if ``fds`` is not empty).
    :param data: the bytes to send (non-empty if ``fds`` is not empty).
    :param fds: descriptors to pass; the caller keeps its own copies.
    :param deadline: ``CLOCK_MONOTONIC`` time by which all of ``data`` must have gone out
        (None: only the socket's own timeout, which applies to each ``send``): a peer that
        reads a byte at a time, or stops reading, cannot stretch the send past it.
    :raises TransportError: more than :data:`SCM_MAX_FD` fds, fds on a socket that
        cannot carry them, the peer went away, or the send timed out (the deadline passed).
    """
    send_buffers(sock, (data,), fds, deadline=deadline)


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | bytearray | memoryview], fds: Sequence[int] = (),
                 *, deadline: float | None = None) -> None:
    """Send ``buffers`` one after the other, completely, without joining them (one
    ``sendmsg`` of all of them at a time: a large buffer is not copied), with ``fds``
    attached to the first byte. Every send of pcidev's socket protocols goes through here,
    so the deadline is kept in one place.

    :param sock: a connected stream socket (``AF_UNIX`` if ``fds`` is not empty).
    :param buffers: the bytes to send, in order (empty ones are skipped; not all empty if
        ``fds`` is not).
    :param fds: descriptors to pass; the caller keeps its own copies.
    :param deadline: ``CLOCK_MONOTONIC`` time by which every byte must have gone out
        (None: only the socket's own timeout, which applies to each ``sendmsg``): each send
        waits at most what is left of it (and at most the socket's timeout), so a peer that
        reads a byte at a time, or stops reading, cannot stretch the whole past it. The
        socket's timeout is restored afterwards.
    :raises TransportError: more than :data:`SCM_MAX_FD` fds, fds on a socket that
        cannot carry them, the peer went away, or the send timed out (the deadline passed).
    """
    views: list[memoryview] = []
    total = 0
    for b in buffers:
        v = memoryview(b)
        if v.nbytes:
            views.append(v if v.format == "B" and v.ndim == 1 else v.cast("B"))
            total += v.nbytes
    left = total
    per = sock.gettimeout() if deadline is not None else None
    anc = None
    try:
        if fds:
            if len(fds) > SCM_MAX_FD:
                raise TransportError(f"{len(fds)} fds in one message (at most {SCM_MAX_FD})")
            if not is_unix(sock):
                raise TransportError("file descriptors can only be passed over a UNIX socket")
            if not views:
                raise TransportError("file descriptors need at least one byte of data")
            anc = [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]
        while views:
            if deadline is not None:  # the socket's timeout, cut to what is left of the deadline
                rest = deadline - time.monotonic()
                if rest <= 0.005:  # (a timeout set to end at it may fire a hair early)
                    raise TimeoutError
                sock.settimeout(rest if per is None or per == 0 else min(per, rest))
            if anc is not None:
                n = sock.sendmsg(views, anc)
                anc = None
            elif len(views) == 1:
                n = sock.send(views[0])
            else:
                n = sock.sendmsg(views)
            left -= n
            while views and n >= views[0].nbytes:  # drop what went out from the front
                n -= views.pop(0).nbytes
            if n:
                views[0] = views[0][n:]
    except TransportError:
        raise
    except TimeoutError as exc:
        if deadline is not None and time.monotonic() >= deadline - 0.005:
            raise TransportError(f"the peer did not take the data in time (overall deadline; "
                                 f"{total - left} of {total} bytes sent)") from exc
        raise TransportError(f"send timed out ({total - left} of {total} bytes sent)") from exc
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise TransportError(f"send failed: peer closed the connection ({exc})") from exc
    except (OSError, ValueError) as exc:
        raise TransportError(f"send failed: {exc}") from exc
    finally:
        if deadline is not None:
            try:
                sock.settimeout(per)
            except OSError:
                pass


def _take_fds(ancdata: list[tuple[int, int, bytes]], out: list[int]) -> bool:
    """Collect SCM_RIGHTS fds from ``ancdata`` into ``out``; False on anything else."""
    ok = True
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            usable = len(payload) - len(payload) % _INT_SIZE
            out.extend(array.array("i", payload[:usable]))
        else:
            ok = False
    return ok


def recv_exact(sock: socket.socket, n: int, *, max_fds: int = 0,
               eof_ok: bool = False, deadline: float | None = None) -> tuple[bytes, list[int]]:
    """Receive exactly ``n`` bytes and the descriptors sent with them.

    :param sock: a connected stream socket.
    :param n: bytes to read (> 0).
    :param max_fds: most descriptors accepted with these bytes; more is a
        protocol error (0: none expected).
    :param eof_ok: return ``(b"", [])`` if the peer closed before the first byte
        (a clean end between messages) instead of raising.
    :param deadline: ``CLOCK_MONOTONIC`` time by which all ``n`` bytes must have come
        (None: only the socket's own timeout, which applies to each read): a peer that
        trickles a message byte by byte cannot stretch it past this.
    :returns: ``(data, fds)``; the caller owns the fds (close-on-exec).
    :raises TransportError: the peer closed mid-message, sent more fds than
        allowed (``MSG_CTRUNC`` or over ``max_fds``), sent non-fd ancillary data,
        or the socket failed (including a timeout). Received fds are closed first.
    """
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    fds: list[int] = []
    space = socket.CMSG_SPACE(max(max_fds, 1) * _INT_SIZE)
    unix = is_unix(sock)
    per = sock.gettimeout()
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0.005:  # (a timeout set to end at it may fire a hair early)
                    raise TransportError(f"the peer did not finish in time (overall deadline; "
                                         f"{got} of {n} bytes read)")
                sock.settimeout(left if per is None else min(per, left))
            try:
                if unix:
                    nbytes, anc, flags, _ = sock.recvmsg_into([view[got:]], space, _CLOEXEC)
                    clean = not anc or _take_fds(anc, fds)
                    if flags & _CTRUNC:
                        raise TransportError(
                            f"peer sent more file descriptors than the {max_fds} this message may carry")
                    if not clean:
                        raise TransportError("peer sent unexpected ancillary data")
                    if len(fds) > max_fds:
                        raise TransportError(
                            f"peer sent {len(fds)} file descriptors; this message may carry {max_fds}")
                else:
                    nbytes = sock.recv_into(view[got:])
            except TransportError:
                raise
            except TimeoutError as exc:
                if deadline is not None and time.monotonic() >= deadline - 0.005:
                    raise TransportError(f"the peer did not finish in time (overall deadline; "
                                         f"{got} of {n} bytes read)") from exc
                raise TransportError(f"timed out waiting for the peer ({got} of {n} bytes read)") from exc
            except ConnectionResetError as exc:
                raise TransportError(f"peer closed the connection abruptly ({got} of {n} bytes read)") from exc
            except OSError as exc:
                raise TransportError(f"receive failed: {exc}") from exc
            if nbytes == 0:
                if got == 0 and eof_ok and not fds:
                    return b"", []
                raise TransportError(f"peer closed the connection ({got} of {n} bytes read)")
            got += nbytes
    except BaseException:
        close_fds(fds)
        raise
    finally:
        if deadline is not None:
            sock.settimeout(per)
    return bytes(buf), fds


def recv_some(sock: socket.socket, view: memoryview, *, max_fds: int, block: bool = False) -> tuple[int, list[int]]:
    """One ``recvmsg`` into ``view``: whatever the socket holds, up to ``len(view)`` bytes.

    Linux ends such a read after a segment that carried descriptors, so the fds
    returned belong to the bytes of the last ``sendmsg`` that started in this read
    (see :class:`pcidev.transport.vfio_user.reader.MessageReader`).

    :param sock: a connected ``AF_UNIX`` stream socket.
    :param view: where the bytes go (not empty).
    :param max_fds: most descriptors accepted with one read (more is a protocol error).
    :param block: wait for data (without it the read uses ``MSG_DONTWAIT``).
    :returns: ``(nbytes, fds)``: ``nbytes`` is 0 at end of stream, -1 when nothing was
        waiting (non-blocking only); the caller owns the fds (close-on-exec).
    :raises TooManyFds: too many fds (``MSG_CTRUNC`` or over ``max_fds``): the bytes were
        read all the same (its ``nbytes``).
    :raises TransportError: non-fd ancillary data, or the socket failed. Received fds
        are closed first.
    """
    try:
        nbytes, anc, flags, _ = sock.recvmsg_into((view,), socket.CMSG_SPACE(max(max_fds, 1) * _INT_SIZE),
                                                  _CLOEXEC if block else _CLOEXEC_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return -1, []
    except TimeoutError as exc:
        raise TransportError("timed out waiting for the peer") from exc
    except ConnectionResetError as exc:
        raise TransportError("peer closed the connection abruptly") from exc
    except OSError as exc:
        raise TransportError(f"receive failed: {exc}") from exc
    if not anc and not flags & _CTRUNC:
        return nbytes, []
    fds: list[int] = []
    clean = _take_fds(anc, fds)
    if flags & _CTRUNC or len(fds) > max_fds:
        close_fds(fds)
        raise TooManyFds(f"peer sent more file descriptors than the {max_fds} one message may carry", nbytes)
    if not clean:
        close_fds(fds)
        raise TransportError("peer sent unexpected ancillary data")
    return nbytes, fds
