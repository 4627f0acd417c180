"""State descriptions used by the vmstate tests.

* ``test/queue`` version 2 and ``test/ctrl`` (with the ``test/ctrl/irq``
  subsection) are the *current* sample descriptions.  Version 1 of ``test/queue``
  (see vmstate_descriptions_v1.py) called the queue address ``base`` and had no
  ``prio``; the upgrade step renames ``base`` to ``dma_addr`` and ``prio`` takes its
  default.  ``test/ctrl`` stayed at version 1 and gained a subsection, which needs
  no version bump.
* ``test/allkinds`` uses every field kind once, for the round-trip tests.
"""

from __future__ import annotations

import enum
from typing import Any, Optional

import attrs
from vmstate_descriptions_v1 import DEVICE_TYPE, FINGERPRINT  # noqa: F401 - re-exported

from pcidev.vmstate import (
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Array,
    Bytes,
    FdRef,
    Str,
    VarArray,
    VarBytes,
    vmfield,
    vmstate,
)


def queue_v1_to_v2(fields: dict[str, Any]) -> dict[str, Any]:
    """Upgrade step 1 -> 2 of ``test/queue``: ``base`` became ``dma_addr``."""
    fields = dict(fields)
    fields["dma_addr"] = fields.pop("base")
    return fields


@vmstate("test/queue", version=2, min_version=1, upgrades={1: queue_v1_to_v2})
@attrs.frozen
class QueueState:
    qid: U16
    size: U16
    head: U16 = 0
    tail: U16 = 0
    dma_addr: U64 = 0
    pending: tuple[U16, ...] = ()
    prio: U8 = vmfield(default=0, since=2)


@vmstate("test/ctrl/irq")
@attrs.frozen
class IrqState:
    vector: U16
    masked: bool = False
    eventfd: Optional[FdRef] = None


@vmstate("test/ctrl", version=1)
@attrs.frozen
class CtrlState:
    enabled: bool
    serial: Str[20]
    queues: Array[Optional[QueueState], 8]
    last_cmd: Bytes[16] = bytes(16)
    irq: Optional[IrqState] = None


@vmstate("test/item")
@attrs.frozen
class Item:
    tag: U32
    data: VarBytes[8] = b""


@vmstate("test/allkinds/extra")
@attrs.frozen
class Extra:
    note: Str[12] = ""
    counters: VarArray[U64, 4] = ()


@vmstate("test/allkinds", version=3, min_version=3)
@attrs.frozen
class AllKinds:
    u8: U8 = 0
    u16: U16 = 0
    u32: U32 = 0
    u64: U64 = 0
    i8: I8 = 0
    i16: I16 = 0
    i32: I32 = 0
    i64: I64 = 0
    flag: bool = False
    fixed: Bytes[16] = bytes(16)
    blob: VarBytes[32] = b""
    anybytes: bytes = b""
    label: Str[12] = ""
    text: str = ""
    fd: FdRef = FdRef(0)
    maybe_fd: Optional[FdRef] = None
    maybe_u32: Optional[U32] = None
    item: Item = Item(tag=0)
    words: Array[U32, 3] = (0, 0, 0)
    shorts: VarArray[I16, 5] = ()
    pairs: tuple[Bytes[2], ...] = ()
    grid: Array[Array[U8, 2], 2] = ((0, 0), (0, 0))
    ptrs_fixed: Array[Optional[Item], 6] = (None,) * 6
    ptrs_var: VarArray[Optional[Item], 10] = ()
    ptrs_any: tuple[Optional[Item], ...] = ()
    items: tuple[Item, ...] = ()
    extra: Optional[Extra] = None


class Color(enum.IntEnum):
    """An int enum, accepted by integer fields on save."""

    RED = 1
    BLUE = 200
