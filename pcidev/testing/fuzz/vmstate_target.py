"""The fuzz target ``vmstate``: structure-aware mutations of a saved device stream.

:class:`VmstateTarget` takes a valid stream saved by a running device, decodes its
msgpack body, changes values inside it (numbers to edge values, types swapped, keys
dropped or added, lists grown or emptied), encodes it again and seals it with a valid
envelope and checksum (:func:`pcidev.vmstate.stream.seal`), so the mutations reach
the field checks and the device's own ``check_*_state``, not just the CRC. The
stream is loaded with :func:`pcidev.migration.load_device_stream` into a fresh device
of the same type and configuration.

The built-in ``vmstate`` target uses the ``edu`` device (registers, a DMA ring,
MSI-X); a plugin gets the same target for its own device by subclassing it and
overriding :meth:`VmstateTarget.make_source`, :meth:`VmstateTarget.make_device` and
:meth:`VmstateTarget.exercise` (the NVMe plugin's ``nvme-vmstate``).

Invariants (a break raises :class:`~pcidev.testing.fuzz.FuzzFinding`):

* the load either succeeds or raises a :class:`~pcidev.errors.PcidevError`
  (:class:`~pcidev.errors.VMStateError` and its kind); anything else escaped;
* a device that loaded is live: it has not failed (but for a failure the stream
  carried from the source), guest accesses through
  :meth:`VmstateTarget.exercise` raise nothing and return within :data:`STEP_SECONDS`, and no
  traceback is logged;
* a refused load leaves no file descriptor open.

The mutated body is bounded (:data:`MAX_BODY_POSITIONS`, :data:`MAX_BODY_GROWTH`): a list
grown ``x64`` in three steps of one input (the ``sections`` list, each item holding the
4 KiB config space) made a 1.1 GB stream and a 3.4 GB peak in the harness alone, and such
peaks, kept by the allocator, were the ``memory-growth`` finding of the session-22 runs;
a step that would pass a bound is dropped.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import msgpack

from pcidev.device import PciDevice
from pcidev.devices.edu import EduDevice
from pcidev.errors import PcidevError
from pcidev.host import Machine
from pcidev.host.pci import HostPciDevice
from pcidev.migration import load_device_stream, save_device_stream
from pcidev.testing.fuzz.target import ErrorLogWatch, FuzzFinding, FuzzInput, FuzzTarget, open_fd_count
from pcidev.testing.harness import probe
from pcidev.vmstate.stream import PREFIX_SIZE, TRAILER_SIZE, seal

__all__ = ["MAX_BODY_GROWTH", "MAX_BODY_POSITIONS", "STEP_SECONDS", "VmstateTarget", "body_extent"]

#: longest one guest access to the loaded device may take
STEP_SECONDS = 2.0
#: most positions (containers and leaves, a shared one counted where it occurs) a mutated
#: body may hold: what the loader decodes into objects (the source's body: ~90 for ``edu``)
MAX_BODY_POSITIONS = 65536
#: most bytes a mutated body may encode to beyond the source's (bounded from above by
#: :func:`body_extent`)
MAX_BODY_GROWTH = 1 << 20
#: most bytes one step but a list growth adds to the encoded body where it lands (a str of 255
#: characters, up to 4 bytes each, beside the one cut; a 300-byte str; a new key of 12)
_STEP_GROWTH = 1100
_EDGE_INTS = (0, 1, -1, 2, 0x7F, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1,
              (1 << 64) - 1, -(1 << 63), 4096, 4095)


def _paths(obj: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a decoded body (containers and leaves), depth first (parents
    before children, keys and items in order)."""
    out: list[tuple[Any, ...]] = []
    stack: list[tuple[Any, tuple[Any, ...]]] = [(obj, path)]
    while stack:  # (a stack, not recursive generators: this runs for every mutation)
        here, at = stack.pop()
        out.append(at)
        if isinstance(here, dict):
            stack.extend(reversed([(v, (*at, k)) for k, v in here.items()]))
        elif isinstance(here, list):
            stack.extend(reversed([(v, (*at, i)) for i, v in enumerate(here)]))
    return out


def _head(n: int, fix: int, eight: bool = True) -> int:
    """Bytes of a msgpack length header: a ``fix`` one (below ``fix``), 8-bit (if the type
    has one), 16-bit, 32-bit."""
    return 1 if n < fix else 2 if eight and n < 256 else 3 if n < 1 << 16 else 5


def _int_size(v: int) -> int:
    if -32 <= v < 128:
        return 1
    if -(1 << 7) <= v < 1 << 8:
        return 2
    if -(1 << 15) <= v < 1 << 16:
        return 3
    return 5 if -(1 << 31) <= v < 1 << 32 else 9


def body_extent(obj: Any) -> tuple[int, int]:
    """What a decoded body expands to when encoded: ``(positions, bytes)``, where a container
    referenced from several places (a list grown by repeating its items) counts each time
    it occurs, and the bytes bound msgpack's encoding from above. Each container is walked
    once, so the cost follows the objects, not the expansion.

    :param obj: the body (or a part of it).
    :returns: the positions (as many as the body has paths to a value) and an upper bound of
        the encoded size.
    """
    memo: dict[int, tuple[int, int]] = {}

    def walk(here: Any) -> tuple[int, int]:
        if isinstance(here, (dict, list)):
            seen = memo.get(id(here))
            if seen is not None:
                return seen
            positions, size = 1, _head(len(here), 16, eight=False)
            for item in (here.values() if isinstance(here, dict) else here):
                p, b = walk(item)
                positions += p
                size += b
            if isinstance(here, dict):
                size += sum(walk(k)[1] for k in here)
            memo[id(here)] = (positions, size)
            return positions, size
        if isinstance(here, bool) or here is None:
            return 1, 1
        if isinstance(here, int):
            return 1, _int_size(here)
        if isinstance(here, str):
            n = len(here.encode("utf-8", "surrogatepass"))
            return 1, _head(n, 32) + n
        if isinstance(here, (bytes, bytearray)):
            return 1, _head(len(here), 0) + len(here)
        if isinstance(here, msgpack.ExtType):
            return 1, 6 + len(here.data)
        return 1, 9  # a float (or what msgpack encodes at most as large)

    return walk(obj)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        obj = obj[p]
    return obj


class VmstateTarget(FuzzTarget):
    """``vmstate``: a valid envelope and checksum around a mutated body (see the module)."""

    name: ClassVar[str] = "vmstate"
    summary: ClassVar[str] = "vmstate load: mutated body of an edu stream, valid envelope and CRC"
    invariants: ClassVar[tuple[str, ...]] = (
        "load succeeds or raises a typed error", "a loaded device is live", "no fd left by a refused load")

    #: keep the destination of a refused load for the next input instead of making a new
    #: one (:meth:`make_device`): a load is all-or-nothing, so a refused one leaves the
    #: device as it was, never loaded (a target that sets it proves that with a test: an
    #: input's outcome after a refused one is its outcome on a new device); a device that
    #: loaded is closed as ever
    reuse_refused: ClassVar[bool] = False

    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.source: PciDevice | None = None
        #: the destination a refused load left, for the next input (:attr:`reuse_refused`)
        self.spare: PciDevice | None = None
        self.body: Any = None
        self.fds: list[int] = []
        self._first_paths: list[tuple[Any, ...]] | None = None
        self._extent = (0, 0)
        self._max_bytes = MAX_BODY_GROWTH

    # -------------------------------------------------------------- per device type
    def make_source(self, machine: Machine) -> HostPciDevice:
        """Plug a device into ``machine`` and give it some state worth saving.

        :returns: the host's handle on it.
        """
        pdev = machine.plug(EduDevice())
        probe(pdev)
        ring = machine.alloc(4096)
        pdev.bar_write(0, 0x04, 4, 0x1234)
        pdev.bar_write(0, 0x08, 4, 5)
        pdev.bar_write(0, 0x100, 8, ring)
        pdev.bar_write(0, 0x108, 4, 16)
        pdev.bar_write(0, 0x114, 4, 1)
        return pdev

    def make_device(self) -> PciDevice:
        """A fresh device of the source's type and configuration."""
        return EduDevice()

    def exercise(self, device: PciDevice) -> None:
        """Guest accesses to a loaded, resumed device (raise nothing: the finding is what escapes).

        :param device: the loaded device, attached to the source's memory.
        """
        for off in (0x00, 0x04, 0x08, 0x20, 0x24, 0x100, 0x108, 0x10C, 0x110, 0x114, 0x118):
            device.bar_read(0, off, 4)
        device.bar_write(0, 0x04, 4, 0x5A5A)
        device.bar_write(0, 0x08, 4, 7)
        device.bar_write(0, 0x10C, 4, 3)  # a doorbell with whatever ring the stream described
        device.bar_write(0, 0x60, 4, 1)
        device.bar_write(0, 0x64, 4, 1)

    # -------------------------------------------------------------- the target
    def setup(self) -> None:
        """Save the source's stream once (its memory stays for the loads to map)."""
        self.machine = Machine(ram_size=4 << 20)
        pdev = self.make_source(self.machine)
        source = pdev.device
        if not isinstance(source, PciDevice):
            raise PcidevError(f"the vmstate target needs an in-process device, not {source!r}")
        self.source = source
        source.quiesce()
        stream, fds = save_device_stream(source)
        self.fds = list(fds)
        self.body = msgpack.unpackb(stream[PREFIX_SIZE:-TRAILER_SIZE], raw=False, strict_map_key=False)
        self._first_paths = None
        self._extent = body_extent(self.body)
        self._max_bytes = self._extent[1] + MAX_BODY_GROWTH

    def close(self) -> None:
        """Tear the source (and a kept destination) down."""
        if self.spare is not None:
            self._discard(self.spare)
            self.spare = None
        if self.source is not None:
            self.source.close()
        if self.machine is not None:
            self.machine.close()
        self.source = self.machine = None

    def mutate(self, inp: FuzzInput) -> bytes:
        """The sealed stream with ``inp``'s mutations applied to a copy of the body.

        A step that would take the body past :data:`MAX_BODY_POSITIONS` or
        :data:`MAX_BODY_GROWTH` bytes beyond the source's is undone (a list is grown at most
        to :data:`MAX_BODY_POSITIONS` items before that check).
        """
        body = msgpack.unpackb(msgpack.packb(self.body, use_bin_type=True), raw=False, strict_map_key=False)
        extent = self._extent  # the body's (positions, bytes), or bounds of them from above
        for step in range(1 + inp.u8() % 4):
            if step == 0:  # the unmutated body's positions: the same for every input
                if self._first_paths is None:
                    self._first_paths = [p for p in _paths(self.body) if p]
                paths = self._first_paths
            else:
                paths = [p for p in _paths(body) if p]
            if inp.u8() < 224:  # mostly the sections: the header and fingerprint are checked first
                paths = [p for p in paths if p[0] == "sections" and len(p) > 1] or paths
            if not paths:  # the mutations so far left nothing to mutate (an empty body)
                break
            path = paths[inp.u16() % len(paths)]
            parent, key = _get(body, path[:-1]), path[-1]
            kind = inp.u8() % 10
            undo = (parent, key, key in parent if isinstance(parent, dict) else True, parent[key])
            grown = False  # a list grown: measured; the other steps add at most _STEP_GROWTH where they land
            if kind < 4:
                parent[key] = inp.pick(_EDGE_INTS) if kind < 3 else inp.u64() - (1 << 63)
            elif kind == 4:
                parent[key] = inp.pick((0, 1, 2, 3, 4, 5, 6)) and (None, True, 1.5, "", b"", [], {}, "x" * 300)[
                    inp.u8() % 8]
            elif kind == 5 and isinstance(parent, dict):
                del parent[key]
            elif kind == 6 and isinstance(parent, dict):
                value = inp.pick(_EDGE_INTS)  # (read before the key, as an assignment evaluates)
                added = inp.blob(12).decode("latin-1")
                undo = (parent, added, added in parent, parent.get(added))
                parent[added] = value
            elif kind == 7:
                value = parent[key]
                if isinstance(value, list):
                    if inp.u8() & 1:
                        times = min(1 + inp.u8() % 64, max(1, MAX_BODY_POSITIONS // max(1, len(value))))
                        parent[key] = value * times
                        grown = True
                    else:
                        parent[key] = value[:inp.u8() % (len(value) + 1)]
                elif isinstance(value, bytes):
                    parent[key] = value[:inp.u8() % (len(value) + 1)] + value[:inp.u8()]
                elif isinstance(value, str):
                    parent[key] = value[:inp.u8() % (len(value) + 1)] + value[:inp.u8()]
            elif kind == 8:
                parent[key] = inp.blob(64)
            else:
                value = parent[key]
                if isinstance(value, int) and not isinstance(value, bool):
                    flipped = value ^ (1 << (inp.u8() % 64))
                    # msgpack holds [-2**63, 2**64): a negative value with bit 63 flipped
                    # falls below it, so wrap it into the unsigned range
                    parent[key] = flipped if flipped >= -(1 << 63) else flipped & ((1 << 64) - 1)
            if kind == 5:  # (a deletion only shrinks the body)
                continue
            # a part shared by a grown list occurs several times: a change to it, everywhere
            before, extent = extent, body_extent(body) if grown else (
                2 * extent[0], extent[1] + _STEP_GROWTH * extent[0])
            if extent[0] > MAX_BODY_POSITIONS or extent[1] > self._max_bytes:
                extent = extent if grown else body_extent(body)  # (the bound was loose: measure)
                if extent[0] > MAX_BODY_POSITIONS or extent[1] > self._max_bytes:
                    where, at, existed, old = undo
                    if existed:
                        where[at] = old
                    else:
                        del where[at]
                    extent = before
        return seal(msgpack.packb(body, use_bin_type=True))

    def run(self, data: bytes) -> None:
        """Load the mutated stream and check the outcome.

        :param data: the fuzzer's bytes (the mutations to make).
        :raises FuzzFinding: an invariant broke.
        """
        if self.source is None:
            self.setup()
        assert self.source is not None
        stream = self.mutate(FuzzInput(data))
        if self.reuse_refused:  # (made before the count: it stays open after a refusal)
            dest, self.spare = self.spare or self.make_device(), None
            before = open_fd_count()
        else:
            before = open_fd_count()
            dest = self.make_device()
        with ErrorLogWatch() as watch:
            try:
                res = load_device_stream(dest, stream, self.fds)
            except PcidevError:
                # a kept destination is kept only once the refusal broke no invariant
                # (review S24b: a destination a finding touched was the next input's)
                if not self.reuse_refused:
                    self._discard(dest)
                try:
                    watch.check("a refused load")
                    after = open_fd_count()
                    if after > before:
                        raise FuzzFinding("fd-leak", f"a refused load left {after - before} fd(s) open") from None
                except FuzzFinding:
                    if self.reuse_refused:
                        self._discard(dest)
                    raise
                if self.reuse_refused:
                    self.spare = dest
                return
            except Exception as exc:
                self._discard(dest)
                raise FuzzFinding.escaped(exc, "load_device_stream") from exc
            try:
                if self.source.memory is not None:
                    dest.attach(self.source.memory, self.source.irq.sink)
                    res.close()
                carried = dest.failed  # a stream may say the device had failed on the source
                started = time.monotonic()
                dest.resume()
                self.exercise(dest)
                took = time.monotonic() - started
                if took > STEP_SECONDS:
                    raise FuzzFinding("hang", f"guest accesses to the loaded device took {took:.1f} s",
                                      where="exercise")
                if dest.failed is not None and dest.failed is not carried:
                    raise FuzzFinding.escaped(dest.failed, "the loaded device (failed)")
                watch.check("the loaded device")
            except FuzzFinding:
                raise
            except Exception as exc:
                raise FuzzFinding.escaped(exc, "guest access to the loaded device") from exc
            finally:
                self._discard(dest)

    @staticmethod
    def _discard(dest: PciDevice) -> None:
        dest.owns_state = False  # (a destination writes no state of its own anywhere)
        dest.close()

    def seeds(self) -> Iterator[bytes]:
        """One small mutation of each kind at the start of the body."""
        for kind in range(10):
            yield bytes([0, 0]) + struct.pack("<H", 7 * kind) + bytes([kind]) + bytes(8)
