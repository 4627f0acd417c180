"""SCM_RIGHTS helpers: received fds are close-on-exec, excess fds are a protocol error
that leaks nothing."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import time

import pytest
from hostile_peer import Trickler

from pcidev.errors import TransportError
from pcidev.transport.fdpass import SCM_MAX_FD, fd_headroom, recv_exact, send_all


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fds_arrive_close_on_exec_with_their_bytes():
    a, b = socket.socketpair()
    r, w = os.pipe2(0)  # inheritable on purpose
    try:
        send_all(a, b"hello world", [r])
        send_all(a, b"second")
        data, fds = recv_exact(b, 5, max_fds=1)
        assert data == b"hello" and len(fds) == 1
        assert fcntl.fcntl(fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        os.write(w, b"x")
        assert os.read(fds[0], 1) == b"x"  # the same pipe
        os.close(fds[0])
        assert recv_exact(b, 6) == (b" world", [])
        assert recv_exact(b, 6) == (b"second", [])
    finally:
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("max_fds", [0, 2])
def test_too_many_fds_are_refused_and_closed(max_fds):
    a, b = socket.socketpair()
    fds = [os.eventfd(0) for _ in range(5)]
    try:
        before = _open_fds()
        send_all(a, b"x" * 16, fds)
        with pytest.raises(TransportError, match="more file descriptors|may carry"):
            recv_exact(b, 16, max_fds=max_fds)
        assert _open_fds() == before  # nothing that arrived was kept
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


def test_eof_handling():
    a, b = socket.socketpair()
    a.close()
    assert recv_exact(b, 4, eof_ok=True) == (b"", [])
    b.close()
    a, b = socket.socketpair()
    a.sendall(b"ab")
    a.close()
    with pytest.raises(TransportError, match="2 of 4 bytes"):
        recv_exact(b, 4, eof_ok=True)
    b.close()


def test_timeout_is_a_transport_error():
    a, b = socket.socketpair()
    b.settimeout(0.05)
    with pytest.raises(TransportError, match="timed out"):
        recv_exact(b, 4)
    a.close()
    b.close()


def test_send_limits():
    a, b = socket.socketpair()
    with pytest.raises(TransportError, match="at most"):
        send_all(a, b"x", [0] * (SCM_MAX_FD + 1))
    a.close()
    b.close()
    lsock = socket.create_server(("127.0.0.1", 0))
    t = socket.create_connection(lsock.getsockname())
    try:
        with pytest.raises(TransportError, match="UNIX socket"):
            send_all(t, b"x", [0])
    finally:
        t.close()
        lsock.close()


def test_recv_exact_deadline_bounds_a_trickling_peer():
    """A peer sending one byte just inside each read's timeout is cut off at the deadline,
    and the socket's own timeout is put back."""
    a, b = socket.socketpair()
    try:
        b.settimeout(0.5)
        with Trickler(a, b"x" * 1000, every=0.05):
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="overall deadline"):
                recv_exact(b, 1000, deadline=time.monotonic() + 0.3)
            assert time.monotonic() - t0 < 0.45
            assert b.gettimeout() == 0.5
    finally:
        a.close()
        b.close()


def test_fd_headroom_is_the_soft_limit_less_the_open_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd")) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 50, hard))
    try:
        before = fd_headroom()
        fd = os.dup(0)
        try:
            assert fd_headroom() == before - 1
        finally:
            os.close(fd)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert before == 50
