"""Sanitize (admin opcode 84h) and the Sanitize Status log page (LID 81h).

A sanitize operation alters all user data of every namespace so it cannot be
recovered. :class:`Sanitizer` runs one in the background (its own thread), block
range by block range, and reports its progress in the Sanitize Status log.

Sanitize Action (CDW10 2:0), as Identify Controller SANICAP advertises them
(CES, BES and OWS set; NDI clear; NODMMAS = 01b: the media is not additionally
modified after a sanitize with No-Deallocate After Sanitize):

=====  =====================  ========================================================
SANACT Operation              What the namespaces read afterwards
=====  =====================  ========================================================
1h     Exit Failure Mode      (leaves the unrestricted failure mode; nothing is erased)
2h     Block Erase            zeroes (deallocated; with NDAS: zeroes written, allocated)
3h     Overwrite              OWPASS passes (0 = 16) of the 32-bit OVRPAT (CDW11),
                              inverted between passes with OIPBP; afterwards deallocated
                              (zeroes), or with NDAS the last pass's pattern
4h     Crypto Erase           each namespace gets a new media encryption key; what was
                              written under the old one is gone: deallocated (zeroes),
                              or with NDAS each block reads as a keyed pattern (BLAKE2b
                              of the new key and the LBA, repeated), unrelated to before
=====  =====================  ========================================================

Without NDAS (CDW10 bit 9) every block is deallocated at the end (DLFEAT: reads return
zeroes). Every Write Uncorrectable mark is cleared.

**While it runs** (NVMe Base 2.0, "Sanitize Operations"): every I/O command but Flush
completes with Sanitize In Progress (00h/1Dh), and so does every admin command but
Abort, Asynchronous Event Request, the queue commands, Doorbell Buffer Config, Get/Set
Features, Identify, Keep Alive and Get Log Page of the Error Information, SMART,
Changed Namespace List and Sanitize Status logs (:meth:`Sanitizer.refuses`) -- and,
a deliberate deviation from the spec's list, of the Commands Supported and Effects log
(05h), which Linux reads when it re-initialises a controller after a reset. The
Firmware Slot (03h), Device Self-test (06h) and Feature Identifiers Supported (12h)
logs are refused. A controller reset (CC.EN 1->0, a PCI reset, an NVM Subsystem
Reset) does not stop it: the operation goes on and the commands stay refused
after the reset. The Error Information log reports LBA 0 in every entry meanwhile. When
it ends, an asynchronous event of type I/O Command Specific Status (6h), information
Sanitize Operation Completed (01h), log page 81h is posted (one of an earlier operation
still queued, not reported, is dropped when a new operation starts).

**Refused** (nothing starts): while the Persistent Memory Region is enabled (Sanitize
Prohibited While Persistent Memory Region is Enabled, 01h/23h; and while a sanitize
runs or failed, an enabled PMR keeps PMRSTS.NRDY set), while a namespace is write
protected (a read-only image: Namespace is Write Protected, 00h/20h). The operation
starts once the admin work queued before (a Format NVM) and the I/O in flight are
done, without a time limit (nothing written before may land on erased media).

**Failure**: if the backend fails, the operation fails (SSTAT 011b); with AUSE=1 the
controller is in the *unrestricted* failure mode and Exit Failure Mode ends it, with
AUSE=0 in the *restricted* one where only a new sanitize with AUSE=0 ends it (Exit
Failure Mode: Command Sequence Error; AUSE=1: Sanitize Failed). Until then the refused commands complete with Sanitize
Failed (00h/1Ch).

**Log page** (``struct nvme_sanitize_log_page``): SPROG (progress, numerator over 65536,
FFFFh when none runs), SSTAT (status 2:0, completed overwrite passes 7:3, Global Data
Erased 8: set by a successful sanitize, cleared by the next Write, Copy, Write Zeroes or
Write Uncorrectable or by enabling the Persistent Memory Region), SCDW10 of
the command that started the last operation, and the estimated times (seconds) of
an overwrite (16 passes, the most OWPASS asks for), a block erase and a crypto erase
from :attr:`Sanitizer.rate`; the three "with No-Deallocate Media Modification" times
are FFFFFFFFh (not reported: NODMMAS = 01b, the media is not modified after a
sanitize with NDAS).

**Migration**: :meth:`Sanitizer.snapshot` / :meth:`Sanitizer.restore` carry the status
and an operation in progress (action, passes, pattern, the namespace and offset reached),
which the destination continues (:class:`SanitizeState`, an optional subsection of the
``nvme`` section, written once a sanitize ever ran). :meth:`Sanitizer.pause` stops the
worker at a chunk boundary (the quiesce), :meth:`Sanitizer.resume` lets it go on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import attrs

from pcidev.vmstate import U8, U32, U64, Bool, VarArray, vmstate
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.status import NvmeStatusError, Status
from pcidev_nvme.uncorrectable import Uncorrectable

__all__ = ["Sanitizer", "SanitizeState", "SanitizeKey", "LID_SANITIZE", "SANICAP", "SANACT_EXIT_FAILURE",
           "SANACT_BLOCK_ERASE", "SANACT_OVERWRITE", "SANACT_CRYPTO_ERASE", "SSTAT_NEVER", "SSTAT_SUCCESS",
           "SSTAT_IN_PROGRESS", "SSTAT_FAILED", "INFO_SANITIZE_COMPLETED", "SANITIZE_COMPLETED_EVENT", "ALLOWED_ADMIN",
           "ALLOWED_LOGS"]

log = logging.getLogger(__name__)

LID_SANITIZE = 0x81
SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE, SANACT_OVERWRITE, SANACT_CRYPTO_ERASE = 1, 2, 3, 4
SSTAT_NEVER, SSTAT_SUCCESS, SSTAT_IN_PROGRESS, SSTAT_FAILED = 0, 1, 2, 3
#: SANICAP: CES (0), BES (1), OWS (2); NDI (29) clear; NODMMAS (31:30) = 01b
SANICAP = 0x7 | (1 << 30)
#: asynchronous event type I/O Command Specific Status and its Sanitize Operation Completed information
AER_IO_SPECIFIC = 6
INFO_SANITIZE_COMPLETED = 0x01
#: the event a sanitize operation posts when it ends (type, information, log page)
SANITIZE_COMPLETED_EVENT = (AER_IO_SPECIFIC, INFO_SANITIZE_COMPLETED, 0x81)
#: admin opcodes processed while a sanitize runs (the others: Sanitize In Progress)
ALLOWED_ADMIN = frozenset({0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18, 0x7C})
#: log pages Get Log Page returns while a sanitize runs
ALLOWED_LOGS = frozenset({0x01, 0x02, 0x04, 0x05, LID_SANITIZE})
#: an estimated time the log page does not report
NO_ESTIMATE = 0xFFFFFFFF
#: bytes one step of the worker alters
CHUNK = 1 << 20
#: bytes per second the estimated times assume when :attr:`Sanitizer.rate` is unset
NOMINAL_RATE = 1 << 30

_OFF_CDW10 = 40
_LOG = struct.Struct("<HHIIIIIII")


@vmstate("nvme/sanitize-key")
@attrs.frozen
class SanitizeKey:
    """The media encryption key of a namespace after a crypto erase."""

    nsid: U32
    key: bytes


@vmstate("nvme/sanitize")
@attrs.frozen
class SanitizeState:
    """The sanitize status and an operation in progress."""

    sstat: U8
    passes_done: U8
    global_erased: Bool
    writes_at_erase: U64
    scdw10: U32
    failure_mode: U8  # 0 none, 1 unrestricted (AUSE=1), 2 restricted (AUSE=0)
    running: Bool
    action: U8
    pattern: U32
    ns_index: U32
    offset: U64
    keys: VarArray[SanitizeKey, 1024] = ()


class SanitizeHost(Protocol):
    """What :class:`Sanitizer` uses of the controller."""

    @property
    def allocated(self) -> Mapping[int, Namespace]: ...
    def io_inflight_for(self, nsids: set[int]) -> bool: ...


class Sanitizer:
    """The sanitize operation of one NVM subsystem (see the module docstring).

    :param ctrl: the controller (its namespaces).
    :param uncorrectable: the Write Uncorrectable marks (cleared by a sanitize).
    :param post_event: ``post_event(etype, info, lid)``: the asynchronous events.
    :param set_refuse: ``set_refuse(status)``: what I/O completes with (0: executed).
    :param writes: the SMART host write command count (Global Data Erased).
    :param on_start: called when an operation starts (a device self-test is aborted).
    :param pmr_enabled: whether the Persistent Memory Region is enabled (PMRCTL.EN): a
        sanitize is then refused.

    :ivar rate: bytes per second the worker alters (None: as fast as the backend goes);
        tests slow it down to watch the progress.
    """

    def __init__(self, ctrl: SanitizeHost, uncorrectable: Uncorrectable, post_event: Callable[[int, int, int], None],
                 set_refuse: Callable[[int], None], writes: Callable[[], int],
                 on_start: Callable[[], None] | None = None, pmr_enabled: Callable[[], bool] | None = None) -> None:
        self.ctrl = ctrl
        self.uncorrectable = uncorrectable
        self._post_event = post_event
        self._set_refuse = set_refuse
        self._writes = writes
        self._on_start = on_start or (lambda: None)
        self._pmr_enabled = pmr_enabled or (lambda: False)
        #: done() of the admin work queued before the Sanitize command (a Format NVM)
        self._before: Callable[[], bool] = lambda: True
        self.rate: float | None = None
        self._lock = threading.Condition()
        self.sstat = SSTAT_NEVER
        self.passes_done = 0
        self.global_erased = False
        self.writes_at_erase = 0
        self.scdw10 = 0
        self.failure_mode = 0
        self.ever = False
        # the operation in progress
        self.running = False
        self.action = 0
        self.pattern = 0
        self.ns_index = 0
        self.offset = 0
        self.keys: dict[int, bytes] = {}
        self._thread: threading.Thread | None = None
        self._paused = False
        self._at_boundary = True
        self._closed = False
        #: AUSE of the operation in progress (the failure mode it leads to)
        self._ause = False
        #: a secondary controller's: the primary's sanitizer (:meth:`follow`)
        self._subsystem: Sanitizer | None = None

    def follow(self, subsystem: Sanitizer) -> None:
        """Make this the sanitizer of a secondary controller (SR-IOV), which never runs an
        operation itself: a sanitize acts on the whole NVM subsystem, so while the
        primary's (``subsystem``) runs or failed this controller refuses what it refuses
        (:meth:`refuses`, :meth:`check_admin`), its Sanitize Status log is the primary's
        (the log's scope is the NVM subsystem), and its writes clear the primary's
        Global Data Erased (:meth:`data_written`)."""
        self._subsystem = subsystem

    # -- what the controller asks -------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A sanitize operation is in progress (on a secondary controller: the primary's)."""
        sub = self._subsystem
        return self.running if sub is None else sub.running

    def refuses(self) -> int:
        """The status refused commands complete with now (0: none is refused)."""
        sub = self._subsystem
        if sub is not None:
            return sub.refuses()
        if self.running:
            return Status.SANITIZE_IN_PROGRESS
        if self.failure_mode:
            return Status.SANITIZE_FAILED
        return 0

    def check_admin(self, opcode: int, lid: int | None = None) -> None:
        """Raise the refusal for an admin command while sanitizing (or in failure mode).

        :param opcode: the admin opcode.
        :param lid: the log page of a Get Log Page.
        :raises NvmeStatusError: Sanitize In Progress / Sanitize Failed.
        """
        status = self.refuses()
        if not status or opcode == 0x84 and status == Status.SANITIZE_FAILED:
            return
        if opcode in ALLOWED_ADMIN and (opcode != 0x02 or lid in ALLOWED_LOGS):
            return
        raise NvmeStatusError(status, f"admin opcode {opcode:#04x} is refused "
                              + ("while a sanitize operation is in progress" if self.busy
                                 else "until the failed sanitize is recovered"))

    def data_written(self) -> None:
        """User data changed by something the SMART write count leaves out (Write Zeroes,
        Write Uncorrectable, enabling the Persistent Memory Region; on a secondary controller
        its writes too): Global Data Erased clears."""
        sub = self._subsystem
        if sub is not None:
            sub.data_written()
            return
        with self._lock:
            self.global_erased = False

    # -- the command ----------------------------------------------------------------------
    def command(self, cdw10: int, cdw11: int, before: Callable[[], bool] | None = None) -> None:
        """Execute a Sanitize command (it completes at once; the operation runs on).

        :param before: ``before()`` is True once the admin work queued before this command
            (a Format NVM in the background) is done: the operation waits for it.
        :raises NvmeStatusError: Invalid Field, Sanitize In Progress, Command Sequence Error,
            Sanitize Failed (AUSE=1 in the restricted failure mode), Namespace is Write
            Protected (a read-only namespace), Sanitize Prohibited While Persistent Memory
            Region is Enabled.
        """
        sanact = cdw10 & 7
        ause = bool(cdw10 & (1 << 3))
        if sanact not in (SANACT_EXIT_FAILURE, SANACT_BLOCK_ERASE, SANACT_OVERWRITE, SANACT_CRYPTO_ERASE):
            raise NvmeStatusError(Status.INVALID_FIELD, f"sanitize action {sanact} is not supported",
                                  param_offset=_OFF_CDW10)
        if cdw10 & ~0x3FF:
            raise NvmeStatusError(Status.INVALID_FIELD, "reserved bits of CDW10 are set", param_offset=_OFF_CDW10 + 1)
        with self._lock:
            if self.running:
                raise NvmeStatusError(Status.SANITIZE_IN_PROGRESS, "a sanitize operation is in progress")
            if sanact == SANACT_EXIT_FAILURE:
                if self.failure_mode == 2:
                    raise NvmeStatusError(Status.CMD_SEQ_ERROR, "the failed sanitize used AUSE=0 (restricted "
                                          "completion): only a new sanitize operation recovers")
                self.failure_mode = 0
                self._set_refuse(0)
                return
            if self.failure_mode == 2 and ause:
                raise NvmeStatusError(Status.SANITIZE_FAILED, "restricted failure mode: only a sanitize with "
                                      "AUSE=0 recovers", param_offset=_OFF_CDW10)
            if self._pmr_enabled():
                raise NvmeStatusError(Status.PMR_SAN_PROHIBITED, "the Persistent Memory Region is enabled")
            protected = sorted(n for n, ns in self.ctrl.allocated.items() if ns.read_only)
            if protected:
                raise NvmeStatusError(Status.NS_WRITE_PROTECTED, f"namespace(s) {protected} are write protected")
            self.ever = True
            self.running = True
            self.action = sanact
            self.pattern = cdw11 & 0xFFFFFFFF
            self.ns_index = 0
            self.offset = 0
            self.passes_done = 0
            self.scdw10 = cdw10
            self.sstat = SSTAT_IN_PROGRESS
            self.global_erased = False
            self.failure_mode = 0
            self._ause = ause
            self._before = before or (lambda: True)
            if sanact == SANACT_CRYPTO_ERASE:
                self.keys = {nsid: os.urandom(32) for nsid in sorted(self.ctrl.allocated)}
            self._set_refuse(Status.SANITIZE_IN_PROGRESS)
        self._on_start()
        self._start_worker()

    # -- the worker --------------------------------------------------------------------------
    @property
    def _ndas(self) -> bool:
        return bool(self.scdw10 & (1 << 9))

    @property
    def _passes(self) -> int:
        n = (self.scdw10 >> 4) & 0xF
        return n or 16

    def _start_worker(self) -> None:
        t = threading.Thread(target=self._work, name="nvme-sanitize", daemon=True)
        self._thread = t
        t.start()

    def _steps(self) -> int:
        """Passes over the namespaces: OWPASS for an overwrite (plus the deallocation), else 1."""
        if self.action == SANACT_OVERWRITE:
            return self._passes + (0 if self._ndas else 1)
        return 1

    def progress(self) -> int:
        """SPROG: the fraction done, numerator over 65536 (FFFFh when nothing runs)."""
        if not self.running:
            return 0xFFFF
        nss = [self.ctrl.allocated[n].size for n in sorted(self.ctrl.allocated)]
        total = sum(nss) or 1
        done = sum(nss[:self.ns_index]) + self.offset
        frac = (self.passes_done + done / total) / self._steps()
        return min(int(frac * 65536), 0xFFFE)

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._paused and not self._closed:
                    self._at_boundary = True
                    self._lock.notify_all()
                    self._lock.wait()
                if self._closed or not self.running:
                    self._at_boundary = True
                    self._lock.notify_all()
                    return
                self._at_boundary = False
            try:
                done = self._step()
            except Exception as exc:  # a backend failure: the operation failed
                log.warning("sanitize failed: %s", exc)
                self._finish(failed=True)
                return
            if done:
                with self._lock:  # a quiesce in progress: the destination (or the resume) finishes
                    while self._paused and not self._closed:
                        self._at_boundary = True
                        self._lock.notify_all()
                        self._lock.wait()
                    if self._closed:
                        self._at_boundary = True
                        self._lock.notify_all()
                        return
                self._finish(failed=False)
                return
            if self.rate:
                with self._lock:
                    self._at_boundary = True
                    self._lock.notify_all()
                    self._lock.wait(CHUNK / self.rate)

    def _step(self) -> bool:
        """Alter one chunk; True once the whole operation is done."""
        if self.passes_done >= self._steps():
            return True  # (restored after the last chunk, before the completion)
        nsids = sorted(self.ctrl.allocated)
        if self.ns_index == 0 and self.offset == 0 and self.passes_done == 0:
            # Nothing written before the command may land after its region was erased: wait
            # (without a limit: a stuck write must not survive a "successful" sanitize) for
            # the admin work queued before (a Format NVM) and the I/O in flight.
            while not self._closed and (not self._before() or self.ctrl.io_inflight_for(set(nsids))):
                time.sleep(0.001)
            if self._closed:
                return False
        if self.ns_index >= len(nsids):
            with self._lock:
                self.passes_done += 1
                self.ns_index = 0
                self.offset = 0
                return self.passes_done >= self._steps()
        ns = self.ctrl.allocated[nsids[self.ns_index]]
        n = min(CHUNK, ns.size - self.offset)
        if self.offset == 0 and ns.meta is not None:
            # the metadata (and PI) is user data too: gone (a punched hole) before the data
            # is touched, so an interrupted sanitize leaves unchecked PI, never stale PI
            ns.meta.deallocate(0, ns.nlbas)
        self._alter(ns, self.offset, n)
        if self.offset + n >= ns.size:
            self.uncorrectable.clear_namespace(ns.nsid)
        with self._lock:  # (SPROG never goes backwards)
            self.offset += n
            if self.offset >= ns.size:
                self.ns_index += 1
                self.offset = 0
        return False

    def _alter(self, ns: Namespace, offset: int, n: int) -> None:
        b = ns.backend
        action, ndas = self.action, self._ndas
        if action == SANACT_OVERWRITE and self.passes_done < self._passes:
            pat = self.pattern
            if self.scdw10 & (1 << 8) and self.passes_done % 2:  # OIPBP: inverted every other pass
                pat ^= 0xFFFFFFFF
            b.writev([memoryview(struct.pack("<I", pat) * (n // 4))], offset)
        elif action == SANACT_CRYPTO_ERASE and ndas:
            key = self.keys.get(ns.nsid, b"")
            lba = ns.lba_size
            keyed = bytearray(n)
            for pos in range(0, n, lba):
                digest = hashlib.blake2b(struct.pack("<Q", (offset + pos) // lba), key=key[:64] or b"\0").digest()
                keyed[pos:pos + lba] = (digest * (lba // len(digest) + 1))[:lba]
            b.writev([memoryview(keyed)], offset)
        elif ndas:  # block erase, no deallocation: zeroes, allocated
            b.write_zeroes(offset, n)
        else:  # the final deallocation
            b.deallocate(offset, n)

    def _finish(self, *, failed: bool) -> None:
        for ns in list(self.ctrl.allocated.values()):
            try:
                ns.flush()  # the data and the metadata
            except OSError as exc:
                log.warning("flush after sanitize of namespace %d failed: %s", ns.nsid, exc)
                failed = True
        with self._lock:
            self.running = False
            if failed:
                self.sstat = SSTAT_FAILED
                self.failure_mode = 1 if self._ause else 2
                self._set_refuse(Status.SANITIZE_FAILED)
            else:
                self.sstat = SSTAT_SUCCESS
                self.passes_done = self._passes if self.action == SANACT_OVERWRITE else 0
                self.global_erased = True
                self.writes_at_erase = self._writes()
                self._set_refuse(0)
        # the event is queued before a quiesce can see the boundary: a snapshot taken after
        # the pause has the completed status and the event together
        self._post_event(AER_IO_SPECIFIC, INFO_SANITIZE_COMPLETED, LID_SANITIZE)
        with self._lock:
            self._at_boundary = True
            self._lock.notify_all()

    # -- pause / resume / close ------------------------------------------------------------------
    def pause(self, timeout: float = 30.0) -> bool:
        """Stop the worker at a chunk boundary (a quiesce); returns whether it stopped."""
        with self._lock:
            self._paused = True
            deadline = time.monotonic() + timeout
            while not self._at_boundary:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def resume(self) -> None:
        """Let the worker go on (after a quiesce or a restore)."""
        with self._lock:
            self._paused = False
            self._lock.notify_all()
            start = self.running and (self._thread is None or not self._thread.is_alive())
        if start:
            self._start_worker()

    def close(self) -> None:
        """Stop the worker (the controller is closing)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=30)

    # -- the log page ------------------------------------------------------------------------
    def log_page(self) -> bytes:
        """The 512-byte Sanitize Status log page (on a secondary controller: the primary's)."""
        sub = self._subsystem
        if sub is not None:
            return sub.log_page()
        with self._lock:
            ge = self.global_erased and self._writes() == self.writes_at_erase
            if self.global_erased and not ge:
                self.global_erased = False
            sstat = self.sstat | ((self.passes_done & 0x1F) << 3) | (int(ge) << 8)
            sprog = self.progress()
            scdw10 = self.scdw10
        total = sum(ns.size for ns in list(self.ctrl.allocated.values()))
        rate = self.rate or NOMINAL_RATE

        def secs(nbytes: float) -> int:
            return min(max(1, math.ceil(nbytes / rate)), 0xFFFFFFFE)

        erase = secs(total / 64)  # deallocation is cheap: a sixty-fourth of writing everything
        page = bytearray(512)
        _LOG.pack_into(page, 0, sprog, sstat, scdw10,
                       secs(16 * total) + erase,  # overwrite (16 passes), then the deallocation
                       erase, erase,  # block erase, crypto erase
                       # "with No-Deallocate Media Modification": none (SANICAP.NODMMAS = 01b)
                       NO_ESTIMATE, NO_ESTIMATE, NO_ESTIMATE)
        return bytes(page)

    # -- state --------------------------------------------------------------------------------
    def snapshot(self) -> SanitizeState | None:
        """The status and an operation in progress (call paused), or None if no sanitize ever ran."""
        if not self.ever:
            return None
        with self._lock:
            return SanitizeState(
                sstat=self.sstat, passes_done=self.passes_done, global_erased=self.global_erased,
                writes_at_erase=self.writes_at_erase, scdw10=self.scdw10, failure_mode=self.failure_mode,
                running=self.running, action=self.action, pattern=self.pattern, ns_index=self.ns_index,
                offset=self.offset,
                keys=tuple(SanitizeKey(n, k) for n, k in sorted(self.keys.items())) if self.running else ())

    def restore(self, state: SanitizeState | None) -> None:
        """Take ``state`` (None: never sanitized); an operation in progress continues at
        :meth:`resume`."""
        with self._lock:
            self._paused = True
            if state is None:
                self.ever = False
                self.sstat, self.passes_done, self.global_erased = SSTAT_NEVER, 0, False
                self.writes_at_erase, self.scdw10, self.failure_mode, self.running = 0, 0, 0, False
                self.keys = {}
            else:
                self.ever = True
                self.sstat, self.passes_done = state.sstat, state.passes_done
                self.global_erased, self.writes_at_erase = state.global_erased, state.writes_at_erase
                self.scdw10, self.failure_mode, self.running = state.scdw10, state.failure_mode, state.running
                self.action, self.pattern = state.action, state.pattern
                self.ns_index, self.offset = state.ns_index, state.offset
                self.keys = {k.nsid: bytes(k.key) for k in state.keys}
                self._ause = bool(self.scdw10 & 8)
        self._set_refuse(self.refuses())
