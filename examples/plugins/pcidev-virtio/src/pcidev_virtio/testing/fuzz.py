"""The virtio plugin's fuzz target ``virtio-guest``: a hostile guest against virtio-blk and virtio-rng.

Registered as the ``fuzz-target/virtio-guest`` component (:mod:`pcidev_virtio.plugin`) and
run by ``pcidev fuzz virtio-guest`` (:mod:`pcidev.testing.fuzz`). The first input byte picks
the device (bit 0 clear: a 64 KiB memory ``virtio-blk`` with 64-entry queues, one or, with bit
1, two of them; set: ``virtio-rng``);
the rest is decoded into a sequence of guest actions against that device plugged into a
1 MiB + 64 KiB :class:`~pcidev.host.Machine` (MSI-X on) whose RAM holds a pattern. The machine
and device of each kind are kept between inputs and put back as they were built before each
one (a Function Level Reset with the header restored, bus mastering and MSI-X vectors as the
probe set them, the disk's first contents; guest RAM refilled); after a finding they are
dropped, and an input replays the same after any other as alone (a test checks it). The
target is its own driver: it writes the split rings itself, so that it can write anything
into them.

Actions:

* a well-formed bring-up (reset, ``ACKNOWLEDGE``, ``DRIVER``, a subset of the offered features,
  ``FEATURES_OK``, queue 0 of a fuzzed power-of-two size, ``DRIVER_OK``), fresh rings;
* common-configuration writes (feature windows with features not offered, queue size, ring
  addresses outside RAM or misaligned, ``queue_enable``, vectors...), reads anywhere in the
  virtio BAR (the ISR read clears it), device-configuration writes, status writes (reset
  mid-I/O, ``FEATURES_OK`` the device must refuse, ``DEVICE_NEEDS_RESET`` set by the driver);
* well-framed requests (every buffer in RAM, the chain no longer than the queue, direct or
  indirect, split at fuzzed points) with fuzzed contents: virtio-blk types including unknown
  ones, sectors past the capacity, unaligned or huge sizes, discard / write-zeroes segments,
  no status byte; virtio-rng reads of fuzzed sizes;
* hostile chains: descriptors with fuzzed addresses (outside RAM, at the end of RAM, the rings
  themselves), lengths (0, 2**32 - 1, overflowing), flags and ``next`` links (loops, self),
  indirect tables pointing at themselves or nested; raw pokes of the available ring (its
  index jumping ahead, garbage heads, flags, ``used_event``); doorbells anywhere in the
  notification area; bus mastering switched off and on; a Function Level Reset (MSI-X is off
  after it: interrupts go through INTx and the ISR).

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* no exception escapes the device (``device.failed`` stays None, no traceback is logged);
* no guest-memory write outside what the guest let the device write: guest RAM is filled with
  a pattern, and after every action each changed byte must lie in the used ring of an enabled
  queue or in a device-writable buffer some descriptor (or indirect table entry) names;
* used entries only for chains the guest made available, each once, in order (the entry at
  used index *u* names the head at available slot *u*), never more than were made available,
  and never reporting more bytes written than the chain's device-writable buffers hold;
* every guest access returns within :data:`STEP_SECONDS`; while the guest has sent only
  well-framed traffic since its last bring-up, every request made available to a running
  device is completed by the notification, and ``DEVICE_NEEDS_RESET`` is never set (only a
  malformed ring or queue configuration may set it); once it is set, the device writes no
  guest memory until a reset;
* ``FEATURES_OK`` never sticks with features that were not offered or without ``VERSION_1``;
* virtio-blk: the disk changes only inside the ranges of requests that completed with
  ``VIRTIO_BLK_S_OK`` (a failed request leaves every byte as it was); a well-framed request of
  a known kind gets the status the spec gives it; after the input a fresh bring-up writes and
  reads back data, and the last 16 sectors (which no request may touch unless it names them)
  still hold their pattern;
* the process's file descriptor count is the same after the input as before it.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from typing import ClassVar

import attrs

from pcidev.dma import GuestMemory
from pcidev.host import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.testing import plugged
from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, open_fd_count
from pcidev_virtio import spec
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.blk_spec import DWZ_SEGMENT, ID_BYTES, OUTHDR, BlkStatus, BlkType
from pcidev_virtio.device import COMMON_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET, VIRTIO_BAR, VirtioPciDevice
from pcidev_virtio.rng import VirtioRng

__all__ = ["STEP_SECONDS", "VirtioGuestTarget"]

log = logging.getLogger(__name__)

#: longest a single guest access (a register access, a doorbell) may take (the machine is shared)
STEP_SECONDS = 2.0
#: the most actions one input is decoded into
MAX_ACTIONS = 32

#: guest RAM: 1 MiB and 64 KiB (a :class:`~pcidev.host.Machine` has more than 1 MiB). Every
#: byte of it is compared after every action (one comparison with the shadow, in place: about
#: 40 us; 2 MiB until session 23; the layout below is the same, moved down)
RAM = 0x110000
DISK = 64 << 10
SECTORS = DISK // 512
#: the disk's last sectors, which only a request naming them may change
BYSTANDER_SECTORS = 16
BLK_QUEUE = 64
#: an address beyond guest RAM
OUTSIDE = 1 << 40
# where the target puts things in guest RAM (below DESC_AT: only the pattern)
DESC_AT = 0x10000       # room for 1024 descriptors
AVAIL_AT = 0x14000
USED_AT = 0x16000       # room for 1023 used entries
INDIRECT_AT = 0x18000   # 8 indirect tables of 4 KiB
INDIRECT_TABLES = 8
BUF_AT = 0x20000        # data buffers, handed out in turn: 952 KiB, more than 35 actions' largest
BUF_END = RAM - 0x2000  # requests (17 KiB each) take, so that no input reuses a buffer
_FILL = bytes((i * 37 + 11) & 0xFF for i in range(4096))
#: guest RAM as each input starts: the pattern
_RAM_IMAGE = _FILL * (RAM // len(_FILL))
_BYSTANDER = b"\xB7\x2E\x91\x4C" * (BYSTANDER_SECTORS * 128)
#: the disk's contents before an input: zeros, the bystander pattern in its last sectors
_DISK_IMAGE = bytes(DISK - len(_BYSTANDER)) + _BYSTANDER
_DESC = spec.DESC
# the status bits the checks look at, as plain ints (an int and an IntFlag go through enum's
# Python code: the checks run after every action)
_NEEDS_RESET = int(spec.Status.DEVICE_NEEDS_RESET)
_FEATURES_OK = int(spec.Status.FEATURES_OK)
_DRIVER_OK = int(spec.Status.DRIVER_OK)
_WRITE = spec.VRING_DESC_F_WRITE
_INDIRECT = spec.VRING_DESC_F_INDIRECT
#: for each set of flag bits (low byte), the byte values that have none of them
_FLAGS_WITHOUT = {bits: bytes(b for b in range(256) if not b & bits) for bits in (_WRITE, _WRITE | _INDIRECT)}
#: guest RAM as the checks read it: the shadow (before an action) or RAM itself (after it)
_Ram = bytearray | mmap.mmap
_U16 = struct.Struct("<H")
_C = spec.CommonCfg
_HOT_COMMON = (_C.DEVICE_FEATURE_SELECT, _C.DRIVER_FEATURE_SELECT, _C.DRIVER_FEATURE, _C.CONFIG_MSIX_VECTOR,
               _C.DEVICE_STATUS, _C.QUEUE_SELECT, _C.QUEUE_SIZE, _C.QUEUE_MSIX_VECTOR, _C.QUEUE_ENABLE,
               _C.QUEUE_DESC, _C.QUEUE_DESC + 4, _C.QUEUE_DRIVER, _C.QUEUE_DRIVER + 4, _C.QUEUE_DEVICE,
               _C.QUEUE_DEVICE + 4)
#: the width of the common configuration fields narrower than 4 bytes
_WIDTHS: dict[int, int] = {_C.DEVICE_STATUS: 1, _C.CONFIG_MSIX_VECTOR: 2, _C.QUEUE_SELECT: 2, _C.QUEUE_SIZE: 2,
                           _C.QUEUE_MSIX_VECTOR: 2, _C.QUEUE_ENABLE: 2}
_VALUES = (0, 1, 2, 3, 0xFFFF, 0xFFFFFFFF, 0x8000, 0x7FFF, 256, 64, 3, DESC_AT, AVAIL_AT, USED_AT,
           DESC_AT + 1, RAM - 8, 1 << 8, 1 << 32, 0xFFFF_FFFF_FFFF_FFFF)
_BLK_TYPES = (BlkType.IN, BlkType.OUT, BlkType.FLUSH, BlkType.GET_ID, BlkType.DISCARD, BlkType.WRITE_ZEROES,
              BlkType.GET_LIFETIME, BlkType.SECURE_ERASE, 2, 0x80000000)


@attrs.frozen
class _Snap:
    """Guest RAM and the disk as they were before an action's first device access."""

    ram: bytearray
    disk: bytes
    needs_reset: bool
    #: the ranges the device may write (used rings, device-writable buffers)
    allowed: list[tuple[int, int]]
    #: queue 0: enabled, size, driver ring, device ring
    ring: tuple[bool, int, int, int]
    used_seen: int


@attrs.define
class _Expect:
    """What the guest knows of a chain it made available with a well-framed request."""

    in_len: int
    #: the status the spec gives it (None: any of OK / IOERR / UNSUPP)
    status: int | None


def _overlaps(ranges: list[tuple[int, int]], lo: int, hi: int) -> bool:
    return any(a < hi and lo < b for a, b in ranges)


class VirtioGuestTarget(FuzzTarget):
    """``virtio-guest``: common/device configuration, status, doorbells and split rings with
    hostile contents against virtio-blk and virtio-rng through the software host (see the
    module's documentation)."""

    name: ClassVar[str] = "virtio-guest"
    summary: ClassVar[str] = "virtio-blk / virtio-rng: guest configuration, status, doorbells and hostile split rings"
    invariants: ClassVar[tuple[str, ...]] = (
        "no exception escapes the device", "no guest-memory write outside device-writable buffers and used rings",
        "used entries only for available heads, once, in order", "bounded accesses; well-framed requests complete",
        "DEVICE_NEEDS_RESET only for a malformed ring or configuration", "FEATURES_OK only for offered features",
        "the disk changes only where an OK request named it", "recovery after reset", "fd count unchanged")
    #: coverage of the devices and the framework code they run on (BAR dispatch, config space
    #: and capabilities, DMA, interrupts) guides the fuzzer; this module's decoder and checks
    #: (a comparison of guest RAM per action), the test driver and the software host are the harness
    #: and run uninstrumented (measured: see CHANGELOG, issue 12 session 23)
    instrument: ClassVar[tuple[str, ...]] = (
        "pcidev_virtio", "-pcidev_virtio.testing", "pcidev.device", "pcidev.pci", "pcidev.dma", "pcidev.irq",
        "pcidev.bar", "pcidev.regions")

    def __init__(self) -> None:
        #: the shadow of guest RAM (reused between inputs: a fresh one per input costs page faults)
        self._shadow = bytearray(RAM)
        #: a machine and device per kind of input (virtio-rng, virtio-blk with one or two
        #: queues), kept between inputs and reset before each (dropped after a finding)
        self._setups: dict[tuple[bool, int], _Setup] = {}
        #: record :attr:`steps` (costs a checksum of guest RAM per action: for tests)
        self.record = False
        #: with :attr:`record`, the last input's actions as seen from outside: each one's
        #: description, the device status after it and checksums of guest RAM (virtio-blk
        #: only: virtio-rng's entropy differs) and of the disk
        self.steps: list[tuple[str, int, int, int]] = []

    def run(self, data: bytes) -> None:
        """Decode ``data`` into guest actions and check the invariants after each.

        :param data: the fuzzer's bytes.
        :raises FuzzFinding: an invariant broke.
        """
        setup = self._setup(data[0] if data else 0)
        fds = open_fd_count()
        kept = False
        try:
            with ErrorLogWatch() as watch:
                self.steps = []
                _GuestRun(FuzzInput(data), watch, self._shadow, setup, self.steps if self.record else None).run()
            kept = True
        finally:
            if not kept:  # (a finding: what it left is not reused)
                self._drop(setup)
        after = open_fd_count()
        if after > fds:
            raise FuzzFinding("fd-leak", f"{after - fds} file descriptor(s) left open by one input")

    def _setup(self, first: int) -> _Setup:
        """The machine and device for an input whose first byte is ``first``: kept from an
        earlier input and reset, or built."""
        key = (bool(first & 1), 1 + (first >> 1 & 1))
        setup = self._setups.pop(key, None)
        if setup is not None:
            try:
                setup.reset()
            except Exception:
                log.warning("virtio-guest: a kept device did not reset; building a fresh one", exc_info=True)
                setup.close()
                setup = None
        if setup is None:
            setup = _Setup(*key)
        self._setups[key] = setup
        return setup

    def _drop(self, setup: _Setup) -> None:
        for key, kept in list(self._setups.items()):
            if kept is setup:
                del self._setups[key]
        setup.close()

    def close(self) -> None:
        """Release the kept machines and devices."""
        for setup in list(self._setups.values()):
            self._drop(setup)

    def seeds(self) -> Iterator[bytes]:
        """Bring-ups and requests of both devices, then a few hostile shapes."""
        blk, rng = bytes([0, 0, 0]), bytes([1, 0, 0])  # the device, then all features and the largest queue
        yield blk + _blk(BlkType.OUT, 0, 8) + _blk(BlkType.IN, 0, 8) + _blk(BlkType.FLUSH, 0, 0) \
            + _blk(BlkType.GET_ID, 0, 0)
        yield blk + _blk(BlkType.OUT, 0, 4, pieces=3, indirect=1) + _blk(BlkType.DISCARD, 0, 0, segs=2) \
            + _blk(BlkType.WRITE_ZEROES, 0, 0, segs=1) + _blk(BlkType.IN, 3, 2) + _blk(BlkType.OUT, 1, 1)
        yield rng + bytes([5, 0]) + struct.pack("<H", 64) + bytes([0, 0, 0]) \
            + bytes([5, 2]) + struct.pack("<HHH", 100, 4000, 0) + bytes([2, 1, 0])
        # a chain that loops (descriptor 0 -> itself), made available and notified
        yield blk + bytes([6, 0, 0, 0, 0, 0, 0, 0, 3, 1, 0, 0, 0, 0, 0])
        # a write made available, a reset before the notification, a bring-up, a read
        yield blk + _blk(BlkType.OUT, 0, 2, notify=False) + bytes([3, 0, 4, 0, 0]) + _blk(BlkType.IN, 0, 2)
        # two request queues; a write, a Function Level Reset, a bring-up (INTx now), a read
        yield bytes([2, 0, 0]) + _blk(BlkType.OUT, 0, 1) + bytes([11, 4, 0, 0]) + _blk(BlkType.IN, 0, 1)


def _blk(rtype: int, sector_kind: int, nsec: int, *, pieces: int = 1, indirect: int = 0, segs: int = 0,
         notify: bool = True) -> bytes:
    """A seed's well-framed virtio-blk request (action 5, decoded by ``_GuestRun._request``)."""
    body = bytes([segs]) + bytes([8, 8, 0]) * segs if rtype in (BlkType.DISCARD, BlkType.WRITE_ZEROES) else b""
    return bytes([5, _BLK_TYPES.index(rtype), sector_kind]) + struct.pack("<H", nsec) + bytes([0, 0]) + body \
        + bytes([0, pieces - 1, indirect, 0 if notify else 255])


class _Setup:
    """A machine with one device plugged and probed, kept between inputs: :meth:`reset`
    puts it back as it was built (a Function Level Reset with the header restored, bus
    mastering and interrupt vectors as the probe set them, the disk's first contents).

    :param rng: virtio-rng (else virtio-blk).
    :param queues: virtio-blk's request queues.
    """

    def __init__(self, rng: bool, queues: int) -> None:
        self.machine = Machine(ram_size=RAM)
        try:
            #: guest RAM as the host sees it (read-only)
            self.ram = mmap.mmap(self.machine.ram_fd, RAM, prot=mmap.PROT_READ)
            self.dev: VirtioPciDevice = VirtioRng() if rng else VirtioBlk(
                f"size={DISK},queue_size={BLK_QUEUE},serial=fuzz,max_discard_seg=4,max_write_zeroes_seg=4,"
                f"num_queues={queues}")
            try:
                self.pdev = plugged(self.machine, self.dev)
                self._fresh_disk()
            except BaseException:
                self.dev.close()
                raise
        except BaseException:
            self.machine.close()
            raise

    def _fresh_disk(self) -> None:
        if isinstance(self.dev, VirtioBlk):
            os.pwrite(self.dev.backend.fd, _DISK_IMAGE, 0)

    def reset(self) -> None:
        """Back to the state it was built in: FLR (the device resets, its header comes back),
        bus mastering and MSI-X vectors as the probe set them, the disk's contents. Guest
        RAM is the run's to fill."""
        self.pdev.reset_function()
        self.pdev.set_master()
        self.pdev.alloc_irq_vectors(1, 32)  # (as pcidev.testing.probe)
        self._fresh_disk()

    def close(self) -> None:
        """Release the device and the machine."""
        try:
            self.dev.close()
        finally:
            self.ram.close()
            self.machine.close()


class _GuestMemory:
    """The guest's (the target's own) writes to guest RAM, mirrored into a shadow copy.

    ``shadow`` holds guest RAM as it was when last checked, plus every write the guest made
    since (copied back from RAM after each write): an action's snapshot is the shadow as it
    is at the action's first device access, without copying guest RAM per action. After an
    action's check found every byte that changed inside the ranges the device may write,
    :meth:`absorb` copies those ranges (only) from RAM. A write by the device between two
    actions (none is expected: the devices work in the accessing thread) is not absorbed:
    the next action's comparison finds it and checks it.

    :param memory: the machine's guest memory (:attr:`pcidev.host.Machine.memory`).
    :param shadow: the copy (``len(ram)`` bytes).
    """

    def __init__(self, memory: GuestMemory, shadow: bytearray) -> None:
        self.memory = memory
        self.shadow = shadow
        #: changes whenever the shadow does (what was computed from it can be reused while
        #: it stays the same)
        self.version = 0

    def write(self, gpa: int, data: bytes) -> None:
        """Write ``data`` at ``gpa`` (and into the shadow; guest RAM raises
        :class:`~pcidev.errors.DmaError` for a range outside it, before writing anything)."""
        self.memory.write(gpa, data)
        self.shadow[gpa:gpa + len(data)] = data
        self.version += 1

    def absorb(self, ram: mmap.mmap, ranges: list[tuple[int, int]]) -> None:
        """Copy ``ranges`` of guest RAM into the shadow: once the shadow and RAM were found to
        differ only inside them, the shadow is RAM again.

        :param ram: guest RAM (read-only view).
        :param ranges: ``(start, end)`` byte ranges inside RAM.
        """
        with memoryview(ram) as src, memoryview(self.shadow) as dst:
            for lo, hi in ranges:
                dst[lo:hi] = src[lo:hi]
        self.version += 1

    def write_u16(self, gpa: int, value: int) -> None:
        """Write a little-endian u16 at ``gpa`` (and into the shadow)."""
        self.write(gpa, _U16.pack(value))

    def write_struct(self, st: struct.Struct, gpa: int, *values: int) -> None:
        """Write ``st`` packed from ``values`` at ``gpa`` (and into the shadow)."""
        self.write(gpa, st.pack(*values))

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes of guest RAM at ``gpa``."""
        return self.memory.read(gpa, length)

    def read_u16(self, gpa: int) -> int:
        """The little-endian u16 at ``gpa``."""
        return self.memory.read_u16(gpa)


class _GuestRun:
    """One input against one device, as it was built (reset by the target)."""

    def __init__(self, inp: FuzzInput, watch: ErrorLogWatch, shadow: bytearray, setup: _Setup,
                 steps: list[tuple[str, int, int, int]] | None = None) -> None:
        self.inp = inp
        #: where each action is recorded (None: not recorded)
        self.steps = steps
        self.watch = watch
        first = inp.u8()
        self.rng = bool(first & 1)
        self.machine = setup.machine
        #: guest RAM as the host sees it (read-only)
        self.ram = setup.ram
        #: the guest's writes to RAM, mirrored into ``shadow`` (guest RAM as last checked)
        self.mem = _GuestMemory(self.machine.memory, shadow)
        self.dev = setup.dev
        self.pdev: HostPciDevice | None = setup.pdev
        #: only well-framed traffic since the last bring-up
        self.clean = True
        #: chains the guest made available through well-framed requests, by available index
        self.expect: dict[int, _Expect] = {}
        #: the guest's available index (the next slot it fills)
        self.avail_idx = 0
        #: used entries the guest has looked at (the device's used index as the guest follows it)
        self.used_seen = 0
        #: descriptors of well-framed chains the device has not returned yet
        self.busy_descs: dict[int, set[int]] = {}
        #: the indirect table (0-7) of each such chain that has one
        self.busy_tables: dict[int, int] = {}
        self.next_buf = BUF_AT
        self.bystander_named = False
        self.features = 0
        self.snap: _Snap | None = None
        self.resets = False
        self.used_seen_before = 0
        #: the device-writable buffer of the last well-framed request (address, bytes)
        self.last_in = (0, 0)
        #: :meth:`_writable`'s last answer and what it was computed from
        self.writable_key: tuple[object, ...] = ()
        self.writable_ranges: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ registers
    def _write(self, off: int, size: int, value: int) -> None:
        assert self.pdev is not None
        self._before()
        self.pdev.bar_write(VIRTIO_BAR, off, size, value & ((1 << (8 * size)) - 1))

    def _read(self, off: int, size: int) -> int:
        assert self.pdev is not None
        self._before()
        return self.pdev.bar_read(VIRTIO_BAR, off, size)

    def _common(self, field: int, size: int, value: int) -> None:
        self._write(COMMON_OFFSET + field, size, value)

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        try:
            self.mem.write(0, _RAM_IMAGE)
            self._act("bring-up", self._bring_up)
            steps = 0
            while self.inp.remaining and steps < MAX_ACTIONS:
                steps += 1
                self._action()
            self._recover()
        except FuzzFinding:
            raise
        except Exception as exc:
            raise FuzzFinding.escaped(exc, "guest action") from exc

    def _action(self) -> None:
        kind = self.inp.u8() % 12
        name, step = [
            ("common-write", self._common_write), ("read", self._any_read), ("device-config", self._devcfg_write),
            ("status", self._status), ("bring-up", self._bring_up), ("request", self._request),
            ("hostile-chain", self._hostile_chain), ("ring-poke", self._ring_poke), ("doorbell", self._doorbell),
            ("bus-master", self._bus_master), ("request", self._request), ("flr", self._flr)][kind]
        self._act(name, step)

    # ------------------------------------------------------------------ checks
    def _before(self) -> None:
        """The device is about to be accessed: take the snapshot the action is checked
        against (once per action; every action writes guest memory before its first access)."""
        if self.snap is not None:
            return
        vq = self.dev.queues[0]
        ram = self.mem.shadow  # (RAM as checked after the last action, plus the guest's writes since)
        self.snap = _Snap(ram, self._disk(), bool(self.dev.status & _NEEDS_RESET),
                          self._writable(ram), (vq.enabled, vq.size, vq.driver, vq.device), self.used_seen)

    def _act(self, what: str, step: Callable[[], str]) -> None:
        """Run one action, with a snapshot of guest RAM (and the disk) taken before its first
        device access, and check every invariant after it."""
        self.snap = None
        self.resets = False
        started = time.monotonic()
        desc = step()
        took = time.monotonic() - started
        what = f"{what} {desc}" if desc else what
        if took > STEP_SECONDS:
            raise FuzzFinding("hang", f"{what} took {took:.1f} s", where=what.split(" ")[0])
        if self.dev.failed is not None:
            raise FuzzFinding.escaped(self.dev.failed, f"{what} (device.failed)")
        self.watch.check(what)
        if self.steps is not None:
            blk = isinstance(self.dev, VirtioBlk)
            self.steps.append((what, self.dev.status, 0 if self.rng else zlib.crc32(self.ram),
                               zlib.crc32(self._disk()) if blk else 0))
        snap = self.snap
        if snap is None:
            return  # the device was not accessed
        ram, disk, needs_reset, ring = snap.ram, snap.disk, snap.needs_reset, snap.ring
        # the device may also write the rings the action configured (avail_event at DRIVER_OK)
        allowed = sorted(snap.allowed + self._writable(ram))
        self.used_seen_before = snap.used_seen
        # (compared in place: most actions write no guest memory. Guest RAM itself is the
        # state after the action -- nothing writes it until the next action -- and the shadow
        # the state before; once checked, the shadow takes the ranges the device may write)
        after: _Ram = ram if ram == self.ram else self.ram
        if needs_reset and not self.resets and after is not ram:
            raise FuzzFinding("needs-reset-ignored", f"{what}: guest memory written while DEVICE_NEEDS_RESET",
                              where=what.split(" ")[0])
        self._check_memory(what, ram, after, allowed)
        self._check_disk(what, disk, ram, after, ring)
        self._check_used(what, ram, after, ring, allowed)
        if after is not ram:
            self.mem.absorb(self.ram, allowed)  # (every byte outside ``allowed`` is unchanged: checked)
        status = self.dev.status
        if status & _NEEDS_RESET and self.clean:
            raise FuzzFinding("needs-reset", f"{what}: DEVICE_NEEDS_RESET set by well-framed traffic",
                              where=what.split(" ")[0])
        if status & _FEATURES_OK:
            features = self.dev.driver_features
            if features & ~self.dev.offered_features() or not features >> spec.Feature.VERSION_1 & 1:
                raise FuzzFinding("features-ok", f"{what}: FEATURES_OK stuck with features {features:#x}",
                                  where="features")

    def _disk(self) -> bytes:
        if isinstance(self.dev, VirtioBlk):
            return os.pread(self.dev.backend.fd, DISK, 0)
        return b""

    def _writable(self, ram: bytearray) -> list[tuple[int, int]]:
        """Every range the guest lets the device write: the used rings of enabled queues and
        the buffers of device-writable descriptors in their tables and the indirect tables
        those name (read from ``ram``, clipped to RAM; computed again only when the queues or
        the shadow changed since the last time)."""
        queues = tuple((vq.enabled, vq.device, vq.size, vq.desc) for vq in self.dev.queues)
        key = (ram is self.mem.shadow, self.mem.version, queues)
        if key[0] and key == self.writable_key:
            return self.writable_ranges
        out: list[tuple[int, int]] = []
        for enabled, device, size, desc in queues:
            if not enabled:
                continue
            out.append((device, device + spec.used_ring_size(size)))
            for addr, length, flags, _nxt in _flagged(ram, desc, size, _WRITE | _INDIRECT):
                if flags & _WRITE:
                    out.append((addr, addr + length))
                if flags & _INDIRECT:  # a table longer than the queue is refused
                    out += [(a, a + n) for a, n, _f, _x in _flagged(ram, addr, min(length // 16, size), _WRITE)]
        ranges = sorted((max(0, a), min(RAM, b)) for a, b in out if a < RAM and b > a)
        self.writable_key, self.writable_ranges = key, ranges
        return ranges

    def _check_memory(self, what: str, before: bytearray, after: _Ram, allowed: list[tuple[int, int]]) -> None:
        """Every byte of ``after`` outside the ``allowed`` ranges (sorted) is as in ``before``."""
        if before is after:
            return
        with memoryview(after) as view:
            pos = 0  # the gaps between the allowed ranges must be unchanged
            for lo, hi in [*allowed, (RAM, RAM)]:
                # (``startswith`` compares the gap in place: no copy of either side)
                if lo > pos and not before.startswith(view[pos:lo], pos):
                    at = next(i for i in range(pos, lo) if before[i] != after[i])
                    raise FuzzFinding("memory-outside-buffers",
                                      f"{what}: guest memory at {at:#x} changed outside every device-writable "
                                      "buffer and used ring", where=what.split(" ")[0])
                pos = max(pos, hi)

    def _chain(self, ram: _Ram, table: int, count: int, head: int) -> tuple[list[tuple[int, int]],
                                                                          list[tuple[int, int]]] | None:
        """The guest's reading of a chain in ``ram``: (readable, writable) buffers, or None
        if it is malformed."""
        outs: list[tuple[int, int]] = []
        ins: list[tuple[int, int]] = []
        index, nested = head, False
        for _ in range(count + 1):
            at = table + index * _DESC.size
            if not 0 <= index < count or not 0 <= at <= RAM - _DESC.size:
                return None
            addr, length, flags, nxt = _DESC.unpack_from(ram, at)
            if flags & spec.VRING_DESC_F_INDIRECT:
                if nested:
                    return None
                table, count, index, nested = addr, length // _DESC.size, 0, True
                continue
            if addr + length > RAM:
                return None
            (ins if flags & spec.VRING_DESC_F_WRITE else outs).append((addr, length))
            if not flags & spec.VRING_DESC_F_NEXT:
                return outs, ins
            index = nxt
        return None

    def _check_used(self, what: str, ram: bytearray, after: _Ram, ring: tuple[bool, int, int, int],
                    allowed: list[tuple[int, int]]) -> None:
        enabled, size, driver, device = ring
        if not enabled or self.resets:
            return
        if device + 4 > RAM or driver + 4 > RAM:
            return
        old_used = struct.unpack_from("<H", ram, device + 2)[0]
        new_used = struct.unpack_from("<H", after, device + 2)[0]
        if old_used == new_used:
            return
        start = self.used_seen
        count = (new_used - start) & 0xFFFF
        avail = struct.unpack_from("<H", ram, driver + 2)[0]
        if count > (avail - start) & 0xFFFF:
            raise FuzzFinding("used-beyond-available", f"{what}: used index went from {start} to {new_used}, "
                              f"but only {avail} chains were made available", where="used-idx")
        vq = self.dev.queues[0]
        self_modifying = _overlaps(allowed, driver, driver + spec.avail_ring_size(size)) or \
            _overlaps(allowed, vq.desc, vq.desc + spec.desc_table_size(size)) or \
            _overlaps(allowed, INDIRECT_AT, BUF_AT)
        for k in range(count):
            u = (start + k) & 0xFFFF
            at = device + 4 + spec.USED_ELEM_SIZE * (u % size)
            if at + 8 > RAM:
                break
            head, written = spec.USED_ELEM.unpack_from(after, at)
            slot = driver + 4 + 2 * (u % size)
            want = struct.unpack_from("<H", ram, slot)[0]
            if not self_modifying and head != want:
                raise FuzzFinding("used-head", f"{what}: used entry {u} names head {head}, available slot "
                                  f"{u % size} holds {want}", where="used-head")
            chain = None if self_modifying else self._chain(ram, vq.desc, size, head)
            if chain is not None and written > sum(n for _a, n in chain[1]):
                raise FuzzFinding("used-len", f"{what}: used entry {u} reports {written} bytes written into "
                                  f"{sum(n for _a, n in chain[1])}", where="used-len")
            exp = self.expect.pop(u, None)
            if exp is not None and chain is not None:
                self._check_request(what, u, exp, written, chain[1], after)
            self.busy_descs.pop(u, None)
            self.busy_tables.pop(u, None)
        self.used_seen = new_used

    def _check_request(self, what: str, u: int, exp: _Expect, written: int, ins: list[tuple[int, int]],
                       after: _Ram) -> None:
        if self.rng:
            if written != exp.in_len:
                raise FuzzFinding("rng-short", f"{what}: entropy request {u} of {exp.in_len} bytes got {written}",
                                  where="rng")
            return
        if exp.in_len == 0:
            if written:
                raise FuzzFinding("used-len", f"{what}: a request without a status byte reports {written} bytes")
            return
        written_to = [(a, n) for a, n in ins if n]
        if not written_to:
            raise FuzzFinding("used-len", f"{what}: request {u} lost its device-writable buffers", where="used-len")
        last = written_to[-1]
        status = after[last[0] + last[1] - 1]
        if written != exp.in_len or status not in (0, 1, 2) or exp.status is not None and status != exp.status:
            raise FuzzFinding("blk-status", f"{what}: request {u} completed with status {status} and "
                              f"{written} of {exp.in_len} bytes; expected status {exp.status}", where="blk-status")

    def _check_disk(self, what: str, before: bytes, ram: bytearray, after: _Ram,
                    ring: tuple[bool, int, int, int]) -> None:
        if not isinstance(self.dev, VirtioBlk):
            return
        now = self._disk()
        if now == before:
            return
        named = self._ok_ranges(ram, after, ring)
        for at in range(0, DISK, 512):
            if now[at:at + 512] != before[at:at + 512] and not _overlaps(named, at, at + 512):
                raise FuzzFinding("disk-outside-requests", f"{what}: sector {at // 512} changed though no request "
                                  "that completed with OK named it", where="disk")
        if any(b > DISK - len(_BYSTANDER) for _a, b in named):
            self.bystander_named = True

    def _ok_ranges(self, ram: bytearray, after: _Ram, ring: tuple[bool, int, int, int]) -> list[tuple[int, int]]:
        """The disk ranges (bytes) named by the requests this action completed with OK (their
        payload read both before and after the action: a read may overwrite a later request)."""
        _enabled, size, driver, device = ring
        vq = self.dev.queues[0]
        new_used = struct.unpack_from("<H", after, device + 2)[0] if device + 4 <= RAM else 0
        out: list[tuple[int, int]] = []
        start = self.used_seen_before
        for k in range((new_used - start) & 0xFFFF):
            at = device + 4 + spec.USED_ELEM_SIZE * ((start + k) % size)
            if at + 8 > RAM:
                break
            head = spec.USED_ELEM.unpack_from(after, at)[0]
            for mem in (ram, after):
                chain = self._chain(mem, vq.desc, size, head)
                if chain is None or not any(n for _a, n in chain[1]):
                    continue
                last = [(a, n) for a, n in chain[1] if n][-1]
                if after[last[0] + last[1] - 1] != BlkStatus.OK:
                    continue
                payload = b"".join(mem[a:a + n] for a, n in chain[0])
                if len(payload) < OUTHDR.size:
                    continue
                rtype, _prio, sector = OUTHDR.unpack_from(payload)
                body = payload[OUTHDR.size:]
                if rtype == BlkType.OUT:
                    out.append((sector * 512, sector * 512 + len(body)))
                elif rtype in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
                    for seg_sector, seg_count, _flags in DWZ_SEGMENT.iter_unpack(body[:len(body) // 16 * 16]):
                        out.append((seg_sector * 512, (seg_sector + seg_count) * 512))
        return out

    # ------------------------------------------------------------------ actions
    def _bring_up(self) -> str:
        """The well-formed initialisation, with fresh (zeroed) rings."""
        inp = self.inp
        pick = inp.u8() % 5
        mask = (0xFFFFFFFF_FFFFFFFF, ~(1 << spec.Feature.RING_INDIRECT_DESC), ~(1 << spec.Feature.RING_EVENT_IDX),
                0, 0)[pick] if pick < 4 else inp.u32()
        size_pick = inp.u8() % 6
        self.mem.write(DESC_AT, bytes(INDIRECT_AT - DESC_AT))  # fresh rings, before any access
        self._common(_C.DEVICE_STATUS, 1, 0)
        self._reset_seen()
        self.clean = True
        self._common(_C.DEVICE_STATUS, 1, spec.Status.ACKNOWLEDGE)
        self._common(_C.DEVICE_STATUS, 1, spec.Status.ACKNOWLEDGE | spec.Status.DRIVER)
        offered = 0
        for sel in (0, 1):
            self._common(_C.DEVICE_FEATURE_SELECT, 4, sel)
            offered |= self._read(COMMON_OFFSET + _C.DEVICE_FEATURE, 4) << (32 * sel)
        features = offered & mask | 1 << spec.Feature.VERSION_1
        for sel in (0, 1):
            self._common(_C.DRIVER_FEATURE_SELECT, 4, sel)
            self._common(_C.DRIVER_FEATURE, 4, features >> (32 * sel))
        self._common(_C.DEVICE_STATUS, 1, 0xB)
        if not self._read(COMMON_OFFSET + _C.DEVICE_STATUS, 1) & spec.Status.FEATURES_OK:
            raise FuzzFinding("features-refused", f"offered features {features:#x} refused", where="features")
        self._common(_C.CONFIG_MSIX_VECTOR, 2, 0)
        self._common(_C.QUEUE_SELECT, 2, 0)
        top = self._read(COMMON_OFFSET + _C.QUEUE_SIZE, 2)
        size = max(1, top >> (0, 2, 4, 5, 6, 30)[size_pick]) if top else 0
        self._common(_C.QUEUE_SIZE, 2, size)
        for field, addr in ((_C.QUEUE_DESC, DESC_AT), (_C.QUEUE_DRIVER, AVAIL_AT), (_C.QUEUE_DEVICE, USED_AT)):
            self._common(field, 4, addr)
            self._common(field + 4, 4, 0)
        self._common(_C.QUEUE_MSIX_VECTOR, 2, 1)
        self._common(_C.QUEUE_ENABLE, 2, 1)
        self._common(_C.DEVICE_STATUS, 1, 0xF)
        self.features = features
        return f"features={features:#x} size={size}"

    def _forget(self) -> None:
        """The device was reset: the guest starts its indices again."""
        self.expect.clear()
        self.busy_descs.clear()
        self.busy_tables.clear()
        self.avail_idx = 0
        self.used_seen = 0

    def _size(self) -> int:
        return self.dev.queues[0].size or 1

    def _running(self) -> bool:
        vq = self.dev.queues[0]
        status = self.dev.status
        return bool(vq.enabled and status & _DRIVER_OK and not status & _NEEDS_RESET
                    and self.dev.bus_master)

    def _common_write(self) -> str:
        inp = self.inp
        pick = inp.u8()
        off = _HOT_COMMON[pick % len(_HOT_COMMON)] if pick < 224 else inp.u8() % 0x40
        size = (1, 2, 4, 8)[inp.u8() % 4] if inp.u8() >= 200 else _WIDTHS.get(off, 4)
        value = inp.pick(_VALUES) if inp.u8() < 160 else inp.u64()
        self._taint()
        if off == _C.DEVICE_STATUS and size == 1 and value & 0xFF == 0:
            self._reset_seen()
        self._common(off, size, value)
        return f"{off:#x}/{size}={value:#x}"

    def _taint(self) -> None:
        """The guest sent something malformed: what it expected of its requests no longer holds
        (a hostile chain may have overwritten their descriptors)."""
        self.clean = False
        self.expect.clear()

    def _reset_seen(self) -> None:
        self.resets = True
        self._forget()

    def _any_read(self) -> str:
        inp = self.inp
        off = inp.u16() % 0x4000
        size = (1, 2, 4, 8)[inp.u8() % 4]
        off -= off % size
        value = self._read(off, size)
        return f"{off:#x}/{size}={value:#x}"

    def _devcfg_write(self) -> str:
        inp = self.inp
        off = 0x20 if inp.u8() < 128 else inp.u8() % 0x70
        size = (1, 2, 4)[inp.u8() % 3]
        value = inp.u32()
        self._write(DEVICE_OFFSET + off, size, value)
        return f"{off:#x}/{size}={value:#x}"

    def _status(self) -> str:
        inp = self.inp
        value = inp.pick((0, 1, 3, 0xB, 0xF, 0x4, 0x8, 0x40, 0x80, 0xFF))
        if value == 0:
            self._reset_seen()
        elif value not in (1, 3, 0xB, 0xF):
            self._taint()
        self._common(_C.DEVICE_STATUS, 1, value)
        return f"={value:#x}"

    def _bus_master(self) -> str:
        assert self.pdev is not None
        self._before()
        if self.dev.bus_master:
            self.pdev.clear_master()
            return "off"
        self.pdev.set_master()
        return "on"

    def _flr(self) -> str:
        """A Function Level Reset with the header restored (``pci_reset_function``): the
        virtio device resets too, and MSI-X is off afterwards (interrupts go through INTx and
        the ISR)."""
        assert self.pdev is not None
        self._before()
        self._reset_seen()
        self.pdev.reset_function()
        return ""

    def _doorbell(self) -> str:
        inp = self.inp
        if inp.u8() < 128:
            off, size, value = 0, 2, 0
        else:
            size = (1, 2, 4)[inp.u8() % 3]
            off = inp.u16() % 0x1000
            off -= off % size
            value = inp.u32()
            self._taint()
        self._write(NOTIFY_OFFSET + off, size, value)
        return f"{off:#x}/{size}={value:#x}"

    def _buffer(self, length: int) -> int:
        if self.next_buf + length > BUF_END:
            self.next_buf = BUF_AT
        addr = self.next_buf
        self.next_buf = (self.next_buf + length + 64 + 15) & ~15
        return addr

    def _publish(self, head: int, *, step: int = 1) -> int:
        """Put ``head`` in the next available slot and move the index on by ``step``."""
        size = self._size()
        mem = self.mem
        u = self.avail_idx
        mem.write_u16(AVAIL_AT + 4 + 2 * (u % size), head)
        self.avail_idx = (u + step) & 0xFFFF
        mem.write_u16(AVAIL_AT + 2, self.avail_idx)
        return u

    def _request(self) -> str:
        """A well-framed request: every buffer in RAM, the chain within the queue."""
        inp = self.inp
        out: list[bytes] = []
        in_lens: list[int] = []
        status: int | None = None
        if self.rng:
            in_lens = [inp.u16() % 8192 for _ in range(inp.u8() % 4 + 1)]
            desc = f"rng {in_lens}"
        else:
            rtype = _BLK_TYPES[inp.u8() % len(_BLK_TYPES)]
            sector_kind = inp.u8() % 6
            nsec = inp.u16() % 33
            data_len = nsec * 512 + (inp.u8() % 512 if inp.u8() >= 224 else 0)
            limit = SECTORS - BYSTANDER_SECTORS
            sector = (inp.u8() % max(1, limit - nsec + 1), SECTORS - 1, SECTORS, limit - 1,
                      0xFFFF_FFFF_FFFF_FFFF, 1 << 55)[sector_kind]
            aligned = data_len % 512 == 0
            inside = sector + data_len // 512 <= SECTORS
            if rtype == BlkType.OUT:
                out = [OUTHDR.pack(rtype, 0, sector), bytes([sector & 0xFF ^ 0x5A]) * data_len]
                in_lens = [1]
                status = BlkStatus.OK if aligned and inside else BlkStatus.IOERR
            elif rtype == BlkType.IN:
                out = [OUTHDR.pack(rtype, 0, sector)]
                in_lens = [data_len, 1]
                status = BlkStatus.OK if aligned and inside else BlkStatus.IOERR
            elif rtype in (BlkType.DISCARD, BlkType.WRITE_ZEROES):
                segs = inp.u8() % 6
                body = b"".join(DWZ_SEGMENT.pack(inp.u8() % SECTORS, inp.u8() % 16, inp.pick((0, 0, 1, 2)))
                                for _ in range(segs))
                out = [OUTHDR.pack(rtype, 0, sector), body]
                in_lens = [1]
            else:
                out = [OUTHDR.pack(rtype, 0, sector)]
                in_lens = [ID_BYTES if rtype == BlkType.GET_ID else data_len, 1]
                if rtype == BlkType.GET_ID or rtype == BlkType.FLUSH and self.features >> 9 & 1:
                    status = BlkStatus.OK
                elif rtype != BlkType.FLUSH:
                    status = BlkStatus.UNSUPP
            if inp.u8() >= 240:
                in_lens, status = [], None  # no device-writable byte: nowhere to put a status
            desc = f"blk type={rtype} sector={sector} bytes={data_len}"
        pieces = inp.u8() % 4 + 1
        indirect = inp.u8() & 1 and self.features >> spec.Feature.RING_INDIRECT_DESC & 1
        bufs = self._cut(out, in_lens, pieces)
        if not bufs:
            return desc + " (empty)"
        size = self._size()
        ndesc = 1 if indirect else len(bufs)
        busy = set().union(*self.busy_descs.values()) if self.busy_descs else set()
        free = [i for i in range(size) if i not in busy]
        # an indirect table no chain the device still owns uses (one reused under a chain
        # not consumed yet changed that chain: a false rng-short finding)
        tables = [t for t in range(INDIRECT_TABLES) if t not in self.busy_tables.values()]
        if ndesc > len(free) or len(bufs) > size or len(self.busy_descs) >= size or indirect and not tables:
            inp.u8()
            return desc + " (no room)"
        mem = self.mem
        chain = free[:ndesc] if not indirect else free[:1]
        if indirect:
            table = INDIRECT_AT + 0x1000 * tables[0]
            for i, (addr, length, flags) in enumerate(bufs):
                more = i + 1 < len(bufs)
                mem.write_struct(_DESC, table + 16 * i, addr, length, flags | (spec.VRING_DESC_F_NEXT if more else 0),
                                 i + 1 if more else 0)
            mem.write_struct(_DESC, DESC_AT + 16 * chain[0], table, 16 * len(bufs), spec.VRING_DESC_F_INDIRECT, 0)
        else:
            for i, (addr, length, flags) in enumerate(bufs):
                more = i + 1 < len(bufs)
                mem.write_struct(_DESC, DESC_AT + 16 * chain[i], addr, length,
                                 flags | (spec.VRING_DESC_F_NEXT if more else 0), chain[i + 1] if more else 0)
        u = self._publish(chain[0])
        self.expect[u] = _Expect(sum(in_lens), status)
        self.busy_descs[u] = set(chain)
        if indirect:
            self.busy_tables[u] = (table - INDIRECT_AT) // 0x1000
        if inp.u8() < 200:
            self._write(NOTIFY_OFFSET, 2, 0)
            if self.clean and self._running() and self.used_seen != self.avail_idx:
                used = self.mem.read_u16(USED_AT + 2)
                if used != self.avail_idx:
                    raise FuzzFinding("no-completion", f"{desc}: used index {used} after the notification, "
                                      f"{self.avail_idx} made available", where="no-completion")
        return desc

    def _cut(self, out: list[bytes], in_lens: list[int], pieces: int) -> list[tuple[int, int, int]]:
        """Descriptors (addr, len, flags) for these buffers, the readable part and the writable
        part each cut into up to ``pieces`` descriptors."""
        mem = self.mem
        bufs: list[tuple[int, int, int]] = []
        blob = b"".join(out)
        if blob:
            addr = self._buffer(len(blob))
            mem.write(addr, blob)
            bufs += [(addr + a, b - a, 0) for a, b in _split(len(blob), pieces)]
        total = sum(in_lens)
        if in_lens:
            addr = self._buffer(total)
            mem.write(addr, b"\xEE" * total)
            self.last_in = (addr, total)
            bufs += [(addr + a, b - a, spec.VRING_DESC_F_WRITE) for a, b in _split(total, pieces)]
        return bufs

    def _hostile_chain(self) -> str:
        inp = self.inp
        size = self._size()
        mem = self.mem
        self._taint()
        first = inp.u8() % size
        index = first
        for _ in range(inp.u8() % 4 + 1):
            self._raw_desc(DESC_AT + 16 * index, index, size)
            index = inp.u8() % size
        if inp.u8() & 1:  # an indirect table too
            slot = INDIRECT_AT + 0x1000 * (inp.u8() % 8)
            for i in range(inp.u8() % 4 + 1):
                self._raw_desc(slot + 16 * i, i, 256)
        head = first if inp.u8() < 224 else inp.u16()
        self._publish(head, step=1 if inp.u8() < 240 else inp.u16())
        if inp.u8() < 224:
            self._write(NOTIFY_OFFSET, 2, 0)
        return f"head={head} at {self.avail_idx} ({mem.read_u16(AVAIL_AT + 2)})"

    def _raw_desc(self, at: int, index: int, count: int) -> None:
        inp = self.inp
        kind = inp.u8() % 8
        if kind == 0:
            addr = self._buffer(8192) + inp.u16() % 4096
        elif kind == 2:
            addr = RAM - inp.u8()
        elif kind == 3:
            addr = DESC_AT + 16 * (inp.u8() % 64)
        elif kind == 4:
            addr = INDIRECT_AT + 0x1000 * (inp.u8() % 8)
        elif kind == 6:
            addr = inp.u64()
        else:
            addr = {1: OUTSIDE, 5: 0, 7: USED_AT}[kind]
        length = inp.pick((512, 0, 0xFFFFFFFF, 16, 32, 4096, 1, 0x10000)) if inp.u8() < 200 else inp.u32()
        flags = inp.u8() & 7
        nxt = inp.pick((index + 1, index, 0, count - 1, count, 0xFFFF))
        self.mem.write_struct(_DESC, at, addr & 0xFFFF_FFFF_FFFF_FFFF, length, flags, nxt & 0xFFFF)

    def _ring_poke(self) -> str:
        inp = self.inp
        mem = self.mem
        size = self._size()
        self._taint()
        what = inp.u8() % 5
        value = inp.u16()
        if what == 0:
            self.avail_idx = value
            mem.write_u16(AVAIL_AT + 2, value)
        elif what == 1:
            mem.write_u16(AVAIL_AT, value)  # flags
        elif what == 2:
            mem.write_u16(AVAIL_AT + 4 + 2 * size, value)  # used_event
        elif what == 3:
            mem.write_u16(AVAIL_AT + 4 + 2 * (inp.u8() % size), value)  # a ring slot
        else:
            mem.write_u16(USED_AT, value)  # the device's flags (the driver must not write them)
        if inp.u8() & 1:
            self._write(NOTIFY_OFFSET, 2, 0)
        return f"{what}={value:#x}"

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        """A fresh bring-up, a request that must work, and the bystander sectors as written."""
        assert self.pdev is not None
        self.pdev.set_master()
        self.inp = FuzzInput(b"")  # all features, the largest queue
        self._act("recovery bring-up", self._bring_up)
        if isinstance(self.dev, VirtioBlk):
            self.inp = FuzzInput(bytes([1, 0, 8]))  # OUT of 8 sectors at sector 0, notified
            self._act("recovery write", self._request)
            self.inp = FuzzInput(bytes([0, 0, 8]))  # IN of the same
            self._act("recovery read", self._request)
            addr, n = self.last_in
            if self.mem.read(addr, n - 1) != b"\x5A" * (n - 1):
                raise FuzzFinding("recovery", "after a fresh bring-up a read does not return what was written")
            tail = os.pread(self.dev.backend.fd, len(_BYSTANDER), DISK - len(_BYSTANDER))
            if not self.bystander_named and tail != _BYSTANDER:
                raise FuzzFinding("bystander-data", "the last sectors changed though no request named them")
        else:
            self.inp = FuzzInput(bytes([0, 64, 0]))
            self._act("recovery read", self._request)
        if self.expect:
            raise FuzzFinding("recovery", f"after a fresh bring-up requests {sorted(self.expect)} did not complete")


def _flagged(ram: bytearray, at: int, count: int, bits: int) -> list[tuple[int, int, int, int]]:
    """The descriptors of a table in ``ram`` (as many as lie inside it) whose flags have any
    of ``bits`` (flags of the low byte: ``WRITE``, ``INDIRECT``), in table order."""
    at = max(0, at)
    end = min(at + _DESC.size * count, len(ram))
    end -= (end - at) % _DESC.size if end > at else 0
    if end <= at:
        return []
    raw = ram[at:end]
    if not raw[12::_DESC.size].translate(None, _FLAGS_WITHOUT[bits]):  # (the flags' low bytes, in C)
        return []
    return [d for d in _DESC.iter_unpack(raw) if d[2] & bits]


def _split(total: int, pieces: int) -> list[tuple[int, int]]:
    """``[0, total)`` cut into up to ``pieces`` non-empty ranges (one empty range if total is 0)."""
    if total == 0:
        return [(0, 0)]
    step = max(1, total // pieces)
    cuts = list(range(0, total, step))[:pieces] + [total]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
