"""Admin: Firmware Image Download and Firmware Commit, the Firmware Slot log reflecting
them, activation at reset or at once (with its notice), persistence."""

from __future__ import annotations

import pytest
from _helpers import expect_status, make_env, wait_until

from pcidev_nvme.logs import firmware_image, parse_firmware_image
from pcidev_nvme.status import Status

DOWNLOAD, COMMIT = 0x11, 0x10


def download(drv, image: bytes, piece: int = 4096) -> None:
    for off in range(0, len(image), piece):
        chunk = image[off:off + piece]
        drv.admin(DOWNLOAD, cdw10=len(chunk) // 4 - 1, cdw11=off // 4, data=chunk)


def commit(drv, slot: int, action: int, check: bool = True):
    return drv.admin(COMMIT, cdw10=(action << 3) | slot, check=check)


def slot_log(drv) -> tuple[int, int, list[bytes]]:
    page = drv.get_log(0x03, 512)
    return page[0] & 7, (page[0] >> 4) & 7, [page[8 + 8 * i:16 + 8 * i] for i in range(7)]


@pytest.fixture
def env(nvme_env):
    return nvme_env("ns=mem:size=1M", io_queues=0, aers=1)


def test_image_format():
    img = firmware_image("2.0a", b"payload" * 100)
    assert len(img) % 4 == 0
    assert parse_firmware_image(img) == "2.0a"
    bad = bytearray(img)
    bad[30] ^= 1
    assert parse_firmware_image(bytes(bad)) is None
    assert parse_firmware_image(b"garbage" * 10) is None
    with pytest.raises(ValueError):
        firmware_image("toolongrev")


def test_replace_then_activate_at_reset(env):
    drv = env.drv
    download(drv, firmware_image("2.0", bytes(10000)))
    commit(drv, 2, 1)  # replace slot 2, activate at the next reset
    active, nxt, revs = slot_log(drv)
    assert (active, nxt) == (1, 2)
    assert revs[0] == b"1.0     " and revs[1] == b"2.0     "
    assert drv.identify(0x01)[64:72] == b"1.0     "
    drv.disable()
    drv.enable()
    assert drv.identify(0x01)[64:72] == b"2.0     "
    assert slot_log(drv)[:2] == (2, 0)


def test_replace_only_and_activate_existing(env):
    drv = env.drv
    download(drv, firmware_image("3.1"))
    commit(drv, 3, 0)  # replace, no activation
    assert slot_log(drv)[:2] == (1, 0)
    commit(drv, 3, 2)  # activate slot 3 at the next reset
    assert slot_log(drv)[:2] == (1, 3)
    drv.disable()
    drv.enable()
    assert slot_log(drv)[0] == 3


def test_activate_immediately_posts_notice(env):
    drv = env.drv
    download(drv, firmware_image("4.0"))
    commit(drv, 0, 3)  # controller picks a slot, activates now
    active, _, revs = slot_log(drv)
    assert revs[active - 1] == b"4.0     " and active != 1
    assert drv.identify(0x01)[64:72] == b"4.0     "
    wait_until(lambda: drv.poll_events() is not None and drv.events, what="firmware notice")
    assert drv.events == [(2, 0x01, 0x03)]


def test_commit_errors(env):
    drv = env.drv
    expect_status(drv, Status.INVALID_FW_IMAGE, COMMIT, cdw10=(1 << 3) | 2)  # nothing downloaded
    download(drv, firmware_image("5.0"))
    expect_status(drv, Status.INVALID_FW_SLOT, COMMIT, cdw10=(1 << 3) | 1)  # slot 1 is read-only
    expect_status(drv, Status.INVALID_FW_SLOT, COMMIT, cdw10=(1 << 3) | 4)  # 3 slots
    expect_status(drv, Status.INVALID_FIELD, COMMIT, cdw10=(6 << 3) | 2)  # boot partitions
    expect_status(drv, Status.INVALID_FW_IMAGE, COMMIT, cdw10=(2 << 3) | 2)  # slot 2 is empty
    commit(drv, 3, 0)  # the staged image goes to slot 3
    download(drv, b"\x00" * 64)
    expect_status(drv, Status.INVALID_FW_IMAGE, COMMIT, cdw10=(1 << 3) | 2)  # not a valid image
    img = firmware_image("6.0", bytes(8192))
    drv.admin(DOWNLOAD, cdw10=4096 // 4 - 1, cdw11=0, data=img[:4096])
    expect_status(drv, Status.OVERLAPPING_RANGE, DOWNLOAD, cdw10=4096 // 4 - 1, cdw11=2048 // 4,
                  data=img[2048:6144])
    drv.admin(DOWNLOAD, cdw10=(len(img) - 8192) // 4 - 1, cdw11=8192 // 4, data=img[8192:])  # leaves a gap
    expect_status(drv, Status.INVALID_FW_IMAGE, COMMIT, cdw10=(1 << 3) | 2)
    expect_status(drv, Status.INVALID_FIELD, DOWNLOAD, cdw10=(64 << 20) // 4, cdw11=0, prp1=0x10_0000)
    _, _, revs = slot_log(drv)
    assert revs[1] == bytes(8) and revs[2] == b"5.0     "


def test_slots_persist(tmp_path):
    cfg = f"serial=fwp,state_dir={tmp_path},ns=mem:size=1M"
    env = make_env(cfg, io_queues=0)
    try:
        download(env.drv, firmware_image("7.7"))
        commit(env.drv, 2, 1)
    finally:
        env.close()
    env = make_env(cfg, io_queues=0)
    try:
        active, nxt, revs = slot_log(env.drv)
        assert revs[1] == b"7.7     " and nxt == 2
        env.drv.disable()
        env.drv.enable()
        assert slot_log(env.drv)[0] == 2
    finally:
        env.close()
