"""The NVMe plugin's fuzz target ``nvme-guest``: a hostile guest against the controller.

Registered as the ``fuzz-target/nvme-guest`` component (``pcidev_nvme.plugin``) and
run by ``pcidev fuzz nvme-guest`` (:mod:`pcidev.testing.fuzz`). Each input is decoded
into a sequence of guest actions against a fresh controller (two 256 KiB namespaces)
on a fresh :class:`~pcidev.host.Machine`, probed by
``NvmeDriver`` (``pcidev_nvme.testing.driver``):

* admin and I/O commands with fuzzed opcode, namespace and command dwords, whose data
  pointer is a PRP pair, a PRP list or an SGL (data block, bit bucket, segments) built
  from fuzzed choices; every address it names lies in a buffer of its own, in page 0
  (what a zero pointer names) or beyond guest RAM;
* raw 64-byte submission queue entries;
* register and doorbell writes anywhere in BAR0 (CC, AQA/ASQ/ACQ, INTMS, doorbells...).

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* no exception escapes a BAR access or the controller's workers (``ctrl.failed``
  stays ``None``, and no traceback is logged);
* no guest-memory write outside what a command named: a canary page before and after
  every buffer, and a bystander region no command names, are checked after each action
  (until the guest moves the admin queues with ASQ/ACQ: then any page may be named);
* every BAR access returns within :data:`STEP_SECONDS`, and while the guest has only
  sent well-formed queue traffic every command but an Asynchronous Event Request
  completes within :data:`COMPLETION_SECONDS`;
* CSTS.CFS is never set by command traffic (only register garbage may set it);
* after a Function Level Reset the controller comes up again (admin queues, Identify
  Controller, an I/O queue pair), and namespace 2 (which no action names) is untouched in
  its backend and reads back through the controller as its backend holds it;
* the process's file descriptor count is the same after the input as before it.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from typing import ClassVar

import attrs

from pcidev.device import PciDevice
from pcidev.errors import VMStateError
from pcidev.host import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.pci import ids
from pcidev.pci.config import ResetKind
from pcidev.testing.fuzz.restore import MachineTemplate
from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, open_fd_count
from pcidev.testing.fuzz.vmstate_target import VmstateTarget
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.testing.driver import Completion, NvmeDriver, NvmeDriverError

__all__ = ["COMPLETION_SECONDS", "STEP_SECONDS", "NvmeGuestTarget", "NvmeVmstateTarget"]

log = logging.getLogger(__name__)

PAGE = 4096
#: longest a single BAR access may take (generous: the machine is shared)
STEP_SECONDS = 2.0
#: longest a well-formed command may take to complete
COMPLETION_SECONDS = 5.0
#: an address beyond guest RAM (DMA to it must fail with a status, not a crash)
OUTSIDE = 1 << 40
_CANARY = b"\x5A\xC3" * (PAGE // 2)
_BYSTANDER = bytes(range(256)) * (4 * PAGE // 256)
_NS2_PATTERN = b"\xB7\x2E\x91\x4C" * (PAGE // 4)
_SGL = struct.Struct("<QIxxxB")
_SQE = struct.Struct("<BBHIIIQQQIIIIII")
_RAM = 8 << 20
#: the controller's configuration, parsed once (the serial fixed: an input sees the same
#: Identify data however often it runs)
_CONFIG = NvmeConfig.coerce("ns=mem:size=256K,ns=mem:size=256K,mdts=5,serial=PCIDEVFUZZ0002")

_ADMIN_OPS = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x0D, 0x10, 0x11, 0x14, 0x15, 0x18,
              0x19, 0x1C, 0x1D, 0x1E, 0x7C, 0x80, 0x81, 0x82, 0x84, 0x86, 0xC0, 0xFF)
_IO_OPS = (0x00, 0x01, 0x02, 0x04, 0x05, 0x08, 0x09, 0x0C, 0x0D, 0x0E, 0x11, 0x15, 0x19, 0x79, 0x7D, 0x81)
#: admin commands that may legitimately change every namespace (Namespace Management,
#: Namespace Attachment, Format NVM, Sanitize) or queue memory we do not own
_WIDE_ADMIN = frozenset({0x0D, 0x15, 0x80, 0x84})
_NSIDS = (1, 1, 1, 0, 0xFFFFFFFF, 3, 0xFFFFFFFE)
_HOT_REGS = (0x0C, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3C, 0x50, 0x54, 0x58,
             0x1000, 0x1004, 0x1008, 0x100C, 0x1010, 0x1014)


class NvmeGuestTarget(FuzzTarget):
    """``nvme-guest``: guest MMIO, doorbells, SQEs and PRP/SGL data pointers against
    the NVMe controller through the software host (see the module's documentation)."""

    name: ClassVar[str] = "nvme-guest"
    summary: ClassVar[str] = "NVMe controller: guest registers, doorbells, SQEs and PRP/SGL data pointers"
    invariants: ClassVar[tuple[str, ...]] = (
        "no exception escapes the device", "no guest-memory write outside named buffers",
        "bounded BAR accesses and completions", "CSTS.CFS never set by commands",
        "FLR recovers and namespace 2 is untouched", "fd count unchanged")
    #: coverage of the controller, the framework code it runs on (BAR dispatch, config
    #: space and capabilities, DMA, interrupts) and this decoder guides the fuzzer; the
    #: test driver and the software host are the harness and run uninstrumented, and so
    #: does the controller's migration code, which only the restore before each input runs
    #: (the same way every time: no guest action reaches it but its ``paused`` flag)
    instrument: ClassVar[tuple[str, ...]] = (
        "pcidev_nvme", "-pcidev_nvme.testing.driver", "-pcidev_nvme.testing.bench", "-pcidev_nvme.migration",
        "pcidev.device", "pcidev.pci", "pcidev.dma", "pcidev.irq", "pcidev.bar", "pcidev.regions")

    def __init__(self, *, reuse: bool = True) -> None:
        #: the steps the last input took, each as its check names it (a completion's
        #: status included): what an input's outcome looks like from outside
        self.steps: list[str] = []
        #: start every input from one saved, probed machine and controller, put back before
        #: each input by a :class:`~pcidev.testing.fuzz.restore.MachineTemplate`; False: build
        #: and probe a fresh controller for each input (what the reuse is tested against)
        self.reuse = reuse
        #: how often the saved world was built again because its controller refused its
        #: own snapshot after an input (it had deleted a configured namespace, which no load
        #: brings back): not a finding, a fresh controller is what the next input meets
        self.rebuilds = 0
        self._world: _World | None = None

    def setup(self) -> None:
        """Build and save the probed world the inputs start from (once; again after a finding)."""
        if self.reuse and self._world is None:
            self._world = _World.saved()

    def close(self) -> None:
        """Close the saved world."""
        if self._world is not None:
            self._world.close()
            self._world = None

    def run(self, data: bytes) -> None:
        """Decode ``data`` into guest actions and check the invariants after each.

        :param data: the fuzzer's bytes.
        :raises FuzzFinding: an invariant broke.
        """
        self.setup()  # (before counting: the saved world's descriptors stay open)
        fds = open_fd_count()
        world = self._world if self._world is not None else _World.fresh()
        ok = False
        try:
            with ErrorLogWatch() as watch:
                try:
                    world.start()
                except Exception as exc:
                    raise FuzzFinding.escaped(exc, "the set-up (restore or probe)") from exc
                run = _GuestRun(FuzzInput(data), watch, world)
                self.steps = run.steps
                run.run()
                # the restore (or the close) waits for what the input left running: what
                # that logs is this input's (review S24b: it went unchecked)
                if self.reuse:
                    self._settle(world)
                else:
                    self._drop(world)
                watch.check("the restore after the input" if self.reuse else "closing the controller")
            ok = True
        finally:
            if not ok:  # a world an input broke is never reused
                self._drop(world)
        # a world the restore dropped is built again before counting: it holds as many
        # descriptors as the one counted before the input (review S24b: dropping it hid
        # the input's own leaks)
        self.setup()
        after = open_fd_count()
        if after > fds:
            raise FuzzFinding("fd-leak", f"{after - fds} file descriptor(s) left open by one input")

    def _drop(self, world: _World) -> None:
        world.close()
        if world is self._world:
            self._world = None

    def _settle(self, world: _World) -> None:
        """Put the saved world back now that the input is done, so that what the input
        made (a namespace, a metadata store: their descriptors) is gone before the
        descriptors are counted. A world whose controller refuses its own snapshot (the
        input deleted a configured namespace, which no load brings back) is built again
        for the next input: that is not a finding (a fresh controller is what the next
        input would have met without the reuse); :attr:`rebuilds` counts them."""
        try:
            world.settle()
        except VMStateError as exc:
            failed = world.ctrl.failed
            self._drop(world)
            if failed is not None:  # it took the snapshot, then failed to apply it
                raise FuzzFinding.escaped(failed, "the restore after the input") from exc
            log.debug("nvme-guest: the saved world is built again (%s)", exc)
            self.rebuilds += 1
        except Exception as exc:
            self._drop(world)
            raise FuzzFinding.escaped(exc, "the restore after the input") from exc

    def seeds(self) -> Iterator[bytes]:
        """Identify, a write and a read with PRPs, the same with an SGL, a PRP list, a
        flush and a doorbell write."""
        def cmd(kind: int, op_index: int, dwords: tuple[int, ...], mode: int, npages: int, offset: int = 0,
                extra: bytes = b"") -> bytes:
            dw = list(dwords) + [0] * (6 - len(dwords))
            return bytes([kind, op_index, 0, 0]) + struct.pack("<6I", *dw) + bytes([mode, npages, 0]) + \
                struct.pack("<H", offset) + extra

        yield cmd(1, 5, (1,), 0, 1)  # admin Identify Controller (CNS 1), PRP1 alone
        yield cmd(2, 1, (0, 0, 7), 0, 1) + cmd(2, 2, (0, 0, 7), 0, 1)  # write, read 8 blocks
        yield cmd(2, 1, (0, 0, 15), 1, 2, 0x200) + cmd(2, 2, (0, 0, 15), 1, 2)  # PRP1 + PRP2
        yield cmd(2, 2, (0, 0, 63), 2, 8, 0, bytes(range(1, 200))) + cmd(2, 0, (), 0, 0)  # PRP list, flush
        yield cmd(2, 1, (0, 0, 7), 4, 1, 0, b"\0" + struct.pack("<I", 4096))  # SGL data block
        yield cmd(2, 2, (0, 0, 7), 4, 2, 0, b"\2\2" + struct.pack("<HH", 0, 4096) * 2)  # SGL segment
        yield cmd(1, 1, (0, 0, 0), 0, 0)  # Get Log Page without a buffer
        yield bytes([0, 16, 2]) + struct.pack("<Q", 1)  # a register write (a doorbell)


class _World:
    """The machine, the controller and the probed driver an input starts from: built and
    probed for each input (:meth:`fresh`), or built once and put back before each input by
    a :class:`~pcidev.testing.fuzz.restore.MachineTemplate` (:meth:`saved`).

    What an input finds at :meth:`start` is the same either way: a controller probed with
    one I/O queue pair, namespace 2's first 8 blocks holding :data:`_NS2_PATTERN`, the
    submission rings zeroed, and the bystander region at :attr:`bystander`. A saved world
    is put back after each input (:meth:`settle`), and again at :meth:`start` only if that
    did not happen.
    """

    def __init__(self) -> None:
        self.machine = Machine(ram_size=_RAM)
        self.ctrl = NvmeController(attrs.evolve(_CONFIG))  # (a copy: the controller owns its config)
        self.pdev = self.machine.plug(self.ctrl)
        self.template: MachineTemplate | None = None
        self.drv: NvmeDriver | None = None
        self.bystander = 0
        #: the saved world is as it was saved (just saved, or settled since the last input)
        self.pristine = False
        self.closed = False

    @classmethod
    def fresh(cls) -> _World:
        """A world that :meth:`start` probes (for one input: close it after)."""
        return cls()

    @classmethod
    def saved(cls) -> _World:
        """A world probed once and saved: :meth:`start` restores it."""
        world = cls()
        try:
            drv = world._probe()
            world.template = MachineTemplate(world.machine, world.pdev)
            world.template.save(drv)
            world.pristine = True
        except BaseException:
            world.close()
            raise
        return world

    def _probe(self) -> NvmeDriver:
        drv = NvmeDriver(self.machine, self.pdev, io_queues=1, io_depth=32, admin_depth=32, aers=0,
                         timeout=COMPLETION_SECONDS)
        drv.probe()
        drv.write(2, 0, _NS2_PATTERN)
        # the set-up's entries stay in the submission rings; a garbage doorbell may make the
        # controller run them again, with buffers that are no longer theirs: zero them
        # (a zero entry is a Delete I/O SQ / Flush of nothing)
        for q in drv.queues.values():
            self.machine.memory.write(q.sq_base, bytes(64 * q.sq_size))
        self.bystander = self.machine.alloc(len(_BYSTANDER), PAGE)
        self.machine.memory.write(self.bystander, _BYSTANDER)
        return drv

    def start(self) -> NvmeDriver:
        """The world as an input starts from it; returns the probed driver (its own copy)."""
        if self.template is None:
            self.drv = self._probe()
        else:
            if not self.pristine:
                self.template.restore()
            self.pristine = False
            self.drv = self.template.host_copy()
        return self.drv

    def settle(self) -> None:
        """Put a saved world back as it was saved (after an input; nothing for a fresh one).

        :raises VMStateError: the controller refused its own snapshot (close the world).
        """
        if self.template is not None and not self.pristine:
            self.template.restore()
            self.pristine = True

    def close(self) -> None:
        """Close the controller and the machine (once; again is nothing)."""
        if self.closed:
            return
        self.closed = True
        if self.template is not None:
            self.template.close()
        else:
            self.ctrl.close()
            self.machine.close()


class _GuestRun:
    """One input against the controller of a :class:`_World` as :meth:`_World.start` left it."""

    def __init__(self, inp: FuzzInput, watch: ErrorLogWatch, world: _World) -> None:
        self.inp = inp
        self.watch = watch
        self.clean = True  # only well-formed queue traffic so far
        #: the guest pointed the admin queues somewhere new (ASQ/ACQ): the controller may
        #: write any page from then on, so the canaries are not checked any more
        self.anywhere = False
        self.ns2_named = False
        self.guards: list[tuple[int, bytes]] = []
        self.machine = world.machine
        self.ctrl = world.ctrl
        self.drv: NvmeDriver | None = world.drv
        self.bystander = world.bystander
        #: each checked step, as :meth:`_check` names it
        self.steps: list[str] = []

    # ------------------------------------------------------------------ checks
    def _check(self, what: str, started: float) -> None:
        self.steps.append(what)
        took = time.monotonic() - started
        if took > STEP_SECONDS:
            raise FuzzFinding("hang", f"{what} took {took:.1f} s", where=what.split(" ")[0])
        if self.ctrl.failed is not None:
            raise FuzzFinding.escaped(self.ctrl.failed, f"{what} (ctrl.failed)")
        self.watch.check(what)
        mem = self.machine.memory
        for addr, want in () if self.anywhere else self.guards:
            got = mem.read(addr, len(want))
            if got != want:
                first = next(i for i in range(len(want)) if got[i] != want[i])
                raise FuzzFinding("memory-outside-buffers",
                                  f"{what}: guest memory at {addr + first:#x} changed outside every named buffer",
                                  where=what.split(" ")[0])
        if self.clean and self.drv is not None and self.drv.csts & 0x2:
            raise FuzzFinding("cfs", f"{what}: CSTS.CFS set by command traffic", where=what.split(" ")[0])

    def _guarded(self, addr: int, data: bytes) -> None:
        self.machine.memory.write(addr, data)
        self.guards.append((addr, data))

    def _buffer(self, npages: int) -> int:
        """``npages`` pages between two canary pages; returns the first buffer page."""
        base = self.machine.alloc((npages + 2) * PAGE, PAGE)
        self._guarded(base, _CANARY)
        self._guarded(base + (npages + 1) * PAGE, _CANARY)
        # the buffer's own bytes read as PRP entries or SGL descriptors point outside RAM
        self.machine.memory.write(base + PAGE, struct.pack("<Q", OUTSIDE) * (npages * PAGE // 8))
        return base + PAGE

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        try:
            self._start()
            steps = 0
            while self.inp.remaining and steps < 24:
                steps += 1
                self._action()
            self._recover()
        except FuzzFinding:
            raise
        except NvmeDriverError as exc:
            if self.clean:
                raise FuzzFinding("driver", f"well-formed traffic failed: {exc}", where=str(exc)[:40]) from exc
        except Exception as exc:
            raise FuzzFinding.escaped(exc, "guest action") from exc
        finally:
            if self.drv is not None:
                self.drv.close()

    def _start(self) -> None:
        self._guarded(self.bystander, _BYSTANDER)

    def _action(self) -> None:
        kind = self.inp.u8() % 5
        if kind == 0:
            self._register()
        elif kind in (1, 2):
            self._command(admin=kind == 1)
        elif kind == 3:
            self._raw_sqe()
        else:
            self._doorbell()

    def _register(self) -> None:
        pick = self.inp.u8()
        off = _HOT_REGS[pick % len(_HOT_REGS)] if pick < 200 else self.inp.u16() % 0x2000
        size = (1, 2, 4, 8)[self.inp.u8() % 4]
        off -= off % size
        value = self.inp.u64() & ((1 << (8 * size)) - 1)
        self.clean = False
        if 0x28 <= off < 0x38:  # ASQ, ACQ: the guest names new queue memory
            self.anywhere = True
        started = time.monotonic()
        self.ctrl.bar_write(0, off, size, value)
        self.ctrl.bar_read(0, 0x1C, 4)
        self._check(f"register-write {off:#x}/{size}={value:#x}", started)

    def _doorbell(self) -> None:
        assert self.drv is not None
        qid = self.inp.u8() % 3
        value = self.inp.u16()
        off = 0x1000 + 8 * qid + 4 * (self.inp.u8() & 1)
        self.clean = False
        started = time.monotonic()
        self.ctrl.bar_write(0, off, 4, value)
        self._check(f"doorbell {off:#x}={value:#x}", started)

    def _pointer(self, npages: int, offset: int, mode: int) -> tuple[int, int, int]:
        """(flags, DW6-7, DW8-9) of a data pointer into a fresh buffer of ``npages`` pages."""
        inp = self.inp
        if npages == 0:
            return 0, 0, 0
        buf = self._buffer(npages)
        first = buf + (offset % PAGE if mode != 3 else 0)
        if mode in (0, 1, 2, 3):  # PRP1 alone, PRP1+PRP2, PRP1+list, unaligned/outside PRP2
            if mode == 0:
                return 0, first, 0
            if mode == 1:
                return 0, first, buf + PAGE if npages > 1 else OUTSIDE
            if mode == 3:
                return 0, first, buf + (inp.u16() % (npages * PAGE))
            lst = self._buffer(1)
            entries = []
            for _ in range(PAGE // 8):  # pages 1.. of the buffer (page 0 is PRP1's), or outside RAM
                if inp.u8() < 240:
                    k = inp.u8()
                    # (a one-page buffer has no page for the list: its entries named the canary
                    # page after the buffer, a false memory-outside-buffers finding)
                    entries.append(buf + PAGE * (1 + k % (npages - 1)) if npages > 1 else OUTSIDE)
                else:
                    entries.append(OUTSIDE)
            self.machine.memory.write(lst, struct.pack(f"<{PAGE // 8}Q", *entries))
            return 0, first, lst
        # SGL: a data block, a bit bucket, or a (last) segment of descriptors
        sgl_kind = inp.u8() % 4
        length = inp.u32() % (npages * PAGE + 1)
        if sgl_kind == 0:
            d = _SGL.pack(first, min(length, buf + npages * PAGE - first), 0x00)
        elif sgl_kind == 1:
            d = _SGL.pack(0, length, 0x10)
        else:
            seg = self._buffer(1)
            descs = []
            for _ in range(inp.u8() % 8 + 1):
                dtype = inp.pick((0x00, 0x00, 0x10, 0x20, 0x30, 0x50, 0xF0, 0x01))
                at = buf + inp.u16() % (npages * PAGE)
                n = inp.u16() % (buf + npages * PAGE - at + 1)
                if dtype in (0x20, 0x30):
                    at, n = seg, n & ~0xF
                descs.append(_SGL.pack(at, n, dtype))
            blob = b"".join(descs)
            self.machine.memory.write(seg, blob)
            d = _SGL.pack(seg, len(blob), 0x30 if sgl_kind == 2 else 0x20)
        lo, hi = struct.unpack("<QQ", d)
        return 0x40, lo, hi

    def _command(self, *, admin: bool) -> None:
        assert self.drv is not None
        inp = self.inp
        op = inp.pick(_ADMIN_OPS) if admin else inp.pick(_IO_OPS)
        if inp.u8() >= 250:
            op = inp.u8()
        nsid = inp.pick(_NSIDS)
        dwords = [inp.u32() for _ in range(6)]
        mode, npages, _reserved, offset = inp.u8() % 5, inp.u8() % 9, inp.u8(), inp.u16()
        if admin and op in _WIDE_ADMIN or (not admin and nsid in (0xFFFFFFFF, 0xFFFFFFFE)):
            self.ns2_named = True
        qid = 0 if admin else 1
        if qid not in self.drv.queues:
            return
        flags, p1, p2 = self._pointer(npages, offset, mode)
        started = time.monotonic()
        try:
            cid = self.drv.submit(qid, op, nsid=nsid, cdw10=dwords[0], cdw11=dwords[1], cdw12=dwords[2],
                                  cdw13=dwords[3], cdw14=dwords[4], cdw15=dwords[5], prp1=p1, prp2=p2, flags=flags)
        except NvmeDriverError:
            return  # the host's queue is full: nothing was sent
        self._check(f"submit op={op:#x} q={qid}", started)
        self._complete(qid, cid, op, admin)

    def _complete(self, qid: int, cid: int, op: int, admin: bool) -> None:
        assert self.drv is not None
        started = time.monotonic()
        if not self.clean or (admin and op in (0x0C, 0x10, 0x11)):  # AER waits; firmware may reset
            self.drv.poll(qid)
            self._check(f"poll q={qid}", started)
            return
        if admin and op in (0x00, 0x04, 0x01, 0x05, 0x14, 0x19, 0x7C, 0x84):  # may change the queues / state
            self.clean = False
        try:
            comp: Completion = self.drv.wait_for(qid, cid, timeout=COMPLETION_SECONDS)
        except NvmeDriverError as exc:
            if self.clean:
                raise FuzzFinding("no-completion", f"command {op:#x} on queue {qid}: {exc}",
                                  where=f"op{op:#x}") from exc
            return
        self._check(f"command op={op:#x} q={qid} status={comp.status:#x}", started)

    def _raw_sqe(self) -> None:
        assert self.drv is not None
        qid = self.inp.u8() & 1
        sqe = bytearray(self.inp.take(64))
        # MPTR, PRP1/SGL1 and PRP2 name a fresh buffer, page 0 or nothing in RAM (never
        # another buffer: the canaries stay checkable)
        buf = self._buffer(2)
        for at in (16, 24, 32):
            choice = sqe[at] % 4
            value = (buf + int.from_bytes(sqe[at + 1:at + 3], "little") % (2 * PAGE), 0, OUTSIDE,
                     buf + PAGE)[choice]
            sqe[at:at + 8] = struct.pack("<Q", value)
        nsid = int.from_bytes(sqe[4:8], "little")
        if nsid in (2, 0xFFFFFFFF) or qid == 0:
            self.ns2_named = True
        self.clean = False
        if qid not in self.drv.queues:
            return
        started = time.monotonic()
        try:
            self.drv.submit_raw(qid, bytes(sqe))
        except NvmeDriverError:
            return
        self.drv.poll(qid)
        self._check(f"raw-sqe op={sqe[0]:#x} q={qid}", started)

    def _recover(self) -> None:
        """FLR, then the least a driver does to use the controller again, and namespace 2
        as written: its backend read directly, and (when no action named it) its first 8
        blocks read through an I/O queue (see :func:`_bring_up_after_flr`)."""
        assert self.drv is not None
        started = time.monotonic()
        pdev = self.drv.pdev
        self.drv.close()
        self.drv = None
        self.ctrl.reset(ResetKind.FLR)
        deadline = time.monotonic() + COMPLETION_SECONDS
        while self.ctrl.bar_read(0, 0x1C, 4, check_decode=False) & 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        self._check("flr", started)
        if not self.ns2_named:  # a wide admin command may format, sanitize or delete namespaces
            ns2 = self.ctrl.allocated.get(2)
            stored = bytearray(len(_NS2_PATTERN))
            if ns2 is not None:
                ns2.backend.readv([memoryview(stored)], 0)
            if ns2 is None or stored != _NS2_PATTERN:
                raise FuzzFinding("bystander-data", "namespace 2 changed though no action named it")
        try:
            read = _bring_up_after_flr(self.machine, pdev, None if self.ns2_named else 2,
                                       write_nsid=None if self.ns2_named else 1)
        except NvmeDriverError as exc:
            raise FuzzFinding("recovery", f"after FLR the controller does not come up: {exc}",
                              where=str(exc)[:40]) from exc
        if read is not None and read != _NS2_PATTERN:
            raise FuzzFinding("recovery", "after FLR namespace 2 does not read what its backend holds")
        self._check("after-recovery", started)


def _bring_up_after_flr(machine: Machine, pdev: HostPciDevice, nsid: int | None,
                        write_nsid: int | None = None) -> bytes | None:
    """What a driver does to use a controller again after a Function Level Reset: the BAR
    addresses and the Command register's Memory Space and Bus Master bits written back
    (Linux's ``pci_restore_state``), the admin queues and CC.EN, Identify Controller, Set
    Features Number of Queues, Identify of the active namespace list, one I/O queue pair
    (polled: no interrupts), a block written to namespace ``write_nsid`` and read back, and
    a read of blocks 0-7 of namespace ``nsid`` (LBA formats are the 512-byte one: the
    set-up's). Review S24b: the first version left out Set Features, the namespace list and
    the write, so a controller refusing any of them after an FLR went unreported. The
    driver's memory is released before it returns.

    :returns: the blocks read (None without ``nsid``).
    :raises NvmeDriverError: a step failed (a command's status, a timeout, CSTS.CFS, a
        block that does not read back as written).
    """
    for idx, (addr, _size, kind) in pdev.resources.items():
        if idx == "rom":
            pdev.config_write32(ids.ROM_ADDRESS, addr)
            continue
        assert isinstance(idx, int)
        pdev.config_write32(ids.BASE_ADDRESS_0 + 4 * idx, addr & 0xFFFFFFFF)
        if kind == "mem64":
            pdev.config_write32(ids.BASE_ADDRESS_0 + 4 * idx + 4, addr >> 32)
    pdev.config_write16(ids.COMMAND, pdev.config_read16(ids.COMMAND) | ids.Command.MEMORY | ids.Command.MASTER)
    drv = NvmeDriver(machine, pdev, io_queues=0, admin_depth=4, irq=None, aers=0, timeout=COMPLETION_SECONDS)
    try:
        drv.cap = pdev.lo_hi_readq(0, 0x00)
        drv.enable()
        drv.identify(0x01)
        drv.set_features(0x07, 0)  # one I/O submission and one completion queue
        drv.identify(0x02)
        drv.create_io_queue_pair(1, 4, ien=False)
        if write_nsid is not None:
            _write_and_read_back(machine, drv, write_nsid)
        if nsid is None:
            return None
        buf = machine.alloc(len(_NS2_PATTERN), PAGE)
        try:
            drv.io(1, 0x02, nsid=nsid, cdw12=len(_NS2_PATTERN) // 512 - 1, buf=buf, length=len(_NS2_PATTERN),
                   what="read")
            return machine.memory.read(buf, len(_NS2_PATTERN))
        finally:
            machine.free(buf)
    finally:
        drv.close()


_RECOVERY_BLOCK = b"\xA5" * 512


def _write_and_read_back(machine: Machine, drv: NvmeDriver, nsid: int) -> None:
    """Write :data:`_RECOVERY_BLOCK` to block 0 of ``nsid`` and read it back (polled queue 1)."""
    buf = machine.alloc(PAGE, PAGE)
    try:
        machine.memory.write(buf, _RECOVERY_BLOCK)
        drv.io(1, 0x01, nsid=nsid, cdw12=0, buf=buf, length=512, what="write")
        machine.memory.write(buf, bytes(512))
        drv.io(1, 0x02, nsid=nsid, cdw12=0, buf=buf, length=512, what="read")
        if machine.memory.read(buf, 512) != _RECOVERY_BLOCK:
            raise NvmeDriverError(f"after FLR namespace {nsid} does not read back what was written")
    finally:
        machine.free(buf)


class NvmeVmstateTarget(VmstateTarget):
    """``nvme-vmstate``: the structure-aware ``vmstate`` target on an NVMe controller's
    stream (two ``mem`` namespaces, an I/O queue pair with completed commands): a valid
    envelope and CRC around a mutated body; the load succeeds or raises a typed error, and
    a loaded controller answers register reads and doorbell writes without failing."""

    name: ClassVar[str] = "nvme-vmstate"
    summary: ClassVar[str] = "vmstate load: mutated body of an NVMe controller stream, valid envelope and CRC"
    _CONFIG = NvmeConfig.coerce("ns=mem:size=256K,ns=mem:size=256K,mdts=5,serial=PCIDEVFUZZ0001")
    #: a controller costs about half an input to build, and most mutated streams are
    #: refused: the destination of a refused load is the next input's
    reuse_refused = True

    def make_source(self, machine: Machine) -> HostPciDevice:
        """A probed controller that has written and read namespace 1."""
        pdev = machine.plug(NvmeController(attrs.evolve(self._CONFIG)))
        drv = NvmeDriver(machine, pdev, io_queues=1, io_depth=16, admin_depth=16, aers=1, timeout=COMPLETION_SECONDS)
        drv.probe()
        drv.write(1, 0, b"\x3C" * 4096)
        drv.read(1, 0, 8)
        return pdev

    def make_device(self) -> PciDevice:
        """A fresh controller of the same configuration (parsed once; a copy each)."""
        return NvmeController(attrs.evolve(self._CONFIG))

    def exercise(self, device: PciDevice) -> None:
        """Register reads, and SQ/CQ doorbell writes for whatever queues the stream described."""
        for off in (0x00, 0x08, 0x0C, 0x14, 0x1C, 0x24, 0x28, 0x30):
            device.bar_read(0, off, 4)
        for off, value in ((0x1000, 1), (0x1004, 0), (0x1008, 1), (0x100C, 0)):
            device.bar_write(0, off, 4, value)
        device.bar_read(0, 0x1C, 4)
