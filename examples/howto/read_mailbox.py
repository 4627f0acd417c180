"""Map the mailbox page of a served ``howto-mailbox`` and read a message from it.

Run (from the repository's root, with pcidev installed in ``.venv``)::

    PYTHONPATH=examples/howto .venv/bin/pcidev -p shared_page serve --vfio-user /tmp/mailbox.sock howto-mailbox &
    while [ ! -S /tmp/mailbox.sock ]; do sleep 0.1; done
    .venv/bin/python examples/howto/read_mailbox.py /tmp/mailbox.sock

It does what QEMU's ``vfio-user-pci`` does with a sparse-mmap area: map it from the
descriptor the server sent, so the guest's accesses to that page never reach the device
process.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys

from pcidev.transport.vfio_user.client import VfioUserClient


# [client]
def read_mailbox(socket_path: str, value: int) -> tuple[int, int]:
    """Ask the device to post ``value``, then read (sequence, value) from the mapped page."""
    with VfioUserClient.connect(socket_path) as client:
        client.config_write(0x04, 2, 0x0002)             # COMMAND: memory space on
        info = client.region_info(2)                      # BAR2: size, flags, areas, fd
        assert info.fd is not None, "BAR2 is not mmappable"
        try:
            area_offset, area_size = info.sparse_areas[0]   # (0x1000, 0x1000): the mailbox
            page = mmap.mmap(info.fd, area_size, offset=info.offset + area_offset)
        finally:
            os.close(info.fd)                              # the mapping keeps the memory
        with page:
            client.write_int(0, 0x04, 4, value)           # POST: a trapped register write
            return struct.unpack_from("<II", page, 0)     # read straight from shared memory
# [end client]


if __name__ == "__main__":
    seq, value = read_mailbox(sys.argv[1], 0xC0FFEE)
    print(f"message {seq}: {value:#x}")
