"""Device Self-test (admin opcode 14h) and the Device Self-test log page (LID 06h).

One self-test runs at a time in each controller; without SR-IOV that is one in the NVM
subsystem (Identify Controller DSTO bit 0 set), with it each controller, primary or
secondary, runs its own (DSTO bit 0 clear):

* **short** (STC 1h): :attr:`SelfTest.short_seconds` long (default 2 s; under the
  spec's two minutes);
* **extended** (STC 2h): EDSTT minutes long (Identify Controller; from the capacity at
  :data:`EXTENDED_RATE`, at least one minute); it reads every block of the namespaces
  tested through their backend, spread over its duration;
* **abort** (STC Fh): the running test ends with result 1h (aborted by a Device
  Self-test command); with none running the command just succeeds.

NSID 0 tests the controller only (no namespace: the segments that concern the media
are skipped), FFFFFFFFh the controller and every attached namespace, an attached NSID
that namespace. Another STC 1h/2h while one runs completes with Device Self-test In
Progress (01h/1Dh); any other STC with Invalid Field.

Segments (the spec's list): 1 RAM check, 2 SMART check, 3 volatile memory backup,
4 metadata validation, 5 NVM integrity, 6 data integrity, 7 media check. The media
check (7) fails on a block marked by Write Uncorrectable (both tests look at the
marks; the extended one also reads the media, and an I/O error of the backend fails
it likewise): the result is then 7h (completed, a segment failed), with Segment
Number 7, the NSID and failing LBA, and status Unrecovered Read Error (SCT 2h, SC 81h)
(VDI: NSID, FLBA, SCT and SC valid).

A short test is aborted by a Controller Level Reset (result 2h); an extended one
continues across it. A test of a namespace that is deleted or detached is aborted with
result 3h, one that a Format NVM reaches with 4h; starting a sanitize aborts a test
(result 9h).
:attr:`SelfTest.time_scale` scales every duration (tests use 0.01).

Log (``struct nvme_self_test_log``): current operation, completion percentage, then 20
result entries of 28 bytes (``struct nvme_st_result``), newest first; unused entries
have result Fh.

:meth:`SelfTest.snapshot` / :meth:`SelfTest.restore` carry the results and a test in
progress with its elapsed time (:class:`SelfTestState`, an optional subsection of the
``nvme`` section, written once a self-test ever ran); the destination continues it.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs

from pcidev.vmstate import U8, U32, U64, Bytes, VarArray, vmstate
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.status import NvmeStatusError, Status
from pcidev_nvme.uncorrectable import Uncorrectable

__all__ = ["SelfTest", "SelfTestState", "LID_SELF_TEST", "STC_SHORT", "STC_EXTENDED", "STC_ABORT", "RESULT_OK",
           "RESULT_ABORTED_CMD", "RESULT_ABORTED_RESET",
           "RESULT_ABORTED_NS_REMOVED", "RESULT_ABORTED_FORMAT", "RESULT_SEGMENT_FAILED", "RESULT_ABORTED_SANITIZE",
           "RESULT_UNUSED", "SEGMENT_MEDIA", "EXTENDED_RATE", "edstt_minutes"]

LID_SELF_TEST = 0x06
STC_SHORT, STC_EXTENDED, STC_ABORT = 0x1, 0x2, 0xF
RESULT_OK = 0x0
RESULT_ABORTED_CMD = 0x1
RESULT_ABORTED_RESET = 0x2
RESULT_ABORTED_NS_REMOVED = 0x3
RESULT_ABORTED_FORMAT = 0x4
RESULT_SEGMENT_FAILED = 0x7
RESULT_ABORTED_SANITIZE = 0x9
RESULT_UNUSED = 0xF
SEGMENT_MEDIA = 7
#: bytes per second the extended self-test's EDSTT assumes
EXTENDED_RATE = 256 << 20
ENTRIES = 20
READ_CHUNK = 1 << 20

_ENTRY = struct.Struct("<BBBBQIQBB2x")
assert _ENTRY.size == 28
_BROADCAST = 0xFFFFFFFF
_OFF_NSID, _OFF_CDW10 = 4, 40


def edstt_minutes(capacity: int) -> int:
    """EDSTT: minutes an extended self-test of ``capacity`` bytes takes (at least 1)."""
    return max(1, min(0xFFFF, -(-capacity // (EXTENDED_RATE * 60))))


@vmstate("nvme/self-test")
@attrs.frozen
class SelfTestState:
    """The results (raw entries, newest first) and a test in progress."""

    results: VarArray[Bytes[28], 20]
    current: U8  # 0 none, 1 short, 2 extended
    nsid: U32
    elapsed_us: U64
    duration_us: U64
    failed_nsid: U32 = 0
    failed_lba: U64 = 0
    failed: U8 = 0


class SelfTestHost(Protocol):
    """What :class:`SelfTest` uses of the controller."""

    @property
    def namespaces(self) -> Mapping[int, Namespace]: ...
    @property
    def allocated(self) -> Mapping[int, Namespace]: ...


class SelfTest:
    """The device self-test of one controller (see the module docstring).

    :param ctrl: the controller (its attached namespaces).
    :param uncorrectable: the Write Uncorrectable marks.
    :param power_on_hours: the SMART power-on hours (each result records them).
    """

    def __init__(self, ctrl: SelfTestHost, uncorrectable: Uncorrectable, power_on_hours: Callable[[], int]) -> None:
        self.ctrl = ctrl
        self.uncorrectable = uncorrectable
        self._poh = power_on_hours
        #: seconds a short test takes (before :attr:`time_scale`)
        self.short_seconds = 2.0
        #: seconds EDSTT asks for an extended test now (the controller: from the capacity)
        self.edstt_seconds: Callable[[], float] = lambda: 60.0
        self._extended_seconds: float | None = None
        #: multiplies every duration (tests: 0.01)
        self.time_scale = 1.0
        self._lock = threading.Condition()
        self.results: list[bytes] = []
        self.current = 0
        self.nsid = 0
        self._elapsed_before = 0.0  # seconds run before the last (re)start
        self._started = 0.0
        self._duration = 0.0
        self._read_pos: dict[int, int] = {}
        self._failed: tuple[int, int] | None = None
        self._paused = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._token = 0
        self.ever = False

    @property
    def extended_seconds(self) -> float:
        """Seconds an extended test takes (before :attr:`time_scale`): EDSTT as Identify
        Controller reports it when the test starts, unless set (tests)."""
        return self._extended_seconds if self._extended_seconds is not None else self.edstt_seconds()

    @extended_seconds.setter
    def extended_seconds(self, seconds: float) -> None:
        self._extended_seconds = seconds

    # -- the command -----------------------------------------------------------------------
    def command(self, nsid: int, cdw10: int) -> None:
        """Execute a Device Self-test command.

        :raises NvmeStatusError: Invalid Field (also for an allocated namespace that is not
            attached), Invalid Namespace, Device Self-test In Progress.
        """
        stc = cdw10 & 0xF
        if stc not in (STC_SHORT, STC_EXTENDED, STC_ABORT):
            raise NvmeStatusError(Status.INVALID_FIELD, f"self-test code {stc:#x} is not supported",
                                  param_offset=_OFF_CDW10)
        if stc == STC_ABORT:
            self.abort(RESULT_ABORTED_CMD)
            return
        if nsid not in (0, _BROADCAST) and nsid not in self.ctrl.namespaces:
            if nsid in self.ctrl.allocated:  # an inactive namespace (allocated, not attached)
                raise NvmeStatusError(Status.INVALID_FIELD, f"namespace {nsid} is not attached",
                                      param_offset=_OFF_NSID)
            raise NvmeStatusError(Status.INVALID_NSID, f"namespace {nsid:#x} does not exist", param_offset=_OFF_NSID)
        with self._lock:
            if self.current:
                raise NvmeStatusError(Status.SELF_TEST_IN_PROGRESS, "a device self-test is in progress")
            self.ever = True
            self.current = stc
            self.nsid = nsid
            self._elapsed_before = 0.0
            self._duration = (self.short_seconds if stc == STC_SHORT else self.extended_seconds) * self.time_scale
            self._read_pos = {}
            self._failed = None
            self._started = time.monotonic()
            self._token += 1
        self._start_worker()

    def _targets(self) -> list[Namespace]:
        ns = self.ctrl.namespaces
        if self.nsid == _BROADCAST:
            return [ns[n] for n in sorted(ns)]
        got = ns.get(self.nsid)
        return [got] if got is not None else []

    # -- the worker ------------------------------------------------------------------------------
    def _start_worker(self) -> None:
        t = threading.Thread(target=self._work, args=(self._token,), name="nvme-self-test", daemon=True)
        self._thread = t
        t.start()

    def elapsed(self) -> float:
        """Seconds the current test has run."""
        if not self.current:
            return 0.0
        if self._paused:
            return self._elapsed_before
        return self._elapsed_before + time.monotonic() - self._started

    def _work(self, token: int) -> None:
        while True:
            with self._lock:
                if self._token != token or not self.current or self._closed:
                    return
                if self._paused:
                    self._lock.wait()
                    continue
                frac = min(self.elapsed() / self._duration, 1.0) if self._duration > 0 else 1.0
                current = self.current
            if current == STC_EXTENDED:
                try:
                    self._read_media(frac)
                except Exception:  # a namespace closed under the test (the controller is closing)
                    if self._closed:
                        return
                    raise
            if frac >= 1.0:
                self._complete(token)
                return
            with self._lock:
                self._lock.wait(min(0.05, max(self._duration / 50, 0.001)))

    def _read_media(self, frac: float) -> None:
        """Read the tested namespaces up to ``frac`` of their size (the extended test)."""
        for ns in self._targets():
            pos = self._read_pos.get(ns.nsid, 0)
            goal = int(ns.size * frac) // ns.lba_size * ns.lba_size
            buf = bytearray(min(READ_CHUNK, ns.size))
            mv = memoryview(buf)
            try:
                while pos < goal:
                    n = min(READ_CHUNK, goal - pos)
                    try:
                        ns.backend.readv([mv[:n]], pos)
                    except OSError:
                        if self._failed is None:
                            self._failed = (ns.nsid, pos // ns.lba_size)
                    pos += n
            finally:
                mv.release()
            self._read_pos[ns.nsid] = pos

    def _complete(self, token: int) -> None:
        with self._lock:
            if self._token != token or not self.current:
                return
            failed = self._failed
            if failed is None and self.nsid != 0:
                for ns in self._targets():
                    lba = self.uncorrectable.first_marked(ns.nsid, 0, ns.nlbas)
                    if lba is not None:
                        failed = (ns.nsid, lba)
                        break
            if failed is None:
                self._record(RESULT_OK)
            else:
                self._record(RESULT_SEGMENT_FAILED, segment=SEGMENT_MEDIA, nsid=failed[0], lba=failed[1],
                             status=Status.UNRECOVERED_READ_ERROR)
            self.current = 0
            self._lock.notify_all()

    def _record(self, result: int, *, segment: int = 0, nsid: int | None = None, lba: int | None = None,
                status: int | None = None) -> None:
        """Add a result entry for the current test (lock held)."""
        vdi = 0
        if nsid is None and self.nsid != 0:
            nsid = self.nsid
        if nsid is not None:
            vdi |= 1
        if lba is not None:
            vdi |= 2
        if status is not None:
            vdi |= 4 | 8
        entry = _ENTRY.pack((self.current << 4) | result, segment, vdi, 0, self._poh(), nsid or 0, lba or 0,
                            (status >> 8) & 7 if status is not None else 0, status & 0xFF if status is not None else 0)
        self.results.insert(0, entry)
        del self.results[ENTRIES:]

    def abort(self, result: int) -> bool:
        """End the running test with ``result`` (1h command, 2h reset, 9h sanitize); False if none ran."""
        with self._lock:
            if not self.current:
                return False
            self._record(result)
            self.current = 0
            self._token += 1
            self._lock.notify_all()
        return True

    def namespace_changed(self, nsid: int, result: int) -> None:
        """Namespace ``nsid`` was removed (result 3h) or formatted (4h): a test that covers it ends."""
        if self.current and self.nsid in (nsid, _BROADCAST):
            self.abort(result)

    def controller_reset(self) -> None:
        """A Controller Level Reset: a short test is aborted (result 2h); an extended one continues."""
        if self.current == STC_SHORT:
            self.abort(RESULT_ABORTED_RESET)

    # -- pause / resume / close ------------------------------------------------------------------
    def pause(self) -> None:
        """Stop the clock (a quiesce)."""
        with self._lock:
            if not self._paused:
                self._elapsed_before = self.elapsed()
                self._paused = True

    def resume(self) -> None:
        """Run on (after a quiesce or a restore)."""
        with self._lock:
            was = self._paused
            if not was:
                return
            self._paused = False
            self._started = time.monotonic()
            self._lock.notify_all()
            start = bool(self.current) and (self._thread is None or not self._thread.is_alive())
        if start:
            self._start_worker()

    def close(self) -> None:
        """Stop the worker."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)

    # -- the log page --------------------------------------------------------------------------
    def log_page(self) -> bytes:
        """The 564-byte Device Self-test log page."""
        with self._lock:
            cur = self.current
            pct = int(min(self.elapsed() / self._duration, 0.99) * 100) if cur and self._duration > 0 else 0
            entries = list(self.results)
        unused = _ENTRY.pack(RESULT_UNUSED, 0, 0, 0, 0, 0, 0, 0, 0)
        entries += [unused] * (ENTRIES - len(entries))
        return bytes([cur, pct, 0, 0]) + b"".join(entries)

    # -- state -------------------------------------------------------------------------------
    def snapshot(self) -> SelfTestState | None:
        """The results and a test in progress (None: no self-test ever ran)."""
        if not self.ever:
            return None
        with self._lock:
            f = self._failed
            return SelfTestState(results=tuple(self.results), current=self.current, nsid=self.nsid,
                                 elapsed_us=int(self.elapsed() * 1e6), duration_us=int(self._duration * 1e6),
                                 failed_nsid=f[0] if f else 0, failed_lba=f[1] if f else 0, failed=int(f is not None))

    def restore(self, state: SelfTestState | None) -> None:
        """Take ``state``; a test in progress continues at :meth:`resume`."""
        with self._lock:
            self._token += 1
            self._paused = True
            if state is None:
                self.ever, self.results, self.current = False, [], 0
                return
            self.ever = True
            self.results = [bytes(e) for e in state.results]
            self.current = state.current
            self.nsid = state.nsid
            self._elapsed_before = state.elapsed_us / 1e6
            self._duration = state.duration_us / 1e6
            self._failed = (state.failed_nsid, state.failed_lba) if state.failed else None
            # the media read so far is read again at the destination (reads change nothing)
            self._read_pos = {}
            self._thread = None
