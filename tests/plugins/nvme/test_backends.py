"""Namespace backends: file (sparse, hole punching, O_DIRECT, FUA), memory, null,
and a backend contributed by another plugin as an ``nvme-backend`` registry component."""

from __future__ import annotations

import errno
import mmap
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pcidev import hookimpl
from pcidev.errors import ConfigError, PluginError
from pcidev.inheritance import image_key, inheriting
from pcidev.plugins import load_registry, make_plugin_manager
from pcidev.properties import parse_size
from pcidev_nvme.backends import (
    BUILTIN_BACKENDS,
    BaseBackend,
    FileBackend,
    MemoryBackend,
    NullBackend,
    add_backend,
    create_backend,
)
from pcidev_nvme.backends.file import make_file
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.namespace import make_namespace

MiB = 1 << 20


def pattern(n: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def read(backend, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    backend.readv([memoryview(buf)], offset)
    return bytes(buf)


def write(backend, offset: int, data: bytes, fua: bool = False) -> None:
    backend.writev([memoryview(data)], offset, fua=fua)


# ------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("64M", 64 * MiB), ("1G", 1 << 30), ("2GiB", 2 << 30), ("8k", 8192), (512, 512)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "x", "1.5G", "-1", "10Q"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


# ------------------------------------------------------------------------------ memory / null


@pytest.mark.parametrize("anon", [False, True])
def test_memory_roundtrip_and_deallocate(anon):
    b = MemoryBackend(4 * MiB, anon=anon)
    try:
        assert b.inline and b.size == 4 * MiB
        data = pattern(64 * 1024)
        # scattered views
        views = [memoryview(data)[i : i + 4096] for i in range(0, len(data), 4096)]
        b.writev(views, 8192)
        assert read(b, 8192, len(data)) == data
        out = [bytearray(1000), bytearray(3096)]
        b.readv([memoryview(x) for x in out], 8192)
        assert bytes(out[0] + out[1]) == data[:4096]
        before = b.allocated_bytes()
        assert before == len(data)
        b.deallocate(8192, 32 * 1024)
        assert read(b, 8192, 32 * 1024) == bytes(32 * 1024)
        assert read(b, 8192 + 32 * 1024, 32 * 1024) == data[32 * 1024 :]
        assert b.allocated_bytes() == before - 32 * 1024
        b.write_zeroes(8192 + 32 * 1024, 4096)
        assert read(b, 8192 + 32 * 1024, 4096) == bytes(4096)
    finally:
        b.close()
        b.close()  # idempotent


def test_memory_reading_holes_allocates_nothing():
    b = MemoryBackend(4 * MiB)
    try:
        buf = bytearray(b"\xee" * MiB)
        b.readv([memoryview(buf)], 0)
        assert buf == bytes(MiB)
        assert b.allocated_bytes() == 0
        assert os.fstat(b.fd).st_blocks == 0
        write(b, 4096 + 512, pattern(512))  # a partial page counts as the page
        assert b.allocated_bytes() == 4096
        b.deallocate(4096, 2048)  # partial page: zeroed, still allocated
        assert read(b, 4096, 4096) == bytes(4096)
        assert b.allocated_bytes() == 4096
        b.deallocate(0, 3 * 4096)
        assert b.allocated_bytes() == 0
        assert os.fstat(b.fd).st_blocks == 0
    finally:
        b.close()


def test_null_backend():
    b = NullBackend(1 << 40)  # a terabyte costs nothing
    buf = bytearray(b"\xff" * 3 * MiB)
    b.readv([memoryview(buf)], 12345 * 4096)
    assert buf == bytes(3 * MiB)
    write(b, 0, b"x" * 4096)
    assert read(b, 0, 4096) == bytes(4096)
    assert b.allocated_bytes() == 0
    b.flush()
    b.deallocate(0, 4096)


# ------------------------------------------------------------------------------ file


def test_file_created_sparse_and_punched(tmp_path):
    path = tmp_path / "disk.img"
    b = FileBackend(str(path), 64 * MiB)
    try:
        assert not b.inline
        assert os.path.getsize(path) == 64 * MiB
        assert b.allocated_bytes() == 0  # sparse
        data = pattern(1 * MiB)
        write(b, 8 * MiB, data)
        b.flush()
        assert b.allocated_bytes() >= 1 * MiB
        assert read(b, 8 * MiB, 1 * MiB) == data
        assert read(b, 0, 4096) == bytes(4096)  # a hole reads zeros
        b.deallocate(8 * MiB, 512 * 1024)
        assert read(b, 8 * MiB, 512 * 1024) == bytes(512 * 1024)
        assert read(b, 8 * MiB + 512 * 1024, 512 * 1024) == data[512 * 1024 :]
        assert b.allocated_bytes() <= 512 * 1024 + 64 * 1024
        # SEEK_DATA sees the hole too.
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.lseek(fd, 8 * MiB, os.SEEK_DATA) >= 8 * MiB + 512 * 1024 - 4096
        finally:
            os.close(fd)
        b.write_zeroes(8 * MiB + 512 * 1024, 4096)
        assert read(b, 8 * MiB + 512 * 1024, 4096) == bytes(4096)
    finally:
        b.close()


def test_file_reopen_keeps_data(tmp_path):
    path = str(tmp_path / "d.img")
    b = FileBackend(path, 1 * MiB)
    write(b, 4096, b"hello".ljust(512, b"\0"))
    b.close()
    b = FileBackend(path)  # size from the file
    try:
        assert b.size == 1 * MiB
        assert read(b, 4096, 5) == b"hello"
    finally:
        b.close()


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="size"):
        FileBackend(str(tmp_path / "missing.img"))
    with pytest.raises(ConfigError, match="multiple of 4096"):
        FileBackend(str(tmp_path / "odd.img"), 5000)
    assert not (tmp_path / "odd.img").exists()  # nothing left behind
    FileBackend(str(tmp_path / "a.img"), 1 * MiB).close()
    with pytest.raises(ConfigError, match="not the size"):
        FileBackend(str(tmp_path / "a.img"), 2 * MiB)
    with pytest.raises(ConfigError, match="regular file"):
        FileBackend("/dev/null")
    with pytest.raises(ConfigError, match="directory"):
        FileBackend(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        FileBackend(str(tmp_path / "nope.img"), 1 * MiB, read_only=True)


def test_file_read_only(tmp_path):
    path = str(tmp_path / "ro.img")
    FileBackend(path, 1 * MiB).close()
    b = FileBackend(path, read_only=True)
    try:
        assert b.read_only
        for call in (
            lambda: write(b, 0, bytes(512)),
            lambda: b.deallocate(0, 4096),
            lambda: b.write_zeroes(0, 4096),
        ):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EROFS
        assert read(b, 0, 512) == bytes(512)
    finally:
        b.close()


def test_file_more_views_than_iov_max(tmp_path):
    b = FileBackend(str(tmp_path / "iov.img"), 4 * MiB)
    try:
        data = pattern(3000 * 512, seed=5)
        mv = memoryview(data)
        b.writev([mv[i : i + 512] for i in range(0, len(data), 512)], 0)
        out = bytearray(len(data))
        omv = memoryview(out)
        b.readv([omv[i : i + 512] for i in range(0, len(out), 512)], 0)
        assert out == data
    finally:
        b.close()


def test_file_flush_and_fua_reach_stable_storage(tmp_path, monkeypatch):
    calls = []
    real_fdatasync, real_pwritev = os.fdatasync, os.pwritev
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(("fdatasync", fd)), real_fdatasync(fd))[1])

    def pwritev(fd, bufs, offset, flags=0):
        calls.append(("pwritev", flags))
        return real_pwritev(fd, bufs, offset, flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    b = FileBackend(str(tmp_path / "f.img"), 1 * MiB)
    try:
        write(b, 0, bytes(4096))
        write(b, 4096, bytes(4096), fua=True)
        b.flush()
    finally:
        b.close()
    assert ("pwritev", 0) in calls
    assert ("pwritev", os.RWF_DSYNC) in calls
    assert calls[-1][0] == "fdatasync"


def test_file_flush_at_stop_only_when_written_and_a_write_back_error_reaches_the_next_flush(tmp_path, monkeypatch):
    """flush_at_stop (a migration's stop) skips an image with nothing written since the
    last fdatasync began; a write-back error it meets stays pending: it is raised again
    by the next flush_at_stop and reported once by the host's next flush."""
    calls = []
    real = os.fdatasync
    fail = {"on": False}

    def fdatasync(fd):
        calls.append(fd)
        if fail["on"]:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    b = FileBackend(str(tmp_path / "s.img"), 1 * MiB)
    try:
        assert b.unflushed  # a fresh open: what an earlier writer left is unknown
        b.flush_at_stop()
        assert len(calls) == 1 and not b.unflushed
        b.flush_at_stop()
        read(b, 0, 4096)
        b.flush_at_stop()
        assert len(calls) == 1  # nothing written: no system call
        write(b, 0, pattern(4096, 1), fua=True)
        b.flush_at_stop()
        assert len(calls) == 1  # a FUA write is durable on its own
        for change in (lambda: write(b, 0, pattern(4096, 2)), lambda: b.deallocate(0, 4096),
                       lambda: b.write_zeroes(4096, 4096), lambda: b.writev_nowait([memoryview(bytes(4096))], 0)):
            n = len(calls)
            change()
            if b.unflushed:  # (writev_nowait may write nothing: then nothing is due)
                b.flush_at_stop()
                assert len(calls) == n + 1 and not b.unflushed
        write(b, 8192, pattern(4096, 3))
        fail["on"] = True
        with pytest.raises(OSError) as info:
            b.flush_at_stop()
        assert info.value.errno == errno.EIO and b.unflushed
        fail["on"] = False
        with pytest.raises(OSError):
            b.flush_at_stop()  # pending: the host has not been told
        with pytest.raises(OSError) as info:
            b.flush()  # the host's Flush hears of it
        assert info.value.errno == errno.EIO
        b.flush()  # once
        b.flush_at_stop()
        assert not b.unflushed
    finally:
        b.close()


def test_file_nofollow_refuses_a_symbolic_link(tmp_path):
    """nofollow=on (a migration reopening a created namespace's image): a symbolic link in
    the image's place is refused, the file it points to is not opened."""
    target = tmp_path / "victim.img"
    target.write_bytes(bytes(8192))
    link = tmp_path / "link.img"
    os.symlink(target, link)
    with pytest.raises(ConfigError, match="cannot open image"):
        make_file({"path": str(link), "nofollow": "on"})
    b = make_file({"path": str(target), "nofollow": "on"})
    b.close()
    b = FileBackend(str(link))  # (a configured image may be a symbolic link)
    b.close()


def test_file_direct_aligned_and_bounced(tmp_path):
    b = FileBackend(str(tmp_path / "direct.img"), 4 * MiB, direct=True)
    try:
        assert b.min_block in (512, 4096)
        # Aligned buffer: straight O_DIRECT.
        buf = mmap.mmap(-1, 64 * 1024)
        mv = memoryview(buf)
        data = pattern(64 * 1024, seed=9)
        mv[:] = data
        b.writev([mv], 0)
        out = mmap.mmap(-1, 64 * 1024)
        omv = memoryview(out)
        b.readv([omv], 0)
        assert bytes(omv) == data
        # Misaligned guest buffers (odd address, odd lengths): bounced.
        raw = bytearray(70000)
        rmv = memoryview(raw)
        src = [rmv[3 : 3 + 1000], rmv[2000 : 2000 + 3096]]
        rmv[3 : 3 + 1000] = data[:1000]
        rmv[2000 : 2000 + 3096] = data[1000:4096]
        b.writev(src, 8192, fua=True)
        dst = bytearray(4096 + 7)
        dmv = memoryview(dst)
        b.readv([dmv[7:]], 8192)
        assert bytes(dmv[7:]) == data[:4096]
        for v in (mv, omv, rmv, dmv, *src):
            v.release()
        buf.close()
        out.close()
    finally:
        b.close()


def test_file_built_in_a_handover_takes_the_inherited_image_not_the_path(tmp_path, monkeypatch):
    """A handover's new process builds its namespace on the old one's descriptors: a
    path renamed, replaced or unlinked meanwhile is never opened, nor created."""
    path = str(tmp_path / "disk.img")
    old = FileBackend(path, 4 * MiB, direct=True)
    real_open = os.open

    def never_the_image(p, *args, **kwargs):
        assert os.fspath(p) != path, "the image path was opened"
        return real_open(p, *args, **kwargs)

    try:
        old.writev([memoryview(pattern(4096, seed=3))], 0)
        fds = old.inheritable_fds()
        assert set(fds) == {image_key(path, read_only=False), image_key(path, read_only=False, direct=True)}
        os.rename(path, path + ".moved")
        with open(path, "wb") as decoy:  # another file at the path now
            decoy.write(b"\xee" * 8192)
        monkeypatch.setattr(os, "open", never_the_image)
        with inheriting({k: os.dup(fd) for k, fd in fds.items()}):
            new = FileBackend(path, 4 * MiB, direct=True)
        monkeypatch.undo()
        try:
            got = bytearray(4096)
            new.readv([memoryview(got)], 0)
            assert got == pattern(4096, seed=3)
            new.writev([memoryview(pattern(4096, seed=4))], 4096)
            assert os.path.sameopenfile(new.fd, old.fd)
        finally:
            new.close()
        assert open(path, "rb").read() == b"\xee" * 8192  # the decoy untouched
        os.unlink(path)
        with inheriting({k: os.dup(fd) for k, fd in old.inheritable_fds().items()}):
            again = FileBackend(path, 4 * MiB, direct=True)  # no path: no new image either
        again.close()
        assert not os.path.exists(path)
        assert open(path + ".moved", "rb").read(8192)[4096:] == pattern(4096, seed=4)
        # a size that does not match the inherited image is refused as for any image
        with inheriting({image_key(path, read_only=False): os.dup(old.fd)}), \
                pytest.raises(ConfigError, match="has 4194304 bytes"):
            FileBackend(path, 8 * MiB)
        # a read-only namespace never gets a writable descriptor (another key)
        with pytest.raises(ConfigError, match="does not exist"), \
                inheriting({image_key(path, read_only=False): os.dup(old.fd)}):
            FileBackend(path, read_only=True)
    finally:
        old.close()


def test_two_namespaces_on_one_image_both_take_the_inherited_file(tmp_path):
    path = tmp_path / "shared.img"
    old = NvmeController(f"ns=file:path={path},size=1M,ns=file:path={path}")
    try:
        fds = old.inheritable_fds()
        assert list(fds) == [image_key(str(path), read_only=False)]
        os.rename(path, tmp_path / "moved.img")
        path.write_bytes(bytes(1 << 20))  # a decoy
        with inheriting({k: os.dup(fd) for k, fd in fds.items()}):
            new = NvmeController(f"ns=file:path={path},size=1M,ns=file:path={path}")
        try:
            for nsid in (1, 2):
                assert os.path.sameopenfile(new.allocated[nsid].backend.fd, old.allocated[1].backend.fd)
        finally:
            new.close()
    finally:
        old.close()


# ------------------------------------------------------------------------------ registry


def test_builtin_backends_and_errors():
    assert list(BUILTIN_BACKENDS) == ["file", "mem", "nbd", "null"]
    with pytest.raises(ConfigError, match="unknown NVMe namespace backend"):
        create_backend("tape", {})
    with pytest.raises(ConfigError, match="unknown option"):
        create_backend("mem", {"size": "1M", "colour": "blue"})
    with pytest.raises(ConfigError, match="size"):
        create_backend("null", {})
    with pytest.raises(ConfigError, match="ns=mem:size=64M"):
        create_backend("mem,size=64M", {})
    registry = load_registry(make_plugin_manager(load_entrypoints=False, plugins=[RamDiskPlugin()]))
    with pytest.raises(PluginError):
        add_backend(registry, "ramdisk", lambda o: None)  # taken
    with pytest.raises(PluginError):
        add_backend(registry, "Bad Name", lambda o: None)
    with pytest.raises(PluginError):
        add_backend(registry, "ok", "not callable")  # type: ignore[arg-type]


class RamDisk(BaseBackend):
    """A toy backend over a bytearray, as a third-party plugin would write it."""

    kind = "ramdisk"
    inline = True

    def __init__(self, size: int, fill: int) -> None:
        super().__init__(size)
        self.data = bytearray([fill]) * size

    def readv(self, views, offset):
        for v in views:
            v[:] = self.data[offset : offset + len(v)]
            offset += len(v)

    def writev(self, views, offset, *, fua=False):
        for v in views:
            self.data[offset : offset + len(v)] = v
            offset += len(v)


class RamDiskPlugin:
    """An inline test plugin contributing the ``ramdisk`` backend."""

    __name__ = "ramdisk-plugin"

    @hookimpl
    def pcidev_register_devices(self, registry):
        def factory(options):
            size = parse_size(options.pop("size"))
            fill = int(options.pop("fill", "0"))
            return RamDisk(size, fill)

        add_backend(registry, "ramdisk", factory)


def _catalogue(registry):
    return {e.name: e.obj for e in registry.components("nvme-backend")}


def test_backend_contributed_by_plugin():
    registry = load_registry(make_plugin_manager(plugins=[RamDiskPlugin()]))
    entry = next(e for e in registry.components("nvme-backend") if e.name == "ramdisk")
    assert entry.plugin == "ramdisk-plugin"
    ns = make_namespace(1, "ramdisk:size=1M,fill=7", backends=_catalogue(registry))
    try:
        assert isinstance(ns.backend, RamDisk)
        assert ns.nlbas == 2048
        assert read(ns.backend, 0, 4) == b"\x07" * 4
    finally:
        ns.close()
    # Without the registry's catalogue the backend is unknown: nothing loads plugins.
    with pytest.raises(ConfigError, match="ramdisk"):
        make_namespace(1, "ramdisk:size=1M")


def test_plugin_backend_errors_name_the_plugin():
    class Clash:
        __name__ = "clash"

        @hookimpl
        def pcidev_register_devices(self, registry):
            add_backend(registry, "mem", lambda o: None)

    with pytest.raises(PluginError, match="clash"):
        load_registry(make_plugin_manager(plugins=[Clash()]))

    class Broken:
        __name__ = "broken"

        @hookimpl
        def pcidev_register_devices(self, registry):
            def factory(options):
                raise RuntimeError("no disk here")

            add_backend(registry, "broken", factory)

    registry = load_registry(make_plugin_manager(plugins=[Broken()]))
    with pytest.raises(ConfigError, match="no disk here"):
        make_namespace(1, "broken:size=1M", backends=_catalogue(registry))


def test_incomplete_backend_is_refused():
    class Half:
        size = 1 << 20

        def readv(self, views, offset):
            pass

        def writev(self, views, offset, *, fua=False):
            pass

    with pytest.raises(ConfigError, match="inline.*BaseBackend"):
        create_backend("half", {}, {**BUILTIN_BACKENDS, "half": lambda options: Half()})


def test_the_old_backend_hook_is_gone():
    """Backends have one registration path; a plugin still implementing the removed
    ``pcidev_nvme_register_backends`` hook is refused by name."""

    class OldStyle:
        __name__ = "old-style"

        @hookimpl
        def pcidev_nvme_register_backends(self, registry):
            pass

    with pytest.raises(PluginError, match="pcidev_nvme_register_backends"):
        make_plugin_manager(plugins=[OldStyle()])


_INSTALLED_BACKEND = '''
from pcidev import hookimpl
from pcidev.properties import parse_size
from pcidev_nvme.backends import MemoryBackend, add_backend


class Stamped(MemoryBackend):
    kind = "stamped"


@hookimpl
def pcidev_register_devices(registry):
    add_backend(registry, "stamped", lambda options: Stamped(parse_size(options.pop("size"))))
'''


def test_installed_plugin_backend_reaches_the_controller_through_the_registry(make_distribution):
    """A backend of an installed plugin (entry point ``pcidev``) reaches a controller built
    by ``registry.create`` (as ``pcidev serve`` builds it); a controller constructed
    directly knows the built-ins only and never loads plugins."""
    make_distribution("stamped-backend", entry_points={"stamped": "nvme_stamped_backend"},
                      modules={"nvme_stamped_backend": _INSTALLED_BACKEND})
    from pcidev.host import Machine
    from pcidev_nvme.testing.driver import NvmeDriver

    ctrl = load_registry(make_plugin_manager()).create("nvme", "ns=stamped:size=1M,ns=mem:size=1M")
    machine = Machine(ram_size=16 << 20)
    drv = NvmeDriver.attach(machine, ctrl, io_queues=1)
    try:
        assert type(ctrl.namespaces[1].backend).__name__ == "Stamped"
        drv.write(1, 3, b"\x5a" * 512)
        assert drv.read(1, 3, 1) == b"\x5a" * 512
    finally:
        drv.close()
        ctrl.close()
        machine.close()
    # Built-in names never need the plugins; other names are refused without a registry.
    from pcidev_nvme.controller import NvmeController

    NvmeController("ns=mem:size=1M").close()
    with pytest.raises(ConfigError, match="unknown NVMe namespace backend 'stamped'"):
        NvmeController("ns=stamped:size=1M")
    with pytest.raises(ConfigError, match="unknown NVMe namespace backend 'nosuch'"):
        make_namespace(1, "nosuch:size=1M")


def test_namespace_specs_share_the_property_grammar(tmp_path):
    """``size=`` accepts hex and KiB/MiB in a namespace spec as for controller properties."""
    for spec in ("mem:size=0x100000", "mem:size=1MiB", "null:size=1024k", "mem:size=1M,anon=y"):
        ns = make_namespace(1, spec)
        try:
            assert ns.backend.size == MiB
        finally:
            ns.close()
    img = tmp_path / "ro.img"
    FileBackend(str(img), MiB).close()
    ns = make_namespace(1, f"file:path={img},size=0x100000,readonly=on")
    try:
        assert ns.backend.read_only
    finally:
        ns.close()
    with pytest.raises(ConfigError, match="property 'size'.*byte count"):
        make_namespace(1, "mem:size=lots")
    with pytest.raises(ConfigError, match="property 'readonly'.*on/off"):
        make_namespace(1, f"file:path={img},readonly=perhaps")


_SIZES = st.one_of(st.sampled_from(["4k", "1M", "0x100000", "1MiB", "64k", "4096B", "-4k", "1.5M", "on"]),
                 st.text(alphabet="kKMGiBxyz,=: -_", max_size=10))  # no huge sizes: no digits


@given(kind=st.sampled_from(["null", "mem", "nosuch", "mem,size=1M"]),
       options=st.dictionaries(st.sampled_from(["size", "anon", "path", "x"]), _SIZES, max_size=3))
def test_any_backend_options_are_a_backend_or_one_config_error(kind, options):
    options.pop("path", None)  # never create files from random text
    try:
        backend = create_backend(kind, options)
    except ConfigError:
        return
    backend.close()


def test_processes_creating_one_image_together_all_open_it(tmp_path):
    """A migration's processes start together with the same file=...,size=...: each opens
    the one complete image (none fails with 'File exists' or sees it half-sized)."""
    import threading

    from pcidev_nvme.backends.file import FileBackend

    path = tmp_path / "ns.img"
    for _ in range(30):
        if path.exists():
            path.unlink()
        out: list = []
        barrier = threading.Barrier(4)

        def open_it(box=out, b=barrier):
            b.wait()
            try:
                box.append(FileBackend(str(path), 1 << 20))
            except Exception as exc:  # collected and asserted below
                box.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(b, FileBackend) and b.size == 1 << 20 for b in out), out
        for b in out:
            b.close()
