"""NVMe completion status codes (Status Code Type and Status Code) and the
typed error that carries one.

A status is the 15-bit value ``DNR << 14 | MORE << 13 | SCT << 8 | SC`` as the
Completion Queue Entry's DW3 bits 31:17 hold it (the phase bit is not part of
it). Values follow the NVMe Base specification 2.0 (see also Linux
``include/linux/nvme.h``, ``enum nvme_status``... names kept close to it).
"""

from __future__ import annotations

import enum

from pcidev.errors import PcidevError

DNR = 1 << 14
MORE = 1 << 13


class Sct(enum.IntEnum):
    """Status Code Type."""

    GENERIC = 0x0
    COMMAND_SPECIFIC = 0x1
    MEDIA = 0x2
    PATH = 0x3
    VENDOR = 0x7


class Status(enum.IntEnum):
    """``SCT << 8 | SC`` of the statuses the controller returns."""

    # generic command status (SCT 0)
    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    CMDID_CONFLICT = 0x003
    DATA_TRANSFER_ERROR = 0x004
    POWER_LOSS_ABORT = 0x005
    INTERNAL = 0x006
    ABORT_REQUESTED = 0x007
    ABORT_SQ_DELETED = 0x008
    ABORT_FAILED_FUSED = 0x009
    ABORT_MISSING_FUSED = 0x00A
    INVALID_NSID = 0x00B
    CMD_SEQ_ERROR = 0x00C
    INVALID_SGL_SEG_DESCR = 0x00D
    INVALID_NUM_SGL_DESCRS = 0x00E
    DATA_SGL_LEN_INVALID = 0x00F
    MD_SGL_LEN_INVALID = 0x010
    SGL_DESCR_TYPE_INVALID = 0x011
    INVALID_USE_OF_CMB = 0x012
    PRP_OFFSET_INVALID = 0x013
    SGL_OFFSET_INVALID = 0x016
    HOST_ID_INCONSISTENT = 0x018
    KA_TIMEOUT_EXPIRED = 0x019
    KA_TIMEOUT_INVALID = 0x01A
    CMD_ABORTED_PREMEPT = 0x01B
    SANITIZE_FAILED = 0x01C
    SANITIZE_IN_PROGRESS = 0x01D
    SGL_DATA_BLOCK_GRAN_INVALID = 0x01E
    CMD_NOT_SUP_CMB_QUEUE = 0x01F
    NS_WRITE_PROTECTED = 0x020
    CMD_INTERRUPTED = 0x021
    TRANSIENT_TRANSPORT = 0x022
    IOCS_NOT_SUPPORTED = 0x129  # I/O Command Set Not Supported
    IOCS_NOT_ENABLED = 0x12A  # I/O Command Set Not Enabled
    INVALID_IOCS = 0x12C  # Invalid I/O Command Set (command specific, SCT 1: libnvme NVME_SC_INVALID_IOCS)
    LBA_RANGE = 0x080
    CAP_EXCEEDED = 0x081
    NS_NOT_READY = 0x082
    RESERVATION_CONFLICT = 0x083
    FORMAT_IN_PROGRESS = 0x084
    # command specific status (SCT 1)
    CQ_INVALID = 0x100
    QID_INVALID = 0x101
    QUEUE_SIZE = 0x102
    ABORT_LIMIT = 0x103
    AER_LIMIT = 0x105
    INVALID_FW_SLOT = 0x106
    INVALID_FW_IMAGE = 0x107
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_FORMAT = 0x10A
    FW_ACTIVATE_REQUIRES_CONV_RESET = 0x10B
    INVALID_QUEUE_DELETION = 0x10C
    SELF_TEST_IN_PROGRESS = 0x11D  # Device Self-test In Progress
    FEATURE_NOT_SAVEABLE = 0x10D
    FEATURE_NOT_CHANGEABLE = 0x10E
    FEATURE_NOT_PER_NS = 0x10F
    FW_ACTIVATE_REQUIRES_NVM_RESET = 0x110
    FW_ACTIVATE_REQUIRES_RESET = 0x111
    FW_ACTIVATE_REQUIRES_MAX_TIME = 0x112
    FW_ACTIVATE_PROHIBITED = 0x113
    OVERLAPPING_RANGE = 0x114
    NS_INSUFFICIENT_CAPACITY = 0x115
    NS_ID_UNAVAILABLE = 0x116
    NS_ALREADY_ATTACHED = 0x118
    NS_IS_PRIVATE = 0x119
    NS_NOT_ATTACHED = 0x11A
    THIN_PROVISIONING_NOT_SUPPORTED = 0x11B
    CONTROLLER_LIST_INVALID = 0x11C
    IOCS_COMBINATION_REJECTED = 0x12B  # Set Features 19h: I/O Command Set Combination Rejected
    INVALID_CTRL_ID = 0x11F
    SEC_CTRL_STATE_INVALID = 0x120
    INVALID_NUM_CTRL_RESOURCES = 0x121
    INVALID_RESOURCE_ID = 0x122
    PMR_SAN_PROHIBITED = 0x123  # Sanitize Prohibited While Persistent Memory Region is Enabled
    ANA_GROUP_ID_INVALID = 0x124
    CMD_SIZE_LIMIT_EXCEEDED = 0x183  # Copy: command size limit exceeded
    INCOMPATIBLE_NS = 0x185  # Copy: Incompatible Namespace or Format (source vs destination)
    FAST_COPY_NOT_POSSIBLE = 0x186  # Copy: a range asks for Fast Copy Only (SOPT.FCO)
    OVERLAPPING_IO_RANGE = 0x187  # Copy: a source range overlaps the destination range
    CONFLICTING_ATTRS = 0x180
    INVALID_PROT_INFO = 0x181
    WRITE_TO_RO = 0x182
    # media and data integrity errors (SCT 2)
    WRITE_FAULT = 0x280
    UNRECOVERED_READ_ERROR = 0x281
    GUARD_CHECK = 0x282
    APP_TAG_CHECK = 0x283
    REF_TAG_CHECK = 0x284
    COMPARE_FAILURE = 0x285
    ACCESS_DENIED = 0x286
    DEALLOCATED_OR_UNWRITTEN = 0x287


def status_field(status: int, *, dnr: bool = True) -> int:
    """The 15-bit status field for a CQE, with Do Not Retry set for errors by default."""
    if status == Status.SUCCESS:
        return 0
    return (status & 0x7FF) | (DNR if dnr else 0)


class NvmeStatusError(PcidevError):
    """A command failed with an NVMe status.

    :param status: a :class:`Status` value (``SCT << 8 | SC``).
    :param message: for logs and the Error Information log's context.
    :param param_offset: byte offset in the SQE of the offending field (Error
        Information "Parameter Error Location"), or None.
    :param lba: the LBA the error is about (Error Information "LBA"), or None.
    :param nsid: the namespace the error is about when it is not the command's (a Copy's
        source namespace; Error Information "Namespace"), or None: the command's.
    """

    def __init__(self, status: int, message: str = "", *, param_offset: int | None = None,
                 lba: int | None = None, dnr: bool = True, nsid: int | None = None) -> None:
        self.status = int(status)
        self.param_offset = param_offset
        self.lba = lba
        self.nsid = nsid
        self.dnr = dnr
        try:
            name = Status(self.status).name
        except ValueError:
            name = f"{self.status:#05x}"
        super().__init__(f"{name}: {message}" if message else name)
