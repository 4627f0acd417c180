"""The *released* version 1 of the sample descriptions, kept verbatim.

tests/pcidev/vmstate/data/sample-v1.pcvm was saved with these classes.  Never edit them:
they are what a version-1 producer looked like, and the tests check that they still
produce that golden stream byte for byte and that the current descriptions
(vmstate_descriptions.py) load it.
"""

from __future__ import annotations

from typing import Optional

import attrs

from pcidev.vmstate import U16, U64, Array, Bytes, Str, vmstate


@vmstate("test/queue", version=1)
@attrs.frozen
class QueueStateV1:
    qid: U16
    size: U16
    head: U16 = 0
    tail: U16 = 0
    base: U64 = 0
    pending: tuple[U16, ...] = ()


@vmstate("test/ctrl", version=1)
@attrs.frozen
class CtrlStateV1:
    enabled: bool
    serial: Str[20]
    queues: Array[Optional[QueueStateV1], 8]
    last_cmd: Bytes[16] = bytes(16)


#: The state saved in tests/pcidev/vmstate/data/sample-v1.pcvm.
SAMPLE_V1 = CtrlStateV1(
    enabled=True,
    serial="PCIDEV-0001",
    queues=(
        QueueStateV1(qid=0, size=32, head=3, tail=5, base=0x1000, pending=(7, 9)),
        None,
        QueueStateV1(qid=2, size=64, base=0xFFFF_0000_1000),
        None,
        None,
        QueueStateV1(qid=5, size=1024, head=1023, tail=0, base=0x8000_0000),
        None,
        None,
    ),
    last_cmd=bytes(range(16)),
)

FINGERPRINT = {"max_queues": 8, "namespace_sizes": [1 << 20, 1 << 30], "bar0_size": 0x4000}
DEVICE_TYPE = "test-dev"
