"""Directives (NVMe Base 2.0, section 8.7): Directive Send (admin opcode 19h) and
Directive Receive (1Ah).

The controller supports one directive type, **Identify** (DTYPE 00h), which the
specification makes mandatory for a controller that supports directives and which
is always enabled:

===========  ================  =========================================================
Command      DOPER             Behaviour
===========  ================  =========================================================
Receive      01h Return        the 4096-byte Return Parameters structure: Directives
             Parameters        Supported (bytes 31:0), Directives Enabled (63:32) and
                               Directives Persistent Across Controller Level Resets
                               (95:64), one bit per directive type: Identify only
Send         01h Enable        TDTYPE (CDW12 15:8) names the directive type to enable or
             Directive         disable (ENDIR, CDW12 bit 0): the Identify directive
                               cannot be disabled and no other type is supported, so
                               every Enable Directive fails with Invalid Field
===========  ================  =========================================================

Any other directive type or operation: Invalid Field (CDW11). NSID: an active
namespace or FFFFFFFFh (every namespace: the answer is the same for all); anything
else is Invalid Namespace or Format. Streams (DTYPE 01h) and Data Placement (02h)
are not supported, so there is no per-namespace directive state to keep or migrate.
"""

from __future__ import annotations

import struct
from collections.abc import Container

from pcidev_nvme.status import NvmeStatusError, Status

__all__ = ["DTYPE_IDENTIFY", "DTYPE_STREAMS", "DTYPE_DATA_PLACEMENT", "DOPER_RETURN_PARAMETERS",
           "DOPER_ENABLE_DIRECTIVE", "SUPPORTED", "RETURN_PARAMETERS_SIZE", "return_parameters",
           "directive_receive", "directive_send"]

DTYPE_IDENTIFY = 0x00
DTYPE_STREAMS = 0x01
DTYPE_DATA_PLACEMENT = 0x02
#: Identify directive operations: Receive 01h Return Parameters, Send 01h Enable Directive
DOPER_RETURN_PARAMETERS = 0x01
DOPER_ENABLE_DIRECTIVE = 0x01
#: the directive types supported (and always enabled): Identify
SUPPORTED = frozenset({DTYPE_IDENTIFY})
RETURN_PARAMETERS_SIZE = 4096

_OFF_NSID, _OFF_CDW10, _OFF_CDW11, _OFF_CDW12 = 4, 40, 44, 48
_BROADCAST = 0xFFFFFFFF


def return_parameters() -> bytes:
    """The Identify directive's Return Parameters data structure (4096 bytes)."""
    buf = bytearray(RETURN_PARAMETERS_SIZE)
    bits = 0
    for dtype in SUPPORTED:
        bits |= 1 << dtype
    struct.pack_into("<B", buf, 0, bits)  # Directives Supported
    struct.pack_into("<B", buf, 32, bits)  # Directives Enabled: Identify is always enabled
    struct.pack_into("<B", buf, 64, bits)  # Persistent Across Controller Level Resets: so is it
    return bytes(buf)


def _fields(cdw11: int, nsid: int, active: Container[int]) -> tuple[int, int]:
    doper, dtype = cdw11 & 0xFF, (cdw11 >> 8) & 0xFF
    if nsid != _BROADCAST and nsid not in active:
        raise NvmeStatusError(Status.INVALID_NSID, f"namespace {nsid:#x} is not active", param_offset=_OFF_NSID)
    if dtype not in SUPPORTED:
        raise NvmeStatusError(Status.INVALID_FIELD, f"directive type {dtype:#04x} is not supported",
                              param_offset=_OFF_CDW11 + 1)
    return doper, dtype


def directive_receive(cdw10: int, cdw11: int, nsid: int, active: Container[int]) -> bytes:
    """Execute Directive Receive; returns the data to transfer ((NUMD + 1) dwords: the
    structure, truncated or padded with zeros).

    :param cdw10: NUMD, 0's based dwords.
    :param cdw11: DOPER (7:0), DTYPE (15:8), DSPEC (31:16).
    :param nsid: the command's NSID.
    :param active: the active NSIDs.
    :raises NvmeStatusError: Invalid Namespace or Format, Invalid Field.
    """
    doper, _ = _fields(cdw11, nsid, active)
    if doper != DOPER_RETURN_PARAMETERS:
        raise NvmeStatusError(Status.INVALID_FIELD, f"Identify directive operation {doper:#04x} is not defined "
                              "for Directive Receive", param_offset=_OFF_CDW11)
    length = (cdw10 + 1) * 4
    return return_parameters()[:length].ljust(length, b"\0")


def directive_send(cdw11: int, cdw12: int, nsid: int, active: Container[int]) -> None:
    """Execute Directive Send: every operation the host may ask is refused with the
    specification's status (see the module's table).

    :param cdw11: DOPER (7:0), DTYPE (15:8), DSPEC (31:16).
    :param cdw12: Enable Directive: ENDIR (bit 0), TDTYPE (15:8).
    :param nsid: the command's NSID.
    :param active: the active NSIDs.
    :raises NvmeStatusError: always (Invalid Namespace or Format, Invalid Field).
    """
    doper, _ = _fields(cdw11, nsid, active)
    if doper != DOPER_ENABLE_DIRECTIVE:
        raise NvmeStatusError(Status.INVALID_FIELD, f"Identify directive operation {doper:#04x} is not defined "
                              "for Directive Send", param_offset=_OFF_CDW11)
    tdtype = (cdw12 >> 8) & 0xFF
    if tdtype == DTYPE_IDENTIFY:
        raise NvmeStatusError(Status.INVALID_FIELD, "the Identify directive is always enabled",
                              param_offset=_OFF_CDW12 + 1)
    raise NvmeStatusError(Status.INVALID_FIELD, f"directive type {tdtype:#04x} is not supported",
                          param_offset=_OFF_CDW12 + 1)
