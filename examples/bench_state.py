"""The NVMe-like state shared by examples/bench_vmstate.py and
examples/bench_device_migration.py: 64 submission and 64 completion queues (arrays of
pointers with 65 slots, slot 0 unused) and 1,000 in-flight request records, each a
64-byte command plus a few integers."""

from __future__ import annotations

import attrs

from pcidev.vmstate import U8, U16, U32, U64, Array, Bytes, VarArray, vmstate

QUEUES = 64
REQUESTS = 1000


@vmstate("bench/sq")
@attrs.frozen
class SubmissionQueue:
    sqid: U16
    cqid: U16
    size: U16
    head: U16 = 0
    tail: U16 = 0
    prio: U8 = 0
    base: U64 = 0


@vmstate("bench/cq")
@attrs.frozen
class CompletionQueue:
    cqid: U16
    size: U16
    vector: U16 = 0
    head: U16 = 0
    tail: U16 = 0
    phase: bool = True
    irq_enabled: bool = True
    base: U64 = 0


@vmstate("bench/req")
@attrs.frozen
class Request:
    cid: U16
    sqid: U16
    status: U16 = 0
    nlb: U32 = 0
    slba: U64 = 0
    cmd: Bytes[64] = bytes(64)


@vmstate("bench/ctrl")
@attrs.frozen
class Controller:
    cc: U32 = 0
    csts: U32 = 0
    aqa: U32 = 0
    asq: U64 = 0
    acq: U64 = 0
    sq: Array[SubmissionQueue | None, QUEUES + 1] = (None,) * (QUEUES + 1)
    cq: Array[CompletionQueue | None, QUEUES + 1] = (None,) * (QUEUES + 1)
    inflight: VarArray[Request, 65536] = ()


def make_state() -> Controller:
    """Build the benchmark state: 64 SQ/CQ pairs and 1,000 in-flight requests."""
    sq = (None,) + tuple(SubmissionQueue(sqid=i, cqid=i, size=1024, head=i, tail=i + 7,
                                         base=0x1_0000_0000 + i * 0x10000)
                         for i in range(1, QUEUES + 1))
    cq = (None,) + tuple(CompletionQueue(cqid=i, size=1024, vector=i, head=i,
                                         base=0x2_0000_0000 + i * 0x10000)
                         for i in range(1, QUEUES + 1))
    reqs = tuple(Request(cid=i, sqid=1 + i % QUEUES, nlb=7, slba=i * 8,
                         cmd=bytes((i + j) & 0xFF for j in range(64)))
                 for i in range(REQUESTS))
    return Controller(cc=0x460001, csts=1, aqa=0x1F001F, asq=0x1000, acq=0x2000,
                      sq=sq, cq=cq, inflight=reqs)
