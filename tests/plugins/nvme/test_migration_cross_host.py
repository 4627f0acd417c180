"""The pre-flight of a move to another machine (a destination whose kernel boot id is not
the source's): a ``file`` namespace on the source machine's own disk blocks it, naming
the namespace and the image, before anything stops (pcidev_nvme.migration)."""

from __future__ import annotations

import subprocess

from pcidev_nvme import migration
from pcidev_nvme.controller import NvmeController


def test_a_local_image_blocks_a_move_to_another_machine(tmp_path):
    image = tmp_path / "local.img"
    ctrl = NvmeController(f"ns=file:path={image},size=1M,ns=mem:size=1M")
    try:
        facts = migration.preflight_facts(ctrl)
        fstype = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", "--target", str(image)], capture_output=True,
                                text=True, check=True).stdout.strip()
        assert facts["nvme.image_fs"] == [[1, fstype]]
        # the same machine (a handover, another process here): the very file, no problem
        assert migration.preflight_problems(ctrl, facts) == []
        # another machine: the same path there is another file
        elsewhere = {**facts, "nvme.host": "another-machine-boot-id"}
        problems = migration.preflight_problems(ctrl, elsewhere)
        assert fstype in migration.LOCAL_FILESYSTEMS, f"{tmp_path} is on {fstype}, not a local file system"
        assert problems == [f"namespace 1: image {image} is on the source machine's own {fstype} file system: "
                            "a destination on another machine would open another file at that path (move it "
                            "to shared storage -- NFS, a cluster file system -- or to an nbd namespace)"]
        # shared storage (an NFS mount) is left to the path checks
        shared = {**elsewhere, "nvme.image_fs": [[1, "nfs4"]]}
        assert migration.preflight_problems(ctrl, shared) == []
    finally:
        ctrl.close()


def test_malformed_file_system_facts_are_refused(tmp_path):
    ctrl = NvmeController(f"ns=file:path={tmp_path / 'a.img'},size=1M")
    try:
        facts = migration.preflight_facts(ctrl)
        for bad in ([[1]], [["1", "ext4"]], [[1, 4]], "ext4"):
            try:
                migration.preflight_problems(ctrl, {**facts, "nvme.image_fs": bad})
            except ValueError:
                continue
            raise AssertionError(f"{bad!r} accepted")
    finally:
        ctrl.close()


def test_an_image_on_a_file_system_not_known_to_be_shared_blocks_a_move(tmp_path, monkeypatch):
    """A file system type the source names but that is not a network or cluster one
    (``SHARED_FILESYSTEMS``), and one the source could not tell (``unknown``), block a move
    to another machine as a local one does; NFS, CephFS and GlusterFS do not."""
    image = tmp_path / "x.img"
    ctrl = NvmeController(f"ns=file:path={image},size=1M")
    try:
        facts = {**migration.preflight_facts(ctrl), "nvme.host": "another-machine-boot-id"}
        for fstype in ("fuse.somethingfs", "virtiofs", "9p"):
            problems = migration.preflight_problems(ctrl, {**facts, "nvme.image_fs": [[1, fstype]]})
            assert problems == [f"namespace 1: image {image} is on a file system of type {fstype!r}, not known "
                                "to be shared between machines: a destination on another machine would open "
                                "another file at that path (move it to shared storage -- NFS, a cluster file "
                                "system -- or to an nbd namespace)"], fstype
        for fstype in ("nfs", "nfs4", "ceph", "fuse.glusterfs", "gfs2"):
            assert migration.preflight_problems(ctrl, {**facts, "nvme.image_fs": [[1, fstype]]}) == [], fstype
        # the source cannot tell (no mount matches the file's device): "unknown", refused elsewhere
        monkeypatch.setattr(migration, "_filesystem_of", lambda fd: None)
        unknown = migration.preflight_facts(ctrl)
        assert unknown["nvme.image_fs"] == [[1, "unknown"]]
        assert len(migration.preflight_problems(ctrl, {**unknown, "nvme.host": "another-machine-boot-id"})) == 1
        assert migration.preflight_problems(ctrl, unknown) == []  # (the same machine: the very file)
    finally:
        ctrl.close()
