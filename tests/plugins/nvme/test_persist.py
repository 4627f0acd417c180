"""The controller's state file (pcidev_nvme.persist): the vmstate codec, upgrade from the
old JSON format, corrupt or foreign files, and never writing beside a read-only image."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from _helpers import make_env, smart

from pcidev.vmstate.testing import assert_schema_matches
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.persist import PersistState, StateFile

SCHEMA = Path(__file__).resolve().parents[2] / "vmstate" / "schema" / "nvme-persist.json"

#: a state file as the previous (JSON) version wrote it
LEGACY = {
    "version": 1, "serial": "old1", "dirty": True, "error_count": 7,
    "smart": {"bytes_read": 4096, "bytes_written": 8192, "host_read_commands": 3, "host_write_commands": 5,
              "busy_seconds": 1.5, "power_cycles": 4, "power_on_seconds": 7200.0, "unsafe_shutdowns": 1,
              "media_errors": 0, "warning_temp_seconds": 0.0, "critical_temp_seconds": 0.0},
    "firmware": {"revisions": ["1.0", "2.0"], "active": 2, "next_reset": 0},
    "created_namespaces": {},
}


def test_state_file_schema_matches_the_snapshot():
    assert_schema_matches(PersistState, SCHEMA)


def test_old_json_state_file_is_upgraded_once(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    old = d / "nvme-old1.state.json"
    old.write_text(json.dumps(LEGACY))
    env = make_env(f"serial=old1,state_dir={d},fw_slots=2,ns=mem:size=1M", io_queues=0)
    try:
        s = smart(env.drv)
        assert s["power_cycles"] == 5 and s["unsafe_shutdowns"] == 2  # it was dirty
        assert s["host_write_commands"] == 5 and s["power_on_hours"] == 2
        assert env.ctrl.error_log.count == 7
        assert env.ctrl.firmware.active == 2 and env.ctrl.firmware.revisions == ["1.0", "2.0"]
    finally:
        env.close()
    assert not old.exists()  # read once, rewritten in the new format
    st = StateFile(d / "nvme-old1.state").load()
    assert st is not None and st.smart.power_cycles == 5 and st.error_count == 7


def test_explicit_json_state_file_is_rewritten_in_place(tmp_path):
    state = tmp_path / "custom.json"
    state.write_text(json.dumps(LEGACY))
    env = make_env(f"serial=x,state_file={state},ns=mem:size=1M", io_queues=0)
    env.close()
    assert not state.read_bytes().startswith(b"{")
    assert StateFile(state).load().smart.power_cycles == 5


@pytest.mark.parametrize("content", [b"", b"garbage\x00\xff", b"{not json", b'{"version": 99}', b"[1, 2]",
                                     b"PCIDEV\x00\x01" + bytes(40)])
def test_corrupt_state_file_is_a_warning_and_a_fresh_start(tmp_path, caplog, content):
    state = tmp_path / "s.state"
    state.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pcidev_nvme.persist"):
        env = make_env(f"state_file={state},ns=mem:size=1M", io_queues=0)
    try:
        assert smart(env.drv)["power_cycles"] == 1
    finally:
        env.close()
    assert any("starting from zero" in r.getMessage() for r in caplog.records)
    assert StateFile(state).load().smart.power_cycles == 1  # rewritten, usable again


def test_foreign_stream_is_not_taken_for_a_state_file(tmp_path, caplog):
    from pcidev.vmstate import save
    from pcidev_nvme.logs import SmartState

    state = tmp_path / "s.state"
    zero = SmartState(*([0] * 14))
    state.write_bytes(save("other-device", {}, [("nvme/smart", 0, zero)]))
    with caplog.at_level(logging.WARNING, logger="pcidev_nvme.persist"):
        env = make_env(f"state_file={state},ns=mem:size=1M", io_queues=0)
    env.close()
    assert any("cannot be used" in r.getMessage() for r in caplog.records)


def _listing(d: Path) -> set[str]:
    return set(os.listdir(d))


def test_nothing_is_written_beside_a_read_only_image(tmp_path, caplog):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    img = img_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    before = _listing(img_dir)
    with caplog.at_level(logging.WARNING):
        ctrl = NvmeController(f"serial=ro1,ns=file:path={img},readonly=on")
    try:
        assert ctrl.state_file.path is None  # kept in memory
        assert ctrl.namespaces[1].read_only
    finally:
        ctrl.close()
    assert _listing(img_dir) == before
    assert sum("read-only" in r.getMessage() for r in caplog.records) == 1


def test_read_only_image_with_state_dir(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    img = img_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    sd = tmp_path / "state"
    sd.mkdir()
    before = _listing(img_dir)
    ctrl = NvmeController(f"serial=ro2,state_dir={sd},ns=file:path={img},readonly=on")
    ctrl.close()
    assert _listing(img_dir) == before
    assert _listing(sd) == {"nvme-ro2.state"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_nothing_is_written_in_a_read_only_directory(tmp_path):
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    img = img_dir / "disk.img"
    img.write_bytes(bytes(1 << 20))
    before = _listing(img_dir)
    img_dir.chmod(0o555)
    try:
        ctrl = NvmeController(f"serial=ro3,ns=file:path={img}")
        ctrl.close()
        assert _listing(img_dir) == before
    finally:
        img_dir.chmod(0o755)
