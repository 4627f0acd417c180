"""Drive a device served in another process, move it to a second process, keep driving it.

Run with two device processes already started (docs/howto/migrate.md, examples/howto/migrate.sh)::

    python examples/howto/migrate.py unix:SOURCE_LINK unix:DESTINATION_MIGRATION_SOCKET

The device is ``howto-counter`` (examples/howto/counter.py): BAR0 COUNT at 0x00, STEP at
0x04, TICK at 0x08.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pcidev.host import Machine
from pcidev.transport.link.process import DeviceProcess

COUNT, STEP, TICK = 0x00, 0x04, 0x08


# [move]
def move(source_link: str, destination: str) -> dict[str, object]:
    """Plug the device at ``source_link``, count, migrate it to ``destination``, count on."""
    with Machine(ram_size=16 << 20) as machine:
        counter = machine.plug_remote(source_link)     # the device link: RAM and eventfds shared
        counter.enable_device()
        counter.iowrite32(0, STEP, 10)
        counter.iowrite32(0, TICK, 1)
        report = counter.device.migrate(destination)   # quiesce, save, send, load, resume
        counter.iowrite32(0, TICK, 1)                  # now served by the destination process
        assert counter.ioread32(0, COUNT) == 20 and counter.ioread32(0, STEP) == 10
        return report
# [end move]


# [processes]
def move_between_new_processes(directory: Path) -> dict[str, object]:
    """Start the source and destination processes from Python, then :func:`move`.

    The processes import the plugin module ``counter``: its directory must be on their
    ``PYTHONPATH`` (they inherit this process's environment).
    """
    source = DeviceProcess("howto-counter", f"unix:{directory}/a.sock", plugin_specs=["counter"])
    destination = DeviceProcess("howto-counter", f"unix:{directory}/b.sock", plugin_specs=["counter"],
                                incoming=f"unix:{directory}/migration.sock")
    try:
        source.wait_event("ready")                       # serving on its link
        where = destination.wait_event("listening")["incoming"]
        report = move(f"unix:{directory}/a.sock", str(where))
        source.proc.wait(10.0)                           # the source ends after the move
        return report
    finally:
        source.stop()                                    # SIGTERM (no-op if it has ended)
        destination.stop()
# [end processes]


if __name__ == "__main__":
    report = move(sys.argv[1], sys.argv[2])
    print(f"moved: {report['state_size']} bytes of state and {report['fds']} fds, "
          f"downtime {report['downtime'] * 1000:.1f} ms")
