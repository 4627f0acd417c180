"""The ``nbd`` backend: a namespace on a Network Block Device export, through libnbd.

``nbd:uri=nbd://HOST:PORT/EXPORT`` or ``nbd:uri=nbd+unix:///EXPORT?socket=PATH`` (libnbd's
URI syntax, see ``nbd_connect_uri(3)``). The namespace is the export's size (``size=``
may ask for less; an export smaller than ``size=``, or missing, is refused at start with
one :class:`~pcidev.errors.ConfigError` line).

**Mapping.** Read and Write are ``NBD_CMD_READ`` / ``NBD_CMD_WRITE``; a durable write
(FUA, or the volatile write cache off) carries ``NBD_CMD_FLAG_FUA`` when the server
offers it, else it is followed by ``NBD_CMD_FLUSH``. Flush is ``NBD_CMD_FLUSH`` (nothing
when the server has no write cache to flush). A deallocation (Dataset Management
deallocate, Write Zeroes with DEAC) is ``NBD_CMD_WRITE_ZEROES`` *without*
``NO_HOLE`` -- the server may punch a hole -- because the namespace promises that
deallocated blocks read as zeros and ``NBD_CMD_TRIM`` does not; Write Zeroes is
``NBD_CMD_WRITE_ZEROES`` with ``NO_HOLE`` (and ``FAST_ZERO`` first when the server offers
it, falling back to the plain command when it answers that zeroing would be slow). A
server without ``WRITE_ZEROES`` gets writes of zeros. Get LBA Status and DULBE ask
``NBD_CMD_BLOCK_STATUS`` in the ``base:allocation`` context (when the server has it; else
every block counts as written). A read-only export makes a read-only namespace (the I/O
command set refuses writes with Namespace is Write Protected, as for a read-only file).

**Commands in flight.** Each connection is one libnbd handle driven by its own dispatcher
thread (``aio_get_fd`` / ``aio_get_direction`` / ``aio_notify_*``, the event-loop
integration libnbd documents); the I/O command set's worker threads issue ``aio_*`` commands
with completion callbacks and wait for them, so every worker's command is on the wire at
once. The fast path's commands (:meth:`NbdBackend.submit_readv`) are sent by the submitting
thread while the dispatcher sleeps, else queued for it (woken once per burst); the dispatcher
reads every reply there is per wake-up (at most :data:`MAX_READS`) and completes them in one
round. The backend asks the I/O command set for ``queue_depth`` workers (option
``queue_depth``, default :data:`DEFAULT_QUEUE_DEPTH`; the optional
:attr:`NbdBackend.queue_depth` of the :class:`~pcidev_nvme.backends.base.Backend`
protocol). ``connections=N`` opens N connections and spreads the commands over them, only
when the server advertises ``NBD_FLAG_CAN_MULTI_CONN`` (a Flush on one connection then
covers the writes completed on all of them); otherwise one connection is used and the
start logs why.

**Faults.** A connection that dies (the server went away, or answered ``ESHUTDOWN``) is
reopened with bounded retries and exponential backoff (:data:`RETRY_FIRST` doubling to
:data:`RETRY_MAX` seconds) while the commands that were in flight on it, and the new
ones, wait; once it is back they are sent again (reads, writes, zeroing and flushes are
idempotent: the I/O command set never has two overlapping writes in flight). If it is
not back within ``reconnect_timeout`` seconds (default :data:`DEFAULT_RECONNECT_TIMEOUT`;
the loss ends only once a command is answered on the new connection, and one command is sent
again at most :data:`MAX_RESENDS` times) they fail with ``EIO`` (the I/O command set
completes them with Unrecovered Read Error or Write Fault and an Error Information log
entry); later commands then try one reconnection each and fail at once if the server is
still away. NBD makes only flushed (or FUA) writes durable: writes acknowledged but not
flushed before the server went down are as safe as the server kept them (a volatile write
cache's writes after a power loss).
**Fences.** NBD cannot cancel a request: a write whose connection was lost (timed out,
broken, ``ESHUTDOWN``) may still be carried out by the server later. Each connection keeps
its writes sent and not yet answered; a lost one is half-closed (``SHUT_WR``: libnbd retires
its commands at once, the server reads the end of the stream) and, while any of those writes
is unanswered, fences their blocks: a later command on overlapping blocks waits until the
server answered them or closed its side of that connection (nbdkit does once its requests in
flight ended), plus ``fence_grace`` seconds (:data:`DEFAULT_FENCE_GRACE`; QEMU's servers
close first and finish their writes after); at most ``reconnect_timeout`` seconds after the
loss, after which commands on those blocks fail with ``EIO`` until the server closes it. A
command sent again after its own connection was lost passes its own fence (same data). At
most :data:`MAX_DRAINING` such connections are kept; a migration's stop waits for them
(:meth:`NbdBackend.wait_unfenced`). Identify Namespace's NUSE and Get LBA Status ask block
status on a thread of their own and wait :data:`ADMIN_WAIT` seconds at most.
A new connection must offer what the first one did (writes, FUA, flush, zeroing, block
status, multi-conn when used, block sizes): a server that comes back with less is a failed
attempt. Closing a connection shuts its socket down and lets libnbd retire every command
on it before its descriptors go.

**TLS.** An ``nbds://`` URI may name a pre-shared key file (``tls-psk-file=``) or a
directory of X.509 certificates (``tls-certificates=``): the only local files a URI may make
libnbd read, checked by :func:`psk_file_of` and :func:`certificates_dir_of` at start.

libnbd's Python bindings come from the distribution (Debian's ``python3-libnbd``, for the
system Python 3): when ``import nbd`` fails, :func:`load_nbd` imports exactly the ``nbd``
module and its ``libnbdmod`` extension from ``/usr/lib/python3/dist-packages`` (nothing
else of that directory).
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import importlib
import importlib.machinery
import importlib.util
import itertools
import logging
import os
import select
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any, TypeVar, cast

import attrs

from pcidev.errors import ConfigError
from pcidev.properties import Size
from pcidev_nvme.backends.base import BaseBackend, check_size, size_field, take_options

__all__ = [
    "ADMIN_WAIT",
    "CLOSE_WAIT",
    "DEFAULT_FENCE_GRACE",
    "DEFAULT_QUEUE_DEPTH",
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_DRAINING",
    "MAX_EXTENTS",
    "MAX_READS",
    "MAX_RESENDS",
    "MAX_QUEUE_DEPTH",
    "MIN_ATTEMPT",
    "RETRY_FIRST",
    "RETRY_MAX",
    "STATUS_RANGE",
    "SYSTEM_DIST_PACKAGES",
    "NbdBackend",
    "NbdConfig",
    "export_size",
    "load_nbd",
    "make_nbd",
    "psk_file_of",
    "certificates_dir_of",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: where Debian's ``python3-libnbd`` puts the ``nbd`` module
SYSTEM_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
#: commands the backend wants in flight (I/O worker threads of the controller), by default
DEFAULT_QUEUE_DEPTH = 16
#: the largest ``queue_depth=`` accepted
MAX_QUEUE_DEPTH = 256
#: the most connections ``connections=`` may open
MAX_CONNECTIONS = 16
#: seconds a lost connection is retried before its commands fail, by default
DEFAULT_RECONNECT_TIMEOUT = 30.0
#: seconds a command may take, retries included, by default (then it fails and its connection
#: is dropped: a server that stopped answering without closing the connection)
DEFAULT_TIMEOUT = 120.0
#: the least time one reconnection attempt gets (seconds), even past the deadline
MIN_ATTEMPT = 1.0
#: first pause between reconnection attempts (seconds); doubles up to :data:`RETRY_MAX`
RETRY_FIRST = 0.05
#: longest pause between reconnection attempts (seconds)
RETRY_MAX = 2.0
#: times one command is sent again after its connection was lost under it (then ``EIO``)
MAX_RESENDS = 3
#: the largest data transfer sent as one NBD request (the protocol's usual limit is 32 MiB)
MAX_REQUEST = 32 << 20
#: seconds a closed connection's dispatcher waits for libnbd to retire its commands
CLOSE_WAIT = 5.0
#: replies the dispatcher reads in one round before it looks at its queue and poll again
MAX_READS = 64
#: the largest range one WRITE_ZEROES request covers (the length is 32-bit)
MAX_RANGE = 1 << 30
#: the largest range one BLOCK_STATUS request asks about (at most 128 Ki extents of 512 bytes)
STATUS_RANGE = 64 << 20
#: extents used from one BLOCK_STATUS reply (the rest of its range is asked again)
MAX_EXTENTS = 1 << 16
#: seconds the admin path (Identify Namespace's NUSE, Get LBA Status) waits for block status
ADMIN_WAIT = 2.0
#: seconds the blocks of a lost connection's unanswered writes stay fenced after the server
#: closed it, by default (QEMU's servers close it at once and finish their writes in flight after)
DEFAULT_FENCE_GRACE = 1.0
#: the most lost connections of one namespace kept open until the server closes them (they fence
#: the blocks of their unanswered writes); while that many are open no new connection is made
MAX_DRAINING = 8

#: per thread: the command being run is sent again (after its connection was lost) and passes the
#: fences its own earlier copy put up (:meth:`NbdBackend._await_fences`)
_resending = threading.local()

_nbd: ModuleType | None = None
_load_lock = threading.Lock()


def _load_from(directory: str) -> ModuleType:
    """Import ``libnbdmod`` (the extension) and ``nbd`` from ``directory`` only."""
    # only an extension built for this interpreter (its exact suffix: a cpython-311 build is
    # not loaded into another Python, whose generic ".so" suffix would match it)
    ext = next((path for path in (os.path.join(directory, "libnbdmod" + suffix)
                                  for suffix in importlib.machinery.EXTENSION_SUFFIXES)
                if os.path.exists(path)), None)
    if ext is None or not os.path.exists(os.path.join(directory, "nbd.py")):
        raise ImportError(f"no libnbd Python module for Python {sys.version_info.major}."
                          f"{sys.version_info.minor} in {directory}")
    modules: dict[str, ModuleType] = {}
    for name, path in (("libnbdmod", ext), ("nbd", os.path.join(directory, "nbd.py"))):
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # (nbd.py does ``import libnbdmod``)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            for done in modules:
                sys.modules.pop(done, None)
            raise
        modules[name] = module
    return modules["nbd"]


def load_nbd() -> ModuleType:
    """The module ``nbd`` of libnbd's Python bindings: a plain import, else the system Python's copy.

    :raises ConfigError: libnbd's Python bindings are not installed (or do not load here).
    """
    global _nbd
    with _load_lock:
        if _nbd is None:
            try:
                _nbd = importlib.import_module("nbd")
            except ImportError:
                try:
                    _nbd = _load_from(SYSTEM_DIST_PACKAGES)
                except (ImportError, OSError) as exc:
                    raise ConfigError(f"the nbd backend needs libnbd's Python bindings: install "
                                      f"python3-libnbd ({exc})") from None
        return _nbd


def psk_file_of(uri: str) -> str | None:
    """The pre-shared key file a URI names (``tls-psk-file=`` in its query), or None.

    :raises ConfigError: the URI names one that is not a readable regular file (checked
        here, at start: libnbd's own error would come from the TLS handshake).
    """
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("tls-psk-file")
    if not values:
        return None
    path = values[-1]
    if len(values) > 1 or not os.path.isabs(path) or not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"nbd backend: tls-psk-file={path} in {uri} must be one readable file (an absolute path)")
    return path


def certificates_dir_of(uri: str) -> str | None:
    """The directory of X.509 certificates a URI names (``tls-certificates=`` in its query:
    ``ca-cert.pem``, and for a client certificate ``client-cert.pem`` and ``client-key.pem``),
    or None (libnbd then looks in its default directory).

    :raises ConfigError: the URI names one that is not a readable directory holding
        ``ca-cert.pem`` (an absolute path).
    """
    values = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("tls-certificates")
    if not values:
        return None
    path = values[-1]
    if (len(values) > 1 or not os.path.isabs(path) or not os.path.isdir(path)
            or not os.access(os.path.join(path, "ca-cert.pem"), os.R_OK)):
        raise ConfigError(f"nbd backend: tls-certificates={path} in {uri} must be one directory (an absolute "
                          "path) holding a readable ca-cert.pem")
    return path


def _local_files(uri: str) -> bool:
    """The URI names local files libnbd must be let read (a key file, a certificates directory)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    return "tls-psk-file" in query or "tls-certificates" in query


def _errno_of(exc: BaseException) -> int:
    """The errno an ``nbd.Error`` carries (the bindings give its name or number)."""
    code = getattr(exc, "errno", None)
    if isinstance(code, str):
        code = getattr(errno, code, None)
    return code if isinstance(code, int) and code > 0 else errno.EIO


@attrs.define(kw_only=True)
class NbdConfig:
    """Options of the ``nbd`` backend."""

    uri: str = attrs.field(metadata={
        "help": "the export: nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH"})
    size: Size | None = size_field(required=False)
    readonly: bool = attrs.field(default=False, metadata={"help": "refuse writes (also for a writable export)"})
    connections: int = attrs.field(default=1, metadata={
        "help": f"connections (1..{MAX_CONNECTIONS}), used when the server advertises multi-conn"})
    queue_depth: int = attrs.field(default=DEFAULT_QUEUE_DEPTH, metadata={
        "help": f"commands in flight (1..{MAX_QUEUE_DEPTH})"})
    reconnect_timeout: float = attrs.field(default=DEFAULT_RECONNECT_TIMEOUT, metadata={
        "help": "seconds a lost connection is retried before its commands fail"})
    timeout: float = attrs.field(default=DEFAULT_TIMEOUT, metadata={
        "help": "seconds a command, or the opening of a connection, may take (0: no limit)"})
    fence_grace: float = attrs.field(default=DEFAULT_FENCE_GRACE, metadata={
        "help": "seconds the blocks of a lost connection's unanswered writes stay fenced after the server closed it"})

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ConfigError(f"nbd backend: connections={self.connections} must be 1..{MAX_CONNECTIONS}")
        if not 1 <= self.queue_depth <= MAX_QUEUE_DEPTH:
            raise ConfigError(f"nbd backend: queue_depth={self.queue_depth} must be 1..{MAX_QUEUE_DEPTH}")
        if not 0 <= self.reconnect_timeout <= 86400:
            raise ConfigError(f"nbd backend: reconnect_timeout={self.reconnect_timeout} must be 0..86400 seconds")
        if not 0 <= self.timeout <= 86400:
            raise ConfigError(f"nbd backend: timeout={self.timeout} must be 0..86400 seconds (0: no limit)")
        if not 0 <= self.fence_grace <= 3600:
            raise ConfigError(f"nbd backend: fence_grace={self.fence_grace} must be 0..3600 seconds")


class _Waiter:
    """One command's completion: the callback libnbd calls, and what its issuer waits on (a
    lock taken at creation and released by the callback: cheaper than an Event)."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.error = 0

    def __call__(self, error: Any) -> int:
        value = getattr(error, "value", error)
        self.error = value if isinstance(value, int) else errno.EIO
        self.done.release()
        return 1  # retire the command

    def wait(self, timeout: float | None) -> bool:
        """Wait for the completion (``timeout`` seconds at most; None: no limit)."""
        return self.done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0))


class _Async:
    """One asynchronous command (:meth:`NbdBackend.submit_readv`): queued for the dispatcher
    thread, which issues it (``aio_pread``, or ``aio_pwrite`` with ``flags`` when ``write``)
    with this object as libnbd's completion callback. A lost connection hands the command to
    the backend's retry thread (the blocking path, which reconnects); a command past its
    deadline fails with ``EIO``; otherwise ``done(errno or 0)`` is called, exactly once."""

    __slots__ = ("backend", "conn", "slot", "done", "blocking", "deadline", "keep", "err", "span", "write", "offset",
                 "flags", "batch", "__weakref__")

    def __init__(self, backend: NbdBackend, conn: _Connection, slot: int, done: Callable[[int], object],
                 blocking: Callable[[], None], deadline: float | None, keep: object,
                 span: tuple[int, int] | None = None, *, write: bool = False, offset: int = 0,
                 flags: int = 0) -> None:
        self.backend, self.conn, self.blocking, self.deadline = backend, conn, blocking, deadline
        self.slot = slot
        #: a write's (offset, length): noted in the connection's unanswered writes while on the wire
        self.span = span
        self.done: Callable[[int], object] | None = done
        self.keep = keep  # (the buffer libnbd reads or writes: alive until the command is retired)
        self.err = 0
        self.write, self.offset, self.flags = write, offset, flags
        #: the completer's batch (``done.batch``: a context-manager factory, or None), entered
        #: around a round of completions (see :class:`~pcidev_nvme.io.IoCommandSet`)
        self.batch: Callable[[], Any] | None = getattr(done, "batch", None)

    def __call__(self, error: Any) -> int:
        # (libnbd holds the handle's lock here: the command's end is settled by the
        # dispatcher once libnbd returns, so the completion path may issue new commands)
        value = getattr(error, "value", error)
        self.err = value if isinstance(value, int) else errno.EIO
        self.conn.completed.append(self)
        return 1  # retire the command

    def settle(self) -> None:
        """The command ended (its libnbd callback ran): complete it, or send it again."""
        err = self.err
        conn = self.conn
        try:  # (the claim: one thread settles a command, even if two found it unretired)
            conn.pending.remove(self)
        except KeyError:
            return
        h = conn.handle  # (None once the connection is closed)
        if err and (err in (errno.ENOTCONN, errno.ESHUTDOWN) or conn.dead or h is None or h.aio_is_dead()):
            conn.dead = True
            if self.span is not None and err == errno.ESHUTDOWN and not conn._aborted:
                conn.writes.pop(self, None)  # (the server's answer: it will not carry it out)
            # (a write not answered: it may still be carried out -- its blocks stay fenced)
            self.backend._lost(conn, abort=False)
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self.finish(errno.EIO)
            else:
                try:
                    self.backend._retry(self)
                except Exception:  # (closed: no thread to retry on)
                    self.finish(errno.EIO)
            return
        if self.span is not None:
            conn.writes.pop(self, None)  # (answered: carried out, or refused, for good)
        self.backend._answered(self.slot, conn)
        self.finish(err)

    def retry(self) -> None:
        """The blocking path, on the backend's retry thread (a lost connection): sent again,
        past the fence of its own first copy."""
        _resending.on = True
        try:
            self.blocking()
        except OSError as exc:
            self.finish(exc.errno or errno.EIO)
        except Exception:  # pragma: no cover - a bug must not lose the completion
            log.exception("NBD retry failed")
            self.finish(errno.EIO)
        else:
            self.finish(0)
        finally:
            _resending.on = False

    def finish(self, err: int) -> None:
        """Report the command's end (once)."""
        backend = self.backend
        done, self.done = self.done, None
        self.keep = None
        if done is None:  # pragma: no cover - settled once (the claim in settle)
            return
        with backend._lock:
            backend.inflight -= 1
        try:
            done(err)
        except Exception:  # pragma: no cover - the completion path's own failure
            log.exception("completing an NBD command failed")


class _Lost(Exception):
    """The connection died under a command (it is sent again on a new one)."""


class _Connection:
    """One libnbd handle and the thread that drives it.

    :param timeout: seconds the connection and the handshake may take (None: no limit).
    :raises OSError: the connection cannot be made (``nbd.Error`` translated), or not in time
        (``ETIMEDOUT``).
    """

    def __init__(self, nbd: ModuleType, uri: str, timeout: float | None) -> None:
        self.nbd = nbd
        self.handle = h = nbd.NBD()
        self.dead = False
        self._closing = False
        #: :meth:`abort` was called (the socket is half-closed)
        self._aborted = False
        #: our read side was shut down too (libnbd did not end): an end of file read after it
        #: is ours, not the server's, so the fence stays up
        self._shut_read = False
        #: the writes sent and not answered yet: key (the command's waiter) -> (offset, length).
        #: Once the connection is lost they fence their blocks (:meth:`NbdBackend._await_fences`)
        #: until the server closed its side (:attr:`server_closed`): NBD has no cancel, and a
        #: server may still carry a write out after the client went away
        self.writes: dict[object, tuple[int, int]] = {}
        #: the server closed the connection after it was lost (nbdkit finishes the requests in
        #: flight first): its unanswered writes can no longer land
        self.server_closed = False
        #: ``time.monotonic()`` when :attr:`server_closed` was seen, and the seconds the writes
        #: still fence after it (the backend's ``fence_grace``)
        self.closed_at = 0.0
        self.grace = 0.0
        #: ``time.monotonic()`` when the backend found the connection lost with writes unanswered
        self.lost_at = 0.0
        #: called (on the dispatcher thread) when the connection stopped fencing anything
        self.on_drained: Callable[[], None] | None = None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # (the only local files a URI may make libnbd read: the key file or the certificates
            # directory, checked at start)
            h.set_uri_allow_local_file(_local_files(uri))
            h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            h.aio_connect_uri(uri)  # (not connect_uri: a TCP connect or a handshake may hang)
            while not h.aio_is_ready():
                if h.aio_is_dead() or h.aio_is_closed():
                    raise OSError(errno.ECONNRESET, f"the connection to {uri} failed")
                left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                if left <= 0:
                    raise OSError(errno.ETIMEDOUT, f"no NBD handshake within {timeout:g} s")
                h.poll(max(1, int(left * 1000)))
        except nbd.Error as exc:
            raise OSError(_errno_of(exc), str(exc)) from None
        try:
            # (our own descriptor of the socket: abort() shuts it down from any thread, even
            # after libnbd closed its descriptor -- whose number may already be another file's;
            # after a loss it also tells when the server closed its side: _watch)
            self._sock: socket.socket | None = socket.socket(fileno=os.dup(h.aio_get_fd()))
        except (OSError, nbd.Error) as exc:
            raise OSError(_errno_of(exc) if isinstance(exc, nbd.Error) else exc.errno or errno.EIO,
                          f"the connection to {uri}: {exc}") from None
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._sock.close()  # (no dispatcher will: the connection is not made)
            self._sock = None
            self.handle = h = None  # (libnbd closes its socket now, not when the traceback goes)
            raise
        #: guards the wake-up pipe and the socket's descriptor (closed by the dispatcher as it ends)
        self._fd_lock = threading.Lock()
        self._fds_closed = False
        #: the asynchronous commands on the wire (their deadlines are checked by the dispatcher)
        self.pending: set[_Async] = set()
        #: asynchronous commands libnbd retired, to settle outside its callback
        self.completed: collections.deque[_Async] = collections.deque()
        #: asynchronous commands queued for the dispatcher to issue (only the dispatcher calls
        #: libnbd for them: the submitting thread neither waits for the handle's lock nor
        #: hands the GIL over per command)
        self.submitted: collections.deque[_Async] = collections.deque()
        #: the dispatcher is not (about to be) asleep in poll: a queued command needs no kick
        self.awake = True
        #: a kick was sent since the dispatcher last woke (the next queued command needs none)
        self.kicked = False
        self._next_check = 0.0
        self.thread = threading.Thread(target=self._loop, name="nbd-dispatch", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        nbd, h = self.nbd, self.handle
        closing_since: float | None = None
        try:
            fd = h.aio_get_fd()
            poller = select.poll()
            readable = select.poll()  # (is more to read there now)
            readable.register(fd, select.POLLIN)
            while True:
                if self._aborted:  # (half-closed: run until libnbd retired every command)
                    now = time.monotonic()
                    if closing_since is None:
                        closing_since = now
                    elif now - closing_since > CLOSE_WAIT:
                        log.warning("NBD connection not dead %g s after its close", CLOSE_WAIT)
                        break
                    elif now - closing_since > CLOSE_WAIT / 2 and not self._shut_read:
                        # (libnbd waits for the rest of a reply the server does not send: end
                        # it by our end of file -- which no longer tells when the server closes)
                        log.warning("NBD server silent in the middle of a reply after the connection's "
                                    "loss: its unanswered writes stay fenced until the namespace closes")
                        self._shut_read = True
                        self._shutdown(socket.SHUT_RDWR)
                if self.submitted:
                    self._issue()
                direction = h.aio_get_direction()
                poller.register(fd, (select.POLLIN if direction & nbd.AIO_DIRECTION_READ else 0)
                                | (select.POLLOUT if direction & nbd.AIO_DIRECTION_WRITE else 0))
                poller.register(self._wake_r, select.POLLIN)
                self.awake = False  # (before the look at the queue: a later submitter kicks)
                # (commands on the wire: their deadlines are checked every 0.1 s)
                wait = 0 if self.submitted or self.completed else 100 if self._aborted or self.pending else 1000
                events = dict(poller.poll(wait))
                self.awake = True
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                # (after the drain: a kick whose byte that read took must not leave the flag
                # set with an empty pipe -- the next submitter would neither send nor kick)
                self.kicked = False
                ev = events.get(fd, 0)
                if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    # (libnbd ends a notification after one reply: read on while more
                    # is there, so that a round completes them together; never without
                    # data -- libnbd would leave its ready state and hold back what it has
                    # to send until a reply came)
                    h.aio_notify_read()
                    for _ in range(MAX_READS):
                        more = readable.poll(0)
                        if not more or more[0][1] != select.POLLIN:  # (an end or error: as before)
                            break
                        h.aio_notify_read()
                    if ev & select.POLLOUT and not h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
                        ev = 0  # (what was read changed the state: libnbd wants no write now)
                if ev & select.POLLOUT:
                    h.aio_notify_write()
                if self.completed:
                    self.settle()
                if h.aio_is_dead() or h.aio_is_closed():
                    break
                if self.pending:
                    self._check_deadlines()
        except nbd.Error as exc:
            if not self._closing:
                log.warning("NBD connection lost: %s", exc)
        except Exception:  # a bug here must not hang the waiters silently
            log.exception("NBD dispatcher failed")
            try:  # (half-close: the server ends its requests and closes, ending the fences)
                self.abort()
            except Exception:  # pragma: no cover - abort never raises but for a bug
                log.exception("closing the NBD connection after the dispatcher failed")
        finally:
            self.dead = True
            self.awake = self.kicked = False  # (a submitter from now on kicks, and sees it fail)
            self.abandon()
            self._strand()  # (before the watch: it may wait for the server's close)
            try:
                self._watch()
            except Exception:  # pragma: no cover - a bug here must not leave descriptors open
                log.exception("watching a lost NBD connection failed")
            with self._fd_lock:  # (from now on a kick() fails: its caller settles, see _submit)
                self._fds_closed = True
                sock, self._sock = self._sock, None
                for wake in (self._wake_r, self._wake_w):
                    os.close(wake)
            if sock is not None:
                sock.close()
            self.abandon()
            self._strand()
            drained = self.on_drained
            if drained is not None:
                drained()

    def fencing(self) -> bool:
        """Whether the connection was lost with writes unanswered that the server may still
        carry out (it has not closed its side yet, nor answered them)."""
        if not self.writes or self._closing:
            return False
        return not self.server_closed or time.monotonic() < self.closed_at + self.grace

    def _watch(self) -> None:
        """After libnbd's end (the connection was aborted, or the server went away): while
        writes are unanswered, read and drop what the server still sends on our half-closed
        socket until it closes its side (end of file or a reset: its requests in flight are
        over) -- or the backend closes."""
        sock = self._sock
        if sock is None or not self.writes:
            return
        sock.setblocking(False)
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while self.writes and not self._closing:
            events = dict(poller.poll(1000))
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            if self.completed:
                self.settle()
            if sock.fileno() in events:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    continue
                except OSError:  # (reset by the server: its side is gone)
                    data = b""
                if not data:
                    if self._shut_read:  # (our own end of file: keep fencing until closed)
                        poller.unregister(sock.fileno())
                        continue
                    self.closed_at = time.monotonic()
                    self.server_closed = True
                    log.info("NBD connection closed by the server after its loss: %d write(s) settled",
                             len(self.writes))
                    return

    def _issue(self) -> None:
        """Issue the queued asynchronous commands (on the dispatcher thread). One libnbd
        refuses at once ends with its error; on a dead (or closing) connection the rest are
        lost, which sends them again on a new one (:meth:`_Async.settle`)."""
        nbd, h = self.nbd, self.handle
        submitted = self.submitted
        while submitted:
            if self.dead or self._closing or self._aborted or h is None:
                self.abandon()
                return
            try:
                cmd = submitted.popleft()
            except IndexError:  # (abandon() on another thread took the last one)
                return
            try:
                if cmd.write:
                    h.aio_pwrite(cmd.keep, cmd.offset, completion=cmd, flags=cmd.flags)
                else:
                    h.aio_pread(cmd.keep, cmd.offset, completion=cmd)
            except nbd.Error as exc:
                self.writes.pop(cmd, None)  # (not sent: it cannot land)
                if h.aio_is_dead() or h.aio_is_closed():
                    self.dead = True
                    cmd.err = errno.ENOTCONN
                else:
                    cmd.err = _errno_of(exc)
                self.completed.append(cmd)

    def _strand(self) -> None:
        """The commands on the wire that libnbd never retired when the dispatcher ended (it
        broke off: a bug, or a connection not dead :data:`CLOSE_WAIT` after its close): nobody
        polls the handle any more, so their callbacks would never run and the guest's commands
        would never complete. They are settled as on a lost connection (sent again on a new
        one, or failed at their deadline; a write's blocks stay fenced)."""
        completed = self.completed
        for cmd in list(self.pending):
            if cmd not in completed:  # (a command settled meanwhile is skipped: its claim)
                cmd.err = errno.ENOTCONN
                completed.append(cmd)
        self.settle()

    def abandon(self) -> None:
        """The queued commands not issued (the connection died or closes): lost, they are
        settled as such (sent again on a new connection, see :meth:`_Async.settle`)."""
        submitted, completed = self.submitted, self.completed
        while submitted:
            try:
                cmd = submitted.popleft()
            except IndexError:  # (another thread took the last one)
                break
            self.writes.pop(cmd, None)  # (never sent: it cannot land)
            cmd.err = errno.ENOTCONN
            completed.append(cmd)
        self.settle()

    def settle(self) -> None:
        """Settle the asynchronous commands libnbd retired (:meth:`_Async.settle`): a round
        of them inside their completer's batch (one completion-queue update and one
        interrupt per vector for the round, not per command)."""
        completed = self.completed
        while completed:
            try:
                batch = completed[0].batch
            except IndexError:  # (another thread took the last one)
                break
            if batch is None:
                try:
                    cmd = completed.popleft()
                except IndexError:
                    break
                cmd.settle()
                continue
            try:
                with batch():
                    while completed:
                        try:
                            cmd = completed.popleft()
                        except IndexError:
                            break
                        cmd.settle()
            except Exception:  # pragma: no cover - the completer's own failure (the controller logs it)
                log.exception("completing NBD commands failed")

    def _check_deadlines(self) -> None:
        """Drop the connection when an asynchronous command is past its deadline (its
        callback then fails it; the others on the connection are sent again)."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + 0.1
        if any(cmd.deadline is not None and cmd.deadline <= now for cmd in list(self.pending)):
            log.warning("NBD command unanswered past its timeout: dropping the connection")
            self.dead = True
            self.abort()

    def kick(self) -> bool:
        """Let the dispatcher look at the direction again (a command may wait to be sent).
        Nothing once the dispatcher ended (its pipe is closed: the number may be reused).

        :returns: False when the dispatcher ended (it settles nothing more).
        """
        with self._fd_lock:
            if self._fds_closed:
                return False
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # (a wake-up is pending already)
            return True

    def _shutdown(self, how: int) -> None:
        """Shut our own descriptor of the socket down (``how``: ``socket.SHUT_*``), unless the
        dispatcher closed it already; a socket no longer connected is left as it is."""
        with self._fd_lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(how)
                except OSError:
                    pass  # (not connected any more)

    def abort(self) -> None:
        """Half-close the socket (a server that stopped answering, a lost connection, a close):
        the server reads its end and, once its requests in flight are done, closes its side,
        which :meth:`_watch` sees; libnbd's next send fails (its disconnect request is queued
        for that), so it retires every command in flight with an error at once and the
        connection is dead (its commands are sent again on a new one)."""
        self.dead = True
        self._aborted = True
        self._shutdown(socket.SHUT_WR)
        h = self.handle
        if h is not None:
            try:
                h.aio_disconnect(0)
            except self.nbd.Error:
                pass  # (dead or closed already)
        self.kick()

    def _wait(self, waiter: _Waiter, timeout: float | None) -> bool | None:
        """Wait for ``waiter`` up to ``timeout`` seconds (None: no limit) while the dispatcher
        runs. True: done; False: timed out; None: the dispatcher ended without retiring it."""
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 1.0 if end is None else min(1.0, end - time.monotonic())
            if waiter.wait(step):
                return True
            if end is not None and time.monotonic() >= end:
                return False
            if not self.thread.is_alive():
                return True if waiter.wait(0) else None

    def run(self, issue: Callable[[Any, _Waiter], object], timeout: float | None = None,
            span: tuple[int, int] | None = None) -> None:
        """Issue one command and wait for it (up to ``timeout`` seconds: then the connection
        is aborted, which retires the command, and ``ETIMEDOUT`` is raised). ``span``: a
        write's (offset, length), kept in :attr:`writes` until the server answers it.

        :raises _Lost: the connection died before or under the command.
        :raises OSError: the server (or libnbd) refused the command, or it timed out.
        """
        h = self.handle
        if self.dead or h is None:
            raise _Lost()
        waiter = _Waiter()
        if span is not None:
            self.writes[waiter] = span
        try:
            issue(h, waiter)
        except self.nbd.Error as exc:
            self.writes.pop(waiter, None)  # (not sent)
            if self.dead or h.aio_is_dead() or h.aio_is_closed():
                self.dead = True
                raise _Lost() from None
            raise OSError(_errno_of(exc), str(exc)) from None
        if h.aio_get_direction() & self.nbd.AIO_DIRECTION_WRITE:
            self.kick()
        done = self._wait(waiter, timeout)
        if done is None:
            self.dead = True
            raise _Lost()
        if not done:
            log.warning("NBD command unanswered for %g s: dropping the connection", timeout)
            self.abort()
            self._wait(waiter, None)  # (retired by the abort: libnbd no longer holds the buffer)
            raise OSError(errno.ETIMEDOUT, "the NBD server did not answer in time")
        if waiter.error:
            if waiter.error in (errno.ENOTCONN, errno.ESHUTDOWN) or self.dead or h.aio_is_dead():
                if waiter.error == errno.ESHUTDOWN and not self._aborted:
                    self.writes.pop(waiter, None)  # (the server's answer: it will not carry it out)
                self.dead = True
                raise _Lost()
            self.writes.pop(waiter, None)
            raise OSError(waiter.error, os.strerror(waiter.error))
        self.writes.pop(waiter, None)

    def close(self) -> None:
        """Abort the connection, let the dispatcher run until libnbd retired every command in
        flight (their issuers see a lost connection), then drop the handle. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self.abort()
        if self.thread is not threading.current_thread():
            self.thread.join(CLOSE_WAIT + 1)
        self.handle = None  # (libnbd closes its socket when the last reference goes)
        self.settle()


def export_size(uri: str, timeout: float) -> int:
    """The size in bytes of the export at ``uri``, from one connection opened for the
    question and closed (the migration pre-flight asks it on the destination).

    :param timeout: seconds the connection and the handshake may take.
    :raises ConfigError: libnbd's Python bindings are missing.
    :raises OSError: the export cannot be reached in time.
    """
    nbd = load_nbd()
    conn = _Connection(nbd, uri, timeout)
    try:
        assert conn.handle is not None
        return int(conn.handle.get_size())
    except nbd.Error as exc:
        raise OSError(_errno_of(exc), str(exc)) from None
    finally:
        conn.close()


class NbdBackend(BaseBackend):
    """A namespace on an NBD export (see the module).

    :param uri: libnbd URI of the export.
    :param size: bytes (at most the export's size); None: the export's size, rounded down
        to a multiple of 4096.
    :param read_only: refuse writes (a read-only export is read-only anyway).
    :param connections: connections to open when the server advertises multi-conn.
    :param queue_depth: commands wanted in flight.
    :param reconnect_timeout: seconds a lost connection is retried; also the longest a
        command waits for a fence (see the module, "Faults").
    :param fence_grace: seconds a lost connection's unanswered writes still fence their blocks
        after the server closed it.
    :param timeout: seconds a command may take in all (0: no limit); then its connection is
        dropped (the other commands on it are sent again) and it fails with ``EIO``. Also the
        bound of one connection's opening (TCP connect and NBD handshake).
    :raises ConfigError: libnbd missing, the server or export unreachable, or sizes that
        do not fit.
    """

    kind = "nbd"
    inline = False

    def __init__(self, uri: str, size: int | None = None, *, read_only: bool = False, connections: int = 1,
                 queue_depth: int = DEFAULT_QUEUE_DEPTH,
                 reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT, timeout: float = DEFAULT_TIMEOUT,
                 fence_grace: float = DEFAULT_FENCE_GRACE) -> None:
        self.nbd = nbd = load_nbd()
        self.uri = uri
        self.reconnect_timeout = reconnect_timeout
        self.fence_grace = fence_grace
        self.timeout = timeout
        #: the commands the backend wants in flight (the I/O command set keeps that many workers)
        self.queue_depth = queue_depth
        psk_file_of(uri)
        certificates_dir_of(uri)
        try:
            first = _Connection(nbd, uri, timeout or None)
        except OSError as exc:
            raise ConfigError(f"nbd backend: cannot open {uri}: {exc.strerror}") from None
        try:
            self._setup(first, size, read_only=read_only, connections=connections)
        except BaseException:  # (a refused configuration leaves no thread nor descriptor behind)
            first.close()
            for conn in getattr(self, "_conns", ())[1:]:
                if conn is not None:
                    conn.close()
            raise

    def _setup(self, first: _Connection, size: int | None, *, read_only: bool, connections: int) -> None:
        """The rest of the start, on the first connection ``first`` (see the class)."""
        nbd, uri, timeout = self.nbd, self.uri, self.timeout
        h = first.handle
        try:
            export = h.get_size()
            caps = self._capabilities(h)
        except nbd.Error as exc:
            raise ConfigError(f"nbd backend: {uri}: {exc}") from None
        self.read_only = read_only or caps["read_only"]
        self.can_fua, self.can_flush = caps["fua"], caps["flush"]
        self.can_zero, self.can_fast_zero = caps["zero"], caps["fast_zero"]
        self.holes = caps["holes"]
        multi = caps["multi_conn"]
        maximum = caps["max_request"]
        self.min_block = caps["min_block"]
        self.max_request = maximum
        if maximum < 4096:
            raise ConfigError(f"nbd backend: the export {uri} takes requests of at most {maximum} bytes "
                              f"(at least 4096 needed)")
        if size is None:
            size = export - export % 4096
            if size <= 0:
                    raise ConfigError(f"nbd backend: the export {uri} has {export} bytes, fewer than 4096")
        elif size > export:
            raise ConfigError(f"nbd backend: the export {uri} has {export} bytes, fewer than the size={size} given")
        check_size(size, f"size of {uri}")
        if self.min_block > 4096:
            raise ConfigError(f"nbd backend: the export {uri} needs {self.min_block}-byte blocks (at most 4096)")
        super().__init__(size)
        self.export_size = export
        if connections > 1 and not multi:
            log.info("nbd backend: %s does not advertise multi-conn: one connection, not %d", uri, connections)
            connections = 1
        self.connections = connections
        #: what every later connection must offer too (:meth:`_weaker`)
        self._caps = dict(caps, read_only=self.read_only, multi_conn=connections > 1)
        self._conns: list[_Connection | None] = [first]
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        #: per connection: a thread is reconnecting it
        self._reconnecting = [False] * connections
        #: per connection: ``time.monotonic()`` when it was found lost (None: up), and whether
        #: its reconnection already gave up (then each command tries once)
        self._lost_at: list[float | None] = [None] * connections
        self._gave_up = [False] * connections
        #: per connection: the pause before its next reconnection (0 once a command was answered
        #: on it: a server that accepts connections but answers ESHUTDOWN gets backoff too)
        self._pause = [0.0] * connections
        #: per connection: reconnections that gave up (the commands waiting for one fail with it)
        self._failures = [0] * connections
        self._next = itertools.count()
        self._closed = False
        #: the thread that sends asynchronous commands again after a lost connection
        self._retrier: ThreadPoolExecutor | None = None
        #: lost connections whose unanswered writes fence their blocks (:meth:`_await_fences`)
        self._draining: list[_Connection] = []
        #: the thread asking block status for the admin path, its job, and the last NUSE known
        self._status_pool: ThreadPoolExecutor | None = None
        self._status: Future[Any] | None = None
        self._nuse_known: int | None = None
        #: reconnections made (for tests and logs)
        self.reconnects = 0
        #: commands on the wire now, and the most there were at once
        self.inflight = self.max_inflight = 0
        try:
            for _ in range(1, connections):
                self._conns.append(self._open(timeout or None))
        except OSError as exc:
            raise ConfigError(f"nbd backend: cannot open connection to {uri}: {exc.strerror}") from None

    # -- connections --------------------------------------------------------------------

    def _capabilities(self, h: Any) -> dict[str, Any]:
        """What the server offers on the connection of handle ``h`` (read when it opened).

        :raises nbd.Error: libnbd cannot tell.
        """
        nbd = self.nbd
        zero = bool(h.can_zero())
        maximum = int(h.get_block_size(nbd.SIZE_MAXIMUM))
        return {
            "read_only": bool(h.is_read_only()), "fua": bool(h.can_fua()), "flush": bool(h.can_flush()),
            "zero": zero, "fast_zero": zero and bool(h.can_fast_zero()),
            "holes": bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)),
            "multi_conn": bool(h.can_multi_conn()),
            "max_request": min(MAX_REQUEST, maximum) if maximum > 0 else MAX_REQUEST,
            "min_block": max(512, int(h.get_block_size(nbd.SIZE_MINIMUM))),
        }

    def _weaker(self, caps: dict[str, Any]) -> list[str]:
        """What a new connection's ``caps`` lack of what the namespace was started with (a
        server that came back read-only, without FUA, flush, zeroing, block status or
        multi-conn, or with narrower block sizes)."""
        want = self._caps
        lacks = [name.replace("_", "-") for name in ("fua", "flush", "zero", "fast_zero", "holes", "multi_conn")
                 if want[name] and not caps[name]]
        if caps["read_only"] and not want["read_only"]:
            lacks.append("writes (read-only now)")
        if caps["max_request"] < want["max_request"]:
            lacks.append(f"{want['max_request']}-byte requests (at most {caps['max_request']} now)")
        if caps["min_block"] > want["min_block"]:
            lacks.append(f"{want['min_block']}-byte blocks ({caps['min_block']} now)")
        return lacks

    def _open(self, timeout: float | None) -> _Connection:
        """A new connection with at least the namespace's size and the capabilities it was
        started with.

        :raises OSError: it cannot be opened, or the server offers less now (``EIO``), or
            :data:`MAX_DRAINING` lost connections are not closed by the server yet (``EIO``).
        """
        self._close_drained()
        if len(self._draining) >= MAX_DRAINING:
            raise OSError(errno.EIO, f"{len(self._draining)} lost connections to the server still have "
                                     f"writes it may carry out (not closed by it)")
        conn = _Connection(self.nbd, self.uri, timeout)
        try:
            h = conn.handle
            if h.get_size() < self.size:
                raise OSError(errno.EIO, f"the export has {h.get_size()} bytes now, fewer than {self.size}")
            lacks = self._weaker(self._capabilities(h))
            if lacks:
                log.warning("nbd backend: %s no longer offers %s: connection refused", self.uri, ", ".join(lacks))
                raise OSError(errno.EIO, f"the export no longer offers {', '.join(lacks)}")
        except self.nbd.Error as exc:
            conn.close()
            raise OSError(_errno_of(exc), str(exc)) from None
        except OSError:
            conn.close()
            raise
        return conn

    def _live(self, slot: int) -> _Connection:
        """The connection of ``slot``, reconnected if it was lost (waiting up to
        ``reconnect_timeout`` seconds from the loss).

        :raises OSError: ``EIO`` once the reconnection gave up; ``EBADF`` after close.
        """
        conn = self._conns[slot]
        if conn is not None and not conn.dead and not self._closed:
            return conn  # (the usual case, without the lock)
        with self._lock:
            failures = self._failures[slot]
            while True:
                if self._closed:
                    raise OSError(errno.EBADF, "the nbd backend is closed")
                conn = self._conns[slot]
                if conn is not None and not conn.dead:
                    return conn
                if self._failures[slot] != failures:  # the reconnection this waited for gave up
                    raise OSError(errno.EIO, f"NBD server {self.uri} unreachable")
                if not self._reconnecting[slot]:
                    break
                self._changed.wait(1.0)
            self._reconnecting[slot] = True
            if conn is not None:
                self._conns[slot] = None
            if self._lost_at[slot] is None:
                self._lost_at[slot] = time.monotonic()
                self._gave_up[slot] = False
                log.warning("nbd backend: connection %d to %s lost; reconnecting for up to %g s",
                            slot, self.uri, self.reconnect_timeout)
            lost_at = self._lost_at[slot]
            once = self._gave_up[slot]
            pause0 = self._pause[slot]
        if conn is not None:
            self._lost(conn)
            if not conn.fencing():
                conn.close()
        assert lost_at is not None
        deadline = lost_at + self.reconnect_timeout
        pause = RETRY_FIRST
        new: _Connection | None = None
        last = ""
        try:
            if pause0 > 0:  # (the previous reconnection got no command answered)
                once = once or time.monotonic() >= deadline
                time.sleep(pause0)
            while True:
                left = max(deadline - time.monotonic(), MIN_ATTEMPT)
                try:
                    new = self._open(min(left, self.timeout) if self.timeout > 0 else left)
                    break
                except OSError as exc:
                    last = exc.strerror or str(exc)
                now = time.monotonic()
                if once or self._closed or now >= deadline:
                    break
                time.sleep(min(pause, deadline - now))  # (the last attempt at the deadline)
                pause = min(pause * 2, RETRY_MAX)
        finally:
            with self._lock:
                self._reconnecting[slot] = False
                if new is not None and self._closed:
                    new.close()
                    new = None
                elif new is not None:
                    self._conns[slot] = new
                    self._pause[slot] = min(max(pause0 * 2, RETRY_FIRST), RETRY_MAX)
                    self.reconnects += 1
                else:
                    self._gave_up[slot] = True
                    self._failures[slot] += 1
                self._changed.notify_all()
        if new is None:
            raise OSError(errno.EIO, f"NBD server {self.uri} unreachable: {last}")
        log.warning("nbd backend: connection %d to %s is back", slot, self.uri)
        return new

    def _answered(self, slot: int, conn: _Connection) -> None:
        """The server answered a command on ``conn``: its slot's loss (if any) is over."""
        if self._lost_at[slot] is None and not self._pause[slot]:
            return
        with self._lock:
            if self._conns[slot] is conn:
                self._lost_at[slot] = None
                self._pause[slot] = 0.0

    def _run(self, issue: Callable[[Any, _Waiter], object], span: tuple[int, int] | None = None,
             write: bool = False) -> None:
        """Issue a command on the next connection and wait for it; a lost connection is
        reconnected and the command sent again. ``span``: the (offset, length) the command
        reads (``write``: changes); it first waits for the fences over it (:meth:`_await_fences`).

        :raises OSError: the server refused it, or did not come back in time, or its blocks
            stay fenced.
        """
        if span is not None:
            self._await_fences(*span)
        slot = next(self._next) % self.connections
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else None
        resends = 0
        lost: _Connection | None = None
        with self._lock:
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise OSError(errno.EIO, f"NBD command not done within timeout={self.timeout} s")
                conn = self._live(slot)
                try:
                    conn.run(issue, left, span if write else None)
                    self._answered(slot, conn)
                    return
                except _Lost:
                    self._lost(conn, abort=False)  # (its other commands may still be answered)
                    if conn is not lost:  # (one count per connection lost under the command)
                        lost = conn
                        resends += 1
                    if resends > MAX_RESENDS:
                        raise OSError(errno.EIO, f"NBD command lost on {resends} connections "
                                                 f"to {self.uri}") from None
                    continue  # (_live reconnects, or raises when the time is up)
                except OSError as exc:
                    if exc.errno != errno.ETIMEDOUT:
                        self._answered(slot, conn)
                        raise
                    self._lost(conn)
                    raise OSError(errno.EIO, f"NBD command not done within timeout={self.timeout} s") from None
        finally:
            with self._lock:
                self.inflight -= 1

    # -- fences (writes a lost connection may still carry out) ----------------------------

    def _lost(self, conn: _Connection, *, abort: bool = True) -> None:
        """``conn`` was lost (or timed out): half-close it (``abort``: :meth:`_Connection.abort`;
        else it stays up until :meth:`_live` replaces it, its other commands may still be
        answered) and, while writes sent on it are unanswered, keep it as a fence over their
        blocks until the server answered them or closed its side (NBD has no cancel: the server
        may still carry them out later)."""
        conn.grace = self.fence_grace
        if abort:
            conn.abort()
        if not conn.fencing():
            return
        with self._lock:
            if conn in self._draining or self._closed:
                return
            conn.lost_at = time.monotonic()
            conn.on_drained = self._drained
            self._draining.append(conn)
        log.warning("nbd backend: %d write(s) unanswered on a lost connection to %s: their blocks wait "
                    "until the server closes it (up to reconnect_timeout=%g s)",
                    len(conn.writes), self.uri, self.reconnect_timeout)

    def _drained(self) -> None:
        """A lost connection's dispatcher ended (it fences nothing now): wake the waiters."""
        with self._lock:
            self._changed.notify_all()

    def _close_drained(self) -> None:
        """Forget the lost connections that fence nothing any more (and close those
        :meth:`_live` replaced already)."""
        with self._lock:
            if not self._draining:
                return
            done = [c for c in self._draining if not c.fencing() and c not in self._conns]
            self._draining = [c for c in self._draining if c.fencing()]
        for conn in done:
            conn.close()

    def _fence_over(self, offset: int, length: int) -> _Connection | None:
        """The lost connection with an unanswered write overlapping ``length`` bytes at
        ``offset``, if any."""
        end = offset + length
        for conn in list(self._draining):
            if conn.fencing() and any(o < end and offset < o + n for o, n in tuple(conn.writes.values())):
                return conn
        return None

    def _await_fences(self, offset: int, length: int) -> None:
        """Wait until no write that a lost connection may still carry out overlaps the range
        (the server closed that connection, or answered the writes): a command must not
        start before an older copy of a write to its blocks could land after it. The wait
        ends at the latest ``reconnect_timeout`` seconds after the loss; then the command
        fails and the blocks stay fenced (each later command on them fails at once) until
        the server closes that connection. A command sent again after its own connection was
        lost passes (its first copy carries the same data; the I/O command set never has two
        overlapping writes in flight).

        :raises OSError: ``EIO``: the blocks are still fenced at that deadline; ``EBADF``: closed.
        """
        if not self._draining or getattr(_resending, "on", False):
            return
        self._close_drained()
        with self._lock:
            while True:
                if self._closed:
                    raise OSError(errno.EBADF, "the nbd backend is closed")
                conn = self._fence_over(offset, length)
                if conn is None:
                    return
                left = conn.lost_at + self.reconnect_timeout - time.monotonic()
                if left <= 0:
                    raise OSError(errno.EIO, f"NBD blocks at {offset}+{length} fenced: a write to them sent on "
                                             f"a lost connection to {self.uri} may still be carried out (the "
                                             f"server has not closed that connection)")
                self._changed.wait(min(left, 0.5))

    def wait_unfenced(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no lost connection fences anything (a
        migration's stop: the destination would not know the fences).

        :returns: True when none is left.
        """
        end = time.monotonic() + timeout
        self._close_drained()
        with self._lock:
            while any(conn.fencing() for conn in self._draining):
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.5))
        return True

    def fenced(self, offset: int, length: int) -> bool:
        """Whether ``length`` bytes at ``offset`` are fenced now: a lost connection may still
        carry out a write to them (see the module, "Faults")."""
        return bool(self._draining) and self._fence_over(offset, length) is not None

    # -- asynchronous I/O ------------------------------------------------------------------

    def _retry(self, cmd: _Async) -> None:
        """Run ``cmd``'s blocking path on a retry thread (its connection was lost)."""
        with self._lock:
            if self._closed:
                raise OSError(errno.EBADF, "the nbd backend is closed")
            if self._retrier is None:
                self._retrier = ThreadPoolExecutor(self.queue_depth, thread_name_prefix="nbd-retry")
            retrier = self._retrier
        retrier.submit(cmd.retry)

    def _submit(self, buf: Any, offset: int, done: Callable[[int], object], blocking: Callable[[], None],
                span: tuple[int, int] | None = None, *, write: bool = False, flags: int = 0) -> bool:
        """Start a command without waiting: ``done`` is called once it ends (see
        :meth:`submit_readv`). Sent from here while the dispatcher sleeps, else queued for it;
        the dispatcher is woken only when it sleeps and no wake-up is pending (one kick per
        burst of commands, not per command). False: not issued (no live connection), nothing
        will be called. ``span``: a write's (offset, length) (:attr:`_Connection.writes`)."""
        slot = next(self._next) % self.connections
        conn = self._conns[slot]
        if conn is None or conn.dead or self._closed or conn.handle is None:
            return False
        cmd = _Async(self, conn, slot, done, blocking,
                     time.monotonic() + self.timeout if self.timeout > 0 else None, buf, span,
                     write=write, offset=offset, flags=flags)
        if span is not None:
            conn.writes[cmd] = span
        with self._lock:
            self.inflight += 1
            if self.inflight > self.max_inflight:
                self.max_inflight = self.inflight
        conn.pending.add(cmd)
        h = conn.handle
        if not conn.awake and not conn.kicked and not conn.submitted and h is not None:
            # the dispatcher sleeps in poll: sent from here, without waking it up (a thread
            # hand-over less per burst; libnbd's handle lock orders this with the dispatcher
            # waking meanwhile), and woken only when libnbd has more to send
            try:
                if write:
                    h.aio_pwrite(buf, offset, completion=cmd, flags=flags)
                else:
                    h.aio_pread(buf, offset, completion=cmd)
            except self.nbd.Error as exc:
                conn.writes.pop(cmd, None)  # (not sent: it cannot land)
                cmd.err = errno.ENOTCONN if h.aio_is_dead() or h.aio_is_closed() else _errno_of(exc)
                conn.completed.append(cmd)
            else:
                if not h.aio_get_direction() & self.nbd.AIO_DIRECTION_WRITE:
                    if conn._fds_closed:  # (the dispatcher ended meanwhile: nobody polls the handle)
                        conn._strand()
                    return True
            if not conn.kick():
                conn._strand()  # (the dispatcher ended: what it never saw retired is lost)
            return True
        conn.submitted.append(cmd)
        if not conn.awake and not conn.kicked:
            conn.kicked = True
            if not conn.kick():  # (the dispatcher ended: the command is lost, settled here)
                conn.abandon()
        return True

    def submit_readv(self, views: list[memoryview], offset: int, done: Callable[[int], object]) -> bool:
        """Start an ``NBD_CMD_READ`` into one view and return at once; ``done(error)`` (0 or an
        errno) is called exactly once when it ends, on the connection's dispatcher thread (or a
        retry thread, after a lost connection was reopened), possibly before this returns.
        The optional asynchronous half of the :class:`~pcidev_nvme.backends.base.Backend`
        protocol, which the I/O command set uses instead of a worker thread per command.

        The command is queued for the dispatcher thread, which issues it (a command libnbd
        refuses ends with its error), and ``done`` runs there inside ``done.batch()`` when
        ``done`` has that attribute (a round of completions posted together).

        :returns: False when the command was not started (a scatter list, more than one
            request, no live connection): the caller uses :meth:`readv`; ``done`` is not called.
        """
        if len(views) != 1 or len(views[0]) > self.max_request:
            return False
        view = views[0]
        if self._draining and self.fenced(offset, len(view)):
            return False  # (the blocking path waits for the fence)
        nbd = self.nbd
        return self._submit(nbd.Buffer.from_buffer(view), offset, done, lambda: self._read_into(view, offset))

    def submit_writev(self, views: list[memoryview], offset: int, done: Callable[[int], object], *,
                      fua: bool = False) -> bool:
        """Start an ``NBD_CMD_WRITE`` of one view (``fua``: with ``NBD_CMD_FLAG_FUA``) and
        return at once; as :meth:`submit_readv`. A durable write to a server without FUA (a
        write then a flush) is not started here (False)."""
        if len(views) != 1 or len(views[0]) > self.max_request or (fua and not self.can_fua):
            return False
        self._check_writable()
        view = views[0]
        if self._draining and self.fenced(offset, len(view)):
            return False  # (the blocking path waits for the fence)
        nbd = self.nbd
        flags = nbd.CMD_FLAG_FUA if fua else 0
        return self._submit(nbd.Buffer.from_buffer(view), offset, done, lambda: self._write_from(view, offset, flags),
                            (offset, len(view)), write=True, flags=flags)

    # -- I/O ----------------------------------------------------------------------------

    def _check_writable(self) -> None:
        if self.read_only:
            raise OSError(errno.EROFS, "the NBD export is read-only")

    def _pieces(self, view: memoryview) -> Iterator[tuple[memoryview, int]]:
        """``view`` in pieces of at most :attr:`max_request` bytes, with their offsets."""
        step = self.max_request
        if len(view) <= step:
            yield view, 0
            return
        for at in range(0, len(view), step):
            piece = view[at:at + step]
            try:
                yield piece, at
            finally:
                piece.release()

    def _read_into(self, view: memoryview, offset: int) -> None:
        nbd = self.nbd
        for piece, at in self._pieces(view):
            def issue(h: Any, w: _Waiter, p: memoryview = piece, o: int = offset + at) -> object:
                return h.aio_pread(nbd.Buffer.from_buffer(p), o, completion=w)
            self._run(issue, (offset + at, len(piece)))

    def _write_from(self, view: memoryview, offset: int, flags: int) -> None:
        nbd = self.nbd
        for piece, at in self._pieces(view):
            def issue(h: Any, w: _Waiter, p: memoryview = piece, o: int = offset + at) -> object:
                return h.aio_pwrite(nbd.Buffer.from_buffer(p), o, completion=w, flags=flags)
            self._run(issue, (offset + at, len(piece)), write=True)

    def readv(self, views: list[memoryview], offset: int) -> None:
        """``NBD_CMD_READ`` into the views: one view (a contiguous guest buffer) directly, a
        scatter list through one bounce buffer (one request and one copy, rather than a
        round trip per page)."""
        if len(views) == 1:
            self._read_into(views[0], offset)
            return
        total = sum(len(v) for v in views)
        with memoryview(bytearray(total)) as bounce:
            self._read_into(bounce, offset)
            pos = 0
            for v in views:
                n = len(v)
                v[:] = bounce[pos:pos + n]
                pos += n

    def writev(self, views: list[memoryview], offset: int, *, fua: bool = False) -> None:
        """``NBD_CMD_WRITE`` of the views (a scatter list gathered into one bounce buffer);
        with ``fua`` durable on return (the FUA flag, or a flush after)."""
        self._check_writable()
        flags = self.nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        if len(views) == 1:
            self._write_from(views[0], offset, flags)
        else:
            with memoryview(b"".join(views)) as gathered:
                self._write_from(gathered, offset, flags)
        if fua and not self.can_fua:
            self.flush()

    def flush(self) -> None:
        """``NBD_CMD_FLUSH`` (nothing when the server has no write cache to flush). A flush
        the server refuses with ``EPERM`` fails with ``EIO`` (the writes may not be durable: a
        Write Fault), not as a refused write (Namespace is Write Protected)."""
        if not self.can_flush:
            return
        try:
            self._run(lambda h, w: h.aio_flush(completion=w))
        except OSError as exc:
            if exc.errno != errno.EPERM:
                raise
            raise OSError(errno.EIO, f"the NBD server refused the flush: {exc.strerror}") from None

    def _zero(self, offset: int, length: int, flags: int) -> None:
        while length:
            n = min(length, MAX_RANGE)
            def issue(h: Any, w: _Waiter, o: int = offset, k: int = n) -> object:
                return h.aio_zero(k, o, completion=w, flags=flags)
            self._run(issue, (offset, n), write=True)
            offset += n
            length -= n

    def deallocate(self, offset: int, length: int) -> None:
        """``NBD_CMD_WRITE_ZEROES`` letting the server punch a hole (it reads as zeros after;
        ``NBD_CMD_TRIM`` does not promise that), else writes of zeros."""
        self._check_writable()
        if self.can_zero:
            self._zero(offset, length, 0)
        else:
            super().write_zeroes(offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        """``NBD_CMD_WRITE_ZEROES`` keeping the range allocated (``NO_HOLE``; ``FAST_ZERO``
        first where offered), else writes of zeros."""
        self._check_writable()
        nbd = self.nbd
        if not self.can_zero:
            super().write_zeroes(offset, length)
            return
        if self.can_fast_zero:
            try:
                self._zero(offset, length, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FAST_ZERO)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        self._zero(offset, length, nbd.CMD_FLAG_NO_HOLE)

    def _allocated(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """The allocated pieces of ``length`` bytes at ``offset``, in order (maybe adjacent),
        asked :data:`STATUS_RANGE` bytes at a time; at most :data:`MAX_EXTENTS` extents
        of one reply are used (the rest is asked again from where they stop)."""
        nbd = self.nbd
        # (deallocated: a hole that reads as zeros; NBD does not promise a hole reads as zeros)
        unwritten = nbd.STATE_HOLE | nbd.STATE_ZERO
        end = offset + length
        pos = offset
        while pos < end:
            want = min(end - pos, STATUS_RANGE)
            extents: list[tuple[int, int, int]] = []

            def extent(context: str, start: int, entries: list[int], error: Any,
                       _out: list[tuple[int, int, int]] = extents) -> int:
                if context == nbd.CONTEXT_BASE_ALLOCATION:
                    at = start
                    for i in range(0, min(len(entries) - 1, 2 * MAX_EXTENTS - 1), 2):
                        _out.append((at, entries[i], entries[i + 1]))
                        at += entries[i]
                return 0

            def issue(h: Any, w: _Waiter, p: int = pos, k: int = want) -> object:
                return h.aio_block_status(k, p, extent, completion=w)
            self._run(issue)
            covered = pos
            for at, n, flags in extents:
                if at != covered or n <= 0:
                    break
                stop = min(at + n, end)
                if flags & unwritten != unwritten and stop > at:
                    yield at, stop - at
                covered = stop
                if covered >= end:
                    break
            if covered <= pos:  # the server said nothing usable: count the rest as data
                yield pos, end - pos
                return
            pos = covered

    def allocated_ranges(self, offset: int, length: int) -> list[tuple[int, int]]:
        """The allocated extents (``NBD_CMD_BLOCK_STATUS``, ``base:allocation``: all but the
        extents both ``HOLE`` and ``ZERO`` -- a hole not said to read as zeros counts as
        written); all of it when the server has no such context."""
        if length <= 0:
            return []
        if not self.holes:
            return [(offset, length)]
        out: list[tuple[int, int]] = []
        for at, n in self._allocated(offset, length):
            if out and out[-1][0] + out[-1][1] == at:
                out[-1] = (out[-1][0], at + n - out[-1][0])
            else:
                out.append((at, n))
        return out

    def _status_job(self, fn: Callable[[], _T], wait: float) -> _T:
        """``fn()`` (block status) on the backend's status thread, waiting ``wait`` seconds at
        most: one job at a time -- a caller finding one still running (a server that stopped
        answering) waits for it within its own time, never queues behind it -- and a job
        outlives a caller that gave up (it ends within ``timeout``).

        :raises OSError: ``ETIMEDOUT``: not done in time; or ``fn``'s own error.
        """
        end = time.monotonic() + wait
        while True:
            with self._lock:
                if self._closed:
                    raise OSError(errno.EBADF, "the nbd backend is closed")
                job = self._status
                mine = job is None or job.done()
                if mine:
                    if self._status_pool is None:
                        self._status_pool = ThreadPoolExecutor(1, thread_name_prefix="nbd-status")
                    job = self._status = self._status_pool.submit(fn)
            assert job is not None
            left = end - time.monotonic()
            if mine:
                mine_job = cast("Future[_T]", job)
                try:
                    return mine_job.result(timeout=max(left, 0.0))
                except concurrent.futures.TimeoutError:
                    raise OSError(errno.ETIMEDOUT, f"NBD block status not answered within {wait:g} s") from None
            try:  # (another caller's job: wait for it to end, then run ours)
                job.result(timeout=max(left, 0.0))
            except concurrent.futures.TimeoutError:
                raise OSError(errno.ETIMEDOUT, f"NBD block status not answered within {wait:g} s") from None
            except OSError:
                pass

    def allocated_ranges_within(self, offset: int, length: int, wait: float = ADMIN_WAIT) -> list[tuple[int, int]]:
        """:meth:`allocated_ranges` for the admin path (Get LBA Status): answered within
        ``wait`` seconds or ``ETIMEDOUT`` (the optional bounded form of the
        :class:`~pcidev_nvme.backends.base.Backend` protocol's ``allocated_ranges``).

        :raises OSError: ``ETIMEDOUT``, or the server's error.
        """
        if not self.holes or length <= 0:
            return self.allocated_ranges(offset, length)
        return self._status_job(lambda: self.allocated_ranges(offset, length), wait)

    def _count_allocated(self) -> int:
        used = sum(n for _o, n in self._allocated(0, self.size))
        self._nuse_known = used
        return used

    def allocated_bytes(self) -> int:
        """Bytes of the namespace that are not holes (block status), for Identify Namespace's
        NUSE: asked within :data:`ADMIN_WAIT` seconds, else the last value known (all of it
        before one is known, and without block status); not asked while a connection is lost."""
        if not self.holes:
            return self.size
        if any(c is None or c.dead for c in list(self._conns)):
            return self._nuse_known if self._nuse_known is not None else self.size
        try:
            return self._status_job(self._count_allocated, ADMIN_WAIT)
        except OSError:
            return self._nuse_known if self._nuse_known is not None else self.size

    def close(self) -> None:
        """Close the connections. Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns), [None] * len(self._conns)
            conns += self._draining
            self._draining = []
            retrier, self._retrier = self._retrier, None
            status, self._status_pool = self._status_pool, None
            self._changed.notify_all()
        if retrier is not None:  # (queued retries still run: each fails at once, EBADF -> EIO)
            retrier.shutdown(wait=False)
        if status is not None:  # (one job at most, which ends within ``timeout``: not cancelled)
            status.shutdown(wait=False)
        for conn in conns:
            if conn is not None:
                conn.close()

    def describe(self) -> str:
        """One line for logs."""
        ro = ", read-only" if self.read_only else ""
        return f"nbd {self.uri}, {self.size} bytes, {self.connections} connection(s){ro}"


def make_nbd(options: dict[str, Any]) -> NbdBackend:
    """The ``nbd`` factory: takes ``uri``, ``size``, ``readonly``, ``connections``,
    ``queue_depth``, ``reconnect_timeout``, ``timeout`` and ``fence_grace`` from ``options``."""
    if not options.get("uri"):
        raise ConfigError("the nbd backend needs uri=nbd://HOST[:PORT]/EXPORT or "
                          "uri=nbd+unix:///EXPORT?socket=PATH")
    cfg = take_options(NbdConfig, options, what="nbd backend")
    return NbdBackend(cfg.uri, cfg.size, read_only=cfg.readonly, connections=cfg.connections,
                      queue_depth=cfg.queue_depth, reconnect_timeout=cfg.reconnect_timeout, timeout=cfg.timeout,
                      fence_grace=cfg.fence_grace)
