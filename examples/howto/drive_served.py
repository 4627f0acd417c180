"""Drive an NVMe controller served by ``pcidev serve --vfio-user`` the way QEMU and Linux would.

Run (from the repository's root, with pcidev and the NVMe plugin installed in ``.venv``)::

    .venv/bin/pcidev serve --vfio-user /tmp/pcidev-nvme0.sock nvme,ns=mem:size=64M &
    while [ ! -S /tmp/pcidev-nvme0.sock ]; do sleep 0.1; done
    .venv/bin/python examples/howto/drive_served.py /tmp/pcidev-nvme0.sock

The software host's RAM becomes the controller's DMA memory (a shared memfd, as QEMU's
``memory-backend-memfd,share=on``), its MSI-X vectors arrive through eventfds, and the NVMe
test driver brings the controller up as Linux's driver does.
"""

from __future__ import annotations

import sys

from pcidev.host import Machine
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_nvme.testing.driver import NvmeDriver


# [drive]
def write_and_read(socket_path: str) -> tuple[str, bytes]:
    """Connect, probe, write one 4 KiB block to namespace 1 and read it back."""
    with Machine(ram_size=64 << 20) as machine, VfioUserDevice.connect(socket_path) as ctrl:
        drv = NvmeDriver.attach(machine, ctrl, io_queues=1)  # enable, admin queue, MSI-X, I/O queue
        model = drv.identify(0x01)[24:64].decode("ascii").strip()  # Identify Controller: MN
        drv.write(1, slba=0, data=b"\xa5" * 4096)
        data = drv.read(1, slba=0, nlb=8)  # eight 512-byte blocks
        drv.close()
    return model, data
# [end drive]


if __name__ == "__main__":
    model, data = write_and_read(sys.argv[1])
    verdict = "the same" if data == bytes([0xA5]) * 4096 else "DIFFERENT"
    print(f"{model}: wrote 4096 bytes and read back {len(data)} bytes, {verdict}")
