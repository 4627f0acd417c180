"""``pcidev serve --vfio-user SOCKET TYPE[,props]``: serve a device to QEMU over vfio-user.

The device is built by :meth:`pcidev.registry.DeviceRegistry.create` from the
registry of this command line's plugins (so ``-p no:NAME`` and ``-p MODULE``
apply). ``TYPE,help`` lists the type's properties instead (as ``pcidev describe``).

The socket is created first and the device built afterwards, so a refused socket
path leaves no file a device writes when it is built (an image, a state file); a
device that fails to build closes the socket again (its file is removed).

By default the server keeps the device when a client leaves and waits for the
next one (``--persist``); ``--once`` exits after the first client instead. Beside
the socket, ``SOCKET.ctl`` (``--control``) is the handover control endpoint that
``pcidev handover`` talks to (:mod:`pcidev.transport.vfio_user.handover`);
``--sriov-vfs N`` enables N virtual functions of a device with SR-IOV at the start and
serves VF ``k`` on ``SOCKET.vf<k>`` (QEMU's ``vfio-user-pci`` attaches one device per
socket; docs/sriov.md). ``--adopt FD`` is how a handover starts the new process (not for interactive use),
with ``--inherit-fd FD:KEY`` for each descriptor the old device passes on (its disk
images: :mod:`pcidev.inheritance`). ``--max-dma-maps``, ``--message-timeout`` and
``--allow-unsealed-dma`` set each client's limits (a handover's new process gets them too).
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from pcidev.cli._command import CliContext, UsageError, command
from pcidev.cli.describe import describe_text
from pcidev.device import PciDevice
from pcidev.errors import ConfigError
from pcidev.inheritance import inheriting, parse_inherit_arg
from pcidev.properties import split_device_spec, split_properties
from pcidev.transport.address import MAX_UNIX_PATH, Listener
from pcidev.transport.vfio_user.handover import control_path, listen_control
from pcidev.transport.vfio_user.server import (
    DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MESSAGE_TIMEOUT,
    MAX_MESSAGE_TIMEOUT,
    MIN_MESSAGE_TIMEOUT,
)
from pcidev.transport.vfio_user.serving import listen_vfio_user, serve_adopted, serve_device

__all__ = ["COMMAND", "child_args", "pinned_spec", "server_options"]

log = logging.getLogger(__name__)


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vfio-user", metavar="SOCKET", required=True,
                        help="UNIX socket to serve the device on (QEMU's vfio-user-pci connects to it)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--persist", dest="once", action="store_false",
                      help="keep the device when a client leaves and accept the next one (the default)")
    mode.add_argument("--once", dest="once", action="store_true",
                      help="exit when the first client leaves (the device is closed, its state saved)")
    parser.set_defaults(once=False)
    parser.add_argument("--control", metavar="PATH",
                        help="the handover control socket (default SOCKET.ctl; mode 0600, same user only)")
    parser.add_argument("--sriov-vfs", metavar="N", type=int, default=0,
                        help="SR-IOV: enable N virtual functions at the start and serve VF k on SOCKET.vf<k> "
                             "(a device type with an SR-IOV capability, e.g. nvme,sriov_max_vfs=...)")
    limits = parser.add_argument_group("limits on each client (docs: the threat model)")
    limits.add_argument("--max-dma-maps", metavar="N", type=int, default=DEFAULT_MAX_DMA_MAPS,
                        help=f"DMA regions a client may map, with or without an fd (default {DEFAULT_MAX_DMA_MAPS}; "
                             "more get ENOSPC)")
    limits.add_argument("--message-timeout", metavar="SECONDS", type=float, default=DEFAULT_MESSAGE_TIMEOUT,
                        help="seconds a started message may take to arrive whole, and a reply to be read, before "
                             f"the client is dropped (default {DEFAULT_MESSAGE_TIMEOUT:g})")
    limits.add_argument("--allow-unsealed-dma", action="store_true",
                        help="TRUSTED CLIENTS ONLY: map guest memory whose fd has no F_SEAL_SHRINK (a client "
                             "that shrinks it kills this process with SIGBUS); without it such DMA_MAPs get EINVAL")
    parser.add_argument("--adopt", metavar="FD", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inherit-fd", metavar="FD:KEY", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("device", metavar="DEVICE[,props]",
                        help="device type and properties, e.g. nvme,ns=mem:size=64M (nvme,help lists them)")


def pinned_spec(spec: str, device: PciDevice) -> str:
    """``spec`` with the properties the device chose itself written out, so that a
    handover's new process builds the same device: today the serial number a
    device without ``serial=`` made up (NVMe draws a random one).

    :param spec: ``DEVICE[,props]`` as given.
    :param device: the device built from it.
    """
    _type, props = split_device_spec(spec)
    if any(key == "serial" for key, _v in split_properties(props)):
        return spec
    serial = getattr(getattr(device, "cfg", None), "serial", None)
    if not isinstance(serial, str) or not serial or "," in serial:
        return spec
    return f"{spec},serial={serial}"


def child_args(args: argparse.Namespace, ctx: CliContext, spec: str) -> list[str]:
    """The arguments (after ``python -m pcidev``) of the process a handover starts:
    the same plugins, socket, mode and device as this one.

    :param args: this ``serve`` command's arguments.
    :param ctx: its context (``-p`` options).
    :param spec: the device spec (:func:`pinned_spec`).
    """
    out: list[str] = []
    for p in ctx.plugin_specs:
        out += ["-p", p]
    out += ["serve", "--vfio-user", args.vfio_user, "--once" if args.once else "--persist"]
    if args.control:
        out += ["--control", args.control]
    out += ["--max-dma-maps", str(args.max_dma_maps), "--message-timeout", repr(args.message_timeout)]
    if args.allow_unsealed_dma:
        out.append("--allow-unsealed-dma")
    return out + [spec]


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """The limits of each client's :class:`~pcidev.transport.vfio_user.server.VfioUserServer`
    from the command line.

    :raises UsageError: a limit that is not positive.
    """
    if args.max_dma_maps <= 0:
        raise UsageError(f"--max-dma-maps {args.max_dma_maps}: must be at least 1")
    if not MIN_MESSAGE_TIMEOUT <= args.message_timeout <= MAX_MESSAGE_TIMEOUT:
        raise UsageError(f"--message-timeout {args.message_timeout:g}: must be from {MIN_MESSAGE_TIMEOUT:g} to "
                         f"{MAX_MESSAGE_TIMEOUT:g} seconds")
    return {"max_dma_maps": args.max_dma_maps, "message_timeout": args.message_timeout,
            "allow_unsealed_dma": args.allow_unsealed_dma}


@command("serve", help="serve a device to QEMU over vfio-user (pcidev serve --vfio-user SOCKET DEVICE[,props])",
         configure=_configure)
def COMMAND(args: argparse.Namespace, ctx: CliContext) -> int | None:
    """Build the device and serve it (until its client leaves with ``--once``)."""
    type_name, props = split_device_spec(args.device)
    if ("", "help") in split_properties(props):
        print(describe_text(ctx.registry, type_name))
        return 0
    registry = ctx.registry  # plugin errors before the socket exists
    if args.sriov_vfs < 0:
        raise UsageError(f"--sriov-vfs {args.sriov_vfs}: not a number of VFs")
    if args.sriov_vfs and args.adopt is not None:
        raise UsageError("--sriov-vfs cannot be combined with a handover (--adopt)")
    if args.inherit_fd and args.adopt is None:
        raise UsageError("--inherit-fd is for a handover's new process (with --adopt)")
    options = server_options(args)
    if args.adopt is not None:
        if args.adopt < 0:
            raise UsageError(f"--adopt {args.adopt}: not a file descriptor")
        try:
            inherited = parse_inherit_arg(args.inherit_fd, reserved=(args.adopt,))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        with inheriting(inherited):  # the old process's images, not their paths
            device = registry.create(type_name, props)
        return serve_adopted(device, args.vfio_user, args.adopt, pm=ctx.pm, once=args.once,
                             child_args=child_args(args, ctx, args.device), server_options=options)
    listener = listen_vfio_user(args.vfio_user)
    control: Listener | None = None
    ctl_path = args.control or control_path(args.vfio_user)
    try:
        if args.control is None and len(os.fsencode(ctl_path)) > MAX_UNIX_PATH:
            log.warning("no handover control socket: %s is too long for a socket address (use --control)",
                        ctl_path)
        else:
            control = listen_control(ctl_path)
    except BaseException:
        listener.close()
        raise
    try:
        device = registry.create(type_name, props)
    except BaseException:
        listener.close()
        if control is not None:
            control.close()
        raise
    try:
        return serve_device(device, args.vfio_user, pm=ctx.pm, once=args.once, listener=listener, control=control,
                            child_args=child_args(args, ctx, pinned_spec(args.device, device)),
                            sriov_vfs=args.sriov_vfs, server_options=options)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
