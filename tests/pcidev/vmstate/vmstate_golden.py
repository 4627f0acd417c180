"""Expected contents of the golden streams in tests/pcidev/vmstate/data."""

from __future__ import annotations

from pathlib import Path

from vmstate_descriptions import CtrlState, IrqState, QueueState

from pcidev.vmstate import FdRef

DATA = Path(__file__).resolve().parent / "data"

#: The state saved (with the current descriptions) in data/sample-v2.pcvm.
SAMPLE_V2 = CtrlState(
    enabled=True,
    serial="PCIDEV-0002",
    queues=(
        QueueState(qid=0, size=32, head=1, tail=2, dma_addr=0x2000, pending=(1,), prio=3),
        QueueState(qid=1, size=16),
        None,
        None,
        None,
        None,
        None,
        QueueState(qid=7, size=4096, head=4095, dma_addr=0xFFFF_FFFF_FFFF_F000, prio=255),
    ),
    last_cmd=b"\xff" * 16,
    irq=IrqState(vector=5, masked=True, eventfd=FdRef(2)),
)

#: What the current descriptions must load from data/sample-v1.pcvm: version 1's
#: ``base`` arrives as ``dma_addr`` (upgrade step), ``prio`` takes its default and
#: the ``irq`` subsection (absent from the stream) stays None.
SAMPLE_V1_UPGRADED = CtrlState(
    enabled=True,
    serial="PCIDEV-0001",
    queues=(
        QueueState(qid=0, size=32, head=3, tail=5, dma_addr=0x1000, pending=(7, 9), prio=0),
        None,
        QueueState(qid=2, size=64, dma_addr=0xFFFF_0000_1000),
        None,
        None,
        QueueState(qid=5, size=1024, head=1023, tail=0, dma_addr=0x8000_0000),
        None,
        None,
    ),
    last_cmd=bytes(range(16)),
    irq=None,
)
