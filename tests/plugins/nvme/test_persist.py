"""The controller's state file (pcidev_nvme.persist): the vmstate codec, upgrade from the
old JSON format, corrupt or foreign files, and never writing beside a read-only image."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import make_env, smart

from pcidev.vmstate.testing import assert_schema_matches
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.persist import PersistState, StateFile

SCHEMA = Path(__file__).resolve().parents[2] / "pcidev" / "vmstate" / "schema" / "nvme-persist.json"

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


@pytest.mark.parametrize("content", [b"garbage\x00\xff", b"{not json", b'{"version": 99}', b"[1, 2]",
                                     b"PCIDEV\x00\x01" + bytes(40)])  # not ours (PCIDEVVM is)
def test_an_unusable_state_file_is_a_warning_a_fresh_start_and_left_alone(tmp_path, caplog, content):
    """Not ours (or damaged): the controller starts from zero, keeps its state in
    memory, and never overwrites the file."""
    state = tmp_path / "s.state"
    state.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="pcidev_nvme.persist"):
        env = make_env(f"state_file={state},ns=mem:size=1M", io_queues=0)
    try:
        assert smart(env.drv)["power_cycles"] == 1
    finally:
        env.close()
    assert any("starting from zero" in r.getMessage() and "left as it is" in r.getMessage()
               for r in caplog.records)
    assert state.read_bytes() == content


def test_a_damaged_state_file_of_our_own_format_is_rewritten(tmp_path, caplog):
    """A torn write of our own stream (bad checksum): start from zero and write it anew,
    so SMART persists again."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    NvmeController(f"serial=torn,ns=file:path={img}").close()
    state = tmp_path / "nvme-torn.state"
    data = bytearray(state.read_bytes())
    data[-1] ^= 0xFF
    state.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="pcidev_nvme.persist"):
        NvmeController(f"serial=torn,ns=file:path={img}").close()
    assert any("damaged" in r.getMessage() for r in caplog.records)
    assert StateFile(state).load().smart.power_cycles == 1


def test_an_empty_state_file_is_filled(tmp_path):
    state = tmp_path / "s.state"
    state.write_bytes(b"")
    env = make_env(f"state_file={state},ns=mem:size=1M", io_queues=0)
    env.close()
    assert StateFile(state).load().smart.power_cycles == 1


def test_a_damaged_old_json_file_is_not_removed(tmp_path):
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    old = tmp_path / "nvme-dmg.state.json"
    old.write_text("{not json")
    env = make_env(f"serial=dmg,ns=file:path={image}", io_queues=0)
    env.close()
    assert old.read_text() == "{not json"


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
    assert state.read_bytes().startswith(b"PCIDEV")  # left as it is


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
        assert ctrl.state_file.read_only  # read if there, never written
        assert ctrl.namespaces[1].read_only
    finally:
        ctrl.close()
    assert _listing(img_dir) == before
    assert sum("read-only" in r.getMessage() for r in caplog.records) == 1


def test_a_read_only_image_still_reads_the_state_file_beside_it(tmp_path):
    """The state written while the image was writable is read (SMART carries on), and
    the file is left as it was."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    for _ in range(3):
        NvmeController(f"serial=ro4,ns=file:path={img}").close()
    state = tmp_path / "nvme-ro4.state"
    saved = state.read_bytes()
    ctrl = NvmeController(f"serial=ro4,ns=file:path={img},readonly=on")
    try:
        assert ctrl.smart.power_cycles == 3  # this power-on counts when the controller first runs
        ctrl.mark_dirty()  # enabled: it runs
        assert ctrl.smart.power_cycles == 4
        assert ctrl.state_dir is None  # nothing is created beside the read-only image either
    finally:
        ctrl.close()
    assert state.read_bytes() == saved


def test_an_old_state_file_that_was_not_read_is_kept(tmp_path):
    """Both the new and the old-format file exist (a downgrade, then an upgrade): the
    new one is read and the old one is left alone."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    NvmeController(f"serial=both,ns=file:path={img}").close()
    old = tmp_path / "nvme-both.state.json"
    old.write_text(json.dumps(LEGACY))
    NvmeController(f"serial=both,ns=file:path={img}").close()
    assert old.read_text() == json.dumps(LEGACY)


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


def test_nothing_is_written_in_a_read_only_directory(tmp_path):
    """A writable image in a directory this process cannot write: no identity file, no
    state file. As root (whom directory modes do not stop) the directory is made
    read-only with a read-only bind mount in a private mount namespace of a child
    process, and the image (kept outside) is bind-mounted read-write onto its place."""
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    img = img_dir / "disk.img"
    real = tmp_path / "real.img"
    real.write_bytes(bytes(1 << 20))
    img.write_bytes(b"")
    before = _listing(img_dir)
    build = ("from pcidev_nvme.controller import NvmeController; "
             f"c = NvmeController('serial=ro3,ns=file:path={img}'); "
             "assert c.allocated[1].size == 1 << 20; c.close()")
    if os.geteuid() == 0:
        script = (f"mount --bind {img_dir} {img_dir} && mount -o remount,ro,bind {img_dir} && "
                  f"mount --bind {real} {img} && {{ touch {img_dir}/probe 2>/dev/null && exit 3; "
                  f"exec {sys.executable} -c \"{build}\"; }}")
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "kept in memory only" in done.stderr  # found out beforehand, did not just fail to write
    else:
        img.unlink()
        real.rename(img)
        before = _listing(img_dir)
        img_dir.chmod(0o555)
        try:
            subprocess.run([sys.executable, "-c", build], check=True, timeout=60)
        finally:
            img_dir.chmod(0o755)
    assert _listing(img_dir) == before


def test_a_controller_that_never_runs_as_owner_counts_no_power_on(tmp_path):
    """A process built to receive a migration loads the state file but writes nothing and
    counts no power cycle (the running controller owns the file); one that runs counts
    its power-on when first enabled."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    NvmeController(f"serial=wait,ns=file:path={img}").close()
    state = tmp_path / "nvme-wait.state"
    saved = state.read_bytes()
    waiting = NvmeController(f"serial=wait,ns=file:path={img}")
    assert state.read_bytes() == saved  # building it wrote nothing
    waiting.owns_state = False  # it waited for a migration that never came
    waiting.close()
    assert state.read_bytes() == saved
    ctrl = NvmeController(f"serial=wait,ns=file:path={img}")
    try:
        ctrl.mark_dirty()  # enabled
        assert ctrl.smart.power_cycles == 2 and ctrl.smart.unsafe_shutdowns == 0
    finally:
        ctrl.close()
    assert state.read_bytes() != saved
