"""``pcidev serve --vfio-user SOCKET TYPE[,props]``: serve a device to QEMU over vfio-user.

The device is built by :meth:`pcidev.registry.DeviceRegistry.create` from the
registry of this command line's plugins (so ``-p no:NAME`` and ``-p MODULE``
apply). ``TYPE,help`` lists the type's properties instead (as ``pcidev describe``).

The socket is created first and the device built afterwards, so a refused socket
path leaves no file a device writes when it is built (an image, a state file); a
device that fails to build closes the socket again (its file is removed).
"""

from __future__ import annotations

import argparse

from pcidev.cli._command import CliContext, command
from pcidev.cli.describe import describe_text
from pcidev.properties import split_device_spec, split_properties
from pcidev.transport.vfio_user.serving import listen_vfio_user, serve_device

__all__ = ["COMMAND"]


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vfio-user", metavar="SOCKET", required=True,
                        help="UNIX socket to serve the device on (QEMU's vfio-user-pci connects to it)")
    parser.add_argument("device", metavar="DEVICE[,props]",
                        help="device type and properties, e.g. nvme,ns=mem:size=64M (nvme,help lists them)")


@command("serve", help="serve a device to QEMU over vfio-user (pcidev serve --vfio-user SOCKET DEVICE[,props])",
         configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """Build the device and serve it until its client leaves."""
    type_name, props = split_device_spec(args.device)
    if ("", "help") in split_properties(props):
        print(describe_text(ctx.registry, type_name))
        return 0
    registry = ctx.registry  # plugin errors before the socket exists
    listener = listen_vfio_user(args.vfio_user)
    try:
        device = registry.create(type_name, props)
    except BaseException:
        listener.close()
        raise
    return serve_device(device, args.vfio_user, pm=ctx.pm, listener=listener)
