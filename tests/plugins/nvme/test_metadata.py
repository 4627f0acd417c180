"""pcidev_nvme.metadata: where metadata lives (memfd, sidecar IMAGE.nvme-meta, nothing),
the complemented PI so holes read as the escape values, the sidecar's header (a foreign
file is never overwritten), read-only images, handover descriptors."""

from __future__ import annotations

import os
import stat
import types

import pytest

from pcidev.errors import ConfigError
from pcidev.inheritance import image_key, inheriting
from pcidev_nvme.metadata import (
    FileMetadata,
    MemMetadata,
    MetadataState,
    NullMetadata,
    metadata_supported,
    open_metadata,
)
from pcidev_nvme.namespace import NamespaceState, format_problem, make_namespace

PATTERN = bytes(8) + b"\xff" * 8  # 16 bytes of metadata, PI last


@pytest.mark.parametrize("kind", ["mem", "file", "null"])
def test_holes_read_as_escaped_pi_and_writes_round_trip(kind, tmp_path):
    if kind == "mem":
        store = MemMetadata(16, 64, PATTERN)
    elif kind == "file":
        store = FileMetadata(16, 64, PATTERN, image=str(tmp_path / "x.img"))
    else:
        store = NullMetadata(16, 64, PATTERN)
    try:
        assert store.read(3, 2) == PATTERN * 2
        meta = os.urandom(48)
        store.write(10, meta)
        assert store.read(10, 3) == (meta if kind != "null" else PATTERN * 3)
        store.deallocate(11, 1)
        if kind != "null":
            assert store.read(10, 3) == meta[:16] + PATTERN + meta[32:]
    finally:
        store.close()


def test_mem_metadata_from_a_migrated_fd():
    a = MemMetadata(8, 128, None)
    try:
        a.write(5, b"12345678")
        b = MemMetadata(8, 128, None, fd=a.mem_fd)
        try:
            assert b.read(5, 1) == b"12345678"
            b.write(6, b"abcdefgh")
            assert a.read(6, 1) == b"abcdefgh"  # the same memory
        finally:
            b.close()
        with pytest.raises(ConfigError):
            MemMetadata(8, 64, None, fd=a.mem_fd)  # another size
    finally:
        a.close()


def test_sidecar_keeps_contents_and_refuses_foreign_files(tmp_path):
    img = str(tmp_path / "d.img")
    s = FileMetadata(8, 32, None, image=img)
    s.write(1, b"persist!")
    s.flush()
    s.close()
    again = FileMetadata(8, 32, None, image=img)
    assert again.read(1, 1) == b"persist!"
    again.close()
    # another geometry: it reads empty, and the file is left alone until the first write (a
    # migration's destination opens it while the source still uses it in the old format)
    other = FileMetadata(16, 16, None, image=img)
    assert other.read(1, 1) == bytes(16)
    same = FileMetadata(8, 32, None, image=img)
    assert same.read(1, 1) == b"persist!"
    other.write(0, b"x" * 16)  # starts it afresh in the new format
    assert other.read(0, 2) == b"x" * 16 + bytes(16)
    same.close()
    third = FileMetadata(8, 32, None, image=img)
    assert third.read(1, 1) == bytes(8)
    third.close()
    erased = FileMetadata(16, 16, None, image=img, erase=True)  # Format NVM
    assert erased.read(0, 1) == bytes(16)
    erased.close()
    other.remove()
    assert not os.path.exists(img + ".nvme-meta")
    # a file of that name that is not ours
    with open(img + ".nvme-meta", "wb") as f:
        f.write(b"precious user data" * 300)
    with pytest.raises(ConfigError, match="not a pcidev metadata file"):
        FileMetadata(8, 32, None, image=img)
    with open(img + ".nvme-meta", "rb") as f:
        assert f.read(18) == b"precious user data"


def test_read_only_images_need_their_sidecar(tmp_path):
    img = str(tmp_path / "r.img")
    with pytest.raises(ConfigError, match="does not exist"):
        FileMetadata(8, 32, None, image=img, read_only=True)
    FileMetadata(8, 32, None, image=img).close()
    ro = FileMetadata(8, 32, None, image=img, read_only=True)
    try:
        with pytest.raises(OSError):
            ro.write(0, bytes(8))
    finally:
        ro.close()


def test_handover_takes_the_sidecar_descriptor(tmp_path):
    img = str(tmp_path / "h.img")
    old = FileMetadata(8, 32, None, image=img)
    old.write(2, b"handover")
    fds = old.inheritable_fds()
    key = image_key(img + ".nvme-meta", read_only=False)
    assert list(fds) == [key]
    os.rename(img + ".nvme-meta", img + ".moved")  # the path now names nothing
    dup = os.dup(fds[key])
    with inheriting({key: dup}):
        new = FileMetadata(8, 32, None, image=img)
    try:
        assert new.read(2, 1) == b"handover"
        assert not os.path.exists(img + ".nvme-meta")  # the path was never opened or created
    finally:
        new.close()
        old.close()


def test_namespaces_choose_their_store(tmp_path):
    for spec, kind in (("mem:size=1M,lbaf=2", "mem"), (f"file:path={tmp_path}/n.img,size=1M,lbaf=3,pi=1", "file"),
                       ("null:size=1M,lbaf=4,pi=2", "null")):
        ns = make_namespace(1, spec)
        try:
            assert ns.meta is not None and ns.meta.kind == kind
            if kind == "file":
                assert os.path.exists(f"{tmp_path}/n.img.nvme-meta")
                assert ns.inheritable_fds()
        finally:
            ns.close()
    ns = make_namespace(1, "mem:size=1M")
    try:
        assert ns.meta is None and ns.ms == 0
    finally:
        ns.close()
    assert open_metadata(object(), 8, 8, None, erase=False) is None  # plugin backends: none


def test_a_format_change_keeps_the_open_sidecar_and_remove_spares_a_replacement(tmp_path):
    img = str(tmp_path / "k.img")
    ns = make_namespace(1, f"file:path={img},size=1M,lbaf=2,pi=1")
    try:
        ns.meta.write(0, b"\x00" * 8)
        os.rename(img + ".nvme-meta", img + ".elsewhere")  # the path no longer names the open file
        ns.format(3, 0, 1, 0, 0)  # another format with metadata: the same file, not the path
        assert not os.path.exists(img + ".nvme-meta")
        assert os.path.getsize(img + ".elsewhere") == 4096 + 8 * 256
        with open(img + ".nvme-meta", "wb") as f:  # a decoy at the path
            f.write(b"decoy")
        ns.format(0, 0)  # no metadata: the store goes, the decoy stays
        assert ns.meta is None
        assert open(img + ".nvme-meta", "rb").read() == b"decoy"
    finally:
        ns.close()


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


@pytest.mark.parametrize("kind", ["mem", "file"])
def test_deallocation_punches_holes_instead_of_writing_zeros(kind, tmp_path):
    """A deallocation frees the metadata's storage (a hole), whatever its size: no buffer
    of the range's zeros, no zeros written into the sparse sidecar or the memfd."""
    nlbas = 1 << 20  # 8 MiB of metadata
    if kind == "mem":
        store = MemMetadata(8, nlbas, PATTERN[8:])
        fd = store.mem_fd
    else:
        store = FileMetadata(8, nlbas, PATTERN[8:], image=str(tmp_path / "big.img"))
        fd = store._fd
    try:
        chunk = os.urandom(8 * 4096)
        for lba in range(0, nlbas, 4096):
            store.write(lba, chunk)
        assert _allocated(fd) >= 8 << 20
        store.deallocate(0, nlbas)
        assert _allocated(fd) < 1 << 20, "the deallocated metadata still takes space"
        assert store.read(0, 2) == PATTERN[8:] * 2  # escaped PI
        assert store.read(nlbas - 1, 1) == PATTERN[8:]
        # a part of a page: the rest of the page keeps its metadata
        store.write(0, chunk[:8 * 16])
        store.deallocate(3, 5)
        assert store.read(0, 16) == chunk[:24] + PATTERN[8:] * 5 + chunk[64:128]
    finally:
        store.close()


def test_sidecar_header_tells_pi_last_from_no_pi(tmp_path):
    """64 bytes of metadata with the PI last: the first 16 bytes of its layout are zeros, as
    without PI; the header still tells them apart, so a sidecar of the other layout is stale
    (it reads as empty) instead of being read back un-complemented."""
    img = str(tmp_path / "m.img")
    pi_last = bytes(56) + b"\xff" * 8
    s = FileMetadata(64, 16, pi_last, image=img)
    meta = os.urandom(64)
    s.write(2, meta)
    s.close()
    t = FileMetadata(64, 16, None, image=img)
    try:
        assert t.read(2, 1) == bytes(64)  # stale: empty, not the complemented bytes
    finally:
        t.close()
    u = FileMetadata(64, 16, pi_last, image=img)  # the same layout again: still there
    try:
        assert u.read(2, 1) == meta
    finally:
        u.close()


def test_a_truncated_sidecar_reads_as_holes(tmp_path):
    img = str(tmp_path / "t.img")
    s = FileMetadata(8, 1024, None, image=img)
    s.write(0, b"abcdefgh")
    s.close()
    os.truncate(img + ".nvme-meta", 4096 + 64)  # the header and 8 blocks' metadata
    t = FileMetadata(8, 1024, None, image=img)
    try:
        assert t.read(0, 1) == b"abcdefgh"
        assert t.read(4, 8) == bytes(64)  # across the end: zeros, no EIO
        assert t.read(1000, 2) == bytes(16)
    finally:
        t.close()


def test_a_sidecar_that_is_not_a_regular_file_is_refused(tmp_path):
    img = str(tmp_path / "f.img")
    os.mkfifo(img + ".nvme-meta")
    with pytest.raises(ConfigError, match="not a regular file"):
        FileMetadata(8, 16, None, image=img)  # neither blocks nor reads the FIFO


def _block_device(tmp_path) -> str:
    for name in sorted(os.listdir("/dev")):
        path = os.path.join("/dev", name)
        try:
            if stat.S_ISBLK(os.stat(path).st_mode):
                return path
        except OSError:
            continue
    path = str(tmp_path / "blk")
    os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    return path


def test_images_on_block_devices_have_no_metadata_formats(tmp_path):
    """The sidecar of /dev/sdX would be a RAM file in /dev, lost at reboot: LBA formats
    with metadata are refused on block devices."""
    backend = types.SimpleNamespace(kind="file", path=_block_device(tmp_path), read_only=False, min_block=512)
    assert not metadata_supported(backend)
    assert open_metadata(backend, 8, 64, None, erase=False) is None
    assert format_problem(2, 0, 0, 0, backend) is not None
    assert format_problem(0, 0, 0, 0, backend) is None
    regular = types.SimpleNamespace(kind="file", path=str(tmp_path / "r.img"), read_only=False, min_block=512)
    assert metadata_supported(regular)


def test_restore_problem_opens_the_sidecar_before_the_restore(tmp_path):
    """A migration's check phase finds a sidecar that cannot be used (here a foreign file
    of that name), instead of the restore failing halfway; a missing one is created to see
    that it can be, removed again, and created by the apply's first step for the restore."""
    img = str(tmp_path / "r.img")
    ns = make_namespace(1, f"file:path={img},size=1M")
    try:
        state = NamespaceState(nsid=1, attached=True, lbaf=2,
                               metadata=MetadataState(pi=1, pil=False, mset=False))
        with open(img + ".nvme-meta", "wb") as f:
            f.write(b"not pcidev's" * 400)
        assert "not a pcidev metadata file" in (ns.restore_problem(state) or "")
        assert ns.ms == 0
        os.unlink(img + ".nvme-meta")
        assert ns.restore_problem(state) is None
        # created to check, removed at once (a later check may refuse the load: review F6);
        # the apply's first step creates it again
        assert not os.path.exists(img + ".nvme-meta")
        ns.prepare_restore(state)
        assert os.path.exists(img + ".nvme-meta")
        ns.restore(state)
        assert (ns.lbaf, ns.pi, ns.ms) == (2, 1, 8) and ns.meta is not None
        ns.meta.write(0, b"\x01" * 8)
        assert ns.meta.read(0, 1) == b"\x01" * 8
    finally:
        ns.close()


def test_a_file_store_knows_whether_it_has_unflushed_writes(tmp_path, monkeypatch):
    """FileMetadata.unflushed (a migration's stop skips a clean sidecar): set at the open
    (an earlier writer's pages may still be in the page cache) and by every non-FUA write
    or deallocation, cleared by a flush."""
    calls = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd))[1])
    store = FileMetadata(8, 32, None, image=str(tmp_path / "u.img"))
    try:
        assert store.unflushed
        store.flush()
        assert not store.unflushed and len(calls) == 1
        store.read(0, 4)
        assert not store.unflushed
        store.write(0, os.urandom(16), fua=True)
        assert not store.unflushed  # durable on its own
        store.write(2, os.urandom(16))
        assert store.unflushed
        store.flush()
        store.deallocate(2, 2)
        assert store.unflushed
        store.flush()
        assert not store.unflushed and len(calls) == 3
    finally:
        store.close()
