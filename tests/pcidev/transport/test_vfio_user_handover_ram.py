"""A handover keeps a RAM BAR that the client has mapped: the new process serves the same
memfd (it travels with the vmstate and the new device's RamBacking adopts it), so the
client's mapping and the device see the same memory before and after.

The device is ``howto-mailbox`` (examples/howto/shared_page.py): BAR2 is 8 KiB of RAM, its
second page a sparse-mmap area; a write to BAR0 POST makes the device write (SEQ, value)
at the start of that page."""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import crc32c
import pytest

from pcidev.testing import served
from pcidev.transport.vfio_user.client import VfioUserClient

HOWTO = Path(__file__).resolve().parents[3] / "examples" / "howto"
PAGE = 4096


def _words(seed: int, n: int) -> list[int]:
    return [crc32c.crc32c(struct.pack("<II", seed, i)) for i in range(n)]


def test_the_new_process_serves_the_memfd_the_client_mapped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HOWTO), os.environ.get("PYTHONPATH")])))
    with served("howto-mailbox", plugin_specs=("no:nvme", "shared_page")) as dev, \
            VfioUserClient.connect(dev.path) as client:
        client.config_write(0x04, 2, 0x0002)  # memory space on
        info = client.region_info(2)
        assert info.fd is not None and info.sparse_areas == ((PAGE, PAGE),)
        try:
            page = mmap.mmap(info.fd, PAGE, offset=info.offset + PAGE)
        finally:
            os.close(info.fd)
        with page:
            before = _words(1, PAGE // 4 - 4)
            struct.pack_into(f"<{len(before)}I", page, 16, *before)  # through the client's own mapping
            for i in range(0, PAGE, 256):  # and through trapped writes to the unmapped page 0
                client.write_int(2, i, 4, crc32c.crc32c(struct.pack("<I", i)))
            client.write_int(0, 0x04, 4, 0xC0FFEE)  # POST: the device writes message 1
            assert struct.unpack_from("<II", page, 0) == (1, 0xC0FFEE)
            old_pid = dev.pid

            report = dev.handover()
            assert report["new_pid"] != old_pid and dev.pid == report["new_pid"]

            # the new process reads what the client wrote into its mapping: the same memfd
            got = [client.read_int(2, PAGE + 16 + 4 * i, 4) for i in range(len(before))]
            assert got == before
            assert all(client.read_int(2, i, 4) == crc32c.crc32c(struct.pack("<I", i)) for i in range(0, PAGE, 256))
            # and what it writes appears in the client's mapping made before the handover
            client.write_int(0, 0x04, 4, 0xBEEF)
            assert struct.unpack_from("<II", page, 0) == (2, 0xBEEF)
            client.write_int(2, PAGE + 8, 4, 0x5A5A5A5A)  # a trapped write to the mapped page
            assert struct.unpack_from("<I", page, 8) == (0x5A5A5A5A,)
            # a region info from the new process offers the same memory
            again = client.region_info(2)
            assert again.fd is not None
            try:
                with mmap.mmap(again.fd, PAGE, offset=again.offset + PAGE) as second:
                    assert second[:PAGE] == page[:PAGE]
            finally:
                os.close(again.fd)
