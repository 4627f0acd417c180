"""virtio-blk served over vfio-user by ``pcidev serve --vfio-user SOCK virtio-blk,file=...`` in
another process, driven by the software host through
:class:`pcidev.transport.vfio_user.remote.VfioUserDevice` as QEMU's ``vfio-user-pci`` would
(guest RAM as memfds, MSI-X through eventfds). Data is checked by CRC-32C per block, and in
the image file itself."""

from __future__ import annotations

import os
from pathlib import Path

import crc32c

from pcidev.host import PCI_IRQ_MSIX, Machine
from pcidev.testing import served
from pcidev.transport.vfio_user.remote import VfioUserDevice
from pcidev_virtio.blk_driver import BlkDriver
from pcidev_virtio.blk_spec import BlkFeature, BlkStatus
from pcidev_virtio.testing.driver import VirtioDriver

BS = 512


def crcs(data: bytes) -> list[int]:
    return [crc32c.crc32c(data[i:i + BS]) for i in range(0, len(data), BS)]


def test_the_software_host_drives_virtio_blk_over_vfio_user(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with served("virtio-blk", f"file={img},size=4M,serial=vfio-user-disk", directory=tmp_path) as served_blk:
        data = os.urandom(1024 * BS)
        with Machine(ram_size=32 << 20) as machine:
            with VfioUserDevice.connect(served_blk.path) as remote:
                assert (remote.vendor_id, remote.device_id, remote.msix_vectors) == (0x1AF4, 0x1042, 2)
                pdev = machine.plug(remote)
                pdev.enable_device()
                pdev.set_master()
                assert pdev.alloc_irq_vectors(2, 2, PCI_IRQ_MSIX) == 2
                drv = VirtioDriver(machine, pdev)
                assert drv.init() >> BlkFeature.DISCARD & 1
                q = drv.queues[0]
                blk = BlkDriver(q)
                old = q.avail_idx
                for i in range(0, 1024, 16):  # 64 writes, one kick
                    blk.add_write(i, data[i * BS:(i + 16) * BS], split=[i + 1])
                q.kick(old_idx=old)
                done = q.wait(64, timeout=20)
                assert [d.data for d in done] == [bytes([BlkStatus.OK])] * 64
                assert blk.flush() == BlkStatus.OK
                got = b""
                for i in range(0, 1024, 128):
                    status, part = blk.read(i, 128)
                    assert status == BlkStatus.OK
                    got += part
                assert crcs(got) == crcs(data)
                assert blk.get_id() == (BlkStatus.OK, b"vfio-user-disk".ljust(20, b"\0"))
                assert blk.write_zeroes((0, 8)) == BlkStatus.OK and blk.discard((8, 8)) == BlkStatus.OK
                assert blk.read(0, 16) == (BlkStatus.OK, bytes(16 * BS))
                assert pdev.recorder.wait(1, above=0, timeout=10)  # (a host thread counts the eventfd)
                drv.reset()
                assert pdev.recorder.stray == 0
        assert served_blk.wait() == 0
        on_disk = img.read_bytes()
        assert len(on_disk) == 4 << 20
        assert on_disk[:16 * BS] == bytes(16 * BS)
        assert crcs(on_disk[16 * BS:1024 * BS]) == crcs(data[16 * BS:])


def test_a_file_disk_handed_over_keeps_its_image_whatever_its_path_names(tmp_path: Path) -> None:
    """``pcidev handover``: the new process takes the old one's image descriptor; the path
    renamed and replaced by another file, then the image unlinked, change nothing."""
    img = tmp_path / "disk.img"
    with served("virtio-blk", f"file={img},size=4M", directory=tmp_path) as dev:
        with Machine(ram_size=32 << 20) as machine, VfioUserDevice.connect(dev.path) as remote:
            pdev = machine.plug(remote)
            pdev.enable_device()
            pdev.set_master()
            assert pdev.alloc_irq_vectors(2, 2, PCI_IRQ_MSIX) == 2
            drv = VirtioDriver(machine, pdev)
            drv.init()
            blk = BlkDriver(drv.queues[0])
            written = {}
            for step in range(3):
                data = os.urandom(64 * BS)
                assert blk.write(step * 64, data) == BlkStatus.OK
                written[step * 64] = crcs(data)
                if step == 0:
                    os.rename(img, tmp_path / "renamed.img")
                    img.write_bytes(b"\xee" * (4 << 20))  # a decoy at the path
                elif step == 1:
                    os.unlink(tmp_path / "renamed.img")
                else:
                    break
                report = dev.handover()
                assert report["new_pid"] == dev.pid != dev.proc.pid
            for sector, want in written.items():
                status, got = blk.read(sector, 64)
                assert status == BlkStatus.OK and crcs(got) == want
            assert dev.proc.wait(20) == 0 and len(dev.pids) == 3
    assert img.read_bytes() == b"\xee" * (4 << 20)
