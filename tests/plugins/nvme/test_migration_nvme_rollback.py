"""A vmstate load that fails late leaves the destination exactly as it was
(pcidev_nvme.migration: LoadUndo, the apply's first step; pcidev_nvme.namespace:
prepare_restore / holding / reinstate).

The destination has data of its own (written and recorded per block before the load);
the load fails after the ``nvme`` section's checks passed: in the SR-IOV VFs' part
(a garbled VF stream, a VF stream that disagrees with the primary's records) or while
mapping a metadata memfd. Afterwards the destination still holds its own memory and
metadata (every block read back through the host with every PI check, crc32c per
block), the error is one StateError, and the controller is not failed. A load whose
checks fail after a ``file`` namespace's check opened its metadata sidecar closes it
again (and deletes it only when it created it)."""

from __future__ import annotations

import os
import random

import attrs
import crc32c
import pytest
from test_migration_nvme import Host, namespace_crcs
from test_migration_nvme_protection import APP, PRACT, WRITE, PiBlocks, metadata_bytes
from test_virtualization import Host as SriovHost
from test_virtualization import _two_vfs, _verify, _workload

from pcidev.errors import VMStateError
from pcidev.migration import FunctionState, load_device, save_device
from pcidev.vmstate import Section, load, peek_header, save
from pcidev.vmstate.errors import StateError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.migration import NvmeState

PI_CFG = "serial=MDRB,max_ioqpairs=2,msix_vectors=3,ns=mem:size=1M,lbaf=2,pi=1,ns=mem:size=1M"


def _sections(snap, name: str, state) -> object:
    sections = list(snap.sections)
    j = next(i for i, s in enumerate(sections) if s.name == name)
    sections[j] = Section(name, sections[j].instance_id, state)
    return attrs.evolve(snap, sections=tuple(sections))


def _section(snap, name: str):
    return next(s.state for s in snap.sections if s.name == name)


def _garbled_vf_stream(snap):
    vfs = _section(snap, "pcidev/sriov")
    bad = attrs.evolve(vfs.vfs[1], stream=vfs.vfs[1].stream[:-9])
    return _sections(snap, "pcidev/sriov", attrs.evolve(vfs, vfs=(vfs.vfs[0], bad)))


def _vf_disagrees_with_primary(snap):
    # the primary's record says namespace 3 is attached to secondary 1, its VF's stream says 2
    st = _section(snap, "nvme")
    virt = st.virtualization
    secs = (attrs.evolve(virt.secondaries[0], attached=(3,)), *virt.secondaries[1:])
    return _sections(snap, "nvme", attrs.evolve(st, virtualization=attrs.evolve(virt, secondaries=secs)))


def _vf_refuses_its_own_stream(snap):
    # VF 1's nvme section has vector settings for no vector this VF has: only the VF's own
    # check (when it loads, after the primary's state was applied) refuses it (a field no
    # controller could hold, such as a 1000-byte memory page, the stream's decoder refuses)
    vfs = _section(snap, "pcidev/sriov")
    data = vfs.vfs[1].stream
    header = peek_header(data)
    sections = load(data, device_type=header.device_type, fingerprint=header.fingerprint,
                     descriptions=[FunctionState, NvmeState])
    sections = [Section(s.name, s.instance_id,
                        attrs.evolve(s.state, features=attrs.evolve(s.state.features, vector_cd=())))
                if s.name == "nvme" else s for s in sections]
    bad = attrs.evolve(vfs.vfs[1], stream=save(header.device_type, header.fingerprint, sections))
    return _sections(snap, "pcidev/sriov", attrs.evolve(vfs, vfs=(vfs.vfs[0], bad)))


@pytest.mark.parametrize("corrupt, late", [(_garbled_vf_stream, False), (_vf_disagrees_with_primary, False),
                                           (_vf_refuses_its_own_stream, True)])
def test_a_load_failing_in_the_vfs_part_leaves_the_destination_pf_as_it_was(corrupt, late):
    """A VF stream that does not decode or disagrees with the primary's records the load
    brings is refused in the check phase (nothing applied); one that only the VF's own
    check refuses fails after the primary's state was applied, and the rollback puts the
    destination's own memory back."""
    src, dst = SriovHost(), SriovHost()
    try:
        s_drvs, d_drvs = _two_vfs(src), _two_vfs(dst)
        s_crcs: dict = {}
        d_crcs: dict = {}
        _workload(src, s_drvs, s_crcs, 21)
        _workload(dst, d_drvs, d_crcs, 22)
        src.ctrl.quiesce()
        bad = corrupt(save_device(src.ctrl))
        d = dst.ctrl
        d.quiesce()
        backends = {n: ns.backend for n, ns in d.allocated.items()}
        vfs = list(d.virtual_functions)
        before = namespace_crcs(d)
        applied: list[object] = []
        real_set = d.set_device_state
        d.set_device_state = lambda st: applied.append(st) or real_set(st)
        with pytest.raises(VMStateError) as info:
            load_device(d, bad)
        del d.set_device_state
        assert "\n" not in str(info.value) and d.failed is None
        assert len(applied) == (2 if late else 0), str(info.value)  # (late: the apply, then the rollback)
        assert info.value.section == ("nvme" if late else "pcidev/sriov"), str(info.value)
        # its own memory, open, unchanged block for block
        assert {n: ns.backend for n, ns in d.allocated.items()} == backends
        assert all(b.fd >= 0 for b in backends.values())
        assert namespace_crcs(d) == before
        assert d.virtual_functions == vfs
        d.resume()
        assert _verify(d_drvs, d_crcs) == 3 * 4096
        _workload(dst, d_drvs, d_crcs, 23)
        assert _verify(d_drvs, d_crcs) == 3 * 4096
        # and the source's memory is the source's alone
        src.ctrl.resume()
        assert _verify(s_drvs, s_crcs) == 3 * 4096
    finally:
        dst.close()
        src.close()


def _pi_write(h: Host, slba: int, data: bytes) -> None:
    drv, m = h.drv, h.machine
    buf = m.alloc(4096)
    try:
        m.write(buf, data)
        nlb = len(data) // 512
        cid = drv.submit(1, WRITE, nsid=1, cdw10=slba, cdw12=(nlb - 1) | PRACT << 26, cdw14=slba,
                         cdw15=APP | 0xFFFF << 16, buf=buf, length=len(data))
        comp = drv.reap(1)[0]
        assert comp.cid == cid and comp.ok, hex(comp.status)
    finally:
        m.free(buf)


def _fill(h: Host, blocks: PiBlocks, seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(40):
        slba = rnd.randrange(0, h.drv.namespaces[1].nsze - 8)
        data = os.urandom(8 * 512)
        _pi_write(h, slba, data)
        blocks.record(1, slba, data)
    for _ in range(20):
        slba = rnd.randrange(0, h.drv.namespaces[2].nsze - 8)
        data = os.urandom(8 * 512)
        h.drv.write(2, slba, data)
        blocks.record(2, slba, data)


def _verify_pi(h: Host, blocks: PiBlocks) -> None:
    """Namespace 1 with every PI check (PiBlocks), namespace 2 by crc32c through plain reads."""
    drv = h.drv
    ns2 = drv.namespaces.pop(2)
    try:
        assert blocks.verify_all() == drv.namespaces[1].nsze
    finally:
        drv.namespaces[2] = ns2
    zero = crc32c.crc32c(bytes(512))
    for slba in range(0, ns2.nsze, 64):
        data = drv.read(2, slba, 64)
        for i in range(64):
            assert crc32c.crc32c(data[i * 512:(i + 1) * 512]) == blocks.crc.get((2, slba + i), zero), slba + i


def test_a_metadata_memfd_that_cannot_be_mapped_changes_nothing():
    """The metadata memfd maps in the apply's first step: a descriptor of the right size
    that cannot be mapped (opened write-only) fails the load before the data memory of any
    namespace was swapped."""
    src, dst = Host(PI_CFG, io_queues=1), Host(PI_CFG, io_queues=1)
    try:
        s_blocks, d_blocks = PiBlocks(src.drv), PiBlocks(dst.drv)
        _fill(src, s_blocks, 1)
        _fill(dst, d_blocks, 2)
        src.ctrl.quiesce()
        snap = save_device(src.ctrl)
        st = _section(snap, "nvme")
        k = st.namespaces[0].metadata.mem_fd.index
        fds = list(snap.fds)
        fds[k] = os.open(f"/proc/self/fd/{fds[k]}", os.O_WRONLY | os.O_CLOEXEC)
        d = dst.ctrl
        d.quiesce()
        held = {n: (ns.backend, ns.meta) for n, ns in d.allocated.items()}
        data_before, meta_before = namespace_crcs(d), metadata_bytes(d)
        try:
            with pytest.raises(StateError, match=r"namespace 1: .*metadata") as info:
                load_device(d, snap, fds)
        finally:
            os.close(fds[k])
        assert info.value.section == "nvme" and d.failed is None
        assert {n: (ns.backend, ns.meta) for n, ns in d.allocated.items()} == held
        assert namespace_crcs(d) == data_before and metadata_bytes(d) == meta_before
        d.resume()
        _verify_pi(dst, d_blocks)
        _fill(dst, d_blocks, 3)
        _verify_pi(dst, d_blocks)
        # the good descriptors load (the destination then has the source's blocks; its
        # queues are the source's, in the source's guest memory: it is not resumed)
        d.quiesce()
        dst.resources.append(load_device(d, snap))
        assert namespace_crcs(d) == namespace_crcs(src.ctrl)
        assert metadata_bytes(d) == metadata_bytes(src.ctrl)
    finally:
        dst.close()
        src.close()


def test_what_a_load_replaced_is_closed_once_the_load_is_committed():
    """What a successful apply replaced is closed once the load is committed (the resume),
    not before: the rollback of a later failure needs it."""
    src, dst = Host(PI_CFG, io_queues=1), Host(PI_CFG, io_queues=1)
    try:
        _fill(src, PiBlocks(src.drv), 4)
        src.ctrl.quiesce()
        snap = save_device(src.ctrl)
        d = dst.ctrl
        d.quiesce()
        old = d.allocated[1].backend, d.allocated[1].meta
        dst.resources.append(load_device(d, snap))
        assert d.allocated[1].backend is not old[0] and old[0].fd >= 0 and old[1].mem_fd >= 0
        d.resume()  # committed
        assert old[0].fd < 0 and old[1].mem_fd < 0
    finally:
        dst.close()
        src.close()


def _fds_on(path: str) -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == path:
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.parametrize("sidecar_there", [True, False])
def test_a_refused_state_closes_the_metadata_sidecar_its_check_opened(tmp_path, sidecar_there):
    img = str(tmp_path / "m.img")
    sidecar = img + ".nvme-meta"
    cfg = f"serial=SIDE,dbbuf=off,ns=file:path={img},size=1M"
    src = NvmeController(cfg + ",lbaf=3,pi=1", name="src")
    dst = NvmeController(cfg + ",lbaf=0", name="dst")  # LBA format 0: no sidecar open
    try:
        src.quiesce()
        snap = save_device(src)
        st = _section(snap, "nvme")
        src.close()
        assert os.path.exists(sidecar) and _fds_on(sidecar) == 0
        if not sidecar_there:
            os.unlink(sidecar)
        # the namespace's check opens the sidecar for LBA format 3; a later check refuses
        bad = _sections(snap, "nvme", attrs.evolve(st, dbbuf=True, dbbuf_dbs=0x1000))
        with pytest.raises(StateError, match="Doorbell Buffer Config"):
            load_device(dst, bad)
        assert _fds_on(sidecar) == 0
        assert os.path.exists(sidecar) == sidecar_there  # a file it found stays; one it made goes
        assert dst.allocated[1].lbaf == 0 and dst.allocated[1].meta is None
        if sidecar_there:
            load_device(dst, snap)
            assert dst.allocated[1].lbaf == 3 and _fds_on(sidecar) == 1
    finally:
        dst.close()
        src.close()


def _memfds() -> int:
    """The descriptors of this process on a namespace memfd."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:pcidev-nvme-ns"):
                n += 1
        except OSError:
            pass
    return n


@pytest.mark.parametrize("where", ["smart", "namespace"])
def test_a_load_failing_inside_the_apply_closes_the_source_memory_it_mapped(monkeypatch, where):
    """A failure in the apply's second step (a component's restore raising, before or in the
    namespace loop) rolls back and closes the source's namespace memory the first step
    mapped: no descriptor keeps it alive (review F1). The destination's blocks are as
    they were."""
    src, dst = Host(PI_CFG, io_queues=1), Host(PI_CFG, io_queues=1)
    try:
        s_blocks, d_blocks = PiBlocks(src.drv), PiBlocks(dst.drv)
        _fill(src, s_blocks, 5)
        _fill(dst, d_blocks, 6)
        src.ctrl.quiesce()
        snap = save_device(src.ctrl)
        d = dst.ctrl
        d.quiesce()
        before, data_before = _memfds(), namespace_crcs(d)
        if where == "smart":
            target, name = d.smart, "restore"
        else:  # the first namespace's restore: namespace 2's mapped memory is not consumed yet
            target, name = d.allocated[1], "restore"
        real = getattr(target, name)
        calls: list[int] = []

        def boom(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("injected failure in the apply")
            return real(*args, **kwargs)

        monkeypatch.setattr(target, name, boom)
        with pytest.raises(StateError, match="injected failure"):
            load_device(d, snap)
        monkeypatch.undo()
        assert d.failed is None and calls
        assert _memfds() == before
        assert namespace_crcs(d) == data_before
        d.resume()
        _verify_pi(dst, d_blocks)
    finally:
        dst.close()
        src.close()


def test_a_sidecar_the_check_created_is_gone_when_a_later_check_refuses(tmp_path):
    """A ``file`` namespace's check creates the metadata sidecar of the incoming format to
    see that it can; when a later part's check (a VF stream that does not decode) refuses
    the load, the file is gone at once -- not at the destination's next quiesce or close,
    by which time the source may use a sidecar of that name (review F6). A good load then
    creates it, and the data migrated is the source's."""
    img = str(tmp_path / "s.img")
    sidecar = img + ".nvme-meta"
    sriov = "max_ioqpairs=8,msix_vectors=9,sriov_max_vfs=2,sriov_vq_flexible=6,sriov_vi_flexible=4"
    src = SriovHost(f"serial=SIDE2,{sriov},ns=file:path={img},size=1M,lbaf=3,pi=1,ns=mem:size=2M,ns=mem:size=2M")
    dst = NvmeController(f"serial=SIDE2,{sriov},ns=file:path={img},size=1M,lbaf=0,ns=mem:size=2M,ns=mem:size=2M",
                         name="dst")
    try:
        drvs = _two_vfs(src)
        crcs: dict = {}
        _workload(src, drvs[1:], crcs, 7)  # (the VFs' namespaces: 2 and 3)
        src.ctrl.quiesce()
        snap = save_device(src.ctrl)
        want = namespace_crcs(src.ctrl)
        os.unlink(sidecar)  # (the source keeps its descriptor: the destination must create one)
        with pytest.raises(StateError):
            load_device(dst, _garbled_vf_stream(snap))
        assert not os.path.exists(sidecar)  # at once
        assert dst.allocated[1].lbaf == 0 and dst.allocated[1].meta is None
        load_device(dst, snap)
        assert os.path.exists(sidecar) and dst.allocated[1].lbaf == 3
        got = namespace_crcs(dst)
        assert got == want and crcs
        assert all(got[nsid][lba] == crc for (nsid, lba), crc in crcs.items())
    finally:
        dst.close()
        src.close()
