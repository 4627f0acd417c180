"""virtio-blk end to end in process: the software host's VirtioDriver negotiates with the
device, and requests go through the real split queue (guest RAM, MSI-X). Data is checked
with a CRC-32C per 512-byte block."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcidev.errors import ConfigError
from pcidev.host import HostPciDevice, Machine
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.testing import plugged
from pcidev_virtio import spec
from pcidev_virtio.blk import VirtioBlk
from pcidev_virtio.blk_driver import BlkDriver
from pcidev_virtio.blk_spec import CONFIG_FIELDS, OUTHDR, WRITEBACK_OFFSET, BlkFeature, BlkStatus, BlkType
from pcidev_virtio.testing.driver import VirtioDriver

BS = 512


def crcs(data: bytes) -> list[int]:
    """CRC-32C of every 512-byte block."""
    return [crc32c.crc32c(data[i:i + BS]) for i in range(0, len(data), BS)]


class Disk:
    """A plugged virtio-blk, its driver and the request helper."""

    def __init__(self, machine: Machine, dev: VirtioBlk, *, features: int | None = None) -> None:
        self.dev = dev
        self.pdev: HostPciDevice = plugged(machine, dev)
        self.drv = VirtioDriver(machine, self.pdev)
        self.features = self.drv.init(features)
        self.blk = BlkDriver(self.drv.queues[0])

    def config(self, name: str) -> int:
        offsets = {"capacity": (0, 8), "seg_max": (12, 4), "blk_size": (20, 4), "physical_block_exp": (24, 1),
                   "writeback": (WRITEBACK_OFFSET, 1), "max_discard_seg": (40, 4),
                   "max_write_zeroes_sectors": (48, 4), "write_zeroes_may_unmap": (56, 1)}
        return self.drv.read_config(*offsets[name])


@pytest.fixture
def disks(machine: Machine) -> Iterator[list[Disk]]:
    made: list[Disk] = []
    yield made
    for d in made:
        d.dev.close()


@pytest.fixture
def disk(machine: Machine, disks: list[Disk]) -> Disk:
    d = Disk(machine, VirtioBlk("size=4M,serial=unit-disk-1,max_discard_seg=4"))
    disks.append(d)
    return d


def test_registered_under_its_type_name() -> None:
    registry = load_registry(make_plugin_manager())
    dev = registry.create("virtio-blk", "size=1M")
    try:
        assert isinstance(dev, VirtioBlk) and dev.device_id == 0x1042
    finally:
        dev.close()


def test_features_and_config_space(disk: Disk) -> None:
    f = disk.features
    for bit in (BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.TOPOLOGY, BlkFeature.FLUSH,
                BlkFeature.CONFIG_WCE, BlkFeature.DISCARD, BlkFeature.WRITE_ZEROES):
        assert f >> bit & 1, bit.name
    for bit in (BlkFeature.RO, BlkFeature.MQ, BlkFeature.SIZE_MAX, BlkFeature.SECURE_ERASE, BlkFeature.ZONED):
        assert not f >> bit & 1, bit.name
    assert disk.config("capacity") == (4 << 20) // 512
    assert disk.config("seg_max") == 254 and disk.config("blk_size") == 512
    assert disk.config("writeback") == 1 and disk.config("max_discard_seg") == 4
    assert disk.config("write_zeroes_may_unmap") == 1
    assert disk.drv.read_config(96, 1) == 0  # past the structure
    assert len(CONFIG_FIELDS) == 22


def test_many_blocks_written_and_read_back_crc_per_block(disk: Disk) -> None:
    data = os.urandom(256 * BS)
    want = crcs(data)
    for i in range(0, 256, 32):  # 16 KiB writes, then reads of other sizes
        assert disk.blk.write(i, data[i * BS:(i + 32) * BS]) == BlkStatus.OK
    got = b""
    for i in range(0, 256, 64):
        status, part = disk.blk.read(i, 64)
        assert status == BlkStatus.OK
        got += part
    assert crcs(got) == want
    assert disk.blk.flush() == BlkStatus.OK


def test_a_batch_with_buffers_split_at_odd_bytes(disk: Disk) -> None:
    q = disk.blk.queue
    blocks = [os.urandom(8 * BS) for _ in range(16)]
    old = q.avail_idx
    for i, data in enumerate(blocks):
        disk.blk.add_write(i * 8, data, split=[1, 511, 513 + i, 3000])
    q.kick(old_idx=old)
    done = q.wait(16, timeout=10)
    assert [d.data for d in done] == [bytes([BlkStatus.OK])] * 16
    old = q.avail_idx
    heads = [disk.blk.add_read(i * 8, 8, split=[7, 1024 + i]) for i in range(16)]
    q.kick(old_idx=old)
    done = {d.head: d for d in q.wait(16, timeout=10)}
    for head, data in zip(heads, blocks, strict=True):
        assert done[head].data[-1] == BlkStatus.OK and done[head].written == len(data) + 1
        assert crcs(done[head].data[:-1]) == crcs(data)


def test_indirect_chains(disk: Disk) -> None:
    q = disk.blk.queue
    data = os.urandom(4 * BS)
    assert q.request([OUTHDR.pack(BlkType.OUT, 0, 40), data[:100], data[100:]], [1], indirect=True).data == b"\0"
    done = q.request([OUTHDR.pack(BlkType.IN, 0, 40)], [1000, len(data) - 1000, 1], indirect=True)
    assert done.data[:-1] == data and done.data[-1] == BlkStatus.OK


def test_get_id_flush_discard_write_zeroes(disk: Disk) -> None:
    status, ident = disk.blk.get_id()
    assert status == BlkStatus.OK and ident == b"unit-disk-1".ljust(20, b"\0")
    data = os.urandom(64 * BS)
    assert disk.blk.write(0, data) == BlkStatus.OK
    assert disk.blk.discard((8, 8), (32, 8)) == BlkStatus.OK
    assert disk.blk.write_zeroes((48, 4)) == BlkStatus.OK
    assert disk.blk.write_zeroes((56, 4), unmap=True) == BlkStatus.OK
    status, got = disk.blk.read(0, 64)
    expect = bytearray(data)
    for sector, count in ((8, 8), (32, 8), (48, 4), (56, 4)):
        expect[sector * BS:(sector + count) * BS] = bytes(count * BS)
    assert status == BlkStatus.OK and crcs(got) == crcs(bytes(expect))
    assert disk.blk.discard(*[(i, 1) for i in range(5)]) == BlkStatus.UNSUPP  # max_discard_seg=4
    assert disk.blk.flush() == BlkStatus.OK


def test_out_of_range_and_unsupported(disk: Disk) -> None:
    last = (4 << 20) // BS - 1
    assert disk.blk.write(last, bytes(BS)) == BlkStatus.OK
    assert disk.blk.write(last, bytes(2 * BS)) == BlkStatus.IOERR
    assert disk.blk.read(last + 1, 1)[0] == BlkStatus.IOERR
    assert disk.blk.discard((last, 2)) == BlkStatus.IOERR
    assert disk.blk.raw(BlkType.GET_LIFETIME, in_data=48)[0] == BlkStatus.UNSUPP
    assert disk.blk.raw(BlkType.SECURE_ERASE)[0] == BlkStatus.UNSUPP
    assert disk.blk.raw(0xDEAD)[0] == BlkStatus.UNSUPP
    assert disk.dev.running  # nothing of this needs a reset


def test_discard_unsupp_when_the_driver_declines_the_feature(machine: Machine, disks: list[Disk]) -> None:
    d = Disk(machine, VirtioBlk("size=1M"), features=spec.TRANSPORT_FEATURES | (1 << BlkFeature.FLUSH))
    disks.append(d)
    assert d.blk.discard((0, 1)) == BlkStatus.UNSUPP
    assert d.blk.write_zeroes((0, 1)) == BlkStatus.UNSUPP
    assert d.blk.write(0, bytes(BS)) == BlkStatus.OK


def test_cache_mode_follows_the_writeback_byte_and_flush(machine: Machine, disks: list[Disk]) -> None:
    d = Disk(machine, VirtioBlk("size=1M"))
    disks.append(d)
    assert d.dev.engine.writeback and d.config("writeback") == 1
    d.drv.write_config(WRITEBACK_OFFSET, 1, 0)  # Linux: echo "write through" > cache_type
    assert d.config("writeback") == 0 and not d.dev.engine.writeback
    d.drv.write_config(WRITEBACK_OFFSET, 1, 7)  # not 0 or 1: ignored
    assert d.config("writeback") == 0
    d.drv.write_config(WRITEBACK_OFFSET, 1, 1)
    assert d.dev.engine.writeback
    d.drv.init()  # a reset brings back the configured mode
    assert d.config("writeback") == 1
    # without FLUSH the device is write-through, and says so
    d.drv.init(spec.TRANSPORT_FEATURES | (1 << BlkFeature.CONFIG_WCE))
    assert d.config("writeback") == 0 and not d.dev.engine.writeback
    d.drv.write_config(WRITEBACK_OFFSET, 1, 1)
    assert not d.dev.engine.writeback


def test_read_only_file_disk(machine: Machine, disks: list[Disk], tmp_path: Path) -> None:
    img = tmp_path / "ro.img"
    content = os.urandom(64 * BS)
    img.write_bytes(content)
    d = Disk(machine, VirtioBlk(f"file={img},readonly=on"))
    disks.append(d)
    assert d.features >> BlkFeature.RO & 1
    assert not d.features >> BlkFeature.DISCARD & 1 and not d.features >> BlkFeature.WRITE_ZEROES & 1
    assert d.blk.write(0, bytes(BS)) == BlkStatus.IOERR
    status, got = d.blk.read(0, 64)
    assert status == BlkStatus.OK and crcs(got) == crcs(content)
    assert img.read_bytes() == content


def test_file_disk_is_created_and_keeps_data(machine: Machine, disks: list[Disk], tmp_path: Path) -> None:
    img = tmp_path / "new.img"
    d = Disk(machine, VirtioBlk(f"file={img},size=1M"))
    disks.append(d)
    data = os.urandom(16 * BS)
    assert d.blk.write(100, data) == BlkStatus.OK and d.blk.flush() == BlkStatus.OK
    assert img.stat().st_size == 1 << 20
    assert crcs(img.read_bytes()[100 * BS:116 * BS]) == crcs(data)


def test_bad_images_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give size="):
        VirtioBlk(f"file={tmp_path / 'missing.img'}")
    odd = tmp_path / "odd.img"
    odd.write_bytes(bytes(3 * BS))
    with pytest.raises(ConfigError, match="logical_block_size=4096"):
        VirtioBlk(f"file={odd},logical_block_size=4k")
    assert odd.read_bytes() == bytes(3 * BS)


def test_a_malformed_chain_needs_reset_and_the_driver_recovers(disk: Disk, machine: Machine) -> None:
    q = disk.blk.queue
    head = disk.blk.add_write(0, bytes(BS))
    machine.memory.write_struct(spec.DESC, q.desc + 16 * head, 1 << 40, 16, spec.VRING_DESC_F_NEXT, head)
    q.kick()
    assert disk.drv.status & spec.Status.DEVICE_NEEDS_RESET
    disk.drv.init()
    disk.blk = BlkDriver(disk.drv.queues[0])
    assert disk.blk.write(0, bytes(BS)) == BlkStatus.OK


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=st.sampled_from([0, 1, 4, 8, 11, 13]) | st.integers(0, 2**32 - 1),
       sector=st.integers(0, 2**64 - 1), payload=st.binary(max_size=64), in_data=st.integers(0, 1100))
def test_garbage_requests_complete_with_a_status(disk: Disk, rtype: int, sector: int, payload: bytes,
                                                 in_data: int) -> None:
    status, _data = disk.blk.raw(rtype, sector, payload, in_data)
    assert status in (BlkStatus.OK, BlkStatus.IOERR, BlkStatus.UNSUPP)
    assert disk.dev.running


def test_multiqueue(machine: Machine, disks: list[Disk]) -> None:
    d = Disk(machine, VirtioBlk("size=2M,num_queues=4,queue_size=64"))
    disks.append(d)
    assert d.features >> BlkFeature.MQ & 1
    assert d.drv.read_config(0x22, 2) == 4 and len(d.drv.queues) == 4
    blks = [BlkDriver(q) for q in d.drv.queues]
    data = [os.urandom(16 * BS) for _ in range(4)]
    for i, (blk, chunk) in enumerate(zip(blks, data, strict=True)):  # each queue its own area
        old = blk.queue.avail_idx
        for j in range(4):
            blk.add_write(i * 64 + j * 4, chunk[j * 4 * BS:(j + 1) * 4 * BS])
        blk.queue.kick(old_idx=old)
    for blk in blks:
        assert [c.data for c in blk.queue.wait(4, timeout=10)] == [bytes([BlkStatus.OK])] * 4
    for i, chunk in enumerate(data):  # read back through another queue
        status, got = blks[(i + 1) % 4].read(i * 64, 16)
        assert status == BlkStatus.OK and crcs(got) == crcs(chunk)
    assert all(d.pdev.irq_count(q.vector) >= 1 for q in d.drv.queues)


def test_one_queue_does_not_offer_mq(disk: Disk) -> None:
    assert not disk.features >> BlkFeature.MQ & 1 and disk.drv.read_config(0x22, 2) == 1
