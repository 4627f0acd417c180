"""PCI Express capability (ID 10h), version 2, for an endpoint.

Layout (byte offsets)::

    00  id | next | PCIe capabilities (16): version 3:0, device/port type 7:4
    04  device capabilities: MPS supported 2:0, ext tag 5, role-based errors 15, FLR 28
    08  device control (16): error reporting enables 3:0, relaxed ordering 4, MPS 7:5,
        ext tag 8, no snoop 11, MRRS 14:12, initiate FLR 15 (reads 0)
    0A  device status (16): correctable/non-fatal/fatal/UR detected 3:0 (RW1C)
    0C  link capabilities: max speed 3:0, max width 9:4, ASPM 11:10, port 31:24
    10  link control (16)         12  link status (16): speed 3:0, width 9:4
    14..23  slot and root registers (absent for an endpoint: zero)
    24  device capabilities 2     28  device control 2 (16)   2A device status 2
    2C  link capabilities 2: supported speeds 7:1
    30  link control 2 (16): target speed 3:0      32 link status 2

Writing 1 to *Initiate Function Level Reset* performs an FLR of the device.
"""

from __future__ import annotations

from pcidev.errors import ConfigError
from pcidev.pci import ids
from pcidev.pci.capabilities.base import Capability
from pcidev.pci.config import ResetKind

__all__ = [
    "FLAGS", "DEVCAP", "DEVCTL", "DEVSTA", "LNKCAP", "LNKCTL", "LNKSTA", "DEVCAP2", "DEVCTL2", "LNKCAP2",
    "LNKCTL2", "LNKSTA2", "DEVCAP_FLR", "DEVCAP_RBER", "DEVCAP_EXT_TAG", "DEVCTL_BCR_FLR", "DEVCTL_RW",
    "DEVCTL_DEFAULT", "DEVSTA_ERRORS", "LNKCTL_RW", "TYPE_ENDPOINT", "TYPE_RC_INTEGRATED",
    "PciExpressCapability",
]

#: PCI Express Capabilities register offset in the PCIe capability (PCI_EXP_FLAGS)
FLAGS = 0x02
#: Device Capabilities register offset in the PCIe capability (PCI_EXP_DEVCAP)
DEVCAP = 0x04
#: Device Control register offset in the PCIe capability (PCI_EXP_DEVCTL)
DEVCTL = 0x08
#: Device Status register offset in the PCIe capability (PCI_EXP_DEVSTA)
DEVSTA = 0x0A
#: Link Capabilities register offset in the PCIe capability (PCI_EXP_LNKCAP)
LNKCAP = 0x0C
#: Link Control register offset in the PCIe capability (PCI_EXP_LNKCTL)
LNKCTL = 0x10
#: Link Status register offset in the PCIe capability (PCI_EXP_LNKSTA)
LNKSTA = 0x12
#: Device Capabilities 2 register offset in the PCIe capability (PCI_EXP_DEVCAP2)
DEVCAP2 = 0x24
#: Device Control 2 register offset in the PCIe capability (PCI_EXP_DEVCTL2)
DEVCTL2 = 0x28
#: Link Capabilities 2 register offset in the PCIe capability (PCI_EXP_LNKCAP2)
LNKCAP2 = 0x2C
#: Link Control 2 register offset in the PCIe capability (PCI_EXP_LNKCTL2)
LNKCTL2 = 0x30
#: Link Status 2 register offset in the PCIe capability (PCI_EXP_LNKSTA2)
LNKSTA2 = 0x32

#: Device Capabilities bit: Function Level Reset Capability (PCI_EXP_DEVCAP_FLR)
DEVCAP_FLR = 1 << 28
#: Device Capabilities bit: Role-Based Error Reporting (PCI_EXP_DEVCAP_RBER)
DEVCAP_RBER = 1 << 15
#: Device Capabilities bit: Extended Tag Field Supported (PCI_EXP_DEVCAP_EXT_TAG)
DEVCAP_EXT_TAG = 1 << 5
#: Device Control bit: Initiate Function Level Reset, always reads 0 (PCI_EXP_DEVCTL_BCR_FLR)
DEVCTL_BCR_FLR = 0x8000
#: Device Control bits the guest may write: all but Initiate FLR (bit 15, writable if FLR is advertised)
DEVCTL_RW = 0x7FFF
#: Device Control at reset: Relaxed Ordering, No Snoop, Max_Read_Request_Size 512 B (PCI_EXP_DEVCTL_READRQ_512B)
DEVCTL_DEFAULT = 0x2810
#: Device Status error-detected bits (RW1C): PCI_EXP_DEVSTA_CED, _NFED, _FED and _URD
DEVSTA_ERRORS = 0x000F
#: Link Control bits the guest may write: 11:0 but reserved bit 2 (Retrain Link, bit 5, is kept writable)
LNKCTL_RW = 0x0FFB

#: Device/Port Type of the PCI Express Capabilities register: PCI Express Endpoint (PCI_EXP_TYPE_ENDPOINT)
TYPE_ENDPOINT = 0x0
#: Device/Port Type of the PCI Express Capabilities register: RC Integrated Endpoint (PCI_EXP_TYPE_RC_END)
TYPE_RC_INTEGRATED = 0x9

_SPEEDS = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}


class PciExpressCapability(Capability):
    """PCI Express capability for an endpoint.

    :param max_payload: largest supported Max_Payload_Size in bytes (128…4096).
    :param flr: advertise Function Level Reset.
    :param link_speed: GT/s (2.5, 5, 8, 16, 32, 64).
    :param link_width: lanes (1, 2, 4, 8, 16, 32).
    :param port_type: device/port type (0 endpoint, 9 RC-integrated endpoint).
    """

    CAP_ID = ids.CapId.EXP
    SIZE = 0x3C

    def __init__(self, *, max_payload: int = 256, flr: bool = True, link_speed: float = 8.0,
                 link_width: int = 4, port_type: int = TYPE_ENDPOINT, offset: int | None = None) -> None:
        super().__init__(offset=offset)
        if max_payload not in (128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"bad Max_Payload_Size {max_payload}")
        if link_speed not in _SPEEDS:
            raise ConfigError(f"bad link speed {link_speed}")
        if link_width not in (1, 2, 4, 8, 12, 16, 32):
            raise ConfigError(f"bad link width {link_width}")
        self.max_payload = max_payload
        self.flr = flr
        self.speed_code = _SPEEDS[link_speed]
        self.link_width = link_width
        self.port_type = port_type

    def setup(self) -> None:
        self.set(FLAGS, 2, 0x2 | (self.port_type << 4))
        mps = self.max_payload.bit_length() - 8
        devcap = mps | DEVCAP_EXT_TAG | DEVCAP_RBER | (7 << 6) | (7 << 9)
        if self.flr:
            devcap |= DEVCAP_FLR
        self.set(DEVCAP, 4, devcap)
        self.set(DEVCTL, 2, DEVCTL_DEFAULT)
        self.writable(DEVCTL, 2, DEVCTL_RW | (DEVCTL_BCR_FLR if self.flr else 0))
        self.w1c(DEVSTA, 2, DEVSTA_ERRORS)
        self.set(LNKCAP, 4, self.speed_code | (self.link_width << 4) | (0x3 << 10))
        self.writable(LNKCTL, 2, LNKCTL_RW)
        self.flr_keep(LNKCTL, 2, 0xFFFF)
        self.set(LNKSTA, 2, self.speed_code | (self.link_width << 4))
        self.set(DEVCAP2, 4, 0x1F)  # completion timeout ranges A-D, disable supported
        self.writable(DEVCTL2, 2, 0x001F)
        self.set(LNKCAP2, 4, ((1 << self.speed_code) - 1) << 1)
        self.set(LNKCTL2, 2, self.speed_code)
        self.writable(LNKCTL2, 2, 0x000F)
        self.flr_keep(LNKCTL2, 2, 0xFFFF)
        self.on_write(DEVCTL, 2, self._devctl_written)

    @property
    def device_control(self) -> int:
        return self.get(DEVCTL, 2)

    def _devctl_written(self, off: int, size: int, old: int, value: int) -> None:
        ctl = self.get(DEVCTL, 2)
        if ctl & DEVCTL_BCR_FLR:
            self.set(DEVCTL, 2, ctl & ~DEVCTL_BCR_FLR)  # always reads 0
            assert self.device is not None  # the hook is added by setup(), after install
            self.device.request_reset(ResetKind.FLR)

    def report_error(self, kind: str) -> None:
        """Set a Device Status error-detected bit: ``correctable``, ``nonfatal``,
        ``fatal`` or ``unsupported``."""
        bit = {"correctable": 1, "nonfatal": 2, "fatal": 4, "unsupported": 8}[kind]
        self.set(DEVSTA, 2, self.get(DEVSTA, 2) | bit)
