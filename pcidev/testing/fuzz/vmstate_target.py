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

__all__ = ["STEP_SECONDS", "VmstateTarget"]

#: longest one guest access to the loaded device may take
STEP_SECONDS = 2.0
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

    def __init__(self) -> None:
        self.machine: Machine | None = None
        self.source: PciDevice | None = None
        self.body: Any = None
        self.fds: list[int] = []
        self._first_paths: list[tuple[Any, ...]] | None = None

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

    def close(self) -> None:
        """Tear the source down."""
        if self.source is not None:
            self.source.close()
        if self.machine is not None:
            self.machine.close()
        self.source = self.machine = None

    def mutate(self, inp: FuzzInput) -> bytes:
        """The sealed stream with ``inp``'s mutations applied to a copy of the body."""
        body = msgpack.unpackb(msgpack.packb(self.body, use_bin_type=True), raw=False, strict_map_key=False)
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
            if kind < 4:
                parent[key] = inp.pick(_EDGE_INTS) if kind < 3 else inp.u64() - (1 << 63)
            elif kind == 4:
                parent[key] = inp.pick((0, 1, 2, 3, 4, 5, 6)) and (None, True, 1.5, "", b"", [], {}, "x" * 300)[
                    inp.u8() % 8]
            elif kind == 5 and isinstance(parent, dict):
                del parent[key]
            elif kind == 6 and isinstance(parent, dict):
                parent[inp.blob(12).decode("latin-1")] = inp.pick(_EDGE_INTS)
            elif kind == 7:
                value = parent[key]
                if isinstance(value, list):
                    parent[key] = value * (1 + inp.u8() % 64) if inp.u8() & 1 else value[:inp.u8() % (len(value) + 1)]
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
        before = open_fd_count()
        dest = self.make_device()
        with ErrorLogWatch() as watch:
            try:
                res = load_device_stream(dest, stream, self.fds)
            except PcidevError:
                dest.owns_state = False
                dest.close()
                watch.check("a refused load")
                after = open_fd_count()
                if after > before:
                    raise FuzzFinding("fd-leak", f"a refused load left {after - before} fd(s) open") from None
                return
            except Exception as exc:
                dest.owns_state = False
                dest.close()
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
                dest.owns_state = False
                dest.close()

    def seeds(self) -> Iterator[bytes]:
        """One small mutation of each kind at the start of the body."""
        for kind in range(10):
            yield bytes([0, 0]) + struct.pack("<H", 7 * kind) + bytes([kind]) + bytes(8)
