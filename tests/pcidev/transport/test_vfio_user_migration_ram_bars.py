"""vfio-user migration data carries a memfd RAM BAR's contents (pcidev.transport.vfio_user.migration
and migration_data): the client of each side maps the BAR through the
sparse-mmap capability and writes it there; after STOP_COPY and RESUMING the destination's
client sees every page the source's had at the stop (CRC-32C per page), in the memfd it
mapped before the migration; a malformed buffer fails its MIG_DATA_WRITE or RESUMING -> STOP cleanly."""

from __future__ import annotations

import errno
import mmap
import os
import random
import socket
import struct
import threading

import attrs
import crc32c
import msgpack
import pytest

from pcidev.bar import RamBacking, Register, RegisterMap
from pcidev.device import PciDevice
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev.transport.vfio_user.client import VfioUserClient
from pcidev.transport.vfio_user.migration import migration_blockers
from pcidev.transport.vfio_user.migration_client import mig_read_all, mig_state, mig_write_all, set_mig_state
from pcidev.transport.vfio_user.protocol import (
    MIG_STATE_ERROR,
    MIG_STATE_RESUMING,
    MIG_STATE_RUNNING,
    MIG_STATE_STOP,
    MIG_STATE_STOP_COPY,
    VfioUserError,
)
from pcidev.transport.vfio_user.server import VfioUserServer
from pcidev.vmstate import U32, vmstate

SIZE = 1 << 20
PAGE = 4096


@vmstate("test/vfio-ram-bar")
@attrs.frozen
class RamState:
    x: U32


class RamDevice(PciDevice):
    """Registers in BAR0, a memfd RAM BAR2 (or a file with ``path``)."""

    TYPE_NAME = "test-vfio-ram-bar"
    CLASS_CODE = 0xFF0000
    VMSTATE = RamState

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        super().__init__()

    def describe(self) -> None:
        self.regs = RegisterMap(4096, [Register("X", 0)])
        self.add_mem_bar(0, 4096, self.regs)
        self.ram = RamBacking(SIZE, path=self.path)
        self.add_mem_bar(2, SIZE, self.ram, bits64=True)

    def get_device_state(self) -> RamState:
        return RamState(x=self.regs["X"].value)

    def set_device_state(self, state: RamState) -> None:
        self.regs["X"].value = state.x

    def on_close(self) -> None:
        self.ram.close()


class Served:
    """A device served by a VfioUserServer in a thread; its client maps BAR2."""

    def __init__(self, device: PciDevice) -> None:
        self.endpoint = DeviceEndpoint(device)
        self.endpoint.start()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server = VfioUserServer(self.endpoint, a)
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        self.client = VfioUserClient(b, timeout=20)
        self.client.version()
        info = self.client.region_info(2)
        assert info.fd is not None and info.sparse_areas == ((0, SIZE),)
        self.bar = mmap.mmap(info.fd, SIZE, offset=info.offset)  # the guest's view
        os.close(info.fd)

    def crcs(self) -> list[int]:
        return [crc32c.crc32c(self.bar[i:i + PAGE]) for i in range(0, SIZE, PAGE)]

    def close(self) -> None:
        self.bar.close()
        self.client.close()
        self.thread.join(10)
        self.endpoint.close()


@pytest.fixture
def pair():
    src, dst = Served(RamDevice()), Served(RamDevice())
    yield src, dst
    src.close()
    dst.close()


def test_the_contents_travel_in_the_migration_data_into_the_bar_the_client_maps(pair):
    src, dst = pair
    rng = random.Random(1)
    src.bar[:SIZE // 2] = rng.randbytes(SIZE // 2)  # the guest writes through its mapping
    src.bar[SIZE - 8:] = b"last8byt"
    src.endpoint.device.regs["X"].value = 3
    dst.bar[:] = b"\x55" * SIZE
    assert migration_blockers(src.endpoint.device) == []
    set_mig_state(src.client, MIG_STATE_STOP_COPY)
    data = mig_read_all(src.client)
    assert data.startswith(b"PCIDMIGR") and SIZE // 2 < len(data) < SIZE  # zeros left out
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    mig_write_all(dst.client, data)
    assert set_mig_state(dst.client, MIG_STATE_RUNNING) == MIG_STATE_RUNNING
    assert dst.crcs() == src.crcs()  # through the mapping the destination's client had before
    assert dst.endpoint.device.regs["X"].value == 3


_HDR = struct.Struct("<8sHHI")
_MEMORY, _OFFER = 14, 1


def _rewrite(data: bytes, kind: int, change) -> bytes:
    """``data`` with the msgpack body of its ``kind`` frame changed by ``change(meta)``."""
    out, pos = [], 0
    while pos < len(data):
        magic, k, flags, length = _HDR.unpack_from(data, pos)
        body = data[pos + _HDR.size:pos + _HDR.size + length]
        if k == kind:
            meta = msgpack.unpackb(body)
            change(meta)
            body = msgpack.packb(meta)
        out.append(_HDR.pack(magic, k, flags, len(body)) + body)
        pos += _HDR.size + length
    return b"".join(out)


def _superscript_key(meta):
    (name,) = meta["fd_sources"].values()
    meta["fd_sources"] = {"\u00b2": name}


def _nul_name(meta):
    meta["sources"][0]["name"] = "a\x00b"


def _foreign_size(meta):
    meta["sources"][0]["size"] = 16 << 30


@pytest.mark.parametrize("damage", ["truncate", "flip-header", "trailing", "fd-key-superscript", "nul-name",
                                    "foreign-size"])
def test_a_malformed_buffer_fails_resuming_and_leaves_the_bar(pair, damage):
    src, dst = pair
    src.bar[:PAGE] = b"\x01" * PAGE
    dst.bar[:] = b"\x55" * SIZE
    before = dst.crcs()
    set_mig_state(src.client, MIG_STATE_STOP_COPY)
    data = bytearray(mig_read_all(src.client))
    if damage == "truncate":
        data = data[:-10]
    elif damage == "flip-header":
        data[0] ^= 1  # no longer frames: read as a vmstate stream, refused
    elif damage == "trailing":
        data += data[:30]
    elif damage == "fd-key-superscript":  # review G #6: was a ValueError, EIO and no ERROR state
        data = bytearray(_rewrite(bytes(data), _OFFER, _superscript_key))
    elif damage == "nul-name":
        data = bytearray(_rewrite(bytes(data), _MEMORY, _nul_name))
    else:  # review G #5: 16 GiB announced for a 1 MiB BAR
        data = bytearray(_rewrite(bytes(data), _MEMORY, _foreign_size))
    set_mig_state(dst.client, MIG_STATE_RESUMING)
    with pytest.raises(VfioUserError) as info:  # a malformed frame at its MIG_DATA_WRITE, the rest at the load
        mig_write_all(dst.client, bytes(data))
        set_mig_state(dst.client, MIG_STATE_STOP)
    assert info.value.errno == errno.EINVAL and mig_state(dst.client) == MIG_STATE_ERROR
    assert dst.crcs() == before


def test_a_file_backed_bar_travels_into_the_destinations_own_file(tmp_path):
    """A file-backed RAM BAR's contents go with the migration data too; the destination
    writes them into its own file (it keeps its file backing: it adopts no staging memfd)."""
    src, dst = Served(RamDevice(str(tmp_path / "a.img"))), Served(RamDevice(str(tmp_path / "b.img")))
    try:
        rng = random.Random(2)
        src.bar[:] = rng.randbytes(SIZE)
        dst.bar[:] = b"\x55" * SIZE
        assert migration_blockers(src.endpoint.device) == []
        set_mig_state(src.client, MIG_STATE_STOP_COPY)
        data = mig_read_all(src.client)
        set_mig_state(dst.client, MIG_STATE_RESUMING)
        mig_write_all(dst.client, data)
        assert set_mig_state(dst.client, MIG_STATE_RUNNING) == MIG_STATE_RUNNING
        want = src.crcs()
        assert dst.crcs() == want  # through the mapping the destination's client had before
        ram = dst.endpoint.device.ram
        assert ram.path == str(tmp_path / "b.img") and ram.identity == _ident(tmp_path / "b.img")
        ram.flush()
        raw = (tmp_path / "b.img").read_bytes()
        assert [crc32c.crc32c(raw[i:i + PAGE]) for i in range(0, SIZE, PAGE)] == want  # in its file
    finally:
        src.close()
        dst.close()


def _ident(path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino
