"""The transport with a device type that has a device configuration and two queues (as a
virtio-blk or a virtio-net would): the DEVICE capability, configuration reads and writes,
config_generation, and a vector per queue."""

from __future__ import annotations

from typing import ClassVar

import pytest

from pcidev.errors import ConfigError
from pcidev.testing import plugged
from pcidev_virtio import spec
from pcidev_virtio.device import DEVICE_OFFSET, VIRTIO_BAR, VirtioPciDevice
from pcidev_virtio.testing.driver import VirtioDriver
from pcidev_virtio.virtqueue import Virtqueue

C = spec.CommonCfg


class Echo(VirtioPciDevice):
    """Copies each chain's readable bytes into its writable buffers (queue 0 and 1 alike);
    its 8-byte configuration holds a 32-bit counter (read-only) and a 32-bit scratch value."""

    TYPE_NAME = "virtio-echo-test"
    VIRTIO_DEVICE_ID = 0x3F
    QUEUE_SIZES: ClassVar[tuple[int, ...]] = (64, 128)
    DEVICE_CONFIG_SIZE = 8

    def __init__(self) -> None:
        self.counter = 7
        self.scratch = 0
        super().__init__()

    def device_features(self) -> int:
        return 1 << 0

    def device_config_read(self, offset: int, size: int) -> int:
        raw = self.counter.to_bytes(4, "little") + self.scratch.to_bytes(4, "little")
        return int.from_bytes(raw[offset:offset + size], "little")

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        if offset == 4 and size == 4:
            self.scratch = value

    def queue_notify(self, vq: Virtqueue) -> None:
        while (elem := vq.pop()) is not None:
            data = b"".join(bytes(b) for b in elem.out_bufs)
            written = 0
            for buf in elem.in_bufs:
                n = min(buf.nbytes, len(data) - written)
                buf[:n] = data[written:written + n]
                written += n
            vq.push(elem, written)
        vq.flush()


def test_device_configuration_and_two_queues(machine):
    dev = Echo()
    pdev = plugged(machine, dev)
    drv = VirtioDriver(machine, pdev)
    cap = drv.caps[spec.CfgType.DEVICE]
    assert (cap.bar, cap.offset, cap.length) == (VIRTIO_BAR, DEVICE_OFFSET, 8)
    assert pdev.device_id == 0x1040 + 0x3F
    assert drv.init() == spec.TRANSPORT_FEATURES | 1
    assert [(q.index, q.size, q.vector) for q in drv.queues] == [(0, 64, 1), (1, 128, 2)]
    assert drv.read_config(0, 4) == 7 and drv.read_config(1, 2) == 0
    drv.write_config(4, 4, 0xCAFE)
    assert drv.read_config(4, 4) == 0xCAFE
    assert pdev.ioread32(VIRTIO_BAR, DEVICE_OFFSET + 8) == 0  # past the configuration's 8 bytes
    for q in drv.queues:
        done = q.request(out=[b"ping-", b"pong"], in_lens=[3, 16], indirect=q.index == 1)
        assert done.written == 9 and done.data[:9] == b"ping-pong"
        assert pdev.irq_count(q.vector) == 1
    gen = drv.read_common(C.CONFIG_GENERATION, 1)
    dev.counter = 8
    dev.config_changed()
    assert drv.read_common(C.CONFIG_GENERATION, 1) == gen + 1 and pdev.wait_irq(0, 2)
    assert drv.read_config(0, 4) == 8
    dev.close()


def test_the_driver_may_use_fewer_and_smaller_queues(machine):
    dev = Echo()
    pdev = plugged(machine, dev)
    drv = VirtioDriver(machine, pdev)
    drv.init(queue_sizes=[16, 0])
    assert [(q.index, q.size) for q in drv.queues] == [(0, 16)]
    assert drv.queues[0].request(out=[b"x"], in_lens=[1]).data == b"x"
    dev.close()


def test_more_queues_than_msix_vectors_is_one_clear_error() -> None:
    class Wide(Echo):
        QUEUE_SIZES: ClassVar[tuple[int, ...]] = (16,) * 128

    with pytest.raises(ConfigError, match=r"128 queues \(1\.\.127 supported"):
        Wide()
