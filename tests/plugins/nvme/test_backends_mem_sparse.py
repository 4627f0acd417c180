"""A ``mem`` namespace commits host memory only as the guest writes it (issue 12):
its map of written pages (:class:`pcidev_nvme.backends.mem.PageMap`) is an anonymous
mapping whose untouched pages cost nothing, its dirty bitmap stays within
``MAX_DIRTY_MAP`` bytes, and by default Namespace Management holds at most
``DEFAULT_MEM_CREATE_LIMIT`` (4 GiB) of ``mem`` namespaces (``mem_create_limit``): a larger
create completes with Namespace Insufficient Capacity instead of a terabyte the guest could
then fill."""

from __future__ import annotations

import os
import struct

from _helpers import expect_status

from pcidev_nvme.backends import MemoryBackend
from pcidev_nvme.backends.mem import MAX_DIRTY_MAP, PageMap, dirty_granule
from pcidev_nvme.config import DEFAULT_MEM_CREATE_LIMIT
from pcidev_nvme.status import Status

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
NS_MGMT = 0x0D


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_terabyte_namespace_commits_almost_nothing_until_written():
    before = _resident()
    b = MemoryBackend(TiB)
    try:
        # (before: 512 MiB at once -- a 256 MiB page map and a 256 MiB dirty bitmap)
        assert _resident() - before < 16 * MiB
        assert b.dirty.granule == dirty_granule(TiB) and TiB // b.dirty.granule <= MAX_DIRTY_MAP
        data = os.urandom(8192)
        b.writev([memoryview(data)], TiB - 8192)
        b.writev([memoryview(data[:4096])], 0)
        assert b.allocated_bytes() == 3 * 4096
        assert b.allocated_ranges(0, TiB) == [(0, 4096), (TiB - 8192, 8192)]
        out = bytearray(8192)
        b.readv([memoryview(out)], TiB - 8192)
        assert out == data
        b.deallocate(0, TiB)  # the whole namespace: the map's pages go back, no 256 MiB temporary
        assert b.allocated_bytes() == 0 and b.allocated_ranges(0, TiB) == []
        b.readv([memoryview(out)], TiB - 8192)
        assert out == bytes(8192)
        assert _resident() - before < 16 * MiB
    finally:
        b.close()


def test_small_namespaces_keep_page_granular_dirty_tracking():
    assert dirty_granule(256 * MiB) == 4096 and dirty_granule(4 * GiB) == 4096
    assert dirty_granule(8 * GiB) == 8192


def test_the_page_map_counts_finds_and_fills():
    m = PageMap(3 * PageMap.STEP + 5)
    try:
        n = len(m)
        m.fill(10, n - 10, 1)
        assert m.count(1) == n - 20 and m.count(0) == 20
        assert m.find(1, 0, n) == 10 and m.find(0, 10, n) == n - 10
        m.fill(100, n - 100, 0)
        assert m.count(1) == 180 and m.find(1, 100, n) == n - 100
        m.load(bytes([0, 7, 0, 255]))
        assert m.count(1, 0, 4) == 2 + 0 and m.find(1, 0, 4) == 1
    finally:
        m.close()


def test_a_namespace_restored_from_a_memfd_rebuilds_its_map_sparsely():
    src = MemoryBackend(64 * MiB)
    try:
        src.writev([memoryview(b"x" * 4096)], 32 * MiB)
        dst = MemoryBackend.from_fd(src.fd, 64 * MiB)
        try:
            assert dst.allocated_ranges(0, 64 * MiB) == [(32 * MiB, 4096)]
        finally:
            dst.close()
        allocated = bytearray(64 * MiB // 4096)
        allocated[5] = 1
        dst = MemoryBackend.from_fd(src.fd, 64 * MiB, allocated=bytes(allocated))
        try:
            assert dst.allocated_ranges(0, 64 * MiB) == [(5 * 4096, 4096)]
        finally:
            dst.close()
    finally:
        src.close()


def _create(drv, nbytes: int):
    data = bytearray(4096)
    struct.pack_into("<QQ", data, 0, nbytes // 512, nbytes // 512)
    return data


def test_namespace_management_creates_mem_namespaces_within_the_default_limit(nvme_env):
    env = nvme_env("ns=mem:size=1M,max_namespaces=4", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    assert ctrl.cfg.mem_create_limit == DEFAULT_MEM_CREATE_LIMIT == 4 * GiB
    before = _resident()
    # (before: any mem namespace up to 1 TiB was created by default -- 512 MiB committed at
    # once for 1 TiB -- and the guest could then commit all of it by writing it)
    expect_status(drv, Status.NS_INSUFFICIENT_CAPACITY, NS_MGMT, cdw10=0, data=_create(drv, 64 * GiB))
    nsid = drv.admin(NS_MGMT, cdw10=0, data=_create(drv, 3 * GiB)).dw0
    assert nsid == 2 and ctrl.created_mem_bytes == 3 * GiB
    expect_status(drv, Status.NS_INSUFFICIENT_CAPACITY, NS_MGMT, cdw10=0, data=_create(drv, GiB + MiB))
    assert drv.admin(NS_MGMT, cdw10=0, data=_create(drv, GiB)).dw0 == 3  # exactly the limit
    assert _resident() - before < 16 * MiB
    drv.admin(NS_MGMT, nsid=2, cdw10=1)  # a deletion gives its bytes back
    assert ctrl.created_mem_bytes == GiB
    assert drv.admin(NS_MGMT, cdw10=0, data=_create(drv, 3 * GiB)).dw0 == 2


def _caps(drv) -> tuple[int, int]:
    idc = drv.identify(0x01)
    return int.from_bytes(idc[280:296], "little"), int.from_bytes(idc[296:312], "little")  # TNVMCAP UNVMCAP


def test_unvmcap_reports_what_mem_create_limit_lets_namespace_management_create(nvme_env):
    """UNVMCAP is what a create can really take: with ``mem`` creates, at most what
    ``mem_create_limit`` leaves (before: TNVMCAP less the allocated bytes, ~1 TiB, and a
    host that sized a namespace by it got Namespace Insufficient Capacity)."""
    env = nvme_env("ns=mem:size=1M,max_namespaces=4,mem_create_limit=8M", io_queues=1)
    drv, ctrl = env.drv, env.ctrl
    assert _caps(drv) == (1 << 40, 8 * MiB)  # TNVMCAP stays the configured capacity
    assert drv.admin(NS_MGMT, cdw10=0, data=_create(drv, 3 * MiB)).dw0 == 2
    assert _caps(drv)[1] == 5 * MiB
    assert drv.admin(NS_MGMT, cdw10=0, data=_create(drv, _caps(drv)[1])).dw0 == 3  # all of it, accepted
    assert _caps(drv)[1] == 0 and ctrl.created_mem_bytes == 8 * MiB
    expect_status(drv, Status.NS_INSUFFICIENT_CAPACITY, NS_MGMT, cdw10=0, data=_create(drv, 4096))
    drv.admin(NS_MGMT, nsid=2, cdw10=1)  # a deletion gives its bytes back
    assert _caps(drv)[1] == 3 * MiB
    # the Endurance Group Information log's UEGCAP says the same
    eg = drv.admin(0x02, nsid=0, cdw10=(127 << 16) | 0x09, cdw11=1 << 16, length=512).tag  # endurance group 1
    assert int.from_bytes(eg[176:192], "little") == 3 * MiB


def test_unvmcap_is_the_smaller_bound_in_4k_units(nvme_env):
    small = nvme_env("ns=mem:size=1M,max_namespaces=4,capacity=4M,mem_create_limit=8M", io_queues=1)
    assert _caps(small.drv) == (4 * MiB, 3 * MiB)  # the capacity binds
    odd = nvme_env("ns=mem:size=1M,max_namespaces=4,mem_create_limit=10000", io_queues=1)
    assert _caps(odd.drv)[1] == 8192  # a create is a multiple of 4 KiB
    assert odd.drv.admin(NS_MGMT, cdw10=0, data=_create(odd.drv, 8192)).dw0 == 2
    null = nvme_env("ns=mem:size=1M,max_namespaces=4,mem_create_limit=8M,ns_create=null", io_queues=1)
    assert _caps(null.drv) == (1 << 40, (1 << 40) - MiB)  # null namespaces cost no memory: no limit


def test_the_limit_is_a_property_and_bounds_only_mem_namespaces(nvme_env):
    env = nvme_env("ns=mem:size=1M,max_namespaces=4,mem_create_limit=8M", io_queues=1)
    expect_status(env.drv, Status.NS_INSUFFICIENT_CAPACITY, NS_MGMT, cdw10=0, data=_create(env.drv, 16 * MiB))
    assert env.drv.admin(NS_MGMT, cdw10=0, data=_create(env.drv, 8 * MiB)).dw0 == 2
    null = nvme_env("ns=mem:size=1M,max_namespaces=4,mem_create_limit=8M,ns_create=null", io_queues=1)
    assert null.drv.admin(NS_MGMT, cdw10=0, data=_create(null.drv, 64 * GiB)).dw0 == 2
