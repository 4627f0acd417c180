"""A stand-in controller implementing the core side of docs/nvme-contract.md, so the
I/O command set can be tested on its own (no tests in this module)."""

from __future__ import annotations

import os
import struct
import threading
import time

from pcidev.dma import GuestMemory, alloc_memfd
from pcidev.errors import DmaError
from pcidev_nvme.logs import SmartCounters
from pcidev_nvme.ns_smart import NamespaceSmart
from pcidev_nvme.request import SQE, decode_sqe

PAGE = 4096


class FakeController:
    """Guest RAM, namespaces, SMART counters and a ``complete`` that records results.

    Every request must be completed exactly once: a second completion is recorded in
    :attr:`double` (tests assert it stays empty).
    """

    def __init__(self, *, ram: int = 32 << 20, page_size: int = PAGE, mdts_bytes: int | None = None):
        fd = alloc_memfd(ram)
        self.ram = ram
        self._mem = GuestMemory()
        self._mem.map(0, ram, fd)
        os.close(fd)
        self.bus_master = True
        self.page_size = page_size
        self.mdts_bytes = mdts_bytes
        self.volatile_write_cache = True  # Feature 06h WCE
        self.namespaces: dict = {}
        self.smart = SmartCounters()
        self.ns_smart = NamespaceSmart()
        self.results: dict[int, tuple[int, int, object]] = {}
        self.order: list[int] = []
        self.double: list[int] = []
        self._keep: list = []
        self._cond = threading.Condition()
        self._next = 1 << 20

    @property
    def memory(self) -> GuestMemory:
        """The guest memory itself (the tests' way in, whatever the bus master bit says)."""
        return self._mem

    @property
    def dma(self) -> GuestMemory:
        if not self.bus_master:
            raise DmaError("bus mastering is disabled")
        return self._mem

    def complete(self, req, status: int = 0, dw0: int = 0, dw1: int = 0, *, error=None) -> None:
        with self._cond:
            key = id(req)
            if key in self.results:
                self.double.append(req.cid)
            self.results[key] = (status, dw0, error)
            self._keep.append(req)  # keep ids unique while the controller lives
            self.order.append(req.cid)
            self._cond.notify_all()

    def wait(self, req, timeout: float = 5.0):
        deadline = time.monotonic() + timeout
        with self._cond:
            while id(req) not in self.results:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"request {req!r} did not complete")
                self._cond.wait(left)
            return self.results[id(req)]

    def alloc(self, size: int, align: int = PAGE) -> int:
        addr = (self._next + align - 1) & ~(align - 1)
        self._next = addr + size
        if self._next > self.ram:
            self._next = 1 << 20
            return self.alloc(size, align)
        return addr

    def close(self) -> None:
        for ns in self.namespaces.values():
            ns.close()
        self._mem.close()


_cid = [0]


def command(
    opcode: int,
    nsid: int = 1,
    *,
    cid: int | None = None,
    flags: int = 0,
    prp1: int = 0,
    prp2: int = 0,
    dptr: bytes | None = None,
    cdw10: int = 0,
    cdw11: int = 0,
    cdw12: int = 0,
    cdw13: int = 0,
    sqid: int = 1,
):
    """Build a decoded Request from fields."""
    if cid is None:
        _cid[0] = (_cid[0] + 1) & 0xFFFF
        cid = _cid[0]
    raw = bytearray(SQE.pack(opcode, flags, cid, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13, 0, 0))
    if dptr is not None:
        raw[24:40] = dptr
    return decode_sqe(sqid, bytes(raw))


def rw(opcode: int, slba: int, nlb: int, *, nsid: int = 1, fua: bool = False, **kw):
    """A Read/Write/Compare/Verify/Write Zeroes command (``nlb`` is the real count)."""
    cdw12 = ((nlb - 1) & 0xFFFF) | (kw.pop("cdw12_extra", 0)) | ((1 << 30) if fua else 0)
    return command(opcode, nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=cdw12, **kw)


def prp_for(ctrl: FakeController, addr: int, length: int) -> tuple[int, int]:
    """PRP1/PRP2 for a page-aligned (or offset) contiguous buffer, building a list if needed."""
    first = PAGE - addr % PAGE
    if length <= first:
        return addr, 0
    rest = length - first
    if rest <= PAGE:
        return addr, addr + first
    pages = [addr + first + i * PAGE for i in range(-(-rest // PAGE))]
    lst = ctrl.alloc(8 * len(pages))
    ctrl.memory.write(lst, struct.pack(f"<{len(pages)}Q", *pages))
    return addr, lst
