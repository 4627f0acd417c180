"""The controller's namespace tables (:class:`pcidev_nvme.namespaces.NamespaceSetMixin`):
the verbs that change them, and that nothing else changes them."""

from __future__ import annotations

import pathlib
import re
import struct

import pytest
from test_migration_nvme import Blocks, Host

import pcidev_nvme
from pcidev_nvme.backends import MemoryBackend
from pcidev_nvme.namespace import Namespace
from pcidev_nvme.status import NvmeStatusError, Status


@pytest.fixture
def ctrl(nvme_env):
    return nvme_env("ns=mem:size=4M,capacity=64M,max_namespaces=4", io_queues=1).ctrl


def _ns(nsid):
    return Namespace(nsid, MemoryBackend(1 << 20))


def _status(exc_info):
    return exc_info.value.status


def test_add_attach_detach_remove(ctrl):
    ns = _ns(2)
    ctrl.add_namespace(2, ns, created_spec="mem:size=1M")
    assert ctrl.allocated[2] is ns and 2 not in ctrl.namespaces and ctrl.created[2] == "mem:size=1M"
    ctrl.attach_namespace(2)
    assert ctrl.namespaces[2] is ns
    with pytest.raises(NvmeStatusError) as e:
        ctrl.attach_namespace(2)
    assert _status(e) == Status.NS_ALREADY_ATTACHED
    ctrl.detach_namespace(2)
    assert 2 not in ctrl.namespaces and 2 in ctrl.allocated
    with pytest.raises(NvmeStatusError) as e:
        ctrl.detach_namespace(2)
    assert _status(e) == Status.NS_NOT_ATTACHED
    ctrl.attach_namespace(2)
    removed = ctrl.remove_namespace(2)
    assert removed == (ns, True, "mem:size=1M")
    assert 2 not in ctrl.allocated and 2 not in ctrl.namespaces and 2 not in ctrl.created
    ns.close()


def test_unallocated_nsids_are_refused(ctrl):
    """What the admin command set answers: Invalid Namespace or Format; nothing changes."""
    before = (dict(ctrl.allocated), dict(ctrl.namespaces), dict(ctrl.created))
    for verb in (ctrl.attach_namespace, ctrl.remove_namespace):
        with pytest.raises(NvmeStatusError) as e:
            verb(3)
        assert _status(e) == Status.INVALID_NSID
    with pytest.raises(NvmeStatusError) as e:
        ctrl.set_attached([1, 3])
    assert _status(e) == Status.INVALID_NSID
    with pytest.raises(NvmeStatusError) as e:
        ctrl.add_namespace(1, _ns(1))  # already allocated
    assert _status(e) == Status.NS_ID_UNAVAILABLE
    assert (dict(ctrl.allocated), dict(ctrl.namespaces), dict(ctrl.created)) == before


def test_set_attached_keeps_the_dict(ctrl):
    table = ctrl.namespaces
    ns = _ns(2)
    ctrl.add_namespace(2, ns)
    ctrl.set_attached([2])
    assert ctrl.namespaces is table and list(table) == [2] and table[2] is ns
    ctrl.set_attached([])
    assert ctrl.namespaces is table and not table and set(ctrl.allocated) == {1, 2}


_TABLE = r"\.(?:namespaces|allocated|created|configured)"
_WRITES = re.compile(
    rf"{_TABLE}\[[^\]]*\]\s*=(?!=)"  # item assignment
    rf"|{_TABLE}\.(?:pop|popitem|clear|update|setdefault)\("  # mutating methods
    rf"|\bdel\s+\S*{_TABLE}\["  # item deletion
    rf"|{_TABLE}\s*(?:\|=|-=)"  # in-place operators
)


def test_only_namespaces_py_changes_the_tables():
    """Issue 7: one owner per piece of state.

    ``testing/`` is skipped: it is the host-side driver, whose own ``namespaces`` table
    is another piece of state.
    """
    root = pathlib.Path(pcidev_nvme.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "testing" or rel == pathlib.Path("namespaces.py"):
            continue
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if _WRITES.search(line):
                offenders.append(f"{rel}:{lineno}: {line.strip()}")
    assert not offenders, "namespace tables changed outside namespaces.py:\n" + "\n".join(offenders)


def test_detached_option_allocates_without_attaching(nvme_env):
    """``detached=on`` (QEMU's nvme-ns ``detached``): allocated (CNS 10h/11h), not active
    (CNS 02h, I/O refused) until Namespace Attachment attaches it; then usable; it migrates
    detached and attached, with verified data."""
    host = Host("ns=mem:size=4M,ns=mem:size=4M,detached=on,max_namespaces=4", io_queues=1)
    try:
        drv, ctrl = host.drv, host.ctrl
        assert sorted(ctrl.allocated) == [1, 2] and sorted(ctrl.namespaces) == [1]
        assert struct.unpack("<1024I", drv.identify(0x10))[:3] == (1, 2, 0)
        assert struct.unpack("<1024I", drv.identify(0x02))[:2] == (1, 0)
        assert drv.identify(0x11, nsid=2)[:8] == struct.pack("<Q", (4 << 20) // 512)
        assert drv.identify(0x00, nsid=2) == bytes(4096)  # allocated, not active
        buf = drv.machine.alloc(4096, 4096)
        assert drv.io(1, 0x02, nsid=2, cdw10=0, cdw12=0, buf=buf, length=512, check=False).code == Status.INVALID_NSID
        drv.machine.free(buf)
        blocks = Blocks(drv)
        drv.write(1, 0, b"1" * 4096)
        blocks.record(1, 0, b"1" * 4096)
        dst = host.migrate()  # detached stays detached
        assert sorted(dst.allocated) == [1, 2] and sorted(dst.namespaces) == [1]
        drv.admin(0x15, nsid=2, cdw10=0, data=struct.pack("<HH", 1, 0))  # attach to controller 0
        drv.scan_namespaces()
        assert struct.unpack("<1024I", drv.identify(0x02))[:3] == (1, 2, 0)
        drv.write(2, 8, b"2" * 4096)
        blocks.record(2, 8, b"2" * 4096)
        dst = host.migrate()  # attached by the host: attached after the migration
        assert sorted(dst.namespaces) == [1, 2]
        assert blocks.verify_all() > 0
    finally:
        host.close()
