"""A migration destination that follows the protocol up to a point and then dies.

The points come from :data:`PROTOCOL`, the migration exchange of
:mod:`pcidev.migration.channel` frame by frame (one line per frame type): a destination
dies *before* each frame (before reading it, or before sending it), in the *middle* of
each frame split in two (half of a large one read, half of a destination's answer
written) and *after* the last one. A frame type the
channel does not define (yet) gives no point; one it defines but this list does not
name fails :func:`unlisted_frames` (so a new frame cannot be forgotten here).

How it dies (:data:`DEATHS`):

* ``kill``: a real process, SIGKILLed at the point (:class:`Zygote` forks one per case);
* ``reset``: an abrupt end of its socket (TCP: an RST, ``SO_LINGER`` 0; UNIX: a close);
* ``hang``: it stops reading and writing and keeps the socket open until the test (or
  the source's ``stall``) ends it, so the source's timeouts are what ends the wait.

The destination's end of the socket is a :class:`Tripwire`: it passes every read and write
through to the real socket, parses the frames going by, and calls the death when the point
comes; the destination itself is the real :func:`~pcidev.migration.channel.migrate_in`
(through :meth:`~pcidev.transport.endpoint.DeviceEndpoint.accept_incoming` or
``accept_handover``) on a fresh device.

Run as a script, ``python killpoints.py zygote`` is the :class:`Zygote`'s process, and
``python killpoints.py handover POINT DEATH -m pcidev ARGS...`` a vfio-user handover's new
process (``pcidev handover``'s ``exec``: :func:`handover_exec`) whose channel to the old
one is a :class:`Tripwire`.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from pcidev.bar import RamBacking
from pcidev.device import PciDevice
from pcidev.devices.edu import EduDevice
from pcidev.errors import PcidevError
from pcidev.migration import channel
from pcidev.migration.channel import FRAME_HEADER, NACK, STATE, frame_meta, recv_frame, send_meta
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.transport.address import listen
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.fdpass import SCM_MAX_FD, close_fds
from pcidev.transport.link.server import LinkServer
from pcidev.vmstate.dump import dump_stream_json


def _framing_modules() -> list[Any]:
    """The modules that frame the channel: :mod:`pcidev.migration.channel`, and the one it
    takes its framing from (``pcidev.migration.frames``) where that exists."""
    try:
        return [channel, importlib.import_module("pcidev.migration.frames")]
    except ImportError:
        return [channel]


#: frame type -> its name, as the channel knows them
FRAME_NAMES: dict[int, str] = next(m._NAMES for m in _framing_modules() if hasattr(m, "_NAMES"))
#: frame name -> its type
FRAME_KINDS = {name: kind for kind, name in FRAME_NAMES.items()}
SOURCE = "source"
DESTINATION = "destination"
DEATHS = ("kill", "reset", "hang")
#: the link a dying destination names in its ACK: connecting fails at once (ENOTDIR)
NOWHERE = "unix:/dev/null/killpoints"


@attrs.frozen
class Step:
    """One frame of the migration exchange.

    :ivar name: the frame type's constant in :mod:`pcidev.migration.channel`.
    :ivar sender: who sends it (:data:`SOURCE` or :data:`DESTINATION`).
    :ivar split: a point in its middle too (half its bytes): a large frame, or an answer whose
        half must not count as the whole.
    :ivar needs: when it is part of the exchange: ``""`` always, ``"fds"`` more descriptors
        than one frame carries, ``"commit"`` with ``commit=True``, ``"running"`` unless the
        destination waits for its host (``deferred``: over TCP without commit), ``"precopy"`` a
        channel without descriptors and a device with memory to stream, ``"preflight"`` the
        source asks before anything stops (every exchange but one with an older peer),
        ``"sync"`` pre-copy passes run before the stop, each ended by a SYNC round trip (the
        device link's two phases; a handover, ``commit``, copies everything at the stop).
    """

    name: str
    sender: str
    split: bool = False
    needs: str = ""


#: The migration exchange in the order its frames go (one line per frame type).
PROTOCOL = (
    Step("CHECK", SOURCE, needs="preflight"),  # the pre-flight, while the device still runs
    Step("VERDICT", DESTINATION, split=True, needs="preflight"),
    Step("MEMORY", SOURCE, needs="precopy"),  # pre-copy (protocol 2), while the device still runs
    Step("CHUNK", SOURCE, split=True, needs="precopy"),
    Step("SYNC", SOURCE, needs="sync"),  # the end of a pass (negotiated in the pre-flight)
    Step("SYNCED", DESTINATION, split=True, needs="sync"),
    Step("OFFER", SOURCE),
    Step("FDS", SOURCE, needs="fds"),
    Step("STATE", SOURCE, split=True),
    Step("ACK", DESTINATION, split=True),
    Step("COMMIT", SOURCE),  # every migration: the destination runs only after it
    Step("RUNNING", DESTINATION, split=True),  # (deferred too: before its host's RESUME)
)
#: The frames that precede and follow it in a vfio-user handover (the new process's view).
HANDOVER_BEFORE = (Step("READY", DESTINATION), Step("CONN", SOURCE))
HANDOVER_AFTER = (Step("SERVING", DESTINATION),)
#: The steps that come before the source stops the device (a death there stops nothing).
BEFORE_STOP = ("preflight", "precopy", "sync")
#: Frames of the channel that are not a step of an exchange that works: refusals, and the
#: handover's request and answer (on another connection).
NOT_STEPS = ("NACK", "ABORT", "HANDOVER", "REPORT")


def defined(step: Step) -> bool:
    """Whether the channel defines the frame type of ``step``."""
    return step.name in FRAME_KINDS


def unlisted_frames() -> list[str]:
    """The channel's frame types that neither :data:`PROTOCOL`, the handover's steps nor
    :data:`NOT_STEPS` name (must be empty)."""
    listed = {s.name for s in PROTOCOL + HANDOVER_BEFORE + HANDOVER_AFTER} | set(NOT_STEPS)
    return sorted(set(FRAME_KINDS) - listed)


@attrs.frozen
class Point:
    """Where the destination dies: ``before``, in the middle (``mid``: half its bytes) of, or
    ``after`` the first frame of ``step``'s type."""

    step: Step
    phase: str

    @property
    def kind(self) -> int:
        """The frame type."""
        return FRAME_KINDS[self.step.name]

    @property
    def name(self) -> str:
        """``before-OFFER``, ``mid-STATE``, ``after-RUNNING``..."""
        return f"{self.phase}-{self.step.name}"


def points(*, fds: bool = False, commit: bool = False, deferred: bool = False, precopy: bool = False,
           handover: bool = False, preflight: bool = True) -> list[Point]:
    """The kill points of one configuration, in protocol order: before every frame, in the
    middle of every split one, after the last.

    :param fds: more descriptors than one frame carries (UNIX).
    :param commit: the exchange ends with COMMIT and RUNNING (``commit=True``).
    :param deferred: the destination acknowledges ``deferred`` (TCP without commit): no RUNNING.
    :param precopy: memory is streamed before the stop (only where the channel defines it).
    :param handover: the vfio-user handover's READY, CONN and SERVING around it.
    :param preflight: the exchange starts with the pre-flight (where the channel defines it).
    """
    have = {"": True, "fds": fds, "commit": commit, "running": commit or not deferred, "precopy": precopy,
            "preflight": preflight, "sync": precopy and preflight and not commit}
    steps = [s for s in PROTOCOL if have[s.needs] and defined(s)]
    if handover:
        steps = [*HANDOVER_BEFORE, *steps, *HANDOVER_AFTER]
    out: list[Point] = []
    for step in steps:
        out.append(Point(step, "before"))
        if step.split:
            out.append(Point(step, "mid"))
    out.append(Point(steps[-1], "after"))
    return out


def point_named(name: str) -> Point:
    """The point called ``name`` (``mid-STATE``...)."""
    phase, _, frame = name.partition("-")
    for step in PROTOCOL + HANDOVER_BEFORE + HANDOVER_AFTER:
        if step.name == frame:
            return Point(step, phase)
    raise ValueError(f"no kill point {name!r}")


class RamEdu(EduDevice):
    """An edu with RAM in BAR 2: its memfd travels over UNIX; over TCP its contents (pre-copy,
    where the channel has it; else a blocker)."""

    RAM_SIZE = 64 << 10

    def describe(self) -> None:
        super().describe()
        self.ram = RamBacking(self.RAM_SIZE, name="edu-ram")
        self.add_mem_bar(2, self.RAM_SIZE, self.ram, bits64=True, prefetchable=True)

    def on_close(self) -> None:
        super().on_close()
        self.ram.close()


def make_device(registry: Any, device: str, props: str) -> PciDevice:
    """``ram-edu`` (:class:`RamEdu`), or a registered device type."""
    return RamEdu(props) if device == "ram-edu" else registry.create(device, props)


class Died(BaseException):
    """Raised through the destination's code after it died (in a thread)."""


# ------------------------------------------------------------------------ the tripwire
class Tripwire:
    """The destination's end of the migration channel: the real socket, watched.

    Every read and write goes to ``sock``; the frames going by are parsed (their header),
    and ``die`` is called at ``point`` (it must not return: it raises :class:`Died` or ends
    the process). ``trace`` lists the frames that went through whole, in order.

    :param sock: the real socket.
    :param point: where to die (None: never).
    :param die: called once at the point.
    """

    def __init__(self, sock: socket.socket, point: Point | None, die: Callable[[], None]) -> None:
        self.sock = sock
        self.family = sock.family
        self.point = point
        self._die = die
        self.trace: list[str] = []
        self._in: list[int] = [0, 0, 0]  # kind, frame length (header + body), bytes read of it
        self._out: list[int] = [0, 0, 0]

    def _at(self, kind: int, phase: str) -> bool:
        return self.point is not None and self.point.kind == kind and self.point.phase == phase \
            and self.trace.count(self.point.step.name) == 0

    def _trip(self) -> None:
        self._die()
        raise Died(self.point.name if self.point else "")

    def _went(self, kind: int) -> None:
        """A whole frame went through (read or written)."""
        self.trace.append(FRAME_NAMES.get(kind, str(kind)))
        if self.point is not None and self.point.kind == kind and self.point.phase == "after" \
                and self.trace.count(self.point.step.name) == 1:
            self._trip()

    # -- reading ---------------------------------------------------------------------------
    def _peek_header(self) -> None:
        deadline = time.monotonic() + (self.sock.gettimeout() or 3600.0)
        while True:
            head = self.sock.recv(FRAME_HEADER.size, socket.MSG_PEEK)
            if len(head) == FRAME_HEADER.size or not head or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if len(head) < FRAME_HEADER.size:
            return  # the end, or garbage: the real read reports it
        _magic, kind, _flags, length = FRAME_HEADER.unpack(head)
        self._in = [kind, FRAME_HEADER.size + length, 0]
        if self._at(kind, "before"):
            self._trip()

    def _limit(self, want: int) -> int:
        if self._in[1] == 0:
            self._peek_header()
        kind, total, done = self._in
        if total and self._at(kind, "mid"):
            half = total // 2
            if done < half:
                return min(want, half - done)
        return want

    def _read(self, n: int) -> None:
        if self._in[1] == 0 or n <= 0:
            return
        self._in[2] += n
        kind, total, done = self._in
        if done == total // 2 and self._at(kind, "mid"):
            self._trip()
        if done >= total:
            self._in = [0, 0, 0]
            self._went(kind)

    def recvmsg_into(self, buffers: list[memoryview], ancbufsize: int = 0, flags: int = 0) -> Any:
        view = memoryview(buffers[0])
        result = self.sock.recvmsg_into([view[:self._limit(len(view))]], ancbufsize, flags)
        self._read(result[0])
        return result

    def recv_into(self, buffer: memoryview, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer)
        n = self.sock.recv_into(view[:self._limit(nbytes or len(view))], 0, flags)
        self._read(n)
        return n

    # -- writing ---------------------------------------------------------------------------
    def _write(self, data: bytes | memoryview) -> int:
        """How many bytes of ``data`` may go (all, or up to the middle of the frame)."""
        if self._out[1] == 0 and len(data) >= FRAME_HEADER.size:
            _magic, kind, _flags, length = FRAME_HEADER.unpack(bytes(data[:FRAME_HEADER.size]))
            self._out = [kind, FRAME_HEADER.size + length, 0]
            if self._at(kind, "before"):
                self._trip()
        kind, total, done = self._out
        if total and self._at(kind, "mid") and done < total // 2:
            return min(len(data), total // 2 - done)
        return len(data)

    def _wrote(self, n: int) -> None:
        self._out[2] += n
        kind, total, done = self._out
        if total and done == total // 2 and self._at(kind, "mid"):
            self._trip()
        if total and done >= total:
            self._out = [0, 0, 0]
            self._went(kind)

    def sendmsg(self, buffers: list[memoryview], ancdata: Any = (), flags: int = 0) -> int:
        view = memoryview(buffers[0])
        n = self.sock.sendmsg([view[:self._write(view)]], ancdata, flags)
        self._wrote(n)
        return n

    def send(self, data: bytes | memoryview, flags: int = 0) -> int:
        view = memoryview(data)
        n = self.sock.send(view[:self._write(view)], flags)
        self._wrote(n)
        return n

    # -- the rest goes to the socket --------------------------------------------------------
    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def gettimeout(self) -> float | None:
        return self.sock.gettimeout()

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def reset(sock: socket.socket) -> None:
    """End ``sock`` abruptly: an RST over TCP (``SO_LINGER`` 0), a close over UNIX."""
    try:
        if sock.family != socket.AF_UNIX and sock.fileno() >= 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def watch_resumes(device: PciDevice) -> list[float]:
    """A list that gets the time of each resume of ``device`` (did it run?)."""
    resumed: list[float] = []
    resume = device.on_resume

    def on_resume() -> None:
        resumed.append(time.monotonic())
        resume()

    device.on_resume = on_resume  # type: ignore[method-assign]
    return resumed


def _receive(endpoint: DeviceEndpoint, wire: Any, *, commit: bool, link: str, timeout: float) -> None:
    if commit:
        endpoint.accept_handover(wire, timeout=timeout)
    else:
        endpoint.accept_incoming(wire, link=link, timeout=timeout)


# -------------------------------------------------------------- destinations in a thread
class DyingDestination:
    """A destination in a thread that dies at ``point`` (``death`` ``reset`` or ``hang``).

    :param address: where it listens (``unix:PATH`` or ``tcp:127.0.0.1:0``).
    :param make_device: builds its (fresh) device.
    :param point: where it dies.
    :param death: ``reset`` or ``hang``.
    :param commit: it takes the device with ``commit=True`` (a handover's new process).
    """

    def __init__(self, address: str, make_device: Callable[[], PciDevice], point: Point, death: str, *,
                 commit: bool = False, timeout: float = 10.0) -> None:
        assert death in ("reset", "hang")
        self.listener = listen(address, backlog=1)
        self.address = str(self.listener.address)
        self.point, self.death, self.commit, self.timeout = point, death, commit, timeout
        self.make_device = make_device
        self.release = threading.Event()
        #: the point was reached (the destination died there)
        self.reached = False
        #: the destination's device ran (resumed) before it died
        self.ran = False
        #: what migrate_in raised, if it ended otherwise
        self.error: BaseException | None = None
        self.trace: list[str] = []
        self._thread = threading.Thread(target=self._run, name=f"dying-{point.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.listener.sock.settimeout(30)
            conn, _ = self.listener.sock.accept()
        except OSError as exc:
            self.error = exc
            return
        finally:
            self.listener.close()
        endpoint = DeviceEndpoint(self.make_device())
        self._resumes = watch_resumes(endpoint.device)
        wire = Tripwire(conn, self.point, lambda: self._die(conn))
        try:
            _receive(endpoint, wire, commit=self.commit, link=NOWHERE, timeout=self.timeout)
        except Died:
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            self.trace = wire.trace
            conn.close()
            endpoint.close()

    def _die(self, conn: socket.socket) -> None:
        self.reached = True
        self.ran = bool(self._resumes)
        if self.death == "hang":
            self.release.wait(60)
        reset(conn)

    def end(self, timeout: float = 30.0) -> None:
        """End it (a hang stops hanging), and wait until it is gone."""
        self.release.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the dying destination did not end"
        self.listener.close()


class ServedDestination:
    """A healthy destination in a thread: it receives the device on ``incoming``, then
    serves it over the device link on ``link`` (as ``pcidev.transport.link.process``)."""

    def __init__(self, incoming: str, link: str, make_device: Callable[[], PciDevice]) -> None:
        self.incoming_listener = listen(incoming, backlog=1)
        self.incoming = str(self.incoming_listener.address)
        self.link_listener = listen(link)
        self.link = str(self.link_listener.address)
        self.endpoint = DeviceEndpoint(make_device())
        self.server = LinkServer(self.endpoint, self.link_listener.sock)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="served-destination", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.incoming_listener.sock.settimeout(30)
            conn, _ = self.incoming_listener.sock.accept()
            self.incoming_listener.close()
            try:
                self.endpoint.accept_incoming(conn, link=self.link, timeout=10)
            finally:
                conn.close()
            self.server.serve_forever()
        except BaseException as exc:
            self.error = exc

    def close(self) -> None:
        self.server.stop()
        self._thread.join(10)
        self.incoming_listener.close()
        self.link_listener.close()
        self.endpoint.close()


class StateProbe:
    """A destination that takes the whole state and refuses it (NACK): the source resumes
    untouched, and :attr:`stream` is a save of its state at the stop. It lets the pre-flight
    pass (a VERDICT ``ok`` without features: no SYNC)."""

    def __init__(self, address: str) -> None:
        self.listener = listen(address, backlog=1)
        self.address = str(self.listener.address)
        self.stream = b""
        self._thread = threading.Thread(target=self._run, name="state-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.listener.sock.settimeout(30)
            conn, _ = self.listener.sock.accept()
        finally:
            self.listener.close()
        with conn:
            conn.settimeout(10)
            kind, body, fds = recv_frame(conn, max_fds=SCM_MAX_FD)
            if kind == FRAME_KINDS["CHECK"]:
                send_meta(conn, FRAME_KINDS["VERDICT"], {"protocol": 3, "ok": True, "reasons": [], "features": [],
                                                         "boot_id": ""})
                kind, body, fds = recv_frame(conn, max_fds=SCM_MAX_FD)
            meta = frame_meta(kind, body, {"fds": int, "stream_size": int})
            while len(fds) < meta["fds"]:
                _kind, _body, more = recv_frame(conn, max_fds=SCM_MAX_FD)
                fds += more
            close_fds(fds)
            kind, self.stream, _ = recv_frame(conn, max_len=meta["stream_size"])
            assert kind == STATE
            send_meta(conn, NACK, {"error": "StateProbe", "message": "only looking"})
            conn.settimeout(5)
            conn.recv(1)  # until the source closes

    def join(self) -> bytes:
        """The stream it took."""
        self._thread.join(30)
        return self.stream


#: fields of a stream dump that read a clock (or follow from one): not compared
CLOCK_FIELDS = frozenset({"size", "checksum", "timestamp", "busy_us", "power_on_us"})


def comparable(stream: bytes) -> Any:
    """The dump of ``stream`` with the clock readings (:data:`CLOCK_FIELDS`) set to 0."""
    def zeroed(doc: Any) -> Any:
        if isinstance(doc, dict):
            return {k: (0 if k in CLOCK_FIELDS else zeroed(v)) for k, v in doc.items()}
        if isinstance(doc, list):
            return [zeroed(v) for v in doc]
        return doc
    return zeroed(dump_stream_json(stream))


# ------------------------------------------------------------------ real processes: SIGKILL
class Zygote:
    """A process that forks, for each case, a real destination that SIGKILLs itself at
    the point (forking from a process that has imported everything is fast).

    :meth:`start` returns the address the destination listens on; :meth:`result` waits for
    its end: ``{"reached": point, "ran": bool, "status": -9, "trace": [...]}``.
    """

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__, "zygote"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.events: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="zygote-events", daemon=True)
        self._reader.start()
        self._wait_for("ready", 60)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.update(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.events["eof"] = True
            self._cond.notify_all()

    def _wait_for(self, key: str, timeout: float) -> bool:
        with self._cond:
            self._cond.wait_for(lambda: key in self.events or "eof" in self.events, timeout)
            assert "eof" not in self.events, f"the zygote ended (status {self.proc.poll()})"
            return key in self.events

    def start(self, *, device: str, props: str, address: str, point: Point, commit: bool = False) -> str:
        """Fork a destination of ``device`` that dies at ``point``; returns its address."""
        assert self.proc.stdin is not None
        with self._cond:
            self.events = {}
        self.proc.stdin.write(json.dumps({"device": device, "props": props, "address": address,
                                          "point": point.name, "commit": commit}) + "\n")
        self.proc.stdin.flush()
        assert self._wait_for("listening", 60)
        return str(self.events["listening"])

    def result(self, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the destination's end (SIGKILLed after ``timeout``) and return what it
        reported."""
        if not self._wait_for("status", timeout):
            self.kill_child()
        assert self._wait_for("status", 30)
        with self._cond:
            return dict(self.events)

    def kill_child(self) -> None:
        """SIGKILL the destination now (a source's ``stall``), unless it ended already."""
        assert self._wait_for("child_pid", 30)
        if "status" not in self.events and self.events["child_pid"]:
            try:
                os.kill(self.events["child_pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _say(**event: Any) -> None:
    os.write(1, (json.dumps(event) + "\n").encode())


def _child(conn: socket.socket, device: PciDevice, point: Point, *, commit: bool) -> int:  # pragma: no cover
    """A forked destination: receive the device on ``conn`` and SIGKILL this process at ``point``."""
    try:
        endpoint = DeviceEndpoint(device)
        resumes = watch_resumes(device)
        wire: Tripwire

        def die() -> None:
            _say(reached=point.name, ran=bool(resumes), trace=wire.trace)
            os.kill(os.getpid(), signal.SIGKILL)

        wire = Tripwire(conn, point, die)
        _receive(endpoint, wire, commit=commit, link=NOWHERE, timeout=10)
        _say(completed=True, trace=wire.trace)
        return 0
    except PcidevError as exc:
        _say(error=f"{type(exc).__name__}: {exc}")
        return 1


def _zygote_main() -> int:  # pragma: no cover - runs in its own process
    registry = load_registry(make_plugin_manager())
    _say(ready=True)
    for line in sys.stdin:
        req = json.loads(line)
        point = point_named(req["point"])
        listener = listen(req["address"], backlog=1)
        _say(listening=str(listener.address))
        listener.sock.settimeout(60)
        try:
            conn, _ = listener.sock.accept()
        except OSError as exc:
            _say(child_pid=None, status=None, error=str(exc))
            continue
        finally:
            listener.close()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(conn, make_device(registry, req["device"], req["props"]), point, commit=req["commit"])
            finally:
                os._exit(code)
        conn.close()
        _say(child_pid=pid)
        _, status = os.waitpid(pid, 0)
        _say(status=os.waitstatus_to_exitcode(status))
    return 0


# ------------------------------------------------------------ a handover's new process
def handover_exec(where: str, point: Point, death: str) -> str:
    """An executable (in the directory ``where``) to give as a handover's ``exec``: the new
    process it starts dies at ``point`` (``kill`` or ``hang``)."""
    path = os.path.join(where, f"new-process-{point.name}-{death}")
    with open(path, "w") as f:
        script = os.path.abspath(__file__)
        f.write(f'#!/bin/sh\nexec "{sys.executable}" "{script}" handover {point.name} {death} "$@"\n')
    os.chmod(path, 0o755)
    return path


def _handover_main(point_name: str, death: str, argv: list[str]) -> int:  # pragma: no cover
    """Run ``python -m pcidev`` with the handover channel watched (its first frame is READY)."""
    point = point_named(point_name)
    wires: list[Tripwire] = []

    def die() -> None:
        if death == "hang":
            time.sleep(3600)  # the old process kills this one
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(sock: Any) -> Any:
        if not wires:
            wires.append(Tripwire(sock, point, die))
        return wires[0] if wires[0].sock is sock else sock

    for module in _framing_modules():  # every frame read or written passes here
        if hasattr(module, "_recv") and hasattr(module, "_send"):
            recv, send = module._recv, module._send
            module._recv = lambda sock, recv=recv, **kw: recv(wrap(sock), **kw)
            module._send = lambda sock, kind, body=b"", fds=(), send=send, **kw: send(wrap(sock), kind, body, fds,
                                                                                      **kw)
    assert argv[:2] == ["-m", "pcidev"], argv
    sys.argv = ["pcidev", *argv[2:]]
    runpy.run_module("pcidev", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:2] == ["handover"]:
        sys.exit(_handover_main(sys.argv[2], sys.argv[3], sys.argv[4:]))
    sys.exit(_zygote_main() if sys.argv[1:] == ["zygote"] else 2)
