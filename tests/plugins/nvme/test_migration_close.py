"""After a migration out, closing the source controller writes no state file: the
destination owns it (PciDevice.owns_state); neither does a destination that never
received the controller; a controller that did not migrate still saves its state when
it is closed."""

from __future__ import annotations

import os
import socket
import threading

from pcidev.host import Machine
from pcidev.migration import migrate_in, migrate_out
from pcidev.testing import Workload, WorkloadContext, migrate_under_load
from pcidev.transport.endpoint import DeviceEndpoint
from pcidev_nvme.controller import NvmeController
from pcidev_nvme.persist import StateFile
from pcidev_nvme.testing.driver import NvmeDriver


def _stat(path) -> tuple[int, int, bytes]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, path.read_bytes()


def test_a_migrated_out_controller_does_not_save_over_the_destination(tmp_path):
    state = tmp_path / "ctrl.state"
    config = f"serial=MIGCLOSE,ns=mem:size=1M,state_file={state}"
    with Machine(ram_size=16 << 20) as machine:
        src = NvmeController(config, name="src")
        pdev = machine.plug(src)
        drv = NvmeDriver(machine, pdev, io_queues=1, io_depth=16, aers=0)
        drv.probe()
        for i in range(8):
            drv.write(1, 8 * i, os.urandom(4096))
        dst = NvmeController(config, name="dst")
        a, b = socket.socketpair()
        got: dict[str, object] = {}
        peer = threading.Thread(target=lambda: got.update(incoming=migrate_in(dst, b)), daemon=True)
        peer.start()
        try:
            migrate_out(src, a)
        finally:
            peer.join(10)
            a.close()
            b.close()
        assert src.migrated_out and not src.owns_state and dst.owns_state
        got["incoming"].resources.close()  # type: ignore[attr-defined]
        dst.save_state()  # the destination keeps the state file from now on
        owned = _stat(state)
        src.close()  # the source's process ends
        assert _stat(state) == owned, "the migrated-out source rewrote the destination's state file"
        dst.close()  # a controller that did not migrate saves on close, as before
        assert _stat(state)[0] != owned[0]


def test_a_destination_that_received_nothing_does_not_save(tmp_path):
    state = tmp_path / "ctrl.state"
    config = f"serial=MIGWAIT,ns=mem:size=1M,state_file={state}"
    with NvmeController(config, name="running") as running:
        running.save_state()
        waiting = NvmeController(config, name="waiting")  # a destination process's controller...
        owned = _stat(state)  # (it reads the file, counts a power-on and writes it when it is built)
        DeviceEndpoint(waiting).close()  # ...ends before any source connected
        assert waiting.closed and _stat(state) == owned


def test_after_migrations_under_load_the_state_file_is_the_last_controllers(tmp_path):
    """migrate_under_load moves the controller (with a state file) twice while a
    workload writes; every earlier process exits without writing: the file the last
    controller leaves counts every write."""
    state = tmp_path / "ctrl.state"

    class WriteSome(Workload):
        writes = 0

        def setup(self, ctx: WorkloadContext) -> None:
            self.drv = NvmeDriver(ctx.machine, ctx.pdev, io_queues=1, io_depth=16, aers=0)
            self.drv.probe()

        def step(self, ctx: WorkloadContext) -> None:
            for i in range(4):
                data = os.urandom(4096)
                self.drv.write(1, 8 * ((ctx.iteration * 4 + i) % 200), data)
                assert self.drv.read(1, 8 * ((ctx.iteration * 4 + i) % 200), 8) == data
                self.writes += 1

    work = WriteSome()
    result = migrate_under_load("nvme", work, count=2, iterations=9, probe=False,
                                properties=f"serial=MIGLOAD,ns=mem:size=1M,state_file={state}")
    assert len(result.migrations) == 2 and result.iterations == 9
    saved = StateFile(state).load()
    assert saved is not None and saved.smart.host_write_commands == work.writes == 36
