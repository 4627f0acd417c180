"""Namespaces: specs, Identify Namespace fields, descriptors, Format NVM, stable identifiers."""

from __future__ import annotations

import json
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pcidev.errors import ConfigError
from pcidev.properties import parse_size
from pcidev_nvme.backends import MemoryBackend
from pcidev_nvme.backends.mem import make_mem
from pcidev_nvme.backends.null import make_null
from pcidev_nvme.io import COPY_LIMITS
from pcidev_nvme.namespace import Namespace, make_namespace, parse_spec
from pcidev_nvme.status import NvmeStatusError, Status

MiB = 1 << 20


@pytest.fixture
def ns():
    n = make_namespace(1, "mem:size=8M", serial="SER1")
    yield n
    n.close()


def idns(n: Namespace) -> dict:
    raw = n.identify()
    assert len(raw) == 4096
    nsze, ncap, nuse, nsfeat, nlbaf, flbas, mc, dpc, dps, nmic, rescap, fpi, dlfeat = struct.unpack_from(
        "<QQQBBBBBBBBBB", raw, 0
    )
    npwg, npwa, npdg, npda, nows = struct.unpack_from("<HHHHH", raw, 64)
    mssrl, mcl, msrc = struct.unpack_from("<HIB", raw, 74)
    lbafs = [struct.unpack_from("<I", raw, 128 + 4 * i)[0] for i in range(16)]
    return dict(
        nsze=nsze, ncap=ncap, nuse=nuse, nsfeat=nsfeat, nlbaf=nlbaf, flbas=flbas, mc=mc, dpc=dpc,
        dps=dps, nmic=nmic, dlfeat=dlfeat, noiob=struct.unpack_from("<H", raw, 46)[0],
        nvmcap=int.from_bytes(raw[48:64], "little"), npwg=npwg, npwa=npwa, npdg=npdg, npda=npda,
        nows=nows, mssrl=mssrl, mcl=mcl, msrc=msrc, nsattr=raw[99], nguid=raw[104:120],
        eui64=raw[120:128], lbafs=lbafs, raw=raw,
    )


def test_identify_namespace_512(ns):
    f = idns(ns)
    assert f["nsze"] == f["ncap"] == 8 * MiB // 512
    assert f["nuse"] == 0  # nothing written yet
    assert f["nlbaf"] == 8  # nine formats, 0's based (2..8 with metadata: test_protection.py)
    assert f["flbas"] == 0
    assert f["mc"] == 0x3  # extended LBAs and separate metadata buffers
    assert f["dpc"] == 0x1F  # PI types 1, 2, 3, first or last in the metadata
    assert f["dps"] == f["nmic"] == 0
    assert f["dlfeat"] == 0x09  # deallocated blocks read zeros; Write Zeroes may deallocate
    assert f["nsfeat"] & 0x10  # NPWG..NOWS valid
    assert f["nvmcap"] == 8 * MiB
    assert (f["npwg"], f["npwa"], f["npdg"], f["npda"]) == (7, 7, 7, 7)  # 4 KiB in 512 B blocks, 0's based
    assert f["nows"] == 128 * 1024 // 512 - 1
    assert (f["mssrl"], f["mcl"], f["msrc"]) == COPY_LIMITS
    assert f["nsattr"] == 0
    assert f["nguid"] == ns.nguid and f["eui64"] == ns.eui64
    lbads = [(x >> 16) & 0xFF for x in f["lbafs"][:2]]
    assert lbads == [9, 12]
    assert all(x & 0xFFFF == 0 for x in f["lbafs"][:2])  # no metadata
    assert [x & 0xFFFF for x in f["lbafs"][2:9]] == [8, 8, 16, 16, 64, 64, 64]
    assert f["lbafs"][9:] == [0] * 7


def test_nuse_counts_written_blocks(ns):
    data = bytes(range(256)) * 64  # 16 KiB
    ns.backend.writev([memoryview(data)], 1 * MiB)
    assert idns(ns)["nuse"] == 16 * 1024 // 512
    ns.backend.deallocate(1 * MiB, 8192)
    assert idns(ns)["nuse"] == 8192 // 512


def test_nuse_sparse_file(tmp_path):
    n = make_namespace(1, f"file:path={tmp_path}/a.img,size=16M")
    try:
        assert idns(n)["nuse"] == 0
        n.backend.writev([memoryview(b"\x01" * 65536)], 4 * MiB)
        n.backend.flush()
        assert 65536 // 512 <= idns(n)["nuse"] <= (65536 + 8192) // 512
        n.backend.deallocate(4 * MiB, 65536)
        assert idns(n)["nuse"] == 0
    finally:
        n.close()


def test_format_switches_lba_size(ns):
    ns.backend.writev([memoryview(b"\xab" * 4096)], 0)
    ns.format(1, 0)
    assert (ns.lba_size, ns.lba_shift, ns.nlbas) == (4096, 12, 8 * MiB // 4096)
    f = idns(ns)
    assert f["flbas"] == 1 and f["nsze"] == 2048
    assert (f["npwg"], f["npdg"], f["nows"]) == (0, 0, 31)
    buf = bytearray(4096)
    ns.backend.readv([memoryview(buf)], 0)
    assert buf == bytes(4096)  # no previous user data after a format, even with SES 0
    ns.backend.writev([memoryview(b"\xab" * 4096)], 0)
    ns.format(0, 1)  # user data erase
    assert ns.lba_size == 512
    ns.backend.readv([memoryview(buf)], 0)
    assert buf == bytes(4096)
    assert idns(ns)["nuse"] == 0


def test_format_user_data_erase_reaches_stable_storage(tmp_path, monkeypatch):
    """Format NVM on a file (SES 0 or 1): the punched holes are synced before it returns,
    so a crash right after the format cannot bring the erased data back."""
    import os

    n = make_namespace(1, f"file:path={tmp_path}/erase.img,size=1M")
    try:
        n.backend.writev([memoryview(b"\xcd" * 65536)], 0)
        synced = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(fd), real(fd))[1])
        n.format(0, 0)  # no secure erase requested: the old data still goes, durably
        assert synced == [n.backend.fd]
        assert os.fstat(n.backend.fd).st_blocks == 0
        n.backend.writev([memoryview(b"\xcd" * 65536)], 0)
        n.format(0, 1)
        assert synced == [n.backend.fd] * 2
        assert os.fstat(n.backend.fd).st_blocks == 0
    finally:
        n.close()


def test_format_errors(ns):
    with pytest.raises(NvmeStatusError) as ei:
        ns.format(15, 0)
    assert ei.value.status == Status.INVALID_FORMAT
    with pytest.raises(NvmeStatusError) as ei:
        ns.format(0, 2)  # cryptographic erase
    assert ei.value.status == Status.INVALID_FIELD
    assert ns.lba_size == 512


def test_format_refuses_blocks_below_backend_minimum():
    backend = MemoryBackend(1 * MiB)
    backend.min_block = 4096  # as an O_DIRECT file on a 4Kn disk
    with pytest.raises(ConfigError):
        Namespace(1, backend, lbaf=0)
    n = Namespace(1, backend, lbaf=1)
    with pytest.raises(NvmeStatusError) as ei:
        n.format(0, 0)
    assert ei.value.status == Status.INVALID_FORMAT
    n.close()


def test_read_only_namespace(tmp_path):
    make_namespace(1, f"file:path={tmp_path}/ro.img,size=1M").close()
    n = make_namespace(1, f"file:path={tmp_path}/ro.img,readonly=on")
    try:
        assert n.read_only
        assert idns(n)["nsattr"] == 1
        with pytest.raises(NvmeStatusError) as ei:
            n.format(1, 0)
        assert ei.value.status == Status.NS_WRITE_PROTECTED
    finally:
        n.close()


def test_csi_nvm_identify_gives_the_pi_format_of_each_lba_format(ns):
    raw = ns.identify_csi_nvm()
    assert raw[:12] == bytes(12)  # LBSTM, PIC: no storage tags
    elbaf = struct.unpack_from("<16I", raw, 12)
    # PIF (bits 8:7): 64b Guard for 512+16, 4096+16 and the second 4096+64; STS 0 everywhere
    assert [e >> 7 & 3 for e in elbaf[:9]] == [0, 0, 0, 0, 2, 2, 0, 0, 2]
    assert all(e & 0x7F == 0 for e in elbaf) and elbaf[9:] == (0,) * 7
    assert raw[12 + 4 * 9:] == bytes(4096 - 12 - 36)


def test_id_descriptors(ns):
    raw = ns.id_descriptors()
    assert len(raw) == 4096
    found = {}
    pos = 0
    while raw[pos]:
        nidt, nidl = raw[pos], raw[pos + 1]
        found[nidt] = raw[pos + 4 : pos + 4 + nidl]
        pos += 4 + nidl
    assert found == {1: ns.eui64, 2: ns.nguid, 3: ns.uuid.bytes, 4: b"\x00"}
    assert raw[pos:] == bytes(4096 - pos)


# ------------------------------------------------------------------------------ identifiers


def test_ids_derived_from_serial_and_nsid_are_stable():
    a = make_namespace(1, "mem:size=1M", serial="S1")
    b = make_namespace(1, "null:size=1M", serial="S1")
    c = make_namespace(2, "mem:size=1M", serial="S1")
    d = make_namespace(1, "mem:size=1M", serial="S2")
    try:
        assert (a.nguid, a.eui64, a.uuid) == (b.nguid, b.eui64, b.uuid)
        for other in (c, d):
            assert a.nguid != other.nguid and a.eui64 != other.eui64 and a.uuid != other.uuid
        assert a.eui64[0] & 0x02 and not a.eui64[0] & 0x01  # locally administered unicast
        assert a.uuid.version == 4
    finally:
        for n in (a, b, c, d):
            n.close()


def test_file_ids_persist_with_the_image(tmp_path):
    spec = f"file:path={tmp_path}/img.raw,size=2M"
    a = make_namespace(1, spec, serial="S1")
    ids = (a.nguid, a.eui64, a.uuid)
    a.format(1, 0)
    a.close()
    stored = json.loads((tmp_path / "img.raw.nvme-ids").read_text())
    assert stored["uuid"] == str(ids[2]) and stored["lbaf"] == 1
    # Another controller (other serial, other NSID) sees the same identifiers and format.
    b = make_namespace(5, f"file:path={tmp_path}/img.raw", serial="OTHER")
    try:
        assert (b.nguid, b.eui64, b.uuid) == ids
        assert b.lba_size == 4096
    finally:
        b.close()
    # An explicit lbaf wins over the stored one.
    c = make_namespace(5, f"file:path={tmp_path}/img.raw,lbaf=0")
    assert c.lba_size == 512
    c.close()


def test_ids_stable_when_the_identity_file_cannot_be_written(tmp_path):
    """A backend whose identity file cannot be created (read-only directory, gone
    directory...) still gets the same identifiers on every start: derived ones."""
    from pcidev_nvme.backends import BUILTIN_BACKENDS

    class Unsaved(MemoryBackend):
        identity_path = str(tmp_path / "no-such-dir" / "ids.json")

    reg = {**BUILTIN_BACKENDS, "unsaved": lambda options: Unsaved(int(options.pop("size")))}
    runs = []
    for _ in range(2):
        n = make_namespace(1, "unsaved:size=1048576", serial="S1", backends=reg)
        runs.append((n.nguid, n.eui64, n.uuid, n.identify()[104:128], n.id_descriptors()))
        n.close()
    assert runs[0] == runs[1]
    assert not (tmp_path / "no-such-dir").exists()
    other = make_namespace(2, "unsaved:size=1048576", serial="S1", backends=reg)
    try:
        assert (other.nguid, other.eui64, other.uuid) != runs[0][:3]  # still unique per NSID
    finally:
        other.close()


def test_explicit_ids():
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    n = make_namespace(
        3, f"mem:size=1M,uuid={u},nguid=00112233445566778899aabbccddeeff,eui64=00:11:22:33:44:55:66:77"
    )
    try:
        assert n.uuid == u
        assert n.nguid == bytes.fromhex("00112233445566778899aabbccddeeff")
        assert n.eui64 == bytes.fromhex("0011223344556677")
    finally:
        n.close()


def test_corrupt_identity_file(tmp_path):
    make_namespace(1, f"file:path={tmp_path}/x.img,size=1M").close()
    (tmp_path / "x.img.nvme-ids").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        make_namespace(1, f"file:path={tmp_path}/x.img")
    (tmp_path / "x.img.nvme-ids").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        make_namespace(1, f"file:path={tmp_path}/x.img")


# ------------------------------------------------------------------------------ specs


def test_parse_spec_forms():
    assert parse_spec("mem:size=64M") == ("mem", {"size": "64M"})
    assert parse_spec("null") == ("null", {})
    assert parse_spec({"backend": "file", "path": "/x", "size": 4096}) == (
        "file", {"path": "/x", "size": 4096}
    )


@pytest.mark.parametrize(
    "spec",
    [
        "",
        ":size=1M",
        "mem:size",
        "mem:size=1M,size=2M",
        "mem:size=1M,lbaf=9",
        "mem:size=1M,pi=1",
        "mem:size=1M,lbaf=2,pi=4",
        "mem:size=1M,lbaf=2,pil=2",
        "mem:size=1M,lbaf=4,pi=1,mset=3",
        "mem:size=1M,lbaf=2,pi=1,lba_size=512",
        "mem:size=1M,lba_size=1024",
        "mem:size=1M,lbaf=0,lba_size=512",
        "mem:size=1M,uuid=nope",
        "mem:size=1M,nguid=0011",
        "mem:size=1M,eui64=zz",
        "mem:size=1000",
        "mem:size=1M,bogus=1",
        "tape:size=1M",
        {"size": "1M"},
        42,
    ],
)
def test_bad_specs(spec):
    with pytest.raises(ConfigError):
        make_namespace(1, spec)


def test_lba_size_option_and_dict_spec():
    n = make_namespace(1, {"backend": "mem", "size": "1M", "lba_size": "4096"})
    try:
        assert n.lba_size == 4096 and n.nlbas == 256
    finally:
        n.close()


def test_relative_file_path_uses_state_dir(tmp_path):
    n = make_namespace(1, "file:path=rel.img,size=1M", state_dir=str(tmp_path))
    try:
        assert (tmp_path / "rel.img").exists()
    finally:
        n.close()


# ------------------------------------------------------------------------------ spec grammar


def test_spec_grammar_is_pcidev_properties(tmp_path):
    # ',,' is a literal comma (a path with a comma), values take the shared int/size forms
    img = tmp_path / "a,b.img"
    ns = make_namespace(1, f"file:path={str(img).replace(',', ',,')},size=0x100000,lbaf=0x1")
    try:
        assert ns.backend.path == str(img) and ns.lba_size == 4096 and ns.size == 1 << 20
    finally:
        ns.close()
    assert make_namespace(1, "mem:size=1MiB,lba_size=4k").lba_size == 4096


@pytest.mark.parametrize("spec, match", [
    ("mem:size=1M,lbaf=\u00b2", "property 'lbaf'.*integer"),
    ("mem:size=1M,lbaf=x", "property 'lbaf'"),
    ("mem:size=1M,lba_size=big", "property 'lba_size'"),
    ("mem:size=1M,lbaf", "'lbaf' has no '=value'"),
    ("mem:size=1M,lbaf=1,lbaf=0", "'lbaf' given twice"),
])
def test_bad_namespace_options_are_one_line(spec, match):
    with pytest.raises(ConfigError, match=match) as info:
        make_namespace(1, spec)
    assert "\n" not in str(info.value)


def _small_mem(options):
    size = options.get("size")
    try:
        too_big = parse_size(size) > 4 << 20
    except ConfigError:
        too_big = False
    if too_big:
        raise ConfigError("test catalogue: mem namespaces up to 4M")
    return make_mem(options)


_SMALL_BACKENDS = {"mem": _small_mem, "null": make_null}
_OPTION_KEYS = ["size", "anon", "lbaf", "lba_size", "uuid", "nguid", "eui64", "path", "bogus", ""]
_OPTION_VALUES = ["1M", "4096", "0x100000", "1MiB", "0", "1", "2", "on", "off", "4k", "512", "\u00b2", "-1",
                  "0011223344556677", "00112233445566778899aabbccddeeff", "4f3b2c3e-0000-4000-8000-000000000000",
                  "", ",", "=", ":"]


@st.composite
def _specs(draw):
    kind = draw(st.sampled_from(["mem", "null", "file", "", "mem,size=1M"]))
    items = draw(st.lists(st.tuples(st.sampled_from(_OPTION_KEYS),
                                    st.one_of(st.sampled_from(_OPTION_VALUES), st.text(max_size=8))), max_size=5))
    sep = draw(st.sampled_from([":", ",", ""]))
    return kind + sep + ",".join(f"{k}={v}" if k else v for k, v in items)


@settings(max_examples=300, deadline=None)
@given(spec=st.one_of(_specs(), st.text(max_size=40)))
def test_any_namespace_spec_gives_a_namespace_or_one_config_error(spec):
    try:
        ns = make_namespace(1, spec, backends=_SMALL_BACKENDS)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        ns.close()
