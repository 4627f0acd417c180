"""Live-migrate the edu example device between processes while the software host
keeps driving DMA through it.

The device (a DMA descriptor-ring engine with MSI-X) runs in its own process,
served over the device link; an in-process software host plugs it, enumerates it
and keeps posting copy descriptors, waiting for MSI-X interrupts and checking
every block with CRC-32C. Meanwhile the device moves to a new process
``--migrations`` times (quiesce between two DMA chunks, save, send with the
guest-memory and interrupt fds over a UNIX socket, load, acknowledge, resume);
the host follows it. The script prints each migration's downtime and state size,
and the CRC-32C verification of every block (exit status 1 on any mismatch).

Run::

    .venv/bin/python examples/migrate_edu.py [--blocks N] [--block-size BYTES]
        [--migrations N] [--tcp] [--json] [-p no:NAME | -p MODULE]...

``pcidev demo`` runs the same demonstration with the default options. The code
is in ``pcidev/demo.py``; the pieces it uses are ``Machine.plug_remote``
(``pcidev/host/machine.py``), ``RemoteDevice.migrate`` (``pcidev/transport/link/remote.py``),
``DeviceProcess`` (``pcidev/transport/link/process.py``) and ``pcidev/migration/``.
"""

from __future__ import annotations

import argparse
import json
import sys

from pcidev import demo


def main(argv: list[str] | None = None) -> int:
    """Parse the options, run the demo, report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=384, help="DMA blocks to copy and verify")
    ap.add_argument("--block-size", type=int, default=65536, help="bytes per block")
    ap.add_argument("--migrations", type=int, default=3, help="how many times the device moves")
    ap.add_argument("--tcp", action="store_true",
                    help="migrate over TCP (no fds travel; the host re-attaches RAM and eventfds)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    ap.add_argument("-p", action="append", default=[], dest="plugin_specs", metavar="no:NAME|MODULE",
                    help="plugin selection of the device processes, as pcidev -p; repeatable")
    args = ap.parse_args(argv)
    summary = demo.run(blocks=args.blocks, block_size=args.block_size, migrations=args.migrations,
                       tcp=args.tcp, plugin_specs=args.plugin_specs)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    ok = summary["mismatches"] == 0 and len(summary["migrations"]) == args.migrations
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
