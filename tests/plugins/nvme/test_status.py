"""NVMe status values (pcidev_nvme.status) against the NVMe Base 2.0 / libnvme ``types.h``
status list (``enum nvme_status_field``: ``NVME_SC_*``, SCT << 8 | SC)."""

from __future__ import annotations

import pytest

from pcidev_nvme.status import DNR, Sct, Status, status_field

#: name here -> libnvme's value (SCT << 8 | SC)
LIBNVME = {
    "INVALID_OPCODE": 0x001, "INVALID_FIELD": 0x002, "CMDID_CONFLICT": 0x003, "DATA_TRANSFER_ERROR": 0x004,
    "INTERNAL": 0x006, "ABORT_REQUESTED": 0x007, "ABORT_SQ_DELETED": 0x008, "INVALID_NSID": 0x00B,
    "CMD_SEQ_ERROR": 0x00C, "INVALID_USE_OF_CMB": 0x012, "PRP_OFFSET_INVALID": 0x013,
    "SGL_OFFSET_INVALID": 0x016, "KA_TIMEOUT_EXPIRED": 0x019, "SANITIZE_FAILED": 0x01C,
    "SANITIZE_IN_PROGRESS": 0x01D, "CMD_NOT_SUP_CMB_QUEUE": 0x01F, "NS_WRITE_PROTECTED": 0x020,
    "LBA_RANGE": 0x080, "FORMAT_IN_PROGRESS": 0x084,
    "CQ_INVALID": 0x100, "QID_INVALID": 0x101, "QUEUE_SIZE": 0x102, "ABORT_LIMIT": 0x103, "AER_LIMIT": 0x105,
    "INVALID_FW_SLOT": 0x106, "INVALID_FW_IMAGE": 0x107, "INVALID_INTERRUPT_VECTOR": 0x108,
    "INVALID_LOG_PAGE": 0x109, "INVALID_FORMAT": 0x10A, "INVALID_QUEUE_DELETION": 0x10C,
    "FEATURE_NOT_SAVEABLE": 0x10D, "FEATURE_NOT_CHANGEABLE": 0x10E, "FEATURE_NOT_PER_NS": 0x10F,
    "OVERLAPPING_RANGE": 0x114, "NS_INSUFFICIENT_CAPACITY": 0x115, "NS_ID_UNAVAILABLE": 0x116,
    "NS_ALREADY_ATTACHED": 0x118, "NS_IS_PRIVATE": 0x119, "NS_NOT_ATTACHED": 0x11A,
    "THIN_PROVISIONING_NOT_SUPPORTED": 0x11B, "CONTROLLER_LIST_INVALID": 0x11C, "SELF_TEST_IN_PROGRESS": 0x11D,
    "INVALID_CTRL_ID": 0x11F, "SEC_CTRL_STATE_INVALID": 0x120, "INVALID_NUM_CTRL_RESOURCES": 0x121,
    "INVALID_RESOURCE_ID": 0x122, "PMR_SAN_PROHIBITED": 0x123, "ANA_GROUP_ID_INVALID": 0x124,
    "IOCS_NOT_SUPPORTED": 0x129, "IOCS_NOT_ENABLED": 0x12A, "IOCS_COMBINATION_REJECTED": 0x12B,
    "INVALID_IOCS": 0x12C,
    "CONFLICTING_ATTRS": 0x180, "INVALID_PROT_INFO": 0x181, "WRITE_TO_RO": 0x182, "CMD_SIZE_LIMIT_EXCEEDED": 0x183,
    "WRITE_FAULT": 0x280, "UNRECOVERED_READ_ERROR": 0x281, "GUARD_CHECK": 0x282, "APP_TAG_CHECK": 0x283,
    "REF_TAG_CHECK": 0x284, "COMPARE_FAILURE": 0x285, "ACCESS_DENIED": 0x286, "DEALLOCATED_OR_UNWRITTEN": 0x287,
}


@pytest.mark.parametrize("name", sorted(LIBNVME))
def test_status_values_match_libnvme(name):
    assert Status[name] == LIBNVME[name], f"{name} is {Status[name]:#05x}, libnvme says {LIBNVME[name]:#05x}"


def test_invalid_io_command_set_is_command_specific():
    """Invalid I/O Command Set (2Ch) is a command specific status in NVMe 2.0 (with I/O
    Command Set Not Supported 29h, Not Enabled 2Ah, Combination Rejected 2Bh), not
    generic 02Ch as the pre-2.0 TP 4056 numbering Linux's NVME_SC_INVALID_IO_CMD_SET keeps."""
    for status in (Status.INVALID_IOCS, Status.IOCS_NOT_SUPPORTED, Status.IOCS_NOT_ENABLED,
                   Status.IOCS_COMBINATION_REJECTED):
        assert status >> 8 == Sct.COMMAND_SPECIFIC
    assert Status.INVALID_IOCS & 0xFF == 0x2C
    assert status_field(Status.INVALID_IOCS) == DNR | 0x12C  # as a CQE's status field carries it


def test_every_status_has_a_known_type():
    for status in Status:
        assert status >> 8 in {int(s) for s in Sct}, status.name
