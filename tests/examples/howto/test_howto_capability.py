"""examples/howto/vendor_capability.py (docs/howto/capability.md): a vendor-specific
capability found, written, reset and migrated like a standard one."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from pcidev.host import Machine
from pcidev.migration import collect_blockers
from pcidev.pci.config import ResetKind
from pcidev.testing import plugged, roundtrip

HOWTO = Path(__file__).resolve().parents[3] / "examples" / "howto"
if str(HOWTO) not in sys.path:
    sys.path.insert(0, str(HOWTO))
vendor_capability = importlib.import_module("vendor_capability")

CAP_ID_VNDR, ECHO = 0x09, 0x00


# [test]
def test_the_guest_finds_and_uses_the_capability() -> None:
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, vendor_capability.EchoDevice())
        cap = pdev.find_capability(CAP_ID_VNDR)  # walks the list from 0x34, as a driver does
        assert cap and pdev.config_read8(cap + 2) == 8 and pdev.config_read8(cap + 3) == 1
        pdev.iowrite32(0, ECHO, 0x12345678)
        assert pdev.ioread32(0, ECHO) == 0x12345678
        pdev.config_write16(cap + 4, 0xFFFF)  # only INVERT is writable
        assert pdev.config_read16(cap + 4) == 0x0001 and pdev.config_read16(cap + 6) == 1
        assert pdev.ioread32(0, ECHO) == 0x12345678 ^ 0xFFFFFFFF
        pdev.config_write16(cap + 6, 0)  # STATUS is read-only
        assert pdev.config_read16(cap + 6) == 1
        roundtrip(pdev)  # the capability's registers migrate with config space
        assert pdev.config_read16(cap + 4) == 0x0001 and pdev.config_read16(cap + 6) == 1
        assert pdev.ioread32(0, ECHO) == 0x12345678 ^ 0xFFFFFFFF
# [end test]


def test_a_reset_clears_the_capability() -> None:
    dev = vendor_capability.EchoDevice()
    with Machine(ram_size=16 << 20) as machine:
        pdev = plugged(machine, dev)
        cap = pdev.find_capability(CAP_ID_VNDR)
        pdev.config_write16(cap + 4, 1)
        dev.reset(ResetKind.FLR)
        assert pdev.config_read16(cap + 4) == 0 and pdev.config_read16(cap + 6) == 0


def test_an_undeclared_capability_blocks_migration() -> None:
    class Undeclared(vendor_capability.EchoDevice):
        TYPE_NAME = "howto-vcap-undeclared"
        MIGRATABLE_FEATURES = frozenset()

    dev = Undeclared()
    dev.realize()
    assert any("cap:EchoControlCapability" in reason for reason in collect_blockers(dev))
    ok = vendor_capability.EchoDevice()
    ok.realize()
    assert collect_blockers(ok) == []
