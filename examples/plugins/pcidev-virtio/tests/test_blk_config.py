"""virtio-blk properties (pcidev's property grammar) and the configuration space layout."""

from __future__ import annotations

import pytest

from pcidev.errors import ConfigError
from pcidev.properties import describe_config, structure_config
from pcidev_virtio.blk_config import VirtioBlkConfig, config_space
from pcidev_virtio.blk_spec import CONFIG, CONFIG_FIELDS, CONFIG_SIZE, WRITEBACK_OFFSET


def test_layout_matches_the_spec() -> None:
    assert CONFIG_SIZE == 96
    assert len(CONFIG_FIELDS) == len(CONFIG.unpack(bytes(CONFIG_SIZE)))
    raw = config_space(structure_config(VirtioBlkConfig, "size=1M,physical_block_size=4k"),
                       capacity_bytes=1 << 20, writeback=True, may_unmap=True)
    fields = dict(zip(CONFIG_FIELDS, CONFIG.unpack(raw), strict=True))
    # offsets from struct virtio_blk_config
    assert int.from_bytes(raw[0:8], "little") == fields["capacity"] == 2048
    assert int.from_bytes(raw[0x0C:0x10], "little") == fields["seg_max"] == 254
    assert int.from_bytes(raw[0x14:0x18], "little") == fields["blk_size"] == 512
    assert raw[0x18] == fields["physical_block_exp"] == 3
    assert int.from_bytes(raw[0x1A:0x1C], "little") == fields["min_io_size"] == 8
    assert raw[WRITEBACK_OFFSET] == fields["writeback"] == 1
    assert int.from_bytes(raw[0x22:0x24], "little") == fields["num_queues"] == 1
    assert int.from_bytes(raw[0x24:0x28], "little") == fields["max_discard_sectors"] == 1 << 22
    assert int.from_bytes(raw[0x28:0x2C], "little") == fields["max_discard_seg"] == 32
    assert int.from_bytes(raw[0x2C:0x30], "little") == fields["discard_sector_alignment"] == 8
    assert int.from_bytes(raw[0x30:0x34], "little") == fields["max_write_zeroes_sectors"] == 1 << 22
    assert int.from_bytes(raw[0x34:0x38], "little") == fields["max_write_zeroes_seg"] == 32
    assert raw[0x38] == fields["write_zeroes_may_unmap"] == 1


def test_properties_parse_with_the_common_grammar() -> None:
    cfg = structure_config(VirtioBlkConfig, "file=/x.img,size=64MiB,readonly=on,serial=abc,,def,"
                                            "logical_block_size=4k,queue_size=128", what="virtio-blk")
    assert cfg.file == "/x.img" and cfg.size == 64 << 20 and cfg.readonly and cfg.serial == "abc,def"
    assert cfg.logical_block_size == 4096 and cfg.queue_size == 128
    names = [p.name for p in describe_config(VirtioBlkConfig)]
    assert names[:4] == ["file", "size", "readonly", "serial"]


@pytest.mark.parametrize("props, message", [
    ("", "give file=PATH"),
    ("file=", "file= is empty"),
    ("size=1000", "multiple of logical_block_size"),
    ("size=4k,logical_block_size=4k,size=8k", "given twice"),
    ("size=4k,logical_block_size=1000", "power of two"),
    ("size=4k,logical_block_size=4k,physical_block_size=512", "smaller than"),
    ("size=4k,serial=" + "x" * 21, "at most 20"),
    ("size=4k,serial=caf\u00e9", "ASCII"),
    ("size=4k,queue_size=100", "power of two"),
    ("size=4k,max_discard_seg=0", "from 1"),
    ("size=4k,num_queues=0", "from 1 to 64"),
    ("size=4k,num_queues=65", "from 1 to 64"),
    ("size=4k,bogus=1", "unknown property bogus"),
])
def test_bad_properties_are_one_clear_error(props: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        structure_config(VirtioBlkConfig, props, what="virtio-blk")
