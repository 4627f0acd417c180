"""virtio-rng served over vfio-user by ``pcidev serve --vfio-user SOCK virtio-rng`` in
another process, driven by the software host through
:class:`pcidev.transport.vfio_user.remote.VfioUserDevice` exactly as QEMU's
``vfio-user-pci`` would (guest RAM as memfds, MSI-X through eventfds)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcidev.host import PCI_IRQ_MSIX, Machine
from pcidev.pci import ids
from pcidev.testing import served
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_virtio import spec
from pcidev_virtio.testing.driver import VirtioDriver


@pytest.fixture
def served_rng(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with served("virtio-rng", directory=tmp_path) as dev:
        yield dev.path, dev.proc


def test_the_regions_qemu_sees(served_rng):
    path, proc = served_rng
    with VfioUserClient.connect(path, timeout=10) as client:
        assert client.config_read(0x00, 2) == 0x1AF4 and client.config_read(0x02, 2) == 0x1044
        assert client.config_read(ids.REVISION_ID, 1) == 1
        assert client.region_info(4).size == 0x4000  # the virtio structures
        assert client.region_info(1).size == 0x1000  # MSI-X table and PBA
        assert client.irq_info(2).count == 2  # MSI-X: configuration + one queue
    assert proc.wait(20) == 0


def test_the_software_host_drives_virtio_rng_over_vfio_user(served_rng):
    path, proc = served_rng
    with Machine(ram_size=16 << 20) as machine:
        with VfioUserDevice.connect(path) as remote:
            assert (remote.vendor_id, remote.device_id, remote.msix_vectors) == (0x1AF4, 0x1044, 2)
            pdev = machine.plug(remote)
            pdev.enable_device()
            pdev.set_master()
            assert pdev.alloc_irq_vectors(2, 2, PCI_IRQ_MSIX) == 2
            drv = VirtioDriver(machine, pdev)
            assert drv.init() == spec.TRANSPORT_FEATURES
            q = drv.queues[0]
            first = q.request(in_lens=[256, 256], timeout=10)
            assert first.written == 512 and len(set(first.data)) > 64
            # the MSI-X message the host programmed for queue 0 (its eventfd is read by a host
            # thread: the used ring may be seen before the interrupt is counted)
            assert pdev.recorder.wait(1, above=0, timeout=10)
            old = q.avail_idx
            for _ in range(32):  # a batch: one kick, completions in few interrupts
                q.add(in_lens=[64])
            q.kick(old_idx=old)
            done = q.wait(32, timeout=10)
            assert [c.written for c in done] == [64] * 32
            assert q.request(in_lens=[100], indirect=True, timeout=10).written == 100
            drv.reset()
            assert drv.status == 0
            assert pdev.recorder.stray == 0
    assert proc.wait(20) == 0
