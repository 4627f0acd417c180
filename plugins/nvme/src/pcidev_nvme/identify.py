"""Identify data structures the controller core builds (the namespace-specific
ones come from :class:`~pcidev_nvme.namespace.Namespace`).

* CNS 01h Identify Controller (:func:`identify_controller`);
* CNS 02h / 07h / 10h / 1Ah active and allocated NSID lists (:func:`nsid_list`);
* CNS 06h I/O command set specific Identify Controller, CSI 0 (:func:`identify_ctrl_csi_nvm`);
* CNS 08h / 1Fh I/O command set independent Identify Namespace, of an active / an
  allocated namespace (:func:`identify_ns_independent`; NSTAT says whether it is attached);
* CNS 12h / 13h controller lists (:func:`controller_list`);
* CNS 1Ch I/O command set profile (:func:`io_command_set_vector`);
* CNS 19h, the Endurance Group List, is :func:`pcidev_nvme.endurance.endurance_group_list`.

Offsets follow NVMe Base Specification 2.0, figures 275 (Identify Controller)
and 280 (I/O command set independent Identify Namespace).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Protocol

from pcidev_nvme import limits
from pcidev_nvme.config import NvmeConfig
from pcidev_nvme.endurance import CTRATT_EGS, ENDGIDMAX, OAES_EG_EVENT
from pcidev_nvme.logs import FirmwareSlots
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.sanitize import SANICAP
from pcidev_nvme.selftest import edstt_minutes


class IdentifyHost(Protocol):
    """What Identify Controller reads of the controller."""

    cfg: NvmeConfig
    firmware: FirmwareSlots

    @property
    def total_capacity(self) -> int: ...
    @property
    def unallocated_capacity(self) -> int: ...
    def adjust_oacs(self, oacs: int) -> int:
        """The OACS bits of this controller (SR-IOV: VMS on a primary, no NMS on a secondary)."""
    def adjust_identify(self, buf: bytearray) -> None:
        """Change the finished Identify Controller data of this controller (SR-IOV: CMIC, SANICAP)."""

__all__ = ["identify_controller", "nsid_list", "identify_ctrl_csi_nvm", "identify_ns_independent",
           "controller_list", "io_command_set_vector", "IDENTIFY_SIZE", "OACS", "LPA", "OAES", "CTRATT"]

IDENTIFY_SIZE = 4096

#: Optional Admin Command Support: Format NVM (1), Firmware Commit/Download (2),
#: Namespace Management (3), Device Self-test (4), Directives (5: the Identify
#: directive, :mod:`pcidev_nvme.directives`), Get LBA Status (9), Doorbell Buffer
#: Config (8, when enabled)
OACS = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 9)
OACS_DBBUF = 1 << 8
#: Log Page Attributes: Commands Supported and Effects (1), extended data (2), the
#: Supported Log Pages, Commands / Feature Identifiers / NVMe-MI Commands Supported and
#: Effects logs (5: LIDs 00h, 05h, 12h, 13h)
LPA = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 5)
#: Optional Asynchronous Events Supported: Namespace Attribute (8), Firmware Activation (9),
#: Endurance Group Event Aggregate Log Change (14, :mod:`pcidev_nvme.endurance`)
OAES = (1 << 8) | (1 << 9) | OAES_EG_EVENT
#: Controller Attributes: Endurance Groups (4, :mod:`pcidev_nvme.endurance`), Extended LBA
#: Formats Supported (15)
CTRATT = CTRATT_EGS | (1 << 15)
#: ONCS bits the core adds to the I/O command set's: Save/Select in features (4), Timestamp (6)
ONCS_CORE = (1 << 4) | (1 << 6)
#: Firmware Updates: slot 1 read-only (0), slot count (3:1), activation without reset (4)
FRMW_SLOT1_RO = 1 << 0
FRMW_NO_RESET = 1 << 4
#: Keep Alive Support granularity, 100 ms units
KAS = 1

NVME_VERSION = 0x00020000
#: seconds a shutdown may spend flushing namespaces after the drain (reported in RTD3E)
SHUTDOWN_FLUSH_MARGIN = 5.0


def _ascii(text: str, n: int) -> bytes:
    return text.encode("ascii")[:n].ljust(n, b" ")


def identify_controller(ctrl: IdentifyHost) -> bytes:
    """The 4096-byte Identify Controller data structure (CNS 01h)."""
    cfg = ctrl.cfg
    buf = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", buf, 0, cfg.vendor_id, cfg.subsystem_vendor_id)
    buf[4:24] = _ascii(cfg.serial_number, 20)
    buf[24:64] = _ascii(cfg.model, 40)
    buf[64:72] = _ascii(ctrl.firmware.revision(), 8)
    buf[72] = 6  # RAB: 64 commands
    buf[73:76] = b"\x00\x54\x52"  # IEEE OUI (QEMU's 525400, little-endian)
    buf[76] = 0  # CMIC: single port, single controller
    buf[77] = cfg.mdts
    # RTD3E: the longest a normal shutdown (CC.SHN) takes: the drain of commands in flight
    # plus the final flush. Linux waits max(RTD3E, 5 s) for CSTS.SHST; 0 would mean 5 s.
    rtd3e = int((limits.SHUTDOWN_DRAIN_TIMEOUT + SHUTDOWN_FLUSH_MARGIN) * 1_000_000)
    struct.pack_into("<HIII", buf, 78, cfg.cntlid, NVME_VERSION, 0, rtd3e)  # CNTLID VER RTD3R RTD3E
    struct.pack_into("<II", buf, 92, OAES, CTRATT)
    buf[111] = 1  # CNTRLTYPE: I/O controller
    # FGUID (112..127) zero, CRDT1..3 zero
    oacs = ctrl.adjust_oacs(OACS | (OACS_DBBUF if cfg.dbbuf else 0))
    struct.pack_into("<H", buf, 256, oacs)
    buf[258] = 3  # ACL: 4 concurrent Aborts (each completes at once: the limit is never reached)
    buf[259] = cfg.aerl
    buf[260] = FRMW_SLOT1_RO | (cfg.fw_slots << 1) | FRMW_NO_RESET
    buf[261] = LPA
    buf[262] = cfg.elpe
    buf[263] = 0  # NPSS: one power state
    buf[264] = 1  # AVSCC: admin vendor specific commands use the standard format
    buf[265] = 0  # APSTA
    struct.pack_into("<HH", buf, 266, cfg.warning_temp, cfg.critical_temp)
    cap = ctrl.total_capacity
    buf[280:296] = cap.to_bytes(16, "little")  # TNVMCAP
    # UNVMCAP: what Namespace Management can create (mem_create_limit included: see
    # NamespaceSetMixin.unallocated_capacity for the reading of the field)
    buf[296:312] = ctrl.unallocated_capacity.to_bytes(16, "little")
    struct.pack_into("<HB", buf, 316, edstt_minutes(cap), 1)  # EDSTT; DSTO: one self-test in the subsystem
    struct.pack_into("<H", buf, 320, KAS)
    struct.pack_into("<HH", buf, 324, 0, 0)  # MNTMT MXTMT: no thermal management
    struct.pack_into("<I", buf, 328, SANICAP)  # block erase, overwrite, crypto erase
    struct.pack_into("<HH", buf, 338, 0, ENDGIDMAX)  # NSETIDMAX (no NVM sets) ENDGIDMAX
    buf[512] = 0x66  # SQES
    buf[513] = 0x44  # CQES
    struct.pack_into("<HI", buf, 514, 0, cfg.max_namespaces)  # MAXCMD NN
    struct.pack_into("<H", buf, 520, limits.ONCS | ONCS_CORE)
    struct.pack_into("<H", buf, 522, 0)  # FUSES
    buf[524] = 0  # FNA: format per namespace, no crypto erase
    buf[525] = 0x07  # VWC: present, flush with broadcast NSID supported
    struct.pack_into("<HH", buf, 526, cfg.awun, cfg.awupf)  # AWUN AWUPF (pcidev_nvme.atomicity)
    buf[530] = 1  # ICSVSCC
    buf[531] = 0  # NWPC
    struct.pack_into("<HH", buf, 532, 0, limits.OCFS)  # ACWU OCFS
    struct.pack_into("<I", buf, 536, limits.SGLS)
    struct.pack_into("<I", buf, 540, 0)  # MNAN
    subnqn = f"nqn.2024-01.io.pcidev:nvme:{cfg.serial}"
    buf[768:768 + 256] = subnqn.encode("ascii")[:255].ljust(256, b"\0")
    # Power state 0: 25 W, operational
    struct.pack_into("<HBBII", buf, 2048, 2500, 0, 0, 16, 4)
    ctrl.adjust_identify(buf)
    return bytes(buf)


def identify_ctrl_csi_nvm(vsl: int = limits.VSL) -> bytes:
    """CNS 06h, CSI 00h: VSL, WZSL, WUSL, DMRL, DMRSL, DMSL from the I/O command set.

    :param vsl: the Verify Size Limit (the controller's ``vsl`` property; 0: no limit).
    """
    buf = bytearray(IDENTIFY_SIZE)
    buf[0] = vsl & 0xFF
    buf[1] = limits.WZSL
    buf[2] = 0  # WUSL
    buf[3] = min(limits.DMRL, 255)
    struct.pack_into("<IQ", buf, 4, limits.DMRSL, limits.DMSL)
    return bytes(buf)


def nsid_list(nsids: Iterable[int], above: int) -> bytes:
    """Up to 1024 NSIDs greater than ``above``, ascending, zero-padded to 4096 bytes."""
    ids = sorted(n for n in nsids if n > above)[:1024]
    return struct.pack(f"<{len(ids)}I", *ids).ljust(IDENTIFY_SIZE, b"\0")


def identify_ns_independent(ns: Namespace, *, attached: bool) -> bytes:
    """CNS 08h: the I/O command set independent Identify Namespace structure."""
    idns = ns.identify()
    buf = bytearray(IDENTIFY_SIZE)
    buf[0] = idns[24]  # NSFEAT
    buf[1] = idns[30]  # NMIC
    buf[2] = idns[31]  # RESCAP
    buf[3] = idns[32]  # FPI
    buf[4:8] = idns[92:96]  # ANAGRPID
    buf[8] = idns[99]  # NSATTR
    buf[10:12] = idns[100:102]  # NVMSETID
    buf[12:14] = idns[102:104]  # ENDGID
    buf[14] = 1 if attached else 0  # NSTAT: namespace ready
    return bytes(buf)


def controller_list(ids: Iterable[int], above: int = -1) -> bytes:
    """A Controller List: count, then up to 2047 identifiers >= ``above``."""
    sel = sorted(i for i in ids if i >= above)[:2047]
    return struct.pack(f"<H{len(sel)}H", len(sel), *sel).ljust(IDENTIFY_SIZE, b"\0")


def io_command_set_vector() -> bytes:
    """CNS 1Ch: I/O Command Set data structure; combination 0 = NVM only."""
    buf = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<Q", buf, 0, 1)
    return bytes(buf)
