"""The NVMe controller's pre-flight (pcidev_nvme.migration.preflight_facts and
preflight_problems): a destination that cannot take the controller -- another
configuration, a ``file`` image it cannot reach or that is another file than the
source's, a namespace Namespace Management created whose image it could not reopen --
refuses before the source stops anything, with every reason at once; the source never
quiesced and serves on, every block it was written verified through the host. A
destination that can take it receives it as before, data verified."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from test_migration_nvme_nsmgmt import attach, create
from test_migration_nvme_stop import Host

from pcidev.errors import MigrationBlockedError
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.migration import preflight_facts, preflight_problems

CFG = "max_ioqpairs=2,msix_vectors=3,capacity=16M,max_namespaces=8"


@pytest.fixture
def host():
    """A factory of in-process hosts that migrate over the channel (closed at teardown)."""
    made: list[Host] = []

    def factory(make: Callable[[str], NvmeController]) -> Host:
        h = Host(make)
        made.append(h)
        return h

    yield factory
    for h in reversed(made):
        h.close()


def _maker(src: str, dst: str | Callable[[], str] | None = None) -> Callable[[str], NvmeController]:
    """The source's configuration for the first controller, ``dst`` (or the source's) for the
    destinations (a callable: read when the destination is made)."""
    def make(name: str) -> NvmeController:
        if name == "src":
            return NvmeController(src, name=name)
        cfg = dst() if callable(dst) else dst
        return NvmeController(cfg if cfg is not None else src, name=name)
    return make


def _writes(h: Host, nsids: list[int], seed: int) -> None:
    rng = random.Random(seed)
    for nsid in nsids:
        for slba in range(0, 64, 8):
            h.write(nsid, slba, rng.randbytes(8 * h.drv.lba_size(nsid)))


def _refused(h: Host, *patterns: str) -> MigrationBlockedError:
    """Migrate, expect a refusal naming every pattern, and check that nothing stopped and
    the source serves on with every block verified."""
    quiesces = []
    real = h.ctrl.on_quiesce
    h.ctrl.on_quiesce = lambda: (quiesces.append(1), real())[1]  # type: ignore[method-assign]
    with pytest.raises(MigrationBlockedError) as info:
        h.move()
    text = str(info.value)
    for p in patterns:
        assert p in text, text
    assert not quiesces and not h.ctrl.quiesced and not h.ctrl.migrated_out and h.ctrl.owns_state
    _writes(h, sorted(h.drv.namespaces), seed=99)  # it serves on
    assert h.blocks.verify_all() > 0
    return info.value


def test_a_destination_with_another_configuration_refuses_before_the_stop(host, tmp_path):
    src = f"ns=file:path={tmp_path}/a.img,size=1M,ns=mem:size=1M,{CFG}"
    h = host(_maker(src, src.replace("max_ioqpairs=2", "max_ioqpairs=3")))
    _writes(h, [1, 2], seed=1)
    _refused(h, "configuration: nvme.max_ioqpairs: stream has 2, this device has 3")
    # and to a destination that can take it, it moves as before
    h.make = _maker(src)
    h.move()
    assert h.blocks.verify_all() > 0


def test_a_destination_holding_another_image_refuses_with_every_reason(host, tmp_path):
    """The source's image was renamed away (it writes it on by its descriptor) and a new
    file took its path, which the destination opened, and the destination has another
    configuration item too: both reasons in one refusal; the source serves on. With the
    source's image back at its path the migration goes through, data verified."""
    src = f"ns=file:path={tmp_path}/a.img,size=1M,ns=file:path={tmp_path}/b.img,size=1M,{CFG}"
    made: list[NvmeController] = []

    def make(name: str) -> NvmeController:
        if name == "src":
            return NvmeController(src, name=name)
        made.append(NvmeController(src.replace("msix_vectors=3", "msix_vectors=4") if not made else src, name=name))
        return made[-1]

    h = host(make)
    _writes(h, [1, 2], seed=2)
    os.rename(tmp_path / "b.img", tmp_path / "b.src")
    err = _refused(h, "namespace 2: image", "has another file open than the one the source writes",
                   "configuration: nvme.msix_vectors")
    assert len(err.reasons) >= 2
    os.replace(tmp_path / "b.src", tmp_path / "b.img")
    h.move()
    assert h.blocks.verify_all() > 0


def test_an_image_another_machine_cannot_reach_is_a_reason(tmp_path):
    """From another machine (another boot id) an image on shared storage is judged by its
    path: gone, too small, or another file than the one this controller opened. The tmp
    directory stands for an NFS mount here: an image on a local file system is refused from
    another machine whatever its path (test_migration_cross_host.py)."""
    cfg = f"ns=file:path={tmp_path}/a.img,size=1M,{CFG}"
    src, dst = NvmeController(cfg, name="src"), NvmeController(cfg, name="dst")
    try:
        facts = {**preflight_facts(src), "nvme.host": "another-machine", "nvme.image_fs": [[1, "nfs4"]]}
        assert preflight_problems(dst, facts) == []
        os.rename(tmp_path / "a.img", tmp_path / "a.away")
        (why,) = preflight_problems(dst, facts)
        assert why.startswith(f"namespace 1: image {tmp_path}/a.img cannot be reached here"), why
        with open(tmp_path / "a.img", "wb") as f:
            f.truncate(4096)
        (why,) = preflight_problems(dst, facts)
        assert why == f"namespace 1: image {tmp_path}/a.img has 4096 bytes here, the namespace 1048576"
        with open(tmp_path / "a.img", "wb") as f:
            f.truncate(1 << 20)
        (why,) = preflight_problems(dst, facts)
        assert "names another file now than the one this controller opened" in why
        # on this machine the destination serves the very file the source writes: fine
        assert preflight_problems(dst, preflight_facts(src)) == []
    finally:
        src.close()
        dst.close()


def test_a_created_namespace_the_destination_could_not_reopen_refuses(host, tmp_path):
    """A ``file`` namespace created by Namespace Management, and a destination with another
    state directory: the image its record names is not one this destination's Namespace
    Management makes (ns_records.plan, as the load would say it after the stop)."""
    src_dir, other = tmp_path / "src", tmp_path / "other"
    src_dir.mkdir()
    other.mkdir()
    cfg = f"serial=PRE1,state_dir={src_dir},ns_create=file,ns=mem:size=1M,{CFG}"
    h = host(_maker(cfg, cfg.replace(f"state_dir={src_dir}", f"state_dir={other}")))
    nsid = create(h.drv, 256)
    attach(h.drv, nsid)
    h.drv.scan_namespaces()
    _writes(h, [1, nsid], seed=4)
    facts = preflight_facts(h.ctrl)
    assert facts["nvme.created"][0][0] == nsid and facts["nvme.created"][0][1] == "file"
    _refused(h, f"created namespace {nsid}", "is not the one Namespace Management creates here")
    assert list(other.glob("*.img*")) == []  # no image made there
    h.make = _maker(cfg)
    for f in src_dir.glob("*.state"):
        f.unlink()  # (its state file would bring the namespace back by itself)
    h.move()
    assert h.blocks.verify_all() > 0


def test_malformed_facts_are_value_errors_and_good_ones_give_no_reason(tmp_path):
    ctrl = NvmeController(f"ns=file:path={tmp_path}/a.img,size=1M,{CFG}", name="c")
    try:
        facts = preflight_facts(ctrl)
        assert facts["nvme.nsids"] == [1] and facts["nvme.images"][0][:4] == [1, f"{tmp_path}/a.img", 1 << 20, False]
        assert preflight_problems(ctrl, facts) == []
        for bad in ({**facts, "nvme.nsids": "1"}, {**facts, "nvme.images": [[1, 2]]},
                    {**facts, "nvme.images": [[1, "p", True, False, None]]},
                    {**facts, "nvme.images": [[1, "p", 10, False, ["a", 1]]]},
                    {**facts, "nvme.created": [[1, "file", 4096, b"x", b"", b"", ""]], "nvme.deleted": []},
                    {**facts, "nvme.created": "none", "nvme.deleted": []}):
            with pytest.raises(ValueError):
                preflight_problems(ctrl, bad)
    finally:
        ctrl.close()
