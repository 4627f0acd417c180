"""A raw peer against a served device: what the ``vfio-user`` and ``link`` fuzz targets share.

Both build a device behind a server for each input (:meth:`PeerSession.open`), run the
server's loop on a thread, talk to it through a raw socket (up to :data:`MAX_MESSAGES`
fuzz-chosen messages, each answered or ending the session, then one liveness probe),
close their end and check how the server ended: no exception escaped its loop, it
returned within the session's ``reply_seconds`` (else ``hang``), no traceback was logged
and no file descriptor is left open (:class:`PeerTarget`).

What is kept between inputs is only what carries no state of an input: the thread the
server loops run on (:class:`ServerThread`; starting a thread per input was half of an
input's time, measured with cProfile) and, for the link, the private directory its
socket lives in. The device, its endpoint (DMA maps, interrupt eventfds, migration
state), the server and both sockets are new for every input, so that an input replays
the same way alone or after any other one (:attr:`PeerTarget.transcript` records the
answers, for checking that).
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable
from typing import Any, ClassVar

from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, open_fd_count

__all__ = ["MAX_MESSAGES", "PeerSession", "PeerTarget", "ServerJob", "ServerThread"]

#: the most fuzz-chosen messages one input sends (the liveness probe comes on top)
MAX_MESSAGES = 16


class ServerJob:
    """One server loop submitted to a :class:`ServerThread`: how it ended.

    :param loop: the server's loop (returns a reason, or raises).
    """

    def __init__(self, loop: Callable[[], object]) -> None:
        self.loop = loop
        #: what the loop returned
        self.result: object = None
        #: what escaped the loop, if anything
        self.exc: BaseException | None = None
        self._done = threading.Event()

    def run(self) -> None:
        """Run the loop, recording its result or the exception that escaped it."""
        try:
            self.result = self.loop()
        except BaseException as exc:
            self.exc = exc
        finally:
            self._done.set()

    @property
    def done(self) -> bool:
        """Whether the loop has ended."""
        return self._done.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the loop to end. :returns: whether it ended."""
        return self._done.wait(timeout)


class ServerThread:
    """A long-lived thread that runs server loops (:class:`ServerJob`) one after another.

    A loop that never ends (a ``hang`` finding) keeps its thread: the next
    :meth:`submit` starts a fresh thread and leaves the stuck one (a daemon) behind.

    :param name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[ServerJob | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._last: ServerJob | None = None

    def submit(self, loop: Callable[[], object]) -> ServerJob:
        """Run ``loop`` on the thread (started, or replaced if its last loop is stuck).

        :returns: the job, to wait for.
        """
        if self._thread is None or not self._thread.is_alive() or (self._last is not None and not self._last.done):
            if self._thread is not None:
                self._jobs.put(None)  # the stuck thread ends if its loop ever returns
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._work, args=(self._jobs,), name=self.name, daemon=True)
            self._thread.start()
        job = self._last = ServerJob(loop)
        self._jobs.put(job)
        return job

    @staticmethod
    def _work(jobs: queue.SimpleQueue[ServerJob | None]) -> None:
        while (job := jobs.get()) is not None:
            job.run()

    def close(self, timeout: float = 5.0) -> None:
        """End the thread (after its current loop, waiting up to ``timeout`` seconds)."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None
        self._last = None


class PeerSession:
    """One input against one freshly served device: subclass it and implement
    :meth:`open`, :meth:`message` and :meth:`probe` (and :meth:`greet`, :meth:`stop`,
    :meth:`release` when needed).

    :param inp: the decoded input.
    :param reply_seconds: longest the server may take to answer, and to end once the peer closed.
    """

    #: the server loop's name (in findings)
    serving: ClassVar[str] = "serve"

    def __init__(self, inp: FuzzInput, reply_seconds: float) -> None:
        self.inp = inp
        self.reply_seconds = reply_seconds
        #: what the server answered, one tuple per reply (see :attr:`PeerTarget.transcript`)
        self.transcript: list[tuple[Any, ...]] = []

    # -- what a subclass provides ---------------------------------------------------------
    def open(self) -> tuple[Callable[[], object], socket.socket]:
        """Build the device and its server.

        :returns: the server's loop (run on the :class:`ServerThread`) and the peer's socket.
        """
        raise NotImplementedError

    def greet(self, sock: socket.socket) -> bool:
        """What comes before the fuzzed messages (a connect, a handshake).

        :returns: whether the session goes on.
        """
        return True

    def message(self, sock: socket.socket) -> bool:
        """Send one fuzz-chosen message and check its answer.

        :returns: whether the session goes on (False: the server closed).
        :raises FuzzFinding: the answer broke an invariant.
        """
        raise NotImplementedError

    def probe(self, sock: socket.socket) -> None:
        """Send the last message, which checks that the connection is still answered.

        :raises FuzzFinding: the answer broke an invariant.
        """

    def stop(self) -> None:
        """Ask the server to end (the peer has closed its socket)."""

    def release(self) -> None:
        """Free the device and what the server left (called once its loop ended)."""

    # -- the shared loop ------------------------------------------------------------------
    def talk(self, sock: socket.socket) -> None:
        """:meth:`greet`, up to :data:`MAX_MESSAGES` messages while input remains, :meth:`probe`."""
        if not self.greet(sock):
            return
        count = 0
        while self.inp.remaining and count < MAX_MESSAGES:
            count += 1
            if not self.message(sock):
                return
        self.probe(sock)

    def run(self, server: ServerThread) -> None:
        """Serve, talk, close, and check how the server ended.

        :param server: the thread the server's loop runs on.
        :raises FuzzFinding: an invariant broke (the server's own failure first: it may
            explain what the peer saw).
        """
        loop, sock = self.open()
        job = server.submit(loop)
        talk: FuzzFinding | None = None
        try:
            self.talk(sock)
        except FuzzFinding as finding:
            talk = finding
        finally:
            sock.close()
            self.stop()
            ended = job.wait(self.reply_seconds)
            if ended:
                self.release()
        if job.exc is not None:
            raise FuzzFinding.escaped(job.exc, self.serving)
        if not ended:
            raise FuzzFinding("hang", f"{self.serving} did not end within {self.reply_seconds:g} s of the peer "
                              "closing", where=self.serving)
        if talk is not None:
            raise talk


class PeerTarget(FuzzTarget):
    """A fuzz target whose inputs are :class:`PeerSession` s: set :attr:`session` to the
    session's class and implement :meth:`reply_seconds` if the module's bound may change.

    Adds the checks around a session: no traceback logged
    (:class:`~pcidev.testing.fuzz.ErrorLogWatch`), no more descriptors open after it
    than before (``fd-leak``).
    """

    #: the class of one input's session
    session: ClassVar[type[PeerSession]] = PeerSession

    def __init__(self) -> None:
        self._server: ServerThread | None = None
        #: the answers of the last input's session (what its server replied, in order)
        self.transcript: list[tuple[Any, ...]] = []

    def setup(self) -> None:
        """Start the thread the server loops run on."""
        if self._server is None:
            self._server = ServerThread(f"fuzz-{self.name}")

    def make_session(self, inp: FuzzInput) -> PeerSession:
        """One input's session (override to pass the target's shared pieces)."""
        return self.session(inp, self.reply_seconds())

    def reply_seconds(self) -> float:
        """The bound on each reply and on the server's end (default 5 s)."""
        return 5.0

    def run(self, data: bytes) -> None:
        """Run one input's session and check it.

        :param data: the fuzzer's bytes.
        :raises FuzzFinding: an invariant broke.
        """
        self.setup()
        assert self._server is not None
        before = open_fd_count()
        session = self.make_session(FuzzInput(data))
        with ErrorLogWatch() as watch:
            try:
                session.run(self._server)
            finally:
                self.transcript = session.transcript
            watch.check(f"{self.name} session")
        after = open_fd_count()
        if after > before:
            raise FuzzFinding("fd-leak", f"{after - before} file descriptor(s) left open by one session")

    def close(self) -> None:
        """End the server thread."""
        if self._server is not None:
            self._server.close()
            self._server = None
