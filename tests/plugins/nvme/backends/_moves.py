"""Helpers of the NBD migration tests: device processes started in a network namespace,
and a migration that must be refused while the source runs on."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence

import pytest

from pcidev.errors import MigrationError
from pcidev.host import Machine
from pcidev.testing.migration import WorkloadContext
from pcidev.transport.link.process import DeviceProcess
from pcidev.transport.link.remote import RemoteDevice
from pcidev_nvme.testing.workload import VerifiedIo


class NetnsDeviceProcess(DeviceProcess):
    """A device process (``python -m pcidev.transport.link.process``, as
    :func:`~pcidev.transport.link.process.spawn` starts it) run by ``ip netns exec NETNS``;
    ``wrap`` goes between the two (``unshare -m sh -c ...``)."""

    def __init__(self, netns: str, device: str, link: str, *, options: str, incoming: str | None = None,
                 wrap: Sequence[str] = ()) -> None:
        self.link = link
        self.incoming = incoming
        self.events = []
        self.stderr_lines = []
        self._cond = threading.Condition()
        cmd = [sys.executable, "-m", "pcidev.transport.link.process", "--device", device, "--link", link,
               "--props", options, "--events", *(["--incoming", incoming] if incoming else [])]
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, *wrap, *cmd], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._readers = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()


def refused_while_the_source_runs(source: DeviceProcess, dest: DeviceProcess, work: VerifiedIo,
                                  match: str) -> MigrationError:
    """Plug ``source`` into a software host, run ``work`` two steps, ask for a migration to
    ``dest`` (it must be refused with a message matching ``match``), then run two more
    steps and the final read of every block on the source: zero mismatches."""
    source.wait_event("ready", timeout=60)
    address = str(dest.wait_event("listening", timeout=60)["incoming"])
    with Machine(ram_size=work.ram_size) as machine:
        pdev = machine.plug_remote(source.link, timeout=60)
        remote = pdev.device
        assert isinstance(remote, RemoteDevice)
        ctx = WorkloadContext(machine, pdev)
        work.setup(ctx)
        for _ in range(2):
            work.step(ctx)
        with pytest.raises(MigrationError, match=match) as info:
            remote.migrate(address, timeout=60)
        for _ in range(2):  # the source runs on
            work.step(ctx)
        work.verify(ctx)
        report = work.report()
        assert report["mismatches"] == 0 and report["lost_completions"] == 0
        assert report["blocks_checked"] > 0
    return info.value
