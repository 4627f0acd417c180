"""Versioned device state: descriptions, the stream format, schemas.

Describe state as frozen attrs classes::

    from pcidev.vmstate import vmstate, vmfield, U8, U16, U64, Bytes, Array, save, load

    @vmstate("demo/queue", version=2, min_version=1)
    @attrs.frozen
    class QueueState:
        base: U64 = 0
        head: U16 = 0
        prio: U8 = vmfield(default=0, since=2)   # absent from version-1 streams

    @vmstate("demo/ctrl")
    @attrs.frozen
    class CtrlState:
        queues: Array[QueueState | None, 64] = (None,) * 64   # array of pointers

    data = save("demo", {"queues": 64}, [("demo/ctrl", 0, state)])
    [(name, iid, new_state)] = load(data, device_type="demo", fingerprint={"queues": 64},
                                    descriptions=[CtrlState])

A live device builds a state object (a :class:`~pcidev.device.PciDevice`'s
``get_device_state()``) and applies a loaded one (``set_device_state()``), driven by
:mod:`pcidev.migration`; :func:`load` never mutates anything and either returns every
section or raises a :class:`VMStateError`.  The wire format is specified in
docs/vmstate-format.md.
"""

from __future__ import annotations

from pcidev.errors import VMStateError
from pcidev.vmstate.codec import check_state, decode_state, encode_state
from pcidev.vmstate.description import (
    Description,
    description_of,
    fields_of,
    is_vmstate,
    vmfield,
    vmstate,
)
from pcidev.vmstate.dump import dump_stream_json
from pcidev.vmstate.errors import (
    ChecksumError,
    ConfigMismatchError,
    StateError,
    StreamError,
    VersionError,
)
from pcidev.vmstate.schema import check_schema_compat, schema_of
from pcidev.vmstate.stream import (
    FORMAT_VERSION,
    MAGIC,
    Section,
    SectionInfo,
    StreamHeader,
    fingerprint_differences,
    load,
    peek_header,
    save,
)
from pcidev.vmstate.types import (
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    Array,
    Bool,
    Bytes,
    Check,
    FdRef,
    Mask,
    Range,
    Str,
    VarArray,
    VarBytes,
)

__all__ = [
    "vmstate",
    "vmfield",
    "Description",
    "description_of",
    "fields_of",
    "is_vmstate",
    "U8",
    "U16",
    "U32",
    "U64",
    "I8",
    "I16",
    "I32",
    "I64",
    "Bool",
    "Bytes",
    "VarBytes",
    "Str",
    "Array",
    "VarArray",
    "FdRef",
    "Range",
    "Mask",
    "Check",
    "save",
    "load",
    "peek_header",
    "Section",
    "SectionInfo",
    "StreamHeader",
    "MAGIC",
    "FORMAT_VERSION",
    "fingerprint_differences",
    "encode_state",
    "decode_state",
    "check_state",
    "schema_of",
    "check_schema_compat",
    "dump_stream_json",
    "VMStateError",
    "StreamError",
    "ChecksumError",
    "ConfigMismatchError",
    "VersionError",
    "StateError",
]
