"""The VM tier: a real Linux guest under QEMU (TCG) drives pcidev devices over vfio-user.

Runs when ``PCIDEV_VM=1``, or in CI (``CI=true``) unless ``PCIDEV_VM=0``; otherwise the
tests are skipped. When enabled, the session fixture builds what it needs
(``setup_vm.sh``: debootstrap, a trixie chroot with QEMU from trixie-backports, the
guest kernel and initramfs; reused when present) and fails loudly if it cannot.
"""

from __future__ import annotations

import os
import time

import pytest
import vm_guest


def vm_enabled() -> bool:
    flag = os.environ.get("PCIDEV_VM")
    if flag is not None:
        return flag == "1"
    return os.environ.get("CI", "").lower() == "true"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm_root():
    """The VM tier's chroot, built or reused (session-wide)."""
    if not vm_enabled():
        pytest.skip("VM tier is opt-in: PCIDEV_VM=1 (CI=true runs it)")
    if os.geteuid() != 0:
        pytest.fail("the VM tier needs root (debootstrap, chroot, bind mounts)", pytrace=False)
    try:
        seconds = vm_guest.setup()
    except Exception as exc:
        pytest.fail(f"VM tier setup failed: {exc}", pytrace=False)
    print(f"\nVM tier setup: {seconds:.1f} s")
    os.environ.setdefault("PCIDEV_VM_SETUP_SECONDS", f"{seconds:.1f}")
    return vm_guest.ROOT


@pytest.fixture
def boot(vm_root, request):
    """``boot(script, devices, **run_guest_kw)`` → :class:`vm_guest.GuestRun`; dumps the console
    on failure, and fails the test when the run's ``during`` thread or a marker callback raised."""
    runs = []

    def run(script: str, devices=(), **kw):
        t0 = time.monotonic()
        r = vm_guest.run_guest(script, devices, root=vm_root, tag=request.node.name[:40], **kw)
        runs.append(r)
        print(f"\n[{request.node.name}] boot+run {time.monotonic() - t0:.1f} s, guest rc={r.rc}")
        if r.during_error is not None:  # the host-side thread (or a marker callback) failed
            raise AssertionError(f"during the guest run: {r.during_error!r}") from r.during_error
        return r

    yield run
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for r in runs:
            print("---- console ----\n" + r.console[-8000:])
            for s in r.servers:
                print("---- server ----\n" + s[-4000:])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
