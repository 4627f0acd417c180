"""A loaded ``nvme`` state satisfies what a live controller guarantees (issue 12).

Streams (encoded, checksummed: the decoder's checks) that set read-only or reserved
register bits, leave CC.EN 0 under a running controller, disagree with CSTS, hold
queues above Number of Queues or an error log no controller could write are refused
with a StateError naming the field, and the destination is untouched; the Error Count
rolls over from 2**64-1 to 1 as the Error Information log page says, so a loaded
maximum count no longer turns the next failing command into a fatal controller status.
"""

from __future__ import annotations

import struct

import attrs
import pytest
from test_migration_nvme import _stable, _with_state

from pcidev.migration import load_device_stream, save_device
from pcidev.vmstate import Section
from pcidev.vmstate.errors import StateError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.logs import ERROR_COUNT_MAX, ErrorLog, decode_error_entry
from pcidev_nvme.registers import CSTS_CFS
from pcidev_nvme.status import Status
from pcidev_nvme.testing.driver import READ


def _saved(hosts):
    h = hosts("serial=INV,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M", io_queues=1)
    h.ctrl.quiesce()
    return h, save_device(h.ctrl)


def test_the_error_count_rolls_over_from_the_maximum_to_one():
    log = ErrorLog(4, count=ERROR_COUNT_MAX)
    assert log.add(sqid=1, cid=2, status_field=0x0B) == 1  # (struct.error before: 2**64 does not pack)
    assert log.add(sqid=1, cid=3, status_field=0x0B) == 2
    assert [e["error_count"] for e in log.entries()] == [2, 1]


def test_a_loaded_maximum_error_count_still_completes_failing_commands(hosts):
    h, snap = _saved(hosts)
    st = snap.sections[1].state
    dst = NvmeController(h.ctrl.cfg, name="dst")
    bad = _with_state(snap, attrs.evolve(st, error_count=ERROR_COUNT_MAX, error_entries=()))
    h.resources.append(load_device_stream(dst, bad.to_bytes(), list(snap.fds)))
    h.repoint(dst)
    dst.resume()
    comp = h.drv.io(1, READ, nsid=7, check=False, buf=h.machine.alloc(4096), length=4096)
    assert comp.code == Status.INVALID_NSID and comp.dnr  # its own status, not a dead controller
    assert not dst.snapshot().csts & CSTS_CFS
    assert dst.error_log.count == 1 and dst.error_log.entries()[0]["error_count"] == 1
    page = h.drv.get_log(0x01, 64)
    assert decode_error_entry(page)["error_count"] == 1


def _entry(count: int) -> bytes:
    return struct.pack("<Q", count) + bytes(56)


def _bad_states(st, f):
    yield "asq", attrs.evolve(st, asq=st.asq | 0xFFF)          # read-only low bits: never enabled again
    yield "acq", attrs.evolve(st, acq=st.acq | 0x4)
    yield "cc", attrs.evolve(st, cc=st.cc & ~1)                 # CC.EN 0 under CSTS.RDY 1
    yield "cc", attrs.evolve(st, cc=st.cc | 1 << 3)             # a reserved bit
    yield "aqa", attrs.evolve(st, aqa=st.aqa | 1 << 13)
    yield "csts", attrs.evolve(st, csts=st.csts | 1 << 7)       # a bit CSTS never has
    yield "csts", attrs.evolve(st, csts=st.csts & ~1)           # not ready, yet queues run
    yield "csts", attrs.evolve(st, csts=st.csts | CSTS_CFS)     # ready with a fatal status
    yield "csts", attrs.evolve(st, csts=st.csts | 3 << 2)       # SHST 3 is reserved
    yield "state", attrs.evolve(st, state=3)
    yield "shutting_down", attrs.evolve(st, shutting_down=True)  # with CC.SHN 0
    yield "page_size", attrs.evolve(st, page_size=8192)         # not CC.MPS's
    yield "error_count", attrs.evolve(st, error_count=0, error_entries=(_entry(0),))
    yield "error_entries[1]", attrs.evolve(st, error_count=5, error_entries=(_entry(5), _entry(3)))
    yield "error_entries[0]", attrs.evolve(st, error_count=1, error_entries=(_entry(2),))
    sqs = list(st.sqs)
    sqs[2] = attrs.evolve(sqs[1], sqid=2)
    yield "sqs[2]", attrs.evolve(st, sqs=tuple(sqs), features=attrs.evolve(f, nsq=1))


def test_a_stream_breaking_a_live_invariant_is_refused_and_changes_nothing(hosts):
    h, snap = _saved(hosts)
    st = snap.sections[1].state
    assert st.state == 1 and st.sqs[1] is not None and st.sqs[2] is None
    dst = NvmeController(h.ctrl.cfg, name="victim")
    try:
        before = _stable(dst.get_device_state())
        for path, bad in _bad_states(st, st.features):
            with pytest.raises(StateError) as info:
                load_device_stream(dst, _with_state(snap, bad).to_bytes(), list(snap.fds))
            assert info.value.section == "nvme" and info.value.path == path, (path, str(info.value))
            assert _stable(dst.get_device_state()) == before
        # a wrapped count with its entries (newest first: 1, then 2**64-1) is a live log's
        ok = attrs.evolve(st, error_count=1, error_entries=(_entry(1), _entry(ERROR_COUNT_MAX)))
        load_device_stream(dst, _with_state(snap, ok).to_bytes(), list(snap.fds)).close()
        assert dst.error_log.count == 1
    finally:
        dst.close()


def test_a_stream_changing_read_only_config_space_is_refused(hosts):
    """The framework's config space: IDs, class, capabilities pointer and the BARs' type and
    size bits are the device's; a stream that changes them is refused, nothing applied."""
    h, snap = _saved(hosts)
    fs, nvme = snap.sections
    dst = NvmeController(h.ctrl.cfg, name="victim")
    try:
        dst.realize()  # (as a load does first)
        before = bytes(dst.config.data)
        for off, bits, at in ((0x02, 0xFF, 0x0), (0x0B, 0x01, 0x8), (0x34, 0x04, 0x34), (0x10, 0x10, 0x10),
                              (0x11, 0x20, 0x11)):
            cfg = bytearray(fs.state.config)
            cfg[off] ^= bits  # device ID, class, capabilities pointer, BAR0 type/size bits
            bad = attrs.evolve(snap, sections=(Section(fs.name, fs.instance_id,
                                                       attrs.evolve(fs.state, config=bytes(cfg))), nvme))
            with pytest.raises(StateError, match=f"offset {at:#x}") as info:
                load_device_stream(dst, bad.to_bytes(), list(snap.fds))
            assert info.value.section == fs.name and info.value.path == "config"
            assert bytes(dst.config.data) == before
        cfg = bytearray(fs.state.config)
        cfg[0x04] ^= 0x04  # Command: bus master, writable -- loads
        ok = attrs.evolve(snap, sections=(Section(fs.name, fs.instance_id, attrs.evolve(fs.state, config=bytes(cfg))),
                                          nvme))
        load_device_stream(dst, ok.to_bytes(), list(snap.fds)).close()
    finally:
        dst.close()
