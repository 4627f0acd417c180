"""The set-up of the tests that move an NVMe controller between device processes: a source
process serving ``nvme``, a software host (:class:`~pcidev.host.Machine`) plugged to it over
the device link with a probed :class:`~pcidev_nvme.testing.driver.NvmeDriver`, and the
destination processes a test starts. Made through the ``process_host`` fixture
(conftest.py), which closes the host and stops every process at teardown."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pcidev.host import Machine
from pcidev.transport.link.process import DeviceProcess
from pcidev_nvme.testing.driver import NvmeDriver

#: seconds a device process may take to start (a busy machine: the tests are not about that)
START_TIMEOUT = 120.0


class ProcessHost:
    """A source process (``unix:WHERE/a.sock``) serving ``nvme`` with ``options``, ready; a
    machine of ``ram`` bytes plugged to it; a driver probed with ``drv_kwargs``.

    :ivar src: the source :class:`~pcidev.transport.link.process.DeviceProcess`.
    :ivar procs: every process started (the source first).
    :ivar pdev: the host's handle (``pdev.device`` is the link proxy: ``migrate()``).
    """

    def __init__(self, where: Path | str, options: str, *, ram: int = 64 << 20,
                 plugin_specs: Sequence[str] = (), **drv_kwargs: Any) -> None:
        self.where = str(where)
        self.options = options
        self.plugin_specs = plugin_specs
        self.src = DeviceProcess("nvme", f"unix:{self.where}/a.sock", options=options, plugin_specs=plugin_specs)
        self.procs: list[DeviceProcess] = [self.src]
        self.machine: Machine | None = None
        try:
            # (a file image's identity file exists before any destination starts)
            self.src.wait_event("ready", timeout=START_TIMEOUT)
            self.machine = Machine(ram_size=ram)
            self.pdev = self.machine.plug_remote(self.src.link, timeout=10)
            self.drv = NvmeDriver(self.machine, self.pdev, **drv_kwargs)
            self.drv.probe()
        except BaseException:
            self.close()
            raise

    def destination(self, name: str, incoming: str | None = None, *, options: str | None = None,
                    listening: bool = False) -> DeviceProcess:
        """Start a destination process ``unix:WHERE/NAME.sock`` waiting for a migration on
        ``incoming`` (default ``unix:WHERE/NAME-in.sock``; ``"tcp"``: a free TCP port on
        127.0.0.1), with the source's options unless ``options``.

        :param listening: wait until it listens (its ``incoming`` is then the real address).
        """
        if incoming is None:
            incoming = f"unix:{self.where}/{name}-in.sock"
        elif incoming == "tcp":
            incoming = "tcp:127.0.0.1:0"
        dest = DeviceProcess("nvme", f"unix:{self.where}/{name}.sock", options=options or self.options,
                             incoming=incoming, plugin_specs=self.plugin_specs)
        self.procs.append(dest)
        if listening:
            self.listening(dest)
        return dest

    def listening(self, dest: DeviceProcess) -> str:
        """Wait until ``dest`` listens; its ``incoming`` is then the real address (a TCP
        port chosen), also returned."""
        dest.incoming = dest.wait_event("listening", timeout=START_TIMEOUT)["incoming"]
        return str(dest.incoming)

    @property
    def device(self) -> Any:
        """The link proxy the host drives (``migrate()``, ``info``)."""
        return self.pdev.device

    def close_machine(self) -> None:
        """Close the host (the device link): a migrated source then exits. Idempotent."""
        machine, self.machine = self.machine, None
        if machine is not None:
            machine.close()

    def close(self) -> None:
        """Close the host, then stop every process (one stopped by SIGSTOP too). Idempotent."""
        try:
            self.close_machine()
        finally:
            for proc in self.procs:
                if proc.proc.poll() is None:
                    os.kill(proc.pid, signal.SIGCONT)  # (a test may have stopped it: SIGSTOP)
                proc.stop()
